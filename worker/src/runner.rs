//! The worker loop: keep every slot of the batch busy. Whenever a slot is
//! free (and the KV budget has room for another question), pull exactly as
//! many questions as fit, high before normal before low, but a question
//! waiting longer than `--priority-aging` first (see
//! [`crate::serving_order`]); each question then runs as its own task
//! ([`crate::job`]) while the engine batches them.
//!
//! Pulls never wait on an empty consumer: a `no_wait` fetch returns at once
//! with what is there, so an empty `high` costs one round trip, not an
//! expiry, before `normal` is asked. An idle worker wakes on the core NATS
//! arrival subject, with a 1 s fallback poll for redeliveries.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use bytes::Bytes;
use ebb_nats::{Heartbeat, Priority, Topology, WorkerState, subjects};
use ebb_store::{Lifecycle, Store};
use futures::{FutureExt, StreamExt};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::WorkerError;
use crate::config::Config;
use crate::engine::thread::{EngineHandle, KvBudget};
use crate::generate::Prompts;

/// How often heartbeats are published.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// Longest a pull may take before the worker gives up on its reply (a reply
/// lost in a server restart must not hang the worker).
const PULL_TIMEOUT: Duration = Duration::from_secs(4);
/// Fallback poll of an idle worker, for redeliveries (they publish no arrival).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Everything the questions in flight share.
pub(crate) struct Worker {
    pub config: Arc<Config>,
    pub identity: String,
    pub topology: Topology,
    pub store: Store,
    pub lifecycle: Lifecycle,
    pub consumers: Vec<PullConsumer>,
    /// The consumers' delivery policy as the server holds it (not this
    /// process's flags: another process may have set it).
    pub delivery: DeliveryPolicy,
    pub heartbeat: watch::Sender<Heartbeat>,
    pub engine: EngineHandle,
    pub budget: Arc<KvBudget>,
    pub prompts: Prompts,
    pub max_context: usize,
    /// Questions in flight at most (`--max-batch`).
    pub slots: usize,
    pub gate: PullGate,
}

/// Ack wait and delivery limit of the worker consumers.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryPolicy {
    pub ack_wait: Duration,
    pub max_deliver: i64,
}

impl DeliveryPolicy {
    pub fn of(consumer: &PullConsumer) -> DeliveryPolicy {
        let config = &consumer.cached_info().config;
        DeliveryPolicy {
            ack_wait: config.ack_wait,
            max_deliver: config.max_deliver,
        }
    }
}

/// What holds pulls back: questions waiting for KV memory (with how much
/// a question usually needs, against the budget's free memory, what decides
/// how many questions a pull may take) and answers waiting for the status
/// store (no pull at all until it is back).
#[derive(Debug, Default)]
pub(crate) struct PullGate {
    waiting: AtomicUsize,
    /// Answers kept while Redis cannot record them.
    stalled_on_store: AtomicUsize,
    /// Moving average of positions per question, 0 before the first.
    typical_positions: AtomicU64,
    /// Something above changed: the serve loop looks again.
    pub changed: Notify,
}

/// Held while a question waits for memory or its answer for the store.
pub(crate) struct Held<'a> {
    gate: &'a PullGate,
    count: &'a AtomicUsize,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.gate.changed.notify_one();
    }
}

impl PullGate {
    pub fn wait_for_memory(&self) -> Held<'_> {
        self.hold(&self.waiting)
    }

    /// While held, the worker pulls nothing: a question it took now could
    /// not be recorded either.
    pub fn stall_on_store(&self) -> Held<'_> {
        self.hold(&self.stalled_on_store)
    }

    fn hold<'a>(&'a self, count: &'a AtomicUsize) -> Held<'a> {
        count.fetch_add(1, Ordering::Relaxed);
        Held { gate: self, count }
    }

    /// A question of `positions` got its memory.
    pub fn admitted(&self, positions: usize) {
        let previous = self.typical_positions.load(Ordering::Relaxed);
        let mean = ebb_nats::messages::moving_average(
            (previous > 0).then_some(previous as f64),
            positions as f64,
        );
        self.typical_positions
            .store(mean.ceil() as u64, Ordering::Relaxed);
        // After the store: the serve loop reads the new size when it wakes.
        self.changed.notify_one();
    }
}

/// How many questions to pull now: one per free slot, as far as the free
/// KV memory holds typical questions. A question that turns out larger
/// than the free memory waits in the worker (the only one that does: no
/// pull happens while one waits); everything else stays in JetStream for
/// other workers. An idle worker always takes one.
pub(crate) fn pull_count(
    free_slots: usize,
    in_flight: usize,
    waiting_for_memory: usize,
    free_positions: u64,
    typical_positions: u64,
) -> usize {
    if free_slots == 0 || waiting_for_memory > 0 {
        return 0;
    }
    if typical_positions == 0 {
        // Nothing measured yet: one question, and no more until its size
        // is known (or it is done).
        return usize::from(in_flight == 0);
    }
    let fitting = ((free_positions / typical_positions) as usize).min(free_slots);
    if in_flight == 0 {
        fitting.max(1)
    } else {
        fitting
    }
}

impl Worker {
    /// Answers questions until `shutdown` is cancelled, then returns once
    /// every question in flight is finished.
    pub async fn serve(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let client = self.topology.jetstream.client();
        let mut arrivals = client
            .subscribe(subjects::QUESTIONS_WILDCARD)
            .await
            .map_err(|err| WorkerError::Nats(err.into()))?;
        let mut jobs = JoinSet::new();
        // At start and after a job there may be a backlog, whose ages decide
        // the order.
        let mut backlog = true;
        loop {
            // A stopped engine (it panicked) takes nothing new, but the
            // questions it held finish first: each records its failure, so
            // none is retried blindly on the next worker.
            let stopped = self.engine.is_stopped();
            let closing = shutdown.is_cancelled() || stopped;
            if closing {
                if jobs.is_empty() {
                    return match stopped {
                        true => Err(WorkerError::EngineStopped),
                        false => Ok(()),
                    };
                }
            } else {
                let waiting = self.gate.waiting.load(Ordering::Relaxed);
                let typical = self.gate.typical_positions.load(Ordering::Relaxed);
                let stalled = self.gate.stalled_on_store.load(Ordering::Relaxed) > 0;
                // Questions pulled but not yet holding memory will need
                // about a typical question's room each.
                let unreserved = jobs
                    .len()
                    .saturating_sub(self.budget.holders() as usize + waiting);
                let free = self
                    .budget
                    .free_positions()
                    .saturating_sub(unreserved as u64 * typical);
                let wanted = if stalled {
                    0
                } else {
                    pull_count(
                        self.slots.saturating_sub(jobs.len()),
                        jobs.len(),
                        waiting,
                        free,
                        typical,
                    )
                };
                if wanted > 0 {
                    let messages = self.pull(wanted, backlog).await;
                    backlog = messages.len() == wanted;
                    for message in messages {
                        let worker = self.clone();
                        jobs.spawn(async move { worker.handle(message).await });
                    }
                    // Wake-ups that piled up say nothing new: the next pull
                    // looks at the queue itself.
                    while arrivals.next().now_or_never().flatten().is_some() {}
                }
            }
            self.publish_load(jobs.len(), closing);
            let changed = self.gate.changed.notified();
            // Read once for the select below: a shutdown during the pull
            // above must not leave it waiting with nothing in flight.
            let open = !shutdown.is_cancelled() && !stopped;
            if shutdown.is_cancelled() && jobs.is_empty() {
                return Ok(());
            }
            tokio::select! {
                Some(joined) = jobs.join_next() => {
                    // A panic in candle: this process is no longer trustworthy.
                    if let Err(err) = joined && err.is_panic() {
                        std::panic::resume_unwind(err.into_panic());
                    }
                    backlog = true;
                }
                _ = arrivals.next(), if open => {}
                _ = tokio::time::sleep(IDLE_POLL), if open => {}
                _ = shutdown.cancelled(), if open => {}
                _ = changed => {}
            }
        }
    }

    /// Up to `wanted` questions in serving order. Ages are read only while
    /// a backlog may exist: an idle worker's question is fresh by definition.
    async fn pull(&self, wanted: usize, backlog: bool) -> Vec<jetstream::Message> {
        let order = if backlog {
            match ebb_nats::queue_depth(&self.topology.questions).await {
                Ok(depth) => crate::serving_order::order(&depth, self.config.priority_aging),
                Err(err) => {
                    tracing::debug!(cause = %err, "queue ages unknown; serving by priority");
                    Priority::ALL.to_vec()
                }
            }
        } else {
            Priority::ALL.to_vec()
        };
        let mut messages = Vec::with_capacity(wanted);
        for priority in order {
            let remaining = wanted - messages.len();
            if remaining == 0 {
                break;
            }
            let consumer = &self.consumers[priority as usize];
            let fetch = fetch_now(consumer, remaining, &mut messages);
            if tokio::time::timeout(PULL_TIMEOUT, fetch).await.is_err() {
                tracing::warn!(?priority, "pull timed out; retrying");
            }
        }
        messages
    }

    /// Heartbeat fields that follow the batch.
    fn publish_load(&self, in_flight: usize, draining: bool) {
        let active = self.budget.holders();
        let stats = &self.engine.stats;
        let prefill_tokens = stats.prefill_tokens.load(Ordering::Relaxed);
        let prefill_tokens_saved = stats.prefill_tokens_saved.load(Ordering::Relaxed);
        let state = match (draining, in_flight) {
            (true, _) => WorkerState::Draining,
            (false, 0) => WorkerState::Ready,
            (false, _) => WorkerState::Busy,
        };
        self.heartbeat.send_if_modified(|beat| {
            let changed = beat.state != state || beat.active != active;
            beat.state = state;
            beat.active = active;
            beat.prefill_tokens = prefill_tokens;
            beat.prefill_tokens_saved = prefill_tokens_saved;
            changed
        });
    }

    pub fn set_state(&self, state: WorkerState) {
        self.heartbeat.send_if_modified(|beat| {
            let changed = beat.state != state;
            beat.state = state;
            changed
        });
    }
}

/// One `no_wait` fetch of up to `max` messages into `into`: what is there
/// now, at once, and nothing more. Messages already received are kept even
/// if the reply breaks off.
async fn fetch_now(consumer: &PullConsumer, max: usize, into: &mut Vec<jetstream::Message>) {
    let mut batch = match consumer.fetch().max_messages(max).messages().await {
        Ok(batch) => batch,
        Err(err) => {
            tracing::debug!(cause = %err, "pull returned no question");
            return;
        }
    };
    while let Some(next) = batch.next().await {
        match next {
            Ok(message) => into.push(message),
            Err(err) => {
                tracing::debug!(cause = %err, "pull ended");
                return;
            }
        }
    }
}

/// Publishes the heartbeat every [`HEARTBEAT_INTERVAL`] and on every change.
pub(crate) async fn publish_heartbeats(
    client: async_nats::Client,
    mut heartbeat: watch::Receiver<Heartbeat>,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
    ticker.tick().await; // the first tick is immediate
    loop {
        let mut beat = heartbeat.borrow_and_update().clone();
        beat.sent_at_ms = ebb_nats::now_ms();
        let body = Bytes::from(serde_json::to_vec(&beat).expect("heartbeats serialize"));
        if let Err(err) = client.publish(subjects::HEARTBEAT, body).await {
            tracing::debug!(cause = %err, "heartbeat not sent");
        }
        tokio::select! {
            _ = ticker.tick() => {}
            changed = heartbeat.changed() => if changed.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}

/// The consumers in serving order.
pub(crate) async fn consumers(topology: &Topology) -> Result<Vec<PullConsumer>, WorkerError> {
    let mut consumers = Vec::new();
    for priority in Priority::ALL {
        consumers.push(topology.consumer(priority).await?);
    }
    Ok(consumers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulls_fill_free_slots_as_far_as_memory_holds_typical_questions() {
        // 8 free slots, memory for 3 typical questions: 3.
        assert_eq!(pull_count(8, 0, 0, 3_000, 1_000), 3);
        // Memory for 20: the slots bound it.
        assert_eq!(pull_count(8, 0, 0, 20_000, 1_000), 8);
        // No free slot, or one question already waiting for memory: none.
        assert_eq!(pull_count(0, 8, 0, 20_000, 1_000), 0);
        assert_eq!(pull_count(4, 4, 1, 20_000, 1_000), 0);
        // Busy and memory for less than one more: none stays in JetStream.
        assert_eq!(pull_count(4, 4, 0, 999, 1_000), 0);
    }

    #[test]
    fn an_idle_worker_always_takes_one_and_a_new_one_waits_for_the_first_size() {
        assert_eq!(pull_count(8, 0, 0, 10, 1_000), 1);
        assert_eq!(pull_count(8, 0, 0, 10, 0), 1);
        assert_eq!(pull_count(7, 1, 0, 1_000_000, 0), 0);
    }
}
