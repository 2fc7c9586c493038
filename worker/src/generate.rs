//! Turning a [`Job`] into an answer: the ChatML prompt, prefill, and a
//! decode loop that streams text as soon as it is valid UTF-8.

use std::time::{Duration, Instant};

use candle_transformers::generation::{LogitsProcessor, Sampling};
use ebb_nats::{FinishReason, Job, Role};
use tokenizers::Tokenizer;

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
}

impl GenerateError {
    /// Retrying cannot help: the same input fails the same way.
    pub fn is_permanent(&self) -> bool {
        matches!(self, GenerateError::PromptTooLong { .. })
    }
}

/// What one generation produced and how long it took.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
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

/// A model, its tokenizer and the tutoring prompt.
#[derive(Debug)]
pub struct Generator {
    model: Qwen,
    tokenizer: Tokenizer,
    stop_tokens: Vec<u32>,
    system_prompt: String,
}

impl Generator {
    pub fn new(
        model: Qwen,
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
        Ok(Generator {
            model,
            tokenizer,
            stop_tokens,
            system_prompt,
        })
    }

    /// The ChatML conversation for one question: the tutor's instructions
    /// (with the app's `system` messages after them, so an app can add to but
    /// not replace the safety rules), the earlier turns, then the question.
    pub fn prompt(&self, job: &Job) -> String {
        let mut system = self.system_prompt.clone();
        if let Some(grade) = job.grade {
            system.push_str(&format!(" The student is in grade {grade}."));
        }
        if let Some(course) = &job.course {
            system.push_str(&format!(" The question is from their {course} course."));
        }
        if let Some(language) = &job.language {
            system.push_str(&format!(" Answer in this language: {language}."));
        }
        for message in job.history.iter().filter(|m| m.role == Role::System) {
            system.push_str("\n\n");
            system.push_str(&message.content);
        }
        let mut prompt = format!("<|im_start|>system\n{system}<|im_end|>\n");
        for message in job.history.iter().filter(|m| m.role != Role::System) {
            let role = message.role.as_str();
            prompt.push_str(&format!(
                "<|im_start|>{role}\n{}<|im_end|>\n",
                message.content
            ));
        }
        prompt.push_str(&format!(
            "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            job.question
        ));
        prompt
    }

    /// Answers `job`, calling `on_text` with each new piece of the answer.
    pub fn generate(
        &mut self,
        job: &Job,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation, GenerateError> {
        self.model.clear_kv_cache();
        let prompt = self
            .tokenizer
            .encode(self.prompt(job), false)
            .map_err(|err| GenerateError::Tokenizer(err.to_string()))?;
        let prompt_ids = prompt.get_ids();
        let max = self.model.max_context;
        if prompt_ids.len() >= max {
            return Err(GenerateError::PromptTooLong {
                tokens: prompt_ids.len(),
                max,
            });
        }
        let budget = (job.max_tokens as usize).min(max - prompt_ids.len());
        let sampling = if job.sampling.is_greedy() {
            Sampling::ArgMax
        } else {
            Sampling::TopP {
                // candle compares in f32: a p that rounds to 0 would keep no
                // token at all (found by schemathesis); the smallest positive
                // p keeps the most likely one.
                p: job.sampling.top_p.clamp(f64::from(f32::MIN_POSITIVE), 1.0),
                temperature: job.sampling.temperature,
            }
        };
        let mut sampler = LogitsProcessor::from_sampling(job.sampling.seed, sampling);
        let mut stream = TextStream::default();

        let started = Instant::now();
        let logits = self.model.forward(prompt_ids, 0)?;
        let mut next = sampler.sample(&logits)?;
        let prefill = started.elapsed();
        let decode_started = Instant::now();
        let mut generated = 0;
        let mut finish_reason = FinishReason::Stop;
        while !self.stop_tokens.contains(&next) {
            generated += 1;
            if let Some(piece) = stream.push(next, &self.tokenizer)? {
                on_text(&piece);
            }
            if generated == budget {
                finish_reason = FinishReason::Length;
                break;
            }
            let logits = self
                .model
                .forward(&[next], prompt_ids.len() + generated - 1)?;
            next = sampler.sample(&logits)?;
        }
        if let Some(rest) = stream.finish(&self.tokenizer)? {
            on_text(&rest);
        }
        let text = self
            .tokenizer
            .decode(&stream.tokens, true)
            .map_err(|err| GenerateError::Tokenizer(err.to_string()))?;
        Ok(Generation {
            text,
            prompt_tokens: prompt_ids.len(),
            completion_tokens: generated,
            prefill,
            decode: decode_started.elapsed(),
            finish_reason,
        })
    }
}

/// Incremental detokenization: a token may end inside a multi-byte
/// character, so text is released only once it decodes cleanly.
#[derive(Debug, Default)]
struct TextStream {
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

    fn push(&mut self, token: u32, tokenizer: &Tokenizer) -> Result<Option<String>, GenerateError> {
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
    fn finish(&self, tokenizer: &Tokenizer) -> Result<Option<String>, GenerateError> {
        let released = self.decode(tokenizer, self.window_start..self.released_end)?;
        let text = self.decode(tokenizer, self.window_start..self.tokens.len())?;
        Ok(
            (text.len() > released.len() && text.is_char_boundary(released.len()))
                .then(|| text[released.len()..].to_owned()),
        )
    }
}
