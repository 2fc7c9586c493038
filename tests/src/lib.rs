//! Test harness: real `nats-server -js` and `redis-server` processes on free
//! loopback ports, an in-process gateway, and `ebb-worker` processes; all
//! cleaned up on Drop, so tests run in parallel without shared services.
//!
//! # Layout
//! - [`servers`]: [`NatsServer`], [`RedisServer`], [`TempDir`], port helpers.
//! - [`stack`]: [`Stack`] (servers + gateway + tiny model) and [`WorkerProcess`].
//! - [`scaler`]: [`ScalerProcess`], an `ebb-scaler` running tiny-model workers.

pub mod scaler;
pub mod servers;
pub mod stack;

pub use scaler::{ADMIN_TOKEN, ScalerProcess, scaler_binary};
pub use servers::{NatsServer, RedisServer, TempDir, free_port};
pub use stack::{Stack, StackOptions, WorkerProcess, tiny_model_dir, worker_binary};
