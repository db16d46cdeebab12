//! Pointing the Linux resolver at the MagicDNS server, and undoing it.
//!
//! It exists because the daemon must change machine-wide state that outlives
//! it: either systemd-resolved's per-link settings (undone with `resolvectl
//! revert`, and dropped by resolved when the link disappears) or
//! `/etc/resolv.conf` itself, whose original is kept in a backup file so that
//! a crash can be repaired on the next start.
//!
//! `/etc/resolv.conf` is always written **in place** (truncate + write +
//! fsync), never replaced by rename: in a network namespace `ip netns exec`
//! bind-mounts `/etc/netns/NAME/resolv.conf` over it, and a rename onto a
//! bind-mount target fails with EBUSY. If it is a symlink, we write *through*
//! it (the target's content is backed up and later restored through the same
//! link), so the link and whoever owns its target stay in place.
//!
//! All calls block (file I/O, `resolvectl`); use `spawn_blocking` from async code.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use platform::netmap::is_dns_name;

/// The first-line prefix that marks a resolv.conf written by us.
pub const MARKER: &str = "# written by meshd: MagicDNS";

/// How to configure the OS resolver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OsDnsMode {
    /// systemd-resolved when it manages resolv.conf, else resolv.conf.
    Auto,
    /// Per-link settings through `resolvectl`.
    Resolved,
    /// Rewrite the resolv.conf file.
    ResolvConf,
    /// Touch nothing.
    Off,
}

/// What [`OsDns::install`] did; hand it back to [`OsDns::restore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Installed {
    /// resolved was configured for this link.
    Resolved {
        /// The interface that carries our DNS settings.
        iface: String,
    },
    /// resolv.conf was rewritten; the original is in the backup file.
    ResolvConf,
    /// Nothing was changed.
    Off,
}

/// What [`OsDns::repair_on_start`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    /// No leftovers.
    Nothing,
    /// Our resolv.conf was still in place: the backup was put back.
    Restored,
    /// A backup existed but resolv.conf had been rewritten by someone else
    /// since: the stale backup was removed and resolv.conf left alone.
    RemovedStaleBackup,
}

/// Errors from configuring the OS resolver.
#[derive(Debug, thiserror::Error)]
pub enum OsDnsError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A helper program could not be run.
    #[error("running {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: io::Error,
    },
    /// A helper program failed.
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// An interface name or domain that must not reach a file or command.
    #[error("invalid {what}: {value:?}")]
    Invalid {
        /// What was invalid.
        what: &'static str,
        /// The offending value.
        value: String,
    },
}

/// OS resolver configuration. Paths are fields so tests (and packagers) can move them.
#[derive(Clone, Debug)]
pub struct OsDns {
    /// The chosen mode.
    pub mode: OsDnsMode,
    /// The resolver file, normally `/etc/resolv.conf`.
    pub resolv_conf: PathBuf,
    /// Where the original resolv.conf is kept while ours is installed.
    pub backup: PathBuf,
    /// The `resolvectl` program.
    pub resolvectl: PathBuf,
    /// The `systemctl` program (for `is-active systemd-resolved`).
    pub systemctl: PathBuf,
    /// resolved's runtime directory, normally `/run/systemd/resolve`.
    pub resolved_run_dir: PathBuf,
    /// Routing-only domains for resolved (`~DOMAIN`) besides the search
    /// domains: split-DNS domains, reverse zones such as `64.100.in-addr.arpa`.
    pub routes: Vec<String>,
}

impl OsDns {
    /// Standard Linux paths, with the backup at `/var/lib/crank-mesh/resolv.conf.backup`.
    pub fn new(mode: OsDnsMode) -> Self {
        Self {
            mode,
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            backup: PathBuf::from("/var/lib/crank-mesh/resolv.conf.backup"),
            resolvectl: PathBuf::from("resolvectl"),
            systemctl: PathBuf::from("systemctl"),
            resolved_run_dir: PathBuf::from("/run/systemd/resolve"),
            routes: Vec::new(),
        }
    }

    /// The mode [`OsDnsMode::Auto`] resolves to on this machine.
    ///
    /// resolved is used only when it runs *and* resolv.conf sends queries
    /// to it (a link into its run directory, or `nameserver 127.0.0.53`);
    /// otherwise glibc would never consult the per-link settings.
    pub fn effective_mode(&self) -> OsDnsMode {
        if self.mode != OsDnsMode::Auto {
            return self.mode;
        }
        let running =
            (self.resolved_run_dir.is_dir() && self.has_resolvectl()) || self.systemctl_active();
        if running && self.resolv_conf_uses_resolved() {
            OsDnsMode::Resolved
        } else {
            OsDnsMode::ResolvConf
        }
    }

    fn has_resolvectl(&self) -> bool {
        Command::new(&self.resolvectl)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn systemctl_active(&self) -> bool {
        Command::new(&self.systemctl)
            .args(["is-active", "--quiet", "systemd-resolved"])
            .status()
            .is_ok_and(|s| s.success())
    }

    fn resolv_conf_uses_resolved(&self) -> bool {
        let via_link = fs::read_link(&self.resolv_conf)
            .is_ok_and(|target| target.to_string_lossy().contains("/systemd/resolve/"));
        let via_stub = fs::read_to_string(&self.resolv_conf)
            .is_ok_and(|text| nameservers(&text).contains(&IpAddr::from([127, 0, 0, 53])));
        via_link || via_stub
    }

    /// Points the system at `servers` for queries, with `search` domains.
    pub fn install(
        &self,
        iface: &str,
        servers: &[IpAddr],
        search: &[String],
    ) -> Result<Installed, OsDnsError> {
        for domain in search.iter().chain(&self.routes) {
            check_domain(domain)?;
        }
        match self.effective_mode() {
            OsDnsMode::Off => Ok(Installed::Off),
            OsDnsMode::Resolved => self.install_resolved(iface, servers, search),
            _ => {
                self.install_resolv_conf(servers, search)?;
                Ok(Installed::ResolvConf)
            }
        }
    }

    fn install_resolved(
        &self,
        iface: &str,
        servers: &[IpAddr],
        search: &[String],
    ) -> Result<Installed, OsDnsError> {
        check_iface(iface)?;
        let mut dns = vec!["dns".to_string(), iface.to_string()];
        dns.extend(servers.iter().map(IpAddr::to_string));
        self.resolvectl(&dns)?;
        let mut domains = vec!["domain".to_string(), iface.to_string()];
        domains.extend(search.iter().map(|d| d.trim_end_matches('.').to_string()));
        domains.extend(
            self.routes
                .iter()
                .map(|d| format!("~{}", d.trim_end_matches('.'))),
        );
        self.resolvectl(&domains)?;
        // Only our domains go to us; everything else keeps its old route.
        self.resolvectl(&[
            "default-route".to_string(),
            iface.to_string(),
            "false".to_string(),
        ])?;
        Ok(Installed::Resolved {
            iface: iface.to_string(),
        })
    }

    fn resolvectl(&self, args: &[String]) -> Result<(), OsDnsError> {
        let program = self.resolvectl.display().to_string();
        let out = Command::new(&self.resolvectl)
            .args(args)
            .output()
            .map_err(|source| OsDnsError::Spawn {
                program: program.clone(),
                source,
            })?;
        if out.status.success() {
            return Ok(());
        }
        Err(OsDnsError::Command {
            command: format!("{program} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }

    fn install_resolv_conf(&self, servers: &[IpAddr], search: &[String]) -> Result<(), OsDnsError> {
        let current = read(&self.resolv_conf)?;
        if !is_ours(&current) {
            // Never back up our own file (install twice keeps the original).
            write_backup(&self.backup, &current)?;
        }
        let mut text = format!(
            "{MARKER}; the original is kept at {}\n",
            self.backup.display()
        );
        for server in servers {
            text.push_str(&format!("nameserver {server}\n"));
        }
        if !search.is_empty() {
            let names: Vec<&str> = search.iter().map(|d| d.trim_end_matches('.')).collect();
            text.push_str(&format!("search {}\n", names.join(" ")));
        }
        text.push_str("options edns0\n");
        write_in_place(&self.resolv_conf, text.as_bytes())
    }

    /// Undoes [`OsDns::install`]. For resolv.conf: puts the backup back in
    /// place if our file is still there (if someone else rewrote it since,
    /// theirs is left alone) and removes the backup.
    pub fn restore(&self, installed: &Installed) -> Result<(), OsDnsError> {
        match installed {
            Installed::Off => Ok(()),
            Installed::Resolved { iface } => {
                check_iface(iface)?;
                self.resolvectl(&["revert".to_string(), iface.clone()])
            }
            Installed::ResolvConf => self.restore_resolv_conf().map(|_| ()),
        }
    }

    fn restore_resolv_conf(&self) -> Result<Repair, OsDnsError> {
        let original = match fs::read(&self.backup) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Repair::Nothing),
            Err(source) => return Err(io_err(&self.backup, source)),
        };
        let outcome = if is_ours(&read(&self.resolv_conf)?) {
            write_in_place(&self.resolv_conf, &original)?;
            Repair::Restored
        } else {
            Repair::RemovedStaleBackup
        };
        fs::remove_file(&self.backup).map_err(|e| io_err(&self.backup, e))?;
        Ok(outcome)
    }

    /// Cleans up after a crash while resolv.conf was installed: if the backup
    /// exists and resolv.conf carries our marker, the backup is restored.
    /// (resolved forgets a link's settings when the link goes away.)
    pub fn repair_on_start(&self) -> Result<Repair, OsDnsError> {
        if self.mode == OsDnsMode::Off {
            return Ok(Repair::Nothing);
        }
        self.restore_resolv_conf()
    }

    /// The nameservers the system had before us, as port-53 upstreams:
    /// from the backup while installed, else from resolv.conf; addresses in
    /// `ours` (our own service addresses) are left out.
    pub fn previous_nameservers(&self, ours: &[IpAddr]) -> Result<Vec<SocketAddr>, OsDnsError> {
        let text = match fs::read(&self.backup) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                String::from_utf8_lossy(&read(&self.resolv_conf)?).into_owned()
            }
            Err(source) => return Err(io_err(&self.backup, source)),
        };
        Ok(nameservers(&text)
            .into_iter()
            .filter(|ip| !ours.contains(ip))
            .map(|ip| SocketAddr::new(ip, 53))
            .collect())
    }
}

/// The `nameserver` addresses in resolv.conf text (zone ids like `%eth0` dropped).
pub fn nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let addr = words.next()?;
            addr.split('%').next()?.parse().ok()
        })
        .collect()
}

fn is_ours(contents: &[u8]) -> bool {
    contents.starts_with(MARKER.as_bytes())
}

fn check_domain(domain: &str) -> Result<(), OsDnsError> {
    if !is_dns_name(domain) {
        return Err(OsDnsError::Invalid {
            what: "domain",
            value: domain.to_string(),
        });
    }
    Ok(())
}

fn check_iface(iface: &str) -> Result<(), OsDnsError> {
    let ok = !iface.is_empty()
        && iface.len() <= 15
        && iface.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
    if ok {
        Ok(())
    } else {
        Err(OsDnsError::Invalid {
            what: "interface name",
            value: iface.to_string(),
        })
    }
}

fn io_err(path: &Path, source: io::Error) -> OsDnsError {
    OsDnsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a file; a missing file reads as empty (no resolv.conf at all).
fn read(path: &Path) -> Result<Vec<u8>, OsDnsError> {
    match fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(io_err(path, source)),
    }
}

/// Truncates and rewrites `path` in place (following symlinks), then fsyncs.
fn write_in_place(path: &Path, contents: &[u8]) -> Result<(), OsDnsError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    file.write_all(contents).map_err(|e| io_err(path, e))?;
    file.sync_all().map_err(|e| io_err(path, e))
}

/// The backup is our own file, so it may be replaced atomically by rename.
fn write_backup(path: &Path, contents: &[u8]) -> Result<(), OsDnsError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    }
    let tmp = path.with_extension("tmp");
    write_in_place(&tmp, contents)?;
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

#[cfg(test)]
#[path = "os_tests.rs"]
mod tests;
