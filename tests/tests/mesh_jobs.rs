//! The compute mesh end to end: three workers and a client device in
//! network namespaces. Apps on the client talk only to its gateway
//! (`127.0.0.1:8420`), which places each job, signs a ticket for the worker
//! and retries elsewhere; workers sign receipts; the coordinator's ledger
//! burns and mints. Needs root, the models and the `openai` client's venv
//! (the test command provides both).

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use crank_e2e::{
    fake_power_supply, models_dir, run_lab, wait_until, Coordinator, Device, HttpAnswer,
};
use platform::jobs::{Route, Sensitivity, Ticket, Workload, DOMAIN_TICKET, TICKET_HEADER};
use platform::keys::DevicePrivate;
use platform::signed::Signed;
use serde_json::{json, Value};

const GATEWAY: &str = "http://127.0.0.1:8420";

fn openai_python() -> PathBuf {
    std::env::var_os("CRANK_OPENAI_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/crank-mesh/openai-venv/bin/python")
        })
}

/// The official client, knowing nothing of devices.
const OPENAI_SCRIPT: &str = r#"
import sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key="unused-inside-the-mesh")
emb = client.embeddings.create(model=sys.argv[2], input=["hello there", "general kenobi"])
assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384, emb
stream = client.chat.completions.create(model=sys.argv[3], messages=[{"role": "user", "content": "Say hi."}], max_tokens=16, stream=True)
text = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
assert text, "empty stream"
print("openai-client-ok", len(text))
"#;

fn gateway(
    dev: &Device,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> anyhow::Result<HttpAnswer> {
    dev.host
        .http("POST", &format!("{GATEWAY}{path}"), headers, Some(body))
}

fn embed(dev: &Device, route: &str) -> anyhow::Result<HttpAnswer> {
    gateway(
        dev,
        "/v1/embeddings",
        &[("x-crank-route", route)],
        &json!({"input": ["a cat on a mat"]}),
    )
}

/// The device key a daemon keeps in its state directory.
fn device_key(dev: &Device) -> anyhow::Result<DevicePrivate> {
    let keys: Value = serde_json::from_str(&std::fs::read_to_string(
        Path::new(&dev.state_dir).join("keys.json"),
    )?)?;
    keys["device"]
        .as_str()
        .and_then(|k| k.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no device key in {}", dev.state_dir))
}

fn ticket_header(signer: &DevicePrivate, t: &Ticket) -> String {
    let signed = Signed::sign(signer, DOMAIN_TICKET, t);
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&signed).unwrap_or_default())
}

/// The ledger's entries for the network (admin view).
fn entries(coord: &Coordinator) -> anyhow::Result<Vec<Value>> {
    let v = coord.api(
        "GET",
        &format!(
            "/api/v1/networks/{}/ledger/entries?limit=10000",
            coord.network
        ),
        None,
    )?;
    let list = v.get("entries").cloned().unwrap_or(v);
    Ok(list.as_array().cloned().unwrap_or_default())
}

fn burns_for(entries: &[Value], job: &str) -> usize {
    entries
        .iter()
        .filter(|e| e["kind"] == "burn" && e["job_id"] == job)
        .count()
}

#[test]
fn jobs_go_to_eligible_workers_through_the_gateway_and_the_ledger_settles_them() {
    run_lab(|lab| {
        let python = openai_python();
        anyhow::ensure!(
            python.exists(),
            "{} missing: the test command installs it",
            python.display()
        );
        let coord_host = lab.host("coord", 1)?;
        let mut coord = Coordinator::start(lab, coord_host, "home")?;
        let models = models_dir();
        let serving = [
            "--compute",
            "--models-dir",
            &models,
            "--mode",
            "always",
            "--max-celsius",
            "150",
        ];
        let (h1, h2, h3) = (
            lab.host("w1", 21)?,
            lab.host("w2", 22)?,
            lab.host("w3", 23)?,
        );
        let mut w1 = Device::start_with(lab, h1, &serving)?;
        let mut w2 = Device::start_with(lab, h2, &serving)?;
        // w3 is a laptop on battery: it never gets a job.
        let sys = lab.dir.join("w3-sys");
        fake_power_supply(&sys, false)?;
        let sys_root = sys.to_str().unwrap_or_default().to_owned();
        let w3 = Device::start_with(
            lab,
            h3,
            &[
                "--compute",
                "--models-dir",
                &models,
                "--model",
                "all-minilm-l6-v2",
                "--sys-root",
                &sys_root,
            ],
        )?;
        let alpha_host = lab.host("alpha", 11)?;
        let alpha = Device::start(lab, alpha_host)?;
        for d in [&w1, &w2, &w3, &alpha] {
            d.up(&coord)?;
        }

        // The network's models, as the gateway lists them: w1 and w2 serve both.
        let mut listed = Value::Null;
        wait_until(
            Duration::from_secs(60),
            "w1 and w2 serving at alpha's gateway",
            || {
                let Ok(a) = alpha
                    .host
                    .http("GET", &format!("{GATEWAY}/v1/models"), &[], None)
                else {
                    return false;
                };
                listed = a.body;
                let serving_on = |kind: &str| {
                    listed["data"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|m| m["kind"] == kind)
                        .any(|m| {
                            let on: Vec<&str> = m["served_by"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter(|s| s["serving"] == true)
                                .filter_map(|s| s["device"].as_str())
                                .collect();
                            on.contains(&"w1") && on.contains(&"w2")
                        })
                };
                serving_on("chat") && serving_on("embedding")
            },
        )?;
        let model_of = |kind: &str| -> String {
            listed["data"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["kind"] == kind)
                .and_then(|m| m["id"].as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let (chat_model, embed_model) = (model_of("chat"), model_of("embedding"));

        // The official client, pointed at the gateway, with no knowledge of devices.
        let py = python.to_str().unwrap_or_default().to_owned();
        let out = alpha.host.run(
            &py,
            &[
                "-c",
                OPENAI_SCRIPT,
                &format!("{GATEWAY}/v1"),
                &embed_model,
                &chat_model,
            ],
        )?;
        anyhow::ensure!(out.contains("openai-client-ok"), "{out}");

        // Placement: never the worker on battery; its debug view says why.
        let mut served = Vec::new();
        for _ in 0..8 {
            let a = embed(&alpha, "auto")?;
            anyhow::ensure!(a.status == 200, "{a:?}");
            served.push(a.header("x-crank-served-by").unwrap_or_default().to_owned());
        }
        anyhow::ensure!(served.iter().all(|s| s == "w1" || s == "w2"), "{served:?}");
        let a = embed(&alpha, "auto")?;
        let job = a.header("x-crank-job-id").unwrap_or_default().to_owned();
        let shown: Value = serde_json::from_str(&alpha.meshd(&["jobs", "show", &job, "--json"])?)?;
        let w3_verdict = shown["placement"]["rejected"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["name"] == "w3")
            .cloned()
            .unwrap_or(Value::Null);
        anyhow::ensure!(
            w3_verdict["failed_filter"] == "state",
            "w3 not rejected by state: {shown}"
        );
        anyhow::ensure!(
            alpha
                .meshd(&["jobs", "show", &job])?
                .contains("not eligible"),
            "text view"
        );

        // Pinning is honoured; pinning the device on battery says why not.
        for _ in 0..3 {
            let a = embed(&alpha, "device:w2")?;
            anyhow::ensure!(
                a.status == 200 && a.header("x-crank-served-by") == Some("w2"),
                "{a:?}"
            );
        }
        let a = embed(&alpha, "device:w3")?;
        anyhow::ensure!(
            a.status == 503 && a.body["error"]["code"] == "no_eligible_device",
            "{a:?}"
        );
        anyhow::ensure!(
            a.body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("state")),
            "{a:?}"
        );

        // Bad input: precise errors.
        let a = embed(&alpha, "devices:w2")?;
        anyhow::ensure!(
            a.status == 400 && a.body["error"]["code"] == "invalid_route",
            "{a:?}"
        );
        let a = gateway(
            &alpha,
            "/v1/embeddings",
            &[],
            &json!({"model": "no-such-model", "input": "x"}),
        )?;
        anyhow::ensure!(
            a.status == 404 && a.body["error"]["code"] == "model_not_found",
            "{a:?}"
        );

        // Workers take jobs only with a ticket: none, forged, replayed, or
        // addressed to another worker are refused.
        let (w1_ip, _) = w1.overlay()?;
        let w1_url = format!("http://{w1_ip}:8421/v1/embeddings");
        let body = json!({"model": embed_model, "input": "ticketed"});
        let a = alpha.host.http("POST", &w1_url, &[], Some(&body))?;
        anyhow::ensure!(
            a.status == 401 && a.body["error"]["code"] == "ticket_required",
            "{a:?}"
        );
        let now = platform::unix_now();
        let mut t = Ticket {
            job_id: "00112233445566778899aabbccddeeff".into(),
            network: "home".into(),
            submitter_device: "alpha".into(),
            submitter_user: "admin".into(),
            workload: Workload::Embeddings,
            model: embed_model.clone(),
            route: Route::Auto,
            sensitivity: Sensitivity::Public,
            max_cost: 1_000_000,
            timeout_ms: 30_000,
            issued_at: now,
            expires_at: now + 120,
            worker: "w1".into(),
            worker_key: device_key(&w1)?.public(),
            attempt: 1,
        };
        let forged = ticket_header(&DevicePrivate::generate(), &t);
        let a = alpha
            .host
            .http("POST", &w1_url, &[(TICKET_HEADER, &forged)], Some(&body))?;
        anyhow::ensure!(
            a.status == 401 && a.body["error"]["code"] == "ticket_invalid",
            "{a:?}"
        );
        let good = ticket_header(&device_key(&alpha)?, &t);
        let a = alpha
            .host
            .http("POST", &w1_url, &[(TICKET_HEADER, &good)], Some(&body))?;
        anyhow::ensure!(a.status == 200, "a valid ticket: {a:?}");
        let a = alpha
            .host
            .http("POST", &w1_url, &[(TICKET_HEADER, &good)], Some(&body))?;
        anyhow::ensure!(
            a.status == 409 && a.body["error"]["code"] == "ticket_replayed",
            "{a:?}"
        );
        t.job_id = "ffeeddccbbaa99887766554433221100".into();
        t.worker = "w2".into();
        t.worker_key = device_key(&w2)?.public();
        let elsewhere = ticket_header(&device_key(&alpha)?, &t);
        let a = alpha
            .host
            .http("POST", &w1_url, &[(TICKET_HEADER, &elsewhere)], Some(&body))?;
        anyhow::ensure!(
            a.status == 403 && a.body["error"]["code"] == "ticket_mismatch",
            "{a:?}"
        );
        // Nor is the compute API reachable on a worker's underlay address.
        anyhow::ensure!(
            !alpha.host.succeeds(
                "curl",
                &[
                    "-sf",
                    "--max-time",
                    "2",
                    &format!("http://{}:8421/healthz", w1.host.addr)
                ]
            ),
            "the compute API answered on the underlay"
        );

        // The coordinator goes away: jobs keep running from the netmap each
        // device has, and receipts wait on the workers' disks.
        coord.stop(lab);
        let mut offline_jobs = Vec::new();
        for _ in 0..3 {
            let a = embed(&alpha, "device:w2")?;
            anyhow::ensure!(a.status == 200, "with the coordinator down: {a:?}");
            offline_jobs.push(a.header("x-crank-job-id").unwrap_or_default().to_owned());
        }
        coord.restart(lab)?;
        wait_until(
            Duration::from_secs(90),
            "receipts made offline in the ledger",
            || entries(&coord).is_ok_and(|e| offline_jobs.iter().all(|j| burns_for(&e, j) == 1)),
        )?;

        // A worker dies mid-job: the job completes on the other within the
        // retry budget, and is burned once.
        let long = json!({
            "model": chat_model,
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
            "max_tokens": 400,
        })
        .to_string();
        let curl_args = [
            "-sS",
            "-i",
            "--max-time",
            "300",
            "-H",
            "x-crank-route: device:w1,w2",
            "-H",
            "content-type: application/json",
            "--data-binary",
            &long,
            "http://127.0.0.1:8420/v1/chat/completions",
        ];
        lab.spawn(&alpha.host, Path::new("curl"), &curl_args, "long-job.out")?;
        let mut victim = String::new();
        let mut job = String::new();
        wait_until(
            Duration::from_secs(60),
            "the long job running on a worker",
            || {
                let Ok(out) = alpha.meshd(&["jobs", "--json", "--limit", "1"]) else {
                    return false;
                };
                let jobs: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
                match jobs[0]["trying"].as_str() {
                    Some(w) if jobs[0]["state"] == "running" => {
                        victim = w.to_owned();
                        job = jobs[0]["id"].as_str().unwrap_or_default().to_owned();
                        true
                    }
                    _ => false,
                }
            },
        )?;
        // Let it start generating, then crash that worker.
        std::thread::sleep(Duration::from_millis(500));
        let (dead, survivor) = if victim == "w1" {
            (&w1, "w2")
        } else {
            (&w2, "w1")
        };
        lab.kill(dead.pid);
        let out_path = lab.dir.join("long-job.out");
        // The job's record ends when the gateway answers, ok or not.
        let mut shown = Value::Null;
        wait_until(Duration::from_secs(240), "the long job's end", || {
            let Ok(out) = alpha.meshd(&["jobs", "show", &job, "--json"]) else {
                return false;
            };
            shown = serde_json::from_str(&out).unwrap_or(Value::Null);
            shown["state"] != "running"
        })?;
        wait_until(Duration::from_secs(10), "curl's copy of the answer", || {
            std::fs::read_to_string(&out_path)
                .is_ok_and(|s| HttpAnswer::parse(&s).is_ok_and(|a| a.body.is_object()))
        })?;
        let a = HttpAnswer::parse(&std::fs::read_to_string(&out_path)?)?;
        anyhow::ensure!(
            a.status == 200 && a.header("x-crank-served-by") == Some(survivor),
            "victim {victim}: {a:?}\njob: {shown}"
        );
        let attempts = shown["attempts"].as_array().cloned().unwrap_or_default();
        anyhow::ensure!(
            attempts.len() == 2
                && attempts[0]["device"] == victim.as_str()
                && attempts[1]["outcome"] == "ok",
            "{shown}"
        );
        wait_until(
            Duration::from_secs(60),
            "the retried job burned once",
            || entries(&coord).is_ok_and(|e| burns_for(&e, &job) == 1),
        )?;
        std::thread::sleep(Duration::from_secs(2));
        anyhow::ensure!(
            burns_for(&entries(&coord)?, &job) == 1,
            "burned more than once"
        );

        // The crashed worker starts again on the state it left: it rejoins,
        // and whatever it kept (receipts of earlier jobs) is not counted
        // twice; the job stays burned once and minted once.
        let crashed = if victim == "w1" { &mut w1 } else { &mut w2 };
        crashed.restart(lab)?;
        wait_until(Duration::from_secs(30), "the crashed worker back", || {
            alpha
                .peer(&victim)
                .is_ok_and(|p| p.is_some_and(|p| p["online"] == true))
        })?;
        let before = entries(&coord)?;
        std::thread::sleep(Duration::from_secs(5));
        let after = entries(&coord)?;
        let mints = |e: &[Value]| {
            e.iter()
                .filter(|x| x["kind"] == "mint" && x["job_id"] == job.as_str())
                .count()
        };
        anyhow::ensure!(
            burns_for(&after, &job) == 1 && mints(&after) == 1,
            "after the crashed worker came back: {} burns, {} mints for {job}",
            burns_for(&after, &job),
            mints(&after)
        );
        let mut seen = std::collections::HashSet::new();
        for e in &after {
            if e["kind"] == "mint" {
                anyhow::ensure!(
                    seen.insert(e["job_id"].to_string()),
                    "a job minted twice: {e}"
                );
            }
        }
        anyhow::ensure!(
            after.len() == before.len(),
            "the restarted worker added entries for old work: {} → {}",
            before.len(),
            after.len()
        );

        // Balances reconcile: each is the sum of its entries, and all sum to zero.
        let all = entries(&coord)?;
        let balances = coord.api("GET", "/api/v1/networks/home/ledger/balances", None)?;
        let accounts = balances["accounts"].as_array().cloned().unwrap_or_default();
        anyhow::ensure!(!accounts.is_empty(), "{balances}");
        let mut total = 0i64;
        for acc in &accounts {
            let name = acc["account"].as_str().unwrap_or_default();
            let from_entries: i64 = all
                .iter()
                .map(|e| {
                    let amount = e["amount"].as_i64().unwrap_or(0);
                    (if e["credit"] == name { amount } else { 0 })
                        - (if e["debit"] == name { amount } else { 0 })
                })
                .sum();
            anyhow::ensure!(
                acc["balance"].as_i64() == Some(from_entries),
                "{name}: {acc} vs {from_entries}"
            );
            total += from_entries;
        }
        anyhow::ensure!(total == 0, "balances sum to {total}");
        // The device sees its owner's balance as the ledger has it.
        let mine: Value = serde_json::from_str(&alpha.meshd(&["ledger", "show", "--json"])?)?;
        let owner_balance = accounts
            .iter()
            .find(|a| a["user"] == mine["user"])
            .and_then(|a| a["balance"].as_i64());
        anyhow::ensure!(
            mine["balance"].as_i64().is_some() && mine["balance"].as_i64() == owner_balance,
            "{mine} vs {balances}"
        );
        Ok(())
    });
}
