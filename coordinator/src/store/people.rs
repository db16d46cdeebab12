//! Users, their tokens, and their membership of networks.
//!
//! A user acts through a token (stored hashed). In a network they hold a
//! role; the network's creator is its owner. [`Store::network_for`] is the
//! one place that answers "may this user see this network at all": a network
//! they are not a member of does not exist for them (404, the same answer as
//! for a name nobody uses).

use platform::people::{Member, MemberStatus, Membership, Role, WhoAmI};
use sqlx::SqliteConnection;

use super::audit::{self, Change, Who};
use super::{is_unique_violation, random_secret, secret_hash, Store};
use crate::error::AppError;

/// Prefix of user tokens.
pub const TOKEN_PREFIX: &str = "meshtok";

#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct UserRow {
    pub id: i64,
    pub username: String,
    pub email: Option<String>,
}

impl UserRow {
    pub fn who(&self) -> Who {
        Who::user(self.id, &self.username)
    }
}

/// A network as one of its members sees it: the caller's role in it and the
/// network's rules.
#[derive(Clone, Debug)]
pub struct NetCtx {
    pub id: i64,
    pub name: String,
    pub user: UserRow,
    pub role: Role,
    pub owner: bool,
}

impl NetCtx {
    /// Refuses (403) unless the caller's role includes `needed`.
    pub fn require(&self, needed: Role) -> Result<(), AppError> {
        if self.role.at_least(needed) {
            Ok(())
        } else {
            Err(AppError::Forbidden(format!(
                "this needs the {needed} role in network {:?}; you are {}",
                self.name, self.role
            )))
        }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    pub fn who(&self) -> Who {
        self.user.who()
    }
}

/// Usernames are short and plain: they appear in netmaps and logs.
pub fn validate_username(name: &str) -> Result<(), AppError> {
    let ok = (1..=32).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(AppError::BadRequest(format!(
            "username {name:?} must be 1-32 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )))
    }
}

/// A minimal shape check: one `@`, something on both sides, no spaces.
/// (There is no mail server: addresses are labels an admin chose.)
pub fn normalize_email(email: &str) -> Result<String, AppError> {
    let e = email.trim().to_ascii_lowercase();
    let valid = e.len() <= 254
        && !e.chars().any(|c| c.is_whitespace() || c.is_control())
        && matches!(e.split_once('@'), Some((l, d)) if !l.is_empty() && d.contains('.') && !d.contains('@') && !d.starts_with('.') && !d.ends_with('.'));
    if valid {
        Ok(e)
    } else {
        Err(AppError::BadRequest(format!(
            "{email:?} is not an email address"
        )))
    }
}

fn role_of(text: &str) -> Result<Role, AppError> {
    text.parse()
        .map_err(|e: String| AppError::Internal(anyhow::anyhow!("stored role: {e}")))
}

fn status_of(text: &str) -> MemberStatus {
    if text == "active" {
        MemberStatus::Active
    } else {
        MemberStatus::Pending
    }
}

type MemberRow = (i64, String, Option<String>, String, String, i64, bool);

const SELECT_MEMBER: &str = "SELECT u.id, u.username, u.email, m.role, m.status, m.joined_at, \
     (n.owner_id = u.id) FROM members m JOIN users u ON u.id = m.user_id \
     JOIN networks n ON n.id = m.network_id";

fn to_member(
    (user_id, username, email, role, status, joined_at, owner): MemberRow,
) -> Result<Member, AppError> {
    Ok(Member {
        user_id,
        username,
        email,
        role: role_of(&role)?,
        owner,
        status: status_of(&status),
        joined_at: joined_at as u64,
    })
}

impl Store {
    /// Makes a user; the username (and email, if any) must be free.
    pub(crate) async fn insert_user(
        conn: &mut SqliteConnection,
        username: &str,
        email: Option<&str>,
        now: u64,
    ) -> Result<UserRow, AppError> {
        validate_username(username)?;
        let res = sqlx::query("INSERT INTO users (username, email, created_at) VALUES (?, ?, ?)")
            .bind(username)
            .bind(email)
            .bind(now as i64)
            .execute(conn)
            .await;
        match res {
            Ok(r) => Ok(UserRow {
                id: r.last_insert_rowid(),
                username: username.to_owned(),
                email: email.map(str::to_owned),
            }),
            Err(e) if is_unique_violation(&e) => Err(AppError::Conflict(format!(
                "the username {username:?} or that email is taken"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// A new token for the user, returned once (stored hashed).
    pub(crate) async fn insert_token(
        conn: &mut SqliteConnection,
        user_id: i64,
        now: u64,
    ) -> Result<String, AppError> {
        let token = random_secret(TOKEN_PREFIX);
        sqlx::query("INSERT INTO user_tokens (user_id, token_hash, created_at) VALUES (?, ?, ?)")
            .bind(user_id)
            .bind(secret_hash(&token))
            .bind(now as i64)
            .execute(conn)
            .await?;
        Ok(token)
    }

    /// Operator command: a new token for an existing user (e.g. one who lost
    /// theirs). Returned once.
    pub async fn create_user_token(&self, username: &str, now: u64) -> Result<String, AppError> {
        let user = self
            .user_by_name(username)
            .await?
            .ok_or_else(|| AppError::NotFound(format!("no user named {username:?}")))?;
        let mut conn = self.pool().acquire().await?;
        Self::insert_token(&mut conn, user.id, now).await
    }

    pub async fn user_by_token(&self, token: &str) -> Result<Option<UserRow>, AppError> {
        Ok(sqlx::query_as(
            "SELECT u.id, u.username, u.email FROM user_tokens t JOIN users u ON u.id = t.user_id \
             WHERE t.token_hash = ?",
        )
        .bind(secret_hash(token))
        .fetch_optional(self.pool())
        .await?)
    }

    pub async fn user_by_name(&self, username: &str) -> Result<Option<UserRow>, AppError> {
        Ok(
            sqlx::query_as("SELECT id, username, email FROM users WHERE username = ?")
                .bind(username)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// The first user (made by `coordinator init`).
    pub async fn first_user(&self) -> Result<UserRow, AppError> {
        sqlx::query_as("SELECT id, username, email FROM users ORDER BY id LIMIT 1")
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| AppError::Internal(anyhow::anyhow!("no users: run `coordinator init`")))
    }

    /// The network named `name` as `user` sees it. Not a member (or no such
    /// network): 404. A member still waiting for approval: 403.
    pub async fn network_for(&self, name: &str, user: &UserRow) -> Result<NetCtx, AppError> {
        let row: Option<(i64, String, String, bool)> = sqlx::query_as(
            "SELECT n.id, m.role, m.status, (n.owner_id = m.user_id) FROM networks n \
             JOIN members m ON m.network_id = n.id AND m.user_id = ? WHERE n.name = ?",
        )
        .bind(user.id)
        .bind(name)
        .fetch_optional(self.pool())
        .await?;
        let Some((id, role, status, owner)) = row else {
            return Err(AppError::NotFound(format!("no network named {name:?}")));
        };
        if status_of(&status) != MemberStatus::Active {
            return Err(AppError::Forbidden(format!(
                "your membership of network {name:?} is waiting for an admin's approval"
            )));
        }
        Ok(NetCtx {
            id,
            name: name.to_owned(),
            user: user.clone(),
            role: role_of(&role)?,
            owner,
        })
    }

    pub async fn whoami(&self, user: &UserRow) -> Result<WhoAmI, AppError> {
        let rows: Vec<(String, String, String, bool)> = sqlx::query_as(
            "SELECT n.name, m.role, m.status, (n.owner_id = m.user_id) FROM members m \
             JOIN networks n ON n.id = m.network_id WHERE m.user_id = ? ORDER BY n.name",
        )
        .bind(user.id)
        .fetch_all(self.pool())
        .await?;
        Ok(WhoAmI {
            user_id: user.id,
            username: user.username.clone(),
            email: user.email.clone(),
            memberships: rows
                .into_iter()
                .map(|(network, role, status, owner)| {
                    Ok(Membership {
                        network,
                        role: role_of(&role)?,
                        owner,
                        status: status_of(&status),
                    })
                })
                .collect::<Result<_, AppError>>()?,
        })
    }

    pub async fn list_members(&self, network_id: i64) -> Result<Vec<Member>, AppError> {
        let rows: Vec<MemberRow> = sqlx::query_as(&format!(
            "{SELECT_MEMBER} WHERE m.network_id = ? ORDER BY u.username"
        ))
        .bind(network_id)
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(to_member).collect()
    }

    pub async fn member(&self, network_id: i64, username: &str) -> Result<Member, AppError> {
        Self::member_in(&mut *self.pool().acquire().await?, network_id, username).await
    }

    async fn member_in(
        conn: &mut SqliteConnection,
        network_id: i64,
        username: &str,
    ) -> Result<Member, AppError> {
        let row: Option<MemberRow> = sqlx::query_as(&format!(
            "{SELECT_MEMBER} WHERE m.network_id = ? AND u.username = ?"
        ))
        .bind(network_id)
        .bind(username)
        .fetch_optional(conn)
        .await?;
        row.map(to_member).transpose()?.ok_or_else(|| {
            AppError::NotFound(format!("{username:?} is not a member of this network"))
        })
    }

    /// Adds a membership inside a transaction (invite redemption, network
    /// creation); an active member gets the network's initial grant.
    pub(crate) async fn insert_member(
        conn: &mut SqliteConnection,
        network_id: i64,
        user_id: i64,
        role: Role,
        status: MemberStatus,
        now: u64,
    ) -> Result<(), AppError> {
        let res = sqlx::query(
            "INSERT INTO members (network_id, user_id, role, status, joined_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(network_id)
        .bind(user_id)
        .bind(role.as_str())
        .bind(match status {
            MemberStatus::Active => "active",
            MemberStatus::Pending => "pending",
        })
        .bind(now as i64)
        .execute(&mut *conn)
        .await;
        match res {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(AppError::Conflict(
                    "already a member of this network".into(),
                ))
            }
            Err(e) => return Err(e.into()),
        }
        if status == MemberStatus::Active {
            Self::grant_initial(conn, network_id, user_id, now).await?;
        }
        Ok(())
    }

    /// An admin changes someone else's role. The owner keeps theirs, and the
    /// last admin cannot be demoted.
    pub async fn set_role(
        &self,
        ctx: &NetCtx,
        username: &str,
        role: Role,
        now: u64,
    ) -> Result<Member, AppError> {
        ctx.require(Role::Admin)?;
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let m = Self::member_in(&mut tx, ctx.id, username).await?;
        if m.user_id == ctx.user.id {
            return Err(AppError::Forbidden("nobody changes their own role".into()));
        }
        if m.owner {
            return Err(AppError::Forbidden(
                "the network's owner is always an admin".into(),
            ));
        }
        if m.role == role {
            return Ok(m);
        }
        if m.role == Role::Admin && Self::admin_count(&mut tx, ctx.id).await? <= 1 {
            return Err(AppError::Conflict(
                "the last admin cannot be demoted".into(),
            ));
        }
        sqlx::query("UPDATE members SET role = ? WHERE network_id = ? AND user_id = ?")
            .bind(role.as_str())
            .bind(ctx.id)
            .bind(m.user_id)
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut tx,
            &ctx.who(),
            Change::new(ctx.id, "member.role_changed", format!("user:{username}"))
                .from_to(m.role.as_str(), role.as_str()),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(Member { role, ..m })
    }

    /// A member's devices, as their peers see them now (after a role
    /// change, each is published again so peers learn the owner's role).
    pub async fn devices_of_member(
        &self,
        network_id: i64,
        user_id: i64,
    ) -> Result<Vec<super::DeviceRow>, AppError> {
        Self::devices_of_user(&mut *self.pool().acquire().await?, network_id, user_id).await
    }

    async fn admin_count(conn: &mut SqliteConnection, network_id: i64) -> Result<i64, AppError> {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM members WHERE network_id = ? AND role = 'admin' AND status = 'active'",
        )
        .bind(network_id)
        .fetch_one(conn)
        .await?;
        Ok(n)
    }

    /// An admin approves a pending member.
    pub async fn approve_member(
        &self,
        ctx: &NetCtx,
        username: &str,
        now: u64,
    ) -> Result<Member, AppError> {
        ctx.require(Role::Admin)?;
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let m = Self::member_in(&mut tx, ctx.id, username).await?;
        if m.status == MemberStatus::Active {
            return Err(AppError::Conflict(format!(
                "{username:?} is already active"
            )));
        }
        sqlx::query("UPDATE members SET status = 'active' WHERE network_id = ? AND user_id = ?")
            .bind(ctx.id)
            .bind(m.user_id)
            .execute(&mut *tx)
            .await?;
        Self::grant_initial(&mut tx, ctx.id, m.user_id, now).await?;
        audit::record(
            &mut tx,
            &ctx.who(),
            Change::new(ctx.id, "member.approved", format!("user:{username}"))
                .from_to("pending", "active"),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(Member {
            status: MemberStatus::Active,
            ..m
        })
    }

    /// Removes a member (an admin removing someone, or anyone leaving) and
    /// every device they own, whose keys go on the denylist. Returns the
    /// removed devices, for their peers to drop.
    pub async fn remove_member(
        &self,
        ctx: &NetCtx,
        username: &str,
        now: u64,
    ) -> Result<(Member, Vec<super::DeviceRow>), AppError> {
        let leaving = username == ctx.user.username;
        if !leaving {
            ctx.require(Role::Admin)?;
        }
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let m = Self::member_in(&mut tx, ctx.id, username).await?;
        if m.owner {
            return Err(AppError::Forbidden(
                "the network's owner cannot be removed".into(),
            ));
        }
        if m.role == Role::Admin
            && m.status == MemberStatus::Active
            && Self::admin_count(&mut tx, ctx.id).await? <= 1
        {
            return Err(AppError::Conflict("the last admin cannot leave".into()));
        }
        let devices = Self::devices_of_user(&mut tx, ctx.id, m.user_id).await?;
        for d in &devices {
            Self::denylist_device(&mut tx, d, "owner removed from the network", now).await?;
            Self::drop_device(&mut tx, d.id, now).await?;
        }
        sqlx::query("DELETE FROM members WHERE network_id = ? AND user_id = ?")
            .bind(ctx.id)
            .bind(m.user_id)
            .execute(&mut *tx)
            .await?;
        let action = if leaving {
            "member.left"
        } else {
            "member.removed"
        };
        audit::record(
            &mut tx,
            &ctx.who(),
            Change::new(ctx.id, action, format!("user:{username}")).from_to(
                m.role.as_str(),
                format!("removed with {} device(s)", devices.len()),
            ),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok((m, devices))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_and_emails() {
        assert!(validate_username("ann").is_ok());
        assert!(validate_username("a.b_c-1").is_ok());
        assert!(validate_username("").is_err());
        assert!(validate_username("-ann").is_err());
        assert!(validate_username("ann smith").is_err());
        assert!(validate_username(&"a".repeat(33)).is_err());
        assert_eq!(normalize_email(" Ann@Corp.COM ").unwrap(), "ann@corp.com");
        assert!(normalize_email("ann").is_err());
        assert!(normalize_email("ann@corp").is_err());
        assert!(normalize_email("a b@corp.com").is_err());
        assert!(normalize_email("@corp.com").is_err());
    }
}
