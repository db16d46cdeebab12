//! Device-code pairing: a device with no key asks for a short code, a
//! member approves the code into a network, and the device (proving the
//! same device key) collects a single-use pre-auth key for its
//! registration. Codes live ten minutes; the number waiting is bounded.

use platform::keys::DevicePublic;
use platform::people::{DeviceCodeStatus, Role};
use rand_core::{OsRng, RngCore};

use super::audit::{self, Change};
use super::people::NetCtx;
use super::Store;
use crate::error::AppError;

/// How long a code waits for approval.
pub const CODE_LIFETIME_SECS: u64 = 600;
/// Most codes waiting at once, server-wide (starting one needs no account).
pub const MAX_PENDING_CODES: i64 = 10_000;
/// Letters that are hard to confuse and spell no words.
const ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";

/// A pairing as the device sees it.
pub struct Pairing {
    pub code: String,
    pub expires_at: u64,
    pub status: DeviceCodeStatus,
    pub auth_key: Option<String>,
    pub network: Option<String>,
}

/// expires_at, network_id, approved_by, preauth_key_id
type PairingRow = (i64, Option<i64>, Option<i64>, Option<i64>);

/// A fresh code, `XXXX-XXXX` (20^8 ≈ 2.6e10 possibilities).
fn new_code() -> String {
    let mut b = [0u8; 8];
    OsRng.fill_bytes(&mut b);
    let letters: String = b
        .iter()
        .map(|x| ALPHABET[usize::from(*x) % ALPHABET.len()] as char)
        .collect();
    format!("{}-{}", &letters[..4], &letters[4..])
}

/// Codes are typed by people: accept lower case and a missing dash.
pub fn normalize_code(code: &str) -> String {
    let letters: String = code
        .chars()
        .filter(|c| c.is_ascii_alphabetic())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if letters.len() == 8 {
        format!("{}-{}", &letters[..4], &letters[4..])
    } else {
        letters
    }
}

impl Store {
    /// Starts (or repeats) pairing for a device key.
    pub async fn start_pairing(
        &self,
        device_key: &DevicePublic,
        hostname: &str,
        now: u64,
    ) -> Result<Pairing, AppError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("DELETE FROM device_codes WHERE expires_at <= ?")
            .bind(now as i64)
            .execute(&mut *tx)
            .await?;
        let existing: Option<(String, i64)> = sqlx::query_as(
            "SELECT code, expires_at FROM device_codes WHERE device_key = ? AND approved_by IS NULL",
        )
        .bind(device_key.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((code, expires_at)) = existing {
            tx.commit().await?;
            return Ok(Pairing {
                code,
                expires_at: expires_at as u64,
                status: DeviceCodeStatus::Pending,
                auth_key: None,
                network: None,
            });
        }
        let (pending,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM device_codes")
            .fetch_one(&mut *tx)
            .await?;
        if pending >= MAX_PENDING_CODES {
            return Err(AppError::TooManyRequests(
                "too many devices are waiting to be paired; try again later".into(),
            ));
        }
        // An approved, uncollected pairing of this device is replaced.
        sqlx::query("DELETE FROM device_codes WHERE device_key = ?")
            .bind(device_key.to_string())
            .execute(&mut *tx)
            .await?;
        let expires_at = now + CODE_LIFETIME_SECS;
        let code = loop {
            let code = new_code();
            let taken: Option<(String,)> =
                sqlx::query_as("SELECT code FROM device_codes WHERE code = ?")
                    .bind(&code)
                    .fetch_optional(&mut *tx)
                    .await?;
            if taken.is_none() {
                break code;
            }
        };
        sqlx::query(
            "INSERT INTO device_codes (code, device_key, hostname, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&code)
        .bind(device_key.to_string())
        .bind(hostname)
        .bind(now as i64)
        .bind(expires_at as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Pairing {
            code,
            expires_at,
            status: DeviceCodeStatus::Pending,
            auth_key: None,
            network: None,
        })
    }

    /// A member approves a code into their network; the device becomes theirs.
    /// Returns the device's hostname.
    pub async fn approve_pairing(
        &self,
        ctx: &NetCtx,
        code: &str,
        now: u64,
    ) -> Result<String, AppError> {
        ctx.require(Role::Member)?;
        let code = normalize_code(code);
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let row: Option<(String, Option<i64>)> = sqlx::query_as(
            "SELECT hostname, approved_by FROM device_codes WHERE code = ? AND expires_at > ?",
        )
        .bind(&code)
        .bind(now as i64)
        .fetch_optional(&mut *tx)
        .await?;
        let (hostname, approved_by) = row
            .ok_or_else(|| AppError::NotFound(format!("no device is waiting with code {code}")))?;
        if approved_by.is_some() {
            return Err(AppError::Conflict(format!(
                "code {code} is already approved"
            )));
        }
        sqlx::query("UPDATE device_codes SET network_id = ?, approved_by = ? WHERE code = ?")
            .bind(ctx.id)
            .bind(ctx.user.id)
            .bind(&code)
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut tx,
            &ctx.who(),
            Change::new(
                ctx.id,
                "device.pairing_approved",
                format!("device-code:{code}"),
            )
            .to(format!("{hostname} for {}", ctx.user.username)),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(hostname)
    }

    /// A waiting device, as a member looking up its code sees it: its
    /// hostname and when the code expires.
    pub async fn waiting_device(
        &self,
        code: &str,
        now: u64,
    ) -> Result<(String, String, u64), AppError> {
        let code = normalize_code(code);
        let row: Option<(String, i64)> = sqlx::query_as(
            "SELECT hostname, expires_at FROM device_codes WHERE code = ? AND expires_at > ? AND approved_by IS NULL",
        )
        .bind(&code)
        .bind(now as i64)
        .fetch_optional(self.pool())
        .await?;
        let (hostname, expires_at) = row
            .ok_or_else(|| AppError::NotFound(format!("no device is waiting with code {code}")))?;
        Ok((code, hostname, expires_at as u64))
    }

    /// The device asks how its code stands. Once approved it gets a fresh
    /// single-use key (any key handed out before is revoked, so a lost
    /// answer costs nothing).
    pub async fn poll_pairing(
        &self,
        device_key: &DevicePublic,
        code: &str,
        now: u64,
    ) -> Result<Pairing, AppError> {
        let code = normalize_code(code);
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let row: Option<PairingRow> = sqlx::query_as(
            "SELECT expires_at, network_id, approved_by, preauth_key_id FROM device_codes \
             WHERE code = ? AND device_key = ? AND expires_at > ?",
        )
        .bind(&code)
        .bind(device_key.to_string())
        .bind(now as i64)
        .fetch_optional(&mut *tx)
        .await?;
        let (expires_at, network_id, approved_by, old_key) = row.ok_or_else(|| {
            AppError::NotFound(format!("no pairing {code} for this device (expired?)"))
        })?;
        let (Some(network_id), Some(user_id)) = (network_id, approved_by) else {
            tx.commit().await?;
            return Ok(Pairing {
                code,
                expires_at: expires_at as u64,
                status: DeviceCodeStatus::Pending,
                auth_key: None,
                network: None,
            });
        };
        if let Some(old) = old_key {
            sqlx::query("UPDATE preauth_keys SET revoked = 1 WHERE id = ?")
                .bind(old)
                .execute(&mut *tx)
                .await?;
        }
        let (key, key_id) = Self::insert_preauth_key(
            &mut tx,
            network_id,
            user_id,
            false,
            false,
            Some(expires_at as u64),
            now,
        )
        .await?;
        sqlx::query("UPDATE device_codes SET preauth_key_id = ? WHERE code = ?")
            .bind(key_id)
            .bind(&code)
            .execute(&mut *tx)
            .await?;
        let network = Self::network_name(&mut tx, network_id).await?;
        tx.commit().await?;
        Ok(Pairing {
            code,
            expires_at: expires_at as u64,
            status: DeviceCodeStatus::Approved,
            auth_key: Some(key),
            network: Some(network),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_typable() {
        let c = new_code();
        assert_eq!(c.len(), 9);
        assert!(c
            .chars()
            .all(|ch| ch == '-' || ALPHABET.contains(&(ch as u8))));
        assert_eq!(normalize_code("bcdf ghjk"), "BCDF-GHJK");
        assert_eq!(normalize_code("BCDF-GHJK"), "BCDF-GHJK");
        assert_eq!(normalize_code("12"), "");
    }
}
