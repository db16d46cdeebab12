//! Serving compute on this device's overlay addresses only: the OpenAI-
//! compatible API of the `compute` crate, reachable from peers through the
//! tunnel, with callers named from the netmap. Two layers keep strangers
//! out: the listeners are bound to the TUN device (a packet for the overlay
//! address that arrives on the LAN finds no socket, whatever the
//! [`firewall`](crate::firewall) table does), and a caller whose source
//! address is not this device's or a peer's in the current netmap gets 403
//! `not_a_peer` before anything else is done. Every job needs a ticket
//! ([`tickets`](crate::tickets)) and leaves a signed receipt
//! ([`receipts`](crate::receipts)). The service holds the owner's settings,
//! the loaded models and the policy's latest decision.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse as _, Response};
use axum::{Json, Router};
use compute::admission::{self, Admission, AdmittedJob, JobOutcome, Refusal};
use compute::manifest::{verified_path, ModelKind, MANIFEST};
use compute::server::{ComputeServer, Gate, Models};
use compute::{EmbedBatcher, Embedder, Generator};
use platform::capability::{Capabilities, ComputeOffer, OfferedModel, MAX_TEXT};
use platform::keys::DevicePrivate;
use platform::netmap::NetMap;
use tokio::sync::watch;

use crate::contribute::{self, ComputeSettings};
use crate::control::MapState;
use crate::receipts::{self, ReceiptQueue};
use crate::tickets::{self, Checked, Expected, SeenTickets};

/// Port of the compute API on overlay addresses.
pub const COMPUTE_PORT: u16 = 8421;
/// Context of a chat job, in tokens.
const CHAT_CONTEXT: u32 = 2048;

/// Models loaded for serving, and what they are.
pub struct Loaded {
    pub models: Models,
    pub offered: Vec<OfferedModel>,
}

/// Loads the manifest models named in `wanted` (all when empty) that are
/// present and intact in `dir`; others are skipped with a warning: a device
/// serves what it has.
pub fn load(dir: &Path, wanted: &[String]) -> anyhow::Result<Loaded> {
    for name in wanted {
        anyhow::ensure!(
            MANIFEST.iter().any(|m| m.name == name),
            "no model {name:?} in the manifest (known: {})",
            MANIFEST
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut models = Models {
        embedder: None,
        generator: None,
    };
    let mut offered = Vec::new();
    for spec in MANIFEST
        .iter()
        .filter(|m| wanted.is_empty() || wanted.iter().any(|w| w == m.name))
    {
        let path = match verified_path(dir, spec) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(model = spec.name, error = %e, "not serving this model");
                continue;
            }
        };
        let kind = match spec.kind {
            ModelKind::Embedding => {
                let embedder = Arc::new(Embedder::load(&path)?);
                models.embedder = Some((
                    spec.name.to_owned(),
                    Arc::new(EmbedBatcher::start(embedder)?),
                ));
                "embedding"
            }
            ModelKind::Chat => {
                models.generator = Some((
                    spec.name.to_owned(),
                    Arc::new(Generator::load(&path, CHAT_CONTEXT)?),
                ));
                "chat"
            }
        };
        offered.push(OfferedModel {
            name: spec.name.to_owned(),
            kind: kind.to_owned(),
            sha256: spec.sha256.to_owned(),
        });
        tracing::info!(model = spec.name, "model loaded");
    }
    anyhow::ensure!(
        !offered.is_empty(),
        "no model to serve in {} (run `meshd models fetch`)",
        dir.display()
    );
    Ok(Loaded { models, offered })
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max.saturating_sub('…'.len_utf8());
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// The device's compute service.
pub struct ComputeService {
    models_dir: PathBuf,
    settings: Mutex<ComputeSettings>,
    loaded: Mutex<Option<Arc<Loaded>>>,
    /// Why loading failed, while no models are loaded.
    load_error: Mutex<Option<String>>,
    /// The policy's latest decision: serve, or the reason not to.
    decision: watch::Sender<Result<(), String>>,
    /// The API serving now, for the load in capability reports.
    server: Mutex<std::sync::Weak<ComputeServer>>,
}

impl ComputeService {
    pub fn new(models_dir: PathBuf, settings: ComputeSettings) -> Self {
        ComputeService {
            models_dir,
            settings: Mutex::new(settings),
            loaded: Mutex::new(None),
            load_error: Mutex::new(None),
            decision: watch::channel(Err("starting".into())).0,
            server: Mutex::new(std::sync::Weak::new()),
        }
    }

    pub fn settings(&self) -> ComputeSettings {
        self.settings.lock().expect("settings lock").clone()
    }

    pub fn set_settings(&self, settings: ComputeSettings) {
        *self.settings.lock().expect("settings lock") = settings;
    }

    /// Forgets the loaded models (jobs running keep theirs until done).
    pub fn unload(&self) {
        *self.loaded.lock().expect("models lock") = None;
    }

    pub fn loaded(&self) -> Option<Arc<Loaded>> {
        self.loaded.lock().expect("models lock").clone()
    }

    /// Loads the configured models unless they are loaded already.
    pub async fn ensure_loaded(&self) -> anyhow::Result<Arc<Loaded>> {
        if let Some(l) = self.loaded() {
            return Ok(l);
        }
        let (dir, wanted) = (self.models_dir.clone(), self.settings().models);
        let result = tokio::task::spawn_blocking(move || load(&dir, &wanted)).await?;
        match result {
            Ok(l) => {
                let l = Arc::new(l);
                *self.loaded.lock().expect("models lock") = Some(l.clone());
                *self.load_error.lock().expect("models lock") = None;
                Ok(l)
            }
            Err(e) => {
                *self.load_error.lock().expect("models lock") = Some(format!("{e:#}"));
                Err(e)
            }
        }
    }

    pub fn decision(&self) -> Result<(), String> {
        self.decision.borrow().clone()
    }

    /// Applies the policy to fresh readings; returns the new decision.
    /// Serving also needs the models loaded.
    pub fn decide(&self, caps: &Capabilities, others_busy: Option<f32>) -> Result<(), String> {
        let serving = self.decision().is_ok();
        let decision =
            contribute::decide(&self.settings(), caps, others_busy, serving).and_then(|()| {
                match self.loaded() {
                    Some(_) => Ok(()),
                    None => Err(match self.load_error.lock().expect("models lock").clone() {
                        Some(e) => format!("models unavailable: {e}"),
                        None => "loading models".into(),
                    }),
                }
            });
        self.decision.send_if_modified(|d| {
            if *d == decision {
                return false;
            }
            match &decision {
                Ok(()) => tracing::info!("contributing compute"),
                Err(reason) => tracing::info!(%reason, "not contributing compute"),
            }
            *d = decision.clone();
            true
        });
        decision
    }

    /// What the API consults before every job.
    pub fn gate(&self) -> Gate {
        let rx = self.decision.subscribe();
        Arc::new(move || rx.borrow().clone())
    }

    pub fn slots(&self, caps: &Capabilities) -> usize {
        self.settings()
            .slots
            .unwrap_or_else(|| contribute::default_slots(caps.tier, caps.cpu_cores))
    }

    pub fn queue(&self) -> usize {
        self.settings().queue.unwrap_or(contribute::DEFAULT_QUEUE)
    }

    /// llama.cpp threads of one job: the policy's share of the cores,
    /// divided among the slots (the build is CPU-only).
    pub fn threads_per_job(&self, caps: &Capabilities) -> usize {
        (contribute::threads(&self.settings().policy, caps.cpu_cores) / self.slots(caps).max(1))
            .max(1)
    }

    /// The capability report's compute part: absent on devices that never
    /// enabled compute.
    pub fn offer(&self, caps: &Capabilities) -> Option<ComputeOffer> {
        let loaded = self.loaded();
        if loaded.is_none() && !self.settings().enabled {
            return None;
        }
        let decision = self.decision();
        // Read at each capability report (every few seconds), so a busy
        // worker's load reaches the network's schedulers as a netmap change
        // at most that often.
        let (busy, queued) = self
            .server
            .lock()
            .expect("server lock")
            .upgrade()
            .map_or((0, 0), |s| s.load());
        Some(ComputeOffer {
            models: loaded.map(|l| l.offered.clone()).unwrap_or_default(),
            serving: decision.is_ok(),
            // Within what a coordinator accepts, whatever an error said.
            reason: decision.err().map(|r| truncate(r, MAX_TEXT)),
            slots: u32::try_from(self.slots(caps)).unwrap_or(u32::MAX),
            port: COMPUTE_PORT,
            busy: u32::try_from(busy).unwrap_or(u32::MAX),
            queued: u32::try_from(queued).unwrap_or(u32::MAX),
        })
    }

    /// The API now serving: its load goes into capability reports.
    pub fn serving_on(&self, server: &Arc<ComputeServer>) {
        *self.server.lock().expect("server lock") = Arc::downgrade(server);
    }
}

/// Jobs by ticket only, each with a receipt: the admission meshd serves
/// with.
pub struct TicketAdmission {
    map: watch::Receiver<MapState>,
    /// Signs receipts; its public half is the address tickets must name.
    device: DevicePrivate,
    caps: watch::Receiver<Capabilities>,
    /// Shared by every API this daemon runs, so a restart of the API does
    /// not reopen the replay window.
    seen: Arc<Mutex<SeenTickets>>,
    receipts: Arc<ReceiptQueue>,
    /// Requests refused because the caller is no peer ([`peers_only`]),
    /// shown in `/metrics` with the job refusals.
    not_a_peer: Arc<AtomicU64>,
}

/// An admitted job's ticket, and the name this device ran it under.
struct Ticketed {
    checked: Checked,
    worker: String,
}

impl TicketAdmission {
    pub fn new(
        map: watch::Receiver<MapState>,
        device: DevicePrivate,
        caps: watch::Receiver<Capabilities>,
        seen: Arc<Mutex<SeenTickets>>,
        receipts: Arc<ReceiptQueue>,
    ) -> Self {
        TicketAdmission {
            map,
            device,
            caps,
            seen,
            receipts,
            not_a_peer: Arc::default(),
        }
    }
}

impl Admission for TicketAdmission {
    fn admit(
        &self,
        caller: SocketAddr,
        headers: &HeaderMap,
        workload: admission::Workload,
        model: &str,
    ) -> Result<AdmittedJob, Refusal> {
        let signed = tickets::from_headers(headers)?;
        if self.receipts.is_full() {
            return Err(Refusal::ReceiptQueueFull(format!(
                "{} receipts wait for the coordinator; no new jobs until they are delivered",
                self.receipts.len()
            )));
        }
        let now = platform::unix_now();
        let tier = self.caps.borrow().tier;
        let (checked, worker) = {
            let map = self.map.borrow();
            let netmap = map
                .netmap
                .as_ref()
                .ok_or_else(|| Refusal::TicketInvalid("this device has no netmap yet".into()))?;
            let want = Expected {
                netmap,
                worker_key: self.device.public(),
                tier,
                caller: caller.ip().to_canonical(),
                workload: tickets::workload(workload),
                model,
                now,
            };
            (
                tickets::check(signed, &want)?,
                netmap.self_node.name.clone(),
            )
        };
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(&checked, now)?;
        let id = checked.ticket.job_id.clone();
        tracing::debug!(
            job = %short(&id),
            attempt = checked.ticket.attempt,
            submitter = %checked.ticket.submitter_device,
            "ticket accepted"
        );
        Ok(AdmittedJob::new(id, Ticketed { checked, worker }))
    }

    fn finish(&self, job: AdmittedJob, outcome: JobOutcome) {
        let id = job.id().to_owned();
        let Some(Ticketed { checked, worker }) = job.into_data::<Ticketed>() else {
            tracing::error!(job = %short(&id), "a job ended that this admission did not admit");
            return;
        };
        let receipt = receipts::receipt(&checked, &worker, &outcome);
        match self.receipts.push(&receipts::sign(&self.device, &receipt)) {
            Ok(()) => tracing::debug!(
                job = %short(&id),
                status = receipt.status.as_str(),
                units = receipt.units,
                runtime_ms = receipt.runtime_ms,
                "job ended; receipt queued"
            ),
            Err(e) => tracing::error!(
                job = %short(&id),
                error = format!("{e:#}"),
                "job ended but its receipt could not be written"
            ),
        }
    }

    fn metrics(&self, out: &mut String) {
        self.receipts.render_metrics(out);
        out.push_str("# TYPE compute_refused_not_a_peer counter\n");
        out.push_str(&format!(
            "compute_refused_not_a_peer_total {}\n",
            self.not_a_peer.load(Ordering::Relaxed)
        ));
    }
}

/// The first eight characters of a job id, for logs.
fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// The name of the device holding overlay address `ip` (as `meshd whois`
/// names it).
fn whois(netmap: &NetMap, ip: IpAddr) -> Option<String> {
    netmap.node_by_address(ip).map(|n| n.name.clone())
}

/// Who may call the compute API: this device and the peers of the current
/// netmap, by source address.
#[derive(Clone)]
struct Callers {
    map: watch::Receiver<MapState>,
    refused: Arc<AtomicU64>,
}

/// Refuses a caller that is not this device or a peer in the netmap, before
/// any other work: even a model list or a 503 tells a stranger what runs
/// here, and a body it sends is never read.
async fn peers_only(
    State(callers): State<Callers>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let ip = from.ip().to_canonical();
    let known = callers
        .map
        .borrow()
        .netmap
        .as_ref()
        .is_some_and(|n| whois(n, ip).is_some());
    if known {
        return next.run(req).await;
    }
    callers.refused.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%ip, "compute API call from no peer refused");
    let body = serde_json::json!({"error": {
        "message": format!("{ip} is not a peer of this device"),
        "type": "permission_error",
        "code": "not_a_peer",
    }});
    (StatusCode::FORBIDDEN, Json(body)).into_response()
}

/// `api` behind [`peers_only`].
fn guarded(api: Router, callers: Callers) -> Router {
    api.layer(middleware::from_fn_with_state(callers, peers_only))
}

/// A listener on `addr` that takes connections only from `device`
/// (SO_BINDTODEVICE): Linux accepts packets for a local address on any
/// interface, so without it a LAN host routing the overlay range through
/// this device reaches the API with no tunnel. This device's own calls
/// (the gateway placing a job here) still arrive: the kernel counts traffic
/// to a local address as coming from the interface that holds it.
fn listen_on(addr: SocketAddr, device: &str) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind_device(Some(device.as_bytes()))?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Binds `addr` on `device`, waiting a moment while a listener of the
/// previous API (restarted by `meshd compute enable`) is still being
/// dropped.
async fn bind_soon(addr: SocketAddr, device: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut tries = 0;
    loop {
        match listen_on(addr, device) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 40 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// Waits for the first netmap, then serves on each overlay address of the
/// TUN device `tun` until `stop` turns true (requests in flight finish) or
/// the task is dropped.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    tun: String,
    service: Arc<ComputeService>,
    models: Models,
    admission: Arc<TicketAdmission>,
    mut map: watch::Receiver<MapState>,
    slots: usize,
    queue: usize,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let netmap = map
        .wait_for(|m| m.netmap.is_some())
        .await
        .context("session ended")?
        .netmap
        .clone()
        .context("netmap")?;
    let lookup = map.clone();
    let whois =
        Arc::new(move |ip: IpAddr| lookup.borrow().netmap.as_ref().and_then(|n| whois(n, ip)));
    let gate = service.gate();
    let callers = Callers {
        map: map.clone(),
        refused: admission.not_a_peer.clone(),
    };
    let server = ComputeServer::new(
        models,
        netmap.self_node.name.clone(),
        whois,
        gate,
        admission,
        slots,
        queue,
    );
    service.serving_on(&server);
    // Dropped with this task (session stop, `compute` changes): the
    // listeners go with it.
    let mut tasks = tokio::task::JoinSet::new();
    for addr in &netmap.self_node.addresses {
        let bind = SocketAddr::new(*addr, COMPUTE_PORT);
        let listener = match bind_soon(bind, &tun).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(%bind, error = %e, "compute API not served on this address");
                continue;
            }
        };
        tracing::info!(%bind, %tun, slots, queue, "compute API listening");
        let app = guarded(server.router(), callers.clone())
            .into_make_service_with_connect_info::<SocketAddr>();
        let mut stop = stop.clone();
        tasks.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        });
    }
    anyhow::ensure!(
        !tasks.is_empty(),
        "could not bind the compute API on any overlay address"
    );
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use platform::keys::NodePublic;
    use platform::netmap::{DnsConfig, Node, NodeKind, RelayMap};

    fn node(b: u8, name: &str) -> Node {
        Node {
            id: i64::from(b),
            name: name.into(),
            kind: NodeKind::Mesh,
            node_key: NodePublic::from_bytes([b; 32]),
            disco_key: None,
            addresses: vec![IpAddr::from([100, 64, 0, b])],
            endpoints: vec![],
            online: true,
            os: "linux".into(),
            home_region: None,
            capabilities: None,
            owner: None,
            key_expiry: None,
            device_key: None,
            owner_role: None,
            tags: Vec::new(),
        }
    }

    struct Worker {
        admission: TicketAdmission,
        submitter: platform::keys::DevicePrivate,
        worker: platform::keys::DevicePrivate,
        dir: tempfile::TempDir,
        _map: watch::Sender<MapState>,
        _caps: watch::Sender<Capabilities>,
    }

    /// A worker "gpu" (100.64.0.1) in network "home" with one peer,
    /// "laptop" (100.64.0.2), whose owner is a member; its receipt queue
    /// takes at most `max_receipts`.
    fn worker(max_receipts: usize) -> Worker {
        use platform::people::Role;
        let (submitter, worker) = (DevicePrivate::generate(), DevicePrivate::generate());
        let mut gpu = node(1, "gpu");
        gpu.device_key = Some(worker.public());
        gpu.owner_role = Some(Role::Admin);
        let mut laptop = node(2, "laptop");
        laptop.device_key = Some(submitter.public());
        laptop.owner_role = Some(Role::Member);
        let netmap = NetMap {
            network: "home".into(),
            self_node: gpu,
            routes: vec![],
            peers: [(laptop.node_key, laptop)].into_iter().collect(),
            relay_map: RelayMap::default(),
            dns: DnsConfig::default(),
            awaiting_approval: false,
            packet_filter: Default::default(),
            compute: Default::default(),
        };
        let (map_tx, map) = watch::channel(MapState {
            netmap: Some(netmap),
            ..MapState::default()
        });
        let (caps_tx, caps) = watch::channel(Capabilities {
            tier: platform::capability::Tier::Tier2,
            ..Capabilities::default()
        });
        let dir = tempfile::tempdir().unwrap();
        let receipts =
            Arc::new(ReceiptQueue::open_bounded(dir.path(), max_receipts, u64::MAX).unwrap());
        Worker {
            admission: TicketAdmission::new(map, worker.clone(), caps, Arc::default(), receipts),
            submitter,
            worker,
            dir,
            _map: map_tx,
            _caps: caps_tx,
        }
    }

    impl Worker {
        /// Headers with a ticket from the laptop for `job`.
        fn ticket(&self, job: &str) -> (platform::signed::Signed, HeaderMap) {
            use base64::Engine as _;
            use platform::jobs::{Route, Sensitivity, Ticket, Workload, DOMAIN_TICKET};
            let now = platform::unix_now();
            let t = Ticket {
                job_id: job.into(),
                network: "home".into(),
                submitter_device: "laptop".into(),
                submitter_user: "ann".into(),
                workload: Workload::Embeddings,
                model: "all-minilm-l6-v2".into(),
                route: Route::Auto,
                sensitivity: Sensitivity::Private,
                max_cost: 1_000_000,
                timeout_ms: 30_000,
                issued_at: now,
                expires_at: now + 120,
                worker: "gpu".into(),
                worker_key: self.worker.public(),
                attempt: 1,
            };
            let signed = platform::signed::Signed::sign(&self.submitter, DOMAIN_TICKET, &t);
            let value = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(serde_json::to_vec(&signed).unwrap());
            let mut h = HeaderMap::new();
            h.insert(platform::jobs::TICKET_HEADER, value.parse().unwrap());
            (signed, h)
        }

        fn admit(&self, from: u8, headers: &HeaderMap) -> Result<AdmittedJob, Refusal> {
            let caller = SocketAddr::new(IpAddr::from([100, 64, 0, from]), 50_000);
            self.admission.admit(
                caller,
                headers,
                admission::Workload::Embeddings,
                "all-minilm-l6-v2",
            )
        }

        /// The receipts on disk, opened with the worker's signature.
        fn receipts(&self) -> Vec<platform::jobs::Receipt> {
            let mut files: Vec<_> = std::fs::read_dir(self.dir.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect();
            files.sort();
            files
                .iter()
                .map(|p| {
                    let s: platform::signed::Signed =
                        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
                    assert_eq!(s.device_key, self.worker.public());
                    s.open(platform::jobs::DOMAIN_RECEIPT).unwrap()
                })
                .collect()
        }
    }

    fn outcome(status: admission::JobStatus) -> JobOutcome {
        JobOutcome {
            started_at_ms: 1_000,
            ended_at_ms: 1_400,
            runtime_ms: 400,
            units: 2,
            output_sha256: admission::sha256_hex(b"out"),
            status,
        }
    }

    #[test]
    fn a_ticketed_job_runs_once_and_leaves_a_signed_receipt() {
        let w = worker(10);
        let (signed, headers) = w.ticket("00aa");
        let job = w.admit(2, &headers).unwrap();
        assert_eq!(job.id(), "00aa");
        assert_eq!(
            w.admit(2, &headers).unwrap_err().code(),
            "ticket_replayed",
            "one run per ticket"
        );
        w.admission
            .finish(job, outcome(admission::JobStatus::Cancelled));
        let receipts = w.receipts();
        assert_eq!(receipts.len(), 1);
        let r = &receipts[0];
        assert_eq!(r.ticket, signed);
        assert_eq!(r.ticket_hash, platform::jobs::ticket_hash(&signed));
        assert_eq!((r.job_id.as_str(), r.chunk_id), ("00aa", 0));
        assert_eq!(r.worker, "gpu");
        assert_eq!(
            (r.started_at_ms, r.ended_at_ms, r.runtime_ms, r.units),
            (1_000, 1_400, 400, 2)
        );
        assert_eq!(r.output_sha256, admission::sha256_hex(b"out"));
        assert_eq!(r.status, platform::jobs::JobStatus::Cancelled);
        let mut m = String::new();
        w.admission.metrics(&mut m);
        assert!(m.contains("compute_receipts_queued 1\n"), "{m}");
    }

    #[test]
    fn jobs_without_a_fitting_ticket_are_refused() {
        let w = worker(10);
        assert_eq!(
            w.admit(2, &HeaderMap::new()).unwrap_err().code(),
            "ticket_required"
        );
        let (_, headers) = w.ticket("00bb");
        assert_eq!(
            w.admit(1, &headers).unwrap_err().code(),
            "ticket_mismatch",
            "sent through another device's tunnel"
        );
        assert!(w.admit(2, &headers).is_ok());
        assert!(w.receipts().is_empty());
    }

    #[test]
    fn a_full_receipt_queue_refuses_new_jobs() {
        let w = worker(1);
        let job = w.admit(2, &w.ticket("00cc").1).unwrap();
        w.admission.finish(job, outcome(admission::JobStatus::Ok));
        let refused = w.admit(2, &w.ticket("00dd").1).unwrap_err();
        assert_eq!(refused.code(), "receipt_queue_full");
        assert_eq!(refused.status().as_u16(), 503);
        assert_eq!(w.receipts().len(), 1);
    }

    #[test]
    fn long_reasons_are_cut_to_what_a_coordinator_takes() {
        let cut = truncate("é".repeat(300), MAX_TEXT);
        assert!(cut.len() <= MAX_TEXT && cut.ends_with('…'), "{}", cut.len());
        assert_eq!(truncate("short".into(), MAX_TEXT), "short");
    }

    /// Calls `/v1/models` from `from` through [`guarded`] around a stub
    /// API; returns the status, the JSON error code, and whether the stub
    /// was reached.
    async fn call_from(map: &watch::Receiver<MapState>, from: IpAddr) -> (u16, String, bool) {
        use axum::extract::connect_info::MockConnectInfo;
        use std::sync::atomic::AtomicBool;
        use tower::ServiceExt as _;
        let reached = Arc::new(AtomicBool::new(false));
        let r = reached.clone();
        let api = Router::new().route(
            "/v1/models",
            axum::routing::get(move || {
                let r = r.clone();
                async move {
                    r.store(true, Ordering::Relaxed);
                    "models"
                }
            }),
        );
        let callers = Callers {
            map: map.clone(),
            refused: Arc::default(),
        };
        let app = guarded(api, callers).layer(MockConnectInfo(SocketAddr::new(from, 40_000)));
        let req = axum::http::Request::get("/v1/models")
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let code = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_default();
        (status, code, reached.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn only_this_device_and_its_peers_reach_the_api() {
        let (tx, map) = watch::channel(MapState::default());
        let peer = IpAddr::from([100, 64, 0, 2]);
        assert_eq!(
            call_from(&map, peer).await,
            (403, "not_a_peer".into(), false),
            "no netmap yet: nobody is a peer"
        );
        let laptop = node(2, "laptop");
        tx.send_modify(|m| {
            m.netmap = Some(NetMap {
                network: "home".into(),
                self_node: node(1, "gpu"),
                routes: vec![],
                peers: [(laptop.node_key, laptop.clone())].into_iter().collect(),
                relay_map: RelayMap::default(),
                dns: DnsConfig::default(),
                awaiting_approval: false,
                packet_filter: Default::default(),
                compute: Default::default(),
            })
        });
        assert_eq!(call_from(&map, peer).await, (200, String::new(), true));
        assert_eq!(
            call_from(&map, IpAddr::from([100, 64, 0, 1])).await,
            (200, String::new(), true),
            "this device's own gateway"
        );
        let mapped: IpAddr = "::ffff:100.64.0.2".parse().unwrap();
        assert_eq!(call_from(&map, mapped).await.0, 200, "IPv4 in IPv6");
        for stranger in [
            IpAddr::from([10, 0, 0, 9]),
            IpAddr::from([100, 64, 0, 3]),
            IpAddr::from([127, 0, 0, 1]),
        ] {
            assert_eq!(
                call_from(&map, stranger).await,
                (403, "not_a_peer".into(), false),
                "{stranger}"
            );
        }
        // The peer leaves the network: refused from the next request on.
        tx.send_modify(|m| m.netmap.as_mut().unwrap().peers.clear());
        assert_eq!(
            call_from(&map, peer).await,
            (403, "not_a_peer".into(), false)
        );
    }

    #[test]
    fn refusals_of_strangers_are_counted_in_the_metrics() {
        let w = worker(10);
        w.admission.not_a_peer.fetch_add(3, Ordering::Relaxed);
        let mut m = String::new();
        w.admission.metrics(&mut m);
        assert!(m.contains("compute_refused_not_a_peer_total 3\n"), "{m}");
    }

    #[test]
    fn callers_are_named_from_the_netmap() {
        let peer = node(2, "alpha");
        let map = NetMap {
            network: "n".into(),
            self_node: node(1, "beta"),
            routes: vec![],
            peers: [(peer.node_key, peer)].into_iter().collect(),
            relay_map: RelayMap::default(),
            dns: DnsConfig::default(),
            awaiting_approval: false,
            packet_filter: Default::default(),
            compute: Default::default(),
        };
        assert_eq!(
            whois(&map, IpAddr::from([100, 64, 0, 2])).as_deref(),
            Some("alpha")
        );
        assert_eq!(
            whois(&map, IpAddr::from([100, 64, 0, 1])).as_deref(),
            Some("beta")
        );
        assert_eq!(whois(&map, IpAddr::from([10, 0, 0, 9])), None);
    }
}
