//! Links to relays: always one to this device's home region (where peers
//! reach it), and on demand one to each region where a peer we talk to
//! listens. The packet path reads the set of links without a lock.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use derp_client::{RelayClient, RelayEvent, RelayTarget};
use platform::keys::NodePublic;
use platform::netmap::RelayMap;
use tokio::sync::mpsc;

/// Relay events waiting for the engine.
pub const EVENT_QUEUE: usize = 1024;

pub struct Relays {
    /// The node key links authenticate with (replaced on rotation).
    node: Mutex<boringtun::x25519::StaticSecret>,
    map: ArcSwap<RelayMap>,
    links: ArcSwap<HashMap<u32, Arc<RelayClient>>>,
    /// Serialises changes to `links` (reads stay lock-free).
    changing: Mutex<()>,
    up: Mutex<HashSet<u32>>,
    home: Mutex<Option<u32>>,
    events: mpsc::Sender<(u32, RelayEvent)>,
}

impl Relays {
    pub fn new(
        node: boringtun::x25519::StaticSecret,
        events: mpsc::Sender<(u32, RelayEvent)>,
    ) -> Self {
        Relays {
            node: Mutex::new(node),
            map: ArcSwap::from_pointee(RelayMap::default()),
            links: ArcSwap::from_pointee(HashMap::new()),
            changing: Mutex::new(()),
            up: Mutex::new(HashSet::new()),
            home: Mutex::new(None),
            events,
        }
    }

    pub fn set_map(&self, map: &RelayMap) {
        if **self.map.load() != *map {
            self.map.store(Arc::new(map.clone()));
        }
    }

    pub fn home(&self) -> Option<u32> {
        *self.home.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `region` home and connects to it.
    pub fn set_home(&self, region: u32) {
        *self.home.lock().unwrap_or_else(|p| p.into_inner()) = Some(region);
        self.link(region);
    }

    pub fn is_up(&self, region: u32) -> bool {
        self.up
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&region)
    }

    /// Records a link coming up or going down (from the event stream).
    pub fn mark(&self, region: u32, up: bool) {
        let mut set = self.up.lock().unwrap_or_else(|p| p.into_inner());
        if up {
            set.insert(region);
        } else {
            set.remove(&region);
        }
    }

    /// Authenticates as `node` from now on: every link closes, and the home
    /// link reopens at once (others when next used).
    pub fn set_node(&self, node: boringtun::x25519::StaticSecret) {
        {
            let _guard = self.changing.lock().unwrap_or_else(|p| p.into_inner());
            *self.node.lock().unwrap_or_else(|p| p.into_inner()) = node;
            // Dropping a client ends its link.
            self.links.store(Arc::new(HashMap::new()));
            self.up.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
        if let Some(home) = self.home() {
            self.link(home);
        }
    }

    /// The link to `region`, opened if needed (`None` for an unknown region).
    fn link(&self, region: u32) -> Option<Arc<RelayClient>> {
        if let Some(l) = self.links.load().get(&region) {
            return Some(l.clone());
        }
        let _guard = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = self.links.load().get(&region) {
            return Some(l.clone());
        }
        // A region's relays mesh with each other: devices spread over them
        // by key, and the relays forward between their clients.
        let map = self.map.load();
        let info = map.regions.iter().find(|r| r.id == region)?;
        let node = self.node.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let spread = usize::from(boringtun::x25519::PublicKey::from(&node).as_bytes()[0]);
        let url = info.urls.get(spread % info.urls.len().max(1))?.clone();
        tracing::info!(region, %url, "connecting to relay");
        let target = RelayTarget {
            url,
            ca_pem: info.ca_pem.clone(),
        };
        let client = Arc::new(RelayClient::spawn(
            target,
            node,
            region,
            self.events.clone(),
        ));
        let mut links = (**self.links.load()).clone();
        links.insert(region, client.clone());
        self.links.store(Arc::new(links));
        Some(client)
    }

    /// Sends a packet to `dst` through the relay of `region`; false when it
    /// was dropped (no such region, link down, queue full).
    pub fn send(&self, region: u32, dst: &NodePublic, data: &[u8]) -> bool {
        self.link(region)
            .is_some_and(|l| l.send(*dst.as_bytes(), data))
    }
}
