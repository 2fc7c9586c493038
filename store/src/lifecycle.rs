//! A question's terminal transitions, written once for everyone who ends a
//! question: the worker that answers it ([`Lifecycle::finish`]), the worker
//! whose last attempt fails and the reaper that fails it for a worker that
//! died ([`Lifecycle::fail`]).
//!
//! Order is what keeps "no question lost" true: the durable evidence first
//! (the dead letter; the cache and the status record), then the event that
//! wakes a waiting client, then the webhook call. A crash in between leaves
//! a redelivery (or, after the last one, a max-deliveries advisory), which
//! finds the terminal record and announces it again
//! ([`Lifecycle::reannounce`]: the webhook's message id makes that a no-op
//! when the first call was queued).
//!
//! The first terminal record wins ([`Store::put_record`]): a second ending
//! (two deliveries running at once, a worker that wakes after the reaper
//! failed its question) announces the record that stands, never its own,
//! so event, record and webhook always carry the same final answer.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use ebb_nats::{
    CachedAnswer, DeadLetter, FinishReason, Job, QuestionRecord, QuestionStatus, Timings, subjects,
    webhook,
};

use crate::store::{Put, Store, StoreError};

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

/// What ending a question came to; either way the message is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// This ending is the question's: recorded and announced.
    Recorded,
    /// It had ended already: that ending was announced again.
    AlreadyEnded,
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
    ) -> Result<Ending, StoreError> {
        let record = QuestionRecord {
            status: QuestionStatus::Done,
            answer: Some(answer.text.to_owned()),
            model: Some(answer.model.to_owned()),
            cached: answer.cached,
            timings: answer.timings,
            finish_reason: Some(answer.finish_reason),
            attempts: deliveries,
            cache_ttl_s: job
                .cache_key
                .as_ref()
                .and(answer.cache_for)
                .map(|ttl| ttl.as_secs()),
            updated_at_ms: ebb_nats::now_ms(),
            ..QuestionRecord::of_job(job)
        };
        let ending = match self.store.put_record(&record).await? {
            Put::Written => {
                // Only the answer that stands is cached; a crash before
                // this costs a cache miss, nothing more.
                if let (Some(key), Some(ttl)) = (&job.cache_key, answer.cache_for) {
                    let entry = CachedAnswer {
                        answer: answer.text.to_owned(),
                        model: answer.model.to_owned(),
                        finish_reason: answer.finish_reason,
                        language: job.language.clone(),
                    };
                    self.store.put_cached_answer(key, &entry, ttl).await?;
                }
                self.announce(&job.id, job.callback_url.as_deref(), &record)
                    .await;
                Ending::Recorded
            }
            Put::Ended(standing) => {
                self.announce(&job.id, job.callback_url.as_deref(), &standing)
                    .await;
                Ending::AlreadyEnded
            }
        };
        Ok(ending)
    }

    /// Keeps a dead letter on `ebb.dead.<id>`, marks the question `failed`
    /// with `reason`, tells waiting clients and queues the webhook call.
    pub async fn fail(
        &self,
        job: &Job,
        reason: &str,
        deliveries: i64,
    ) -> Result<Ending, async_nats::Error> {
        let now = ebb_nats::now_ms();
        let record = QuestionRecord {
            status: QuestionStatus::Failed,
            error: Some(reason.to_owned()),
            model: Some(job.model.clone()),
            attempts: deliveries,
            updated_at_ms: now,
            ..QuestionRecord::of_job(job)
        };
        let letter = DeadLetter {
            id: job.id.clone(),
            job: Some(job.clone()),
            payload: None,
            reason: reason.to_owned(),
            deliveries,
            failed_at_ms: now,
        };
        self.fail_for_good(letter, record, job.callback_url.as_deref())
            .await
    }

    /// A message on the question subjects that is not a readable job:
    /// failed under the id it carries (see [`ebb_nats::messages::carried_id`]),
    /// so a client waiting on that id hears, and kept as a dead letter.
    pub async fn fail_unreadable(
        &self,
        id: &str,
        payload: &[u8],
        reason: &str,
        deliveries: i64,
    ) -> Result<Ending, async_nats::Error> {
        let now = ebb_nats::now_ms();
        let record = QuestionRecord {
            status: QuestionStatus::Failed,
            error: Some(reason.to_owned()),
            attempts: deliveries,
            ..QuestionRecord::queued(id, now)
        };
        let letter = DeadLetter {
            id: id.to_owned(),
            job: None,
            payload: Some(String::from_utf8_lossy(payload).into_owned()),
            reason: reason.to_owned(),
            deliveries,
            failed_at_ms: now,
        };
        self.fail_for_good(letter, record, None).await
    }

    async fn fail_for_good(
        &self,
        letter: DeadLetter,
        record: QuestionRecord,
        callback_url: Option<&str>,
    ) -> Result<Ending, async_nats::Error> {
        let publish = jetstream::message::PublishMessage::build()
            .payload(serde_json::to_vec(&letter)?.into())
            .message_id(format!("dead-{}", letter.id));
        self.jetstream
            .send_publish(subjects::dead_letter(&letter.id), publish)
            .await?
            .await?;
        let ending = match self.store.put_record(&record).await? {
            Put::Written => {
                self.announce(&letter.id, callback_url, &record).await;
                tracing::warn!(question_id = %letter.id, deliveries = letter.deliveries, reason = %letter.reason, "question failed and dead-lettered");
                Ending::Recorded
            }
            Put::Ended(standing) => {
                self.announce(&letter.id, callback_url, &standing).await;
                Ending::AlreadyEnded
            }
        };
        Ok(ending)
    }

    /// A question that already ended, met again (a redelivery, a
    /// max-deliveries advisory): whoever ended it may have died between its
    /// record and its event or webhook call, so both go out again.
    pub async fn reannounce(&self, job: &Job, record: &QuestionRecord) {
        self.announce(&job.id, job.callback_url.as_deref(), record)
            .await;
    }

    /// The final event of `record`, then the webhook call: a full webhook
    /// queue must not cost a waiting client its answer. Neither is durable
    /// evidence (the record is), so a failure is logged and the question
    /// still counts as ended.
    async fn announce(&self, id: &str, callback_url: Option<&str>, record: &QuestionRecord) {
        let Some(event) = record.final_event() else {
            return;
        };
        let body = Bytes::from(serde_json::to_vec(&event).expect("events serialize"));
        if let Err(err) = self
            .jetstream
            .client()
            .publish(subjects::answers(id), body)
            .await
        {
            // A waiting client finds the record when its wait ends.
            tracing::warn!(question_id = %id, cause = %err, "cannot publish the final event");
        }
        if let Some(url) = callback_url {
            self.queue_webhook(id, url, record).await;
        }
    }

    async fn queue_webhook(&self, call_id: &str, url: &str, record: &QuestionRecord) {
        if let Err(err) = webhook::enqueue(&self.jetstream, call_id, url, record).await {
            tracing::error!(question_id = %record.id, cause = %err, "cannot queue the webhook call");
        }
    }
}
