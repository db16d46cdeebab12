//! What a device can offer: hardware, power and thermal state, its tier and
//! the models it serves. Sent at registration and in heartbeats when it
//! changes; carried in the netmap so peers (and later the scheduler) see it.

use serde::{Deserialize, Serialize};

const GIB: u64 = 1 << 30;

/// Device class, from the seed: what a minute of work on it is worth.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Phone-class CPU (also boards under 4 GiB of RAM or with one core).
    #[default]
    Tier0,
    /// Phone with an NPU.
    Tier1,
    /// Laptop or desktop CPU.
    Tier2,
    /// Laptop or small GPU (at least 4 GiB of VRAM).
    Tier3,
    /// Server GPU (at least 24 GiB of VRAM).
    Tier4,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = *self as u8;
        write!(f, "tier{n}")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    pub name: String,
    pub vram_bytes: u64,
}

/// Present only on devices with a battery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Battery {
    /// Charge, 0–100.
    pub percent: u8,
    pub charging: bool,
    /// External power is connected (charging or full).
    pub on_ac: bool,
}

/// The hottest thermal zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thermal {
    pub celsius: i32,
    pub zone: String,
    /// The zone's critical trip point, where the platform exposes one.
    pub critical_celsius: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferedModel {
    pub name: String,
    /// `chat` or `embedding`.
    pub kind: String,
    pub sha256: String,
}

/// The device's compute service: what it holds and whether it serves now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeOffer {
    pub models: Vec<OfferedModel>,
    pub serving: bool,
    /// Why it does not serve now (policy, owner, temperature, battery).
    pub reason: Option<String>,
    /// Jobs that run at once.
    pub slots: u32,
    pub port: u16,
    /// Jobs running now (reported in heartbeats when it changes).
    #[serde(default)]
    pub busy: u32,
    /// Jobs waiting for a slot.
    #[serde(default)]
    pub queued: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    pub cpu_cores: u32,
    pub arch: String,
    pub ram_bytes: u64,
    #[serde(default)]
    pub gpus: Vec<Gpu>,
    #[serde(default)]
    pub npu: bool,
    #[serde(default)]
    pub battery: Option<Battery>,
    #[serde(default)]
    pub thermal: Option<Thermal>,
    #[serde(default)]
    pub tier: Tier,
    #[serde(default)]
    pub compute: Option<ComputeOffer>,
}

/// Bounds a coordinator holds reports to.
pub const MAX_GPUS: usize = 16;
pub const MAX_MODELS: usize = 32;
pub const MAX_TEXT: usize = 256;

impl Capabilities {
    /// The tier this hardware earns on `os` (`android` and `ios` are
    /// phones): tier4 with a GPU of ≥ 24 GiB, tier3 with ≥ 4 GiB; phones and
    /// small boards (< 4 GiB RAM or one core) tier0, or tier1 with an NPU;
    /// every other CPU-only device tier2.
    pub fn derive_tier(&self, os: &str) -> Tier {
        let vram = self.gpus.iter().map(|g| g.vram_bytes).max().unwrap_or(0);
        let phone = matches!(os, "android" | "ios");
        if vram >= 24 * GIB {
            Tier::Tier4
        } else if vram >= 4 * GIB {
            Tier::Tier3
        } else if phone || self.ram_bytes < 4 * GIB || self.cpu_cores < 2 {
            if self.npu {
                Tier::Tier1
            } else {
                Tier::Tier0
            }
        } else {
            Tier::Tier2
        }
    }

    /// Why a report is unacceptable (oversized lists or text), if it is.
    pub fn check(&self) -> Result<(), String> {
        let long = |s: &str| s.len() > MAX_TEXT;
        if self.gpus.len() > MAX_GPUS || self.gpus.iter().any(|g| long(&g.name)) {
            return Err(format!(
                "at most {MAX_GPUS} GPUs, names of at most {MAX_TEXT} bytes"
            ));
        }
        if long(&self.arch) || self.thermal.as_ref().is_some_and(|t| long(&t.zone)) {
            return Err(format!("text fields are at most {MAX_TEXT} bytes"));
        }
        if let Some(c) = &self.compute {
            if c.models.len() > MAX_MODELS
                || c.models
                    .iter()
                    .any(|m| long(&m.name) || long(&m.kind) || long(&m.sha256))
                || c.reason.as_deref().is_some_and(long)
            {
                return Err(format!(
                    "at most {MAX_MODELS} models; text fields are at most {MAX_TEXT} bytes"
                ));
            }
        }
        if self.battery.as_ref().is_some_and(|b| b.percent > 100) {
            return Err("battery percent is 0–100".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(cores: u32, ram_gib: u64, vram_gib: Option<u64>) -> Capabilities {
        Capabilities {
            cpu_cores: cores,
            arch: "x86_64".into(),
            ram_bytes: ram_gib * GIB,
            gpus: vram_gib
                .map(|v| Gpu {
                    name: "gpu".into(),
                    vram_bytes: v * GIB,
                })
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn tiers_follow_the_hardware() {
        assert_eq!(caps(2, 24, None).derive_tier("linux"), Tier::Tier2);
        assert_eq!(caps(16, 64, Some(80)).derive_tier("linux"), Tier::Tier4);
        assert_eq!(caps(8, 16, Some(8)).derive_tier("linux"), Tier::Tier3);
        // A small integrated GPU does not lift a laptop.
        assert_eq!(caps(8, 16, Some(1)).derive_tier("linux"), Tier::Tier2);
        assert_eq!(
            caps(4, 2, None).derive_tier("linux"),
            Tier::Tier0,
            "small board"
        );
        assert_eq!(caps(8, 8, None).derive_tier("android"), Tier::Tier0);
        let mut npu = caps(8, 8, None);
        npu.npu = true;
        assert_eq!(npu.derive_tier("android"), Tier::Tier1);
        assert_eq!(Tier::Tier3.to_string(), "tier3");
        assert_eq!(serde_json::to_string(&Tier::Tier2).unwrap(), "\"tier2\"");
    }

    #[test]
    fn oversized_reports_are_refused() {
        let mut c = caps(2, 4, None);
        assert!(c.check().is_ok());
        c.arch = "x".repeat(MAX_TEXT + 1);
        assert!(c.check().is_err());
        let mut c = caps(2, 4, None);
        c.battery = Some(Battery {
            percent: 101,
            charging: false,
            on_ac: false,
        });
        assert!(c.check().is_err());
        let mut c = caps(2, 4, None);
        let model = OfferedModel {
            name: "m".into(),
            kind: "chat".into(),
            sha256: "00".into(),
        };
        c.compute = Some(ComputeOffer {
            models: vec![model; MAX_MODELS + 1],
            serving: true,
            reason: None,
            slots: 1,
            port: 1,
            busy: 0,
            queued: 0,
        });
        assert!(c.check().is_err());
    }

    #[test]
    fn reports_from_older_devices_still_parse() {
        let c: Capabilities =
            serde_json::from_str(r#"{"cpu_cores":2,"arch":"x86_64","ram_bytes":1024}"#).unwrap();
        assert_eq!(c.tier, Tier::Tier0);
        assert!(c.compute.is_none() && c.gpus.is_empty());
    }
}
