//! How long `place` takes over a large network: 10,000 varied devices
//! (deterministic, from a fixed xorshift seed), 1,000 placements, each
//! timed including dropping its result. Where Linux says, also the time on
//! a CPU (without the time other processes held it).
//!
//! `cargo run --release -p scheduler --example place_bench`

use std::hint::black_box;
use std::time::{Duration, Instant};

use platform::capability::{Battery, Capabilities, ComputeOffer, Gpu, OfferedModel, Thermal, Tier};
use platform::jobs::{ComputeRules, Route, Workload};
use platform::keys::NodePublic;
use platform::people::Role;
use scheduler::{place, Candidate, JobSpec, PathInfo};

const CANDIDATES: usize = 10_000;
const RUNS: usize = 1_000;
const GIB: u64 = 1 << 30;

/// xorshift64: enough spread for test data, and the same every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const MODELS: [(&str, &str); 4] = [
    ("qwen2.5-0.5b-instruct", "chat"),
    ("llama-3.2-1b-instruct", "chat"),
    ("nomic-embed-text-v1.5", "embedding"),
    ("bge-small-en-v1.5", "embedding"),
];
const TIERS: [Tier; 5] = [
    Tier::Tier0,
    Tier::Tier1,
    Tier::Tier2,
    Tier::Tier3,
    Tier::Tier4,
];

fn candidate(rng: &mut XorShift, i: usize) -> Candidate {
    let tier = TIERS[rng.below(5) as usize];
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&(i as u64).to_le_bytes());
    let models = MODELS
        .iter()
        .filter(|_| rng.chance(50))
        .map(|(name, kind)| OfferedModel {
            name: (*name).into(),
            kind: (*kind).into(),
            sha256: format!("{:064x}", name.len()),
        })
        .collect();
    let serving = rng.chance(80);
    let slots = 1 + rng.below(8) as u32;
    let compute = rng.chance(90).then(|| ComputeOffer {
        models,
        serving,
        reason: (!serving).then(|| "not contributing: on battery".to_owned()),
        slots,
        port: 8080,
        busy: rng.below(u64::from(slots) + 1) as u32,
        queued: rng.below(4) as u32,
    });
    let caps = Capabilities {
        cpu_cores: 1 + rng.below(32) as u32,
        arch: "x86_64".into(),
        ram_bytes: (1 + rng.below(64)) * GIB,
        gpus: if tier >= Tier::Tier3 {
            vec![Gpu {
                name: "gpu".into(),
                vram_bytes: 8 * GIB,
            }]
        } else {
            Vec::new()
        },
        npu: false,
        battery: rng.chance(40).then(|| Battery {
            percent: rng.below(101) as u8,
            charging: false,
            on_ac: rng.chance(50),
        }),
        thermal: rng.chance(85).then(|| Thermal {
            celsius: 30 + rng.below(70) as i32,
            zone: "cpu".into(),
            critical_celsius: rng.chance(70).then_some(100),
        }),
        tier,
        compute,
    };
    Candidate {
        name: format!("device-{i:05}"),
        node_key: NodePublic::from_bytes(key),
        device_key: None,
        is_self: i == 0,
        member: rng.chance(95),
        revoked: rng.chance(2),
        online: rng.chance(90),
        os: "linux".into(),
        capabilities: rng.chance(97).then_some(caps),
        path: if i == 0 {
            PathInfo::LOCAL
        } else {
            PathInfo {
                rtt_ms: rng.chance(95).then(|| 1.0 + rng.below(400) as f64),
                direct: rng.chance(70),
            }
        },
        inflight: rng.below(3) as u32,
    }
}

fn percentile(sorted: &[Duration], p: usize) -> f64 {
    let i = (sorted.len() * p / 100).min(sorted.len() - 1);
    sorted[i].as_secs_f64() * 1e6
}

/// This thread's time on a CPU and waiting for one, from Linux's
/// schedstat: on a shared machine, wall time also counts the time other
/// processes held the CPU.
fn schedstat() -> Option<(Duration, Duration)> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    let running = fields.next()??;
    let waiting = fields.next()??;
    Some((Duration::from_nanos(running), Duration::from_nanos(waiting)))
}

fn bench(label: &str, spec: &JobSpec, candidates: &[Candidate], rules: &ComputeRules) {
    for _ in 0..20 {
        black_box(place(spec, candidates, rules));
    }
    let mut wall = Vec::with_capacity(RUNS);
    let mut eligible = 0;
    let before = schedstat();
    for _ in 0..RUNS {
        let start = Instant::now();
        let placement = place(black_box(spec), black_box(candidates), black_box(rules));
        eligible = placement.eligible;
        drop(black_box(placement));
        wall.push(start.elapsed());
    }
    let after = schedstat();
    wall.sort_unstable();
    let (p50, p99) = (percentile(&wall, 50), percentile(&wall, 99));
    let max = percentile(&wall, 100);
    println!("{label}: {eligible} eligible; p50 {p50:.0} µs, p99 {p99:.0} µs, max {max:.0} µs");
    // The kernel accounts CPU time at scheduler ticks: only a total over
    // many runs means anything.
    if let (Some((run0, wait0)), Some((run1, wait1))) = (before, after) {
        let per_run = run1.saturating_sub(run0).as_secs_f64() * 1e6 / RUNS as f64;
        let waited = wait1.saturating_sub(wait0).as_secs_f64() * 1e3;
        println!("  mean on CPU {per_run:.0} µs; waited {waited:.0} ms for a CPU in all");
    }
    if label == "auto" {
        println!(
            "scheduler place {} candidates: p50 {p50:.0} µs, p99 {p99:.0} µs",
            candidates.len()
        );
    }
}

fn main() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let candidates: Vec<Candidate> = (0..CANDIDATES).map(|i| candidate(&mut rng, i)).collect();
    let rules = ComputeRules::default();
    let mut spec = JobSpec::new(Workload::SmallChat, Role::Member);
    spec.min_ram_mb = 2048;
    spec.max_latency_ms = Some(300);
    bench("auto", &spec, &candidates, &rules);
    spec.route = Route::Local;
    bench("local", &spec, &candidates, &rules);
    spec.route = Route::Tier(Tier::Tier3);
    bench("tier:tier3", &spec, &candidates, &rules);
}
