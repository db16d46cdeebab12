//! A network's compute rules (who may run what, credit rates, scheduler
//! weights): stored as JSON on the network, validated on the way in, every
//! changed field an audit event.

use platform::jobs::ComputeRules;
use serde_json::Value;
use sqlx::SqliteConnection;

use super::audit::{self, Change, Who};
use super::Store;
use crate::error::AppError;

/// Why rules are unusable, naming the field where it can: unknown fields
/// (a typo would otherwise silently keep a default), then the rates' and
/// weights' own checks.
pub fn check_rules(given: &Value) -> Result<ComputeRules, AppError> {
    if !given.is_object() {
        return Err(AppError::BadRequest(
            "compute rules are a JSON object".into(),
        ));
    }
    let rules: ComputeRules = serde_json::from_value(given.clone())
        .map_err(|e| AppError::BadRequest(format!("compute rules: {e}")))?;
    let known = leaves(&serde_json::to_value(&rules).map_err(anyhow::Error::from)?);
    if let Some((path, _)) = leaves(given)
        .into_iter()
        .find(|(p, _)| !known.iter().any(|(k, _)| k == p))
    {
        return Err(AppError::BadRequest(format!(
            "compute rules: unknown field {path}"
        )));
    }
    rules
        .rates
        .check()
        .map_err(|e| AppError::BadRequest(format!("compute rules: rates: {e}")))?;
    rules
        .weights
        .check()
        .map_err(|e| AppError::BadRequest(format!("compute rules: weights: {e}")))?;
    Ok(rules)
}

/// Every leaf of a JSON value by its dotted path (arrays are leaves).
fn leaves(v: &Value) -> Vec<(String, String)> {
    fn walk(v: &Value, path: String, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, child) in m {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(child, p, out);
                }
            }
            other if !path.is_empty() => out.push((path, other.to_string())),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, String::new(), &mut out);
    out
}

fn corrupt(e: serde_json::Error) -> AppError {
    AppError::Internal(anyhow::anyhow!("stored compute rules are invalid: {e}"))
}

impl Store {
    pub(super) async fn compute_rules_in(
        conn: &mut SqliteConnection,
        network_id: i64,
    ) -> Result<ComputeRules, AppError> {
        let (text,): (String,) = sqlx::query_as("SELECT compute_rules FROM networks WHERE id = ?")
            .bind(network_id)
            .fetch_one(conn)
            .await?;
        serde_json::from_str(&text).map_err(corrupt)
    }

    pub async fn compute_rules(&self, network_id: i64) -> Result<ComputeRules, AppError> {
        Self::compute_rules_in(&mut *self.pool().acquire().await?, network_id).await
    }

    /// Replaces a network's rules; each changed field is an audit event
    /// with its old and new value. Returns whether anything changed.
    pub async fn set_compute_rules(
        &self,
        who: &Who,
        network_id: i64,
        rules: &ComputeRules,
        now: u64,
    ) -> Result<bool, AppError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let old = Self::compute_rules_in(&mut tx, network_id).await?;
        let to_value = |r: &ComputeRules| serde_json::to_value(r).map_err(anyhow::Error::from);
        let before = leaves(&to_value(&old)?);
        let after = leaves(&to_value(rules)?);
        let changed: Vec<_> = after
            .iter()
            .filter(|(path, value)| {
                before
                    .iter()
                    .find(|(p, _)| p == path)
                    .is_none_or(|(_, v)| v != value)
            })
            .collect();
        if changed.is_empty() {
            return Ok(false);
        }
        sqlx::query("UPDATE networks SET compute_rules = ? WHERE id = ?")
            .bind(serde_json::to_string(rules).map_err(anyhow::Error::from)?)
            .bind(network_id)
            .execute(&mut *tx)
            .await?;
        for (path, value) in changed {
            let old_value = before
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            audit::record(
                &mut tx,
                who,
                Change::new(network_id, "compute.changed", format!("compute:{path}"))
                    .from_to(old_value, value.clone()),
                now,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rules_are_checked_field_by_field() {
        assert_eq!(check_rules(&json!({})).unwrap(), ComputeRules::default());
        let r = check_rules(&json!({"rates": {"initial_grant": 5}})).unwrap();
        assert_eq!(r.rates.initial_grant, 5);
        let msg = |v: Value| check_rules(&v).unwrap_err().to_string();
        assert_eq!(
            msg(json!({"rates": {"intial_grant": 5}})),
            "compute rules: unknown field rates.intial_grant"
        );
        assert_eq!(
            msg(json!({"rates": {"billing_granularity_ms": 0}})),
            "compute rules: rates: billing granularity is 1 ms to 1 hour"
        );
        assert_eq!(
            msg(json!({"weights": {"load": 20000}})),
            "compute rules: weights: score weights are between -10000 and 10000 thousandths"
        );
        assert!(msg(json!({"rates": {"initial_grant": -1}})).starts_with("compute rules: "));
        assert_eq!(msg(json!([])), "compute rules are a JSON object");
    }

    #[test]
    fn leaves_name_nested_fields() {
        let l = leaves(&json!({"a": {"b": 1, "c": [1, 2]}, "d": true}));
        assert_eq!(
            l,
            [
                ("a.b".to_owned(), "1".to_owned()),
                ("a.c".to_owned(), "[1,2]".to_owned()),
                ("d".to_owned(), "true".to_owned())
            ]
        );
    }
}
