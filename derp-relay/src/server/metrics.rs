//! Counters exported on `/metrics` in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Why a packet or a connection was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    RateLimited,
    QueueFull,
    NoSuchPeer,
    Malformed,
    Oversized,
    Unauthenticated,
    AdmissionDenied,
    AdmissionUnavailable,
    UnexpectedFrame,
    /// A connected client whose node key the coordinator revoked.
    Revoked,
    /// A packet for a key of another network (answered as `NoSuchPeer`).
    OtherNetwork,
    /// A connection that did not prove a key in time.
    HandshakeTimeout,
    /// A connection that sent nothing, not even a keepalive, for too long.
    IdleTimeout,
    /// A connection that stopped reading what the relay sends it.
    WriteStalled,
    /// A TCP connection over the connection cap, closed at accept.
    TooManyConnections,
    /// An upgrade over the cap on connections proving a key (503).
    TooManyHandshakes,
}

impl Drop {
    const ALL: [Drop; 16] = [
        Drop::RateLimited,
        Drop::QueueFull,
        Drop::NoSuchPeer,
        Drop::Malformed,
        Drop::Oversized,
        Drop::Unauthenticated,
        Drop::AdmissionDenied,
        Drop::AdmissionUnavailable,
        Drop::UnexpectedFrame,
        Drop::Revoked,
        Drop::OtherNetwork,
        Drop::HandshakeTimeout,
        Drop::IdleTimeout,
        Drop::WriteStalled,
        Drop::TooManyConnections,
        Drop::TooManyHandshakes,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Drop::RateLimited => "rate_limited",
            Drop::QueueFull => "queue_full",
            Drop::NoSuchPeer => "no_such_peer",
            Drop::Malformed => "malformed",
            Drop::Oversized => "oversized",
            Drop::Unauthenticated => "unauthenticated",
            Drop::AdmissionDenied => "admission_denied",
            Drop::AdmissionUnavailable => "admission_unavailable",
            Drop::UnexpectedFrame => "unexpected_frame",
            Drop::Revoked => "revoked",
            Drop::OtherNetwork => "other_network",
            Drop::HandshakeTimeout => "handshake_timeout",
            Drop::IdleTimeout => "idle_timeout",
            Drop::WriteStalled => "write_stalled",
            Drop::TooManyConnections => "too_many_connections",
            Drop::TooManyHandshakes => "too_many_handshakes",
        }
    }
}

#[derive(Default)]
pub struct Metrics {
    pub clients: AtomicI64,
    pub accepted: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub packets_in: AtomicU64,
    pub packets_out: AtomicU64,
    /// Node keys the coordinator revoked (pushed on the revocation stream).
    pub revocations: AtomicU64,
    /// Times the admission cache was flushed on the coordinator's word.
    pub revocation_resyncs: AtomicU64,
    /// 1 while the revocation stream to the coordinator is open.
    pub revocation_stream_up: AtomicI64,
    /// Mesh peers that presented another key than the one configured.
    pub mesh_key_mismatches: AtomicU64,
    /// Admission questions sent to the coordinator.
    pub admission_asks: AtomicU64,
    /// Admission questions not sent: over the budget (treated as no answer).
    pub admission_throttled: AtomicU64,
    drops: [AtomicU64; Drop::ALL.len()],
}

impl Metrics {
    pub fn drop(&self, why: Drop) {
        let i = Drop::ALL.iter().position(|d| *d == why).expect("listed");
        self.drops[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn drops(&self, why: Drop) -> u64 {
        let i = Drop::ALL.iter().position(|d| *d == why).expect("listed");
        self.drops[i].load(Ordering::Relaxed)
    }

    pub fn render(&self) -> String {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# TYPE derp_clients gauge\nderp_clients {}",
            self.clients.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE derp_accepted_total counter\nderp_accepted_total {}",
            l(&self.accepted)
        );
        let _ = writeln!(
            out,
            "# TYPE derp_bytes_received_total counter\nderp_bytes_received_total {}",
            l(&self.bytes_in)
        );
        let _ = writeln!(
            out,
            "# TYPE derp_bytes_sent_total counter\nderp_bytes_sent_total {}",
            l(&self.bytes_out)
        );
        let _ = writeln!(
            out,
            "# TYPE derp_packets_received_total counter\nderp_packets_received_total {}",
            l(&self.packets_in)
        );
        let _ = writeln!(
            out,
            "# TYPE derp_packets_sent_total counter\nderp_packets_sent_total {}",
            l(&self.packets_out)
        );
        let _ = writeln!(
            out,
            "# TYPE derp_revocations_total counter\nderp_revocations_total {}",
            l(&self.revocations)
        );
        let _ = writeln!(
            out,
            "# TYPE derp_revocation_resyncs_total counter\nderp_revocation_resyncs_total {}",
            l(&self.revocation_resyncs)
        );
        let _ = writeln!(
            out,
            "# TYPE derp_revocation_stream_up gauge\nderp_revocation_stream_up {}",
            self.revocation_stream_up.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE derp_admission_asks_total counter\nderp_admission_asks_total {}",
            l(&self.admission_asks)
        );
        let _ = writeln!(
            out,
            "# TYPE derp_admission_throttled_total counter\nderp_admission_throttled_total {}",
            l(&self.admission_throttled)
        );
        let _ = writeln!(
            out,
            "# TYPE derp_mesh_key_mismatches_total counter\nderp_mesh_key_mismatches_total {}",
            l(&self.mesh_key_mismatches)
        );
        let _ = writeln!(out, "# TYPE derp_drops_total counter");
        for (d, c) in Drop::ALL.iter().zip(&self.drops) {
            let _ = writeln!(out, "derp_drops_total{{reason=\"{}\"}} {}", d.label(), l(c));
        }
        out
    }
}
