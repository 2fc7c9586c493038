//! `GET /v1/questions/{id}/events`: the answer's pieces as Server-Sent
//! Events while they are generated, for clients that connect at any time.
//!
//! The relay subscribes to `ebb.answers.<id>` first, then reads the pieces
//! already stored in Redis and sends those, then follows the live events
//! from the stored count on (see `AnswerEvent` for why that leaves no gap and
//! no repeat). A question that already finished gets its pieces and the
//! final event at once. Each piece carries its position as the SSE `id`
//! (`<attempt>.<seq>`), so a reconnecting client sends `Last-Event-ID` and
//! gets only the rest.
//!
//! Events: `token` (`{"seq","attempt","text"}`), `reset` (the answer is being
//! retried after a failure, or the client resumed with text of an attempt
//! that was superseded: drop the text so far), then one `done` or `failed`
//! (the full record, whatever was missed).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ebb_nats::{AnswerEvent, subjects};
use ebb_store::Store;
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
        attempt: i64,
        seq: u64,
        text: String,
    },
    /// The answer restarts (a retry after a failed attempt).
    Reset,
    Final(Answered),
}

/// Where a client is in an answer: the attempt whose text it holds and the
/// next piece it needs. Decides, piece by piece, what to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    /// 0: not known (a fresh client, or a bare-`seq` `Last-Event-ID`).
    attempt: i64,
    next: u64,
}

/// What to do with one piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Skip,
    Send,
    /// The client holds an earlier attempt's text: `reset`, then send.
    ResetThenSend,
}

impl Cursor {
    /// From `Last-Event-ID`: `<attempt>.<seq>` (what this API sends) or a
    /// bare `<seq>`; the client needs the piece after it.
    pub fn resume(last_event_id: Option<&str>) -> Cursor {
        let Some(id) = last_event_id.map(str::trim) else {
            return Cursor::default();
        };
        let (attempt, seq) = match id.split_once('.') {
            Some((attempt, seq)) => (attempt.parse().ok(), seq.parse::<u64>().ok()),
            None => (Some(0), id.parse::<u64>().ok()),
        };
        match (attempt, seq) {
            (Some(attempt), Some(seq)) => Cursor {
                attempt,
                next: seq.saturating_add(1),
            },
            _ => Cursor::default(),
        }
    }

    pub fn step(&mut self, attempt: i64, seq: u64) -> Step {
        if attempt < self.attempt {
            return Step::Skip; // the tail of a superseded attempt
        }
        let mut reset = false;
        if attempt > self.attempt {
            if self.attempt != 0 {
                reset = self.next > 0;
                self.next = 0;
            }
            self.attempt = attempt;
        }
        if seq < self.next {
            return Step::Skip; // already sent
        }
        self.next = seq + 1;
        if reset {
            Step::ResetThenSend
        } else {
            Step::Send
        }
    }
}

/// Sends the answer of `id` from `cursor` on, then its final record.
/// Returns when the question is finished or the receiver is gone.
pub async fn relay(
    store: &Store,
    default_model: &str,
    id: &str,
    mut answers: async_nats::Subscriber,
    mut cursor: Cursor,
    out: mpsc::Sender<Relayed>,
) {
    let send = async |out: &mpsc::Sender<Relayed>, step: Step, piece: Relayed| match step {
        Step::Skip => true,
        Step::Send => out.send(piece).await.is_ok(),
        Step::ResetThenSend => {
            out.send(Relayed::Reset).await.is_ok() && out.send(piece).await.is_ok()
        }
    };
    let snapshot = store.pieces(id).await.unwrap_or_default();
    for (seq, text) in snapshot.texts.into_iter().enumerate() {
        let seq = seq as u64;
        let step = cursor.step(snapshot.attempt, seq);
        let piece = Relayed::Piece {
            attempt: snapshot.attempt,
            seq,
            text,
        };
        if !send(&out, step, piece).await {
            return;
        }
    }
    let finished = |record: Option<ebb_nats::QuestionRecord>| {
        record
            .filter(|record| record.status.is_terminal())
            .map(|record| Answered::from_record(record, default_model))
    };
    // Read after the pieces: a record finished now has all its pieces stored.
    if let Some(answered) = finished(
        store
            .degradable("the status record", store.record(id))
            .await
            .flatten(),
    ) {
        let _ = out.send(Relayed::Final(answered)).await;
        return;
    }
    loop {
        let message = tokio::select! {
            message = answers.next() => message,
            _ = tokio::time::sleep(RECHECK) => {
                if let Some(answered) = finished(store.degradable("the status record", store.record(id)).await.flatten()) {
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
        match event {
            AnswerEvent::Token { seq, text, attempt } => {
                let step = cursor.step(attempt, seq);
                let piece = Relayed::Piece { attempt, seq, text };
                if !send(&out, step, piece).await {
                    return;
                }
            }
            event => {
                let record = store
                    .degradable("the status record", store.record(id))
                    .await
                    .flatten();
                let language = record.and_then(|record| record.language);
                if let Some(answered) =
                    Answered::from_event(id.to_owned(), event, default_model, language)
                {
                    let _ = out.send(Relayed::Final(answered)).await;
                    return;
                }
            }
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
    let cursor = Cursor::resume(
        headers
            .get("last-event-id")
            .and_then(|value| value.to_str().ok()),
    );
    let store_error = |err: ebb_store::StoreError| ApiError::StoreUnavailable(err.to_string());
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
            cursor,
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
                    Relayed::Piece { attempt, seq, text } => Event::default()
                        .event("token")
                        .id(format!("{attempt}.{seq}"))
                        .data(json!({"seq": seq, "attempt": attempt, "text": text}).to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cursor: &mut Cursor, pieces: &[(i64, u64)]) -> Vec<Step> {
        pieces
            .iter()
            .map(|&(attempt, seq)| cursor.step(attempt, seq))
            .collect()
    }

    #[test]
    fn a_fresh_client_gets_every_piece_once() {
        let mut cursor = Cursor::resume(None);
        // Snapshot 0..2, then live events that repeat 1..2 and go on.
        let steps = run(
            &mut cursor,
            &[(1, 0), (1, 1), (1, 2), (1, 1), (1, 2), (1, 3)],
        );
        use Step::*;
        assert_eq!(steps, [Send, Send, Send, Skip, Skip, Send]);
    }

    #[test]
    fn a_retry_resets_once_and_stale_pieces_are_dropped() {
        let mut cursor = Cursor::default();
        use Step::*;
        let steps = run(&mut cursor, &[(1, 0), (1, 1), (2, 0), (1, 2), (2, 1)]);
        assert_eq!(steps, [Send, Send, ResetThenSend, Skip, Send]);
    }

    #[test]
    fn resuming_with_a_superseded_attempt_resets_first() {
        let mut cursor = Cursor::resume(Some("1.4"));
        use Step::*;
        assert_eq!(run(&mut cursor, &[(2, 0), (2, 1)]), [ResetThenSend, Send]);
        let mut same = Cursor::resume(Some("2.0"));
        assert_eq!(run(&mut same, &[(2, 0), (2, 1)]), [Skip, Send]);
    }

    #[test]
    fn a_bare_seq_resumes_whatever_attempt_comes() {
        let mut cursor = Cursor::resume(Some("2"));
        use Step::*;
        assert_eq!(
            run(&mut cursor, &[(3, 0), (3, 2), (3, 3)]),
            [Skip, Skip, Send]
        );
        assert_eq!(Cursor::resume(Some("junk")), Cursor::default());
        assert_eq!(Cursor::resume(Some("18446744073709551615")).next, u64::MAX);
    }
}
