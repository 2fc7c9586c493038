//! HTTP handlers. Each returns `Result<_, ApiError>`; [`ApiError`] alone
//! decides status codes and error bodies.
//!
//! # Layout
//! - [`admission`]: what every question goes through (language, webhook
//!   target, cache, shedding, priority, publish).
//! - [`questions`]: `POST /v1/questions`, `GET /v1/questions/{id}`.
//! - [`chat`]: `POST /v1/chat/completions`, `GET /v1/models`.
//! - [`events`]: `GET /v1/questions/{id}/events` and the relay the chat
//!   stream shares.
//! - [`admin`]: the `/admin/*` routes.
//! - here: the state, the router, the auth and rate-limit middleware.

pub mod admin;
pub mod admission;
pub mod chat;
pub mod events;
pub mod feed;
pub mod questions;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ebb_nats::Topology;
use ebb_store::Store;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::auth::{Caller, Keys};
use crate::config::{Config, LimitArgs, WebhookArgs};
use crate::error::ApiError;
use crate::metrics::{Metrics, Rejection};
use crate::overload::Overload;
use crate::priority::PriorityRules;
use crate::question::Limits;
use crate::rate_limit::{Decision, RateLimiter};
use crate::shared_limits::ClientLimits;

/// Largest request body accepted (a chat carries its history).
pub const MAX_BODY_BYTES: usize = 128 * 1024;

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    pub model: String,
    pub model_identity: String,
    pub limits: Limits,
    pub topology: Topology,
    pub store: Store,
    /// Bounds the requests held open for an answer or a stream.
    pub waiting: Arc<Semaphore>,
    /// The same, per API key (one entry per configured key: bounded).
    pub waiting_per_key: HashMap<String, Arc<Semaphore>>,
    pub max_waiting_per_key: u32,
    pub keys: Keys,
    pub rate_limits: LimitArgs,
    /// Questions per client IP and per key, shared by every gateway.
    pub client_limits: ClientLimits,
    /// Failed authentications, by client bucket (see `--auth-failures-per-ip`).
    pub auth_failures: RateLimiter<IpAddr>,
    pub priority: PriorityRules,
    pub overload: Arc<Overload>,
    pub webhooks: WebhookArgs,
    pub metrics: Metrics,
    /// Hot answers in this gateway's memory, in front of Redis's cache.
    pub hot_cache: Arc<crate::hot_cache::HotCache>,
    pub sse_keep_alive: Duration,
    pub body_timeout: Duration,
    /// The scalers' addresses (in the order tried) and their token.
    pub scaler: Option<(Vec<String>, Option<String>)>,
    pub http: reqwest::Client,
}

impl AppState {
    pub fn new(
        config: Config,
        keys: Keys,
        priority: PriorityRules,
        topology: Topology,
        store: Store,
    ) -> Self {
        AppState {
            model_identity: config.model.identity(),
            model: config.model.repo,
            limits: Limits {
                default_max_tokens: config.default_max_tokens,
                max_tokens_limit: config.max_tokens_limit,
            },
            topology,
            store: store.clone(),
            waiting: Arc::new(Semaphore::new(config.max_waiting)),
            waiting_per_key: keys
                .names()
                .map(|name| {
                    (
                        name.to_owned(),
                        Arc::new(Semaphore::new(config.max_waiting_per_key as usize)),
                    )
                })
                .collect(),
            max_waiting_per_key: config.max_waiting_per_key,
            keys,
            client_limits: ClientLimits::new(store.clone(), config.limits.max_clients),
            auth_failures: RateLimiter::new(config.limits.max_clients),
            rate_limits: config.limits,
            priority,
            overload: Arc::new(Overload::new(config.overload, Some(store.clone()))),
            webhooks: config.webhooks,
            metrics: Metrics::default(),
            hot_cache: Arc::new(crate::hot_cache::HotCache::new(config.hot_cache_mib)),
            sse_keep_alive: config.sse_keep_alive,
            body_timeout: config.body_timeout,
            scaler: (!config.scaler_url.is_empty())
                .then_some((config.scaler_url, config.scaler_token)),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("HTTP client builds"),
        }
    }

    /// Whether `model` names the served model (its id, or `id@revision`).
    pub fn serves(&self, model: &str) -> bool {
        model == self.model || model == self.model_identity
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let limited = middleware::from_fn_with_state(state.clone(), rate_limit);
    let public = Router::new()
        .route(
            "/v1/questions",
            post(questions::post_question).layer(limited.clone()),
        )
        .route("/v1/questions/{id}", get(questions::get_question))
        .route("/v1/questions/{id}/events", get(events::question_events))
        .route(
            "/v1/chat/completions",
            post(chat::chat_completions).layer(limited),
        )
        .route("/v1/models", get(chat::list_models))
        .route("/v1/models/{*model}", get(chat::get_model))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let admin = Router::new()
        .route("/admin/queue", get(admin::queue))
        .route("/admin/scale", post(admin::scale))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            authenticate_admin,
        ));
    Router::new()
        .merge(public)
        .merge(admin)
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(|uri: Uri| async move { ApiError::RouteNotFound(uri.path().to_owned()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        .with_state(state)
}

/// Reads the whole request body within `--body-timeout` and
/// [`MAX_BODY_BYTES`] before any handler runs: a client that trickles its
/// body gets `408 body_timeout` instead of holding a connection open.
async fn read_body(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let read = axum::body::to_bytes(body, MAX_BODY_BYTES);
    let bytes = match tokio::time::timeout(state.body_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(err)) => {
            let too_large = err
                .into_inner()
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            return Err(match too_large {
                true => ApiError::PayloadTooLarge {
                    limit: MAX_BODY_BYTES,
                },
                false => ApiError::InvalidJson("the request body could not be read".into()),
            });
        }
        Err(_) => {
            return Err(ApiError::BodyTimeout {
                limit: state.body_timeout,
            });
        }
    };
    Ok(next
        .run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await)
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
}

async fn authenticate(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let caller = within_failure_budget(&state, peer, request.headers(), |credential| {
        state.keys.caller(credential)
    })?;
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

async fn authenticate_admin(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    within_failure_budget(&state, peer, request.headers(), |credential| {
        state.keys.admin(credential)
    })?;
    Ok(next.run(request).await)
}

/// Runs a credential check under the client's budget of failures: a client
/// out of budget is refused (`429`) before its credential is looked at, and
/// each `401` spends from the budget.
fn within_failure_budget<T>(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    check: impl FnOnce(Option<&str>) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let ip = crate::rate_limit::client_ip(peer.ip(), headers, &state.rate_limits.trusted_proxies);
    let client = crate::rate_limit::bucket_of(ip);
    let budget = state.rate_limits.auth_failures_per_ip;
    let now = Instant::now();
    if let Some(retry_after) = state.auth_failures.exhausted(&client, budget, now) {
        state.metrics.rejected(Rejection::AuthFailures);
        return Err(ApiError::RateLimited { retry_after });
    }
    check(authorization(headers)).inspect_err(|err| {
        if matches!(err, ApiError::Unauthorized(_)) {
            state.auth_failures.take(&client, budget, now);
        }
    })
}

/// One token from the client IP's bucket and, with a key, the key's bucket
/// (shared by all gateways through Redis); the stricter decision is reported in `X-RateLimit-*` headers.
async fn rate_limit(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let ip = crate::rate_limit::client_ip(
        peer.ip(),
        request.headers(),
        &state.rate_limits.trusted_proxies,
    );
    let client = crate::rate_limit::bucket_of(ip);
    let key = match request.extensions().get::<Caller>() {
        Some(Caller::Key { name, per_minute }) => Some((name.as_str(), *per_minute)),
        _ => None,
    };
    let decision = state
        .client_limits
        .take(client, state.rate_limits.per_ip, key)
        .await;
    let mut response = if decision.allowed {
        next.run(request).await
    } else {
        state.metrics.rejected(Rejection::RateLimited);
        ApiError::RateLimited {
            retry_after: decision.retry_after,
        }
        .into_response()
    };
    rate_limit_headers(response.headers_mut(), decision);
    response
}

/// Checked once, not on every response (a name given as a `&str` is
/// validated at each insert).
static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

fn rate_limit_headers(headers: &mut HeaderMap, decision: Decision) {
    let reset = decision.reset.as_secs_f64().ceil() as u64;
    headers.insert(&RATELIMIT_LIMIT, HeaderValue::from(decision.limit));
    headers.insert(&RATELIMIT_REMAINING, HeaderValue::from(decision.remaining));
    headers.insert(&RATELIMIT_RESET, HeaderValue::from(reset));
}

/// Whether NATS is connected and Redis answers a ping now.
async fn dependencies(state: &AppState) -> crate::metrics::Dependencies {
    crate::metrics::Dependencies {
        nats: state.topology.jetstream.client().connection_state()
            == async_nats::connection::State::Connected,
        redis: state.store.ping().await.is_ok(),
    }
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let up = dependencies(&state).await;
    let (nats_ok, redis_ok) = (up.nats, up.redis);
    let status = if nats_ok && redis_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let part = |ok: bool| if ok { "ok" } else { "unavailable" };
    let body = json!({
        "status": if status == StatusCode::OK { "healthy" } else { "unhealthy" },
        "model": state.model,
        "nats": part(nats_ok),
        "redis": part(redis_ok),
    });
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let (waiting, service_time) = state.overload.snapshot();
    let up = dependencies(&state).await;
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        state
            .metrics
            .render(waiting, service_time.as_secs_f64(), up),
    )
        .into_response()
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(crate::openapi::document())
}

/// Only `application/json` bodies are read.
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if json {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// The body, with axum's rejections mapped to ours.
pub fn body_bytes(
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::body::Bytes, ApiError> {
    body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge {
            limit: MAX_BODY_BYTES,
        },
        _ => ApiError::InvalidJson(rejection.body_text()),
    })
}
