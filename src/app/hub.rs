//! `weir run` with `[cluster]`: one of several instances sharing a fleet through NATS
//! JetStream. The supervisor here keeps the instance's membership (a heartbeat), claims the
//! partitions the rendezvous assignment gives it, renews them, and runs the pipeline in *terms*:
//! each term is [`super::start_with`] over a fixed set of partitions, restored from their
//! snapshots in the cluster's state store, and saving its clean snapshots back there.
//!
//! When the set changes (a member joined, left or died), the running term is stopped — its last
//! snapshot is saved — then the partitions no longer assigned are released, and a new term
//! starts over the new set. A new owner thus resumes each partition from the state the last one
//! saved, and reads the stream on from that partition's sequence.
//!
//! The fence: every term's sinks publish only while the leases hold (until 3/4 of the TTL after
//! their last renewal, on the monotonic clock). An instance that misses renewals (paused, cut
//! off from NATS) stops publishing at once, before the server expires its claims for anyone else.

use super::{rule_infos, start_with, Epoch, Running};
use crate::cluster::ownership::{assignment, ClaimError, Lease, Liveness, Membership};
use crate::cluster::state::{self, StateStore};
use crate::config::{ClusterConfig, Config};
use crate::engine::Plan;
use crate::metrics::Metrics;
use crate::model::fence::Fence;
use crate::store::{snapshot, StateDir};
use crate::telemetry::http::{self, ReloadReport, SharedCluster, SharedRules};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// How long NATS may take to answer at start.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A running term: the pipeline over `owned`, and the task saving its snapshots.
struct Term {
    running: Running,
    saver: JoinHandle<()>,
    owned: BTreeSet<u32>,
}

impl Term {
    /// Stops the pipeline (a last snapshot, its outbox drained) and waits until `deadline`
    /// for the saver to store what is clean. With the fence closed, nothing more is published
    /// or saved; with NATS away, each save would wait for its own timeout, so the saver is
    /// given up at the deadline (the partitions' previous snapshots stay).
    async fn stop(self, deadline: Instant) {
        if let Err(err) = self.running.stop().await {
            tracing::warn!(%err, "the term did not stop in time");
        }
        let mut saver = self.saver;
        if tokio::time::timeout_at(deadline.into(), &mut saver)
            .await
            .is_err()
        {
            saver.abort();
            tracing::warn!("the term's last snapshots were not all saved in time");
        }
    }
}

/// Runs a cluster instance until `shutdown` resolves; then stops the term (saving its state),
/// releases its partitions and leaves, so the others take them over without waiting.
///
/// # Errors
/// NATS cannot be reached at start, the buckets do not exist (`weir cluster init`), or the
/// HTTP address cannot be bound.
pub async fn run(mut config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let Some(cluster) = config.cluster.clone() else {
        anyhow::bail!("no [cluster] section");
    };
    let member = cluster.member_name();
    // Instances share the config; a broker drops a connection whose client id another takes.
    config.broker.client_id = format!("{}-{member}", config.broker.client_id);
    let client =
        crate::nats::connect_cluster(&cluster, &format!("weir-{member}"), CONNECT_TIMEOUT).await?;
    let jetstream = async_nats::jetstream::new(client.clone());
    let membership = Membership::open(&jetstream, member.clone(), cluster.lease_ttl).await?;
    let store = StateStore::open(&jetstream).await?;
    let plan = Plan::build(&config)?;
    let metrics = Arc::new(Metrics::new());
    let view: SharedCluster = Arc::new(RwLock::new(serde_json::json!({ "member": member })));
    let rules: SharedRules = Arc::new(RwLock::new(rule_infos(&plan, &config)));
    let last_reload = Arc::new(Mutex::new(None));
    let (reload_tx, mut reload_rx) = mpsc::channel(4);
    let api = http::ApiSetup {
        rules: rules.clone(),
        token: config.http.api_token()?,
        reloads: config.file.is_some().then_some(reload_tx),
        last_reload: last_reload.clone(),
        cluster: Some(view.clone()),
    };
    let mut hangups = match config.file {
        Some(_) => Some(tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::hangup(),
        )?),
        None => None,
    };
    let (http_stop, http_stopped) = oneshot::channel::<()>();
    let (http_addr, server) = http::bind(config.http.listen, metrics.clone(), api, async {
        let _ = http_stopped.await;
    })
    .await?;
    let server = tokio::spawn(server);
    let work_dir = match &config.delivery.state_dir {
        Some(dir) => dir.join("cluster-term"),
        None => std::env::temp_dir().join(format!("weir-term-{}", std::process::id())),
    };
    tracing::info!(%member, http = %http_addr, partitions = cluster.partitions, "joining the cluster");

    let tick = cluster.lease_ttl / 4;
    let mut supervisor = Supervisor {
        config,
        cluster,
        membership,
        store,
        metrics,
        view,
        fence: Arc::new(Fence::closed()),
        leases: BTreeMap::new(),
        term: None,
        terms: 0,
        work_dir: work_dir.clone(),
        waiting_since: None,
        members: Vec::new(),
        member_liveness: Liveness::new(tick * 4),
        claim_liveness: Liveness::new(tick * 4),
        rules,
        last_reload,
    };
    tokio::pin!(shutdown);
    loop {
        // A round is given up at shutdown: with NATS away, each of its requests waits for its
        // own timeout (seconds, for every partition). What it left half done is what a kill
        // leaves: claims expire, and a term begun but not yet kept is stopped with the process.
        tokio::select! {
            () = &mut shutdown => break,
            () = supervisor.round() => {}
        }
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(tick) => {}
            Some(reply) = reload_rx.recv() => {
                let report = supervisor.reload().await;
                let _ = reply.send(report);
            }
            Some(()) = async {
                match &mut hangups {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                supervisor.reload().await;
            }
        }
    }
    tracing::info!("leaving the cluster");
    supervisor.leave().await;
    let _ = std::fs::remove_dir_all(&work_dir);
    let _ = http_stop.send(());
    let _ = server.await;
    let _ = tokio::time::timeout(Duration::from_secs(1), client.drain()).await;
    Ok(())
}

/// What a term starts from, cloned out of the supervisor so that the start runs while the
/// supervisor keeps its leases alive.
struct TermSetup {
    config: Config,
    partitions: u32,
    store: StateStore,
    metrics: Arc<Metrics>,
    fence: Arc<Fence>,
    work_dir: PathBuf,
}

impl TermSetup {
    /// Loads the partitions' snapshots, merges them into the term's state dir and starts the
    /// pipeline over them.
    async fn start(self, owned: BTreeSet<u32>) -> anyhow::Result<Term> {
        let started = Instant::now();
        let partitions = self.partitions;
        let mut parts = Vec::with_capacity(owned.len());
        for &partition in &owned {
            parts.push((partition, self.store.load(partition).await?));
        }
        let (merged, first_unapplied) = state::merge(parts, partitions);
        let _ = std::fs::remove_dir_all(&self.work_dir);
        let dir = StateDir::open(&self.work_dir)?;
        let devices = merged.devices.len();
        if merged.lsn > 0 || devices > 0 {
            snapshot::write(dir.path(), &merged)?;
        }
        let mut config = self.config;
        config.delivery.state_dir = Some(self.work_dir.clone());
        let (snapshots_tx, snapshots_rx) = mpsc::channel(4);
        let checkpoints = Arc::new(crate::model::checkpoints::Checkpoints::default());
        let epoch = Epoch {
            metrics: self.metrics.clone(),
            owned: first_unapplied,
            fence: self.fence.clone(),
            snapshots: snapshots_tx,
            checkpoints: checkpoints.clone(),
        };
        let running = start_with(config, Some(epoch)).await?;
        let saver = tokio::spawn(state::save_clean(
            snapshots_rx,
            self.store.clone(),
            checkpoints,
            partitions,
            self.fence.clone(),
            self.metrics.clone(),
        ));
        tracing::info!(
            partitions = ?owned,
            devices,
            from = merged.lsn,
            took = ?started.elapsed(),
            "serving partitions"
        );
        Ok(Term {
            running,
            saver,
            owned,
        })
    }
}

struct Supervisor {
    config: Config,
    cluster: ClusterConfig,
    membership: Membership,
    store: StateStore,
    metrics: Arc<Metrics>,
    view: SharedCluster,
    fence: Arc<Fence>,
    leases: BTreeMap<u32, Lease>,
    term: Option<Term>,
    terms: u64,
    work_dir: PathBuf,
    /// Since when partitions assigned here are still held by others (a join: they are being
    /// released); a new term waits for them up to a lease TTL, so that a join restarts it once.
    waiting_since: Option<Instant>,
    /// The live members of the last round, to log joins and leaves.
    members: Vec<String>,
    /// Member keys and partition claims by the revisions seen, to tell a silent holder without
    /// waiting for the server to expire its keys.
    member_liveness: Liveness<String>,
    claim_liveness: Liveness<u32>,
    /// What `/api/rules` describes and `GET /api/reload` reports, kept up to date by reloads.
    rules: SharedRules,
    last_reload: Arc<Mutex<Option<ReloadReport>>>,
}

impl Supervisor {
    /// One round, every TTL / 4: heartbeat, renew, compare the assignment with the leases,
    /// and start a new term where they differ.
    async fn round(&mut self) {
        self.keep_alive().await;

        let revisions = match self.membership.member_revisions().await {
            Ok(revisions) => revisions,
            Err(err) => {
                tracing::warn!(%err, "cannot list the members");
                return;
            }
        };
        let now = Instant::now();
        self.member_liveness
            .retain(|member| revisions.iter().any(|(m, _)| m == member));
        let members: Vec<String> = revisions
            .into_iter()
            .filter(|(member, revision)| self.member_liveness.observe(member, *revision, now))
            .map(|(member, _)| member)
            .collect();
        if members != self.members {
            tracing::info!(?members, was = ?self.members, "the members changed");
            self.members.clone_from(&members);
        }
        let partitions = self.cluster.partitions;
        // Every claim held elsewhere is watched from now on, so a dead member's claims are
        // known stale a TTL after its last renewal, as soon as its key is.
        for partition in (0..partitions).filter(|p| !self.leases.contains_key(p)) {
            if let Ok(Some(revision)) = self.membership.claim_revision(partition).await {
                self.claim_liveness.observe(&partition, revision, now);
            }
        }
        let me = self.membership.name().to_owned();
        let assigned = assignment(&members, partitions);
        let mine: BTreeSet<u32> = (0..partitions)
            .filter(|&p| assigned[p as usize].as_deref() == Some(me.as_str()))
            .collect();
        let release: BTreeSet<u32> = self
            .leases
            .keys()
            .filter(|p| !mine.contains(p))
            .copied()
            .collect();
        let mut waiting = 0;
        let unclaimed: Vec<u32> = mine
            .iter()
            .filter(|p| !self.leases.contains_key(p))
            .copied()
            .collect();
        for partition in unclaimed {
            match self.membership.claim(partition).await {
                Ok(lease) => {
                    self.leases.insert(partition, lease);
                }
                Err(ClaimError::Taken(_)) => match self.take_over_silent(partition).await {
                    Some(lease) => {
                        self.leases.insert(partition, lease);
                    }
                    None => waiting += 1,
                },
                Err(ClaimError::Nats(err)) => {
                    waiting += 1;
                    tracing::warn!(partition, %err, "claim failed");
                }
            }
        }
        self.update_fence();
        self.publish_view(&members, &assigned, waiting);

        let running: BTreeSet<u32> = self
            .term
            .as_ref()
            .map(|term| term.owned.clone())
            .unwrap_or_default();
        let wanted: BTreeSet<u32> = self
            .leases
            .keys()
            .filter(|p| !release.contains(p))
            .copied()
            .collect();
        if waiting == 0 {
            self.waiting_since = None;
        } else if self.waiting_since.is_none() {
            self.waiting_since = Some(Instant::now());
        }
        if wanted == running && release.is_empty() {
            return;
        }
        // Partitions still being released by others: wait for them (up to a TTL) rather than
        // restart once per releasing member; a release of our own never waits.
        let settled = self
            .waiting_since
            .is_none_or(|since| since.elapsed() >= self.cluster.lease_ttl);
        if !settled && release.is_empty() && !wanted.is_subset(&running) && self.term.is_some() {
            return;
        }
        if let Some(term) = self.term.take() {
            self.renewing(term.stop(Instant::now() + self.cluster.lease_ttl))
                .await;
        }
        for partition in release {
            if let Some(lease) = self.leases.remove(&partition) {
                if let Err(err) = self.membership.release(&lease).await {
                    tracing::warn!(%err, "release failed; the claim expires by itself");
                }
            }
        }
        self.update_fence();
        let owned: BTreeSet<u32> = self.leases.keys().copied().collect();
        self.metrics
            .cluster
            .partitions_owned
            .set(i64::try_from(owned.len()).unwrap_or(i64::MAX));
        if owned.is_empty() {
            return;
        }
        self.start_term(owned, true).await;
    }

    /// Starts a term over `owned` (held), keeping the leases alive meanwhile.
    /// A restart on new rules is not counted as a handover.
    async fn start_term(&mut self, owned: BTreeSet<u32>, handover: bool) {
        let setup = TermSetup {
            config: self.config.clone(),
            partitions: self.cluster.partitions,
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            fence: self.fence.clone(),
            work_dir: self.work_dir.clone(),
        };
        match self.renewing(setup.start(owned.clone())).await {
            Ok(term) if !self.leases.keys().eq(owned.iter()) => {
                tracing::warn!("leases lost while the term started; stopping it");
                self.renewing(term.stop(Instant::now() + self.cluster.lease_ttl))
                    .await;
            }
            Ok(term) => {
                if self.terms > 0 && handover {
                    self.metrics.cluster.handovers.inc();
                }
                self.terms += 1;
                self.term = Some(term);
            }
            Err(err) => tracing::error!(%err, "cannot start serving the partitions; retrying"),
        }
    }

    /// Reads the config file again (`POST /api/reload`, SIGHUP) and, when only `[rules]`
    /// changed, restarts the running term on the new rules: its last snapshot is saved, and
    /// the new term restores it, rules whose definition did not change with their state. A
    /// restart, not a switch in place, so that the term and every later one (after a handover)
    /// run the same config; it costs what a handover costs this instance (seconds). Each
    /// instance reloads on its own: reload them all.
    async fn reload(&mut self) -> ReloadReport {
        let report = match crate::app::reread(&self.config) {
            Ok((mut new, plan, report)) => {
                new.broker.client_id = self.config.broker.client_id.clone();
                *self.rules.write().unwrap_or_else(PoisonError::into_inner) =
                    rule_infos(&plan, &new);
                self.config = new;
                if let Some(term) = self.term.take() {
                    let owned = term.owned.clone();
                    self.renewing(term.stop(Instant::now() + self.cluster.lease_ttl))
                        .await;
                    self.start_term(owned, false).await;
                }
                report
            }
            Err(error) => ReloadReport {
                error: Some(error),
                ..ReloadReport::default()
            },
        };
        crate::app::record_reload(report, &self.metrics, &self.last_reload)
    }

    /// Heartbeats the member key and renews every lease.
    async fn keep_alive(&mut self) {
        if let Err(err) = self.membership.heartbeat().await {
            self.metrics.cluster.lease_renew_failures.inc();
            tracing::warn!(%err, "member heartbeat failed");
        }
        self.renew().await;
    }

    /// Runs `work` (a term's start or stop) while keeping the member key and the leases alive
    /// every tick. Loading snapshots, creating consumers or saving the last snapshot can take
    /// seconds on a loaded machine: longer than the fence trusts a lease renewed before it
    /// (3/4 of a 2 s TTL), after which the new term would find its leases lapsed and the
    /// cluster would never settle. `work` is not polled while a renewal is under way; the
    /// pipeline's own tasks run on meanwhile.
    async fn renewing<T>(&mut self, work: impl Future<Output = T>) -> T {
        tokio::pin!(work);
        let tick = self.cluster.lease_ttl / 4;
        loop {
            tokio::select! {
                out = &mut work => return out,
                () = tokio::time::sleep(tick) => self.keep_alive().await,
            }
        }
    }

    /// Renews every lease. One lost (another instance claimed it after it expired) or lapsed
    /// (renewals failed for 3/4 of the TTL) stops the term at once, fenced: someone else may
    /// own those partitions now, so nothing more is published or saved, and claiming starts
    /// over.
    async fn renew(&mut self) {
        let mut lost = Vec::new();
        for lease in self.leases.values_mut() {
            match self.membership.renew(lease).await {
                Ok(renewed) => *lease = renewed,
                Err(ClaimError::Taken(partition)) => lost.push(partition),
                Err(ClaimError::Nats(err)) => {
                    self.metrics.cluster.lease_renew_failures.inc();
                    tracing::warn!(partition = lease.partition, %err, "lease renewal failed");
                }
            }
        }
        let now = Instant::now();
        let lapsed = self.leases.values().any(|lease| !lease.is_valid(now));
        if lost.is_empty() && !lapsed {
            self.update_fence();
            return;
        }
        tracing::warn!(
            ?lost,
            lapsed,
            "leases lost; this instance stops serving its partitions"
        );
        self.fence.close();
        if let Some(term) = self.term.take() {
            // Fenced: it publishes and saves nothing more, so its stop needs no renewals.
            term.stop(Instant::now() + self.cluster.lease_ttl).await;
        }
        self.leases.clear();
        self.metrics.cluster.partitions_owned.set(0);
    }

    /// Takes `partition` over if its holder's claim has not been renewed for a whole TTL, as
    /// this instance saw it.
    async fn take_over_silent(&mut self, partition: u32) -> Option<Lease> {
        let revision = self.membership.claim_revision(partition).await.ok()??;
        if self
            .claim_liveness
            .observe(&partition, revision, Instant::now())
        {
            return None;
        }
        match self.membership.take_over(partition, revision).await {
            Ok(lease) => {
                tracing::info!(
                    partition,
                    "took over a partition whose holder stopped renewing"
                );
                Some(lease)
            }
            Err(_) => None,
        }
    }

    /// The fence holds until the earliest lease lapses (closed without leases).
    fn update_fence(&self) {
        match self.leases.values().map(Lease::valid_until).min() {
            Some(until) => self.fence.set(until),
            None => self.fence.close(),
        }
    }

    fn publish_view(&self, members: &[String], assigned: &[Option<String>], waiting: usize) {
        let mut by_member: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for (partition, owner) in assigned.iter().enumerate() {
            if let Some(owner) = owner {
                by_member.entry(owner).or_default().push(partition as u32);
            }
        }
        let serving: Vec<u32> = self
            .term
            .as_ref()
            .map(|term| term.owned.iter().copied().collect())
            .unwrap_or_default();
        let view = serde_json::json!({
            "member": self.membership.name(),
            "members": members,
            "partitions": self.cluster.partitions,
            "holds": self.leases.keys().collect::<Vec<_>>(),
            "serving": serving,
            "waiting_for": waiting,
            "assignment": by_member,
            "lease_valid_for_ms": u64::try_from(self.fence.remaining().as_millis()).unwrap_or(u64::MAX),
        });
        *self.view.write().unwrap_or_else(PoisonError::into_inner) = view;
    }

    /// Stops the term (its state saved), releases every partition and removes the member key.
    ///
    /// Saving and releasing are bounded by a lease TTL together: with NATS away, every request
    /// would wait for its own timeout, and the claims and the key expire by themselves within
    /// a TTL anyway.
    async fn leave(&mut self) {
        let deadline = Instant::now() + self.cluster.lease_ttl;
        if let Some(term) = self.term.take() {
            term.stop(deadline).await;
        }
        self.fence.close();
        let leases = std::mem::take(&mut self.leases);
        let membership = &self.membership;
        let released = tokio::time::timeout_at(deadline.into(), async {
            for lease in leases.into_values() {
                let _ = membership.release(&lease).await;
            }
            membership.leave().await
        })
        .await;
        match released {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(%err, "cannot remove the member key; it expires by itself")
            }
            Err(_) => tracing::warn!(
                "NATS did not answer in time; the claims and the member key expire by themselves"
            ),
        }
    }
}
