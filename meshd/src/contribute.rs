//! The owner's say over compute: the settings kept in `compute.json` in the
//! state directory (changed with `meshd compute enable|disable`), and the
//! contribution policy deciding, from fresh readings, whether the device
//! serves right now and, if not, why.

use platform::capability::{Capabilities, Tier};
use serde::{Deserialize, Serialize};

/// How far below a stop threshold a reading must fall to resume, so a
/// device hovering at the line does not flap.
const THERMAL_HYSTERESIS: i32 = 5;
const BATTERY_HYSTERESIS: u8 = 5;

/// When a device contributes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Whenever compute is enabled (servers, always-on boxes).
    Always,
    /// Desktop: only while the owner's own use of the CPU stays below
    /// `idle_below_percent`.
    Idle,
    /// Mobile-style: only on external power, and not on low battery.
    Charging,
    /// `charging` on devices with a battery, `always` on the rest.
    #[default]
    Auto,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Policy {
    pub mode: Mode,
    /// Idle mode: others' CPU use (percent of the machine) must stay below.
    pub idle_below_percent: u8,
    /// Share of the CPU compute may use (sets llama.cpp's threads); unset:
    /// every core but one.
    pub max_utilisation_percent: Option<u8>,
    /// Stop below this charge (any mode, on battery power).
    pub min_battery_percent: u8,
    /// Stop at this temperature (any mode).
    pub max_celsius: i32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            mode: Mode::Auto,
            idle_below_percent: 30,
            max_utilisation_percent: None,
            min_battery_percent: 30,
            max_celsius: 85,
        }
    }
}

/// `compute.json`: the daemon's compute configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ComputeSettings {
    pub enabled: bool,
    /// Manifest models to serve; empty: every one present.
    pub models: Vec<String>,
    /// Jobs run at once; unset: from the tier.
    pub slots: Option<usize>,
    /// Jobs that may wait beyond the slots; unset: 16.
    pub queue: Option<usize>,
    pub policy: Policy,
}

/// Default jobs waiting beyond the slots.
pub const DEFAULT_QUEUE: usize = 16;

/// Jobs run at once by default: one per CPU-class device (a llama.cpp job
/// already uses every thread it is given), more on GPUs.
pub fn default_slots(tier: Tier, cores: u32) -> usize {
    match tier {
        Tier::Tier0 | Tier::Tier1 => 1,
        Tier::Tier2 => 1 + usize::from(cores >= 8),
        Tier::Tier3 => 2,
        Tier::Tier4 => 4,
    }
}

/// llama.cpp threads: `max_utilisation_percent` of the cores, else every
/// core but one (the owner and the data plane keep one), at least one.
pub fn threads(policy: &Policy, cores: u32) -> usize {
    let cores = cores.max(1) as usize;
    match policy.max_utilisation_percent {
        Some(p) => (cores * usize::from(p.min(100)) / 100).max(1),
        None => cores.saturating_sub(1).max(1),
    }
}

/// Whether to serve now: `Ok` or the reason not to. `serving` is the
/// current state, for hysteresis; `others_busy` is the owner's CPU use in
/// percent (unknown on the first reading).
pub fn decide(
    settings: &ComputeSettings,
    caps: &Capabilities,
    others_busy: Option<f32>,
    serving: bool,
) -> Result<(), String> {
    if !settings.enabled {
        return Err("compute is disabled on this device (meshd compute enable)".into());
    }
    let p = &settings.policy;
    if let Some(t) = &caps.thermal {
        let limit = if serving {
            p.max_celsius
        } else {
            p.max_celsius.saturating_sub(THERMAL_HYSTERESIS)
        };
        if t.celsius >= limit {
            return Err(format!(
                "too hot: {} at {} °C (limit {} °C)",
                t.zone, t.celsius, p.max_celsius
            ));
        }
    }
    if let Some(b) = &caps.battery {
        let limit = if serving {
            p.min_battery_percent
        } else {
            p.min_battery_percent.saturating_add(BATTERY_HYSTERESIS)
        };
        if !b.on_ac && b.percent < limit {
            return Err(format!(
                "battery low: {}% (minimum {}%)",
                b.percent, p.min_battery_percent
            ));
        }
    }
    let mode = match (p.mode, &caps.battery) {
        (Mode::Auto, Some(_)) => Mode::Charging,
        (Mode::Auto, None) => Mode::Always,
        (m, _) => m,
    };
    match mode {
        Mode::Charging => match &caps.battery {
            Some(b) if !b.on_ac => Err(format!(
                "on battery ({}%): contributing only while on external power",
                b.percent
            )),
            _ => Ok(()),
        },
        Mode::Idle => match others_busy {
            None => Err("measuring how busy the device is".into()),
            Some(busy) if busy >= f32::from(p.idle_below_percent) => Err(format!(
                "device in use: {busy:.0}% CPU busy (contributing below {}%)",
                p.idle_below_percent
            )),
            Some(_) => Ok(()),
        },
        Mode::Always | Mode::Auto => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use platform::capability::{Battery, Thermal};

    fn on() -> ComputeSettings {
        ComputeSettings {
            enabled: true,
            ..Default::default()
        }
    }

    fn caps(battery: Option<(u8, bool)>, celsius: Option<i32>) -> Capabilities {
        Capabilities {
            cpu_cores: 4,
            battery: battery.map(|(percent, on_ac)| Battery {
                percent,
                charging: on_ac && percent < 100,
                on_ac,
            }),
            thermal: celsius.map(|celsius| Thermal {
                celsius,
                zone: "cpu".into(),
                critical_celsius: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn manual_switch_comes_first() {
        let off = ComputeSettings::default();
        assert!(decide(&off, &caps(None, None), Some(0.0), false)
            .unwrap_err()
            .contains("disabled"));
        assert_eq!(
            decide(&on(), &caps(None, None), None, false),
            Ok(()),
            "a server serves by default"
        );
    }

    #[test]
    fn a_laptop_serves_only_on_external_power_and_never_on_low_battery() {
        let s = on();
        assert!(decide(&s, &caps(Some((80, false)), None), None, true)
            .unwrap_err()
            .contains("on battery"));
        assert_eq!(
            decide(&s, &caps(Some((80, true)), None), None, true),
            Ok(())
        );
        let mut always = on();
        always.policy.mode = Mode::Always;
        assert_eq!(
            decide(&always, &caps(Some((80, false)), None), None, true),
            Ok(())
        );
        assert!(decide(&always, &caps(Some((20, false)), None), None, true)
            .unwrap_err()
            .contains("battery low"));
        // Hysteresis: stopped at 29%, not back before 35%.
        assert!(decide(&always, &caps(Some((32, false)), None), None, false).is_err());
        assert_eq!(
            decide(&always, &caps(Some((32, false)), None), None, true),
            Ok(())
        );
        assert_eq!(
            decide(&always, &caps(Some((36, false)), None), None, false),
            Ok(())
        );
    }

    #[test]
    fn heat_stops_every_mode_until_it_cools_down() {
        let s = on();
        assert!(decide(&s, &caps(None, Some(90)), None, true)
            .unwrap_err()
            .contains("too hot"));
        assert!(
            decide(&s, &caps(None, Some(82)), None, false).is_err(),
            "within the hysteresis band"
        );
        assert_eq!(decide(&s, &caps(None, Some(82)), None, true), Ok(()));
        assert_eq!(decide(&s, &caps(None, Some(79)), None, false), Ok(()));
    }

    #[test]
    fn extreme_limits_decide_instead_of_overflowing() {
        // `max_celsius - 5` overflowed on i32::MIN: a panic inside the
        // daemon's refresh, under its lock.
        let mut s = on();
        s.policy.max_celsius = i32::MIN;
        assert!(decide(&s, &caps(None, Some(20)), None, false)
            .unwrap_err()
            .contains("too hot"));
        s.policy.max_celsius = i32::MAX;
        assert_eq!(decide(&s, &caps(None, Some(90)), None, false), Ok(()));
        s.policy.min_battery_percent = u8::MAX;
        assert!(decide(&s, &caps(Some((99, false)), None), None, false).is_err());
    }

    #[test]
    fn a_desktop_serves_only_while_its_owner_is_not_using_it() {
        let mut s = on();
        s.policy.mode = Mode::Idle;
        assert!(
            decide(&s, &caps(None, None), None, false).is_err(),
            "no reading yet"
        );
        assert!(decide(&s, &caps(None, None), Some(55.0), true)
            .unwrap_err()
            .contains("in use"));
        assert_eq!(decide(&s, &caps(None, None), Some(3.0), false), Ok(()));
    }

    #[test]
    fn defaults_follow_the_tier_and_the_cores() {
        assert_eq!(default_slots(Tier::Tier2, 2), 1);
        assert_eq!(default_slots(Tier::Tier2, 16), 2);
        assert_eq!(default_slots(Tier::Tier4, 64), 4);
        let mut p = Policy::default();
        assert_eq!(threads(&p, 2), 1);
        assert_eq!(threads(&p, 8), 7);
        assert_eq!(threads(&p, 1), 1);
        p.max_utilisation_percent = Some(50);
        assert_eq!(threads(&p, 8), 4);
        p.max_utilisation_percent = Some(10);
        assert_eq!(threads(&p, 2), 1);
    }

    #[test]
    fn settings_files_may_name_only_what_they_change() {
        let s: ComputeSettings =
            serde_json::from_str(r#"{"enabled":true,"policy":{"mode":"idle"}}"#).unwrap();
        assert!(s.enabled);
        assert_eq!(s.policy.mode, Mode::Idle);
        assert_eq!(s.policy.max_celsius, 85);
        assert!(
            serde_json::from_str::<ComputeSettings>(r#"{"policy":{"mode":"sometimes"}}"#).is_err()
        );
    }
}
