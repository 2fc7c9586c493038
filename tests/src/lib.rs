//! Test harness: real `nats-server -js` and `redis-server` processes on free
//! loopback ports, an in-process gateway, and `ebb-worker` processes; all
//! cleaned up on Drop, so tests run in parallel without shared services.
//!
//! # Layout
//! - [`servers`]: [`NatsServer`], [`RedisServer`], [`TempDir`], port helpers.
//! - [`stack`]: [`Stack`] (servers + gateway + tiny model) and [`WorkerProcess`].
//! - [`sse`]: a Server-Sent Events reader.
//! - [`eventually()`]: the one polling wait.
//! - [`hub`]: [`hub::HubServer`], a local Hugging Face Hub for download tests.
//! - [`cluster`]: [`cluster::NatsCluster`], three nats-server containers on
//!   a Docker network of their own, for node loss and partitions.
//! - [`compose`]: [`compose::Compose`], a docker-compose project for a test.
//! - [`proxy`]: [`proxy::CuttableProxy`], a TCP proxy a test cuts to
//!   partition one process from a server.
//! - [`sentinel`]: [`sentinel::SentinelRedis`], a Redis master, replica and
//!   three Sentinels, for failovers.
//! - [`scaler`]: [`ScalerProcess`], an `ebb-scaler` running tiny-model workers.
//! - [`bench`]: `wrk` runs and side-by-side reports for the benchmarks.
//! - [`chaos`]: the chaos run (`scripts/chaos`): every part a process, faults
//!   on a seeded schedule, every accepted question checked at the end.

pub mod bench;
pub mod chaos;
pub mod chromium;
pub mod cluster;
pub mod compose;
pub mod eventually;
pub mod hub;
pub mod prometheus;
pub mod proxy;
pub mod scaler;
pub mod sentinel;
pub mod servers;
pub mod sse;
pub mod stack;

pub use eventually::eventually;
pub use scaler::{ADMIN_TOKEN, ScalerProcess, scaler_binary};
pub use servers::{NatsServer, RedisServer, TempDir, free_port};
pub use sse::{SseEvent, SseReader};
pub use stack::{Stack, StackOptions, WorkerProcess, tiny_job, tiny_model_dir, worker_binary};

/// The text of README.md after `marker` up to the end of that code block,
/// so documentation examples are checked by the tests.
pub fn readme_block_after(marker: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md at the repo root");
    let (_, rest) = readme
        .split_once(marker)
        .unwrap_or_else(|| panic!("README.md has no `{marker}`"));
    rest.split("```").next().unwrap_or_default().to_owned()
}
