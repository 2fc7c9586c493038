//! What every question goes through, whichever route it came by: webhook
//! target, cache, shedding, priority, then the queue. The language, when
//! not given, is the worker's to detect (see [`ebb_language`]).

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use ebb_nats::{CachedAnswer, Job, Priority, QuestionRecord, QuestionStatus, Timings};
use ebb_store::Lookup as RedisLookup;
use serde::Serialize;

use super::AppState;
use super::feed::{Slot, Waiter};
use crate::error::ApiError;
use crate::hot_cache::HotAnswer;
use crate::idempotency::{Claimed, IdempotencyKey};
use crate::metrics::{LanguageSource, Lookup, Outcome, Rejection};
use crate::overload::Reservation;
use crate::question::NewQuestion;
use crate::{queue, webhook};
use ebb_language::metric_label;

/// Ids of answers served from the cache: this prefix, then the cache key.
pub const CACHED_ID_PREFIX: &str = "cached-";

/// Whether the caller will hold the request open for the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    No,
    /// If a waiting slot is free; otherwise answer with the status URL.
    IfFree,
    /// Must: refuse with 503 when every slot is taken.
    Required,
}

#[derive(Debug)]
pub enum Admission {
    Cached {
        id: String,
        hit: Arc<HotAnswer>,
        language: Option<String>,
    },
    Queued(Queued),
}

#[derive(Debug)]
pub struct Queued {
    pub id: String,
    pub language: Option<String>,
    pub priority: Priority,
    pub accepted_at_ms: u64,
    /// Subscribed before publishing, so no event can be missed; `None`
    /// when the caller does not hold the request open.
    pub waiter: Option<Waiter>,
}

/// Admits a question in named stages: check the webhook target, answer
/// from memory, answer from Redis or write the `queued` record and take a
/// shedding place (one round trip), then decide under the shedding bound,
/// take a waiting slot and publish.
pub async fn admit(
    state: &AppState,
    question: NewQuestion,
    hold: Hold,
    idempotency: Option<&IdempotencyKey>,
) -> Result<Admission, ApiError> {
    if let Some(url) = &question.callback_url {
        check_callback(state, url)?;
        if let Some(owner) = &question.owner {
            check_queued_webhooks(state, owner).await?;
        }
    }
    if let Some(key) = idempotency
        && let Some(claimed) = key.existing(&state.store).await?
    {
        return asked_before(state, claimed, hold, question.owner.as_deref()).await;
    }
    tracing::debug!(question = %question.question, "question text");
    let cache_key = question.cache_key(&state.model_identity);
    if let Some(key) = &cache_key
        && let Some(hit) = state.hot_cache.get(key)
    {
        state.metrics.cache_lookup(Lookup::Memory);
        let asker = Asker::of(&question);
        return Ok(from_cache(state, key, hit, asker).await);
    }
    let asker = Asker::of(&question);
    let source = match question.language {
        Some(_) => LanguageSource::Given,
        None => LanguageSource::AtWorker,
    };
    let mut job = new_job(state, question, cache_key);
    if let Some(key) = idempotency {
        // The key names the question: concurrent retries publish one id,
        // which JetStream's duplicate window keeps to one message.
        job.id = key.question_id();
    }
    // The Redis cache, the question's `queued` record and its shedding
    // place in one round trip: the record is there before the client can
    // have the id. `Some(wrote)`: recorded, by this request or an earlier
    // retry.
    let reservation = state.overload.begin();
    let (recorded, places_ahead) = match lookup_or_record(state, &job, &reservation).await {
        Some(RedisLookup::Hit { answer, ttl }) => {
            let key = job
                .cache_key
                .as_deref()
                .expect("only a keyed question hits");
            let hit = state.hot_cache.insert(key, answer, ttl);
            return Ok(from_cache(state, key, hit, asker).await);
        }
        Some(RedisLookup::Queued {
            wrote,
            places_ahead,
        }) => (Some(wrote), places_ahead),
        None => (None, None),
    };
    let reservation = reservation.decide(places_ahead);
    let queued = queue(state, &job, reservation, recorded.is_some(), hold).await;
    if queued.is_err() && recorded == Some(true) {
        // Never accepted (shed, or the queue is down): no record this
        // request wrote may say it was. Off the refusal's path.
        let store = state.store.clone();
        let id = job.id.clone();
        tokio::spawn(async move {
            let forget = store.forget_record(&id);
            store
                .degradable("an unaccepted question's record", forget)
                .await;
        });
    }
    let waiter = queued?;
    let language = metric_label(job.language.as_deref());
    state.metrics.question(language, source);
    if let Some(key) = idempotency {
        // Remembered only once published: a key never names a question
        // that was not asked.
        let claim = Claimed {
            id: job.id.clone(),
            request_sha256: key.request_sha256().to_owned(),
            priority: job.priority,
            language: job.language.clone(),
            accepted_at_ms: job.enqueued_at_ms,
        };
        key.remember(&state.store, &claim).await?;
    }
    Ok(Admission::Queued(Queued {
        id: job.id,
        language: job.language,
        priority: job.priority,
        accepted_at_ms: job.enqueued_at_ms,
        waiter,
    }))
}

/// Under the shedding bound (decided after the cache lookup: hits are
/// answered however long the queue), takes the waiting slot `hold` asks
/// for, and publishes.
async fn queue(
    state: &AppState,
    job: &Job,
    reservation: Result<Reservation<'_>, ApiError>,
    recorded: bool,
    hold: Hold,
) -> Result<Option<Waiter>, ApiError> {
    let reservation = reservation.inspect_err(|_| {
        state.metrics.rejected(Rejection::Overloaded);
    })?;
    let slot = hold_slot(state, hold, job.owner.as_deref())?;
    tracing::Span::current().record("question_id", job.id.as_str());
    let waiter = match slot {
        Some(slot) => Some(
            Waiter::subscribe(state, &job.id, slot)
                .await?
                .filling(state, job),
        ),
        None => None,
    };
    enqueue(state, job, recorded).await?;
    reservation.keep();
    Ok(waiter)
}

/// One round trip: the answer cached under the job's key, or else the
/// job's `queued` record written and its shedding place taken; `None`
/// while Redis cannot be reached (the record is then written after the
/// publish, when it can be, and the gateway counts places alone).
async fn lookup_or_record(
    state: &AppState,
    job: &Job,
    reservation: &Reservation<'_>,
) -> Option<RedisLookup> {
    let record = QuestionRecord::of_job(job);
    let key = job.cache_key.as_deref();
    let lookup = state
        .store
        .cached_or_queue(key, &record, reservation.place());
    let found = state.store.degradable("the cache lookup", lookup).await;
    if key.is_some() {
        state.metrics.cache_lookup(match &found {
            Some(RedisLookup::Hit { .. }) => Lookup::Redis,
            _ => Lookup::Miss,
        });
    }
    found
}

/// A retried request (the same `Idempotency-Key`): the question it asked
/// before, waited for like a new one, never asked again.
async fn asked_before(
    state: &AppState,
    claimed: Claimed,
    hold: Hold,
    owner: Option<&str>,
) -> Result<Admission, ApiError> {
    tracing::Span::current().record("question_id", claimed.id.as_str());
    state.metrics.outcome(Outcome::AskedBefore);
    let slot = hold_slot(state, hold, owner)?;
    let waiter = match slot {
        // It may have ended already: no event will come, the record says.
        Some(slot) => Some(
            Waiter::subscribe(state, &claimed.id, slot)
                .await?
                .check_record_first(),
        ),
        None => None,
    };
    Ok(Admission::Queued(Queued {
        id: claimed.id,
        language: claimed.language,
        priority: claimed.priority,
        accepted_at_ms: claimed.accepted_at_ms,
        waiter,
    }))
}

/// The waiting slot `hold` asks for, if any.
fn hold_slot(state: &AppState, hold: Hold, owner: Option<&str>) -> Result<Option<Slot>, ApiError> {
    Ok(match hold {
        Hold::No => None,
        Hold::IfFree => Waiter::slot(state, owner).ok(),
        Hold::Required => Some(Waiter::slot(state, owner)?),
    })
}

/// The answer cached under `key`: from this gateway's memory, else from
/// Redis (then kept in memory).
pub async fn cached_answer(
    state: &AppState,
    key: &str,
) -> Result<Option<CachedAnswer>, ebb_store::StoreError> {
    if let Some(hit) = state.hot_cache.get(key) {
        return Ok(Some(hit.answer.clone()));
    }
    let found = state.store.cached_answer_with_ttl(key).await?;
    Ok(found.map(|(answer, ttl)| {
        state.hot_cache.insert(key, answer.clone(), ttl);
        answer
    }))
}

fn new_job(state: &AppState, question: NewQuestion, cache_key: Option<String>) -> Job {
    let priority = state.priority.classify(
        question.grade,
        question.course.as_deref(),
        chrono::Utc::now(),
    );
    Job {
        id: uuid::Uuid::now_v7().to_string(),
        question: question.question,
        history: question.history,
        grade: question.grade,
        course: question.course,
        language: question.language,
        max_tokens: question.max_tokens,
        sampling: question.sampling,
        priority,
        model: state.model_identity.clone(),
        cache_key,
        enqueued_at_ms: ebb_nats::now_ms(),
        callback_url: question.callback_url.map(String::from),
        owner: question.owner,
    }
}

/// Publishes the job (stored by JetStream when this returns); writes its
/// first record after the publish unless it was written before (`recorded`):
/// a worker may already have written a later one.
async fn enqueue(state: &AppState, job: &Job, recorded: bool) -> Result<(), ApiError> {
    let started = Instant::now();
    queue::publish(&state.topology.jetstream, job).await?;
    state.metrics.outcome(Outcome::Queued);
    tracing::info!(
        question_id = %job.id,
        priority = %job.priority,
        language = job.language.as_deref().map(|l| metric_label(Some(l))),
        question_chars = job.question.chars().count(),
        history_messages = job.history.len(),
        max_tokens = job.max_tokens,
        publish_ms = started.elapsed().as_millis() as u64,
        "question accepted"
    );
    if !recorded {
        let record = QuestionRecord::of_job(job);
        let insert = state.store.insert_queued(&record);
        state.store.degradable("the queued record", insert).await;
    }
    Ok(())
}

/// Who asked a question answered from the cache: what the hit's record and
/// callback need.
#[derive(Debug)]
struct Asker {
    /// As given in the request (a hit reports the one it was cached with
    /// otherwise).
    language: Option<String>,
    callback_url: Option<reqwest::Url>,
    owner: Option<String>,
}

impl Asker {
    fn of(question: &NewQuestion) -> Asker {
        Asker {
            language: question.language.clone(),
            callback_url: question.callback_url.clone(),
            owner: question.owner.clone(),
        }
    }
}

/// A cache hit: counted, called back when asked, answered at once.
async fn from_cache(state: &AppState, key: &str, hit: Arc<HotAnswer>, asker: Asker) -> Admission {
    let id = format!("{CACHED_ID_PREFIX}{key}");
    let (language, source) = match (asker.language, &hit.answer.language) {
        (Some(given), _) => (Some(given), LanguageSource::Given),
        (None, Some(detected)) => (Some(detected.clone()), LanguageSource::Detected),
        (None, None) => (None, LanguageSource::Unknown),
    };
    let metrics = &state.metrics;
    metrics.question(metric_label(language.as_deref()), source);
    metrics.outcome(Outcome::Cached);
    if let Some(url) = &asker.callback_url {
        // Answered already, but the caller asked to be called: the same call
        // as for a worker's answer, under a call id of its own.
        let record = QuestionRecord {
            status: QuestionStatus::Done,
            answer: Some(hit.answer.answer.clone()),
            model: Some(hit.answer.model.clone()),
            cached: true,
            finish_reason: Some(hit.answer.finish_reason),
            language: language.clone(),
            // Counted against the key's queued calls.
            owner: asker.owner,
            ..QuestionRecord::queued(&id, ebb_nats::now_ms())
        };
        let call_id = uuid::Uuid::now_v7().to_string();
        let jetstream = &state.topology.jetstream;
        if let Err(err) =
            ebb_nats::webhook::enqueue(jetstream, &call_id, url.as_str(), &record).await
        {
            tracing::error!(cause = %err, "cannot queue the webhook call of a cache hit");
        }
    }
    Admission::Cached { id, hit, language }
}

/// Webhooks need a signing secret, and a literal address must be public
/// (names are checked again at delivery, after resolution).
fn check_callback(state: &AppState, url: &reqwest::Url) -> Result<(), ApiError> {
    if state.webhooks.webhook_secret.is_none() {
        return Err(ApiError::invalid(
            "callback_url",
            "webhooks are off: the gateway has no --webhook-secret",
        ));
    }
    let literal = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
        _ => None,
    };
    let named_local = url
        .host_str()
        .is_some_and(|host| host.eq_ignore_ascii_case("localhost") || host.ends_with(".localhost"));
    if named_local && state.webhooks.webhook_allow.is_empty() {
        return Err(ApiError::invalid(
            "callback_url",
            "must not point to localhost",
        ));
    }
    if let Some(ip) = literal {
        webhook::check_address(ip, &state.webhooks.webhook_allow)
            .map_err(|err| ApiError::invalid("callback_url", err.to_string()))?;
    }
    Ok(())
}

/// Refuses a question with a callback while its key has
/// `--max-queued-webhooks-per-key` calls waiting for delivery.
async fn check_queued_webhooks(state: &AppState, owner: &str) -> Result<(), ApiError> {
    let limit = state.webhooks.max_queued_webhooks_per_key;
    let queued = ebb_nats::webhook::queued_for(&state.topology.webhooks, owner)
        .await
        .map_err(|err| ApiError::QueueUnavailable(err.to_string()))?;
    if queued >= limit {
        state.metrics.rejected(Rejection::TooManyWebhooksForKey);
        return Err(ApiError::TooManyWebhooksForKey { limit });
    }
    Ok(())
}

/// A finished (or failed) question as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Answered {
    pub id: String,
    pub status: QuestionStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub cached: bool,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<ebb_nats::FinishReason>,
    /// Given by the client, or detected by the worker that answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
}

impl Answered {
    pub fn from_record(record: QuestionRecord, default_model: &str) -> Answered {
        Answered {
            id: record.id,
            status: record.status,
            answer: record.answer,
            error: record.error,
            cached: record.cached,
            model: record.model.unwrap_or_else(|| default_model.to_owned()),
            timings: record.timings,
            finish_reason: record.finish_reason,
            language: record.language,
        }
    }

    pub fn from_cache(id: String, hit: CachedAnswer, language: Option<String>) -> Answered {
        Answered {
            id,
            status: QuestionStatus::Done,
            answer: Some(hit.answer),
            error: None,
            cached: true,
            model: hit.model,
            timings: None,
            finish_reason: Some(hit.finish_reason),
            language,
        }
    }

    /// A cache hit's response in ebb's shape. Asked in the language it
    /// was cached with (the common case), the entry's body rendered on its
    /// first hit: no serializing and no copy of the answer per hit.
    pub fn cached_response(id: String, hit: &HotAnswer, language: Option<String>) -> Response {
        if language != hit.answer.language {
            return Json(Answered::from_cache(id, hit.answer.clone(), language)).into_response();
        }
        let body = hit.rendered_once(|answer| {
            let answered = Answered::from_cache(id, answer.clone(), language);
            serde_json::to_vec(&answered)
                .expect("answers serialize")
                .into()
        });
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    }

    /// From a final answer event (`None` for a token event).
    pub fn from_event(
        id: String,
        event: ebb_nats::AnswerEvent,
        default_model: &str,
        language: Option<String>,
    ) -> Option<Answered> {
        use ebb_nats::AnswerEvent;
        let mut answered = Answered {
            id,
            status: QuestionStatus::Failed,
            answer: None,
            error: None,
            cached: false,
            model: default_model.to_owned(),
            timings: None,
            finish_reason: None,
            language,
        };
        match event {
            AnswerEvent::Token { .. } => return None,
            AnswerEvent::Done {
                answer,
                model,
                cached,
                timings,
                finish_reason,
                language,
                ..
            } => {
                answered.status = QuestionStatus::Done;
                answered.answer = Some(answer);
                answered.model = model;
                answered.cached = cached;
                answered.timings = timings;
                answered.finish_reason = Some(finish_reason);
                // The worker's, which it detected when none was given.
                answered.language = language.or(answered.language);
            }
            AnswerEvent::Failed { error } => answered.error = Some(error),
        }
        Some(answered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ebb_nats::FinishReason;

    async fn json_of(response: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("a body");
        serde_json::from_slice(&bytes).expect("JSON")
    }

    #[tokio::test]
    async fn a_hit_is_rendered_once_and_reports_the_language_asked() {
        let hit = HotAnswer::new(CachedAnswer {
            answer: "Light, water and air \"into\" sugar.".into(),
            model: "m@main".into(),
            finish_reason: FinishReason::Stop,
            language: Some("en".into()),
        });
        let id = || "cached-k".to_owned();
        let expected = Answered::from_cache(id(), hit.answer.clone(), Some("en".into()));
        let first = Answered::cached_response(id(), &hit, Some("en".into()));
        assert_eq!(
            first.headers()[header::CONTENT_TYPE],
            "application/json",
            "served as JSON"
        );
        assert_eq!(
            json_of(first).await,
            serde_json::to_value(&expected).unwrap()
        );
        let kept = hit.rendered_once(|_| panic!("rendered a second time"));
        assert_eq!(kept, serde_json::to_vec(&expected).unwrap());

        let other = json_of(Answered::cached_response(id(), &hit, Some("fr".into()))).await;
        assert_eq!(
            (&other["language"], &other["answer"]),
            (&"fr".into(), &hit.answer.answer.clone().into())
        );
        let again = json_of(Answered::cached_response(id(), &hit, Some("en".into()))).await;
        assert_eq!(again["language"], "en", "the rendered body is the entry's");
    }
}
