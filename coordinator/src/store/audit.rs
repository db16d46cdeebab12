//! The audit log: one append-only row per change a person or the system
//! made, written in the same transaction as the change itself (so there is
//! never a change without its record, or a record of a change that rolled
//! back).

use platform::people::{Actor, AuditEvent};
use sqlx::SqliteConnection;

use super::Store;
use crate::error::AppError;

/// Who made a change, as the store records it: the actor, and for users
/// their id (members see the events they made themselves).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Who {
    pub user_id: Option<i64>,
    pub actor: Actor,
}

impl Who {
    pub fn user(id: i64, name: &str) -> Who {
        Who {
            user_id: Some(id),
            actor: Actor::User(name.to_owned()),
        }
    }

    pub fn device(name: &str) -> Who {
        Who {
            user_id: None,
            actor: Actor::Device(name.to_owned()),
        }
    }

    pub fn system() -> Who {
        Who {
            user_id: None,
            actor: Actor::System,
        }
    }
}

/// One change to record.
pub struct Change<'a> {
    pub network_id: i64,
    pub action: &'a str,
    pub target: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

impl<'a> Change<'a> {
    pub fn new(network_id: i64, action: &'a str, target: impl Into<String>) -> Self {
        Change {
            network_id,
            action,
            target: target.into(),
            old: None,
            new: None,
        }
    }

    pub fn from_to(mut self, old: impl Into<String>, new: impl Into<String>) -> Self {
        self.old = Some(old.into());
        self.new = Some(new.into());
        self
    }

    pub fn to(mut self, new: impl Into<String>) -> Self {
        self.new = Some(new.into());
        self
    }
}

/// Appends `change` inside the caller's transaction.
pub async fn record(
    conn: &mut SqliteConnection,
    who: &Who,
    change: Change<'_>,
    now: u64,
) -> Result<(), AppError> {
    let (kind, name) = match &who.actor {
        Actor::User(n) => ("user", Some(n.as_str())),
        Actor::Device(n) => ("device", Some(n.as_str())),
        Actor::System => ("system", None),
    };
    sqlx::query(
        "INSERT INTO audit_events (at, network_id, actor_kind, actor_id, actor_name, action, target, \
         old_value, new_value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(now as i64)
    .bind(change.network_id)
    .bind(kind)
    .bind(who.user_id)
    .bind(name)
    .bind(change.action)
    .bind(&change.target)
    .bind(&change.old)
    .bind(&change.new)
    .execute(conn)
    .await?;
    Ok(())
}

type EventRow = (
    i64,
    i64,
    String,
    String,
    Option<String>,
    String,
    String,
    Option<String>,
    Option<String>,
);

/// Which events to list.
pub struct AuditQuery {
    pub network_id: i64,
    /// Only events made by this user (what a non-admin may see).
    pub only_user: Option<i64>,
    pub since: Option<u64>,
    pub limit: u32,
}

impl Store {
    pub async fn audit_events(&self, q: &AuditQuery) -> Result<Vec<AuditEvent>, AppError> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT a.id, a.at, n.name, a.actor_kind, a.actor_name, a.action, a.target, a.old_value, \
             a.new_value FROM audit_events a JOIN networks n ON n.id = a.network_id \
             WHERE a.network_id = ? AND a.at >= ? AND (? IS NULL OR (a.actor_kind = 'user' AND a.actor_id = ?)) \
             ORDER BY a.id LIMIT ?",
        )
        .bind(q.network_id)
        .bind(q.since.unwrap_or(0).min(i64::MAX as u64) as i64)
        .bind(q.only_user)
        .bind(q.only_user)
        .bind(i64::from(q.limit))
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(id, at, network, kind, name, action, target, old, new)| AuditEvent {
                    id,
                    at: at as u64,
                    network,
                    actor: match (kind.as_str(), name) {
                        ("user", Some(n)) => Actor::User(n),
                        ("device", Some(n)) => Actor::Device(n),
                        _ => Actor::System,
                    },
                    action,
                    target,
                    old,
                    new,
                },
            )
            .collect())
    }
}
