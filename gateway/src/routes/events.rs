//! `GET /v1/questions/{id}/events`: the answer's pieces as Server-Sent
//! Events while they are generated, for clients that connect at any time.
//!
//! The relay subscribes to `ebb.answers.<id>` first, then reads the pieces
//! already stored in Redis and sends those, then follows the live events
//! from the stored count on (see `AnswerEvent` for why that leaves no gap and
//! no repeat). A question that already finished gets its pieces and the
//! final event at once. Each piece carries its position as the SSE `id`, so
//! a reconnecting client sends `Last-Event-ID` and gets only the rest.
//!
//! Events: `token` (`{"seq","text"}`), `reset` (the answer is being retried
//! after a failure: drop the text so far), then one `done` or `failed`
//! (the full record, whatever was missed).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ebb_nats::{AnswerEvent, Store, subjects};
use futures::{Stream, StreamExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::AppState;
use super::admission::Answered;
use super::questions::question_id;
use crate::error::ApiError;

/// Events buffered per stream before the relay waits for the client.
const STREAM_BUFFER: usize = 64;
/// How often a quiet relay re-reads the record, in case a final event was
/// lost (e.g. across a NATS reconnect).
const RECHECK: Duration = Duration::from_secs(5);

/// What the relay hands to a stream writer.
#[derive(Debug)]
pub enum Relayed {
    Piece {
        seq: u64,
        text: String,
    },
    /// The answer restarts (a retry after a failed attempt).
    Reset,
    Final(Answered),
}

/// Sends the answer of `id` from piece `first` on, then its final record.
/// Returns when the question is finished or the receiver is gone.
pub async fn relay(
    store: &Store,
    default_model: &str,
    id: &str,
    mut answers: async_nats::Subscriber,
    first: u64,
    out: mpsc::Sender<Relayed>,
) {
    let mut next = first;
    let snapshot = store.pieces(id).await.unwrap_or_default();
    for (seq, text) in snapshot.iter().enumerate().skip(first as usize) {
        let piece = Relayed::Piece {
            seq: seq as u64,
            text: text.clone(),
        };
        if out.send(piece).await.is_err() {
            return;
        }
    }
    next = next.max(snapshot.len() as u64);
    let finished = |record: Option<ebb_nats::QuestionRecord>| {
        record
            .filter(|record| record.status.is_terminal())
            .map(|record| Answered::from_record(record, default_model))
    };
    // Read after the pieces: a record finished now has all its pieces stored.
    if let Some(answered) = finished(store.record(id).await.ok().flatten()) {
        let _ = out.send(Relayed::Final(answered)).await;
        return;
    }
    let mut live = false;
    loop {
        let message = tokio::select! {
            message = answers.next() => message,
            _ = tokio::time::sleep(RECHECK) => {
                if let Some(answered) = finished(store.record(id).await.ok().flatten()) {
                    let _ = out.send(Relayed::Final(answered)).await;
                    return;
                }
                continue;
            }
            _ = out.closed() => return,
        };
        let Some(message) = message else { return };
        let Ok(event) = serde_json::from_slice::<AnswerEvent>(&message.payload) else {
            continue;
        };
        let relayed = match event {
            AnswerEvent::Token { seq, text } => {
                if seq == 0 && live {
                    next = 0;
                    if out.send(Relayed::Reset).await.is_err() {
                        return;
                    }
                }
                if seq < next {
                    continue; // already sent from the snapshot
                }
                live = true;
                next = seq + 1;
                Relayed::Piece { seq, text }
            }
            event => {
                let record = store.record(id).await.ok().flatten();
                let language = record.and_then(|record| record.language);
                let Some(answered) =
                    Answered::from_event(id.to_owned(), event, default_model, language)
                else {
                    continue;
                };
                let _ = out.send(Relayed::Final(answered)).await;
                return;
            }
        };
        if out.send(relayed).await.is_err() {
            return;
        }
    }
}

/// An SSE response over the events a spawned task sends.
pub fn sse(
    mut events: mpsc::Receiver<Event>,
    keep_alive: Duration,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = futures::stream::poll_fn(move |cx| events.poll_recv(cx).map(|e| e.map(Ok)));
    Sse::new(stream).keep_alive(KeepAlive::new().interval(keep_alive).text("keep-alive"))
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
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = question_id(id)?;
    let first = headers
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map_or(0, |last| last.saturating_add(1));
    let store_error = |err: ebb_nats::StoreError| ApiError::StoreUnavailable(err.to_string());
    if let Some(key) = id.strip_prefix(super::admission::CACHED_ID_PREFIX) {
        let hit = state.store.cached_answer(key).await.map_err(store_error)?;
        let hit = hit.ok_or_else(|| ApiError::QuestionNotFound(id.clone()))?;
        let answered = Answered::from_cache(id, hit, None);
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(final_event(&answered));
        return Ok(sse(rx, state.sse_keep_alive).into_response());
    }
    let slot = state
        .waiting
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::TooManyWaiting)?;
    let answers = state
        .topology
        .jetstream
        .client()
        .subscribe(subjects::answers(&id))
        .await
        .map_err(|err| ApiError::QueueUnavailable(err.to_string()))?;
    if state
        .store
        .record(&id)
        .await
        .map_err(store_error)?
        .is_none()
    {
        return Err(ApiError::QuestionNotFound(id));
    }
    let (relayed_tx, mut relayed) = mpsc::channel(STREAM_BUFFER);
    let (events_tx, events) = mpsc::channel(STREAM_BUFFER);
    let relay_state = state.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let relaying = relay(
            &relay_state.store,
            &relay_state.model,
            &id,
            answers,
            first,
            relayed_tx,
        );
        // Owns the receiver: when the client goes, dropping it stops the relay.
        let writing = async move {
            loop {
                let item = tokio::select! {
                    item = relayed.recv() => item,
                    _ = events_tx.closed() => None,
                };
                let Some(item) = item else { return };
                let event = match item {
                    Relayed::Piece { seq, text } => Event::default()
                        .event("token")
                        .id(seq.to_string())
                        .data(json!({"seq": seq, "text": text}).to_string()),
                    Relayed::Reset => Event::default().event("reset").data(
                        json!({"reason": "the answer is being retried; drop the text so far"})
                            .to_string(),
                    ),
                    Relayed::Final(answered) => final_event(&answered),
                };
                if events_tx.send(event).await.is_err() {
                    return;
                }
            }
        };
        tokio::join!(relaying, writing);
    });
    Ok(sse(events, state.sse_keep_alive).into_response())
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
