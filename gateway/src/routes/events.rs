//! `GET /v1/questions/{id}/events`: the answer's pieces as Server-Sent
//! Events while they are generated, for clients that connect at any time.
//!
//! The events are an [`AnswerFeed`] mapped to SSE: the pieces stored so far,
//! then live ones, then the final record; a question that already finished
//! gets its pieces and the final event at once. Each piece carries its
//! position as the SSE `id` (`<attempt>.<seq>`), so a reconnecting client
//! sends `Last-Event-ID` and gets only the rest.
//!
//! Events: `token` (`{"seq","attempt","text"}`), `reset` (the answer is being
//! retried after a failure, or the client resumed with text of an attempt
//! that was superseded: drop the text so far), then one `done` or `failed`
//! (the full record, whatever was missed).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde_json::json;

use super::AppState;
use super::admission::{Answered, CACHED_ID_PREFIX};
use super::feed::{Cursor, Relayed, Waiter};
use super::questions::{question_id, record_of};
use crate::auth::Caller;
use crate::error::ApiError;

/// An SSE response over `events`, with keep-alive comments while quiet.
pub fn sse(
    events: impl Stream<Item = Event> + Send + 'static,
    keep_alive: Duration,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    Sse::new(events.map(Ok)).keep_alive(KeepAlive::new().interval(keep_alive).text("keep-alive"))
}

/// Follow a question's answer as Server-Sent Events (late join and
/// `Last-Event-ID` resume).
#[utoipa::path(
    get,
    path = "/v1/questions/{id}/events",
    tag = "questions",
    params(
        ("id" = String, Path, description = "Question id"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this piece"),
    ),
    responses((status = 200, description = "`token`, `reset`, then `done` or `failed` events", content_type = "text/event-stream", body = crate::openapi::ServerSentEvent))
)]
pub(crate) async fn question_events(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = question_id(id)?;
    let caller = caller.map(|Extension(caller)| caller);
    let cursor = Cursor::resume(
        headers
            .get("last-event-id")
            .and_then(|value| value.to_str().ok()),
    );
    if id.starts_with(CACHED_ID_PREFIX) {
        // Answered whole, at once: nothing to follow, no slot to hold.
        let record = record_of(&state, &id, caller.as_ref()).await?;
        let answered = Answered::from_record(record, &state.model);
        let events = futures::stream::once(std::future::ready(final_event(&answered)));
        return Ok(sse(events, state.sse_keep_alive).into_response());
    }
    // Subscribed before the record is read: an answer finished in between
    // is then in the record or in the subscription, never in neither.
    let owner = caller.as_ref().and_then(Caller::owner);
    let waiter = Waiter::subscribe(&state, &id, Waiter::slot(&state, owner)?).await?;
    record_of(&state, &id, caller.as_ref()).await?;
    let feed = waiter.feed(state.store.clone(), state.model.clone(), id, cursor);
    Ok(sse(feed.map(|item| event_of(&item)), state.sse_keep_alive).into_response())
}

fn event_of(item: &Relayed) -> Event {
    match item {
        Relayed::Piece { attempt, seq, text } => Event::default()
            .event("token")
            .id(format!("{attempt}.{seq}"))
            .data(json!({"seq": seq, "attempt": attempt, "text": text}).to_string()),
        Relayed::Reset => Event::default().event("reset").data(
            json!({"reason": "the answer is being retried; drop the text so far"}).to_string(),
        ),
        Relayed::Final(answered) => final_event(answered),
    }
}

fn final_event(answered: &Answered) -> Event {
    let name = match answered.status {
        ebb_nats::QuestionStatus::Failed => "failed",
        _ => "done",
    };
    Event::default()
        .event(name)
        .data(serde_json::to_string(answered).expect("answers serialize"))
}
