//! Pre-auth keys: what authorises a device to join a network.

use platform::api::{CreatePreauthKey, CreatedPreauthKey, PreauthKeyInfo};

use super::audit::{self, Change, Who};
use super::people::UserRow;
use super::{random_secret, secret_hash, Store};
use crate::error::AppError;

/// The row of a pre-auth key, as registration checks it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PreauthRow {
    pub id: i64,
    pub network_id: i64,
    pub network: String,
    pub prefix: String,
    pub reusable: bool,
    pub ephemeral: bool,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked: bool,
    pub used_count: i64,
    /// Who made it: devices it registers are theirs.
    pub user_id: Option<i64>,
}

impl PreauthRow {
    pub fn info(&self) -> PreauthKeyInfo {
        PreauthKeyInfo {
            id: self.id,
            network: self.network.clone(),
            prefix: self.prefix.clone(),
            reusable: self.reusable,
            ephemeral: self.ephemeral,
            created_at: self.created_at as u64,
            expires_at: self.expires_at.map(|t| t as u64),
            revoked: self.revoked,
            used_count: self.used_count,
        }
    }
}

const SELECT_KEY: &str = "SELECT k.id, k.network_id, n.name AS network, k.prefix, k.reusable, \
     k.ephemeral, k.created_at, k.expires_at, k.revoked, k.used_count, k.user_id \
     FROM preauth_keys k JOIN networks n ON n.id = k.network_id";

impl Store {
    /// A key for `creator`'s devices in the network.
    pub async fn create_preauth_key(
        &self,
        network_id: i64,
        creator: &UserRow,
        req: &CreatePreauthKey,
        now: u64,
    ) -> Result<CreatedPreauthKey, AppError> {
        if req.expiry_secs == Some(0) {
            return Err(AppError::BadRequest(
                "expiry must be more than 0 seconds".into(),
            ));
        }
        let expires_at = match req.expiry_secs {
            Some(s) => Some(
                now.checked_add(s)
                    .filter(|t| *t <= i64::MAX as u64)
                    .ok_or_else(|| {
                        AppError::BadRequest("expiry is too far in the future".into())
                    })?,
            ),
            None => None,
        };
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let (key, id) = Self::insert_preauth_key(
            &mut tx,
            network_id,
            creator.id,
            req.reusable,
            req.ephemeral,
            expires_at,
            now,
        )
        .await?;
        if !req.tags.is_empty() {
            sqlx::query("UPDATE preauth_keys SET tags = ? WHERE id = ?")
                .bind(serde_json::to_string(&req.tags).map_err(anyhow::Error::from)?)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        let prefix: String = key.chars().take(16).collect();
        let network = Self::network_name(&mut tx, network_id).await?;
        audit::record(
            &mut tx,
            &creator.who(),
            Change::new(network_id, "key.created", format!("preauth-key:{id}")).to(format!(
                "reusable={} ephemeral={} expires_at={} tags={}",
                req.reusable,
                req.ephemeral,
                expires_at.map_or("never".into(), |t| t.to_string()),
                req.tags.join(",")
            )),
            now,
        )
        .await?;
        tx.commit().await?;
        let info = PreauthKeyInfo {
            id,
            network,
            prefix,
            reusable: req.reusable,
            ephemeral: req.ephemeral,
            created_at: now,
            expires_at,
            revoked: false,
            used_count: 0,
        };
        Ok(CreatedPreauthKey { key, info })
    }

    /// Stores a new key (inside the caller's transaction); returns the
    /// secret, shown once, and its id.
    pub(super) async fn insert_preauth_key(
        conn: &mut sqlx::SqliteConnection,
        network_id: i64,
        user_id: i64,
        reusable: bool,
        ephemeral: bool,
        expires_at: Option<u64>,
        now: u64,
    ) -> Result<(String, i64), AppError> {
        let key = random_secret("meshkey");
        let prefix: String = key.chars().take(16).collect();
        let id = sqlx::query(
            "INSERT INTO preauth_keys (network_id, key_hash, prefix, reusable, ephemeral, created_at, expires_at, user_id) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(network_id)
        .bind(secret_hash(&key))
        .bind(&prefix)
        .bind(reusable)
        .bind(ephemeral)
        .bind(now as i64)
        .bind(expires_at.map(|t| t as i64))
        .bind(user_id)
        .execute(conn)
        .await?
        .last_insert_rowid();
        Ok((key, id))
    }

    /// The network's keys; with `only_user`, just that user's.
    pub async fn list_preauth_keys(
        &self,
        network_id: i64,
        only_user: Option<i64>,
    ) -> Result<Vec<PreauthKeyInfo>, AppError> {
        let rows: Vec<PreauthRow> = sqlx::query_as(&format!(
            "{SELECT_KEY} WHERE k.network_id = ? AND (? IS NULL OR k.user_id = ?) ORDER BY k.id"
        ))
        .bind(network_id)
        .bind(only_user)
        .bind(only_user)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(PreauthRow::info).collect())
    }

    /// Revokes a key; with `only_user`, only one of that user's.
    pub async fn revoke_preauth_key(
        &self,
        who: &Who,
        network_id: i64,
        id: i64,
        only_user: Option<i64>,
        now: u64,
    ) -> Result<PreauthKeyInfo, AppError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let done = sqlx::query(
            "UPDATE preauth_keys SET revoked = 1 WHERE id = ? AND network_id = ? AND (? IS NULL OR user_id = ?)",
        )
        .bind(id)
        .bind(network_id)
        .bind(only_user)
        .bind(only_user)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(AppError::NotFound(format!(
                "no pre-auth key {id} of yours in this network"
            )));
        }
        audit::record(
            &mut tx,
            who,
            Change::new(network_id, "key.revoked", format!("preauth-key:{id}")),
            now,
        )
        .await?;
        tx.commit().await?;
        self.preauth_by_id(id).await
    }

    async fn preauth_by_id(&self, id: i64) -> Result<PreauthKeyInfo, AppError> {
        let row: PreauthRow = sqlx::query_as(&format!("{SELECT_KEY} WHERE k.id = ?"))
            .bind(id)
            .fetch_one(self.pool())
            .await?;
        Ok(row.info())
    }

    pub(super) async fn preauth_by_secret(
        conn: &mut sqlx::SqliteConnection,
        secret: &str,
    ) -> Result<Option<PreauthRow>, AppError> {
        Ok(
            sqlx::query_as(&format!("{SELECT_KEY} WHERE k.key_hash = ?"))
                .bind(secret_hash(secret))
                .fetch_optional(conn)
                .await?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;

    #[tokio::test]
    async fn create_list_revoke() {
        let (store, _d) = test_store().await;
        store.init(1).await.unwrap();
        let owner = store.first_user().await.unwrap();
        let net = store.create_network("home", &owner, 1).await.unwrap();
        let k = store
            .create_preauth_key(
                net.id,
                &owner,
                &CreatePreauthKey {
                    reusable: true,
                    ephemeral: false,
                    expiry_secs: Some(60),
                    tags: Vec::new(),
                },
                100,
            )
            .await
            .unwrap();
        assert!(k.key.starts_with(&k.info.prefix));
        assert_eq!(k.info.expires_at, Some(160));
        let listed = store.list_preauth_keys(net.id, None).await.unwrap();
        assert_eq!(listed, vec![k.info.clone()]);
        assert!(store
            .list_preauth_keys(net.id, Some(owner.id + 1))
            .await
            .unwrap()
            .is_empty());
        let who = owner.who();
        assert!(matches!(
            store
                .revoke_preauth_key(&who, net.id, k.info.id, Some(owner.id + 1), 1)
                .await,
            Err(AppError::NotFound(_))
        ));
        let revoked = store
            .revoke_preauth_key(&who, net.id, k.info.id, None, 1)
            .await
            .unwrap();
        assert!(revoked.revoked);
        assert!(matches!(
            store.revoke_preauth_key(&who, net.id, 999, None, 1).await,
            Err(AppError::NotFound(_))
        ));
        assert!(matches!(
            store
                .create_preauth_key(
                    net.id,
                    &owner,
                    &CreatePreauthKey {
                        expiry_secs: Some(u64::MAX),
                        ..Default::default()
                    },
                    1
                )
                .await,
            Err(AppError::BadRequest(_))
        ));
    }
}
