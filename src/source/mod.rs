//! MQTT intake: polls the rumqttc event loop continuously in its own task, subscribes on every
//! (re)connect, matches each message's topic to an input, stamps its arrival and its log sequence
//! number (LSN), logs it (with a state dir under `at_least_once`), and hands it to the worker that
//! owns its device through a bounded channel. With MQTT 5 a message's W3C trace context (user
//! properties) travels with it.
//!
//! Nothing slow happens in the poll loop: rumqttc sends keep-alives only from inside `poll()`.
//! When a worker's channel (or the log's) is full the loop waits for room: backpressure reaches
//! the broker's TCP window instead of growing memory; the wait is visible as `weir_queue_depth`.
//! Acknowledgements are sent by a separate task, only for inputs the log has made durable, in
//! receive order, and only on the connection that delivered them.

use crate::engine::{Plan, RawMessage, Reload, WorkerInput};
use crate::metrics::{Connection, Metrics, WarnLimit};
use crate::mqtt::client::{self, Client, Event};
use crate::mqtt::{Backoff, ConnectFailures};
use crate::store::writer::{AckBatch, AckToken, LogCommand};
use crate::trace;
use futures_util::FutureExt as _;
use rumqttc::QoS;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// How the source is set up.
pub struct SourceOptions {
    /// Connection options (MQTT 3.1.1 or 5); manual acks are on when `log` is set.
    pub mqtt: client::Options,
    /// The LSN of the first message this run receives.
    pub next_lsn: u64,
    /// The input log (state dir + at_least_once): inputs are acked once it has synced them.
    pub log: Option<mpsc::Sender<LogCommand>>,
    /// Released acks from the log writer.
    pub acks: Option<mpsc::Receiver<AckBatch>>,
    /// How often to ask the workers for a snapshot barrier (with a state dir).
    pub snapshot_interval: Option<Duration>,
    /// New rules from the reloader, passed to every worker between two messages; the sender
    /// hears back once every worker has them queued.
    pub reloads: mpsc::Receiver<(Arc<Reload>, oneshot::Sender<()>)>,
}

/// Runs intake until `shutdown` resolves, then takes a final snapshot barrier, flushes the log and
/// its acks, disconnects, and returns (dropping the worker channels so the workers end).
pub async fn run(
    options: SourceOptions,
    plan: Arc<Plan>,
    workers: Vec<mpsc::Sender<WorkerInput>>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let SourceOptions {
        mut mqtt,
        mut next_lsn,
        log,
        acks,
        snapshot_interval,
        mut reloads,
    } = options;
    let manual_acks = log.is_some();
    mqtt.set_manual_acks(manual_acks);
    let (client, mut eventloop) = client::new(mqtt, 1024);
    // broker.max_packet_bytes: what a connection normally reads (see `oversized`).
    let packet_limit = eventloop.incoming_limit();
    let generation = Arc::new(AtomicU64::new(0));
    let acker = acks.map(|acks| {
        tokio::spawn(run_acker(
            acks,
            client.clone(),
            generation.clone(),
            metrics.clone(),
        ))
    });
    let filters: Vec<(String, QoS)> = plan
        .inputs
        .iter()
        .map(|input| (input.pattern.subscription_filter(), input.qos))
        .collect();
    let received: Vec<_> = plan
        .inputs
        .iter()
        .map(|input| {
            (
                metrics.readings_received.with_label_values(&[&input.name]),
                metrics.received_bytes.with_label_values(&[&input.name]),
                metrics
                    .trace_context_invalid
                    .with_label_values(&[&input.name]),
            )
        })
        .collect();
    let mut backoff = Backoff::default();
    let mut failures = ConnectFailures::default();
    let mut connected = false;
    let mut snapshots = snapshot_interval.map(|every| {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    // A flapping broker logs one line per interval; the reconnect counter counts them all.
    let mut lost_warnings = WarnLimit::new(crate::mqtt::RECONNECT_WARN_INTERVAL);
    tokio::pin!(shutdown);
    // Messages already parsed from the socket are collected and handed to the workers together
    // when the event loop would wait, so a worker wakes once per socket read, not once per
    // message (a cross-thread wake-up costs more than processing a reading).
    let mut pending: Vec<(usize, RawMessage)> = Vec::with_capacity(MAX_READY);
    let mut ready_in_a_row = 0;
    'intake: loop {
        let ready = if ready_in_a_row < MAX_READY {
            eventloop.poll().now_or_never()
        } else {
            None
        };
        let event = match ready {
            Some(event) => {
                ready_in_a_row += 1;
                event
            }
            None => {
                ready_in_a_row = 0;
                if !hand_over(&mut pending, &workers).await {
                    break;
                }
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    () = next_snapshot(&mut snapshots) => {
                        if !barrier(next_lsn, &log, &workers).await {
                            break;
                        }
                        continue;
                    }
                    Some((reload, done)) = reloads.recv() => {
                        let snapshot_at = snapshots.is_some().then_some((next_lsn, &log));
                        if !pass_reload(reload, done, &workers, snapshot_at).await {
                            break;
                        }
                        continue;
                    }
                    event = eventloop.poll() => event,
                }
            }
        };
        match event {
            Ok(Event::Message(mut publish)) => {
                let arrival = Instant::now();
                if packet_size(&publish) > packet_limit {
                    // The oversized message the limit was raised for: it goes on as too_large
                    // (every input's max_payload_bytes is below the packet limit) with what fits
                    // the limit, so the log never holds more; later connections read only up
                    // to the limit again.
                    publish.payload = bytes::Bytes::copy_from_slice(
                        &publish.payload[..publish.payload.len().min(packet_limit)],
                    );
                    eventloop.set_incoming_limit(packet_limit, packet_limit);
                }
                let Some((input, device)) = plan.match_topic(&publish.topic) else {
                    metrics.readings_unmatched.inc();
                    continue;
                };
                let (count, bytes, invalid_trace) = &received[input];
                count.inc();
                bytes.inc_by(publish.payload.len() as u64);
                // A malformed traceparent is the upstream system's problem, not the reading's:
                // the reading is processed without it.
                let trace = match publish.trace {
                    trace::Incoming::Valid(context) => Some(context),
                    trace::Incoming::Invalid => {
                        invalid_trace.inc();
                        None
                    }
                    trace::Incoming::Absent => None,
                };
                let shard = Plan::shard(input, device, workers.len());
                let lsn = next_lsn;
                next_lsn += 1;
                let arrival_ms = wall_clock_ms();
                if let Some(log) = &log {
                    let ack = (publish.qos != QoS::AtMostOnce).then(|| AckToken {
                        generation: generation.load(Ordering::Relaxed),
                        pkid: publish.pkid,
                    });
                    let command = LogCommand::Append {
                        lsn,
                        arrival_ms,
                        input: input as u16,
                        topic: publish.topic.clone(),
                        payload: publish.payload.clone(),
                        trace: trace.clone(),
                        ack,
                    };
                    if log.send(command).await.is_err() {
                        break 'intake;
                    }
                }
                pending.push((
                    shard,
                    RawMessage {
                        input,
                        topic: publish.topic,
                        payload: publish.payload,
                        arrival,
                        arrival_ms,
                        lsn,
                        trace,
                    },
                ));
            }
            Ok(Event::ConnAck { session_present }) => {
                connected = true;
                generation.fetch_add(1, Ordering::Relaxed);
                backoff.reset();
                failures.reset();
                metrics.set_connected(Connection::Source, true);
                tracing::info!(
                    session_present,
                    "source connected to the broker; subscribing"
                );
                // try_subscribe never waits, so it cannot stall this loop.
                if let Err(err) = client.try_subscribe_many(&filters) {
                    tracing::error!(%err, "could not queue the subscription");
                }
            }
            Ok(Event::SubAck { granted }) => {
                if granted < filters.len() {
                    tracing::error!(
                        granted,
                        requested = filters.len(),
                        "the broker refused some subscriptions; check its ACLs"
                    );
                }
                metrics.set_subscribed(granted);
                tracing::info!(filters = granted, "subscribed");
            }
            Ok(_) => {}
            Err(err) => {
                if !hand_over(&mut pending, &workers).await {
                    break;
                }
                if let Some(size) = err.oversized_packet() {
                    oversized(size, packet_limit, &mut eventloop, &metrics);
                }
                if connected {
                    if let Some(suppressed) = lost_warnings.allow(Instant::now()) {
                        tracing::warn!(%err, suppressed, "source lost the broker connection; reconnecting");
                    }
                    metrics.set_connected(Connection::Source, false);
                    connected = false;
                } else {
                    failures.report(Connection::Source.label(), &err);
                }
                metrics
                    .mqtt_reconnects
                    .with_label_values(&[Connection::Source.label()])
                    .inc();
                let delay = backoff.next_delay();
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(delay) => {}
                    // A reload does not wait for the broker to come back.
                    Some((reload, done)) = reloads.recv() => {
                        let snapshot_at = snapshots.is_some().then_some((next_lsn, &log));
                        if !pass_reload(reload, done, &workers, snapshot_at).await {
                            break;
                        }
                    }
                }
            }
        }
    }

    // Shutdown: what was received goes to the workers, then a final barrier (so the last snapshot
    // covers everything received); then make the log durable and send its acks on this
    // connection before disconnecting.
    hand_over(&mut pending, &workers).await;
    if snapshots.is_some() {
        barrier(next_lsn, &log, &workers).await;
    }
    drop(workers);
    let mut acks_sent = None;
    if let Some(log) = &log {
        let (done_tx, done_rx) = oneshot::channel();
        if log.send(LogCommand::Flush(done_tx)).await.is_ok() {
            acks_sent = Some(done_rx);
        }
    }
    drop(log);
    if connected {
        // Keep polling while the last acks are sent, so they reach the broker on this connection;
        // messages arriving now are left unacked and the broker redelivers them after a restart.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            if let Some(done) = acks_sent {
                let mut done = std::pin::pin!(done);
                loop {
                    tokio::select! {
                        _ = &mut done => break,
                        event = eventloop.poll() => if event.is_err() { return; },
                    }
                }
            }
            let _ = client.try_disconnect();
            while let Ok(event) = eventloop.poll().await {
                if matches!(event, Event::Disconnected) {
                    break;
                }
            }
        })
        .await;
    }
    if let Some(acker) = acker {
        acker.abort();
    }
    metrics.set_connected(Connection::Source, false);
    tracing::info!("source stopped");
}

/// An incoming packet larger than `limit` (`broker.max_packet_bytes`) dropped the connection:
/// rumqttc refuses to read it. A persistent session's broker delivers the same message again
/// first thing on the next connection, and it would drop that one too, forever (a poison
/// message). So the next connection reads packets up to this one's size: the message arrives,
/// is dead-lettered as too_large and acknowledged, and the limit goes back down after it.
/// Reading it costs its size in memory once (MQTT caps a packet at 256 MiB); with MQTT 5 the
/// broker knows the limit from CONNECT and drops such messages itself.
fn oversized(size: usize, limit: usize, eventloop: &mut client::EventLoop, metrics: &Metrics) {
    metrics.mqtt_oversized_packets.inc();
    tracing::warn!(
        size,
        limit,
        "an incoming packet is larger than broker.max_packet_bytes and dropped the connection; reading it once on the next connection to dead-letter it as too_large"
    );
    eventloop.set_incoming_limit(size.max(limit), limit);
}

/// The remaining length of a PUBLISH as the broker framed it (topic, packet id, payload; MQTT 5
/// properties are not counted): what rumqttc compares with the incoming limit.
fn packet_size(publish: &client::Message) -> usize {
    2 + publish.topic.len() + 2 + publish.payload.len()
}

/// Events taken from the event loop without waiting before the collected messages are handed
/// over (and shutdown and snapshot ticks are looked at again).
const MAX_READY: usize = 256;

/// Sends the collected messages to their workers, in receive order; false when a worker is gone.
async fn hand_over(
    pending: &mut Vec<(usize, RawMessage)>,
    workers: &[mpsc::Sender<WorkerInput>],
) -> bool {
    for (shard, message) in pending.drain(..) {
        if workers[shard]
            .send(WorkerInput::Message(message))
            .await
            .is_err()
        {
            return false;
        }
    }
    true
}

/// The next snapshot tick; never, without a state dir.
async fn next_snapshot(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Asks every worker for its state as of `lsn` (and starts a new log segment there).
async fn barrier(
    lsn: u64,
    log: &Option<mpsc::Sender<LogCommand>>,
    workers: &[mpsc::Sender<WorkerInput>],
) -> bool {
    if let Some(log) = log {
        if log.send(LogCommand::Rotate(lsn)).await.is_err() {
            return false;
        }
    }
    for worker in workers {
        if worker.send(WorkerInput::Barrier(lsn)).await.is_err() {
            return false;
        }
    }
    true
}

/// Queues new rules to every worker at this point of the input, then (with a state dir,
/// `snapshot_at`) a snapshot barrier, so a restart never replays readings the old rules handled
/// through the new ones. False when a worker or the log is gone.
async fn pass_reload(
    reload: Arc<Reload>,
    done: oneshot::Sender<()>,
    workers: &[mpsc::Sender<WorkerInput>],
    snapshot_at: Option<(u64, &Option<mpsc::Sender<LogCommand>>)>,
) -> bool {
    for worker in workers {
        if worker
            .send(WorkerInput::Reload(reload.clone()))
            .await
            .is_err()
        {
            return false;
        }
    }
    let _ = done.send(());
    match snapshot_at {
        Some((lsn, log)) => barrier(lsn, log, workers).await,
        None => true,
    }
}

/// Sends released acks in order, each only on the connection that delivered its message.
async fn run_acker(
    mut acks: mpsc::Receiver<AckBatch>,
    client: Client,
    generation: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
) {
    while let Some(batch) = acks.recv().await {
        for token in batch.tokens {
            if token.generation != generation.load(Ordering::Relaxed) {
                continue;
            }
            if client.ack(token.pkid).await.is_err() {
                return;
            }
            metrics.inputs_acked.inc();
        }
        if let Some(done) = batch.done {
            let _ = done.send(());
        }
    }
}

/// Wall-clock ms since the epoch, the arrival time of a reading.
pub fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
