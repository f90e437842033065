//! Wires the stages: source -> workers (decode, operators, route) -> sink, plus the HTTP endpoint
//! (metrics, health, rules API, live tap).
//!
//! Shutdown flows downstream: only the source watches the signal; each worker ends when its input
//! channel closes (flushing open windows), then the sink publishes what is left and disconnects.

use crate::config::{AckAfterConfig, Config, DeliveryMode};
use crate::engine::{Plan, RawMessage, Worker};
use crate::metrics::{http, Metrics};
use crate::route::Outgoing;
use crate::sink::SinkOptions;
use crate::source::SourceOptions;
use crate::store::writer::{spawn_log_writer, spawn_snapshot_writer, AckAfter};
use crate::store::{snapshot, StateDir};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

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

/// Starts the pipeline and returns once the HTTP endpoint is bound; connecting to the broker
/// continues in the background (and retries with backoff until it succeeds).
///
/// # Errors
/// The plan cannot be built, the HTTP address cannot be bound, or the TLS setup is invalid.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let plan = Arc::new(Plan::build(&config)?);
    let metrics = Arc::new(Metrics::new());
    metrics.register_labels(
        plan.inputs.iter().map(|i| &*i.name),
        plan.rules.iter().flat_map(|r| {
            r.operator
                .event_kinds()
                .iter()
                .map(move |kind| (&*r.name, *kind))
        }),
    );
    let source_options = crate::mqtt::connection_options(&config.broker, "")?;
    let mut publish_broker = config.broker.clone();
    if let Some(url) = &config.broker.publish_url {
        publish_broker.url.clone_from(url);
    }
    let sink_options = crate::mqtt::connection_options(&publish_broker, "-out")?;
    let delivery = &config.delivery;
    let state_dir = delivery
        .state_dir
        .as_deref()
        .map(StateDir::open)
        .transpose()?;
    let logged = delivery.mode == DeliveryMode::AtLeastOnce && state_dir.is_some();

    let worker_count = config.worker_count();
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

    let (http_stop_tx, http_stop_rx) = oneshot::channel::<()>();
    let rules = plan
        .rules
        .iter()
        .map(|rule| http::RuleInfo {
            name: rule.name.to_string(),
            operator: rule.operator.operator_name(),
            emits: rule.operator.event_kind(),
            input: plan.inputs[rule.input].name.to_string(),
            output_topic: config
                .rules
                .get(&*rule.name)
                .map(|r| r.output.topic.clone())
                .unwrap_or_default(),
        })
        .collect();
    let api_token = config.http.api_token()?;
    let (http_addr, server) = http::bind(
        config.http.listen,
        metrics.clone(),
        rules,
        api_token,
        async {
            let _ = http_stop_rx.await;
        },
    )
    .await?;
    let server = tokio::spawn(server);

    let capacity = config.pipeline.queue_capacity;
    let capacity_gauge = |stage: &str, n: usize| {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        metrics.queue_capacity.with_label_values(&[stage]).set(n);
    };
    capacity_gauge("workers", capacity.saturating_mul(config.worker_count()));
    capacity_gauge("sink", capacity);

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
            log_rx,
            ack_tx,
        )?;
        (Some(log_tx), Some(ack_rx), Some(thread))
    } else {
        (None, None, None)
    };
    let (snapshot_tx, snapshot_task) = match &state_dir {
        Some(dir) => {
            let (tx, task) = spawn_snapshot_writer(dir.clone(), metrics.clone(), log_tx.clone());
            (Some(tx), Some(task))
        }
        None => (None, None),
    };

    // After recovery: events replayed from the input log were exported (or lost) by the run
    // that derived them first.
    let spans = crate::trace::Export::start(&config, &metrics)?;
    let (sink_tx, sink_rx) = mpsc::channel(capacity);
    let mut worker_txs = Vec::new();
    let mut worker_tasks = Vec::new();
    for worker in workers {
        let (tx, rx) = mpsc::channel(capacity);
        worker_txs.push(tx);
        worker_tasks.push(tokio::spawn(worker.run(rx, sink_tx.clone())));
    }
    let depth = spawn_queue_gauges(metrics.clone(), worker_txs.clone(), sink_tx.clone());
    drop(sink_tx);
    let sink = tokio::spawn(crate::sink::run(
        SinkOptions {
            mqtt: sink_options,
            request_capacity: capacity,
            outbox_max: delivery.outbox_max_messages,
            policy: delivery.outbox_when_full,
            workers: worker_count,
            snapshots: snapshot_tx,
            restored: recovery.outbox,
        },
        plan.clone(),
        sink_rx,
        metrics.clone(),
    ));

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let source = crate::source::run(
        SourceOptions {
            mqtt: source_options,
            next_lsn: recovery.next_lsn,
            log: log_tx,
            acks: ack_rx,
            snapshot_interval: state_dir.as_ref().map(|_| delivery.snapshot_interval),
        },
        plan.clone(),
        worker_txs,
        metrics.clone(),
        async {
            let _ = stop_rx.await;
        },
    );
    tracing::info!(
        http = %http_addr,
        workers = worker_tasks.len(),
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
        let _ = sink.await;
        spans.stop().await;
        if let Some(task) = snapshot_task {
            let _ = task.await;
        }
        if let Some(thread) = log_thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        depth.abort();
        // Live tap clients would keep the server's graceful shutdown waiting forever.
        tap_metrics.tap.close();
        let _ = http_stop_tx.send(());
        let _ = server.await;
        tracing::info!("weir stopped");
    });
    Ok(Running {
        metrics,
        http_addr,
        stop: stop_tx,
        task,
    })
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
        for device in &snapshot.devices {
            let shard = Plan::shard(usize::from(device.input), &device.device, workers.len());
            workers[shard].restore(device);
        }
        tracing::info!(
            lsn = snapshot.lsn,
            devices = snapshot.devices.len(),
            outbox = snapshot.outbox.len(),
            from = ?loaded.from,
            "restored state from the snapshot"
        );
        recovery.outbox = snapshot
            .outbox
            .into_iter()
            .map(|m| crate::sink::restore(m, plan))
            .collect();
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
            workers[shard].process(&message, &mut recovery.outbox);
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

/// Runs until `shutdown` resolves, then stops within [`SHUTDOWN_TIMEOUT`].
///
/// # Errors
/// As [`start`] and [`Running::stop`].
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let running = start(config).await?;
    shutdown.await;
    tracing::info!("shutting down");
    running.stop().await
}

/// Samples the depth of the bounded channels four times a second into `weir_queue_depth`.
fn spawn_queue_gauges(
    metrics: Arc<Metrics>,
    workers: Vec<mpsc::Sender<crate::engine::WorkerInput>>,
    sink: mpsc::Sender<crate::sink::SinkInput>,
) -> JoinHandle<()> {
    let weak_workers: Vec<_> = workers.iter().map(|tx| tx.downgrade()).collect();
    let weak_sink = sink.downgrade();
    drop(workers);
    drop(sink);
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
            let sink_depth = weak_sink
                .upgrade()
                .map_or(0, |tx| tx.max_capacity() - tx.capacity());
            sink_gauge.set(sink_depth as i64);
        }
    })
}
