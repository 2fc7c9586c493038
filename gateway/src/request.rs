//! Request bodies exactly as the API takes them: serde types that are also
//! the OpenAPI schemas, so the document cannot drift from the parser.
//! [`parse`] names the offending field by its path (`messages[2].role`);
//! [`crate::question`] and [`crate::chat`] validate these into domain types.
//!
//! Unknown fields are refused, so a misspelt `max_token` is a 422 naming it
//! rather than a silently ignored limit. Fields are `Option` where the
//! gateway says "is required" itself: serde's message for a missing field
//! would point at the object, not at the field.

use std::fmt;

use serde::de::{self, DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use utoipa::ToSchema;

use crate::error::ApiError;

/// Parses a JSON object body into `T`.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // A struct would also deserialize from an array; the API takes objects.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::InvalidJson(
            "the body must be a JSON object".into(),
        ));
    }
    let mut json = serde_json::Deserializer::from_slice(body);
    let parsed = serde_path_to_error::deserialize(&mut json).map_err(|err| {
        let field = err.path().to_string();
        let err = err.into_inner();
        if err.is_data() && field != "." {
            ApiError::invalid(field, err.to_string())
        } else {
            ApiError::InvalidJson(err.to_string())
        }
    })?;
    json.end()
        .map_err(|err| ApiError::InvalidJson(err.to_string()))?;
    Ok(parsed)
}

/// Adds ebb's context fields (grade, course, language, callback URL) to a
/// request body type. A macro, not a `flatten`ed struct: serde cannot refuse
/// unknown fields next to a `flatten`, and refusing them is the point.
macro_rules! with_context_fields {
    ($(#[$meta:meta])* pub struct $name:ident { $($fields:tt)* }) => {
        $(#[$meta])*
        pub struct $name {
            $($fields)*
            #[schema(minimum = 0, maximum = 13)]
            pub grade: Option<u8>,
            #[schema(max_length = 100)]
            pub course: Option<String>,
            /// Language to answer in; detected from the question when absent.
            #[schema(max_length = 35)]
            pub language: Option<String>,
            /// http(s) URL that receives the final record, signed (README: Webhooks).
            #[schema(max_length = 2048, format = "uri")]
            pub callback_url: Option<String>,
        }
    };
}

with_context_fields! {
/// `POST /v1/questions` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuestionRequest {
    /// The question, at most 4000 characters after trimming.
    #[schema(required = true, min_length = 1, max_length = 4000)]
    pub question: Option<String>,
    /// Up to the gateway's --max-tokens-limit (default 4096).
    #[schema(minimum = 1, maximum = 4096)]
    pub max_tokens: Option<u32>,
    /// How long to hold the request open for the answer (default 30).
    #[schema(minimum = 0, maximum = 120)]
    pub wait_seconds: Option<f64>,
}
}

with_context_fields! {
/// `POST /v1/chat/completions` body: OpenAI's documented parameters (those
/// ebb cannot honour are accepted and ignored, README lists them) plus
/// ebb's own optional fields.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionRequest {
    /// The served model's id (optional; others are 404 `model_not_found`).
    pub model: Option<String>,
    /// The conversation; the last message must be the user's question.
    #[schema(required = true, min_items = 1, max_items = 64)]
    pub messages: Option<Vec<RequestMessage>>,
    #[schema(minimum = 1, maximum = 4096)]
    pub max_tokens: Option<u32>,
    /// Preferred over `max_tokens` when both are given.
    #[schema(minimum = 1, maximum = 4096)]
    pub max_completion_tokens: Option<u32>,
    /// 0 (the default here) is greedy and cacheable.
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f64>,
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f64>,
    #[schema(minimum = 0)]
    pub seed: Option<u64>,
    #[schema(minimum = 1, maximum = 1)]
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// The app's id for its end user; accepted, never logged.
    #[schema(max_length = 256)]
    pub user: Option<String>,
    // OpenAI's parameters that ebb accepts and does not act on: none
    // changes what a tutor's answer must be, and clients send several by
    // default (README lists them).
    pub audio: Option<Value>,
    pub frequency_penalty: Option<Value>,
    pub function_call: Option<Value>,
    pub functions: Option<Value>,
    pub logit_bias: Option<Value>,
    pub logprobs: Option<Value>,
    pub metadata: Option<Value>,
    pub modalities: Option<Value>,
    pub parallel_tool_calls: Option<Value>,
    pub prediction: Option<Value>,
    pub presence_penalty: Option<Value>,
    pub prompt_cache_key: Option<Value>,
    pub reasoning_effort: Option<Value>,
    pub response_format: Option<Value>,
    pub safety_identifier: Option<Value>,
    pub service_tier: Option<Value>,
    pub stop: Option<Value>,
    pub store: Option<Value>,
    pub tool_choice: Option<Value>,
    pub tools: Option<Value>,
    pub top_logprobs: Option<Value>,
    pub verbosity: Option<Value>,
    pub web_search_options: Option<Value>,
}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChatRole {
    System,
    Developer,
    User,
    Assistant,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestMessage {
    pub role: ChatRole,
    pub content: MessageContent,
    /// OpenAI's participant name; accepted, not used.
    pub name: Option<String>,
}

/// A message's text: a string, or content parts of which only text ones
/// are supported.
#[derive(Debug, PartialEq, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<TextPart>),
}

impl MessageContent {
    pub fn into_text(self) -> String {
        match self {
            MessageContent::Text(text) => text,
            MessageContent::Parts(parts) => parts.into_iter().map(|part| part.text).collect(),
        }
    }
}

// By hand rather than `untagged`: an untagged enum reports only "did not
// match any variant", where this names the part and why.
impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Content;
        impl<'de> Visitor<'de> for Content {
            type Value = MessageContent;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of text parts")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(text.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MessageContent, A::Error> {
                let mut parts = Vec::new();
                while let Some(part) = seq.next_element()? {
                    parts.push(part);
                }
                Ok(MessageContent::Parts(parts))
            }
        }
        deserializer.deserialize_any(Content)
    }
}

#[derive(Debug, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TextPart {
    pub r#type: TextPartType,
    pub text: String,
}

#[derive(Debug, PartialEq, Deserialize, ToSchema)]
pub enum TextPartType {
    #[serde(rename = "text")]
    Text,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    /// OpenAI's stream obfuscation; accepted, not used.
    pub include_obfuscation: Option<Value>,
}
