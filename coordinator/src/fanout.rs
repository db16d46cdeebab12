//! What peers, the device itself and relays are told after a change has
//! been committed. Handlers commit through the store, then call exactly one
//! of these: the rules for who hears what live here and nowhere else.

use platform::api::ApiErrorBody;
use platform::keys::NodePublic;
use platform::netmap::{NodeKind, PeerChange};

use crate::api::AppState;
use crate::error::AppError;
use crate::hub::Push;
use crate::policy;
use crate::store::{DeviceRow, Rotated};

/// Whether the hub shows the device online (stock WireGuard devices are
/// assumed up: they have no map stream).
pub fn online(s: &AppState, row: &DeviceRow) -> bool {
    row.kind() == NodeKind::Wireguard || s.hub.is_online(row.network_id, row.id)
}

/// A device's record changed (registration, report, endpoints, tags, its
/// owner's role): the access policy takes it in first, then its peers get
/// the new record if they may see it.
pub fn device_changed(s: &AppState, row: &DeviceRow) -> Result<(), AppError> {
    policy::device_changed(s, row, false)?;
    if row.is_visible(s.clock.now()) {
        s.hub.broadcast(
            row.network_id,
            row.id,
            PeerChange::Upsert {
                node: Box::new(row.to_node(online(s, row))?),
            },
        );
    }
    Ok(())
}

/// A device may no longer take part (removed, revoked, or its key
/// expired): peers drop it, its map stream ends with `why`, relays refuse
/// its node key.
pub fn device_shut_out(
    s: &AppState,
    row: &DeviceRow,
    code: &str,
    why: String,
) -> Result<(), AppError> {
    s.hub.broadcast(
        row.network_id,
        row.id,
        PeerChange::Removed {
            node_key: row.node_key()?,
        },
    );
    policy::device_changed(s, row, true)?;
    close_and_refuse(s, row, code, why)
}

/// A device's node key expired: peers stop on their own (they know the
/// expiry); its stream ends and relays refuse the key.
pub fn key_expired(s: &AppState, row: &DeviceRow) -> Result<(), AppError> {
    close_and_refuse(
        s,
        row,
        "forbidden",
        "this device's node key has expired".into(),
    )
}

/// Ends the device's map stream with `why` and tells relays to refuse its
/// node key.
fn close_and_refuse(
    s: &AppState,
    row: &DeviceRow,
    code: &str,
    why: String,
) -> Result<(), AppError> {
    s.hub.send_to(
        row.network_id,
        row.id,
        Push::Close(ApiErrorBody {
            code: code.to_owned(),
            message: why,
        }),
    );
    s.hub.revoke_relay_access(row.node_key()?);
    Ok(())
}

/// A device was approved: peers learn about it, and it gets a fresh full
/// netmap (peers included) on the stream it has open, without reconnecting.
pub fn device_approved(s: &AppState, row: &DeviceRow) -> Result<(), AppError> {
    s.hub.approve(row.network_id, row.id);
    device_changed(s, row)?;
    s.hub.send_to(row.network_id, row.id, Push::Refresh);
    Ok(())
}

/// A device replaced its node key: peers swap the old record for the new
/// one, and relays refuse the old key.
pub fn key_rotated(s: &AppState, r: &Rotated) -> Result<(), AppError> {
    let row = &r.row;
    s.hub.set_node_key(row.network_id, row.id, row.node_key()?);
    replaced_key(s, row, r.old_node_key);
    device_changed(s, row)
}

/// Peers forget `old` (the device has another key now); relays refuse it.
pub fn replaced_key(s: &AppState, row: &DeviceRow, old: NodePublic) {
    s.hub.broadcast(
        row.network_id,
        row.id,
        PeerChange::Removed { node_key: old },
    );
    s.hub.revoke_relay_access(old);
}

/// A network's settings that every netmap carries (compute rules, DNS)
/// changed: every connected device of it gets a fresh full netmap.
/// Returns how many were told.
pub fn settings_changed(s: &AppState, devices: &[DeviceRow]) -> usize {
    devices
        .iter()
        .filter(|d| s.hub.send_to(d.network_id, d.id, Push::Refresh))
        .count()
}

/// A member's role changed: peers get each of their devices again (the
/// node carries `owner_role`), and the devices themselves a fresh netmap
/// (their own node carries it too).
pub fn owner_role_changed(s: &AppState, devices: &[DeviceRow]) -> Result<(), AppError> {
    for d in devices {
        device_changed(s, d)?;
        s.hub.send_to(d.network_id, d.id, Push::Refresh);
    }
    Ok(())
}
