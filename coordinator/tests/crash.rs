//! Crash consistency: the real coordinator binary is killed with SIGKILL in
//! the middle of a burst of device registrations and removals, at a
//! different point in each of four rounds, on loopback only.
//!
//! After every kill the database file is checked as the crash left it
//! (before any coordinator code touches it again); then `serve` is started
//! again on it and the state is checked through the API:
//!
//! - nothing acknowledged is lost: every acknowledged registration is there
//!   with the id, name, node key and addresses it was answered with, and
//!   every acknowledged removal is gone;
//! - nothing is doubled or half-written: SQLite's integrity and foreign-key
//!   checks pass, no two devices share an address or a key, every device
//!   has the audit record and the key use its registration writes in the
//!   same transaction, and every removal left its denylist entries, its
//!   quarantined address and its audit record;
//! - a request whose answer the kill cut off may have happened or not, but
//!   re-sending it after the restart succeeds and converges on exactly one
//!   device (the one the cut-off request made, if it made one);
//! - the restarted coordinator registers new devices.
//!
//! Set `CRASH_TEST_SEED` to replay a run's random choices (the seed is
//! printed; run with `--nocapture` to see it).
#![cfg(unix)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use platform::addr::{ipv4_for_seq, UlaPrefix};
use platform::api::{Capabilities, DeviceInfo, RegisterRequest, RegisterResponse};
use platform::control_auth::{node_proof, CoordinatorInfo, ProofPurpose};
use platform::keys::{DevicePrivate, DiscoPrivate, NodePrivate, NodePublic, ProofPublic};
use platform::signed::{Signed, DOMAIN_REGISTER};
use rand_core::{OsRng, RngCore};
use reqwest::StatusCode;
use serde::de::{DeserializeOwned, IgnoredAny};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection};
use tokio::process::{Child, Command};
use tokio::sync::watch;

const BIN: &str = env!("CARGO_BIN_EXE_coordinator");
const NETWORK: &str = "crash";
/// Concurrent clients in each burst.
const WORKERS: usize = 8;
/// Registrations one client sends per round: under the coordinator's burst
/// of 30 unauthenticated requests per source address (each client has an
/// address of its own, see [`fresh_source`]).
const REGS_PER_WORKER: usize = 25;
/// When each round's SIGKILL comes: early, midway and late in a burst, and
/// either at once or aimed at an unanswered commit.
const ROUNDS: [Aim; 4] = [
    Aim::Acked(20..45),
    Aim::Unanswered(30..60),
    Aim::Acked(60..100),
    Aim::Unanswered(90..140),
];
/// How long an aimed kill waits for its moment before it is sent anyway.
const AIM_TIMEOUT: Duration = Duration::from_secs(3);

/// When a round's SIGKILL comes, after a random number (in the range) of
/// acknowledged registrations.
enum Aim {
    /// Right then: mostly with requests queued for the write lock.
    Acked(Range<usize>),
    /// From then on, at the first moment the database holds a registration
    /// whose answer has not been read: between a commit and its answer,
    /// the case a client can only resolve by sending again.
    Unanswered(Range<usize>),
}
/// Devices registered before the first burst, so removals start at once.
const SEED_DEVICES: usize = 12;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const START_TIMEOUT: Duration = Duration::from_secs(15);
const BURST_TIMEOUT: Duration = Duration::from_secs(20);

/// A small deterministic generator (xorshift64*), seeded at random or from
/// `CRASH_TEST_SEED`, so a failing run's choices can be replayed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn in_range(&mut self, r: Range<usize>) -> usize {
        r.start + self.below(r.end - r.start)
    }
}

/// A loopback address no client used before. The coordinator rate-limits
/// registration per source address; all of 127.0.0.0/8 reaches a server
/// on 127.0.0.1 without any setup, so each client gets its own bucket.
fn fresh_source() -> IpAddr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let hi = u8::try_from(n / 250).expect("fewer than 64000 clients");
    let lo = u8::try_from(n % 250 + 1).unwrap();
    IpAddr::V4(Ipv4Addr::new(127, 1, hi, lo))
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(fresh_source())
        .timeout(REQUEST_TIMEOUT)
        .build()
        .unwrap()
}

/// The coordinator binary, with no `COORDINATOR_*` setting of the caller's
/// environment leaking in.
fn coordinator() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("COORDINATOR_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "warn").kill_on_drop(true);
    cmd
}

/// Runs an operator command on the state directory; returns its stdout.
async fn cli(args: &[&str]) -> String {
    let out = coordinator().args(args).output().await.unwrap();
    assert!(
        out.status.success(),
        "coordinator {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A state directory made with the CLI: `init`, a network, and a reusable
/// pre-auth key for it.
struct Fixture {
    _dir: tempfile::TempDir,
    state_dir: PathBuf,
    /// The API token `init` printed (the network's owner, an admin).
    token: String,
    auth_key: String,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let sd = state_dir.to_str().unwrap();
        let token = cli(&["init", "--state-dir", sd]).await;
        cli(&["network", "create", NETWORK, "--state-dir", sd]).await;
        let auth_key = cli(&[
            "preauth-key",
            "create",
            "--network",
            NETWORK,
            "--reusable",
            "--state-dir",
            sd,
        ])
        .await;
        Fixture {
            _dir: dir,
            state_dir,
            token,
            auth_key,
        }
    }

    fn db(&self) -> PathBuf {
        self.state_dir.join(coordinator::store::DB_FILE)
    }
}

/// A running `coordinator serve`.
struct Server {
    child: Child,
    base: String,
}

/// A port that was free a moment ago (a server that loses the race to it
/// exits, and [`Server::start`] tries another).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Server {
    /// Starts `serve` on `state_dir` on a free loopback port and polls
    /// `/healthz` until it answers.
    async fn start(state_dir: &Path) -> Server {
        let deadline = Instant::now() + START_TIMEOUT;
        let probe = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        for _attempt in 0..3 {
            let listen = format!("127.0.0.1:{}", free_port());
            let mut child = coordinator()
                .args(["serve", "--state-dir", state_dir.to_str().unwrap()])
                .args(["--listen", &listen])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            let base = format!("http://{listen}");
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    eprintln!("coordinator serve on {listen} exited: {status}; retrying");
                    break;
                }
                let up = probe.get(format!("{base}/healthz")).send().await;
                if up.is_ok_and(|r| r.status().is_success()) {
                    return Server { child, base };
                }
                assert!(
                    Instant::now() < deadline,
                    "coordinator did not answer within {START_TIMEOUT:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("coordinator serve kept exiting at start");
    }

    /// SIGKILL, no graceful anything; checks it died of that signal.
    async fn kill9(mut self) {
        self.child.start_kill().unwrap(); // SIGKILL on Unix
        let status = self.child.wait().await.unwrap();
        assert_eq!(status.signal(), Some(9), "{status}");
    }
}

/// What became of a request.
#[derive(Debug)]
enum Outcome<T> {
    /// A success answer, fully read.
    Acked(T),
    /// An error answer.
    Refused(StatusCode, String),
    /// No complete answer: the request may or may not have been carried out.
    Unknown(String),
}

async fn outcome<T: DeserializeOwned>(res: reqwest::Result<reqwest::Response>) -> Outcome<T> {
    let resp = match res {
        Ok(r) => r,
        Err(e) => return Outcome::Unknown(e.to_string()),
    };
    let status = resp.status();
    if !status.is_success() {
        return match resp.text().await {
            Ok(body) => Outcome::Refused(status, body),
            Err(e) => Outcome::Unknown(format!("{status}, then {e}")),
        };
    }
    match resp.json().await {
        Ok(v) => Outcome::Acked(v),
        Err(e) => Outcome::Unknown(format!("{status}, then {e}")),
    }
}

/// The coordinator's proof key, against which node-key proofs are made.
async fn proof_key(base: &str) -> ProofPublic {
    let info: CoordinatorInfo = reqwest::get(format!("{base}/api/v1/coordinator"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    info.check(None).unwrap();
    info.proof_key
}

/// A registration as sent: a new device with a fresh node key.
#[derive(Clone, Debug)]
struct Sent {
    node: NodePublic,
    /// The signed request, exactly as sent (and as re-sent).
    body: String,
}

fn registration(proof_key: &ProofPublic, auth_key: &str, hostname: &str) -> Sent {
    let device = DevicePrivate::generate();
    let node = NodePrivate::generate();
    let timestamp = platform::unix_now();
    let req = RegisterRequest {
        timestamp,
        auth_key: auth_key.into(),
        node_key: node.public(),
        disco_key: DiscoPrivate::generate().public(),
        hostname: hostname.into(),
        os: "linux".into(),
        capabilities: Capabilities::default(),
        network: None,
        node_proof: node_proof(
            ProofPurpose::Register,
            &node,
            proof_key,
            &device.public(),
            timestamp,
        )
        .unwrap(),
    };
    Sent {
        node: node.public(),
        body: serde_json::to_string(&Signed::sign(&device, DOMAIN_REGISTER, &req)).unwrap(),
    }
}

async fn register(http: &reqwest::Client, base: &str, sent: &Sent) -> Outcome<RegisterResponse> {
    let res = http
        .post(format!("{base}/api/v1/register"))
        .header("content-type", "application/json")
        .body(sent.body.clone())
        .send()
        .await;
    outcome(res).await
}

/// Removes device `id` as the network's admin (the answer, the removed
/// device, is not needed: only whether it came).
async fn remove(http: &reqwest::Client, base: &str, token: &str, id: i64) -> Outcome<IgnoredAny> {
    let res = http
        .delete(format!("{base}/api/v1/networks/{NETWORK}/devices/{id}"))
        .bearer_auth(token)
        .send()
        .await;
    outcome(res).await
}

/// A device as the coordinator describes it, wherever that description
/// comes from (a registration answer, the device list, the database).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Device {
    id: i64,
    name: String,
    node: NodePublic,
    addresses: Vec<IpAddr>,
}

impl Device {
    fn answered(sent: &Sent, r: RegisterResponse) -> Device {
        Device {
            id: r.device_id,
            name: r.name,
            node: sent.node,
            addresses: r.addresses,
        }
    }
}

type Devices = BTreeMap<i64, Device>;

/// The network's devices as the coordinator lists them (`GET …/devices`,
/// as its admin).
async fn listed(http: &reqwest::Client, base: &str, token: &str) -> Devices {
    let list: Vec<DeviceInfo> = http
        .get(format!("{base}/api/v1/networks/{NETWORK}/devices"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let devices: Devices = list
        .into_iter()
        .map(|d| {
            let dev = Device {
                id: d.id,
                name: d.name,
                node: d.node_key,
                addresses: d.addresses,
            };
            (dev.id, dev)
        })
        .collect();
    assert_unique(&devices);
    devices
}

/// What the test knows for certain: the devices that are there and the
/// ones that were removed. Every device ever made is in exactly one.
#[derive(Default)]
struct Model {
    live: Devices,
    removed: Devices,
}

impl Model {
    fn created(&self) -> usize {
        self.live.len() + self.removed.len()
    }
}

/// Panics if two devices share an address, a node key or a name: proves no
/// registration was doubled and no address handed out twice.
fn assert_unique(devices: &Devices) {
    let mut addrs = HashSet::new();
    let mut nodes = HashSet::new();
    let mut names = HashSet::new();
    for d in devices.values() {
        assert!(!d.addresses.is_empty(), "{d:?} has no addresses");
        for a in &d.addresses {
            assert!(addrs.insert(*a), "address {a} is held twice ({d:?})");
        }
        assert!(nodes.insert(d.node), "node key held twice ({d:?})");
        assert!(names.insert(&d.name), "name held twice ({d:?})");
    }
}

// ---------------------------------------------------------------------------
// The database, read straight from the file.

/// The rows that registration and removal write, for the test's network.
struct DbState {
    ula: UlaPrefix,
    devices: Vec<DbDevice>,
    /// `preauth_keys.used_count` of the one key every registration uses.
    used_count: i64,
    /// Targets (`device:<name>`) of `device.registered` audit events.
    registered: Vec<String>,
    /// Targets of `device.removed` audit events.
    removed: Vec<String>,
    /// (kind, key, device_name) of denylist entries made by removal.
    denied: Vec<(String, String, String)>,
    /// Quarantined address sequence numbers.
    released: Vec<i64>,
}

#[derive(sqlx::FromRow)]
struct DbDevice {
    id: i64,
    name: String,
    node_key: String,
    device_key: Option<String>,
    addr_seq: i64,
    ipv4: String,
    ipv6: String,
}

impl DbDevice {
    fn device(&self) -> Device {
        Device {
            id: self.id,
            name: self.name.clone(),
            node: self.node_key.parse().unwrap(),
            addresses: vec![self.ipv4.parse().unwrap(), self.ipv6.parse().unwrap()],
        }
    }
}

/// Opens the database file on its own connection (recovering the WAL as a
/// crash left it) and reads what [`check_db`] checks. Fails unless SQLite's
/// `integrity_check` says `ok` and `foreign_key_check` finds nothing.
async fn read_db(path: &Path) -> DbState {
    let mut conn = connect(path).await;
    let c = &mut conn;
    let integrity: Vec<(String,)> = sqlx::query_as("PRAGMA integrity_check")
        .fetch_all(&mut *c)
        .await
        .unwrap();
    assert_eq!(integrity, [("ok".to_owned(),)], "integrity_check");
    let fk = sqlx::query("PRAGMA foreign_key_check")
        .fetch_all(&mut *c)
        .await
        .unwrap();
    assert!(fk.is_empty(), "{} rows break a foreign key", fk.len());
    let (ula,): (String,) = sqlx::query_as("SELECT value FROM settings WHERE key = 'ula_prefix'")
        .fetch_one(&mut *c)
        .await
        .unwrap();
    let devices: Vec<DbDevice> = sqlx::query_as(
        "SELECT id, name, node_key, device_key, addr_seq, ipv4, ipv6 FROM devices ORDER BY id",
    )
    .fetch_all(&mut *c)
    .await
    .unwrap();
    let keys: Vec<(i64,)> = sqlx::query_as("SELECT used_count FROM preauth_keys")
        .fetch_all(&mut *c)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "the test made one pre-auth key");
    let registered = audit_targets(c, "device.registered").await;
    let removed = audit_targets(c, "device.removed").await;
    let denied =
        sqlx::query_as("SELECT kind, key, device_name FROM denylist WHERE reason = 'removed'")
            .fetch_all(&mut *c)
            .await
            .unwrap();
    let released = sqlx::query_scalar("SELECT addr_seq FROM released_addresses")
        .fetch_all(&mut *c)
        .await
        .unwrap();
    conn.close().await.unwrap();
    DbState {
        ula: ula.parse().unwrap(),
        devices,
        used_count: keys[0].0,
        registered,
        removed,
        denied,
        released,
    }
}

/// A connection of the test's own to the database file.
async fn connect(path: &Path) -> SqliteConnection {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(false)
        .connect()
        .await
        .unwrap()
}

/// Polls the database until it holds more registrations than the
/// `before` of earlier rounds and the `acked` of this one: one of them is
/// committed and its answer not yet read. False if that moment did not
/// come within [`AIM_TIMEOUT`].
async fn unanswered_commit(
    c: &mut SqliteConnection,
    before: usize,
    acked: &watch::Receiver<usize>,
) -> bool {
    let deadline = Instant::now() + AIM_TIMEOUT;
    while Instant::now() < deadline {
        let committed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_events WHERE action = 'device.registered'",
        )
        .fetch_one(&mut *c)
        .await
        .unwrap();
        // Read after the count: both only grow, so if the count still
        // exceeds it, a committed registration is unanswered now.
        if usize::try_from(committed).unwrap() - before > *acked.borrow() {
            return true;
        }
    }
    false
}

/// Targets of the audit events of `action`, oldest first.
async fn audit_targets(c: &mut SqliteConnection, action: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT target FROM audit_events WHERE action = ? ORDER BY id")
        .bind(action)
        .fetch_all(c)
        .await
        .unwrap()
}

/// Panics with `what` if any item occurs twice.
fn assert_distinct<T: Hash + Eq + std::fmt::Debug>(items: impl IntoIterator<Item = T>, what: &str) {
    let mut seen = HashSet::new();
    for i in items {
        let shown = format!("{i:?}");
        assert!(seen.insert(i), "{what} twice: {shown}");
    }
}

/// The invariants every committed state satisfies, whatever was cut off:
/// proves each registration and removal was written whole or not at all.
fn check_db(db: &DbState) {
    // Every device has its addresses, derived from its sequence number, and
    // none is shared (the schema's UNIQUE constraints say so too; this
    // proves they still hold in the file).
    for d in &db.devices {
        let seq = u32::try_from(d.addr_seq).unwrap();
        let v4 = ipv4_for_seq(seq).map(|a| a.to_string());
        assert_eq!(Some(&d.ipv4), v4.as_ref(), "device {} ipv4", d.id);
        assert_eq!(
            d.ipv6,
            db.ula.address(seq).to_string(),
            "device {} ipv6",
            d.id
        );
        d.node_key.parse::<NodePublic>().unwrap();
    }
    assert_distinct(db.devices.iter().map(|d| d.addr_seq), "addr_seq");
    assert_distinct(db.devices.iter().map(|d| &d.ipv4), "ipv4");
    assert_distinct(db.devices.iter().map(|d| &d.ipv6), "ipv6");
    assert_distinct(db.devices.iter().map(|d| &d.node_key), "node key");
    assert_distinct(db.devices.iter().map(|d| &d.device_key), "device key");
    assert_distinct(db.devices.iter().map(|d| &d.name), "device name");

    // Registration writes the device, its audit event and the key's use in
    // one transaction: every device has its event, each event names one
    // device (hostnames are unique here, so a doubled registration would
    // show twice), and the key counts exactly the devices it made.
    assert_distinct(&db.registered, "device.registered event");
    let registered: HashSet<&str> = db.registered.iter().map(String::as_str).collect();
    for d in &db.devices {
        let target = format!("device:{}", d.name);
        assert!(
            registered.contains(target.as_str()),
            "{target} has no device.registered event: half-registered"
        );
    }
    assert_eq!(
        db.used_count,
        db.registered.len() as i64,
        "pre-auth key uses vs. device.registered events"
    );

    // Removal deletes the device and writes its denylist entries (device
    // and node key), its quarantined address and its audit event in one
    // transaction.
    assert_distinct(&db.removed, "device.removed event");
    let live_names: HashSet<String> = db
        .devices
        .iter()
        .map(|d| format!("device:{}", d.name))
        .collect();
    for target in &db.removed {
        assert!(
            !live_names.contains(target),
            "{target} was removed but is there"
        );
        assert!(
            registered.contains(target.as_str()),
            "{target} removed, never registered"
        );
        let name = target.strip_prefix("device:").unwrap();
        for kind in ["device", "node"] {
            assert!(
                db.denied.iter().any(|(k, _, n)| k == kind && n == name),
                "removed {target} has no {kind}-key denylist entry: half-removed"
            );
        }
    }
    assert_eq!(db.denied.len(), 2 * db.removed.len(), "denylist entries");
    let live_keys: HashSet<&str> = db
        .devices
        .iter()
        .flat_map(|d| [Some(d.node_key.as_str()), d.device_key.as_deref()])
        .flatten()
        .collect();
    for (_, key, name) in &db.denied {
        assert!(
            !live_keys.contains(key.as_str()),
            "denied key of {name} is live"
        );
    }
    assert_eq!(db.released.len(), db.removed.len(), "quarantined addresses");
    for d in &db.devices {
        assert!(
            !db.released.contains(&d.addr_seq),
            "device {} holds a quarantined address",
            d.id
        );
    }

    // Devices leave only by removal: nothing vanished without a trace.
    assert_eq!(
        db.registered.len(),
        db.devices.len() + db.removed.len(),
        "registered = present + removed"
    );
}

fn db_devices(db: &DbState) -> Devices {
    let devices: Devices = db.devices.iter().map(|d| (d.id, d.device())).collect();
    assert_unique(&devices);
    devices
}

// ---------------------------------------------------------------------------
// The burst.

/// What the workers of one burst share.
struct Burst {
    base: String,
    token: String,
    auth_key: String,
    proof_key: ProofPublic,
    round: usize,
    /// Set just before the kill: no new requests after it.
    stop: AtomicBool,
    /// Requests sent and not yet answered.
    in_flight: AtomicUsize,
    /// Acknowledged registrations so far.
    acked: watch::Sender<usize>,
    /// Acknowledged devices no removal has been sent for yet.
    removable: Mutex<Vec<Device>>,
}

enum Op {
    Register(Sent, Outcome<RegisterResponse>),
    Remove(Device, Outcome<IgnoredAny>),
}

impl Burst {
    fn take_removable(&self, rng: &mut Rng) -> Option<Device> {
        let mut v = self.removable.lock().unwrap();
        (!v.is_empty()).then(|| {
            let i = rng.below(v.len());
            v.swap_remove(i)
        })
    }

    /// One client: registers new devices and, one time in three, removes
    /// one already acknowledged, until told to stop. Returns every request
    /// with its outcome.
    async fn worker(self: Arc<Self>, w: usize, mut rng: Rng) -> Vec<Op> {
        let http = http_client();
        let mut ops = Vec::new();
        let mut sent = 0;
        while !self.stop.load(Ordering::SeqCst) {
            let target = if rng.below(3) == 0 || sent == REGS_PER_WORKER {
                self.take_removable(&mut rng)
            } else {
                None
            };
            if let Some(dev) = target {
                self.in_flight.fetch_add(1, Ordering::SeqCst);
                let out = remove(&http, &self.base, &self.token, dev.id).await;
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                ops.push(Op::Remove(dev, out));
            } else if sent < REGS_PER_WORKER {
                let host = format!("r{}-w{w}-{sent}", self.round);
                let reg = registration(&self.proof_key, &self.auth_key, &host);
                sent += 1;
                self.in_flight.fetch_add(1, Ordering::SeqCst);
                let out = register(&http, &self.base, &reg).await;
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                if let Outcome::Acked(r) = &out {
                    let dev = Device::answered(&reg, r.clone());
                    self.removable.lock().unwrap().push(dev);
                    self.acked.send_modify(|n| *n += 1);
                }
                ops.push(Op::Register(reg, out));
            } else {
                break;
            }
        }
        ops
    }
}

/// A burst's requests, sorted by what is known of them.
#[derive(Default)]
struct Sorted {
    acked_regs: Vec<Device>,
    acked_removals: Vec<Device>,
    unknown_regs: Vec<Sent>,
    unknown_removals: Vec<Device>,
    /// Why a cut-off request got no answer (one example, for the report).
    cut_off_by: Option<String>,
}

fn sort_ops(ops: Vec<Op>) -> Sorted {
    let mut s = Sorted::default();
    for op in ops {
        match op {
            Op::Register(sent, Outcome::Acked(r)) => s.acked_regs.push(Device::answered(&sent, r)),
            Op::Register(sent, Outcome::Unknown(why)) => {
                s.unknown_regs.push(sent);
                s.cut_off_by.get_or_insert(why);
            }
            Op::Remove(dev, Outcome::Acked(_)) => s.acked_removals.push(dev),
            Op::Remove(dev, Outcome::Unknown(why)) => {
                s.unknown_removals.push(dev);
                s.cut_off_by.get_or_insert(why);
            }
            // Every request of the burst is valid: an error answer is a bug.
            Op::Register(_, Outcome::Refused(st, body)) => {
                panic!("registration refused: {st} {body}")
            }
            Op::Remove(d, Outcome::Refused(st, body)) => {
                panic!("removal of {d:?} refused: {st} {body}")
            }
        }
    }
    s
}

/// Checks `found` (from the database or the API) against what was
/// acknowledged before the kill. Acknowledged registrations are there,
/// unchanged, unless their removal was cut off; acknowledged removals are
/// gone; any other device comes from a cut-off registration. Returns those.
fn check_acknowledged(
    found: &Devices,
    model: &Model,
    unknown_removals: &[Device],
    unknown_regs: &[Sent],
) -> HashMap<NodePublic, Device> {
    let maybe_removed: HashSet<i64> = unknown_removals.iter().map(|d| d.id).collect();
    for (id, want) in &model.live {
        match found.get(id) {
            Some(got) => assert_eq!(got, want, "acknowledged device changed"),
            None => assert!(
                maybe_removed.contains(id),
                "acknowledged registration lost: {want:?}"
            ),
        }
    }
    for (id, gone) in &model.removed {
        assert!(
            !found.contains_key(id),
            "acknowledged removal undone: {gone:?}"
        );
        assert!(
            found.values().all(|d| d.node != gone.node),
            "removed node key is back: {gone:?}"
        );
    }
    let maybe_registered: HashSet<NodePublic> = unknown_regs.iter().map(|s| s.node).collect();
    let mut landed = HashMap::new();
    for d in found.values().filter(|d| !model.live.contains_key(&d.id)) {
        assert!(
            maybe_registered.contains(&d.node),
            "a device nobody registered: {d:?}"
        );
        landed.insert(d.node, d.clone());
    }
    landed
}

/// What one round did, for the report.
struct RoundStats {
    kill_after: usize,
    /// Aimed at an unanswered commit, and whether the aim found one.
    aimed: Option<bool>,
    acked_regs: usize,
    acked_removals: usize,
    in_flight_at_kill: usize,
    unknown_regs: usize,
    unknown_regs_landed: usize,
    unknown_removals: usize,
    unknown_removals_landed: usize,
    cut_off_by: String,
    took: Duration,
}

impl std::fmt::Display for RoundStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let aim = match self.aimed {
            None => "at once",
            Some(true) => "aimed, at an unanswered commit",
            Some(false) => "aimed, but no unanswered commit seen",
        };
        write!(
            f,
            "SIGKILL after {} acked registrations (wanted {}, {aim}) and {} acked removals, \
             {} requests in flight; cut off: {} registrations ({} had landed), \
             {} removals ({} had landed), e.g. {:?}; {:?}",
            self.acked_regs,
            self.kill_after,
            self.acked_removals,
            self.in_flight_at_kill,
            self.unknown_regs,
            self.unknown_regs_landed,
            self.unknown_removals,
            self.unknown_removals_landed,
            self.cut_off_by,
            self.took,
        )
    }
}

/// One round: a burst on `server`, SIGKILL after a random number of
/// acknowledged registrations, the checks, and the restarted server.
async fn crash_round(
    fx: &Fixture,
    model: &mut Model,
    server: Server,
    round: usize,
    rng: &mut Rng,
) -> (Server, RoundStats) {
    let started = Instant::now();
    let (range, aimed) = match &ROUNDS[round] {
        Aim::Acked(r) => (r, false),
        Aim::Unanswered(r) => (r, true),
    };
    let kill_after = rng.in_range(range.clone());
    // Opened before the burst, so the aimed kill waits on no connect.
    let mut watcher = connect(&fx.db()).await;
    let (acked, mut acked_rx) = watch::channel(0);
    let burst = Arc::new(Burst {
        base: server.base.clone(),
        token: fx.token.clone(),
        auth_key: fx.auth_key.clone(),
        proof_key: proof_key(&server.base).await,
        round,
        stop: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
        acked,
        removable: Mutex::new(model.live.values().cloned().collect()),
    });
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| tokio::spawn(burst.clone().worker(w, Rng::new(rng.next()))))
        .collect();
    tokio::time::timeout(BURST_TIMEOUT, acked_rx.wait_for(|n| *n >= kill_after))
        .await
        .unwrap_or_else(|_| panic!("fewer than {kill_after} registrations in {BURST_TIMEOUT:?}"))
        .unwrap();
    let aim_hit = aimed && unanswered_commit(&mut watcher, model.created(), &acked_rx).await;
    burst.stop.store(true, Ordering::SeqCst);
    let in_flight_at_kill = burst.in_flight.load(Ordering::SeqCst);
    server.kill9().await;
    watcher.close().await.unwrap();
    let mut ops = Vec::new();
    for w in workers {
        ops.extend(w.await.unwrap());
    }
    let s = sort_ops(ops);
    assert!(s.acked_regs.len() >= kill_after);
    assert!(!s.acked_removals.is_empty(), "no removal was acknowledged");
    assert!(in_flight_at_kill > 0, "nothing was in flight at the kill");
    assert!(
        !s.unknown_regs.is_empty() || !s.unknown_removals.is_empty(),
        "the kill cut off no request"
    );
    for d in &s.acked_regs {
        assert!(
            model.live.insert(d.id, d.clone()).is_none(),
            "id {} answered twice",
            d.id
        );
    }
    for d in &s.acked_removals {
        let gone = model
            .live
            .remove(&d.id)
            .expect("removed an acknowledged device");
        model.removed.insert(d.id, gone);
    }

    // The file as the crash left it, before any coordinator code runs.
    let db = read_db(&fx.db()).await;
    check_db(&db);
    check_acknowledged(
        &db_devices(&db),
        model,
        &s.unknown_removals,
        &s.unknown_regs,
    );

    // The same through the restarted coordinator.
    let server = Server::start(&fx.state_dir).await;
    let http = http_client();
    let before = listed(&http, &server.base, &fx.token).await;
    let landed = check_acknowledged(&before, model, &s.unknown_removals, &s.unknown_regs);
    let unknown_removals_landed = s
        .unknown_removals
        .iter()
        .filter(|d| !before.contains_key(&d.id))
        .count();

    // Cut-off requests, re-sent, converge on one outcome.
    for sent in &s.unknown_regs {
        let dev = match register(&http, &server.base, sent).await {
            Outcome::Acked(r) => Device::answered(sent, r),
            other => panic!("re-sent registration: {other:?}"),
        };
        match landed.get(&sent.node) {
            Some(made) => assert_eq!(&dev, made, "the re-send must find the device it made"),
            None => assert!(
                !model.live.contains_key(&dev.id) && !model.removed.contains_key(&dev.id),
                "re-send answered with another device's id: {dev:?}"
            ),
        }
        model.live.insert(dev.id, dev);
    }
    for d in &s.unknown_removals {
        match remove(&http, &server.base, &fx.token, d.id).await {
            Outcome::Acked(_) if before.contains_key(&d.id) => {}
            Outcome::Refused(StatusCode::NOT_FOUND, _) if !before.contains_key(&d.id) => {}
            other => panic!("re-sent removal of {d:?}: {other:?}"),
        }
        let gone = model.live.remove(&d.id).unwrap();
        model.removed.insert(d.id, gone);
    }

    // The restarted coordinator takes new registrations.
    let fresh = registration(&burst.proof_key, &fx.auth_key, &format!("fresh-{round}"));
    let dev = match register(&http, &server.base, &fresh).await {
        Outcome::Acked(r) => Device::answered(&fresh, r),
        other => panic!("registration after restart: {other:?}"),
    };
    assert!(model.live.insert(dev.id, dev).is_none());

    // Now everything is known: API and file match the model exactly.
    assert_eq!(listed(&http, &server.base, &fx.token).await, model.live);
    let db = read_db(&fx.db()).await;
    check_db(&db);
    assert_eq!(db_devices(&db), model.live, "devices in the file");
    assert_eq!(
        db.used_count as usize,
        model.created(),
        "devices ever created"
    );
    assert_eq!(db.removed.len(), model.removed.len(), "removals");

    let stats = RoundStats {
        kill_after,
        aimed: aimed.then_some(aim_hit),
        acked_regs: s.acked_regs.len(),
        acked_removals: s.acked_removals.len(),
        in_flight_at_kill,
        unknown_regs: s.unknown_regs.len(),
        unknown_regs_landed: landed.len(),
        unknown_removals: s.unknown_removals.len(),
        unknown_removals_landed,
        cut_off_by: s.cut_off_by.clone().unwrap_or_default(),
        took: started.elapsed(),
    };
    (server, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_a_burst_of_writes_loses_and_doubles_nothing() {
    let seed = std::env::var("CRASH_TEST_SEED")
        .ok()
        .map(|s| s.parse().expect("CRASH_TEST_SEED is a number"))
        .unwrap_or_else(|| OsRng.next_u64());
    eprintln!("CRASH_TEST_SEED={seed}");
    let mut rng = Rng::new(seed);
    let started = Instant::now();

    let fx = Fixture::new().await;
    let mut server = Server::start(&fx.state_dir).await;
    let mut model = Model::default();
    let http = http_client();
    let key = proof_key(&server.base).await;
    for i in 0..SEED_DEVICES {
        let sent = registration(&key, &fx.auth_key, &format!("seed-{i}"));
        match register(&http, &server.base, &sent).await {
            Outcome::Acked(r) => {
                let d = Device::answered(&sent, r);
                model.live.insert(d.id, d);
            }
            other => panic!("seed registration: {other:?}"),
        }
    }

    for round in 0..ROUNDS.len() {
        let (restarted, st) = crash_round(&fx, &mut model, server, round, &mut rng).await;
        server = restarted;
        eprintln!("round {round}: {st}");
    }
    server.kill9().await;
    eprintln!(
        "{} devices live, {} removed, in {:?}",
        model.live.len(),
        model.removed.len(),
        started.elapsed()
    );
}
