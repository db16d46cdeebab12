//! The daemon's local API: a unix socket carrying one JSON request line and
//! one JSON response line per connection. The CLI is its client.

use std::net::{IpAddr, SocketAddr};
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
        coordinator_key: Option<CoordinatorPublic>,
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
}

fn default_jobs_limit() -> usize {
    20
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
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub idle_below: Option<u8>,
    /// Share of the CPU compute may use, in percent (sets llama.cpp threads).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub max_utilisation: Option<u8>,
    /// Stop below this battery charge, in percent.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub min_battery: Option<u8>,
    /// Stop at this temperature, in °C.
    #[arg(long)]
    pub max_celsius: Option<i32>,
    /// Jobs run at once (default: from the device tier).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub slots: Option<u64>,
    /// Jobs that may wait beyond the slots before callers get 429.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=4096))]
    pub queue: Option<u64>,
}

impl ComputeChanges {
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
    Error(String),
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
                Ok(_) => match serde_json::from_str::<Request>(&line) {
                    Err(e) => Response::Error(format!("invalid request: {e}")),
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
    }
}
