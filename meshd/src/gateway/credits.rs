//! Refusing up front a job its submitter cannot pay for: the owner's
//! spendable credits, asked of the coordinator with a request signed by
//! this device's key and cached for a few seconds. While the coordinator
//! cannot be reached the last answer stands, and without any answer jobs
//! run: the ledger settles their receipts when it is back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use platform::ledger::{format_credits, BalanceAnswer, BalanceRequest, DOMAIN_BALANCE};
use platform::netmap::NetMap;
use platform::signed::Signed;

use super::{Gateway, GatewayError, SessionView};

/// How long an answer is used before asking again.
const FRESH: Duration = Duration::from_secs(10);
/// How long a job waits for the coordinator's answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Default)]
pub(super) struct Credits {
    last: Mutex<Option<(Instant, String, i64)>>,
}

impl Credits {
    fn cached(&self, network: &str) -> Option<(Instant, i64)> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref()
            .filter(|(_, n, _)| n == network)
            .map(|(t, _, s)| (*t, *s))
    }

    /// The owner's credits, asked of the coordinator now.
    pub(super) async fn ask(
        &self,
        g: &Gateway,
        view: &SessionView,
    ) -> anyhow::Result<BalanceAnswer> {
        let query = BalanceRequest {
            timestamp: platform::unix_now(),
        };
        let body = Signed::sign(&g.keys.current().device, DOMAIN_BALANCE, &query);
        let http = crate::control::coordinator_http(view.ca_file.as_deref())?;
        let reply: BalanceAnswer = http
            .post(format!(
                "{}/api/v1/balance",
                view.coordinator.trim_end_matches('/')
            ))
            .json(&body)
            .timeout(ASK_TIMEOUT)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(reply)
    }

    /// Refuses (402) a job that may cost more than the owner can spend.
    pub(super) async fn check(
        &self,
        g: &Gateway,
        view: &SessionView,
        netmap: &NetMap,
        estimate: u64,
    ) -> Result<(), GatewayError> {
        let cached = self.cached(&netmap.network);
        let spendable = match cached {
            Some((at, s)) if at.elapsed() < FRESH => Some(s),
            _ => match self.ask(g, view).await.map(|a| a.spendable) {
                Ok(s) => {
                    *self.last.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((Instant::now(), netmap.network.clone(), s));
                    Some(s)
                }
                Err(e) => {
                    tracing::debug!(error = format!("{e:#}"), "asking for the credit balance");
                    cached.map(|(_, s)| s)
                }
            },
        };
        match spendable {
            Some(s) if i128::from(estimate) > i128::from(s) => Err(GatewayError::new(
                axum::http::StatusCode::PAYMENT_REQUIRED,
                "insufficient_credits",
                format!(
                    "the job may cost up to {} credits (its timeout at the chosen worker's rate) and {} can spend {}",
                    format_credits(i64::try_from(estimate).unwrap_or(i64::MAX)),
                    netmap.self_node.owner.as_deref().unwrap_or("this device's owner"),
                    format_credits(s)
                ),
            )),
            _ => Ok(()),
        }
    }
}
