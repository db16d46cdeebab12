//! Counters exported on `/metrics` in the OpenMetrics text format.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`]'s text.
pub use platform::OPENMETRICS_CONTENT_TYPE as CONTENT_TYPE;

/// Why a packet or a connection was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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

impl EncodeLabelValue for Drop {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.label(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: Drop,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnswerLabels {
    answer: &'static str,
}

/// The relay's counters and gauges, registered once in their registry.
pub struct Metrics {
    pub clients: Gauge,
    pub accepted: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub packets_in: Counter,
    pub packets_out: Counter,
    /// Node keys the coordinator revoked (pushed on the revocation stream).
    pub revocations: Counter,
    /// Times the admission cache was flushed on the coordinator's word.
    pub revocation_resyncs: Counter,
    /// 1 while the revocation stream to the coordinator is open.
    pub revocation_stream_up: Gauge,
    /// Mesh peers that presented another key than the one configured.
    pub mesh_key_mismatches: Counter,
    /// Admission questions sent to the coordinator.
    pub admission_asks: Counter,
    /// Admission questions not sent: over the budget (treated as no answer).
    pub admission_throttled: Counter,
    drops: Family<DropLabels, Counter>,
    /// Admission answers cached now, set when the metrics are read.
    admission_cached: Family<AnswerLabels, Gauge>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            clients: Gauge::default(),
            accepted: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            packets_in: Counter::default(),
            packets_out: Counter::default(),
            revocations: Counter::default(),
            revocation_resyncs: Counter::default(),
            revocation_stream_up: Gauge::default(),
            mesh_key_mismatches: Counter::default(),
            admission_asks: Counter::default(),
            admission_throttled: Counter::default(),
            drops: Family::default(),
            admission_cached: Family::default(),
            registry: Registry::default(),
        };
        // Every reason and answer is shown, at 0 until it happens.
        for reason in Drop::ALL {
            m.drops.get_or_create_owned(&DropLabels { reason });
        }
        for answer in ["admitted", "refused"] {
            m.admission_cached
                .get_or_create_owned(&AnswerLabels { answer });
        }
        let mut registry = Registry::default();
        // Counters are named without `_total`: the encoder appends it.
        registry.register("derp_clients", "Clients connected now", m.clients.clone());
        registry.register("derp_accepted", "Clients admitted", m.accepted.clone());
        registry.register(
            "derp_bytes_received",
            "Packet bytes received from clients and mesh peers",
            m.bytes_in.clone(),
        );
        registry.register("derp_bytes_sent", "Frame bytes sent", m.bytes_out.clone());
        registry.register(
            "derp_packets_received",
            "Packets received from clients and mesh peers",
            m.packets_in.clone(),
        );
        registry.register("derp_packets_sent", "Frames sent", m.packets_out.clone());
        registry.register(
            "derp_revocations",
            "Node keys the coordinator revoked",
            m.revocations.clone(),
        );
        registry.register(
            "derp_revocation_resyncs",
            "Times the admission cache was flushed on the coordinator's word",
            m.revocation_resyncs.clone(),
        );
        registry.register(
            "derp_revocation_stream_up",
            "1 while the revocation stream to the coordinator is open",
            m.revocation_stream_up.clone(),
        );
        registry.register(
            "derp_admission_asks",
            "Admission questions sent to the coordinator",
            m.admission_asks.clone(),
        );
        registry.register(
            "derp_admission_throttled",
            "Admission questions not sent, over the budget",
            m.admission_throttled.clone(),
        );
        registry.register(
            "derp_mesh_key_mismatches",
            "Mesh peers that presented another key than the one configured",
            m.mesh_key_mismatches.clone(),
        );
        registry.register(
            "derp_drops",
            "Packets and connections dropped, by reason",
            m.drops.clone(),
        );
        registry.register(
            "derp_admission_cached",
            "Admission answers cached, by answer",
            m.admission_cached.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn drop(&self, why: Drop) {
        self.drops.get_or_create(&DropLabels { reason: why }).inc();
    }

    pub fn drops(&self, why: Drop) -> u64 {
        self.drops.get_or_create(&DropLabels { reason: why }).get()
    }

    /// Sets the gauge of cached admission answers.
    pub fn set_admission_cached(&self, admitted: usize, refused: usize) {
        for (answer, n) in [("admitted", admitted), ("refused", refused)] {
            self.admission_cached
                .get_or_create(&AnswerLabels { answer })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Everything, in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_under_the_names_scrapers_know() {
        let m = Metrics::default();
        for _ in 0..3 {
            m.drop(Drop::QueueFull);
        }
        m.clients.inc();
        m.clients.inc();
        m.bytes_in.inc_by(1200);
        m.revocation_stream_up.set(1);
        m.set_admission_cached(4, 1);
        let text = m.render();
        let lines: Vec<&str> = text.lines().collect();
        for line in [
            "derp_drops_total{reason=\"queue_full\"} 3",
            "derp_drops_total{reason=\"too_many_handshakes\"} 0",
            "derp_clients 2",
            "derp_accepted_total 0",
            "derp_bytes_received_total 1200",
            "derp_revocation_stream_up 1",
            "derp_admission_cached{answer=\"admitted\"} 4",
            "derp_admission_cached{answer=\"refused\"} 1",
            "# TYPE derp_drops counter",
            "# TYPE derp_clients gauge",
        ] {
            assert!(lines.contains(&line), "{line} in\n{text}");
        }
        let reasons = lines
            .iter()
            .filter(|l| l.starts_with("derp_drops_total{"))
            .count();
        assert_eq!(reasons, Drop::ALL.len());
        assert_eq!(lines.last(), Some(&"# EOF"));
        assert_eq!(m.drops(Drop::QueueFull), 3);
        assert_eq!(m.drops(Drop::Malformed), 0);
    }
}
