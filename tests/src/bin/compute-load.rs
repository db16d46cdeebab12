//! Measures compute: embeddings per second and chat tokens per second with
//! p50/p99 latency, either through the HTTP API at `--url` (e.g. a peer's
//! overlay address) or in-process on the same models (`--in-process DIR`).
//! Prints one JSON object.
//!
//! compute-load --url http://100.64.0.2:8421 [--embeddings 200] [--chats 5] [--concurrency 1]
//! compute-load --in-process ~/.cache/crank-mesh/models [--threads N]
//!
//! With `--concurrency N` the embeddings come from N clients at once (the
//! server batches them); the chats stay one at a time.

use std::time::{Duration, Instant};

use compute::manifest::{spec, verified_path};
use serde_json::json;

const SENTENCE: &str =
    "Crank Mesh pools the devices people already own into one private compute network.";
const PROMPT: &str = "Write a short paragraph about networks of small computers.";
const CHAT_TOKENS: usize = 64;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn summary(kind: &str, mut lat: Vec<Duration>, units: f64, elapsed: Duration) -> serde_json::Value {
    lat.sort();
    json!({
        "kind": kind,
        "requests": lat.len(),
        "per_second": units / elapsed.as_secs_f64(),
        "p50_ms": percentile(&lat, 0.5),
        "p99_ms": percentile(&lat, 0.99),
    })
}

fn in_process(dir: &str, n_emb: usize, n_chat: usize) -> anyhow::Result<serde_json::Value> {
    let dir = std::path::Path::new(dir);
    let embedder = compute::Embedder::load(&verified_path(
        dir,
        spec("all-minilm-l6-v2").expect("manifest"),
    )?)?;
    let generator = compute::Generator::load(
        &verified_path(dir, spec("gemma-3-270m").expect("manifest"))?,
        2048,
    )?;
    // One kept context, as the server keeps one.
    let mut ctx = embedder.context()?;
    let input = [SENTENCE.to_owned()];
    let mut embed = || -> anyhow::Result<()> {
        let tokens = embedder.tokenize(&input)?;
        embedder.decode(&mut ctx, &[&tokens[0]])?;
        Ok(())
    };
    embed()?; // warm-up
    let (mut lat, start) = (Vec::new(), Instant::now());
    for _ in 0..n_emb {
        let t = Instant::now();
        embed()?;
        lat.push(t.elapsed());
    }
    let emb = summary("embeddings", lat, n_emb as f64, start.elapsed());
    let prompt = generator.chat_prompt(&[("user".into(), PROMPT.into())])?;
    let (mut lat, mut tokens, start) = (Vec::new(), 0usize, Instant::now());
    for _ in 0..n_chat {
        let t = Instant::now();
        tokens += generator
            .complete(&prompt, CHAT_TOKENS, |_| true)?
            .completion_tokens;
        lat.push(t.elapsed());
    }
    let chat = summary("chat_tokens", lat, tokens as f64, start.elapsed());
    Ok(json!({"mode": "in-process", "embeddings": emb, "chat": chat}))
}

async fn over_http(
    url: &str,
    n_emb: usize,
    n_chat: usize,
    concurrency: usize,
) -> anyhow::Result<serde_json::Value> {
    let client = reqwest::Client::new();
    let emb_body = json!({"model": "all-minilm-l6-v2", "input": SENTENCE});
    let post = |path: &str, body: &serde_json::Value| {
        client.post(format!("{url}{path}")).json(body).send()
    };
    post("/v1/embeddings", &emb_body)
        .await?
        .error_for_status()?; // warm-up
    let start = Instant::now();
    let clients = (0..concurrency.max(1)).map(|c| {
        let (client, body, url) = (
            client.clone(),
            emb_body.clone(),
            format!("{url}/v1/embeddings"),
        );
        let share = n_emb / concurrency.max(1) + usize::from(c < n_emb % concurrency.max(1));
        async move {
            let mut lat = Vec::with_capacity(share);
            for _ in 0..share {
                let t = Instant::now();
                client
                    .post(&url)
                    .json(&body)
                    .send()
                    .await?
                    .error_for_status()?
                    .bytes()
                    .await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }
    });
    let mut lat = Vec::new();
    for l in futures_util::future::join_all(clients).await {
        lat.extend(l?);
    }
    let emb = summary("embeddings", lat, n_emb as f64, start.elapsed());
    let chat_body = json!({"model": "gemma-3-270m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": CHAT_TOKENS});
    let (mut lat, mut tokens, start) = (Vec::new(), 0u64, Instant::now());
    for _ in 0..n_chat {
        let t = Instant::now();
        let v: serde_json::Value = post("/v1/chat/completions", &chat_body)
            .await?
            .error_for_status()?
            .json()
            .await?;
        tokens += v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        lat.push(t.elapsed());
    }
    let chat = summary("chat_tokens", lat, tokens as f64, start.elapsed());
    Ok(json!({"mode": "http", "url": url, "embeddings": emb, "chat": chat}))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let n_emb = flag("--embeddings").map_or(Ok(200), |v| v.parse())?;
    let n_chat = flag("--chats").map_or(Ok(5), |v| v.parse())?;
    let concurrency = flag("--concurrency").map_or(Ok(1), |v| v.parse())?;
    if let Some(t) = flag("--threads") {
        compute::llama::set_threads(t.parse()?);
    }
    let report = match (flag("--url"), flag("--in-process")) {
        (Some(url), None) => over_http(&url, n_emb, n_chat, concurrency).await?,
        (None, Some(dir)) => in_process(&dir, n_emb, n_chat)?,
        _ => anyhow::bail!("usage: compute-load (--url URL | --in-process MODELS_DIR) [--embeddings N] [--chats N] [--concurrency N] [--threads N]"),
    };
    println!("{report}");
    Ok(())
}
