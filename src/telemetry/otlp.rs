//! OTLP export (cargo feature `otlp`): one span per derived event, POSTed as OTLP/HTTP JSON to
//! `observability.otlp_endpoint` in batches (every second, or every [`BATCH_SPANS`] spans).
//!
//! The span of an event is the one whose id its MQTT 5 publish carries in `traceparent`: its
//! trace is the reading's (or a new one when the reading had none), its parent the reading's
//! span, its name the rule's, and it lasts from the reading's arrival to the event's routing.
//!
//! Written over a plain tokio `TcpStream` instead of with the opentelemetry crates, on purpose:
//! `opentelemetry-otlp` over HTTP brings an HTTP client stack (reqwest or hyper-util, and the
//! SDK with its own batch processor and runtime glue), dozens of crates for one POST a second.
//! And the SDK creates span ids itself, while weir must choose each span's id (the one already
//! published in the event's `traceparent`) and its remote parent; that takes a custom id
//! generator and a fake remote context per event. One hand-written POST of a JSON document,
//! whose schema is stable (OTLP 1.x), is less code than that glue.
//!
//! The queue between the workers and the exporter is bounded ([`QUEUE_CAPACITY`]). When it is
//! full (the collector is slow or away), the newest spans are dropped and counted
//! (`weir_otlp_spans_dropped_total{reason="queue_full"}`): tracing never slows the pipeline.
//! A batch the collector refuses or cannot take is dropped and counted (`export_failed`), not
//! retried: the next second brings the next batch.

use crate::config::endpoint::OtlpEndpoint;
use crate::metrics::spans::otlp::{Channel, Span};
use crate::metrics::{Metrics, WarnLimit};
use crate::model::trace::hex_encode;
use prometheus::IntCounter;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Spans waiting for export; beyond it the newest are dropped.
pub const QUEUE_CAPACITY: usize = 4096;
/// Spans per POST at most.
pub const BATCH_SPANS: usize = 512;
/// A partial batch is sent after this long.
pub const BATCH_INTERVAL: Duration = Duration::from_secs(1);
/// One POST (connect, send, read the status) may take this long.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// At shutdown, the spans still queued get this long to go out.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);
/// OTLP `SPAN_KIND_PRODUCER`: the span ends with a message published.
const SPAN_KIND_PRODUCER: u8 = 4;

/// The running exporter.
pub struct Exporter {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Exporter {
    /// Sends what is queued (within [`SHUTDOWN_FLUSH`]) and stops. Call it after the workers
    /// have ended, so every event's span is queued.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(SHUTDOWN_FLUSH, &mut task)
            .await
            .is_err()
        {
            task.abort();
            tracing::warn!("the OTLP exporter did not finish within {SHUTDOWN_FLUSH:?}; the spans still queued are lost");
        }
    }
}

/// Starts exporting the spans `metrics.spans` records to `endpoint`. `instance` names this weir
/// (`service.instance.id`; the broker client id). Only the first call in a process (per
/// `Metrics`) starts one; later ones return `None`.
pub fn start(endpoint: OtlpEndpoint, instance: &str, metrics: &Arc<Metrics>) -> Option<Exporter> {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let channel = Channel {
        tx,
        queue_full: metrics
            .otlp_spans_dropped
            .with_label_values(&["queue_full"]),
    };
    metrics.spans.queue.channel.set(channel).ok()?;
    let (stop, stopped) = oneshot::channel();
    let batches = Batches {
        endpoint,
        resource: resource(instance),
        exported: metrics.otlp_spans_exported.clone(),
        failed: metrics
            .otlp_spans_dropped
            .with_label_values(&["export_failed"]),
        warnings: WarnLimit::new(Duration::from_secs(60)),
    };
    // The base path may carry a query with a token (`/otlp?api_key=...`).
    let shown = format!(
        "http://{}:{}{}",
        batches.endpoint.host, batches.endpoint.port, batches.endpoint.path
    );
    tracing::info!(endpoint = %crate::config::redact_url(&shown), "exporting a span per derived event over OTLP");
    let task = tokio::spawn(batches.run(rx, stopped));
    Some(Exporter { stop, task })
}

/// The exporter task's state.
struct Batches {
    endpoint: OtlpEndpoint,
    /// The `resource` object of every request, built once.
    resource: serde_json::Value,
    exported: IntCounter,
    failed: IntCounter,
    warnings: WarnLimit,
}

impl Batches {
    async fn run(mut self, mut rx: mpsc::Receiver<Span>, mut stop: oneshot::Receiver<()>) {
        let mut batch = Vec::with_capacity(BATCH_SPANS);
        let mut tick = tokio::time::interval(BATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let room = BATCH_SPANS - batch.len();
            tokio::select! {
                _ = &mut stop => break,
                received = rx.recv_many(&mut batch, room) => {
                    if received == 0 {
                        break;
                    }
                    if batch.len() < BATCH_SPANS {
                        continue;
                    }
                }
                _ = tick.tick() => {
                    if batch.is_empty() {
                        continue;
                    }
                }
            }
            self.export(&mut batch).await;
        }
        while let Ok(span) = rx.try_recv() {
            batch.push(span);
            if batch.len() == BATCH_SPANS {
                self.export(&mut batch).await;
            }
        }
        if !batch.is_empty() {
            self.export(&mut batch).await;
        }
    }

    /// POSTs `batch` and empties it, counting the outcome.
    async fn export(&mut self, batch: &mut Vec<Span>) {
        let count = batch.len() as u64;
        let body = self.request(batch);
        batch.clear();
        let result = tokio::time::timeout(EXPORT_TIMEOUT, post(&self.endpoint, &body))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {EXPORT_TIMEOUT:?}")));
        match result {
            Ok(()) => self.exported.inc_by(count),
            Err(reason) => {
                self.failed.inc_by(count);
                if let Some(suppressed) = self.warnings.allow(Instant::now()) {
                    tracing::warn!(
                        endpoint = %self.endpoint.host,
                        port = self.endpoint.port,
                        error = %reason,
                        spans = count,
                        suppressed,
                        "the OTLP collector did not take a batch of spans; they are dropped (check observability.otlp_endpoint and the collector)"
                    );
                }
            }
        }
    }

    /// An OTLP `ExportTraceServiceRequest` in JSON (ids as lowercase hex, times as strings).
    fn request(&self, batch: &[Span]) -> Vec<u8> {
        let spans: Vec<serde_json::Value> = batch.iter().map(span_json).collect();
        let request = serde_json::json!({
            "resourceSpans": [{
                "resource": self.resource,
                "scopeSpans": [{
                    "scope": {"name": "weir", "version": env!("CARGO_PKG_VERSION")},
                    "spans": spans,
                }],
            }],
        });
        serde_json::to_vec(&request).unwrap_or_default()
    }
}

fn resource(instance: &str) -> serde_json::Value {
    serde_json::json!({
        "attributes": [
            attribute("service.name", "weir"),
            attribute("service.version", env!("CARGO_PKG_VERSION")),
            attribute("service.instance.id", instance),
        ],
    })
}

fn attribute(key: &str, value: &str) -> serde_json::Value {
    serde_json::json!({"key": key, "value": {"stringValue": value}})
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    hex_encode(bytes, &mut out);
    out
}

fn span_json(span: &Span) -> serde_json::Value {
    let mut attributes = vec![
        attribute("weir.rule", &span.rule),
        attribute("weir.device", &span.device),
        attribute("weir.kind", span.kind),
        attribute("weir.event_id", &span.event_id.to_string()),
        attribute("messaging.system", "mqtt"),
        attribute("messaging.destination.name", &span.topic),
    ];
    if let Some(topic) = &span.cause_topic {
        attributes.push(attribute("weir.cause.topic", topic));
    }
    let mut json = serde_json::json!({
        "traceId": hex(&span.trace_id),
        "spanId": hex(&span.span_id),
        "name": &*span.rule,
        "kind": SPAN_KIND_PRODUCER,
        "startTimeUnixNano": span.start_ns.to_string(),
        "endTimeUnixNano": span.end_ns.to_string(),
        "attributes": attributes,
    });
    if let Some(parent) = span.parent {
        json["parentSpanId"] = hex(&parent).into();
    }
    json
}

/// One HTTP/1.1 POST of `body` to the collector; `Ok` on a 2xx status.
async fn post(endpoint: &OtlpEndpoint, body: &[u8]) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|err| format!("cannot connect: {err}"))?;
    let _ = stream.set_nodelay(true);
    let host = if endpoint.host.contains(':') {
        format!("[{}]:{}", endpoint.host, endpoint.port)
    } else {
        format!("{}:{}", endpoint.host, endpoint.port)
    };
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: weir/{}\r\n\r\n",
        endpoint.path,
        body.len(),
        env!("CARGO_PKG_VERSION"),
    );
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|err| format!("cannot send: {err}"))?;
    stream
        .write_all(body)
        .await
        .map_err(|err| format!("cannot send: {err}"))?;
    // The status line is all that is needed; read up to the end of the headers.
    let mut response = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !response.windows(4).any(|w| w == b"\r\n\r\n") && response.len() < 16 * 1024 {
        let read = stream
            .read(&mut chunk)
            .await
            .map_err(|err| format!("cannot read the answer: {err}"))?;
        if read == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..read]);
    }
    let status_line = response
        .split(|b| *b == b'\r')
        .next()
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(code) if (200..300).contains(&code) => Ok(()),
        Some(_) => Err(format!("the collector answered `{status_line}`")),
        None => Err("the answer is not HTTP".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::EventId;

    #[test]
    fn a_span_is_otlp_json_with_hex_ids_and_string_times() {
        let span = Span {
            trace_id: [0x4b; 16],
            span_id: [0x01; 8],
            parent: Some([0x02; 8]),
            start_ns: 1_732_600_000_000_000_000,
            end_ns: 1_732_600_000_000_500_000,
            rule: "overheat".into(),
            device: "d1".into(),
            kind: "state_change",
            event_id: EventId(0xabc),
            topic: "alerts/s1/d1/overheat".into(),
            cause_topic: Some("sensors/s1/d1/telemetry".into()),
        };
        let json = span_json(&span);
        assert_eq!(json["traceId"], "4b".repeat(16));
        assert_eq!(json["spanId"], "0101010101010101");
        assert_eq!(json["parentSpanId"], "0202020202020202");
        assert_eq!(json["name"], "overheat");
        assert_eq!(json["startTimeUnixNano"], "1732600000000000000");
        let attributes = json["attributes"].as_array().unwrap();
        let value = |key: &str| {
            attributes
                .iter()
                .find(|a| a["key"] == key)
                .map(|a| a["value"]["stringValue"].clone())
        };
        assert_eq!(value("weir.event_id"), Some("0000000000000abc".into()));
        assert_eq!(value("weir.kind"), Some("state_change".into()));
        let root = span_json(&Span {
            parent: None,
            ..span
        });
        assert!(root.get("parentSpanId").is_none());
    }
}
