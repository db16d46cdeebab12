//! The policy fuzz target's body, here so `cargo test` replays its seeds.

use std::collections::BTreeMap;
use std::net::IpAddr;

use platform::people::Role;

use super::{parse, Compiled, DeviceFacts};

/// Parses `data` as a policy; whatever parses is compiled against a small
/// network, its tests run, and its visibility checked for symmetry.
pub fn fuzz_policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = parse(text) else { return };
    let _ = policy.check_users(|u| u != "nobody");
    let device = |id: i64, user: &str, role, tags: &[&str]| DeviceFacts {
        id,
        name: format!("d{id}"),
        user: Some(user.to_owned()),
        role: Some(role),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        addrs: vec![
            IpAddr::from([100, 64, 0, id as u8]),
            IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, id as u16]),
        ],
    };
    let devices = vec![
        device(1, "alice", Role::Admin, &[]),
        device(2, "bob", Role::Member, &[]),
        device(3, "bob", Role::Member, &["tag:gpu"]),
        device(9, "carol", Role::Guest, &[]),
    ];
    let members = BTreeMap::from([
        ("alice".to_owned(), Role::Admin),
        ("bob".to_owned(), Role::Member),
    ]);
    let c = Compiled::new(policy, devices);
    let _ = c.run_tests(&members);
    for a in [1, 2, 3, 9] {
        let _ = c.filter_for(a);
        for b in [1, 2, 3, 9] {
            assert_eq!(c.sees(a, b), c.sees(b, a), "visibility is symmetric");
        }
    }
}
