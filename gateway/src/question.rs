//! A question as the API accepts it: parsed and validated at the edge into
//! [`NewQuestion`], so nothing past this module sees unchecked input.

use std::time::Duration;

use ebb_nats::messages::PROMPT_TEMPLATE_VERSION;
use ebb_nats::{ChatMessage, Sampling};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use unicode_normalization::UnicodeNormalization;

use crate::error::ApiError;

/// Longest question accepted, in characters.
pub const MAX_QUESTION_CHARS: usize = 4_000;
/// Longest a client may hold the request open for its answer.
pub const MAX_WAIT: Duration = Duration::from_secs(120);
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const MAX_GRADE: i64 = 13;
const MAX_COURSE_CHARS: usize = 100;
const MAX_LANGUAGE_CHARS: usize = 35;
const MAX_URL_CHARS: usize = 2_048;

/// Limits that come from the gateway's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub default_max_tokens: u32,
    pub max_tokens_limit: u32,
}

/// A validated `POST /v1/questions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct NewQuestion {
    /// Trimmed; never empty, at most [`MAX_QUESTION_CHARS`] characters.
    pub question: String,
    pub grade: Option<u8>,
    pub course: Option<String>,
    pub language: Option<String>,
    pub max_tokens: u32,
    pub sampling: Sampling,
    /// How long to hold the request open for the answer; zero = do not wait.
    pub wait: Duration,
    /// Earlier chat messages (empty for `POST /v1/questions`).
    pub history: Vec<ChatMessage>,
    /// http(s) URL to POST the final answer to; the SSRF check is at admission.
    pub callback_url: Option<reqwest::Url>,
}

/// The fields `POST /v1/questions` and the chat body share.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    pub grade: Option<u8>,
    pub course: Option<String>,
    pub language: Option<String>,
    pub max_tokens: u32,
    pub callback_url: Option<reqwest::Url>,
}

impl Context {
    /// Reads the shared fields; `max_tokens_field` is where the chat body
    /// may call it `max_completion_tokens`.
    pub fn from_fields(
        fields: &Map<String, Value>,
        limits: Limits,
        max_tokens_field: &'static str,
    ) -> Result<Context, ApiError> {
        let grade = optional_integer(fields, "grade", 0, MAX_GRADE)?.map(|grade| grade as u8);
        let max_tokens =
            optional_integer(fields, max_tokens_field, 1, limits.max_tokens_limit.into())?
                .map_or(limits.default_max_tokens, |tokens| tokens as u32);
        let callback_url = optional_string(fields, "callback_url", MAX_URL_CHARS)?
            .map(|text| parse_callback_url(&text))
            .transpose()?;
        Ok(Context {
            grade,
            course: optional_string(fields, "course", MAX_COURSE_CHARS)?,
            language: optional_string(fields, "language", MAX_LANGUAGE_CHARS)?,
            max_tokens,
            callback_url,
        })
    }
}

fn parse_callback_url(text: &str) -> Result<reqwest::Url, ApiError> {
    let invalid = |message: &str| ApiError::invalid("callback_url", message);
    let url = reqwest::Url::parse(text).map_err(|err| invalid(&format!("is not a URL: {err}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("must be an http or https URL"));
    }
    if url.host().is_none() {
        return Err(invalid("must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("must not carry credentials"));
    }
    Ok(url)
}

/// Parses the body as a JSON object.
pub fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|err| ApiError::InvalidJson(err.to_string()))?;
    let Value::Object(fields) = value else {
        return Err(ApiError::InvalidJson(
            "the body must be a JSON object".into(),
        ));
    };
    Ok(fields)
}

/// Trims a question's text and checks its length.
pub fn question_text(text: &str, field: &'static str) -> Result<String, ApiError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    let chars = text.chars().count();
    if chars > MAX_QUESTION_CHARS {
        return Err(ApiError::invalid(
            field,
            format!("has {chars} characters; the limit is {MAX_QUESTION_CHARS}"),
        ));
    }
    Ok(text.to_owned())
}

impl NewQuestion {
    /// Validates a JSON body, naming the first offending field.
    pub fn from_json(body: &[u8], limits: Limits) -> Result<NewQuestion, ApiError> {
        let fields = json_object(body)?;
        let question = match fields.get("question") {
            None | Some(Value::Null) => return Err(ApiError::invalid("question", "is required")),
            Some(Value::String(text)) => question_text(text, "question")?,
            Some(_) => return Err(ApiError::invalid("question", "must be a string")),
        };
        let context = Context::from_fields(&fields, limits, "max_tokens")?;
        let wait = match fields.get("wait_seconds") {
            None | Some(Value::Null) => DEFAULT_WAIT,
            Some(Value::Number(number)) => match number.as_f64() {
                Some(seconds) if (0.0..=MAX_WAIT.as_secs_f64()).contains(&seconds) => {
                    Duration::from_secs_f64(seconds)
                }
                _ => {
                    return Err(ApiError::invalid(
                        "wait_seconds",
                        format!("must be between 0 and {}", MAX_WAIT.as_secs()),
                    ));
                }
            },
            Some(_) => return Err(ApiError::invalid("wait_seconds", "must be a number")),
        };
        Ok(NewQuestion::new(
            question,
            context,
            Sampling::default(),
            wait,
        ))
    }

    pub fn new(question: String, context: Context, sampling: Sampling, wait: Duration) -> Self {
        NewQuestion {
            question,
            grade: context.grade,
            course: context.course,
            language: context.language,
            max_tokens: context.max_tokens,
            sampling,
            wait,
            history: Vec::new(),
            callback_url: context.callback_url,
        }
    }

    /// The answer-cache key, or `None` when the answer is not deterministic.
    ///
    /// SHA-256 over everything that shapes the answer: the model identity,
    /// the prompt template version, the sampling parameters, `max_tokens`,
    /// the prompt's context fields (the language only as the client gave
    /// it: a detected one is a function of the question, so the key is
    /// computed before detection), a chat's earlier messages and the
    /// normalised question (NFKC,
    /// whitespace collapsed, case-folded), each length-prefixed so no two
    /// different inputs hash the same bytes.
    pub fn cache_key(&self, model_identity: &str) -> Option<String> {
        if !self.sampling.is_greedy() {
            return None;
        }
        let mut hasher = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        field(model_identity.as_bytes());
        field(&PROMPT_TEMPLATE_VERSION.to_le_bytes());
        field(&self.max_tokens.to_le_bytes());
        field(
            self.grade
                .map(|g| g.to_string())
                .unwrap_or_default()
                .as_bytes(),
        );
        field(self.course.as_deref().unwrap_or_default().as_bytes());
        field(self.language.as_deref().unwrap_or_default().as_bytes());
        field(&(self.history.len() as u64).to_le_bytes());
        for message in &self.history {
            field(message.role.as_str().as_bytes());
            field(message.content.as_bytes());
        }
        field(normalise(&self.question).as_bytes());
        Some(format!("{:x}", hasher.finalize()))
    }
}

/// Unicode NFKC, trimmed, whitespace runs collapsed to one space, case-folded:
/// "  What IS  photosynthesis? " and "what is photosynthesis?" are one question.
pub fn normalise(question: &str) -> String {
    let nfkc: String = question.nfkc().collect();
    let collapsed = nfkc.split_whitespace().collect::<Vec<_>>().join(" ");
    caseless::default_case_fold_str(&collapsed)
}

pub fn optional_integer(
    fields: &Map<String, Value>,
    field: &'static str,
    min: i64,
    max: i64,
) -> Result<Option<i64>, ApiError> {
    match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(number)) => match number.as_i64() {
            Some(value) if (min..=max).contains(&value) => Ok(Some(value)),
            _ => Err(ApiError::invalid(
                field,
                format!("must be an integer between {min} and {max}"),
            )),
        },
        Some(_) => Err(ApiError::invalid(field, "must be an integer")),
    }
}

pub fn optional_string(
    fields: &Map<String, Value>,
    field: &'static str,
    max_chars: usize,
) -> Result<Option<String>, ApiError> {
    match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => {
            let text = text.trim();
            if text.chars().count() > max_chars {
                Err(ApiError::invalid(
                    field,
                    format!("must be at most {max_chars} characters"),
                ))
            } else {
                Ok((!text.is_empty()).then(|| text.to_owned()))
            }
        }
        Some(_) => Err(ApiError::invalid(field, "must be a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        default_max_tokens: 256,
        max_tokens_limit: 1024,
    };

    fn parse(body: &str) -> Result<NewQuestion, ApiError> {
        NewQuestion::from_json(body.as_bytes(), LIMITS)
    }

    fn field_of(result: Result<NewQuestion, ApiError>) -> &'static str {
        match result {
            Err(ApiError::InvalidField { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn a_full_question_is_accepted_with_defaults_filled() {
        let question =
            parse(r#"{"question":"  Why is the sky blue? ","grade":7,"language":"en"}"#).unwrap();
        assert_eq!(question.question, "Why is the sky blue?");
        assert_eq!(question.grade, Some(7));
        assert_eq!(question.max_tokens, 256);
        assert_eq!(question.wait, Duration::from_secs(30));
        assert_eq!(
            parse(r#"{"question":"x","wait_seconds":0}"#).unwrap().wait,
            Duration::ZERO
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        assert_eq!(field_of(parse(r#"{}"#)), "question");
        assert_eq!(field_of(parse(r#"{"question":42}"#)), "question");
        assert_eq!(field_of(parse(r#"{"question":"  \n\t "}"#)), "question");
        let long = format!(r#"{{"question":"{}"}}"#, "a".repeat(MAX_QUESTION_CHARS + 1));
        assert_eq!(field_of(parse(&long)), "question");
        assert_eq!(field_of(parse(r#"{"question":"x","grade":"7"}"#)), "grade");
        assert_eq!(field_of(parse(r#"{"question":"x","grade":99}"#)), "grade");
        assert_eq!(
            field_of(parse(r#"{"question":"x","max_tokens":0}"#)),
            "max_tokens"
        );
        assert_eq!(
            field_of(parse(r#"{"question":"x","max_tokens":1025}"#)),
            "max_tokens"
        );
        assert_eq!(
            field_of(parse(r#"{"question":"x","max_tokens":1.5}"#)),
            "max_tokens"
        );
        assert_eq!(
            field_of(parse(r#"{"question":"x","wait_seconds":121}"#)),
            "wait_seconds"
        );
        assert_eq!(
            field_of(parse(r#"{"question":"x","wait_seconds":"5"}"#)),
            "wait_seconds"
        );
        assert_eq!(
            field_of(parse(r#"{"question":"x","course":["math"]}"#)),
            "course"
        );
    }

    #[test]
    fn a_question_at_the_limit_counts_characters_not_bytes() {
        let body = format!(r#"{{"question":"{}"}}"#, "光".repeat(MAX_QUESTION_CHARS));
        assert!(parse(&body).is_ok());
    }

    #[test]
    fn malformed_bodies_are_json_errors() {
        assert!(matches!(parse("{"), Err(ApiError::InvalidJson(_))));
        assert!(matches!(parse("[1,2]"), Err(ApiError::InvalidJson(_))));
    }

    #[test]
    fn normalisation_merges_spelling_variants_only() {
        assert_eq!(
            normalise("  What IS\u{00A0}\n photosynthesis? "),
            "what is photosynthesis?"
        );
        assert_eq!(normalise("ＡＢＣ"), "abc"); // full-width forms fold under NFKC
        assert_eq!(normalise("Straße"), normalise("STRASSE"));
        assert_ne!(normalise("what is a cell"), normalise("what is a cello"));
    }

    #[test]
    fn cache_keys_depend_on_everything_that_shapes_the_answer() {
        let base = parse(r#"{"question":"Why is the sky blue?"}"#).unwrap();
        let key = base.cache_key("m@main").unwrap();
        let same = parse(r#"{"question":"why IS the  sky blue?"}"#).unwrap();
        assert_eq!(same.cache_key("m@main").unwrap(), key);
        assert_ne!(base.cache_key("m@v2").unwrap(), key);
        let longer = parse(r#"{"question":"Why is the sky blue?","max_tokens":64}"#).unwrap();
        assert_ne!(longer.cache_key("m@main").unwrap(), key);
        let french = parse(r#"{"question":"Why is the sky blue?","language":"fr"}"#).unwrap();
        assert_ne!(french.cache_key("m@main").unwrap(), key);
        let mut sampled = base.clone();
        sampled.sampling.temperature = 0.7;
        assert_eq!(sampled.cache_key("m@main"), None);
    }
}
