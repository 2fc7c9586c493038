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
//!   [`Heartbeat`], [`DeadLetter`].
//! - [`topology`]: the idempotent "ensure" step that creates or updates the
//!   streams and the durable consumers ([`QueueConfig`]).
//! - [`depth`]: queue-depth queries the scaler reads ([`QueueDepth`]).
//! - [`store`]: Redis status records and the answer cache ([`Store`]).
//! - [`dead_letter`]: gives a terminal status to questions whose last delivery
//!   was lost with a crashed worker.
//! - [`webhook`]: the queue of callback calls the gateway delivers.
//!
//! Timetables live in `ebb-schedule`, process plumbing (telemetry, shared
//! flags, durations) in `ebb-runtime`.

pub mod dead_letter;
pub mod depth;
pub mod messages;
pub mod store;
pub mod subjects;
pub mod topology;
pub mod webhook;

pub use depth::{PriorityDepth, QueueDepth, queue_depth};
pub use messages::{
    AnswerEvent, ChatMessage, DeadLetter, FinishReason, Heartbeat, Job, Role, Sampling, Timings,
    WorkerState,
};
pub use store::{CachedAnswer, Pieces, QuestionRecord, QuestionStatus, Store, StoreError};
pub use subjects::Priority;
pub use topology::{QueueConfig, QueueError, Topology, connect};

/// Milliseconds since the Unix epoch: the one timestamp format on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
