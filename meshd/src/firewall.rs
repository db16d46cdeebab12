//! Packets for this device's overlay addresses come through the tunnel or
//! not at all.
//!
//! Linux takes a packet for any local address on any interface (the "weak
//! host" model): a host on the same LAN that routes 100.64.0.0/10 via this
//! device's LAN address reaches services on the overlay addresses without a
//! tunnel, a key or an identity. While the engine is up the daemon keeps an
//! nftables table of its own (`inet crank_mesh`) that drops such packets
//! before conntrack sees them, unless they arrive on the TUN device or on
//! loopback (this device talking to itself, as the gateway does when it
//! places a job here).
//!
//! The table is replaced as a whole in one `nft` transaction, so installing
//! is idempotent and a table left by a crash is simply replaced; it goes on
//! `meshd down`, on exit, and when the daemon starts. Without `nft` the
//! daemon says so loudly (log and `meshd status`) and keeps running: the
//! compute API binds to the TUN device anyway.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// The nftables table the daemon owns (family `inet`: IPv4 and IPv6).
pub const TABLE: &str = "crank_mesh";

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("interface name {0:?} cannot be used in a rule")]
    BadInterface(String),
    #[error("`nft` was not found (install nftables)")]
    NftMissing,
    #[error("running `nft`: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("`nft` refused the rules: {0}")]
    Refused(String),
}

/// A name the kernel accepts for an interface, which is also safe inside a
/// quoted nft string: 1 to 15 characters of `[A-Za-z0-9_.-]`.
fn check_interface(name: &str) -> Result<(), FirewallError> {
    let ok = (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(FirewallError::BadInterface(name.to_owned()))
    }
}

/// Header of every script: creates the table if it is missing and deletes
/// it, so what follows starts from nothing whatever was there before.
fn clear() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// The `nft -f` script that replaces our table with one dropping packets
/// for `addresses` unless they arrive on `tun` or loopback.
pub fn ruleset(tun: &str, addresses: &[IpAddr]) -> Result<String, FirewallError> {
    check_interface(tun)?;
    let list = |v4: bool| {
        addresses
            .iter()
            .filter(|a| a.is_ipv4() == v4)
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut s = clear();
    s += &format!("table inet {TABLE} {{\n");
    s += "  chain overlay_in {\n";
    // Prerouting at raw priority: dropped before conntrack keeps any state
    // for a stranger's packets.
    s += "    type filter hook prerouting priority raw; policy accept;\n";
    s += &format!("    iifname {{ \"lo\", \"{tun}\" }} accept\n");
    for (v4, family) in [(true, "ip"), (false, "ip6")] {
        let set = list(v4);
        if !set.is_empty() {
            s += &format!("    {family} daddr {{ {set} }} counter drop\n");
        }
    }
    s += "  }\n}\n";
    Ok(s)
}

/// What the daemon hands `nft`.
pub trait Nft: Send + Sync {
    /// Runs `script` as one transaction (blocking).
    fn apply(&self, script: &str) -> Result<(), FirewallError>;
}

/// The `nft` program.
pub struct NftCommand {
    pub program: PathBuf,
}

impl Default for NftCommand {
    fn default() -> Self {
        NftCommand {
            program: "nft".into(),
        }
    }
}

impl Nft for NftCommand {
    fn apply(&self, script: &str) -> Result<(), FirewallError> {
        let mut child = Command::new(&self.program)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => FirewallError::NftMissing,
                _ => FirewallError::Spawn(e),
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(FirewallError::Spawn)?;
        }
        let out = child.wait_with_output().map_err(FirewallError::Spawn)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(FirewallError::Refused(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ))
        }
    }
}

/// The daemon's table: what is installed, and why not when it is not.
pub struct Firewall {
    /// None: the host owns the TUN device and guards its addresses itself
    /// (a mobile VPN extension, an embedding app); nothing is installed.
    nft: Option<Arc<dyn Nft>>,
    /// Why the overlay addresses are unguarded, while they are.
    warning: Mutex<Option<String>>,
}

impl Firewall {
    pub fn new(nft: Arc<dyn Nft>) -> Arc<Self> {
        Arc::new(Firewall {
            nft: Some(nft),
            warning: Mutex::new(None),
        })
    }

    /// For a TUN device the host owns: the host's firewall is its own
    /// business (and several instances may share a process), so this one
    /// installs and removes nothing.
    pub fn host_owned() -> Arc<Self> {
        Arc::new(Firewall {
            nft: None,
            warning: Mutex::new(None),
        })
    }

    /// Why packets for the overlay addresses may arrive from elsewhere than
    /// the tunnel; None while the table is installed (or nothing is up).
    pub fn warning(&self) -> Option<String> {
        self.warning
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_warning(&self, w: Option<String>) {
        *self.warning.lock().unwrap_or_else(|p| p.into_inner()) = w;
    }

    async fn run(&self, script: String) -> Result<(), FirewallError> {
        let Some(nft) = self.nft.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || nft.apply(&script))
            .await
            .unwrap_or_else(|e| Err(FirewallError::Spawn(std::io::Error::other(e))))
    }

    /// Replaces the table with one guarding `addresses` on `tun`.
    pub async fn install(&self, tun: &str, addresses: &[IpAddr]) {
        if self.nft.is_none() {
            return;
        }
        let result = match ruleset(tun, addresses) {
            Ok(script) => self.run(script).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                self.set_warning(None);
                tracing::info!(table = TABLE, %tun, "overlay addresses reachable only through the tunnel");
            }
            Err(e) => {
                let warning = format!(
                    "no firewall: {e}; the overlay addresses take packets from any interface \
                     (the compute API is still bound to {tun})"
                );
                tracing::error!("{warning}");
                self.set_warning(Some(warning));
            }
        }
    }

    /// Removes the table, if there is one.
    pub async fn remove(&self) {
        self.set_warning(None);
        match self.run(clear()).await {
            Ok(()) => tracing::debug!(table = TABLE, "firewall table removed"),
            // Nothing was installed without nft; say it once, at install.
            Err(FirewallError::NftMissing) => {}
            Err(e) => tracing::warn!(table = TABLE, error = %e, "firewall table not removed"),
        }
    }

    /// Keeps the table in step with the engine for as long as `changes`
    /// lives: `current` names the TUN and its addresses while the engine is
    /// up. Returns when the sender is gone; the caller removes the table.
    pub async fn follow<T>(
        &self,
        mut changes: watch::Receiver<T>,
        current: impl Fn() -> Option<(String, Vec<IpAddr>)>,
    ) {
        let mut installed: Option<(String, Vec<IpAddr>)> = None;
        loop {
            changes.mark_unchanged();
            let now = current();
            if now.is_some() && now != installed {
                if let Some((tun, addresses)) = &now {
                    self.install(tun, addresses).await;
                }
                installed = now;
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// Hands on the scripts it is given; fails them all while `missing`.
    struct FakeNft {
        scripts: mpsc::UnboundedSender<String>,
        missing: bool,
    }

    impl Nft for FakeNft {
        fn apply(&self, script: &str) -> Result<(), FirewallError> {
            if self.missing {
                return Err(FirewallError::NftMissing);
            }
            let _ = self.scripts.send(script.to_owned());
            Ok(())
        }
    }

    fn fake(missing: bool) -> (Arc<Firewall>, mpsc::UnboundedReceiver<String>) {
        let (scripts, rx) = mpsc::unbounded_channel();
        (Firewall::new(Arc::new(FakeNft { scripts, missing })), rx)
    }

    fn v4(last: u8) -> IpAddr {
        IpAddr::from([100, 64, 0, last])
    }

    #[test]
    fn the_ruleset_drops_overlay_packets_from_other_interfaces() {
        let v6: IpAddr = "fd7a:115c:a1e0::1".parse().unwrap();
        let s = ruleset("crank0", &[v4(1), v6]).unwrap();
        assert_eq!(
            s,
            "table inet crank_mesh\n\
             delete table inet crank_mesh\n\
             table inet crank_mesh {\n  chain overlay_in {\n    \
             type filter hook prerouting priority raw; policy accept;\n    \
             iifname { \"lo\", \"crank0\" } accept\n    \
             ip daddr { 100.64.0.1 } counter drop\n    \
             ip6 daddr { fd7a:115c:a1e0::1 } counter drop\n  }\n}\n"
        );
        let only_v4 = ruleset("crank0", &[v4(1), v4(2)]).unwrap();
        assert!(only_v4.contains("ip daddr { 100.64.0.1, 100.64.0.2 } counter drop"));
        assert!(!only_v4.contains("ip6"), "no empty IPv6 set: {only_v4}");
    }

    #[test]
    fn interface_names_that_could_change_the_script_are_refused() {
        for bad in ["", "a\" } accept", "tun 0", "sixteen-chars-xx", "t\nu"] {
            assert!(
                matches!(ruleset(bad, &[v4(1)]), Err(FirewallError::BadInterface(_))),
                "{bad:?}"
            );
        }
        assert!(ruleset("crank-0.a_b", &[v4(1)]).is_ok());
    }

    #[tokio::test]
    async fn without_nft_the_daemon_warns_until_the_table_is_removed() {
        let (fw, _) = fake(true);
        fw.install("crank0", &[v4(1)]).await;
        let w = fw.warning().expect("a warning without nft");
        assert!(
            w.contains("`nft` was not found") && w.contains("crank0"),
            "{w}"
        );
        fw.remove().await;
        assert_eq!(fw.warning(), None);
    }

    #[test]
    fn a_missing_nft_program_is_named_as_such() {
        let nft = NftCommand {
            program: "/nonexistent/nft".into(),
        };
        assert!(matches!(
            nft.apply(&clear()),
            Err(FirewallError::NftMissing)
        ));
    }

    #[tokio::test]
    async fn the_table_follows_the_engine_and_only_changes_are_applied() {
        let (fw, mut scripts) = fake(false);
        let (tx, rx) = watch::channel(());
        type Seen = Option<(String, Vec<IpAddr>)>;
        let engine: Arc<Mutex<Seen>> = Arc::default();
        let e = engine.clone();
        let follower = fw.clone();
        let follow =
            tokio::spawn(
                async move { follower.follow(rx, move || e.lock().unwrap().clone()).await },
            );
        // A change before the engine is up, then the engine with its address.
        tx.send(()).unwrap();
        *engine.lock().unwrap() = Some(("crank0".into(), vec![v4(1)]));
        tx.send(()).unwrap();
        assert_eq!(
            scripts.recv().await.unwrap(),
            ruleset("crank0", &[v4(1)]).unwrap()
        );
        // The same engine again: nothing to do. New addresses (the engine
        // restarted): the table is replaced, and that is the next script.
        tx.send(()).unwrap();
        tx.send(()).unwrap();
        *engine.lock().unwrap() = Some(("crank0".into(), vec![v4(9)]));
        tx.send(()).unwrap();
        assert_eq!(
            scripts.recv().await.unwrap(),
            ruleset("crank0", &[v4(9)]).unwrap()
        );
        drop(tx);
        follow.await.unwrap();
        fw.remove().await;
        assert_eq!(scripts.recv().await.unwrap(), clear());
    }
}
