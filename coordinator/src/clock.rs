//! The wall clock the API reads (Unix seconds): the system's in a server,
//! one set by hand in tests, so that expiry is tested by moving time rather
//! than by waiting for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug, Default)]
pub enum Clock {
    #[default]
    System,
    /// Stands still until moved.
    Manual(Arc<AtomicU64>),
}

impl Clock {
    /// A clock that reads `start` until moved.
    pub fn manual(start: u64) -> Self {
        Clock::Manual(Arc::new(AtomicU64::new(start)))
    }

    pub fn now(&self) -> u64 {
        match self {
            Clock::System => platform::unix_now(),
            Clock::Manual(t) => t.load(Ordering::SeqCst),
        }
    }

    /// Moves a manual clock forward; the system clock cannot be moved.
    pub fn advance(&self, secs: u64) {
        match self {
            Clock::System => panic!("the system clock cannot be advanced"),
            Clock::Manual(t) => {
                t.fetch_add(secs, Ordering::SeqCst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let c = Clock::manual(100);
        assert_eq!(c.now(), 100);
        c.clone().advance(5);
        assert_eq!(c.now(), 105, "clones share the time");
        assert!(Clock::System.now() > 1_600_000_000);
    }
}
