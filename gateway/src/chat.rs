//! OpenAI's chat completions shape: the request parsed into a
//! [`NewQuestion`] (the last user message is the question, earlier messages
//! its history), and the response and stream chunk bodies.
//!
//! Differences from OpenAI, on purpose: `temperature` defaults to 0 (greedy,
//! so answers are cacheable and repeatable), `n` must be 1, and only text
//! content is accepted. ebb's own fields (`grade`, `course`, `language`,
//! `callback_url`) may ride along (`extra_body` in OpenAI's Python client).

use std::time::Duration;

use ebb_nats::{ChatMessage, FinishReason, Role, Sampling, Timings};
use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::openapi::{AssistantMessage, ChatCompletion, Choice, EbbInfo, Usage};
use crate::question::{
    Context, Limits, MAX_QUESTION_CHARS, NewQuestion, json_object, optional_string, question_text,
};

const MAX_MESSAGES: usize = 64;
/// All messages together, in characters.
const MAX_CONVERSATION_CHARS: usize = 16 * MAX_QUESTION_CHARS;
const MAX_USER_CHARS: usize = 256;

/// A validated chat completions request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub question: NewQuestion,
    /// The `model` the client named, if any.
    pub model: Option<String>,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with token counts.
    pub include_usage: bool,
}

impl ChatRequest {
    pub fn from_json(body: &[u8], limits: Limits) -> Result<ChatRequest, ApiError> {
        let fields = json_object(body)?;
        let mut messages = parse_messages(&fields)?;
        let question = match messages.pop() {
            Some(ChatMessage {
                role: Role::User,
                content,
            }) => question_text(&content, "messages")?,
            _ => {
                return Err(ApiError::invalid(
                    "messages",
                    "must end with a `user` message",
                ));
            }
        };
        let max_tokens_field = if fields.contains_key("max_completion_tokens") {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        let context = Context::from_fields(&fields, limits, max_tokens_field)?;
        let sampling = Sampling {
            temperature: number(&fields, "temperature", 0.0, 2.0)?.unwrap_or(0.0),
            top_p: number(&fields, "top_p", f64::MIN_POSITIVE, 1.0)?.unwrap_or(1.0),
            seed: match fields.get("seed") {
                None | Some(Value::Null) => 0,
                Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64().unwrap_or(0),
                Some(_) => return Err(ApiError::invalid("seed", "must be a non-negative integer")),
            },
        };
        if let Some(n) = fields.get("n").filter(|n| !n.is_null())
            && n.as_u64() != Some(1)
        {
            return Err(ApiError::invalid("n", "must be 1: one answer per question"));
        }
        let stream = boolean(&fields, "stream")?;
        let include_usage = match fields.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(options)) => boolean(options, "include_usage")?,
            Some(_) => return Err(ApiError::invalid("stream_options", "must be an object")),
        };
        // `user` identifies the end user to the app; accepted, never logged.
        optional_string(&fields, "user", MAX_USER_CHARS)?;
        let model = match fields.get("model") {
            None | Some(Value::Null) => None,
            Some(Value::String(model)) => Some(model.clone()),
            Some(_) => return Err(ApiError::invalid("model", "must be a string")),
        };
        let mut question = NewQuestion::new(question, context, sampling, Duration::ZERO);
        question.history = messages;
        Ok(ChatRequest {
            question,
            model,
            stream,
            include_usage,
        })
    }
}

fn parse_messages(fields: &Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let invalid = |message: &str| ApiError::invalid("messages", message);
    let list = match fields.get("messages") {
        None | Some(Value::Null) => return Err(invalid("is required")),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(invalid("must be an array")),
    };
    if list.is_empty() || list.len() > MAX_MESSAGES {
        return Err(invalid(&format!("must hold 1 to {MAX_MESSAGES} messages")));
    }
    let mut total_chars = 0;
    let mut messages = Vec::with_capacity(list.len());
    for (index, message) in list.iter().enumerate() {
        let Value::Object(message) = message else {
            return Err(invalid(&format!("[{index}] must be an object")));
        };
        let role = match message.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some(other) => {
                return Err(invalid(&format!(
                    "[{index}].role `{other}` is not supported (system, developer, user, assistant)"
                )));
            }
            None => return Err(invalid(&format!("[{index}].role is required"))),
        };
        let content = match message.get("content") {
            Some(Value::String(text)) => text.clone(),
            // Content parts: text only.
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.get("type").and_then(Value::as_str), part.get("text")) {
                        (Some("text"), Some(Value::String(piece))) => text.push_str(piece),
                        _ => {
                            return Err(invalid(&format!(
                                "[{index}].content: only text parts are supported"
                            )));
                        }
                    }
                }
                text
            }
            _ => return Err(invalid(&format!("[{index}].content must be a string"))),
        };
        total_chars += content.chars().count();
        if total_chars > MAX_CONVERSATION_CHARS {
            return Err(invalid(&format!(
                "hold more than {MAX_CONVERSATION_CHARS} characters together"
            )));
        }
        messages.push(ChatMessage { role, content });
    }
    Ok(messages)
}

fn number(
    fields: &Map<String, Value>,
    field: &'static str,
    min: f64,
    max: f64,
) -> Result<Option<f64>, ApiError> {
    match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(value) if (min..=max).contains(&value) => Ok(Some(value)),
            _ => Err(ApiError::invalid(
                field,
                format!(
                    "must be a number from {} to {max}",
                    if min > 0.0 { "above 0" } else { "0" }
                ),
            )),
        },
        Some(_) => Err(ApiError::invalid(field, "must be a number")),
    }
}

fn boolean(fields: &Map<String, Value>, field: &'static str) -> Result<bool, ApiError> {
    match fields.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(value)) => Ok(*value),
        Some(_) => Err(ApiError::invalid(field, "must be true or false")),
    }
}

/// `chatcmpl-<question id>`: the question can be looked up from the id.
pub fn completion_id(question_id: &str) -> String {
    format!("chatcmpl-{question_id}")
}

/// Token counts as OpenAI reports them (zeros for a cached answer).
fn usage(timings: Option<Timings>) -> Usage {
    let (prompt_tokens, completion_tokens) =
        timings.map_or((0, 0), |t| (t.prompt_tokens, t.completion_tokens));
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
    }
}

/// What a finished answer says about itself besides the text.
#[derive(Debug, Clone)]
pub struct AnswerMeta<'a> {
    pub question_id: &'a str,
    pub model: &'a str,
    pub created: u64,
    pub cached: bool,
    pub language: Option<&'a str>,
    pub timings: Option<Timings>,
    pub finish_reason: FinishReason,
}

impl AnswerMeta<'_> {
    /// The non-streaming `chat.completion` body.
    pub fn completion(&self, answer: &str) -> ChatCompletion {
        ChatCompletion {
            id: completion_id(self.question_id),
            object: "chat.completion".into(),
            created: self.created,
            model: self.model.to_owned(),
            choices: vec![Choice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant".into(),
                    content: answer.to_owned(),
                },
                finish_reason: self.finish_reason,
            }],
            usage: usage(self.timings),
            ebb: EbbInfo {
                question_id: self.question_id.to_owned(),
                cached: self.cached,
                language: self.language.map(str::to_owned),
            },
        }
    }
}

/// One `chat.completion.chunk` body.
pub fn chunk(
    question_id: &str,
    model: &str,
    created: u64,
    delta: Value,
    finish_reason: Option<FinishReason>,
) -> Value {
    json!({
        "id": completion_id(question_id),
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "delta": delta,
            "finish_reason": finish_reason.map(FinishReason::as_str),
        }],
    })
}

/// The usage chunk of `stream_options.include_usage`: no choices.
pub fn usage_chunk(
    question_id: &str,
    model: &str,
    created: u64,
    timings: Option<Timings>,
) -> Value {
    json!({
        "id": completion_id(question_id),
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(timings),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        default_max_tokens: 256,
        max_tokens_limit: 1024,
    };

    fn parse(body: Value) -> Result<ChatRequest, ApiError> {
        ChatRequest::from_json(body.to_string().as_bytes(), LIMITS)
    }

    fn field_of(result: Result<ChatRequest, ApiError>) -> &'static str {
        match result {
            Err(ApiError::InvalidField { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn the_last_user_message_is_the_question_and_the_rest_its_history() {
        let request = parse(json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": [{"type": "text", "text": " And 3+3? "}]},
            ],
            "max_tokens": 32, "temperature": 0.5, "top_p": 0.9, "seed": 7,
            "stream": true, "stream_options": {"include_usage": true},
            "user": "student-17", "grade": 4,
        }))
        .unwrap();
        assert_eq!(request.question.question, "And 3+3?");
        assert_eq!(request.question.history.len(), 3);
        assert_eq!(request.question.history[0].role, Role::System);
        assert_eq!(request.question.max_tokens, 32);
        assert_eq!(request.question.grade, Some(4));
        assert_eq!(request.question.sampling.seed, 7);
        assert!(request.stream && request.include_usage);
        assert_eq!(request.model.as_deref(), Some("m"));
    }

    #[test]
    fn defaults_are_greedy_and_cacheable() {
        let request =
            parse(json!({"messages": [{"role": "user", "content": "Hi there"}]})).unwrap();
        assert!(request.question.sampling.is_greedy());
        assert!(request.question.cache_key("m@main").is_some());
        assert_eq!(request.question.max_tokens, 256);
        assert!(!request.stream);
    }

    #[test]
    fn history_is_part_of_the_cache_key() {
        let alone = parse(json!({"messages": [{"role": "user", "content": "Why?"}]})).unwrap();
        let after = parse(json!({"messages": [
            {"role": "user", "content": "The sky is blue."},
            {"role": "user", "content": "Why?"}
        ]}))
        .unwrap();
        assert_ne!(
            alone.question.cache_key("m@main"),
            after.question.cache_key("m@main")
        );
    }

    #[test]
    fn bad_requests_name_the_field() {
        let user = json!([{"role": "user", "content": "Hi"}]);
        assert_eq!(field_of(parse(json!({}))), "messages");
        assert_eq!(field_of(parse(json!({"messages": []}))), "messages");
        assert_eq!(
            field_of(parse(
                json!({"messages": [{"role": "assistant", "content": "Hi"}]})
            )),
            "messages"
        );
        assert_eq!(
            field_of(parse(
                json!({"messages": [{"role": "tool", "content": "x"}]})
            )),
            "messages"
        );
        assert_eq!(
            field_of(parse(
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
            )),
            "messages"
        );
        assert_eq!(
            field_of(parse(json!({"messages": user, "temperature": 3}))),
            "temperature"
        );
        assert_eq!(
            field_of(parse(json!({"messages": user, "top_p": 0}))),
            "top_p"
        );
        assert_eq!(field_of(parse(json!({"messages": user, "n": 2}))), "n");
        assert_eq!(
            field_of(parse(json!({"messages": user, "stream": "yes"}))),
            "stream"
        );
        assert_eq!(
            field_of(parse(json!({"messages": user, "max_tokens": 0}))),
            "max_tokens"
        );
        assert_eq!(
            field_of(parse(
                json!({"messages": user, "max_completion_tokens": 5000})
            )),
            "max_completion_tokens"
        );
        assert_eq!(
            field_of(parse(json!({"messages": user, "callback_url": "ftp://x"}))),
            "callback_url"
        );
    }
}
