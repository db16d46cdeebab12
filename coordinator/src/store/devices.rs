//! Devices: registration, address allocation, endpoints, removal.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use platform::addr::{ipv4_for_seq, next_seq};
use platform::api::{Capabilities, DeviceInfo, RegisterRequest};
use platform::keys::{DevicePublic, NodePublic};
use platform::netmap::{Node, NodeKind};
use platform::people::DeviceState;

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
    pub user_id: Option<i64>,
    /// The owner's username.
    pub owner: Option<String>,
    /// False while the network waits for an admin to approve it.
    pub approved: bool,
    pub revoked_at: Option<i64>,
    pub key_expires_at: Option<i64>,
    pub key_expiry_override: Option<i64>,
    /// The owner's role in the device's network.
    pub owner_role: Option<String>,
    /// JSON array of `tag:NAME`.
    pub tags: String,
}

pub(super) const SELECT_DEVICE: &str =
    "SELECT d.id, d.network_id, n.name AS network, d.kind, d.device_key, \
     d.node_key, d.disco_key, d.hostname, d.name, d.os, d.ipv4, d.ipv6, d.endpoints, d.ephemeral, \
     d.created_at, d.last_seen, d.preauth_key_id, d.home_region, d.capabilities, d.user_id, \
     u.username AS owner, d.approved, d.revoked_at, d.key_expires_at, d.key_expiry_override, \
     m.role AS owner_role, d.tags \
     FROM devices d JOIN networks n ON n.id = d.network_id LEFT JOIN users u ON u.id = d.user_id \
     LEFT JOIN members m ON m.network_id = d.network_id AND m.user_id = d.user_id";

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

    pub fn tags(&self) -> Result<Vec<String>, AppError> {
        serde_json::from_str(&self.tags).map_err(|e| corrupt("tags", e))
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
            owner: self.owner.clone(),
            key_expiry: self.key_expiry(),
            device_key: match &self.device_key {
                Some(k) => Some(k.parse().map_err(|e| corrupt("device key", e))?),
                None => None,
            },
            owner_role: self.owner_role.as_deref().and_then(|r| r.parse().ok()),
            tags: self.tags()?,
        })
    }

    pub fn key_expiry(&self) -> Option<u64> {
        self.key_expires_at.map(|t| t.max(0) as u64)
    }

    pub fn key_expired(&self, now: u64) -> bool {
        self.key_expiry().is_some_and(|t| t <= now)
    }

    /// Whether peers may see and reach it.
    pub fn is_visible(&self, now: u64) -> bool {
        self.state(now) == DeviceState::Active
    }

    pub fn state(&self, now: u64) -> DeviceState {
        if self.revoked_at.is_some() {
            DeviceState::Revoked
        } else if !self.approved {
            DeviceState::AwaitingApproval
        } else if self.key_expired(now) {
            DeviceState::KeyExpired
        } else {
            DeviceState::Active
        }
    }

    /// How audit events name it.
    pub fn target(&self) -> String {
        format!("device:{}", self.name)
    }

    /// The device as the API shows it; its state (expired or not) as of
    /// `now`.
    pub fn to_info(&self, online: bool, now: u64) -> Result<DeviceInfo, AppError> {
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
            owner: self.owner.clone(),
            state: self.state(now),
            key_expiry: self.key_expiry(),
            tags: self.tags()?,
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

/// Node-key lifetime in seconds for a device (0: never).
pub(super) fn lifetime(device_override: Option<i64>, network: u64) -> u64 {
    device_override.map_or(network, |o| o.max(0) as u64)
}

/// When a key issued `now` with `lifetime` expires (NULL: never).
pub(super) fn expiry_at(now: u64, lifetime: u64) -> Option<i64> {
    (lifetime > 0).then(|| now.saturating_add(lifetime).min(i64::MAX as u64) as i64)
}

/// Limits on what a device may tell us about itself.
const MAX_HOSTNAME: usize = 255;
const MAX_OS: usize = 64;

/// What a registration must satisfy before the database is asked.
pub fn check_registration(req: &RegisterRequest) -> Result<(), AppError> {
    if req.hostname.len() > MAX_HOSTNAME || req.os.len() > MAX_OS {
        return Err(AppError::BadRequest("hostname or os is too long".into()));
    }
    req.capabilities
        .check()
        .map_err(|e| AppError::BadRequest(format!("capabilities: {e}")))
}

/// What registration did, for the caller to publish.
#[derive(Debug)]
pub struct Registered {
    pub row: DeviceRow,
    pub created: bool,
    /// The node key the device had before, when this registration replaced it.
    pub replaced_node_key: Option<NodePublic>,
}

/// Who vouches for a registering device: a pre-auth key or a member's token.
struct Voucher {
    network_id: i64,
    user_id: i64,
    username: String,
    admin: bool,
    key: Option<super::preauth::PreauthRow>,
}

impl Store {
    /// Registers a device (or re-registers a known one, keeping its id, name
    /// and addresses). Refuses denylisted and revoked devices.
    pub async fn register(&self, reg: &Registration, now: u64) -> Result<Registered, AppError> {
        let req = &reg.request;
        check_registration(req)?;
        let device_key = reg.device_key.to_string();
        // The auth key is checked on a plain read first: a flood of unknown
        // or dead keys never takes the write lock, so it cannot queue every
        // other writer behind it. It is checked again under the lock, as the
        // key may have been revoked or used up in between.
        Self::voucher(&mut *self.pool().acquire().await?, req, now).await?;
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let voucher = Self::voucher(&mut tx, req, now).await?;
        let existing: Option<DeviceRow> =
            sqlx::query_as(&format!("{SELECT_DEVICE} WHERE d.device_key = ?"))
                .bind(&device_key)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(dev) = &existing {
            if dev.network_id != voucher.network_id {
                return Err(AppError::Conflict(format!(
                    "this device is registered in network {:?}; remove it there first",
                    dev.network
                )));
            }
        }
        let network_name = Self::network_name(&mut tx, voucher.network_id).await?;
        let denied = Self::denied(
            &mut tx,
            voucher.network_id,
            &[&device_key, &req.node_key.to_string()],
        )
        .await?;
        if denied || existing.as_ref().is_some_and(|d| d.revoked_at.is_some()) {
            return Err(AppError::Forbidden(format!(
                "this device was removed or revoked in network {network_name:?}; an admin must re-approve it first"
            )));
        }
        let key_id = voucher.key.as_ref().map(|k| k.id);
        let same_device_reuse = existing
            .as_ref()
            .is_some_and(|d| key_id.is_some() && d.preauth_key_id == key_id);
        if let Some(key) = &voucher.key {
            if !key.reusable && key.used_count > 0 && !same_device_reuse {
                return Err(AppError::Forbidden(
                    "auth key is single-use and has already been used".into(),
                ));
            }
        }
        let ephemeral = voucher.key.as_ref().is_some_and(|k| k.ephemeral);
        let caps = serde_json::to_string(&req.capabilities).map_err(anyhow::Error::from)?;
        let rules = Self::settings_in(&mut tx, voucher.network_id).await?;
        let who = super::audit::Who::user(voucher.user_id, &voucher.username);

        let (id, replaced) = match &existing {
            Some(dev) => {
                let lifetime = lifetime(dev.key_expiry_override, rules.key_expiry_secs);
                let res = sqlx::query(
                    "UPDATE devices SET node_key = ?, disco_key = ?, hostname = ?, os = ?, capabilities = ?, \
                     preauth_key_id = ?, ephemeral = ?, last_seen = ?, user_id = ?, key_expires_at = ?, \
                     key_expiry_handled = 0, key_issued_at = ? WHERE id = ?",
                )
                .bind(req.node_key.to_string())
                .bind(req.disco_key.to_string())
                .bind(&req.hostname)
                .bind(&req.os)
                .bind(&caps)
                .bind(key_id)
                .bind(ephemeral)
                .bind(now as i64)
                .bind(voucher.user_id)
                .bind(expiry_at(now, lifetime))
                .bind(now as i64)
                .bind(dev.id)
                .execute(&mut *tx)
                .await;
                node_key_clash(res)?;
                super::audit::record(
                    &mut tx,
                    &who,
                    super::audit::Change::new(
                        voucher.network_id,
                        "device.reauthenticated",
                        dev.target(),
                    )
                    .to(format!("owner {}", voucher.username)),
                    now,
                )
                .await?;
                let old = dev.node_key()?;
                (dev.id, (old != req.node_key).then_some(old))
            }
            None => {
                let name =
                    Self::free_name(&mut tx, voucher.network_id, &dns_label(&req.hostname)).await?;
                let (seq, v4, v6) = self.next_addresses(&mut tx, now).await?;
                // An admin's word is approval enough.
                let approved = !rules.require_device_approval || voucher.admin;
                let res = sqlx::query(
                    "INSERT INTO devices (network_id, kind, device_key, node_key, disco_key, hostname, name, os, \
                     capabilities, addr_seq, ipv4, ipv6, ephemeral, preauth_key_id, created_at, last_seen, \
                     user_id, approved, key_expires_at, key_issued_at) \
                     VALUES (?, 'mesh', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(voucher.network_id)
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
                .bind(ephemeral)
                .bind(key_id)
                .bind(now as i64)
                .bind(now as i64)
                .bind(voucher.user_id)
                .bind(approved)
                .bind(expiry_at(now, rules.key_expiry_secs))
                .bind(now as i64)
                .execute(&mut *tx)
                .await;
                let id = node_key_clash(res)?.last_insert_rowid();
                if let Some(key_id) = key_id {
                    // Devices get the tags of the key they joined with.
                    sqlx::query(
                        "UPDATE devices SET tags = (SELECT tags FROM preauth_keys WHERE id = ?) WHERE id = ?",
                    )
                    .bind(key_id)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                }
                super::audit::record(
                    &mut tx,
                    &who,
                    super::audit::Change::new(
                        voucher.network_id,
                        "device.registered",
                        format!("device:{name}"),
                    )
                    .to(if approved {
                        "active"
                    } else {
                        "awaiting approval"
                    }),
                    now,
                )
                .await?;
                (id, None)
            }
        };
        if let (Some(key_id), false) = (key_id, same_device_reuse) {
            sqlx::query("UPDATE preauth_keys SET used_count = used_count + 1 WHERE id = ?")
                .bind(key_id)
                .execute(&mut *tx)
                .await?;
        }
        let row: DeviceRow = sqlx::query_as(&format!("{SELECT_DEVICE} WHERE d.id = ?"))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Registered {
            row,
            created: existing.is_none(),
            replaced_node_key: replaced,
        })
    }

    /// Checks the registration's auth key: a pre-auth key, or a member's
    /// token (with the network named when the member has several).
    async fn voucher(
        conn: &mut sqlx::SqliteConnection,
        req: &RegisterRequest,
        now: u64,
    ) -> Result<Voucher, AppError> {
        let (network_id, user_id, key) = if req
            .auth_key
            .starts_with(&format!("{}-", super::people::TOKEN_PREFIX))
        {
            let user: Option<(i64,)> =
                sqlx::query_as("SELECT user_id FROM user_tokens WHERE token_hash = ?")
                    .bind(super::secret_hash(&req.auth_key))
                    .fetch_optional(&mut *conn)
                    .await?;
            let (user_id,) =
                user.ok_or_else(|| AppError::Unauthorized("unknown auth key".into()))?;
            let nets: Vec<(i64, String)> = sqlx::query_as(
                "SELECT n.id, n.name FROM members m JOIN networks n ON n.id = m.network_id \
                 WHERE m.user_id = ? AND m.status = 'active' AND m.role != 'guest'",
            )
            .bind(user_id)
            .fetch_all(&mut *conn)
            .await?;
            let net = match (&req.network, nets.as_slice()) {
                (Some(want), _) => nets.iter().find(|(_, n)| n == want).ok_or_else(|| {
                    AppError::NotFound(format!(
                        "no network named {want:?} where you may add devices"
                    ))
                })?,
                (None, [only]) => only,
                (None, []) => {
                    return Err(AppError::Forbidden(
                        "you are not an active member or admin of any network".into(),
                    ))
                }
                (None, _) => {
                    return Err(AppError::BadRequest(
                        "you belong to several networks: name one".into(),
                    ))
                }
            };
            (net.0, user_id, None)
        } else {
            let key = Self::preauth_by_secret(conn, &req.auth_key)
                .await?
                .ok_or_else(|| AppError::Unauthorized("unknown auth key".into()))?;
            if key.revoked {
                return Err(AppError::Forbidden("auth key has been revoked".into()));
            }
            if key.expires_at.is_some_and(|t| t as u64 <= now) {
                return Err(AppError::Forbidden("auth key has expired".into()));
            }
            let user_id = key.user_id.ok_or_else(|| {
                AppError::Forbidden("auth key has no owner; create a new one".into())
            })?;
            if req.network.as_ref().is_some_and(|n| *n != key.network) {
                return Err(AppError::BadRequest(format!(
                    "this auth key is for network {:?}",
                    key.network
                )));
            }
            (key.network_id, user_id, Some(key))
        };
        // Whoever vouches must still be an active member who may add devices.
        let member: Option<(String, String)> = sqlx::query_as(
            "SELECT u.username, m.role FROM members m JOIN users u ON u.id = m.user_id \
             WHERE m.network_id = ? AND m.user_id = ? AND m.status = 'active'",
        )
        .bind(network_id)
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((username, role)) = member.filter(|(_, r)| r != "guest") else {
            return Err(AppError::Forbidden(
                "whoever issued this auth key may no longer add devices to the network".into(),
            ));
        };
        Ok(Voucher {
            network_id,
            user_id,
            username,
            admin: role == "admin",
            key,
        })
    }

    /// An admin adds a stock WireGuard device (theirs; approved by them).
    pub async fn add_wireguard_peer(
        &self,
        ctx: &super::NetCtx,
        peer: &NewWireguardPeer,
        now: u64,
    ) -> Result<DeviceRow, AppError> {
        let endpoints: Vec<SocketAddr> = peer.endpoint.into_iter().collect();
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        if Self::denied(&mut tx, ctx.id, &[&peer.node_key.to_string()]).await? {
            return Err(AppError::Forbidden(
                "this key was removed or revoked; lift its denylist entry first".into(),
            ));
        }
        let name = Self::free_name(&mut tx, ctx.id, &dns_label(&peer.name)).await?;
        let (seq, v4, v6) = self.next_addresses(&mut tx, now).await?;
        let res = sqlx::query(
            "INSERT INTO devices (network_id, kind, node_key, hostname, name, os, addr_seq, ipv4, ipv6, \
             endpoints, created_at, user_id) VALUES (?, 'wireguard', ?, ?, ?, 'wireguard', ?, ?, ?, ?, ?, ?)",
        )
        .bind(ctx.id)
        .bind(peer.node_key.to_string())
        .bind(&peer.name)
        .bind(&name)
        .bind(seq)
        .bind(v4.to_string())
        .bind(v6.to_string())
        .bind(serde_json::to_string(&endpoints).map_err(anyhow::Error::from)?)
        .bind(now as i64)
        .bind(ctx.user.id)
        .execute(&mut *tx)
        .await;
        let id = node_key_clash(res)?.last_insert_rowid();
        super::audit::record(
            &mut tx,
            &ctx.who(),
            super::audit::Change::new(ctx.id, "device.registered", format!("device:{name}"))
                .to("stock WireGuard peer"),
            now,
        )
        .await?;
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

    /// The lowest address no device holds and that is not in quarantine.
    async fn next_addresses(
        &self,
        conn: &mut sqlx::SqliteConnection,
        now: u64,
    ) -> Result<(i64, Ipv4Addr, Ipv6Addr), AppError> {
        let rested = now.saturating_sub(self.address_quarantine);
        sqlx::query("DELETE FROM released_addresses WHERE released_at <= ?")
            .bind(i64::try_from(rested).unwrap_or(i64::MAX))
            .execute(&mut *conn)
            .await?;
        // Addresses stay unique across networks: one host may run a device
        // in each of two networks, and its two interfaces must not clash.
        let taken: Vec<(i64,)> = sqlx::query_as(
            "SELECT addr_seq FROM devices UNION SELECT addr_seq FROM released_addresses ORDER BY 1",
        )
        .fetch_all(&mut *conn)
        .await?;
        let seq = lowest_free(taken.into_iter().map(|(t,)| t))
            .ok_or_else(|| AppError::Conflict("overlay address space is exhausted".into()))?;
        let v4 = ipv4_for_seq(seq).expect("next_seq yields usable slots");
        let ula: (String,) = sqlx::query_as("SELECT value FROM settings WHERE key = 'ula_prefix'")
            .fetch_one(&mut *conn)
            .await?;
        let ula: platform::addr::UlaPrefix = ula.0.parse().map_err(|e| corrupt("ULA prefix", e))?;
        Ok((i64::from(seq), v4, ula.address(seq)))
    }

    /// Deletes a device, first putting its address in quarantine as of
    /// `now`. Every path that removes a device goes through here.
    pub(super) async fn drop_device(
        conn: &mut sqlx::SqliteConnection,
        id: i64,
        now: u64,
    ) -> Result<(), AppError> {
        sqlx::query(
            "INSERT OR REPLACE INTO released_addresses (network_id, addr_seq, released_at) \
             SELECT network_id, addr_seq, ? FROM devices WHERE id = ?",
        )
        .bind(now as i64)
        .bind(id)
        .execute(&mut *conn)
        .await?;
        sqlx::query("DELETE FROM devices WHERE id = ?")
            .bind(id)
            .execute(&mut *conn)
            .await?;
        Ok(())
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

    /// Every ephemeral device, in every network.
    pub async fn ephemeral_devices(&self) -> Result<Vec<DeviceRow>, AppError> {
        Ok(sqlx::query_as(&format!(
            "{SELECT_DEVICE} WHERE d.ephemeral = 1 ORDER BY d.id"
        ))
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

    /// Which of `ids` still name a device that is neither removed nor
    /// revoked.
    pub async fn present_devices(
        &self,
        ids: &[i64],
    ) -> Result<std::collections::HashSet<i64>, AppError> {
        if ids.is_empty() {
            return Ok(Default::default());
        }
        let ids = serde_json::to_string(ids).map_err(anyhow::Error::from)?;
        let rows: Vec<(i64,)> = sqlx::query_as(
            "SELECT id FROM devices WHERE revoked_at IS NULL \
             AND id IN (SELECT value FROM json_each(?))",
        )
        .bind(ids)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Deletes a departed ephemeral device.
    pub async fn delete_device(&self, id: i64, now: u64) -> Result<(), AppError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        Self::drop_device(&mut tx, id, now).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The first usable sequence number not in `taken` (ascending).
fn lowest_free(taken: impl IntoIterator<Item = i64>) -> Option<u32> {
    let mut candidate = next_seq(0)?;
    for t in taken {
        match i64::from(candidate).cmp(&t) {
            std::cmp::Ordering::Equal => candidate = next_seq(candidate)?,
            std::cmp::Ordering::Less => break,
            std::cmp::Ordering::Greater => {}
        }
    }
    Some(candidate)
}

pub(super) fn node_key_clash(
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
                network: None,
                node_proof: String::new(),
            },
        }
    }

    #[tokio::test]
    async fn addresses_are_stable_and_names_unique() {
        let (store, _d) = test_store().await;
        store.init(0).await.unwrap();
        let owner = store.first_user().await.unwrap();
        let net = store.create_network("home", &owner, 0).await.unwrap();
        let key = store
            .create_preauth_key(
                net.id,
                &owner,
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
        let reg = store
            .register(&registration(&a, &key, "box"), 1)
            .await
            .unwrap();
        let (first, new) = (reg.row, reg.created);
        assert!(new);
        assert_eq!(first.ipv4, "100.64.0.1");
        let reg = store
            .register(&registration(&DevicePrivate::generate(), &key, "box"), 2)
            .await
            .unwrap();
        let (b, _) = (reg.row, reg.created);
        assert_eq!(b.name, "box-2");
        assert_eq!(b.ipv4, "100.64.0.2");
        let reg = store
            .register(&registration(&a, &key, "renamed"), 3)
            .await
            .unwrap();
        let (again, new) = (reg.row, reg.created);
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
        let owner = store.first_user().await.unwrap();
        let net = store.create_network("home", &owner, 0).await.unwrap();
        let key = store
            .create_preauth_key(net.id, &owner, &CreatePreauthKey::default(), 0)
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

    async fn reusable_key(store: &Store, network: &str) -> (i64, String) {
        let owner = store.first_user().await.unwrap();
        let net = store.create_network(network, &owner, 0).await.unwrap();
        let key = store
            .create_preauth_key(
                net.id,
                &owner,
                &CreatePreauthKey {
                    reusable: true,
                    ..Default::default()
                },
                0,
            )
            .await
            .unwrap()
            .key;
        (net.id, key)
    }

    #[test]
    fn lowest_free_fills_gaps_and_skips_unusable_slots() {
        assert_eq!(lowest_free([]), Some(1));
        assert_eq!(lowest_free([1, 2, 4]), Some(3));
        assert_eq!(lowest_free([1, 2, 3]), Some(4));
        let full: Vec<i64> = (1..=254).collect();
        assert_eq!(
            lowest_free(full),
            Some(257),
            ".255 and .256 are not handed out"
        );
    }

    #[tokio::test]
    async fn addresses_are_lowest_free_and_quarantined() {
        let (store, _d) = crate::store::test_store_with(&crate::store::StoreOptions {
            address_quarantine: std::time::Duration::from_secs(100),
            ..Default::default()
        })
        .await;
        store.init(0).await.unwrap();
        let owner = store.first_user().await.unwrap();
        let (home_id, home) = reusable_key(&store, "home").await;
        let (_, work) = reusable_key(&store, "work").await;
        let ctx = store.network_for("home", &owner).await.unwrap();
        let mut ids = Vec::new();
        for (i, host) in ["a", "b", "c"].into_iter().enumerate() {
            let reg = store
                .register(&registration(&DevicePrivate::generate(), &home, host), 1)
                .await
                .unwrap();
            assert_eq!(reg.row.ipv4, format!("100.64.0.{}", i + 1));
            ids.push(reg.row.id);
        }
        let first_at_work = store
            .register(&registration(&DevicePrivate::generate(), &work, "w"), 1)
            .await
            .unwrap();
        assert_eq!(
            first_at_work.row.ipv4, "100.64.0.4",
            "addresses are unique across networks"
        );

        store
            .remove_device(&ctx.who(), home_id, ids[2], 10)
            .await
            .unwrap();
        let d = store
            .register(&registration(&DevicePrivate::generate(), &home, "d"), 20)
            .await
            .unwrap();
        assert_eq!(d.row.ipv4, "100.64.0.5", "a removed device's address rests");
        let e = store
            .register(&registration(&DevicePrivate::generate(), &home, "e"), 109)
            .await
            .unwrap();
        assert_eq!(e.row.ipv4, "100.64.0.6", "still in quarantine 99 s later");
        let f = store
            .register(&registration(&DevicePrivate::generate(), &home, "f"), 110)
            .await
            .unwrap();
        assert_eq!(
            f.row.ipv4, "100.64.0.3",
            "after the quarantine the lowest free address is used again"
        );

        // Removal by another process (a bare DELETE) still quarantines.
        sqlx::query("DELETE FROM devices WHERE id = ?")
            .bind(ids[0])
            .execute(store.pool())
            .await
            .unwrap();
        let g = store
            .register(&registration(&DevicePrivate::generate(), &home, "g"), 120)
            .await
            .unwrap();
        assert_eq!(g.row.ipv4, "100.64.0.7");
    }

    #[tokio::test]
    async fn bad_credentials_never_wait_for_the_write_lock() {
        let (store, _d) = crate::store::test_store_with(&crate::store::StoreOptions {
            busy_timeout: std::time::Duration::from_millis(50),
            ..Default::default()
        })
        .await;
        store.init(0).await.unwrap();
        reusable_key(&store, "home").await;
        // Another writer holds the database's write lock.
        let mut writer = store.pool().begin_with("BEGIN IMMEDIATE").await.unwrap();
        sqlx::query("UPDATE settings SET value = value")
            .execute(&mut *writer)
            .await
            .unwrap();
        let err = store
            .register(
                &registration(&DevicePrivate::generate(), "meshkey-nope", "x"),
                1,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, AppError::Unauthorized(_)),
            "refused for its key, not stuck behind the lock: {err:?}"
        );
        let node = NodePrivate::generate().public();
        let refused = store
            .rotate_node_key(&DevicePrivate::generate().public(), &node, &node, 1)
            .await;
        assert!(
            matches!(refused, Err(AppError::Unauthorized(_))),
            "{:?}",
            refused.err()
        );
        writer.rollback().await.unwrap();
    }
}
