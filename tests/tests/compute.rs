//! Compute over the overlay: device beta serves llama.cpp chat and
//! embeddings on its overlay addresses; alpha calls them with curl and with
//! the official `openai` Python client. Needs root, the models (the test
//! command fetches them) and the client's venv (the test command makes it).

use std::path::PathBuf;
use std::time::Duration;

use crank_e2e::{models_dir, run_lab, wait_until, Coordinator, Device};
use serde_json::{json, Value};

fn openai_python() -> PathBuf {
    std::env::var_os("CRANK_OPENAI_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/crank-mesh/openai-venv/bin/python")
        })
}

const OPENAI_SCRIPT: &str = r#"
import sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key="unused-inside-the-mesh")
emb = client.embeddings.create(model="all-minilm-l6-v2", input=["hello there", "general kenobi"])
assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384, emb
stream = client.chat.completions.create(model="gemma-3-270m", messages=[{"role": "user", "content": "Say hi."}], max_tokens=16, stream=True)
text = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
assert text, "empty stream"
print("openai-client-ok", len(text))
"#;

#[test]
fn a_peer_serves_embeddings_and_streamed_chat_over_the_overlay() {
    run_lab(|lab| {
        let python = openai_python();
        anyhow::ensure!(
            python.exists(),
            "{} missing: the test command installs the openai client",
            python.display()
        );
        let coord_host = lab.host("coord", 1)?;
        let coord = Coordinator::start(lab, coord_host.clone(), "home")?;
        let a = lab.host("alpha", 11)?;
        let b = lab.host("beta", 12)?;
        let alpha = Device::start(lab, a)?;
        let models = models_dir();
        let beta = Device::start_with(
            lab,
            b,
            // Serving whatever this host's own power and heat.
            &[
                "--compute",
                "--models-dir",
                &models,
                "--slots",
                "2",
                "--mode",
                "always",
                "--max-celsius",
                "200",
            ],
        )?;
        alpha.up(&coord)?;
        beta.up(&coord)?;
        let (b4, _) = beta.overlay()?;
        let base = format!("http://{b4}:8421");
        wait_until(
            Duration::from_secs(15),
            "beta's compute API over the overlay",
            || {
                alpha.host.succeeds(
                    "curl",
                    &["-sf", "--max-time", "2", &format!("{base}/healthz")],
                )
            },
        )?;

        // Embeddings: the answer names beta, and alpha as the caller.
        let body =
            json!({"model": "all-minilm-l6-v2", "input": ["a cat on a mat", "stock markets"]});
        let (status, v) = alpha
            .host
            .post_json(&format!("{base}/v1/embeddings"), &body)?;
        anyhow::ensure!(status == 200, "{status} {v}");
        let out = v.to_string();
        anyhow::ensure!(
            v["served_by"] == "beta" && v["caller"] == "alpha",
            "identity: {out}"
        );
        anyhow::ensure!(
            v["data"][1]["embedding"].as_array().map(Vec::len) == Some(384),
            "{out}"
        );

        // Streamed chat.
        let body = json!({"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 24, "stream": true}).to_string();
        let out = alpha.host.run(
            "curl",
            &[
                "-sSN",
                "--max-time",
                "60",
                "-H",
                "content-type: application/json",
                "-d",
                &body,
                &format!("{base}/v1/chat/completions"),
            ],
        )?;
        anyhow::ensure!(out.trim_end().ends_with("data: [DONE]"), "stream: {out}");
        anyhow::ensure!(
            out.contains("\"served_by\":\"beta\"") && out.contains("\"caller\":\"alpha\""),
            "stream identity: {out}"
        );
        anyhow::ensure!(out.contains("\"usage\""), "no usage in the stream: {out}");

        // The official client, unchanged.
        let py = python.to_str().unwrap_or_default().to_owned();
        let out = alpha
            .host
            .run(&py, &["-c", OPENAI_SCRIPT, &format!("{base}/v1")])?;
        anyhow::ensure!(out.contains("openai-client-ok"), "{out}");

        // Only the overlay reaches it: not beta's underlay address, not from
        // outside the network.
        anyhow::ensure!(
            !coord_host.succeeds(
                "curl",
                &[
                    "-sf",
                    "--max-time",
                    "2",
                    &format!("http://{}:8421/healthz", beta.host.addr)
                ]
            ),
            "the compute API answered on the underlay"
        );
        Ok(())
    });
}

/// A laptop's power supplies, as `/sys/class/power_supply` shows them.
fn write_power(root: &std::path::Path, on_ac: bool) -> anyhow::Result<()> {
    let ps = root.join("sys/class/power_supply");
    for (dir, file, value) in [
        ("AC", "type", "Mains"),
        ("AC", "online", if on_ac { "1" } else { "0" }),
        ("BAT0", "type", "Battery"),
        ("BAT0", "capacity", "80"),
        (
            "BAT0",
            "status",
            if on_ac { "Charging" } else { "Discharging" },
        ),
    ] {
        std::fs::create_dir_all(ps.join(dir))?;
        std::fs::write(ps.join(dir).join(file), format!("{value}\n"))?;
    }
    Ok(())
}

#[test]
fn the_contribution_policy_and_the_owner_decide_when_a_device_serves() {
    run_lab(|lab| {
        let coord_host = lab.host("coord", 1)?;
        let coord = Coordinator::start(lab, coord_host, "home")?;
        let (a, b) = (lab.host("alpha", 11)?, lab.host("beta", 12)?);
        let alpha = Device::start(lab, a)?;
        // beta is a laptop on battery: its power state is read from a tree
        // laid out like /sys, which the test changes.
        let sys = lab.dir.join("beta-sys");
        std::fs::create_dir_all(sys.join("proc"))?;
        std::fs::copy("/proc/meminfo", sys.join("proc/meminfo"))?;
        write_power(&sys, false)?;
        let models = models_dir();
        let mut beta = Device::start_with(
            lab,
            b,
            &[
                "--compute",
                "--models-dir",
                &models,
                "--model",
                "all-minilm-l6-v2",
                "--sys-root",
                sys.to_str().unwrap_or_default(),
            ],
        )?;
        alpha.up(&coord)?;
        beta.up(&coord)?;
        let (b4, _) = beta.overlay()?;
        let url = format!("http://{b4}:8421/v1/embeddings");
        let body = json!({"model": "all-minilm-l6-v2", "input": "hello"});

        // On battery: 503 with the reason, over the overlay.
        wait_until(
            Duration::from_secs(15),
            "beta's compute API answering",
            || alpha.host.post_json(&url, &body).is_ok_and(|(s, _)| s != 0),
        )?;
        let (status, v) = alpha.host.post_json(&url, &body)?;
        anyhow::ensure!(
            status == 503 && v["error"]["code"] == "not_contributing",
            "{status} {v}"
        );
        anyhow::ensure!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("on battery")),
            "{v}"
        );
        // beta's report reaches alpha: tier and why it does not serve.
        wait_until(
            Duration::from_secs(10),
            "beta's capability report at alpha",
            || {
                alpha.peer("beta").ok().flatten().is_some_and(|p| {
                    p["tier"].as_str().is_some_and(|t| t.starts_with("tier"))
                        && p["compute"]
                            .as_str()
                            .is_some_and(|c| c.starts_with("paused: on battery"))
                })
            },
        )?;
        let me = beta.status()?;
        anyhow::ensure!(
            me["self"]["capabilities"]["battery"]["percent"] == 80,
            "{me}"
        );

        // Plugged in: serving within a monitor interval.
        write_power(&sys, true)?;
        wait_until(
            Duration::from_secs(15),
            "beta serving on external power",
            || {
                alpha
                    .host
                    .post_json(&url, &body)
                    .is_ok_and(|(s, _)| s == 200)
            },
        )?;
        wait_until(Duration::from_secs(10), "alpha seeing beta serve", || {
            alpha
                .peer("beta")
                .ok()
                .flatten()
                .is_some_and(|p| p["compute"] == "serving")
        })?;

        // The owner's switch, at once.
        let off: Value = serde_json::from_str(&beta.meshd(&["compute", "disable", "--json"])?)?;
        anyhow::ensure!(
            off["serving"] == false && off["settings"]["enabled"] == false,
            "{off}"
        );
        let (status, v) = alpha.host.post_json(&url, &body)?;
        anyhow::ensure!(
            status == 503
                && v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("disabled")),
            "{status} {v}"
        );
        let on: Value =
            serde_json::from_str(&beta.meshd(&["compute", "enable", "--slots", "2", "--json"])?)?;
        anyhow::ensure!(on["serving"] == true && on["slots"] == 2, "{on}");
        anyhow::ensure!(
            on["models"][0]["name"] == "all-minilm-l6-v2"
                && on["models"][0]["sha256"]
                    .as_str()
                    .is_some_and(|s| s.len() == 64),
            "{on}"
        );
        anyhow::ensure!(on["urls"][0] == format!("http://{b4}:8421/v1"), "{on}");
        // The API restarted with two slots: served again once it listens.
        wait_until(Duration::from_secs(10), "beta serving after enable", || {
            alpha
                .host
                .post_json(&url, &body)
                .is_ok_and(|(s, v)| s == 200 && v["served_by"] == "beta")
        })?;
        // Only the configured model is on offer.
        let chat =
            json!({"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}]});
        let (status, v) = alpha
            .host
            .post_json(&format!("http://{b4}:8421/v1/chat/completions"), &chat)?;
        anyhow::ensure!(
            status == 404 && v["error"]["code"] == "model_not_found",
            "{status} {v}"
        );
        // The settings survive a restart of the daemon.
        beta.restart(lab)?;
        wait_until(
            Duration::from_secs(20),
            "beta back with its settings",
            || {
                beta.meshd(&["compute", "status", "--json"])
                    .ok()
                    .and_then(|out| serde_json::from_str::<Value>(&out).ok())
                    .is_some_and(|st| st["slots"] == 2 && st["serving"] == true)
            },
        )?;
        Ok(())
    });
}
