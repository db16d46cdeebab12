//! `derp-relay`: the relay server.

use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use derp_relay::server::admission::Admission;
use derp_relay::server::{http, Relay, RelayConfig};
use x25519_dalek::StaticSecret;

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
    /// File holding the relay token (`coordinator relay-token create`).
    #[arg(long, env = "DERP_TOKEN_FILE", required_unless_present = "open")]
    token_file: Option<PathBuf>,
    /// Admit every client that proves a key, without asking a coordinator
    /// (closed test networks only).
    #[arg(long)]
    open: bool,
    /// The relay's private key; generated on first start.
    #[arg(long, env = "DERP_KEY_FILE", default_value = "/var/lib/derp-relay/key")]
    key_file: PathBuf,
    /// Bytes per second one client may send.
    #[arg(long, default_value_t = 125_000_000)]
    rate_limit: u64,
    /// Burst above the rate, in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    burst: u64,
    /// File holding the pre-shared key of this region's relay mesh.
    #[arg(long, env = "DERP_MESH_PSK_FILE")]
    mesh_psk_file: Option<PathBuf>,
    /// Another relay of the region (`http[s]://host:port/derp`); repeat for each.
    #[arg(long = "mesh-with", requires = "mesh_psk_file")]
    mesh_with: Vec<String>,
    /// A private CA (PEM) the other relays' certificates chain to.
    #[arg(long)]
    mesh_ca_file: Option<PathBuf>,
    /// Serve TLS with this certificate chain (PEM); plain TCP without it.
    #[arg(long, env = "DERP_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "DERP_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

fn load_or_create_key(path: &Path) -> anyhow::Result<StaticSecret> {
    if path.exists() {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes)
            .with_context(|| format!("{} is not a hex key", path.display()))?;
        return Ok(StaticSecret::from(bytes));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let key = StaticSecret::random_from_rng(rand_core::OsRng);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    std::io::Write::write_all(&mut f, hex::encode(key.to_bytes()).as_bytes())?;
    Ok(key)
}

async fn try_main(cli: Cli) -> anyhow::Result<()> {
    let private = load_or_create_key(&cli.key_file)?;
    let admission = match (cli.open, cli.coordinator, cli.token_file) {
        (true, _, _) => Admission::Open,
        (false, Some(url), Some(file)) => {
            let token = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let ca = cli
                .coordinator_ca_file
                .as_ref()
                .map(|p| {
                    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
                })
                .transpose()?;
            Admission::coordinator(&url, token.trim().to_owned(), ca.as_deref())?
        }
        _ => anyhow::bail!("--coordinator and --token-file are required unless --open"),
    };
    let mesh_key = match &cli.mesh_psk_file {
        Some(f) => {
            let key = std::fs::read_to_string(f)
                .with_context(|| format!("reading {}", f.display()))?
                .trim()
                .to_owned();
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
    });
    let mesh_ca = match &cli.mesh_ca_file {
        Some(f) => {
            Some(std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?)
        }
        None => None,
    };
    for url in cli.mesh_with {
        let target = derp_relay::client::RelayTarget {
            url,
            ca_pem: mesh_ca.clone(),
        };
        tokio::spawn(derp_relay::server::mesh::run_link(relay.clone(), target));
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
    match tls {
        Some(config) => http::serve_tls(listener, http::router(relay), config).await,
        None => axum::serve(listener, http::router(relay))
            .await
            .context("serving"),
    }
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
