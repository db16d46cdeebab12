//! The devices a job could go to, as the scheduler sees them: one
//! [`Candidate`] per netmap node, with what the submitting device knows
//! about its path there and the jobs it already runs there.

use platform::capability::{Capabilities, Tier};
use platform::keys::{DevicePublic, NodePublic};
use platform::netmap::{NetMap, Node};

/// What the submitting device knows about its path to a candidate.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PathInfo {
    /// Round-trip time of the path in use; None before a measurement.
    pub rtt_ms: Option<f64>,
    /// A direct (peer-to-peer) path, not a relay.
    pub direct: bool,
}

impl PathInfo {
    /// The submitting device itself.
    pub const LOCAL: PathInfo = PathInfo {
        rtt_ms: Some(0.0),
        direct: true,
    };
}

/// One device a job could run on.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub node_key: NodePublic,
    /// The addressee of a ticket; absent for stock WireGuard devices.
    pub device_key: Option<DevicePublic>,
    /// The submitting device itself.
    pub is_self: bool,
    /// The device's owner is an active member of the network.
    pub member: bool,
    /// Its node key expired or was removed.
    pub revoked: bool,
    pub online: bool,
    pub os: String,
    pub capabilities: Option<Capabilities>,
    pub path: PathInfo,
    /// Jobs the submitting device already has running there.
    pub inflight: u32,
}

impl Candidate {
    /// Its tier; a device that never reported counts as the lowest, as a
    /// report without one does.
    pub fn tier(&self) -> Tier {
        self.capabilities
            .as_ref()
            .map(|c| c.tier)
            .unwrap_or_default()
    }

    /// Self, or a direct path: what [`Route::Local`] prefers.
    ///
    /// [`Route::Local`]: platform::jobs::Route::Local
    pub fn is_near(&self) -> bool {
        self.is_self || self.path.direct
    }
}

/// The candidates of a netmap: this device first (as `is_self`), then its
/// peers in key order. `paths` tells the path to a peer (not asked for this
/// device, whose path is [`PathInfo::LOCAL`]); `inflight` tells, by device
/// name, how many jobs this device already runs there.
pub fn candidates(
    netmap: &NetMap,
    paths: &impl Fn(&NodePublic) -> PathInfo,
    inflight: &impl Fn(&str) -> u32,
    now_unix: u64,
) -> Vec<Candidate> {
    let mut out = Vec::with_capacity(netmap.peers.len() + 1);
    // The device placing the job is running, whatever the coordinator last
    // saw of it.
    let me = &netmap.self_node;
    out.push(from_node(
        me,
        true,
        PathInfo::LOCAL,
        inflight(&me.name),
        now_unix,
    ));
    for node in netmap.peers.values() {
        out.push(from_node(
            node,
            false,
            paths(&node.node_key),
            inflight(&node.name),
            now_unix,
        ));
    }
    out
}

fn from_node(
    node: &Node,
    is_self: bool,
    path: PathInfo,
    inflight: u32,
    now_unix: u64,
) -> Candidate {
    Candidate {
        name: node.name.clone(),
        node_key: node.node_key,
        device_key: node.device_key,
        is_self,
        member: node.owner.is_some() && node.owner_role.is_some(),
        revoked: node.key_expired(now_unix),
        // The coordinator's word, or what this device sees itself: a peer
        // whose direct path answered moments ago is up, whatever the
        // coordinator last saw (after a restart it has seen nobody yet, and
        // while it is down its word grows old).
        online: is_self || node.online || path.direct,
        os: node.os.clone(),
        capabilities: node.capabilities.as_deref().cloned(),
        path,
        inflight,
    }
}
