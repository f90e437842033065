//! State per partition, kept in NATS: a JetStream object store bucket holds one object per
//! partition (`p17`): the operator state of its devices and the first stream sequence that
//! state has not applied. A new owner loads it and reads the partition on from that sequence.
//!
//! Outboxes do not move between instances. A partition's snapshot is saved only once it is
//! *clean*: every event it held unacknowledged has since been acknowledged (it is absent from
//! the outbox of a later snapshot, or the outbox was empty). Then every event derived from the
//! readings it covers has reached its sink, and a new owner that resumes from it derives only
//! events after it, or again events the output stream drops as duplicates by `Nats-Msg-Id`.

use crate::engine::snapshot::{Snapshot, StoredMessage};
use crate::metrics::Metrics;
use crate::model::checkpoints::Checkpoints;
use crate::model::fence::Fence;
use async_nats::jetstream::object_store::{self, ObjectStore};
use async_nats::jetstream::stream::StorageType;
use std::sync::Arc;
use tokio::sync::mpsc;

/// The object store bucket of partition snapshots.
pub const STATE_BUCKET: &str = "weir_state";

/// The bucket as `weir cluster init` creates it.
pub fn bucket_config(replicas: usize) -> object_store::Config {
    object_store::Config {
        bucket: STATE_BUCKET.to_owned(),
        description: Some("weir cluster: operator state per partition".to_owned()),
        storage: StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// The partition snapshots of one cluster.
#[derive(Clone)]
pub struct StateStore {
    store: ObjectStore,
    /// The bucket's stream, to read an object's chunks by message get.
    stream: async_nats::jetstream::stream::Stream,
}

impl StateStore {
    /// Opens the bucket `weir cluster init` created.
    ///
    /// # Errors
    /// It does not exist (the message says to run `weir cluster init`), or NATS fails.
    pub async fn open(jetstream: &async_nats::jetstream::Context) -> anyhow::Result<Self> {
        let store = jetstream.get_object_store(STATE_BUCKET).await.map_err(|err| {
            anyhow::anyhow!("cannot open the object store {STATE_BUCKET} ({err}); run `weir cluster init --config FILE`")
        })?;
        let stream = jetstream
            .get_stream(format!("OBJ_{STATE_BUCKET}"))
            .await
            .map_err(|err| anyhow::anyhow!("cannot open the object store {STATE_BUCKET}: {err}"))?;
        Ok(Self { store, stream })
    }

    /// Saves `snapshot` as partition `partition`'s; returns its size in bytes.
    ///
    /// # Errors
    /// Encoding or NATS failed; the partition's previous snapshot stays.
    pub async fn save(&self, partition: u32, snapshot: &Snapshot) -> anyhow::Result<usize> {
        let mut bytes = Vec::new();
        ciborium::into_writer(snapshot, &mut bytes)?;
        let size = bytes.len();
        self.store
            .put(key(partition).as_str(), &mut bytes.as_slice())
            .await
            .map_err(|err| anyhow::anyhow!("cannot save partition {partition}'s state: {err}"))?;
        Ok(size)
    }

    /// Partition `partition`'s last saved snapshot, if it has one.
    ///
    /// The chunks are read one message get at a time, not with `ObjectStore::get`: that reads
    /// through an ephemeral R1 consumer, and nats-server releases before nats-io/nats-server#7165
    /// (2025; Debian's 2.9.10 among them) may place it on a dead peer of a replicated bucket,
    /// where its creation never answers. With one server of three down, a third of the loads
    /// timed out, and a start that loads ten partitions almost never succeeded.
    ///
    /// # Errors
    /// NATS failed, or the object is incomplete or not a snapshot.
    pub async fn load(&self, partition: u32) -> anyhow::Result<Option<Snapshot>> {
        let info = match self.store.info(key(partition)).await {
            Ok(info) if info.deleted => return Ok(None),
            Ok(info) => info,
            Err(err) if err.kind() == object_store::InfoErrorKind::NotFound => return Ok(None),
            Err(err) => anyhow::bail!("cannot load partition {partition}'s state: {err}"),
        };
        let subject = format!("$O.{STATE_BUCKET}.C.{}", info.nuid);
        let mut bytes = Vec::with_capacity(info.size);
        let mut sequence = 1;
        for _ in 0..info.chunks {
            let chunk = self
                .stream
                .raw_message_builder()
                .sequence(sequence)
                .next_by_subject(subject.clone())
                .send()
                .await
                .map_err(|err| {
                    anyhow::anyhow!("cannot load partition {partition}'s state: {err}")
                })?;
            bytes.extend_from_slice(&chunk.payload);
            sequence = chunk.sequence + 1;
        }
        anyhow::ensure!(
            bytes.len() == info.size,
            "partition {partition}'s state is incomplete: {} of {} bytes",
            bytes.len(),
            info.size
        );
        let snapshot = ciborium::from_reader(bytes.as_slice())
            .map_err(|err| anyhow::anyhow!("partition {partition}'s state is unreadable: {err}"))?;
        Ok(Some(snapshot))
    }
}

fn key(partition: u32) -> String {
    format!("p{partition}")
}

/// One snapshot of the partitions in `parts` (each `(partition, its saved snapshot)`): their
/// devices together, starting at the lowest of their sequences, and per partition of
/// `partitions`, the first sequence not yet applied (`None` for those not in `parts`).
pub fn merge(parts: Vec<(u32, Option<Snapshot>)>, partitions: u32) -> (Snapshot, Vec<Option<u64>>) {
    let mut owned = vec![None; partitions as usize];
    let mut merged = Snapshot::default();
    let mut lowest: Option<u64> = None;
    for (partition, saved) in parts {
        let saved = saved.unwrap_or_default();
        lowest = Some(lowest.map_or(saved.lsn, |l| l.min(saved.lsn)));
        if let Some(slot) = owned.get_mut(partition as usize) {
            *slot = Some(saved.lsn);
        }
        merged.devices.extend(saved.devices);
        if merged.rules.is_empty() {
            merged.rules = saved.rules;
        }
    }
    merged.lsn = lowest.unwrap_or(0);
    (merged, owned)
}

/// Partition `partition`'s part of an instance's snapshot: its devices, and `first_unapplied`,
/// the partition's own position in the stream as the snapshot's barrier found it (the term's
/// LSNs count deliveries, not stream sequences). No outbox: only clean snapshots are split.
pub fn split(
    snapshot: &Snapshot,
    partition: u32,
    first_unapplied: u64,
    partitions: u32,
) -> Snapshot {
    Snapshot {
        lsn: first_unapplied,
        devices: snapshot
            .devices
            .iter()
            .filter(|device| {
                crate::config::cluster::partition_of(&device.device, partitions) == partition
            })
            .cloned()
            .collect(),
        outbox: Vec::new(),
        rules: snapshot.rules.clone(),
    }
}

/// Whether every event `earlier` held unacknowledged is gone from `later`'s outbox.
pub fn acknowledged_since(earlier: &Snapshot, later: &Snapshot) -> bool {
    let same = |a: &StoredMessage, b: &StoredMessage| match (a.id, b.id) {
        (Some(a_id), Some(b_id)) => a_id == b_id && a.sink == b.sink,
        _ => a == b,
    };
    !earlier
        .outbox
        .iter()
        .any(|event| later.outbox.iter().any(|pending| same(event, pending)))
}

/// Saves the clean ones of the snapshots a term writes, split by partition, while `fence`
/// holds; returns when `snapshots` closes (the term stopped), after the last clean one.
pub async fn save_clean(
    mut snapshots: mpsc::Receiver<Snapshot>,
    store: StateStore,
    checkpoints: Arc<Checkpoints>,
    partitions: u32,
    fence: Arc<Fence>,
    metrics: Arc<Metrics>,
) {
    let mut candidate: Option<Snapshot> = None;
    while let Some(next) = snapshots.recv().await {
        if let Some(earlier) = candidate.take() {
            // The same LSN again is the last snapshot with its outbox brought up to date at
            // shutdown: it replaces the candidate.
            if earlier.lsn != next.lsn && acknowledged_since(&earlier, &next) {
                save(&store, &earlier, &checkpoints, partitions, &fence, &metrics).await;
            }
        }
        if next.outbox.is_empty() {
            save(&store, &next, &checkpoints, partitions, &fence, &metrics).await;
        } else {
            candidate = Some(next);
        }
    }
    if let Some(left) = candidate {
        tracing::warn!(
            lsn = left.lsn,
            unacknowledged = left.outbox.len(),
            "the last snapshot still had events its sinks had not acknowledged; the partitions' next owner resumes from the one before"
        );
    }
}

async fn save(
    store: &StateStore,
    snapshot: &Snapshot,
    checkpoints: &Checkpoints,
    partitions: u32,
    fence: &Fence,
    metrics: &Metrics,
) {
    let Some(positions) = checkpoints.at(snapshot.lsn) else {
        tracing::warn!(
            lsn = snapshot.lsn,
            "no stream positions were noted for this snapshot; the partitions keep their previous state until the next one"
        );
        return;
    };
    let mut bytes = 0;
    for &(partition, first_unapplied) in positions.iter() {
        // A lapsed lease may already be another instance's: its state must not be overwritten.
        if !fence.holds() {
            tracing::warn!(
                "the leases lapsed; partition state is no longer saved by this instance"
            );
            return;
        }
        let part = split(snapshot, partition, first_unapplied, partitions);
        match store.save(partition, &part).await {
            Ok(size) => {
                bytes += size;
                metrics.cluster.state_saved.inc();
            }
            Err(err) => {
                tracing::warn!(%err, "partition state not saved; its previous snapshot stays")
            }
        }
    }
    metrics
        .cluster
        .state_bytes
        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    tracing::debug!(lsn = snapshot.lsn, bytes, "partition state saved");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::snapshot::DeviceSnapshot;

    fn device(name: &str) -> DeviceSnapshot {
        DeviceSnapshot {
            device: name.to_owned(),
            ..DeviceSnapshot::default()
        }
    }

    fn event(id: u64) -> StoredMessage {
        StoredMessage {
            topic: "alerts/x".into(),
            payload: vec![],
            qos: 1,
            retain: false,
            rule: "overheat".into(),
            id: Some(id),
            traceparent: None,
            tracestate: None,
            sink: "hub".into(),
            table: None,
        }
    }

    #[test]
    fn split_and_merge_keep_each_device_with_its_partition_and_sequence() {
        let partitions = 4;
        let names: Vec<String> = (0..20).map(|i| format!("dev-{i}")).collect();
        let whole = Snapshot {
            lsn: 100,
            devices: names.iter().map(|n| device(n)).collect(),
            outbox: vec![],
            rules: vec![("overheat".into(), 7)],
        };
        // Each partition read on its own: partition 2 had reached 120 at the barrier, the
        // others 100.
        let parts: Vec<(u32, Option<Snapshot>)> = (0..partitions)
            .map(|p| {
                (
                    p,
                    Some(split(&whole, p, if p == 2 { 120 } else { 100 }, partitions)),
                )
            })
            .collect();
        let total: usize = parts
            .iter()
            .map(|(_, s)| s.as_ref().unwrap().devices.len())
            .sum();
        assert_eq!(total, names.len());
        for (p, part) in &parts {
            let part = part.as_ref().unwrap();
            assert_eq!(part.lsn, if *p == 2 { 120 } else { 100 });
            assert!(part
                .devices
                .iter()
                .all(|d| crate::config::cluster::partition_of(&d.device, partitions) == *p));
        }
        let mut some: Vec<_> = parts.into_iter().filter(|(p, _)| *p != 3).collect();
        some.push((3, None));
        let (merged, owned) = merge(some, partitions);
        assert_eq!(owned, vec![Some(100), Some(100), Some(120), Some(0)]);
        assert_eq!(
            merged.lsn, 0,
            "a partition without a snapshot is read from the start"
        );
        assert_eq!(merged.rules, vec![("overheat".to_owned(), 7)]);
    }

    #[test]
    fn a_snapshot_is_clean_once_its_pending_events_are_acknowledged() {
        let at = |lsn, outbox| Snapshot {
            lsn,
            outbox,
            ..Snapshot::default()
        };
        assert!(acknowledged_since(
            &at(1, vec![event(1), event(2)]),
            &at(2, vec![event(3)])
        ));
        assert!(!acknowledged_since(
            &at(1, vec![event(1), event(2)]),
            &at(2, vec![event(2), event(3)])
        ));
        assert!(acknowledged_since(&at(1, vec![]), &at(2, vec![event(1)])));
    }
}
