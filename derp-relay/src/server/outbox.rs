//! What waits to be written to one connection: a bulk queue and a separate
//! path-discovery queue (so bulk cannot starve it), each bounded by frames
//! *and* by bytes, and the writer that drains them.
//!
//! Bytes are what a flood costs in memory, so they are the bound that
//! matters: [`BULK_QUEUE`] frames of 64 KiB would be 32 MiB per client, the
//! byte budget keeps a stuck reader to [`super::ConnLimits::queue_bytes`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;

use super::metrics::Metrics;
use crate::io::write_frame;
use crate::proto::frame::Frame;

/// Frames queued per client before drops begin.
pub const BULK_QUEUE: usize = 512;
/// Path-discovery (and control) frames queued per client.
pub const DISCO_QUEUE: usize = 64;
/// The discovery queue's share of a client's byte budget.
const DISCO_SHARE: usize = 8;

/// Which queue a frame goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    Bulk,
    /// Path discovery and control frames: written first.
    Disco,
}

struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    fn take(&self, n: usize) -> bool {
        let before = self.used.fetch_add(n, Ordering::AcqRel);
        if before + n > self.limit {
            self.used.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// The sending side: cloned wherever frames for the connection are made.
#[derive(Clone)]
pub struct Outbox {
    bulk: mpsc::Sender<Vec<u8>>,
    disco: mpsc::Sender<Vec<u8>>,
    bulk_bytes: Arc<Budget>,
    disco_bytes: Arc<Budget>,
}

/// The receiving side, for [`write_loop`].
pub struct Inbox {
    bulk: mpsc::Receiver<Vec<u8>>,
    disco: mpsc::Receiver<Vec<u8>>,
    bulk_bytes: Arc<Budget>,
    disco_bytes: Arc<Budget>,
}

/// Queues holding at most `bytes` of bulk frames (and an eighth of that of
/// discovery frames) for one connection.
pub fn outbox(bytes: usize) -> (Outbox, Inbox) {
    let (bulk_tx, bulk_rx) = mpsc::channel(BULK_QUEUE);
    let (disco_tx, disco_rx) = mpsc::channel(DISCO_QUEUE);
    let budget = |limit| {
        Arc::new(Budget {
            used: AtomicUsize::new(0),
            limit,
        })
    };
    let (bulk_bytes, disco_bytes) = (budget(bytes), budget((bytes / DISCO_SHARE).max(4096)));
    (
        Outbox {
            bulk: bulk_tx,
            disco: disco_tx,
            bulk_bytes: bulk_bytes.clone(),
            disco_bytes: disco_bytes.clone(),
        },
        Inbox {
            bulk: bulk_rx,
            disco: disco_rx,
            bulk_bytes,
            disco_bytes,
        },
    )
}

impl Outbox {
    /// Queues an encoded frame; false (and nothing queued) when the lane is
    /// full by frames or bytes, or the connection is gone.
    pub fn push(&self, frame: Vec<u8>, lane: Lane) -> bool {
        let (queue, budget) = match lane {
            Lane::Bulk => (&self.bulk, &self.bulk_bytes),
            Lane::Disco => (&self.disco, &self.disco_bytes),
        };
        let n = frame.len();
        if !budget.take(n) {
            return false;
        }
        if queue.try_send(frame).is_err() {
            budget.give(n);
            return false;
        }
        true
    }

    /// Bytes queued now, bulk and discovery.
    pub fn queued(&self) -> (usize, usize) {
        (
            self.bulk_bytes.used.load(Ordering::Acquire),
            self.disco_bytes.used.load(Ordering::Acquire),
        )
    }
}

/// How a writer keeps its connection alive and gives up on it.
#[derive(Clone, Copy, Debug)]
pub struct WriterTimes {
    /// A keepalive goes out after this long without another frame.
    pub keepalive: Duration,
    /// A write that takes longer than this ends the connection: the peer
    /// stopped reading.
    pub write_timeout: Duration,
}

/// Writes queued frames, discovery first, with a keepalive when idle. Ends
/// when both queues close or a write fails or stalls.
pub async fn write_loop<W: AsyncWrite + Unpin>(
    metrics: &Metrics,
    mut write: W,
    mut inbox: Inbox,
    times: WriterTimes,
) {
    let mut scratch = Vec::new();
    let mut idle = Box::pin(tokio::time::sleep(times.keepalive));
    let (mut bulk_open, mut disco_open) = (true, true);
    while bulk_open || disco_open {
        let (frame, lane) = tokio::select! {
            biased;
            f = inbox.disco.recv(), if disco_open => match f {
                Some(f) => (f, Lane::Disco),
                None => {
                    disco_open = false;
                    continue;
                }
            },
            f = inbox.bulk.recv(), if bulk_open => match f {
                Some(f) => (f, Lane::Bulk),
                None => {
                    bulk_open = false;
                    continue;
                }
            },
            () = &mut idle => {
                let sent = tokio::time::timeout(times.write_timeout, async {
                    write_frame(&mut write, &Frame::KeepAlive, &mut scratch).await?;
                    write.flush().await
                }).await;
                if !matches!(sent, Ok(Ok(()))) {
                    return;
                }
                idle.as_mut().reset(tokio::time::Instant::now() + times.keepalive);
                continue;
            }
        };
        let budget = match lane {
            Lane::Bulk => &inbox.bulk_bytes,
            Lane::Disco => &inbox.disco_bytes,
        };
        budget.give(frame.len());
        metrics.packets_out.inc();
        metrics.bytes_out.inc_by(frame.len() as u64);
        let sent = tokio::time::timeout(times.write_timeout, async {
            write.write_all(&frame).await?;
            write.flush().await
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            return;
        }
        idle.as_mut()
            .reset(tokio::time::Instant::now() + times.keepalive);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_are_bounded_by_bytes() {
        let (out, _inbox) = outbox(10_000);
        // Ten 1,000-byte frames fit, the eleventh does not, whatever the
        // frame count allows.
        for _ in 0..10 {
            assert!(out.push(vec![0; 1000], Lane::Bulk));
        }
        assert!(!out.push(vec![0; 1000], Lane::Bulk));
        assert!(out.push(vec![0; 10], Lane::Disco), "discovery has its own");
        assert_eq!(out.queued(), (10_000, 10));
        // A large frame is refused whole, leaving room for small ones.
        let (out, _inbox) = outbox(100_000);
        assert!(out.push(vec![0; 60_000], Lane::Bulk));
        assert!(!out.push(vec![0; 60_000], Lane::Bulk));
        assert!(out.push(vec![0; 40_000], Lane::Bulk));
        assert_eq!(out.queued().0, 100_000);
    }

    #[tokio::test(start_paused = true)]
    async fn written_frames_give_their_bytes_back_and_idle_links_hear_keepalives() {
        let (out, inbox) = outbox(10_000);
        let (near, mut far) = tokio::io::duplex(1 << 16);
        let metrics = Metrics::default();
        let times = WriterTimes {
            keepalive: Duration::from_secs(10),
            write_timeout: Duration::from_secs(5),
        };
        let writer = async { write_loop(&metrics, near, inbox, times).await };
        let reader = async {
            use tokio::io::AsyncReadExt as _;
            for _ in 0..10 {
                assert!(out.push(vec![0xab; 1000], Lane::Bulk));
            }
            let mut got = vec![0u8; 10_000];
            far.read_exact(&mut got).await.unwrap();
            tokio::task::yield_now().await;
            assert_eq!(out.queued(), (0, 0), "room again once written");
            // Then silence: a keepalive after ten seconds, not before.
            let start = tokio::time::Instant::now();
            let mut ka = [0u8; 5];
            far.read_exact(&mut ka).await.unwrap();
            assert_eq!(ka, [0x06, 0, 0, 0, 0]);
            assert_eq!(start.elapsed(), Duration::from_secs(10));
            drop(out);
        };
        tokio::join!(writer, reader);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_ends_the_writer() {
        let (out, inbox) = outbox(1 << 20);
        // A pipe that holds 1 KiB, and nobody reading it.
        let (near, _far) = tokio::io::duplex(1024);
        let metrics = Metrics::default();
        let times = WriterTimes {
            keepalive: Duration::from_secs(10),
            write_timeout: Duration::from_secs(5),
        };
        assert!(out.push(vec![0; 4096], Lane::Bulk));
        let start = tokio::time::Instant::now();
        write_loop(&metrics, near, inbox, times).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        drop(out);
    }
}
