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
//! - [`start`]: start phases in heartbeats and logs; the failed heartbeat.
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
pub mod start;
pub mod tiny;

use std::sync::Arc;
use std::time::Instant;

use ebb_nats::{Heartbeat, StartPhase, Topology, WorkerState};
use ebb_store::{Lifecycle, Store};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::Config;
use engine::EngineConfig;
use engine::thread::{EngineHandle, KvBudget};
use generate::{Generator, Prompts};
use model::{HubOptions, ModelFiles, ModelRequest, Qwen};
use start::StartProgress;

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

/// Prompt tokens of the warm-up pass: several, so that the many-row
/// (prefill) kernels run as well as the one-row (decode) step after them.
const WARM_UP_TOKENS: usize = 4;

/// A chat turn the warm-up prompt is taken from.
const WARM_UP_TEXT: &str = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n";

/// Finds, downloads if needed, and loads the configured model, then runs
/// one warm-up forward pass; each phase is reported to `progress`.
pub async fn load_generator(
    config: &Config,
    progress: &StartProgress,
) -> Result<Generator, WorkerError> {
    let download = Instant::now();
    let request = ModelRequest {
        repo: &config.model.repo,
        revision: &config.model.revision,
        dir: config.model_dir.as_deref(),
        gguf_file: config.gguf_file.as_deref(),
        tokenizer_repo: config.tokenizer_repo.as_deref(),
    };
    let hub = HubOptions::from_env(config.download_timeout);
    let heartbeat = progress.heartbeat().clone();
    let report: model::download::ReportFn = Arc::new(move |download| {
        heartbeat.send_modify(|beat| beat.download = Some(download.clone()));
    });
    let files = model::files::resolve_reporting(&request, &hub, Some(report)).await;
    // The download phase is over, done or failed.
    progress
        .heartbeat()
        .send_modify(|beat| beat.download = None);
    let files = files?;
    progress.finished(StartPhase::Download, download.elapsed());
    let device = model::device(config.device)?;
    let dtype = model::dtype(config.dtype, &device);
    let system_prompt = config.system_prompt.clone();
    let engine_config = EngineConfig {
        prefill_chunk: config.prefill_chunk as usize,
        prefix_cache_tokens: config.prefix_cache_tokens as usize,
    };
    let progress = progress.clone();
    let generator = tokio::task::spawn_blocking(move || {
        let (model, prompts) = load_in_parallel(&files, &device, dtype, system_prompt, &progress)?;
        let warm_up = Instant::now();
        let prompt = prompts
            .tokenizer()
            .encode(WARM_UP_TEXT, false)
            .map_err(|err| model::ModelError::Tokenizer {
                path: files.tokenizer.clone(),
                message: err.to_string(),
            })?;
        let ids = prompt.get_ids();
        model.warm_up(&ids[..ids.len().min(WARM_UP_TOKENS)])?;
        progress.finished(StartPhase::WarmUp, warm_up.elapsed());
        Ok::<_, model::ModelError>(Generator::new(model, prompts, engine_config))
    })
    .await
    .expect("model loading does not panic")?;
    Ok(generator)
}

/// The weights on this thread and the tokenizer on another: the tokenizer
/// (a large vocabulary and merge table to parse) is off the critical path.
/// Each phase reports its own duration.
fn load_in_parallel(
    files: &ModelFiles,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    system_prompt: String,
    progress: &StartProgress,
) -> Result<(Qwen, Prompts), model::ModelError> {
    std::thread::scope(|scope| {
        let tokenizer = scope.spawn(|| {
            let started = Instant::now();
            let prompts = Prompts::new(&files.tokenizer, system_prompt)?;
            progress.finished(StartPhase::Tokenizer, started.elapsed());
            Ok::<_, model::ModelError>(prompts)
        });
        let started = Instant::now();
        let model = Qwen::load(files, device, dtype);
        if model.is_ok() {
            progress.finished(StartPhase::Weights, started.elapsed());
        }
        let prompts = tokenizer.join().expect("tokenizer loading does not panic");
        Ok((model?, prompts?))
    })
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
    let client = ebb_nats::connect(&config.services.nats, &worker_id, Some(64)).await?;
    let Some(topology) = open_topology(&client, &config, &shutdown).await else {
        return Ok(());
    };
    let (heartbeat, beats) =
        watch::channel(Heartbeat::loading(&worker_id, &identity, started_at_ms));
    let progress = StartProgress::new(heartbeat.clone());
    // Sent before loading starts, so the first heartbeat anyone sees of a
    // starting worker is `loading` in its first phase, however fast the
    // load (the publisher below coalesces changes).
    let first = heartbeat.borrow().clone();
    if let Err(err) = start::publish_now(&client, &first).await {
        tracing::debug!(cause = %err, "heartbeat not sent");
    }
    let stop_heartbeats = CancellationToken::new();
    let heartbeats = tokio::spawn(runner::publish_heartbeats(
        client.clone(),
        beats,
        stop_heartbeats.clone(),
    ));
    tracing::info!(worker_id, model = %identity, "loading model");
    let loaded = tokio::select! {
        loaded = load(&config, &topology, &progress) => loaded,
        _ = shutdown.cancelled() => {
            tracing::info!("stopped while loading the model");
            stop_heartbeats.cancel();
            return Ok(());
        }
    };
    let Loaded {
        store,
        generator,
        budget,
        slots,
        consumers,
    } = match loaded {
        Ok(loaded) => loaded,
        Err(err) => {
            // The scaler, not only this process's log, must learn why.
            stop_heartbeats.cancel();
            let _ = heartbeats.await;
            start::publish_failure(
                &client,
                &heartbeat,
                ebb_runtime::error_chain::describe(&err),
            )
            .await;
            return Err(err);
        }
    };
    let Generator { engine, prompts } = generator;
    let max_context = engine.model().max_context;
    let engine = EngineHandle::spawn(engine, slots, config.hooks.step_delay());
    let ready_at_ms = ebb_nats::now_ms();
    heartbeat.send_modify(|beat| {
        beat.state = WorkerState::Ready;
        beat.phase = None;
        beat.ready_at_ms = Some(ready_at_ms);
        beat.slots = slots as u32;
    });
    let phases = progress.phases();
    let ms = |phase| start::phase_ms(&phases, phase);
    tracing::info!(
        cold_start_ms = ready_at_ms - started_at_ms,
        download_ms = ms(StartPhase::Download),
        weights_ms = ms(StartPhase::Weights),
        tokenizer_ms = ms(StartPhase::Tokenizer),
        warm_up_ms = ms(StartPhase::WarmUp),
        slots,
        "ready"
    );

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
        gate: runner::PullGate::default(),
    });
    let served = serve_until_drained(&worker, shutdown).await;
    stop_heartbeats.cancel();
    let _ = heartbeats.await;
    // Make sure the final acks and events left the process.
    let _ = worker.topology.jetstream.client().flush().await;
    served
}

/// What a worker needs to serve, made while it is `loading`.
struct Loaded {
    store: Store,
    generator: Generator,
    budget: Arc<KvBudget>,
    slots: usize,
    consumers: Vec<async_nats::jetstream::consumer::PullConsumer>,
}

/// Everything that can stop a worker from starting once its heartbeat is
/// live, so that any such failure reaches the scaler.
async fn load(
    config: &Config,
    topology: &Topology,
    progress: &StartProgress,
) -> Result<Loaded, WorkerError> {
    let store = Store::connect(&config.services.redis)?;
    let generator = load_generator(config, progress).await?;
    let budget = kv_budget(config, &generator)?;
    let slots = config.max_batch.map_or_else(
        || default_slots(generator.engine.model().forward.device()),
        |slots| slots as usize,
    );
    let consumers = runner::consumers(topology).await?;
    Ok(Loaded {
        store,
        generator,
        budget,
        slots,
        consumers,
    })
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
