//! CLI commands for a network's access policy, device tags and MagicDNS
//! settings, through the running coordinator's API as the logged-in user
//! (so every device hears of a change at once, and the server checks the
//! caller's role).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;
use platform::api::DeviceInfo;
use platform::netmap::DnsConfig;
use platform::people::{EvaluateRequest, Evaluation, PolicyDocument, SetTags};
use reqwest::Method;
use serde_json::Value;

use crate::client::{Login, Remote};
use crate::remote::Net;

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Print the network's access policy (the default one if none was set).
    Get {
        #[command(flatten)]
        net: Net,
    },
    /// Replace the policy with FILE (JSON with comments; `-` for stdin).
    /// Refused, naming the line, if it names unknown groups, tags, hosts or
    /// users, or if its tests fail; the running policy then stays. Admins.
    Set {
        #[command(flatten)]
        net: Net,
        file: PathBuf,
    },
    /// Check FILE against the network as it is, changing nothing.
    Check {
        #[command(flatten)]
        net: Net,
        file: PathBuf,
    },
    /// May SRC reach DST (HOST:PORT), and by which rule? SRC and HOST are
    /// device names, users, tags, hosts or addresses.
    Evaluate {
        #[command(flatten)]
        net: Net,
        src: String,
        dst: String,
        /// tcp, udp, icmp, … or a protocol number.
        #[arg(long, default_value = "tcp")]
        proto: String,
    },
}

#[derive(Subcommand)]
pub enum DnsCmd {
    /// The network's MagicDNS settings: base domain, extra records, split
    /// DNS, resolvers (JSON).
    Get {
        #[command(flatten)]
        net: Net,
    },
    /// Replace the settings with FILE (JSON: {"extra_records": [{"name",
    /// "address"}], "split": {"corp.example": ["10.1.0.53:53"]},
    /// "nameservers": [...]}; `-` for stdin). Admins.
    Set {
        #[command(flatten)]
        net: Net,
        file: PathBuf,
    },
}

async fn remote() -> anyhow::Result<Remote> {
    Remote::new(&Login::load()?)
}

fn read(file: &Path) -> anyhow::Result<String> {
    if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
    }
}

fn path(net: &Net, rest: &str) -> String {
    format!("/api/v1/networks/{}{rest}", net.network)
}

pub async fn policy(cmd: PolicyCmd) -> anyhow::Result<()> {
    let r = remote().await?;
    match cmd {
        PolicyCmd::Get { net } => {
            let doc: PolicyDocument = r.call(Method::GET, &path(&net, "/policy"), None).await?;
            print!("{}", doc.policy);
        }
        PolicyCmd::Set { net, file } => {
            let _: PolicyDocument = r
                .call_text(Method::PUT, &path(&net, "/policy"), read(&file)?)
                .await?;
            println!("policy of {} replaced", net.network);
        }
        PolicyCmd::Check { net, file } => {
            let answer: Value = r
                .call_text(Method::POST, &path(&net, "/policy/check"), read(&file)?)
                .await?;
            println!(
                "ok: {} rules, {} tests pass",
                answer["rules"], answer["tests"]
            );
        }
        PolicyCmd::Evaluate {
            net,
            src,
            dst,
            proto,
        } => {
            let req = EvaluateRequest {
                src: src.clone(),
                dst: dst.clone(),
                proto: Some(proto.clone()),
            };
            let e: Evaluation = r
                .call(
                    Method::POST,
                    &path(&net, "/policy/evaluate"),
                    Some(&serde_json::to_value(&req)?),
                )
                .await?;
            match (e.rule, e.line) {
                (Some(rule), Some(line)) => {
                    println!("{src} → {dst} ({proto}): accepted by rule {rule} (line {line})");
                }
                _ => println!("{src} → {dst} ({proto}): denied (no rule accepts it)"),
            }
        }
    }
    Ok(())
}

pub async fn dns(cmd: DnsCmd) -> anyhow::Result<()> {
    let r = remote().await?;
    let settings: DnsConfig = match cmd {
        DnsCmd::Get { net } => r.call(Method::GET, &path(&net, "/dns"), None).await?,
        DnsCmd::Set { net, file } => {
            let body: Value = serde_json::from_str(&read(&file)?)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            r.call(Method::PUT, &path(&net, "/dns"), Some(&body))
                .await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&settings)?);
    Ok(())
}

/// `coordinator device tag ID TAG…`: the device's tags become these.
pub async fn tag(net: Net, id: i64, tags: Vec<String>) -> anyhow::Result<()> {
    let d: DeviceInfo = remote()
        .await?
        .call(
            Method::PUT,
            &path(&net, &format!("/devices/{id}/tags")),
            Some(&serde_json::to_value(SetTags { tags })?),
        )
        .await?;
    println!("{}: {}", d.name, d.tags.join(", "));
    Ok(())
}
