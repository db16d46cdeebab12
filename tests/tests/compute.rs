//! Compute over the overlay: device beta serves llama.cpp chat and
//! embeddings on its overlay addresses; alpha's apps reach it through
//! alpha's gateway (the network's one OpenAI endpoint), never directly.
//! Needs root and the models (the test command fetches them).

use std::time::Duration;

use crank_e2e::{fake_power_supply, models_dir, run_lab, wait_until, Coordinator, Device};
use serde_json::{json, Value};

const GATEWAY: &str = "http://127.0.0.1:8420";

#[test]
fn a_peer_serves_embeddings_and_streamed_chat_through_the_gateway() {
    run_lab(|lab| {
        let coord_host = lab.host("coord", 1)?;
        let coord = Coordinator::start(lab, coord_host, "home")?;
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
                "150",
            ],
        )?;
        alpha.up(&coord)?;
        beta.up(&coord)?;
        let url = format!("{GATEWAY}/v1/embeddings");
        let body = json!({"input": ["a cat on a mat", "stock markets"]});
        wait_until(
            Duration::from_secs(60),
            "beta serving through alpha's gateway",
            || {
                alpha
                    .host
                    .post_json(&url, &body)
                    .is_ok_and(|(s, _)| s == 200)
            },
        )?;

        // Embeddings: the answer names beta, and alpha as the caller.
        let (status, v) = alpha.host.post_json(&url, &body)?;
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

        // Streamed chat, relayed by the gateway as it is generated.
        let body = json!({"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 24, "stream": true}).to_string();
        let out = alpha.host.run(
            "curl",
            &[
                "-sSN",
                "-i",
                "--max-time",
                "60",
                "-H",
                "content-type: application/json",
                "-d",
                &body,
                &format!("{GATEWAY}/v1/chat/completions"),
            ],
        )?;
        anyhow::ensure!(out.trim_end().ends_with("data: [DONE]"), "stream: {out}");
        anyhow::ensure!(
            out.contains("\"served_by\":\"beta\"") && out.contains("\"caller\":\"alpha\""),
            "stream identity: {out}"
        );
        anyhow::ensure!(out.contains("\"usage\""), "no usage in the stream: {out}");
        anyhow::ensure!(
            out.to_ascii_lowercase().contains("x-crank-served-by: beta"),
            "headers: {out}"
        );
        Ok(())
    });
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
        fake_power_supply(&sys, false)?;
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
        let url = format!("{GATEWAY}/v1/embeddings");
        let body = json!({"model": "all-minilm-l6-v2", "input": "hello"});

        // On battery: the gateway finds no eligible device, and says why.
        let mut last = (0, Value::Null);
        wait_until(
            Duration::from_secs(30),
            "the gateway refusing beta on battery",
            || {
                last = alpha
                    .host
                    .post_json(&url, &body)
                    .unwrap_or((0, Value::Null));
                last.0 == 503
                    && last.1["error"]["code"] == "no_eligible_device"
                    && last.1["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("on battery"))
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}: last answer {} {}", last.0, last.1))?;
        // Called directly, it says the same.
        let (status, v) = alpha
            .host
            .post_json(&format!("http://{b4}:8421/v1/embeddings"), &body)?;
        anyhow::ensure!(
            status == 503 && v["error"]["code"] == "not_contributing",
            "{status} {v}"
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
        fake_power_supply(&sys, true)?;
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
        // Serving, beta still takes no job sent to it without a ticket.
        let (status, v) = alpha
            .host
            .post_json(&format!("http://{b4}:8421/v1/embeddings"), &body)?;
        anyhow::ensure!(
            status == 401 && v["error"]["code"] == "ticket_required",
            "{status} {v}"
        );
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
        let chat = json!({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}]});
        let (status, v) = alpha
            .host
            .post_json(&format!("{GATEWAY}/v1/chat/completions"), &chat)?;
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
