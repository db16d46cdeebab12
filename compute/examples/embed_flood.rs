//! Measures what an oversized embeddings request costs the server and the
//! callers next to it: the 200,000-input request (about 1 MB) against an
//! ordinary one-sentence request sent at the same time, and the largest
//! request the limits allow against the same ordinary request.
//!
//! `CRANK_MODELS_DIR=~/.cache/crank-mesh/models cargo run -p compute --example embed_flood`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use compute::admission::{Admission, AdmittedJob, JobOutcome, Refusal, Workload};
use compute::llama::MAX_INPUTS;
use compute::manifest::{spec, verified_path};
use compute::server::{ComputeServer, Models};
use compute::{EmbedBatcher, Embedder};
use serde_json::json;

struct Open;

impl Admission for Open {
    fn admit(
        &self,
        _: SocketAddr,
        _: &HeaderMap,
        workload: Workload,
        model: &str,
    ) -> Result<AdmittedJob, Refusal> {
        Ok(AdmittedJob::new(format!("{workload}/{model}"), ()))
    }
    fn finish(&self, _: AdmittedJob, _: JobOutcome) {}
}

const MODEL: &str = "all-minilm-l6-v2";

async fn post(base: &str, body: String) -> (u16, Duration) {
    let started = Instant::now();
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/embeddings"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let _ = r.bytes().await;
    (status, started.elapsed())
}

fn ordinary() -> String {
    json!({"model": MODEL, "input": ["an ordinary sentence about the weather"]}).to_string()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main]
async fn main() {
    let dir = PathBuf::from(std::env::var_os("CRANK_MODELS_DIR").expect("CRANK_MODELS_DIR"));
    let path = verified_path(&dir, spec(MODEL).unwrap()).expect("model fetched");
    let batcher = EmbedBatcher::start(Arc::new(Embedder::load(&path).unwrap())).unwrap();
    let server = ComputeServer::new(
        Models {
            embedder: Some((MODEL.into(), Arc::new(batcher))),
            generator: None,
        },
        "bench".into(),
        Arc::new(|_| None),
        Arc::new(|| Ok(())),
        Arc::new(Open),
        1,
        16,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = server
        .router()
        .into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await });

    // Warm up, then the ordinary request alone.
    let _ = post(&base, ordinary()).await;
    let mut alone = Vec::new();
    for _ in 0..20 {
        alone.push(post(&base, ordinary()).await.1);
    }
    alone.sort();
    println!(
        "ordinary request alone: median {}",
        ms(alone[alone.len() / 2])
    );

    let flood = json!({"model": MODEL, "input": vec!["a"; 200_000]}).to_string();
    println!("200,000-input body: {} bytes", flood.len());
    for round in 1..=3 {
        let (big, small) = tokio::join!(post(&base, flood.clone()), post(&base, ordinary()));
        println!(
            "round {round}: 200,000 inputs -> {} in {}; ordinary request next to it -> {} in {}",
            big.0,
            ms(big.1),
            small.0,
            ms(small.1)
        );
    }

    // The most the limits let through: MAX_INPUTS distinct sentences.
    let heavy: Vec<String> = (0..MAX_INPUTS)
        .map(|i| format!("sentence {i} about nothing in particular"))
        .collect();
    let heavy = json!({"model": MODEL, "input": heavy}).to_string();
    let (big, small) = tokio::join!(post(&base, heavy), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        post(&base, ordinary()).await
    });
    println!(
        "{MAX_INPUTS} distinct inputs -> {} in {}; ordinary request sent 50 ms later -> {} in {}",
        big.0,
        ms(big.1),
        small.0,
        ms(small.1)
    );
}
