//! CLI commands that act on a running coordinator through its API, as the
//! logged-in user: members, invites, device approval and revocation, key
//! expiry and rotation, settings, compute rules, the credit ledger, the
//! denylist and the audit log. They go
//! through the server (not the state directory) so that live map streams
//! and relays hear of each change at once, and the server checks the
//! caller's role like any other API call.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use platform::api::DeviceInfo;
use platform::jobs::ComputeRules;
use platform::ledger::{csv_field, format_credits, parse_credits, Balances, LedgerEntry};
use platform::people::{
    AuditEvent, CreatedInvite, DenylistEntry, InviteInfo, Member, NetworkSettings, Redeemed, Role,
    WhoAmI,
};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::client::{Login, Remote};

#[derive(Args, Clone)]
pub struct Net {
    /// The network.
    #[arg(long, env = "COORDINATOR_NETWORK")]
    pub network: String,
}

#[derive(Args, Clone, Copy)]
pub struct Output {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum MemberCmd {
    /// Members with their roles and status.
    List {
        #[command(flatten)]
        net: Net,
        #[command(flatten)]
        out: Output,
    },
    /// Change someone's role (admins; nobody changes their own).
    Role {
        #[command(flatten)]
        net: Net,
        username: String,
        #[arg(value_parser = parse_role)]
        role: Role,
        #[command(flatten)]
        out: Output,
    },
    /// Approve a member waiting after redeeming an invite.
    Approve {
        #[command(flatten)]
        net: Net,
        username: String,
        #[command(flatten)]
        out: Output,
    },
    /// Remove a member and their devices (or leave, with your own name).
    Remove {
        #[command(flatten)]
        net: Net,
        username: String,
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Subcommand)]
pub enum InviteCmd {
    /// Make an invite and print its link (shown once).
    Create {
        #[command(flatten)]
        net: Net,
        #[arg(long, value_parser = parse_role, default_value = "member")]
        role: Role,
        /// Lifetime, e.g. `7days` (the default), `1h`.
        #[arg(long, value_parser = humantime::parse_duration)]
        expiry: Option<Duration>,
        /// Only this user may redeem it.
        #[arg(long)]
        username: Option<String>,
        /// Only this address may redeem it (auto-approval rules apply to it).
        #[arg(long)]
        email: Option<String>,
        /// Also print the link as a QR code.
        #[arg(long)]
        qr: bool,
        #[command(flatten)]
        out: Output,
    },
    List {
        #[command(flatten)]
        net: Net,
        #[command(flatten)]
        out: Output,
    },
    Revoke {
        #[command(flatten)]
        net: Net,
        id: i64,
        #[command(flatten)]
        out: Output,
    },
    /// Redeem an invite link: with your login as yourself, or with
    /// `--username` as a new user (whose token is saved as your login).
    Redeem {
        link: String,
        #[arg(long)]
        username: Option<String>,
        #[arg(long)]
        email: Option<String>,
        /// A private CA for the coordinator in the link (PEM).
        #[arg(long)]
        ca_file: Option<std::path::PathBuf>,
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Subcommand)]
pub enum RemoteDeviceCmd {
    /// Approve a device: a pairing CODE shown by `meshd up` (it joins as
    /// yours), or the numeric ID of a device waiting for approval or revoked.
    Approve {
        #[command(flatten)]
        net: Net,
        code_or_id: String,
        #[command(flatten)]
        out: Output,
    },
    /// Remove a device; its keys are denylisted until an admin lifts them.
    Remove {
        #[command(flatten)]
        net: Net,
        id: i64,
        #[command(flatten)]
        out: Output,
    },
    /// Shut a device out but keep its record; `approve` lets it back.
    Revoke {
        #[command(flatten)]
        net: Net,
        id: i64,
        #[command(flatten)]
        out: Output,
    },
    /// Set a device's node-key lifetime from now: e.g. `30days`, `never`,
    /// or `default` (the network's).
    KeyExpiry {
        #[command(flatten)]
        net: Net,
        id: i64,
        expiry: String,
        #[command(flatten)]
        out: Output,
    },
    /// Ask every device of the network to renew its node key.
    RotateKeys {
        #[command(flatten)]
        net: Net,
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Subcommand)]
pub enum SettingsCmd {
    Get {
        #[command(flatten)]
        net: Net,
        #[command(flatten)]
        out: Output,
    },
    Set {
        #[command(flatten)]
        net: Net,
        #[arg(long)]
        require_device_approval: Option<bool>,
        /// Approve members invited at these domains at once (repeatable;
        /// replaces the list; `--auto-approve-domain ''` clears it).
        #[arg(long = "auto-approve-domain")]
        auto_approve_domains: Option<Vec<String>>,
        #[arg(long = "auto-approve-email")]
        auto_approve_emails: Option<Vec<String>>,
        /// Node-key lifetime, e.g. `180days`, or `never`.
        #[arg(long)]
        key_expiry: Option<String>,
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum AuditFormat {
    Text,
    Json,
    Jsonl,
    Csv,
}

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Events of the network (admins: all; others: their own).
    List {
        #[command(flatten)]
        net: Net,
        /// Only events since: unix seconds, or an age like `2h`.
        #[arg(long)]
        since: Option<String>,
        /// Shorthand for `--format json`.
        #[arg(long)]
        json: bool,
        #[arg(long, value_enum, default_value = "text")]
        format: AuditFormat,
    },
}

#[derive(Subcommand)]
pub enum DenylistCmd {
    List {
        #[command(flatten)]
        net: Net,
        #[command(flatten)]
        out: Output,
    },
    /// Let a removed device's key back in.
    Lift {
        #[command(flatten)]
        net: Net,
        id: i64,
    },
}

#[derive(Subcommand)]
pub enum ComputeCmd {
    /// The network's compute rules: who may run what, credit rates,
    /// scheduler weights (JSON).
    Get {
        #[command(flatten)]
        net: Net,
    },
    /// Replace the rules with those in FILE (JSON, `-` for stdin; fields
    /// left out take their defaults). Admins.
    Set {
        #[command(flatten)]
        net: Net,
        file: std::path::PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LedgerFormat {
    Jsonl,
    Csv,
}

impl LedgerFormat {
    fn as_str(self) -> &'static str {
        match self {
            LedgerFormat::Jsonl => "jsonl",
            LedgerFormat::Csv => "csv",
        }
    }
}

#[derive(Subcommand)]
pub enum LedgerCmd {
    /// Balances in credits (admins: every account; others: their own and
    /// the pool).
    Balances {
        #[command(flatten)]
        net: Net,
        #[command(flatten)]
        out: Output,
    },
    /// Every entry, oldest first, to stdout (admins).
    Export {
        #[command(flatten)]
        net: Net,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: LedgerFormat,
    },
    /// Mint CREDITS (like 25 or 0.5) into a member's account, or into the
    /// network's shared pool without --member (admins).
    Grant {
        #[command(flatten)]
        net: Net,
        #[arg(long)]
        member: Option<String>,
        #[arg(value_parser = parse_credits)]
        credits: u64,
        #[command(flatten)]
        out: Output,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

/// `never` → 0, `default` → None, else a duration.
fn parse_lifetime(s: &str) -> anyhow::Result<Option<u64>> {
    match s {
        "never" => Ok(Some(0)),
        "default" => Ok(None),
        other => Ok(Some(
            humantime::parse_duration(other)
                .with_context(|| format!("{other:?}: a lifetime like 30days, never or default"))?
                .as_secs()
                .max(1),
        )),
    }
}

/// A unix time as people read it (UTC, RFC 3339).
fn when(t: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

/// A lifetime in whole days when it is one, else as humantime writes it.
fn lifetime_text(secs: u64) -> String {
    match secs {
        0 => "never".to_owned(),
        s if s % 86400 == 0 => format!("{} days", s / 86400),
        s => humantime::format_duration(Duration::from_secs(s)).to_string(),
    }
}

fn net_path(net: &Net, rest: &str) -> String {
    format!("/api/v1/networks/{}{rest}", net.network)
}

fn print<T: Serialize>(
    out: Output,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if out.json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", text(value));
    }
    Ok(())
}

async fn remote() -> anyhow::Result<Remote> {
    Remote::new(&Login::load()?)
}

async fn get<T: DeserializeOwned>(path: &str) -> anyhow::Result<T> {
    remote().await?.call(Method::GET, path, None).await
}

async fn send<T: DeserializeOwned>(
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<T> {
    remote().await?.call(method, path, body.as_ref()).await
}

fn member_line(m: &Member) -> String {
    format!(
        "{:<20} {:<7} {:<8}{}{}\n",
        m.username,
        m.role.as_str(),
        match m.status {
            platform::people::MemberStatus::Active => "active",
            platform::people::MemberStatus::Pending => "pending",
        },
        if m.owner { " owner" } else { "" },
        m.email
            .as_deref()
            .map(|e| format!(" <{e}>"))
            .unwrap_or_default(),
    )
}

fn device_line(d: &DeviceInfo) -> String {
    format!(
        "{} {} ({}) owner {} state {:?}\n",
        d.id,
        d.name,
        d.addresses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        d.owner.as_deref().unwrap_or("-"),
        d.state,
    )
}

fn invite_line(i: &InviteInfo) -> String {
    let who = i
        .username
        .clone()
        .or(i.email.clone())
        .unwrap_or_else(|| "anyone with the link".into());
    let state = if i.revoked {
        "revoked".to_owned()
    } else if let Some(r) = &i.redeemed_by {
        format!("redeemed by {r}")
    } else {
        format!("open until {}", when(i.expires_at))
    };
    format!("{} {} {} for {who}, {state}\n", i.id, i.prefix, i.role)
}

/// The link as a QR code for a terminal (two rows per character).
pub fn qr_text(link: &str) -> anyhow::Result<String> {
    let code = qrcode::QrCode::new(link.as_bytes()).context("encoding the link as a QR code")?;
    Ok(code
        .render::<qrcode::render::unicode::Dense1x2>()
        .quiet_zone(true)
        .build())
}

pub async fn whoami(out: Output) -> anyhow::Result<()> {
    let me: WhoAmI = get("/api/v1/me").await?;
    print(out, &me, |me| {
        let mut s = format!("{} (user {})\n", me.username, me.user_id);
        for m in &me.memberships {
            let _ = writeln!(
                s,
                "  {:<20} {:<7} {:?}{}",
                m.network,
                m.role.as_str(),
                m.status,
                if m.owner { " owner" } else { "" }
            );
        }
        s
    })
}

/// Checks the token against the server, then saves the login.
pub async fn login(
    url: String,
    token: String,
    ca_file: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let login = Login {
        url,
        token,
        ca_file,
    };
    let me: WhoAmI = Remote::new(&login)?
        .call(Method::GET, "/api/v1/me", None)
        .await?;
    let path = login.save()?;
    println!("logged in as {} (saved in {})", me.username, path.display());
    Ok(())
}

pub async fn member(cmd: MemberCmd) -> anyhow::Result<()> {
    match cmd {
        MemberCmd::List { net, out } => {
            let members: Vec<Member> = get(&net_path(&net, "/members")).await?;
            print(out, &members, |ms| ms.iter().map(member_line).collect())
        }
        MemberCmd::Role {
            net,
            username,
            role,
            out,
        } => {
            let m: Member = send(
                Method::PUT,
                &net_path(&net, &format!("/members/{username}/role")),
                Some(json!({ "role": role })),
            )
            .await?;
            print(out, &m, member_line)
        }
        MemberCmd::Approve { net, username, out } => {
            let m: Member = send(
                Method::POST,
                &net_path(&net, &format!("/members/{username}/approve")),
                None,
            )
            .await?;
            print(out, &m, member_line)
        }
        MemberCmd::Remove { net, username, out } => {
            let m: Member = send(
                Method::DELETE,
                &net_path(&net, &format!("/members/{username}")),
                None,
            )
            .await?;
            print(out, &m, |m| format!("removed {}\n", m.username))
        }
    }
}

pub async fn invite(cmd: InviteCmd) -> anyhow::Result<()> {
    match cmd {
        InviteCmd::Create {
            net,
            role,
            expiry,
            username,
            email,
            qr,
            out,
        } => {
            let created: CreatedInvite = send(
                Method::POST,
                &net_path(&net, "/invites"),
                Some(json!({
                    "role": role,
                    "expiry_secs": expiry.map(|d| d.as_secs().max(1)),
                    "username": username,
                    "email": email,
                })),
            )
            .await?;
            let code = if qr {
                Some(qr_text(&created.link)?)
            } else {
                None
            };
            print(out, &created, |c| {
                let mut s = format!(
                    "invite {} ({} in {}, expires {}); pass this link on (shown once):\n{}\n",
                    c.info.id,
                    c.info.role,
                    c.info.network,
                    when(c.info.expires_at),
                    c.link
                );
                if let Some(code) = &code {
                    s.push_str(code);
                    s.push('\n');
                }
                s
            })
        }
        InviteCmd::List { net, out } => {
            let invites: Vec<InviteInfo> = get(&net_path(&net, "/invites")).await?;
            print(out, &invites, |is| is.iter().map(invite_line).collect())
        }
        InviteCmd::Revoke { net, id, out } => {
            let i: InviteInfo = send(
                Method::DELETE,
                &net_path(&net, &format!("/invites/{id}")),
                None,
            )
            .await?;
            print(out, &i, invite_line)
        }
        InviteCmd::Redeem {
            link,
            username,
            email,
            ca_file,
            out,
        } => {
            let (base, secret) = link.rsplit_once("/api/v1/invites/").context(
                "an invite link looks like https://coordinator/api/v1/invites/meshinv-…",
            )?;
            // As yourself when logged in to this coordinator, else as a new user.
            let mut login = Login::load()
                .ok()
                .filter(|l| l.url.trim_end_matches('/') == base);
            if username.is_some() {
                login = None;
            }
            let as_new = login.is_none();
            let login = login.unwrap_or(Login {
                url: base.to_owned(),
                token: String::new(),
                ca_file: ca_file.clone(),
            });
            let redeemed: Redeemed = Remote::new(&login)?
                .call(
                    Method::POST,
                    &format!("/api/v1/invites/{secret}/redeem"),
                    Some(&json!({ "username": username, "email": email })),
                )
                .await?;
            if let (true, Some(token)) = (as_new, &redeemed.token) {
                Login {
                    url: base.to_owned(),
                    token: token.clone(),
                    ca_file,
                }
                .save()?;
            }
            print(out, &redeemed, |r| {
                let mut s = format!(
                    "{} joined {} as {} ({:?})\n",
                    r.member.username, r.network, r.member.role, r.member.status
                );
                if let Some(t) = &r.token {
                    let _ = writeln!(s, "your token (shown once, saved as your login): {t}");
                }
                s
            })
        }
    }
}

pub async fn device(cmd: RemoteDeviceCmd) -> anyhow::Result<()> {
    match cmd {
        RemoteDeviceCmd::Approve {
            net,
            code_or_id,
            out,
        } => {
            if let Ok(id) = code_or_id.parse::<i64>() {
                let d: DeviceInfo = send(
                    Method::POST,
                    &net_path(&net, &format!("/devices/{id}/approve")),
                    None,
                )
                .await?;
                print(out, &d, device_line)
            } else {
                let v: Value = send(
                    Method::POST,
                    &net_path(&net, &format!("/device-codes/{code_or_id}/approve")),
                    None,
                )
                .await?;
                print(out, &v, |v| {
                    format!(
                        "approved {} ({}) into {}; it comes up in a moment\n",
                        v["hostname"].as_str().unwrap_or("?"),
                        v["code"].as_str().unwrap_or("?"),
                        v["network"].as_str().unwrap_or("?")
                    )
                })
            }
        }
        RemoteDeviceCmd::Remove { net, id, out } => {
            let d: DeviceInfo = send(
                Method::DELETE,
                &net_path(&net, &format!("/devices/{id}")),
                None,
            )
            .await?;
            print(out, &d, |d| format!("removed {}\n", d.name))
        }
        RemoteDeviceCmd::Revoke { net, id, out } => {
            let d: DeviceInfo = send(
                Method::POST,
                &net_path(&net, &format!("/devices/{id}/revoke")),
                None,
            )
            .await?;
            print(out, &d, device_line)
        }
        RemoteDeviceCmd::KeyExpiry {
            net,
            id,
            expiry,
            out,
        } => {
            let d: DeviceInfo = send(
                Method::PUT,
                &net_path(&net, &format!("/devices/{id}/key-expiry")),
                Some(json!({ "expiry_secs": parse_lifetime(&expiry)? })),
            )
            .await?;
            print(out, &d, |d| {
                format!(
                    "{}: node key expires {}\n",
                    d.name,
                    d.key_expiry.map_or("never".into(), when)
                )
            })
        }
        RemoteDeviceCmd::RotateKeys { net, out } => {
            let v: Value = send(Method::POST, &net_path(&net, "/rotate-keys"), None).await?;
            print(out, &v, |v| {
                format!(
                    "asked {} connected device(s) to renew now; the others renew when they connect\n",
                    v["asked"]
                )
            })
        }
    }
}

pub async fn settings(cmd: SettingsCmd) -> anyhow::Result<()> {
    let show = |s: &NetworkSettings| {
        format!(
            "require_device_approval: {}\nauto_approve_domains: {}\nauto_approve_emails: {}\nkey_expiry: {}\n",
            s.require_device_approval,
            s.auto_approve_domains.join(", "),
            s.auto_approve_emails.join(", "),
            lifetime_text(s.key_expiry_secs)
        )
    };
    match cmd {
        SettingsCmd::Get { net, out } => {
            let s: NetworkSettings = get(&net_path(&net, "/settings")).await?;
            print(out, &s, show)
        }
        SettingsCmd::Set {
            net,
            require_device_approval,
            auto_approve_domains,
            auto_approve_emails,
            key_expiry,
            out,
        } => {
            let clean = |v: Option<Vec<String>>| {
                v.map(|v| v.into_iter().filter(|x| !x.is_empty()).collect::<Vec<_>>())
            };
            let key_expiry_secs = match key_expiry.as_deref() {
                None => None,
                Some("never") => Some(0),
                Some(d) => Some(
                    humantime::parse_duration(d)
                        .context("--key-expiry")?
                        .as_secs()
                        .max(1),
                ),
            };
            let s: NetworkSettings = send(
                Method::PATCH,
                &net_path(&net, "/settings"),
                Some(json!({
                    "require_device_approval": require_device_approval,
                    "auto_approve_domains": clean(auto_approve_domains),
                    "auto_approve_emails": clean(auto_approve_emails),
                    "key_expiry_secs": key_expiry_secs,
                })),
            )
            .await?;
            print(out, &s, show)
        }
    }
}

/// The audit log as CSV (header first).
pub fn audit_csv(events: &[AuditEvent]) -> String {
    let mut out = String::from("id,at,network,actor,action,target,old,new\n");
    for e in events {
        let fields = [
            e.id.to_string(),
            e.at.to_string(),
            e.network.clone(),
            e.actor.to_string(),
            e.action.clone(),
            e.target.clone(),
            e.old.clone().unwrap_or_default(),
            e.new.clone().unwrap_or_default(),
        ];
        out.push_str(
            &fields
                .iter()
                .map(|f| csv_field(f))
                .collect::<Vec<_>>()
                .join(","),
        );
        out.push('\n');
    }
    out
}

pub async fn audit(cmd: AuditCmd) -> anyhow::Result<()> {
    let AuditCmd::List {
        net,
        since,
        json,
        format,
    } = cmd;
    let since = match since.as_deref() {
        None => None,
        Some(s) => Some(match s.parse::<u64>() {
            Ok(t) => t,
            Err(_) => platform::unix_now().saturating_sub(
                humantime::parse_duration(s)
                    .context("--since: unix seconds, or an age like 2h")?
                    .as_secs(),
            ),
        }),
    };
    let path = match since {
        Some(t) => net_path(&net, &format!("/audit?since={t}")),
        None => net_path(&net, "/audit"),
    };
    let events: Vec<AuditEvent> = get(&path).await?;
    match if json { AuditFormat::Json } else { format } {
        AuditFormat::Json => println!("{}", serde_json::to_string_pretty(&events)?),
        AuditFormat::Jsonl => {
            for e in &events {
                println!("{}", serde_json::to_string(e)?);
            }
        }
        AuditFormat::Csv => print!("{}", audit_csv(&events)),
        AuditFormat::Text => {
            for e in &events {
                let change = match (&e.old, &e.new) {
                    (Some(o), Some(n)) => format!(": {o} → {n}"),
                    (None, Some(n)) => format!(": {n}"),
                    _ => String::new(),
                };
                println!(
                    "{} {} {} {}{change}",
                    when(e.at),
                    e.actor,
                    e.action,
                    e.target
                );
            }
        }
    }
    Ok(())
}

pub async fn compute(cmd: ComputeCmd) -> anyhow::Result<()> {
    let rules: ComputeRules = match cmd {
        ComputeCmd::Get { net } => get(&net_path(&net, "/compute")).await?,
        ComputeCmd::Set { net, file } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading stdin")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let body: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            send(Method::PUT, &net_path(&net, "/compute"), Some(body)).await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&rules)?);
    Ok(())
}

fn balance_lines(b: &Balances) -> String {
    b.accounts
        .iter()
        .map(|a| {
            format!(
                "{:<16} {:<20} {:>16}\n",
                a.account.to_string(),
                a.user.as_deref().unwrap_or("-"),
                format_credits(a.balance)
            )
        })
        .collect()
}

fn entry_line(e: &LedgerEntry) -> String {
    format!(
        "{} {} {} → {} {} credits ({} {})\n",
        e.id,
        e.kind.as_str(),
        e.debit,
        e.credit,
        format_credits(i64::try_from(e.amount).unwrap_or(i64::MAX)),
        e.job_id,
        when(e.created_at)
    )
}

pub async fn ledger(cmd: LedgerCmd) -> anyhow::Result<()> {
    match cmd {
        LedgerCmd::Balances { net, out } => {
            let b: Balances = get(&net_path(&net, "/ledger/balances")).await?;
            print(out, &b, balance_lines)
        }
        LedgerCmd::Export { net, format } => {
            let path = net_path(&net, &format!("/ledger/export?format={}", format.as_str()));
            remote()
                .await?
                .download(&path, &mut std::io::stdout().lock())
                .await
        }
        LedgerCmd::Grant {
            net,
            member,
            credits,
            out,
        } => {
            let e: LedgerEntry = send(
                Method::POST,
                &net_path(&net, "/ledger/grants"),
                Some(json!({ "member": member, "amount": credits })),
            )
            .await?;
            print(out, &e, entry_line)
        }
    }
}

pub async fn denylist(cmd: DenylistCmd) -> anyhow::Result<()> {
    match cmd {
        DenylistCmd::List { net, out } => {
            let list: Vec<DenylistEntry> = get(&net_path(&net, "/denylist")).await?;
            print(out, &list, |l| {
                l.iter()
                    .map(|e| {
                        format!(
                            "{} {} {} {} ({}, {})\n",
                            e.id, e.device_name, e.kind, e.key, e.reason, e.created_at
                        )
                    })
                    .collect()
            })
        }
        DenylistCmd::Lift { net, id } => {
            let () = send(
                Method::DELETE,
                &net_path(&net, &format!("/denylist/{id}")),
                None,
            )
            .await?;
            println!("lifted denylist entry {id}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use platform::people::Actor;

    #[test]
    fn times_read_well() {
        assert_eq!(when(0), "1970-01-01T00:00:00Z");
        assert_eq!(lifetime_text(90 * 86400), "90 days");
        assert_eq!(lifetime_text(0), "never");
        assert_eq!(lifetime_text(3600), "1h");
    }

    #[test]
    fn lifetimes_parse() {
        assert_eq!(parse_lifetime("never").unwrap(), Some(0));
        assert_eq!(parse_lifetime("default").unwrap(), None);
        assert_eq!(parse_lifetime("1h").unwrap(), Some(3600));
        assert!(parse_lifetime("soon").is_err());
    }

    #[test]
    fn audit_csv_quotes_what_it_must() {
        let e = AuditEvent {
            id: 1,
            at: 2,
            network: "home".into(),
            actor: Actor::User("ann".into()),
            action: "settings.changed".into(),
            target: "setting:auto_approve_domains".into(),
            old: Some("[]".into()),
            new: Some("[\"a.com\",\"b.com\"]".into()),
        };
        let csv = audit_csv(&[e]);
        assert_eq!(
            csv,
            "id,at,network,actor,action,target,old,new\n\
             1,2,home,user:ann,settings.changed,setting:auto_approve_domains,[],\"[\"\"a.com\"\",\"\"b.com\"\"]\"\n"
        );
    }

    #[test]
    fn qr_codes_render() {
        let q = qr_text("https://coord.example/api/v1/invites/meshinv-abc").unwrap();
        assert!(q.lines().count() > 10);
    }
}
