//! `ebb-scaler`: decides how many workers run, from queue depth, latency,
//! heartbeats and the school timetable, and makes it so, down to zero and
//! back.
//!
//! # Layout
//! The decision itself is `ebb-control` ([`ebb_control::controller::Controller`],
//! pure, shared with the simulator in `ebb-sim`); this crate carries it out.
//! - [`pool`]: the [`pool::WorkerPool`] trait and the process backend.
//! - [`scaler`]: the loop: list, step the controller, carry out its plan.
//! - [`http`]: `/status`, `/scale`, `/metrics`, `/healthz`.
//! - [`memory`]: learned timetable profiles kept in NATS KV across restarts.
//! - [`lease`]: one active scaler per pool, the others standing by.
//!
//! [`run`] serves until `shutdown` resolves; `main` only parses flags.

pub mod console;
pub mod http;
pub mod lease;
pub mod memory;
pub mod metrics;
pub mod pool;
pub mod scaler;
pub mod traffic;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::Utc;
use ebb_nats::{FleetStatus, Heartbeat, subjects};
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use ebb_control::config::{BackendConfig, ScalerConfig};
use ebb_control::controller::{Controller, EbbPolicy};
use ebb_control::policy::Policy;
use pool::WorkerPool;
use pool::docker::DockerPool;
use pool::process::ProcessPool;
use scaler::{Scaler, Shared, Startup};

/// The flags of a running scaler beyond its config file.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub nats: ebb_runtime::NatsArgs,
    #[command(flatten)]
    pub lease: lease::LeaseArgs,
    #[command(flatten)]
    pub console: console::ConsoleArgs,
}

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
    #[error(transparent)]
    Secret(#[from] ebb_runtime::LoginError),
}

/// Serves the HTTP API at once (`/healthz` answers 503 naming what the
/// scaler still waits for), connects, adopts the workers it started before,
/// and scales until `shutdown`. Workers keep running when the scaler stops.
pub async fn run(
    config: ScalerConfig,
    args: &RunArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ScalerError> {
    let stopping = CancellationToken::new();
    let controller = Controller::new(
        EbbPolicy::new(Policy::new(config.clone())),
        config.health.clone(),
        config.target.slots_per_worker,
    );
    let shared = Arc::new(Shared::new(
        controller,
        args.lease.id(),
        args.console.console_step,
    ));
    tokio::spawn(console::keep_history(shared.clone(), stopping.clone()));
    let api = tokio::spawn(serve_api(
        api_state(&config, &shared)?,
        listener,
        stopping.clone(),
    ));
    let on_signal = stopping.clone();
    tokio::spawn(async move {
        shutdown.await;
        on_signal.cancel();
    });
    let scaled = start_and_scale(config, args, shared, stopping.clone()).await;
    stopping.cancel();
    let served = api.await.expect("the API task does not panic");
    scaled.and(served)
}

/// Waits for what the loop needs, then runs it until `stopping`.
async fn start_and_scale(
    config: ScalerConfig,
    args: &RunArgs,
    shared: Arc<Shared>,
    stopping: CancellationToken,
) -> Result<(), ScalerError> {
    let connect = async {
        shared.starting(Startup::Nats);
        let client = ebb_nats::connect(&args.nats, "ebb-scaler", None).await?;
        shared.starting(Startup::QuestionStream);
        let questions = wait_for_queue(&client).await?;
        listen_for_signals(&client, &shared).await?;
        Ok::<_, ScalerError>((client, questions))
    };
    // Kept to the end: the subscriptions feeding the signals live on it.
    let (client, questions) = tokio::select! {
        connected = connect => connected?,
        () = stopping.cancelled() => return Ok(()),
    };
    tokio::spawn(publish_fleet_status(
        client.clone(),
        fleet_status_of(&config),
        stopping.clone(),
    ));
    // Kept as safe as the queue: as many copies as its stream has.
    let replicas = questions.cached_info().config.num_replicas;
    let keeper = memory::remember(&client, &config, replicas, &shared, &stopping).await;
    // Active or standby before it reports ready, so `/scale` and
    // `/status` answer for the role it has.
    shared.starting(Startup::Lease);
    let (decided, first_decision) = tokio::sync::oneshot::channel();
    tokio::spawn(lease::keep(
        client.clone(),
        config.backend.pool().to_owned(),
        args.lease.clone(),
        replicas,
        shared.lease.clone(),
        decided,
        stopping.clone(),
    ));
    let stopped_first = tokio::select! {
        _ = first_decision => false,
        () = stopping.cancelled() => true,
    };
    if stopped_first {
        if let Some(keeper) = keeper {
            let _ = keeper.await;
        }
        return Ok(());
    }
    shared.starting(Startup::Pool);
    let grace = config.health.stop_grace;
    let scaled = match config.backend {
        BackendConfig::Process(process) => {
            let pool = ProcessPool::open(process, grace)?;
            scale(
                Scaler::new(pool, client.clone(), questions, shared, config.tick),
                stopping,
            )
            .await
        }
        BackendConfig::Docker(docker) => {
            let pool = DockerPool::connect(docker, grace).await?;
            scale(
                Scaler::new(pool, client.clone(), questions, shared, config.tick),
                stopping,
            )
            .await
        }
    };
    if let Some(keeper) = keeper {
        // The last save, made once the loop has stopped.
        let _ = keeper.await;
    }
    scaled
}

async fn scale<P: WorkerPool + 'static>(
    scaler: Scaler<P>,
    stopping: CancellationToken,
) -> Result<(), ScalerError> {
    scaler.shared.starting(Startup::Ready);
    scaler.run(stopping.cancelled_owned()).await;
    Ok(())
}

/// What this scaler announces on [`subjects::SCALER_STATUS`], but the time.
fn fleet_status_of(config: &ScalerConfig) -> FleetStatus {
    FleetStatus {
        max_workers: config.resources.max_instances,
        slots_per_worker: Some(config.target.slots_per_worker),
        published_at_ms: 0,
    }
}

/// Announces the fleet's limits at once and every [`FleetStatus::INTERVAL`]
/// until `stopping`. Its own timer, not the decision loop's: at zero workers
/// the loop sleeps until the next arrival or timetable window, and readers
/// would take the quiet for a scaler gone.
async fn publish_fleet_status(
    client: async_nats::Client,
    mut status: FleetStatus,
    stopping: CancellationToken,
) {
    let mut every = tokio::time::interval(FleetStatus::INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stopping.cancelled() => return,
            _ = every.tick() => {}
        }
        status.published_at_ms = ebb_nats::now_ms();
        let payload = serde_json::to_vec(&status).expect("a FleetStatus serializes");
        // Core NATS, fire and forget: a lost one is replaced by the next.
        if let Err(err) = client
            .publish(subjects::SCALER_STATUS, payload.into())
            .await
        {
            tracing::debug!(cause = %err, "fleet status not published");
        }
    }
}

fn api_state(
    config: &ScalerConfig,
    shared: &Arc<Shared>,
) -> Result<Arc<http::ApiState>, ebb_runtime::LoginError> {
    let admin_token = admin_token(&config.admin_token_env)?;
    if admin_token.is_none() {
        tracing::warn!(variable = %config.admin_token_env, "no admin token: POST /scale is disabled");
    }
    Ok(Arc::new(http::ApiState {
        shared: shared.clone(),
        admin_token,
        max_instances: config.resources.max_instances,
    }))
}

async fn serve_api(
    api: Arc<http::ApiState>,
    listener: TcpListener,
    stopping: CancellationToken,
) -> Result<(), ScalerError> {
    tracing::info!(address = %listener.local_addr()?, "scaler listening");
    let app = http::router(api).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(stopping.cancelled_owned())
        .await?;
    Ok(())
}

/// The scaler only reads the queue; it waits for the gateway to create it
/// rather than imposing limits of its own.
async fn wait_for_queue(
    client: &async_nats::Client,
) -> Result<async_nats::jetstream::stream::Stream, ScalerError> {
    let open = || ebb_nats::Topology::question_stream(client.clone());
    Ok(ebb_runtime::backoff::retry_startup("open the question stream", open).await)
}

/// The token in the variable `variable`, or in the file its `_FILE`
/// variant names (compose's, so the token is in no environment).
fn admin_token(variable: &str) -> Result<Option<String>, ebb_runtime::LoginError> {
    if let Some(path) = std::env::var_os(format!("{variable}_FILE")) {
        let flag = "the admin token file (EBB_SCALER_ADMIN_TOKEN_FILE)";
        return ebb_runtime::args::read_secret(std::path::Path::new(&path), flag).map(Some);
    }
    Ok(std::env::var(variable)
        .ok()
        .filter(|token| !token.is_empty()))
}

/// Feeds question arrivals and heartbeats into the shared signals, and
/// answers' timings and cache hits into the traffic tally. An arrival while
/// no worker is wanted wakes the loop at once.
async fn listen_for_signals(
    client: &async_nats::Client,
    shared: &Arc<Shared>,
) -> Result<(), ScalerError> {
    let subscribe = |subject: &'static str| async move {
        client
            .subscribe(subject)
            .await
            .map_err(|err| ScalerError::Nats(err.into()))
    };
    let mut arrivals = subscribe(subjects::QUESTIONS_WILDCARD).await?;
    let on_arrival = shared.clone();
    tokio::spawn(async move {
        while arrivals.next().await.is_some() {
            on_arrival.traffic.arrived();
            on_arrival
                .controller
                .lock()
                .expect("controller lock")
                .question_arrived(Utc::now());
            if on_arrival.asleep.load(Ordering::Relaxed) {
                on_arrival.wake.notify_one();
            }
        }
    });
    let on_heartbeat = shared.clone();
    spawn_reader::<Heartbeat>(subscribe(subjects::HEARTBEAT).await?, move |beat| {
        on_heartbeat
            .controller
            .lock()
            .expect("controller lock")
            .heartbeat(beat, Utc::now())
    });
    let on_answer = shared.clone();
    spawn_reader::<ebb_nats::Timings>(subscribe(subjects::ANSWERED).await?, move |timings| {
        on_answer.traffic.answered(&timings)
    });
    let on_hits = shared.clone();
    spawn_reader::<ebb_nats::CacheHits>(subscribe(subjects::CACHE_HITS).await?, move |report| {
        on_hits.traffic.cache_hits(report.hits)
    });
    Ok(())
}

/// Hands each readable message of `messages` to `on_message`.
fn spawn_reader<T: serde::de::DeserializeOwned>(
    mut messages: async_nats::Subscriber,
    on_message: impl Fn(T) + Send + 'static,
) {
    tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match serde_json::from_slice::<T>(&message.payload) {
                Ok(value) => on_message(value),
                Err(err) => {
                    tracing::debug!(subject = %message.subject, cause = %err, "unreadable message")
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fleet_status_carries_the_configured_limits() {
        let config = ScalerConfig::parse(
            "resources: {min_instances: 0, max_instances: 3}\ntarget: {slots_per_worker: 8}\nbackend: {kind: process, command: /bin/true}\n",
        )
        .unwrap();
        let status = fleet_status_of(&config);
        assert_eq!(status.max_workers, 3);
        assert_eq!(status.slots_per_worker, Some(8));
    }
}
