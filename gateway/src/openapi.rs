//! The OpenAPI document served at `/openapi.json`, generated from the
//! handlers' `#[utoipa::path]` attributes and the types below.
//!
//! Request bodies are parsed by hand (for errors that name the field), so
//! their schemas are the `*Request` types here; a test sends every example
//! the schema allows and checks none is refused as malformed JSON.

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::routes::admission::Answered;
use crate::routes::questions::Pending;

/// `POST /v1/questions` body.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct QuestionRequest {
    /// The question, at most 4000 characters after trimming.
    #[schema(min_length = 1, max_length = 4000)]
    question: String,
    #[schema(minimum = 0, maximum = 13)]
    grade: Option<u8>,
    #[schema(max_length = 100)]
    course: Option<String>,
    /// Language to answer in; detected from the question when absent.
    #[schema(max_length = 35)]
    language: Option<String>,
    /// Up to the gateway's --max-tokens-limit (default 4096).
    #[schema(minimum = 1, maximum = 4096)]
    max_tokens: Option<u32>,
    /// How long to hold the request open for the answer (default 30).
    #[schema(minimum = 0, maximum = 120)]
    wait_seconds: Option<f64>,
    /// http(s) URL that receives the final record, signed (README: Webhooks).
    #[schema(max_length = 2048, format = "uri")]
    callback_url: Option<String>,
}

#[derive(Debug, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum ChatRole {
    System,
    Developer,
    User,
    Assistant,
}

#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub enum TextPartType {
    #[serde(rename = "text")]
    Text,
}

#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct TextPart {
    r#type: TextPartType,
    text: String,
}

#[derive(Debug, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<TextPart>),
}

#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct RequestMessage {
    role: ChatRole,
    content: MessageContent,
}

#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct StreamOptions {
    include_usage: Option<bool>,
}

/// `POST /v1/chat/completions` body: OpenAI's, plus ebb's optional fields.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ChatCompletionRequest {
    /// The served model's id (optional; others are 404 `model_not_found`).
    model: Option<String>,
    /// The conversation; the last message must be the user's question.
    #[schema(min_items = 1, max_items = 64)]
    messages: Vec<RequestMessage>,
    #[schema(minimum = 1, maximum = 4096)]
    max_tokens: Option<u32>,
    #[schema(minimum = 1, maximum = 4096)]
    max_completion_tokens: Option<u32>,
    /// 0 (the default here) is greedy and cacheable.
    #[schema(minimum = 0, maximum = 2)]
    temperature: Option<f64>,
    #[schema(exclusive_minimum = 0, maximum = 1)]
    top_p: Option<f64>,
    #[schema(minimum = 0)]
    seed: Option<u64>,
    #[schema(minimum = 1, maximum = 1)]
    n: Option<u32>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    /// The app's id for its end user; accepted, never logged.
    #[schema(max_length = 256)]
    user: Option<String>,
    #[schema(minimum = 0, maximum = 13)]
    grade: Option<u8>,
    #[schema(max_length = 100)]
    course: Option<String>,
    #[schema(max_length = 35)]
    language: Option<String>,
    #[schema(max_length = 2048, format = "uri")]
    callback_url: Option<String>,
}

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
