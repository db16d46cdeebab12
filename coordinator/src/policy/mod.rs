//! The access policy of each network: parsed and checked at upload
//! ([`doc`]), compiled against the network's devices once per change
//! ([`compile`]), and published: each device's netmap carries only its own
//! packet filter and only the peers it may talk to, in either direction.
//!
//! One [`Policies`] holds the compiled policy of every network. A change
//! (a new policy, or a device whose policy-relevant facts changed: added,
//! approved, removed, retagged, its owner's role) recompiles that network
//! and tells each live device only what changed for it: peers it now sees
//! (upsert), peers it no longer sees (removed), and its new filter. A device
//! whose own facts changed gets a full netmap.
//!
//! Concurrency: the map of compiled policies is behind a std `Mutex`, held
//! only to compare and swap (never across an `.await`). Work that reads the
//! database first (the first compile of a network, a new policy) notes the
//! network's generation before reading and installs only if no device
//! change came in meanwhile, else it reads again. What a new policy means
//! for each device (O(devices² × rules) on a big network) is worked out in
//! `spawn_blocking`, outside the lock; a device change (O(live devices ×
//! rules)) is worked out under it.

pub mod compile;
pub mod doc;
mod fuzz;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use platform::netmap::PeerChange;
use platform::people::Role;

pub use compile::{Compiled, DeviceFacts};
pub use doc::{parse, Policy, PolicyError, DEFAULT_POLICY, MAX_POLICY_BYTES};
#[doc(hidden)]
pub use fuzz::fuzz_policy;

use crate::api::AppState;
use crate::error::AppError;
use crate::fanout;
use crate::hub::{Push, Visibility};
use crate::store::audit::Who;
use crate::store::DeviceRow;

impl Visibility for Compiled {
    fn sees(&self, viewer: i64, subject: i64) -> bool {
        Compiled::sees(self, viewer, subject)
    }
}

#[derive(Default)]
struct Entry {
    compiled: Option<Arc<Compiled>>,
    /// Bumped by every device change, compiled or not.
    generation: u64,
}

/// The compiled policy of every network.
#[derive(Default)]
pub struct Policies {
    networks: Mutex<HashMap<i64, Entry>>,
    /// Held for the whole of a new policy's check, store and install.
    setting: tokio::sync::Mutex<()>,
}

impl Policies {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Entry>> {
        self.networks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cached(&self, network_id: i64) -> Option<Arc<Compiled>> {
        self.lock()
            .get(&network_id)
            .and_then(|e| e.compiled.clone())
    }

    fn generation(&self, network_id: i64) -> u64 {
        self.lock().get(&network_id).map_or(0, |e| e.generation)
    }
}

/// Whether the policy counts a device: approved and not revoked.
fn counts(row: &DeviceRow) -> bool {
    row.approved && row.revoked_at.is_none()
}

/// What the policy needs to know about a device.
pub fn facts(row: &DeviceRow) -> Result<DeviceFacts, AppError> {
    Ok(DeviceFacts {
        id: row.id,
        name: row.name.clone(),
        user: row.owner.clone(),
        role: row.owner_role.as_deref().and_then(|r| r.parse().ok()),
        tags: row.tags()?,
        addrs: row.addresses()?,
    })
}

/// The members of a network and their roles (for tests and evaluation).
pub async fn member_roles(
    s: &AppState,
    network_id: i64,
) -> Result<BTreeMap<String, Role>, AppError> {
    Ok(s.store
        .list_members(network_id)
        .await?
        .into_iter()
        .map(|m| (m.username, m.role))
        .collect())
}

/// The network's stored policy, or the default.
async fn stored(s: &AppState, network_id: i64) -> Result<(Policy, Option<String>), AppError> {
    let text = s.store.policy_text(network_id).await?;
    let policy = parse(text.as_deref().unwrap_or(DEFAULT_POLICY))
        .map_err(|e| AppError::Internal(anyhow::anyhow!("the stored policy is invalid: {e}")))?;
    Ok((policy, text))
}

async fn compile_from_store(
    s: &AppState,
    network_id: i64,
    policy: Policy,
) -> Result<(Compiled, Vec<DeviceRow>), AppError> {
    let rows = s.store.network_devices(network_id).await?;
    let devices = rows
        .iter()
        .filter(|r| counts(r))
        .map(facts)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((Compiled::new(policy, devices), rows))
}

/// The network's compiled policy, compiling it on first use.
pub async fn current(s: &AppState, network_id: i64) -> Result<Arc<Compiled>, AppError> {
    loop {
        if let Some(c) = s.policies.cached(network_id) {
            return Ok(c);
        }
        let generation = s.policies.generation(network_id);
        let (policy, _) = stored(s, network_id).await?;
        let (compiled, _) = compile_from_store(s, network_id, policy).await?;
        let compiled = Arc::new(compiled);
        let mut networks = s.policies.lock();
        let entry = networks.entry(network_id).or_default();
        if entry.generation != generation {
            continue;
        }
        if let Some(c) = &entry.compiled {
            return Ok(c.clone());
        }
        entry.compiled = Some(compiled.clone());
        s.hub.set_visibility(network_id, compiled.clone());
        return Ok(compiled);
    }
}

/// A device was added, changed or is `gone`: if the policy sees it
/// differently now, recompile and tell the devices it concerns. Cheap when
/// nothing the policy reads changed (endpoints, presence, reports).
pub fn device_changed(s: &AppState, row: &DeviceRow, gone: bool) -> Result<(), AppError> {
    let now_facts = if !gone && counts(row) {
        Some(facts(row)?)
    } else {
        None
    };
    replace_facts(
        s,
        row.network_id,
        row.id,
        now_facts,
        &HashMap::from([(row.id, row)]),
    )
}

/// A device was deleted by a path that has no row of it any more (the
/// ephemeral sweep, a deletion noticed by the sweeper): its addresses leave
/// every filter before they can be handed to another device.
pub fn device_gone(s: &AppState, network_id: i64, device_id: i64) -> Result<(), AppError> {
    replace_facts(s, network_id, device_id, None, &HashMap::new())
}

fn replace_facts(
    s: &AppState,
    network_id: i64,
    device_id: i64,
    now_facts: Option<DeviceFacts>,
    rows: &HashMap<i64, &DeviceRow>,
) -> Result<(), AppError> {
    let mut networks = s.policies.lock();
    let entry = networks.entry(network_id).or_default();
    let Some(old) = entry.compiled.clone() else {
        // A compile from the store may be under way: make it read again.
        entry.generation += 1;
        return Ok(());
    };
    if old.facts(device_id) == now_facts.as_ref() {
        return Ok(());
    }
    entry.generation += 1;
    let mut devices: Vec<DeviceFacts> = old
        .devices()
        .iter()
        .filter(|d| d.id != device_id)
        .cloned()
        .collect();
    devices.extend(now_facts);
    devices.sort_by_key(|d| d.id);
    let new = Arc::new(Compiled::new(old.policy.clone(), devices));
    publish(s, network_id, &old, &new, rows, Some(&[device_id]))?;
    entry.compiled = Some(new.clone());
    s.hub.set_visibility(network_id, new);
    Ok(())
}

/// Checks a new policy against the network as it is (its names, its
/// tests), stores it with an audit event carrying the diff, and publishes
/// what changes. A policy that fails is refused and the running one stays.
pub async fn set(
    s: &AppState,
    who: &Who,
    network_id: i64,
    text: &str,
) -> Result<Arc<Compiled>, AppError> {
    // One new policy at a time: the one stored last is the one installed.
    let _one = s.policies.setting.lock().await;
    let mut generation = s.policies.generation(network_id);
    let (checked, checked_rows) = check_with_rows(s, network_id, text).await?;
    let policy = checked.policy.clone();
    let (_, old_text) = stored(s, network_id).await?;
    // The first round installs what the check compiled; a retry (a device
    // changed meanwhile) compiles again.
    let mut first = Some((checked, checked_rows));
    let mut saved = false;
    loop {
        let (compiled, rows) = match first.take() {
            Some(done) => done,
            None => {
                generation = s.policies.generation(network_id);
                compile_from_store(s, network_id, policy.clone()).await?
            }
        };
        if !saved {
            let diff =
                similar::TextDiff::from_lines(old_text.as_deref().unwrap_or(DEFAULT_POLICY), text)
                    .unified_diff()
                    .header("policy (before)", "policy (after)")
                    .to_string();
            s.store
                .set_policy(who, network_id, text, diff, s.clock.now())
                .await?;
            saved = true;
        }
        let old = current(s, network_id).await?;
        let new = Arc::new(compiled);
        // What each device must hear: O(devices² × rules) on a big network,
        // so worked out off the async workers and outside the lock.
        let live = s.hub.live_devices(network_id);
        let live_then: HashSet<i64> = live.iter().copied().collect();
        let online: HashSet<i64> = rows
            .iter()
            .filter(|r| fanout::online(s, r))
            .map(|r| r.id)
            .collect();
        let pushes = {
            let (old, new) = (old.clone(), new.clone());
            tokio::task::spawn_blocking(move || {
                let rows: HashMap<i64, &DeviceRow> = rows.iter().map(|r| (r.id, r)).collect();
                plan(&old, &new, &rows, None, &live, |r| online.contains(&r.id))
            })
            .await
            .map_err(|e| AppError::Internal(anyhow::anyhow!("planning a policy change: {e}")))??
        };
        let mut networks = s.policies.lock();
        let entry = networks.entry(network_id).or_default();
        if entry.generation != generation {
            continue;
        }
        entry.compiled = Some(new.clone());
        s.hub.set_visibility(network_id, new.clone());
        // Under the lock, so no device change's pushes land before these.
        for (device, push) in pushes {
            s.hub.send_to(network_id, device, push);
        }
        // Streams that opened while the plan was made got the old policy.
        for device in s.hub.live_devices(network_id) {
            if !live_then.contains(&device) {
                s.hub.send_to(network_id, device, Push::Refresh);
            }
        }
        return Ok(new);
    }
}

/// Checks a policy against the network as it is, without storing it: its
/// syntax and names, then its tests on the network's devices and members.
pub async fn check(s: &AppState, network_id: i64, text: &str) -> Result<Compiled, AppError> {
    Ok(check_with_rows(s, network_id, text).await?.0)
}

/// [`check`], also giving the device rows it compiled against.
async fn check_with_rows(
    s: &AppState,
    network_id: i64,
    text: &str,
) -> Result<(Compiled, Vec<DeviceRow>), AppError> {
    let policy = parse(text).map_err(policy_refused)?;
    let members = member_roles(s, network_id).await?;
    policy
        .check_users(|u| members.contains_key(u))
        .map_err(policy_refused)?;
    let (compiled, rows) = compile_from_store(s, network_id, policy).await?;
    compiled.run_tests(&members).map_err(policy_refused)?;
    Ok((compiled, rows))
}

/// A refused policy: 400 naming the line.
pub fn policy_refused(e: PolicyError) -> AppError {
    AppError::BadRequest(format!("policy refused: {e}"))
}

/// Tells each live device of the network what changed for it between
/// `old` and `new` (see [`plan`]).
fn publish(
    s: &AppState,
    network_id: i64,
    old: &Compiled,
    new: &Compiled,
    rows: &HashMap<i64, &DeviceRow>,
    changed: Option<&[i64]>,
) -> Result<(), AppError> {
    let live = s.hub.live_devices(network_id);
    for (device, push) in plan(old, new, rows, changed, &live, |r| fanout::online(s, r))? {
        s.hub.send_to(network_id, device, push);
    }
    Ok(())
}

/// What each of the `live` devices must hear when the policy goes from
/// `old` to `new`. `changed`: the devices whose facts changed (None: the
/// policy itself changed, so anything may have). Those devices get a full
/// netmap; the rest get upserts and removals of peers they start or stop
/// seeing, and their new filter if it differs.
fn plan(
    old: &Compiled,
    new: &Compiled,
    rows: &HashMap<i64, &DeviceRow>,
    changed: Option<&[i64]>,
    live: &[i64],
    online: impl Fn(&DeviceRow) -> bool,
) -> Result<Vec<(i64, Push)>, AppError> {
    let all: Vec<i64> = {
        let mut ids: Vec<i64> = old
            .devices()
            .iter()
            .chain(new.devices())
            .map(|d| d.id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    let candidates = changed.unwrap_or(&all);
    let mut out = Vec::new();
    for &viewer in live {
        if changed.is_some_and(|c| c.contains(&viewer)) {
            out.push((viewer, Push::Refresh));
            continue;
        }
        for &d in candidates {
            let (was, is) = (old.sees(viewer, d), new.sees(viewer, d));
            let Some(row) = rows.get(&d) else { continue };
            let change = match (was, is) {
                (false, true) => PeerChange::Upsert {
                    node: Box::new(row.to_node(online(row))?),
                },
                (true, false) => PeerChange::Removed {
                    node_key: row.node_key()?,
                },
                _ => continue,
            };
            out.push((viewer, Push::Change(change)));
        }
        let filter = new.filter_for(viewer);
        if filter != old.filter_for(viewer) {
            out.push((viewer, Push::Filter(Arc::new(filter))));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
