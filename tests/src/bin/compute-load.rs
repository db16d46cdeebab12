//! Measures compute: embeddings per second and chat tokens per second with
//! p50/p99 latency, either through the HTTP API at `--url` (e.g. a peer's
//! overlay address) or in-process on the same models (`--in-process DIR`).
//! Prints one JSON object.
//!
//! compute-load --url http://127.0.0.1:8420 [--embeddings 200] [--chats 5] [--concurrency 1]
//! compute-load --url http://100.64.0.2:8421 --tickets ALPHA_STATE,BETA_STATE,NETWORK,beta
//! compute-load --in-process ~/.cache/crank-mesh/models [--threads N]
//!
//! A worker takes jobs only with a ticket: `--tickets` signs a fresh one per
//! request with the submitting device's key (from its state directory),
//! addressed to the worker (whose state directory gives its key), the way a
//! gateway would, for measuring calls that bypass the gateway.
//!
//! With `--concurrency N` the embeddings come from N clients at once (the
//! server batches them); the chats stay one at a time.

use std::time::{Duration, Instant};

use base64::Engine as _;
use compute::manifest::{spec, verified_path};
use platform::jobs::{Route, Sensitivity, Ticket, Workload, DOMAIN_TICKET, TICKET_HEADER};
use platform::keys::DevicePrivate;
use platform::signed::Signed;
use serde_json::json;

/// Signs a ticket per request, as a gateway does.
#[derive(Clone)]
struct Tickets {
    submitter: DevicePrivate,
    worker_key: platform::keys::DevicePublic,
    network: String,
    worker: String,
}

fn device_key(state_dir: &str) -> anyhow::Result<DevicePrivate> {
    let keys: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{state_dir}/keys.json"))?)?;
    keys["device"]
        .as_str()
        .and_then(|k| k.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no device key in {state_dir}/keys.json"))
}

impl Tickets {
    fn parse(spec: &str) -> anyhow::Result<Tickets> {
        let parts: Vec<&str> = spec.split(',').collect();
        let [submitter, worker_dir, network, worker] = parts[..] else {
            anyhow::bail!("--tickets SUBMITTER_STATE,WORKER_STATE,NETWORK,WORKER_NAME");
        };
        Ok(Tickets {
            submitter: device_key(submitter)?,
            worker_key: device_key(worker_dir)?.public(),
            network: network.into(),
            worker: worker.into(),
        })
    }

    fn header(&self, workload: Workload, model: &str) -> String {
        let now = platform::unix_now();
        let mut id = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut id);
        let t = Ticket {
            job_id: hex::encode(id),
            network: self.network.clone(),
            submitter_device: "compute-load".into(),
            submitter_user: "compute-load".into(),
            workload,
            model: model.into(),
            route: Route::Auto,
            sensitivity: Sensitivity::Public,
            max_cost: u64::MAX / 2,
            timeout_ms: 120_000,
            issued_at: now,
            expires_at: now + 180,
            worker: self.worker.clone(),
            worker_key: self.worker_key,
            attempt: 1,
        };
        let signed = Signed::sign(&self.submitter, DOMAIN_TICKET, &t);
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&signed).unwrap_or_default())
    }
}

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
        &verified_path(dir, spec("smollm2-135m-instruct").expect("manifest"))?,
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
    tickets: Option<Tickets>,
) -> anyhow::Result<serde_json::Value> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let emb_body = json!({"model": "all-minilm-l6-v2", "input": SENTENCE});
    let with_ticket =
        |req: reqwest::RequestBuilder, t: &Option<Tickets>, w: Workload, model: &str| match t {
            Some(t) => req.header(TICKET_HEADER, t.header(w, model)),
            None => req,
        };
    let post = |path: &str, body: &serde_json::Value| {
        let (w, model) = if path.contains("embeddings") {
            (Workload::Embeddings, "all-minilm-l6-v2")
        } else {
            (Workload::SmallChat, "smollm2-135m-instruct")
        };
        with_ticket(
            client.post(format!("{url}{path}")).json(body),
            &tickets,
            w,
            model,
        )
        .send()
    };
    post("/v1/embeddings", &emb_body)
        .await?
        .error_for_status()?; // warm-up
    let start = Instant::now();
    let clients = (0..concurrency.max(1)).map(|c| {
        let (client, body, url, tickets) = (
            client.clone(),
            emb_body.clone(),
            format!("{url}/v1/embeddings"),
            tickets.clone(),
        );
        let share = n_emb / concurrency.max(1) + usize::from(c < n_emb % concurrency.max(1));
        async move {
            let mut lat = Vec::with_capacity(share);
            for _ in 0..share {
                let t = Instant::now();
                with_ticket(
                    client.post(&url).json(&body),
                    &tickets,
                    Workload::Embeddings,
                    "all-minilm-l6-v2",
                )
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
    let chat_body = json!({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": CHAT_TOKENS});
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
        (Some(url), None) => {
            let tickets = flag("--tickets").map(|t| Tickets::parse(&t)).transpose()?;
            over_http(&url, n_emb, n_chat, concurrency, tickets).await?
        }
        (None, Some(dir)) => in_process(&dir, n_emb, n_chat)?,
        _ => anyhow::bail!("usage: compute-load (--url URL | --in-process MODELS_DIR) [--embeddings N] [--chats N] [--concurrency N] [--threads N]"),
    };
    println!("{report}");
    Ok(())
}
