//! Networks: private trust scopes.

use platform::api::Network;
use platform::people::{MemberStatus, NetworkSettings, Role, SettingsChange};
use sqlx::SqliteConnection;

use super::audit::{self, Change, Who};
use super::people::{normalize_email, UserRow};
use super::{is_unique_violation, Store};
use crate::error::AppError;

/// Network names are DNS labels: they become part of device names.
pub fn validate_network_name(name: &str) -> Result<(), AppError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(AppError::BadRequest(format!(
            "network name {name:?} must be 1-63 lowercase letters, digits or inner hyphens"
        )))
    }
}

type NetworkRow = (i64, String, i64, i64);

const SELECT_NETWORK: &str = "SELECT n.id, n.name, n.created_at, \
     (SELECT COUNT(*) FROM devices d WHERE d.network_id = n.id) FROM networks n";

fn to_network((id, name, created_at, device_count): NetworkRow) -> Network {
    Network {
        id,
        name,
        created_at: created_at as u64,
        device_count,
    }
}

type SettingsRow = (bool, String, String, i64);

fn parse_list(what: &str, text: &str) -> Result<Vec<String>, AppError> {
    serde_json::from_str(text)
        .map_err(|e| AppError::Internal(anyhow::anyhow!("stored {what} is invalid: {e}")))
}

/// Largest lists an admin may set (they are checked on every redemption).
const MAX_AUTO_APPROVE: usize = 256;

fn check_settings(s: &NetworkSettings) -> Result<(), AppError> {
    if s.auto_approve_domains.len() + s.auto_approve_emails.len() > MAX_AUTO_APPROVE {
        return Err(AppError::BadRequest(format!(
            "at most {MAX_AUTO_APPROVE} auto-approve domains and addresses"
        )));
    }
    for d in &s.auto_approve_domains {
        normalize_email(&format!("x@{d}"))
            .map_err(|_| AppError::BadRequest(format!("{d:?} is not a domain")))?;
    }
    for e in &s.auto_approve_emails {
        normalize_email(e)?;
    }
    if s.key_expiry_secs > i64::MAX as u64 / 2 {
        return Err(AppError::BadRequest("key_expiry_secs is too large".into()));
    }
    Ok(())
}

impl Store {
    /// Creates a network owned by `owner`, who becomes its first admin.
    pub async fn create_network(
        &self,
        name: &str,
        owner: &UserRow,
        now: u64,
    ) -> Result<Network, AppError> {
        validate_network_name(name)?;
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let res = sqlx::query("INSERT INTO networks (name, created_at, owner_id) VALUES (?, ?, ?)")
            .bind(name)
            .bind(now as i64)
            .bind(owner.id)
            .execute(&mut *tx)
            .await;
        let id = match res {
            Ok(r) => r.last_insert_rowid(),
            Err(e) if is_unique_violation(&e) => {
                return Err(AppError::Conflict(format!(
                    "network {name:?} already exists"
                )))
            }
            Err(e) => return Err(e.into()),
        };
        Self::insert_member(
            &mut tx,
            id,
            owner.id,
            Role::Admin,
            MemberStatus::Active,
            now,
        )
        .await?;
        audit::record(
            &mut tx,
            &owner.who(),
            Change::new(id, "network.created", format!("network:{name}"))
                .to(format!("owner {}", owner.username)),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(Network {
            id,
            name: name.to_owned(),
            created_at: now,
            device_count: 0,
        })
    }

    /// Every network (operator commands on the state directory).
    pub async fn list_networks(&self) -> Result<Vec<Network>, AppError> {
        let rows: Vec<NetworkRow> = sqlx::query_as(&format!("{SELECT_NETWORK} ORDER BY n.name"))
            .fetch_all(self.pool())
            .await?;
        Ok(rows.into_iter().map(to_network).collect())
    }

    /// The networks where `user` is an active member.
    pub async fn networks_of(&self, user: &UserRow) -> Result<Vec<Network>, AppError> {
        let rows: Vec<NetworkRow> = sqlx::query_as(&format!(
            "{SELECT_NETWORK} JOIN members m ON m.network_id = n.id \
             WHERE m.user_id = ? AND m.status = 'active' ORDER BY n.name"
        ))
        .bind(user.id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(to_network).collect())
    }

    pub async fn network(&self, name: &str) -> Result<Network, AppError> {
        let row: Option<NetworkRow> = sqlx::query_as(&format!("{SELECT_NETWORK} WHERE n.name = ?"))
            .bind(name)
            .fetch_optional(self.pool())
            .await?;
        row.map(to_network)
            .ok_or_else(|| AppError::NotFound(format!("no network named {name:?}")))
    }

    /// The network's owner (operator commands act as them).
    pub async fn network_owner(&self, network_id: i64) -> Result<UserRow, AppError> {
        sqlx::query_as(
            "SELECT u.id, u.username, u.email FROM networks n JOIN users u ON u.id = n.owner_id WHERE n.id = ?",
        )
        .bind(network_id)
        .fetch_optional(self.pool())
        .await?
        .ok_or_else(|| AppError::Internal(anyhow::anyhow!("network {network_id} has no owner")))
    }

    pub(super) async fn settings_in(
        conn: &mut SqliteConnection,
        network_id: i64,
    ) -> Result<NetworkSettings, AppError> {
        let (approval, domains, emails, expiry): SettingsRow = sqlx::query_as(
            "SELECT require_device_approval, auto_approve_domains, auto_approve_emails, key_expiry_secs \
             FROM networks WHERE id = ?",
        )
        .bind(network_id)
        .fetch_one(conn)
        .await?;
        Ok(NetworkSettings {
            require_device_approval: approval,
            auto_approve_domains: parse_list("auto-approve domains", &domains)?,
            auto_approve_emails: parse_list("auto-approve emails", &emails)?,
            key_expiry_secs: expiry.max(0) as u64,
        })
    }

    pub async fn settings(&self, network_id: i64) -> Result<NetworkSettings, AppError> {
        Self::settings_in(&mut *self.pool().acquire().await?, network_id).await
    }

    /// Applies a change to a network's settings; each changed field is an
    /// audit event with its old and new value.
    pub async fn change_settings(
        &self,
        who: &Who,
        network_id: i64,
        change: &SettingsChange,
        now: u64,
    ) -> Result<NetworkSettings, AppError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let old = Self::settings_in(&mut tx, network_id).await?;
        let mut new = old.clone();
        if let Some(v) = change.require_device_approval {
            new.require_device_approval = v;
        }
        if let Some(v) = &change.auto_approve_domains {
            new.auto_approve_domains = v.iter().map(|d| d.trim().to_ascii_lowercase()).collect();
        }
        if let Some(v) = &change.auto_approve_emails {
            new.auto_approve_emails = v
                .iter()
                .map(|e| normalize_email(e))
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = change.key_expiry_secs {
            new.key_expiry_secs = v;
        }
        check_settings(&new)?;
        let json = |v: &Vec<String>| serde_json::to_string(v).map_err(anyhow::Error::from);
        sqlx::query(
            "UPDATE networks SET require_device_approval = ?, auto_approve_domains = ?, \
             auto_approve_emails = ?, key_expiry_secs = ? WHERE id = ?",
        )
        .bind(new.require_device_approval)
        .bind(json(&new.auto_approve_domains)?)
        .bind(json(&new.auto_approve_emails)?)
        .bind(new.key_expiry_secs as i64)
        .bind(network_id)
        .execute(&mut *tx)
        .await?;
        let fields = [
            (
                "require_device_approval",
                old.require_device_approval.to_string(),
                new.require_device_approval.to_string(),
            ),
            (
                "auto_approve_domains",
                json(&old.auto_approve_domains)?,
                json(&new.auto_approve_domains)?,
            ),
            (
                "auto_approve_emails",
                json(&old.auto_approve_emails)?,
                json(&new.auto_approve_emails)?,
            ),
            (
                "key_expiry_secs",
                old.key_expiry_secs.to_string(),
                new.key_expiry_secs.to_string(),
            ),
        ];
        for (field, before, after) in fields {
            if before != after {
                audit::record(
                    &mut tx,
                    who,
                    Change::new(network_id, "settings.changed", format!("setting:{field}"))
                        .from_to(before, after),
                    now,
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;

    #[tokio::test]
    async fn create_list_show() {
        let (store, _d) = test_store().await;
        store.init(1).await.unwrap();
        let owner = store.first_user().await.unwrap();
        store.create_network("home", &owner, 5).await.unwrap();
        store.create_network("lab", &owner, 6).await.unwrap();
        assert!(matches!(
            store.create_network("home", &owner, 7).await,
            Err(AppError::Conflict(_))
        ));
        assert!(matches!(
            store.create_network("Bad Name", &owner, 7).await,
            Err(AppError::BadRequest(_))
        ));
        let names: Vec<_> = store
            .list_networks()
            .await
            .unwrap()
            .into_iter()
            .map(|n| n.name)
            .collect();
        assert_eq!(names, ["home", "lab"]);
        assert_eq!(store.network("lab").await.unwrap().created_at, 6);
        assert!(matches!(
            store.network("nope").await,
            Err(AppError::NotFound(_))
        ));
    }
}
