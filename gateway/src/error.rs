//! The one mapping from gateway errors to HTTP. Every error body is
//! `{"error":{"type","message","param","code"}}` (plus `field` for a bad
//! field): ebb's shape and OpenAI's at once, so OpenAI clients raise their
//! usual exceptions. `type` (= `code`) strings are stable API.

use std::borrow::Cow;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::openapi::{ErrorBody, ErrorDetail};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("`{field}` {message}")]
    InvalidField {
        /// The field's path in the body, e.g. `messages[2].role`.
        field: Cow<'static, str>,
        message: String,
    },
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("no question with id `{0}`")]
    QuestionNotFound(String),
    #[error("this gateway serves `{served}`, not `{asked}`")]
    ModelNotFound { asked: String, served: String },
    #[error("no route for {0}")]
    RouteNotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("rate limit reached; retry in {} s", seconds(*retry_after))]
    RateLimited { retry_after: Duration },
    #[error("too many questions are waiting to be answered in time; retry in {} s", seconds(*retry_after))]
    Overloaded { retry_after: Duration },
    #[error("too many requests are waiting for answers; retry later")]
    TooManyWaiting,
    #[error(
        "this API key holds {limit} requests open for answers already (--max-waiting-per-key); end one, or ask with wait_seconds 0 and poll"
    )]
    TooManyWaitingForKey { limit: u32 },
    #[error(
        "this API key has {limit} webhook calls waiting for delivery (--max-queued-webhooks-per-key); ask without callback_url, or when its receiver has caught up"
    )]
    TooManyWebhooksForKey { limit: u64 },
    #[error("the question queue is full; retry later")]
    QueueFull,
    #[error("the question queue is unavailable: {0}")]
    QueueUnavailable(String),
    #[error("the status store is unavailable: {0}")]
    StoreUnavailable(String),
    #[error("the answer failed: {0}")]
    AnswerFailed(String),
    #[error("no answer within {} s; question `{id}` is still {status}: GET /v1/questions/{id}", seconds(*waited))]
    AnswerTimeout {
        id: String,
        status: &'static str,
        waited: Duration,
    },
    #[error("the scaler is unavailable: {0}")]
    ScalerUnavailable(String),
    #[error("this Idempotency-Key was first used with a different request")]
    IdempotencyKeyReused,
    #[error("the request body took longer than {} s to arrive", seconds(*limit))]
    BodyTimeout { limit: Duration },
}

/// Whole seconds, rounded up, at least 1: what `Retry-After` carries.
fn seconds(duration: Duration) -> u64 {
    duration.as_secs_f64().ceil().max(1.0) as u64
}

impl ApiError {
    pub fn invalid(field: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        ApiError::InvalidField {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::InvalidJson(_) => StatusCode::BAD_REQUEST,
            ApiError::InvalidField { .. } | ApiError::IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::QuestionNotFound(_)
            | ApiError::RouteNotFound(_)
            | ApiError::ModelNotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::RateLimited { .. }
            | ApiError::Overloaded { .. }
            | ApiError::TooManyWaitingForKey { .. }
            | ApiError::TooManyWebhooksForKey { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::TooManyWaiting
            | ApiError::QueueFull
            | ApiError::QueueUnavailable(_)
            | ApiError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::AnswerFailed(_) | ApiError::ScalerUnavailable(_) => StatusCode::BAD_GATEWAY,
            ApiError::AnswerTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Stable machine-readable name of the error.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidField { .. } => "invalid_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::QuestionNotFound(_) | ApiError::RouteNotFound(_) => "not_found",
            ApiError::ModelNotFound { .. } => "model_not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::TooManyWaiting => "too_many_waiting",
            ApiError::TooManyWaitingForKey { .. } => "too_many_waiting_for_key",
            ApiError::TooManyWebhooksForKey { .. } => "too_many_webhooks_for_key",
            ApiError::QueueFull => "queue_full",
            ApiError::QueueUnavailable(_) => "queue_unavailable",
            ApiError::StoreUnavailable(_) => "store_unavailable",
            ApiError::AnswerFailed(_) => "answer_failed",
            ApiError::AnswerTimeout { .. } => "timeout",
            ApiError::ScalerUnavailable(_) => "scaler_unavailable",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::BodyTimeout { .. } => "body_timeout",
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after } | ApiError::Overloaded { retry_after } => {
                Some(seconds(*retry_after))
            }
            ApiError::QueueFull
            | ApiError::QueueUnavailable(_)
            | ApiError::TooManyWaiting
            | ApiError::TooManyWaitingForKey { .. } => Some(1),
            _ => None,
        }
    }

    /// The JSON body (also sent as an SSE `error` event mid-stream).
    pub fn body(&self) -> serde_json::Value {
        let field = match self {
            ApiError::InvalidField { field, .. } => Some(&**field),
            ApiError::ModelNotFound { .. } => Some("model"),
            ApiError::IdempotencyKeyReused => Some("Idempotency-Key"),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                r#type: self.error_type().to_owned(),
                code: self.error_type().to_owned(),
                message: self.to_string(),
                param: field.map(str::to_owned),
                field: field.map(str::to_owned),
            },
        };
        serde_json::to_value(body).expect("errors serialize")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error_type = self.error_type(), cause = %self, "request failed");
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, seconds.into());
        }
        if matches!(self, ApiError::Unauthorized(_)) {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
