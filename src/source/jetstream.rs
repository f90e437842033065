//! The JetStream source (`[cluster]`): readings come from a NATS stream that keeps them, instead
//! of an MQTT subscription. Each message's stream sequence becomes its LSN, so a snapshot says
//! where to resume reading, and the stream is the input log: nothing is logged locally and
//! nothing is acknowledged (the stream's limits decide how long readings stay; `weir cluster
//! init` sizes them from the rules).
//!
//! The subject carries the partition the server mapped the device to
//! (`weir.28.sensors.plant-1.dev-7.telemetry`); the topic the rules see is the MQTT topic the
//! device published (`sensors/plant-1/dev-7/telemetry`). A term of a cluster instance reads
//! only the partitions it owns, each through an ephemeral consumer of its own filtered to
//! `weir.<partition>.>` (nats-server 2.9 gives a consumer one filter subject), from that
//! partition's first unapplied sequence; each consumer has as many replicas as the stream and
//! is made again after a gap or an error, from the sequence after the last one it delivered.
//! Readings of one device stay in stream order (one partition, one consumer); partitions
//! interleave as their consumers deliver. So the term's LSNs count deliveries, and at every
//! snapshot barrier the source notes each partition's position for the state store
//! ([`Checkpoints`]). Without owned partitions (a single `weir run` over the whole stream),
//! one consumer reads every partition and the stream sequence is the LSN.

use crate::config::cluster::split_subject;
use crate::config::ClusterConfig;
use crate::metrics::{Connection, Metrics, WarnLimit};
use crate::model::checkpoints::Checkpoints;
use crate::model::port::{AckToken, Acked, Acker, Closed, Delivery, Incoming, Source};
use crate::model::trace::{self, TraceContext};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use futures_util::stream::{BoxStream, SelectAll};
use futures_util::{FutureExt as _, StreamExt as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The stream, read in order from a sequence on, surviving the loss of a server.
///
/// Not async-nats' ordered consumer: that one is always R1, and nats-server releases before
/// nats-io/nats-server#7165 (2025; Debian's 2.9.10 among them) may place an R1 ephemeral of
/// a replicated stream on a dead peer, where its creation never answers. An ephemeral with
/// the stream's replica count lives on every peer and elects its leader among the live ones
/// (measured on a 3-server 2.9.10 cluster with one server killed: R1 creations timed out 1 in 2
/// times, R3 ones all succeeded, in 0.2-6.8 s).
struct Reader {
    stream: async_nats::jetstream::stream::Stream,
    /// The partition read, or `None` for all of them.
    partition: Option<u32>,
    filter: String,
    replicas: usize,
    /// Where the next consumer starts: after the last message delivered.
    resume: DeliverPolicy,
    /// The consumer sequence the next message must carry; another means a delivery was lost
    /// or repeated (a consumer leader change), and the consumer is made again from `resume`.
    expected: u64,
    messages: Option<pull::Stream>,
    /// Messages the consumer had to deliver when it was made.
    pending_at_start: u64,
    /// What the consumer last said it still had to deliver.
    last_pending: u64,
    /// Heartbeats missed in a row (each within a few heartbeats of the last), and the last.
    missed: Option<(u32, Instant)>,
}

/// How often an idle consumer's server sends a heartbeat; two missed make an error.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long a consumer that said it had messages pending may deliver none before it is taken
/// to have none.
const IDLE: Duration = Duration::from_secs(1);
/// Missed-heartbeat errors in a row after which the consumer is made again.
const MISSES_BEFORE_REMAKE: u32 = 3;

impl Reader {
    async fn create(&mut self) -> Result<(), String> {
        let consumer = self
            .stream
            .create_consumer(pull::Config {
                filter_subject: self.filter.clone(),
                deliver_policy: self.resume,
                ack_policy: AckPolicy::None,
                max_deliver: 1,
                num_replicas: self.replicas,
                memory_storage: self.replicas == 1,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(|err| format!("cannot create a consumer: {err}"))?;
        self.pending_at_start = consumer.cached_info().num_pending;
        let messages = consumer
            .stream()
            .max_messages_per_batch(1000)
            .heartbeat(HEARTBEAT)
            .expires(Duration::from_secs(10))
            .messages()
            .await
            .map_err(|err| format!("cannot read from the consumer: {err}"))?;
        self.messages = Some(messages);
        self.expected = 1;
        Ok(())
    }

    /// The next message, or `None` when the consumer said messages were pending but delivered
    /// none for [`IDLE`]; an error after which the next call makes a new consumer.
    ///
    /// A pull consumer with a request outstanding delivers what it has at once, so a quiet
    /// consumer has nothing pending, whatever the last message said: nats-server 2.9's count
    /// on a filtered consumer can stay above 0 after its last message (seen in the cluster
    /// bench: a survivor's lag never came down to 0 although it had read everything).
    async fn next(&mut self) -> Result<Option<async_nats::jetstream::Message>, String> {
        loop {
            if self.messages.is_none() {
                self.create().await?;
                self.last_pending = self.pending_at_start;
            }
            let messages = self.messages.as_mut().expect("created above");
            let next = if self.last_pending > 0 {
                match tokio::time::timeout(IDLE, messages.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        self.last_pending = 0;
                        return Ok(None);
                    }
                }
            } else {
                messages.next().await
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(err)) if err.kind() == pull::MessagesErrorKind::MissingHeartbeat => {
                    // Also seen at a resume from SIGSTOP, when the timer fires before the
                    // connection has read what the server sent meanwhile: the consumer is
                    // made again only after misses in a row, not for every process pause.
                    let now = Instant::now();
                    let recent = self
                        .missed
                        .is_some_and(|(_, last)| now.duration_since(last) < HEARTBEAT * 5);
                    let misses = if recent {
                        self.missed.map_or(1, |(n, _)| n + 1)
                    } else {
                        1
                    };
                    self.missed = Some((misses, now));
                    if misses >= MISSES_BEFORE_REMAKE {
                        self.messages = None;
                        self.missed = None;
                        return Err(err.to_string());
                    }
                    tracing::debug!(partition = ?self.partition, misses, "a consumer heartbeat was missed");
                    continue;
                }
                Some(Err(err)) => {
                    self.messages = None;
                    return Err(err.to_string());
                }
                None => {
                    self.messages = None;
                    return Err("the consumer ended".to_owned());
                }
            };
            let Ok(info) = message.info() else {
                return Ok(Some(message));
            };
            self.last_pending = info.pending;
            if info.consumer_sequence != self.expected {
                tracing::warn!(
                    expected = self.expected,
                    got = info.consumer_sequence,
                    "the cluster stream's consumer skipped or repeated a delivery; reading again from the last one applied"
                );
                self.messages = None;
                continue;
            }
            self.expected += 1;
            self.missed = None;
            self.resume = DeliverPolicy::ByStartSequence {
                start_sequence: info.stream_sequence + 1,
            };
            return Ok(Some(message));
        }
    }

    /// The reader as a stream of its messages, each with the partition read.
    fn into_stream(self) -> BoxStream<'static, Read> {
        futures_util::stream::unfold(self, |mut reader| async move {
            let item = reader.next().await;
            Some(((reader.partition, item), reader))
        })
        .boxed()
    }
}

/// A message (or an error) of the consumer reading a partition (`None`: all of them).
type Read = (
    Option<u32>,
    Result<Option<async_nats::jetstream::Message>, String>,
);

/// The partitions this term owns, and where each stands in the stream.
struct Owned {
    partitions: std::collections::BTreeMap<u32, Partition>,
    /// The partitions' `pending` together.
    lag: u64,
    checkpoints: Arc<Checkpoints>,
}

/// Where one owned partition stands.
struct Partition {
    /// The first stream sequence not yet delivered.
    next: u64,
    /// Messages its consumer still has to deliver.
    pending: u64,
    /// Its `weir_cluster_partition_lag_messages` series, looked up once per term.
    lag: prometheus::IntGauge,
}

/// Reads the `[cluster]` stream.
pub struct JetStreamSource {
    readers: SelectAll<BoxStream<'static, Read>>,
    client: async_nats::Client,
    prefix: String,
    partitions: u32,
    metrics: Arc<Metrics>,
    foreign: WarnLimit,
    /// Stream errors in a row, for backoff while the server is away.
    failures: u32,
    /// A term's partitions; `None` when reading the whole stream.
    owned: Option<Owned>,
    /// When reading started, and readings read since, until the consumer first had nothing
    /// pending: the catch-up after taking partitions over.
    started: Instant,
    caught_up: bool,
    read: u64,
    last_read: Instant,
}

impl JetStreamSource {
    /// Connects and starts reading.
    ///
    /// With `owned` (a term of a cluster instance: per partition, `None` where another
    /// instance owns it, else the first sequence its restored state has not applied), each
    /// owned partition is read from there by a consumer of its own, and every snapshot barrier
    /// notes their positions in `checkpoints`. Without, the whole stream is read from `from`
    /// (the first sequence a snapshot does not cover), or new messages only when `from` is
    /// `None`.
    ///
    /// # Errors
    /// The servers cannot be reached, the stream does not exist (the message says to run
    /// `weir cluster init`), or no consumer could be made.
    pub async fn start(
        cluster: &ClusterConfig,
        from: Option<u64>,
        owned: Option<(Vec<Option<u64>>, Arc<Checkpoints>)>,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let client = crate::nats::connect_cluster(cluster, "weir-source", timeout).await?;
        let mut jetstream = async_nats::jetstream::new(client.clone());
        // A replicated consumer's creation waits for its leader election: seconds, not the
        // default 5 s bound, while a server of the cluster is down.
        jetstream.set_timeout(Duration::from_secs(15));
        let stream = jetstream.get_stream(&cluster.stream).await.map_err(|err| {
            anyhow::anyhow!(
                "cannot read the stream {}: {err}; create it with `weir cluster init --config FILE`",
                cluster.stream
            )
        })?;
        let from_sequence = |first_unapplied: u64| match first_unapplied {
            0 => DeliverPolicy::All,
            start_sequence => DeliverPolicy::ByStartSequence { start_sequence },
        };
        let reader = |partition: Option<u32>, resume: DeliverPolicy| Reader {
            stream: stream.clone(),
            partition,
            filter: match partition {
                Some(partition) => cluster.partition_subject(partition),
                None => cluster.stream_subject(),
            },
            replicas: cluster.replicas,
            resume,
            expected: 1,
            messages: None,
            pending_at_start: 0,
            last_pending: 0,
            missed: None,
        };
        let (mut readers, owned) = match owned {
            Some((first_unapplied, checkpoints)) => {
                // The last term's partitions lose their lag series; this term's get theirs.
                metrics.cluster.partition_lag_messages.reset();
                let partitions: std::collections::BTreeMap<u32, Partition> = first_unapplied
                    .iter()
                    .enumerate()
                    .filter_map(|(partition, first)| {
                        let next = (*first)?;
                        let lag = metrics
                            .cluster
                            .partition_lag_messages
                            .with_label_values(&[&partition.to_string()]);
                        let state = Partition {
                            next,
                            pending: 0,
                            lag,
                        };
                        Some((partition as u32, state))
                    })
                    .collect();
                let readers: Vec<Reader> = partitions
                    .iter()
                    .map(|(&partition, state)| reader(Some(partition), from_sequence(state.next)))
                    .collect();
                let owned = Owned {
                    partitions,
                    lag: 0,
                    checkpoints,
                };
                (readers, Some(owned))
            }
            None => {
                let resume = match from {
                    Some(first) => from_sequence(first),
                    None => DeliverPolicy::New,
                };
                (vec![reader(None, resume)], None)
            }
        };
        // Made together: each replicated consumer waits for its own leader election.
        let made = futures_util::future::join_all(readers.iter_mut().map(Reader::create)).await;
        let failed: Vec<String> = made.into_iter().filter_map(Result::err).collect();
        if failed.len() == readers.len() {
            let first = failed.into_iter().next().unwrap_or_default();
            anyhow::bail!("cannot read the stream {}: {first}", cluster.stream);
        }
        if let Some(err) = failed.first() {
            tracing::warn!(
                failed = failed.len(),
                %err,
                "some partitions' consumers could not be made yet; they are tried again as they are read"
            );
        }
        let pending: u64 = readers.iter().map(|reader| reader.pending_at_start).sum();
        let mut owned = owned;
        if let Some(owned) = &mut owned {
            for reader in &readers {
                if let Some(state) = reader.partition.and_then(|p| owned.partitions.get_mut(&p)) {
                    state.pending = reader.pending_at_start;
                    state.lag.set(gauge_value(state.pending));
                }
            }
            owned.lag = pending;
        }
        metrics.cluster.lag_messages.set(gauge_value(pending));
        metrics.set_connected(Connection::Source, true);
        metrics.set_subscribed(readers.len());
        tracing::info!(
            stream = %cluster.stream,
            consumers = readers.len(),
            pending,
            "reading the cluster stream"
        );
        let mut source = Self {
            readers: readers.into_iter().map(Reader::into_stream).collect(),
            client,
            prefix: cluster.subject_prefix.clone(),
            partitions: cluster.partitions,
            metrics,
            foreign: WarnLimit::new(Duration::from_secs(60)),
            failures: 0,
            owned,
            started: Instant::now(),
            caught_up: false,
            read: 0,
            last_read: Instant::now(),
        };
        if pending == 0 {
            source.caught_up(None, 0, false);
        }
        Ok(source)
    }

    fn delivery(&mut self, (read, item): Read) -> Delivery {
        let message = match item {
            Ok(Some(message)) => message,
            Ok(None) => {
                self.caught_up(read, 0, false);
                return Delivery::Other;
            }
            Err(err) => {
                self.failures += 1;
                self.metrics.set_connected(Connection::Source, false);
                tracing::warn!(partition = ?read, %err, "reading the cluster stream failed; a new consumer resumes where it stopped");
                return Delivery::Lost;
            }
        };
        if self.failures > 0 {
            self.failures = 0;
            self.metrics.set_connected(Connection::Source, true);
        }
        let (sequence, received_ms) = match message.info() {
            Ok(info) => {
                self.caught_up(read, info.pending, true);
                (
                    Some(info.stream_sequence),
                    Some((info.published.unix_timestamp_nanos() / 1_000_000) as i64),
                )
            }
            Err(_) => (None, None),
        };
        // Read partition by partition, the term counts deliveries (positions are noted at each
        // barrier); the whole stream is read in order, and its sequence is the LSN.
        let position = match (&mut self.owned, read, sequence) {
            (Some(owned), Some(partition), Some(sequence)) => {
                if let Some(state) = owned.partitions.get_mut(&partition) {
                    state.next = sequence + 1;
                }
                None
            }
            (Some(_), _, _) => None,
            (None, _, sequence) => sequence,
        };
        let Some((partition, topic)) = split_subject(&self.prefix, &message.subject) else {
            self.skip_foreign(&message.subject, "it is not <prefix>.<partition>.<topic>");
            return Delivery::Other;
        };
        if partition >= self.partitions {
            self.skip_foreign(
                &message.subject,
                "its partition is not below cluster.partitions",
            );
            return Delivery::Other;
        }
        let trace = match message.headers.as_ref().and_then(|h| h.get("traceparent")) {
            None => trace::Incoming::Absent,
            Some(parent) => {
                let state = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("tracestate"))
                    .map(|s| s.as_str());
                match TraceContext::parse(parent.as_str(), state) {
                    Some(context) => trace::Incoming::Valid(Arc::new(context)),
                    None => trace::Incoming::Invalid,
                }
            }
        };
        Delivery::Message(Incoming {
            topic,
            payload: message.payload.clone(),
            trace,
            ack: None,
            position,
            received_ms,
        })
    }

    /// Records the consumers' lag (`pending`: what the consumer of `partition` still has to
    /// deliver, after a message if `delivered`), and the catch-up's time and size once none
    /// has any.
    fn caught_up(&mut self, partition: Option<u32>, pending: u64, delivered: bool) {
        let lag = match (&mut self.owned, partition) {
            (Some(owned), Some(partition)) => {
                if let Some(state) = owned.partitions.get_mut(&partition) {
                    if state.pending != pending {
                        owned.lag = owned.lag + pending - state.pending;
                        state.pending = pending;
                        state.lag.set(gauge_value(pending));
                    }
                }
                owned.lag
            }
            _ => pending,
        };
        let cluster = &self.metrics.cluster;
        cluster.lag_messages.set(gauge_value(lag));
        if delivered {
            self.read += 1;
            self.last_read = Instant::now();
        }
        if lag == 0 && !self.caught_up {
            self.caught_up = true;
            // Found quiet after its last message: the catch-up ended with that message.
            let took = self.last_read.duration_since(self.started);
            cluster.replay_seconds.set(took.as_secs_f64());
            cluster
                .replayed_readings
                .set(i64::try_from(self.read).unwrap_or(i64::MAX));
            tracing::info!(
                readings = self.read,
                ?took,
                "caught up with the cluster stream"
            );
        }
    }

    fn skip_foreign(&mut self, subject: &str, why: &str) {
        self.metrics.readings_unmatched.inc();
        if let Some(suppressed) = self.foreign.allow(Instant::now()) {
            tracing::warn!(subject, suppressed, "skipped a message of the cluster stream: {why}; check the server's partition mapping");
        }
    }
}

/// A count as a gauge's value.
fn gauge_value(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// The stream keeps every reading and a restart resumes from the snapshot's sequence, so there
/// is nothing to acknowledge: every ack is [`Acked::Stale`].
pub struct StreamAcker;

impl Acker for StreamAcker {
    fn try_ack(&self, _token: AckToken) -> Result<Acked, Closed> {
        Ok(Acked::Stale)
    }
}

impl Source for JetStreamSource {
    type Acker = StreamAcker;

    fn try_next(&mut self) -> Option<Delivery> {
        let read = self.readers.next().now_or_never()??;
        Some(self.delivery(read))
    }

    async fn next(&mut self) -> Delivery {
        if self.failures > 0 {
            // The client reconnects by itself; do not spin on its errors meanwhile.
            let delay = Duration::from_millis(100 * u64::from(self.failures.min(50)));
            tokio::time::sleep(delay).await;
        }
        match self.readers.next().await {
            Some(read) => self.delivery(read),
            // Never: a reader's stream makes a new consumer rather than end.
            None => std::future::pending().await,
        }
    }

    fn checkpoint(&mut self, lsn: u64) {
        if let Some(owned) = &self.owned {
            let positions: Arc<[(u32, u64)]> = owned
                .partitions
                .iter()
                .map(|(&partition, state)| (partition, state.next))
                .collect();
            owned.checkpoints.mark(lsn, positions);
        }
    }

    fn acker(&self) -> StreamAcker {
        StreamAcker
    }

    async fn close(self, _acks_sent: Option<tokio::sync::oneshot::Receiver<()>>) {
        drop(self.readers);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.drain()).await;
        self.metrics.set_connected(Connection::Source, false);
    }
}
