//! OpenAI's chat completions shape: the request parsed into a
//! [`NewQuestion`] (the last user message is the question, earlier messages
//! its history), and the response and stream chunk bodies.
//!
//! Differences from OpenAI, on purpose: `temperature` defaults to 0 (greedy,
//! so answers are cacheable and repeatable), `n` must be 1, and only text
//! content is accepted. ebb's own fields (`grade`, `course`, `language`,
//! `callback_url`) may ride along (`extra_body` in OpenAI's Python client).
//! OpenAI's other documented parameters are accepted and ignored
//! ([`crate::request::ChatCompletionRequest`] lists them); any other field
//! is refused by name.

use std::time::Duration;

use ebb_nats::{ChatMessage, FinishReason, Role, Sampling, Timings};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::openapi::{AssistantMessage, ChatCompletion, Choice, EbbInfo, Usage};
use crate::question::{
    Context, ContextFields, Limits, MAX_QUESTION_CHARS, NewQuestion, in_range, optional_text,
    question_text,
};
use crate::request::{self, ChatCompletionRequest, ChatRole, RequestMessage};

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
        ChatRequest::validate(request::parse(body)?, limits)
    }

    pub fn validate(body: ChatCompletionRequest, limits: Limits) -> Result<ChatRequest, ApiError> {
        let mut messages = conversation(body.messages)?;
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
        let max_tokens = match body.max_completion_tokens {
            Some(tokens) => ("max_completion_tokens", Some(tokens)),
            None => ("max_tokens", body.max_tokens),
        };
        let context = Context::validate(
            ContextFields {
                grade: body.grade,
                course: body.course,
                language: body.language,
                callback_url: body.callback_url,
                max_tokens,
            },
            limits,
        )?;
        if body.top_p == Some(0.0) {
            return Err(ApiError::invalid("top_p", "must be above 0"));
        }
        let sampling = Sampling {
            temperature: in_range("temperature", body.temperature, 0.0, 2.0)?.unwrap_or(0.0),
            top_p: in_range("top_p", body.top_p, 0.0, 1.0)?.unwrap_or(1.0),
            seed: body.seed.unwrap_or(0),
        };
        if body.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("n", "must be 1: one answer per question"));
        }
        // `user` identifies the end user to the app; checked, never logged.
        optional_text("user", body.user, MAX_USER_CHARS)?;
        let mut question = NewQuestion::new(question, context, sampling, Duration::ZERO);
        question.history = messages;
        Ok(ChatRequest {
            question,
            model: body.model,
            stream: body.stream.unwrap_or(false),
            include_usage: body
                .stream_options
                .and_then(|options| options.include_usage)
                .unwrap_or(false),
        })
    }
}

fn conversation(messages: Option<Vec<RequestMessage>>) -> Result<Vec<ChatMessage>, ApiError> {
    let invalid = |message: &str| ApiError::invalid("messages", message);
    let Some(messages) = messages else {
        return Err(invalid("is required"));
    };
    if messages.is_empty() || messages.len() > MAX_MESSAGES {
        return Err(invalid(&format!("must hold 1 to {MAX_MESSAGES} messages")));
    }
    let mut total_chars = 0;
    let mut conversation = Vec::with_capacity(messages.len());
    for message in messages {
        let content = message.content.into_text();
        total_chars += content.chars().count();
        if total_chars > MAX_CONVERSATION_CHARS {
            return Err(invalid(&format!(
                "hold more than {MAX_CONVERSATION_CHARS} characters together"
            )));
        }
        let role = match message.role {
            ChatRole::System | ChatRole::Developer => Role::System,
            ChatRole::User => Role::User,
            ChatRole::Assistant => Role::Assistant,
        };
        conversation.push(ChatMessage { role, content });
    }
    Ok(conversation)
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

    /// The top-level field an error names (`messages` for `messages[0].role`).
    fn field_of(result: Result<ChatRequest, ApiError>) -> String {
        match result {
            Err(ApiError::InvalidField { field, .. }) => field
                .split(['[', '.'])
                .next()
                .unwrap_or_default()
                .to_owned(),
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
    fn openai_parameters_ebb_does_not_act_on_are_accepted_and_others_refused() {
        let user = json!([{"role": "user", "content": "Hi", "name": "kim"}]);
        let request = parse(json!({
            "messages": user, "stop": ["\n"], "frequency_penalty": 0.5,
            "logit_bias": {"42": 1}, "store": false, "metadata": {"class": "7b"},
            "tools": [], "response_format": {"type": "text"},
            "stream_options": {"include_usage": true, "include_obfuscation": false},
        }))
        .unwrap();
        assert_eq!(request.question.question, "Hi");
        let err = parse(json!({"messages": user, "temprature": 0.2})).unwrap_err();
        assert!(matches!(&err, ApiError::InvalidField { field, .. } if field == "temprature"));
        let nested = parse(json!({"messages": [{"role": "user", "content": "Hi", "tone": 1}]}));
        assert!(
            matches!(&nested, Err(ApiError::InvalidField { field, .. }) if field == "messages[0].tone"),
            "{nested:?}"
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
