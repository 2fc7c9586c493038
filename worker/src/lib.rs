//! `ebb-worker`: answers queued questions with a Qwen2 model on candle.
//!
//! # Layout
//! - [`config`]: flags, env vars and the `tiny-model` subcommand.
//! - [`model`]: finding/downloading model files and loading them ([`model::Qwen`]).
//! - [`generate`]: the ChatML prompt and the streaming decode loop.
//! - [`runner`]: pull, answer, record, acknowledge; heartbeats.
//! - [`serving_order`]: priorities with aging.
//! - [`tiny`]: the random-weight model for tests, demos and benchmarks.
//!
//! [`run`] serves until `shutdown` is cancelled, finishes the question in
//! hand, and returns: that is how scale-down drains a worker.

pub mod config;
pub mod generate;
pub mod model;
pub mod runner;
pub mod serving_order;
pub mod tiny;

use std::sync::Arc;

use ebb_nats::{Heartbeat, Store, Topology, WorkerState};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::Config;
use generate::Generator;
use model::{HubOptions, ModelRequest, Qwen};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Queue(#[from] ebb_nats::QueueError),
    #[error(transparent)]
    Store(#[from] ebb_nats::StoreError),
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error("NATS: {0}")]
    Nats(async_nats::Error),
}

/// Finds, downloads if needed, and loads the configured model.
pub async fn load_generator(config: &Config) -> Result<Generator, WorkerError> {
    let request = ModelRequest {
        repo: &config.model.repo,
        revision: &config.model.revision,
        dir: config.model_dir.as_deref(),
        gguf_file: config.gguf_file.as_deref(),
        tokenizer_repo: config.tokenizer_repo.as_deref(),
    };
    let files =
        model::files::resolve(&request, &HubOptions::from_env(config.download_timeout)).await?;
    let device = model::device(config.device)?;
    let dtype = model::dtype(config.dtype, &device);
    let system_prompt = config.system_prompt.clone();
    let generator = tokio::task::spawn_blocking(move || {
        let model = Qwen::load(&files, &device, dtype)?;
        Generator::new(model, &files.tokenizer, system_prompt)
    })
    .await
    .expect("model loading does not panic")?;
    Ok(generator)
}

/// Connects, loads the model, and answers questions until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let started_at_ms = ebb_nats::now_ms();
    let worker_id = config
        .worker_id
        .clone()
        .unwrap_or_else(|| format!("worker-{}-{started_at_ms}", std::process::id()));
    let identity = config.model.identity();
    // Small buffers: the worker's subscriptions are wake-ups and single
    // pulls, and a busy worker must not hoard every question's payload.
    let client = ebb_nats::connect(&config.services.nats_url, &worker_id, Some(64)).await?;
    let topology = Topology::ensure(client.clone(), &config.queue).await?;
    let store = Store::connect_lazy(&config.services.redis_url)?;

    let (heartbeat, beats) = watch::channel(Heartbeat {
        worker_id: worker_id.clone(),
        state: WorkerState::Loading,
        model: identity.clone(),
        started_at_ms,
        ready_at_ms: None,
        jobs_done: 0,
        jobs_failed: 0,
        last_tokens_per_second: None,
        mean_job_ms: None,
        mean_response_ms: None,
        sent_at_ms: started_at_ms,
    });
    let stop_heartbeats = CancellationToken::new();
    let heartbeats = tokio::spawn(runner::publish_heartbeats(
        client.clone(),
        beats,
        stop_heartbeats.clone(),
    ));
    tracing::info!(worker_id, model = %identity, "loading model");
    let generator = tokio::select! {
        generator = load_generator(&config) => generator?,
        _ = shutdown.cancelled() => {
            tracing::info!("stopped while loading the model");
            stop_heartbeats.cancel();
            return Ok(());
        }
    };
    let ready_at_ms = ebb_nats::now_ms();
    heartbeat.send_modify(|beat| {
        beat.state = WorkerState::Ready;
        beat.ready_at_ms = Some(ready_at_ms);
    });
    tracing::info!(cold_start_ms = ready_at_ms - started_at_ms, "ready");

    let consumers = runner::consumers(&topology).await?;
    let worker = runner::Worker {
        delivery: runner::DeliveryPolicy::of(&consumers[0]),
        consumers,
        config: Arc::new(config),
        identity,
        topology,
        store,
        heartbeat,
    };
    let draining = {
        let shutdown = shutdown.clone();
        let heartbeat = worker.heartbeat.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tracing::info!("draining: finishing the question in hand, taking no more");
            heartbeat.send_modify(|beat| beat.state = WorkerState::Draining);
        })
    };
    let served = worker.serve(generator, shutdown).await;
    worker.set_state(WorkerState::Draining);
    draining.abort();
    stop_heartbeats.cancel();
    let _ = heartbeats.await;
    // Make sure the final acks and events left the process.
    let _ = worker.topology.jetstream.client().flush().await;
    served
}
