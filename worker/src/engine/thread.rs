//! The engine on a thread of its own, and the KV memory budget.
//!
//! The async worker reserves a question's KV memory ([`KvBudget`]) before it
//! submits the question; the engine thread admits submissions between
//! steps, steps while anything is in flight, and sends each question's text
//! and result back on that question's own channel. A question's memory is
//! given back when its sequence leaves the engine, which wakes a question
//! waiting for room.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use super::{Engine, Output, Request, SeqId};
use crate::generate::{GenerateError, Generation};

/// Memory for keys and values, counted in bytes, shared by every sequence.
#[derive(Debug)]
pub struct KvBudget {
    total_bytes: u64,
    bytes_per_token: u64,
    used: Mutex<Used>,
    freed: Notify,
}

#[derive(Debug, Default)]
struct Used {
    bytes: u64,
    /// Live reservations: the questions holding memory, i.e. in the engine.
    holders: u32,
}

impl KvBudget {
    pub fn new(total_bytes: u64, bytes_per_token: usize) -> Arc<KvBudget> {
        Arc::new(KvBudget {
            total_bytes,
            bytes_per_token: bytes_per_token as u64,
            used: Mutex::new(Used::default()),
            freed: Notify::new(),
        })
    }

    pub fn total_mib(&self) -> u64 {
        self.total_bytes >> 20
    }

    /// Positions (tokens) the whole budget holds.
    pub fn total_positions(&self) -> u64 {
        self.total_bytes / self.bytes_per_token.max(1)
    }

    /// Positions not reserved right now.
    pub fn free_positions(&self) -> u64 {
        let used = self.used.lock().expect("budget lock").bytes;
        self.total_bytes.saturating_sub(used) / self.bytes_per_token.max(1)
    }

    /// Questions holding memory right now (at most the worker's slots).
    pub fn holders(&self) -> u32 {
        self.used.lock().expect("budget lock").holders
    }

    /// Refuses, for good, a request larger than the whole budget.
    pub fn check(&self, positions: usize) -> Result<(), GenerateError> {
        let bytes = positions as u64 * self.bytes_per_token;
        if bytes > self.total_bytes {
            return Err(GenerateError::NeverFits {
                positions,
                needed_mib: bytes as f64 / (1u64 << 20) as f64,
                budget_mib: self.total_mib(),
            });
        }
        Ok(())
    }

    /// Room for `positions` now, or `None`.
    pub fn try_reserve(self: &Arc<Self>, positions: usize) -> Option<KvReservation> {
        let bytes = positions as u64 * self.bytes_per_token;
        let mut used = self.used.lock().expect("budget lock");
        if used.bytes + bytes > self.total_bytes {
            return None;
        }
        used.bytes += bytes;
        used.holders += 1;
        Some(KvReservation {
            budget: self.clone(),
            bytes,
        })
    }

    /// Waits until room for `positions` is given back (call [`Self::check`] first).
    pub async fn reserve(self: &Arc<Self>, positions: usize) -> KvReservation {
        loop {
            let freed = self.freed.notified();
            if let Some(reservation) = self.try_reserve(positions) {
                return reservation;
            }
            freed.await;
        }
    }
}

/// Memory held for one sequence; given back on drop.
#[derive(Debug)]
pub struct KvReservation {
    budget: Arc<KvBudget>,
    bytes: u64,
}

impl Drop for KvReservation {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().expect("budget lock");
        used.bytes -= self.bytes;
        used.holders -= 1;
        drop(used);
        self.budget.freed.notify_waiters();
    }
}

/// What a question's channel carries: text pieces, then one result.
#[derive(Debug)]
pub enum SeqEvent {
    Text(String),
    Done(Result<Generation, GenerateError>),
}

struct Submission {
    request: Request,
    reservation: KvReservation,
    events: mpsc::Sender<SeqEvent>,
    mode: Admission,
}

/// How a question joins the batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admission {
    /// Run with no other question in the engine: an earlier attempt was in
    /// a step that crashed, and only a solo run tells whether it was the
    /// cause. Later questions wait until it is done.
    pub solo: bool,
    /// Test hook (`--debug-panic-marker`): panic in a step holding it.
    pub panics: bool,
}

/// Counters the engine thread keeps for heartbeats.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub prefill_tokens: AtomicU64,
    pub prefill_tokens_saved: AtomicU64,
}

/// The async side's handle on the engine thread.
#[derive(Debug)]
pub struct EngineHandle {
    submissions: mpsc::Sender<Submission>,
    pub stats: Arc<EngineStats>,
    thread: std::thread::JoinHandle<()>,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission").finish_non_exhaustive()
    }
}

impl EngineHandle {
    /// Starts the engine thread. `max_batch` bounds the submissions queue
    /// (the worker never has more questions than slots). `step_delay` is a
    /// test hook: a pause after every step that produced text.
    pub fn spawn(engine: Engine, max_batch: usize, step_delay: Option<Duration>) -> EngineHandle {
        let (submissions, receiver) = mpsc::channel(max_batch.max(1));
        let stats = Arc::new(EngineStats::default());
        let thread = {
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("ebb-engine".into())
                .spawn(move || serve(engine, receiver, &stats, step_delay))
                .expect("the engine thread starts")
        };
        EngineHandle {
            submissions,
            stats,
            thread,
        }
    }

    /// Hands `request` to the engine; its text and result come on the
    /// returned channel.
    pub async fn submit(
        &self,
        request: Request,
        reservation: KvReservation,
        mode: Admission,
    ) -> Result<mpsc::Receiver<SeqEvent>, GenerateError> {
        // Room for every piece (at most one a token) and the result, so the
        // engine never waits on one slow reader.
        let (events, receiver) = mpsc::channel(request.max_new + 2);
        self.submissions
            .send(Submission {
                request,
                reservation,
                events,
                mode,
            })
            .await
            .map_err(|_| GenerateError::EngineStopped)?;
        Ok(receiver)
    }

    /// Whether the engine thread is gone (it panicked).
    pub fn is_stopped(&self) -> bool {
        self.thread.is_finished()
    }
}

struct Client {
    events: mpsc::Sender<SeqEvent>,
    /// Dropped after the sequence has left the engine: gives its memory back.
    _reservation: KvReservation,
    mode: Admission,
}

fn serve(
    mut engine: Engine,
    mut submissions: mpsc::Receiver<Submission>,
    stats: &EngineStats,
    step_delay: Option<Duration>,
) {
    let mut clients: HashMap<SeqId, Client> = HashMap::new();
    // Bounded by the submissions channel: the worker never has more
    // questions in flight than slots.
    let mut pending: VecDeque<Submission> = VecDeque::new();
    let mut open = true;
    loop {
        if engine.is_idle() && pending.is_empty() {
            match submissions.blocking_recv() {
                Some(submission) => pending.push_back(submission),
                None => return,
            }
        }
        while open {
            match submissions.try_recv() {
                Ok(submission) => pending.push_back(submission),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        admit_pending(&mut engine, &mut clients, &mut pending);
        // A question whose job is gone (the worker is exiting) stops here.
        clients.retain(|id, client| {
            let gone = client.events.is_closed();
            if gone {
                engine.cancel(*id);
            }
            !gone
        });
        if engine.is_idle() {
            if !open && pending.is_empty() {
                return;
            }
            continue;
        }
        let injected = clients.values().any(|client| client.mode.panics);
        let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert!(!injected, "failure injected by --debug-panic-marker");
            engine.step()
        }));
        let outputs = match step {
            Ok(outputs) => outputs,
            Err(payload) => {
                // Nothing in the engine can be trusted after a panic: every
                // question in it fails with the reason, and the thread ends
                // (the worker then exits and is replaced).
                let reason = panic_reason(&*payload);
                tracing::error!(%reason, questions = clients.len(), "the model panicked; stopping the engine");
                let batch = clients.len();
                for client in clients.values() {
                    let failure = GenerateError::Panicked {
                        reason: reason.clone(),
                        batch,
                    };
                    let _ = client.events.try_send(SeqEvent::Done(Err(failure)));
                }
                return;
            }
        };
        let mut produced_text = false;
        for output in outputs {
            match output {
                Output::Text(id, text) => {
                    produced_text = true;
                    send(&clients, id, SeqEvent::Text(text));
                }
                Output::Finished(id, result) => {
                    send(&clients, id, SeqEvent::Done(result));
                    clients.remove(&id);
                }
            }
        }
        let counts = engine.prefill_counts();
        stats.prefill_tokens.store(counts.run, Ordering::Relaxed);
        stats
            .prefill_tokens_saved
            .store(counts.saved, Ordering::Relaxed);
        if let Some(delay) = step_delay.filter(|_| produced_text) {
            std::thread::sleep(delay);
        }
    }
}

/// Admits waiting questions in arrival order: none while a solo question
/// runs, and a solo one only into an empty engine (the questions behind it
/// wait, so the engine drains).
fn admit_pending(
    engine: &mut Engine,
    clients: &mut HashMap<SeqId, Client>,
    pending: &mut VecDeque<Submission>,
) {
    while let Some(next) = pending.front() {
        let solo_running = clients.values().any(|client| client.mode.solo);
        let fits = !solo_running && (!next.mode.solo || engine.is_idle());
        if !fits {
            return;
        }
        let submission = pending.pop_front().expect("just looked");
        admit(engine, clients, submission);
    }
}

fn panic_reason(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

fn admit(engine: &mut Engine, clients: &mut HashMap<SeqId, Client>, submission: Submission) {
    let Submission {
        request,
        reservation,
        events,
        mode,
    } = submission;
    match engine.admit(request) {
        Ok(id) => {
            clients.insert(
                id,
                Client {
                    events,
                    _reservation: reservation,
                    mode,
                },
            );
        }
        Err(err) => {
            let _ = events.try_send(SeqEvent::Done(Err(err)));
        }
    }
}

fn send(clients: &HashMap<SeqId, Client>, id: SeqId, event: SeqEvent) {
    if let Some(client) = clients.get(&id)
        && client.events.try_send(event).is_err()
    {
        // Only when the job is gone: the channel has room for every event.
        tracing::debug!(sequence = id, "a question's reader is gone");
    }
}
