//! What waits to be written to one connection: a bulk lane and a separate
//! path-discovery lane (so bulk cannot starve it), each a byte buffer
//! bounded in bytes, and the writer that drains them.
//!
//! Frames are encoded straight into the lane's buffer: forwarding a packet
//! allocates nothing once the buffers have grown to the traffic. The
//! writer swaps a lane's buffer for its spare and writes what was queued in
//! as few calls as it takes (bulk in runs of up to 64 KiB, with discovery
//! frames that arrived meanwhile written between runs), so a busy link
//! sends many frames per system call while a lone frame still goes out at
//! once (no timer, no added latency).
//!
//! Bytes are what a flood costs in memory, so they are the bound: a stuck
//! reader holds at most [`super::ConnLimits::queue_bytes`] of bulk frames
//! (and an eighth of that of discovery frames), and the lanes shrink back
//! after a burst.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio::sync::Notify;

use super::metrics::Metrics;
use crate::io::write_frame;
use crate::proto::frame::{Frame, HEADER_LEN};

/// The discovery lane's share of a client's byte budget.
const DISCO_SHARE: usize = 8;
/// A lane buffer larger than this after a write is shrunk back to it: a
/// burst does not pin its memory.
const KEEP_CAPACITY: usize = 64 * 1024;

/// Which lane a frame goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    Bulk,
    /// Path discovery and control frames: written first.
    Disco,
}

#[derive(Default)]
struct Queued {
    bytes: Vec<u8>,
    frames: u64,
    /// Bytes queued plus bytes the writer took and has not written yet:
    /// what this lane costs, held to the lane's limit.
    held: usize,
}

struct LaneState {
    queued: Mutex<Queued>,
    limit: usize,
}

impl LaneState {
    fn new(limit: usize) -> Self {
        LaneState {
            queued: Mutex::new(Queued::default()),
            limit,
        }
    }

    fn queued(&self) -> MutexGuard<'_, Queued> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `n` bytes the writer took have been written.
    fn written(&self, n: usize) {
        self.queued().held -= n;
    }
}

struct Shared {
    bulk: LaneState,
    disco: LaneState,
    wake: Notify,
    /// Set when the last [`Outbox`] is gone: the writer drains and ends.
    closed: AtomicBool,
}

impl Shared {
    fn lane(&self, lane: Lane) -> &LaneState {
        match lane {
            Lane::Bulk => &self.bulk,
            Lane::Disco => &self.disco,
        }
    }
}

/// Closes the lanes when the last [`Outbox`] clone goes.
struct Senders(Arc<Shared>);

impl Drop for Senders {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.wake.notify_one();
    }
}

/// The sending side: cloned wherever frames for the connection are made.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
    _senders: Arc<Senders>,
}

/// The receiving side, for [`write_loop`].
pub struct Inbox {
    shared: Arc<Shared>,
}

/// Lanes holding at most `bytes` of bulk frames (and an eighth of that of
/// discovery frames) for one connection.
pub fn outbox(bytes: usize) -> (Outbox, Inbox) {
    let shared = Arc::new(Shared {
        bulk: LaneState::new(bytes),
        disco: LaneState::new((bytes / DISCO_SHARE).max(4096)),
        wake: Notify::new(),
        closed: AtomicBool::new(false),
    });
    (
        Outbox {
            shared: shared.clone(),
            _senders: Arc::new(Senders(shared.clone())),
        },
        Inbox { shared },
    )
}

impl Outbox {
    /// Queues an encoded frame; false (and nothing queued) when the lane is
    /// full or the connection is gone.
    pub fn push(&self, frame: &[u8], lane: Lane) -> bool {
        self.push_with(frame.len(), lane, |b| b.extend_from_slice(frame))
    }

    /// Queues the `len` bytes `encode` appends to the lane's buffer (a
    /// frame encoded in place, no buffer of its own); false (and nothing
    /// queued) when they do not fit or the connection is gone.
    pub fn push_with(&self, len: usize, lane: Lane, encode: impl FnOnce(&mut Vec<u8>)) -> bool {
        if self.shared.closed.load(Ordering::Acquire) {
            return false;
        }
        let state = self.shared.lane(lane);
        {
            let mut q = state.queued();
            if q.held + len > state.limit {
                return false;
            }
            let before = q.bytes.len();
            encode(&mut q.bytes);
            debug_assert_eq!(q.bytes.len() - before, len, "encoded as many bytes as said");
            q.held += len;
            q.frames += 1;
        }
        self.shared.wake.notify_one();
        true
    }

    /// Bytes queued or being written now, bulk and discovery.
    pub fn queued(&self) -> (usize, usize) {
        (
            self.shared.bulk.queued().held,
            self.shared.disco.queued().held,
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

/// Bulk frames are written in runs of whole frames up to this size, with
/// the discovery lane's backlog written between runs: a large bulk backlog
/// on a slow link does not hold path discovery back.
const BULK_RUN: usize = 64 * 1024;

/// Takes `state`'s backlog into `buf` (an empty buffer swapped in); how
/// many frames it holds.
fn take(state: &LaneState, buf: &mut Vec<u8>) -> u64 {
    let mut q = state.queued();
    std::mem::swap(&mut q.bytes, buf);
    std::mem::take(&mut q.frames)
}

/// Where the run of whole frames starting at `start` ends: at most `max`
/// bytes unless its first frame alone is larger. Bytes that do not parse as
/// frames (never queued by the relay) end the run at the buffer's end.
fn run_end(buf: &[u8], start: usize, max: usize) -> usize {
    let mut end = start;
    while let Some(h) = buf.get(end..end + HEADER_LEN) {
        let next = end + HEADER_LEN + u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
        if end > start && next - start > max {
            return end;
        }
        end = next;
    }
    buf.len()
}

/// Empties `buf` after it was written (keeping a modest capacity).
fn recycle(buf: &mut Vec<u8>) {
    buf.clear();
    if buf.capacity() > KEEP_CAPACITY {
        buf.shrink_to(KEEP_CAPACITY);
    }
}

/// Writes `bytes`; false when the write failed or stalled.
async fn write_out<W: AsyncWrite + Unpin>(write: &mut W, bytes: &[u8], times: WriterTimes) -> bool {
    let sent = tokio::time::timeout(times.write_timeout, async {
        write.write_all(bytes).await?;
        write.flush().await
    })
    .await;
    matches!(sent, Ok(Ok(())))
}

/// Writes the discovery lane's backlog in one call; false when the write
/// failed. `Ok(true)`: something was written.
async fn write_disco<W: AsyncWrite + Unpin>(
    metrics: &Metrics,
    write: &mut W,
    shared: &Shared,
    buf: &mut Vec<u8>,
    times: WriterTimes,
) -> Result<bool, ()> {
    let frames = take(&shared.disco, buf);
    if buf.is_empty() {
        return Ok(false);
    }
    if !write_out(write, buf, times).await {
        return Err(());
    }
    metrics.packets_out.inc_by(frames);
    metrics.bytes_out.inc_by(buf.len() as u64);
    shared.disco.written(buf.len());
    recycle(buf);
    Ok(true)
}

/// Writes queued frames, discovery first, each lane's backlog in as few
/// calls as it takes, with a keepalive when idle. Ends when the senders are
/// gone and the lanes are drained, or a write fails or stalls.
pub async fn write_loop<W: AsyncWrite + Unpin>(
    metrics: &Metrics,
    mut write: W,
    inbox: Inbox,
    times: WriterTimes,
) {
    let shared = inbox.shared;
    let (mut disco, mut bulk) = (Vec::new(), Vec::new());
    let mut scratch = Vec::new();
    let mut idle = Box::pin(tokio::time::sleep(times.keepalive));
    loop {
        let Ok(mut wrote) = write_disco(metrics, &mut write, &shared, &mut disco, times).await
        else {
            return;
        };
        let frames = take(&shared.bulk, &mut bulk);
        let mut at = 0;
        while at < bulk.len() {
            let end = run_end(&bulk, at, BULK_RUN);
            if !write_out(&mut write, &bulk[at..end], times).await {
                return;
            }
            shared.bulk.written(end - at);
            at = end;
            if write_disco(metrics, &mut write, &shared, &mut disco, times)
                .await
                .is_err()
            {
                return;
            }
            wrote = true;
        }
        if !bulk.is_empty() {
            metrics.packets_out.inc_by(frames);
            metrics.bytes_out.inc_by(bulk.len() as u64);
            recycle(&mut bulk);
        }
        if wrote {
            idle.as_mut()
                .reset(tokio::time::Instant::now() + times.keepalive);
            // Frames may have arrived during the write: look again before
            // sleeping.
            continue;
        }
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        tokio::select! {
            () = shared.wake.notified() => {}
            () = &mut idle => {
                let sent = tokio::time::timeout(times.write_timeout, async {
                    write_frame(&mut write, &Frame::KeepAlive, &mut scratch).await?;
                    write.flush().await
                }).await;
                if !matches!(sent, Ok(Ok(()))) {
                    return;
                }
                idle.as_mut().reset(tokio::time::Instant::now() + times.keepalive);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_are_bounded_by_bytes() {
        let (out, _inbox) = outbox(10_000);
        // Ten 1,000-byte frames fit, the eleventh does not.
        for _ in 0..10 {
            assert!(out.push(&[0; 1000], Lane::Bulk));
        }
        assert!(!out.push(&[0; 1000], Lane::Bulk));
        assert!(out.push(&[0; 10], Lane::Disco), "discovery has its own");
        assert_eq!(out.queued(), (10_000, 10));
        // A large frame is refused whole, leaving room for small ones.
        let (out, _inbox) = outbox(100_000);
        assert!(out.push(&[0; 60_000], Lane::Bulk));
        assert!(!out.push(&[0; 60_000], Lane::Bulk));
        assert!(out.push(&[0; 40_000], Lane::Bulk));
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
                assert!(out.push(&[0xab; 1000], Lane::Bulk));
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
        assert!(out.push(&[0; 4096], Lane::Bulk));
        let start = tokio::time::Instant::now();
        write_loop(&metrics, near, inbox, times).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        drop(out);
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_goes_out_in_one_write_per_lane_discovery_first() {
        let (out, inbox) = outbox(1 << 20);
        let mut bulk = Vec::new();
        for i in 0..100u8 {
            assert!(out.push_with(HEADER_LEN + 35, Lane::Bulk, |b| {
                Frame::encode_recv_packet(&[i; 32], &[i; 3], b)
            }));
            Frame::encode_recv_packet(&[i; 32], &[i; 3], &mut bulk);
        }
        assert!(out.push(b"disco", Lane::Disco));
        drop(out);
        let metrics = Metrics::default();
        let times = WriterTimes {
            keepalive: Duration::from_secs(10),
            write_timeout: Duration::from_secs(5),
        };
        let mut w = Writes {
            writes: Vec::new(),
            cut_in: None,
        };
        // The senders are gone: the writer drains the lanes and ends.
        write_loop(&metrics, &mut w, inbox, times).await;
        assert_eq!(w.writes.len(), 2, "one write per lane");
        assert_eq!(w.writes[0], b"disco");
        assert_eq!(w.writes[1], bulk, "in order");
        assert_eq!(metrics.packets_out.get(), 101);
        assert_eq!(metrics.bytes_out.get(), 4005);
    }

    /// Records each write, and pushes a discovery frame into `cut_in`
    /// (when given) during the first.
    struct Writes {
        writes: Vec<Vec<u8>>,
        cut_in: Option<Outbox>,
    }

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.writes.push(buf.to_vec());
            if let Some(out) = self.cut_in.take() {
                assert!(out.push(b"disco", Lane::Disco));
            }
            std::task::Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn discovery_frames_cut_in_between_runs_of_a_large_bulk_backlog() {
        let (out, inbox) = outbox(1 << 20);
        // 200 frames of 1,000 bytes: about three runs of 64 KiB.
        let mut expected = Vec::new();
        for i in 0..200u8 {
            let len = HEADER_LEN + 32 + 1000;
            assert!(out.push_with(len, Lane::Bulk, |b| {
                Frame::encode_recv_packet(&[i; 32], &[i; 1000], b)
            }));
            Frame::encode_recv_packet(&[i; 32], &[i; 1000], &mut expected);
        }
        let mut w = Writes {
            writes: Vec::new(),
            cut_in: Some(out.clone()),
        };
        drop(out);
        let metrics = Metrics::default();
        let times = WriterTimes {
            keepalive: Duration::from_secs(10),
            write_timeout: Duration::from_secs(5),
        };
        write_loop(&metrics, &mut w, inbox, times).await;
        assert!(w.writes[0].len() <= BULK_RUN, "a run of at most 64 KiB");
        assert_eq!(w.writes[1], b"disco", "discovery right after the first run");
        let bulk: Vec<u8> = w
            .writes
            .iter()
            .filter(|b| b.as_slice() != b"disco")
            .flatten()
            .copied()
            .collect();
        assert_eq!(bulk, expected, "every bulk frame, whole and in order");
        assert!(w.writes.len() >= 4, "{} writes", w.writes.len());
    }
}
