//! Intake: takes raw messages from a [`Source`] (MQTT: [`mqtt::MqttSource`]), matches each
//! topic to an input, stamps its arrival and its log sequence number (LSN), logs it (with a state
//! dir under `at_least_once`), and hands it to the worker that owns its device through a bounded
//! channel. A message's W3C trace context travels with it.
//!
//! Nothing slow happens between two deliveries: a source keeps its connection alive only while
//! it is asked for them. When a worker's channel (or the log's) is full the loop waits for room:
//! backpressure reaches the broker instead of growing memory; the wait is visible as
//! `weir_queue_depth`. Acknowledgements are sent by a separate task, only for inputs the log has
//! made durable, in receive order, through the source's acker.

#[cfg(feature = "cluster")]
pub mod jetstream;
pub mod mqtt;

use crate::engine::{Plan, RawMessage, Reload, WorkerInput, Workers};
use crate::metrics::Metrics;
use crate::model::port::{AckBatch, Acked, Acker, Delivery, LogCommand, Source};
use crate::model::time::wall_clock_ms;
use crate::model::trace;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How intake is set up.
pub struct SourceOptions {
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
    /// `pipeline.read_pause` with inline workers on one runtime thread ([`pause_reading`]).
    pub read_pause: Option<Duration>,
}

/// Runs intake from `source` until `shutdown` resolves, then takes a final snapshot barrier,
/// flushes the log and its acks, closes the source, and returns (ending the workers: closing
/// their channels, or finishing them here when they run inline).
pub async fn run<S: Source>(
    mut source: S,
    options: SourceOptions,
    plan: Arc<Plan>,
    mut workers: Workers,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let SourceOptions {
        mut next_lsn,
        log,
        acks,
        snapshot_interval,
        mut reloads,
        read_pause,
    } = options;
    let acker = acks.map(|acks| tokio::spawn(run_acker(acks, source.acker(), metrics.clone())));
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
    let mut snapshots = snapshot_interval.map(|every| {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    tokio::pin!(shutdown);
    // Messages already received are collected and handed to the workers together when the
    // source would wait, so a worker task wakes once per socket read, not once per message (a
    // cross-thread wake-up costs more than processing a reading); inline workers process them
    // then, and their events go to the sinks together.
    let mut pending: Vec<(usize, RawMessage)> = Vec::with_capacity(MAX_READY);
    let mut ready_in_a_row = 0;
    // Whether readings arrive faster than one per BUSY: then a pause before reading again
    // saves more wake-ups than it costs.
    let mut busy = false;
    'intake: loop {
        let ready = if ready_in_a_row < MAX_READY {
            source.try_next()
        } else {
            None
        };
        let delivery = match ready {
            Some(delivery) => {
                ready_in_a_row += 1;
                delivery
            }
            None => {
                ready_in_a_row = 0;
                let handed = !pending.is_empty();
                let Some(events) = hand_over(&mut pending, &mut workers).await else {
                    break;
                };
                if let (true, true, Some(pause)) = (handed, busy, read_pause) {
                    pause_reading(pause, events > 0).await;
                }
                let waiting_since = Instant::now();
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    () = workers.timers_due() => {
                        if !workers.run_timers().await {
                            break;
                        }
                        continue;
                    }
                    () = next_snapshot(&mut snapshots) => {
                        source.checkpoint(next_lsn);
                        if !barrier(next_lsn, &log, &mut workers).await {
                            break;
                        }
                        continue;
                    }
                    Some((reload, done)) = reloads.recv() => {
                        let snapshot_at = snapshots.is_some().then_some((next_lsn, &log));
                        if snapshot_at.is_some() {
                            source.checkpoint(next_lsn);
                        }
                        if !pass_reload(reload, done, &mut workers, snapshot_at).await {
                            break;
                        }
                        continue;
                    }
                    delivery = source.next() => {
                        busy = waiting_since.elapsed() < BUSY;
                        delivery
                    }
                }
            }
        };
        match delivery {
            Delivery::Message(message) => {
                let arrival = Instant::now();
                let Some((input, device)) = plan.match_topic(&message.topic) else {
                    metrics.readings_unmatched.inc();
                    continue;
                };
                let (count, bytes, invalid_trace) = &received[input];
                count.inc();
                bytes.inc_by(message.payload.len() as u64);
                // A malformed traceparent is the upstream system's problem, not the reading's:
                // the reading is processed without it.
                let trace = match message.trace {
                    trace::Incoming::Valid(context) => Some(context),
                    trace::Incoming::Invalid => {
                        invalid_trace.inc();
                        None
                    }
                    trace::Incoming::Absent => None,
                };
                let shard = Plan::shard(input, device, workers.len());
                let lsn = message.position.unwrap_or(next_lsn);
                next_lsn = lsn + 1;
                let arrival_ms = message.received_ms.unwrap_or_else(wall_clock_ms);
                if let Some(log) = &log {
                    let command = LogCommand::Append {
                        lsn,
                        arrival_ms,
                        input: input as u16,
                        topic: message.topic.clone(),
                        payload: message.payload.clone(),
                        trace: trace.clone(),
                        ack: message.ack,
                    };
                    if log.send(command).await.is_err() {
                        break 'intake;
                    }
                }
                pending.push((
                    shard,
                    RawMessage {
                        input,
                        topic: message.topic,
                        payload: message.payload,
                        arrival,
                        arrival_ms,
                        lsn,
                        trace,
                    },
                ));
            }
            Delivery::Lost => {
                if hand_over(&mut pending, &mut workers).await.is_none() {
                    break;
                }
            }
            Delivery::Other => {}
        }
    }

    // Shutdown: what was received goes to the workers, then a final barrier (so the last snapshot
    // covers everything received); then make the log durable and send its acks before the
    // source closes.
    let _ = hand_over(&mut pending, &mut workers).await;
    if snapshots.is_some() {
        source.checkpoint(next_lsn);
        barrier(next_lsn, &log, &mut workers).await;
    }
    workers.finish().await;
    let mut acks_sent = None;
    if let Some(log) = &log {
        let (done_tx, done_rx) = oneshot::channel();
        if log.send(LogCommand::Flush(done_tx)).await.is_ok() {
            acks_sent = Some(done_rx);
        }
    }
    drop(log);
    source.close(acks_sent).await;
    if let Some(acker) = acker {
        acker.abort();
    }
    tracing::info!("source stopped");
}

/// Readings that come within this long of intake starting to wait are arriving fast enough
/// for [`pause_reading`] to pay: at most one wake-up per millisecond is left to save otherwise.
const BUSY: Duration = Duration::from_millis(1);

/// Lets the sinks send what the last read derived (when it derived anything), then holds the
/// runtime's one thread for `pause` before intake reads again, so that the readings arriving
/// meanwhile are read with one wake-up instead of one each: a wake-up costs more CPU than
/// processing a reading (README, "Run to completion"). The thread sleeps outside the runtime on
/// purpose: waiting in the runtime (epoll) would wake it for every segment that arrives. So it
/// is only for one runtime thread, where the sleep delays the other tasks by at most `pause`
/// (1 ms at most, `pipeline.read_pause`).
async fn pause_reading(pause: Duration, derived: bool) {
    if derived {
        tokio::task::yield_now().await;
    }
    std::thread::sleep(pause);
}

/// Deliveries taken from the source without waiting before the collected messages are handed
/// over (and shutdown and snapshot ticks are looked at again).
const MAX_READY: usize = 256;

/// Sends the collected messages to their workers, in receive order (inline workers process them
/// and hand their events to the sinks): how many events inline workers handed on, or `None`
/// when a worker or a sink is gone.
async fn hand_over(pending: &mut Vec<(usize, RawMessage)>, workers: &mut Workers) -> Option<usize> {
    for (shard, message) in pending.drain(..) {
        if !workers.send(shard, WorkerInput::Message(message)).await {
            return None;
        }
    }
    workers.flush().await
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
async fn barrier(lsn: u64, log: &Option<mpsc::Sender<LogCommand>>, workers: &mut Workers) -> bool {
    if let Some(log) = log {
        if log.send(LogCommand::Rotate(lsn)).await.is_err() {
            return false;
        }
    }
    workers.broadcast(|| WorkerInput::Barrier(lsn)).await
}

/// Queues new rules to every worker at this point of the input, then (with a state dir,
/// `snapshot_at`) a snapshot barrier, so a restart never replays readings the old rules handled
/// through the new ones. False when a worker or the log is gone.
async fn pass_reload(
    reload: Arc<Reload>,
    done: oneshot::Sender<()>,
    workers: &mut Workers,
    snapshot_at: Option<(u64, &Option<mpsc::Sender<LogCommand>>)>,
) -> bool {
    if !workers
        .broadcast(|| WorkerInput::Reload(reload.clone()))
        .await
    {
        return false;
    }
    let _ = done.send(());
    match snapshot_at {
        Some((lsn, log)) => barrier(lsn, log, workers).await,
        None => true,
    }
}

/// Sends released acks in order through the source's acker. It takes every batch the log
/// releases at once, so the log writer never waits on it, and sends what the connection takes
/// without waiting (see [`Acker`]); the rest waits here, a millisecond at a time. What waits is
/// bounded by the inputs the broker has in flight unacknowledged (Mosquitto:
/// `max_inflight_messages`).
async fn run_acker(mut acks: mpsc::Receiver<AckBatch>, acker: impl Acker, metrics: Arc<Metrics>) {
    // Each batch's tokens reversed, so the next one to send is popped off the end.
    let mut owed: VecDeque<AckBatch> = VecDeque::new();
    let owe = |owed: &mut VecDeque<AckBatch>, mut batch: AckBatch| {
        batch.tokens.reverse();
        owed.push_back(batch);
    };
    let mut open = true;
    while open || !owed.is_empty() {
        tokio::select! {
            batch = acks.recv(), if open => match batch {
                Some(batch) => owe(&mut owed, batch),
                None => open = false,
            },
            () = tokio::time::sleep(Duration::from_millis(1)), if !owed.is_empty() => {}
        }
        while let Ok(batch) = acks.try_recv() {
            owe(&mut owed, batch);
        }
        while let Some(batch) = owed.front_mut() {
            while let Some(&token) = batch.tokens.last() {
                match acker.try_ack(token) {
                    Ok(Acked::Sent) => metrics.inputs_acked.inc(),
                    Ok(Acked::Stale) => {}
                    Ok(Acked::Later) => break,
                    Err(_) => return,
                }
                batch.tokens.pop();
            }
            if !batch.tokens.is_empty() {
                break;
            }
            if let Some(done) = owed.pop_front().and_then(|batch| batch.done) {
                let _ = done.send(());
            }
        }
    }
}
