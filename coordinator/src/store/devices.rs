//! Devices: registration, address allocation, endpoints, removal.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use platform::addr::{ipv4_for_seq, next_seq};
use platform::api::{Capabilities, DeviceInfo, RegisterRequest};
use platform::keys::{DevicePublic, NodePublic};
use platform::netmap::{Node, NodeKind};

use super::{is_unique_violation, Store};
use crate::error::AppError;
use crate::names::{dns_label, unique_name};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeviceRow {
    pub id: i64,
    pub network_id: i64,
    pub network: String,
    pub kind: String,
    pub device_key: Option<String>,
    pub node_key: String,
    pub disco_key: Option<String>,
    pub hostname: String,
    pub name: String,
    pub os: String,
    pub ipv4: String,
    pub ipv6: String,
    pub endpoints: String,
    pub ephemeral: bool,
    pub created_at: i64,
    pub last_seen: Option<i64>,
    pub preauth_key_id: Option<i64>,
    pub home_region: Option<i64>,
    /// JSON; `{}` until the device reports.
    pub capabilities: String,
}

const SELECT_DEVICE: &str = "SELECT d.id, d.network_id, n.name AS network, d.kind, d.device_key, \
     d.node_key, d.disco_key, d.hostname, d.name, d.os, d.ipv4, d.ipv6, d.endpoints, d.ephemeral, \
     d.created_at, d.last_seen, d.preauth_key_id, d.home_region, d.capabilities FROM devices d JOIN networks n ON n.id = d.network_id";

fn corrupt(what: &str, e: impl std::fmt::Display) -> AppError {
    AppError::Internal(anyhow::anyhow!("stored {what} is invalid: {e}"))
}

impl DeviceRow {
    pub fn node_key(&self) -> Result<NodePublic, AppError> {
        self.node_key.parse().map_err(|e| corrupt("node key", e))
    }

    pub fn addresses(&self) -> Result<Vec<IpAddr>, AppError> {
        let v4: Ipv4Addr = self.ipv4.parse().map_err(|e| corrupt("ipv4", e))?;
        let v6: Ipv6Addr = self.ipv6.parse().map_err(|e| corrupt("ipv6", e))?;
        Ok(vec![IpAddr::V4(v4), IpAddr::V6(v6)])
    }

    pub fn endpoints(&self) -> Result<Vec<SocketAddr>, AppError> {
        serde_json::from_str(&self.endpoints).map_err(|e| corrupt("endpoints", e))
    }

    pub fn capabilities(&self) -> Result<Option<Capabilities>, AppError> {
        if self.capabilities == "{}" {
            return Ok(None);
        }
        serde_json::from_str(&self.capabilities)
            .map(Some)
            .map_err(|e| corrupt("capabilities", e))
    }

    pub fn kind(&self) -> NodeKind {
        if self.kind == "wireguard" {
            NodeKind::Wireguard
        } else {
            NodeKind::Mesh
        }
    }

    pub fn to_node(&self, online: bool) -> Result<Node, AppError> {
        Ok(Node {
            id: self.id,
            name: self.name.clone(),
            kind: self.kind(),
            node_key: self.node_key()?,
            disco_key: match &self.disco_key {
                Some(k) => Some(k.parse().map_err(|e| corrupt("disco key", e))?),
                None => None,
            },
            addresses: self.addresses()?,
            endpoints: self.endpoints()?,
            online,
            os: self.os.clone(),
            home_region: self.home_region.and_then(|r| u32::try_from(r).ok()),
            // A report this version cannot read is left out, not fatal to
            // the whole netmap.
            capabilities: self.capabilities().ok().flatten().map(Box::new),
        })
    }

    pub fn to_info(&self, online: bool) -> Result<DeviceInfo, AppError> {
        Ok(DeviceInfo {
            id: self.id,
            network: self.network.clone(),
            name: self.name.clone(),
            hostname: self.hostname.clone(),
            kind: self.kind(),
            node_key: self.node_key()?,
            addresses: self.addresses()?,
            endpoints: self.endpoints()?,
            os: self.os.clone(),
            ephemeral: self.ephemeral,
            online,
            created_at: self.created_at as u64,
            last_seen: self.last_seen.map(|t| t as u64),
            capabilities: self.capabilities().ok().flatten(),
        })
    }
}

/// A verified registration request.
pub struct Registration {
    pub device_key: DevicePublic,
    pub request: RegisterRequest,
}

/// A stock WireGuard device to add.
pub struct NewWireguardPeer {
    pub name: String,
    pub node_key: NodePublic,
    pub endpoint: Option<SocketAddr>,
}

/// Limits on what a device may tell us about itself.
const MAX_HOSTNAME: usize = 255;
const MAX_OS: usize = 64;

impl Store {
    /// Registers a device (or re-registers a known one, keeping its id, name
    /// and addresses). Returns the row and whether it is new.
    pub async fn register(
        &self,
        reg: &Registration,
        now: u64,
    ) -> Result<(DeviceRow, bool), AppError> {
        let req = &reg.request;
        if req.hostname.len() > MAX_HOSTNAME || req.os.len() > MAX_OS {
            return Err(AppError::BadRequest("hostname or os is too long".into()));
        }
        req.capabilities
            .check()
            .map_err(|e| AppError::BadRequest(format!("capabilities: {e}")))?;
        let device_key = reg.device_key.to_string();
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let key = Self::preauth_by_secret(&mut tx, &req.auth_key)
            .await?
            .ok_or_else(|| AppError::Unauthorized("unknown auth key".into()))?;
        if key.revoked {
            return Err(AppError::Forbidden("auth key has been revoked".into()));
        }
        if key.expires_at.is_some_and(|t| t as u64 <= now) {
            return Err(AppError::Forbidden("auth key has expired".into()));
        }
        let existing: Option<DeviceRow> =
            sqlx::query_as(&format!("{SELECT_DEVICE} WHERE d.device_key = ?"))
                .bind(&device_key)
                .fetch_optional(&mut *tx)
                .await?;
        let same_device_reuse = existing
            .as_ref()
            .is_some_and(|d| d.preauth_key_id == Some(key.id));
        if !key.reusable && key.used_count > 0 && !same_device_reuse {
            return Err(AppError::Forbidden(
                "auth key is single-use and has already been used".into(),
            ));
        }
        let caps = serde_json::to_string(&req.capabilities).map_err(anyhow::Error::from)?;

        let id = match &existing {
            Some(dev) => {
                if dev.network_id != key.network_id {
                    return Err(AppError::Conflict(format!(
                        "this device is registered in network {:?}; remove it there first",
                        dev.network
                    )));
                }
                let res = sqlx::query(
                    "UPDATE devices SET node_key = ?, disco_key = ?, hostname = ?, os = ?, capabilities = ?, \
                     preauth_key_id = ?, ephemeral = ?, last_seen = ? WHERE id = ?",
                )
                .bind(req.node_key.to_string())
                .bind(req.disco_key.to_string())
                .bind(&req.hostname)
                .bind(&req.os)
                .bind(&caps)
                .bind(key.id)
                .bind(key.ephemeral)
                .bind(now as i64)
                .bind(dev.id)
                .execute(&mut *tx)
                .await;
                node_key_clash(res)?;
                dev.id
            }
            None => {
                let name =
                    Self::free_name(&mut tx, key.network_id, &dns_label(&req.hostname)).await?;
                let (seq, v4, v6) = self.next_addresses(&mut tx).await?;
                let res = sqlx::query(
                    "INSERT INTO devices (network_id, kind, device_key, node_key, disco_key, hostname, name, os, \
                     capabilities, addr_seq, ipv4, ipv6, ephemeral, preauth_key_id, created_at, last_seen) \
                     VALUES (?, 'mesh', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(key.network_id)
                .bind(&device_key)
                .bind(req.node_key.to_string())
                .bind(req.disco_key.to_string())
                .bind(&req.hostname)
                .bind(&name)
                .bind(&req.os)
                .bind(&caps)
                .bind(seq)
                .bind(v4.to_string())
                .bind(v6.to_string())
                .bind(key.ephemeral)
                .bind(key.id)
                .bind(now as i64)
                .bind(now as i64)
                .execute(&mut *tx)
                .await;
                node_key_clash(res)?.last_insert_rowid()
            }
        };
        if !same_device_reuse {
            sqlx::query("UPDATE preauth_keys SET used_count = used_count + 1 WHERE id = ?")
                .bind(key.id)
                .execute(&mut *tx)
                .await?;
        }
        let row: DeviceRow = sqlx::query_as(&format!("{SELECT_DEVICE} WHERE d.id = ?"))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((row, existing.is_none()))
    }

    pub async fn add_wireguard_peer(
        &self,
        network: &str,
        peer: &NewWireguardPeer,
        now: u64,
    ) -> Result<DeviceRow, AppError> {
        let net = self.network(network).await?;
        let endpoints: Vec<SocketAddr> = peer.endpoint.into_iter().collect();
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let name = Self::free_name(&mut tx, net.id, &dns_label(&peer.name)).await?;
        let (seq, v4, v6) = self.next_addresses(&mut tx).await?;
        let res = sqlx::query(
            "INSERT INTO devices (network_id, kind, node_key, hostname, name, os, addr_seq, ipv4, ipv6, \
             endpoints, created_at) VALUES (?, 'wireguard', ?, ?, ?, 'wireguard', ?, ?, ?, ?, ?)",
        )
        .bind(net.id)
        .bind(peer.node_key.to_string())
        .bind(&peer.name)
        .bind(&name)
        .bind(seq)
        .bind(v4.to_string())
        .bind(v6.to_string())
        .bind(serde_json::to_string(&endpoints).map_err(anyhow::Error::from)?)
        .bind(now as i64)
        .execute(&mut *tx)
        .await;
        let id = node_key_clash(res)?.last_insert_rowid();
        let row: DeviceRow = sqlx::query_as(&format!("{SELECT_DEVICE} WHERE d.id = ?"))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(row)
    }

    async fn free_name(
        conn: &mut sqlx::SqliteConnection,
        network_id: i64,
        base: &str,
    ) -> Result<String, AppError> {
        let taken: Vec<(String,)> = sqlx::query_as(
            "SELECT name FROM devices WHERE network_id = ? AND (name = ? OR name LIKE ? || '-%')",
        )
        .bind(network_id)
        .bind(base)
        .bind(base)
        .fetch_all(conn)
        .await?;
        Ok(unique_name(base, |n| taken.iter().any(|(t,)| t == n)))
    }

    async fn next_addresses(
        &self,
        conn: &mut sqlx::SqliteConnection,
    ) -> Result<(i64, Ipv4Addr, Ipv6Addr), AppError> {
        let (max,): (Option<i64>,) = sqlx::query_as("SELECT MAX(addr_seq) FROM devices")
            .fetch_one(&mut *conn)
            .await?;
        let last = u32::try_from(max.unwrap_or(0)).map_err(|e| corrupt("addr_seq", e))?;
        let seq = next_seq(last)
            .ok_or_else(|| AppError::Conflict("overlay address space is exhausted".into()))?;
        let v4 = ipv4_for_seq(seq).expect("next_seq yields usable slots");
        let ula: (String,) = sqlx::query_as("SELECT value FROM settings WHERE key = 'ula_prefix'")
            .fetch_one(&mut *conn)
            .await?;
        let ula: platform::addr::UlaPrefix = ula.0.parse().map_err(|e| corrupt("ULA prefix", e))?;
        Ok((i64::from(seq), v4, ula.address(seq)))
    }

    pub async fn device_by_device_key(
        &self,
        key: &DevicePublic,
    ) -> Result<Option<DeviceRow>, AppError> {
        Ok(
            sqlx::query_as(&format!("{SELECT_DEVICE} WHERE d.device_key = ?"))
                .bind(key.to_string())
                .fetch_optional(self.pool())
                .await?,
        )
    }

    pub async fn device(&self, network: &str, id: i64) -> Result<DeviceRow, AppError> {
        sqlx::query_as(&format!("{SELECT_DEVICE} WHERE d.id = ? AND n.name = ?"))
            .bind(id)
            .bind(network)
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| AppError::NotFound(format!("no device {id} in network {network:?}")))
    }

    pub async fn network_devices(&self, network_id: i64) -> Result<Vec<DeviceRow>, AppError> {
        Ok(sqlx::query_as(&format!(
            "{SELECT_DEVICE} WHERE d.network_id = ? ORDER BY d.id"
        ))
        .bind(network_id)
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn set_endpoints(&self, id: i64, endpoints: &[SocketAddr]) -> Result<(), AppError> {
        sqlx::query("UPDATE devices SET endpoints = ? WHERE id = ?")
            .bind(serde_json::to_string(endpoints).map_err(anyhow::Error::from)?)
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    pub async fn set_disco_key(
        &self,
        id: i64,
        key: &platform::keys::DiscoPublic,
    ) -> Result<(), AppError> {
        sqlx::query("UPDATE devices SET disco_key = ? WHERE id = ?")
            .bind(key.to_string())
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    pub async fn set_capabilities(&self, id: i64, caps: &Capabilities) -> Result<(), AppError> {
        sqlx::query("UPDATE devices SET capabilities = ? WHERE id = ?")
            .bind(serde_json::to_string(caps).map_err(anyhow::Error::from)?)
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    pub async fn set_home_region(&self, id: i64, region: u32) -> Result<(), AppError> {
        sqlx::query("UPDATE devices SET home_region = ? WHERE id = ?")
            .bind(i64::from(region))
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    pub async fn device_by_node_key(
        &self,
        key: &NodePublic,
    ) -> Result<Option<DeviceRow>, AppError> {
        Ok(
            sqlx::query_as(&format!("{SELECT_DEVICE} WHERE d.node_key = ?"))
                .bind(key.to_string())
                .fetch_optional(self.pool())
                .await?,
        )
    }

    pub async fn touch(&self, id: i64, now: u64) -> Result<(), AppError> {
        sqlx::query("UPDATE devices SET last_seen = ? WHERE id = ?")
            .bind(now as i64)
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    pub async fn delete_device(&self, id: i64) -> Result<(), AppError> {
        sqlx::query("DELETE FROM devices WHERE id = ?")
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}

fn node_key_clash(
    res: Result<sqlx::sqlite::SqliteQueryResult, sqlx::Error>,
) -> Result<sqlx::sqlite::SqliteQueryResult, AppError> {
    match res {
        Err(e) if is_unique_violation(&e) => Err(AppError::Conflict(
            "this node key is already used by another device".into(),
        )),
        other => Ok(other?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;
    use platform::api::{Capabilities, CreatePreauthKey};
    use platform::keys::{DevicePrivate, DiscoPrivate, NodePrivate};

    fn registration(dev: &DevicePrivate, auth_key: &str, host: &str) -> Registration {
        Registration {
            device_key: dev.public(),
            request: RegisterRequest {
                timestamp: 0,
                auth_key: auth_key.into(),
                node_key: NodePrivate::generate().public(),
                disco_key: DiscoPrivate::generate().public(),
                hostname: host.into(),
                os: "linux".into(),
                capabilities: Capabilities::default(),
            },
        }
    }

    #[tokio::test]
    async fn addresses_are_stable_and_names_unique() {
        let (store, _d) = test_store().await;
        store.init(0).await.unwrap();
        store.create_network("home", 0).await.unwrap();
        let key = store
            .create_preauth_key(
                "home",
                &CreatePreauthKey {
                    reusable: true,
                    ..Default::default()
                },
                0,
            )
            .await
            .unwrap()
            .key;
        let a = DevicePrivate::generate();
        let (first, new) = store
            .register(&registration(&a, &key, "box"), 1)
            .await
            .unwrap();
        assert!(new);
        assert_eq!(first.ipv4, "100.64.0.1");
        let (b, _) = store
            .register(&registration(&DevicePrivate::generate(), &key, "box"), 2)
            .await
            .unwrap();
        assert_eq!(b.name, "box-2");
        assert_eq!(b.ipv4, "100.64.0.2");
        let (again, new) = store
            .register(&registration(&a, &key, "renamed"), 3)
            .await
            .unwrap();
        assert!(!new);
        assert_eq!(
            (again.id, &again.name, &again.ipv4, &again.ipv6),
            (first.id, &first.name, &first.ipv4, &first.ipv6)
        );
        assert_ne!(
            again.node_key, first.node_key,
            "node key rotates on re-registration"
        );
    }

    #[tokio::test]
    async fn single_use_keys() {
        let (store, _d) = test_store().await;
        store.init(0).await.unwrap();
        store.create_network("home", 0).await.unwrap();
        let key = store
            .create_preauth_key("home", &CreatePreauthKey::default(), 0)
            .await
            .unwrap()
            .key;
        let a = DevicePrivate::generate();
        store
            .register(&registration(&a, &key, "a"), 1)
            .await
            .unwrap();
        // The same device may come back with its own key…
        store
            .register(&registration(&a, &key, "a"), 2)
            .await
            .unwrap();
        // …another may not use it.
        let err = store
            .register(&registration(&DevicePrivate::generate(), &key, "b"), 3)
            .await
            .unwrap_err();
        assert!(matches!(err, AppError::Forbidden(_)), "{err:?}");
    }
}
