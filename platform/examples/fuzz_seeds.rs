//! Writes the seed corpora of `platform/fuzz` from real messages:
//! `cargo run -p platform --example fuzz_seeds -- platform/fuzz/corpus`.

use std::net::IpAddr;
use std::path::Path;

use platform::api::{Capabilities, ClientMessage, MapHello, ServerMessage};
use platform::control_auth::{new_nonce, CoordinatorIdentity};
use platform::keys::{DevicePrivate, DiscoPrivate, NodePrivate};
use platform::netmap::{DnsConfig, NetMap, Node, NodeKind, PeerChange, RelayMap};
use platform::signed::{Signed, DOMAIN_MAP};

fn node(id: u8) -> Node {
    Node {
        id: i64::from(id),
        name: format!("n{id}"),
        kind: NodeKind::Mesh,
        node_key: NodePrivate::generate().public(),
        disco_key: Some(DiscoPrivate::generate().public()),
        addresses: vec![IpAddr::from([100, 64, 0, id])],
        endpoints: vec![format!("10.0.0.{id}:41641").parse().unwrap()],
        online: true,
        os: "linux".into(),
        home_region: Some(1),
        capabilities: Some(Box::new(Capabilities {
            cpu_cores: 4,
            arch: "x86_64".into(),
            ram_bytes: 1 << 33,
            ..Default::default()
        })),
        owner: Some("ann".into()),
        key_expiry: None,
        device_key: Some(DevicePrivate::generate().public()),
        owner_role: None,
        tags: Vec::new(),
    }
}

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "platform/fuzz/corpus".into());
    let dir = Path::new(&dir);
    let (a, b) = (node(1), node(2));
    let map = NetMap {
        network: "home".into(),
        self_node: a.clone(),
        routes: Vec::new(),
        peers: [(b.node_key, b.clone())].into_iter().collect(),
        relay_map: RelayMap::default(),
        dns: DnsConfig::default(),
        awaiting_approval: false,
        packet_filter: Default::default(),
        compute: Default::default(),
    };
    let c = node(3);
    let changes = vec![
        PeerChange::Upsert {
            node: Box::new(c.clone()),
        },
        PeerChange::Endpoints {
            node_key: c.node_key,
            endpoints: vec!["192.0.2.1:1".parse().unwrap()],
        },
        PeerChange::Removed {
            node_key: b.node_key,
        },
        PeerChange::Upsert { node: Box::new(b) },
    ];
    let coord = CoordinatorIdentity::generate();
    let nonce = new_nonce();
    let full = serde_json::to_string(&ServerMessage::Full {
        netmap: Box::new(map.clone()),
    })
    .unwrap();
    let delta = serde_json::to_string(&ServerMessage::Delta {
        changes: changes.clone(),
    })
    .unwrap();
    let dev = DevicePrivate::generate();
    let hello = ClientMessage::Hello {
        hello: Signed::sign(
            &dev,
            DOMAIN_MAP,
            &MapHello {
                timestamp: 1,
                node_key: a.node_key,
                disco_key: DiscoPrivate::generate().public(),
                nonce: nonce.clone(),
                full_in_pieces: true,
            },
        ),
    };
    let write = |target: &str, name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(name), bytes)
    };
    write("map_message", "full", full.as_bytes())?;
    write("map_message", "delta", delta.as_bytes())?;
    write(
        "map_message",
        "hello",
        serde_json::to_string(&hello).unwrap().as_bytes(),
    )?;
    write(
        "map_message",
        "endpoints",
        serde_json::to_string(&ClientMessage::Endpoints {
            endpoints: vec!["10.0.0.1:41641".parse().unwrap()],
        })
        .unwrap()
        .as_bytes(),
    )?;
    write(
        "map_message",
        "challenge",
        serde_json::to_string(&ServerMessage::Challenge {
            nonce: nonce.clone(),
        })
        .unwrap()
        .as_bytes(),
    )?;
    let frame = coord.sign_frame(&nonce, 0, delta);
    write(
        "signed_frame",
        "delta",
        serde_json::to_string(&ServerMessage::Signed { frame })
            .unwrap()
            .as_bytes(),
    )?;
    // deltas: the netmap's JSON length (two bytes, big-endian), the
    // netmap, then the changes.
    let map_json = serde_json::to_vec(&map).unwrap();
    let mut seed = u16::try_from(map_json.len())
        .unwrap()
        .to_be_bytes()
        .to_vec();
    seed.extend_from_slice(&map_json);
    seed.extend_from_slice(&serde_json::to_vec(&changes).unwrap());
    write("deltas", "upsert_move_remove", &seed)?;
    Ok(())
}
