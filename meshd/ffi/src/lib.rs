//! Crank Mesh as a C library, for hosts that own the TUN device: a mobile
//! VPN extension (iOS `NEPacketTunnelProvider`, Android `VpnService`) or
//! any app that opens a TUN itself. The host creates an instance from a
//! JSON configuration, starts it on its TUN file descriptor, reads status
//! as JSON and receives logs through a callback. Each instance has its own
//! runtime, state directory and log sink: nothing is process-global, and
//! several instances live side by side in one process.
//!
//! The header, `crank_mesh.h`, is generated from this file by cbindgen
//! (`header.sh`).
//!
//! The host configures the TUN device itself (addresses, routes, MTU): the
//! status JSON names this device's overlay addresses (`self.addresses`)
//! and its routes once joined.
// The C boundary: raw pointers and C strings are the point of this crate.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshd::daemon::{ComputeConfig, Daemon, DaemonConfig};
use meshd::dns::{OsDns, OsDnsMode};
use meshd::engine::{TunConfig, DEFAULT_MTU};
use meshd::localapi::{BackendState, Request, Response};
use serde::Deserialize;
use tracing_subscriber::layer::SubscriberExt as _;

/// Log levels given to [`CrankMeshLogFn`].
pub const CRANK_MESH_LOG_ERROR: c_int = 1;
pub const CRANK_MESH_LOG_WARN: c_int = 2;
pub const CRANK_MESH_LOG_INFO: c_int = 3;
pub const CRANK_MESH_LOG_DEBUG: c_int = 4;
pub const CRANK_MESH_LOG_TRACE: c_int = 5;

/// Receives one log line: `user` as given to `crank_mesh_new`, a level
/// (`CRANK_MESH_LOG_*`) and the line, UTF-8 and NUL-terminated, valid only
/// during the call. Called from the instance's own threads, which run the
/// instance: the callback must return promptly and must not call back into
/// this library (its runtime cannot be entered from its own threads: such a
/// call aborts the process).
pub type CrankMeshLogFn =
    Option<unsafe extern "C" fn(user: *mut c_void, level: c_int, line: *const c_char)>;

/// The JSON configuration of an instance.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Keys and preferences live here (the host's private storage).
    state_dir: PathBuf,
    /// The coordinator's URL.
    coordinator: String,
    /// A pre-auth key for the first join; later starts resume without it.
    #[serde(default)]
    auth_key: Option<String>,
    #[serde(default)]
    hostname: Option<String>,
    /// The UDP port to listen on; 0 picks a free one.
    #[serde(default)]
    udp_port: u16,
    /// The name of the host's TUN device, when it has one (status, and
    /// telling the device's own addresses from others).
    #[serde(default = "default_tun_name")]
    tun_name: String,
    /// A tracing filter for the log callback, e.g. `info` or `meshd=debug`.
    #[serde(default)]
    log_level: Option<String>,
}

fn default_tun_name() -> String {
    "tun".into()
}

/// An instance: see the crate docs.
pub struct CrankMesh {
    config: Config,
    runtime: tokio::runtime::Runtime,
    logs: Option<tracing::Dispatch>,
    daemon: Option<Arc<Daemon>>,
    last_error: CString,
}

/// Forwards log events to the host's callback.
struct CallbackLayer {
    f: unsafe extern "C" fn(*mut c_void, c_int, *const c_char),
    /// The host's pointer, passed back untouched.
    user: usize,
}

struct Line<'a>(&'a mut String);

impl tracing::field::Visit for Line<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CallbackLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut line = String::new();
        event.record(&mut Line(&mut line));
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => CRANK_MESH_LOG_ERROR,
            tracing::Level::WARN => CRANK_MESH_LOG_WARN,
            tracing::Level::INFO => CRANK_MESH_LOG_INFO,
            tracing::Level::DEBUG => CRANK_MESH_LOG_DEBUG,
            tracing::Level::TRACE => CRANK_MESH_LOG_TRACE,
        };
        let line = CString::new(line.replace('\0', " ")).unwrap_or_default();
        // SAFETY: the host promised a callback valid for the instance's
        // life; the line outlives the call.
        unsafe { (self.f)(self.user as *mut c_void, level, line.as_ptr()) };
    }
}

impl CrankMesh {
    fn new(config_json: &str, log: CrankMeshLogFn, user: *mut c_void) -> anyhow::Result<Self> {
        let config: Config = serde_json::from_str(config_json)
            .map_err(|e| anyhow::anyhow!("configuration JSON: {e}"))?;
        let logs = match log {
            Some(f) => {
                let filter = tracing_subscriber::EnvFilter::try_new(
                    config.log_level.as_deref().unwrap_or("info"),
                )
                .map_err(|e| anyhow::anyhow!("log_level: {e}"))?;
                let layer = CallbackLayer {
                    f,
                    user: user as usize,
                };
                Some(tracing::Dispatch::new(
                    tracing_subscriber::registry().with(filter).with(layer),
                ))
            }
            None => None,
        };
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder
            .worker_threads(2)
            .enable_all()
            .thread_name("crank-mesh");
        if let Some(d) = logs.clone() {
            // This instance's threads log to this instance's callback.
            builder.on_thread_start(move || {
                std::mem::forget(tracing::dispatcher::set_default(&d));
            });
        }
        Ok(CrankMesh {
            config,
            runtime: builder.build()?,
            logs,
            daemon: None,
            last_error: CString::default(),
        })
    }

    /// Runs `f` on the calling thread with this instance's logging.
    fn with_logs<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.logs {
            Some(d) => tracing::dispatcher::with_default(d, f),
            None => f(),
        }
    }

    fn start(&mut self, tun_fd: c_int) -> anyhow::Result<()> {
        anyhow::ensure!(self.daemon.is_none(), "already started");
        anyhow::ensure!(tun_fd >= 0, "no TUN file descriptor");
        let c = &self.config;
        let cfg = DaemonConfig {
            state_dir: c.state_dir.clone(),
            tun: TunConfig {
                host_fd: Some(tun_fd),
                ..TunConfig::named(c.tun_name.clone(), DEFAULT_MTU, false)
            },
            udp_port: c.udp_port,
            compute: ComputeConfig {
                models_dir: c.state_dir.join("models"),
                enable: None,
            },
            sys_root: PathBuf::from("/"),
            gateway: None,
            // The host owns the system's resolver settings.
            dns: OsDns::new(OsDnsMode::Off),
        };
        let up = Request::Up {
            coordinator: c.coordinator.clone(),
            ca_file: None,
            auth_key: c.auth_key.clone(),
            hostname: c.hostname.clone(),
            coordinator_key: None,
        };
        let daemon = self.with_logs(|| {
            self.runtime.block_on(async {
                let daemon = Daemon::new(cfg).await?;
                // A device that joined before comes back as it was.
                daemon.resume().await?;
                if daemon.status().await.backend == BackendState::Stopped {
                    match daemon.handle(up).await {
                        Response::Ok(_) => {}
                        Response::Pairing(p) => anyhow::bail!(
                            "no auth key: approve pairing code {} on the coordinator, or configure auth_key",
                            p.code
                        ),
                        Response::Error(e) => anyhow::bail!("{e}"),
                        other => anyhow::bail!("unexpected answer to up: {other:?}"),
                    }
                }
                anyhow::Ok(daemon)
            })
        })?;
        self.daemon = Some(daemon);
        Ok(())
    }

    fn status_json(&self) -> String {
        let status = match &self.daemon {
            Some(d) => {
                let d = d.clone();
                self.with_logs(|| self.runtime.block_on(async move { d.status().await }))
            }
            None => {
                return r#"{"backend":"stopped","peers":[]}"#.to_owned();
            }
        };
        serde_json::to_string(&status).unwrap_or_else(|e| format!(r#"{{"error":"{e}"}}"#))
    }

    fn stop(&mut self) {
        if let Some(d) = self.daemon.take() {
            self.with_logs(|| self.runtime.block_on(async move { d.shutdown().await }));
        }
    }

    fn fail(&mut self, e: anyhow::Error) -> c_int {
        let text = format!("{e:#}");
        self.with_logs(|| tracing::error!(error = %text, "crank mesh"));
        self.last_error = CString::new(text.replace('\0', " ")).unwrap_or_default();
        -1
    }
}

/// Creates an instance from a JSON configuration:
/// `{"state_dir": "...", "coordinator": "https://...", "auth_key": "...",
/// "hostname": "...", "udp_port": 0, "tun_name": "...", "log_level": "info"}`
/// (`state_dir` and `coordinator` required). `log` (may be NULL) receives
/// the instance's logs with `user`. Returns NULL on a bad configuration,
/// after logging why.
///
/// # Safety
/// `config_json` is a NUL-terminated string; `log`, when not NULL, stays
/// callable (and `user` valid for it) until `crank_mesh_free`.
#[no_mangle]
pub unsafe extern "C" fn crank_mesh_new(
    config_json: *const c_char,
    log: CrankMeshLogFn,
    user: *mut c_void,
) -> *mut CrankMesh {
    let report = |text: &str| {
        if let Some(f) = log {
            let line = CString::new(text.replace('\0', " ")).unwrap_or_default();
            // SAFETY: as promised by the caller.
            unsafe { f(user, CRANK_MESH_LOG_ERROR, line.as_ptr()) };
        }
    };
    if config_json.is_null() {
        report("crank_mesh_new: no configuration");
        return std::ptr::null_mut();
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let Ok(json) = unsafe { CStr::from_ptr(config_json) }.to_str() else {
        report("crank_mesh_new: the configuration is not UTF-8");
        return std::ptr::null_mut();
    };
    match CrankMesh::new(json, log, user) {
        Ok(m) => Box::into_raw(Box::new(m)),
        Err(e) => {
            report(&format!("crank_mesh_new: {e:#}"));
            std::ptr::null_mut()
        }
    }
}

/// Joins the mesh (or resumes a device that joined before) and starts
/// carrying packets on `tun_fd`, a TUN device the host opened and keeps
/// open (it is never closed here). Returns 0, or -1 with the reason in
/// `crank_mesh_last_error`.
///
/// # Safety
/// `mesh` comes from `crank_mesh_new` and is not used from another thread
/// during the call.
#[no_mangle]
pub unsafe extern "C" fn crank_mesh_start(mesh: *mut CrankMesh, tun_fd: c_int) -> c_int {
    // SAFETY: the caller passes a live instance, exclusively.
    let Some(m) = (unsafe { mesh.as_mut() }) else {
        return -1;
    };
    match m.start(tun_fd) {
        Ok(()) => 0,
        Err(e) => m.fail(e),
    }
}

/// The instance's status as JSON (the same document as `meshd status
/// --json`); free it with `crank_mesh_string_free`. NULL for a NULL
/// instance.
///
/// # Safety
/// `mesh` comes from `crank_mesh_new`.
#[no_mangle]
pub unsafe extern "C" fn crank_mesh_status(mesh: *const CrankMesh) -> *mut c_char {
    // SAFETY: the caller passes a live instance.
    let Some(m) = (unsafe { mesh.as_ref() }) else {
        return std::ptr::null_mut();
    };
    CString::new(m.status_json())
        .map(CString::into_raw)
        .unwrap_or(std::ptr::null_mut())
}

/// The reason the last call that returned -1 failed (empty if none);
/// valid until the next call on the instance.
///
/// # Safety
/// `mesh` comes from `crank_mesh_new`.
#[no_mangle]
pub unsafe extern "C" fn crank_mesh_last_error(mesh: *const CrankMesh) -> *const c_char {
    // SAFETY: the caller passes a live instance.
    match unsafe { mesh.as_ref() } {
        Some(m) => m.last_error.as_ptr(),
        None => c"".as_ptr(),
    }
}

/// Stops carrying packets and leaves the mesh session (the device stays
/// joined: the next start resumes it). Returns 0.
///
/// # Safety
/// `mesh` comes from `crank_mesh_new` and is not used from another thread
/// during the call.
#[no_mangle]
pub unsafe extern "C" fn crank_mesh_stop(mesh: *mut CrankMesh) -> c_int {
    // SAFETY: the caller passes a live instance, exclusively.
    if let Some(m) = unsafe { mesh.as_mut() } {
        m.stop();
    }
    0
}

/// Stops the instance if it runs and frees it.
///
/// # Safety
/// `mesh` comes from `crank_mesh_new` (or is NULL) and is not used again.
#[no_mangle]
pub unsafe extern "C" fn crank_mesh_free(mesh: *mut CrankMesh) {
    if mesh.is_null() {
        return;
    }
    // SAFETY: the caller hands back ownership of a live instance.
    let mut m = unsafe { Box::from_raw(mesh) };
    m.stop();
    let CrankMesh { runtime, .. } = *m;
    runtime.shutdown_timeout(Duration::from_secs(2));
}

/// Frees a string returned by this library.
///
/// # Safety
/// `s` comes from this library (or is NULL) and is not used again.
#[no_mangle]
pub unsafe extern "C" fn crank_mesh_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: `s` was made by `CString::into_raw` here.
        drop(unsafe { CString::from_raw(s) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed header (made by `header.sh` with the cbindgen CLI)
    /// declares every exported function and constant, so C code compiled
    /// against it links and agrees on the levels.
    #[test]
    fn the_header_declares_every_export() {
        let dir = env!("CARGO_MANIFEST_DIR");
        let source = std::fs::read_to_string(format!("{dir}/src/lib.rs")).unwrap();
        let header = std::fs::read_to_string(format!("{dir}/crank_mesh.h")).unwrap();
        let mut checked = 0;
        for line in source.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("pub unsafe extern \"C\" fn ") {
                let name = &rest[..rest.find('(').unwrap()];
                assert!(
                    header.contains(&format!("{name}(")),
                    "crank_mesh.h lacks {name}: run meshd/ffi/header.sh"
                );
                checked += 1;
            }
            if let Some(rest) = line.strip_prefix("pub const CRANK_MESH_") {
                let (name, value) = rest.split_once(": c_int = ").unwrap();
                let value = value.trim_end_matches(';');
                assert!(
                    header.contains(&format!("#define CRANK_MESH_{name} {value}")),
                    "crank_mesh.h lacks CRANK_MESH_{name} = {value}: run meshd/ffi/header.sh"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 12, "seven functions and five levels");
        assert!(header.contains("CrankMeshLogFn"));
    }

    unsafe extern "C" fn collect(user: *mut c_void, level: c_int, line: *const c_char) {
        // SAFETY: `user` is the Vec below; `line` a C string for the call.
        let lines = unsafe { &mut *(user as *mut Vec<(c_int, String)>) };
        let text = unsafe { CStr::from_ptr(line) }
            .to_string_lossy()
            .into_owned();
        lines.push((level, text));
    }

    #[test]
    fn bad_configurations_are_refused_with_a_reason() {
        let mut lines: Vec<(c_int, String)> = Vec::new();
        let user = (&mut lines as *mut Vec<(c_int, String)>).cast::<c_void>();
        for bad in [
            c"not json",
            c"{}",
            c"{\"state_dir\":\"/tmp/x\",\"coordinator\":\"http://c\",\"surprise\":1}",
        ] {
            // SAFETY: valid C strings and a callback that outlives the call.
            let m = unsafe { crank_mesh_new(bad.as_ptr(), Some(collect), user) };
            assert!(m.is_null());
        }
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|(l, _)| *l == CRANK_MESH_LOG_ERROR));
        assert!(lines[2].1.contains("surprise"), "{lines:?}");
        // SAFETY: NULL is accepted everywhere.
        unsafe {
            assert!(crank_mesh_status(std::ptr::null()).is_null());
            crank_mesh_free(std::ptr::null_mut());
        }
    }

    #[test]
    fn an_instance_reports_stopped_until_started_and_refuses_a_bad_fd() {
        let dir = std::env::temp_dir().join(format!("crank-ffi-{}", std::process::id()));
        let json = format!(
            r#"{{"state_dir":"{}","coordinator":"http://127.0.0.1:9"}}"#,
            dir.display()
        );
        let json = CString::new(json).unwrap();
        // SAFETY: a valid configuration, no callback.
        let m = unsafe { crank_mesh_new(json.as_ptr(), None, std::ptr::null_mut()) };
        assert!(!m.is_null());
        // SAFETY: `m` is live; strings come from the library.
        unsafe {
            let s = crank_mesh_status(m);
            let text = CStr::from_ptr(s).to_str().unwrap().to_owned();
            crank_mesh_string_free(s);
            assert!(text.contains("stopped"), "{text}");
            assert_eq!(crank_mesh_start(m, -1), -1);
            let why = CStr::from_ptr(crank_mesh_last_error(m)).to_str().unwrap();
            assert!(why.contains("TUN"), "{why}");
            crank_mesh_free(m);
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
