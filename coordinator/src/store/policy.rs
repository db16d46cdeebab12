//! What the access policy and MagicDNS read from the database: a network's
//! policy text and DNS settings, and device tags. Every change is an audit
//! event, written in the same transaction.

use platform::netmap::DnsConfig;

use super::audit::{self, Change, Who};
use super::{DeviceRow, Store};
use crate::error::AppError;

/// The DNS settings an admin chooses for a network (the base domain is the
/// coordinator's). Stored as JSON on the network.
pub type DnsSettings = DnsConfig;

impl Store {
    /// The network's policy text; None while it runs the default.
    pub async fn policy_text(&self, network_id: i64) -> Result<Option<String>, AppError> {
        let (text,): (Option<String>,) = sqlx::query_as("SELECT policy FROM networks WHERE id = ?")
            .bind(network_id)
            .fetch_one(self.pool())
            .await?;
        Ok(text)
    }

    /// Replaces the network's policy; the audit event carries the diff.
    pub async fn set_policy(
        &self,
        who: &Who,
        network_id: i64,
        text: &str,
        diff: String,
        now: u64,
    ) -> Result<(), AppError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("UPDATE networks SET policy = ? WHERE id = ?")
            .bind(text)
            .bind(network_id)
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut tx,
            who,
            Change::new(network_id, "policy.set", format!("network:{network_id}")).to(diff),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn dns_settings(&self, network_id: i64) -> Result<DnsSettings, AppError> {
        let (text,): (String,) = sqlx::query_as("SELECT dns FROM networks WHERE id = ?")
            .bind(network_id)
            .fetch_one(self.pool())
            .await?;
        serde_json::from_str(&text).map_err(|e| {
            AppError::Internal(anyhow::anyhow!("stored DNS settings are invalid: {e}"))
        })
    }

    /// Replaces the network's DNS settings. Returns whether they changed.
    pub async fn set_dns_settings(
        &self,
        who: &Who,
        network_id: i64,
        settings: &DnsSettings,
        now: u64,
    ) -> Result<bool, AppError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let (old,): (String,) = sqlx::query_as("SELECT dns FROM networks WHERE id = ?")
            .bind(network_id)
            .fetch_one(&mut *tx)
            .await?;
        let new = serde_json::to_string(settings).map_err(anyhow::Error::from)?;
        if old == new {
            return Ok(false);
        }
        sqlx::query("UPDATE networks SET dns = ? WHERE id = ?")
            .bind(&new)
            .bind(network_id)
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut tx,
            who,
            Change::new(network_id, "dns.set", format!("network:{network_id}")).from_to(old, new),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Gives a device exactly these tags.
    pub async fn set_device_tags(
        &self,
        who: &Who,
        device: &DeviceRow,
        tags: &[String],
        now: u64,
    ) -> Result<DeviceRow, AppError> {
        let new = serde_json::to_string(tags).map_err(anyhow::Error::from)?;
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("UPDATE devices SET tags = ? WHERE id = ?")
            .bind(&new)
            .bind(device.id)
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut tx,
            who,
            Change::new(device.network_id, "device.tags", device.target())
                .from_to(device.tags.clone(), new),
            now,
        )
        .await?;
        tx.commit().await?;
        self.device(&device.network, device.id).await
    }
}
