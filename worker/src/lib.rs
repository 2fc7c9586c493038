//! `ebb-worker`: answers queued questions with a Qwen2 model on candle.
//!
//! # Layout
//! - [`config`]: flags, env vars and the `tiny-model` subcommand.
//! - [`model`]: finding/downloading model files, loading them, and the
//!   batched Qwen2 forward pass ([`model::Qwen`]).
//! - [`engine`]: continuous batching: scheduler, sequences, engine thread,
//!   KV memory budget.
//! - [`generate`]: the ChatML prompt and its shared prefix; streamed text.
//! - [`runner`]: keeps the batch's slots full from JetStream; heartbeats.
//! - [`job`]: one question: record, answer, stream, acknowledge, retry.
//! - [`serving_order`]: priorities with aging.
//! - [`tiny`]: the random-weight model for tests, demos and benchmarks.
//!
//! [`run`] serves until `shutdown` is cancelled, finishes every question in
//! flight, and returns: that is how scale-down drains a worker.

pub mod config;
pub mod engine;
pub mod generate;
mod job;
pub mod model;
pub mod runner;
pub mod serving_order;
pub mod tiny;

use std::sync::Arc;

use ebb_nats::{Heartbeat, Topology, WorkerState};
use ebb_store::{Lifecycle, Store};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::Config;
use engine::EngineConfig;
use engine::thread::{EngineHandle, KvBudget};
use generate::{Generator, Prompts};
use model::{HubOptions, ModelRequest, Qwen};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Queue(#[from] ebb_nats::QueueError),
    #[error(transparent)]
    Store(#[from] ebb_store::StoreError),
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error("NATS: {0}")]
    Nats(async_nats::Error),
    #[error("--{flag}: {message}")]
    Flag { flag: &'static str, message: String },
    #[error("the model engine thread stopped")]
    EngineStopped,
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
    let engine_config = EngineConfig {
        prefill_chunk: config.prefill_chunk as usize,
        prefix_cache_tokens: config.prefix_cache_tokens as usize,
    };
    let generator = tokio::task::spawn_blocking(move || {
        let model = Qwen::load(&files, &device, dtype)?;
        let prompts = Prompts::new(&files.tokenizer, system_prompt)?;
        Ok::<_, model::ModelError>(Generator::new(model, prompts, engine_config))
    })
    .await
    .expect("model loading does not panic")?;
    Ok(generator)
}

/// The KV budget: `--kv-cache-mib`, or what the device has left after the
/// model, less the prefix cache's share.
fn kv_budget(config: &Config, generator: &Generator) -> Result<Arc<KvBudget>, WorkerError> {
    let per_token = generator.engine.kv_bytes_per_token() as u64;
    let total = match config.kv_cache_mib {
        Some(mib) => mib << 20,
        None => model::default_kv_budget_bytes(generator.engine.model().forward.device())?,
    };
    let prefixes = u64::from(config.prefix_cache_tokens) * per_token;
    let for_sequences = total.checked_sub(prefixes).filter(|b| *b >= per_token).ok_or_else(|| {
        WorkerError::Flag {
            flag: "kv-cache-mib",
            message: format!(
                "{} MiB cannot hold the prefix cache ({} tokens = {} MiB, --prefix-cache-tokens) and a question",
                total >> 20,
                config.prefix_cache_tokens,
                prefixes >> 20
            ),
        }
    })?;
    let budget = KvBudget::new(for_sequences, per_token as usize);
    tracing::info!(
        kv_cache_mib = total >> 20,
        positions = budget.total_positions(),
        bytes_per_token = per_token,
        prefix_cache_tokens = config.prefix_cache_tokens,
        "KV cache budget"
    );
    Ok(budget)
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
    let Some(topology) = open_topology(&client, &config, &shutdown).await else {
        return Ok(());
    };
    let store = Store::connect_lazy(&config.services.redis_url)?;

    let (heartbeat, beats) = watch::channel(loading(&worker_id, &identity, started_at_ms));
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
    let budget = kv_budget(&config, &generator)?;
    let slots = config.max_batch.map_or_else(
        || default_slots(generator.engine.model().forward.device()),
        |slots| slots as usize,
    );
    let Generator { engine, prompts } = generator;
    let max_context = engine.model().max_context;
    let engine = EngineHandle::spawn(engine, slots, config.hooks.step_delay());
    let ready_at_ms = ebb_nats::now_ms();
    heartbeat.send_modify(|beat| {
        beat.state = WorkerState::Ready;
        beat.ready_at_ms = Some(ready_at_ms);
        beat.slots = slots as u32;
    });
    tracing::info!(cold_start_ms = ready_at_ms - started_at_ms, slots, "ready");

    let consumers = runner::consumers(&topology).await?;
    let worker = Arc::new(runner::Worker {
        delivery: runner::DeliveryPolicy::of(&consumers[0]),
        consumers,
        config: Arc::new(config),
        identity,
        lifecycle: Lifecycle::new(topology.jetstream.clone(), store.clone()),
        topology,
        store,
        heartbeat,
        engine,
        budget,
        prompts,
        max_context,
        slots,
        memory: runner::MemoryGate::default(),
    });
    let served = serve_until_drained(&worker, shutdown).await;
    stop_heartbeats.cancel();
    let _ = heartbeats.await;
    // Make sure the final acks and events left the process.
    let _ = worker.topology.jetstream.client().flush().await;
    served
}

/// The gateway owns the topology: a worker started first (or alone) waits
/// for it rather than imposing its own flags on the queue. `None`: stopped
/// while waiting.
async fn open_topology(
    client: &async_nats::Client,
    config: &Config,
    shutdown: &CancellationToken,
) -> Option<Topology> {
    let open = ebb_runtime::backoff::retry_startup("open the queue topology", || {
        Topology::open(client.clone(), &config.queue)
    });
    tokio::select! {
        topology = open => Some(topology),
        _ = shutdown.cancelled() => {
            tracing::info!("stopped while waiting for the queue topology");
            None
        }
    }
}

/// The heartbeat of a worker still loading its model.
fn loading(worker_id: &str, identity: &str, started_at_ms: u64) -> Heartbeat {
    Heartbeat {
        worker_id: worker_id.to_owned(),
        state: WorkerState::Loading,
        model: identity.to_owned(),
        started_at_ms,
        ready_at_ms: None,
        jobs_done: 0,
        jobs_failed: 0,
        slots: 0,
        active: 0,
        prefill_tokens: 0,
        prefill_tokens_saved: 0,
        last_tokens_per_second: None,
        mean_job_ms: None,
        mean_response_ms: None,
        sent_at_ms: started_at_ms,
    }
}

/// `--max-batch` when not given: a GPU's step is cheap at 32 rows, two CPU
/// cores' is not.
fn default_slots(device: &candle_core::Device) -> usize {
    if device.is_cuda() { 32 } else { 8 }
}

/// Serves until `shutdown`, then announces the drain and finishes what is
/// in flight.
async fn serve_until_drained(
    worker: &Arc<runner::Worker>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let draining = {
        let shutdown = shutdown.clone();
        let worker = worker.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tracing::info!("draining: finishing the questions in flight, taking no more");
            worker.set_state(WorkerState::Draining);
        })
    };
    let served = worker.clone().serve(shutdown).await;
    worker.set_state(WorkerState::Draining);
    draining.abort();
    served
}
