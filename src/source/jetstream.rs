//! The JetStream source (`[cluster]`): readings come from a NATS stream that keeps them, instead
//! of an MQTT subscription. Each message's stream sequence becomes its LSN, so a snapshot says
//! where to resume reading, and the stream is the input log: nothing is logged locally and
//! nothing is acknowledged (the stream's limits decide how long readings stay; `weir cluster
//! init` sizes them from the rules).
//!
//! The subject carries the partition the server mapped the device to
//! (`weir.28.sensors.plant-1.dev-7.telemetry`); the topic the rules see is the MQTT topic the
//! device published (`sensors/plant-1/dev-7/telemetry`). The source reads every partition in
//! stream order through one ephemeral consumer with as many replicas as the stream, which it
//! recreates after a gap or an error, from the sequence after the last one it delivered.

use crate::config::cluster::split_subject;
use crate::config::ClusterConfig;
use crate::metrics::{Connection, Metrics, WarnLimit};
use crate::model::port::{AckToken, Acked, Acker, Closed, Delivery, Incoming, Source};
use crate::model::trace::{self, TraceContext};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
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
    filter: String,
    replicas: usize,
    /// Where the next consumer starts: after the last message delivered.
    resume: DeliverPolicy,
    /// The consumer sequence the next message must carry; another means a delivery was lost
    /// or repeated (a consumer leader change), and the consumer is made again from `resume`.
    expected: u64,
    messages: Option<pull::Stream>,
}

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
        let messages = consumer
            .stream()
            .max_messages_per_batch(1000)
            .heartbeat(Duration::from_secs(2))
            .expires(Duration::from_secs(10))
            .messages()
            .await
            .map_err(|err| format!("cannot read from the consumer: {err}"))?;
        self.messages = Some(messages);
        self.expected = 1;
        Ok(())
    }

    /// The next message; an error after which the next call makes a new consumer.
    async fn next(&mut self) -> Result<async_nats::jetstream::Message, String> {
        loop {
            if self.messages.is_none() {
                self.create().await?;
            }
            let messages = self.messages.as_mut().expect("created above");
            let message = match messages.next().await {
                Some(Ok(message)) => message,
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
                return Ok(message);
            };
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
            self.resume = DeliverPolicy::ByStartSequence {
                start_sequence: info.stream_sequence + 1,
            };
            return Ok(message);
        }
    }

    /// The next message if one is ready now; `None` while none is, or the consumer is gone.
    fn try_next(&mut self) -> Option<Result<async_nats::jetstream::Message, String>> {
        self.messages.as_ref()?;
        self.next().now_or_never()
    }
}

/// Reads the `[cluster]` stream.
pub struct JetStreamSource {
    reader: Reader,
    client: async_nats::Client,
    prefix: String,
    partitions: u32,
    metrics: Arc<Metrics>,
    foreign: WarnLimit,
    /// Stream errors in a row, for backoff while the server is away.
    failures: u32,
    /// With several instances: per partition, `None` where another instance owns it, else the
    /// first sequence not yet applied (the partition's snapshot covers those before it).
    owned: Option<Vec<Option<u64>>>,
    /// When reading started, and readings read since, until the consumer first had nothing
    /// pending: the catch-up after taking partitions over.
    started: Instant,
    caught_up: bool,
    read: u64,
}

impl JetStreamSource {
    /// Connects and starts reading at stream sequence `from` (the first one a snapshot does
    /// not cover), or at new messages only when `from` is `None`.
    ///
    /// # Errors
    /// The servers cannot be reached, or the stream does not exist (the message says to run
    /// `weir cluster init`).
    ///
    /// With `owned` (several instances), only the partitions it lists are read, each from its
    /// own first unapplied sequence; `from` is then the lowest of those.
    pub async fn start(
        cluster: &ClusterConfig,
        from: Option<u64>,
        owned: Option<Vec<Option<u64>>>,
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
        let deliver_policy = match from {
            Some(start_sequence) if start_sequence > 0 => {
                DeliverPolicy::ByStartSequence { start_sequence }
            }
            Some(_) => DeliverPolicy::All,
            None => DeliverPolicy::New,
        };
        let mut reader = Reader {
            stream,
            filter: cluster.stream_subject(),
            replicas: cluster.replicas,
            resume: deliver_policy,
            expected: 1,
            messages: None,
        };
        reader
            .create()
            .await
            .map_err(|err| anyhow::anyhow!("cannot read the stream {}: {err}", cluster.stream))?;
        metrics.set_connected(Connection::Source, true);
        metrics.set_subscribed(1);
        tracing::info!(stream = %cluster.stream, ?deliver_policy, "reading the cluster stream");
        Ok(Self {
            reader,
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
        })
    }

    fn delivery(&mut self, item: Result<async_nats::jetstream::Message, String>) -> Delivery {
        let message = match item {
            Ok(message) => message,
            Err(err) => {
                self.failures += 1;
                self.metrics.set_connected(Connection::Source, false);
                tracing::warn!(%err, "reading the cluster stream failed; a new consumer resumes where it stopped");
                return Delivery::Lost;
            }
        };
        if self.failures > 0 {
            self.failures = 0;
            self.metrics.set_connected(Connection::Source, true);
            self.metrics.set_subscribed(1);
        }
        let (position, received_ms) = match message.info() {
            Ok(info) => {
                self.caught_up(info.pending);
                (
                    Some(info.stream_sequence),
                    Some((info.published.unix_timestamp_nanos() / 1_000_000) as i64),
                )
            }
            Err(_) => (None, None),
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
        if let Some(owned) = &self.owned {
            let applied = match owned.get(partition as usize) {
                Some(Some(first_unapplied)) => position.is_some_and(|p| p < *first_unapplied),
                _ => true,
            };
            if applied {
                self.metrics.cluster.readings_skipped.inc();
                return Delivery::Other;
            }
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

    /// Records the consumer's lag, and the catch-up's time and size once it first has none.
    fn caught_up(&mut self, pending: u64) {
        self.read += 1;
        let cluster = &self.metrics.cluster;
        cluster
            .lag_messages
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        if pending == 0 && !self.caught_up {
            self.caught_up = true;
            let took = self.started.elapsed();
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
        let item = self.reader.try_next()?;
        Some(self.delivery(item))
    }

    async fn next(&mut self) -> Delivery {
        if self.failures > 0 {
            // The client reconnects by itself; do not spin on its errors meanwhile.
            let delay = Duration::from_millis(100 * u64::from(self.failures.min(50)));
            tokio::time::sleep(delay).await;
        }
        let item = self.reader.next().await;
        self.delivery(item)
    }

    fn acker(&self) -> StreamAcker {
        StreamAcker
    }

    async fn close(self, _acks_sent: Option<tokio::sync::oneshot::Receiver<()>>) {
        drop(self.reader);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.drain()).await;
        self.metrics.set_connected(Connection::Source, false);
    }
}
