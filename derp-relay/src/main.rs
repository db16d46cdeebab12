//! `derp-relay`: the relay server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use derp_relay::secrets::{load_or_create_key, read_secret};
use derp_relay::server::admission::{Admission, AdmissionLimits};
use derp_relay::server::mesh::MeshPeer;
use derp_relay::server::{http, ConnLimits, Relay, RelayConfig};

/// Crank Mesh relay.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// HTTP listen address (relay connections, /healthz, /metrics).
    #[arg(long, env = "DERP_LISTEN", default_value = "0.0.0.0:3340")]
    listen: SocketAddr,
    /// STUN listen address (UDP); repeat to answer on several ports, which
    /// lets devices tell whether their NAT maps per destination.
    #[arg(
        long = "stun-listen",
        env = "DERP_STUN_LISTEN",
        default_value = "0.0.0.0:3478"
    )]
    stun_listen: Vec<SocketAddr>,
    /// Coordinator asked which devices may connect.
    #[arg(long, env = "DERP_COORDINATOR", required_unless_present = "open")]
    coordinator: Option<String>,
    /// A private CA the coordinator's certificate chains to (PEM), trusted
    /// beside the public roots.
    #[arg(long, env = "DERP_COORDINATOR_CA_FILE")]
    coordinator_ca_file: Option<PathBuf>,
    /// File holding the relay token (`coordinator relay-token create`);
    /// owner-only (mode 0600), or it is refused.
    #[arg(long, env = "DERP_TOKEN_FILE", required_unless_present = "open")]
    token_file: Option<PathBuf>,
    /// Admit every client that proves a key, without asking a coordinator
    /// (closed test networks only).
    #[arg(long)]
    open: bool,
    /// The relay's private key; generated on first start (mode 0600).
    #[arg(long, env = "DERP_KEY_FILE", default_value = "/var/lib/derp-relay/key")]
    key_file: PathBuf,
    /// Bytes per second one client may send.
    #[arg(long, default_value_t = 125_000_000)]
    rate_limit: u64,
    /// Burst above the rate, in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    burst: u64,
    /// File holding the pre-shared key of this region's relay mesh;
    /// owner-only (mode 0600), or it is refused.
    #[arg(long, env = "DERP_MESH_PSK_FILE")]
    mesh_psk_file: Option<PathBuf>,
    /// Another relay of the region, with the key it must present (logged
    /// as `key=` when it starts): `<hex key>@http[s]://host:port/derp`;
    /// repeat for each. The mesh key is only ever sealed to that key.
    #[arg(long = "mesh-with", requires = "mesh_psk_file", value_parser = MeshPeer::parse)]
    mesh_with: Vec<MeshPeer>,
    /// A private CA (PEM) the other relays' certificates chain to.
    #[arg(long)]
    mesh_ca_file: Option<PathBuf>,
    /// Serve TLS with this certificate chain (PEM); plain TCP without it.
    #[arg(long, env = "DERP_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "DERP_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// TCP connections at once; more are closed at accept.
    #[arg(long, default_value_t = ConnLimits::default().max_connections)]
    max_connections: usize,
    /// Connections still proving their key at once; more get a 503.
    #[arg(long, default_value_t = ConnLimits::default().max_handshakes)]
    max_handshakes: usize,
    /// Bytes queued for one client before its packets are dropped.
    #[arg(long, default_value_t = ConnLimits::default().queue_bytes)]
    client_queue_bytes: usize,
    /// Seconds of silence after which a connection is closed (keepalives
    /// flow every third of it).
    #[arg(long, default_value_t = ConnLimits::default().idle_timeout.as_secs())]
    idle_timeout_secs: u64,
    /// Admission questions per second to the coordinator about node keys
    /// not cached; beyond it (and its burst) a key is refused unless it was
    /// admitted recently.
    #[arg(long, default_value_t = AdmissionLimits::default().asks_per_sec)]
    coordinator_asks_per_sec: u64,
    /// Admission questions that may go out at once above that rate.
    #[arg(long, default_value_t = AdmissionLimits::default().ask_burst)]
    coordinator_ask_burst: u64,
}

async fn try_main(cli: Cli) -> anyhow::Result<()> {
    let private = load_or_create_key(&cli.key_file)?;
    let admission = match (cli.open, cli.coordinator, cli.token_file) {
        (true, _, _) => Admission::Open,
        (false, Some(url), Some(file)) => {
            let token = read_secret(&file)?;
            let ca = cli
                .coordinator_ca_file
                .as_ref()
                .map(|p| {
                    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
                })
                .transpose()?;
            let limits = AdmissionLimits {
                asks_per_sec: cli.coordinator_asks_per_sec,
                ask_burst: cli.coordinator_ask_burst,
                ..AdmissionLimits::default()
            };
            Admission::coordinator(&url, token.trim().to_owned(), ca.as_deref(), limits)?
        }
        _ => anyhow::bail!("--coordinator and --token-file are required unless --open"),
    };
    let mesh_key = match &cli.mesh_psk_file {
        Some(f) => {
            let key = read_secret(f)?.trim().to_owned();
            anyhow::ensure!(
                key.len() >= 16,
                "the mesh key in {} is too short (16 characters at least)",
                f.display()
            );
            Some(key)
        }
        None => None,
    };
    let relay = Relay::new(RelayConfig {
        private,
        admission,
        rate_limit: cli.rate_limit,
        burst: cli.burst,
        mesh_key,
        limits: ConnLimits {
            max_connections: cli.max_connections,
            max_handshakes: cli.max_handshakes,
            queue_bytes: cli.client_queue_bytes,
            keepalive: Duration::from_secs((cli.idle_timeout_secs / 3).max(1)),
            idle_timeout: Duration::from_secs(cli.idle_timeout_secs.max(3)),
            ..ConnLimits::default()
        },
    });
    let mesh_ca = match &cli.mesh_ca_file {
        Some(f) => {
            Some(std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?)
        }
        None => None,
    };
    for mut peer in cli.mesh_with {
        peer.target.ca_pem = mesh_ca.clone();
        tokio::spawn(derp_relay::server::mesh::run_link(relay.clone(), peer));
    }
    // Revoked node keys, pushed by the coordinator (nothing with --open).
    tokio::spawn(derp_relay::server::revocations::run(relay.clone()));
    for addr in &cli.stun_listen {
        let stun = tokio::net::UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding STUN {addr}"))?;
        tokio::spawn(http::serve_stun(stun));
    }
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("binding {}", cli.listen))?;
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => Some(derp_relay::tls::server_config(cert, key)?),
        _ => None,
    };
    tracing::info!(addr = %cli.listen, tls = tls.is_some(), stun = ?cli.stun_listen, key = %hex::encode(relay.public_key()), "relay listening");
    http::serve(listener, relay, tls).await
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(try_main(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
