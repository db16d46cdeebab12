//! Networks stay apart on the relay and across its mesh, and nobody learns
//! whether another network's device is connected; the mesh key goes only to
//! the relay it was configured for.

use std::time::Duration;

use rand_core::OsRng;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use x25519_dalek::{PublicKey, StaticSecret};

use super::metrics::Drop;
use super::tests::{asking, fake_coordinator_with, mesh_peer, start, start_meshed, wait_for, Peer};
use crate::client::RelayEvent;
use crate::proto::frame::{Frame, GoneReason, Key};

fn new_key() -> (StaticSecret, Key) {
    let secret = StaticSecret::random_from_rng(OsRng);
    let key = PublicKey::from(&secret).to_bytes();
    (secret, key)
}

#[tokio::test]
async fn clients_reach_only_their_own_network_and_others_look_absent() {
    let (a1_secret, a1) = new_key();
    let (a2_secret, a2) = new_key();
    let (b1_secret, b1) = new_key();
    let coord = fake_coordinator_with(vec![(a1, 1), (a2, 1), (b1, 2)], Duration::ZERO).await;
    let (relay, url) = start(asking(&coord.url), 1 << 30).await;
    let mut pa1 = Peer::connect_as(&url, a1_secret).await;
    let mut pa2 = Peer::connect_as(&url, a2_secret).await;
    let mut pb1 = Peer::connect_as(&url, b1_secret).await;

    assert!(pa1.client.send(a2, b"same network"));
    assert_eq!(pa2.next_packet().await, (a1, b"same network".to_vec()));

    // To a connected device of another network: the very answer a key that
    // is connected nowhere gets.
    let nobody = [9u8; 32];
    for dst in [b1, nobody] {
        assert!(pa1.client.send(dst, b"across"));
        match pa1.next().await {
            RelayEvent::PeerGone { key, reason } => {
                assert_eq!((key, reason), (dst, GoneReason::NotHere))
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(pb1.client.send(a1, b"back across"));
    match pb1.next().await {
        RelayEvent::PeerGone { key, reason } => {
            assert_eq!((key, reason), (a1, GoneReason::NotHere))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(relay.metrics.drops(Drop::OtherNetwork), 2);
    assert_eq!(relay.metrics.drops(Drop::NoSuchPeer), 1);

    // b1 leaves: a1, who tried to reach it, hears nothing of it; the next
    // thing a1 sees is a2's packet.
    drop(pb1.client);
    wait_for("b1 gone", || relay.client_count() == 2).await;
    assert!(pa2.client.send(a1, b"marker"));
    match pa1.next().await {
        RelayEvent::Packet { src, data } => assert_eq!((src, data), (a2, b"marker".to_vec())),
        other => panic!("a1 heard of another network's device: {other:?}"),
    }
}

#[tokio::test]
async fn the_mesh_keeps_networks_apart_too() {
    let psk = "region-psk-0123456789";
    let (a_secret, a) = new_key();
    let (b_secret, b) = new_key();
    let (c_secret, c) = new_key();
    let (d_secret, d) = new_key();
    let coord = fake_coordinator_with(vec![(a, 1), (b, 2), (c, 1), (d, 2)], Duration::ZERO).await;
    let (r1, url1) = start_meshed(asking(&coord.url), 1 << 30, Some(psk)).await;
    let (r2, url2) = start_meshed(asking(&coord.url), 1 << 30, Some(psk)).await;
    tokio::spawn(super::mesh::run_link(r1.clone(), mesh_peer(&url2, &r2)));
    tokio::spawn(super::mesh::run_link(r2.clone(), mesh_peer(&url1, &r1)));
    let mut pa = Peer::connect_as(&url1, a_secret).await;
    let mut pb = Peer::connect_as(&url2, b_secret).await;
    let mut pc = Peer::connect_as(&url2, c_secret).await;
    let pd = Peer::connect_as(&url1, d_secret).await;
    wait_for("links up and presence across the mesh", || {
        r1.mesh_links().len() == 1
            && r2.mesh_links().len() == 1
            && r1.remote().len() == 2
            && r2.remote().len() == 2
    })
    .await;

    assert!(pa.client.send(c, b"over the mesh"));
    assert_eq!(pc.next_packet().await, (a, b"over the mesh".to_vec()));
    // b is connected to the other relay, in another network: absent to a.
    assert!(pa.client.send(b, b"across networks"));
    match pa.next().await {
        RelayEvent::PeerGone { key, reason } => {
            assert_eq!((key, reason), (b, GoneReason::NotHere))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r1.metrics.drops(Drop::OtherNetwork), 1);
    // Nothing reached b: the next thing it sees is d's packet (d is in b's
    // network, on the other relay).
    assert!(pd.client.send(b, b"marker"));
    match pb.next().await {
        RelayEvent::Packet { src, data } => assert_eq!((src, data), (d, b"marker".to_vec())),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_mesh_key_goes_only_to_the_configured_relay() {
    // Something at the peer's address that is not the peer: it presents a
    // key of its own and would read whatever is sealed to it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (impostor_secret, impostor_key) = new_key();
    let (got_tx, mut got) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(s.read_u8().await.unwrap());
            }
            s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: crank-derp\r\nConnection: Upgrade\r\n\r\n")
                .await
                .unwrap();
            let challenge = [5u8; 16];
            let mut f = Vec::new();
            Frame::ServerKey {
                key: impostor_key,
                challenge,
            }
            .encode(&mut f)
            .unwrap();
            s.write_all(&f).await.unwrap();
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
            let opened = match Frame::decode(&rest) {
                Ok(Some((
                    Frame::ClientInfo {
                        node_key,
                        nonce,
                        sealed,
                    },
                    _,
                ))) => crate::proto::handshake::open(
                    &impostor_secret,
                    &challenge,
                    &node_key,
                    &nonce,
                    &sealed,
                )
                .ok()
                .and_then(|info| info.mesh_key),
                _ => None,
            };
            let _ = got_tx.send(opened).await;
        }
    });
    let psk = "region-psk-0123456789";
    let (r1, _) = start_meshed(super::admission::Admission::Open, 1 << 30, Some(psk)).await;
    // r1 expects the real peer's key at that address.
    let (_, real_peer_key) = new_key();
    let peer = super::mesh::MeshPeer {
        target: format!("http://{addr}/derp").into(),
        key: real_peer_key,
    };
    tokio::spawn(super::mesh::run_link(r1.clone(), peer));
    let heard = tokio::time::timeout(Duration::from_secs(5), got.recv())
        .await
        .expect("r1 tried the link")
        .expect("open");
    assert_eq!(heard, None, "the mesh key was sealed to the impostor");
    assert!(r1.metrics.mesh_key_mismatches.get() >= 1);
    assert!(r1.mesh_links().is_empty());
}
