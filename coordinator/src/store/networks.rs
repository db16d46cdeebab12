//! Networks: private trust scopes.

use platform::api::Network;

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

impl Store {
    pub async fn create_network(&self, name: &str, now: u64) -> Result<Network, AppError> {
        validate_network_name(name)?;
        let res = sqlx::query("INSERT INTO networks (name, created_at) VALUES (?, ?)")
            .bind(name)
            .bind(now as i64)
            .execute(self.pool())
            .await;
        match res {
            Ok(r) => Ok(Network {
                id: r.last_insert_rowid(),
                name: name.to_owned(),
                created_at: now,
                device_count: 0,
            }),
            Err(e) if is_unique_violation(&e) => Err(AppError::Conflict(format!(
                "network {name:?} already exists"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn list_networks(&self) -> Result<Vec<Network>, AppError> {
        let rows: Vec<NetworkRow> = sqlx::query_as(&format!("{SELECT_NETWORK} ORDER BY n.name"))
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;

    #[tokio::test]
    async fn create_list_show() {
        let (store, _d) = test_store().await;
        store.create_network("home", 5).await.unwrap();
        store.create_network("lab", 6).await.unwrap();
        assert!(matches!(
            store.create_network("home", 7).await,
            Err(AppError::Conflict(_))
        ));
        assert!(matches!(
            store.create_network("Bad Name", 7).await,
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
