//! A client waiting for an answer, and the answer as a stream: the one
//! relay that `/v1/questions/{id}/events` and streamed chat completions map
//! over.
//!
//! A [`Waiter`] holds one of the bounded waiting slots and the subscription
//! to `ebb.answers.<id>`, made before the question is published (or, for a
//! late joiner, before its pieces are read), so no event can fall between.
//! [`Waiter::feed`] turns it into an [`AnswerFeed`]: the pieces already
//! stored in Redis, then the live ones from the stored count on (see
//! `AnswerEvent` for why that leaves no gap and no repeat), then the final
//! answer. A [`Cursor`] decides, piece by piece, what a client still needs,
//! so a reconnecting client gets only the rest and a retried answer resets
//! once. Dropping the feed (the client went) stops the relay and frees the
//! slot.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ebb_nats::{AnswerEvent, CachedAnswer, Job, subjects};
use ebb_store::Store;
use futures::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::AppState;
use super::admission::Answered;
use crate::error::ApiError;
use crate::hot_cache::HotCache;

/// Pieces buffered per feed before the relay waits for the client.
const FEED_BUFFER: usize = 64;
/// How often a quiet relay re-reads the record, in case a final event was
/// lost (e.g. across a NATS reconnect).
const RECHECK: Duration = Duration::from_secs(5);

/// A held waiting slot: one of the gateway's, and one of its API key's
/// (so one key cannot hold every slot).
#[derive(Debug)]
pub struct Slot {
    _gateway: OwnedSemaphorePermit,
    _key: Option<OwnedSemaphorePermit>,
}

/// A request held open for an answer: a waiting slot and the subscription.
#[derive(Debug)]
pub struct Waiter {
    slot: Slot,
    answers: async_nats::Subscriber,
    /// Read the record before the first event: the question may have
    /// ended before this subscription (a retried request).
    record_first: bool,
    /// Where the answer goes in the hot cache, for a keyed question.
    fill: Option<Fill>,
}

/// A relayed answer's copy in the gateway's hot cache, under the
/// question's cache key.
#[derive(Debug, Clone)]
struct Fill {
    cache: Arc<HotCache>,
    key: String,
}

impl Fill {
    /// Keeps a freshly generated answer for as long as Redis caches it
    /// (a second less: the event left the worker a moment ago).
    fn keep(&self, event: &AnswerEvent) {
        if let AnswerEvent::Done {
            answer,
            model,
            cached: false,
            finish_reason,
            cache_ttl_s: Some(ttl),
            language,
            ..
        } = event
        {
            let copy = CachedAnswer {
                answer: answer.clone(),
                model: model.clone(),
                finish_reason: *finish_reason,
                language: language.clone(),
            };
            let ttl = Duration::from_secs(ttl.saturating_sub(1));
            self.cache.insert(&self.key, copy, ttl);
        }
    }
}

impl Waiter {
    /// One of the bounded waiting slots for a question of `owner` (an API
    /// key's name): `429 too_many_waiting_for_key` past the key's share,
    /// `503 too_many_waiting` when the gateway's are all taken.
    pub fn slot(state: &AppState, owner: Option<&str>) -> Result<Slot, ApiError> {
        let key = match owner.and_then(|name| state.waiting_per_key.get(name)) {
            Some(slots) => Some(slots.clone().try_acquire_owned().map_err(|_| {
                ApiError::TooManyWaitingForKey {
                    limit: state.max_waiting_per_key,
                }
            })?),
            None => None,
        };
        let gateway = state
            .waiting
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::TooManyWaiting)?;
        Ok(Slot {
            _gateway: gateway,
            _key: key,
        })
    }

    /// Subscribes to the answer events of `id` for the holder of `slot`.
    pub async fn subscribe(state: &AppState, id: &str, slot: Slot) -> Result<Waiter, ApiError> {
        let answers = state
            .topology
            .jetstream
            .client()
            .subscribe(subjects::answers(id))
            .await
            .map_err(|err| ApiError::QueueUnavailable(err.to_string()))?;
        Ok(Waiter {
            slot,
            answers,
            record_first: false,
            fill: None,
        })
    }

    /// Keeps the answer of `job` in the hot cache when it comes (if the
    /// job has a cache key).
    pub fn filling(mut self, state: &AppState, job: &Job) -> Waiter {
        self.fill = job.cache_key.clone().map(|key| Fill {
            cache: state.hot_cache.clone(),
            key,
        });
        self
    }

    /// Reads the record before waiting for any event: the question may
    /// have ended before this subscription (a retried request).
    pub fn check_record_first(mut self) -> Waiter {
        self.record_first = true;
        self
    }

    /// Waits up to `wait` for the final answer event of `id`. The record
    /// is read again every [`RECHECK`] in case the event was lost (a NATS
    /// reconnect, a worker that died after its record): a terminal record
    /// stands for its event. `None` on timeout or when the subscription
    /// ends; the caller then reads the status record.
    pub async fn final_event(
        &mut self,
        store: &Store,
        id: &str,
        wait: Duration,
    ) -> Option<AnswerEvent> {
        let deadline = tokio::time::Instant::now() + wait;
        let first = match self.record_first {
            true => tokio::time::Instant::now(),
            false => tokio::time::Instant::now() + RECHECK,
        };
        let mut recheck = tokio::time::interval_at(first, RECHECK);
        loop {
            let message = tokio::select! {
                message = tokio::time::timeout_at(deadline, self.answers.next()) => message.ok()??,
                _ = recheck.tick() => {
                    let record = store.degradable("the status record", store.record(id)).await.flatten();
                    match record.and_then(|record| record.final_event()) {
                        Some(event) => return Some(event),
                        None => continue,
                    }
                }
            };
            match serde_json::from_slice::<AnswerEvent>(&message.payload) {
                Ok(event) if event.is_final() => {
                    if let Some(fill) = &self.fill {
                        fill.keep(&event);
                    }
                    return Some(event);
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(cause = %err, "unreadable answer event"),
            }
        }
    }

    /// The answer of `id` from `cursor` on, relayed by a task that holds
    /// the slot until the answer ends or the feed is dropped.
    pub fn feed(
        self,
        store: Store,
        default_model: String,
        id: String,
        cursor: Cursor,
    ) -> AnswerFeed {
        let (out, relayed) = mpsc::channel(FEED_BUFFER);
        let relay = Relay {
            store,
            default_model,
            id,
            cursor,
            out,
            fill: self.fill,
        };
        tokio::spawn(async move {
            let _slot = self.slot;
            relay.run(self.answers).await;
        });
        AnswerFeed { relayed }
    }
}

/// A question's answer as it comes: pieces, resets, then one final answer.
#[derive(Debug)]
pub struct AnswerFeed {
    relayed: mpsc::Receiver<Relayed>,
}

impl Stream for AnswerFeed {
    type Item = Relayed;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Relayed>> {
        self.relayed.poll_recv(cx)
    }
}

/// One item of an [`AnswerFeed`].
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

/// Sends one question's answer to one feed.
struct Relay {
    store: Store,
    default_model: String,
    id: String,
    cursor: Cursor,
    out: mpsc::Sender<Relayed>,
    fill: Option<Fill>,
}

impl Relay {
    /// Sends the answer from the cursor on, then its final record. Returns
    /// when the question is finished or the feed is gone.
    async fn run(mut self, mut answers: async_nats::Subscriber) {
        if !self.stored_pieces().await {
            return;
        }
        // Read after the pieces: a record finished now has all its pieces stored.
        if let Some(answered) = self.finished().await {
            let _ = self.out.send(Relayed::Final(answered)).await;
            return;
        }
        loop {
            let message = tokio::select! {
                message = answers.next() => message,
                _ = tokio::time::sleep(RECHECK) => match self.finished().await {
                    Some(answered) => {
                        let _ = self.out.send(Relayed::Final(answered)).await;
                        return;
                    }
                    None => continue,
                },
                _ = self.out.closed() => return,
            };
            let Some(message) = message else { return };
            let Ok(event) = serde_json::from_slice::<AnswerEvent>(&message.payload) else {
                continue;
            };
            if !self.event(event).await {
                return;
            }
        }
    }

    /// The pieces stored so far; `false` when the feed is gone.
    async fn stored_pieces(&mut self) -> bool {
        let read = self.store.pieces(&self.id);
        let snapshot = self
            .store
            .degradable("late joiners' pieces", read)
            .await
            .unwrap_or_default();
        for (seq, text) in snapshot.texts.into_iter().enumerate() {
            if !self.piece(snapshot.attempt, seq as u64, text).await {
                return false;
            }
        }
        true
    }

    /// Relays one live event; `false` once the answer ended or the feed is gone.
    async fn event(&mut self, event: AnswerEvent) -> bool {
        if let AnswerEvent::Token { seq, text, attempt } = event {
            return self.piece(attempt, seq, text).await;
        }
        if let Some(fill) = &self.fill {
            fill.keep(&event);
        }
        let language = self.record().await.and_then(|record| record.language);
        match Answered::from_event(self.id.clone(), event, &self.default_model, language) {
            Some(answered) => {
                let _ = self.out.send(Relayed::Final(answered)).await;
                false
            }
            None => true,
        }
    }

    /// Sends the piece if the client needs it; `false` when the feed is gone.
    async fn piece(&mut self, attempt: i64, seq: u64, text: String) -> bool {
        let piece = Relayed::Piece { attempt, seq, text };
        match self.cursor.step(attempt, seq) {
            Step::Skip => true,
            Step::Send => self.out.send(piece).await.is_ok(),
            Step::ResetThenSend => {
                self.out.send(Relayed::Reset).await.is_ok() && self.out.send(piece).await.is_ok()
            }
        }
    }

    async fn record(&self) -> Option<ebb_nats::QuestionRecord> {
        let read = self.store.record(&self.id);
        self.store
            .degradable("the status record", read)
            .await
            .flatten()
    }

    /// The final answer, if the record says the question ended.
    async fn finished(&self) -> Option<Answered> {
        self.record()
            .await
            .filter(|record| record.status.is_terminal())
            .map(|record| Answered::from_record(record, &self.default_model))
    }
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
