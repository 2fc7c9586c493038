//! `ebb-scaler`: decides how many workers run, from queue depth, latency,
//! heartbeats and the school timetable, and makes it so, down to zero and
//! back.
//!
//! # Layout
//! - [`config`]: the YAML config file, validated with errors naming the key.
//! - [`cron`] and [`timetable`]: 5-field cron in IANA time zones; windows
//!   that put a floor under the worker count.
//! - [`policy`]: the pure [`policy::decide`] and its inputs and outputs;
//!   [`learned`]: timetable windows that learn their floor.
//! - [`signals`]: arrivals, heartbeats and pool listings into an observation.
//! - [`pool`]: the [`pool::WorkerPool`] trait and the process backend.
//! - [`scaler`]: the loop: observe, decide, reconcile.
//! - [`http`]: `/status`, `/scale`, `/metrics`, `/healthz`.
//! - [`simulate`]: the trace replay (`simulate`) and school-day trace
//!   generator (`gen-trace`), running the same [`policy::decide`].
//!
//! [`run`] serves until `shutdown` resolves; `main` only parses flags.

pub mod config;
pub use ebb_nats::cron;
pub mod http;
pub mod learned;
pub mod policy;
pub mod pool;
pub mod scaler;
pub mod signals;
pub mod simulate;
pub use ebb_nats::timetable;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use ebb_nats::{Heartbeat, subjects};
use futures::StreamExt;
use tokio::net::TcpListener;

use config::{BackendConfig, ScalerConfig};
use policy::Policy;
use pool::WorkerPool;
use pool::docker::DockerPool;
use pool::process::ProcessPool;
use scaler::{Scaler, Shared};
use timetable::Timetable;

#[derive(Debug, thiserror::Error)]
pub enum ScalerError {
    #[error(transparent)]
    Queue(#[from] ebb_nats::QueueError),
    #[error("NATS: {0}")]
    Nats(async_nats::Error),
    #[error(transparent)]
    Pool(#[from] pool::PoolError),
    #[error("HTTP server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// Connects, adopts the workers it started before, and scales until
/// `shutdown`. Workers keep running when the scaler stops.
pub async fn run(
    config: ScalerConfig,
    timetable: Timetable,
    nats_url: &str,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ScalerError> {
    let client = ebb_nats::connect(nats_url, "ebb-scaler", None).await?;
    let questions = wait_for_queue(&client).await?;
    let grace = config.health.stop_grace;
    match config.backend.clone() {
        BackendConfig::Process(process) => {
            let pool = ProcessPool::open(process, grace)?;
            serve(
                config, timetable, client, questions, pool, listener, shutdown,
            )
            .await
        }
        BackendConfig::Docker(docker) => {
            let pool = DockerPool::connect(docker, grace).await?;
            serve(
                config, timetable, client, questions, pool, listener, shutdown,
            )
            .await
        }
    }
}

/// Runs the loop over `pool` and the HTTP API until `shutdown`.
async fn serve<P: WorkerPool + 'static>(
    config: ScalerConfig,
    timetable: Timetable,
    client: async_nats::Client,
    questions: async_nats::jetstream::stream::Stream,
    pool: P,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ScalerError> {
    let shared = Arc::new(Shared::default());
    let admin_token = std::env::var(&config.admin_token_env)
        .ok()
        .filter(|token| !token.is_empty());
    if admin_token.is_none() {
        tracing::warn!(variable = %config.admin_token_env, "no admin token: POST /scale is disabled");
    }
    let api = Arc::new(http::ApiState {
        shared: shared.clone(),
        admin_token,
        max_instances: config.resources.max_instances,
    });
    listen_for_signals(&client, &shared, &config).await?;

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let scaler = Scaler::new(Policy::new(config, timetable), pool, questions, shared);
    let scaling = tokio::spawn(scaler.run(async {
        let _ = stopped.await;
    }));
    tracing::info!(address = %listener.local_addr()?, "scaler listening");
    let served = axum::serve(listener, http::router(api))
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = stop.send(());
    let _ = scaling.await;
    Ok(served?)
}

/// The scaler only reads the queue; it waits for the gateway or a worker to
/// create it rather than imposing limits of its own.
async fn wait_for_queue(
    client: &async_nats::Client,
) -> Result<async_nats::jetstream::stream::Stream, ScalerError> {
    let jetstream = ebb_nats::Topology::context(client.clone());
    let mut logged = false;
    loop {
        match jetstream.get_stream(subjects::QUESTIONS_STREAM).await {
            Ok(stream) => return Ok(stream),
            Err(err) if !logged => {
                tracing::warn!(cause = %err, "question stream not there yet; waiting for the gateway to create it");
                logged = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Feeds question arrivals and heartbeats into the shared signals. An
/// arrival while no worker is wanted wakes the loop at once.
async fn listen_for_signals(
    client: &async_nats::Client,
    shared: &Arc<Shared>,
    config: &ScalerConfig,
) -> Result<(), ScalerError> {
    *shared.signals.lock().expect("signals lock") = Some(signals::Signals::new(&config.target));
    let mut arrivals = client
        .subscribe(subjects::QUESTIONS_WILDCARD)
        .await
        .map_err(|err| ScalerError::Nats(err.into()))?;
    let mut heartbeats = client
        .subscribe(subjects::HEARTBEAT)
        .await
        .map_err(|err| ScalerError::Nats(err.into()))?;
    let on_arrival = shared.clone();
    tokio::spawn(async move {
        while arrivals.next().await.is_some() {
            if let Some(signals) = on_arrival.signals.lock().expect("signals lock").as_mut() {
                signals.question_arrived(Utc::now());
            }
            if on_arrival.asleep.load(Ordering::Relaxed) {
                on_arrival.wake.notify_one();
            }
        }
    });
    let on_heartbeat = shared.clone();
    tokio::spawn(async move {
        while let Some(message) = heartbeats.next().await {
            match serde_json::from_slice::<Heartbeat>(&message.payload) {
                Ok(beat) => {
                    if let Some(signals) =
                        on_heartbeat.signals.lock().expect("signals lock").as_mut()
                    {
                        signals.heartbeat(beat, Utc::now());
                    }
                }
                Err(err) => tracing::debug!(cause = %err, "unreadable heartbeat"),
            }
        }
    });
    Ok(())
}
