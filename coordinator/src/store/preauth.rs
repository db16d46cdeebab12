//! Pre-auth keys: what authorises a device to join a network.

use platform::api::{CreatePreauthKey, CreatedPreauthKey, PreauthKeyInfo};

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
     k.ephemeral, k.created_at, k.expires_at, k.revoked, k.used_count \
     FROM preauth_keys k JOIN networks n ON n.id = k.network_id";

impl Store {
    pub async fn create_preauth_key(
        &self,
        network: &str,
        req: &CreatePreauthKey,
        now: u64,
    ) -> Result<CreatedPreauthKey, AppError> {
        let net = self.network(network).await?;
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
        let key = random_secret("meshkey");
        let prefix: String = key.chars().take(16).collect();
        let id = sqlx::query(
            "INSERT INTO preauth_keys (network_id, key_hash, prefix, reusable, ephemeral, created_at, expires_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(net.id)
        .bind(secret_hash(&key))
        .bind(&prefix)
        .bind(req.reusable)
        .bind(req.ephemeral)
        .bind(now as i64)
        .bind(expires_at.map(|t| t as i64))
        .execute(self.pool())
        .await?
        .last_insert_rowid();
        let info = PreauthKeyInfo {
            id,
            network: net.name,
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

    pub async fn list_preauth_keys(&self, network: &str) -> Result<Vec<PreauthKeyInfo>, AppError> {
        let net = self.network(network).await?;
        let rows: Vec<PreauthRow> = sqlx::query_as(&format!(
            "{SELECT_KEY} WHERE k.network_id = ? ORDER BY k.id"
        ))
        .bind(net.id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(PreauthRow::info).collect())
    }

    pub async fn revoke_preauth_key(
        &self,
        network: &str,
        id: i64,
    ) -> Result<PreauthKeyInfo, AppError> {
        let net = self.network(network).await?;
        let done =
            sqlx::query("UPDATE preauth_keys SET revoked = 1 WHERE id = ? AND network_id = ?")
                .bind(id)
                .bind(net.id)
                .execute(self.pool())
                .await?;
        if done.rows_affected() == 0 {
            return Err(AppError::NotFound(format!(
                "no pre-auth key {id} in network {network:?}"
            )));
        }
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
        store.create_network("home", 1).await.unwrap();
        let k = store
            .create_preauth_key(
                "home",
                &CreatePreauthKey {
                    reusable: true,
                    ephemeral: false,
                    expiry_secs: Some(60),
                },
                100,
            )
            .await
            .unwrap();
        assert!(k.key.starts_with(&k.info.prefix));
        assert_eq!(k.info.expires_at, Some(160));
        let listed = store.list_preauth_keys("home").await.unwrap();
        assert_eq!(listed, vec![k.info.clone()]);
        let revoked = store.revoke_preauth_key("home", k.info.id).await.unwrap();
        assert!(revoked.revoked);
        assert!(matches!(
            store.revoke_preauth_key("home", 999).await,
            Err(AppError::NotFound(_))
        ));
        assert!(matches!(
            store
                .create_preauth_key("nope", &CreatePreauthKey::default(), 1)
                .await,
            Err(AppError::NotFound(_))
        ));
        assert!(matches!(
            store
                .create_preauth_key(
                    "home",
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
