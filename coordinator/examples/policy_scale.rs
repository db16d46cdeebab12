//! What a policy change costs the coordinator on a large network, and what
//! visibility trimming saves each device: N devices (default 1000) of 200
//! users in 50 groups, a 200-rule policy, and the default policy.
//!
//!     cargo run --release -p coordinator --example policy_scale -- 1000
//!
//! Prints, per policy: compile time; fan-out time (what publishing a
//! policy change computes: every device's filter and every pair's
//! visibility); netmap bytes per device (peers it sees plus its filter, as
//! JSON) against an untrimmed netmap (every device a peer).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use coordinator::policy::{parse, Compiled, DeviceFacts, DEFAULT_POLICY};
use platform::keys::NodePublic;
use platform::netmap::{Node, NodeKind};
use platform::people::Role;

fn devices(n: i64) -> Vec<DeviceFacts> {
    (0..n)
        .map(|i| DeviceFacts {
            id: i,
            name: format!("device-{i}"),
            user: Some(format!("user{}", i % 200)),
            role: Some(if i % 50 == 0 {
                Role::Guest
            } else {
                Role::Member
            }),
            tags: if i % 10 == 0 {
                vec![format!("tag:t{}", i % 7)]
            } else {
                Vec::new()
            },
            addrs: vec![
                IpAddr::V4(Ipv4Addr::from(0x6440_0000u32 + i as u32 + 1)),
                IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, i as u16 + 1]),
            ],
        })
        .collect()
}

fn node(d: &DeviceFacts) -> Node {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&d.id.to_be_bytes());
    Node {
        id: d.id,
        name: d.name.clone(),
        kind: NodeKind::Mesh,
        node_key: NodePublic::from_bytes(key),
        disco_key: None,
        addresses: d.addrs.clone(),
        endpoints: vec!["192.0.2.1:41641".parse().expect("addr")],
        online: true,
        os: "linux".into(),
        home_region: Some(1),
        capabilities: None,
        owner: d.user.clone(),
        key_expiry: None,
        device_key: None,
        owner_role: d.role,
        tags: d.tags.clone(),
    }
}

fn big_policy() -> String {
    let mut groups = String::new();
    for g in 0..50 {
        let users: Vec<String> = (0..4).map(|u| format!("\"user{}\"", g * 4 + u)).collect();
        groups.push_str(&format!("\"group:g{g}\": [{}],", users.join(",")));
    }
    let tags: Vec<String> = (0..10).map(|t| format!("\"tag:t{t}\": []")).collect();
    let mut acls = String::new();
    for r in 0..200 {
        acls.push_str(&format!(
            "{{\"src\": [\"group:g{}\"], \"dst\": [\"group:g{}:{}\", \"tag:t{}:*\"]}},",
            r % 50,
            (r * 7) % 50,
            8000 + r,
            r % 10
        ));
    }
    format!(
        "{{\"groups\": {{{groups}}}, \"tags\": {{{}}}, \"acls\": [{acls}]}}",
        tags.join(",")
    )
}

fn measure(label: &str, text: &str, devices: &[DeviceFacts]) {
    let nodes: Vec<Node> = devices.iter().map(node).collect();
    let t = Instant::now();
    let c = Compiled::new(parse(text).expect("policy"), devices.to_vec());
    let compile = t.elapsed();
    let t = Instant::now();
    let mut filters = 0usize;
    let mut pairs = 0usize;
    for a in devices {
        filters += c.filter_for(a.id).rules.len();
        for b in devices {
            pairs += usize::from(c.sees(a.id, b.id));
        }
    }
    let fanout = t.elapsed();
    // Every 50th device from the 7th: untagged members (ids that are
    // multiples of 10 are tagged, of 50 guests).
    let sample: Vec<&DeviceFacts> = devices.iter().skip(7).step_by(50).collect();
    let (mut trimmed, mut full) = (0usize, 0usize);
    for a in &sample {
        let peers: Vec<&Node> = nodes.iter().filter(|n| c.sees(a.id, n.id)).collect();
        let filter = c.filter_for(a.id);
        trimmed += serde_json::to_vec(&peers).expect("json").len()
            + serde_json::to_vec(&filter).expect("json").len();
        let all: Vec<&Node> = nodes.iter().filter(|n| n.id != a.id).collect();
        full += serde_json::to_vec(&all).expect("json").len()
            + serde_json::to_vec(&filter).expect("json").len();
    }
    println!(
        "{label}: {} devices, {} rules: compile {:.1} ms, fan-out {:.1} ms ({filters} filter rules, {pairs} visible pairs); \
         netmap per device {} KiB trimmed vs {} KiB untrimmed",
        devices.len(),
        c.policy.acls.len(),
        compile.as_secs_f64() * 1e3,
        fanout.as_secs_f64() * 1e3,
        trimmed / sample.len() / 1024,
        full / sample.len() / 1024,
    );
}

fn main() {
    let n: i64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let devices = devices(n);
    measure("200-rule policy", &big_policy(), &devices);
    measure("default policy", DEFAULT_POLICY, &devices);
}
