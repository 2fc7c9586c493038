//! The OpenAPI document served at `/openapi.json`, generated from the
//! handlers' `#[utoipa::path]` attributes and the types below.
//!
//! Request bodies are the parser's own types ([`crate::request`]); the
//! response types are here.

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::routes::admission::Answered;
use crate::routes::questions::Pending;

#[derive(Debug, Serialize, ToSchema)]
pub struct AssistantMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    pub finish_reason: ebb_nats::FinishReason,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

/// ebb's additions to OpenAI's response.
#[derive(Debug, Serialize, ToSchema)]
pub struct EbbInfo {
    pub question_id: String,
    pub cached: bool,
    pub language: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-<question id>`.
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
    pub ebb: EbbInfo,
}

/// One Server-Sent Event of a `text/event-stream` response. `data` is JSON
/// (a chat chunk, a token, the final record), or `[DONE]` ending a chat.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ServerSentEvent {
    /// `token`, `reset`, `done` or `failed` on question events; absent on
    /// chat chunks.
    event: Option<String>,
    /// The piece's position, on `token` events.
    id: Option<String>,
    data: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelObject {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelObject>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable error name, e.g. `invalid_request`, `rate_limited`, `overloaded`.
    pub r#type: String,
    /// The same as `type` (OpenAI's field).
    pub code: String,
    pub message: String,
    /// The offending field, if one.
    pub param: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "ebb", description = "Scale-to-zero question queue for LLM tutoring: ebb's API and an OpenAI-compatible one."),
    paths(
        crate::routes::questions::post_question,
        crate::routes::questions::get_question,
        crate::routes::events::question_events,
        crate::routes::chat::chat_completions,
        crate::routes::chat::list_models,
        crate::routes::chat::get_model,
        crate::routes::admin::queue,
        crate::routes::admin::scale,
    ),
    components(schemas(ErrorBody, Answered, Pending)),
    modifiers(&Security, &ErrorResponses),
    security(("bearer" = []))
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every operation may answer with any of ebb's errors (one body shape).
struct ErrorResponses;

const ERRORS: [(&str, &str); 11] = [
    ("400", "The body is not JSON (`invalid_json`)"),
    ("401", "Missing or invalid API key (`unauthorized`)"),
    (
        "403",
        "Not allowed, e.g. an API key on an admin route (`forbidden`)",
    ),
    ("404", "No such question or model"),
    ("413", "The body is too large"),
    ("415", "The body is not `application/json`"),
    (
        "422",
        "A field is invalid (`invalid_request`, `param` names it)",
    ),
    ("429", "`rate_limited` or `overloaded`; see `Retry-After`"),
    ("502", "The answer failed, or the scaler is unavailable"),
    (
        "503",
        "Queue, store or waiting slots unavailable; see `Retry-After`",
    ),
    ("504", "No answer in time (`timeout`); the question goes on"),
];

impl Modify for ErrorResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
            ];
            for operation in operations.into_iter().flatten() {
                for (status, description) in ERRORS {
                    let response = ResponseBuilder::new()
                        .description(description)
                        .content(
                            "application/json",
                            ContentBuilder::new()
                                .schema(Some(Ref::from_schema_name("ErrorBody")))
                                .build(),
                        )
                        .build();
                    operation
                        .responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert(response.into());
                }
            }
        }
    }
}

/// The document, as served.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
