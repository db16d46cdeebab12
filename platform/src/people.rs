//! API types for the people of a network: users, their roles, invites and
//! approvals, device-code pairing, key rotation, settings and the audit log.
//!
//! Routes are under `/api/v1` (see the README's table); every body here is
//! JSON.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::keys::NodePublic;
use crate::signed::Timestamped;

/// What a member may do in a network, from most to least.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Invites and removes members, approves devices, changes settings,
    /// rotates keys, sees every log.
    Admin,
    /// Adds their own devices, runs workloads, sees their own usage.
    Member,
    /// Limited visibility: their own devices and events only; adds no devices.
    Guest,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Admin, Role::Member, Role::Guest];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
            Role::Guest => "guest",
        }
    }

    /// True when this role includes everything `other` may do.
    pub fn at_least(self, other: Role) -> bool {
        self <= other
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "member" => Ok(Role::Member),
            "guest" => Ok(Role::Guest),
            other => Err(format!("unknown role {other:?} (admin, member or guest)")),
        }
    }
}

/// Whether a member may act yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberStatus {
    /// Redeemed an invite; waits for an admin.
    Pending,
    Active,
}

/// One member of a network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub user_id: i64,
    pub username: String,
    pub email: Option<String>,
    pub role: Role,
    /// The network's creator; cannot be removed or demoted.
    pub owner: bool,
    pub status: MemberStatus,
    pub joined_at: u64,
}

/// `GET /api/v1/me`: who the token belongs to and where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmI {
    pub user_id: i64,
    pub username: String,
    pub email: Option<String>,
    pub memberships: Vec<Membership>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub network: String,
    pub role: Role,
    pub owner: bool,
    pub status: MemberStatus,
}

/// `POST /api/v1/networks/{net}/invites`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateInvite {
    pub role: Role,
    /// Lifetime in seconds; default 7 days.
    #[serde(default)]
    pub expiry_secs: Option<u64>,
    /// Only this user may redeem it.
    #[serde(default)]
    pub username: Option<String>,
    /// Only this address may redeem it; the network's auto-approval rules
    /// apply to it.
    #[serde(default)]
    pub email: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteInfo {
    pub id: i64,
    pub network: String,
    pub role: Role,
    /// The first characters of the secret, to tell invites apart.
    pub prefix: String,
    pub username: Option<String>,
    pub email: Option<String>,
    pub created_by: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub redeemed_by: Option<String>,
    pub revoked: bool,
}

/// Returned once, at creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedInvite {
    /// The share link: the coordinator URL with the one-time secret in it.
    pub link: String,
    pub secret: String,
    pub info: InviteInfo,
}

/// `POST /api/v1/invites/{secret}/redeem`. With a member token the caller
/// joins as themselves; without one a new user is made (and its token
/// returned once).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedeemInvite {
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redeemed {
    pub network: String,
    pub member: Member,
    /// A new user's token, shown only this once.
    pub token: Option<String>,
}

/// `PUT /api/v1/networks/{net}/members/{user}/role`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRole {
    pub role: Role,
}

/// Per-network rules for who gets in and for how long.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSettings {
    /// New devices get no peers until an admin approves them.
    pub require_device_approval: bool,
    /// Members invited at an address in these domains are approved at once.
    pub auto_approve_domains: Vec<String>,
    /// Members invited at these addresses are approved at once.
    pub auto_approve_emails: Vec<String>,
    /// Node keys expire this long after they are registered; 0: never.
    pub key_expiry_secs: u64,
}

/// Default node-key lifetime: 180 days.
pub const DEFAULT_KEY_EXPIRY_SECS: u64 = 180 * 24 * 3600;
/// Default invite lifetime: 7 days.
pub const DEFAULT_INVITE_EXPIRY_SECS: u64 = 7 * 24 * 3600;

/// `PATCH /api/v1/networks/{net}/settings`: the fields to change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsChange {
    #[serde(default)]
    pub require_device_approval: Option<bool>,
    #[serde(default)]
    pub auto_approve_domains: Option<Vec<String>>,
    #[serde(default)]
    pub auto_approve_emails: Option<Vec<String>>,
    #[serde(default)]
    pub key_expiry_secs: Option<u64>,
}

/// `PUT /api/v1/networks/{net}/devices/{id}/key-expiry`: a per-device
/// override of the network's lifetime (`null` returns to the network's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyExpiryOverride {
    /// Seconds from now; 0: never expires; null: the network's default.
    pub expiry_secs: Option<u64>,
}

/// Signed by the device key (domain [`crate::signed::DOMAIN_DEVICE_CODE`]):
/// starts device-code pairing (`POST /api/v1/device-codes`) or asks how it
/// stands (`POST /api/v1/device-codes/poll`, with `code`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCodeRequest {
    pub timestamp: u64,
    pub hostname: String,
    #[serde(default)]
    pub code: Option<String>,
}

impl Timestamped for DeviceCodeRequest {
    fn timestamp(&self) -> u64 {
        self.timestamp
    }
}

/// The answer to a device-code start or poll.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCode {
    /// Short, for a person to type: `BCDF-GHJK`.
    pub code: String,
    /// Where a member approves it.
    pub verification_url: String,
    pub expires_at: u64,
    pub status: DeviceCodeStatus,
    /// Once approved: a single-use key for this device's registration,
    /// given only to the device that started the pairing.
    #[serde(default)]
    pub auth_key: Option<String>,
    /// The network it was approved into.
    #[serde(default)]
    pub network: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceCodeStatus {
    Pending,
    Approved,
}

/// Signed by the device key (domain [`crate::signed::DOMAIN_ROTATE`]):
/// `POST /api/v1/rotate-key` replaces the device's node key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateKeyRequest {
    pub timestamp: u64,
    pub old_node_key: NodePublic,
    pub new_node_key: NodePublic,
    /// Proof of holding `new_node_key`'s private half
    /// ([`crate::control_auth::node_proof`], purpose `RotateKey`).
    pub node_proof: String,
}

impl Timestamped for RotateKeyRequest {
    fn timestamp(&self) -> u64 {
        self.timestamp
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateKeyResponse {
    pub node_key: NodePublic,
    pub key_expiry: Option<u64>,
}

/// A device waiting for an admin's approval, or revoked, as the admin API
/// shows it alongside the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    Active,
    AwaitingApproval,
    Revoked,
    KeyExpired,
}

/// A key that may not come back without an admin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenylistEntry {
    pub id: i64,
    pub network: String,
    /// `device` or `node`.
    pub kind: String,
    pub key: String,
    /// The device it belonged to.
    pub device_name: String,
    pub reason: String,
    pub created_at: u64,
}

/// Who did something: a user, or the coordinator itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum Actor {
    User(String),
    /// A device acting on itself (registration, key rotation).
    Device(String),
    System,
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::User(u) => write!(f, "user:{u}"),
            Actor::Device(d) => write!(f, "device:{d}"),
            Actor::System => f.write_str("system"),
        }
    }
}

/// One append-only audit record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub id: i64,
    pub at: u64,
    pub network: String,
    pub actor: Actor,
    /// `invite.created`, `member.approved`, `device.revoked`, …
    pub action: String,
    pub target: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::NodePrivate;

    fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) {
        let json = serde_json::to_string(v).unwrap();
        assert_eq!(&serde_json::from_str::<T>(&json).unwrap(), v, "{json}");
    }

    #[test]
    fn roles_order_and_parse() {
        assert!(Role::Admin.at_least(Role::Member));
        assert!(Role::Member.at_least(Role::Member));
        assert!(!Role::Guest.at_least(Role::Member));
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
            round_trip(&r);
        }
        assert!("owner".parse::<Role>().is_err());
    }

    #[test]
    fn bodies_round_trip() {
        round_trip(&CreateInvite {
            role: Role::Guest,
            expiry_secs: Some(60),
            username: None,
            email: Some("a@b.c".into()),
        });
        round_trip(&AuditEvent {
            id: 1,
            at: 2,
            network: "home".into(),
            actor: Actor::User("ann".into()),
            action: "member.role_changed".into(),
            target: "user:bob".into(),
            old: Some("member".into()),
            new: Some("admin".into()),
        });
        round_trip(&Actor::System);
        round_trip(&RotateKeyRequest {
            timestamp: 1,
            old_node_key: NodePrivate::generate().public(),
            new_node_key: NodePrivate::generate().public(),
            node_proof: "00".into(),
        });
        assert!(serde_json::from_str::<SettingsChange>(r#"{"bogus": 1}"#).is_err());
        let empty: RedeemInvite = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, RedeemInvite::default());
    }
}

/// `GET /api/v1/networks/{net}/policy`: the access policy as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDocument {
    /// The document (JSON with comments).
    pub policy: String,
    /// True while the network runs the default policy (none was set).
    pub default: bool,
}

/// `POST /api/v1/networks/{net}/policy/evaluate`: may `src` reach `dst`?
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvaluateRequest {
    /// A device name, user, tag, host name or address.
    pub src: String,
    /// `HOST:PORT`, HOST as for `src`.
    pub dst: String,
    /// `tcp` (default), `udp`, `icmp`, … or a number.
    #[serde(default)]
    pub proto: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evaluation {
    pub allowed: bool,
    /// The first rule that accepts it: its index in `acls` and its line.
    pub rule: Option<usize>,
    pub line: Option<usize>,
}

/// `PUT /api/v1/networks/{net}/devices/{id}/tags`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetTags {
    pub tags: Vec<String>,
}
