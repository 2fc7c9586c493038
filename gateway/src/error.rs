//! The one mapping from gateway errors to HTTP: every error body is
//! `{"error":{"type","message"}}` (plus `field` for a bad field), and each
//! `type` string is stable API.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

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
        field: &'static str,
        message: String,
    },
    #[error("no question with id `{0}`")]
    QuestionNotFound(String),
    #[error("no route for {0}")]
    RouteNotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the question queue is full; retry later")]
    QueueFull,
    #[error("the question queue is unavailable: {0}")]
    QueueUnavailable(String),
    #[error("the status store is unavailable: {0}")]
    StoreUnavailable(String),
}

impl ApiError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        ApiError::InvalidField {
            field,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::InvalidJson(_) => StatusCode::BAD_REQUEST,
            ApiError::InvalidField { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::QuestionNotFound(_) | ApiError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::QueueFull | ApiError::QueueUnavailable(_) | ApiError::StoreUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// Stable machine-readable name of the error.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidField { .. } => "invalid_request",
            ApiError::QuestionNotFound(_) | ApiError::RouteNotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::QueueFull => "queue_full",
            ApiError::QueueUnavailable(_) => "queue_unavailable",
            ApiError::StoreUnavailable(_) => "store_unavailable",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error_type = self.error_type(), cause = %self, "request failed");
        }
        let mut error = json!({"type": self.error_type(), "message": self.to_string()});
        if let ApiError::InvalidField { field, .. } = &self {
            error["field"] = json!(field);
        }
        let mut response = (status, axum::Json(json!({ "error": error }))).into_response();
        if matches!(self, ApiError::QueueFull | ApiError::QueueUnavailable(_)) {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, 1.into());
        }
        response
    }
}
