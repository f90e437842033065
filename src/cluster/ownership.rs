//! Who reads which partition, without a coordinator of weir's own: each instance heartbeats a
//! member key in a KV bucket whose entries expire after the lease TTL, every instance computes
//! the same assignment from the live members by rendezvous hashing (a join or a leave moves
//! about 1/N of the partitions), and an instance claims a partition by creating its key in the
//! owners bucket, or renews it by compare-and-set on the key's revision. The revision is the
//! fencing token: a claim renewed by another instance cannot be renewed by this one.
//!
//! A lease is valid locally until a margin before the TTL after its last renewal, measured on
//! the monotonic clock: an instance that was paused (SIGSTOP, a long GC-like stall, a network
//! partition from NATS) finds its leases expired when it runs again, and stops using them before
//! anyone else can have claimed them (the server expires the key only after the full TTL).

use async_nats::jetstream::kv;
use async_nats::jetstream::stream::{Config as StreamConfig, DiscardPolicy, StorageType};
use std::time::{Duration, Instant};

/// The members bucket: one key per live instance.
pub const MEMBERS_BUCKET: &str = "weir_members";
/// The owners bucket: one key per claimed partition (`p17`), holding the owner's name.
pub const OWNERS_BUCKET: &str = "weir_owners";

/// The part of the TTL a lease is not trusted for: with a TTL of 10 s, a lease renewed at t is
/// used until t + 7.5 s, while the server keeps the claim until t + 10 s.
const SAFETY_DIVISOR: u32 = 4;

/// The owner of each partition among `members` (rendezvous hashing: the member with the highest
/// hash of (member, partition)). Every instance computes the same answer from the same members.
pub fn assignment(members: &[String], partitions: u32) -> Vec<Option<String>> {
    (0..partitions)
        .map(|partition| {
            members
                .iter()
                .max_by_key(|member| (score(member, partition), member.as_str()))
                .cloned()
        })
        .collect()
}

/// A well-mixed 64-bit hash of (member, partition): FNV-1a, then a finalizer, so that members
/// with similar names do not win the same partitions.
fn score(member: &str, partition: u32) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in member.bytes().chain(partition.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finalizer.
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// A partition this instance holds: valid until [`Lease::valid_until`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub partition: u32,
    /// The owners-bucket revision of the claim: the fencing token.
    pub revision: u64,
    renewed: Instant,
    ttl: Duration,
}

impl Lease {
    /// The last instant this instance may act on the partition (monotonic clock).
    pub fn valid_until(&self) -> Instant {
        self.renewed + self.ttl - self.ttl / SAFETY_DIVISOR
    }

    pub fn is_valid(&self, now: Instant) -> bool {
        now < self.valid_until()
    }
}

/// The buckets, as `weir cluster init` creates them: the streams behind NATS KV buckets
/// (`KV_<bucket>`, as the KV API lays them out), one value per key, expiring after the lease
/// TTL. They are created as streams because async-nats' KV creation asks the server for
/// account details that nats-server 2.9 answers in a form the client cannot read.
pub fn bucket_configs(ttl: Duration, replicas: usize) -> [StreamConfig; 2] {
    [MEMBERS_BUCKET, OWNERS_BUCKET].map(|bucket| StreamConfig {
        name: format!("KV_{bucket}"),
        description: Some(format!(
            "weir cluster {bucket}: entries expire after the lease TTL"
        )),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age: ttl,
        storage: StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        discard: DiscardPolicy::New,
        num_replicas: replicas,
        ..Default::default()
    })
}

/// One instance's view of the members and its own claims.
pub struct Membership {
    members: kv::Store,
    owners: kv::Store,
    name: String,
    ttl: Duration,
}

/// Why a claim or renewal did not give a lease.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another instance holds the partition (its key exists, or changed since our revision).
    #[error("partition {0} is held by another instance")]
    Taken(u32),
    #[error("NATS: {0}")]
    Nats(String),
}

impl Membership {
    /// Opens the buckets `weir cluster init` created.
    ///
    /// # Errors
    /// A bucket does not exist (the message says to run `weir cluster init`), or NATS fails.
    pub async fn open(
        jetstream: &async_nats::jetstream::Context,
        name: impl Into<String>,
        ttl: Duration,
    ) -> anyhow::Result<Self> {
        let open = |bucket: &'static str| async move {
            jetstream.get_key_value(bucket).await.map_err(|err| {
                anyhow::anyhow!("cannot open the KV bucket {bucket} ({err}); run `weir cluster init --config FILE`")
            })
        };
        Ok(Self {
            members: open(MEMBERS_BUCKET).await?,
            owners: open(OWNERS_BUCKET).await?,
            name: name.into(),
            ttl,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Says this instance is alive; call it every TTL / 3.
    ///
    /// # Errors
    /// NATS did not store it.
    pub async fn heartbeat(&self) -> anyhow::Result<()> {
        self.members
            .put(&self.name, self.name.clone().into_bytes().into())
            .await
            .map_err(|err| anyhow::anyhow!("heartbeat failed: {err}"))?;
        Ok(())
    }

    /// The instances whose heartbeat has not expired, sorted.
    ///
    /// # Errors
    /// NATS could not list them.
    pub async fn live_members(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .member_revisions()
            .await?
            .into_iter()
            .map(|(member, _)| member)
            .collect())
    }

    /// Every member key with its revision (which changes at each heartbeat), sorted. The server
    /// expires a silent member's key only after the TTL, and nats-server 2.9 seen here was late
    /// by several seconds: callers judge liveness by [`Liveness`] instead.
    ///
    /// # Errors
    /// NATS could not be read.
    pub async fn member_revisions(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let mut revisions = Vec::new();
        for member in bucket_keys(&self.members).await? {
            let entry = self
                .members
                .entry(&member)
                .await
                .map_err(|err| anyhow::anyhow!("cannot read the members: {err}"))?;
            if let Some(entry) = entry.filter(|entry| entry.operation == kv::Operation::Put) {
                revisions.push((member, entry.revision));
            }
        }
        revisions.sort();
        Ok(revisions)
    }

    /// The revision of `partition`'s claim, if someone holds it.
    ///
    /// # Errors
    /// NATS could not be read.
    pub async fn claim_revision(&self, partition: u32) -> anyhow::Result<Option<u64>> {
        let entry = self
            .owners
            .entry(key(partition))
            .await
            .map_err(|err| anyhow::anyhow!("cannot read the owners: {err}"))?;
        Ok(entry
            .filter(|entry| entry.operation == kv::Operation::Put)
            .map(|entry| entry.revision))
    }

    /// Takes over `partition` from a holder that stopped renewing: compare-and-set on the
    /// `revision` seen unchanged for a whole TTL (see [`Liveness`]).
    ///
    /// # Errors
    /// [`ClaimError::Taken`] when it changed since (renewed, or taken by another).
    pub async fn take_over(&self, partition: u32, revision: u64) -> Result<Lease, ClaimError> {
        let stale = Lease {
            partition,
            revision,
            renewed: Instant::now(),
            ttl: self.ttl,
        };
        self.renew(&stale).await
    }

    /// The owner each partition's key names now (`None` where nobody holds it).
    ///
    /// # Errors
    /// NATS could not be read.
    pub async fn owners(&self, partitions: u32) -> anyhow::Result<Vec<Option<String>>> {
        let mut owners = Vec::with_capacity(partitions as usize);
        for partition in 0..partitions {
            let entry = self
                .owners
                .entry(key(partition))
                .await
                .map_err(|err| anyhow::anyhow!("cannot read the owners: {err}"))?;
            owners.push(entry.and_then(|entry| match entry.operation {
                kv::Operation::Put => Some(String::from_utf8_lossy(&entry.value).into_owned()),
                _ => None,
            }));
        }
        Ok(owners)
    }

    /// Claims `partition` if nobody holds it (its key is absent, deleted or expired).
    ///
    /// # Errors
    /// [`ClaimError::Taken`] when another instance holds it.
    pub async fn claim(&self, partition: u32) -> Result<Lease, ClaimError> {
        let started = Instant::now();
        match self
            .owners
            .create(key(partition), self.name.clone().into_bytes().into())
            .await
        {
            Ok(revision) => Ok(self.lease(partition, revision, started)),
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {
                Err(ClaimError::Taken(partition))
            }
            Err(err) => Err(ClaimError::Nats(err.to_string())),
        }
    }

    /// Renews `lease` by compare-and-set on its revision.
    ///
    /// # Errors
    /// [`ClaimError::Taken`] when the key changed since (another instance claimed it after it
    /// expired): the lease is lost.
    pub async fn renew(&self, lease: &Lease) -> Result<Lease, ClaimError> {
        let started = Instant::now();
        match self
            .owners
            .update(
                key(lease.partition),
                self.name.clone().into_bytes().into(),
                lease.revision,
            )
            .await
        {
            Ok(revision) => Ok(self.lease(lease.partition, revision, started)),
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Err(ClaimError::Taken(lease.partition))
            }
            Err(err) => Err(ClaimError::Nats(err.to_string())),
        }
    }

    /// Gives `lease` up (after its state is saved), so the next owner need not wait for the TTL.
    ///
    /// # Errors
    /// NATS refused; the claim then expires by itself.
    pub async fn release(&self, lease: &Lease) -> anyhow::Result<()> {
        self.owners
            .delete_expect_revision(key(lease.partition), Some(lease.revision))
            .await
            .map_err(|err| anyhow::anyhow!("cannot release partition {}: {err}", lease.partition))
    }

    /// Removes this instance's member key (a clean leave).
    ///
    /// # Errors
    /// NATS refused; the key then expires by itself.
    pub async fn leave(&self) -> anyhow::Result<()> {
        self.members
            .delete(&self.name)
            .await
            .map_err(|err| anyhow::anyhow!("cannot leave: {err}"))
    }

    fn lease(&self, partition: u32, revision: u64, renewed: Instant) -> Lease {
        // The renewal counts from when it was asked for: the server's TTL started no earlier.
        Lease {
            partition,
            revision,
            renewed,
            ttl: self.ttl,
        }
    }
}

fn key(partition: u32) -> String {
    format!("p{partition}")
}

/// The keys `bucket` has a message for (deleted ones included: their last message is the
/// delete marker), from one stream info request.
///
/// Not `kv::Store::keys`: it reads through an ephemeral R1 consumer, and nats-server releases
/// before nats-io/nats-server#7165 (2025; Debian's 2.9.10 among them) may place that on a dead
/// peer of a replicated bucket, where its creation never answers. With one server of three
/// down, a third of the listings failed and the instances kept standing down.
async fn bucket_keys(bucket: &kv::Store) -> anyhow::Result<Vec<String>> {
    use futures_util::TryStreamExt as _;
    let subjects: Vec<(String, usize)> = bucket
        .stream
        .info_with_subjects(format!("{}>", bucket.prefix))
        .await
        .map_err(|err| anyhow::anyhow!("cannot list the keys of {}: {err}", bucket.name))?
        .try_collect()
        .await
        .map_err(|err| anyhow::anyhow!("cannot list the keys of {}: {err}", bucket.name))?;
    Ok(subjects
        .into_iter()
        .filter_map(|(subject, _)| subject.strip_prefix(&bucket.prefix).map(str::to_owned))
        .collect())
}

/// Which keys are alive, judged by this instance alone: a key whose revision it has seen
/// unchanged for a whole TTL, on its own monotonic clock, belongs to a holder that stopped
/// renewing. The holder itself stopped trusting it at 3/4 of the TTL after its last renewal,
/// which was before this instance first saw that revision, so a take-over never overlaps a
/// trusted lease, and no two clocks are compared.
pub struct Liveness<K> {
    ttl: Duration,
    seen: std::collections::HashMap<K, (u64, Instant)>,
}

impl<K: std::hash::Hash + Eq + Clone> Liveness<K> {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            seen: std::collections::HashMap::new(),
        }
    }

    /// Records `revision` of `key` as seen `now`; true while it is alive (its revision changed
    /// less than a TTL ago, as far as this instance has seen).
    pub fn observe(&mut self, key: &K, revision: u64, now: Instant) -> bool {
        let entry = self.seen.entry(key.clone()).or_insert((revision, now));
        if entry.0 != revision {
            *entry = (revision, now);
        }
        now.duration_since(entry.1) < self.ttl
    }

    /// Forgets keys not in `present` (deleted or expired).
    pub fn retain(&mut self, present: impl Fn(&K) -> bool) {
        self.seen.retain(|key, _| present(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("weir-{i}")).collect()
    }

    #[test]
    fn every_partition_has_one_owner_and_the_load_is_even() {
        let owners = assignment(&names(3), 64);
        assert!(owners.iter().all(Option::is_some));
        for member in names(3) {
            let count = owners
                .iter()
                .filter(|o| o.as_deref() == Some(&member))
                .count();
            assert!((12..=31).contains(&count), "{member} owns {count} of 64");
        }
        assert_eq!(assignment(&[], 4), vec![None; 4]);
    }

    #[test]
    fn a_join_or_a_leave_moves_about_one_nth() {
        let two = assignment(&names(2), 64);
        let three = assignment(&names(3), 64);
        let moved = two.iter().zip(&three).filter(|(a, b)| a != b).count();
        // Only the partitions the newcomer wins move, and they all move to it.
        assert!((12..=31).contains(&moved), "{moved} of 64 moved");
        for (before, after) in two.iter().zip(&three) {
            if before != after {
                assert_eq!(after.as_deref(), Some("weir-2"));
            }
        }
        // The order of the member list does not matter.
        let mut reversed = names(3);
        reversed.reverse();
        assert_eq!(assignment(&reversed, 64), three);
    }

    #[test]
    fn a_key_is_dead_after_a_ttl_without_a_new_revision() {
        let ttl = Duration::from_secs(2);
        let mut liveness = Liveness::new(ttl);
        let t0 = Instant::now();
        let a = "a".to_owned();
        assert!(liveness.observe(&a, 5, t0));
        assert!(liveness.observe(&a, 5, t0 + Duration::from_millis(1900)));
        assert!(!liveness.observe(&a, 5, t0 + ttl));
        // A new revision (a heartbeat) makes it alive again, for a TTL from then.
        assert!(liveness.observe(&a, 6, t0 + ttl));
        assert!(!liveness.observe(&a, 6, t0 + ttl * 2));
    }

    #[test]
    fn a_lease_is_trusted_for_three_quarters_of_its_ttl() {
        let now = Instant::now();
        let lease = Lease {
            partition: 1,
            revision: 7,
            renewed: now,
            ttl: Duration::from_secs(8),
        };
        assert!(lease.is_valid(now + Duration::from_secs(5)));
        assert!(!lease.is_valid(now + Duration::from_secs(6)));
    }
}
