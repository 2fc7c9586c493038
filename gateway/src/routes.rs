//! HTTP handlers. Each returns `Result<_, ApiError>`; [`ApiError`] alone
//! decides status codes and error bodies.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ebb_nats::{
    AnswerEvent, Job, Priority, QuestionRecord, QuestionStatus, Store, Timings, Topology, subjects,
};
use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::config::Config;
use crate::error::ApiError;
use crate::question::{Limits, NewQuestion};
use crate::queue;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Ids of answers served from the cache: this prefix, then the cache key.
pub const CACHED_ID_PREFIX: &str = "cached-";

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    model: String,
    model_identity: String,
    limits: Limits,
    topology: Topology,
    store: Store,
    /// Bounds the requests held open for an answer.
    waiting: Semaphore,
    /// Set while Redis is failing, so the degradation is logged once.
    store_degraded: AtomicBool,
}

impl AppState {
    pub fn new(config: Config, topology: Topology, store: Store) -> Self {
        AppState {
            model_identity: config.model.identity(),
            model: config.model.repo,
            limits: Limits {
                default_max_tokens: config.default_max_tokens,
                max_tokens_limit: config.max_tokens_limit,
            },
            topology,
            store,
            waiting: Semaphore::new(config.max_waiting),
            store_degraded: AtomicBool::new(false),
        }
    }

    /// Runs a Redis call whose failure only degrades the answer (no cache,
    /// no status record): logs the first failure and the recovery, not each.
    async fn degradable<T>(
        &self,
        call: impl Future<Output = Result<T, ebb_nats::StoreError>>,
    ) -> Option<T> {
        match call.await {
            Ok(value) => {
                if self.store_degraded.swap(false, Ordering::Relaxed) {
                    tracing::info!("redis is back: cache and status records restored");
                }
                Some(value)
            }
            Err(err @ ebb_nats::StoreError::Corrupt { .. }) => {
                // Redis answered: treat the unreadable entry as a miss.
                tracing::warn!(cause = %err, "ignoring an unreadable Redis entry");
                None
            }
            Err(err) => {
                if !self.store_degraded.swap(true, Ordering::Relaxed) {
                    tracing::error!(cause = %err, "redis unavailable: answering without cache or status records");
                }
                None
            }
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/questions", post(post_question))
        .route("/v1/questions/{id}", get(get_question))
        .route("/healthz", get(healthz))
        .fallback(|uri: Uri| async move { ApiError::RouteNotFound(uri.path().to_owned()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

#[derive(Debug, Serialize)]
struct Answered {
    id: String,
    status: QuestionStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    answer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    cached: bool,
    model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    timings: Option<Timings>,
}

#[derive(Debug, Serialize)]
struct Pending {
    id: String,
    status: QuestionStatus,
    status_url: String,
}

#[tracing::instrument(name = "question", skip_all, fields(question_id, cached, status))]
async fn post_question(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if !is_json(&headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge {
            limit: MAX_BODY_BYTES,
        },
        _ => ApiError::InvalidJson(rejection.body_text()),
    })?;
    let question = NewQuestion::from_json(&body, state.limits)?;
    let span = tracing::Span::current();
    tracing::debug!(question = %question.question, "question text");
    let cache_key = question.cache_key(&state.model_identity);

    if let Some(key) = &cache_key
        && let Some(Some(hit)) = state.degradable(state.store.cached_answer(key)).await
    {
        // A cached answer is one shared resource: its id names the cache
        // entry, so it resolves without writing a record on the hot path.
        let id = format!("{CACHED_ID_PREFIX}{key}");
        span.record("question_id", id.as_str());
        span.record("cached", true);
        return Ok(Json(Answered {
            id,
            status: QuestionStatus::Done,
            answer: Some(hit.answer),
            error: None,
            cached: true,
            model: hit.model,
            timings: None,
        })
        .into_response());
    }

    let id = uuid::Uuid::now_v7().to_string();
    span.record("question_id", id.as_str());
    let accepted_at = ebb_nats::now_ms();
    let job = Job {
        id: id.clone(),
        question: question.question,
        grade: question.grade,
        course: question.course,
        language: question.language,
        max_tokens: question.max_tokens,
        sampling: question.sampling,
        priority: Priority::Normal,
        model: state.model_identity.clone(),
        cache_key,
        enqueued_at_ms: accepted_at,
    };
    // Hold a waiting slot, and subscribe before publishing, so the answer
    // cannot arrive before we listen.
    let waiting = (!question.wait.is_zero())
        .then(|| state.waiting.try_acquire().ok())
        .flatten();
    let mut answers = match waiting {
        Some(_) => Some(
            state
                .topology
                .jetstream
                .client()
                .subscribe(subjects::answers(&id))
                .await
                .map_err(|err| ApiError::QueueUnavailable(err.to_string()))?,
        ),
        None => None,
    };
    let started = Instant::now();
    queue::publish(&state.topology.jetstream, &job).await?;
    tracing::info!(
        question_id = %id,
        question_chars = job.question.chars().count(),
        max_tokens = job.max_tokens,
        publish_ms = started.elapsed().as_millis() as u64,
        "question accepted"
    );
    state
        .degradable(
            state
                .store
                .insert_queued(&QuestionRecord::queued(&id, accepted_at)),
        )
        .await;

    if let Some(answers) = answers.as_mut()
        && let Some(event) = queue::wait_for_answer(answers, question.wait).await
    {
        span.record("status", "answered");
        return Ok(Json(answered_from_event(id, event, &state.model)).into_response());
    }
    // Timed out (or no slot to wait in): report what the record says now.
    // Not waiting at all, the question was queued a moment ago: skip the read.
    let record = if question.wait.is_zero() {
        None
    } else {
        state.degradable(state.store.record(&id)).await.flatten()
    };
    match record {
        Some(record) if record.status.is_terminal() => {
            Ok(Json(answered_from_record(record, &state.model)).into_response())
        }
        record => {
            let status = record.map_or(QuestionStatus::Queued, |record| record.status);
            let pending = Pending {
                status_url: format!("/v1/questions/{id}"),
                id,
                status,
            };
            Ok((StatusCode::ACCEPTED, Json(pending)).into_response())
        }
    }
}

async fn get_question(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<QuestionRecord>, ApiError> {
    let Ok(Path(id)) = id else {
        return Err(ApiError::QuestionNotFound("(not UTF-8)".into()));
    };
    if id.len() > 80 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(ApiError::QuestionNotFound(id));
    }
    let unavailable = |err: ebb_nats::StoreError| ApiError::StoreUnavailable(err.to_string());
    let record = match id.strip_prefix(CACHED_ID_PREFIX) {
        Some(key) => state
            .store
            .cached_answer(key)
            .await
            .map_err(unavailable)?
            .map(|hit| QuestionRecord {
                status: QuestionStatus::Done,
                answer: Some(hit.answer),
                model: Some(hit.model),
                cached: true,
                ..QuestionRecord::queued(&id, 0)
            }),
        None => state.store.record(&id).await.map_err(unavailable)?,
    };
    record.map(Json).ok_or(ApiError::QuestionNotFound(id))
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let nats_ok = state.topology.jetstream.client().connection_state()
        == async_nats::connection::State::Connected;
    let redis_ok = state.store.ping().await.is_ok();
    let status = if nats_ok && redis_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let part = |ok: bool| if ok { "ok" } else { "unavailable" };
    let body = json!({
        "status": if status == StatusCode::OK { "healthy" } else { "unhealthy" },
        "model": state.model,
        "nats": part(nats_ok),
        "redis": part(redis_ok),
    });
    (status, Json(body)).into_response()
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

fn answered_from_event(id: String, event: AnswerEvent, default_model: &str) -> Answered {
    match event {
        AnswerEvent::Done {
            answer,
            model,
            cached,
            timings,
        } => Answered {
            id,
            status: QuestionStatus::Done,
            answer: Some(answer),
            error: None,
            cached,
            model,
            timings,
        },
        AnswerEvent::Token { .. } => unreachable!("wait_for_answer returns final events only"),
        AnswerEvent::Failed { error } => Answered {
            id,
            status: QuestionStatus::Failed,
            answer: None,
            error: Some(error),
            cached: false,
            model: default_model.to_owned(),
            timings: None,
        },
    }
}

fn answered_from_record(record: QuestionRecord, default_model: &str) -> Answered {
    Answered {
        id: record.id,
        status: record.status,
        answer: record.answer,
        error: record.error,
        cached: record.cached,
        model: record.model.unwrap_or_else(|| default_model.to_owned()),
        timings: record.timings,
    }
}
