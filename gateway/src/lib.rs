//! `ebb-gateway`: the HTTP API in front of the question queue.
//!
//! A question is checked at the edge (API key, rate limit, body), answered
//! from memory or the Redis cache when it is hot, shed when the queue could not serve
//! it in time, and otherwise published to JetStream with its priority; the
//! request then waits for the worker's answer, streams it, or returns a
//! status URL.
//!
//! # Layout
//! - [`config`]: flags, env vars and the `--config` file ([`Config`]).
//! - [`request`]: the request bodies as serde types, which are also their
//!   OpenAPI schemas; [`question`] and [`chat`] validate them into
//!   [`question::NewQuestion`]; the cache key; OpenAI's response shapes.
//! - [`error`]: the single error -> HTTP mapping ([`error::ApiError`]).
//! - [`auth`], [`shared_limits`] (over [`rate_limit`]), [`overload`]: who
//!   may ask, how often (counted across gateways in Redis), and whether the
//!   queue can take more; [`idempotency`]: a retried request
//!   gets the question it already asked.
//! - [`priority`]: what a question is queued with.
//! - [`hot_cache`]: the most asked answers in memory, in front of Redis.
//! - [`queue`]: publishing a job (stored by JetStream before it returns).
//! - [`webhook`]: delivering `callback_url` calls.
//! - [`routes`]: the axum handlers; `routes::admission` is what every
//!   question goes through, `routes::feed` the one relay of an answer that
//!   `/events` and streamed chat map over; [`openapi`]: `/openapi.json`;
//!   [`metrics`]: `/metrics` (prometheus-client).
//!
//! [`run`] serves until `shutdown` resolves; `main` only parses flags.

pub mod auth;
pub mod chat;
pub mod config;
pub mod error;
pub mod hot_cache;
pub mod idempotency;
pub mod metrics;
pub mod openapi;
pub mod overload;
pub mod priority;
pub mod question;
pub mod queue;
pub mod rate_limit;
pub mod request;
pub mod routes;
pub mod shared_limits;
pub mod webhook;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ebb_nats::Topology;
use ebb_store::{Lifecycle, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
use config::{ConfigError, FileConfig};
use priority::PriorityRules;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Queue(#[from] ebb_nats::QueueError),
    #[error(transparent)]
    Store(#[from] ebb_store::StoreError),
    #[error(transparent)]
    Secret(#[from] ebb_runtime::LoginError),
    #[error("HTTP server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// Fills each secret given as a file (`--admin-token-file`, ...), and
/// drops empty ones (compose passes unset secrets as empty variables).
fn read_secrets(config: &mut Config) -> Result<(), ebb_runtime::LoginError> {
    for (secret, file, flag) in [
        (
            &mut config.admin_token,
            &config.admin_token_file,
            "--admin-token-file",
        ),
        (
            &mut config.webhooks.webhook_secret,
            &config.webhooks.webhook_secret_file,
            "--webhook-secret-file",
        ),
        (
            &mut config.scaler_token,
            &config.scaler_token_file,
            "--scaler-token-file",
        ),
    ] {
        if let Some(path) = file {
            *secret = Some(ebb_runtime::args::read_secret(path, flag)?);
        }
        if secret.as_deref() == Some("") {
            *secret = None;
        }
    }
    Ok(())
}

/// Validates the config, sets up the queue topology, then serves the API on
/// `listener` until `shutdown` resolves; in-flight requests may finish.
pub async fn run(
    mut config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    read_secrets(&mut config)?;
    let (keys, priority) = access_rules(&config)?;
    let client = ebb_nats::connect(&config.services.nats, "ebb-gateway", None).await?;
    let topology = ensure_topology(client, &config).await;
    let store = Store::connect(&config.services.redis)?;
    let webhook_args = config.webhooks.clone();
    let state = Arc::new(routes::AppState::new(
        config,
        keys,
        priority,
        topology.clone(),
        store.clone(),
    ));
    let stop = CancellationToken::new();
    let mut background = tokio::task::JoinSet::new();
    background.spawn(ebb_store::run_reaper(
        topology.clone(),
        Lifecycle::new(topology.jetstream.clone(), store),
        stop.clone().cancelled_owned(),
    ));
    background.spawn(webhook::run(
        webhook_args,
        topology.clone(),
        stop.clone().cancelled_owned(),
    ));
    background.spawn(ebb_store::janitor::run_janitor(
        topology.clone(),
        Lifecycle::new(topology.jetstream.clone(), state.store.clone()),
        stop.clone().cancelled_owned(),
    ));
    let overload = state.overload.clone();
    let watch_stop = stop.clone();
    background.spawn(async move { overload.watch(topology, watch_stop.cancelled_owned()).await });
    background.spawn(sweep_rate_limits(state.clone(), stop.clone()));
    background.spawn(report_cache_hits(state.clone(), stop.clone()));
    background.spawn(hot_cache::keep_popularity(
        state.hot_cache.clone(),
        state.store.clone(),
        stop.clone().cancelled_owned(),
    ));
    // Before serving: a restart at a class break must not send every hot
    // question to Redis at once.
    let warmed = hot_cache::warm(&state.hot_cache, &state.store).await;
    tracing::info!(
        entries = warmed,
        "hot cache warmed from the most asked answers"
    );

    tracing::info!(address = %listener.local_addr()?, "gateway listening");
    let app = routes::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    stop.cancel();
    while background.join_next().await.is_some() {}
    Ok(served?)
}

/// The API keys and priority rules of `--config`, with errors naming the file.
fn access_rules(config: &Config) -> Result<(auth::Keys, PriorityRules), GatewayError> {
    let file = FileConfig::load(config.config_file.as_deref())?;
    let invalid = |message: String| ConfigError::Invalid {
        path: config.config_file.clone().unwrap_or_default(),
        message,
    };
    let keys = auth::Keys::new(
        &file.api_keys,
        config.admin_token.as_deref(),
        config.insecure_dev,
        config.limits.per_key,
    )
    .map_err(invalid)?;
    if keys.is_empty() && !config.insecure_dev {
        return Err(ConfigError::NoKeys.into());
    }
    if config.insecure_dev {
        tracing::warn!("--insecure-dev: serving without API keys; never do this in production");
    }
    let priority = PriorityRules::new(file.priority, &file.timetable).map_err(invalid)?;
    Ok((keys, priority))
}

/// Forgets idle clients' rate-limit buckets once a minute, so the map stays
/// bounded by the clients of the last minutes.
async fn sweep_rate_limits(state: Arc<routes::AppState>, stop: CancellationToken) {
    let mut every_minute = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every_minute.tick() => {
                state
                    .client_limits
                    .sweep(state.rate_limits.per_ip, Instant::now());
                state
                    .auth_failures
                    .sweep(state.rate_limits.auth_failures_per_ip, Instant::now());
            }
        }
    }
}

/// Tells the scaler's console the cache hits of each second (they never
/// reach the queue, so nothing else shows them there). A report lost to a
/// NATS outage only leaves a dip in a plot.
async fn report_cache_hits(state: Arc<routes::AppState>, stop: CancellationToken) {
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    let client = state.topology.jetstream.client();
    let mut reported = state.metrics.cache_hits();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every_second.tick() => {
                let total = state.metrics.cache_hits();
                let hits = total - reported;
                if hits == 0 {
                    continue;
                }
                reported = total;
                let body = serde_json::to_vec(&ebb_nats::CacheHits { hits }).expect("serializes");
                if let Err(err) = client.publish(ebb_nats::subjects::CACHE_HITS, body.into()).await {
                    tracing::debug!(cause = %err, "cannot report cache hits");
                }
            }
        }
    }
}

/// The gateway owns the queue topology: it accepts the questions, so the
/// queue's bounds are its flags; workers and the scaler only open it.
/// NATS may still be starting (compose brings everything up at once).
async fn ensure_topology(client: async_nats::Client, config: &Config) -> Topology {
    ebb_runtime::backoff::retry_startup("create the queue topology", || {
        Topology::ensure(client.clone(), &config.queue)
    })
    .await
}
