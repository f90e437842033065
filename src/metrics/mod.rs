//! Every metric weir exports, defined once: names carry the `weir_` prefix and their unit, labels
//! are bounded (input, rule, kind, reason, connection, stage; never the device).
//!
//! `telemetry::http` serves them at `/metrics` next to `/healthz`, `/readyz`, `/api/rules` and the live
//! tap `/api/events` ([`tap`]). [`latency`] holds the hdrhistogram-backed latency metrics;
//! [`warn`] the rate limit for repeated warnings.

pub mod latency;
pub mod spans;
pub mod tap;
pub mod warn;

pub use latency::{Latency, LatencyRecorder};
pub use tap::{Tap, TapEvent};
pub use warn::WarnLimit;

use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

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

/// The bounded `reason` label values the stages define, passed in so this module needs nothing
/// of theirs (the engine has the full set: `engine::REASONS`).
#[derive(Debug, Clone, Copy)]
pub struct Reasons {
    /// Why an input did not become a reading (`weir_decode_errors_total`, dead letters).
    pub decode: &'static [&'static str],
    /// Why a reading was not applied to its windows (`weir_readings_late_total`).
    pub late: &'static [&'static str],
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
    pub dead_letters: IntCounterVec,
    pub duplicates_dropped: IntCounterVec,
    pub outbox_dropped: IntCounterVec,
    pub snapshots_written: IntCounter,
    pub inputs_acked: IntCounter,
    pub devices_offline: IntGaugeVec,
    pub devices_evicted: IntCounterVec,
    pub events_emitted: IntCounterVec,
    pub publish_attempts: IntCounterVec,
    pub events_published: IntCounterVec,
    pub publish_errors: IntCounterVec,
    /// Over every sink; each sink's own count is `sink_outbox`.
    pub outbox_messages: IntGauge,
    pub sink_outbox: IntGaugeVec,
    pub sink_up: IntGaugeVec,
    pub sink_sent: IntCounterVec,
    pub sink_confirmed: IntCounterVec,
    pub sink_retries: IntCounterVec,
    pub sink_dead_letters: IntCounterVec,
    /// Event time to the sink's acknowledgement (or handover, unconfirmed), by sink.
    pub sink_latency: Latency,
    pub mqtt_connected: IntGaugeVec,
    pub mqtt_reconnects: IntCounterVec,
    /// Incoming packets over `broker.max_packet_bytes` that dropped the connection.
    pub mqtt_oversized_packets: IntCounter,
    /// Failed writes to the state dir, by file (`log`, `snapshot`).
    pub store_write_errors: IntCounterVec,
    /// 1 while the input log can be written; 0 while inputs wait for the disk unacknowledged.
    pub store_writable: IntGauge,
    pub subscriptions_active: IntGauge,
    pub queue_depth: IntGaugeVec,
    pub queue_capacity: IntGaugeVec,
    pub devices_tracked: IntGauge,
    /// Reloads by result (`applied`, `refused`).
    pub config_reloads: IntCounterVec,
    /// 1 if the last reload was applied (or none was asked for), 0 if it was refused.
    pub config_last_reload_successful: IntGauge,
    /// Set from the workers' [`WorkerStats`] at scrape time.
    rule_devices: IntGaugeVec,
    /// Kept by the workers as windows open and close.
    pub windows_open: IntGaugeVec,
    watermark_lag: GaugeVec,
    /// Arrival to publish; recorded by the sink.
    pub processing_latency: Latency,
    /// Event time to publish, by rule; recorded by the sink.
    pub event_latency: Latency,
    /// The live tap of derived events. It lives here because `Metrics` is the handle every
    /// stage already holds; its clients and skips are metrics too.
    pub tap: Tap,
    pub trace_context_invalid: IntCounterVec,
    /// Spans of derived events, exported over OTLP (with the `otlp` feature); here for the same
    /// reason as the tap.
    pub spans: crate::metrics::spans::Spans,
    pub otlp_spans_exported: IntCounter,
    pub otlp_spans_dropped: IntCounterVec,
    /// `[cluster]`: partitions, handovers, replay, lag and leases.
    pub cluster: ClusterMetrics,
    build_info: IntGaugeVec,
    subscribed: AtomicBool,
    /// Why the input log cannot be written right now (what `/readyz` says), if it cannot.
    store_fault: Mutex<Option<String>>,
    /// Input and rule names by index, for the per-worker state gauges.
    names: RwLock<(Vec<String>, Vec<String>)>,
    workers: Mutex<Vec<Arc<WorkerStats>>>,
}

/// What a `[cluster]` instance reports about its share of the partitions.
pub struct ClusterMetrics {
    pub partitions_owned: IntGauge,
    /// Times this instance took up a new set of partitions (a join, a leave or a death moved
    /// some), after its first.
    pub handovers: IntCounter,
    /// Time from taking up a set of partitions to having read the stream up to its end.
    pub replay_seconds: prometheus::Gauge,
    /// Readings read in that time.
    pub replayed_readings: IntGauge,
    /// Readings of its partitions not yet delivered to this instance (its consumers' pending
    /// counts together).
    pub lag_messages: IntGauge,
    /// The same per owned partition (its consumer's pending count); partitions not owned
    /// have no series.
    pub partition_lag_messages: IntGaugeVec,
    pub lease_renew_failures: IntCounter,
    /// Partition snapshots saved to the cluster's state store, and their total size.
    pub state_saved: IntCounter,
    pub state_bytes: IntGauge,
}

impl ClusterMetrics {
    fn new(r: &Registry) -> Self {
        Self {
            partitions_owned: gauge(r, "weir_cluster_partitions_owned", "Partitions this instance owns and reads."),
            handovers: counter(r, "weir_cluster_handovers_total", "Times this instance took up a changed set of partitions (join, leave or death of a member)."),
            replay_seconds: register(
                r,
                prometheus::Gauge::new(
                    "weir_cluster_replay_seconds",
                    "Time from taking up its partitions to having read their readings up to the stream's end, at the last handover.",
                )
                .unwrap_or_else(|err| panic!("replay seconds: {err}")),
            ),
            replayed_readings: gauge(r, "weir_cluster_replayed_readings", "Readings read to catch up at the last handover."),
            lag_messages: gauge(r, "weir_cluster_lag_messages", "Readings of its partitions in the stream not yet delivered to this instance."),
            partition_lag_messages: gauge_vec(r, "weir_cluster_partition_lag_messages", "Readings of a partition this instance owns in the stream not yet delivered to it.", &["partition"]),
            lease_renew_failures: counter(r, "weir_cluster_lease_renew_failures_total", "Renewals of partition claims or of the member heartbeat that failed."),
            state_saved: counter(r, "weir_cluster_state_saved_total", "Partition snapshots saved to the cluster's state store."),
            state_bytes: gauge(r, "weir_cluster_state_bytes", "Size of this instance's last saved partition snapshots, together."),
        }
    }
}

/// What one worker reports about its state. Each worker writes only its own (about once a
/// second), a scrape sums them; nothing contends on the hot path.
#[derive(Debug)]
pub struct WorkerStats {
    /// Devices with state, by rule index.
    pub rule_devices: Vec<AtomicU64>,
    /// Newest event time seen (ms since the epoch), by input index; `i64::MIN` before any.
    pub newest_event_ms: Vec<AtomicI64>,
}

/// The state sizes of one rule, over all workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleState {
    pub devices: u64,
    pub open_windows: u64,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|err| panic!("metric registered twice: {err}"));
    metric
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help)
        .unwrap_or_else(|err| panic!("metric {name} is malformed: {err}"));
    register(registry, metric)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric =
        IntGauge::new(name, help).unwrap_or_else(|err| panic!("metric {name} is malformed: {err}"));
    register(registry, metric)
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|err| panic!("metric {name} is malformed: {err}"));
    register(registry, metric)
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|err| panic!("metric {name} is malformed: {err}"));
    register(registry, metric)
}

impl Metrics {
    /// Creates and registers every metric. Panics only on a programming error (a malformed or
    /// duplicate definition), which the unit tests exercise.
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let processing_latency = register(
            r,
            Latency::new(
                (
                    "weir_processing_latency_seconds",
                    "Time from a reading's arrival to the publish of an event it caused.",
                ),
                (
                    "weir_processing_latency_recent_seconds",
                    "Arrival to publish: exact quantiles (within 1%) over the last 1-2 minutes.",
                ),
                None,
            ),
        );
        processing_latency.register("");
        let sink_latency = register(
            r,
            Latency::new(
                (
                    "weir_sink_latency_seconds",
                    "Time from an event's event time to its acknowledgement by the sink (its handover, for events not confirmed), by sink.",
                ),
                (
                    "weir_sink_latency_recent_seconds",
                    "Recent quantiles (last 1-2 min) of weir_sink_latency_seconds, by sink.",
                ),
                Some("sink"),
            ),
        );
        let event_latency = register(
            r,
            Latency::new(
                (
                    "weir_event_latency_seconds",
                    "Time from an event's event time (payload clock) to its publish, by rule.",
                ),
                (
                    "weir_event_latency_recent_seconds",
                    "Event time to publish, by rule: exact quantiles over the last 1-2 minutes.",
                ),
                Some("rule"),
            ),
        );
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            // Registration fails only where /proc is unreadable; weir works without it.
            let _ = registry.register(Box::new(process));
        }
        let watermark_lag = register(
            r,
            GaugeVec::new(
                Opts::new(
                    "weir_watermark_lag_seconds",
                    "Wall clock minus the newest event time seen on the input (0 when ahead).",
                ),
                &["input"],
            )
            .unwrap_or_else(|err| panic!("watermark lag: {err}")),
        );
        let tap = Tap::new(
            gauge(
                r,
                "weir_tap_clients",
                "Clients watching the live tap (/api/events).",
            ),
            counter(
                r,
                "weir_tap_events_skipped_total",
                "Derived events a slow tap client skipped (the pipeline never waits for it).",
            ),
        );

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
            readings_unmatched: counter(
                r,
                "weir_readings_unmatched_total",
                "Messages whose topic matched no input pattern (dropped).",
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
                "Readings a window rule could not apply, by rule and reason (late, future, window_limit).",
                &["rule", "reason"],
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
                "Derived events dropped because a sink's outbox was full, by sink and policy (drop_oldest, drop_newest).",
                &["sink", "policy"],
            ),
            snapshots_written: counter(
                r,
                "weir_snapshots_written_total",
                "State snapshots written to the state dir.",
            ),
            inputs_acked: counter(
                r,
                "weir_inputs_acked_total",
                "QoS 1 inputs acknowledged to the broker after they were logged durably.",
            ),
            devices_evicted: counter_vec(
                r,
                "weir_devices_evicted_total",
                "Devices forgotten to make room for new ones at max_devices_per_worker, by input.",
                &["input"],
            ),
            devices_offline: gauge_vec(
                r,
                "weir_devices_offline",
                "Devices a liveness rule currently reports offline, by rule.",
                &["rule"],
            ),
            events_emitted: counter_vec(
                r,
                "weir_events_emitted_total",
                "Derived events produced by the rules, by rule and kind.",
                &["rule", "kind"],
            ),
            publish_attempts: counter_vec(
                r,
                "weir_publish_attempts_total",
                "Derived events offered to the broker connection, by rule.",
                &["rule"],
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
            outbox_messages: gauge(
                r,
                "weir_outbox_messages",
                "Derived events queued for a sink or awaiting its acknowledgement, over all sinks.",
            ),
            sink_outbox: gauge_vec(
                r,
                "weir_sink_outbox_messages",
                "Derived events queued for the sink or awaiting its acknowledgement, by sink.",
                &["sink"],
            ),
            sink_up: gauge_vec(
                r,
                "weir_sink_up",
                "1 while the sink's service takes events, 0 while it is away (events wait in the outbox), by sink.",
                &["sink"],
            ),
            sink_sent: counter_vec(
                r,
                "weir_sink_sent_total",
                "Events handed to the sink's connection (a retry is not counted again), by sink.",
                &["sink"],
            ),
            sink_confirmed: counter_vec(
                r,
                "weir_sink_confirmed_total",
                "Events the sink's service acknowledged (HTTP 2xx, publisher confirm, committed insert, PUBACK), by sink.",
                &["sink"],
            ),
            sink_retries: counter_vec(
                r,
                "weir_sink_retries_total",
                "Requests, publishes or inserts tried again after a failure, timeout or refusal, by sink.",
                &["sink"],
            ),
            sink_dead_letters: counter_vec(
                r,
                "weir_sink_dead_letters_total",
                "Events the sink's service refused for good, sent to the dead-letter path, by sink and reason.",
                &["sink", "reason"],
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
            mqtt_oversized_packets: counter(
                r,
                "weir_mqtt_oversized_packets_total",
                "Incoming packets larger than broker.max_packet_bytes: each dropped the source connection once and is read on the next one, to be dead-lettered as too_large.",
            ),
            store_write_errors: counter_vec(
                r,
                "weir_store_write_errors_total",
                "Failed writes to the state dir (disk full, I/O error), by file: log (retried until it works; inputs stay unacknowledged meanwhile) or snapshot (the previous one stays).",
                &["file"],
            ),
            store_writable: gauge(
                r,
                "weir_store_writable",
                "1 while the input log can be written to the state dir; 0 while it cannot, when inputs are not acknowledged and the broker holds them.",
            ),
            subscriptions_active: gauge(
                r,
                "weir_mqtt_subscriptions_active",
                "Topic filters currently subscribed on the source connection.",
            ),
            queue_depth: gauge_vec(
                r,
                "weir_queue_depth",
                "Messages waiting in the bounded channel in front of a stage.",
                &["stage"],
            ),
            queue_capacity: gauge_vec(
                r,
                "weir_queue_capacity",
                "Capacity of the bounded channel(s) in front of a stage.",
                &["stage"],
            ),
            devices_tracked: gauge(
                r,
                "weir_devices_tracked",
                "Devices with operator state, over all workers.",
            ),
            config_reloads: counter_vec(
                r,
                "weir_config_reloads_total",
                "Config reloads (SIGHUP or POST /api/reload) by result: applied or refused.",
                &["result"],
            ),
            config_last_reload_successful: gauge(
                r,
                "weir_config_last_reload_successful",
                "1 if the last config reload was applied (or none was asked for), 0 if it was refused.",
            ),
            rule_devices: gauge_vec(
                r,
                "weir_rule_devices",
                "Devices with state in the rule, over all workers.",
                &["rule"],
            ),
            windows_open: gauge_vec(
                r,
                "weir_windows_open",
                "Windows open (not yet fired) in the rule, over all devices.",
                &["rule"],
            ),
            trace_context_invalid: counter_vec(
                r,
                "weir_trace_context_invalid_total",
                "Inputs whose traceparent user property was not valid W3C trace context (ignored; the reading is processed), by input.",
                &["input"],
            ),
            spans: crate::metrics::spans::Spans::default(),
            otlp_spans_exported: counter(
                r,
                "weir_otlp_spans_exported_total",
                "Spans of derived events the OTLP collector accepted.",
            ),
            otlp_spans_dropped: counter_vec(
                r,
                "weir_otlp_spans_dropped_total",
                "Spans of derived events not exported, by reason (queue_full: the newest are dropped while the queue is full; export_failed: the collector refused or was unreachable).",
                &["reason"],
            ),
            cluster: ClusterMetrics::new(r),
            build_info: gauge_vec(
                r,
                "weir_build_info",
                "Always 1; the labels carry the version.",
                &["version"],
            ),
            registry,
            watermark_lag,
            processing_latency,
            event_latency,
            sink_latency,
            tap,
            subscribed: AtomicBool::new(false),
            store_fault: Mutex::new(None),
            names: RwLock::new((Vec::new(), Vec::new())),
            workers: Mutex::new(Vec::new()),
        };
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for result in ["applied", "refused"] {
            metrics.config_reloads.with_label_values(&[result]);
        }
        metrics.config_last_reload_successful.set(1);
        metrics.store_writable.set(1);
        for file in ["log", "snapshot"] {
            metrics.store_write_errors.with_label_values(&[file]);
        }
        for reason in ["queue_full", "export_failed"] {
            metrics.otlp_spans_dropped.with_label_values(&[reason]);
        }
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

    /// Pre-creates the series of sink `name` at zero.
    pub fn register_sink(&self, name: &str) {
        for policy in ["drop_oldest", "drop_newest"] {
            self.outbox_dropped.with_label_values(&[name, policy]);
        }
        self.sink_outbox.with_label_values(&[name]);
        self.sink_up.with_label_values(&[name]);
        self.sink_sent.with_label_values(&[name]);
        self.sink_confirmed.with_label_values(&[name]);
        self.sink_retries.with_label_values(&[name]);
        self.sink_latency.register(name);
    }

    /// Pre-creates the per-input and per-rule series at zero, so dashboards and `rate()` see them
    /// before the first occurrence.
    pub fn register_labels<'a>(
        &self,
        inputs: impl IntoIterator<Item = &'a str>,
        rules: impl IntoIterator<Item = (&'a str, &'static str)>,
        reasons: &Reasons,
    ) {
        let mut names = self.names.write().unwrap_or_else(PoisonError::into_inner);
        for input in inputs {
            self.readings_received.with_label_values(&[input]);
            self.received_bytes.with_label_values(&[input]);
            self.readings_decoded.with_label_values(&[input]);
            self.duplicates_dropped.with_label_values(&[input]);
            self.devices_evicted.with_label_values(&[input]);
            self.trace_context_invalid.with_label_values(&[input]);
            for reason in reasons.decode {
                self.decode_errors.with_label_values(&[input, reason]);
                self.dead_letters.with_label_values(&[input, reason]);
            }
            names.0.push(input.to_owned());
        }
        drop(names);
        self.set_rules(rules, reasons);
    }

    /// Registers the label values of the rules (as (name, event kind) pairs, a rule's pairs next
    /// to each other) and makes them the rules the per-worker state gauges are summed by, in
    /// plan order. Called at start and by every reload.
    pub fn set_rules<'a>(
        &self,
        rules: impl IntoIterator<Item = (&'a str, &'static str)>,
        reasons: &Reasons,
    ) {
        let mut order: Vec<String> = Vec::new();
        for (rule, kind) in rules {
            self.events_emitted.with_label_values(&[rule, kind]);
            if order.last().is_some_and(|last| last == rule) {
                continue;
            }
            self.publish_attempts.with_label_values(&[rule]);
            self.events_published.with_label_values(&[rule]);
            self.publish_errors.with_label_values(&[rule]);
            for reason in reasons.late {
                self.readings_late.with_label_values(&[rule, reason]);
            }
            self.readings_out_of_order.with_label_values(&[rule]);
            self.rule_devices.with_label_values(&[rule]);
            self.windows_open.with_label_values(&[rule]);
            self.event_latency.register(rule);
            order.push(rule.to_owned());
        }
        let mut names = self.names.write().unwrap_or_else(PoisonError::into_inner);
        for gone in names.1.iter().filter(|name| !order.contains(name)) {
            // A removed rule has no devices any more (its counters keep their totals).
            self.rule_devices.with_label_values(&[gone]).set(0);
        }
        names.1 = order;
    }

    /// Forgets a worker's slot (the worker replaced it after a reload).
    pub fn retire_worker_stats(&self, stats: &Arc<WorkerStats>) {
        self.workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|w| !Arc::ptr_eq(w, stats));
    }

    /// A worker's slot for reporting its state sizes; summed at scrape time.
    pub fn worker_stats(&self, rules: usize, inputs: usize) -> Arc<WorkerStats> {
        let stats = Arc::new(WorkerStats {
            rule_devices: (0..rules).map(|_| AtomicU64::new(0)).collect(),
            newest_event_ms: (0..inputs).map(|_| AtomicI64::new(i64::MIN)).collect(),
        });
        self.workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(stats.clone());
        stats
    }

    /// The state sizes of rule `rule` (its index in the plan), over all workers.
    pub fn rule_state(&self, rule: usize) -> RuleState {
        let workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        let sum = |pick: fn(&WorkerStats) -> &Vec<AtomicU64>| {
            workers
                .iter()
                .filter_map(|w| pick(w).get(rule))
                .map(|n| n.load(Ordering::Relaxed))
                .sum()
        };
        let open_windows = self
            .names
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .get(rule)
            .map_or(0, |name| self.windows_open.with_label_values(&[name]).get());
        RuleState {
            devices: sum(|w| &w.rule_devices),
            open_windows: u64::try_from(open_windows).unwrap_or(0),
        }
    }

    /// Newest event time seen on input `input` over all workers (ms), if any.
    fn newest_event_ms(&self, input: usize) -> Option<i64> {
        self.workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(|w| w.newest_event_ms.get(input))
            .map(|ms| ms.load(Ordering::Relaxed))
            .max()
            .filter(|ms| *ms != i64::MIN)
    }

    /// Sets the gauges that are sums over the workers' reports.
    fn refresh_worker_gauges(&self) {
        let names = self.names.read().unwrap_or_else(PoisonError::into_inner);
        for (index, rule) in names.1.iter().enumerate() {
            let state = self.rule_state(index);
            let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            self.rule_devices
                .with_label_values(&[rule])
                .set(as_i64(state.devices));
        }
        let now_ms = crate::model::time::wall_clock_ms();
        for (index, input) in names.0.iter().enumerate() {
            if let Some(newest) = self.newest_event_ms(index) {
                let lag = now_ms.saturating_sub(newest).max(0) as f64 / 1e3;
                self.watermark_lag.with_label_values(&[input]).set(lag);
            }
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

    /// Records that the input log cannot be written (`Some(why)`), or can again (`None`).
    pub fn set_store_fault(&self, fault: Option<String>) {
        self.store_writable.set(i64::from(fault.is_none()));
        *self
            .store_fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = fault;
    }

    /// Ready means: the source is connected and subscribed, and the input log (if any) can be
    /// written (what `/readyz` reports).
    pub fn is_ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    /// Why weir is not ready, as a sentence for `/readyz`; `None` when it is.
    pub fn not_ready_reason(&self) -> Option<String> {
        if let Some(fault) = &*self
            .store_fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            return Some(fault.clone());
        }
        let connected = self
            .mqtt_connected
            .with_label_values(&[Connection::Source.label()])
            .get()
            == 1;
        if !connected {
            return Some("not connected to the broker".into());
        }
        if !self.subscribed.load(Ordering::Relaxed) {
            return Some("connected to the broker but not subscribed".into());
        }
        None
    }

    /// Total messages received over all inputs (for the demo's live line).
    pub fn readings_total(&self) -> u64 {
        sum_counters(&self.readings_received)
    }

    /// Total derived events published over all rules (for the demo's live line).
    pub fn events_total(&self) -> u64 {
        sum_counters(&self.events_published)
    }

    /// Total decode errors over all inputs and reasons.
    pub fn decode_errors_total(&self) -> u64 {
        sum_counters(&self.decode_errors)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        self.refresh_worker_gauges();
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

fn sum_counters(counters: &IntCounterVec) -> u64 {
    use prometheus::core::Collector;
    counters
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|metric| metric.get_counter().get_value() as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const REASONS: Reasons = Reasons {
        decode: &["malformed", "too_large"],
        late: &["late"],
    };

    #[test]
    fn every_metric_has_the_prefix_and_renders() {
        let metrics = Metrics::new();
        metrics.register_labels(["telemetry"], [("overheat", "state_change")], &REASONS);
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
        for name in [
            "weir_processing_latency_seconds_bucket",
            "weir_processing_latency_recent_seconds{quantile=\"0.999\"}",
            "weir_event_latency_seconds_bucket{rule=\"overheat\",le=\"0.00005\"}",
            "weir_outbox_messages 0",
            "weir_duplicates_dropped_total{input=\"telemetry\"} 0",
            "weir_windows_open{rule=\"overheat\"} 0",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
    }

    #[test]
    fn worker_reports_are_summed_per_rule_and_give_the_watermark_lag() {
        let metrics = Metrics::new();
        metrics.register_labels(["telemetry"], [("climate", "window")], &REASONS);
        let a = metrics.worker_stats(1, 1);
        let b = metrics.worker_stats(1, 1);
        a.rule_devices[0].store(3, Ordering::Relaxed);
        b.rule_devices[0].store(4, Ordering::Relaxed);
        metrics.windows_open.with_label_values(&["climate"]).set(5);
        assert!(!metrics.render().contains("weir_watermark_lag_seconds{"));
        a.newest_event_ms[0].store(
            crate::model::time::wall_clock_ms() - 60_000,
            Ordering::Relaxed,
        );
        assert_eq!(
            metrics.rule_state(0),
            RuleState {
                devices: 7,
                open_windows: 5
            }
        );
        let text = metrics.render();
        assert!(
            text.contains("weir_rule_devices{rule=\"climate\"} 7"),
            "{text}"
        );
        let lag: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("weir_watermark_lag_seconds{input=\"telemetry\"} "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_default();
        assert!((60.0..70.0).contains(&lag), "{lag}");
    }

    #[test]
    fn rule_gauges_follow_plan_order_and_reloads() {
        let metrics = Metrics::new();
        // overheat emits two kinds; climate must still be rule 1, not 2.
        metrics.register_labels(
            ["telemetry"],
            [
                ("overheat", "state_change"),
                ("overheat", "flapping"),
                ("climate", "window"),
            ],
            &REASONS,
        );
        let stats = metrics.worker_stats(2, 1);
        stats.rule_devices[1].store(9, Ordering::Relaxed);
        let text = metrics.render();
        assert!(
            text.contains("weir_rule_devices{rule=\"climate\"} 9"),
            "{text}"
        );
        assert!(
            text.contains("weir_rule_devices{rule=\"overheat\"} 0"),
            "{text}"
        );

        // A reload drops overheat and adds fresh; the worker replaces its slot.
        metrics.set_rules([("climate", "window"), ("fresh", "state_change")], &REASONS);
        metrics.retire_worker_stats(&stats);
        let stats = metrics.worker_stats(2, 1);
        stats.rule_devices[0].store(4, Ordering::Relaxed);
        let text = metrics.render();
        assert!(
            text.contains("weir_rule_devices{rule=\"climate\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("weir_rule_devices{rule=\"fresh\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("weir_rule_devices{rule=\"overheat\"} 0"),
            "{text}"
        );
    }
}
