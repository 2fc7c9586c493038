//! Turning a [`Job`] into an engine [`Request`]: the ChatML prompt and its
//! shareable system prefix; text released as soon as it is valid UTF-8.

use std::sync::Arc;
use std::time::Duration;

use ebb_nats::{FinishReason, Job, Role};
use tokenizers::Tokenizer;

use crate::engine::{Engine, EngineConfig, Output, Request};
use crate::model::{ModelError, Qwen};

pub const DEFAULT_SYSTEM_PROMPT: &str = "You are ebb, a patient tutor for school students. \
Explain step by step in simple words, check understanding with a short question at the end, \
and keep every answer safe and suitable for minors.";

/// Tokens that end an answer in Qwen's chat template.
const STOP_TOKENS: [&str; 2] = ["<|im_end|>", "<|endoftext|>"];

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    #[error("the prompt has {tokens} tokens; the model's context is {max}")]
    PromptTooLong { tokens: usize, max: usize },
    #[error(
        "the question needs {needed_mib:.1} MiB of KV cache ({positions} positions: prompt plus max_tokens), more than this worker's whole --kv-cache-mib budget of {budget_mib} MiB"
    )]
    NeverFits {
        positions: usize,
        needed_mib: f64,
        budget_mib: u64,
    },
    /// A batched step failed; every sequence in it fails the same way.
    #[error("batch step: {0}")]
    Step(String),
    #[error("the model engine stopped")]
    EngineStopped,
    /// The model panicked in a step holding this question and `batch - 1`
    /// others. With `batch` 1 the question is the cause, and a retry would
    /// crash the next worker the same way: permanent.
    #[error("{}", panic_message(reason, *batch))]
    Panicked { reason: String, batch: usize },
}

fn panic_message(reason: &str, batch: usize) -> String {
    match batch {
        1 => format!("the model crashed on this question: {reason}"),
        n => format!("the model crashed in a step of {n} questions ({reason}); retried alone"),
    }
}

impl GenerateError {
    /// Retrying cannot help: the same input fails the same way.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            GenerateError::PromptTooLong { .. }
                | GenerateError::NeverFits { .. }
                | GenerateError::Panicked { batch: 1, .. }
        )
    }

    /// A crash in a shared step: the question may be innocent, so its
    /// next attempt runs alone, where a crash proves it the cause.
    pub fn needs_a_solo_retry(&self) -> bool {
        matches!(self, GenerateError::Panicked { batch, .. } if *batch > 1)
    }
}

/// What one generation produced and how long it took.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    /// The answer's token ids (without the stop token).
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Admission to first token: waiting for the step, prefill chunks.
    pub prefill: Duration,
    pub decode: Duration,
    pub finish_reason: FinishReason,
}

impl Generation {
    pub fn decode_tokens_per_second(&self) -> Option<f64> {
        let seconds = self.decode.as_secs_f64();
        (self.completion_tokens > 1 && seconds > 0.0)
            .then(|| (self.completion_tokens - 1) as f64 / seconds)
    }
}

/// A question's prompt as token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub ids: Vec<u32>,
    /// Leading tokens that are the same for every question with the same
    /// system block (the tutor's rules, grade, course, language): the part
    /// the prefix cache shares. 0 when the prompt does not start with them.
    pub shared_prefix: usize,
}

/// The tokenizer and the tutoring prompt: turns jobs into engine requests.
#[derive(Debug, Clone)]
pub struct Prompts {
    tokenizer: Arc<Tokenizer>,
    /// The same tokenizer reading special tokens as plain text: for
    /// everything a request wrote (see [`Piece`]).
    text_tokenizer: Arc<Tokenizer>,
    stop_tokens: Vec<u32>,
    system_prompt: String,
}

/// A run of prompt text: template markup, whose `<|im_start|>` is the
/// control token, or text from the request (question, history, course,
/// language) and the operator's system prompt, in which it is only text, so
/// no question can open a turn of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Markup(String),
    Text(String),
}

/// A prompt as pieces, adjacent pieces of one kind merged.
#[derive(Debug, Default)]
struct Pieces(Vec<Piece>);

impl Pieces {
    fn markup(&mut self, markup: &str) {
        match self.0.last_mut() {
            Some(Piece::Markup(last)) => last.push_str(markup),
            _ => self.0.push(Piece::Markup(markup.to_owned())),
        }
    }

    fn text(&mut self, text: &str) {
        match self.0.last_mut() {
            Some(Piece::Text(last)) => last.push_str(text),
            _ => self.0.push(Piece::Text(text.to_owned())),
        }
    }

    fn render(&self) -> String {
        self.0
            .iter()
            .map(|piece| match piece {
                Piece::Markup(s) | Piece::Text(s) => s.as_str(),
            })
            .collect()
    }
}

impl Prompts {
    pub fn new(
        tokenizer_path: &std::path::Path,
        system_prompt: String,
    ) -> Result<Self, ModelError> {
        let tokenizer =
            Tokenizer::from_file(tokenizer_path).map_err(|err| ModelError::Tokenizer {
                path: tokenizer_path.to_path_buf(),
                message: err.to_string(),
            })?;
        let stop_tokens: Vec<u32> = STOP_TOKENS
            .iter()
            .filter_map(|token| tokenizer.token_to_id(token))
            .collect();
        if stop_tokens.is_empty() {
            return Err(ModelError::Tokenizer {
                path: tokenizer_path.to_path_buf(),
                message: "has neither <|im_end|> nor <|endoftext|>: not a Qwen chat tokenizer"
                    .into(),
            });
        }
        let mut text_tokenizer = tokenizer.clone();
        text_tokenizer.set_encode_special_tokens(true);
        Ok(Prompts {
            tokenizer: Arc::new(tokenizer),
            text_tokenizer: Arc::new(text_tokenizer),
            stop_tokens,
            system_prompt,
        })
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// The tutor's instructions, with the app's `system` messages after
    /// them (so an app can add to but not replace the safety rules).
    fn system_block(&self, job: &Job) -> Pieces {
        let mut block = Pieces::default();
        block.markup("<|im_start|>system\n");
        block.text(&self.system_prompt);
        if let Some(grade) = job.grade {
            block.text(&format!(" The student is in grade {grade}."));
        }
        if let Some(course) = &job.course {
            block.text(&format!(" The question is from their {course} course."));
        }
        if let Some(language) = &job.language {
            block.text(&format!(" Answer in this language: {language}."));
        }
        for message in job.history.iter().filter(|m| m.role == Role::System) {
            block.text("\n\n");
            block.text(&message.content);
        }
        block.markup("<|im_end|>\n");
        block
    }

    /// The ChatML conversation for one question: the system block, the
    /// earlier turns, then the question.
    fn pieces(&self, job: &Job) -> Pieces {
        let mut pieces = self.system_block(job);
        let turns = job.history.iter().filter(|m| m.role != Role::System);
        for (role, content) in turns
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .chain([("user", job.question.as_str())])
        {
            pieces.markup(&format!("<|im_start|>{role}\n"));
            pieces.text(content);
            pieces.markup("<|im_end|>\n");
        }
        pieces.markup("<|im_start|>assistant\n");
        pieces
    }

    /// The prompt as text (what [`Prompts::request`] tokenizes, piece by piece).
    pub fn prompt(&self, job: &Job) -> String {
        self.pieces(job).render()
    }

    fn encode(&self, pieces: &Pieces) -> Result<Vec<u32>, GenerateError> {
        let mut ids = Vec::new();
        for piece in &pieces.0 {
            let (tokenizer, text) = match piece {
                Piece::Markup(markup) => (&self.tokenizer, markup),
                Piece::Text(text) => (&self.text_tokenizer, text),
            };
            let encoding = tokenizer
                .encode(text.as_str(), false)
                .map_err(|err| GenerateError::Tokenizer(err.to_string()))?;
            ids.extend_from_slice(encoding.get_ids());
        }
        Ok(ids)
    }

    /// The engine request for `job` on a model with `max_context` positions.
    pub fn request(&self, job: &Job, max_context: usize) -> Result<Request, GenerateError> {
        let ids = self.encode(&self.pieces(job))?;
        if ids.len() >= max_context {
            return Err(GenerateError::PromptTooLong {
                tokens: ids.len(),
                max: max_context,
            });
        }
        // Pieces are tokenized apart, so the system block's tokens are a
        // prefix of the whole prompt's; checked rather than assumed.
        let system = self.encode(&self.system_block(job))?;
        let shared_prefix = if ids.len() > system.len() && ids.starts_with(&system) {
            system.len()
        } else {
            0
        };
        Ok(Request {
            max_new: (job.max_tokens as usize).min(max_context - ids.len()),
            prompt: Prompt { ids, shared_prefix },
            sampling: job.sampling,
            stop_tokens: self.stop_tokens.clone(),
        })
    }
}

/// One question at a time through the batching engine: for tests and tools
/// that want an answer, not a server.
#[derive(Debug)]
pub struct Generator {
    pub engine: Engine,
    pub prompts: Prompts,
}

impl Generator {
    pub fn new(model: Qwen, prompts: Prompts, config: EngineConfig) -> Generator {
        Generator {
            engine: Engine::new(model, prompts.tokenizer().clone(), config),
            prompts,
        }
    }

    /// Answers `job` alone, calling `on_text` with each new piece.
    pub fn generate(
        &mut self,
        job: &Job,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation, GenerateError> {
        let request = self.prompts.request(job, self.engine.model().max_context)?;
        let id = self.engine.admit(request)?;
        loop {
            for output in self.engine.step() {
                match output {
                    Output::Text(seq, text) if seq == id => on_text(&text),
                    Output::Finished(seq, result) if seq == id => return result,
                    _ => {}
                }
            }
        }
    }
}

/// Incremental detokenization: a token may end inside a multi-byte
/// character, so text is released only once it decodes cleanly.
#[derive(Debug, Default)]
pub struct TextStream {
    tokens: Vec<u32>,
    /// Start of the tokens whose text has not been fully released.
    window_start: usize,
    /// End of the released part of the window.
    released_end: usize,
}

impl TextStream {
    fn decode(
        &self,
        tokenizer: &Tokenizer,
        range: std::ops::Range<usize>,
    ) -> Result<String, GenerateError> {
        tokenizer
            .decode(&self.tokens[range], true)
            .map_err(|err| GenerateError::Tokenizer(err.to_string()))
    }

    pub fn push(
        &mut self,
        token: u32,
        tokenizer: &Tokenizer,
    ) -> Result<Option<String>, GenerateError> {
        let released = self.decode(tokenizer, self.window_start..self.released_end)?;
        self.tokens.push(token);
        let text = self.decode(tokenizer, self.window_start..self.tokens.len())?;
        if text.len() > released.len()
            && text.is_char_boundary(released.len())
            && !text.ends_with('\u{FFFD}')
        {
            self.window_start = self.released_end;
            self.released_end = self.tokens.len();
            Ok(Some(text[released.len()..].to_owned()))
        } else {
            Ok(None)
        }
    }

    /// Whatever is left once generation stops (possibly an incomplete character).
    pub fn finish(&self, tokenizer: &Tokenizer) -> Result<Option<String>, GenerateError> {
        let released = self.decode(tokenizer, self.window_start..self.released_end)?;
        let text = self.decode(tokenizer, self.window_start..self.tokens.len())?;
        Ok(
            (text.len() > released.len() && text.is_char_boundary(released.len()))
                .then(|| text[released.len()..].to_owned()),
        )
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The whole answer so far.
    pub fn text(&self, tokenizer: &Tokenizer) -> Result<String, GenerateError> {
        self.decode(tokenizer, 0..self.tokens.len())
    }
}
