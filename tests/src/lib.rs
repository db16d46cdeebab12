//! A lab of Linux network namespaces for Crank Mesh: a switch namespace with
//! a bridge, hosts joined to it by veth pairs, and helpers to run the
//! coordinator, `meshd` daemons and plain tools inside them. Everything it
//! creates is removed when the [`Lab`] is dropped.
//!
//! Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;

/// Port the coordinator listens on inside its namespace.
pub const COORDINATOR_PORT: u16 = 8080;

/// Where the workspace's binaries are: next to (or one above) this executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    for _ in 0..2 {
        let candidate = dir.join(name);
        if candidate.exists() {
            return candidate;
        }
        dir = dir.parent().map(Path::to_path_buf).unwrap_or(dir);
    }
    panic!("binary {name} not found near {}: build the workspace first (cargo build --workspace --bins)", exe.display())
}

/// Runs a network-namespace test in a fresh lab: needs root; prints the
/// lab's logs and fails on error; the lab is removed either way.
pub fn run_lab(test: impl FnOnce(&mut Lab) -> anyhow::Result<()>) {
    assert!(
        is_root(),
        "network-namespace tests need root (run the README's test command)"
    );
    let mut lab = Lab::new().expect("creating the lab");
    if let Err(e) = test(&mut lab) {
        eprintln!("{}", lab.logs());
        panic!("{e:#}");
    }
}

/// `main` of a lab program (demo, benchmarks): needs root, runs `job` in a
/// fresh lab, prints the lab's logs on failure; the lab is removed either way.
pub fn lab_main(
    what: &str,
    job: impl FnOnce(&mut Lab) -> anyhow::Result<()>,
) -> std::process::ExitCode {
    if !is_root() {
        eprintln!("run the {what} as root: it creates network namespaces");
        return std::process::ExitCode::FAILURE;
    }
    let result = Lab::new().and_then(|mut lab| {
        let r = job(&mut lab);
        if r.is_err() {
            eprintln!("{}", lab.logs());
        }
        r
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{what} failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The resolver every lab namespace's resolv.conf names before MagicDNS
/// rewrites it (10.99.0.53, on the lab's bridge: a test may run a DNS
/// server there).
pub const LAB_RESOLVER: &str = "10.99.0.53";

/// Files `ip netns exec NS` mounts over `/etc`.
pub fn netns_etc(ns: &str) -> PathBuf {
    Path::new("/etc/netns").join(ns)
}

/// A set of namespaces on one bridge (10.99.0.0/24 underlay).
pub struct Lab {
    prefix: String,
    switch: String,
    hosts: Vec<String>,
    children: Vec<Child>,
    pub dir: PathBuf,
}

impl Lab {
    pub fn new() -> anyhow::Result<Lab> {
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("cm{}x{n}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("crank-lab-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let switch = format!("{prefix}-sw");
        let lab = Lab {
            prefix,
            switch: switch.clone(),
            hosts: Vec::new(),
            children: Vec::new(),
            dir,
        };
        ip(&["netns", "add", &switch])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        ip(&["-n", &switch, "link", "set", "lo", "up"])?;
        Ok(lab)
    }

    /// Adds a host namespace with `eth0` at 10.99.0.`last`/24 on the bridge.
    pub fn host(&mut self, name: &str, last: u8) -> anyhow::Result<Host> {
        let ns = format!("{}-{name}", self.prefix);
        self.add_namespace(&ns)?;
        let port = format!("p{last}");
        ip(&[
            "-n",
            &self.switch,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ])?;
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &port,
            "master",
            "br0",
            "up",
        ])?;
        let addr = Ipv4Addr::new(10, 99, 0, last);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(Host {
            ns,
            addr,
            name: name.to_owned(),
        })
    }

    /// Adds a NAT router on the bridge at 10.99.0.`last` and a host behind it
    /// on its own LAN (192.168.`last`.2/24), masqueraded to the router's
    /// address. `nat` picks the mapping behaviour. Like a home router, it
    /// drops unsolicited packets from outside (before they leave conntrack
    /// entries that would change later mappings).
    pub fn host_behind_nat(
        &mut self,
        name: &str,
        last: u8,
        nat: Nat,
    ) -> anyhow::Result<(Host, Host)> {
        let router = self.host(&format!("{name}-nat"), last)?;
        let ns = format!("{}-{name}", self.prefix);
        self.add_namespace(&ns)?;
        ip(&[
            "-n", &router.ns, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ])?;
        let lan = |h: u8| format!("192.168.{last}.{h}");
        ip(&[
            "-n",
            &router.ns,
            "addr",
            "add",
            &format!("{}/24", lan(1)),
            "dev",
            "lan0",
        ])?;
        ip(&["-n", &router.ns, "link", "set", "lan0", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", lan(2)),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "route", "add", "default", "via", &lan(1)])?;
        router.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let flags = match nat {
            Nat::EndpointIndependent => "",
            Nat::Symmetric => " fully-random",
        };
        let rules = format!(
            "table ip crank_nat {{\n\
               chain post {{ type nat hook postrouting priority 100; oifname \"eth0\" masquerade{flags}; }}\n\
               chain wan {{ type filter hook prerouting priority -150; iifname \"eth0\" ct state new drop; }}\n\
             }}\n"
        );
        router.run(
            "bash",
            &["-c", &format!("printf '%s' '{rules}' | nft -f -")],
        )?;
        let host = Host {
            ns,
            addr: Ipv4Addr::new(192, 168, last, 2),
            name: name.to_owned(),
        };
        Ok((router, host))
    }

    /// A coordinator (network `home`) and one relay on the bridge, the
    /// relay named in the coordinator's relay map.
    pub fn coordinator_and_relay(&mut self) -> anyhow::Result<(Coordinator, Relay)> {
        let coord_host = self.host("coord", 1)?;
        let relay_host = self.host("relay", 2)?;
        let map = Relay::map_json(relay_host.addr);
        let coord = Coordinator::start_with_relays(self, coord_host, "home", Some(&map))?;
        let relay = Relay::start(self, relay_host, &coord)?;
        Ok((coord, relay))
    }

    /// Creates a host namespace with a resolv.conf of its own: `ip netns
    /// exec` mounts `/etc/netns/NS/resolv.conf` over `/etc/resolv.conf`, so
    /// what a device's MagicDNS writes there stays in the namespace.
    fn add_namespace(&mut self, ns: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", ns])?;
        self.hosts.push(ns.to_owned());
        let dir = netns_etc(ns);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("resolv.conf"),
            format!("# resolver of lab namespace {ns}\nnameserver {LAB_RESOLVER}\n"),
        )?;
        Ok(())
    }

    /// Starts a long-running process in `host`; it is killed with the lab.
    pub fn spawn(
        &mut self,
        host: &Host,
        program: &Path,
        args: &[&str],
        log: &str,
    ) -> anyhow::Result<u32> {
        let log_file = std::fs::File::create(self.dir.join(log))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &host.ns])
            .arg(program)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Kills a process started with [`Lab::spawn`] at once (SIGKILL): a
    /// crash, with no chance to clean up.
    pub fn kill(&mut self, pid: u32) {
        if let Some(pos) = self.children.iter().position(|c| c.id() == pid) {
            let mut child = self.children.remove(pos);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops a process started with [`Lab::spawn`] (SIGTERM, then SIGKILL).
    pub fn stop(&mut self, pid: u32) {
        if let Some(pos) = self.children.iter().position(|c| c.id() == pid) {
            let mut child = self.children.remove(pos);
            terminate(&mut child);
        }
    }

    /// The lab's log files, for a failing test to print.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(40).collect();
                    out.push_str(&format!("==== {} ====\n", e.path().display()));
                    for l in tail.iter().rev() {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
            }
        }
        out
    }
}

fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Lab {
    fn drop(&mut self) {
        for mut c in self.children.drain(..).rev() {
            terminate(&mut c);
        }
        for ns in self.hosts.iter().chain(std::iter::once(&self.switch)) {
            // Kill anything still running in the namespace, then remove it.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = std::fs::remove_dir_all(netns_etc(ns));
        }
        if std::env::var_os("CRANK_KEEP_LAB").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// How a lab NAT maps a host's UDP flows.
#[derive(Clone, Copy, Debug)]
pub enum Nat {
    /// One public port per host port, whatever the destination (Linux
    /// masquerade keeps the source port); replies only from where it sent.
    EndpointIndependent,
    /// A fresh random port per destination.
    Symmetric,
}

/// A namespace in the lab.
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    pub addr: Ipv4Addr,
    pub name: String,
}

impl Host {
    /// Runs a command inside the namespace and returns its output, failing
    /// on a non-zero exit.
    pub fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = run(Command::new("ip")
            .args(["netns", "exec", &self.ns, program])
            .args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// POSTs `body` as JSON with curl from this host; returns the HTTP status
    /// and the body (as JSON when it is JSON, else as a string).
    pub fn post_json(&self, url: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let out = self.run(
            "curl",
            &[
                "-sS",
                "--max-time",
                "30",
                "-w",
                "\n%{http_code}",
                "-H",
                "content-type: application/json",
                "-d",
                &body.to_string(),
                url,
            ],
        )?;
        let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
        Ok((
            code.parse()?,
            serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned())),
        ))
    }

    /// An HTTP request with curl from this host: the status, the response
    /// headers (lower-case names) and the body (JSON when it is JSON).
    pub fn http(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> anyhow::Result<HttpAnswer> {
        let body_text = body.map(Value::to_string);
        let mut args = vec!["-sS", "-i", "--max-time", "120", "-X", method];
        let header_lines: Vec<String> = headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        for h in &header_lines {
            args.extend(["-H", h]);
        }
        if let Some(b) = &body_text {
            args.extend(["-H", "content-type: application/json", "--data-binary", b]);
        }
        args.push(url);
        let out = self.run("curl", &args)?;
        HttpAnswer::parse(&out)
    }

    /// Like [`Host::run`], but only says whether it succeeded.
    pub fn succeeds(&self, program: &str, args: &[&str]) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, program])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Drops all UDP between this host and `peer`, both directions (nftables).
    pub fn block_udp_with(&self, peer: &Host) -> anyhow::Result<()> {
        let rules = format!(
            "table inet crank_block {{\n\
               chain out {{ type filter hook output priority 0; ip daddr {p} meta l4proto udp drop; }}\n\
               chain in {{ type filter hook input priority 0; ip saddr {p} meta l4proto udp drop; }}\n\
             }}\n",
            p = peer.addr
        );
        self.run(
            "bash",
            &["-c", &format!("printf '%s' '{rules}' | nft -f -")],
        )
        .map(drop)
    }

    /// Drops UDP that this host (a router) forwards to `to`, or stops
    /// dropping it: a path that dies in one direction only.
    pub fn cut_udp_to(&self, to: Ipv4Addr, cut: bool) -> anyhow::Result<()> {
        let table = format!("crank_cut_{}", to.to_string().replace('.', "_"));
        if !cut {
            return self
                .run("nft", &["delete", "table", "inet", &table])
                .map(drop);
        }
        let rules = format!(
            "table inet {table} {{\n\
               chain cut {{ type filter hook forward priority 0; ip daddr {to} meta l4proto udp drop; }}\n\
             }}\n"
        );
        self.run(
            "bash",
            &["-c", &format!("printf '%s' '{rules}' | nft -f -")],
        )
        .map(drop)
    }

    /// Pings `target` 20 times a second for `secs` seconds in a thread;
    /// the thread returns when each answer came (seconds since the epoch).
    pub fn ping_stream(
        &self,
        target: &str,
        secs: u32,
    ) -> std::thread::JoinHandle<anyhow::Result<Vec<f64>>> {
        let (ns, target) = (self.ns.clone(), target.to_owned());
        std::thread::spawn(move || {
            // Lost answers make ping exit non-zero: read its output anyway.
            let out = Command::new("ip")
                .args(["netns", "exec", &ns, "ping", "-D", "-n", "-i", "0.05"])
                .args(["-w", &secs.to_string(), &target])
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("bytes from"))
                .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
                .collect())
        })
    }

    /// One ping to `target` with a one-second wait.
    pub fn ping(&self, target: &str) -> bool {
        self.succeeds("ping", &["-c", "1", "-W", "1", target])
    }

    /// Waits until something accepts TCP connections on `addr:port`.
    pub fn wait_tcp(&self, addr: &str, port: u16, timeout: Duration) -> anyhow::Result<()> {
        let script = format!("exec 3<>/dev/tcp/{addr}/{port}");
        wait_until(
            timeout,
            &format!("{addr}:{port} accepting in {}", self.name),
            || self.succeeds("bash", &["-c", &script]),
        )
    }
}

/// An HTTP answer as [`Host::http`] returns it.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: std::collections::BTreeMap<String, String>,
    pub body: Value,
}

impl HttpAnswer {
    /// Parses curl's `-i` output (the last header block wins: a `100
    /// Continue` comes first).
    pub fn parse(out: &str) -> anyhow::Result<HttpAnswer> {
        let mut rest = out;
        loop {
            let (head, body) = rest
                .split_once("\r\n\r\n")
                .with_context(|| format!("no HTTP header block in {out:?}"))?;
            let mut lines = head.lines();
            let status_line = lines.next().unwrap_or_default();
            let status: u16 = status_line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .with_context(|| format!("status line {status_line:?}"))?;
            if status == 100 {
                rest = body;
                continue;
            }
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            return Ok(HttpAnswer {
                status,
                headers,
                body: serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned())),
            });
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Lays out a laptop's power supplies under `root` as `/sys/class/power_supply`
/// shows them (for `meshd daemon --sys-root`): on external power or on
/// battery at 80 %.
pub fn fake_power_supply(root: &Path, on_ac: bool) -> anyhow::Result<()> {
    let ps = root.join("sys/class/power_supply");
    for (dir, file, value) in [
        ("AC", "type", "Mains"),
        ("AC", "online", if on_ac { "1" } else { "0" }),
        ("BAT0", "type", "Battery"),
        ("BAT0", "capacity", "80"),
        (
            "BAT0",
            "status",
            if on_ac { "Charging" } else { "Discharging" },
        ),
    ] {
        std::fs::create_dir_all(ps.join(dir))?;
        std::fs::write(ps.join(dir).join(file), format!("{value}\n"))?;
    }
    std::fs::create_dir_all(root.join("proc"))?;
    std::fs::copy("/proc/meminfo", root.join("proc/meminfo"))?;
    Ok(())
}

/// The longest time without an answer in `answers` (seconds since the
/// epoch) between `from` and `to`.
pub fn longest_gap(answers: &[f64], from: f64, to: f64) -> f64 {
    let mut last = from;
    let mut gap: f64 = 0.0;
    for &t in answers.iter().filter(|t| **t >= from && **t <= to) {
        gap = gap.max(t - last);
        last = t;
    }
    gap.max(to - last)
}

/// Seconds since the epoch, as `ping -D` prints them.
pub fn epoch_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A coordinator running in its own namespace, with one network and a
/// reusable pre-auth key.
pub struct Coordinator {
    pub host: Host,
    pub url: String,
    /// The private CA its certificate chains to, when it serves TLS.
    pub ca_file: Option<PathBuf>,
    pub admin_token: String,
    pub auth_key: String,
    pub network: String,
    pub pid: u32,
    state: String,
    /// `coordinator serve` arguments, for [`Coordinator::restart`].
    serve_args: Vec<String>,
}

impl Coordinator {
    pub fn start(lab: &mut Lab, host: Host, network: &str) -> anyhow::Result<Coordinator> {
        Self::start_with_relays(lab, host, network, None)
    }

    /// Like [`Coordinator::start`], delivering `relay_map` (JSON) in netmaps.
    /// Plain HTTP (`--insecure-http`), as the lab's underlay is private.
    pub fn start_with_relays(
        lab: &mut Lab,
        host: Host,
        network: &str,
        relay_map: Option<&str>,
    ) -> anyhow::Result<Coordinator> {
        Self::start_with(lab, host, network, relay_map, false)
    }

    /// Like [`Coordinator::start`], serving TLS with a certificate for its
    /// address from a private CA made in the lab ([`Coordinator::ca_file`]).
    pub fn start_tls(lab: &mut Lab, host: Host, network: &str) -> anyhow::Result<Coordinator> {
        Self::start_with(lab, host, network, None, true)
    }

    fn start_with(
        lab: &mut Lab,
        host: Host,
        network: &str,
        relay_map: Option<&str>,
        tls: bool,
    ) -> anyhow::Result<Coordinator> {
        let state = lab.dir.join("coordinator");
        let state = state.to_str().context("utf-8 path")?.to_owned();
        let coord = bin("coordinator");
        let c = coord.to_str().context("utf-8 path")?;
        let admin_token = host
            .run(c, &["init", "--state-dir", &state])?
            .trim()
            .to_owned();
        host.run(c, &["network", "create", network, "--state-dir", &state])?;
        let auth_key = host
            .run(
                c,
                &[
                    "preauth-key",
                    "create",
                    "--network",
                    network,
                    "--reusable",
                    "--state-dir",
                    &state,
                ],
            )?
            .trim()
            .to_owned();
        let listen = format!("{}:{COORDINATOR_PORT}", host.addr);
        let mut args = vec![
            "serve".to_owned(),
            "--state-dir".to_owned(),
            state.clone(),
            "--listen".to_owned(),
            listen.clone(),
        ];
        let ca_file = if tls {
            let (ca, cert, key) = lab_ca(&lab.dir, host.addr)?;
            for (flag, path) in [("--tls-cert", cert), ("--tls-key", key)] {
                args.extend([flag.to_owned(), path.to_str().context("utf-8")?.to_owned()]);
            }
            Some(ca)
        } else {
            args.push("--insecure-http".to_owned());
            None
        };
        if let Some(map) = relay_map {
            let path = lab.dir.join("relay-map.json");
            std::fs::write(&path, map)?;
            args.extend([
                "--relay-map".to_owned(),
                path.to_str().context("utf-8")?.to_owned(),
            ]);
        }
        let pid = Self::serve(lab, &host, &args)?;
        Ok(Coordinator {
            url: format!("{}://{listen}", if tls { "https" } else { "http" }),
            ca_file,
            host,
            admin_token,
            auth_key,
            network: network.to_owned(),
            pid,
            state,
            serve_args: args,
        })
    }

    fn serve(lab: &mut Lab, host: &Host, args: &[String]) -> anyhow::Result<u32> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let pid = lab.spawn(host, &bin("coordinator"), &args, "coordinator.log")?;
        host.wait_tcp(
            &host.addr.to_string(),
            COORDINATOR_PORT,
            Duration::from_secs(10),
        )?;
        Ok(pid)
    }

    /// Stops the coordinator (devices keep their netmaps and tunnels).
    pub fn stop(&mut self, lab: &mut Lab) {
        lab.stop(self.pid);
    }

    /// Serves again on the same state directory and address.
    pub fn restart(&mut self, lab: &mut Lab) -> anyhow::Result<()> {
        lab.stop(self.pid);
        self.pid = Self::serve(lab, &self.host, &self.serve_args)?;
        Ok(())
    }

    /// Stops this coordinator and serves another in its place: same address,
    /// same TLS certificate, its own fresh database (so its own identity
    /// key) with a network of the same name — what someone holding a
    /// certificate for the coordinator's name could stand up.
    pub fn impostor(&mut self, lab: &mut Lab) -> anyhow::Result<Coordinator> {
        lab.stop(self.pid);
        let state = lab.dir.join("impostor");
        let state = state.to_str().context("utf-8 path")?.to_owned();
        let coord = bin("coordinator");
        let c = coord.to_str().context("utf-8 path")?;
        let admin_token = self
            .host
            .run(c, &["init", "--state-dir", &state])?
            .trim()
            .to_owned();
        self.host.run(
            c,
            &["network", "create", &self.network, "--state-dir", &state],
        )?;
        let auth_key = self
            .host
            .run(
                c,
                &[
                    "preauth-key",
                    "create",
                    "--network",
                    &self.network,
                    "--reusable",
                    "--state-dir",
                    &state,
                ],
            )?
            .trim()
            .to_owned();
        let mut args = self.serve_args.clone();
        if let Some(i) = args.iter().position(|a| a == "--state-dir") {
            args[i + 1] = state.clone();
        }
        let pid = Self::serve(lab, &self.host, &args)?;
        Ok(Coordinator {
            url: self.url.clone(),
            ca_file: self.ca_file.clone(),
            host: self.host.clone(),
            admin_token,
            auth_key,
            network: self.network.clone(),
            pid,
            state,
            serve_args: args,
        })
    }

    /// A relay token, written to a file in the lab.
    pub fn relay_token_file(&self, lab: &Lab, name: &str) -> anyhow::Result<PathBuf> {
        let coord = bin("coordinator");
        let token = self.host.run(
            coord.to_str().context("utf-8")?,
            &[
                "relay-token",
                "create",
                "--name",
                name,
                "--state-dir",
                &self.state,
            ],
        )?;
        let path = lab.dir.join(format!("{name}.token"));
        std::fs::write(&path, token.trim())?;
        // The relay refuses secret files others can read.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(path)
    }

    /// Calls the admin API with curl from the coordinator's namespace.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.url);
        let auth = format!("authorization: Bearer {}", self.admin_token);
        let mut args = vec![
            "-sS",
            "--fail-with-body",
            "-X",
            method,
            "-H",
            &auth,
            "-H",
            "content-type: application/json",
        ];
        if let Some(b) = body {
            args.extend(["--data", b]);
        }
        if let Some(ca) = &self.ca_file {
            args.extend(["--cacert", ca.to_str().context("utf-8")?]);
        }
        args.push(&url);
        let out = self.host.run("curl", &args)?;
        Ok(serde_json::from_str(&out).unwrap_or(Value::String(out)))
    }
}

/// Writes a private CA and a certificate for `addr` signed by it to `dir`;
/// returns the paths of the CA, the certificate and its key (PEM).
fn lab_ca(dir: &Path, addr: Ipv4Addr) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Crank lab CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec![addr.to_string()])?.signed_by(&key, &ca)?;
    let paths = (
        dir.join("coordinator-ca.pem"),
        dir.join("coordinator.crt"),
        dir.join("coordinator.key"),
    );
    std::fs::write(&paths.0, ca.pem())?;
    std::fs::write(&paths.1, cert.pem())?;
    std::fs::write(&paths.2, key.serialize_pem())?;
    Ok(paths)
}

/// A `meshd` daemon in its own namespace.
pub struct Device {
    pub host: Host,
    pub socket: String,
    pub state_dir: String,
    pub pid: u32,
    extra: Vec<String>,
}

impl Device {
    pub fn start(lab: &mut Lab, host: Host) -> anyhow::Result<Device> {
        Self::start_with(lab, host, &[])
    }

    /// Like [`Device::start`], with extra `meshd daemon` flags.
    pub fn start_with(lab: &mut Lab, host: Host, extra: &[&str]) -> anyhow::Result<Device> {
        let state_dir = lab
            .dir
            .join(format!("{}-state", host.name))
            .to_str()
            .context("utf-8")?
            .to_owned();
        let socket = lab
            .dir
            .join(format!("{}.sock", host.name))
            .to_str()
            .context("utf-8")?
            .to_owned();
        let pid = Self::spawn_daemon(lab, &host, &state_dir, &socket, extra)?;
        Ok(Device {
            host,
            socket,
            state_dir,
            pid,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn spawn_daemon(
        lab: &mut Lab,
        host: &Host,
        state_dir: &str,
        socket: &str,
        extra: &[&str],
    ) -> anyhow::Result<u32> {
        let log = format!("meshd-{}.log", host.name);
        let mut args = vec!["--socket", socket, "daemon", "--state-dir", state_dir];
        args.extend_from_slice(extra);
        let pid = lab.spawn(host, &bin("meshd"), &args, &log)?;
        wait_until(Duration::from_secs(10), "meshd socket", || {
            Path::new(socket).exists()
        })?;
        Ok(pid)
    }

    /// Stops the daemon (SIGTERM: a clean shutdown).
    pub fn stop(&mut self, lab: &mut Lab) {
        lab.stop(self.pid);
    }

    /// Starts the daemon again on the same state directory.
    pub fn restart(&mut self, lab: &mut Lab) -> anyhow::Result<()> {
        lab.stop(self.pid);
        let _ = std::fs::remove_file(&self.socket);
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.pid = Self::spawn_daemon(lab, &self.host, &self.state_dir, &self.socket, &extra)?;
        Ok(())
    }

    pub fn meshd(&self, args: &[&str]) -> anyhow::Result<String> {
        let meshd = bin("meshd");
        let mut all = vec!["--socket", &self.socket];
        all.extend_from_slice(args);
        self.host.run(meshd.to_str().context("utf-8")?, &all)
    }

    /// `meshd up` to `coord`, with its CA file when it serves TLS.
    pub fn up(&self, coord: &Coordinator) -> anyhow::Result<String> {
        let mut args = vec![
            "up",
            "--coordinator",
            &coord.url,
            "--auth-key",
            &coord.auth_key,
            "--hostname",
            &self.host.name,
        ];
        if let Some(ca) = &coord.ca_file {
            args.extend(["--ca-file", ca.to_str().context("utf-8")?]);
        }
        self.meshd(&args)
    }

    /// Waits (up to 15 s) until the device says it is connected to its
    /// home relay.
    pub fn wait_home_relay(&self) -> anyhow::Result<()> {
        wait_until(
            Duration::from_secs(15),
            &format!("{} on its home relay", self.host.name),
            || {
                self.status()
                    .is_ok_and(|s| s["self"]["home_relay_connected"] == true)
            },
        )
    }

    pub fn status(&self) -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&self.meshd(&["status", "--json"])?)?)
    }

    /// This device's overlay addresses (IPv4, IPv6) from its status.
    pub fn overlay(&self) -> anyhow::Result<(String, String)> {
        let st = self.status()?;
        let addrs = st["self"]["addresses"]
            .as_array()
            .context("no self addresses in status")?;
        let get = |i: usize| {
            addrs
                .get(i)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .context("address missing")
        };
        Ok((get(0)?, get(1)?))
    }

    /// The status entry of the peer called `name`.
    pub fn peer(&self, name: &str) -> anyhow::Result<Option<Value>> {
        let st = self.status()?;
        Ok(st["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name).cloned()))
    }
}

/// A relay (derp-relay) in its own namespace, admitting the coordinator's devices.
pub struct Relay {
    pub host: Host,
    pub url: String,
    pub pid: u32,
}

/// Port of the relay's HTTP listener and of its two STUN responders.
pub const RELAY_PORT: u16 = 3340;
pub const STUN_PORT: u16 = 3478;
pub const STUN_PORT_2: u16 = 3479;

impl Relay {
    /// The relay map naming one region ("lab", id 1) served by a relay at `addr`.
    pub fn map_json(addr: Ipv4Addr) -> String {
        format!(
            r#"{{"regions":[{{"id":1,"code":"lab","urls":["http://{addr}:{RELAY_PORT}/derp"],"stun":["{addr}:{STUN_PORT}","{addr}:{STUN_PORT_2}"]}}]}}"#
        )
    }

    pub fn start(lab: &mut Lab, host: Host, coord: &Coordinator) -> anyhow::Result<Relay> {
        let token = coord.relay_token_file(lab, &host.name)?;
        let key = lab.dir.join(format!("{}.key", host.name));
        let listen = format!("{}:{RELAY_PORT}", host.addr);
        let stun = format!("{}:{STUN_PORT}", host.addr);
        let stun2 = format!("{}:{STUN_PORT_2}", host.addr);
        let mut args = vec![
            "--listen",
            &listen,
            "--stun-listen",
            &stun,
            "--stun-listen",
            &stun2,
            "--coordinator",
            &coord.url,
            "--token-file",
            token.to_str().context("utf-8")?,
            "--key-file",
            key.to_str().context("utf-8")?,
        ];
        if let Some(ca) = &coord.ca_file {
            args.extend(["--coordinator-ca-file", ca.to_str().context("utf-8")?]);
        }
        let pid = lab.spawn(
            &host,
            &bin("derp-relay"),
            &args,
            &format!("relay-{}.log", host.name),
        )?;
        host.wait_tcp(&host.addr.to_string(), RELAY_PORT, Duration::from_secs(10))?;
        Ok(Relay {
            url: format!("http://{listen}"),
            host,
            pid,
        })
    }

    /// The relay's Prometheus metrics.
    pub fn metrics(&self) -> anyhow::Result<String> {
        self.host.run(
            "curl",
            &["-sS", "--max-time", "5", &format!("{}/metrics", self.url)],
        )
    }
}

/// Downloads `/bytes/N` from an `overlay-httpd` at `url_base`, inside
/// `from`, and checks the body against the server's SHA-256 header.
pub fn transfer(lab: &Lab, from: &Host, url_base: &str, n: usize) -> anyhow::Result<()> {
    let file = lab.dir.join(format!("download-{}", from.name));
    let file = file.to_str().context("utf-8 path")?;
    let script = format!(
        "curl -sS --max-time 60 -D - -o {file} {url_base}/bytes/{n} | tr -d '\\r' | sed -n 's/^x-sha256: //p'; sha256sum {file} | cut -d' ' -f1"
    );
    let out = from.run("bash", &["-c", &script])?;
    let lines: Vec<&str> = out.lines().collect();
    anyhow::ensure!(
        lines.len() == 2 && lines[0] == lines[1] && lines[0].len() == 64,
        "transfer from {url_base} corrupt: {out}"
    );
    let size = std::fs::metadata(file)?.len();
    anyhow::ensure!(
        size == n as u64,
        "transfer from {url_base}: {size} of {n} bytes"
    );
    Ok(())
}

/// Serves `overlay-httpd` on `addr:8000` in `host` and waits until it answers.
pub fn serve_http(lab: &mut Lab, host: &Host, addr: &str) -> anyhow::Result<String> {
    lab.spawn(
        host,
        &bin("overlay-httpd"),
        &[&format!("{addr}:8000"), &host.name],
        &format!("httpd-{}.log", host.name),
    )?;
    host.wait_tcp(addr, 8000, Duration::from_secs(5))?;
    Ok(format!("http://{addr}:8000"))
}

/// Where the test command and the demo keep the models (`$CRANK_MODELS_DIR`,
/// default `~/.cache/crank-mesh/models`).
pub fn models_dir() -> String {
    std::env::var("CRANK_MODELS_DIR").unwrap_or_else(|_| {
        format!(
            "{}/.cache/crank-mesh/models",
            std::env::var("HOME").unwrap_or_default()
        )
    })
}

/// TCP throughput (Mbit/s, as the receiver counted it) of a `secs`-second
/// iperf3 run from `client` to a server started in `server` on
/// `server_ip`, which is stopped afterwards.
pub fn iperf_mbps(
    lab: &mut Lab,
    client: &Host,
    server: &Host,
    server_ip: &str,
    secs: u32,
) -> anyhow::Result<f64> {
    let pid = lab.spawn(
        server,
        Path::new("iperf3"),
        &["-s", "-B", server_ip],
        "iperf3.log",
    )?;
    let result = (|| {
        server.wait_tcp(server_ip, 5201, Duration::from_secs(5))?;
        let out = client.run("iperf3", &["-c", server_ip, "-t", &secs.to_string(), "-J"])?;
        let v: Value = serde_json::from_str(&out)?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e6)
            .context("no iperf3 result")
    })();
    lab.stop(pid);
    result
}

/// An iperf3 TCP stream from `from` to an iperf3 server started in `server`
/// on `server_ip`, running in the background: join the handle for iperf3's
/// JSON report. `rate` limits the sender (e.g. `20M`), so the stream spans
/// its whole duration instead of filling the receiver's buffers at once.
pub fn iperf_stream(
    lab: &mut Lab,
    from: &Host,
    server: &Host,
    server_ip: &str,
    secs: u32,
    rate: &str,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<Value>>> {
    lab.spawn(
        server,
        Path::new("iperf3"),
        &["-s", "-B", server_ip],
        &format!("iperf3-{}.log", server.name),
    )?;
    server.wait_tcp(server_ip, 5201, Duration::from_secs(5))?;
    let (host, target, secs, rate) = (
        from.clone(),
        server_ip.to_owned(),
        secs.to_string(),
        rate.to_owned(),
    );
    Ok(std::thread::spawn(move || {
        let out = host.run("iperf3", &["-c", &target, "-t", &secs, "-b", &rate, "-J"])?;
        Ok(serde_json::from_str(&out)?)
    }))
}
