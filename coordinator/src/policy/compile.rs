//! A policy applied to the devices of a network: who may reach whom (and by
//! which rule), each device's packet filter, and which devices see each
//! other in their netmaps.
//!
//! Selectors are matched the same way everywhere (compiling, the `tests`
//! section, `policy/evaluate`): [`Selector::matches`]. As in Tailscale, a
//! tagged device is named by its tags only: users, groups and autogroups
//! match their untagged devices. A device without an owner (a stock
//! WireGuard peer an admin added) counts as a member's.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use platform::addr::IpPrefix;
use platform::filter::{FilterRule, PacketFilter, PortRange, Proto};
use platform::people::Role;

use super::doc::{identity, split_host_port, Acl, Identity, Policy, PolicyError, Selector};

/// What the policy needs to know about one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceFacts {
    pub id: i64,
    pub name: String,
    pub user: Option<String>,
    pub role: Option<Role>,
    pub tags: Vec<String>,
    pub addrs: Vec<IpAddr>,
}

/// Whom a selector is matched against: a device, or an identity a test or
/// an evaluation names.
#[derive(Clone, Copy, Debug)]
pub struct Principal<'a> {
    pub user: Option<&'a str>,
    pub role: Option<Role>,
    pub tags: &'a [String],
    pub addrs: &'a [IpAddr],
}

impl<'a> Principal<'a> {
    pub fn of(d: &'a DeviceFacts) -> Self {
        Principal {
            user: d.user.as_deref(),
            role: d.role,
            tags: &d.tags,
            addrs: &d.addrs,
        }
    }

    fn untagged(&self) -> bool {
        self.tags.is_empty()
    }

    /// Devices without an owner count as a member's.
    fn role(&self) -> Role {
        self.role.unwrap_or(Role::Member)
    }
}

impl Selector {
    /// Whether this selector names `p`. `SelfDevices` needs the source and
    /// is matched by [`dst_matches`].
    pub fn matches(
        &self,
        p: &Principal<'_>,
        groups: &BTreeMap<String, std::collections::BTreeSet<String>>,
    ) -> bool {
        match self {
            Selector::All => true,
            Selector::User(u) => p.untagged() && p.user == Some(u.as_str()),
            Selector::Group(g) => {
                p.untagged()
                    && p.user
                        .is_some_and(|u| groups.get(g).is_some_and(|users| users.contains(u)))
            }
            Selector::Tag(t) => p.tags.iter().any(|x| x == t),
            Selector::Prefix(prefix) => p.addrs.iter().any(|a| prefix.contains(*a)),
            Selector::Member => p.untagged() && p.role() != Role::Guest,
            Selector::Admin => p.untagged() && p.role() == Role::Admin,
            Selector::Guest => p.untagged() && p.role() == Role::Guest,
            Selector::SelfDevices => false,
        }
    }
}

/// Whether a rule's destination selector names `dst` for traffic from `src`.
fn dst_matches(sel: &Selector, src: &Principal<'_>, dst: &Principal<'_>, policy: &Policy) -> bool {
    match sel {
        Selector::SelfDevices => {
            src.untagged() && dst.untagged() && src.user.is_some() && src.user == dst.user
        }
        other => other.matches(dst, &policy.groups),
    }
}

fn proto_allowed(acl: &Acl, proto: Proto) -> bool {
    if acl.protos.is_empty() {
        matches!(proto, Proto::Tcp | Proto::Udp | Proto::Icmp)
    } else {
        acl.protos.contains(&proto)
    }
}

fn port_allowed(ports: &[PortRange], proto: Proto, port: u16) -> bool {
    if proto.has_ports() {
        ports.iter().any(|r| r.contains(port))
    } else {
        ports.iter().any(PortRange::is_all)
    }
}

/// The index of the first rule that lets `src` reach `dst` on `port` over
/// `proto`, if any.
pub fn allows(
    policy: &Policy,
    src: &Principal<'_>,
    dst: &Principal<'_>,
    port: u16,
    proto: Proto,
) -> Option<usize> {
    policy.acls.iter().position(|acl| {
        proto_allowed(acl, proto)
            && acl.src.iter().any(|s| s.matches(src, &policy.groups))
            && acl.dst.iter().any(|d| {
                dst_matches(&d.selector, src, dst, policy) && port_allowed(&d.ports, proto, port)
            })
    })
}

/// A fixed-size set of device indices.
#[derive(Clone, Debug, PartialEq, Eq)]
struct BitSet(Vec<u64>);

impl BitSet {
    fn new(n: usize) -> Self {
        BitSet(vec![0; n.div_ceil(64)])
    }
    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn contains(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, bits)| {
            (0..64)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| w * 64 + b)
        })
    }
}

/// One (rule, destination) pair applied to the devices.
#[derive(Debug)]
struct RuleSets {
    src: BitSet,
    dst: BitSet,
    /// `autogroup:self`: only pairs of one user's devices.
    self_only: bool,
    /// The filter's sources (for `self_only` rules, chosen per device).
    sources: Vec<IpPrefix>,
    ports: Vec<PortRange>,
    protos: Vec<Proto>,
}

/// A policy compiled against a network's devices.
#[derive(Debug)]
pub struct Compiled {
    pub policy: Policy,
    devices: Vec<DeviceFacts>,
    index: HashMap<i64, usize>,
    rules: Vec<RuleSets>,
}

impl Compiled {
    /// Applies `policy` to `devices`: O(rules × devices).
    pub fn new(policy: Policy, devices: Vec<DeviceFacts>) -> Self {
        let n = devices.len();
        let index = devices.iter().enumerate().map(|(i, d)| (d.id, i)).collect();
        let mut rules = Vec::new();
        for acl in &policy.acls {
            let mut src = BitSet::new(n);
            for (i, d) in devices.iter().enumerate() {
                if acl
                    .src
                    .iter()
                    .any(|s| s.matches(&Principal::of(d), &policy.groups))
                {
                    src.insert(i);
                }
            }
            let mut sources: Vec<IpPrefix> = Vec::new();
            if acl.src.contains(&Selector::All) {
                sources.push(IpPrefix::new([0, 0, 0, 0].into(), 0).expect("valid"));
                sources.push(IpPrefix::new([0u16; 8].into(), 0).expect("valid"));
            } else {
                for s in &acl.src {
                    if let Selector::Prefix(p) = s {
                        sources.push(*p);
                    }
                }
                let raw = sources.clone();
                for i in src.iter() {
                    for a in &devices[i].addrs {
                        if !raw.iter().any(|p| p.contains(*a)) {
                            sources.push(IpPrefix::host(*a));
                        }
                    }
                }
            }
            for d in &acl.dst {
                let self_only = d.selector == Selector::SelfDevices;
                let mut dst = BitSet::new(n);
                for (i, dev) in devices.iter().enumerate() {
                    let p = Principal::of(dev);
                    let hit = if self_only {
                        p.untagged() && p.user.is_some()
                    } else {
                        d.selector.matches(&p, &policy.groups)
                    };
                    if hit {
                        dst.insert(i);
                    }
                }
                rules.push(RuleSets {
                    src: src.clone(),
                    dst,
                    self_only,
                    sources: if self_only {
                        Vec::new()
                    } else {
                        sources.clone()
                    },
                    ports: d.ports.clone(),
                    protos: acl.protos.clone(),
                });
            }
        }
        Compiled {
            policy,
            devices,
            index,
            rules,
        }
    }

    /// The facts the policy was compiled with for a device.
    pub fn facts(&self, id: i64) -> Option<&DeviceFacts> {
        self.index.get(&id).map(|i| &self.devices[*i])
    }

    pub fn devices(&self) -> &[DeviceFacts] {
        &self.devices
    }

    fn same_user(&self, a: usize, b: usize) -> bool {
        let (a, b) = (&self.devices[a], &self.devices[b]);
        a.user.is_some() && a.user == b.user && a.tags.is_empty() && b.tags.is_empty()
    }

    /// The packet filter of a device: every rule whose destination it is.
    pub fn filter_for(&self, id: i64) -> PacketFilter {
        let Some(&me) = self.index.get(&id) else {
            return PacketFilter::default();
        };
        let mut rules = Vec::new();
        for r in &self.rules {
            if !r.dst.contains(me) {
                continue;
            }
            let sources = if r.self_only {
                r.src
                    .iter()
                    .filter(|&i| self.same_user(i, me))
                    .flat_map(|i| self.devices[i].addrs.iter().map(|a| IpPrefix::host(*a)))
                    .collect()
            } else {
                r.sources.clone()
            };
            if sources.is_empty() {
                continue;
            }
            rules.push(FilterRule {
                sources,
                protos: r.protos.clone(),
                ports: r.ports.clone(),
            });
        }
        PacketFilter { rules }
    }

    /// Whether `a` and `b` see each other: one may reach the other.
    pub fn sees(&self, a: i64, b: i64) -> bool {
        let (Some(&ia), Some(&ib)) = (self.index.get(&a), self.index.get(&b)) else {
            return false;
        };
        ia != ib
            && self.rules.iter().any(|r| {
                ((r.src.contains(ia) && r.dst.contains(ib))
                    || (r.src.contains(ib) && r.dst.contains(ia)))
                    && (!r.self_only || self.same_user(ia, ib))
            })
    }

    /// "May `src` reach `dst` on `port` over `proto`, and by which rule?"
    /// `src` and `dst` are device names, users, tags, hosts or addresses.
    pub fn evaluate(
        &self,
        src: &str,
        dst: &str,
        port: u16,
        proto: Proto,
        members: &BTreeMap<String, Role>,
    ) -> Result<Option<usize>, String> {
        let owned = Owned::resolve(self, src, members)?;
        let owned_dst = Owned::resolve(self, dst, members)?;
        Ok(allows(
            &self.policy,
            &owned.principal(),
            &owned_dst.principal(),
            port,
            proto,
        ))
    }

    /// Runs the policy's `tests` section; the first failure names its line.
    pub fn run_tests(&self, members: &BTreeMap<String, Role>) -> Result<(), PolicyError> {
        for t in &self.policy.tests {
            let src =
                Owned::resolve(self, &t.src, members).map_err(|m| PolicyError::at(t.line, m))?;
            for (want, list) in [(true, &t.accept), (false, &t.deny)] {
                for (line, target) in list {
                    let (host, port) =
                        split_host_port(target).map_err(|m| PolicyError::at(*line, m))?;
                    let port: u16 = port.parse().map_err(|_| {
                        PolicyError::at(*line, format!("{target:?}: a test names one port"))
                    })?;
                    let dst = Owned::resolve(self, host, members)
                        .map_err(|m| PolicyError::at(*line, m))?;
                    let got = allows(
                        &self.policy,
                        &src.principal(),
                        &dst.principal(),
                        port,
                        t.proto,
                    );
                    match (want, got) {
                        (true, None) => {
                            return Err(PolicyError::at(
                                *line,
                                format!("test failed: {} → {target} ({}) should be accepted, but no rule accepts it", t.src, t.proto),
                            ))
                        }
                        (false, Some(rule)) => {
                            return Err(PolicyError::at(
                                *line,
                                format!(
                                    "test failed: {} → {target} ({}) should be denied, but the rule on line {} accepts it",
                                    t.src, t.proto, self.policy.acls[rule].line
                                ),
                            ))
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }
}

/// A principal that owns what it points at (for names that are not devices).
struct Owned {
    user: Option<String>,
    role: Option<Role>,
    tags: Vec<String>,
    addrs: Vec<IpAddr>,
}

impl Owned {
    fn resolve(c: &Compiled, who: &str, members: &BTreeMap<String, Role>) -> Result<Owned, String> {
        let device = |d: &DeviceFacts| Owned {
            user: d.user.clone(),
            role: d.role,
            tags: d.tags.clone(),
            addrs: d.addrs.clone(),
        };
        if let Some(d) = c.devices.iter().find(|d| d.name == who) {
            return Ok(device(d));
        }
        Ok(match identity(&c.policy, who)? {
            Identity::Address(ip) => match c.devices.iter().find(|d| d.addrs.contains(&ip)) {
                Some(d) => device(d),
                None => Owned {
                    user: None,
                    role: None,
                    tags: Vec::new(),
                    addrs: vec![ip],
                },
            },
            Identity::User(u) => Owned {
                role: Some(members.get(&u).copied().unwrap_or(Role::Member)),
                user: Some(u),
                tags: Vec::new(),
                addrs: Vec::new(),
            },
            Identity::Tag(t) => Owned {
                user: None,
                role: None,
                tags: vec![t],
                addrs: Vec::new(),
            },
        })
    }

    fn principal(&self) -> Principal<'_> {
        Principal {
            user: self.user.as_deref(),
            role: self.role,
            tags: &self.tags,
            addrs: &self.addrs,
        }
    }
}
