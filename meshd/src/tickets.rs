//! Whether a job's ticket lets it run on this device: signed by a device
//! of the network, sent through that device's own tunnel, addressed to this
//! device for this model and workload, valid now, allowed by the network's
//! policy, and not seen before.
//!
//! The ticket comes in the [`TICKET_HEADER`] header: base64url without
//! padding of the JSON of a [`Signed`] ticket.
//!
//! Pure: the caller hands in the netmap, the clock and the request; the
//! only state is the set of tickets seen ([`SeenTickets`]).

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use axum::http::HeaderMap;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use compute::admission::{self, Refusal};
use platform::capability::Tier;
use platform::jobs::{ticket_hash, Ticket, Workload, DOMAIN_TICKET, TICKET_HEADER};
use platform::keys::DevicePublic;
use platform::netmap::{NetMap, Node};
use platform::signed::{Signed, SignedError};

/// Longest ticket header read (base64url text).
pub const MAX_TICKET_HEADER: usize = 8 * 1024;
/// How far in the future a ticket's issue time may lie (the submitter's
/// clock runs ahead).
pub const ISSUE_LEEWAY_SECS: u64 = 60;
/// Most tickets remembered against replay.
pub const MAX_SEEN: usize = 100_000;

/// The workload a ticket names for a kind of API job.
pub fn workload(w: admission::Workload) -> Workload {
    match w {
        admission::Workload::Embeddings => Workload::Embeddings,
        admission::Workload::Chat => Workload::SmallChat,
    }
}

/// What a ticket is checked against.
pub struct Expected<'a> {
    pub netmap: &'a NetMap,
    /// This device's device key: the addressee.
    pub worker_key: DevicePublic,
    pub tier: Tier,
    /// The overlay address the request came from.
    pub caller: IpAddr,
    pub workload: Workload,
    pub model: &'a str,
    /// Unix seconds.
    pub now: u64,
}

/// A ticket that passed every check but the replay check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    pub signed: Signed,
    pub ticket: Ticket,
    /// [`ticket_hash`] of `signed`.
    pub hash: String,
}

/// The signed ticket a request carries, unchecked.
pub fn from_headers(headers: &HeaderMap) -> Result<Signed, Refusal> {
    let mut values = headers.get_all(TICKET_HEADER).iter();
    let value = values.next().ok_or_else(|| {
        Refusal::TicketRequired(format!(
            "jobs run here only with a ticket in the {TICKET_HEADER} header"
        ))
    })?;
    if values.next().is_some() {
        return Err(Refusal::TicketInvalid(format!(
            "more than one {TICKET_HEADER} header"
        )));
    }
    if value.len() > MAX_TICKET_HEADER {
        return Err(Refusal::TicketInvalid(format!(
            "the {TICKET_HEADER} header is over {MAX_TICKET_HEADER} bytes"
        )));
    }
    let json = URL_SAFE_NO_PAD.decode(value.as_bytes()).map_err(|e| {
        Refusal::TicketInvalid(format!(
            "the {TICKET_HEADER} header is not base64url without padding: {e}"
        ))
    })?;
    serde_json::from_slice(&json)
        .map_err(|e| Refusal::TicketInvalid(format!("the ticket is not a signed envelope: {e}")))
}

/// The network device that signed with `key`: a peer, or this device.
fn signer<'a>(netmap: &'a NetMap, key: &DevicePublic) -> Option<&'a Node> {
    std::iter::once(&netmap.self_node)
        .chain(netmap.peers.values())
        .find(|n| n.device_key.as_ref() == Some(key))
}

/// Checks `signed` against the request and the network; see the module
/// doc for what each refusal means.
pub fn check(signed: Signed, want: &Expected<'_>) -> Result<Checked, Refusal> {
    let ticket: Ticket = signed.open(DOMAIN_TICKET).map_err(|e| match e {
        SignedError::BadPayload(why) => {
            Refusal::TicketInvalid(format!("the ticket's payload is not a ticket: {why}"))
        }
        other => Refusal::TicketInvalid(format!("the ticket's {other}")),
    })?;
    ticket.check_shape().map_err(Refusal::TicketInvalid)?;
    if ticket.issued_at > want.now.saturating_add(ISSUE_LEEWAY_SECS) {
        return Err(Refusal::TicketExpired(format!(
            "the ticket is valid from {}, {} s from now (check the submitter's clock)",
            ticket.issued_at,
            ticket.issued_at - want.now
        )));
    }
    if want.now >= ticket.expires_at {
        return Err(Refusal::TicketExpired(format!(
            "the ticket expired {} s ago",
            want.now - ticket.expires_at
        )));
    }
    let node = signer(want.netmap, &signed.device_key).ok_or_else(|| {
        Refusal::TicketInvalid(format!(
            "the ticket is signed by device key {}…, which no device of this network has",
            signed.device_key.short()
        ))
    })?;
    if !node.addresses.contains(&want.caller) {
        return Err(Refusal::TicketMismatch(format!(
            "the ticket was signed by {} but sent from {}",
            node.name, want.caller
        )));
    }
    if ticket.network != want.netmap.network {
        return Err(Refusal::TicketMismatch(format!(
            "the ticket is for network {:?}, not {:?}",
            ticket.network, want.netmap.network
        )));
    }
    if ticket.worker_key != want.worker_key {
        return Err(Refusal::TicketMismatch(format!(
            "the ticket is addressed to {} ({}…), not to this device",
            ticket.worker,
            ticket.worker_key.short()
        )));
    }
    if ticket.workload != want.workload || ticket.model != want.model {
        return Err(Refusal::TicketMismatch(format!(
            "the ticket is for {} on {:?}, the request for {} on {:?}",
            ticket.workload, ticket.model, want.workload, want.model
        )));
    }
    let role = node.owner_role.ok_or_else(|| {
        Refusal::PolicyRefused(format!("{} has no owner with a role here", node.name))
    })?;
    let policy = &want.netmap.compute.policy;
    policy
        .may_submit(role, ticket.workload, ticket.sensitivity, &ticket.route)
        .and_then(|()| policy.may_run_on(role, ticket.sensitivity, want.tier))
        .map_err(Refusal::PolicyRefused)?;
    let hash = ticket_hash(&signed);
    Ok(Checked {
        signed,
        ticket,
        hash,
    })
}

/// Which job attempt a ticket is for: one run per submitter, job and
/// attempt, however many tickets name it.
type SeenKey = ([u8; 32], String, u32);

/// Tickets run here, each remembered until it expires: a ticket sent again
/// is refused. Bounded: beyond [`MAX_SEEN`], the one expiring first is
/// forgotten first.
pub struct SeenTickets {
    expiry: HashMap<SeenKey, u64>,
    by_expiry: BTreeSet<(u64, SeenKey)>,
    max: usize,
}

impl Default for SeenTickets {
    fn default() -> Self {
        Self::with_max(MAX_SEEN)
    }
}

impl SeenTickets {
    pub fn with_max(max: usize) -> Self {
        SeenTickets {
            expiry: HashMap::new(),
            by_expiry: BTreeSet::new(),
            max: max.max(1),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.expiry.len()
    }

    /// Records `checked` as run, unless it ran before (409).
    pub fn insert(&mut self, checked: &Checked, now: u64) -> Result<(), Refusal> {
        while self.by_expiry.first().is_some_and(|(at, _)| *at <= now) {
            self.forget_first();
        }
        let t = &checked.ticket;
        let key = (
            *checked.signed.device_key.as_bytes(),
            t.job_id.clone(),
            t.attempt,
        );
        if self.expiry.contains_key(&key) {
            return Err(Refusal::TicketReplayed(format!(
                "job {} attempt {} ran here already",
                t.job_id, t.attempt
            )));
        }
        // Forgetting a live ticket would let it run again: refuse instead,
        // until tickets expire.
        if self.expiry.len() >= self.max {
            return Err(Refusal::TooManyTickets(format!(
                "{} tickets are live here; no new jobs until some expire",
                self.expiry.len()
            )));
        }
        self.expiry.insert(key.clone(), t.expires_at);
        self.by_expiry.insert((t.expires_at, key));
        Ok(())
    }

    /// Forgets the ticket expiring first.
    fn forget_first(&mut self) {
        if let Some((_, key)) = self.by_expiry.pop_first() {
            self.expiry.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use platform::jobs::{Route, Sensitivity};
    use platform::keys::{DevicePrivate, NodePublic};
    use platform::netmap::{DnsConfig, NodeKind, RelayMap};
    use platform::people::Role;

    const NOW: u64 = 1_700_000_000;

    struct World {
        netmap: NetMap,
        submitter: DevicePrivate,
        worker: DevicePrivate,
    }

    fn node(b: u8, name: &str, key: &DevicePrivate, role: Option<Role>) -> Node {
        Node {
            id: i64::from(b),
            name: name.into(),
            kind: NodeKind::Mesh,
            node_key: NodePublic::from_bytes([b; 32]),
            disco_key: None,
            addresses: vec![IpAddr::from([100, 64, 0, b])],
            endpoints: vec![],
            online: true,
            os: "linux".into(),
            home_region: None,
            capabilities: None,
            owner: Some("ann".into()),
            key_expiry: None,
            device_key: Some(key.public()),
            owner_role: role,
            tags: Vec::new(),
        }
    }

    fn world() -> World {
        let (submitter, worker) = (DevicePrivate::generate(), DevicePrivate::generate());
        let laptop = node(2, "laptop", &submitter, Some(Role::Member));
        let netmap = NetMap {
            network: "home".into(),
            self_node: node(1, "gpu", &worker, Some(Role::Admin)),
            routes: vec![],
            peers: [(laptop.node_key, laptop)].into_iter().collect(),
            relay_map: RelayMap::default(),
            dns: DnsConfig::default(),
            awaiting_approval: false,
            packet_filter: Default::default(),
            compute: Default::default(),
        };
        World {
            netmap,
            submitter,
            worker,
        }
    }

    impl World {
        fn ticket(&self) -> Ticket {
            Ticket {
                job_id: "0123456789abcdef0123456789abcdef".into(),
                network: "home".into(),
                submitter_device: "laptop".into(),
                submitter_user: "ann".into(),
                workload: Workload::SmallChat,
                model: "gemma-3-270m".into(),
                route: Route::Auto,
                sensitivity: Sensitivity::Public,
                max_cost: 1_000_000,
                timeout_ms: 30_000,
                issued_at: NOW - 5,
                expires_at: NOW + 300,
                worker: "gpu".into(),
                worker_key: self.worker.public(),
                attempt: 1,
            }
        }

        fn expected(&self) -> Expected<'_> {
            Expected {
                netmap: &self.netmap,
                worker_key: self.worker.public(),
                tier: Tier::Tier2,
                caller: IpAddr::from([100, 64, 0, 2]),
                workload: Workload::SmallChat,
                model: "gemma-3-270m",
                now: NOW,
            }
        }

        fn sign(&self, t: &Ticket) -> Signed {
            Signed::sign(&self.submitter, DOMAIN_TICKET, t)
        }

        /// The refusal code of `t` checked as `change` alters the request.
        fn code(&self, t: &Ticket, change: impl FnOnce(&mut Expected<'_>)) -> &'static str {
            let mut want = self.expected();
            change(&mut want);
            match check(self.sign(t), &want) {
                Ok(_) => "ok",
                Err(r) => r.code(),
            }
        }
    }

    #[test]
    fn a_good_ticket_passes_with_its_hash() {
        let w = world();
        let t = w.ticket();
        let signed = w.sign(&t);
        let checked = check(signed.clone(), &w.expected()).unwrap();
        assert_eq!(checked.ticket, t);
        assert_eq!(checked.hash, ticket_hash(&signed));
        assert_eq!(checked.signed, signed);
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(TICKET_HEADER, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_header_decodes_to_the_signed_ticket() {
        let w = world();
        let signed = w.sign(&w.ticket());
        let value = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&signed).unwrap());
        assert!(value.len() < MAX_TICKET_HEADER / 4, "{}", value.len());
        assert_eq!(from_headers(&headers(&[&value])).unwrap(), signed);
    }

    #[test]
    fn bad_ticket_headers_are_refused_by_kind() {
        let code = |h: HeaderMap| from_headers(&h).unwrap_err().code();
        assert_eq!(code(HeaderMap::new()), "ticket_required");
        let b64 = |s: &[u8]| URL_SAFE_NO_PAD.encode(s);
        let good = b64(br#"{"device_key":"x"}"#);
        let padded = base64::engine::general_purpose::URL_SAFE.encode(b"{}");
        let standard = base64::engine::general_purpose::STANDARD_NO_PAD.encode([0xfb, 0xff]);
        let long = "A".repeat(MAX_TICKET_HEADER + 1);
        for bad in [
            headers(&[&good, &good]),
            headers(&[&padded]),
            headers(&[&standard]),
            headers(&["not base64!"]),
            headers(&[&long]),
            headers(&[&b64(b"")]),
            headers(&[&b64(b"{}")]),
            headers(&[&b64(b"[1,2]")]),
            headers(&[&b64(b"\xff")]),
        ] {
            assert_eq!(code(bad), "ticket_invalid");
        }
    }

    #[test]
    fn forged_or_malformed_tickets_are_invalid() {
        let w = world();
        let t = w.ticket();
        let mut tampered = w.sign(&t);
        tampered.payload = tampered.payload.replace("gemma", "GEMMA");
        let mut bad_sig = w.sign(&t);
        bad_sig.signature = "00".into();
        let receipt_domain = Signed::sign(&w.submitter, platform::jobs::DOMAIN_RECEIPT, &t);
        let not_a_ticket = Signed::sign(&w.submitter, DOMAIN_TICKET, &"hello");
        for signed in [tampered, bad_sig, receipt_domain, not_a_ticket] {
            let r = check(signed, &w.expected()).unwrap_err();
            assert_eq!(r.code(), "ticket_invalid", "{r}");
        }
        let mut bad_id = t.clone();
        bad_id.job_id = "not-hex".into();
        assert_eq!(w.code(&bad_id, |_| {}), "ticket_invalid");
        let mut too_long = t;
        too_long.expires_at = too_long.issued_at + platform::jobs::MAX_TICKET_LIFETIME_SECS + 1;
        assert_eq!(w.code(&too_long, |_| {}), "ticket_invalid");
    }

    #[test]
    fn tickets_from_unknown_devices_are_invalid() {
        let mut w = world();
        let stranger = DevicePrivate::generate();
        let r = check(
            Signed::sign(&stranger, DOMAIN_TICKET, &w.ticket()),
            &w.expected(),
        )
        .unwrap_err();
        assert_eq!(r.code(), "ticket_invalid");
        // A peer the coordinator lists without a device key signs nothing.
        for p in w.netmap.peers.values_mut() {
            p.device_key = None;
        }
        assert_eq!(w.code(&w.ticket(), |_| {}), "ticket_invalid");
    }

    #[test]
    fn tickets_are_valid_only_in_their_window() {
        let w = world();
        let t = w.ticket();
        assert_eq!(w.code(&t, |e| e.now = t.expires_at - 1), "ok");
        assert_eq!(w.code(&t, |e| e.now = t.expires_at), "ticket_expired");
        assert_eq!(w.code(&t, |e| e.now = t.expires_at + 999), "ticket_expired");
        // Issued by a clock running ahead: a minute is tolerated, more not.
        let mut ahead = t.clone();
        ahead.issued_at = NOW + ISSUE_LEEWAY_SECS;
        ahead.expires_at = ahead.issued_at + 300;
        assert_eq!(w.code(&ahead, |_| {}), "ok");
        ahead.issued_at += 1;
        ahead.expires_at += 1;
        assert_eq!(w.code(&ahead, |_| {}), "ticket_expired");
        // Long-lived tickets stay valid past the signed-request skew.
        let mut long = t;
        long.issued_at = NOW - 3000;
        long.expires_at = NOW + 500;
        assert_eq!(w.code(&long, |_| {}), "ok");
    }

    #[test]
    fn tickets_for_another_worker_model_workload_network_or_sender_mismatch() {
        let w = world();
        let t = w.ticket();
        let other = DevicePrivate::generate().public();
        assert_eq!(w.code(&t, |e| e.worker_key = other), "ticket_mismatch");
        assert_eq!(w.code(&t, |e| e.model = "other-model"), "ticket_mismatch");
        assert_eq!(
            w.code(&t, |e| e.workload = Workload::Embeddings),
            "ticket_mismatch"
        );
        let mut elsewhere = t.clone();
        elsewhere.network = "work".into();
        assert_eq!(w.code(&elsewhere, |_| {}), "ticket_mismatch");
        // Bound to the tunnel it comes through: the worker's own address,
        // or another peer's, will not do.
        assert_eq!(
            w.code(&t, |e| e.caller = IpAddr::from([100, 64, 0, 1])),
            "ticket_mismatch"
        );
        assert_eq!(
            w.code(&t, |e| e.caller = IpAddr::from([100, 64, 0, 9])),
            "ticket_mismatch"
        );
    }

    #[test]
    fn this_devices_own_tickets_pass_from_its_own_address() {
        let mut w = world();
        let t = w.ticket();
        w.submitter = w.worker.clone();
        assert_eq!(
            w.code(&t, |e| e.caller = IpAddr::from([100, 64, 0, 1])),
            "ok"
        );
    }

    #[test]
    fn the_networks_policy_decides() {
        let mut w = world();
        let mut t = w.ticket();
        t.sensitivity = Sensitivity::Sensitive;
        assert_eq!(w.code(&t, |_| {}), "policy_refused", "members: pinned only");
        t.route = Route::Devices(vec!["gpu".into()]);
        assert_eq!(w.code(&t, |_| {}), "ok");
        assert_eq!(
            w.code(&t, |e| e.tier = Tier::Tier1),
            "policy_refused",
            "not on a phone"
        );
        w.netmap.compute.policy.member.workloads = vec![Workload::Embeddings];
        assert_eq!(w.code(&t, |_| {}), "policy_refused");
        for p in w.netmap.peers.values_mut() {
            p.owner_role = None;
        }
        assert_eq!(w.code(&w.ticket(), |_| {}), "policy_refused");
    }

    #[test]
    fn a_ticket_runs_once_per_attempt() {
        let w = world();
        let mut seen = SeenTickets::default();
        let t = w.ticket();
        let first = check(w.sign(&t), &w.expected()).unwrap();
        seen.insert(&first, NOW).unwrap();
        assert_eq!(
            seen.insert(&first, NOW).unwrap_err().code(),
            "ticket_replayed"
        );
        // Signed again (a new hash) for the same attempt: still a replay.
        let mut resigned = t.clone();
        resigned.issued_at -= 1;
        let again = check(w.sign(&resigned), &w.expected()).unwrap();
        assert_ne!(again.hash, first.hash);
        assert_eq!(
            seen.insert(&again, NOW).unwrap_err().code(),
            "ticket_replayed"
        );
        let mut retry = t;
        retry.attempt = 2;
        let retry = check(w.sign(&retry), &w.expected()).unwrap();
        seen.insert(&retry, NOW).unwrap();
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn seen_tickets_are_forgotten_at_expiry_and_a_full_table_takes_no_new_jobs() {
        let w = world();
        let checked = |job: u32, expires_at: u64| {
            let mut t = w.ticket();
            t.job_id = format!("{job:08x}");
            t.issued_at = NOW - 10;
            t.expires_at = expires_at;
            Checked {
                hash: String::new(),
                signed: w.sign(&t),
                ticket: t,
            }
        };
        let mut seen = SeenTickets::with_max(3);
        seen.insert(&checked(1, NOW + 10), NOW).unwrap();
        seen.insert(&checked(2, NOW + 30), NOW).unwrap();
        seen.insert(&checked(3, NOW + 20), NOW).unwrap();
        // Full: no live ticket is forgotten; new jobs wait.
        assert!(matches!(
            seen.insert(&checked(4, NOW + 40), NOW),
            Err(Refusal::TooManyTickets(_))
        ));
        assert_eq!(seen.len(), 3);
        assert!(matches!(
            seen.insert(&checked(1, NOW + 10), NOW),
            Err(Refusal::TicketReplayed(_))
        ));
        // Past their expiry, entries go (a replay then fails as expired).
        seen.insert(&checked(4, NOW + 40), NOW + 15).unwrap();
        assert_eq!(seen.len(), 3, "job 1 expired, jobs 2, 3 and 4 remain");
        seen.insert(&checked(5, NOW + 100), NOW + 35).unwrap();
        assert_eq!(seen.len(), 2, "jobs 4 and 5 remain");
        assert!(seen.insert(&checked(4, NOW + 40), NOW + 35).is_err());
    }
}
