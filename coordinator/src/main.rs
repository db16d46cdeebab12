//! `coordinator`: serve the control plane, or administer its state directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use coordinator::store::Store;
use platform::api::CreatePreauthKey;
use platform::unix_now;

/// Crank Mesh coordinator.
///
/// Operator commands act on the state directory directly (SQLite in WAL mode
/// allows this while the server runs). Changes that must reach connected
/// devices at once (stock WireGuard peers, device removal) go through the
/// HTTP API with the admin token.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct StateDir {
    /// Where the database lives.
    #[arg(
        long,
        env = "COORDINATOR_STATE_DIR",
        default_value = "/var/lib/crank-coordinator"
    )]
    state_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Create the database and a first admin; prints the admin API token.
    Init(StateDir),
    /// Serve the HTTP API and map streams.
    Serve {
        #[command(flatten)]
        dir: StateDir,
        #[arg(long, env = "COORDINATOR_LISTEN", default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// Relay regions (JSON: {"regions":[{"id","code","urls":[…],"stun":[…]}]}).
        #[arg(long, env = "COORDINATOR_RELAY_MAP")]
        relay_map: Option<PathBuf>,
    },
    /// Relay tokens.
    #[command(subcommand, name = "relay-token")]
    RelayToken(RelayTokenCmd),
    /// Networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Pre-auth keys.
    #[command(subcommand, name = "preauth-key")]
    PreauthKey(PreauthCmd),
    /// Devices.
    #[command(subcommand)]
    Device(DeviceCmd),
}

#[derive(Subcommand)]
enum NetworkCmd {
    Create {
        name: String,
        #[command(flatten)]
        dir: StateDir,
    },
    List(StateDir),
    Show {
        name: String,
        #[command(flatten)]
        dir: StateDir,
    },
}

#[derive(Subcommand)]
enum PreauthCmd {
    /// Create a key and print it (it is shown only this once).
    Create {
        #[arg(long)]
        network: String,
        /// May register any number of devices.
        #[arg(long)]
        reusable: bool,
        /// Devices it registers are removed when they go away.
        #[arg(long)]
        ephemeral: bool,
        /// Lifetime, e.g. `1h`, `30m`, `7days`.
        #[arg(long, value_parser = humantime::parse_duration)]
        expiry: Option<std::time::Duration>,
        #[command(flatten)]
        dir: StateDir,
    },
    List {
        #[arg(long)]
        network: String,
        #[command(flatten)]
        dir: StateDir,
    },
    Revoke {
        #[arg(long)]
        network: String,
        id: i64,
        #[command(flatten)]
        dir: StateDir,
    },
}

#[derive(Subcommand)]
enum RelayTokenCmd {
    /// Create a token for a relay's admission checks and print it (shown once).
    Create {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        dir: StateDir,
    },
}

#[derive(Subcommand)]
enum DeviceCmd {
    List {
        #[arg(long)]
        network: String,
        #[command(flatten)]
        dir: StateDir,
    },
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn open(dir: &StateDir) -> anyhow::Result<Store> {
    let store = Store::open(&dir.state_dir).await?;
    if !store.is_initialized().await? {
        anyhow::bail!(
            "{} is not initialised: run `coordinator init` first",
            dir.state_dir.display()
        );
    }
    Ok(store)
}

async fn try_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init(dir) => {
            let store = Store::open(&dir.state_dir).await?;
            let token = store.init(unix_now()).await?;
            eprintln!(
                "coordinator initialised in {}; admin API token (shown once):",
                dir.state_dir.display()
            );
            println!("{token}");
        }
        Command::Serve {
            dir,
            listen,
            relay_map,
        } => {
            let relay_map = match relay_map {
                Some(path) => coordinator::load_relay_map(&path)?,
                None => Default::default(),
            };
            coordinator::serve(&dir.state_dir, listen, relay_map).await?
        }
        Command::RelayToken(RelayTokenCmd::Create { name, dir }) => {
            println!(
                "{}",
                open(&dir)
                    .await?
                    .create_relay_token(&name, unix_now())
                    .await?
            );
        }
        Command::Network(NetworkCmd::Create { name, dir }) => {
            print_json(&open(&dir).await?.create_network(&name, unix_now()).await?)?
        }
        Command::Network(NetworkCmd::List(dir)) => {
            print_json(&open(&dir).await?.list_networks().await?)?
        }
        Command::Network(NetworkCmd::Show { name, dir }) => {
            print_json(&open(&dir).await?.network(&name).await?)?
        }
        Command::PreauthKey(PreauthCmd::Create {
            network,
            reusable,
            ephemeral,
            expiry,
            dir,
        }) => {
            let req = CreatePreauthKey {
                reusable,
                ephemeral,
                expiry_secs: expiry.map(|d| d.as_secs().max(1)),
            };
            let created = open(&dir)
                .await?
                .create_preauth_key(&network, &req, unix_now())
                .await?;
            println!("{}", created.key);
        }
        Command::PreauthKey(PreauthCmd::List { network, dir }) => {
            print_json(&open(&dir).await?.list_preauth_keys(&network).await?)?
        }
        Command::PreauthKey(PreauthCmd::Revoke { network, id, dir }) => {
            print_json(&open(&dir).await?.revoke_preauth_key(&network, id).await?)?
        }
        Command::Device(DeviceCmd::List { network, dir }) => {
            let store = open(&dir).await?;
            let net = store.network(&network).await?;
            // Presence lives in the running server; here `online` is left false.
            let devices = store
                .network_devices(net.id)
                .await?
                .iter()
                .map(|r| r.to_info(false))
                .collect::<Result<Vec<_>, _>>()?;
            print_json(&devices)?
        }
    }
    Ok(())
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
