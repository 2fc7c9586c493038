//! The worker loop: pull one question (high before normal before low, but a
//! question waiting longer than `--priority-aging` first, see
//! [`crate::serving_order`]), answer it while streaming tokens and keeping the message alive with
//! progress acks, record the answer, then acknowledge.
//!
//! Ordering is what makes "no question lost" hold: the answer and status
//! are stored before the ack, so a crash at any point leaves either a
//! redelivery or a finished record (and a redelivered finished question is
//! acknowledged without work).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use bytes::Bytes;
use ebb_nats::messages::moving_average;
use ebb_nats::{
    AnswerEvent, CachedAnswer, FinishReason, Heartbeat, Job, Priority, QuestionRecord,
    QuestionStatus, Store, Timings, Topology, WorkerState, dead_letter, subjects, telemetry,
    webhook,
};
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::WorkerError;
use crate::config::Config;
use crate::generate::{GenerateError, Generation, Generator};

/// How often heartbeats are published.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// Longest a single pull request may stay open.
const PULL_EXPIRY: Duration = Duration::from_secs(2);
/// Streamed answer pieces buffered between the model thread and NATS.
const TOKEN_BUFFER: usize = 256;

/// Everything one job needs besides the model.
pub(crate) struct Worker {
    pub config: Arc<Config>,
    pub identity: String,
    pub topology: Topology,
    pub store: Store,
    pub consumers: Vec<PullConsumer>,
    /// The consumers' delivery policy as the server holds it (not this
    /// process's flags: another process may have set it).
    pub delivery: DeliveryPolicy,
    pub heartbeat: watch::Sender<Heartbeat>,
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

/// Why a job did not produce an answer.
#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error("failure injected by --debug-fail-marker")]
    Injected,
    #[error("status store: {0}")]
    Store(#[from] ebb_nats::StoreError),
}

impl Worker {
    /// Answers questions until `shutdown` is cancelled, then returns once the
    /// question in hand is finished.
    pub async fn serve(
        &self,
        mut generator: Generator,
        shutdown: CancellationToken,
    ) -> Result<(), WorkerError> {
        let client = self.topology.jetstream.client();
        let mut arrivals = client
            .subscribe(subjects::QUESTIONS_WILDCARD)
            .await
            .map_err(|err| WorkerError::Nats(err.into()))?;
        // At start and after a job there may be a backlog, whose ages decide
        // the order.
        let mut backlog = true;
        while let Some(message) = self.next_message(&mut arrivals, &shutdown, backlog).await {
            backlog = true;
            self.set_state(WorkerState::Busy);
            generator = self.handle(message, generator).await?;
            if shutdown.is_cancelled() {
                break;
            }
            self.set_state(WorkerState::Ready);
            // Wake-ups that piled up during the answer say nothing new: the
            // next pull looks at the queue itself.
            while arrivals.next().now_or_never().flatten().is_some() {}
        }
        Ok(())
    }

    /// The next question in [`crate::serving_order`]. Waits on the core
    /// NATS arrival subject (no polling delay for a new question), with a
    /// 1 s fallback poll for redeliveries. Ages are read only while a backlog
    /// may exist: an idle worker's question is fresh by definition.
    async fn next_message(
        &self,
        arrivals: &mut async_nats::Subscriber,
        shutdown: &CancellationToken,
        mut backlog: bool,
    ) -> Option<jetstream::Message> {
        loop {
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
            backlog = false;
            for priority in order {
                let consumer = &self.consumers[priority as usize];
                if shutdown.is_cancelled() {
                    return None;
                }
                // Bounded, so a reply lost in a server restart cannot hang the worker.
                let pull = async {
                    let mut batch = consumer
                        .fetch()
                        .max_messages(1)
                        .expires(PULL_EXPIRY)
                        .messages()
                        .await?;
                    let next: Result<Option<jetstream::Message>, async_nats::Error> =
                        batch.next().await.transpose();
                    next
                };
                match tokio::time::timeout(PULL_EXPIRY * 2, pull).await {
                    Ok(Ok(Some(message))) => return Some(message),
                    Ok(Ok(None)) => {}
                    Ok(Err(err)) => tracing::debug!(cause = %err, "pull returned no question"),
                    Err(_) => tracing::warn!("pull timed out; retrying"),
                }
            }
            tokio::select! {
                _ = arrivals.next() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => return None,
            }
        }
    }

    /// Handles one delivery; hands the generator back for the next.
    async fn handle(
        &self,
        message: jetstream::Message,
        generator: Generator,
    ) -> Result<Generator, WorkerError> {
        let deliveries = message.info().map(|info| info.delivered).unwrap_or(1);
        let job: Job = match serde_json::from_slice(&message.payload) {
            Ok(job) => job,
            Err(err) => {
                // Not a job at all: retrying cannot help and there is no id
                // to record a status under.
                tracing::error!(subject = %message.subject, cause = %err, "dropping unreadable message");
                let _ = message.ack_with(AckKind::Term).await;
                return Ok(generator);
            }
        };
        let span = tracing::info_span!("job", question_id = %job.id, attempt = deliveries);
        telemetry::adopt_parent(&span, message.headers.as_ref());
        self.handle_job(&message, job, deliveries, generator)
            .instrument(span)
            .await
    }

    async fn handle_job(
        &self,
        message: &jetstream::Message,
        job: Job,
        deliveries: i64,
        generator: Generator,
    ) -> Result<Generator, WorkerError> {
        let started_ms = ebb_nats::now_ms();
        let earlier = self.store.record(&job.id).await.ok().flatten();
        if earlier
            .as_ref()
            .is_some_and(|record| record.status.is_terminal())
        {
            tracing::info!("already answered; acknowledging the redelivery");
            // The worker before may have died between its record and its
            // webhook call; the call's message id makes this a no-op otherwise.
            if let (Some(url), Some(record)) = (&job.callback_url, &earlier)
                && let Err(err) =
                    webhook::enqueue(&self.topology.jetstream, &job.id, url, record).await
            {
                tracing::warn!(cause = %err, "cannot queue the webhook call");
            }
            ack(message).await;
            return Ok(generator);
        }
        if let Some(hit) = self.cached(&job).await {
            let answer = Answer {
                text: &hit.answer,
                model: &hit.model,
                cached: true,
                timings: None,
                finish_reason: hit.finish_reason,
            };
            match self.finish(&job, deliveries, answer).await {
                Ok(()) => ack(message).await,
                Err(err) => {
                    self.retry_or_fail(message, &job, deliveries, &err.into())
                        .await
                }
            }
            return Ok(generator);
        }
        let record = QuestionRecord {
            status: QuestionStatus::Running,
            attempts: deliveries,
            model: Some(self.identity.clone()),
            updated_at_ms: started_ms,
            ..QuestionRecord::of_job(&job)
        };
        if let Err(err) = self.store.put_record(&record).await {
            tracing::warn!(cause = %err, "cannot mark the question running");
        }

        let started = Instant::now();
        let (generator, result) = self.generate(message, &job, generator).await;
        match result {
            Ok(generation) => {
                let timings = Timings {
                    queue_ms: started_ms.saturating_sub(job.enqueued_at_ms),
                    inference_ms: started.elapsed().as_millis() as u64,
                    prompt_tokens: generation.prompt_tokens as u32,
                    completion_tokens: generation.completion_tokens as u32,
                };
                let answer = Answer {
                    text: &generation.text,
                    model: &self.identity,
                    cached: false,
                    timings: Some(timings),
                    finish_reason: generation.finish_reason,
                };
                match self.finish(&job, deliveries, answer).await {
                    Ok(()) => {
                        ack(message).await;
                        self.heartbeat.send_modify(|beat| {
                            beat.jobs_done += 1;
                            beat.last_tokens_per_second = generation.decode_tokens_per_second();
                            let job_ms = timings.inference_ms as f64;
                            let response_ms = (timings.queue_ms + timings.inference_ms) as f64;
                            beat.mean_job_ms = Some(moving_average(beat.mean_job_ms, job_ms));
                            beat.mean_response_ms =
                                Some(moving_average(beat.mean_response_ms, response_ms));
                        });
                        tracing::info!(
                            prompt_tokens = generation.prompt_tokens,
                            completion_tokens = generation.completion_tokens,
                            inference_ms = timings.inference_ms,
                            queue_ms = timings.queue_ms,
                            "answered"
                        );
                    }
                    Err(err) => {
                        self.retry_or_fail(message, &job, deliveries, &err.into())
                            .await
                    }
                }
            }
            Err(err) => self.retry_or_fail(message, &job, deliveries, &err).await,
        }
        Ok(generator)
    }

    /// A cached answer another worker stored since the gateway looked.
    async fn cached(&self, job: &Job) -> Option<CachedAnswer> {
        let key = job
            .cache_key
            .as_deref()
            .filter(|_| job.model == self.identity)?;
        self.store.cached_answer(key).await.ok().flatten()
    }

    /// Runs the model on a blocking thread, streaming its text to
    /// `ebb.answers.<id>` and progress-acking the message meanwhile.
    async fn generate(
        &self,
        message: &jetstream::Message,
        job: &Job,
        mut generator: Generator,
    ) -> (Generator, Result<Generation, JobError>) {
        if let Some(marker) = &self.config.debug_fail_marker
            && job.question.contains(marker.as_str())
        {
            return (generator, Err(JobError::Injected));
        }
        let (pieces, mut pieces_rx) = mpsc::channel::<String>(TOKEN_BUFFER);
        let model_job = job.clone();
        let token_delay = self.config.debug_token_delay;
        let model_thread = tokio::task::spawn_blocking(move || {
            let result = generator.generate(&model_job, &mut |piece| {
                // A full buffer means NATS is slow: wait rather than drop text.
                let _ = pieces.blocking_send(piece.to_owned());
                if let Some(delay) = token_delay {
                    std::thread::sleep(delay);
                }
            });
            (generator, result)
        });
        let client = self.topology.jetstream.client();
        let answers = subjects::answers(&job.id);
        let attempt = message.info().map(|info| info.delivered).unwrap_or(1);
        let mut seq = 0;
        let mut progress =
            tokio::time::interval((self.delivery.ack_wait / 3).max(Duration::from_millis(100)));
        progress.tick().await;
        loop {
            tokio::select! {
                piece = pieces_rx.recv() => match piece {
                    Some(text) => {
                        // Stored before it is published: see AnswerEvent.
                        if let Err(err) = self.store.append_piece(&job.id, attempt, seq, &text).await {
                            tracing::debug!(cause = %err, "cannot store a piece for late joiners");
                        }
                        let event = AnswerEvent::Token { text, seq, attempt };
                        seq += 1;
                        let body = Bytes::from(serde_json::to_vec(&event).expect("events serialize"));
                        if let Err(err) = client.publish(answers.clone(), body).await {
                            tracing::debug!(cause = %err, "cannot stream a token");
                        }
                    }
                    None => break,
                },
                _ = progress.tick() => {
                    if let Err(err) = message.ack_with(AckKind::Progress).await {
                        tracing::warn!(cause = %err, "progress ack failed");
                    }
                }
            }
        }
        match model_thread.await {
            Ok((generator, result)) => (generator, result.map_err(JobError::from)),
            // A panic in candle: this process is no longer trustworthy.
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }

    /// Stores the answer (status record, cache), tells waiting clients and
    /// queues the webhook call.
    async fn finish(
        &self,
        job: &Job,
        deliveries: i64,
        answer: Answer<'_>,
    ) -> Result<(), ebb_nats::StoreError> {
        if !answer.cached
            && let Some(key) = &job.cache_key
            && job.model == self.identity
        {
            let entry = CachedAnswer {
                answer: answer.text.to_owned(),
                model: answer.model.to_owned(),
                finish_reason: answer.finish_reason,
                language: job.language.clone(),
            };
            self.store
                .put_cached_answer(key, &entry, self.config.cache_ttl)
                .await?;
        }
        let record = QuestionRecord {
            status: QuestionStatus::Done,
            answer: Some(answer.text.to_owned()),
            model: Some(answer.model.to_owned()),
            cached: answer.cached,
            timings: answer.timings,
            finish_reason: Some(answer.finish_reason),
            attempts: deliveries,
            updated_at_ms: ebb_nats::now_ms(),
            ..QuestionRecord::of_job(job)
        };
        self.store.put_record(&record).await?;
        let event = AnswerEvent::Done {
            answer: answer.text.to_owned(),
            model: answer.model.to_owned(),
            cached: answer.cached,
            timings: answer.timings,
            finish_reason: answer.finish_reason,
        };
        let body = Bytes::from(serde_json::to_vec(&event).expect("events serialize"));
        if let Err(err) = self
            .topology
            .jetstream
            .client()
            .publish(subjects::answers(&job.id), body)
            .await
        {
            // The record is stored; a waiting client finds it when its wait ends.
            tracing::warn!(cause = %err, "cannot publish the answer event");
        }
        if let Some(url) = &job.callback_url
            && let Err(err) =
                webhook::enqueue(&self.topology.jetstream, &job.id, url, &record).await
        {
            tracing::error!(cause = %err, "cannot queue the webhook call");
        }
        Ok(())
    }

    /// Schedules a retry with exponential backoff, or, on the last allowed
    /// delivery (or a permanent error), fails the question for good.
    async fn retry_or_fail(
        &self,
        message: &jetstream::Message,
        job: &Job,
        deliveries: i64,
        err: &JobError,
    ) {
        self.heartbeat.send_modify(|beat| beat.jobs_failed += 1);
        let permanent = matches!(err, JobError::Generate(err) if err.is_permanent());
        let max_deliver = self.delivery.max_deliver;
        if permanent || deliveries >= max_deliver {
            let reason = format!("{err}");
            match dead_letter::fail_question(&self.topology, &self.store, job, &reason, deliveries)
                .await
            {
                Ok(()) => ack(message).await,
                // Leave the message unacknowledged: its max-deliveries
                // advisory makes the gateway's reaper fail it once it can.
                Err(cause) => {
                    tracing::error!(%cause, "cannot record the failure; leaving it to the reaper")
                }
            }
            return;
        }
        let delay = retry_delay(self.config.retry_backoff, deliveries);
        tracing::warn!(cause = %err, deliveries, max_deliver, retry_in_ms = delay.as_millis() as u64, "answer failed; will retry");
        let record = QuestionRecord {
            status: QuestionStatus::Queued,
            error: Some(format!("attempt {deliveries} failed: {err}")),
            attempts: deliveries,
            updated_at_ms: ebb_nats::now_ms(),
            ..QuestionRecord::of_job(job)
        };
        let _ = self.store.put_record(&record).await;
        if let Err(err) = message.ack_with(AckKind::Nak(Some(delay))).await {
            tracing::warn!(cause = %err, "nak failed; the question returns after the ack wait");
        }
    }

    pub fn set_state(&self, state: WorkerState) {
        self.heartbeat.send_if_modified(|beat| {
            let changed = beat.state != state;
            beat.state = state;
            changed
        });
    }
}

/// A finished answer, wherever it came from.
struct Answer<'a> {
    text: &'a str,
    model: &'a str,
    cached: bool,
    timings: Option<Timings>,
    finish_reason: FinishReason,
}

/// `base * 2^(deliveries - 1)`, capped at one minute.
fn retry_delay(base: Duration, deliveries: i64) -> Duration {
    let doublings = deliveries.saturating_sub(1).clamp(0, 16) as u32;
    base.saturating_mul(1 << doublings)
        .min(Duration::from_secs(60))
}

async fn ack(message: &jetstream::Message) {
    // A lost ack means a redelivery, which finds the finished record.
    if let Err(err) = message.ack().await {
        tracing::warn!(cause = %err, "ack failed; the question will be redelivered and skipped");
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
    fn retries_back_off_exponentially_up_to_a_minute() {
        let base = Duration::from_secs(1);
        assert_eq!(retry_delay(base, 1), Duration::from_secs(1));
        assert_eq!(retry_delay(base, 2), Duration::from_secs(2));
        assert_eq!(retry_delay(base, 4), Duration::from_secs(8));
        assert_eq!(retry_delay(base, 40), Duration::from_secs(60));
    }
}
