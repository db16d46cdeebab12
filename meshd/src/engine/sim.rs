//! A simulated network for the engine's per-peer core: N devices, each with
//! a real WireGuard session (boringtun) and path machine per peer, run
//! through the same [`PeerState`] calls the packet loops make (`encrypt`,
//! `decrypt`, `tick`), over simulated UDP with NATs, loss and one-way
//! blackholes, and a relay that can fail, in virtual time. Deterministic
//! from a seed (loss draws); a minute of network time runs in well under a
//! second.
//!
//! Disco messages travel as plain values (sealing is tested in
//! `platform::disco`), and WireGuard's own timers read the real clock, so
//! a simulated minute brings no rekey; handshakes here come from traffic
//! and from the core's quick retries.
#![allow(clippy::unchecked_time_subtraction)]

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use platform::disco::TxId;
use platform::keys::{DiscoPrivate, NodePrivate, NodePublic};
use platform::netmap::{DnsConfig, NetMap, Node, NodeKind, RelayMap};

use super::disco::Via;
use super::peers::{Decapsulated, IndexAllocator, Path, PeerTable, Targets};
use crate::paths::Out;

const REGION: u32 = 1;
const STEP: Duration = Duration::from_millis(5);
const TICK: Duration = Duration::from_millis(250);
const BUF: usize = 2048;

/// How a device's router treats unsolicited UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    /// A public address: everything gets in.
    Open,
    /// Endpoint-independent mapping, address-dependent filtering: only
    /// addresses the device has sent to get in.
    Filtering,
}

enum Payload {
    Wg(Vec<u8>),
    Ping(TxId),
    Pong(TxId),
    CallMeMaybe(Vec<SocketAddr>),
}

enum Link {
    Udp { src: SocketAddr, dst: SocketAddr },
    Relay,
}

struct InFlight {
    at: Instant,
    from: usize,
    to: usize,
    link: Link,
    payload: Payload,
}

struct Device {
    private: NodePrivate,
    overlay: Ipv4Addr,
    public: SocketAddr,
    nat: Nat,
    /// Remote addresses it sent to (what a filtering NAT lets back in).
    opened: HashSet<SocketAddr>,
    table: PeerTable,
}

/// One app-level ping flow, `from` → `to`, every `every`.
struct Flow {
    from: usize,
    to: usize,
    every: Duration,
    next: Instant,
    seq: u32,
    /// When each answered request's answer arrived.
    answers: Vec<Instant>,
}

/// The network.
pub struct Sim {
    t0: Instant,
    now: Instant,
    next_tick: Instant,
    devices: Vec<Device>,
    in_flight: Vec<InFlight>,
    flows: Vec<Flow>,
    latency: Duration,
    relay_latency: Duration,
    /// Chance in a million that a direct datagram is lost.
    loss_ppm: u32,
    rng: u64,
    /// Direct UDP from one device to another that never arrives.
    blackholes: HashSet<(usize, usize)>,
    relay_up: bool,
    /// Every answer of every flow, in order: (flow, seq, time since start).
    pub log: Vec<(usize, u32, Duration)>,
}

fn node(key: NodePublic, i: usize, endpoint: SocketAddr) -> Node {
    Node {
        id: i as i64 + 1,
        name: format!("d{i}"),
        kind: NodeKind::Mesh,
        node_key: key,
        disco_key: Some(DiscoPrivate::generate().public()),
        addresses: vec![IpAddr::V4(overlay(i))],
        endpoints: vec![endpoint],
        online: true,
        os: "linux".into(),
        home_region: Some(REGION),
        capabilities: None,
        owner: None,
        key_expiry: None,
        device_key: None,
        owner_role: None,
        tags: Vec::new(),
    }
}

fn overlay(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 0, u8::try_from(i + 1).expect("few devices"))
}

/// A minimal IPv4 packet carrying a flow's request or answer.
fn ip_packet(src: Ipv4Addr, dst: Ipv4Addr, flow: usize, seq: u32, answer: bool) -> Vec<u8> {
    let mut p = vec![0u8; 32];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&32u16.to_be_bytes());
    p[8] = 64;
    p[9] = 253; // experimental protocol
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20] = u8::from(answer);
    p[21..25].copy_from_slice(&(flow as u32).to_be_bytes());
    p[25..29].copy_from_slice(&seq.to_be_bytes());
    p
}

impl Sim {
    /// `natted[i]`: whether device i sits behind a filtering NAT.
    pub fn new(nats: &[Nat], seed: u64) -> Self {
        let t0 = Instant::now();
        let mut devices: Vec<Device> = nats
            .iter()
            .enumerate()
            .map(|(i, nat)| Device {
                private: NodePrivate::generate(),
                overlay: overlay(i),
                public: SocketAddr::from(([198, 51, 100, i as u8 + 1], 40_000)),
                nat: *nat,
                opened: HashSet::new(),
                table: PeerTable::default(),
            })
            .collect();
        let nodes: Vec<Node> = devices
            .iter()
            .enumerate()
            .map(|(i, d)| node(d.private.public(), i, d.public))
            .collect();
        for (i, d) in devices.iter_mut().enumerate() {
            let map = NetMap {
                network: "sim".into(),
                self_node: nodes[i].clone(),
                routes: vec![],
                peers: nodes
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, n)| (n.node_key, n.clone()))
                    .collect::<BTreeMap<_, _>>(),
                relay_map: RelayMap::default(),
                dns: DnsConfig::default(),
                awaiting_approval: false,
                packet_filter: Default::default(),
                compute: Default::default(),
            };
            d.table = PeerTable::build(
                &PeerTable::default(),
                &map,
                &d.private,
                &IndexAllocator::new(1 + 1000 * i as u32),
                0,
            );
        }
        Sim {
            t0,
            now: t0,
            next_tick: t0,
            devices,
            in_flight: Vec::new(),
            flows: Vec::new(),
            latency: Duration::from_millis(10),
            relay_latency: Duration::from_millis(30),
            loss_ppm: 0,
            rng: seed.max(1),
            blackholes: HashSet::new(),
            relay_up: true,
            log: Vec::new(),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    pub fn set_loss(&mut self, fraction: f64) {
        self.loss_ppm = (fraction * 1e6) as u32;
    }

    /// Direct UDP from `from` to `to` is dropped (or no longer).
    pub fn blackhole(&mut self, from: usize, to: usize, on: bool) {
        if on {
            self.blackholes.insert((from, to));
        } else {
            self.blackholes.remove(&(from, to));
        }
    }

    pub fn set_relay(&mut self, up: bool) {
        self.relay_up = up;
    }

    /// Device `i` moves to a new public address; the old one goes dead.
    pub fn roam(&mut self, i: usize, to: SocketAddr) {
        self.devices[i].public = to;
        self.devices[i].opened.clear();
    }

    /// An app ping from `from` to `to` every `every`; returns the flow.
    pub fn ping_flow(&mut self, from: usize, to: usize, every: Duration) -> usize {
        self.flows.push(Flow {
            from,
            to,
            every,
            next: self.now,
            seq: 0,
            answers: Vec::new(),
        });
        self.flows.len() - 1
    }

    /// The path `from` uses to `to` now.
    pub fn path(&self, from: usize, to: usize) -> Path {
        let key = self.devices[to].private.public();
        self.devices[from].table.by_key[&key]
            .lock()
            .paths
            .path(self.now)
    }

    /// The longest time without an answer on `flow` between `from` and
    /// `to` (since the start).
    pub fn longest_gap(&self, flow: usize, from: Duration, to: Duration) -> Duration {
        let mut last = self.t0 + from;
        let mut gap = Duration::ZERO;
        for &t in &self.flows[flow].answers {
            if t < self.t0 + from || t > self.t0 + to {
                continue;
            }
            gap = gap.max(t - last);
            last = t;
        }
        gap.max((self.t0 + to).saturating_duration_since(last))
    }

    pub fn answers(&self, flow: usize) -> usize {
        self.flows[flow].answers.len()
    }

    fn chance_lost(&mut self) -> bool {
        if self.loss_ppm == 0 {
            return false;
        }
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % 1_000_000) < u64::from(self.loss_ppm)
    }

    /// Runs the network for `d` of virtual time.
    pub fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += STEP;
            self.deliver_due();
            if self.now >= self.next_tick {
                self.next_tick = self.now + TICK;
                self.tick_all();
            }
            self.run_flows();
        }
    }

    fn tick_all(&mut self) {
        let mut buf = vec![0u8; BUF];
        for i in 0..self.devices.len() {
            let peers: Vec<(usize, NodePublic)> = self.peer_keys(i);
            for (j, key) in peers {
                let mut outs = Vec::new();
                let due = self.devices[i].table.by_key[&key]
                    .lock()
                    .tick(self.now, &mut buf, &mut outs);
                self.send_outs(i, j, outs);
                if let Some((range, targets)) = due {
                    self.send(i, j, buf[range].to_vec(), targets);
                }
            }
        }
    }

    fn peer_keys(&self, i: usize) -> Vec<(usize, NodePublic)> {
        (0..self.devices.len())
            .filter(|j| *j != i)
            .map(|j| (j, self.devices[j].private.public()))
            .collect()
    }

    fn run_flows(&mut self) {
        for f in 0..self.flows.len() {
            if self.now < self.flows[f].next {
                continue;
            }
            let (from, to) = (self.flows[f].from, self.flows[f].to);
            self.flows[f].next = self.now + self.flows[f].every;
            self.flows[f].seq += 1;
            let seq = self.flows[f].seq;
            let packet = ip_packet(
                self.devices[from].overlay,
                self.devices[to].overlay,
                f,
                seq,
                false,
            );
            self.app_send(from, to, &packet);
        }
    }

    /// What the TUN loop does with a packet from the device's own stack.
    fn app_send(&mut self, i: usize, j: usize, packet: &[u8]) {
        let key = self.devices[j].private.public();
        let mut out = vec![0u8; BUF];
        let mut outs = Vec::new();
        let sealed = self.devices[i].table.by_key[&key]
            .lock()
            .encrypt(packet, &mut out, self.now, &mut outs);
        self.send_outs(i, j, outs);
        if let Ok(Some((range, targets))) = sealed {
            self.send(i, j, out[range].to_vec(), targets);
        }
    }

    fn send_outs(&mut self, i: usize, j: usize, outs: Vec<Out>) {
        for o in outs {
            match o {
                Out::Ping { tx, to } => self.udp(i, to, Payload::Ping(tx)),
                Out::CallMeMaybe { .. } => {
                    let eps = vec![self.devices[i].public];
                    self.relay(i, j, Payload::CallMeMaybe(eps));
                }
            }
        }
    }

    fn send(&mut self, i: usize, j: usize, datagram: Vec<u8>, targets: Targets) {
        for to in targets.direct_all() {
            self.udp(i, to, Payload::Wg(datagram.clone()));
        }
        if targets.relay.is_some() {
            self.relay(i, j, Payload::Wg(datagram));
        }
    }

    fn udp(&mut self, i: usize, dst: SocketAddr, payload: Payload) {
        let src = self.devices[i].public;
        self.devices[i].opened.insert(dst);
        let Some(to) = self.devices.iter().position(|d| d.public == dst) else {
            return; // nobody there (a stale or private address)
        };
        if self.blackholes.contains(&(i, to)) || self.chance_lost() {
            return;
        }
        self.in_flight.push(InFlight {
            at: self.now + self.latency,
            from: i,
            to,
            link: Link::Udp { src, dst },
            payload,
        });
    }

    fn relay(&mut self, i: usize, j: usize, payload: Payload) {
        if !self.relay_up {
            return;
        }
        self.in_flight.push(InFlight {
            at: self.now + self.relay_latency,
            from: i,
            to: j,
            link: Link::Relay,
            payload,
        });
    }

    fn deliver_due(&mut self) {
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|p| p.at <= now);
        self.in_flight = later;
        for p in due {
            let via = match p.link {
                Link::Udp { src, dst } => {
                    let d = &self.devices[p.to];
                    // The receiver moved away, or its NAT filters the sender.
                    if d.public != dst || (d.nat == Nat::Filtering && !d.opened.contains(&src)) {
                        continue;
                    }
                    Via::Udp(src)
                }
                Link::Relay => {
                    if !self.relay_up {
                        continue;
                    }
                    Via::Relay(REGION)
                }
            };
            self.receive(p.from, p.to, via, p.payload);
        }
    }

    fn receive(&mut self, from: usize, at: usize, via: Via, payload: Payload) {
        let key = self.devices[from].private.public();
        let peer = self.devices[at].table.by_key[&key].clone();
        let now = self.now;
        match payload {
            Payload::Wg(datagram) => {
                let mut out = vec![0u8; BUF];
                let mut input: &[u8] = &datagram;
                loop {
                    let mut outs = Vec::new();
                    let outcome = peer.lock().decrypt(input, via, &mut out, now, &mut outs);
                    self.send_outs(at, from, outs);
                    match outcome {
                        Decapsulated::Network(range, targets) => {
                            self.send(at, from, out[range].to_vec(), targets);
                            input = &[];
                        }
                        Decapsulated::Tunnel(range, _) => {
                            let packet = out[range].to_vec();
                            self.app_receive(at, from, &packet);
                            return;
                        }
                        Decapsulated::Done | Decapsulated::Error(_) => return,
                    }
                }
            }
            Payload::Ping(tx) => {
                let mut outs = Vec::new();
                if let Via::Udp(src) = via {
                    peer.lock().paths.on_ping(src, now, &mut outs);
                    self.udp(at, src, Payload::Pong(tx));
                } else {
                    self.relay(at, from, Payload::Pong(tx));
                }
                self.send_outs(at, from, outs);
            }
            Payload::Pong(tx) => {
                if let Via::Udp(src) = via {
                    peer.lock().paths.on_pong(&tx, src, now);
                }
            }
            Payload::CallMeMaybe(eps) => {
                let mut outs = Vec::new();
                peer.lock().paths.on_call_me_maybe(&eps, now, &mut outs);
                self.send_outs(at, from, outs);
            }
        }
    }

    /// What the device's own stack does with a packet from the tunnel:
    /// answers requests, records answers.
    fn app_receive(&mut self, at: usize, from: usize, packet: &[u8]) {
        if packet.len() < 29 {
            return; // a keepalive
        }
        let flow = u32::from_be_bytes(packet[21..25].try_into().expect("4 bytes")) as usize;
        let seq = u32::from_be_bytes(packet[25..29].try_into().expect("4 bytes"));
        if packet[20] == 0 {
            let answer = ip_packet(
                self.devices[at].overlay,
                self.devices[from].overlay,
                flow,
                seq,
                true,
            );
            self.app_send(at, from, &answer);
        } else if let Some(f) = self.flows.get_mut(flow) {
            f.answers.push(self.now);
            self.log.push((flow, seq, self.now - self.t0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PING: Duration = Duration::from_millis(50);

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn direct(p: Path) -> bool {
        matches!(p, Path::Direct(_))
    }

    /// Two devices behind filtering NATs with a 20 Hz ping from the first
    /// to the second, on a direct path.
    fn pair(seed: u64) -> (Sim, usize) {
        pair_behind(&[Nat::Filtering, Nat::Filtering], seed)
    }

    fn pair_behind(nats: &[Nat; 2], seed: u64) -> (Sim, usize) {
        let mut sim = Sim::new(nats, seed);
        let flow = sim.ping_flow(0, 1, PING);
        sim.run(secs(5.0));
        assert!(
            direct(sim.path(0, 1)) && direct(sim.path(1, 0)),
            "no direct path: {:?} / {:?}",
            sim.path(0, 1),
            sim.path(1, 0)
        );
        (sim, flow)
    }

    #[test]
    fn a_mesh_of_natted_devices_goes_direct_and_loses_nothing_once_there() {
        let nats = [
            Nat::Filtering,
            Nat::Filtering,
            Nat::Open,
            Nat::Filtering,
            Nat::Open,
        ];
        let mut sim = Sim::new(&nats, 1);
        let mut flows = Vec::new();
        for a in 0..nats.len() {
            for b in 0..nats.len() {
                if a < b {
                    flows.push(sim.ping_flow(a, b, Duration::from_millis(100)));
                }
            }
        }
        sim.run(secs(3.0));
        for a in 0..nats.len() {
            for b in 0..nats.len() {
                if a != b {
                    assert!(direct(sim.path(a, b)), "{a}→{b}: {:?}", sim.path(a, b));
                }
            }
        }
        sim.run(secs(30.0));
        for f in flows {
            // Answered from the first request (relayed, then direct).
            let gap = sim.longest_gap(f, secs(0.5), secs(33.0));
            assert!(gap <= secs(0.25), "flow {f}: a gap of {gap:?}");
        }
    }

    #[test]
    fn a_path_dead_both_ways_fails_over_to_the_relay_within_six_seconds() {
        let (mut sim, flow) = pair(2);
        let cut = sim.elapsed();
        sim.blackhole(0, 1, true);
        sim.blackhole(1, 0, true);
        sim.run(secs(15.0));
        // Three missed heartbeats (at most 2 s + 3 × 1 s) drop the path,
        // before its 6.5 s of trust run out.
        let gap = sim.longest_gap(flow, cut, sim.elapsed());
        assert!(gap <= secs(5.5), "outage {gap:?}");
        assert_eq!(sim.path(0, 1), Path::Relay(REGION));
        assert_eq!(sim.path(1, 0), Path::Relay(REGION));
        // Healed: back to direct within a discovery round or two.
        sim.blackhole(0, 1, false);
        sim.blackhole(1, 0, false);
        sim.run(secs(3.0));
        assert!(direct(sim.path(0, 1)) && direct(sim.path(1, 0)));
    }

    #[test]
    fn a_path_dead_one_way_fails_over_within_six_seconds_and_stays_relayed() {
        for (dead_from, dead_to) in [(0, 1), (1, 0)] {
            let (mut sim, flow) = pair(3);
            let cut = sim.elapsed();
            sim.blackhole(dead_from, dead_to, true);
            sim.run(secs(27.0));
            let gap = sim.longest_gap(flow, cut, sim.elapsed());
            assert!(
                gap <= secs(5.5),
                "{dead_from}→{dead_to} cut: outage {gap:?}"
            );
            // Packets still arrive the other way; they must not bring the
            // dead path back.
            assert_eq!(sim.path(0, 1), Path::Relay(REGION));
            assert_eq!(sim.path(1, 0), Path::Relay(REGION));
            let late = sim.longest_gap(flow, cut + secs(8.0), sim.elapsed());
            assert!(late <= secs(0.25), "relayed traffic stalls: {late:?}");
            sim.blackhole(dead_from, dead_to, false);
            sim.run(secs(3.0));
            assert!(direct(sim.path(0, 1)) && direct(sim.path(1, 0)));
        }
    }

    #[test]
    fn a_device_that_roams_is_followed_within_a_second() {
        // The peer that stays has a public address: the roamer's packets
        // from its new address reach it, and are followed once a pong
        // proves the way back.
        let (mut sim, flow) = pair_behind(&[Nat::Filtering, Nat::Open], 4);
        let moved = sim.elapsed();
        let new = SocketAddr::from(([203, 0, 113, 7], 50_000));
        sim.roam(0, new);
        sim.run(secs(10.0));
        let gap = sim.longest_gap(flow, moved, sim.elapsed());
        assert!(gap <= secs(1.0), "outage {gap:?} after the move");
        assert_eq!(sim.path(1, 0), Path::Direct(new));
    }

    #[test]
    fn a_roamer_behind_a_filtering_peer_is_found_again_through_the_relay() {
        // The peer that stays filters the roamer's new address until it
        // pings it: the old path fails over, and discovery through the
        // relay punches the new one.
        let (mut sim, flow) = pair(6);
        let moved = sim.elapsed();
        let new = SocketAddr::from(([203, 0, 113, 7], 50_000));
        sim.roam(0, new);
        sim.run(secs(15.0));
        let gap = sim.longest_gap(flow, moved, sim.elapsed());
        assert!(gap <= secs(7.0), "outage {gap:?} after the move");
        assert_eq!(sim.path(1, 0), Path::Direct(new));
    }

    #[test]
    fn a_relay_outage_spares_direct_paths() {
        let (mut sim, flow) = pair(5);
        let from = sim.elapsed();
        sim.set_relay(false);
        sim.run(secs(30.0));
        assert!(sim.longest_gap(flow, from, sim.elapsed()) <= secs(0.25));
    }

    #[test]
    fn loss_slows_nothing_down_much_and_runs_are_reproducible() {
        let run = |seed| {
            let mut sim = Sim::new(&[Nat::Filtering, Nat::Filtering], seed);
            sim.set_loss(0.2);
            let flow = sim.ping_flow(0, 1, PING);
            sim.run(secs(20.0));
            let settled = direct(sim.path(0, 1)) && direct(sim.path(1, 0));
            (settled, sim.answers(flow), sim.log)
        };
        let (settled, answers, log) = run(7);
        assert!(settled, "no direct path through 20% loss");
        // Direct datagrams are lost 20% each way: about 64% of round trips
        // make it.
        assert!(answers > 400 * 55 / 100, "{answers} of 400 answered");
        let (_, _, again) = run(7);
        assert_eq!(log, again, "same seed, same run");
    }
}
