//! The OpenAI-compatible API on loopback, on the real small models, behind
//! an admission hook that reads a verdict from the ticket header.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::http::HeaderMap;
use common::model;
use compute::admission::{
    sha256_hex, Admission, AdmittedJob, JobOutcome, JobStatus, Refusal, Workload,
};
use compute::server::{ComputeServer, Models};
use compute::{EmbedBatcher, Embedder, Generator};
use serde_json::{json, Value};

const TICKET: &str = "x-crank-ticket";

/// Admits jobs whose ticket says `ok`, refuses the others as their ticket
/// says, and keeps every job's end.
#[derive(Default)]
struct Tickets {
    ended: Mutex<Vec<(String, JobOutcome)>>,
}

impl Admission for Tickets {
    fn admit(
        &self,
        caller: SocketAddr,
        headers: &HeaderMap,
        workload: Workload,
        model: &str,
    ) -> Result<AdmittedJob, Refusal> {
        assert!(caller.ip().is_loopback());
        let why = match headers.get(TICKET).map(|v| v.to_str()) {
            None => return Err(Refusal::TicketRequired("no ticket".into())),
            Some(Ok(v)) => v.to_owned(),
            Some(Err(e)) => return Err(Refusal::TicketInvalid(e.to_string())),
        };
        match why.as_str() {
            "ok" => Ok(AdmittedJob::new(format!("{workload}/{model}"), ())),
            "expired" => Err(Refusal::TicketExpired(why)),
            "mismatch" => Err(Refusal::TicketMismatch(why)),
            "policy" => Err(Refusal::PolicyRefused(why)),
            "replayed" => Err(Refusal::TicketReplayed(why)),
            "full" => Err(Refusal::ReceiptQueueFull(why)),
            _ => Err(Refusal::TicketInvalid(why)),
        }
    }

    fn finish(&self, job: AdmittedJob, outcome: JobOutcome) {
        self.ended
            .lock()
            .unwrap()
            .push((job.id().to_owned(), outcome));
    }

    fn metrics(&self, out: &mut String) {
        out.push_str("test_tickets_metric 1\n");
    }
}

impl Tickets {
    fn ended(&self) -> Vec<(String, JobOutcome)> {
        self.ended.lock().unwrap().clone()
    }
}

fn ticket(verdict: &str) -> String {
    verdict.to_owned()
}

fn engines() -> &'static (Arc<EmbedBatcher>, Arc<Generator>) {
    static E: OnceLock<(Arc<EmbedBatcher>, Arc<Generator>)> = OnceLock::new();
    E.get_or_init(|| {
        (
            Arc::new(
                EmbedBatcher::start(Arc::new(
                    Embedder::load(&model("all-minilm-l6-v2")).unwrap(),
                ))
                .unwrap(),
            ),
            Arc::new(Generator::load(&model("smollm2-135m-instruct"), 1024).unwrap()),
        )
    })
}

async fn start(slots: usize, queue: usize) -> (String, Arc<Tickets>) {
    start_gated(slots, queue, Arc::new(|| Ok(()))).await
}

async fn start_gated(
    slots: usize,
    queue: usize,
    gate: compute::server::Gate,
) -> (String, Arc<Tickets>) {
    let (e, g) = engines();
    let models = Models {
        embedder: Some(("all-minilm-l6-v2".into(), e.clone())),
        generator: Some(("smollm2-135m-instruct".into(), g.clone())),
    };
    let whois = Arc::new(|ip: std::net::IpAddr| ip.is_loopback().then(|| "tester".to_owned()));
    let tickets = Arc::new(Tickets::default());
    let server = ComputeServer::new(
        models,
        "beta".into(),
        whois,
        gate,
        tickets.clone(),
        slots,
        queue,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = server
        .router()
        .into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), tickets)
}

async fn post(base: &str, path: &str, body: String) -> (u16, reqwest::header::HeaderMap, Value) {
    post_with(base, path, body, Some(&ticket("ok"))).await
}

async fn post_with(
    base: &str,
    path: &str,
    body: String,
    ticket: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json");
    if let Some(t) = ticket {
        req = req.header(TICKET, t);
    }
    let r = req.body(body).send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn embeddings_and_chat_answer_like_openai_and_name_both_ends() {
    let (base, tickets) = start(2, 8).await;
    let models: Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 2);

    let (status, headers, v) = post(
        &base,
        "/v1/embeddings",
        json!({"model": "all-minilm-l6-v2", "input": ["a cat", "a dog"]}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 384);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        (v["served_by"].as_str(), v["caller"].as_str()),
        (Some("beta"), Some("tester"))
    );
    assert_eq!(headers["x-crank-served-by"], "beta");
    let (status, _, v) = post(
        &base,
        "/v1/embeddings",
        json!({"model": "all-minilm-l6-v2", "input": "one string"}).to_string(),
    )
    .await;
    assert_eq!((status, v["data"].as_array().map(Vec::len)), (200, Some(1)));
    // base64: the same vector as little-endian f32s.
    let (status, _, b) = post(
        &base,
        "/v1/embeddings",
        json!({"model": "all-minilm-l6-v2", "input": "one string", "encoding_format": "base64"})
            .to_string(),
    )
    .await;
    assert_eq!(status, 200);
    let bytes = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        b["data"][0]["embedding"].as_str().unwrap(),
    )
    .unwrap();
    let floats: Vec<f64> = bytes
        .chunks(4)
        .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    let plain: Vec<f64> = v["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(floats.len(), 384);
    assert!(floats.iter().zip(&plain).all(|(a, b)| (a - b).abs() < 1e-6));

    let chat = json!({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16});
    let (status, _, v) = post(&base, "/v1/chat/completions", chat.to_string()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let usage = &v["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );

    // Streaming: chunks, a usage chunk, then [DONE]; the text matches the plain answer.
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let mut r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .header(TICKET, ticket("ok"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut raw = String::new();
    while let Some(bytes) = r.chunk().await.unwrap() {
        raw.push_str(&String::from_utf8_lossy(&bytes));
    }
    let events: Vec<&str> = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{raw}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        v["choices"][0]["message"]["content"].as_str().unwrap(),
        "greedy: same text streamed or not"
    );
    assert!(
        chunks.last().unwrap()["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );

    // Every job was on record before its answer: units and output hashes.
    let ended = tickets.ended();
    let ids: Vec<&str> = ended.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "embeddings/all-minilm-l6-v2",
            "embeddings/all-minilm-l6-v2",
            "embeddings/all-minilm-l6-v2",
            "chat/smollm2-135m-instruct",
            "chat/smollm2-135m-instruct",
        ]
    );
    assert!(ended.iter().all(|(_, o)| o.status == JobStatus::Ok
        && o.started_at_ms <= o.ended_at_ms
        && o.runtime_ms <= o.ended_at_ms - o.started_at_ms + 1));
    let units: Vec<u64> = ended.iter().map(|(_, o)| o.units).collect();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(units, [2, 1, 1, completion, completion]);
    assert_eq!(ended[2].1.output_sha256, sha256_hex(&bytes), "vector bytes");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(ended[3].1.output_sha256, sha256_hex(content.as_bytes()));
    assert_eq!(
        ended[4].1.output_sha256, ended[3].1.output_sha256,
        "streamed"
    );
}

#[tokio::test]
async fn jobs_without_a_good_ticket_are_refused_precisely_and_counted() {
    let (base, tickets) = start(1, 1).await;
    let embed = json!({"model": "all-minilm-l6-v2", "input": "x"}).to_string();
    let chat = json!({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "stream": true}).to_string();
    let cases = [
        (None, 401, "ticket_required"),
        (Some(ticket("forged")), 401, "ticket_invalid"),
        (Some("unreadable".to_owned()), 401, "ticket_invalid"),
        (Some(ticket("expired")), 401, "ticket_expired"),
        (Some(ticket("mismatch")), 403, "ticket_mismatch"),
        (Some(ticket("policy")), 403, "policy_refused"),
        (Some(ticket("replayed")), 409, "ticket_replayed"),
        (Some(ticket("full")), 503, "receipt_queue_full"),
    ];
    for (t, status, code) in &cases {
        for (path, body) in [("/v1/embeddings", &embed), ("/v1/chat/completions", &chat)] {
            let (got, _, v) = post_with(&base, path, body.clone(), t.as_deref()).await;
            assert_eq!(
                (got, v["error"]["code"].as_str()),
                (*status, Some(*code)),
                "{v}"
            );
            assert!(v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
        }
    }
    assert!(tickets.ended().is_empty(), "no refused job ran");
    // Nothing is held by a refusal: the one slot and queue place are free.
    let (got, _, v) = post(&base, "/v1/embeddings", embed).await;
    assert_eq!(got, 200, "{v}");
    // Asking what is served needs no ticket.
    let models = reqwest::get(format!("{base}/v1/models")).await.unwrap();
    assert_eq!(models.status(), 200);
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (reason, n) in [
        ("ticket_required", 2),
        ("ticket_invalid", 4),
        ("ticket_expired", 2),
        ("ticket_mismatch", 2),
        ("policy_refused", 2),
        ("ticket_replayed", 2),
        ("receipt_queue_full", 2),
    ] {
        let line = format!("compute_tickets_refused_total{{reason=\"{reason}\"}} {n}\n");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    // The hook's lines come before the end of the exposition.
    assert!(
        metrics.ends_with("test_tickets_metric 1\n# EOF\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn bad_requests_get_precise_errors_and_the_server_keeps_serving() {
    let (base, _) = start(2, 8).await;
    let cases = [
        (
            json!({"model": "all-minilm-l6-v2", "input": ""}).to_string(),
            400,
            "empty_input",
        ),
        (
            json!({"model": "nope", "input": "x"}).to_string(),
            404,
            "model_not_found",
        ),
        ("{not json".to_owned(), 400, "invalid_json"),
        (
            json!({"model": "all-minilm-l6-v2", "input": 5}).to_string(),
            400,
            "invalid_json",
        ),
        (
            json!({"model": "all-minilm-l6-v2", "input": "word ".repeat(2000)}).to_string(),
            400,
            "context_length_exceeded",
        ),
        (
            json!({"model": "all-minilm-l6-v2", "input": "x".repeat(2 << 20)}).to_string(),
            413,
            "body_too_large",
        ),
    ];
    for (body, status, code) in cases {
        let (got, _, v) = post(&base, "/v1/embeddings", body).await;
        assert_eq!(
            (got, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{v}"
        );
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let (got, _, v) = post(
        &base,
        "/v1/chat/completions",
        json!({"model": "smollm2-135m-instruct", "messages": []}).to_string(),
    )
    .await;
    assert_eq!(
        (got, v["error"]["code"].as_str()),
        (400, Some("empty_input"))
    );
    let (got, _, _) = post(&base, "/v1/nothing", "{}".into()).await;
    assert_eq!(got, 404);
    let (got, _, _) = post(
        &base,
        "/v1/embeddings",
        json!({"model": "all-minilm-l6-v2", "input": "fine"}).to_string(),
    )
    .await;
    assert_eq!(got, 200);
}

#[tokio::test]
async fn overload_gets_429_and_nothing_is_lost() {
    let (base, tickets) = start(1, 1).await;
    let body = json!({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 48}).to_string();
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (base, body) = (base.clone(), body.clone());
            tokio::spawn(async move { post(&base, "/v1/chat/completions", body).await })
        })
        .collect();
    let mut ok = 0;
    let mut busy = 0;
    for t in tasks {
        let (status, headers, v) = t.await.unwrap();
        match status {
            200 => ok += 1,
            429 => {
                busy += 1;
                assert_eq!(headers["retry-after"], "1");
                assert_eq!(v["error"]["code"], "overloaded");
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!(ok + busy, 6);
    assert!(ok >= 2 && busy >= 1, "ok {ok} busy {busy}");
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!("compute_rejected_busy_total {busy}")),
        "{metrics}"
    );
    let ended = tickets.ended();
    assert_eq!(ended.len(), ok, "jobs turned away busy were never admitted");
    assert!(ended.iter().all(|(_, o)| o.status == JobStatus::Ok));
}

#[tokio::test]
async fn a_client_leaving_mid_stream_frees_its_slot() {
    let (base, tickets) = start(1, 0).await;
    let body = json!({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 200, "stream": true});
    let mut r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .header(TICKET, ticket("ok"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.chunk().await.unwrap();
    drop(r);
    // The only slot comes back once generation notices the client is gone.
    let mut served = false;
    for _ in 0..50 {
        let (status, _, _) = post(
            &base,
            "/v1/embeddings",
            json!({"model": "all-minilm-l6-v2", "input": "after"}).to_string(),
        )
        .await;
        if status == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "the slot was never freed");
    let ended = tickets.ended();
    let chats: Vec<_> = ended
        .iter()
        .filter(|(id, _)| id.starts_with("chat/"))
        .collect();
    assert_eq!(chats.len(), 1, "ended exactly once: {ended:?}");
    let cut = &chats[0].1;
    assert_eq!(cut.status, JobStatus::Cancelled);
    assert!(cut.units < 200, "{cut:?}");
}

#[tokio::test]
async fn a_client_leaving_a_plain_chat_cancels_the_job() {
    let (base, tickets) = start(1, 0).await;
    let body = json!({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 400}).to_string();
    let leaving = tokio::time::timeout(
        Duration::from_millis(300),
        post(&base, "/v1/chat/completions", body),
    )
    .await;
    assert!(leaving.is_err(), "400 tokens take longer than that");
    let mut ended = Vec::new();
    for _ in 0..100 {
        ended = tickets.ended();
        if !ended.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0].1.status, JobStatus::Cancelled);
    assert!(ended[0].1.units < 400);
}

#[tokio::test]
async fn a_device_not_contributing_answers_503_with_the_reason() {
    let state: Arc<std::sync::Mutex<Result<(), String>>> =
        Arc::new(std::sync::Mutex::new(Err("on battery (40%)".into())));
    let gate_state = state.clone();
    let (base, _) = start_gated(1, 4, Arc::new(move || gate_state.lock().unwrap().clone())).await;
    let body = json!({"model": "all-minilm-l6-v2", "input": "hello"}).to_string();
    let (status, headers, v) = post(&base, "/v1/embeddings", body.clone()).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "not_contributing");
    assert_eq!(v["error"]["message"], "on battery (40%)");
    assert_eq!(headers["retry-after"], "30");
    let chat = json!({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "stream": true}).to_string();
    assert_eq!(post(&base, "/v1/chat/completions", chat).await.0, 503);
    assert_eq!(
        reqwest::get(format!("{base}/healthz"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        503
    );
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("compute_contributing 0"), "{metrics}");

    *state.lock().unwrap() = Ok(());
    let (status, _, v) = post(&base, "/v1/embeddings", body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        reqwest::get(format!("{base}/healthz"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embeddings_request_over_the_limits_is_refused_and_others_are_served() {
    let (base, tickets) = start(1, 4).await;
    // 200,000 one-letter inputs (about 1 MB) and, next to it, an ordinary
    // request: the large one is refused, the small one answered.
    let huge = json!({"model": "all-minilm-l6-v2", "input": vec!["a"; 200_000]}).to_string();
    let small = json!({"model": "all-minilm-l6-v2", "input": ["an ordinary sentence"]}).to_string();
    let (big, ordinary) = tokio::join!(
        post(&base, "/v1/embeddings", huge),
        post(&base, "/v1/embeddings", small)
    );
    assert_eq!(big.0, 413, "{}", big.2);
    assert_eq!(big.2["error"]["code"], "too_many_inputs");
    assert_eq!(ordinary.0, 200, "{}", ordinary.2);
    assert_eq!(ordinary.2["data"].as_array().unwrap().len(), 1);

    // Within the input count but over the token budget: refused after
    // tokenising, before any decode or ticket.
    let long = "word ".repeat(60);
    let heavy = json!({"model": "all-minilm-l6-v2", "input": vec![long; 2000]}).to_string();
    let (status, _, v) = post(&base, "/v1/embeddings", heavy).await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["error"]["code"], "too_many_tokens");
    let embeddings: Vec<_> = tickets
        .ended()
        .into_iter()
        .filter(|(id, _)| id.starts_with("embeddings/"))
        .collect();
    assert_eq!(embeddings.len(), 1, "only the ordinary one: {embeddings:?}");
    assert_eq!(embeddings[0].1.status, JobStatus::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_an_embeddings_request_stops_its_decodes() {
    let (base, tickets) = start(1, 4).await;
    let metric = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from {text}"))
    };
    let scrape = || async {
        reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    // Many distinct inputs within the limits: many decodes.
    let inputs: Vec<String> = (0..2000)
        .map(|i| format!("sentence {i} about nothing in particular"))
        .collect();
    let body = json!({"model": "all-minilm-l6-v2", "input": inputs}).to_string();
    let leaving = tokio::time::timeout(
        Duration::from_millis(200),
        post(&base, "/v1/embeddings", body),
    )
    .await;
    assert!(leaving.is_err(), "2000 inputs take longer than that");
    // The job ends as cancelled, and the worker drops what is left.
    let mut ended = Vec::new();
    for _ in 0..200 {
        ended = tickets.ended();
        if !ended.is_empty() && metric(&scrape().await, "compute_embedding_abandoned_total") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0].1.status, JobStatus::Cancelled);
    let text = scrape().await;
    assert_eq!(metric(&text, "compute_embedding_abandoned_total"), 1);
    let decodes = metric(&text, "compute_embedding_batches_total");
    assert!(
        decodes < 2000 / 32,
        "{decodes} decodes: the request ran to its end"
    );
}
