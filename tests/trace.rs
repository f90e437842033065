//! Trace context over MQTT 5 (issue 6, item 4), against a real Mosquitto (2.x speaks MQTT 5) and
//! MQTT 5 test clients: a reading's W3C `traceparent` reaches the events it causes with a new span
//! id each, next to the content type and the event id; `at_least_once` over MQTT 5 loses nothing
//! across broker restarts; and, with the `otlp` feature, each event's span reaches an OTLP/HTTP
//! collector (a small receiver in this file, on loopback).

mod common;

use common::{
    config_from_text, free_port, start_weir_with, temp_dir, unique, wait_until, Mosquitto,
    DEADLINE, T0,
};
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";
const TRACESTATE: &str = "congo=t61rcWkgMzE";

/// Two rules on one input, one publishing JSON and one CBOR, so both content types are seen.
const CONFIG: &str = r#"
[broker]
url = "mqtt://127.0.0.1:1883"
protocol = "5"

[inputs.telemetry]
topic = "sensors/{site}/{device}/telemetry"
seq_field = "seq"

[inputs.telemetry.time]
field = "ts"
unit = "ms"

[rules.overheat.hysteresis]
metric = "temperature"
enter_above = 30.0
exit_below = 28.0
active = "hot"
inactive = "normal"

[rules.overheat.output]
topic = "alerts/{site}/{device}/overheat"

[rules.overheat_cbor.hysteresis]
metric = "temperature"
enter_above = 30.0
exit_below = 28.0
active = "hot"
inactive = "normal"

[rules.overheat_cbor.output]
topic = "cbor-alerts/{site}/{device}/overheat"
format = "cbor"
"#;

fn traceparent(trace_id: &str, span_id: &str) -> String {
    format!("00-{trace_id}-{span_id}-01")
}

fn reading(seq: u64, temperature: f64) -> Vec<u8> {
    json!({"ts": T0 + seq as i64 * 1000, "seq": seq, "temperature": temperature})
        .to_string()
        .into_bytes()
}

fn options(port: u16, tag: &str, persistent: bool) -> MqttOptions {
    let mut options = MqttOptions::new(unique(tag), "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(5))
        .set_max_packet_size(Some(1024 * 1024));
    if persistent {
        // MQTT 5 ends a session with its connection unless it has an expiry interval.
        options
            .set_clean_start(false)
            .set_session_expiry_interval(Some(3600));
    }
    options
}

/// A message an MQTT 5 subscriber received, with its properties.
#[derive(Debug, Clone)]
struct Received {
    topic: String,
    payload: Vec<u8>,
    properties: PublishProperties,
}

impl Received {
    fn user_property(&self, key: &str) -> Option<&str> {
        self.properties
            .user_properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The event, from JSON or CBOR by its content type.
    fn event(&self) -> Value {
        match self.properties.content_type.as_deref() {
            Some("application/cbor") => ciborium::from_reader(self.payload.as_slice())
                .unwrap_or_else(|err| panic!("CBOR on {}: {err}", self.topic)),
            _ => serde_json::from_slice(&self.payload)
                .unwrap_or_else(|err| panic!("JSON on {}: {err}", self.topic)),
        }
    }

    /// (trace id, span id, flags) of its `traceparent`.
    fn traceparent(&self) -> Option<(String, String, String)> {
        let parent = self.user_property("traceparent")?;
        let parts: Vec<&str> = parent.split('-').collect();
        assert_eq!(parts.len(), 4, "traceparent {parent:?}");
        assert_eq!(parts[0], "00", "traceparent {parent:?}");
        Some((parts[1].into(), parts[2].into(), parts[3].into()))
    }
}

/// An MQTT 5 client subscribed (QoS 1) to some filters, collecting what it receives. With a
/// persistent session it keeps receiving across broker restarts.
struct Subscriber5 {
    rx: mpsc::UnboundedReceiver<Received>,
    task: JoinHandle<()>,
}

impl Subscriber5 {
    async fn start(port: u16, filters: &[&str], persistent: bool) -> Self {
        let (client, mut eventloop) = AsyncClient::new(options(port, "sub5", persistent), 64);
        let filters: Vec<Filter> = filters
            .iter()
            .map(|f| Filter::new(*f, QoS::AtLeastOnce))
            .collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) if !ack.session_present => {
                        let _ = client.try_subscribe_many(filters.clone());
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(ready) = ready_tx.take() {
                            let _ = ready.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let _ = tx.send(Received {
                            topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                            payload: publish.payload.to_vec(),
                            properties: publish.properties.unwrap_or_default(),
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(DEADLINE, ready_rx)
            .await
            .expect("the MQTT 5 subscriber got its SubAck in time")
            .expect("subscriber task alive");
        Self { rx, task }
    }

    /// Exactly the next `n` messages, within [`DEADLINE`], sorted by topic.
    async fn take(&mut self, n: usize) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut messages = Vec::with_capacity(n);
        while messages.len() < n {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(message)) => messages.push(message),
                _ => panic!("expected {n} messages, got {messages:#?}"),
            }
        }
        messages.sort_by(|a, b| a.topic.cmp(&b.topic));
        messages
    }
}

impl Drop for Subscriber5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An MQTT 5 client that publishes at QoS 1 with user properties and waits for each PubAck.
struct Publisher5 {
    client: AsyncClient,
    acks: watch::Receiver<usize>,
    sent: usize,
    task: JoinHandle<()>,
}

impl Publisher5 {
    async fn start(port: u16) -> Self {
        let (client, mut eventloop) = AsyncClient::new(options(port, "pub5", false), 64);
        let (acks_tx, acks) = watch::channel(0usize);
        let (conn_tx, conn_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut conn_tx = Some(conn_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(conn_tx) = conn_tx.take() {
                            let _ = conn_tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => acks_tx.send_modify(|n| *n += 1),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(DEADLINE, conn_rx)
            .await
            .expect("the MQTT 5 publisher connected in time")
            .expect("publisher task alive");
        Self {
            client,
            acks,
            sent: 0,
            task,
        }
    }

    async fn publish(&mut self, topic: &str, payload: Vec<u8>, user: &[(&str, &str)]) {
        let properties = PublishProperties {
            user_properties: user
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..PublishProperties::default()
        };
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, properties)
            .await
            .expect("queue the publish");
        self.sent += 1;
        let sent = self.sent;
        tokio::time::timeout(DEADLINE, self.acks.wait_for(|acked| *acked >= sent))
            .await
            .unwrap_or_else(|_| panic!("no PubAck for a publish to {topic} within {DEADLINE:?}"))
            .expect("publisher task alive");
    }
}

impl Drop for Publisher5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_reaches_the_events_a_reading_causes_with_a_new_span_each() {
    let broker = Mosquitto::start();
    let weir = start_weir_with(config_from_text(&broker, CONFIG, "trace")).await;
    let mut events = Subscriber5::start(broker.port(), &["alerts/#", "cbor-alerts/#"], false).await;
    let mut publisher = Publisher5::start(broker.port()).await;
    let topic = "sensors/s1/d1/telemetry";

    let sent = traceparent(TRACE_ID, PARENT_SPAN);
    publisher
        .publish(
            topic,
            reading(1, 31.0),
            &[("traceparent", &sent), ("tracestate", TRACESTATE)],
        )
        .await;
    let hot = events.take(2).await;
    let mut spans = BTreeSet::new();
    for (message, mime) in hot.iter().zip(["application/json", "application/cbor"]) {
        assert_eq!(
            message.properties.content_type.as_deref(),
            Some(mime),
            "{message:?}"
        );
        let event = message.event();
        assert_eq!(event["to"], "hot");
        let id = event["id"].as_str().expect("an id");
        assert_eq!(
            message.properties.correlation_data.as_deref(),
            Some(id.as_bytes()),
            "the correlation data is the event id"
        );
        assert_eq!(event["cause"]["trace_id"], TRACE_ID);
        let (trace_id, span_id, flags) = message.traceparent().expect("a traceparent");
        assert_eq!((trace_id.as_str(), flags.as_str()), (TRACE_ID, "01"));
        assert!(
            span_id.len() == 16
                && span_id.bytes().all(|b| b.is_ascii_hexdigit())
                && span_id != PARENT_SPAN
                && span_id != "0000000000000000",
            "a new span id, got {span_id}"
        );
        assert_eq!(message.user_property("tracestate"), Some(TRACESTATE));
        spans.insert(span_id);
    }
    assert_eq!(spans.len(), 2, "each event has its own span: {spans:?}");

    // A malformed traceparent is ignored and counted; the reading still counts.
    publisher
        .publish(
            topic,
            reading(2, 25.0),
            &[("traceparent", "00-not-a-trace-01")],
        )
        .await;
    for message in events.take(2).await {
        let event = message.event();
        assert_eq!(event["to"], "normal");
        assert!(message.traceparent().is_none(), "{message:?}");
        assert!(event["cause"].get("trace_id").is_none(), "{event}");
        assert!(message.properties.content_type.is_some());
        assert!(message.properties.correlation_data.is_some());
    }
    let invalid = weir
        .metrics
        .trace_context_invalid
        .with_label_values(&["telemetry"]);
    assert_eq!(invalid.get(), 1);

    // Without one, an event carries no traceparent (unless OTLP export starts a trace).
    publisher.publish(topic, reading(3, 31.0), &[]).await;
    for message in events.take(2).await {
        assert_eq!(message.event()["to"], "hot");
        assert!(message.traceparent().is_none(), "{message:?}");
    }
    weir.stop().await.expect("weir stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_over_mqtt_5_loses_no_event_across_broker_restarts() {
    let mut broker = Mosquitto::start_persistent_on(free_port());
    let state_dir = temp_dir("trace-state");
    let text = CONFIG.replace(
        "protocol = \"5\"",
        "protocol = \"5\"\nclean_session = false",
    ) + &format!(
        "\n[delivery]\nmode = \"at_least_once\"\nstate_dir = \"{}\"\n",
        state_dir.display()
    );
    let config = config_from_text(&broker, &text, "trace-restarts");
    let mut readings = Vec::new();
    let mut traces = BTreeMap::new();
    const TEMPERATURES: [f64; 6] = [25.0, 31.0, 29.0, 27.0, 33.0, 24.0];
    for step in 0..30u64 {
        for device in 0..4u64 {
            let temperature = TEMPERATURES[((step + device) % 6) as usize];
            readings.push((
                format!("sensors/s1/d{device}/telemetry"),
                reading(step, temperature),
            ));
            // One trace per reading, recognisable by device and sequence number.
            traces.insert(
                (format!("d{device}"), step),
                format!("{:032x}", (device << 32) + step + 1),
            );
        }
    }
    let expected = common::expected_ids(&config, &readings, T0 + 10_000_000);
    assert!(
        expected.len() > 40,
        "the stream should cause events: {}",
        expected.len()
    );

    let weir = start_weir_with(config).await;
    let collector = Subscriber5::start(broker.port(), &["alerts/#", "cbor-alerts/#"], true).await;
    let received: Arc<Mutex<Vec<Received>>> = Arc::default();
    let sink = received.clone();
    let collecting = tokio::spawn(async move {
        let mut collector = collector;
        while let Some(message) = collector.rx.recv().await {
            sink.lock().expect("lock").push(message);
        }
    });
    let mut publisher = Publisher5::start(broker.port()).await;
    for (i, (topic, payload)) in readings.iter().enumerate() {
        if i == 40 || i == 80 {
            let reconnects = || {
                weir.metrics
                    .mqtt_reconnects
                    .with_label_values(&["source"])
                    .get()
            };
            let before = reconnects();
            broker.terminate();
            broker.start_again();
            // Each restart must reach weir: wait for it to lose the broker and come back, or
            // the next restart could fall inside its reconnect backoff.
            assert!(
                wait_until(DEADLINE, || reconnects() > before
                    && weir.metrics.is_ready())
                .await,
                "weir did not reconnect after the broker restarted"
            );
            // A fresh client: one that was mid-reconnect could lose a queued publish.
            publisher = Publisher5::start(broker.port()).await;
        }
        let device = topic.split('/').nth(2).expect("device").to_owned();
        let step = (i / 4) as u64;
        let parent = traceparent(&traces[&(device, step)], PARENT_SPAN);
        publisher
            .publish(topic, payload.clone(), &[("traceparent", &parent)])
            .await;
    }

    let ids = |messages: &[Received]| -> BTreeSet<String> {
        messages
            .iter()
            .map(|m| m.event()["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let arrived = wait_until(Duration::from_secs(60), || {
        ids(&received.lock().expect("lock")).is_superset(&expected)
    })
    .await;
    let messages = received.lock().expect("lock").clone();
    let got = ids(&messages);
    assert!(
        arrived && got == expected,
        "{} expected, {} received; missing {:?}; unexpected {:?}",
        expected.len(),
        got.len(),
        expected.difference(&got).collect::<Vec<_>>(),
        got.difference(&expected).collect::<Vec<_>>()
    );
    let mut first: BTreeMap<String, Value> = BTreeMap::new();
    for message in &messages {
        let event = message.event();
        let copy = first
            .entry(event["id"].as_str().unwrap_or_default().to_owned())
            .or_insert_with(|| event.clone());
        assert_eq!(*copy, event, "a duplicate differs from the first copy");
        // Every event keeps the trace of the reading that caused it, through the input log.
        let device = event["device"].as_str().expect("device").to_owned();
        let seq = event["cause"]["seq"].as_u64().expect("cause.seq");
        let trace = &traces[&(device, seq)];
        assert_eq!(event["cause"]["trace_id"], trace.as_str(), "{event}");
        let (trace_id, _, _) = message.traceparent().expect("a traceparent");
        assert_eq!(&trace_id, trace);
    }
    assert!(
        weir.metrics
            .mqtt_reconnects
            .with_label_values(&["source"])
            .get()
            >= 2
    );
    collecting.abort();
    weir.stop().await.expect("weir stops cleanly");
}

/// An OTLP/HTTP collector on loopback: answers every POST with 200 and hands on each request's
/// path and JSON body.
#[cfg(feature = "otlp")]
async fn otlp_collector() -> (u16, mpsc::UnboundedReceiver<(String, Value)>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the collector");
    let port = listener.local_addr().expect("collector address").port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut chunk = [0u8; 8192];
                let header_end = loop {
                    if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                    let read = stream.read(&mut chunk).await.expect("read a request");
                    assert!(read > 0, "the request ended inside its headers");
                    request.extend_from_slice(&chunk[..read]);
                };
                let head = String::from_utf8_lossy(&request[..header_end]).into_owned();
                let length: usize = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .expect("a Content-Length");
                while request.len() < header_end + length {
                    let read = stream.read(&mut chunk).await.expect("read the body");
                    assert!(read > 0, "the body ended early");
                    request.extend_from_slice(&chunk[..read]);
                }
                assert!(
                    head.to_ascii_lowercase()
                        .contains("content-type: application/json"),
                    "{head}"
                );
                let path = head
                    .strip_prefix("POST ")
                    .and_then(|rest| rest.split(' ').next())
                    .expect("a POST")
                    .to_owned();
                let body: Value = serde_json::from_slice(&request[header_end..header_end + length])
                    .expect("the body is JSON");
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
                    .await;
                let _ = tx.send((path, body));
            });
        }
    });
    (port, rx)
}

/// Every span in an OTLP request, with its resource.
#[cfg(feature = "otlp")]
fn spans_of(request: &Value) -> Vec<(Value, Value)> {
    let mut spans = Vec::new();
    for resource_spans in request["resourceSpans"].as_array().into_iter().flatten() {
        for scope_spans in resource_spans["scopeSpans"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for span in scope_spans["spans"].as_array().into_iter().flatten() {
                spans.push((resource_spans["resource"].clone(), span.clone()));
            }
        }
    }
    spans
}

#[cfg(feature = "otlp")]
fn attribute(span: &Value, key: &str) -> Option<String> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .and_then(|a| a["value"]["stringValue"].as_str())
        .map(str::to_owned)
}

#[cfg(feature = "otlp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_otlp_each_event_exports_the_span_its_traceparent_names() {
    let broker = Mosquitto::start();
    let (port, mut requests) = otlp_collector().await;
    let text = format!("{CONFIG}\n[observability]\notlp_endpoint = \"http://127.0.0.1:{port}\"\n");
    let weir = start_weir_with(config_from_text(&broker, &text, "otlp")).await;
    let mut events = Subscriber5::start(broker.port(), &["alerts/#"], false).await;
    let mut publisher = Publisher5::start(broker.port()).await;
    let topic = "sensors/s1/d1/telemetry";
    publisher
        .publish(
            topic,
            reading(1, 31.0),
            &[("traceparent", &traceparent(TRACE_ID, PARENT_SPAN))],
        )
        .await;
    let traced = events.take(1).await.remove(0);
    publisher.publish(topic, reading(2, 25.0), &[]).await;
    let untraced = events.take(1).await.remove(0);

    // Four events (two rules, two readings), exported within a batch interval or two.
    let mut spans: Vec<(Value, Value)> = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while spans.len() < 4 {
        let (path, body) = tokio::time::timeout_at(deadline, requests.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} spans arrived: {spans:#?}", spans.len()))
            .expect("collector alive");
        assert_eq!(path, "/v1/traces");
        spans.extend(spans_of(&body));
    }
    let find = |message: &Received| -> Value {
        let (_, span_id, _) = message.traceparent().expect("a traceparent");
        spans
            .iter()
            .find(|(_, span)| span["spanId"] == span_id.as_str())
            .map(|(resource, span)| {
                let service = resource["attributes"]
                    .as_array()
                    .and_then(|a| a.iter().find(|a| a["key"] == "service.name"))
                    .map(|a| a["value"]["stringValue"].clone());
                assert_eq!(service, Some(json!("weir")));
                span.clone()
            })
            .unwrap_or_else(|| panic!("no span {span_id} among {spans:#?}"))
    };

    let span = find(&traced);
    let event = traced.event();
    assert_eq!(span["traceId"], TRACE_ID);
    assert_eq!(span["parentSpanId"], PARENT_SPAN);
    assert_eq!(span["name"], "overheat");
    assert_eq!(attribute(&span, "weir.rule").as_deref(), Some("overheat"));
    assert_eq!(attribute(&span, "weir.device").as_deref(), Some("d1"));
    assert_eq!(
        attribute(&span, "weir.kind").as_deref(),
        Some("state_change")
    );
    assert_eq!(
        attribute(&span, "weir.event_id"),
        event["id"].as_str().map(str::to_owned)
    );
    assert_eq!(
        attribute(&span, "messaging.destination.name").as_deref(),
        Some(traced.topic.as_str())
    );
    let start: u64 = span["startTimeUnixNano"]
        .as_str()
        .expect("start")
        .parse()
        .expect("ns");
    let end: u64 = span["endTimeUnixNano"]
        .as_str()
        .expect("end")
        .parse()
        .expect("ns");
    assert!(start > 0 && start <= end, "{span}");

    // A reading without a trace: the event starts one, and publishes its traceparent.
    let span = find(&untraced);
    let (trace_id, _, _) = untraced
        .traceparent()
        .expect("a traceparent for a new trace");
    assert_ne!(trace_id, TRACE_ID);
    assert_eq!(span["traceId"], trace_id.as_str());
    assert!(span.get("parentSpanId").is_none(), "{span}");
    assert!(untraced.event()["cause"].get("trace_id").is_none());

    assert!(
        wait_until(DEADLINE, || weir.metrics.otlp_spans_exported.get() >= 4).await,
        "weir_otlp_spans_exported_total stayed at {}",
        weir.metrics.otlp_spans_exported.get()
    );
    weir.stop().await.expect("weir stops cleanly");
}
