//! From a request to a ranked list of workers: the candidates this device's
//! netmap and engine know of, the scheduler's verdict on each, and the
//! addresses to call.

use std::net::IpAddr;

use platform::capability::Tier;
use platform::jobs::{Route, Workload, MICRO};
use platform::keys::DevicePublic;
use platform::netmap::{NetMap, Node};
use platform::people::Role;
use serde_json::{json, Value};

use super::{Gateway, GatewayError, JobOptions, SessionView};

/// A worker the job may be sent to.
#[derive(Clone, Debug)]
pub(super) struct Target {
    pub name: String,
    pub device_key: DevicePublic,
    /// `http://ADDR:PORT` on the overlay.
    pub base: String,
    pub tier: Tier,
    /// The model name to ask it for.
    pub model: String,
    /// `local`, `direct` or `relay`.
    pub path: &'static str,
}

pub(super) struct Placed {
    pub job_id: String,
    pub workload: Workload,
    pub route: Route,
    pub placement: scheduler::Placement,
    /// Best first; only workers that can be addressed.
    pub targets: Vec<Target>,
    pub estimated_cost: u64,
}

impl Placed {
    /// `x-crank-dry-run`: where the job would go and what it may cost.
    pub fn dry_run_answer(&self, netmap: &NetMap) -> Value {
        json!({
            "job_id": self.job_id,
            "network": netmap.network,
            "workload": self.workload,
            "route": self.route,
            "worker": self.targets.first().map(|t| &t.name),
            "model": self.targets.first().map(|t| &t.model),
            "estimated_cost": self.estimated_cost,
            "estimated_credits": self.estimated_cost as f64 / MICRO as f64,
            "placement": self.placement,
        })
    }
}

/// 128 random bits, hex.
pub(super) fn new_job_id() -> String {
    let mut b = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    hex::encode(b)
}

fn nodes(netmap: &NetMap) -> impl Iterator<Item = &Node> {
    std::iter::once(&netmap.self_node).chain(netmap.peers.values())
}

/// Refuses a model nobody offers (404) or one of the wrong kind (400).
fn check_model(netmap: &NetMap, workload: Workload, model: &str) -> Result<(), GatewayError> {
    let offered: Vec<(&str, &str)> = nodes(netmap)
        .filter_map(|n| n.capabilities.as_ref()?.compute.as_ref())
        .flat_map(|c| c.models.iter().map(|m| (m.name.as_str(), m.kind.as_str())))
        .collect();
    match offered.iter().find(|(name, _)| *name == model) {
        Some((_, kind)) if *kind == workload.model_kind() => Ok(()),
        Some((_, kind)) => Err(GatewayError::bad(
            "wrong_model_kind",
            format!(
                "{model:?} is a {kind} model; {workload} needs a {} model",
                workload.model_kind()
            ),
        )),
        None => {
            let mut names: Vec<&str> = offered
                .iter()
                .filter(|(_, k)| *k == workload.model_kind())
                .map(|(n, _)| *n)
                .collect();
            names.sort_unstable();
            names.dedup();
            Err(GatewayError::new(
                axum::http::StatusCode::NOT_FOUND,
                "model_not_found",
                if names.is_empty() {
                    format!(
                        "no device in the network offers {model:?}, nor any {} model",
                        workload.model_kind()
                    )
                } else {
                    format!(
                        "no device in the network offers {model:?} (on offer: {})",
                        names.join(", ")
                    )
                },
            ))
        }
    }
}

fn target(
    node: &Node,
    is_self: bool,
    direct: bool,
    workload: Workload,
    model: Option<&str>,
) -> Option<Target> {
    let caps = node.capabilities.as_ref()?;
    let offer = caps.compute.as_ref()?;
    let model = offer
        .models
        .iter()
        .find(|m| m.kind == workload.model_kind() && model.is_none_or(|w| w == m.name))?;
    // IPv4 first: every overlay node has one.
    let ip: IpAddr = *node.addresses.first()?;
    Some(Target {
        name: node.name.clone(),
        device_key: node.device_key?,
        base: format!("http://{}", std::net::SocketAddr::new(ip, offer.port)),
        tier: caps.tier,
        model: model.name.clone(),
        path: match (is_self, direct) {
            (true, _) => "local",
            (false, true) => "direct",
            (false, false) => "relay",
        },
    })
}

pub(super) fn place(
    g: &Gateway,
    view: &SessionView,
    netmap: &NetMap,
    workload: Workload,
    model: Option<&str>,
    opts: &JobOptions,
) -> Result<Placed, GatewayError> {
    if let Some(m) = model {
        check_model(netmap, workload, m)?;
    }
    let role = netmap.self_node.owner_role.unwrap_or(Role::Member);
    netmap
        .compute
        .policy
        .may_submit(role, workload, opts.sensitivity, &opts.route)
        .map_err(|e| GatewayError::new(axum::http::StatusCode::FORBIDDEN, "policy_refused", e))?;
    let spec = scheduler::JobSpec {
        workload,
        model: model.map(str::to_owned),
        route: opts.route.clone(),
        sensitivity: opts.sensitivity,
        ..scheduler::JobSpec::new(workload, role)
    };
    let engine = view.engine.get();
    let paths = |key: &platform::keys::NodePublic| {
        let stats = engine.as_ref().and_then(|e| e.peer_stats(key));
        scheduler::PathInfo {
            rtt_ms: stats
                .as_ref()
                .and_then(|s| s.rtt_us)
                .map(|us| us as f64 / 1000.0),
            direct: stats.as_ref().is_some_and(|s| s.direct),
        }
    };
    let inflight = |name: &str| g.inflight_on(name);
    let candidates = scheduler::candidates(netmap, &paths, &inflight, platform::unix_now());
    let placement = scheduler::place(&spec, &candidates, &netmap.compute);
    let targets: Vec<Target> = placement
        .ranked
        .iter()
        .filter_map(|r| {
            let c = candidates.iter().find(|c| c.name == r.name)?;
            let node = if c.is_self {
                &netmap.self_node
            } else {
                netmap.peers.get(&c.node_key)?
            };
            target(node, c.is_self, c.path.direct, workload, model)
        })
        .collect();
    let Some(best) = targets.first() else {
        g.jobs.refused();
        let why = if placement.ranked.is_empty() {
            placement.explain_none()
        } else {
            "no eligible device can be sent a ticket (no device key in the netmap)".into()
        };
        return Err(GatewayError::unavailable("no_eligible_device", why));
    };
    let timeout_ms = u64::try_from(opts.timeout.as_millis()).unwrap_or(u64::MAX);
    let estimated_cost = netmap.compute.rates.estimate(best.tier, timeout_ms);
    Ok(Placed {
        job_id: new_job_id(),
        workload,
        route: opts.route.clone(),
        placement,
        targets,
        estimated_cost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use platform::capability::{Capabilities, ComputeOffer, OfferedModel};
    use platform::keys::{DevicePrivate, NodePublic};
    use platform::netmap::{DnsConfig, NodeKind, RelayMap};

    fn node(b: u8, models: &[(&str, &str)]) -> Node {
        Node {
            id: i64::from(b),
            name: format!("n{b}"),
            kind: NodeKind::Mesh,
            node_key: NodePublic::from_bytes([b; 32]),
            disco_key: None,
            addresses: vec![IpAddr::from([100, 64, 0, b])],
            endpoints: vec![],
            online: true,
            os: "linux".into(),
            home_region: None,
            capabilities: Some(Box::new(Capabilities {
                cpu_cores: 4,
                ram_bytes: 8 << 30,
                tier: Tier::Tier2,
                compute: Some(ComputeOffer {
                    models: models
                        .iter()
                        .map(|(n, k)| OfferedModel {
                            name: (*n).into(),
                            kind: (*k).into(),
                            sha256: "00".into(),
                        })
                        .collect(),
                    serving: true,
                    reason: None,
                    slots: 1,
                    port: 8421,
                    busy: 0,
                    queued: 0,
                }),
                ..Default::default()
            })),
            owner: Some("ann".into()),
            key_expiry: None,
            device_key: Some(DevicePrivate::generate().public()),
            owner_role: Some(Role::Member),
            tags: Vec::new(),
        }
    }

    fn netmap(peers: Vec<Node>) -> NetMap {
        NetMap {
            network: "home".into(),
            self_node: node(1, &[]),
            routes: vec![],
            peers: peers.into_iter().map(|n| (n.node_key, n)).collect(),
            relay_map: RelayMap::default(),
            dns: DnsConfig::default(),
            awaiting_approval: false,
            packet_filter: Default::default(),
            compute: Default::default(),
        }
    }

    #[test]
    fn unknown_and_mismatched_models_are_refused_precisely() {
        let map = netmap(vec![node(2, &[("chatty", "chat"), ("vec", "embedding")])]);
        assert!(check_model(&map, Workload::SmallChat, "chatty").is_ok());
        let e = check_model(&map, Workload::SmallChat, "vec").unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (400, "wrong_model_kind"));
        let e = check_model(&map, Workload::SmallChat, "nope").unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (404, "model_not_found"));
        assert!(e.message.contains("chatty"), "{}", e.message);
    }

    #[test]
    fn targets_use_the_ipv4_address_the_port_and_a_model_of_the_kind() {
        let n = node(7, &[("chatty", "chat"), ("vec", "embedding")]);
        let t = target(&n, false, true, Workload::Embeddings, None).unwrap();
        assert_eq!(t.base, "http://100.64.0.7:8421");
        assert_eq!(t.model, "vec");
        assert_eq!(t.path, "direct");
        assert!(target(&n, false, true, Workload::Embeddings, Some("chatty")).is_none());
        let mut keyless = n.clone();
        keyless.device_key = None;
        assert!(target(&keyless, false, true, Workload::SmallChat, None).is_none());
        assert_eq!(
            target(&n, true, false, Workload::SmallChat, None)
                .unwrap()
                .path,
            "local"
        );
    }

    #[test]
    fn job_ids_are_128_bits_of_hex() {
        let (a, b) = (new_job_id(), new_job_id());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
