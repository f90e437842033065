//! The ports between the engine and the world outside. A [`Source`] yields raw messages, each
//! with an opaque [`AckToken`], and takes acknowledgements back once their effects are durable;
//! MQTT implements it today, JetStream next. The input log is the durability port between them:
//! intake appends each message with its token ([`LogCommand`]) and the log hands the tokens back
//! in [`AckBatch`]es once they are on disk. (Sinks have their port in `sink`.)

use bytes::Bytes;
use std::future::Future;

/// An acknowledgement owed to a source for one message. Opaque to everyone but the source that
/// issued it (MQTT packs its connection and packet id in it; a stream would put its sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken(pub u64);

/// One message as a source received it.
#[derive(Debug)]
pub struct Incoming {
    pub topic: String,
    pub payload: Bytes,
    /// The W3C trace context its headers carried.
    pub trace: crate::model::trace::Incoming,
    /// `None` for a message that needs no acknowledgement (MQTT QoS 0).
    pub ack: Option<AckToken>,
    /// Where the message sits in its source's own log (a stream sequence), if the source keeps
    /// one: it becomes the LSN, so a snapshot says where to resume reading. Such positions rise.
    pub position: Option<u64>,
    /// When the source's log took the message (ms since the epoch): the arrival time, so that
    /// reading it again derives the same events.
    pub received_ms: Option<i64>,
}

/// What a source reports.
#[derive(Debug)]
pub enum Delivery {
    Message(Incoming),
    /// The source lost its connection; it reconnects by itself, with backoff, when asked for
    /// the next delivery. Messages received so far should be handed on before waiting.
    Lost,
    /// Anything else (connection and subscription changes the source keeps to itself).
    Other,
}

/// The source went away for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the source is gone")]
pub struct Closed;

/// A source of raw messages for the engine.
///
/// Called from one task: [`try_next`](Self::try_next) takes what has already arrived without
/// waiting (so a batch can be handed on at once), [`next`](Self::next) waits. Nothing slow may
/// happen between two calls while connected: a source keeps its connection alive only while it
/// is asked for deliveries.
pub trait Source: Send + 'static {
    /// Sends acknowledgements from another task.
    type Acker: Acker;

    /// A delivery that is ready now, or `None` if one would have to be waited for.
    fn try_next(&mut self) -> Option<Delivery>;

    /// The next delivery. Cancel-safe: nothing is lost if the future is dropped.
    fn next(&mut self) -> impl Future<Output = Delivery> + Send;

    /// The handle that acknowledges this source's messages.
    fn acker(&self) -> Self::Acker;

    /// A snapshot barrier at `lsn` follows every delivery so far: a source that resumes from
    /// positions of its own (a cluster stream read partition by partition) notes them here.
    fn checkpoint(&mut self, _lsn: u64) {}

    /// Ends the source: keeps its connection served until `acks_sent` resolves (the last
    /// acknowledgements are out), within a bound of its own, then disconnects.
    fn close(
        self,
        acks_sent: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> impl Future<Output = ()> + Send;
}

/// Acknowledges a source's messages, in the order they were received, once each is durable.
///
/// Never waits: the connection that takes the acks is served by the intake loop, which may
/// itself be waiting for the input log, which may be waiting to hand over its acks. A waiting
/// acker would close that circle; so it is told "not now" and tries again.
pub trait Acker: Send + 'static {
    /// # Errors
    /// The source is gone.
    fn try_ack(&self, token: AckToken) -> Result<Acked, Closed>;
}

/// What became of one acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    Sent,
    /// Not needed: the source delivers the message again instead (MQTT, after a reconnect).
    Stale,
    /// The source cannot take it now; try again shortly.
    Later,
}

/// Acks released by one sync, in receive order; `done` is answered once they are all sent.
#[derive(Debug, Default)]
pub struct AckBatch {
    pub tokens: Vec<AckToken>,
    pub done: Option<tokio::sync::oneshot::Sender<()>>,
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
        /// The message's W3C trace context, replayed with it after a crash.
        trace: Option<std::sync::Arc<crate::model::trace::TraceContext>>,
        ack: Option<AckToken>,
    },
    /// Start a new segment at this LSN (a snapshot barrier).
    Rotate(u64),
    /// A snapshot covering everything before this LSN is on disk.
    SnapshotWritten(u64),
    /// Sync now and release every pending ack; `done` is answered once the acks are sent.
    Flush(tokio::sync::oneshot::Sender<()>),
}
