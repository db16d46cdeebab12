//! `meshd run`, `meshd jobs`: jobs on the mesh from the command line. `run`
//! is a plain client of the gateway (the same endpoint local apps use);
//! `jobs` reads the gateway's job log through the daemon's local API.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::gateway::joblog::JobRecord;
use crate::localapi::{self, Request, Response};

/// Options every `meshd run` takes.
#[derive(Clone, Debug, clap::Args)]
pub struct RunOptions {
    /// Where the job may go: auto, local, device:NAME[,NAME…], tier:tierN.
    #[arg(long, default_value = "auto")]
    route: String,
    /// public, private or sensitive.
    #[arg(long, default_value = "public")]
    sensitivity: String,
    /// Model to use (default: any the network offers for the workload).
    #[arg(long)]
    model: Option<String>,
    /// Show where the job would run and what it may cost; run nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the raw JSON answer.
    #[arg(long)]
    json: bool,
    /// The gateway to use.
    #[arg(
        long,
        env = "MESHD_GATEWAY_URL",
        default_value = "http://127.0.0.1:8420"
    )]
    gateway: String,
}

#[derive(Subcommand)]
pub enum RunCmd {
    /// Embed texts; prints one vector summary per text.
    Embeddings {
        /// A text to embed (repeatable).
        #[arg(long = "text", required = true)]
        texts: Vec<String>,
        #[command(flatten)]
        opts: RunOptions,
    },
    /// Ask the chat model; the answer streams as it is generated.
    Chat {
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 256)]
        max_tokens: u32,
        #[command(flatten)]
        opts: RunOptions,
    },
}

#[derive(Subcommand)]
pub enum JobsCmd {
    /// One job's debug view: every candidate's filters and score, the
    /// device chosen and why, each attempt and its cause.
    Show {
        /// Job id, or a unique prefix of it.
        id: String,
        #[arg(long)]
        json: bool,
    },
}

fn request(opts: &RunOptions, path: &str, body: &Value) -> anyhow::Result<reqwest::RequestBuilder> {
    let http = reqwest::Client::builder().no_proxy().build()?;
    let mut req = http
        .post(format!("{}{path}", opts.gateway.trim_end_matches('/')))
        .header("x-crank-route", &opts.route)
        .header("x-crank-sensitivity", &opts.sensitivity)
        .json(body);
    if opts.dry_run {
        req = req.header("x-crank-dry-run", "1");
    }
    Ok(req)
}

async fn send(req: reqwest::RequestBuilder, gateway: &str) -> anyhow::Result<reqwest::Response> {
    let resp = req
        .send()
        .await
        .with_context(|| format!("no gateway at {gateway} (is meshd running?)"))?;
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or("no details")
        .to_owned();
    anyhow::bail!("{status}: {message}")
}

fn describe(resp: &reqwest::Response) -> String {
    let h = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_owned()
    };
    format!(
        "job {} ran on {} ({}, {} attempt(s))",
        h("x-crank-job-id"),
        h("x-crank-served-by"),
        h("x-crank-path"),
        h("x-crank-attempts")
    )
}

pub async fn run(cmd: RunCmd) -> anyhow::Result<()> {
    match cmd {
        RunCmd::Embeddings { texts, opts } => {
            let mut body = json!({"input": texts});
            if let Some(m) = &opts.model {
                body["model"] = json!(m);
            }
            let resp = send(request(&opts, "/v1/embeddings", &body)?, &opts.gateway).await?;
            let about = describe(&resp);
            let answer: Value = resp.json().await?;
            if opts.json || opts.dry_run {
                println!("{}", serde_json::to_string_pretty(&answer)?);
                return Ok(());
            }
            crate::status_text::eprintln(&about);
            for (text, item) in texts
                .iter()
                .zip(answer["data"].as_array().into_iter().flatten())
            {
                let v: Vec<f64> = item["embedding"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_f64)
                    .collect();
                let head: Vec<String> = v.iter().take(4).map(|x| format!("{x:.4}")).collect();
                crate::status_text::print(&format!(
                    "{} dims [{} …]  {text}\n",
                    v.len(),
                    head.join(", ")
                ));
            }
            Ok(())
        }
        RunCmd::Chat {
            prompt,
            max_tokens,
            opts,
        } => {
            let stream = !opts.json && !opts.dry_run;
            let mut body = json!({
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "stream": stream,
            });
            if let Some(m) = &opts.model {
                body["model"] = json!(m);
            }
            let mut resp = send(
                request(&opts, "/v1/chat/completions", &body)?,
                &opts.gateway,
            )
            .await?;
            if !stream {
                let answer: Value = resp.json().await?;
                println!("{}", serde_json::to_string_pretty(&answer)?);
                return Ok(());
            }
            crate::status_text::eprintln(&describe(&resp));
            let mut pending = String::new();
            let mut out = std::io::stdout();
            while let Some(chunk) = resp.chunk().await? {
                pending.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = pending.find('\n') {
                    let line: String = pending.drain(..=end).collect();
                    let Some(data) = line.trim().strip_prefix("data:") else {
                        continue;
                    };
                    let data = data.trim();
                    if data == "[DONE]" {
                        continue;
                    }
                    let event: Value = serde_json::from_str(data).unwrap_or(Value::Null);
                    if let Some(text) = event["choices"][0]["delta"]["content"].as_str() {
                        write!(out, "{}", crate::status_text::for_terminal(text))?;
                        out.flush()?;
                    }
                }
            }
            writeln!(out)?;
            Ok(())
        }
    }
}

async fn jobs(socket: &Path, id: Option<String>, limit: usize) -> anyhow::Result<Vec<JobRecord>> {
    match localapi::exchange(socket, &Request::Jobs { id, limit }).await? {
        Response::Jobs(jobs) => Ok(jobs),
        Response::Error(e) => anyhow::bail!("{e}"),
        other => anyhow::bail!("unexpected reply: {other:?}"),
    }
}

pub async fn list(socket: &Path, limit: usize, json: bool) -> anyhow::Result<()> {
    let jobs = jobs(socket, None, limit).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&jobs)?);
    } else {
        crate::status_text::print(&crate::status_text::render_jobs(&jobs));
    }
    Ok(())
}

pub async fn show(socket: &Path, cmd: JobsCmd) -> anyhow::Result<()> {
    let JobsCmd::Show { id, json } = cmd;
    let job = jobs(socket, Some(id), 1)
        .await?
        .into_iter()
        .next()
        .context("no such job")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else {
        crate::status_text::print(&crate::status_text::render_job(&job));
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum LedgerCmd {
    /// This device owner's credits: their balance, the network's shared
    /// pool, and what they may spend.
    Show {
        #[arg(long)]
        json: bool,
    },
}

pub async fn ledger(socket: &Path, cmd: LedgerCmd) -> anyhow::Result<()> {
    let LedgerCmd::Show { json } = cmd;
    let b = match localapi::exchange(socket, &Request::Ledger).await? {
        Response::Ledger(b) => b,
        Response::Error(e) => anyhow::bail!("{e}"),
        other => anyhow::bail!("unexpected reply: {other:?}"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&b)?);
    } else {
        use platform::ledger::format_credits;
        crate::status_text::print(&format!("network   {}\nmember    {}\n", b.network, b.user));
        println!("balance   {} credits", format_credits(b.balance));
        println!("pool      {} credits", format_credits(b.pool));
        println!("spendable {} credits", format_credits(b.spendable));
    }
    Ok(())
}
