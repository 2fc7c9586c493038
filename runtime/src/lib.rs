//! Process plumbing every ebb binary shares, none of it specific to the
//! queue, the store or the model.
//!
//! # Layout
//! - [`telemetry`]: tracing/OpenTelemetry setup and W3C `traceparent`
//!   propagation through NATS message headers.
//! - [`args`]: flags every process shares ([`ServiceArgs`]: NATS and Redis with their logins; [`ModelArgs`]).
//! - [`backoff`]: the one exponential retry backoff, and
//!   [`backoff::retry_startup`], the one way a startup step is retried.
//! - [`duration`]: the `30s` / `500ms` syntax every duration flag and
//!   config key accepts.
//! - [`shutdown`]: the first SIGTERM/Ctrl-C stops gracefully, a second
//!   exits at once.
//! - [`quantile`]: one definition of a percentile of samples.
//! - [`error_chain`]: an error and its causes on one line.

pub mod args;
pub mod backoff;
pub mod duration;
pub mod error_chain;
pub mod quantile;
pub mod shutdown;
pub mod telemetry;

pub use args::{Login, LoginError, ModelArgs, NatsArgs, RedisArgs, ServiceArgs};
