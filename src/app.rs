//! Wires the stages: source -> workers (decode, operators, route) -> sink, plus the HTTP endpoint
//! (metrics, health, rules API, live tap).
//!
//! Shutdown flows downstream: only the source watches the signal; each worker ends when its input
//! channel closes (flushing open windows), then the sink publishes what is left and disconnects.
//!
//! Hot reload (SIGHUP or `POST /api/reload`) reads the config file again. Only `[rules]` may
//! change while weir runs: the new rules go to the source, which passes them to every worker at
//! the same point of the input, so no reading is lost or seen by both versions of a rule.

use crate::config::{AckAfterConfig, Config, DeliveryMode};
use crate::engine::{Plan, RawMessage, Reload, Worker, Workers};
use crate::metrics::Metrics;
use crate::model::fence::Fence;
use crate::route::Outgoing;
use crate::sink::connect::Connected;
use crate::sink::SinkOptions;
#[cfg(feature = "cluster")]
use crate::source::jetstream::JetStreamSource;
use crate::source::mqtt::MqttSource;
use crate::source::SourceOptions;
use crate::store::writer::{spawn_log_writer, spawn_snapshot_writer, AckAfter};
use crate::store::{snapshot, Snapshot, StateDir};
use crate::telemetry::http::{self, ReloadReport, RuleInfo, SharedRules};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

#[cfg(feature = "cluster")]
pub mod hub;

/// How long the cluster's NATS servers may take to answer at start.
#[cfg(feature = "cluster")]
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on the whole shutdown sequence.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// A running pipeline.
pub struct Running {
    pub metrics: Arc<Metrics>,
    /// Where `/metrics`, `/healthz`, `/readyz` and `/api/*` are served (resolved if port 0 was asked).
    pub http_addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops intake, lets workers flush and the sink publish what is left, within
    /// [`SHUTDOWN_TIMEOUT`].
    ///
    /// # Errors
    /// The pipeline did not finish in time.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, self.task).await {
            Ok(_) => Ok(()),
            Err(_) => anyhow::bail!("weir did not shut down within {SHUTDOWN_TIMEOUT:?}"),
        }
    }
}

/// One term of a `[cluster]` instance's pipeline over a fixed set of partitions (see [`hub`]):
/// the supervisor keeps the metrics and the HTTP endpoint across terms, and the leases.
pub struct Epoch {
    pub metrics: Arc<Metrics>,
    /// Per partition: `None` where another instance owns it, else the first stream sequence
    /// its restored state has not applied.
    pub owned: Vec<Option<u64>>,
    /// Holds while the leases do; sinks publish nothing once it lapses.
    pub fence: Arc<Fence>,
    /// Every snapshot the term writes, for the cluster's state store.
    pub snapshots: mpsc::Sender<Snapshot>,
    /// Where each owned partition stood at each snapshot barrier, for the state store.
    pub checkpoints: Arc<crate::model::checkpoints::Checkpoints>,
}

/// Starts the pipeline and returns once the HTTP endpoint is bound; connecting to the broker
/// continues in the background (and retries with backoff until it succeeds).
///
/// # Errors
/// The plan cannot be built, the HTTP address cannot be bound, or the TLS setup is invalid.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    start_with(config, None).await
}

/// [`start`], or with `epoch`, a term of a cluster instance: its state dir holds the snapshot
/// merged from its partitions', it reads only those partitions, and it serves no HTTP of its
/// own (the supervisor does).
///
/// # Errors
/// As [`start`].
pub async fn start_with(config: Config, epoch: Option<Epoch>) -> anyhow::Result<Running> {
    let plan = Arc::new(Plan::build(&config)?);
    let (metrics, owned, fence, copies) = match epoch {
        Some(epoch) => (
            epoch.metrics,
            Some((epoch.owned, epoch.checkpoints)),
            Some(epoch.fence),
            Some(epoch.snapshots),
        ),
        None => (Arc::new(Metrics::new()), None, None, None),
    };
    let serve_http = owned.is_none();
    metrics.register_labels(
        plan.inputs.iter().map(|i| &*i.name),
        plan.rule_kinds(),
        &crate::engine::REASONS,
    );
    let source_options = crate::mqtt::connection_options(&config.broker, "")?;
    // Before anything else starts: a sink that cannot be reached stops weir here.
    let sinks = Connected::all(&config, &plan, &metrics).await?;
    let delivery = &config.delivery;
    let state_dir = delivery
        .state_dir
        .as_deref()
        .map(StateDir::open)
        .transpose()?;
    // A cluster stream keeps the readings itself: there is no input log to write.
    let logged = delivery.mode == DeliveryMode::AtLeastOnce
        && state_dir.is_some()
        && config.cluster.is_none();

    let inline = config.pipeline.layout.is_inline();
    let worker_count = config.worker_count(inline);
    let mut workers: Vec<Worker> = (0..worker_count)
        .map(|index| {
            let mut worker = Worker::new(plan.clone(), metrics.clone());
            worker.seed_expected(index, worker_count);
            worker
        })
        .collect();
    let recovery = match &state_dir {
        Some(dir) => recover(dir, &plan, &mut workers, logged)?,
        None => Recovery::default(),
    };

    // With a state dir, reading resumes where the snapshot ends (the whole stream without a
    // snapshot yet); without one, at new readings.
    #[cfg(feature = "cluster")]
    let stream_source = match &config.cluster {
        Some(cluster) => {
            let from = state_dir.as_ref().map(|_| recovery.next_lsn);
            Some(
                JetStreamSource::start(cluster, from, owned, STREAM_TIMEOUT, metrics.clone())
                    .await?,
            )
        }
        None => None,
    };
    // A build without the `cluster` feature has no stream source: `None`, of a type with no
    // values. Validation refuses [cluster] in it first; a config built in code stops here.
    #[cfg(not(feature = "cluster"))]
    let stream_source: Option<std::convert::Infallible> = match &config.cluster {
        Some(_) => anyhow::bail!(crate::config::features::CLUSTER.missing_or("remove [cluster]")),
        None => None,
    };

    let (http_stop_tx, http_stop_rx) = oneshot::channel::<()>();
    let rules: SharedRules = Arc::new(RwLock::new(rule_infos(&plan, &config)));
    let (reload_tx, reload_rx) = mpsc::channel(4);
    let (source_reload_tx, source_reload_rx) = mpsc::channel(1);
    let last_reload = Arc::new(Mutex::new(None));
    let api = http::ApiSetup {
        rules: rules.clone(),
        token: config.http.api_token()?,
        reloads: config.file.is_some().then(|| reload_tx.clone()),
        last_reload: last_reload.clone(),
        cluster: None,
    };
    let (http_addr, server) = if serve_http {
        let (addr, server) = http::bind(config.http.listen, metrics.clone(), api, async {
            let _ = http_stop_rx.await;
        })
        .await?;
        (addr, Some(tokio::spawn(server)))
    } else {
        (config.http.listen, None)
    };

    let capacity = config.pipeline.queue_capacity;
    let capacity_gauge = |stage: &str, n: usize| {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        metrics.queue_capacity.with_label_values(&[stage]).set(n);
    };
    // Inline workers have no channel: what intake holds for them is one socket read's worth.
    let worker_queue = if inline { 0 } else { capacity };
    capacity_gauge("workers", worker_queue.saturating_mul(worker_count));
    capacity_gauge("sink", capacity.saturating_mul(plan.sinks.len()));

    let (log_tx, ack_rx, log_thread) = if let (true, Some(dir)) = (logged, &state_dir) {
        let (log_tx, log_rx) = mpsc::channel(capacity);
        let (ack_tx, ack_rx) = mpsc::channel(1024);
        let ack_after = match delivery.ack_after {
            AckAfterConfig::Fsync => AckAfter::Fsync,
            AckAfterConfig::Write => AckAfter::Write,
        };
        let thread = spawn_log_writer(
            dir,
            recovery.next_lsn,
            ack_after,
            delivery.fsync_interval,
            metrics.clone(),
            log_rx,
            ack_tx,
        )?;
        (Some(log_tx), Some(ack_rx), Some(thread))
    } else {
        (None, None, None)
    };
    let (snapshot_tx, snapshot_task) = match &state_dir {
        Some(dir) => {
            let (tx, task) = spawn_snapshot_writer(
                dir.clone(),
                metrics.clone(),
                log_tx.clone(),
                plan.sinks.len(),
                copies,
            );
            (Some(tx), Some(task))
        }
        None => (None, None),
    };

    // After recovery: events replayed from the input log were exported (or lost) by the run
    // that derived them first.
    let spans = crate::telemetry::Export::start(&config, &metrics)?;
    let (sink_txs, sink_rxs): (Vec<_>, Vec<_>) =
        plan.sinks.iter().map(|_| mpsc::channel(capacity)).unzip();
    let mut worker_txs = Vec::new();
    let mut worker_tasks = Vec::new();
    let workers = if inline {
        Workers::inline(workers, sink_txs.clone())
    } else {
        for worker in workers {
            let (tx, rx) = mpsc::channel(capacity);
            worker_txs.push(tx);
            worker_tasks.push(tokio::spawn(worker.run(rx, sink_txs.clone())));
        }
        Workers::Tasks(worker_txs.clone())
    };
    let depth = spawn_queue_gauges(metrics.clone(), worker_txs, sink_txs.clone());
    let mut restored: Vec<Vec<_>> = plan.sinks.iter().map(|_| Vec::new()).collect();
    for event in recovery.outbox {
        restored[event.sink.min(plan.sinks.len() - 1)].push(event);
    }
    let mut sink_tasks = Vec::new();
    for (index, ((sink, rx), restored)) in sinks.into_iter().zip(sink_rxs).zip(restored).enumerate()
    {
        let name = plan.sinks[index].name.clone();
        let settings = config.sinks.get(&*name);
        // Refusals of the other sinks become dead letters on the broker.
        let dead_letters = match (&config.dead_letter.topic, index) {
            (Some(topic), 1..) => Some((sink_txs[Plan::BROKER].clone(), topic.clone())),
            _ => None,
        };
        let options = SinkOptions {
            name,
            outbox_max: settings
                .and_then(|s| s.outbox_max_messages)
                .unwrap_or(delivery.outbox_max_messages),
            policy: settings
                .and_then(|s| s.outbox_when_full)
                .unwrap_or(delivery.outbox_when_full),
            workers: worker_count,
            snapshots: snapshot_tx.clone(),
            restored,
            dead_letters,
            fence: fence.clone(),
        };
        sink_tasks.push(sink.spawn(options, plan.clone(), rx, metrics.clone()));
    }
    drop(sink_txs);
    drop(snapshot_tx);

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let filters = plan
        .inputs
        .iter()
        .map(|input| {
            let qos = if input.qos == 0 {
                rumqttc::QoS::AtMostOnce
            } else {
                rumqttc::QoS::AtLeastOnce
            };
            (input.pattern.subscription_filter(), qos)
        })
        .collect();
    let source_setup = SourceOptions {
        next_lsn: recovery.next_lsn,
        log: log_tx,
        acks: ack_rx,
        snapshot_interval: state_dir.as_ref().map(|_| delivery.snapshot_interval),
        reloads: source_reload_rx,
        // Pausing holds the runtime's thread: only where that thread is all there is. Logged
        // inputs are acked once durable, and the broker stops sending when its window of
        // unacked messages is full (Mosquitto: 20), so there a pause would hold up their acks
        // and the broker with them.
        read_pause: (inline
            && !logged
            && crate::engine::layout::one_runtime_thread()
            && !config.pipeline.read_pause.is_zero())
        .then_some(config.pipeline.read_pause),
    };
    let stop = async {
        let _ = stop_rx.await;
    };
    let source: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = match stream_source {
        #[cfg(feature = "cluster")]
        Some(stream) => Box::pin(crate::source::run(
            stream,
            source_setup,
            plan.clone(),
            workers,
            metrics.clone(),
            stop,
        )),
        None => Box::pin(crate::source::run(
            MqttSource::new(source_options, logged, filters, metrics.clone()),
            source_setup,
            plan.clone(),
            workers,
            metrics.clone(),
            stop,
        )),
    };
    let reloader = Reloader {
        config: config.clone(),
        source: source_reload_tx,
        rules,
        metrics: metrics.clone(),
        last: last_reload,
    };
    let reloader = tokio::spawn(reloader.run(reload_rx, serve_http && config.file.is_some()));
    drop(reload_tx);
    tracing::info!(
        http = %http_addr,
        workers = worker_count,
        inline,
        inputs = plan.inputs.len(),
        rules = plan.rules.len(),
        mode = ?delivery.mode,
        state_dir = ?delivery.state_dir,
        "weir started"
    );
    let tap_metrics = metrics.clone();
    let task = tokio::spawn(async move {
        source.await;
        for task in worker_tasks {
            let _ = task.await;
        }
        for task in sink_tasks {
            let _ = task.await;
        }
        spans.stop().await;
        if let Some(task) = snapshot_task {
            let _ = task.await;
        }
        if let Some(thread) = log_thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        depth.abort();
        reloader.abort();
        // Live tap clients would keep the server's graceful shutdown waiting forever.
        tap_metrics.tap.close();
        let _ = http_stop_tx.send(());
        if let Some(server) = server {
            let _ = server.await;
        }
        tracing::info!("weir stopped");
    });
    Ok(Running {
        metrics,
        http_addr,
        stop: stop_tx,
        task,
    })
}

/// What `/api/rules` lists about each rule of `plan`.
fn rule_infos(plan: &Plan, config: &Config) -> Vec<RuleInfo> {
    plan.rules
        .iter()
        .map(|rule| RuleInfo {
            name: rule.name.to_string(),
            operator: rule.operator.operator_name(),
            emits: rule.operator.event_kind(),
            input: plan.inputs[rule.input].name.to_string(),
            output_topic: config
                .rules
                .get(&*rule.name)
                .and_then(|r| r.output.first().topic.clone())
                .unwrap_or_default(),
        })
        .collect()
}

/// Applies new rules from the config file on request (SIGHUP, `POST /api/reload`).
struct Reloader {
    /// The config running now.
    config: Config,
    /// To the source, which passes new rules on to the workers.
    source: mpsc::Sender<(Arc<Reload>, oneshot::Sender<()>)>,
    rules: SharedRules,
    metrics: Arc<Metrics>,
    last: Arc<Mutex<Option<ReloadReport>>>,
}

impl Reloader {
    /// Serves reload requests, and SIGHUP when `on_sighup` (weir runs from a config file).
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<oneshot::Sender<ReloadReport>>,
        on_sighup: bool,
    ) {
        let mut hangups = if on_sighup {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(signal) => Some(signal),
                Err(err) => {
                    tracing::warn!(%err, "cannot watch SIGHUP; reload with POST /api/reload");
                    None
                }
            }
        } else {
            None
        };
        loop {
            let reply = tokio::select! {
                request = requests.recv() => match request {
                    Some(reply) => Some(reply),
                    None => return,
                },
                Some(()) = async {
                    match &mut hangups {
                        Some(signal) => signal.recv().await,
                        None => std::future::pending().await,
                    }
                } => None,
            };
            let report = self.reload().await;
            if let Some(reply) = reply {
                let _ = reply.send(report);
            }
        }
    }

    /// Reads the config file again and, if it is valid and changes only `[rules]`, switches the
    /// pipeline to its rules. Either way the outcome is logged, counted and kept for
    /// `GET /api/reload`.
    async fn reload(&mut self) -> ReloadReport {
        let report = match self.apply().await {
            Ok(report) => report,
            Err(error) => ReloadReport {
                error: Some(error),
                ..ReloadReport::default()
            },
        };
        record_reload(report, &self.metrics, &self.last)
    }

    async fn apply(&mut self) -> Result<ReloadReport, String> {
        let (new, plan, report) = reread(&self.config)?;
        let reload = Arc::new(Reload {
            kept: report
                .kept
                .iter()
                .map(|name| Arc::from(name.as_str()))
                .collect(),
            plan: plan.clone(),
        });
        let (done_tx, done_rx) = oneshot::channel();
        let shutting_down = || "weir is shutting down".to_owned();
        self.source
            .send((reload, done_tx))
            .await
            .map_err(|_| shutting_down())?;
        done_rx.await.map_err(|_| shutting_down())?;
        self.metrics
            .set_rules(plan.rule_kinds(), &crate::engine::REASONS);
        *self.rules.write().unwrap_or_else(PoisonError::into_inner) = rule_infos(&plan, &new);
        self.config = new;
        Ok(report)
    }
}

/// Reads `config`'s file again and checks that only `[rules]` changed: the new config, its
/// plan, and what the change does to each rule (kept with its state, started, removed).
///
/// # Errors
/// No config file, the new one is invalid, or it changes more than `[rules]`.
pub(crate) fn reread(config: &Config) -> Result<(Config, Arc<Plan>, ReloadReport), String> {
    let Some(file) = config.file.clone() else {
        return Err("weir runs without a config file; there is nothing to reload".into());
    };
    let new = crate::config::load(&file, &config.overrides).map_err(|err| err.to_string())?;
    let changed = config.fingerprints.changed_sections(&new.fingerprints);
    if !changed.is_empty() {
        let sections: Vec<String> = changed.iter().map(|s| format!("[{s}]")).collect();
        return Err(format!(
            "{}: {} changed, and only [rules] can change while weir runs; restart weir to apply the change (systemctl restart weir)",
            file.display(),
            sections.join(", ")
        ));
    }
    let plan = Arc::new(Plan::build(&new).map_err(|err| format!("{}: {err}", file.display()))?);
    let (old, now) = (&config.fingerprints.rules, &new.fingerprints.rules);
    let kept: Vec<String> = now
        .iter()
        .filter(|(name, print)| old.get(*name) == Some(*print))
        .map(|(name, _)| name.clone())
        .collect();
    let report = ReloadReport {
        ok: true,
        started: now.keys().filter(|n| !kept.contains(n)).cloned().collect(),
        removed: old
            .keys()
            .filter(|n| !now.contains_key(*n))
            .cloned()
            .collect(),
        kept,
        ..ReloadReport::default()
    };
    Ok((new, plan, report))
}

/// Stamps a reload's outcome, counts and logs it, and keeps it for `GET /api/reload`.
pub(crate) fn record_reload(
    mut report: ReloadReport,
    metrics: &Metrics,
    last: &Mutex<Option<ReloadReport>>,
) -> ReloadReport {
    report.at_ms = crate::model::time::wall_clock_ms();
    let result = if report.ok { "applied" } else { "refused" };
    metrics.config_reloads.with_label_values(&[result]).inc();
    metrics
        .config_last_reload_successful
        .set(i64::from(report.ok));
    match &report.error {
        None => tracing::info!(
            kept = ?report.kept,
            started = ?report.started,
            removed = ?report.removed,
            "reloaded the rules"
        ),
        Some(error) => {
            tracing::error!("reload refused; the running rules are unchanged: {error}")
        }
    }
    *last.lock().unwrap_or_else(PoisonError::into_inner) = Some(report.clone());
    report
}

/// What recovery hands to the running pipeline.
#[derive(Default)]
struct Recovery {
    next_lsn: u64,
    /// The snapshot's outbox, then the events replaying the log produced.
    outbox: Vec<Outgoing>,
}

/// Restores the newest snapshot into the workers and replays the input log after it. Damage
/// (a torn log tail, a corrupt snapshot) is reported and skipped, never fatal.
fn recover(
    dir: &StateDir,
    plan: &Arc<Plan>,
    workers: &mut [Worker],
    logged: bool,
) -> anyhow::Result<Recovery> {
    let mut recovery = Recovery::default();
    let loaded = snapshot::load(dir.path());
    for damage in &loaded.damage {
        tracing::error!(%damage, "a snapshot was unusable; falling back");
    }
    if let Some(snapshot) = loaded.snapshot {
        recovery.next_lsn = snapshot.lsn;
        let changed = changed_rules(&snapshot.rules, plan);
        if !changed.is_empty() {
            tracing::info!(rules = ?changed, "rules changed since the snapshot; they start fresh");
        }
        for device in &snapshot.devices {
            let shard = Plan::shard(usize::from(device.input), &device.device, workers.len());
            if changed.is_empty() {
                workers[shard].restore(device);
            } else {
                let mut device = device.clone();
                device.rules.retain(|(rule, _)| !changed.contains(rule));
                workers[shard].restore(&device);
            }
        }
        tracing::info!(
            lsn = snapshot.lsn,
            devices = snapshot.devices.len(),
            outbox = snapshot.outbox.len(),
            from = ?loaded.from,
            "restored state from the snapshot"
        );
        let stored = snapshot.outbox.len();
        recovery.outbox = snapshot
            .outbox
            .into_iter()
            .filter_map(|m| crate::sink::restore(m, plan))
            .collect();
        if recovery.outbox.len() < stored {
            tracing::warn!(
                dropped = stored - recovery.outbox.len(),
                "the snapshot held events for sinks that are no longer configured; they are dropped"
            );
        }
    }
    if logged {
        let recovered = crate::store::log::recover(&dir.log_dir(), recovery.next_lsn)?;
        for damage in &recovered.damage {
            tracing::error!(%damage, "the input log was damaged; what follows the damage in that segment is lost");
        }
        let replayed = recovered.records.len();
        for record in recovered.records {
            let input = usize::from(record.input);
            if input >= plan.inputs.len() {
                continue;
            }
            let Some(device) = plan.inputs[input]
                .pattern
                .capture(&record.topic, plan.inputs[input].device_index)
            else {
                continue;
            };
            let shard = Plan::shard(input, device, workers.len());
            let message = RawMessage {
                input,
                topic: record.topic,
                payload: record.payload.into(),
                arrival: Instant::now(),
                arrival_ms: record.arrival_ms,
                lsn: record.lsn,
                trace: record.trace.map(std::sync::Arc::new),
            };
            workers[shard].process_contained(&message, &mut recovery.outbox);
        }
        recovery.next_lsn = recovery.next_lsn.max(recovered.next_lsn);
        if replayed > 0 {
            tracing::info!(
                replayed,
                events = recovery.outbox.len(),
                "replayed the input log after the snapshot"
            );
        }
    }
    Ok(recovery)
}

/// Rules of `plan` whose definition differs from the one a snapshot's state was made by. A
/// snapshot from before fingerprints existed lists no rules, and nothing counts as changed.
fn changed_rules(saved: &[(String, u64)], plan: &Plan) -> Vec<String> {
    saved
        .iter()
        .filter(|(name, fingerprint)| {
            plan.rules
                .iter()
                .any(|rule| *rule.name == **name && rule.fingerprint != *fingerprint)
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// Runs until `shutdown` resolves, then stops within [`SHUTDOWN_TIMEOUT`].
///
/// # Errors
/// As [`start`] and [`Running::stop`].
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    if config.cluster.is_some() {
        #[cfg(feature = "cluster")]
        return hub::run(config, shutdown).await;
        #[cfg(not(feature = "cluster"))]
        anyhow::bail!(crate::config::features::CLUSTER.missing_or("remove [cluster]"));
    }
    let running = start(config).await?;
    shutdown.await;
    tracing::info!("shutting down");
    running.stop().await
}

/// Samples the depth of the bounded channels four times a second into `weir_queue_depth`.
fn spawn_queue_gauges(
    metrics: Arc<Metrics>,
    workers: Vec<mpsc::Sender<crate::engine::WorkerInput>>,
    sinks: Vec<mpsc::Sender<crate::engine::SinkInput>>,
) -> JoinHandle<()> {
    let weak_workers: Vec<_> = workers.iter().map(|tx| tx.downgrade()).collect();
    let weak_sinks: Vec<_> = sinks.iter().map(|tx| tx.downgrade()).collect();
    drop(workers);
    drop(sinks);
    tokio::spawn(async move {
        let workers_gauge = metrics.queue_depth.with_label_values(&["workers"]);
        let sink_gauge = metrics.queue_depth.with_label_values(&["sink"]);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let depth: usize = weak_workers
                .iter()
                .filter_map(|tx| tx.upgrade())
                .map(|tx| tx.max_capacity() - tx.capacity())
                .sum();
            workers_gauge.set(depth as i64);
            let sink_depth: usize = weak_sinks
                .iter()
                .filter_map(|tx| tx.upgrade())
                .map(|tx| tx.max_capacity() - tx.capacity())
                .sum();
            sink_gauge.set(sink_depth as i64);
        }
    })
}
