//! The scaler's HTTP API: `GET /status`, `POST /scale` (admin token),
//! `GET /metrics` (OpenMetrics text, see [`crate::metrics`]), `GET /healthz`,
//! and the operator console under `/console` (see [`crate::console`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde_json::{Value, json};

use crate::lease::LeaseView;
use crate::scaler::{Shared, Startup};
use ebb_control::policy::Override;

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
        .merge(crate::console::routes())
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
pub(crate) fn same_token(given: &[u8], expected: &[u8]) -> bool {
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

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    let text = crate::metrics::text(&state.shared);
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::same_token;

    #[test]
    fn tokens_match_only_exactly() {
        assert!(same_token(b"secret", b"secret"));
        assert!(!same_token(b"secreT", b"secret"));
        assert!(!same_token(b"secret-and-more", b"secret"));
        assert!(!same_token(b"", b"secret"));
    }
}
