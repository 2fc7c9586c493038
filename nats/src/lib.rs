//! The queue contract every ebb process shares.
//!
//! The gateway, the workers and the scaler never talk to each other directly:
//! they meet on NATS JetStream subjects and in Redis records. This crate is
//! the single definition of that meeting place, so a change to it is a change
//! to the protocol.
//!
//! # Layout
//! - [`subjects`]: stream, subject and consumer names; [`Priority`].
//! - [`messages`]: the JSON bodies on the wire: [`Job`], [`AnswerEvent`],
//!   [`Heartbeat`], [`FleetStatus`], [`DeadLetter`].
//! - [`topology`]: the streams and the durable consumers ([`QueueConfig`]):
//!   the gateway creates or updates them ([`Topology::ensure`]), the others
//!   open them and log settings that differ from their flags
//!   ([`Topology::open`], [`mismatches`]).
//! - [`depth`]: queue-depth queries the scaler reads ([`QueueDepth`]).
//! - [`record`]: a question's status record ([`QuestionRecord`]) and a
//!   cached answer: the JSON kept in Redis and sent to webhooks.
//! - [`webhook`]: the queue of callback calls the gateway delivers.
//! - [`access`]: each role's NATS user and subject permissions;
//!   [`connect`] logs a process in as its role.
//!
//! Reading and writing those records in Redis, and a question's terminal
//! transitions, live in `ebb-store`; timetables in `ebb-schedule`; process
//! plumbing (telemetry, shared flags, durations) in `ebb-runtime`.

pub mod access;
mod connect;
pub mod depth;
pub mod messages;
pub mod record;
pub mod subjects;
pub mod topology;
pub mod webhook;

pub use connect::connect;
pub use depth::{PriorityDepth, QueueDepth, queue_depth};
pub use messages::{
    AnswerEvent, CacheHits, ChatMessage, DeadLetter, DownloadProgress, FinishReason, FleetStatus,
    Heartbeat, Job, PhaseTime, Role, Sampling, StartPhase, Timings, WorkerState,
};
pub use record::{CachedAnswer, QuestionRecord, QuestionStatus};
pub use subjects::Priority;
pub use topology::{Mismatch, QueueConfig, QueueError, Topology, mismatches};

/// Milliseconds since the Unix epoch: the one timestamp format on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
