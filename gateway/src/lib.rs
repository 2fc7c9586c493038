//! `ebb-gateway`: the HTTP API in front of the question queue.
//!
//! A question is validated at the edge, answered from the Redis cache when it
//! is hot, and otherwise published to JetStream; the request then waits (up
//! to `wait_seconds`) for the worker's answer event, or returns a status URL.
//!
//! # Layout
//! - [`config`]: flags and env vars ([`Config`]).
//! - [`question`]: body validation into [`question::NewQuestion`] and the cache key.
//! - [`error`]: the single error -> HTTP mapping ([`error::ApiError`]).
//! - [`queue`]: publishing a job and waiting for its answer.
//! - [`routes`]: the axum handlers.
//!
//! [`run`] serves until `shutdown` resolves; `main` only parses flags.

pub mod config;
pub mod error;
pub mod question;
pub mod queue;
pub mod routes;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ebb_nats::{Store, Topology};
use tokio::net::TcpListener;

pub use config::Config;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Queue(#[from] ebb_nats::QueueError),
    #[error(transparent)]
    Store(#[from] ebb_nats::StoreError),
    #[error("HTTP server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// Sets up the queue topology, then serves the API on `listener` until
/// `shutdown` resolves; in-flight requests are allowed to finish.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let client = ebb_nats::connect(&config.services.nats_url, "ebb-gateway", None).await?;
    let topology = ensure_topology(client, &config).await?;
    let store = Store::connect_lazy(&config.services.redis_url)?;
    let state = Arc::new(routes::AppState::new(
        config,
        topology.clone(),
        store.clone(),
    ));

    let (stop_reaper, reaper_stopped) = tokio::sync::oneshot::channel::<()>();
    let reaper = tokio::spawn(ebb_nats::dead_letter::run_reaper(topology, store, async {
        let _ = reaper_stopped.await;
    }));

    tracing::info!(address = %listener.local_addr()?, "gateway listening");
    axum::serve(listener, routes::router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    let _ = stop_reaper.send(());
    let _ = reaper.await;
    Ok(())
}

/// NATS may still be starting (compose brings everything up at once): retry
/// the topology setup for a while before giving up.
async fn ensure_topology(
    client: async_nats::Client,
    config: &Config,
) -> Result<Topology, GatewayError> {
    let mut attempt = 0;
    loop {
        match Topology::ensure(client.clone(), &config.queue).await {
            Ok(topology) => return Ok(topology),
            Err(err) if attempt < 30 => {
                attempt += 1;
                tracing::warn!(cause = %err, attempt, "queue setup failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(err) => return Err(err.into()),
        }
    }
}
