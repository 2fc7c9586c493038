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
//! - [`telemetry`]: tracing/OpenTelemetry setup and W3C `traceparent`
//!   propagation through message headers.
//! - [`cron`] and [`timetable`]: school timetables (5-field cron in IANA
//!   time zones) that the scaler pre-warms for and the gateway prioritises by.
//! - [`duration`]: the `30s` / `500ms` syntax every duration flag accepts.
//! - [`args`]: flags every process shares ([`ServiceArgs`], [`ModelArgs`]).

pub mod args;
pub mod cron;
pub mod dead_letter;
pub mod depth;
pub mod duration;
pub mod messages;
pub mod store;
pub mod subjects;
pub mod telemetry;
pub mod timetable;
pub mod topology;
pub mod webhook;

pub use args::{ModelArgs, ServiceArgs};
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
