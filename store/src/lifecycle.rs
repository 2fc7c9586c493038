//! A question's terminal transitions, written once for everyone who ends a
//! question: the worker that answers it ([`Lifecycle::finish`]), the worker
//! whose last attempt fails and the reaper that fails it for a worker that
//! died ([`Lifecycle::fail`]).
//!
//! Order is what keeps "no question lost" true: the durable evidence first
//! (the dead letter; the cache and the status record), then the event that
//! wakes a waiting client, then the webhook call. A crash in between leaves
//! a redelivery, which finds the terminal record and only re-queues the
//! webhook ([`Lifecycle::redelivered`]: its message id makes that a no-op
//! when the first call was queued).

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use ebb_nats::{
    AnswerEvent, CachedAnswer, DeadLetter, FinishReason, Job, QuestionRecord, QuestionStatus,
    Timings, subjects, webhook,
};

use crate::store::{Store, StoreError};

/// A finished answer, wherever it came from.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    pub text: &'a str,
    pub model: &'a str,
    /// Served from the answer cache rather than generated.
    pub cached: bool,
    pub timings: Option<Timings>,
    pub finish_reason: FinishReason,
    /// Keep the answer in the cache under the job's key this long (`None`:
    /// do not cache it, e.g. it came from the cache or another model).
    pub cache_for: Option<Duration>,
}

/// Ends questions: writes their terminal record and tells whoever waits.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    jetstream: jetstream::Context,
    store: Store,
}

impl Lifecycle {
    pub fn new(jetstream: jetstream::Context, store: Store) -> Self {
        Lifecycle { jetstream, store }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Caches the answer (when asked), stores the `done` record, tells
    /// waiting clients and queues the webhook call.
    pub async fn finish(
        &self,
        job: &Job,
        deliveries: i64,
        answer: Answer<'_>,
    ) -> Result<(), StoreError> {
        if let (Some(key), Some(ttl)) = (&job.cache_key, answer.cache_for) {
            let entry = CachedAnswer {
                answer: answer.text.to_owned(),
                model: answer.model.to_owned(),
                finish_reason: answer.finish_reason,
                language: job.language.clone(),
            };
            self.store.put_cached_answer(key, &entry, ttl).await?;
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
        self.announce(job, &event, &record).await;
        Ok(())
    }

    /// Keeps a dead letter on `ebb.dead.<id>`, marks the question `failed`
    /// with `reason`, tells waiting clients and queues the webhook call.
    pub async fn fail(
        &self,
        job: &Job,
        reason: &str,
        deliveries: i64,
    ) -> Result<(), async_nats::Error> {
        let now = ebb_nats::now_ms();
        let letter = DeadLetter {
            job: job.clone(),
            reason: reason.to_owned(),
            deliveries,
            failed_at_ms: now,
        };
        let publish = jetstream::message::PublishMessage::build()
            .payload(serde_json::to_vec(&letter)?.into())
            .message_id(format!("dead-{}", job.id));
        self.jetstream
            .send_publish(subjects::dead_letter(&job.id), publish)
            .await?
            .await?;
        let record = QuestionRecord {
            status: QuestionStatus::Failed,
            error: Some(reason.to_owned()),
            model: Some(job.model.clone()),
            attempts: deliveries,
            updated_at_ms: now,
            ..QuestionRecord::of_job(job)
        };
        self.store.put_record(&record).await?;
        self.announce(
            job,
            &AnswerEvent::Failed {
                error: reason.to_owned(),
            },
            &record,
        )
        .await;
        tracing::warn!(question_id = %job.id, deliveries, reason, "question failed and dead-lettered");
        Ok(())
    }

    /// A delivery of a question that already ended: the process that ended
    /// it may have died between its record and its webhook call.
    pub async fn redelivered(&self, job: &Job, record: &QuestionRecord) {
        if let Some(url) = &job.callback_url {
            self.queue_webhook(&job.id, url, record).await;
        }
    }

    /// The event, then the webhook call: a full webhook queue must not cost
    /// a waiting client its answer. Neither is durable evidence (the record
    /// is), so a failure is logged and the question still counts as ended.
    async fn announce(&self, job: &Job, event: &AnswerEvent, record: &QuestionRecord) {
        let body = Bytes::from(serde_json::to_vec(event).expect("events serialize"));
        if let Err(err) = self
            .jetstream
            .client()
            .publish(subjects::answers(&job.id), body)
            .await
        {
            // A waiting client finds the record when its wait ends.
            tracing::warn!(question_id = %job.id, cause = %err, "cannot publish the final event");
        }
        if let Some(url) = &job.callback_url {
            self.queue_webhook(&job.id, url, record).await;
        }
    }

    async fn queue_webhook(&self, call_id: &str, url: &str, record: &QuestionRecord) {
        if let Err(err) = webhook::enqueue(&self.jetstream, call_id, url, record).await {
            tracing::error!(question_id = %record.id, cause = %err, "cannot queue the webhook call");
        }
    }
}
