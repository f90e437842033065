//! Wires the stages: source -> workers (decode, operators, route) -> sink, plus the HTTP endpoint
//! (metrics, health, rules API, live tap).
//!
//! Shutdown flows downstream: only the source watches the signal; each worker ends when its input
//! channel closes (flushing open windows), then the sink publishes what is left and disconnects.

use crate::config::Config;
use crate::engine::{Plan, Worker};
use crate::metrics::{http, Metrics};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
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
        plan.rules
            .iter()
            .map(|r| (&*r.name, r.operator.event_kind())),
    );
    let source_options = crate::mqtt::options(&config.broker, "")?;
    let sink_options = crate::mqtt::options(&config.broker, "-out")?;

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
    let (http_addr, server) = http::bind(config.http.listen, metrics.clone(), rules, async {
        let _ = http_stop_rx.await;
    })
    .await?;
    let server = tokio::spawn(server);

    let capacity = config.pipeline.queue_capacity;
    let capacity_gauge = |stage: &str, n: usize| {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        metrics.queue_capacity.with_label_values(&[stage]).set(n);
    };
    capacity_gauge("workers", capacity.saturating_mul(config.worker_count()));
    capacity_gauge("sink", capacity);
    let (sink_tx, sink_rx) = mpsc::channel(capacity);
    let mut worker_txs = Vec::new();
    let mut worker_tasks = Vec::new();
    for _ in 0..config.worker_count() {
        let (tx, rx) = mpsc::channel(capacity);
        worker_txs.push(tx);
        let worker = Worker::new(plan.clone(), metrics.clone());
        worker_tasks.push(tokio::spawn(worker.run(rx, sink_tx.clone())));
    }
    let depth = spawn_queue_gauges(metrics.clone(), worker_txs.clone(), sink_tx.clone());
    drop(sink_tx);
    let sink = tokio::spawn(crate::sink::run(
        sink_options,
        plan.clone(),
        sink_rx,
        metrics.clone(),
        capacity,
    ));

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let source = crate::source::run(
        source_options,
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
        "weir started"
    );
    let tap_metrics = metrics.clone();
    let task = tokio::spawn(async move {
        source.await;
        for task in worker_tasks {
            let _ = task.await;
        }
        let _ = sink.await;
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
    workers: Vec<mpsc::Sender<crate::engine::RawMessage>>,
    sink: mpsc::Sender<crate::route::Outgoing>,
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
