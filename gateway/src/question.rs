//! A question as the API accepts it: parsed and validated at the edge into
//! [`NewQuestion`], so nothing past this module sees unchecked input.

use std::time::Duration;

use ebb_nats::messages::PROMPT_TEMPLATE_VERSION;
use ebb_nats::{ChatMessage, Sampling};
use sha2::{Digest, Sha256};
use unicode_normalization::UnicodeNormalization;

use crate::error::ApiError;
use crate::request::{self, QuestionRequest};

/// Longest question accepted, in characters.
pub const MAX_QUESTION_CHARS: usize = 4_000;
/// Longest a client may hold the request open for its answer.
pub const MAX_WAIT: Duration = Duration::from_secs(120);
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const MAX_GRADE: u8 = 13;
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
    /// The asking API key's name (set by the route from the caller).
    pub owner: Option<String>,
}

/// The fields `POST /v1/questions` and the chat body share, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    pub grade: Option<u8>,
    pub course: Option<String>,
    pub language: Option<String>,
    pub max_tokens: u32,
    pub callback_url: Option<reqwest::Url>,
}

/// The shared fields as a body gives them.
#[derive(Debug, Default)]
pub struct ContextFields {
    pub grade: Option<u8>,
    pub course: Option<String>,
    pub language: Option<String>,
    pub callback_url: Option<String>,
    /// `max_tokens`, or the chat body's `max_completion_tokens`, and which.
    pub max_tokens: (&'static str, Option<u32>),
}

impl Context {
    pub fn validate(fields: ContextFields, limits: Limits) -> Result<Context, ApiError> {
        let grade = in_range("grade", fields.grade, 0, MAX_GRADE)?;
        let (max_tokens_field, max_tokens) = fields.max_tokens;
        let max_tokens = in_range(max_tokens_field, max_tokens, 1, limits.max_tokens_limit)?
            .unwrap_or(limits.default_max_tokens);
        let callback_url = optional_text("callback_url", fields.callback_url, MAX_URL_CHARS)?
            .map(|text| parse_callback_url(&text))
            .transpose()?;
        Ok(Context {
            grade,
            course: optional_text("course", fields.course, MAX_COURSE_CHARS)?,
            language: optional_text("language", fields.language, MAX_LANGUAGE_CHARS)?,
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

/// `value` if it lies in `min..=max` (or is absent).
pub fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    field: &'static str,
    value: Option<T>,
    min: T,
    max: T,
) -> Result<Option<T>, ApiError> {
    match value {
        Some(value) if !(min..=max).contains(&value) => Err(ApiError::invalid(
            field,
            format!("must be between {min} and {max}"),
        )),
        value => Ok(value),
    }
}

/// Trimmed text of at most `max_chars` characters; empty is absent.
pub fn optional_text(
    field: &'static str,
    text: Option<String>,
    max_chars: usize,
) -> Result<Option<String>, ApiError> {
    let Some(text) = text else { return Ok(None) };
    let text = text.trim();
    if text.chars().count() > max_chars {
        return Err(ApiError::invalid(
            field,
            format!("must be at most {max_chars} characters"),
        ));
    }
    Ok((!text.is_empty()).then(|| text.to_owned()))
}

impl NewQuestion {
    /// Validates a JSON body, naming the first offending field.
    pub fn from_json(body: &[u8], limits: Limits) -> Result<NewQuestion, ApiError> {
        NewQuestion::validate(request::parse(body)?, limits)
    }

    pub fn validate(body: QuestionRequest, limits: Limits) -> Result<NewQuestion, ApiError> {
        let question = match body.question {
            None => return Err(ApiError::invalid("question", "is required")),
            Some(text) => question_text(&text, "question")?,
        };
        let context = Context::validate(
            ContextFields {
                grade: body.grade,
                course: body.course,
                language: body.language,
                callback_url: body.callback_url,
                max_tokens: ("max_tokens", body.max_tokens),
            },
            limits,
        )?;
        let wait = in_range(
            "wait_seconds",
            body.wait_seconds,
            0.0,
            MAX_WAIT.as_secs_f64(),
        )?
        .map_or(DEFAULT_WAIT, Duration::from_secs_f64);
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
            owner: None,
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
    if question.is_ascii() {
        // The common case, a quarter of a cache hit's work the long way:
        // ASCII is its own NFKC form and folds to its lower case.
        let mut folded = String::with_capacity(question.len());
        for word in question.split_whitespace() {
            if !folded.is_empty() {
                folded.push(' ');
            }
            folded.extend(word.chars().map(|c| c.to_ascii_lowercase()));
        }
        return folded;
    }
    normalise_unicode(question)
}

/// [`normalise`] by the Unicode tables, for any text.
fn normalise_unicode(question: &str) -> String {
    let nfkc: String = question.nfkc().collect();
    let collapsed = nfkc.split_whitespace().collect::<Vec<_>>().join(" ");
    caseless::default_case_fold_str(&collapsed)
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

    fn field_of(result: Result<NewQuestion, ApiError>) -> String {
        match result {
            Err(ApiError::InvalidField { field, .. }) => field.into_owned(),
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
    fn unknown_fields_are_refused_by_name() {
        // A misspelt `max_tokens` must not silently give the default limit.
        let err = parse(r#"{"question":"x","max_token":5}"#).unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            err.to_string().contains("unknown field `max_token`"),
            "{err}"
        );
        assert_eq!(field_of(Err(err)), "max_token");
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
        assert!(matches!(
            parse(r#"{"question":"x"} {}"#),
            Err(ApiError::InvalidJson(_))
        ));
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
    fn ascii_questions_normalise_as_the_unicode_rules_say() {
        let every_ascii: String = (0u8..128).map(char::from).collect();
        for text in [
            "  Why IS the\t sky\n\x0c blue?\r ",
            "\x0b\x1f mixed\x1c\x1dseparators\x1e\u{7f}",
            every_ascii.as_str(),
            "",
        ] {
            assert_eq!(normalise(text), normalise_unicode(text), "{text:?}");
        }
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
