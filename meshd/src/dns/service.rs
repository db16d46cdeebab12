//! The daemon's MagicDNS: follows the netmap of the joined network.
//!
//! While the engine is up and the netmap turns MagicDNS on (the coordinator
//! has a base domain), the server answers on the network's two service
//! addresses (`100.100.100.100` and `<ula>:ffff::53`), which go on the TUN
//! device: local processes reach them, peers cannot (the engine's filter
//! drops packets from peers for any address but the device's own, and the
//! firewall table drops them from every other interface). Names follow the
//! netmap at once: a device that joins or is renamed resolves after the
//! delta that says so. The OS resolver points at the server while it runs
//! (unless told to leave it alone) and gets its own settings back on
//! `down`, on a clean stop, and on the next start after a crash.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use platform::addr::{magic_dns_v6, MAGIC_DNS_V4};
use platform::netmap::NetMap;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};

use super::{
    Config, ExtraRecord, Host, Installed, MagicDns, OsDns, OsDnsMode, Repair, Stats, ZoneSpec,
};
use crate::control::MapState;
use crate::engine::EngineSlot;

/// Seconds resolvers may cache a mesh answer.
const TTL: u32 = 60;
/// How soon a failed start is tried again.
const RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Waits (up to 3 s) until every address of `binds` can be bound.
async fn wait_bindable(binds: &[SocketAddr]) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    for b in binds {
        let probe = SocketAddr::new(b.ip(), 0);
        while std::net::UdpSocket::bind(probe).is_err() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// The addresses MagicDNS answers on for a netmap.
pub fn service_addresses(map: &NetMap) -> Vec<IpAddr> {
    let mut out = vec![IpAddr::V4(MAGIC_DNS_V4)];
    out.extend(map.routes.iter().filter_map(magic_dns_v6).map(IpAddr::V6));
    out
}

/// The server's settings for a netmap; None while MagicDNS is off.
/// `previous`: the resolvers the system had, for everything outside the mesh
/// unless the network names its own.
pub fn config_for(map: &NetMap, previous: &[SocketAddr]) -> Option<Config> {
    let domain = map.dns.zone(&map.network)?;
    let hosts = std::iter::once(&map.self_node)
        .chain(map.peers.values())
        .map(|n| Host {
            name: n.name.clone(),
            addrs: n.addresses.clone(),
        })
        .collect();
    let extra = map
        .dns
        .extra_records
        .iter()
        .map(|r| ExtraRecord {
            name: r.name.clone(),
            addr: r.address,
        })
        .collect();
    let upstream = if map.dns.nameservers.is_empty() {
        previous.to_vec()
    } else {
        map.dns
            .nameservers
            .iter()
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect()
    };
    Some(Config {
        zone: ZoneSpec {
            domain,
            hosts,
            extra,
            ttl: TTL,
            reverse_ranges: map.routes.iter().map(|r| (r.addr, r.len)).collect(),
        },
        split: map
            .dns
            .split
            .iter()
            .map(|(d, r)| (d.clone(), r.clone()))
            .collect(),
        upstream,
    })
}

/// What `meshd status` shows about MagicDNS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsStatus {
    /// The zone served (`<network>.<base domain>`).
    pub zone: String,
    pub servers: Vec<IpAddr>,
    /// How the OS resolver was pointed here: `resolved`, `resolv.conf`, `off`.
    pub os: String,
    /// Resolvers for names outside the mesh.
    pub upstream: Vec<SocketAddr>,
    pub local_answers: u64,
    pub nxdomain: u64,
    pub forwarded: u64,
    pub forward_failures: u64,
    pub refused: u64,
    pub malformed: u64,
    /// Why MagicDNS is not working, while it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

struct Running {
    server: MagicDns,
    tun: String,
    zone: String,
    servers: Vec<IpAddr>,
    installed: Installed,
    /// The resolvers the system had before.
    system: Vec<SocketAddr>,
    /// The resolvers in use for names outside the mesh.
    upstream: Vec<SocketAddr>,
}

/// MagicDNS of the daemon (one per daemon; a session follows it).
pub struct DnsService {
    os: OsDns,
    running: Mutex<Option<Running>>,
    error: std::sync::Mutex<Option<String>>,
}

impl DnsService {
    pub fn new(os: OsDns) -> Arc<Self> {
        Arc::new(DnsService {
            os,
            running: Mutex::new(None),
            error: std::sync::Mutex::new(None),
        })
    }

    fn set_error(&self, e: Option<String>) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    /// Puts back a resolver configuration a crash left behind.
    pub async fn repair(&self) {
        let os = self.os.clone();
        match tokio::task::spawn_blocking(move || os.repair_on_start()).await {
            Ok(Ok(Repair::Nothing)) => {}
            Ok(Ok(r)) => tracing::info!(repair = ?r, "resolver settings left by a crash repaired"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not repair the resolver settings"),
            Err(e) => tracing::warn!(error = %e, "resolver repair task failed"),
        }
    }

    /// Follows the session's netmap until `changes` closes; the caller
    /// stops the service after.
    pub async fn follow(&self, mut changes: watch::Receiver<MapState>, engine: Arc<EngineSlot>) {
        loop {
            let map = changes.borrow_and_update().netmap.clone();
            let mut failed = false;
            if let (Some(map), Some(e)) = (map, engine.get()) {
                if e.host_managed() {
                    // Queries to the service address arrive on the host's
                    // TUN as packets: answering them there takes DNS
                    // interception in the engine, which is not built yet.
                    self.set_error(Some(
                        "MagicDNS is not served on a TUN device the host provides (yet)".into(),
                    ));
                } else if let Err(e) = self.apply(&map, &e).await {
                    let message = format!("MagicDNS: {e:#}");
                    tracing::warn!("{message}");
                    self.set_error(Some(message));
                    failed = true;
                } else {
                    self.set_error(None);
                }
            }
            // A failure (an address still being set up, a port taken) is
            // tried again soon, not only at the next netmap.
            let retry = async {
                if failed {
                    tokio::time::sleep(RETRY).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = retry => {}
            }
        }
    }

    async fn apply(&self, map: &NetMap, engine: &crate::engine::Engine) -> anyhow::Result<()> {
        let mut running = self.running.lock().await;
        let previous = match &*running {
            Some(r) if r.tun == engine.tun_name() => None,
            _ => Some(self.previous_nameservers(map).await),
        };
        let upstream_default = match (&previous, &*running) {
            (Some(p), _) => p.clone(),
            (None, Some(r)) => r.system.clone(),
            (None, None) => Vec::new(),
        };
        let Some(config) = config_for(map, &upstream_default) else {
            drop(running);
            self.stop().await;
            return Ok(());
        };
        if let Some(r) = running.as_mut() {
            if r.tun == engine.tun_name() {
                r.upstream.clone_from(&config.upstream);
                let skipped = r.server.update(config)?;
                if skipped > 0 {
                    tracing::debug!(skipped, "names that are not DNS labels were left out");
                }
                return Ok(());
            }
        }
        if let Some(old) = running.take() {
            self.shut(old).await;
        }
        let servers = service_addresses(map);
        engine.add_service_addresses(&servers).await?;
        let binds: Vec<SocketAddr> = servers.iter().map(|ip| SocketAddr::new(*ip, 53)).collect();
        // A new IPv6 address is tentative (duplicate address detection)
        // for a moment: binding it fails until then.
        wait_bindable(&binds).await;
        let zone = config.zone.domain.clone();
        let upstream = config.upstream.clone();
        // With systemd-resolved, split domains are routed here too.
        let routes: Vec<String> = config.split.iter().map(|(d, _)| d.clone()).collect();
        let server = MagicDns::start(&binds, config).await?;
        let os = OsDns {
            routes,
            ..self.os.clone()
        };
        let (iface, search, ours) = (
            engine.tun_name().to_owned(),
            vec![zone.clone()],
            servers.clone(),
        );
        let installed = tokio::task::spawn_blocking(move || os.install(&iface, &ours, &search))
            .await?
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the OS resolver was left alone");
                Installed::Off
            });
        tracing::info!(%zone, servers = ?servers, os = ?installed, "MagicDNS serving");
        *running = Some(Running {
            server,
            tun: engine.tun_name().to_owned(),
            zone,
            servers,
            installed,
            system: upstream_default,
            upstream,
        });
        Ok(())
    }

    async fn previous_nameservers(&self, map: &NetMap) -> Vec<SocketAddr> {
        let os = self.os.clone();
        let ours = service_addresses(map);
        tokio::task::spawn_blocking(move || os.previous_nameservers(&ours))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    }

    async fn shut(&self, r: Running) {
        let os = self.os.clone();
        let installed = r.installed.clone();
        match tokio::task::spawn_blocking(move || os.restore(&installed)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not restore the resolver settings"),
            Err(e) => tracing::warn!(error = %e, "resolver restore task failed"),
        }
        if let Err(e) = r.server.stop().await {
            tracing::debug!(error = %e, "stopping MagicDNS");
        }
        tracing::info!(zone = %r.zone, "MagicDNS stopped");
    }

    /// Stops serving and gives the OS its resolver settings back.
    pub async fn stop(&self) {
        match self.running.lock().await.take() {
            Some(r) => self.shut(r).await,
            // A follower stopped while it was installing may have left our
            // resolv.conf without recording it: put the original back.
            None => self.repair().await,
        }
    }

    /// What `meshd status` shows; None while MagicDNS is off.
    pub async fn status(&self) -> Option<DnsStatus> {
        let error = self.error.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let running = self.running.lock().await;
        let Some(r) = running.as_ref() else {
            return error.map(|e| DnsStatus {
                error: Some(e),
                ..DnsStatus::default()
            });
        };
        let Stats {
            local_answers,
            nxdomain,
            forwarded,
            forward_failures,
            refused,
            malformed,
            ..
        } = r.server.stats();
        Some(DnsStatus {
            zone: r.zone.clone(),
            servers: r.servers.clone(),
            os: match &r.installed {
                Installed::Resolved { .. } => "resolved",
                Installed::ResolvConf => "resolv.conf",
                Installed::Off => "off",
            }
            .into(),
            upstream: r.upstream.clone(),
            local_answers,
            nxdomain,
            forwarded,
            forward_failures,
            refused,
            malformed,
            error,
        })
    }

    /// The mode the OS resolver is handled in.
    pub fn os_mode(&self) -> OsDnsMode {
        self.os.mode
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use platform::keys::NodePublic;
    use platform::netmap::{DnsConfig, DnsRecord, Node, NodeKind, RelayMap};

    fn node(last: u8, name: &str) -> Node {
        Node {
            id: i64::from(last),
            name: name.into(),
            kind: NodeKind::Mesh,
            node_key: NodePublic::from_bytes([last; 32]),
            disco_key: None,
            addresses: vec![IpAddr::from([100, 64, 0, last])],
            endpoints: Vec::new(),
            online: true,
            os: "linux".into(),
            home_region: None,
            capabilities: None,
            owner: None,
            key_expiry: None,
            device_key: None,
            owner_role: None,
            tags: Vec::new(),
        }
    }

    fn map(suffix: &str) -> NetMap {
        let beta = node(2, "beta");
        NetMap {
            network: "home".into(),
            self_node: node(1, "alpha"),
            routes: vec![
                platform::addr::OVERLAY_V4,
                "fd12:3456:789a::/48".parse().unwrap(),
            ],
            peers: [(beta.node_key, beta)].into(),
            relay_map: RelayMap::default(),
            dns: DnsConfig {
                suffix: suffix.into(),
                nameservers: Vec::new(),
                extra_records: vec![DnsRecord {
                    name: "printer".into(),
                    address: IpAddr::from([100, 64, 9, 9]),
                }],
                split: [(
                    "corp.example".to_owned(),
                    vec!["10.1.0.53:53".parse().unwrap()],
                )]
                .into(),
            },
            awaiting_approval: false,
            compute: Default::default(),
            packet_filter: Default::default(),
        }
    }

    #[test]
    fn a_netmap_becomes_a_zone_with_its_devices_records_and_routes() {
        let previous: Vec<SocketAddr> = vec!["192.0.2.1:53".parse().unwrap()];
        assert!(
            config_for(&map(""), &previous).is_none(),
            "no base domain: off"
        );
        let c = config_for(&map("crank.internal"), &previous).unwrap();
        assert_eq!(c.zone.domain, "home.crank.internal");
        let names: Vec<&str> = c.zone.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["alpha", "beta"]);
        assert_eq!(c.zone.extra[0].name, "printer");
        assert_eq!(c.zone.reverse_ranges.len(), 2);
        assert_eq!(c.split[0].0, "corp.example");
        assert_eq!(c.upstream, previous, "the system's resolvers by default");
        let mut own = map("crank.internal");
        own.dns.nameservers = vec![IpAddr::from([9, 9, 9, 9])];
        assert_eq!(
            config_for(&own, &previous).unwrap().upstream,
            vec!["9.9.9.9:53".parse::<SocketAddr>().unwrap()],
            "the network's resolvers when it names some"
        );
    }

    #[test]
    fn service_addresses_are_fixed_and_never_a_devices() {
        let addrs = service_addresses(&map("crank.internal"));
        assert_eq!(
            addrs,
            vec![
                IpAddr::from([100, 100, 100, 100]),
                "fd12:3456:789a:ffff::53".parse::<IpAddr>().unwrap()
            ]
        );
        let ula: platform::addr::UlaPrefix = "fd12:3456:789a::/48".parse().unwrap();
        for seq in [0, 1, 0x53, u32::MAX] {
            assert!(!addrs.contains(&IpAddr::V6(ula.address(seq))));
        }
    }
}
