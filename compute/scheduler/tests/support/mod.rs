//! Candidates for tests, built from a plain, eligible default: a member's
//! tier2 laptop on a direct 10 ms path, online and serving one chat and one
//! embedding model, with two free slots.
#![allow(dead_code)]

use platform::capability::{Battery, Capabilities, ComputeOffer, Gpu, OfferedModel, Thermal, Tier};
use platform::jobs::{ComputeRules, Workload};
use platform::keys::NodePublic;
use platform::people::Role;
use scheduler::{explain, Candidate, Filter, JobSpec, PathInfo, Placement, Verdict};

pub const CHAT: &str = "qwen2.5-0.5b";
pub const EMBED: &str = "nomic-embed";

/// A stand-in sha256 (lowercase hex), different for each model name.
pub fn sha_of(model: &str) -> String {
    let hex: String = model.bytes().take(32).map(|b| format!("{b:02x}")).collect();
    format!("{hex:0>64}")
}

/// A device to place jobs on; see the module docs for its defaults.
#[derive(Clone, Debug)]
pub struct Device(Candidate);

pub fn device(name: &str) -> Device {
    let mut key = [0u8; 32];
    for (k, b) in key.iter_mut().zip(name.bytes()) {
        *k = b;
    }
    Device(Candidate {
        name: name.into(),
        node_key: NodePublic::from_bytes(key),
        device_key: None,
        is_self: false,
        member: true,
        revoked: false,
        online: true,
        os: "linux".into(),
        capabilities: Some(Capabilities {
            cpu_cores: 8,
            arch: "x86_64".into(),
            ram_bytes: 16 << 30,
            tier: Tier::Tier2,
            compute: Some(ComputeOffer {
                models: vec![model(CHAT, "chat"), model(EMBED, "embedding")],
                serving: true,
                reason: None,
                slots: 2,
                port: 8080,
                busy: 0,
                queued: 0,
            }),
            ..Capabilities::default()
        }),
        path: PathInfo {
            rtt_ms: Some(10.0),
            direct: true,
        },
        inflight: 0,
    })
}

fn model(name: &str, kind: &str) -> OfferedModel {
    OfferedModel {
        name: name.into(),
        kind: kind.into(),
        sha256: sha_of(name),
    }
}

impl Device {
    fn caps(&mut self) -> &mut Capabilities {
        self.0
            .capabilities
            .get_or_insert_with(Capabilities::default)
    }

    fn offer(&mut self) -> &mut ComputeOffer {
        self.caps()
            .compute
            .as_mut()
            .expect("the device has an offer")
    }

    /// This device, submitting the job.
    pub fn me(mut self) -> Self {
        self.0.is_self = true;
        self.0.path = PathInfo::LOCAL;
        self
    }

    pub fn tier(mut self, tier: Tier) -> Self {
        self.caps().tier = tier;
        self
    }

    pub fn ram_mb(mut self, mb: u64) -> Self {
        self.caps().ram_bytes = mb << 20;
        self
    }

    pub fn gpu(mut self) -> Self {
        self.caps().gpus.push(Gpu {
            name: "rtx".into(),
            vram_bytes: 8 << 30,
        });
        self
    }

    /// Offers exactly these (name, kind) models.
    pub fn models(mut self, models: &[(&str, &str)]) -> Self {
        self.offer().models = models.iter().map(|(n, k)| model(n, k)).collect();
        self
    }

    pub fn no_offer(mut self) -> Self {
        self.caps().compute = None;
        self
    }

    pub fn no_report(mut self) -> Self {
        self.0.capabilities = None;
        self
    }

    pub fn not_serving(mut self, reason: Option<&str>) -> Self {
        let offer = self.offer();
        offer.serving = false;
        offer.reason = reason.map(str::to_owned);
        self
    }

    pub fn slots(mut self, slots: u32, busy: u32, queued: u32) -> Self {
        let offer = self.offer();
        (offer.slots, offer.busy, offer.queued) = (slots, busy, queued);
        self
    }

    pub fn battery(mut self, percent: u8, on_ac: bool) -> Self {
        self.caps().battery = Some(Battery {
            percent,
            charging: on_ac,
            on_ac,
        });
        self
    }

    pub fn thermal(mut self, celsius: i32, critical: Option<i32>) -> Self {
        self.caps().thermal = Some(Thermal {
            celsius,
            zone: "cpu".into(),
            critical_celsius: critical,
        });
        self
    }

    pub fn rtt(mut self, ms: f64) -> Self {
        self.0.path.rtt_ms = Some(ms);
        self
    }

    pub fn rtt_unknown(mut self) -> Self {
        self.0.path.rtt_ms = None;
        self
    }

    pub fn relayed(mut self) -> Self {
        self.0.path.direct = false;
        self
    }

    pub fn offline(mut self) -> Self {
        self.0.online = false;
        self
    }

    pub fn not_member(mut self) -> Self {
        self.0.member = false;
        self
    }

    pub fn revoked(mut self) -> Self {
        self.0.revoked = true;
        self
    }

    pub fn inflight(mut self, jobs: u32) -> Self {
        self.0.inflight = jobs;
        self
    }

    pub fn build(self) -> Candidate {
        self.0
    }
}

pub fn chat(role: Role) -> JobSpec {
    JobSpec::new(Workload::SmallChat, role)
}

pub fn rules() -> ComputeRules {
    ComputeRules::default()
}

pub fn place(spec: &JobSpec, devices: Vec<Device>) -> Placement {
    let candidates: Vec<Candidate> = devices.into_iter().map(Device::build).collect();
    scheduler::place(spec, &candidates, &rules())
}

/// The filter a lone device fails for `spec`, with its detail; None when
/// it is eligible.
pub fn verdict(spec: &JobSpec, d: Device) -> Option<(Filter, String)> {
    let c = d.build();
    match explain(spec, std::slice::from_ref(&c), &rules(), &c.name) {
        Some(Verdict::Rejected(r)) => Some((r.failed_filter, r.detail)),
        Some(Verdict::Eligible(_)) => None,
        None => panic!("{} is a candidate", c.name),
    }
}

pub fn ranked_names(p: &Placement) -> Vec<&str> {
    p.ranked.iter().map(|r| r.name.as_str()).collect()
}
