//! The tasks that make intake durable: the log writer (a thread: appends inputs, fsyncs in groups
//! every `fsync_interval`, then releases their acknowledgements in receive order), and the
//! snapshot writer (writes completed snapshots, then lets the log drop what they cover).

use super::log::{InputLog, RecordRef};
use super::{snapshot, StateDir};
use crate::engine::snapshot::Snapshot;
pub use crate::engine::snapshot::SnapshotCommand;
use crate::metrics::Metrics;
use crate::model::port::{AckBatch, AckToken, LogCommand};
use crate::model::trace::TraceContext;
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// When an input counts as durable, and so may be acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckAfter {
    /// After the fsync that covers it (group commit): survives a power cut.
    Fsync,
    /// After it is written to the OS; fsync runs every `fsync_interval`: survives a crash of
    /// weir, but a power cut can lose what was acknowledged since the last fsync.
    Write,
}

/// Starts the log writer thread. Acks released after each sync (or write) go to `acks` in
/// receive order.
///
/// Group commit: the thread takes every command already queued, appends them, then makes them
/// durable with one fsync and releases their acks; inputs arriving during an fsync form the next
/// group. So the ack delay is about one fsync, and the fsync rate adapts to the load.
///
/// A failed write (disk full, I/O error) is retried with backoff until it works; meanwhile the
/// thread takes no new commands, so nothing is acknowledged, the source stops receiving once
/// the broker's inflight window is full, and the broker's queue is the buffer. `/readyz` and
/// `weir_store_writable` say so while it lasts.
///
/// # Errors
/// The log cannot be opened.
pub fn spawn_log_writer(
    dir: &StateDir,
    next_lsn: u64,
    ack_after: AckAfter,
    fsync_interval: Duration,
    metrics: Arc<Metrics>,
    mut commands: mpsc::Receiver<LogCommand>,
    acks: mpsc::Sender<AckBatch>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let mut log = InputLog::open(&dir.log_dir(), next_lsn).map_err(|err| {
        anyhow::anyhow!(
            "cannot open the input log in {}: {err}",
            dir.log_dir().display()
        )
    })?;
    let log_dir = dir.log_dir();
    let handle = std::thread::Builder::new()
        .name("weir-log".into())
        .spawn(move || {
            let mut writer = LogWriter {
                log: &mut log,
                log_dir,
                scratch: Vec::with_capacity(4096),
                pending: Vec::new(),
                unwritten: Vec::new(),
                done: Vec::new(),
                previous_snapshot: None,
                fault: None,
                metrics,
                ack_after,
                last_fsync: Instant::now(),
                fsync_interval,
            };
            while let Some(first) = commands.blocking_recv() {
                writer.handle(first);
                while let Ok(command) = commands.try_recv() {
                    writer.handle(command);
                }
                if !writer.commit(&acks, &commands) {
                    return;
                }
            }
            writer.commit(&acks, &commands);
        })?;
    Ok(handle)
}

/// An input appended to the log and not yet known to be written: kept until it is, so a failed
/// write can be done again.
struct Unwritten {
    lsn: u64,
    arrival_ms: i64,
    input: u16,
    topic: String,
    payload: Bytes,
    trace: Option<Arc<TraceContext>>,
}

impl Unwritten {
    fn record(&self) -> RecordRef<'_> {
        RecordRef {
            lsn: self.lsn,
            arrival_ms: self.arrival_ms,
            input: self.input,
            topic: &self.topic,
            payload: &self.payload,
            trace: self.trace.as_deref(),
        }
    }
}

/// First and longest wait between attempts to write the log again after a failure.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The log writer thread's state between commands.
struct LogWriter<'a> {
    log: &'a mut InputLog,
    log_dir: std::path::PathBuf,
    scratch: Vec<u8>,
    /// Acks of appended inputs, released at the next commit.
    pending: Vec<AckToken>,
    /// Inputs appended since the last successful write, for a retry.
    unwritten: Vec<Unwritten>,
    /// Flush requests answered at the next commit.
    done: Vec<oneshot::Sender<()>>,
    previous_snapshot: Option<u64>,
    /// The error that stops the log from being written, while it lasts.
    fault: Option<std::io::Error>,
    metrics: Arc<Metrics>,
    ack_after: AckAfter,
    last_fsync: Instant,
    fsync_interval: Duration,
}

impl LogWriter<'_> {
    fn handle(&mut self, command: LogCommand) {
        match command {
            LogCommand::Append {
                lsn,
                arrival_ms,
                input,
                topic,
                payload,
                trace,
                ack,
            } => {
                let unwritten = Unwritten {
                    lsn,
                    arrival_ms,
                    input,
                    topic,
                    payload,
                    trace,
                };
                // After a failure nothing more is appended until the retry writes everything.
                if self.fault.is_none() {
                    if let Err(err) = self.log.append(unwritten.record(), &mut self.scratch) {
                        self.failed(err);
                    }
                }
                self.unwritten.push(unwritten);
                self.pending.extend(ack);
            }
            LogCommand::Rotate(lsn) => {
                // Rotating syncs first: a failure there is retried like any write. A segment
                // that cannot be created is not: the log goes on in the open one, which is
                // correct (segments are read by LSN), only kept longer.
                if self.fault.is_none() && self.write_pending(true) {
                    if let Err(err) = self.log.rotate(lsn) {
                        tracing::warn!(%err, lsn, "cannot start a new input log segment; writing on in the current one");
                    }
                }
            }
            LogCommand::SnapshotWritten(lsn) => {
                // Keep the log back to the previous snapshot too: it is the fallback if the
                // newest one turns out corrupt.
                if let Some(previous) = self.previous_snapshot.replace(lsn) {
                    if let Err(err) = self.log.truncate_before(previous) {
                        tracing::warn!(%err, "cannot delete old input log segments");
                    }
                }
            }
            LogCommand::Flush(done) => self.done.push(done),
        }
    }

    /// Writes (`fsync`: and syncs) what was appended; false, with the fault recorded, if that
    /// failed.
    fn write_pending(&mut self, fsync: bool) -> bool {
        let result = if fsync {
            self.last_fsync = Instant::now();
            self.log.sync()
        } else {
            self.log.flush()
        };
        match result {
            Ok(()) => {
                self.unwritten.clear();
                true
            }
            Err(err) => {
                self.failed(err);
                false
            }
        }
    }

    /// Makes what was appended durable (per `ack_after`) and releases its acks, in order. After
    /// a failure it retries with backoff until the write works, taking no new commands
    /// meanwhile; false if weir stopped (`commands` closed) first, when what was not written is
    /// never acknowledged and the broker delivers it again after the restart.
    fn commit(
        &mut self,
        acks: &mpsc::Sender<AckBatch>,
        commands: &mpsc::Receiver<LogCommand>,
    ) -> bool {
        let flushing = !self.done.is_empty();
        let fsync = match self.ack_after {
            AckAfter::Fsync => true,
            AckAfter::Write => flushing || self.last_fsync.elapsed() >= self.fsync_interval,
        };
        if self.fault.is_none() {
            self.write_pending(fsync);
        }
        let mut wait = RETRY_FIRST;
        while self.fault.is_some() {
            if commands.is_closed() {
                tracing::warn!(
                    inputs = self.unwritten.len(),
                    "stopping with inputs the input log could not write; they were not acknowledged, and the broker delivers them again"
                );
                return false;
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(RETRY_MAX);
            let records = self.unwritten.iter().map(Unwritten::record);
            match self.log.rewrite(records, &mut self.scratch) {
                Ok(()) => {
                    tracing::info!(
                        inputs = self.unwritten.len(),
                        "the input log can be written again; acknowledging inputs again"
                    );
                    self.unwritten.clear();
                    self.fault = None;
                    self.metrics.set_store_fault(None);
                }
                Err(err) => self.failed(err),
            }
        }
        let tokens = std::mem::take(&mut self.pending);
        let mut done = std::mem::take(&mut self.done);
        if tokens.is_empty() && done.is_empty() {
            return true;
        }
        // One batch per flush request, so each request is answered after the acks before it.
        let last = done.pop();
        for request in done {
            let _ = request.send(());
        }
        let _ = acks.blocking_send(AckBatch { tokens, done: last });
        true
    }

    /// Records a failed write: counted every time, logged and shown on `/readyz` when it
    /// starts or its reason changes.
    fn failed(&mut self, err: std::io::Error) {
        self.metrics
            .store_write_errors
            .with_label_values(&["log"])
            .inc();
        let changed = self
            .fault
            .as_ref()
            .is_none_or(|fault| fault.kind() != err.kind());
        if changed {
            tracing::error!(
                %err,
                dir = %self.log_dir.display(),
                "cannot write the input log; inputs are not acknowledged (the broker keeps them) until it works again, retrying"
            );
            self.metrics.set_store_fault(Some(format!(
                "cannot write the input log in {} ({err}); inputs are not acknowledged until it works again",
                self.log_dir.display()
            )));
        }
        self.fault = Some(err);
    }
}

/// Starts the snapshot writer: once all `parts` of a snapshot (one per sink) have come, writes
/// it atomically, then tells the log writer (if any) so it can drop the segments the snapshot
/// before it covered. With `copies` (`[cluster]`), every snapshot written, and the last one
/// again once its outbox was brought up to date, also goes there, for the cluster's state store.
pub fn spawn_snapshot_writer(
    dir: StateDir,
    metrics: Arc<Metrics>,
    log: Option<mpsc::Sender<LogCommand>>,
    parts: usize,
    copies: Option<mpsc::Sender<Snapshot>>,
) -> (mpsc::Sender<SnapshotCommand>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<SnapshotCommand>(2 * parts.max(1));
    let task = tokio::spawn(async move {
        // Snapshots some sinks' parts of have come, by LSN, with the count of parts. Bounded by
        // the snapshots in flight: a sink sends its part of each LSN once, in LSN order.
        let mut pending: std::collections::BTreeMap<u64, (usize, Snapshot)> =
            std::collections::BTreeMap::new();
        while let Some(command) = rx.recv().await {
            let path = dir.path().to_owned();
            let snapshot = match command {
                SnapshotCommand::Write(part) => {
                    let entry = pending.entry(part.lsn).or_default();
                    entry.0 += 1;
                    let whole = &mut entry.1;
                    whole.lsn = part.lsn;
                    whole.devices.extend(part.devices);
                    whole.outbox.extend(part.outbox);
                    if !part.rules.is_empty() {
                        whole.rules = part.rules;
                    }
                    if entry.0 < parts {
                        continue;
                    }
                    let lsn = part.lsn;
                    match pending.remove(&lsn) {
                        Some((_, snapshot)) => snapshot,
                        None => continue,
                    }
                }
                SnapshotCommand::ReplaceOutbox { lsn, sink, outbox } => {
                    let left = outbox.len();
                    let replaced = tokio::task::spawn_blocking(move || {
                        let mut current = snapshot::load(&path).snapshot?;
                        if current.lsn != lsn {
                            return None;
                        }
                        current.outbox.retain(|message| message.sink != sink);
                        current.outbox.extend(outbox);
                        Some(snapshot::write(&path, &current).map(|()| current))
                    })
                    .await;
                    match replaced {
                        Ok(Some(Ok(current))) => {
                            tracing::debug!(
                                lsn,
                                outbox = left,
                                "snapshot outbox brought up to date"
                            );
                            if let Some(copies) = &copies {
                                let _ = copies.send(current).await;
                            }
                        }
                        Ok(Some(Err(err))) => {
                            tracing::warn!(%err, "cannot update the last snapshot's outbox; its events are published again at the next start")
                        }
                        Ok(None) | Err(_) => {}
                    }
                    continue;
                }
            };
            let lsn = snapshot.lsn;
            let devices = snapshot.devices.len();
            let outbox = snapshot.outbox.len();
            let copy = copies.as_ref().map(|_| snapshot.clone());
            let written =
                tokio::task::spawn_blocking(move || snapshot::write(&path, &snapshot)).await;
            match written {
                Ok(Ok(())) => {
                    if let (Some(copies), Some(copy)) = (&copies, copy) {
                        let _ = copies.send(copy).await;
                    }
                    metrics.snapshots_written.inc();
                    tracing::debug!(lsn, devices, outbox, "snapshot written");
                    if let Some(log) = &log {
                        let _ = log.send(LogCommand::SnapshotWritten(lsn)).await;
                    }
                }
                Ok(Err(err)) => {
                    metrics
                        .store_write_errors
                        .with_label_values(&["snapshot"])
                        .inc();
                    tracing::error!(%err, "cannot write a snapshot; the previous one stays, and the input log is kept back to it");
                }
                Err(err) => tracing::error!(%err, "the snapshot writer failed"),
            }
        }
    });
    (tx, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Snapshot, StoredMessage};

    fn message(topic: &str) -> StoredMessage {
        StoredMessage {
            topic: topic.into(),
            payload: b"{}".to_vec(),
            qos: 1,
            retain: false,
            rule: "overheat".into(),
            id: None,
            traceparent: None,
            tracestate: None,
            sink: String::new(),
            table: None,
        }
    }

    #[tokio::test]
    async fn the_last_snapshots_outbox_is_replaced_only_at_its_own_lsn() {
        let path = std::env::temp_dir().join(format!("weir-writer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        let dir = StateDir::open(&path).unwrap();
        let (tx, task) = spawn_snapshot_writer(dir, Arc::new(Metrics::new()), None, 1, None);
        let snapshot = Snapshot {
            lsn: 7,
            outbox: vec![message("a"), message("b")],
            ..Snapshot::default()
        };
        tx.send(SnapshotCommand::Write(snapshot)).await.unwrap();
        // Another LSN: not the snapshot on disk, so nothing changes.
        let stale = vec![];
        tx.send(SnapshotCommand::ReplaceOutbox {
            lsn: 6,
            sink: String::new(),
            outbox: stale,
        })
        .await
        .unwrap();
        tx.send(SnapshotCommand::ReplaceOutbox {
            lsn: 7,
            sink: String::new(),
            outbox: vec![message("b")],
        })
        .await
        .unwrap();
        drop(tx);
        task.await.unwrap();
        let loaded = snapshot::load(&path).snapshot.unwrap();
        assert_eq!(loaded.lsn, 7);
        assert_eq!(loaded.outbox, vec![message("b")]);
        let _ = std::fs::remove_dir_all(&path);
    }

    #[tokio::test]
    async fn a_snapshot_is_written_once_every_sink_sent_its_part() {
        let path = std::env::temp_dir().join(format!("weir-parts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        let dir = StateDir::open(&path).unwrap();
        let (tx, task) = spawn_snapshot_writer(dir, Arc::new(Metrics::new()), None, 2, None);
        let hook = |topic: &str| StoredMessage {
            sink: "hook".into(),
            ..message(topic)
        };
        let broker_part = Snapshot {
            lsn: 3,
            devices: vec![crate::engine::snapshot::DeviceSnapshot::default()],
            outbox: vec![message("a")],
            rules: vec![("overheat".into(), 1)],
        };
        tx.send(SnapshotCommand::Write(broker_part)).await.unwrap();
        // A part alone writes nothing.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(snapshot::load(&path).snapshot.is_none());
        let hook_part = Snapshot {
            lsn: 3,
            outbox: vec![hook("h1"), hook("h2")],
            ..Snapshot::default()
        };
        tx.send(SnapshotCommand::Write(hook_part)).await.unwrap();
        // At shutdown the webhook confirmed h1: only its part of the outbox changes.
        tx.send(SnapshotCommand::ReplaceOutbox {
            lsn: 3,
            sink: "hook".into(),
            outbox: vec![hook("h2")],
        })
        .await
        .unwrap();
        drop(tx);
        task.await.unwrap();
        let loaded = snapshot::load(&path).snapshot.unwrap();
        assert_eq!(loaded.devices.len(), 1);
        assert_eq!(loaded.rules, vec![("overheat".to_owned(), 1)]);
        assert_eq!(loaded.outbox, vec![message("a"), hook("h2")]);
        let _ = std::fs::remove_dir_all(&path);
    }
}
