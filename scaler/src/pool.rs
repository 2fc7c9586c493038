//! Backends that turn a worker count into running workers.
//!
//! [`WorkerPool`] is what the scaler needs of any backend: list the workers
//! it started, start one, stop one gracefully. Implementations must be
//! idempotent and must never touch a worker they did not start; after a
//! scaler restart they adopt the workers they started before. The process
//! backend lives in [`process`], the Docker one (labels, images, GPU
//! requests) in [`docker`]; a Kubernetes one (a Deployment's scale
//! subresource) fits the same three calls.

pub mod docker;
pub mod process;

use std::future::Future;

pub use ebb_control::listing::{Phase, PoolWorker};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot start worker `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("no worker `{0}` in this pool")]
    UnknownWorker(String),
    #[error("docker: {0}")]
    Engine(String),
}

/// A set of workers the scaler owns.
pub trait WorkerPool: Send {
    /// Every worker this pool started and still tracks; exits since the last
    /// call are reported once. Also enforces stop grace periods.
    fn list(&mut self) -> impl Future<Output = Result<Vec<PoolWorker>, PoolError>> + Send;
    /// Starts one worker; returns its id.
    fn start(&mut self) -> impl Future<Output = Result<String, PoolError>> + Send;
    /// Asks one worker to drain and stop (SIGTERM or equivalent); it is
    /// killed if it has not exited within the grace period. Stopping a
    /// worker that is already stopping does nothing.
    fn stop(&mut self, id: &str) -> impl Future<Output = Result<(), PoolError>> + Send;
}
