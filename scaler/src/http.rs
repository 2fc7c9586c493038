//! The scaler's HTTP API: `GET /status`, `POST /scale` (admin token),
//! `GET /metrics` (OpenMetrics text), `GET /healthz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use serde_json::{Value, json};

use crate::lease::LeaseView;
use crate::scaler::{Shared, Startup, Status};
use ebb_control::policy::Override;
use ebb_control::signals::WorkerView;

/// Longest a manual override may last.
const MAX_OVERRIDE_TTL_SECONDS: u64 = 7 * 86_400;
const DEFAULT_OVERRIDE_TTL_SECONDS: u64 = 3_600;

#[derive(Debug)]
pub struct ApiState {
    pub shared: Arc<Shared>,
    /// The bearer token for `POST /scale`; `None` disables manual overrides.
    pub admin_token: Option<String>,
    pub max_instances: u32,
}

/// Errors of the scaler API, as `{"error":{"type","message"}}`.
#[derive(Debug)]
enum ApiError {
    Unauthorized,
    Disabled,
    InvalidJson(String),
    Invalid {
        field: &'static str,
        message: String,
    },
    NotFound,
    MethodNotAllowed,
    TooLarge,
    /// Another scaler of the pool is the active one (`holder`, if known).
    Standby(Option<String>),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error_type, message, field) = match self {
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid admin bearer token is required".to_owned(),
                None,
            ),
            ApiError::Disabled => (
                StatusCode::FORBIDDEN,
                "overrides_disabled",
                "manual overrides are disabled: no admin token is configured".to_owned(),
                None,
            ),
            ApiError::InvalidJson(message) => {
                (StatusCode::BAD_REQUEST, "invalid_json", message, None)
            }
            ApiError::Invalid { field, message } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                format!("`{field}` {message}"),
                Some(field),
            ),
            ApiError::NotFound => (
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route".to_owned(),
                None,
            ),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed".to_owned(),
                None,
            ),
            ApiError::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the body is larger than 4 KiB".to_owned(),
                None,
            ),
            ApiError::Standby(holder) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "standby",
                match holder {
                    Some(holder) => format!("this scaler stands by; the active one is {holder}"),
                    None => "this scaler stands by (no active scaler known yet)".to_owned(),
                },
                None,
            ),
        };
        let mut error = json!({"type": error_type, "message": message});
        if let Some(field) = field {
            error["field"] = json!(field);
        }
        let mut response = (status, Json(json!({ "error": error }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/scale", post(scale))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::extract::DefaultBodyLimit::max(4096))
        .with_state(state)
}

/// 200 once the loop runs; 503 naming what a starting scaler waits for,
/// so an orchestrator sees it alive but not ready.
async fn healthz(State(state): State<Arc<ApiState>>) -> Response {
    match state.shared.startup() {
        Startup::Ready => Json(json!({"status": "healthy"})).into_response(),
        waiting => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "starting", "waiting_for": waiting.to_string()})),
        )
            .into_response(),
    }
}

async fn status(State(state): State<Arc<ApiState>>) -> Json<crate::scaler::Status> {
    Json(state.shared.status())
}

/// Compares digests in constant time (as the gateway does its keys), so
/// neither the token's bytes nor its length can be guessed from timing.
fn same_token(given: &[u8], expected: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    bool::from(Sha256::digest(given).ct_eq(&Sha256::digest(expected)))
}

async fn scale(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let Some(expected) = &state.admin_token else {
        return Err(ApiError::Disabled);
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token)
        .ok_or(ApiError::Unauthorized)?;
    if !same_token(given.trim().as_bytes(), expected.as_bytes()) {
        return Err(ApiError::Unauthorized);
    }
    let request: Value = serde_json::from_slice(&body.map_err(|_| ApiError::TooLarge)?)
        .map_err(|err| ApiError::InvalidJson(err.to_string()))?;
    let Value::Object(fields) = request else {
        return Err(ApiError::InvalidJson(
            "the body must be a JSON object".into(),
        ));
    };
    let invalid = |field: &'static str, message: &str| ApiError::Invalid {
        field,
        message: message.to_owned(),
    };
    let action = fields
        .get("action")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("action", "must be \"up\", \"down\" or \"set\""))?;
    let count = match fields.get("count") {
        None | Some(Value::Null) if action != "set" => 1,
        None | Some(Value::Null) => return Err(invalid("count", "is required for \"set\"")),
        Some(value) => value
            .as_u64()
            .filter(|count| *count <= u64::from(state.max_instances).max(1) * 10)
            .ok_or_else(|| invalid("count", "must be a non-negative integer within reason"))?
            as u32,
    };
    let ttl = match fields.get("ttl_seconds") {
        None | Some(Value::Null) => DEFAULT_OVERRIDE_TTL_SECONDS,
        Some(value) => value
            .as_u64()
            .filter(|ttl| (1..=MAX_OVERRIDE_TTL_SECONDS).contains(ttl))
            .ok_or_else(|| invalid("ttl_seconds", "must be an integer from 1 to 604800"))?,
    };
    // Only the active scaler acts on an override: a standby would keep it
    // until it takes over, hours later perhaps.
    match state.shared.lease.view(std::time::Instant::now()) {
        LeaseView::Active { .. } => {}
        LeaseView::Standby { holder, .. } => return Err(ApiError::Standby(holder)),
        LeaseView::Starting => return Err(ApiError::Standby(None)),
    }
    let current = state.shared.status().desired;
    let target = match action {
        "up" => current.saturating_add(count),
        "down" => current.saturating_sub(count),
        "set" => count,
        _ => return Err(invalid("action", "must be \"up\", \"down\" or \"set\"")),
    };
    let manual = Override {
        count: target,
        expires: Utc::now() + chrono::Duration::seconds(ttl as i64),
    };
    tracing::info!(action, count = target, ttl_seconds = ttl, "manual override");
    *state.shared.pending_override.lock().expect("override lock") = Some(manual.clone());
    state.shared.wake.notify_one();
    Ok(Json(
        json!({"accepted": true, "count": target, "expires": manual.expires, "note": "clamped to min/max_instances"}),
    ))
}

/// What `/metrics` is served as: Prometheus reads the `_total` counter
/// names and `# EOF` of this format, which its classic text parser would not.
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Bucket bounds of `ebb_scaler_activation_delay_seconds`. The process
/// backend issues a start within milliseconds, a container can take seconds,
/// and a start held back by restart backoff or a slow pool minutes: the
/// bounds span 1 ms to 10 min so each of those lands in a bucket of its own.
const ACTIVATION_DELAY_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// The activation delay histogram; the loop observes each activation as it
/// happens, so the distribution covers every one, not a recent window.
/// Restart delays use the same bounds.
pub fn activation_delay_histogram() -> Histogram {
    Histogram::new(ACTIVATION_DELAY_BUCKETS)
}

/// Bucket bounds of `ebb_scaler_worker_start_phase_seconds`: a tokenizer
/// loads in milliseconds, a model download can take half an hour.
const START_PHASE_BUCKETS: [f64; 16] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
    1800.0,
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

/// The time of each start phase workers reported, by phase (four phases:
/// a bounded label set).
#[derive(Debug, Clone)]
pub struct StartPhaseHistograms(Family<PhaseLabels, Histogram, fn() -> Histogram>);

impl Default for StartPhaseHistograms {
    fn default() -> Self {
        StartPhaseHistograms(Family::new_with_constructor(|| {
            Histogram::new(START_PHASE_BUCKETS)
        }))
    }
}

impl StartPhaseHistograms {
    pub fn observe(&self, time: ebb_nats::PhaseTime) {
        let labels = PhaseLabels {
            phase: time.phase.as_str(),
        };
        self.0
            .get_or_create(&labels)
            .observe(time.ms as f64 / 1000.0);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// Worker ids are the pool's own names, one per worker it has: bounded by
/// `max_instances`, never text from a client.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WorkerLabels {
    worker: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PriorityLabels {
    priority: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

fn int_gauge(value: impl Into<i64>) -> Gauge {
    let gauge = Gauge::default();
    gauge.set(value.into());
    gauge
}

fn float_gauge(value: f64) -> Gauge<f64, AtomicU64> {
    let gauge = Gauge::default();
    gauge.set(value);
    gauge
}

fn gauges<S>(samples: impl IntoIterator<Item = (S, i64)>) -> Family<S, Gauge>
where
    S: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug,
{
    let family = Family::<S, Gauge>::default();
    for (labels, value) in samples {
        family.get_or_create(&labels).set(value);
    }
    family
}

/// Counters whose totals are kept elsewhere (heartbeats, the status): set
/// to the current total at each scrape.
fn counters<S>(samples: impl IntoIterator<Item = (S, u64)>) -> Family<S, Counter>
where
    S: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug,
{
    let family = Family::<S, Counter>::default();
    for (labels, value) in samples {
        family.get_or_create(&labels).inc_by(value);
    }
    family
}

/// The workers: wanted, by state, their slots, and each one's own readings.
fn register_workers(registry: &mut Registry, status: &Status) {
    let actual = status.actual;
    registry.register(
        "ebb_scaler_desired_workers",
        "Workers the scaler wants running",
        int_gauge(status.desired),
    );
    let states = [
        ("starting", actual.starting),
        ("idle", actual.idle),
        ("busy", actual.busy),
        ("draining", actual.draining),
        ("unhealthy", actual.unhealthy),
    ];
    registry.register(
        "ebb_scaler_workers",
        "Workers by state",
        gauges(states.map(|(state, n)| (StateLabels { state }, n.into()))),
    );
    let kinds = [("total", actual.slots), ("active", actual.active_slots)];
    registry.register(
        "ebb_scaler_slots",
        "Slots (questions answered at once) of ready workers: all, and in use",
        gauges(kinds.map(|(kind, n)| (KindLabels { kind }, n.into()))),
    );
    registry.register(
        "ebb_scaler_slots_per_worker",
        "Slots per worker the plan counts on (reported, or the config's)",
        int_gauge(status.signals.slots_per_worker),
    );
    let worker = |w: &WorkerView| WorkerLabels {
        worker: w.id.clone(),
    };
    let workers = &status.workers;
    registry.register(
        "ebb_scaler_worker_slots",
        "Slots of each worker, from its heartbeat",
        gauges(workers.iter().map(|w| (worker(w), w.slots.into()))),
    );
    registry.register(
        "ebb_scaler_worker_active_slots",
        "Questions each worker answers now, from its heartbeat",
        gauges(workers.iter().map(|w| (worker(w), w.active.into()))),
    );
    registry.register(
        "ebb_scaler_worker_prefill_tokens",
        "Prompt tokens each worker ran through its model, from its heartbeat",
        counters(workers.iter().map(|w| (worker(w), w.prefill_tokens))),
    );
    registry.register(
        "ebb_scaler_worker_prefill_tokens_saved",
        "Prompt tokens each worker's shared-prompt cache saved it running",
        counters(workers.iter().map(|w| (worker(w), w.prefill_tokens_saved))),
    );
}

/// The queue and what the scaler made of it.
fn register_queue(registry: &mut Registry, status: &Status, asleep: bool) {
    let signals = &status.signals;
    registry.register(
        "ebb_scaler_queue_lag",
        "Questions waiting or being answered",
        int_gauge(i64::try_from(signals.lag).unwrap_or(i64::MAX)),
    );
    let by_priority = status.lag_by_priority.iter().map(|depth| {
        let priority = depth.priority.as_str();
        let lag = i64::try_from(depth.lag()).unwrap_or(i64::MAX);
        (PriorityLabels { priority }, lag)
    });
    registry.register(
        "ebb_scaler_queue_lag_by_priority",
        "Questions waiting or being answered, per priority",
        gauges(by_priority),
    );
    registry.register_with_unit(
        "ebb_scaler_oldest_waiting",
        "Age of the oldest question no worker has taken",
        Unit::Seconds,
        float_gauge(signals.oldest_waiting.as_secs_f64()),
    );
    registry.register(
        "ebb_scaler_arrival_rate",
        "Questions per second (stable window)",
        float_gauge(signals.arrival_rate),
    );
    registry.register(
        "ebb_scaler_asleep",
        "1 while no worker is wanted",
        int_gauge(asleep),
    );
    let decisions = status.decisions_by_reason.iter();
    registry.register(
        "ebb_scaler_decisions",
        "Changes of the desired count, by reason",
        counters(decisions.map(|(&reason, &n)| (ReasonLabels { reason }, n))),
    );
}

/// A registry built per scrape: the values live in the loop's [`Status`],
/// so reading them then is the snapshot; only the histograms live on.
fn render(status: &Status, asleep: bool, shared: &Histograms<'_>) -> String {
    let mut registry = Registry::default();
    register_workers(&mut registry, status);
    register_queue(&mut registry, status, asleep);
    registry.register_with_unit(
        "ebb_scaler_activation_delay",
        "First question at zero workers to worker start issued (restarts after a crash not included)",
        Unit::Seconds,
        shared.activation_delay.clone(),
    );
    registry.register_with_unit(
        "ebb_scaler_restart_delay",
        "Worker lost to its replacement's start issued, the crash backoff included",
        Unit::Seconds,
        shared.restart_delay.clone(),
    );
    registry.register_with_unit(
        "ebb_scaler_worker_start_phase",
        "Time of each start phase of workers' cold starts, as they report it",
        Unit::Seconds,
        shared.start_phases.0.clone(),
    );
    registry.register(
        "ebb_scaler_worker_crashes_in_a_row",
        "Workers lost (crashed, failed to start, unhealthy) since one last came up",
        int_gauge(status.crashes_in_a_row),
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String does not fail");
    text
}

/// The histograms that live across scrapes.
struct Histograms<'a> {
    activation_delay: &'a Histogram,
    restart_delay: &'a Histogram,
    start_phases: &'a StartPhaseHistograms,
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    let shared = &state.shared;
    let histograms = Histograms {
        activation_delay: &shared.activation_delay,
        restart_delay: &shared.restart_delay,
        start_phases: &shared.start_phases,
    };
    let text = render(
        &shared.status(),
        shared.asleep.load(Ordering::Relaxed),
        &histograms,
    );
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::{Histograms, StartPhaseHistograms, activation_delay_histogram, render, same_token};
    use crate::scaler::Status;
    use ebb_control::signals::{Condition, WorkerView};

    #[test]
    fn tokens_match_only_exactly() {
        assert!(same_token(b"secret", b"secret"));
        assert!(!same_token(b"secreT", b"secret"));
        assert!(!same_token(b"secret-and-more", b"secret"));
        assert!(!same_token(b"", b"secret"));
    }

    #[test]
    fn metrics_keep_their_names_and_bucket_activations() {
        let mut status = Status {
            desired: 2,
            ..Status::default()
        };
        status.actual.busy = 1;
        status.decisions_by_reason.insert("backlog", 3);
        status.workers.push(WorkerView {
            id: "ebb-worker-1".into(),
            condition: Condition::Busy,
            started_at: chrono::Utc::now(),
            ready_at_ms: None,
            jobs_done: 0,
            slots: 4,
            active: 1,
            prefill_tokens: 900,
            prefill_tokens_saved: 120,
            why_unhealthy: None,
            state: Some(ebb_nats::WorkerState::Busy),
            phase: None,
            download: None,
            download_text: None,
            start_phases: Vec::new(),
            error: None,
        });
        status.crashes_in_a_row = 2;
        let delays = activation_delay_histogram();
        delays.observe(0.002);
        delays.observe(42.0);
        let restarts = activation_delay_histogram();
        restarts.observe(14.3);
        let phases = StartPhaseHistograms::default();
        for (phase, ms) in [
            (ebb_nats::StartPhase::Weights, 700),
            (ebb_nats::StartPhase::Download, 95_000),
        ] {
            phases.observe(ebb_nats::PhaseTime { phase, ms });
        }
        let histograms = Histograms {
            activation_delay: &delays,
            restart_delay: &restarts,
            start_phases: &phases,
        };
        let text = render(&status, false, &histograms);
        for line in [
            "ebb_scaler_desired_workers 2",
            r#"ebb_scaler_workers{state="busy"} 1"#,
            r#"ebb_scaler_worker_slots{worker="ebb-worker-1"} 4"#,
            r#"ebb_scaler_worker_prefill_tokens_total{worker="ebb-worker-1"} 900"#,
            r#"ebb_scaler_worker_prefill_tokens_saved_total{worker="ebb-worker-1"} 120"#,
            r#"ebb_scaler_decisions_total{reason="backlog"} 3"#,
            "ebb_scaler_asleep 0",
            "# TYPE ebb_scaler_activation_delay_seconds histogram",
            r#"ebb_scaler_activation_delay_seconds_bucket{le="0.0025"} 1"#,
            r#"ebb_scaler_activation_delay_seconds_bucket{le="30.0"} 1"#,
            r#"ebb_scaler_activation_delay_seconds_bucket{le="60.0"} 2"#,
            "ebb_scaler_activation_delay_seconds_count 2",
            "ebb_scaler_restart_delay_seconds_count 1",
            r#"ebb_scaler_restart_delay_seconds_bucket{le="10.0"} 0"#,
            r#"ebb_scaler_restart_delay_seconds_bucket{le="30.0"} 1"#,
            "# TYPE ebb_scaler_worker_start_phase_seconds histogram",
            r#"ebb_scaler_worker_start_phase_seconds_bucket{le="1.0",phase="weights"} 1"#,
            r#"ebb_scaler_worker_start_phase_seconds_bucket{le="60.0",phase="download"} 0"#,
            r#"ebb_scaler_worker_start_phase_seconds_bucket{le="120.0",phase="download"} 1"#,
            "ebb_scaler_worker_crashes_in_a_row 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
