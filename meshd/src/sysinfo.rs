//! What the platform tells about this device: CPU, memory, GPUs (NVIDIA
//! through `nvidia-smi`, others through DRM's VRAM counters), batteries and
//! mains (`/sys/class/power_supply`), thermal zones (`/sys/class/thermal`)
//! and CPU time (`/proc/stat`). Paths are read under a root so tests can
//! hand it a fixture tree.
//!
//! Reading files and running `nvidia-smi` block: the daemon calls the async
//! forms ([`Probe::new`], [`Probe::read_capabilities`],
//! [`Probe::read_cpu_times`]), which do that work on blocking threads or as
//! a tokio child process with a deadline, never on an async worker.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use platform::capability::{Battery, Capabilities, Gpu, Thermal};

/// Temperatures outside this range (°C) are sensor noise, not readings.
const PLAUSIBLE_CELSIUS: std::ops::RangeInclusive<i32> = -40..=150;
/// How long `nvidia-smi` may take before it is given up on.
const NVIDIA_SMI_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Probe {
    root: PathBuf,
    /// This process's CPU times: the real one even under another root.
    self_stat: PathBuf,
    /// Asked once: GPUs do not come and go while the daemon runs.
    gpus: Vec<Gpu>,
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn read_num<T: std::str::FromStr>(path: &Path) -> Option<T> {
    read(path)?.parse().ok()
}

/// Entries of `dir` whose names start with `prefix`, sorted.
fn entries(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

impl Probe {
    /// This machine, with `/proc` and `/sys` read under `root` (`/`, or
    /// where a container mounts the host's); runs `nvidia-smi` once if it
    /// is installed, for at most [`NVIDIA_SMI_WAIT`].
    pub async fn new(root: &Path) -> Self {
        let nvidia = bounded_output(nvidia_smi(), NVIDIA_SMI_WAIT).await;
        let sys = root.to_owned();
        let gpus = blocking(move || {
            let mut gpus = nvidia.map(|out| parse_nvidia_smi(&out)).unwrap_or_default();
            let nvidia_found = !gpus.is_empty();
            gpus.extend(drm_gpus(&sys, nvidia_found));
            gpus
        })
        .await
        .unwrap_or_default();
        Probe {
            root: root.to_owned(),
            self_stat: PathBuf::from("/proc/self/stat"),
            gpus,
        }
    }

    /// [`Probe::capabilities`], read on a blocking thread.
    pub async fn read_capabilities(&self) -> Capabilities {
        let probe = self.clone();
        blocking(move || probe.capabilities())
            .await
            .unwrap_or_default()
    }

    /// [`Probe::cpu_times`], read on a blocking thread.
    pub async fn read_cpu_times(&self) -> Option<CpuTimes> {
        let probe = self.clone();
        blocking(move || probe.cpu_times()).await.flatten()
    }

    /// A fixture tree laid out like `/` (`proc/…`, `sys/class/…`), this
    /// process's times included.
    #[cfg(test)]
    fn at(root: &Path) -> Self {
        Probe {
            root: root.to_owned(),
            self_stat: root.join("proc/self/stat"),
            gpus: drm_gpus(root, false),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// The hardware report with its tier; `compute` is left for the caller.
    pub fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities {
            cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            arch: std::env::consts::ARCH.to_owned(),
            ram_bytes: self.ram_bytes(),
            gpus: self.gpus.clone(),
            npu: false,
            battery: self.battery(),
            thermal: self.thermal(),
            tier: Default::default(),
            compute: None,
        };
        caps.tier = caps.derive_tier(std::env::consts::OS);
        caps
    }

    fn ram_bytes(&self) -> u64 {
        read(&self.path("proc/meminfo"))
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |kb| kb * 1024)
    }

    /// The first battery, if any, and whether mains power is connected.
    fn battery(&self) -> Option<Battery> {
        let supplies = entries(&self.path("sys/class/power_supply"), "");
        let mut mains = false;
        let mut battery = None;
        for s in &supplies {
            match read(&s.join("type")).as_deref() {
                Some("Battery") if battery.is_none() => {
                    // Peripheral batteries (a mouse) say scope=Device.
                    if read(&s.join("scope")).as_deref() == Some("Device") {
                        continue;
                    }
                    // No charge reading: report no battery rather than an empty one.
                    let Some(percent) =
                        read_num::<u32>(&s.join("capacity")).map(|p| p.min(100) as u8)
                    else {
                        continue;
                    };
                    battery = Some((percent, read(&s.join("status")).unwrap_or_default()));
                }
                Some("Mains" | "USB" | "USB_C" | "USB_PD" | "Wireless") => {
                    mains |= read_num::<u8>(&s.join("online")) == Some(1);
                }
                _ => {}
            }
        }
        let (percent, status) = battery?;
        let charging = status == "Charging";
        Some(Battery {
            percent,
            charging,
            on_ac: mains || charging || status == "Full" || status == "Not charging",
        })
    }

    /// The hottest plausible thermal zone.
    fn thermal(&self) -> Option<Thermal> {
        entries(&self.path("sys/class/thermal"), "thermal_zone")
            .into_iter()
            .filter_map(|z| {
                let celsius = read_num::<i64>(&z.join("temp"))? / 1000;
                let celsius = i32::try_from(celsius)
                    .ok()
                    .filter(|c| PLAUSIBLE_CELSIUS.contains(c))?;
                let critical_celsius = entries(&z, "trip_point_").into_iter().find_map(|t| {
                    let name = t.file_name()?.to_str()?.strip_suffix("_type")?.to_owned();
                    (read(&t)? == "critical").then(|| {
                        read_num::<i64>(&z.join(format!("{name}_temp"))).map(|m| (m / 1000) as i32)
                    })?
                });
                let zone = read(&z.join("type")).unwrap_or_else(|| {
                    z.file_name()
                        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
                });
                Some(Thermal {
                    celsius,
                    zone,
                    critical_celsius,
                })
            })
            .max_by_key(|t| t.celsius)
    }

    /// CPU time so far: the whole machine's and this process's.
    pub fn cpu_times(&self) -> Option<CpuTimes> {
        let stat = read(&self.path("proc/stat"))?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest is in user).
        let total: u64 = fields.iter().take(8).sum();
        let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
        let own = read(&self.self_stat)?;
        // Fields after the command name, which may hold spaces: state is
        // field 3, utime 14, stime 15.
        let after = own.rsplit_once(')')?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        let own_ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        Some(CpuTimes {
            total,
            busy: total.saturating_sub(idle),
            own: own_ticks,
        })
    }
}

/// Cumulative CPU ticks (`USER_HZ`), all cores together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTimes {
    pub total: u64,
    pub busy: u64,
    /// This process (serving compute included).
    pub own: u64,
}

impl CpuTimes {
    /// Percent of the machine kept busy by everything but this process
    /// between `earlier` and `self`: what the owner is doing.
    pub fn others_busy_since(&self, earlier: &CpuTimes) -> Option<f32> {
        let total = self.total.checked_sub(earlier.total).filter(|t| *t > 0)?;
        let busy = self.busy.saturating_sub(earlier.busy);
        let own = self.own.saturating_sub(earlier.own);
        Some((busy.saturating_sub(own) as f32 / total as f32 * 100.0).clamp(0.0, 100.0))
    }
}

/// GPUs with dedicated VRAM that DRM reports (amdgpu and others exposing
/// `mem_info_vram_total`); NVIDIA cards are left to `nvidia-smi` when it
/// answered.
fn drm_gpus(root: &Path, skip_nvidia: bool) -> Vec<Gpu> {
    entries(&root.join("sys/class/drm"), "card")
        .into_iter()
        .filter(|c| {
            !c.file_name()
                .is_some_and(|n| n.to_string_lossy().contains('-'))
        })
        .filter_map(|c| {
            let dev = c.join("device");
            let vendor = read(&dev.join("vendor")).unwrap_or_default();
            if skip_nvidia && vendor == "0x10de" {
                return None;
            }
            let vram_bytes: u64 = read_num(&dev.join("mem_info_vram_total"))?;
            let name = read(&dev.join("product_name"))
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| {
                    format!(
                        "gpu {vendor}:{}",
                        read(&dev.join("device")).unwrap_or_default()
                    )
                });
            Some(Gpu { name, vram_bytes })
        })
        .collect()
}

/// `f` on a blocking thread; `None` only when the runtime is shutting down
/// (a panic in `f` goes on in the caller, as if `f` had run there).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => Some(v),
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => None,
        },
    }
}

fn nvidia_smi() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("nvidia-smi");
    cmd.args([
        "--query-gpu=name,memory.total",
        "--format=csv,noheader,nounits",
    ]);
    cmd
}

/// What `cmd` prints when it exits successfully within `wait`; a command
/// still running then is killed.
async fn bounded_output(mut cmd: tokio::process::Command, wait: Duration) -> Option<String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    // On timeout the child is dropped, and with it killed (tokio reaps it).
    let out = tokio::time::timeout(wait, child.wait_with_output())
        .await
        .ok()?
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `name, MiB` lines from `nvidia-smi --format=csv,noheader,nounits`.
fn parse_nvidia_smi(out: &str) -> Vec<Gpu> {
    out.lines()
        .filter_map(|l| {
            let (name, mib) = l.rsplit_once(',')?;
            let mib: u64 = mib.trim().parse().ok()?;
            Some(Gpu {
                name: name.trim().to_owned(),
                vram_bytes: mib << 20,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(root: &Path, rel: &str, contents: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, contents).unwrap();
    }

    #[test]
    fn a_laptop_tree_reads_as_battery_thermal_and_gpu() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        put(
            r,
            "proc/meminfo",
            "MemTotal:       16318480 kB\nMemFree: 1 kB\n",
        );
        put(r, "sys/class/power_supply/AC/type", "Mains\n");
        put(r, "sys/class/power_supply/AC/online", "0\n");
        put(
            r,
            "sys/class/power_supply/hidpp_battery_0/type",
            "Battery\n",
        );
        put(
            r,
            "sys/class/power_supply/hidpp_battery_0/scope",
            "Device\n",
        );
        put(r, "sys/class/power_supply/hidpp_battery_0/capacity", "5\n");
        put(r, "sys/class/power_supply/BAT0/type", "Battery\n");
        put(r, "sys/class/power_supply/BAT0/capacity", "57\n");
        put(r, "sys/class/power_supply/BAT0/status", "Discharging\n");
        put(r, "sys/class/thermal/thermal_zone0/type", "acpitz\n");
        put(r, "sys/class/thermal/thermal_zone0/temp", "48000\n");
        put(r, "sys/class/thermal/thermal_zone1/type", "x86_pkg_temp\n");
        put(r, "sys/class/thermal/thermal_zone1/temp", "71500\n");
        put(
            r,
            "sys/class/thermal/thermal_zone1/trip_point_0_type",
            "passive\n",
        );
        put(
            r,
            "sys/class/thermal/thermal_zone1/trip_point_0_temp",
            "90000\n",
        );
        put(
            r,
            "sys/class/thermal/thermal_zone1/trip_point_1_type",
            "critical\n",
        );
        put(
            r,
            "sys/class/thermal/thermal_zone1/trip_point_1_temp",
            "105000\n",
        );
        put(r, "sys/class/thermal/thermal_zone2/temp", "-273000\n");
        put(r, "sys/class/drm/card0/device/vendor", "0x1002\n");
        put(
            r,
            "sys/class/drm/card0/device/product_name",
            "Radeon RX 7600\n",
        );
        put(
            r,
            "sys/class/drm/card0/device/mem_info_vram_total",
            "8573157376\n",
        );
        put(
            r,
            "sys/class/drm/card0-DP-1/device/mem_info_vram_total",
            "1\n",
        );
        put(r, "sys/class/drm/card1/device/vendor", "0x8086\n");

        let caps = Probe::at(r).capabilities();
        assert_eq!(caps.ram_bytes, 16318480 * 1024);
        assert_eq!(
            caps.battery,
            Some(Battery {
                percent: 57,
                charging: false,
                on_ac: false
            })
        );
        assert_eq!(
            caps.thermal,
            Some(Thermal {
                celsius: 71,
                zone: "x86_pkg_temp".into(),
                critical_celsius: Some(105)
            })
        );
        assert_eq!(
            caps.gpus,
            vec![Gpu {
                name: "Radeon RX 7600".into(),
                vram_bytes: 8573157376
            }]
        );
        assert_eq!(caps.tier, platform::capability::Tier::Tier3);

        put(r, "sys/class/power_supply/AC/online", "1\n");
        put(r, "sys/class/power_supply/BAT0/status", "Charging\n");
        let b = Probe::at(r).capabilities().battery.unwrap();
        assert!(b.charging && b.on_ac);
    }

    #[test]
    fn a_server_without_power_supplies_or_sensors_reports_neither() {
        let dir = tempfile::tempdir().unwrap();
        put(dir.path(), "proc/meminfo", "MemTotal: 4096 kB\n");
        let caps = Probe::at(dir.path()).capabilities();
        assert_eq!((caps.battery, caps.thermal), (None, None));
        assert!(caps.gpus.is_empty());
    }

    #[test]
    fn nvidia_smi_lines_parse() {
        let gpus = parse_nvidia_smi(
            "NVIDIA H100 80GB HBM3, 81559\nNVIDIA GeForce RTX 3060, 12288\ngarbage\n",
        );
        assert_eq!(gpus.len(), 2);
        assert_eq!(
            gpus[0],
            Gpu {
                name: "NVIDIA H100 80GB HBM3".into(),
                vram_bytes: 81559 << 20
            }
        );
    }

    #[test]
    fn cpu_use_of_others_excludes_this_process() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        let write = |user: u64, idle: u64, own: u64| {
            put(
                r,
                "proc/stat",
                &format!("cpu  {user} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 1 1 1\n"),
            );
            put(
                r,
                "proc/self/stat",
                &format!("42 (meshd (x)) S 1 1 1 0 -1 0 0 0 0 0 {own} 0 0 0 20 0\n"),
            );
        };
        write(100, 900, 10);
        let a = Probe::at(r).cpu_times().unwrap();
        // 100 ticks pass: 60 busy, of which 40 are ours.
        write(160, 940, 50);
        let b = Probe::at(r).cpu_times().unwrap();
        assert_eq!(b.others_busy_since(&a), Some(20.0));
        assert_eq!(a.others_busy_since(&a), None, "no time passed");
    }

    #[tokio::test]
    async fn this_machine_reads() {
        let probe = Probe::new(Path::new("/")).await;
        let caps = probe.read_capabilities().await;
        assert!(caps.cpu_cores >= 1 && caps.ram_bytes > 0);
        assert!(probe.read_cpu_times().await.is_some_and(|t| t.total > 0));
    }

    fn sh(script: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[tokio::test]
    async fn waiting_for_a_command_leaves_the_runtime_free() {
        // A single-threaded runtime, and a command that ends only once
        // another task on it has run: the old wait (a sleep loop on this
        // thread) never let that task run, and gave up after its 5 s.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let writer = {
            let fifo = fifo.clone();
            tokio::spawn(async move {
                let mut f = tokio::fs::OpenOptions::new()
                    .write(true)
                    .open(&fifo)
                    .await
                    .unwrap();
                tokio::io::AsyncWriteExt::write_all(&mut f, b"NVIDIA H200, 143771\n")
                    .await
                    .unwrap();
            })
        };
        let mut cat = tokio::process::Command::new("cat");
        cat.arg(&fifo);
        let out = bounded_output(cat, Duration::from_secs(60)).await;
        assert_eq!(out.as_deref(), Some("NVIDIA H200, 143771\n"));
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_stuck_command_is_given_up() {
        let out = bounded_output(sh("exec sleep 1000"), Duration::from_millis(200)).await;
        assert_eq!(out, None);
    }

    #[tokio::test]
    async fn a_command_that_answers_or_fails_is_read_as_such() {
        let wait = Duration::from_secs(30);
        assert_eq!(
            bounded_output(sh("echo 'NVIDIA H200, 143771'"), wait).await,
            Some("NVIDIA H200, 143771\n".into())
        );
        assert_eq!(bounded_output(sh("echo partial; exit 3"), wait).await, None);
        let mut missing = tokio::process::Command::new("/nonexistent/nvidia-smi");
        missing.arg("-h");
        assert_eq!(bounded_output(missing, wait).await, None);
    }
}
