//! Invites: how people join a network. A share link carries a one-time
//! secret (stored hashed) and a role fixed by the admin who made it; an
//! invite may be addressed to one username or email. Redeeming makes the
//! user a member, pending an admin's approval unless the network approves
//! the invite's address at once.

use platform::people::{
    CreateInvite, InviteInfo, Member, MemberStatus, NetworkSettings, RedeemInvite, Redeemed, Role,
    DEFAULT_INVITE_EXPIRY_SECS,
};

use super::audit::{self, Change};
use super::people::{normalize_email, validate_username, NetCtx, UserRow};
use super::{random_secret, secret_hash, Store};
use crate::error::AppError;

/// Prefix of invite secrets.
pub const INVITE_PREFIX: &str = "meshinv";
/// Longest an invite may live: 90 days.
const MAX_INVITE_SECS: u64 = 90 * 24 * 3600;

#[derive(Debug, Clone, sqlx::FromRow)]
struct InviteRow {
    id: i64,
    network_id: i64,
    network: String,
    prefix: String,
    role: String,
    username: Option<String>,
    email: Option<String>,
    created_by: String,
    created_at: i64,
    expires_at: i64,
    redeemed_by: Option<String>,
    revoked: bool,
}

const SELECT_INVITE: &str = "SELECT i.id, i.network_id, n.name AS network, i.prefix, i.role, \
     i.username, i.email, c.username AS created_by, i.created_at, i.expires_at, \
     r.username AS redeemed_by, i.revoked FROM invites i JOIN networks n ON n.id = i.network_id \
     JOIN users c ON c.id = i.created_by LEFT JOIN users r ON r.id = i.redeemed_by";

impl InviteRow {
    fn info(&self) -> Result<InviteInfo, AppError> {
        Ok(InviteInfo {
            id: self.id,
            network: self.network.clone(),
            role: self
                .role
                .parse()
                .map_err(|e: String| AppError::Internal(anyhow::anyhow!(e)))?,
            prefix: self.prefix.clone(),
            username: self.username.clone(),
            email: self.email.clone(),
            created_by: self.created_by.clone(),
            created_at: self.created_at as u64,
            expires_at: self.expires_at as u64,
            redeemed_by: self.redeemed_by.clone(),
            revoked: self.revoked,
        })
    }
}

/// Whether the network approves a member invited at `email` at once.
pub fn auto_approved(rules: &NetworkSettings, email: Option<&str>) -> bool {
    let Some(email) = email else { return false };
    if rules.auto_approve_emails.iter().any(|e| e == email) {
        return true;
    }
    email
        .rsplit_once('@')
        .is_some_and(|(_, domain)| rules.auto_approve_domains.iter().any(|d| d == domain))
}

impl Store {
    /// An admin makes an invite; returns the secret (shown once) and it.
    pub async fn create_invite(
        &self,
        ctx: &NetCtx,
        req: &CreateInvite,
        now: u64,
    ) -> Result<(String, InviteInfo), AppError> {
        ctx.require(Role::Admin)?;
        let secs = req.expiry_secs.unwrap_or(DEFAULT_INVITE_EXPIRY_SECS);
        if secs == 0 || secs > MAX_INVITE_SECS {
            return Err(AppError::BadRequest(format!(
                "invite expiry must be between 1 second and {} days",
                MAX_INVITE_SECS / 86400
            )));
        }
        if let Some(u) = &req.username {
            validate_username(u)?;
        }
        let email = req.email.as_deref().map(normalize_email).transpose()?;
        let secret = random_secret(INVITE_PREFIX);
        let prefix: String = secret.chars().take(16).collect();
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let id = sqlx::query(
            "INSERT INTO invites (network_id, secret_hash, prefix, role, username, email, created_by, \
             created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(ctx.id)
        .bind(secret_hash(&secret))
        .bind(&prefix)
        .bind(req.role.as_str())
        .bind(&req.username)
        .bind(&email)
        .bind(ctx.user.id)
        .bind(now as i64)
        .bind((now + secs) as i64)
        .execute(&mut *tx)
        .await?
        .last_insert_rowid();
        let addressed = req
            .username
            .clone()
            .or(email.clone())
            .unwrap_or_else(|| "anyone with the link".into());
        audit::record(
            &mut tx,
            &ctx.who(),
            Change::new(ctx.id, "invite.created", format!("invite:{id}"))
                .to(format!("role {} for {addressed}", req.role)),
            now,
        )
        .await?;
        let row: InviteRow = sqlx::query_as(&format!("{SELECT_INVITE} WHERE i.id = ?"))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((secret, row.info()?))
    }

    pub async fn list_invites(&self, ctx: &NetCtx) -> Result<Vec<InviteInfo>, AppError> {
        ctx.require(Role::Admin)?;
        let rows: Vec<InviteRow> = sqlx::query_as(&format!(
            "{SELECT_INVITE} WHERE i.network_id = ? ORDER BY i.id"
        ))
        .bind(ctx.id)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(InviteRow::info).collect()
    }

    pub async fn revoke_invite(
        &self,
        ctx: &NetCtx,
        id: i64,
        now: u64,
    ) -> Result<InviteInfo, AppError> {
        ctx.require(Role::Admin)?;
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let done = sqlx::query("UPDATE invites SET revoked = 1 WHERE id = ? AND network_id = ?")
            .bind(id)
            .bind(ctx.id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(AppError::NotFound(format!(
                "no invite {id} in this network"
            )));
        }
        audit::record(
            &mut tx,
            &ctx.who(),
            Change::new(ctx.id, "invite.revoked", format!("invite:{id}")),
            now,
        )
        .await?;
        let row: InviteRow = sqlx::query_as(&format!("{SELECT_INVITE} WHERE i.id = ?"))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        row.info()
    }

    pub async fn invite_by_secret(&self, secret: &str) -> Result<InviteInfo, AppError> {
        let row: Option<InviteRow> =
            sqlx::query_as(&format!("{SELECT_INVITE} WHERE i.secret_hash = ?"))
                .bind(secret_hash(secret))
                .fetch_optional(self.pool())
                .await?;
        row.ok_or_else(|| AppError::NotFound("no such invite".into()))?
            .info()
    }

    /// Redeems an invite: as `caller` when they have a token, else as a new
    /// user named in `body` (whose token is returned once).
    pub async fn redeem_invite(
        &self,
        secret: &str,
        caller: Option<&UserRow>,
        body: &RedeemInvite,
        now: u64,
    ) -> Result<Redeemed, AppError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let (secret_id,): (i64,) = sqlx::query_as("SELECT id FROM invites WHERE secret_hash = ?")
            .bind(secret_hash(secret))
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| AppError::NotFound("no such invite".into()))?;
        let inv: InviteRow = sqlx::query_as(&format!("{SELECT_INVITE} WHERE i.id = ?"))
            .bind(secret_id)
            .fetch_one(&mut *tx)
            .await?;
        if inv.revoked {
            return Err(AppError::Forbidden("this invite has been revoked".into()));
        }
        if inv.redeemed_by.is_some() {
            return Err(AppError::Forbidden(
                "this invite has already been used".into(),
            ));
        }
        if inv.expires_at as u64 <= now {
            return Err(AppError::Forbidden("this invite has expired".into()));
        }
        let (user, token) = match caller {
            Some(u) => {
                if inv.username.as_ref().is_some_and(|n| *n != u.username)
                    || inv
                        .email
                        .as_ref()
                        .is_some_and(|e| u.email.as_ref() != Some(e))
                {
                    return Err(AppError::Forbidden(
                        "this invite is addressed to someone else".into(),
                    ));
                }
                (u.clone(), None)
            }
            None => {
                let username = match (&inv.username, &body.username) {
                    (Some(fixed), Some(asked)) if fixed != asked => {
                        return Err(AppError::Forbidden(
                            "this invite is addressed to someone else".into(),
                        ))
                    }
                    (Some(fixed), _) => fixed.clone(),
                    (None, Some(asked)) => asked.clone(),
                    (None, None) => {
                        return Err(AppError::BadRequest(
                            "choose a username (or redeem with your token)".into(),
                        ))
                    }
                };
                let asked_email = body.email.as_deref().map(normalize_email).transpose()?;
                let email = match (&inv.email, asked_email) {
                    (Some(fixed), Some(asked)) if *fixed != asked => {
                        return Err(AppError::Forbidden(
                            "this invite is addressed to someone else".into(),
                        ))
                    }
                    (Some(fixed), _) => Some(fixed.clone()),
                    (None, asked) => asked,
                };
                let user = Self::insert_user(&mut tx, &username, email.as_deref(), now).await?;
                let token = Self::insert_token(&mut tx, user.id, now).await?;
                (user, Some(token))
            }
        };
        let rules = Self::settings_in(&mut tx, inv.network_id).await?;
        // Only the address the admin wrote into the invite is trusted: a
        // redeemer's own claim is not verified by anything.
        let status = if auto_approved(&rules, inv.email.as_deref()) {
            MemberStatus::Active
        } else {
            MemberStatus::Pending
        };
        let role: Role = inv
            .role
            .parse()
            .map_err(|e: String| AppError::Internal(anyhow::anyhow!(e)))?;
        Self::insert_member(&mut tx, inv.network_id, user.id, role, status, now).await?;
        sqlx::query("UPDATE invites SET redeemed_by = ?, redeemed_at = ? WHERE id = ?")
            .bind(user.id)
            .bind(now as i64)
            .bind(inv.id)
            .execute(&mut *tx)
            .await?;
        let state = match status {
            MemberStatus::Active => "active (auto-approved)",
            MemberStatus::Pending => "pending approval",
        };
        audit::record(
            &mut tx,
            &user.who(),
            Change::new(
                inv.network_id,
                "invite.redeemed",
                format!("invite:{}", inv.id),
            )
            .to(format!("{} joined as {role}, {state}", user.username)),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(Redeemed {
            network: inv.network,
            member: Member {
                user_id: user.id,
                username: user.username,
                email: user.email,
                role,
                owner: false,
                status,
                joined_at: now,
            },
            token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_approval_trusts_listed_domains_and_addresses() {
        let rules = NetworkSettings {
            require_device_approval: false,
            auto_approve_domains: vec!["corp.com".into()],
            auto_approve_emails: vec!["friend@else.org".into()],
            key_expiry_secs: 0,
        };
        assert!(auto_approved(&rules, Some("ann@corp.com")));
        assert!(auto_approved(&rules, Some("friend@else.org")));
        assert!(!auto_approved(&rules, Some("ann@evilcorp.com")));
        assert!(!auto_approved(&rules, Some("ann@corp.com.evil.net")));
        assert!(!auto_approved(&rules, Some("other@else.org")));
        assert!(!auto_approved(&rules, None));
    }
}
