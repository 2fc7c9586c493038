//! `POST /v1/questions` (ebb's own shape) and `GET /v1/questions/{id}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ebb_nats::{Priority, QuestionRecord, QuestionStatus};
use serde::Serialize;

use super::admission::{Admission, Answered, CACHED_ID_PREFIX, Hold, admit};
use super::{AppState, body_bytes, require_json};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::idempotency::IdempotencyKey;
use crate::question::NewQuestion;

/// Accepted, not answered yet: poll `status_url` or follow its `/events`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Pending {
    pub id: String,
    pub status: QuestionStatus,
    pub status_url: String,
    pub events_url: String,
    pub priority: Priority,
    /// As the client gave it (a worker detects it when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
}

/// Ask a question; waits up to `wait_seconds` for the answer.
#[utoipa::path(
    post,
    path = "/v1/questions",
    tag = "questions",
    request_body = crate::request::QuestionRequest,
    responses(
        (status = 200, description = "Answered (from the cache or within `wait_seconds`)", body = Answered),
        (status = 202, description = "Queued; not answered within `wait_seconds`", body = Pending),
    )
)]
#[tracing::instrument(name = "question", skip_all, fields(question_id, cached, status))]
pub(crate) async fn post_question(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let body = body_bytes(body)?;
    let mut question = NewQuestion::from_json(&body, state.limits)?;
    let caller = caller.as_ref().map(|Extension(caller)| caller);
    question.owner = caller.and_then(Caller::owner).map(str::to_owned);
    let idempotency = IdempotencyKey::from_request(&headers, caller, "questions", &body)?;
    let wait = question.wait;
    let hold = if wait.is_zero() {
        Hold::No
    } else {
        Hold::IfFree
    };
    let span = tracing::Span::current();
    let queued = match admit(&state, question, hold, idempotency.as_ref()).await? {
        Admission::Cached { id, hit, language } => {
            span.record("question_id", id.as_str());
            span.record("cached", true);
            return Ok(Answered::cached_response(id, &hit, language));
        }
        Admission::Queued(queued) => queued,
    };
    let id = queued.id.clone();
    if let Some(mut waiter) = queued.waiter
        && let Some(event) = waiter.final_event(&state.store, &id, wait).await
        && let Some(answered) =
            Answered::from_event(id.clone(), event, &state.model, queued.language.clone())
    {
        span.record("status", "answered");
        return Ok(Json(answered).into_response());
    }
    // Timed out (or no slot to wait in): report what the record says now.
    // Not waiting at all, the question was queued a moment ago: skip the read.
    let record = if wait.is_zero() {
        None
    } else {
        state
            .store
            .degradable("the status record", state.store.record(&id))
            .await
            .flatten()
    };
    match record {
        Some(record) if record.status.is_terminal() => {
            Ok(Json(Answered::from_record(record, &state.model)).into_response())
        }
        record => {
            let pending = Pending {
                status: record.map_or(QuestionStatus::Queued, |record| record.status),
                status_url: format!("/v1/questions/{id}"),
                events_url: format!("/v1/questions/{id}/events"),
                id,
                priority: queued.priority,
                language: queued.language,
            };
            Ok((StatusCode::ACCEPTED, Json(pending)).into_response())
        }
    }
}

/// A question's status record.
#[utoipa::path(
    get,
    path = "/v1/questions/{id}",
    tag = "questions",
    params(("id" = String, Path, description = "Question id")),
    responses((status = 200, description = "The status record", body = QuestionRecord))
)]
pub(crate) async fn get_question(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<QuestionRecord>, ApiError> {
    let id = question_id(id)?;
    let caller = caller.map(|Extension(caller)| caller);
    let record = record_of(&state, &id, caller.as_ref()).await?;
    Ok(Json(record.for_clients()))
}

/// The status record of `id` if `caller` may read it (another key's
/// question is `404`, as if it did not exist); for an answer served from
/// the cache (`cached-<key>`), the cache entry as a `done` record.
pub async fn record_of(
    state: &AppState,
    id: &str,
    caller: Option<&Caller>,
) -> Result<QuestionRecord, ApiError> {
    let unavailable = |err: ebb_store::StoreError| ApiError::StoreUnavailable(err.to_string());
    let record = match id.strip_prefix(CACHED_ID_PREFIX) {
        Some(key) => super::admission::cached_answer(state, key)
            .await
            .map_err(unavailable)?
            .map(|hit| QuestionRecord {
                status: QuestionStatus::Done,
                answer: Some(hit.answer),
                model: Some(hit.model),
                cached: true,
                finish_reason: Some(hit.finish_reason),
                language: hit.language,
                ..QuestionRecord::queued(id, 0)
            }),
        None => state.store.record(id).await.map_err(unavailable)?,
    };
    let anyone = Caller::Anonymous;
    let caller = caller.unwrap_or(&anyone);
    record
        .filter(|record| caller.may_read(record.owner.as_deref()))
        .ok_or_else(|| ApiError::QuestionNotFound(id.to_owned()))
}

/// The path's id, if it can name a question at all.
pub fn question_id(id: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Ok(Path(id)) = id else {
        return Err(ApiError::QuestionNotFound("(not UTF-8)".into()));
    };
    if id.len() > 80 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(ApiError::QuestionNotFound(id));
    }
    Ok(id)
}
