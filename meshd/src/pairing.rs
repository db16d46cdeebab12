//! Device-code pairing: `meshd up` without a pre-auth key. The daemon asks
//! the coordinator for a short code, a member approves it (`coordinator
//! device approve CODE`, or the verification page), and the daemon, polling
//! every 2 s, receives a single-use pre-auth key and registers with it as
//! `meshd up --auth-key` would.
//!
//! The polling runs in the daemon, not in the CLI: a CLI that goes away
//! (Ctrl-C) leaves a pairing that still completes, or ends by itself when
//! the code expires; `meshd status` shows it and `meshd down` cancels it.
//! Which answer leads where is the pure [`next_step`].

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use platform::keys::DevicePrivate;
use platform::people::{DeviceCode, DeviceCodeRequest, DeviceCodeStatus};
use platform::signed::{Signed, DOMAIN_DEVICE_CODE};
use platform::unix_now;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::control::{self, CoordinatorError};
use crate::localapi::PairingInfo;

/// How often the daemon asks whether its code was approved.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Where a pairing stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PairingState {
    /// Waiting for a member to approve the code.
    Waiting,
    /// Approved; registering with the key it brought.
    Joining,
    /// Registered and up.
    Joined,
    /// Ended without joining (expired, refused, registration failed).
    Failed(String),
}

/// What to do after one poll.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Ask again after [`POLL_INTERVAL`].
    Wait,
    /// Approved: register with this single-use key.
    Register { auth_key: String },
    /// Give up, for this reason.
    Stop(String),
}

/// Decides what a poll's answer means at `now` (unix seconds) for a code
/// that expires at `expires_at`. Transient failures (no answer, 5xx) are
/// retried until the code expires; the coordinator's 404 means the code
/// expired or is unknown.
pub fn next_step(
    answer: Result<&DeviceCode, &CoordinatorError>,
    expires_at: u64,
    now: u64,
) -> Step {
    let expired = || Step::Stop("the pairing code expired before anyone approved it".into());
    match answer {
        Ok(code) => match (code.status, &code.auth_key) {
            (DeviceCodeStatus::Approved, Some(key)) => Step::Register {
                auth_key: key.clone(),
            },
            (DeviceCodeStatus::Approved, None) => {
                Step::Stop("approved, but the coordinator sent no key".into())
            }
            (DeviceCodeStatus::Pending, _) if now >= expires_at => expired(),
            (DeviceCodeStatus::Pending, _) => Step::Wait,
        },
        Err(e) if e.status() == Some(reqwest::StatusCode::NOT_FOUND) => expired(),
        Err(e @ CoordinatorError::Refused { status, .. }) if status.is_client_error() => {
            Step::Stop(e.to_string())
        }
        Err(_) if now >= expires_at => expired(),
        Err(e) => {
            tracing::debug!(error = %e, "polling the pairing code; trying again");
            Step::Wait
        }
    }
}

fn signed_request(device: &DevicePrivate, hostname: &str, code: Option<&str>) -> Signed {
    Signed::sign(
        device,
        DOMAIN_DEVICE_CODE,
        &DeviceCodeRequest {
            timestamp: unix_now(),
            hostname: hostname.to_owned(),
            code: code.map(str::to_owned),
        },
    )
}

/// A pairing in progress: its code, and the task that polls it.
pub struct Pairing {
    pub info: PairingInfo,
    state: watch::Receiver<PairingState>,
    task: JoinHandle<()>,
}

impl Drop for Pairing {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Pairing {
    /// Asks `coordinator` for a code and starts polling it; once approved,
    /// `register` is called with the pre-auth key it brought.
    pub async fn start<F, Fut>(
        http: reqwest::Client,
        coordinator: String,
        device: DevicePrivate,
        hostname: String,
        register: F,
    ) -> anyhow::Result<Pairing>
    where
        F: FnOnce(String) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send,
    {
        let body = signed_request(&device, &hostname, None);
        let code: DeviceCode =
            control::post_signed(&http, &coordinator, "/api/v1/device-codes", &body)
                .await
                .context("starting device-code pairing")?;
        tracing::info!(code = %code.code, expires_at = code.expires_at, "pairing: waiting for approval");
        let info = PairingInfo {
            coordinator: coordinator.clone(),
            hostname: hostname.clone(),
            code: code.code.clone(),
            verification_url: code.verification_url.clone(),
            expires_at: code.expires_at,
        };
        let (tx, state) = watch::channel(PairingState::Waiting);
        let expires_at = code.expires_at;
        let task = tokio::spawn(async move {
            let outcome = loop {
                tokio::time::sleep(POLL_INTERVAL).await;
                let body = signed_request(&device, &hostname, Some(&code.code));
                let answer: Result<DeviceCode, _> =
                    control::post_signed(&http, &coordinator, "/api/v1/device-codes/poll", &body)
                        .await;
                match next_step(answer.as_ref(), expires_at, unix_now()) {
                    Step::Wait => continue,
                    Step::Stop(why) => break Err(why),
                    Step::Register { auth_key } => {
                        tracing::info!("pairing approved; registering");
                        tx.send_replace(PairingState::Joining);
                        break register(auth_key).await.map_err(|e| format!("{e:#}"));
                    }
                }
            };
            match outcome {
                Ok(()) => tx.send_replace(PairingState::Joined),
                Err(why) => {
                    tracing::warn!(error = %why, "pairing ended");
                    tx.send_replace(PairingState::Failed(why))
                }
            };
        });
        Ok(Pairing { info, state, task })
    }

    pub fn state(&self) -> PairingState {
        self.state.borrow().clone()
    }

    /// Still waiting for approval (or joining).
    pub fn is_live(&self) -> bool {
        matches!(self.state(), PairingState::Waiting | PairingState::Joining)
    }

    pub fn subscribe(&self) -> watch::Receiver<PairingState> {
        self.state.clone()
    }
}

/// Waits until a pairing is over: `Ok` once joined.
pub async fn wait(mut state: watch::Receiver<PairingState>) -> anyhow::Result<()> {
    let done = state
        .wait_for(|s| matches!(s, PairingState::Joined | PairingState::Failed(_)))
        .await
        .map_err(|_| anyhow::anyhow!("the pairing was cancelled"))?
        .clone();
    match done {
        PairingState::Failed(why) => anyhow::bail!("{why}"),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(status: DeviceCodeStatus, auth_key: Option<&str>) -> DeviceCode {
        DeviceCode {
            code: "BCDF-GHJK".into(),
            verification_url: "http://c/api/v1/device-codes/BCDF-GHJK".into(),
            expires_at: 1000,
            status,
            auth_key: auth_key.map(str::to_owned),
            network: auth_key.map(|_| "home".to_owned()),
        }
    }

    fn refused(status: u16) -> CoordinatorError {
        CoordinatorError::Refused {
            status: reqwest::StatusCode::from_u16(status).unwrap(),
            code: "x".into(),
            message: "nope".into(),
        }
    }

    #[test]
    fn pending_codes_are_polled_until_they_expire() {
        let pending = code(DeviceCodeStatus::Pending, None);
        assert_eq!(next_step(Ok(&pending), 1000, 999), Step::Wait);
        assert!(
            matches!(next_step(Ok(&pending), 1000, 1000), Step::Stop(m) if m.contains("expired"))
        );
    }

    #[test]
    fn approval_brings_the_key_to_register_with() {
        let approved = code(DeviceCodeStatus::Approved, Some("tskey-1"));
        assert_eq!(
            next_step(Ok(&approved), 1000, 10),
            Step::Register {
                auth_key: "tskey-1".into()
            }
        );
        let keyless = code(DeviceCodeStatus::Approved, None);
        assert!(matches!(next_step(Ok(&keyless), 1000, 10), Step::Stop(_)));
    }

    #[test]
    fn errors_stop_or_retry_by_kind() {
        assert!(
            matches!(next_step(Err(&refused(404)), 1000, 10), Step::Stop(m) if m.contains("expired"))
        );
        assert!(
            matches!(next_step(Err(&refused(403)), 1000, 10), Step::Stop(m) if m.contains("nope"))
        );
        // A coordinator in trouble: keep asking while the code lives.
        assert_eq!(next_step(Err(&refused(503)), 1000, 10), Step::Wait);
        assert!(matches!(
            next_step(Err(&refused(503)), 1000, 1000),
            Step::Stop(_)
        ));
    }

    #[tokio::test]
    async fn waiting_ends_with_the_outcome() {
        let (tx, rx) = watch::channel(PairingState::Waiting);
        let waiter = tokio::spawn(wait(rx.clone()));
        tx.send_replace(PairingState::Joining);
        tx.send_replace(PairingState::Joined);
        assert!(waiter.await.unwrap().is_ok());

        let waiter = tokio::spawn(wait(rx));
        tx.send_replace(PairingState::Failed("expired".into()));
        assert_eq!(waiter.await.unwrap().unwrap_err().to_string(), "expired");

        let (tx, rx) = watch::channel(PairingState::Waiting);
        let waiter = tokio::spawn(wait(rx));
        drop(tx);
        assert!(
            waiter.await.unwrap().is_err(),
            "a cancelled pairing ends the wait"
        );
    }
}
