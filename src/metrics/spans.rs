//! The spans of derived events, one per event, queued for export (cargo feature `otlp`): the
//! workers record them here, through the `Metrics` handle they hold; `telemetry::otlp` sends
//! them. Without the feature, or without `observability.otlp_endpoint`, recording is one
//! atomic load.

use crate::model::event::DerivedEvent;
use crate::model::message::Outgoing;

/// Where the spans of derived events go: nowhere, unless weir was built with the `otlp` feature
/// and `observability.otlp_endpoint` is set. Lives in `Metrics`, the handle every stage holds.
#[derive(Default)]
pub struct Spans {
    #[cfg(feature = "otlp")]
    pub(crate) queue: otlp::Queue,
}

impl Spans {
    /// Whether spans are exported; one atomic load, checked per event.
    #[inline]
    pub fn is_on(&self) -> bool {
        #[cfg(feature = "otlp")]
        {
            self.queue.is_on()
        }
        #[cfg(not(feature = "otlp"))]
        {
            false
        }
    }

    /// Reports the span of one routed event. An event whose reading carried no trace starts a
    /// new one, and its publish carries that trace's `traceparent`, so what happens downstream
    /// joins the exported span.
    pub fn record(&self, event: &DerivedEvent, outgoing: &mut Outgoing) {
        #[cfg(feature = "otlp")]
        self.queue.record(event, outgoing);
        #[cfg(not(feature = "otlp"))]
        let _ = (event, outgoing);
    }
}

#[cfg(feature = "otlp")]
pub(crate) mod otlp {
    //! The bounded queue between the workers and the OTLP exporter.

    use crate::model::event::{DerivedEvent, EventId};
    use crate::model::message::Outgoing;
    use crate::model::trace::TraceContext;
    use prometheus::IntCounter;
    use std::sync::{Arc, OnceLock};
    use std::time::{SystemTime, UNIX_EPOCH};
    use tokio::sync::mpsc;

    /// The workers' end of the span queue; empty (and every event skipped at one atomic load)
    /// until the exporter starts (`telemetry::otlp::start`).
    #[derive(Default)]
    pub struct Queue {
        pub(crate) channel: OnceLock<Channel>,
    }

    pub(crate) struct Channel {
        pub(crate) tx: mpsc::Sender<Span>,
        pub(crate) queue_full: IntCounter,
    }

    /// One derived event's span, as queued for export.
    #[derive(Debug)]
    pub(crate) struct Span {
        pub(crate) trace_id: [u8; 16],
        pub(crate) span_id: [u8; 8],
        pub(crate) parent: Option<[u8; 8]>,
        pub(crate) start_ns: u64,
        pub(crate) end_ns: u64,
        pub(crate) rule: Arc<str>,
        pub(crate) device: Arc<str>,
        pub(crate) kind: &'static str,
        pub(crate) event_id: EventId,
        pub(crate) topic: String,
        pub(crate) cause_topic: Option<Arc<str>>,
    }

    impl Queue {
        #[inline]
        pub fn is_on(&self) -> bool {
            self.channel.get().is_some()
        }

        /// Queues the span of `event`, routed as `outgoing`; gives `outgoing` a new trace when the
        /// reading carried none.
        pub fn record(&self, event: &DerivedEvent, outgoing: &mut Outgoing) {
            let Some(channel) = self.channel.get() else {
                return;
            };
            let cause = event.cause.as_ref();
            let parent = cause.and_then(|c| c.trace.as_ref()).map(|t| t.span_id);
            let context = outgoing
                .headers
                .trace
                .get_or_insert_with(|| Box::new(TraceContext::root()));
            let end_ns = unix_ns_now();
            let start_ns = event.arrival.map_or(end_ns, |arrival| {
                end_ns.saturating_sub(u64::try_from(arrival.elapsed().as_nanos()).unwrap_or(0))
            });
            let span = Span {
                trace_id: context.trace_id,
                span_id: context.span_id,
                parent,
                start_ns,
                end_ns,
                rule: event.rule.clone(),
                // Copied: an exported span is encoded with many allocations already.
                device: event.origin.device().into(),
                kind: event.body.kind(),
                event_id: event.id,
                topic: outgoing.topic.clone(),
                cause_topic: cause.map(|c| c.topic().into()),
            };
            if channel.tx.try_send(span).is_err() {
                channel.queue_full.inc();
            }
        }
    }

    fn unix_ns_now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}
