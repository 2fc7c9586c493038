//! One question, start to acknowledgement: skip it if it is already
//! answered, answer it from the cache if another worker just did, otherwise
//! reserve its KV memory, run it in the batch while streaming its text and
//! keeping the message alive with progress acks, record the answer, then
//! acknowledge.
//!
//! Ordering is what makes "no question lost" hold: the answer and status
//! are stored before the ack, so a crash at any point leaves either a
//! redelivery or a finished record (and a redelivered finished question is
//! acknowledged without work).

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use ebb_nats::messages::moving_average;
use ebb_nats::{AnswerEvent, CachedAnswer, Job, QuestionRecord, QuestionStatus, Timings, subjects};
use ebb_runtime::{backoff, telemetry};
use ebb_store::{Answer, Ending, Put};
use tracing::Instrument;

use crate::engine::positions_needed;
use crate::engine::thread::{Admission, SeqEvent};
use crate::generate::{GenerateError, Generation};
use crate::runner::Worker;

/// First and longest wait between attempts to record an answer while the
/// status store is unreachable.
const STORE_RETRY_FIRST: Duration = Duration::from_millis(200);
const STORE_RETRY_MAX: Duration = Duration::from_secs(5);

/// Why a job did not produce an answer.
#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error("failure injected by --debug-fail-marker")]
    Injected,
    #[error("status store: {0}")]
    Store(#[from] ebb_store::StoreError),
}

impl Worker {
    /// Handles one delivery, start to acknowledgement.
    pub(crate) async fn handle(&self, message: jetstream::Message) {
        let deliveries = message.info().map(|info| info.delivered).unwrap_or(1);
        let mut job: Job = match serde_json::from_slice(&message.payload) {
            Ok(job) => job,
            Err(err) => return self.fail_unreadable(&message, deliveries, &err).await,
        };
        if job.language.is_none() {
            // Here rather than at the gateway: detection takes more CPU
            // than the rest of an accept, and nothing beside inference.
            // The prompt, the records and the cached answer carry it.
            job.language = ebb_language::detect(&job.question).map(str::to_owned);
        }
        let span = tracing::info_span!("job", question_id = %job.id, attempt = deliveries);
        telemetry::adopt_parent(&span, message.headers.as_ref());
        self.handle_job(&message, job, deliveries)
            .instrument(span)
            .await
    }

    /// A message that is not a job (a bug, a forgery): retrying cannot
    /// help, so it fails at once under the id it carries (or one named
    /// after its stream sequence) and is kept as a dead letter.
    async fn fail_unreadable(
        &self,
        message: &jetstream::Message,
        deliveries: i64,
        err: &serde_json::Error,
    ) {
        let message_id = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|id| id.as_str());
        let sequence = message.info().map_or(0, |info| info.stream_sequence);
        let id = ebb_nats::messages::carried_id(&message.payload, message_id)
            .unwrap_or_else(|| format!("unreadable-{sequence}"));
        tracing::error!(subject = %message.subject, question_id = %id, cause = %err, "unreadable message");
        let reason = format!("not a question a worker can read: {err}");
        match self
            .lifecycle
            .fail_unreadable(&id, &message.payload, &reason, deliveries)
            .await
        {
            Ok(_) => {
                let _ = message.ack_with(AckKind::Term).await;
            }
            Err(cause) => {
                tracing::error!(question_id = %id, %cause, "cannot fail an unreadable message yet; it comes back");
                let delay = retry_delay(self.config.retry_backoff, deliveries);
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
            }
        }
    }

    async fn handle_job(&self, message: &jetstream::Message, job: Job, deliveries: i64) {
        let earlier = self
            .store
            .degradable("the redelivery check", self.store.record(&job.id))
            .await
            .flatten();
        if let Some(record) = earlier.as_ref().filter(|r| r.status.is_terminal()) {
            // The process that ended it may have died before its event or
            // webhook call: both go out again.
            tracing::info!("already ended; announcing it again and acknowledging the redelivery");
            self.lifecycle.reannounce(&job, record).await;
            ack(message).await;
            return;
        }
        let solo = earlier.is_some_and(|record| record.run_alone);
        let finished = match self.cached(&job).await {
            Some(hit) => {
                self.finish_from_cache(message, &job, deliveries, &hit)
                    .await
            }
            None => {
                self.generate_and_finish(message, &job, deliveries, solo)
                    .await
            }
        };
        match finished {
            Ok(_) => ack(message).await,
            Err(err) => self.retry_or_fail(message, &job, deliveries, &err).await,
        }
    }

    async fn finish_from_cache(
        &self,
        message: &jetstream::Message,
        job: &Job,
        deliveries: i64,
        hit: &CachedAnswer,
    ) -> Result<Ending, JobError> {
        let answer = Answer {
            text: &hit.answer,
            model: &hit.model,
            cached: true,
            timings: None,
            finish_reason: hit.finish_reason,
            cache_for: None,
        };
        Ok(self
            .finish_durably(message, job, deliveries, answer)
            .await?)
    }

    async fn generate_and_finish(
        &self,
        message: &jetstream::Message,
        job: &Job,
        deliveries: i64,
        solo: bool,
    ) -> Result<Ending, JobError> {
        let started_ms = ebb_nats::now_ms();
        let running = QuestionRecord {
            status: QuestionStatus::Running,
            attempts: deliveries,
            model: Some(self.identity.clone()),
            updated_at_ms: started_ms,
            ..QuestionRecord::of_job(job)
        };
        self.store
            .degradable("the running mark", self.store.put_record(&running))
            .await;
        let started = Instant::now();
        let generation = self.generate(message, job, deliveries, solo).await?;
        let queue_ms = started_ms.saturating_sub(job.enqueued_at_ms);
        let timings = Timings {
            queue_ms,
            inference_ms: started.elapsed().as_millis() as u64,
            prompt_tokens: generation.prompt_tokens as u32,
            completion_tokens: generation.completion_tokens as u32,
            first_token_ms: Some(queue_ms + generation.prefill.as_millis() as u64),
        };
        let answer = Answer {
            text: &generation.text,
            model: &self.identity,
            cached: false,
            timings: Some(timings),
            finish_reason: generation.finish_reason,
            // Only the model the gateway keyed the question for may answer
            // under its key.
            cache_for: (job.model == self.identity).then_some(self.config.cache_ttl),
        };
        let ending = self
            .finish_durably(message, job, deliveries, answer)
            .await?;
        if ending == Ending::Recorded {
            self.count_answered(&generation, timings);
            self.report_timings(timings).await;
        }
        Ok(ending)
    }

    /// Records the answer, however long Redis is away: nothing is wrong
    /// with the question, so no delivery is spent on the outage. The answer
    /// is kept, the message kept with progress acks, the record retried
    /// with backoff, and the worker pulls nothing new meanwhile. Fails only
    /// when Redis answers with something unreadable.
    async fn finish_durably(
        &self,
        message: &jetstream::Message,
        job: &Job,
        deliveries: i64,
        answer: Answer<'_>,
    ) -> Result<Ending, ebb_store::StoreError> {
        let mut stalled = None;
        let mut progress = self.progress_acks();
        let mut attempt = 0;
        let ending = loop {
            attempt += 1;
            let err = match self.lifecycle.finish(job, deliveries, answer).await {
                Ok(ending) => break ending,
                Err(err @ ebb_store::StoreError::Corrupt { .. }) => return Err(err),
                Err(err) => err,
            };
            let delay = backoff::exponential(STORE_RETRY_FIRST, attempt, STORE_RETRY_MAX);
            if stalled.is_none() {
                tracing::warn!(cause = %err, "cannot record the answer; keeping it until the status store is back");
                stalled = Some(self.gate.stall_on_store());
            }
            let wait = tokio::time::sleep(delay);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = &mut wait => break,
                    _ = progress.tick() => progress_ack(message).await,
                }
            }
        };
        if stalled.is_some() {
            tracing::info!("answer recorded after the status store came back");
        }
        Ok(ending)
    }

    fn count_answered(&self, generation: &Generation, timings: Timings) {
        self.heartbeat.send_modify(|beat| {
            beat.jobs_done += 1;
            beat.last_tokens_per_second = generation.decode_tokens_per_second();
            let job_ms = timings.inference_ms as f64;
            let response_ms = (timings.queue_ms + timings.inference_ms) as f64;
            beat.mean_job_ms = Some(moving_average(beat.mean_job_ms, job_ms));
            beat.mean_response_ms = Some(moving_average(beat.mean_response_ms, response_ms));
        });
        tracing::info!(
            prompt_tokens = generation.prompt_tokens,
            completion_tokens = generation.completion_tokens,
            inference_ms = timings.inference_ms,
            queue_ms = timings.queue_ms,
            "answered"
        );
    }

    /// Tells the scaler where this answer's time went (its latency
    /// histograms); a report lost in a NATS outage costs one sample only.
    async fn report_timings(&self, timings: Timings) {
        let body = Bytes::from(serde_json::to_vec(&timings).expect("timings serialize"));
        let client = self.topology.jetstream.client();
        if let Err(err) = client.publish(subjects::ANSWERED, body).await {
            tracing::debug!(cause = %err, "cannot report an answer's timings");
        }
    }

    /// A cached answer another worker stored since the gateway looked.
    async fn cached(&self, job: &Job) -> Option<CachedAnswer> {
        let key = job
            .cache_key
            .as_deref()
            .filter(|_| job.model == self.identity)?;
        self.store
            .degradable("the cache lookup", self.store.cached_answer(key))
            .await
            .flatten()
    }

    /// Reserves the question's KV memory (waiting, progress-acked, while
    /// the batch is full of memory), hands it to the engine, and streams its
    /// text to `ebb.answers.<id>` until the result comes.
    async fn generate(
        &self,
        message: &jetstream::Message,
        job: &Job,
        attempt: i64,
        solo: bool,
    ) -> Result<Generation, JobError> {
        if self.config.hooks.fails(&job.question) {
            return Err(JobError::Injected);
        }
        let prompts = self.prompts.clone();
        let for_prompt = job.clone();
        let max_context = self.max_context;
        // Tokenizing a long conversation takes milliseconds: off the async threads.
        let request =
            tokio::task::spawn_blocking(move || prompts.request(&for_prompt, max_context))
                .await
                .expect("tokenizing does not panic")?;
        let positions = positions_needed(request.prompt.ids.len(), request.max_new);
        self.budget.check(positions)?;
        let mut progress = self.progress_acks();
        progress.tick().await;
        let reservation = match self.budget.try_reserve(positions) {
            Some(reservation) => reservation,
            None => {
                let _waiting = self.gate.wait_for_memory();
                tracing::debug!(positions, "waiting for KV memory");
                let reserve = self.budget.reserve(positions);
                tokio::pin!(reserve);
                loop {
                    tokio::select! {
                        reservation = &mut reserve => break reservation,
                        _ = progress.tick() => progress_ack(message).await,
                    }
                }
            }
        };
        self.gate.admitted(positions);
        let mode = Admission {
            solo,
            panics: self.config.hooks.panics(&job.question),
        };
        if solo {
            tracing::info!(
                "running alone: an earlier attempt was in a step that crashed the model"
            );
        }
        let mut events = self.engine.submit(request, reservation, mode).await?;
        let client = self.topology.jetstream.client();
        let answers = subjects::answers(&job.id);
        let mut seq = 0;
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(SeqEvent::Text(text)) => {
                        // Stored before it is published: see AnswerEvent.
                        let piece = self.store.append_piece(&job.id, attempt, seq, &text);
                        self.store.degradable("late joiners' pieces", piece).await;
                        let event = AnswerEvent::Token { text, seq, attempt };
                        seq += 1;
                        let body = Bytes::from(serde_json::to_vec(&event).expect("events serialize"));
                        if let Err(err) = client.publish(answers.clone(), body).await {
                            tracing::debug!(cause = %err, "cannot stream a token");
                        }
                    }
                    Some(SeqEvent::Done(result)) => return result.map_err(JobError::from),
                    None => return Err(GenerateError::EngineStopped.into()),
                },
                _ = progress.tick() => progress_ack(message).await,
            }
        }
    }

    /// Progress acks every third of the ack wait keep a question in hand.
    fn progress_acks(&self) -> tokio::time::Interval {
        tokio::time::interval((self.delivery.ack_wait / 3).max(Duration::from_millis(100)))
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
            match self.lifecycle.fail(job, &reason, deliveries).await {
                Ok(_) => ack(message).await,
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
            run_alone: matches!(err, JobError::Generate(err) if err.needs_a_solo_retry()),
            ..QuestionRecord::of_job(job)
        };
        let put = self.store.put_record(&record);
        if let Some(Put::Ended(_)) = self.store.degradable("the retry's status", put).await {
            // Another delivery ended the question meanwhile: nothing to retry.
            return ack(message).await;
        }
        if let Err(err) = message.ack_with(AckKind::Nak(Some(delay))).await {
            tracing::warn!(cause = %err, "nak failed; the question returns after the ack wait");
        }
    }
}

/// `base * 2^(deliveries - 1)`, capped at one minute.
fn retry_delay(base: Duration, deliveries: i64) -> Duration {
    let deliveries = deliveries.max(0) as u64;
    ebb_runtime::backoff::exponential(base, deliveries, Duration::from_secs(60))
}

async fn ack(message: &jetstream::Message) {
    // A lost ack means a redelivery, which finds the finished record.
    if let Err(err) = message.ack().await {
        tracing::warn!(cause = %err, "ack failed; the question will be redelivered and skipped");
    }
}

async fn progress_ack(message: &jetstream::Message) {
    if let Err(err) = message.ack_with(AckKind::Progress).await {
        tracing::warn!(cause = %err, "progress ack failed");
    }
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
