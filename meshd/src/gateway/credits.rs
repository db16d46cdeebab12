//! Refusing up front a job its submitter cannot pay for: the owner's
//! spendable credits, asked of the coordinator with a request signed by
//! this device's key, cached and refreshed in the background. While the
//! coordinator cannot be reached the last answer stands, and without any
//! answer jobs run: the ledger settles their receipts when it is back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
    /// When asking last failed with nothing cached: jobs then stop waiting
    /// for an answer for a while.
    failed: Mutex<Option<Instant>>,
    refreshing: AtomicBool,
    /// The client to the coordinator, made once per CA file (building one
    /// reads the file and sets up TLS).
    http: Mutex<Option<(Option<std::path::PathBuf>, reqwest::Client)>>,
}

impl Credits {
    fn client(&self, view: &SessionView) -> anyhow::Result<reqwest::Client> {
        let mut http = self.http.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((ca, client)) = http.as_ref() {
            if *ca == view.ca_file {
                return Ok(client.clone());
            }
        }
        let client = crate::control::coordinator_http(view.ca_file.as_deref())?;
        *http = Some((view.ca_file.clone(), client.clone()));
        Ok(client)
    }

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
        let http = self.client(view)?;
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

    fn store(&self, network: &str, spendable: i64) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), network.to_owned(), spendable));
    }

    async fn refresh_now(&self, g: &Gateway, view: &SessionView, network: &str) -> Option<i64> {
        match self.ask(g, view).await {
            Ok(a) => {
                self.store(network, a.spendable);
                Some(a.spendable)
            }
            Err(e) => {
                tracing::debug!(error = format!("{e:#}"), "asking for the credit balance");
                *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                None
            }
        }
    }

    /// Asks again in the background (one question at a time): jobs go on
    /// with the last answer meanwhile, and never wait on a coordinator
    /// that is slow or gone.
    fn refresh_later(&self, g: &Arc<Gateway>, view: &SessionView, network: &str) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (g, view, network) = (g.clone(), view.clone(), network.to_owned());
        tokio::spawn(async move {
            g.credits.refresh_now(&g, &view, &network).await;
            g.credits.refreshing.store(false, Ordering::Release);
        });
    }

    /// Refuses (402) a job that may cost more than the owner can spend.
    /// Only a network's first job waits for the coordinator's answer (at
    /// most [`ASK_TIMEOUT`]).
    pub(super) async fn check(
        &self,
        g: &Arc<Gateway>,
        view: &SessionView,
        netmap: &NetMap,
        estimate: u64,
    ) -> Result<(), GatewayError> {
        let spendable = match self.cached(&netmap.network) {
            Some((at, s)) => {
                if at.elapsed() >= FRESH {
                    self.refresh_later(g, view, &netmap.network);
                }
                Some(s)
            }
            None => {
                let failed_lately = self
                    .failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_some_and(|t| t.elapsed() < FRESH);
                if failed_lately {
                    self.refresh_later(g, view, &netmap.network);
                    None
                } else {
                    self.refresh_now(g, view, &netmap.network).await
                }
            }
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
