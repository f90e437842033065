//! The tasks that make intake durable: the log writer (a thread: appends inputs, fsyncs in groups
//! every `fsync_interval`, then releases their acknowledgements in receive order), and the
//! snapshot writer (writes completed snapshots, then lets the log drop what they cover).

use super::log::{InputLog, RecordRef};
use super::{snapshot, Snapshot, StateDir};
use crate::metrics::Metrics;
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// The acknowledgement owed to the broker for one QoS 1 input, sent once the input is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    /// Which connection delivered the message: acks are never sent on a later connection,
    /// where the packet id means something else (the broker redelivers instead).
    pub generation: u64,
    pub pkid: u16,
}

/// Acks released by one sync, in receive order; `done` is answered once they are all sent.
#[derive(Debug, Default)]
pub struct AckBatch {
    pub tokens: Vec<AckToken>,
    pub done: Option<oneshot::Sender<()>>,
}

/// Commands to the log writer.
#[derive(Debug)]
pub enum LogCommand {
    Append {
        lsn: u64,
        arrival_ms: i64,
        input: u16,
        topic: String,
        payload: Bytes,
        ack: Option<AckToken>,
    },
    /// Start a new segment at this LSN (a snapshot barrier).
    Rotate(u64),
    /// A snapshot covering everything before this LSN is on disk.
    SnapshotWritten(u64),
    /// Sync now and release every pending ack; `done` is answered once the acks are sent.
    Flush(oneshot::Sender<()>),
}

/// Starts the log writer thread. Acks released after each sync go to `acks` in receive order.
///
/// # Errors
/// The log cannot be opened.
pub fn spawn_log_writer(
    dir: &StateDir,
    next_lsn: u64,
    fsync_interval: Duration,
    mut commands: mpsc::Receiver<LogCommand>,
    acks: mpsc::Sender<AckBatch>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let mut log = InputLog::open(&dir.log_dir(), next_lsn).map_err(|err| {
        anyhow::anyhow!(
            "cannot open the input log in {}: {err}",
            dir.log_dir().display()
        )
    })?;
    let handle = std::thread::Builder::new()
        .name("weir-log".into())
        .spawn(move || {
            let mut scratch = Vec::with_capacity(4096);
            let mut pending: Vec<AckToken> = Vec::new();
            let mut previous_snapshot: Option<u64> = None;
            let mut last_sync = Instant::now();
            let mut failed = false;
            let sync = |log: &mut InputLog, pending: &mut Vec<AckToken>, failed: &mut bool| {
                match log.sync() {
                    Ok(()) => {
                        if !pending.is_empty() {
                            let _ = acks.blocking_send(AckBatch {
                                tokens: std::mem::take(pending),
                                done: None,
                            });
                        }
                    }
                    Err(err) => {
                        // Unsynced inputs are never acknowledged: the broker redelivers them.
                        if !*failed {
                            tracing::error!(%err, "cannot sync the input log; inputs are no longer acknowledged");
                        }
                        *failed = true;
                        pending.clear();
                    }
                }
            };
            while let Some(first) = commands.blocking_recv() {
                let mut next = Some(first);
                while let Some(command) = next.take() {
                    match command {
                        LogCommand::Append {
                            lsn,
                            arrival_ms,
                            input,
                            topic,
                            payload,
                            ack,
                        } => {
                            let record = RecordRef {
                                lsn,
                                arrival_ms,
                                input,
                                topic: &topic,
                                payload: &payload,
                            };
                            match log.append(record, &mut scratch) {
                                Ok(()) => pending.extend(ack),
                                Err(err) => {
                                    if !failed {
                                        tracing::error!(%err, "cannot append to the input log");
                                    }
                                    failed = true;
                                }
                            }
                        }
                        LogCommand::Rotate(lsn) => {
                            sync(&mut log, &mut pending, &mut failed);
                            last_sync = Instant::now();
                            if let Err(err) = log.rotate(lsn) {
                                tracing::error!(%err, "cannot start a new input log segment");
                            }
                        }
                        LogCommand::SnapshotWritten(lsn) => {
                            // Keep the log back to the previous snapshot too: it is the fallback
                            // if the newest one turns out corrupt.
                            if let Some(previous) = previous_snapshot.replace(lsn) {
                                if let Err(err) = log.truncate_before(previous) {
                                    tracing::warn!(%err, "cannot delete old input log segments");
                                }
                            }
                        }
                        LogCommand::Flush(done) => {
                            sync(&mut log, &mut pending, &mut failed);
                            last_sync = Instant::now();
                            let _ = acks.blocking_send(AckBatch {
                                tokens: Vec::new(),
                                done: Some(done),
                            });
                        }
                    }
                    if last_sync.elapsed() >= fsync_interval {
                        sync(&mut log, &mut pending, &mut failed);
                        last_sync = Instant::now();
                    }
                    next = commands.try_recv().ok();
                }
                // Nothing queued: wait out the rest of the interval (more inputs gather meanwhile),
                // then sync them as one group.
                if !pending.is_empty() {
                    std::thread::sleep(fsync_interval.saturating_sub(last_sync.elapsed()));
                    while let Ok(command) = commands.try_recv() {
                        if let LogCommand::Append {
                            lsn,
                            arrival_ms,
                            input,
                            topic,
                            payload,
                            ack,
                        } = command
                        {
                            let record = RecordRef {
                                lsn,
                                arrival_ms,
                                input,
                                topic: &topic,
                                payload: &payload,
                            };
                            if log.append(record, &mut scratch).is_ok() {
                                pending.extend(ack);
                            }
                        } else {
                            // Anything but an append waits for the main loop: requeueing would
                            // reorder it, so handle it there after this sync.
                            sync(&mut log, &mut pending, &mut failed);
                            handle_rare(command, &mut log, &mut pending, &mut previous_snapshot, &acks);
                        }
                    }
                    sync(&mut log, &mut pending, &mut failed);
                    last_sync = Instant::now();
                }
            }
            sync(&mut log, &mut pending, &mut failed);
        })?;
    Ok(handle)
}

/// Rotate, snapshot-written and flush commands met while gathering a sync group.
fn handle_rare(
    command: LogCommand,
    log: &mut InputLog,
    pending: &mut Vec<AckToken>,
    previous_snapshot: &mut Option<u64>,
    acks: &mpsc::Sender<AckBatch>,
) {
    match command {
        LogCommand::Rotate(lsn) => {
            if let Err(err) = log.rotate(lsn) {
                tracing::error!(%err, "cannot start a new input log segment");
            }
        }
        LogCommand::SnapshotWritten(lsn) => {
            if let Some(previous) = previous_snapshot.replace(lsn) {
                let _ = log.truncate_before(previous);
            }
        }
        LogCommand::Flush(done) => {
            let _ = acks.blocking_send(AckBatch {
                tokens: std::mem::take(pending),
                done: Some(done),
            });
        }
        LogCommand::Append { .. } => {}
    }
}

/// Starts the snapshot writer: writes each completed snapshot atomically, then tells the log
/// writer (if any) so it can drop the segments the snapshot before it covered.
pub fn spawn_snapshot_writer(
    dir: StateDir,
    metrics: Arc<Metrics>,
    log: Option<mpsc::Sender<LogCommand>>,
) -> (mpsc::Sender<Snapshot>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Snapshot>(2);
    let task = tokio::spawn(async move {
        while let Some(snapshot) = rx.recv().await {
            let lsn = snapshot.lsn;
            let devices = snapshot.devices.len();
            let outbox = snapshot.outbox.len();
            let path = dir.path().to_owned();
            let written =
                tokio::task::spawn_blocking(move || snapshot::write(&path, &snapshot)).await;
            match written {
                Ok(Ok(())) => {
                    metrics.snapshots_written.inc();
                    tracing::debug!(lsn, devices, outbox, "snapshot written");
                    if let Some(log) = &log {
                        let _ = log.send(LogCommand::SnapshotWritten(lsn)).await;
                    }
                }
                Ok(Err(err)) => {
                    tracing::error!(%err, "cannot write a snapshot; the previous one stays")
                }
                Err(err) => tracing::error!(%err, "the snapshot writer failed"),
            }
        }
    });
    (tx, task)
}
