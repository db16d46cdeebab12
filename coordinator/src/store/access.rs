//! Who stays in: device approval, removal and revocation (with the
//! denylist that keeps a removed device out until an admin lets it back),
//! node-key rotation and expiry. Every change is audited in its transaction.

use platform::keys::{DevicePublic, NodePublic};
use sqlx::SqliteConnection;

use super::audit::{self, Change, Who};
use super::devices::{expiry_at, lifetime, SELECT_DEVICE};
use super::{DeviceRow, Store};
use crate::error::AppError;

/// What a rotation changed.
pub struct Rotated {
    pub row: DeviceRow,
    pub old_node_key: NodePublic,
}

impl Store {
    pub(super) async fn network_name(
        conn: &mut SqliteConnection,
        network_id: i64,
    ) -> Result<String, AppError> {
        let (name,): (String,) = sqlx::query_as("SELECT name FROM networks WHERE id = ?")
            .bind(network_id)
            .fetch_one(conn)
            .await?;
        Ok(name)
    }

    /// True when any of `keys` is on the network's denylist.
    pub(super) async fn denied(
        conn: &mut SqliteConnection,
        network_id: i64,
        keys: &[&str],
    ) -> Result<bool, AppError> {
        for key in keys {
            let hit: Option<(i64,)> =
                sqlx::query_as("SELECT id FROM denylist WHERE network_id = ? AND key = ?")
                    .bind(network_id)
                    .bind(key)
                    .fetch_optional(&mut *conn)
                    .await?;
            if hit.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub(super) async fn devices_of_user(
        conn: &mut SqliteConnection,
        network_id: i64,
        user_id: i64,
    ) -> Result<Vec<DeviceRow>, AppError> {
        Ok(sqlx::query_as(&format!(
            "{SELECT_DEVICE} WHERE d.network_id = ? AND d.user_id = ? ORDER BY d.id"
        ))
        .bind(network_id)
        .bind(user_id)
        .fetch_all(conn)
        .await?)
    }

    /// Puts a device's device key and node key on the denylist.
    pub(super) async fn denylist_device(
        conn: &mut SqliteConnection,
        d: &DeviceRow,
        reason: &str,
        now: u64,
    ) -> Result<(), AppError> {
        let keys = [
            ("device", d.device_key.clone()),
            ("node", Some(d.node_key.clone())),
        ];
        for (kind, key) in keys {
            let Some(key) = key else { continue };
            sqlx::query(
                "INSERT INTO denylist (network_id, kind, key, device_name, reason, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (network_id, key) DO NOTHING",
            )
            .bind(d.network_id)
            .bind(kind)
            .bind(key)
            .bind(&d.name)
            .bind(reason)
            .bind(now as i64)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    async fn device_in(
        conn: &mut SqliteConnection,
        network_id: i64,
        id: i64,
    ) -> Result<DeviceRow, AppError> {
        sqlx::query_as(&format!(
            "{SELECT_DEVICE} WHERE d.id = ? AND d.network_id = ?"
        ))
        .bind(id)
        .bind(network_id)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no device {id} in this network")))
    }

    /// Deletes a device; its keys go on the denylist.
    pub async fn remove_device(
        &self,
        who: &Who,
        network_id: i64,
        id: i64,
        now: u64,
    ) -> Result<DeviceRow, AppError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let d = Self::device_in(&mut tx, network_id, id).await?;
        Self::denylist_device(&mut tx, &d, "removed", now).await?;
        Self::drop_device(&mut tx, d.id, now).await?;
        audit::record(
            &mut tx,
            who,
            Change::new(network_id, "device.removed", d.target()),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(d)
    }

    /// Keeps the device's record but shuts it out; its keys go on the
    /// denylist until an admin approves it again.
    pub async fn revoke_device(
        &self,
        who: &Who,
        network_id: i64,
        id: i64,
        now: u64,
    ) -> Result<DeviceRow, AppError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let d = Self::device_in(&mut tx, network_id, id).await?;
        if d.revoked_at.is_some() {
            return Err(AppError::Conflict(format!("{} is already revoked", d.name)));
        }
        Self::denylist_device(&mut tx, &d, "revoked", now).await?;
        sqlx::query("UPDATE devices SET revoked_at = ? WHERE id = ?")
            .bind(now as i64)
            .bind(d.id)
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut tx,
            who,
            Change::new(network_id, "device.revoked", d.target()).from_to("active", "revoked"),
            now,
        )
        .await?;
        let row = Self::device_in(&mut tx, network_id, id).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Approves a device waiting for approval, or lets a revoked one back
    /// (lifting its denylist entries). Returns the row before and after.
    pub async fn approve_device(
        &self,
        who: &Who,
        network_id: i64,
        id: i64,
        now: u64,
    ) -> Result<(DeviceRow, DeviceRow), AppError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let before = Self::device_in(&mut tx, network_id, id).await?;
        if before.approved && before.revoked_at.is_none() {
            return Err(AppError::Conflict(format!(
                "{} is already approved",
                before.name
            )));
        }
        for key in [before.device_key.as_deref(), Some(before.node_key.as_str())]
            .into_iter()
            .flatten()
        {
            sqlx::query("DELETE FROM denylist WHERE network_id = ? AND key = ?")
                .bind(network_id)
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE devices SET approved = 1, revoked_at = NULL WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let old = if before.revoked_at.is_some() {
            "revoked"
        } else {
            "awaiting approval"
        };
        audit::record(
            &mut tx,
            who,
            Change::new(network_id, "device.approved", before.target()).from_to(old, "active"),
            now,
        )
        .await?;
        let after = Self::device_in(&mut tx, network_id, id).await?;
        tx.commit().await?;
        Ok((before, after))
    }

    /// Replaces a device's node key (the device proved its device key).
    pub async fn rotate_node_key(
        &self,
        device_key: &DevicePublic,
        old: &NodePublic,
        new: &NodePublic,
        now: u64,
    ) -> Result<Rotated, AppError> {
        // Unknown device keys are turned away before the write lock.
        if self.device_by_device_key(device_key).await?.is_none() {
            return Err(AppError::Unauthorized("device is not registered".into()));
        }
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let d: DeviceRow = sqlx::query_as(&format!("{SELECT_DEVICE} WHERE d.device_key = ?"))
            .bind(device_key.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| AppError::Unauthorized("device is not registered".into()))?;
        if d.revoked_at.is_some() {
            return Err(AppError::Forbidden("this device has been revoked".into()));
        }
        if d.key_expired(now) {
            return Err(AppError::Forbidden(
                "the node key has expired: register again with an auth key".into(),
            ));
        }
        if d.node_key()? != *old {
            return Err(AppError::Conflict(
                "old_node_key is not this device's current node key".into(),
            ));
        }
        if old == new {
            return Err(AppError::BadRequest(
                "the new node key is the old one".into(),
            ));
        }
        if Self::denied(&mut tx, d.network_id, &[&new.to_string()]).await? {
            return Err(AppError::Forbidden("that node key is denylisted".into()));
        }
        let rules = Self::settings_in(&mut tx, d.network_id).await?;
        let res = sqlx::query(
            "UPDATE devices SET node_key = ?, key_expires_at = ?, key_expiry_handled = 0, \
             key_issued_at = ? WHERE id = ?",
        )
        .bind(new.to_string())
        .bind(expiry_at(
            now,
            lifetime(d.key_expiry_override, rules.key_expiry_secs),
        ))
        .bind(now as i64)
        .bind(d.id)
        .execute(&mut *tx)
        .await;
        super::devices::node_key_clash(res)?;
        audit::record(
            &mut tx,
            &Who::device(&d.name),
            Change::new(d.network_id, "key.rotated", d.target()).from_to(old.short(), new.short()),
            now,
        )
        .await?;
        let row = Self::device_in(&mut tx, d.network_id, d.id).await?;
        tx.commit().await?;
        Ok(Rotated {
            row,
            old_node_key: *old,
        })
    }

    /// Sets (or clears, with None) a device's own key lifetime, and moves
    /// its current expiry to match, counted from now.
    pub async fn set_key_expiry_override(
        &self,
        who: &Who,
        network_id: i64,
        id: i64,
        expiry_secs: Option<u64>,
        now: u64,
    ) -> Result<DeviceRow, AppError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let d = Self::device_in(&mut tx, network_id, id).await?;
        let rules = Self::settings_in(&mut tx, network_id).await?;
        let stored = expiry_secs.map(|s| s.min(i64::MAX as u64) as i64);
        let expires = expiry_at(now, lifetime(stored, rules.key_expiry_secs));
        sqlx::query(
            "UPDATE devices SET key_expiry_override = ?, key_expires_at = ?, key_expiry_handled = 0 WHERE id = ?",
        )
        .bind(stored)
        .bind(expires)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let show = |t: Option<i64>| t.map_or("never".to_owned(), |t| t.to_string());
        audit::record(
            &mut tx,
            who,
            Change::new(network_id, "key.expiry_changed", d.target())
                .from_to(show(d.key_expires_at), show(expires)),
            now,
        )
        .await?;
        let row = Self::device_in(&mut tx, network_id, id).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Devices whose node key expired and has not been acted on yet; marks
    /// them handled and audits each (by the system).
    pub async fn take_newly_expired(&self, now: u64) -> Result<Vec<DeviceRow>, AppError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let rows: Vec<DeviceRow> = sqlx::query_as(&format!(
            "{SELECT_DEVICE} WHERE d.key_expires_at IS NOT NULL AND d.key_expires_at <= ? \
             AND d.key_expiry_handled = 0"
        ))
        .bind(now.min(i64::MAX as u64) as i64)
        .fetch_all(&mut *tx)
        .await?;
        for d in &rows {
            sqlx::query("UPDATE devices SET key_expiry_handled = 1 WHERE id = ?")
                .bind(d.id)
                .execute(&mut *tx)
                .await?;
            audit::record(
                &mut tx,
                &Who::system(),
                Change::new(d.network_id, "key.expired", d.target()).to(d.node_key.clone()),
                now,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(rows)
    }

    /// An admin asks the network's devices to renew their node keys.
    pub async fn record_rotation_request(
        &self,
        ctx: &super::NetCtx,
        now: u64,
    ) -> Result<(), AppError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("UPDATE networks SET rotation_requested_at = ? WHERE id = ?")
            .bind(now as i64)
            .bind(ctx.id)
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut tx,
            &ctx.who(),
            Change::new(
                ctx.id,
                "key.rotation_requested",
                format!("network:{}", ctx.name),
            ),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether the device's node key predates the network's last rotation
    /// request (times are whole seconds: a key issued in the same second as
    /// the request, typically the renewal it caused, counts as renewed).
    pub async fn rotation_due(&self, device_id: i64) -> Result<bool, AppError> {
        let row: Option<(bool,)> = sqlx::query_as(
            "SELECT n.rotation_requested_at IS NOT NULL AND \
             (d.key_issued_at IS NULL OR d.key_issued_at < n.rotation_requested_at) \
             FROM devices d JOIN networks n ON n.id = d.network_id WHERE d.id = ?",
        )
        .bind(device_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.is_some_and(|r| r.0))
    }

    pub async fn denylist(
        &self,
        network_id: i64,
    ) -> Result<Vec<platform::people::DenylistEntry>, AppError> {
        let rows: Vec<(i64, String, String, String, String, String, i64)> = sqlx::query_as(
            "SELECT d.id, n.name, d.kind, d.key, d.device_name, d.reason, d.created_at FROM denylist d \
             JOIN networks n ON n.id = d.network_id WHERE d.network_id = ? ORDER BY d.id",
        )
        .bind(network_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(id, network, kind, key, device_name, reason, created_at)| {
                    platform::people::DenylistEntry {
                        id,
                        network,
                        kind,
                        key,
                        device_name,
                        reason,
                        created_at: created_at as u64,
                    }
                },
            )
            .collect())
    }

    /// An admin lets a removed device's key back in.
    pub async fn lift_denylist(
        &self,
        who: &Who,
        network_id: i64,
        id: i64,
        now: u64,
    ) -> Result<(), AppError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT key, device_name FROM denylist WHERE id = ? AND network_id = ?")
                .bind(id)
                .bind(network_id)
                .fetch_optional(&mut *tx)
                .await?;
        let (key, device) = row
            .ok_or_else(|| AppError::NotFound(format!("no denylist entry {id} in this network")))?;
        sqlx::query("DELETE FROM denylist WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut tx,
            who,
            Change::new(network_id, "denylist.lifted", format!("device:{device}"))
                .from_to(key, "allowed"),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
