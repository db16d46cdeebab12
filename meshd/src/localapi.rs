//! The daemon's local API: a unix socket carrying one JSON request line and
//! one JSON response line per connection. The CLI is its client.

use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use platform::capability::{Capabilities, OfferedModel, Tier};
use platform::keys::CoordinatorPublic;

use crate::contribute::{ComputeSettings, Mode};
use crate::engine::{CounterSnapshot, PingReply};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// The ranges the CLI and the local API both hold numbers to: the CLI's
/// argument parsers and [`Request::validate`] call the same [`in_range`].
pub mod limits {
    use std::ops::RangeInclusive;

    pub const PERCENT: RangeInclusive<u8> = 1..=100;
    pub const MIN_BATTERY: RangeInclusive<u8> = 0..=100;
    /// Any stop temperature a sensor can report (see `sysinfo`).
    pub const MAX_CELSIUS: RangeInclusive<i32> = 0..=150;
    pub const SLOTS: RangeInclusive<u64> = 1..=64;
    pub const QUEUE: RangeInclusive<u64> = 0..=4096;
    pub const PING_COUNT: RangeInclusive<u32> = 1..=1000;
}

/// A number in a request outside what the daemon accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} must be between {min} and {max}, not {value}")]
pub struct OutOfRange {
    pub field: &'static str,
    pub value: String,
    pub min: String,
    pub max: String,
}

/// `value` if `range` holds it: the one check behind both the CLI's
/// argument parsing and [`Request::validate`].
pub fn in_range<T: PartialOrd + Display>(
    field: &'static str,
    value: T,
    range: &RangeInclusive<T>,
) -> Result<T, OutOfRange> {
    if range.contains(&value) {
        return Ok(value);
    }
    Err(OutOfRange {
        field,
        value: value.to_string(),
        min: range.start().to_string(),
        max: range.end().to_string(),
    })
}

/// A clap value parser for a number in `range` (checked by [`in_range`]).
pub fn ranged<T>(
    field: &'static str,
    range: RangeInclusive<T>,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: std::str::FromStr + PartialOrd + Display + Clone + Send + Sync + 'static,
    T::Err: Display,
{
    move |s: &str| {
        let v = s.trim().parse::<T>().map_err(|e| format!("{s:?}: {e}"))?;
        in_range(field, v, &range).map_err(|e| e.to_string())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Up {
        coordinator: String,
        /// Private CA (absolute path to a PEM file) for the coordinator's certificate.
        #[serde(default)]
        ca_file: Option<PathBuf>,
        /// Without one the device pairs by code: the answer is
        /// [`Response::Pairing`], and [`Request::WaitPairing`] waits for it.
        #[serde(default)]
        auth_key: Option<String>,
        hostname: Option<String>,
        /// The coordinator's identity key, when the user was given it: the
        /// device then trusts no other. Without it the device pins the key
        /// the coordinator presents at its first registration.
        #[serde(default)]
        coordinator_key: Option<Box<CoordinatorPublic>>,
    },
    /// Waits until the pairing in progress ends: the status once up, an
    /// error if it expired or failed. Bounded by the code's expiry.
    WaitPairing,
    /// Replaces this device's node key now.
    RotateKey,
    Down,
    Status,
    /// Disco pings to a peer (by name or overlay address).
    Ping {
        peer: String,
        count: u32,
    },
    Netcheck,
    Compute {
        action: ComputeAction,
    },
    /// Recent jobs through the gateway, newest first; or one job by id
    /// (or a unique prefix of it) with its debug view.
    Jobs {
        #[serde(default)]
        id: Option<String>,
        #[serde(default = "default_jobs_limit")]
        limit: usize,
    },
    /// The owner's credits, as the coordinator's ledger has them.
    Ledger,
    /// Who holds an overlay address: device, owner, role and tags.
    WhoIs {
        address: IpAddr,
    },
}

fn default_jobs_limit() -> usize {
    20
}

impl Request {
    /// The checks the CLI makes on its arguments, made again on what
    /// arrives at the socket: a request outside them is refused before the
    /// daemon acts on any of it.
    pub fn validate(&self) -> Result<(), OutOfRange> {
        match self {
            Request::Compute {
                action: ComputeAction::Enable { changes },
            } => changes.validate(),
            Request::Ping { count, .. } => in_range("count", *count, &limits::PING_COUNT).map(drop),
            _ => Ok(()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ComputeAction {
    /// Turns compute on, with these changes to the settings.
    Enable {
        changes: ComputeChanges,
    },
    Disable,
    Status,
}

/// Settings `meshd compute enable` may change; unset fields stay as they are.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
pub struct ComputeChanges {
    /// Serve only these models (repeatable; default: every one fetched).
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// When to contribute: always, idle (desktop), charging (mobile), auto
    /// (charging with a battery, else always).
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Idle mode: contribute while the owner's CPU use stays below this percent.
    #[arg(long, value_parser = ranged("idle_below", limits::PERCENT))]
    pub idle_below: Option<u8>,
    /// Share of the CPU compute may use, in percent (sets llama.cpp threads).
    #[arg(long, value_parser = ranged("max_utilisation", limits::PERCENT))]
    pub max_utilisation: Option<u8>,
    /// Stop below this battery charge, in percent.
    #[arg(long, value_parser = ranged("min_battery", limits::MIN_BATTERY))]
    pub min_battery: Option<u8>,
    /// Stop at this temperature, in °C.
    #[arg(long, value_parser = ranged("max_celsius", limits::MAX_CELSIUS))]
    pub max_celsius: Option<i32>,
    /// Jobs run at once (default: from the device tier).
    #[arg(long, value_parser = ranged("slots", limits::SLOTS))]
    pub slots: Option<u64>,
    /// Jobs that may wait beyond the slots before callers get 429.
    #[arg(long, value_parser = ranged("queue", limits::QUEUE))]
    pub queue: Option<u64>,
}

impl ComputeChanges {
    /// Every number within its range ([`limits`]).
    pub fn validate(&self) -> Result<(), OutOfRange> {
        fn check<T: PartialOrd + Display + Copy>(
            field: &'static str,
            value: Option<T>,
            range: &RangeInclusive<T>,
        ) -> Result<(), OutOfRange> {
            value.map_or(Ok(()), |v| in_range(field, v, range).map(drop))
        }
        check("idle_below", self.idle_below, &limits::PERCENT)?;
        check("max_utilisation", self.max_utilisation, &limits::PERCENT)?;
        check("min_battery", self.min_battery, &limits::MIN_BATTERY)?;
        check("max_celsius", self.max_celsius, &limits::MAX_CELSIUS)?;
        check("slots", self.slots, &limits::SLOTS)?;
        check("queue", self.queue, &limits::QUEUE)
    }

    pub fn apply(&self, s: &mut ComputeSettings) {
        if !self.models.is_empty() {
            s.models = self.models.clone();
        }
        let p = &mut s.policy;
        p.mode = self.mode.unwrap_or(p.mode);
        p.idle_below_percent = self.idle_below.unwrap_or(p.idle_below_percent);
        p.max_utilisation_percent = self.max_utilisation.or(p.max_utilisation_percent);
        p.min_battery_percent = self.min_battery.unwrap_or(p.min_battery_percent);
        p.max_celsius = self.max_celsius.unwrap_or(p.max_celsius);
        s.slots = self.slots.map(|n| n as usize).or(s.slots);
        s.queue = self.queue.map(|n| n as usize).or(s.queue);
    }
}

/// `meshd compute status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeStatus {
    pub settings: ComputeSettings,
    pub serving: bool,
    pub reason: Option<String>,
    /// Models loaded and checked, with their SHA-256.
    pub models: Vec<OfferedModel>,
    pub tier: Tier,
    pub slots: usize,
    pub queue: usize,
    pub threads: usize,
    /// Where peers reach the API (empty while not up).
    pub urls: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(Box<Status>),
    /// `Up` without a key: the code a member approves.
    Pairing(PairingInfo),
    Ping(PingReport),
    Netcheck(NetcheckReport),
    Compute(Box<ComputeStatus>),
    Jobs(Vec<crate::gateway::joblog::JobRecord>),
    Ledger(platform::ledger::BalanceAnswer),
    WhoIs(Box<WhoIs>),
    Error(String),
}

/// `meshd whois ADDRESS`: the device at an overlay address, as the netmap
/// names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoIs {
    pub name: String,
    pub network: String,
    /// `<name>.<network>.<base domain>` when MagicDNS is on.
    #[serde(default)]
    pub fqdn: Option<String>,
    pub addresses: Vec<IpAddr>,
    pub kind: String,
    pub owner: Option<String>,
    pub role: Option<platform::people::Role>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// The address is this device's own.
    pub this_device: bool,
}

/// A device-code pairing waiting for a member's approval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingInfo {
    pub coordinator: String,
    pub hostname: String,
    /// What the member approves: `BCDF-GHJK`.
    pub code: String,
    pub verification_url: String,
    /// Unix seconds; the daemon stops polling then.
    pub expires_at: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingReport {
    pub peer: String,
    pub address: Option<IpAddr>,
    /// One entry per ping sent; `None` where no answer came in time.
    pub replies: Vec<Option<PingReply>>,
    /// Relay region codes by id, to name relayed paths.
    pub regions: Vec<(u32, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StunResult {
    pub server: SocketAddr,
    /// Our address as that server saw it.
    pub mapped: Option<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayLatency {
    pub region: u32,
    pub code: String,
    pub latency_ms: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetcheckReport {
    /// Some STUN server answered over UDP.
    pub udp: bool,
    pub public_endpoint: Option<SocketAddr>,
    /// Different servers saw different addresses (a NAT that maps per
    /// destination); unknown with fewer than two answers.
    pub mapping_varies_by_destination: Option<bool>,
    pub stun: Vec<StunResult>,
    pub relays: Vec<RelayLatency>,
    pub home_region: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// Not joined (or `meshd down`).
    Stopped,
    /// Joined, waiting for the first netmap.
    Starting,
    Running,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfStatus {
    pub name: String,
    pub network: String,
    pub node_key: String,
    pub addresses: Vec<IpAddr>,
    pub tun: String,
    pub udp_port: u16,
    /// Relay region where peers can always reach this device.
    pub home_region: Option<String>,
    pub home_relay_connected: bool,
    /// This device's address as STUN servers see it.
    pub public_endpoint: Option<SocketAddr>,
    /// The report sent to the coordinator.
    pub capabilities: Capabilities,
    /// The user this device belongs to.
    #[serde(default)]
    pub owner: Option<String>,
    /// When this device's node key expires (unix seconds); absent: never.
    #[serde(default)]
    pub key_expiry: Option<u64>,
    /// The network requires an admin's approval, and this device has none
    /// yet: no peers until then.
    #[serde(default)]
    pub awaiting_approval: bool,
    /// Why packets for the overlay addresses may bypass the tunnel (no
    /// firewall table); absent while they cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall_warning: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub kind: String,
    pub node_key: String,
    pub addresses: Vec<IpAddr>,
    pub online: bool,
    /// `direct IP:PORT`, `relay CODE`, `trying IP:PORT` or `none`.
    pub path: String,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake_secs_ago: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub tier: Option<Tier>,
    /// `serving`, `paused: REASON`, or absent when the peer offers none.
    pub compute: Option<String>,
    /// The user the peer belongs to.
    #[serde(default)]
    pub owner: Option<String>,
    /// When the peer's node key expires (unix seconds); absent: never.
    #[serde(default)]
    pub key_expiry: Option<u64>,
    /// Its key has expired: this device no longer talks to it.
    #[serde(default)]
    pub key_expired: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub backend: BackendState,
    pub coordinator: Option<String>,
    pub coordinator_connected: bool,
    #[serde(rename = "self")]
    pub self_: Option<SelfStatus>,
    pub peers: Vec<PeerStatus>,
    pub counters: CounterSnapshot,
    /// A device-code pairing waiting for approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairing: Option<PairingInfo>,
    /// MagicDNS, while it serves (or why it does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<crate::dns::service::DnsStatus>,
    /// The data plane's kernel offloads, while the engine runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offloads: Option<crate::engine::offload::Offloads>,
}

/// Sends a request whose answer is the daemon's status.
pub async fn call(socket: &Path, req: &Request) -> anyhow::Result<Status> {
    match exchange(socket, req).await? {
        Response::Ok(status) => Ok(*status),
        Response::Error(msg) => anyhow::bail!("{msg}"),
        other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
    }
}

/// Sends one request to the daemon at `socket` and returns its reply.
pub async fn exchange(socket: &Path, req: &Request) -> anyhow::Result<Response> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "connecting to meshd at {} (is `meshd daemon` running?)",
            socket.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await?;
    write.shutdown().await?;
    let mut reply = String::new();
    BufReader::new(read).read_line(&mut reply).await?;
    serde_json::from_str(&reply).context("reading the daemon's reply")
}

/// One request line, decoded and checked ([`Request::validate`]); the
/// error is the text of the reply.
pub fn decode_request(line: &str) -> Result<Request, String> {
    let req = serde_json::from_str::<Request>(line).map_err(|e| format!("invalid request: {e}"))?;
    req.validate()
        .map_err(|e| format!("invalid request: {e}"))?;
    Ok(req)
}

/// Answers requests on `listener` with `handle`, one task per connection.
pub async fn serve<F, Fut>(listener: UnixListener, handle: F)
where
    F: Fn(Request) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Response> + Send,
{
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "local API accept");
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
            let response = match reader.read_line(&mut line).await {
                Err(e) => Response::Error(format!("reading request: {e}")),
                Ok(_) => match decode_request(&line) {
                    Err(e) => Response::Error(e),
                    Ok(req) => handle(req).await,
                },
            };
            let mut out = serde_json::to_string(&response)
                .unwrap_or_else(|_| "{\"error\":\"encoding\"}".into());
            out.push('\n');
            let _ = write.write_all(out.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty_status() -> Status {
        Status {
            backend: BackendState::Stopped,
            coordinator: None,
            coordinator_connected: false,
            self_: None,
            peers: vec![],
            counters: CounterSnapshot::default(),
            pairing: None,
            dns: None,
            offloads: None,
        }
    }

    #[test]
    fn up_without_a_key_pairs() {
        // Older CLIs always sent a key; a missing one means pairing.
        let up: Request =
            serde_json::from_str(r#"{"cmd":"up","coordinator":"http://c","hostname":null}"#)
                .unwrap();
        assert!(matches!(up, Request::Up { auth_key: None, .. }));
        let with: Request = serde_json::from_str(
            r#"{"cmd":"up","coordinator":"http://c","auth_key":"k","hostname":null}"#,
        )
        .unwrap();
        assert!(matches!(with, Request::Up { auth_key: Some(k), .. } if k == "k"));
        for req in [Request::WaitPairing, Request::RotateKey] {
            let json = serde_json::to_string(&req).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), req);
        }
    }

    fn enable(changes: serde_json::Value) -> String {
        serde_json::json!({"cmd": "compute", "action": {"action": "enable", "changes": changes}})
            .to_string()
    }

    fn no_changes() -> serde_json::Value {
        serde_json::to_value(ComputeChanges::default()).unwrap()
    }

    #[test]
    fn the_socket_holds_numbers_to_the_cli_ranges() {
        let with = |field: &str, value: serde_json::Value| {
            let mut c = no_changes();
            c[field] = value;
            decode_request(&enable(c))
        };
        // These reached the daemon: a semaphore of 2^63 permits panicked,
        // `i32::MIN - 5` overflowed under the refresh lock.
        for (field, value) in [
            ("slots", serde_json::json!(u64::MAX)),
            ("slots", serde_json::json!(0)),
            ("queue", serde_json::json!(1u64 << 40)),
            ("max_celsius", serde_json::json!(i32::MIN)),
            ("max_celsius", serde_json::json!(i32::MAX)),
            ("idle_below", serde_json::json!(0)),
            ("max_utilisation", serde_json::json!(101)),
            ("min_battery", serde_json::json!(200)),
        ] {
            let err = with(field, value.clone()).unwrap_err();
            assert!(
                err.contains(field) && err.contains(&value.to_string()),
                "{field}={value}: {err}"
            );
        }
        for (field, value) in [
            ("slots", serde_json::json!(64)),
            ("queue", serde_json::json!(0)),
            ("max_celsius", serde_json::json!(90)),
            ("min_battery", serde_json::json!(0)),
        ] {
            assert!(with(field, value.clone()).is_ok(), "{field}={value}");
        }
        let ping = |count: u64| {
            decode_request(
                &serde_json::json!({"cmd": "ping", "peer": "p", "count": count}).to_string(),
            )
        };
        assert!(ping(u64::from(u32::MAX)).unwrap_err().contains("count"));
        assert!(ping(0).is_err());
        assert!(ping(10).is_ok());
    }

    #[test]
    fn the_cli_refuses_what_the_socket_refuses_with_the_same_words() {
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            changes: ComputeChanges,
        }
        use clap::Parser as _;
        let parsed = Cli::try_parse_from(["meshd", "--slots", "8", "--max-celsius", "90"]).unwrap();
        assert_eq!(parsed.changes.slots, Some(8));
        assert_eq!(parsed.changes.max_celsius, Some(90));
        for (flag, field, value) in [
            ("--slots", "slots", "65"),
            ("--max-celsius", "max_celsius", "-2147483648"),
            ("--max-celsius", "max_celsius", "151"),
            ("--queue", "queue", "5000"),
            ("--min-battery", "min_battery", "101"),
        ] {
            // `--flag=value`: a negative number is a value, not a flag.
            let cli = Cli::try_parse_from(["meshd", &format!("{flag}={value}")])
                .unwrap_err()
                .to_string();
            let mut c = no_changes();
            c[field] = value.parse::<serde_json::Value>().unwrap();
            let socket = decode_request(&enable(c)).unwrap_err();
            let words = socket.trim_start_matches("invalid request: ");
            assert!(
                cli.contains(words),
                "CLI said {cli:?}, the socket {socket:?}"
            );
        }
    }

    #[tokio::test]
    async fn request_reply_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(serve(listener, |req| async move {
            match req {
                Request::Status => Response::Ok(Box::new(empty_status())),
                other => Response::Error(format!("refused {other:?}")),
            }
        }));
        assert_eq!(call(&path, &Request::Status).await.unwrap(), empty_status());
        let err = call(&path, &Request::Down).await.unwrap_err();
        assert!(err.to_string().contains("refused Down"), "{err}");

        // Garbage gets an error reply, and the server keeps serving.
        let mut raw = UnixStream::connect(&path).await.unwrap();
        raw.write_all(b"{nonsense\n").await.unwrap();
        let mut reply = String::new();
        BufReader::new(raw).read_line(&mut reply).await.unwrap();
        assert!(
            matches!(serde_json::from_str(&reply).unwrap(), Response::Error(m) if m.contains("invalid request"))
        );
        assert!(call(&path, &Request::Status).await.is_ok());

        // Out of range: refused before the handler sees it.
        let huge = ComputeChanges {
            slots: Some(u64::MAX),
            ..Default::default()
        };
        let reply = exchange(
            &path,
            &Request::Compute {
                action: ComputeAction::Enable { changes: huge },
            },
        )
        .await
        .unwrap();
        assert!(
            matches!(&reply, Response::Error(m) if m.contains("slots must be between 1 and 64")),
            "{reply:?}"
        );
    }
}
