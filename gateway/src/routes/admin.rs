//! `/admin/*`: operator routes behind the admin token.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use crate::error::ApiError;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QueueStatus {
    /// Per priority: `pending`, `ack_pending`, `oldest_waiting` (seconds).
    #[schema(value_type = Object)]
    pub depth: ebb_nats::QueueDepth,
    /// The service time the shedding estimate uses, in seconds.
    pub service_time_seconds: f64,
    /// Client IPs with a rate-limit bucket.
    pub rate_limited_clients: usize,
}

/// Queue depth and the figures shedding decides by.
#[utoipa::path(
    get,
    path = "/admin/queue",
    tag = "admin",
    responses((status = 200, description = "Queue depth", body = QueueStatus))
)]
pub(crate) async fn queue(
    State(state): State<Arc<AppState>>,
) -> Result<Json<QueueStatus>, ApiError> {
    let depth = ebb_nats::queue_depth(&state.topology.questions)
        .await
        .map_err(|err| ApiError::QueueUnavailable(err.to_string()))?;
    let (_, service_time) = state.overload.snapshot();
    Ok(Json(QueueStatus {
        depth,
        service_time_seconds: service_time.as_secs_f64(),
        rate_limited_clients: state.client_limits.local_clients(),
    }))
}

/// Forwards a manual override to the active scaler's `POST /scale` (same
/// body, e.g. `{"action":"set","count":2,"ttl_seconds":600}`), with the
/// scalers' token: each `--scaler-url` in turn, past those that cannot be
/// reached or stand by; the answer of the first other one comes back as it
/// is (or, when none is, the last one's answer or error).
#[utoipa::path(
    post,
    path = "/admin/scale",
    tag = "admin",
    request_body(content = Object, description = "The scaler's /scale body"),
    responses((status = 200, description = "The scaler's answer", body = Object))
)]
pub(crate) async fn scale(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    super::require_json(&headers)?;
    let Some((urls, token)) = &state.scaler else {
        return Err(ApiError::ScalerUnavailable(
            "the gateway has no --scaler-url".into(),
        ));
    };
    let mut outcome = Err(ApiError::ScalerUnavailable("no scaler tried".into()));
    for url in urls {
        outcome = forward(&state.http, url, token.as_deref(), body.clone()).await;
        if let Ok((status, answer)) = &outcome
            && !is_standby(*status, answer)
        {
            break;
        }
    }
    let (status, answer) = outcome?;
    Ok((
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        answer,
    )
        .into_response())
}

/// One scaler's answer to the override.
async fn forward(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: Bytes,
) -> Result<(StatusCode, Bytes), ApiError> {
    let mut request = http
        .post(format!("{}/scale", url.trim_end_matches('/')))
        .header("content-type", "application/json")
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let unavailable = |err: reqwest::Error| ApiError::ScalerUnavailable(format!("{url}: {err}"));
    let response = request.send().await.map_err(unavailable)?;
    let status =
        StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    Ok((status, response.bytes().await.map_err(unavailable)?))
}

/// Whether a scaler refused the override as a standby (its error type).
fn is_standby(status: StatusCode, answer: &[u8]) -> bool {
    status == StatusCode::SERVICE_UNAVAILABLE
        && serde_json::from_slice::<serde_json::Value>(answer)
            .is_ok_and(|body| body["error"]["type"] == "standby")
}
