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
            &["--compute", "--models-dir", &models, "--slots", "2"],
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
            json!({"model": "all-minilm-l6-v2", "input": ["a cat on a mat", "stock markets"]})
                .to_string();
        let out = alpha.host.run(
            "curl",
            &[
                "-sS",
                "--max-time",
                "30",
                "-H",
                "content-type: application/json",
                "-d",
                &body,
                &format!("{base}/v1/embeddings"),
            ],
        )?;
        let v: Value = serde_json::from_str(&out)?;
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
