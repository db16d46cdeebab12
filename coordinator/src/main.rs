//! `coordinator`: serve the control plane, or administer its state directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use coordinator::store::Store;
use coordinator::{policy_cli, remote};
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
    /// Create the database and a first user (who owns the networks made
    /// from the state directory); prints that user's API token.
    Init {
        #[command(flatten)]
        dir: StateDir,
        #[arg(long, default_value = "admin")]
        username: String,
    },
    /// Print the coordinator's identity key (`coordkey:…`): devices given
    /// it (`meshd up --coordinator-key`) trust no other coordinator.
    Key {
        #[command(flatten)]
        dir: StateDir,
    },
    /// Serve the HTTP API and map streams.
    Serve {
        #[command(flatten)]
        dir: StateDir,
        #[arg(long, env = "COORDINATOR_LISTEN", default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// Relay regions (JSON: {"regions":[{"id","code","urls":[…],"stun":[…]}]}).
        #[arg(long, env = "COORDINATOR_RELAY_MAP")]
        relay_map: Option<PathBuf>,
        /// Serve TLS with this certificate chain (PEM).
        #[arg(
            long,
            env = "COORDINATOR_TLS_CERT",
            requires = "tls_key",
            conflicts_with = "insecure_http"
        )]
        tls_cert: Option<PathBuf>,
        /// The certificate's private key (PEM).
        #[arg(long, env = "COORDINATOR_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve plain HTTP on a non-loopback address (behind a TLS proxy, or
        /// in a lab). Without it plain HTTP is served on loopback only.
        #[arg(long, env = "COORDINATOR_INSECURE_HTTP")]
        insecure_http: bool,
        /// How long a removed device's overlay address stays unused before
        /// another device may get it.
        #[arg(
            long,
            env = "COORDINATOR_ADDRESS_QUARANTINE",
            default_value = "24h",
            value_parser = humantime::parse_duration
        )]
        address_quarantine: std::time::Duration,
        /// MagicDNS names are `<device>.<network>.<base domain>` (`off`
        /// turns MagicDNS off for every network).
        #[arg(long, env = "COORDINATOR_BASE_DOMAIN", default_value = coordinator::api::DEFAULT_BASE_DOMAIN)]
        base_domain: String,
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
    /// Users (operator commands on the state directory).
    #[command(subcommand)]
    User(UserCmd),
    /// Save the coordinator URL and your token for the commands below.
    Login {
        url: String,
        #[arg(long, env = "COORDINATOR_TOKEN")]
        token: String,
        /// A private CA for the coordinator's certificate (PEM).
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Who the saved token belongs to, and their networks.
    Whoami {
        #[command(flatten)]
        out: remote::Output,
    },
    /// Members of a network.
    #[command(subcommand)]
    Member(remote::MemberCmd),
    /// Invites.
    #[command(subcommand)]
    Invite(remote::InviteCmd),
    /// A network's rules: device approval, auto-approval, key expiry.
    #[command(subcommand)]
    Settings(remote::SettingsCmd),
    /// The audit log.
    #[command(subcommand)]
    Audit(remote::AuditCmd),
    /// A network's compute rules: policy, credit rates, scheduler weights.
    #[command(subcommand)]
    Compute(remote::ComputeCmd),
    /// The credit ledger: balances, export, grants.
    #[command(subcommand)]
    Ledger(remote::LedgerCmd),
    /// Keys of removed devices, refused until lifted.
    #[command(subcommand)]
    Denylist(remote::DenylistCmd),
    /// A network's access policy: who may reach what.
    #[command(subcommand)]
    Policy(policy_cli::PolicyCmd),
    /// A network's MagicDNS settings: extra records, split DNS, resolvers.
    #[command(subcommand)]
    Dns(policy_cli::DnsCmd),
}

#[derive(Subcommand)]
enum UserCmd {
    /// A new token for a user (shown once), e.g. one who lost theirs.
    Token {
        username: String,
        #[command(flatten)]
        dir: StateDir,
    },
}

#[derive(Subcommand)]
enum NetworkCmd {
    Create {
        name: String,
        /// Its owner (default: the user `init` made).
        #[arg(long)]
        owner: Option<String>,
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
    /// Every device of a network, from the state directory.
    List {
        #[arg(long)]
        network: String,
        #[command(flatten)]
        dir: StateDir,
    },
    #[command(flatten)]
    Remote(remote::RemoteDeviceCmd),
    /// Give a device exactly these tags (declared in the policy; none to
    /// clear them). Admins, or the device's owner if they own the tags.
    Tag {
        #[command(flatten)]
        net: remote::Net,
        id: i64,
        tags: Vec<String>,
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
        Command::Init { dir, username } => {
            let store = Store::open(&dir.state_dir).await?;
            let token = store.init_as(&username, unix_now()).await?;
            let identity = store.identity().await?;
            eprintln!(
                "coordinator initialised in {}; its key (for `meshd up --coordinator-key`): {}",
                dir.state_dir.display(),
                identity.public()
            );
            eprintln!("API token of {username} (shown once):");
            println!("{token}");
        }
        Command::Key { dir } => {
            let store = Store::open(&dir.state_dir).await?;
            anyhow::ensure!(
                store.is_initialized().await?,
                "{} is not initialised: run `coordinator init` first",
                dir.state_dir.display()
            );
            println!("{}", store.identity().await?.public());
        }
        Command::Serve {
            dir,
            listen,
            relay_map,
            tls_cert,
            tls_key,
            insecure_http,
            address_quarantine,
            base_domain,
        } => {
            let relay_map = match relay_map {
                Some(path) => coordinator::load_relay_map(&path)?,
                None => Default::default(),
            };
            // clap makes the two TLS flags come together or not at all.
            let transport = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => coordinator::Transport::Tls { cert, key },
                _ => coordinator::Transport::Http {
                    insecure: insecure_http,
                },
            };
            let options = coordinator::ServeOptions {
                store: coordinator::store::StoreOptions {
                    address_quarantine,
                    ..Default::default()
                },
                base_domain: if base_domain == "off" {
                    String::new()
                } else {
                    base_domain
                },
            };
            coordinator::serve(&dir.state_dir, listen, relay_map, transport, &options).await?
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
        Command::Network(NetworkCmd::Create { name, owner, dir }) => {
            let store = open(&dir).await?;
            let owner = match owner {
                Some(u) => store
                    .user_by_name(&u)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("no user named {u:?}"))?,
                None => store.first_user().await?,
            };
            print_json(&store.create_network(&name, &owner, unix_now()).await?)?
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
                tags: Vec::new(),
            };
            // Operator keys are the network owner's: their devices are the owner's.
            let store = open(&dir).await?;
            let net = store.network(&network).await?;
            let owner = store.network_owner(net.id).await?;
            let created = store
                .create_preauth_key(net.id, &owner, &req, unix_now())
                .await?;
            println!("{}", created.key);
        }
        Command::PreauthKey(PreauthCmd::List { network, dir }) => {
            let store = open(&dir).await?;
            let net = store.network(&network).await?;
            print_json(&store.list_preauth_keys(net.id, None).await?)?
        }
        Command::PreauthKey(PreauthCmd::Revoke { network, id, dir }) => {
            let store = open(&dir).await?;
            let net = store.network(&network).await?;
            let who = store.network_owner(net.id).await?.who();
            print_json(
                &store
                    .revoke_preauth_key(&who, net.id, id, None, unix_now())
                    .await?,
            )?
        }
        Command::Device(DeviceCmd::List { network, dir }) => {
            let store = open(&dir).await?;
            let net = store.network(&network).await?;
            // Presence lives in the running server; here `online` is left false.
            let devices = store
                .network_devices(net.id)
                .await?
                .iter()
                .map(|r| r.to_info(false, unix_now()))
                .collect::<Result<Vec<_>, _>>()?;
            print_json(&devices)?
        }
        Command::Device(DeviceCmd::Remote(cmd)) => remote::device(cmd).await?,
        Command::Device(DeviceCmd::Tag { net, id, tags }) => policy_cli::tag(net, id, tags).await?,
        Command::Policy(cmd) => policy_cli::policy(cmd).await?,
        Command::Dns(cmd) => policy_cli::dns(cmd).await?,
        Command::User(UserCmd::Token { username, dir }) => {
            println!(
                "{}",
                open(&dir)
                    .await?
                    .create_user_token(&username, unix_now())
                    .await?
            );
        }
        Command::Login {
            url,
            token,
            ca_file,
        } => remote::login(url, token, ca_file).await?,
        Command::Whoami { out } => remote::whoami(out).await?,
        Command::Member(cmd) => remote::member(cmd).await?,
        Command::Invite(cmd) => remote::invite(cmd).await?,
        Command::Settings(cmd) => remote::settings(cmd).await?,
        Command::Audit(cmd) => remote::audit(cmd).await?,
        Command::Compute(cmd) => remote::compute(cmd).await?,
        Command::Ledger(cmd) => remote::ledger(cmd).await?,
        Command::Denylist(cmd) => remote::denylist(cmd).await?,
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
