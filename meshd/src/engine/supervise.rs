//! Keeps the engine's long-lived tasks running: a task that panics is
//! logged, counted and started again after a short pause, instead of
//! vanishing while the engine looks alive. A task that returns (its device
//! or socket failed, which it logs) is not restarted.
//!
//! The panic is caught inside the spawned task, so aborting the task (the
//! engine stopping) drops everything it holds at once.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::task::JoinHandle;

/// Pause before a panicked task starts again: a panic that repeats at once
/// costs a log line a second, not a busy loop.
pub const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Spawns `make()`'s future and starts a fresh one each time it panics,
/// calling `on_restart` first.
pub fn spawn<F, Fut, R>(name: &'static str, on_restart: R, make: F) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
    R: Fn() + Send + 'static,
{
    tokio::spawn(run(name, on_restart, make))
}

async fn run<F, Fut, R>(name: &'static str, on_restart: R, mut make: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
    R: Fn(),
{
    loop {
        match AssertUnwindSafe(make()).catch_unwind().await {
            Ok(()) => {
                tracing::warn!(task = name, "engine task ended");
                return;
            }
            Err(panic) => {
                tracing::error!(
                    task = name,
                    panic = panic_message(panic.as_ref()),
                    "engine task panicked; restarting it"
                );
                on_restart();
                tokio::time::sleep(RESTART_DELAY).await;
            }
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_and_a_finished_one_is_not() {
        let runs = Arc::new(AtomicU32::new(0));
        let restarts = Arc::new(AtomicU32::new(0));
        let task = spawn(
            "test",
            {
                let restarts = restarts.clone();
                move || {
                    restarts.fetch_add(1, Ordering::SeqCst);
                }
            },
            {
                let runs = runs.clone();
                move || {
                    let run = runs.fetch_add(1, Ordering::SeqCst);
                    async move {
                        // Panics on its first two runs, like a task hitting
                        // a bad state, then ends normally.
                        assert!(run >= 2, "run {run} fails");
                    }
                }
            },
        );
        task.await.expect("the supervisor itself never panics");
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(restarts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn aborting_the_task_drops_what_the_running_future_holds() {
        let held = Arc::new(());
        let task = spawn("test", || {}, {
            let held = held.clone();
            move || {
                let held = held.clone();
                async move {
                    let _keep = held;
                    std::future::pending::<()>().await;
                }
            }
        });
        tokio::task::yield_now().await;
        assert_eq!(Arc::strong_count(&held), 3, "closure and future hold it");
        task.abort();
        let _ = task.await;
        assert_eq!(Arc::strong_count(&held), 1);
    }
}
