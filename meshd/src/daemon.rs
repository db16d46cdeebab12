//! The daemon: owns the keys, the session with the coordinator and the
//! engine, and answers the local API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use platform::capability::Capabilities;
use platform::keys::CoordinatorPublic;
use platform::netmap::{NetMap, NodeKind};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use crate::contribute::ComputeSettings;
use crate::control::{self, MapState};
use crate::dns::service::DnsService;
use crate::engine::{Engine, EngineSlot, PeerStats, PingPath, PingReply, TunConfig, UdpPort};
use crate::firewall::{Firewall, NftCommand};
use crate::gateway::{joblog, Gateway, SessionView};
use crate::keyring::{self, KeyRing};
use crate::localapi::{
    BackendState, ComputeAction, ComputeChanges, ComputeStatus, NetcheckReport, PairingInfo,
    PeerStatus, PingReport, RelayLatency, Request, Response, SelfStatus, Status, StunResult, WhoIs,
};
use crate::netcheck;
use crate::pairing::{self, Pairing};
use crate::receipts::{self, ReceiptQueue};
use crate::serve_compute::{self, ComputeService, TicketAdmission};
use crate::state::{Prefs, StateDir};
use crate::sysinfo::Probe;
use crate::tickets::SeenTickets;

/// How long `meshd up` waits for the first netmap.
const UP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one `meshd ping` waits for its answer, and the gap between pings.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
const PING_SPACING: Duration = Duration::from_millis(200);
/// How long netcheck waits for STUN answers.
const STUN_WAIT: Duration = Duration::from_millis(1500);

pub struct DaemonConfig {
    pub state_dir: PathBuf,
    pub tun: TunConfig,
    pub udp_port: u16,
    pub compute: ComputeConfig,
    /// Where `/proc` and `/sys` are read for the capability report.
    pub sys_root: PathBuf,
    /// Where the gateway (the network's OpenAI endpoint for local apps)
    /// listens; None: not served.
    pub gateway: Option<SocketAddr>,
    /// How MagicDNS handles the OS resolver.
    pub dns: crate::dns::OsDns,
}

pub struct ComputeConfig {
    /// Where `meshd models fetch` put the models.
    pub models_dir: PathBuf,
    /// `daemon --compute`: enable compute at start with these changes, as
    /// `meshd compute enable` would (kept in `compute.json`).
    pub enable: Option<ComputeChanges>,
}

/// Temperature steps of the capability report, in °C.
const THERMAL_STEP: i32 = 5;
/// How often power, heat and load are read and the policy applied.
const MONITOR_INTERVAL: Duration = Duration::from_secs(5);

/// A joined network: the map stream and the engine it feeds.
struct Session {
    coordinator: String,
    engine: Arc<EngineSlot>,
    map: watch::Receiver<MapState>,
    task: JoinHandle<()>,
    /// Renews the node key when due ([`keyring::keep_renewed`]).
    renewal: JoinHandle<()>,
    /// Delivers job receipts to this session's coordinator.
    receipts: JoinHandle<()>,
    compute: Option<ServeTask>,
    /// Keeps the firewall table in step with the engine's addresses.
    firewall_guard: JoinHandle<()>,
    firewall: Arc<Firewall>,
    /// Keeps MagicDNS in step with the netmap.
    dns_guard: JoinHandle<()>,
    dns: Arc<DnsService>,
}

/// A running compute API.
struct ServeTask {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

/// How long a stopping compute API lets its requests finish.
const SERVE_DRAIN: Duration = Duration::from_secs(5);

impl ServeTask {
    /// Stops accepting, closes idle connections, lets requests in flight
    /// finish for a while, then cuts the rest.
    async fn stop(mut self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(SERVE_DRAIN, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
            let _ = self.task.await;
        }
    }
}

impl Session {
    async fn stop(self) {
        if let Some(c) = self.compute {
            c.stop().await;
        }
        self.renewal.abort();
        self.receipts.abort();
        self.task.abort();
        let _ = self.task.await;
        self.firewall_guard.abort();
        let _ = self.firewall_guard.await;
        self.dns_guard.abort();
        let _ = self.dns_guard.await;
        // The OS resolver gets its settings back while the names still work.
        self.dns.stop().await;
        self.engine.stop().await;
        // After the TUN is gone, so its addresses are never unguarded.
        self.firewall.remove().await;
    }
}

pub struct Daemon {
    cfg: DaemonConfig,
    state: StateDir,
    keys: Arc<KeyRing>,
    session: Mutex<Option<Session>>,
    /// A device-code pairing (`meshd up` without a key), kept after it ends
    /// so a late `WaitPairing` learns how it went.
    pairing: std::sync::Mutex<Option<Pairing>>,
    /// Models loaded once, served in every session.
    compute: Arc<ComputeService>,
    probe: Probe,
    /// The latest capability report, sent in heartbeats when it changes.
    caps: watch::Sender<Capabilities>,
    /// Percent of the CPU busy with everything but this daemon, over the
    /// last monitor interval.
    others_busy: std::sync::Mutex<Option<f32>>,
    refreshing: Mutex<()>,
    /// Receipts of jobs run here, until the coordinator has them.
    receipts: Arc<ReceiptQueue>,
    /// Tickets of jobs run here, against replay.
    seen_tickets: Arc<std::sync::Mutex<SeenTickets>>,
    gateway: Arc<Gateway>,
    /// The joined session as the gateway sees it; None while down.
    gateway_view: watch::Sender<Option<SessionView>>,
    /// Drops packets for the overlay addresses that bypass the tunnel.
    firewall: Arc<Firewall>,
    /// MagicDNS for the joined network.
    dns: Arc<DnsService>,
}

/// A relay region's short name, for people.
fn region_code(netmap: &NetMap, region: u32) -> String {
    netmap
        .relay_map
        .regions
        .iter()
        .find(|r| r.id == region)
        .map_or_else(|| region.to_string(), |r| r.code.clone())
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "device".into())
}

impl Daemon {
    pub async fn new(cfg: DaemonConfig) -> anyhow::Result<Arc<Self>> {
        let state = StateDir::open(&cfg.state_dir)?;
        let cfg_dns = cfg.dns.clone();
        let host_tun = cfg.tun.host_managed();
        let keys = Arc::new(KeyRing::new(state.clone(), state.keys()?));
        // A compute.json this version cannot read must not take the network
        // down with it: compute stays off until it is fixed or rewritten.
        let mut settings = state.compute_settings().unwrap_or_else(|e| {
            tracing::error!(
                error = format!("{e:#}"),
                "compute settings unreadable; compute off"
            );
            Default::default()
        });
        if let Some(changes) = &cfg.compute.enable {
            settings.enabled = true;
            changes.apply(&mut settings);
            state.save_compute_settings(&settings)?;
        }
        let probe = Probe::new(&cfg.sys_root).await;
        let caps = probe.read_capabilities().await;
        let compute = Arc::new(ComputeService::new(
            cfg.compute.models_dir.clone(),
            settings,
        ));
        compute::llama::set_threads(compute.threads_per_job(&caps));
        let receipts = Arc::new(ReceiptQueue::open(&cfg.state_dir.join(receipts::DIR))?);
        let (gateway_view, view) = watch::channel(None);
        let gateway = Gateway::new(view, keys.clone())?;
        Ok(Arc::new(Daemon {
            cfg,
            state,
            keys,
            session: Mutex::new(None),
            pairing: std::sync::Mutex::new(None),
            compute,
            probe,
            caps: watch::channel(caps).0,
            others_busy: std::sync::Mutex::new(None),
            refreshing: Mutex::new(()),
            receipts,
            seen_tickets: Arc::default(),
            gateway,
            gateway_view,
            firewall: if host_tun {
                Firewall::host_owned()
            } else {
                Firewall::new(Arc::new(NftCommand::default()))
            },
            dns: DnsService::new(cfg_dns),
        }))
    }

    /// Loads the models when compute is enabled and starts watching power,
    /// heat and load.
    pub async fn start_compute(self: &Arc<Self>) {
        if self.compute.settings().enabled {
            if let Err(e) = self.compute.ensure_loaded().await {
                tracing::error!(
                    error = format!("{e:#}"),
                    "compute enabled but no model can be served"
                );
            }
        }
        self.refresh().await;
        let daemon = self.clone();
        tokio::spawn(async move {
            let mut last = daemon.probe.read_cpu_times().await;
            loop {
                tokio::time::sleep(MONITOR_INTERVAL).await;
                let now = daemon.probe.read_cpu_times().await;
                let busy = now.zip(last).and_then(|(n, l)| n.others_busy_since(&l));
                *daemon.others_busy.lock().expect("cpu lock") = busy;
                last = now;
                daemon.refresh().await;
            }
        });
    }

    /// Reads the hardware, applies the policy, and publishes the report.
    async fn refresh(&self) {
        // One at a time: a stale reading must not undo a newer decision.
        let _one = self.refreshing.lock().await;
        let mut caps = self.probe.read_capabilities().await;
        let busy = *self.others_busy.lock().expect("cpu lock");
        let _ = self.compute.decide(&caps, busy);
        caps.compute = self.compute.offer(&caps);
        // Reported in 5 °C steps: peers need the trend, not every flicker.
        if let Some(t) = caps.thermal.as_mut() {
            t.celsius -= t.celsius.rem_euclid(THERMAL_STEP);
        }
        self.caps.send_if_modified(|c| {
            let changed = *c != caps;
            *c = caps;
            changed
        });
    }

    /// Serves the loaded models in a session's network.
    fn spawn_serve(&self, map: watch::Receiver<MapState>) -> Option<ServeTask> {
        let loaded = self.compute.loaded()?;
        let caps = self.caps.borrow().clone();
        let models = loaded.models.clone();
        let (slots, queue) = (self.compute.slots(&caps), self.compute.queue());
        let admission = Arc::new(TicketAdmission::new(
            map.clone(),
            self.keys.current().device.clone(),
            self.caps.subscribe(),
            self.seen_tickets.clone(),
            self.receipts.clone(),
        ));
        let (stop, stopped) = watch::channel(false);
        let service = self.compute.clone();
        let tun = self.cfg.tun.name.clone();
        let task = tokio::spawn(async move {
            let served =
                serve_compute::serve(tun, service, models, admission, map, slots, queue, stopped);
            if let Err(e) = served.await {
                tracing::error!(error = format!("{e:#}"), "compute API stopped");
            }
        });
        Some(ServeTask { task, stop })
    }

    async fn compute_command(&self, action: ComputeAction) -> anyhow::Result<ComputeStatus> {
        match action {
            ComputeAction::Status => {}
            ComputeAction::Disable => {
                self.change_settings(|s| s.enabled = false)?;
                self.refresh().await;
            }
            ComputeAction::Enable { changes } => {
                let (before, settings) = self.change_settings(|s| {
                    s.enabled = true;
                    changes.apply(s);
                })?;
                if settings.models != before.models {
                    self.compute.unload();
                }
                let caps = self.caps.borrow().clone();
                compute::llama::set_threads(self.compute.threads_per_job(&caps));
                let loaded = self.compute.ensure_loaded().await;
                if loaded.is_ok() && (settings != before || !self.is_serving().await) {
                    self.restart_serving().await;
                }
                self.refresh().await;
                loaded?;
            }
        }
        Ok(self.compute_status().await)
    }

    /// Changes the compute settings, on disk first; returns them before and
    /// after.
    fn change_settings(
        &self,
        change: impl FnOnce(&mut ComputeSettings),
    ) -> anyhow::Result<(ComputeSettings, ComputeSettings)> {
        let before = self.compute.settings();
        let mut after = before.clone();
        change(&mut after);
        self.state.save_compute_settings(&after)?;
        self.compute.set_settings(after.clone());
        Ok((before, after))
    }

    async fn is_serving(&self) -> bool {
        let session = self.session.lock().await;
        session
            .as_ref()
            .and_then(|s| s.compute.as_ref())
            .is_some_and(|t| !t.task.is_finished())
    }

    /// (Re)starts the compute API of the running session, so new models,
    /// slots or queue take effect.
    async fn restart_serving(&self) {
        let mut session = self.session.lock().await;
        if let Some(s) = session.as_mut() {
            if let Some(old) = s.compute.take() {
                old.stop().await;
            }
            s.compute = self.spawn_serve(s.map.clone());
        }
    }

    async fn compute_status(&self) -> ComputeStatus {
        let caps = self.caps.borrow().clone();
        let decision = self.compute.decision();
        let loaded = self.compute.loaded();
        let mut urls = Vec::new();
        if loaded.is_some() {
            if let Some(s) = self.session.lock().await.as_ref() {
                if let Some(m) = &s.map.borrow().netmap {
                    urls = m
                        .self_node
                        .addresses
                        .iter()
                        .map(|ip| {
                            format!(
                                "http://{}/v1",
                                SocketAddr::new(*ip, serve_compute::COMPUTE_PORT)
                            )
                        })
                        .collect();
                }
            }
        }
        ComputeStatus {
            settings: self.compute.settings(),
            serving: decision.is_ok(),
            reason: decision.err(),
            models: loaded.map(|l| l.offered.clone()).unwrap_or_default(),
            tier: caps.tier,
            slots: self.compute.slots(&caps),
            queue: self.compute.queue(),
            threads: usize::try_from(compute::llama::threads()).unwrap_or(1),
            urls,
        }
    }

    /// Rejoins the network the device was last up in.
    pub async fn resume(&self) -> anyhow::Result<()> {
        // A table left by a crash guards addresses that are gone.
        self.firewall.remove().await;
        // So are resolver settings pointing at a server that is gone.
        self.dns.repair().await;
        let prefs = self.state.prefs()?;
        if let (true, Some(coordinator)) = (prefs.wants_up, prefs.coordinator.clone()) {
            tracing::info!(%coordinator, "resuming");
            let pin = match prefs.coordinator_key {
                Some(pin) => pin,
                None => {
                    // State written before coordinators were pinned: pin
                    // the one that answers now, over TLS, once.
                    let http = control::coordinator_http(prefs.ca_file.as_deref())?;
                    let info = control::coordinator_info(&http, &coordinator, None).await?;
                    self.state.save_prefs(&Prefs {
                        coordinator_key: Some(info.coordinator_key),
                        ..prefs.clone()
                    })?;
                    info.coordinator_key
                }
            };
            let udp = self.bind_udp()?;
            *self.session.lock().await =
                Some(self.start_session(coordinator, prefs.ca_file, pin, udp));
        }
        Ok(())
    }

    /// The WireGuard port, bound before the device registers: peers send
    /// their first handshake as soon as the coordinator announces the device,
    /// and it waits in this socket until the engine is up.
    fn bind_udp(&self) -> anyhow::Result<Arc<UdpPort>> {
        Ok(Arc::new(UdpPort::bind(self.cfg.udp_port)?))
    }

    fn start_session(
        &self,
        coordinator: String,
        ca_file: Option<PathBuf>,
        pin: CoordinatorPublic,
        udp: Arc<UdpPort>,
    ) -> Session {
        let keys = self.keys.current();
        let engine = Arc::new(EngineSlot::new(
            keys.node.clone(),
            keys.disco.clone(),
            self.cfg.tun.clone(),
            udp,
        ));
        let (tx, rx) = watch::channel(MapState::default());
        let renewal = tokio::spawn(keyring::keep_renewed(
            self.keys.clone(),
            coordinator.clone(),
            ca_file.clone(),
            pin,
            rx.clone(),
        ));
        self.gateway_view.send_replace(Some(SessionView {
            map: rx.clone(),
            engine: engine.clone(),
            coordinator: coordinator.clone(),
            ca_file: ca_file.clone(),
        }));
        let receipts = tokio::spawn(receipts::deliver(
            self.receipts.clone(),
            coordinator.clone(),
            ca_file.clone(),
            rx.clone(),
        ));
        let task = tokio::spawn(control::run_map_stream(
            coordinator.clone(),
            ca_file,
            pin,
            self.keys.clone(),
            engine.clone(),
            tx,
            self.caps.subscribe(),
        ));
        let compute = self.spawn_serve(rx.clone());
        let firewall_guard = {
            let (firewall, engine) = (self.firewall.clone(), engine.clone());
            let changes = rx.clone();
            tokio::spawn(async move {
                firewall
                    .follow(changes.clone(), move || {
                        let e = engine.get()?;
                        // MagicDNS's addresses are guarded like the device's.
                        let mut guarded = e.addresses().to_vec();
                        if let Some(map) = &changes.borrow().netmap {
                            guarded.extend(crate::dns::service::service_addresses(map));
                        }
                        Some((e.tun_name().to_owned(), guarded))
                    })
                    .await;
            })
        };
        let dns_guard = {
            let (dns, engine, changes) = (self.dns.clone(), engine.clone(), rx.clone());
            tokio::spawn(async move { dns.follow(changes, engine).await })
        };
        Session {
            coordinator,
            engine,
            map: rx,
            task,
            renewal,
            receipts,
            compute,
            firewall_guard,
            firewall: self.firewall.clone(),
            dns_guard,
            dns: self.dns.clone(),
        }
    }

    pub async fn handle(self: &Arc<Self>, req: Request) -> Response {
        let result = match req {
            Request::Up {
                coordinator,
                ca_file,
                auth_key: Some(auth_key),
                hostname,
                coordinator_key,
            } => {
                // An explicit key supersedes a pairing in progress.
                self.cancel_pairing();
                self.up(
                    coordinator,
                    ca_file,
                    coordinator_key.map(|k| *k),
                    auth_key,
                    hostname,
                )
                .await
            }
            Request::Up {
                coordinator,
                ca_file,
                auth_key: None,
                hostname,
                coordinator_key,
            } => {
                return self
                    .pair(coordinator, ca_file, coordinator_key.map(|k| *k), hostname)
                    .await
                    .map_or_else(|e| Response::Error(format!("{e:#}")), Response::Pairing)
            }
            Request::WaitPairing => self.wait_pairing().await,
            Request::RotateKey => self.rotate_key().await,
            Request::Down => {
                self.cancel_pairing();
                self.down().await
            }
            Request::Status => Ok(()),
            Request::Ping { peer, count } => {
                return self
                    .ping(&peer, count)
                    .await
                    .map_or_else(|e| Response::Error(format!("{e:#}")), Response::Ping)
            }
            Request::WhoIs { address } => {
                return self.whois(address).await.map_or_else(
                    |e| Response::Error(format!("{e:#}")),
                    |w| Response::WhoIs(Box::new(w)),
                )
            }
            Request::Netcheck => {
                return self
                    .netcheck()
                    .await
                    .map_or_else(|e| Response::Error(format!("{e:#}")), Response::Netcheck)
            }
            Request::Jobs { id: Some(id), .. } => {
                return match self.gateway.jobs.find(&id) {
                    Some(job) => Response::Jobs(vec![job]),
                    None => Response::Error(format!(
                        "no recent job {id:?} (or the prefix is ambiguous)"
                    )),
                }
            }
            Request::Ledger => {
                return self
                    .gateway
                    .balance()
                    .await
                    .map_or_else(|e| Response::Error(format!("{e:#}")), Response::Ledger)
            }
            Request::Jobs { id: None, limit } => {
                return Response::Jobs(self.gateway.jobs.recent(limit.min(joblog::KEPT_JOBS)))
            }
            Request::Compute { action } => {
                return self.compute_command(action).await.map_or_else(
                    |e| Response::Error(format!("{e:#}")),
                    |s| Response::Compute(Box::new(s)),
                )
            }
        };
        match result {
            Ok(()) => Response::Ok(Box::new(self.status().await)),
            Err(e) => Response::Error(format!("{e:#}")),
        }
    }

    /// The running engine and the netmap it works from.
    async fn running(&self) -> anyhow::Result<(Arc<Engine>, NetMap)> {
        let session = self.session.lock().await;
        let s = session
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("not up: run `meshd up` first"))?;
        let netmap = s.map.borrow().netmap.clone();
        match (s.engine.get(), netmap) {
            (Some(e), Some(m)) => Ok((e, m)),
            _ => anyhow::bail!("still starting: no netmap from the coordinator yet"),
        }
    }

    async fn ping(&self, peer: &str, count: u32) -> anyhow::Result<PingReport> {
        let (engine, netmap) = self.running().await?;
        let target: Option<std::net::IpAddr> = peer.parse().ok();
        let node = netmap
            .peers
            .values()
            .find(|n| n.name == peer || target.is_some_and(|ip| n.addresses.contains(&ip)))
            .ok_or_else(|| anyhow::anyhow!("no peer {peer:?} in network {}", netmap.network))?;
        // Only a weak hold between pings: `down` (or a restart) must not
        // wait for a long `ping -c N` whose CLI may be long gone. (Dropped,
        // not shadowed: a shadowed `Arc` lives to the end of the scope.)
        let weak = Arc::downgrade(&engine);
        drop(engine);
        let engine = weak;
        let mut replies = Vec::new();
        for i in 0..count.max(1) {
            if i > 0 {
                tokio::time::sleep(PING_SPACING).await;
            }
            let pending = match engine.upgrade() {
                Some(e) => e.ping(&node.node_key).await?,
                None => anyhow::bail!("the engine stopped (`meshd down` or a restart)"),
            };
            let reply = pending.wait(PING_TIMEOUT).await;
            let direct = matches!(
                reply,
                Some(PingReply {
                    path: PingPath::Direct { .. },
                    ..
                })
            );
            replies.push(reply);
            if direct {
                break;
            }
        }
        Ok(PingReport {
            peer: node.name.clone(),
            address: node.addresses.first().copied(),
            replies,
            regions: netmap
                .relay_map
                .regions
                .iter()
                .map(|r| (r.id, r.code.clone()))
                .collect(),
        })
    }

    async fn netcheck(&self) -> anyhow::Result<NetcheckReport> {
        let (engine, netmap) = self.running().await?;
        let servers = netcheck::stun_servers(&netmap.relay_map).await;
        let stun = engine.stun_report(&servers, STUN_WAIT).await;
        let mapped: Vec<SocketAddr> = stun.iter().filter_map(|(_, m)| *m).collect();
        let mapping_varies_by_destination =
            (mapped.len() >= 2).then(|| mapped.iter().any(|m| *m != mapped[0]));
        let relays = netcheck::relay_latencies(&netmap.relay_map)
            .await
            .into_iter()
            .map(|(region, rtt)| RelayLatency {
                region,
                code: region_code(&netmap, region),
                latency_ms: rtt.map(|d| d.as_secs_f64() * 1000.0),
            })
            .collect();
        Ok(NetcheckReport {
            udp: !mapped.is_empty(),
            public_endpoint: mapped.first().copied(),
            mapping_varies_by_destination,
            stun: stun
                .into_iter()
                .map(|(server, mapped)| StunResult { server, mapped })
                .collect(),
            relays,
            home_region: engine.home_region().map(|r| region_code(&netmap, r)),
        })
    }

    async fn up(
        &self,
        coordinator: String,
        ca_file: Option<PathBuf>,
        coordinator_key: Option<CoordinatorPublic>,
        auth_key: String,
        hostname: Option<String>,
    ) -> anyhow::Result<()> {
        let prefs = self.state.prefs()?;
        // The key given, else the one pinned for this coordinator before;
        // checked before anything is torn down, so `up` to a coordinator
        // this device does not trust leaves it as it was.
        let pin = coordinator_key.or(prefs
            .coordinator_key
            .filter(|_| prefs.coordinator.as_deref() == Some(coordinator.as_str())));
        // One client for the checks and the registration.
        let http = control::coordinator_http(ca_file.as_deref())?;
        let info = control::coordinator_info(&http, &coordinator, pin.as_ref())
            .await
            .map_err(|e| control::explain_certificate(e, ca_file.as_deref()))?;
        let mut session = self.session.lock().await;
        if let Some(old) = session.take() {
            self.gateway_view.send_replace(None);
            old.stop().await;
        }
        let hostname = hostname.or(prefs.hostname).unwrap_or_else(system_hostname);
        let caps = self.caps.borrow().clone();
        let udp = self.bind_udp()?;
        let pin = info.coordinator_key;
        let reg = control::register(
            &http,
            &coordinator,
            &info,
            &self.keys.current(),
            &auth_key,
            &hostname,
            caps,
        )
        .await
        .map_err(|e| control::explain_certificate(e, ca_file.as_deref()))?;
        tracing::info!(name = %reg.name, network = %reg.network, addresses = ?reg.addresses, "registered");
        if let Err(e) = self.keys.registered(platform::unix_now()) {
            tracing::warn!(
                error = format!("{e:#}"),
                "noting when the node key was registered"
            );
        }
        self.state.save_prefs(&Prefs {
            coordinator: Some(coordinator.clone()),
            ca_file: ca_file.clone(),
            coordinator_key: Some(pin),
            hostname: Some(hostname),
            wants_up: true,
        })?;
        let new = self.start_session(coordinator, ca_file, pin, udp);
        let mut map = new.map.clone();
        *session = Some(new);
        drop(session);
        let ready = tokio::time::timeout(
            UP_TIMEOUT,
            map.wait_for(|m| m.netmap.is_some() || m.last_error.is_some()),
        )
        .await;
        match ready {
            Err(_) => anyhow::bail!("registered, but no netmap from the coordinator within {UP_TIMEOUT:?}; still trying"),
            Ok(Err(_)) => anyhow::bail!("map stream stopped"),
            Ok(Ok(m)) => match (&m.netmap, &m.last_error) {
                (None, Some(e)) => anyhow::bail!("registered, but the map stream failed: {e}; still trying"),
                _ => Ok(()),
            },
        }
    }

    /// `meshd up` without a key: starts device-code pairing, or returns the
    /// one still waiting for the same coordinator and name.
    async fn pair(
        self: &Arc<Self>,
        coordinator: String,
        ca_file: Option<PathBuf>,
        coordinator_key: Option<CoordinatorPublic>,
        hostname: Option<String>,
    ) -> anyhow::Result<PairingInfo> {
        let prefs = self.state.prefs()?;
        let hostname = hostname.or(prefs.hostname).unwrap_or_else(system_hostname);
        if let Some(p) = self
            .pairing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            if p.is_live() && p.info.coordinator == coordinator && p.info.hostname == hostname {
                return Ok(p.info.clone());
            }
        }
        let http = control::coordinator_http(ca_file.as_deref())?;
        let (daemon, c, h, ca) = (
            self.clone(),
            coordinator.clone(),
            hostname.clone(),
            ca_file.clone(),
        );
        let register = move |auth_key| async move {
            daemon.up(c, ca, coordinator_key, auth_key, Some(h)).await
        };
        let device = self.keys.current().device.clone();
        let pairing = Pairing::start(http, coordinator, device, hostname, register)
            .await
            .map_err(|e| control::explain_certificate(e, ca_file.as_deref()))?;
        let info = pairing.info.clone();
        // Replacing an older pairing cancels it.
        *self.pairing.lock().unwrap_or_else(|p| p.into_inner()) = Some(pairing);
        Ok(info)
    }

    fn cancel_pairing(&self) {
        let old = self
            .pairing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(old);
    }

    fn live_pairing(&self) -> Option<PairingInfo> {
        let pairing = self.pairing.lock().unwrap_or_else(|p| p.into_inner());
        pairing
            .as_ref()
            .filter(|p| p.is_live())
            .map(|p| p.info.clone())
    }

    async fn wait_pairing(&self) -> anyhow::Result<()> {
        let state = self
            .pairing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Pairing::subscribe)
            .ok_or_else(|| {
                anyhow::anyhow!("no pairing in progress (run `meshd up` without --auth-key)")
            })?;
        pairing::wait(state).await
    }

    /// `meshd rotate-key`: a new node key, now.
    async fn rotate_key(&self) -> anyhow::Result<()> {
        let coordinator = self
            .session
            .lock()
            .await
            .as_ref()
            .map(|s| s.coordinator.clone())
            .ok_or_else(|| anyhow::anyhow!("not up: run `meshd up` first"))?;
        let prefs = self.state.prefs()?;
        let pin = prefs
            .coordinator_key
            .ok_or_else(|| anyhow::anyhow!("no coordinator key pinned: run `meshd up` again"))?;
        self.keys
            .rotate_at(&coordinator, prefs.ca_file.as_deref(), &pin)
            .await?;
        Ok(())
    }

    async fn down(&self) -> anyhow::Result<()> {
        self.gateway_view.send_replace(None);
        if let Some(s) = self.session.lock().await.take() {
            s.stop().await;
        }
        let mut prefs = self.state.prefs()?;
        prefs.wants_up = false;
        self.state.save_prefs(&prefs)
    }

    /// Who holds `address`, from the current netmap.
    async fn whois(&self, address: std::net::IpAddr) -> anyhow::Result<WhoIs> {
        let session = self.session.lock().await;
        let s = session.as_ref().ok_or_else(|| anyhow::anyhow!("not up"))?;
        let map = s.map.borrow();
        let netmap = map
            .netmap
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no netmap yet"))?;
        let node = netmap.node_by_address(address).ok_or_else(|| {
            anyhow::anyhow!("no device of network {} has {address}", netmap.network)
        })?;
        Ok(WhoIs {
            name: node.name.clone(),
            network: netmap.network.clone(),
            fqdn: netmap
                .dns
                .zone(&netmap.network)
                .map(|z| format!("{}.{z}", node.name)),
            addresses: node.addresses.clone(),
            kind: match node.kind {
                NodeKind::Mesh => "meshd".into(),
                NodeKind::Wireguard => "wireguard".into(),
            },
            owner: node.owner.clone(),
            role: node.owner_role,
            tags: node.tags.clone(),
            this_device: node.node_key == netmap.self_node.node_key,
        })
    }

    pub async fn status(&self) -> Status {
        let dns = self.dns.status().await;
        let session = self.session.lock().await;
        let mut status = Status {
            dns,
            backend: BackendState::Stopped,
            coordinator: None,
            coordinator_connected: false,
            self_: None,
            peers: Vec::new(),
            counters: Default::default(),
            pairing: self.live_pairing(),
            offloads: None,
        };
        let Some(s) = session.as_ref() else {
            return status;
        };
        status.coordinator = Some(s.coordinator.clone());
        let map = s.map.borrow();
        status.coordinator_connected = map.connected;
        let engine = s.engine.get();
        let (Some(netmap), Some(engine)) = (&map.netmap, engine) else {
            status.backend = BackendState::Starting;
            return status;
        };
        status.backend = BackendState::Running;
        status.counters = engine.counters();
        status.offloads = Some(engine.offloads());
        let now = platform::unix_now();
        // The key in use: the netmap may not show a rotation yet.
        let node_key = self.keys.current().node.public();
        status.self_ = Some(SelfStatus {
            name: netmap.self_node.name.clone(),
            network: netmap.network.clone(),
            node_key: node_key.to_string(),
            owner: netmap.self_node.owner.clone(),
            key_expiry: self.keys.expiry(&map),
            awaiting_approval: netmap.awaiting_approval,
            addresses: netmap.self_node.addresses.clone(),
            tun: engine.tun_name().to_owned(),
            udp_port: engine.udp_port(),
            home_region: engine.home_region().map(|r| region_code(netmap, r)),
            home_relay_connected: engine.home_region().is_some_and(|r| engine.relay_up(r)),
            public_endpoint: engine.public_endpoint(),
            capabilities: self.caps.borrow().clone(),
            firewall_warning: self.firewall.warning(),
        });
        status.peers = netmap
            .peers
            .values()
            .map(|p| {
                let stats = engine.peer_stats(&p.node_key);
                let path = match stats.as_ref() {
                    Some(PeerStats {
                        endpoint: Some(ep),
                        direct: true,
                        ..
                    }) => format!("direct {ep}"),
                    Some(PeerStats { relay: Some(r), .. }) => {
                        format!("relay {}", region_code(netmap, *r))
                    }
                    Some(PeerStats {
                        endpoint: Some(ep), ..
                    }) => format!("trying {ep}"),
                    _ => "none".to_owned(),
                };
                PeerStatus {
                    name: p.name.clone(),
                    kind: match p.kind {
                        NodeKind::Mesh => "meshd".into(),
                        NodeKind::Wireguard => "wireguard".into(),
                    },
                    node_key: p.node_key.to_string(),
                    addresses: p.addresses.clone(),
                    online: p.online,
                    path,
                    endpoint: stats.as_ref().and_then(|s| s.endpoint),
                    last_handshake_secs_ago: stats.as_ref().and_then(|s| s.last_handshake_secs_ago),
                    rx_bytes: stats.as_ref().map_or(0, |s| s.rx_bytes),
                    tx_bytes: stats.as_ref().map_or(0, |s| s.tx_bytes),
                    tier: p.capabilities.as_ref().map(|c| c.tier),
                    compute: p
                        .capabilities
                        .as_ref()
                        .and_then(|c| c.compute.as_ref())
                        .map(|o| match &o.reason {
                            None if o.serving => "serving".to_owned(),
                            reason => format!("paused: {}", reason.as_deref().unwrap_or("unknown")),
                        }),
                    owner: p.owner.clone(),
                    key_expiry: p.key_expiry,
                    key_expired: p.key_expired(now),
                }
            })
            .collect();
        status
    }

    /// The network's OpenAI endpoint for local apps.
    pub fn gateway(&self) -> Arc<Gateway> {
        self.gateway.clone()
    }

    pub async fn shutdown(&self) {
        self.gateway_view.send_replace(None);
        if let Some(s) = self.session.lock().await.take() {
            s.stop().await;
        }
    }
}
