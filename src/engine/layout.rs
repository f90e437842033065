//! How intake reaches the workers ([`Workers`]): each worker as a task of its own behind a
//! bounded channel, so that the workers use several cores, or every worker inline in the intake
//! task, where the readings of one socket read run to completion (decode, operators, routing)
//! before the next read, with no hand-off and no wake-up between tasks.
//!
//! Inline is the layout for one runtime thread (the default on machines of two cores or fewer):
//! there a worker task could never run beside intake anyway, so handing it a reading is only
//! overhead, and intake can pause between reads (README, "Run to completion", measures both).
//! Its bound is intake itself: while the workers process a read, the socket is not read, so
//! backpressure reaches the broker as it does when a worker's channel is full.

use super::worker::{send_all, timer_interval, SinkInput, Worker, WorkerInput};
use crate::config::Layout;
use crate::route::Outgoing;
use tokio::sync::mpsc;

impl Layout {
    /// Inline or not, for this runtime: `auto` is inline when the runtime has one thread.
    pub fn is_inline(self) -> bool {
        match self {
            Layout::Inline => true,
            Layout::Tasks => false,
            Layout::Auto => one_runtime_thread(),
        }
    }
}

/// Whether the async runtime weir runs on has one thread (`TOKIO_WORKER_THREADS`, and the
/// default on machines of two cores or fewer).
pub fn one_runtime_thread() -> bool {
    tokio::runtime::Handle::try_current().is_ok_and(|runtime| runtime.metrics().num_workers() == 1)
}

/// The workers, as intake sees them.
pub enum Workers {
    /// One channel per worker task ([`Worker::run`]).
    Tasks(Vec<mpsc::Sender<WorkerInput>>),
    /// The workers themselves, run by intake.
    Inline(Box<Inline>),
}

/// Workers run inline, with what they hand to the sinks.
pub struct Inline {
    workers: Vec<Worker>,
    sinks: Vec<mpsc::Sender<SinkInput>>,
    /// Events derived and not yet handed to the sinks: at most one socket read's worth, as
    /// intake flushes before it waits again.
    out: Vec<Outgoing>,
    ticks: tokio::time::Interval,
}

impl Inline {
    /// The workers, and where their events go, borrowed apart.
    fn parts(
        &mut self,
    ) -> (
        &mut [Worker],
        &[mpsc::Sender<SinkInput>],
        &mut Vec<Outgoing>,
    ) {
        (&mut self.workers, &self.sinks, &mut self.out)
    }
}

impl Workers {
    /// `workers` run inline, handing their events to `sinks`.
    pub fn inline(workers: Vec<Worker>, sinks: Vec<mpsc::Sender<SinkInput>>) -> Self {
        Workers::Inline(Box::new(Inline {
            workers,
            sinks,
            out: Vec::with_capacity(256),
            ticks: timer_interval(),
        }))
    }

    /// How many workers share the devices ([`super::Plan::shard`]).
    pub fn len(&self) -> usize {
        match self {
            Workers::Tasks(senders) => senders.len(),
            Workers::Inline(inline) => inline.workers.len(),
        }
    }

    /// Whether there are no workers at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Passes `input` to worker `shard`: queued for its task (waiting while its channel is
    /// full), or applied here. False when a worker or a sink is gone.
    pub async fn send(&mut self, shard: usize, input: WorkerInput) -> bool {
        match self {
            Workers::Tasks(senders) => senders[shard].send(input).await.is_ok(),
            Workers::Inline(inline) => {
                let (workers, sinks, out) = inline.parts();
                workers[shard].take(input, sinks, out).await
            }
        }
    }

    /// Passes one input made by `input` to every worker, in worker order.
    pub async fn broadcast(&mut self, input: impl Fn() -> WorkerInput) -> bool {
        for shard in 0..self.len() {
            if !self.send(shard, input()).await {
                return false;
            }
        }
        true
    }

    /// Hands what inline workers derived to the sinks (worker tasks send their own); intake
    /// calls it before it waits. How many events went, or `None` when a sink is gone.
    pub async fn flush(&mut self) -> Option<usize> {
        match self {
            Workers::Tasks(_) => Some(0),
            Workers::Inline(inline) => {
                let events = inline.out.len();
                send_all(&inline.sinks, &mut inline.out)
                    .await
                    .then_some(events)
            }
        }
    }

    /// Resolves when the processing-time timers of inline workers are due; never for tasks,
    /// which run their own. Cancel-safe.
    pub async fn timers_due(&mut self) {
        match self {
            Workers::Tasks(_) => std::future::pending().await,
            Workers::Inline(inline) => {
                inline.ticks.tick().await;
            }
        }
    }

    /// Runs the timers of inline workers and hands their events on; false when a sink is gone.
    pub async fn run_timers(&mut self) -> bool {
        match self {
            Workers::Tasks(_) => true,
            Workers::Inline(inline) => {
                let (workers, sinks, out) = inline.parts();
                for worker in workers {
                    if !worker.run_timers(sinks, out).await {
                        return false;
                    }
                }
                true
            }
        }
    }

    /// Ends the workers as input ends: worker tasks see their channels close and finish on
    /// their own; inline workers finish here ([`Worker::finish`]).
    pub async fn finish(self) {
        if let Workers::Inline(inline) = self {
            let Inline {
                workers,
                sinks,
                mut out,
                ..
            } = *inline;
            for worker in workers {
                worker.finish(&sinks, &mut out).await;
            }
        }
    }
}
