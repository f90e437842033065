//! Every metric weir exports, defined once: names carry the `weir_` prefix and their unit, labels
//! are bounded (input, rule, kind, reason, connection, stage; never the device).
//!
//! [`http`] serves them at `/metrics` next to `/healthz` and `/readyz`.

pub mod http;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Latency buckets from 50 us to 60 s, roughly x2.5 per step.
const LATENCY_BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 5.0, 15.0, 60.0,
];

/// The two broker connections, as the `connection` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    /// Subscribes and receives readings.
    Source,
    /// Publishes derived events.
    Sink,
}

impl Connection {
    pub fn label(self) -> &'static str {
        match self {
            Connection::Source => "source",
            Connection::Sink => "sink",
        }
    }
}

/// Handles to every metric; cloned handles are cheap (`Arc` inside).
pub struct Metrics {
    registry: Registry,
    pub readings_received: IntCounterVec,
    pub received_bytes: IntCounterVec,
    pub readings_decoded: IntCounterVec,
    pub decode_errors: IntCounterVec,
    pub readings_unmatched: IntCounter,
    pub readings_refused: IntCounterVec,
    pub readings_out_of_order: IntCounterVec,
    pub readings_late: IntCounterVec,
    pub windows_open: IntGaugeVec,
    pub events_emitted: IntCounterVec,
    pub events_published: IntCounterVec,
    pub publish_errors: IntCounterVec,
    pub mqtt_connected: IntGaugeVec,
    pub mqtt_reconnects: IntCounterVec,
    pub subscriptions_active: IntGauge,
    pub queue_depth: IntGaugeVec,
    pub devices_tracked: IntGauge,
    pub dead_letters: IntCounterVec,
    pub duplicates_dropped: IntCounterVec,
    pub outbox_messages: IntGauge,
    pub outbox_dropped: IntCounterVec,
    pub snapshots_written: IntCounter,
    pub inputs_acked: IntCounter,
    pub devices_offline: IntGaugeVec,
    pub processing_latency: Histogram,
    pub event_latency: HistogramVec,
    build_info: IntGaugeVec,
    subscribed: AtomicBool,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|err| panic!("metric {name} is malformed: {err}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|err| panic!("metric {name} registered twice: {err}"));
    metric
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|err| panic!("metric {name} is malformed: {err}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|err| panic!("metric {name} registered twice: {err}"));
    metric
}

impl Metrics {
    /// Creates and registers every metric. Panics only on a programming error (a malformed or
    /// duplicate definition), which the unit tests exercise.
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let processing_latency = Histogram::with_opts(
            HistogramOpts::new(
                "weir_processing_latency_seconds",
                "Time from a reading's arrival to the publish of an event it caused.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .unwrap_or_else(|err| panic!("latency histogram: {err}"));
        registry
            .register(Box::new(processing_latency.clone()))
            .unwrap_or_else(|err| panic!("latency histogram: {err}"));
        let event_latency = HistogramVec::new(
            HistogramOpts::new(
                "weir_event_latency_seconds",
                "Time from an event's event time (payload clock) to its publish, by rule.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["rule"],
        )
        .unwrap_or_else(|err| panic!("event latency histogram: {err}"));
        registry
            .register(Box::new(event_latency.clone()))
            .unwrap_or_else(|err| panic!("event latency histogram: {err}"));
        let subscriptions_active = IntGauge::new(
            "weir_mqtt_subscriptions_active",
            "Topic filters currently subscribed on the source connection.",
        )
        .unwrap_or_else(|err| panic!("subscriptions gauge: {err}"));
        registry
            .register(Box::new(subscriptions_active.clone()))
            .unwrap_or_else(|err| panic!("subscriptions gauge: {err}"));
        let devices_tracked = IntGauge::new(
            "weir_devices_tracked",
            "Devices with operator state, over all workers.",
        )
        .unwrap_or_else(|err| panic!("devices gauge: {err}"));
        registry
            .register(Box::new(devices_tracked.clone()))
            .unwrap_or_else(|err| panic!("devices gauge: {err}"));
        let outbox_messages = IntGauge::new(
            "weir_outbox_messages",
            "Derived events queued for the broker or awaiting its acknowledgement.",
        )
        .unwrap_or_else(|err| panic!("outbox gauge: {err}"));
        registry
            .register(Box::new(outbox_messages.clone()))
            .unwrap_or_else(|err| panic!("outbox gauge: {err}"));
        let snapshots_written = IntCounter::new(
            "weir_snapshots_written_total",
            "State snapshots written to the state dir.",
        )
        .unwrap_or_else(|err| panic!("snapshot counter: {err}"));
        registry
            .register(Box::new(snapshots_written.clone()))
            .unwrap_or_else(|err| panic!("snapshot counter: {err}"));
        let inputs_acked = IntCounter::new(
            "weir_inputs_acked_total",
            "QoS 1 inputs acknowledged to the broker after they were logged durably.",
        )
        .unwrap_or_else(|err| panic!("ack counter: {err}"));
        registry
            .register(Box::new(inputs_acked.clone()))
            .unwrap_or_else(|err| panic!("ack counter: {err}"));
        let readings_unmatched = IntCounter::new(
            "weir_readings_unmatched_total",
            "Messages whose topic matched no input pattern (dropped).",
        )
        .unwrap_or_else(|err| panic!("unmatched counter: {err}"));
        registry
            .register(Box::new(readings_unmatched.clone()))
            .unwrap_or_else(|err| panic!("unmatched counter: {err}"));
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            // Registration fails only where /proc is unreadable; weir works without it.
            let _ = registry.register(Box::new(process));
        }

        let metrics = Self {
            readings_received: counter_vec(
                r,
                "weir_readings_received_total",
                "MQTT messages received, by input.",
                &["input"],
            ),
            received_bytes: counter_vec(
                r,
                "weir_received_bytes_total",
                "Payload bytes received, by input.",
                &["input"],
            ),
            readings_decoded: counter_vec(
                r,
                "weir_readings_decoded_total",
                "Readings decoded and handed to the rules, by input.",
                &["input"],
            ),
            decode_errors: counter_vec(
                r,
                "weir_decode_errors_total",
                "Payloads that could not be decoded, by input and reason; each is skipped.",
                &["input", "reason"],
            ),
            readings_refused: counter_vec(
                r,
                "weir_readings_refused_total",
                "Readings refused before the rules, by input and reason (device_limit).",
                &["input", "reason"],
            ),
            readings_out_of_order: counter_vec(
                r,
                "weir_readings_out_of_order_total",
                "Readings older than the device's last, ignored by order-sensitive rules.",
                &["rule"],
            ),
            readings_late: counter_vec(
                r,
                "weir_readings_late_total",
                "Readings window rules could not apply, by rule and reason (late, future, window_limit).",
                &["rule", "reason"],
            ),
            windows_open: gauge_vec(
                r,
                "weir_windows_open",
                "Windows held by window rules (open, or fired and kept for allowed lateness), by rule.",
                &["rule"],
            ),
            events_emitted: counter_vec(
                r,
                "weir_events_emitted_total",
                "Derived events produced by the rules, by rule and kind.",
                &["rule", "kind"],
            ),
            events_published: counter_vec(
                r,
                "weir_events_published_total",
                "Derived events handed to the broker connection, by rule.",
                &["rule"],
            ),
            publish_errors: counter_vec(
                r,
                "weir_publish_errors_total",
                "Publishes that failed, by rule.",
                &["rule"],
            ),
            mqtt_connected: gauge_vec(
                r,
                "weir_mqtt_connected",
                "1 while the connection to the broker is up, by connection (source, sink).",
                &["connection"],
            ),
            mqtt_reconnects: counter_vec(
                r,
                "weir_mqtt_reconnects_total",
                "Connection losses followed by a reconnect attempt, by connection.",
                &["connection"],
            ),
            queue_depth: gauge_vec(
                r,
                "weir_queue_depth",
                "Messages waiting in the bounded channel in front of a stage.",
                &["stage"],
            ),
            dead_letters: counter_vec(
                r,
                "weir_dead_letters_total",
                "Inputs that could not become readings, sent to the dead-letter path, by input and reason.",
                &["input", "reason"],
            ),
            duplicates_dropped: counter_vec(
                r,
                "weir_duplicates_dropped_total",
                "Redelivered inputs recognised and not applied twice, by input.",
                &["input"],
            ),
            outbox_dropped: counter_vec(
                r,
                "weir_outbox_dropped_total",
                "Derived events dropped because the outbox was full, by policy (drop_oldest, drop_newest).",
                &["policy"],
            ),
            devices_offline: gauge_vec(
                r,
                "weir_devices_offline",
                "Devices a liveness rule currently reports offline, by rule.",
                &["rule"],
            ),
            build_info: gauge_vec(
                r,
                "weir_build_info",
                "Always 1; the labels carry the version.",
                &["version"],
            ),
            registry,
            subscriptions_active,
            devices_tracked,
            outbox_messages,
            snapshots_written,
            inputs_acked,
            readings_unmatched,
            processing_latency,
            event_latency,
            subscribed: AtomicBool::new(false),
        };
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for connection in [Connection::Source, Connection::Sink] {
            metrics
                .mqtt_connected
                .with_label_values(&[connection.label()])
                .set(0);
            metrics
                .mqtt_reconnects
                .with_label_values(&[connection.label()]);
        }
        metrics
    }

    /// Pre-creates the per-input and per-rule series at zero, so dashboards and `rate()` see them
    /// before the first occurrence.
    pub fn register_labels<'a>(
        &self,
        inputs: impl IntoIterator<Item = &'a str>,
        rules: impl IntoIterator<Item = (&'a str, &'static str)>,
    ) {
        for input in inputs {
            self.readings_received.with_label_values(&[input]);
            self.received_bytes.with_label_values(&[input]);
            self.readings_decoded.with_label_values(&[input]);
            self.duplicates_dropped.with_label_values(&[input]);
            for reason in crate::decode::DecodeError::REASONS {
                self.decode_errors.with_label_values(&[input, reason]);
                self.dead_letters.with_label_values(&[input, reason]);
            }
        }
        for (rule, kind) in rules {
            self.events_emitted.with_label_values(&[rule, kind]);
            self.events_published.with_label_values(&[rule]);
            self.publish_errors.with_label_values(&[rule]);
            for reason in crate::operators::window::LateReason::ALL {
                self.readings_late
                    .with_label_values(&[rule, reason.label()]);
            }
            self.readings_out_of_order.with_label_values(&[rule]);
        }
    }

    /// Records a connection coming up or going down.
    pub fn set_connected(&self, connection: Connection, up: bool) {
        self.mqtt_connected
            .with_label_values(&[connection.label()])
            .set(i64::from(up));
        if connection == Connection::Source && !up {
            self.set_subscribed(0);
        }
    }

    /// Records the number of active subscriptions on the source connection.
    pub fn set_subscribed(&self, filters: usize) {
        self.subscriptions_active.set(filters as i64);
        self.subscribed.store(filters > 0, Ordering::Relaxed);
    }

    /// Ready means: the source is connected and subscribed (what `/readyz` reports).
    pub fn is_ready(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed)
            && self
                .mqtt_connected
                .with_label_values(&[Connection::Source.label()])
                .get()
                == 1
    }

    /// Records the arrival-to-publish latency of one published event.
    pub fn observe_latency(&self, latency: Duration) {
        self.processing_latency.observe(latency.as_secs_f64());
    }

    /// Total messages received over all inputs (for the demo's live line).
    pub fn readings_total(&self) -> u64 {
        sum_counters(&self.registry, "weir_readings_received_total")
    }

    /// Total derived events published over all rules (for the demo's live line).
    pub fn events_total(&self) -> u64 {
        sum_counters(&self.registry, "weir_events_published_total")
    }

    /// Total decode errors over all inputs and reasons.
    pub fn decode_errors_total(&self) -> u64 {
        sum_counters(&self.registry, "weir_decode_errors_total")
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buffer = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = encoder.encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn sum_counters(registry: &Registry, name: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric())
        .map(|metric| metric.get_counter().get_value() as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_the_prefix_and_renders() {
        let metrics = Metrics::new();
        metrics.register_labels(["telemetry"], [("overheat", "state_change")]);
        metrics
            .readings_received
            .with_label_values(&["telemetry"])
            .inc();
        let text = metrics.render();
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split_whitespace().nth(2).unwrap_or_default();
            assert!(
                name.starts_with("weir_") || name.starts_with("process_"),
                "{name}"
            );
        }
        assert_eq!(metrics.readings_total(), 1);
        assert!(text.contains("weir_processing_latency_seconds_bucket"));
    }
}
