//! One question in the batch: its prompt, cache, sampler and stream of text.

use std::time::Instant;

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use ebb_nats::FinishReason;
use tokenizers::Tokenizer;

use super::scheduler::{self, Phase};
use crate::generate::{GenerateError, Generation, Prompt, TextStream};
use crate::model::kv_cache::SequenceCache;

/// What the engine is asked to answer.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Prompt,
    /// Most tokens to generate (already capped by the model's context).
    pub max_new: usize,
    pub sampling: ebb_nats::Sampling,
    /// Tokens that end this answer.
    pub stop_tokens: Vec<u32>,
}

/// Cache positions a request needs: its prompt and every token it may
/// generate (the last one is never fed back, so one is spare).
pub fn positions_needed(prompt_len: usize, max_new: usize) -> usize {
    prompt_len + max_new
}

/// What a step did for one sequence.
#[derive(Debug)]
pub enum Progress {
    /// Still prefilling or decoding; maybe with new text.
    Running(Option<String>),
    /// Done; maybe with a last piece of text.
    Finished(Option<String>, Generation),
}

pub struct Sequence {
    pub request: Request,
    pub cache: SequenceCache,
    sampler: LogitsProcessor,
    stream: TextStream,
    /// The sampled token to feed back next, once decoding.
    pending: Option<u32>,
    generated: usize,
    admitted: Instant,
    first_token: Option<Instant>,
    /// The shared prefix length whose keys this sequence still has to offer
    /// to the prefix cache (0 once offered or when there is none).
    pub prefix_to_offer: usize,
}

impl std::fmt::Debug for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequence")
            .field("cached", &self.cache.len())
            .field("generated", &self.generated)
            .finish_non_exhaustive()
    }
}

impl Sequence {
    pub fn new(request: Request, cache: SequenceCache) -> Sequence {
        let sampling = if request.sampling.is_greedy() {
            Sampling::ArgMax
        } else {
            Sampling::TopP {
                // candle compares in f32: a p that rounds to 0 would keep no
                // token at all (found by schemathesis); the smallest positive
                // p keeps the most likely one.
                p: request
                    .sampling
                    .top_p
                    .clamp(f64::from(f32::MIN_POSITIVE), 1.0),
                temperature: request.sampling.temperature,
            }
        };
        Sequence {
            sampler: LogitsProcessor::from_sampling(request.sampling.seed, sampling),
            request,
            cache,
            stream: TextStream::default(),
            pending: None,
            generated: 0,
            admitted: Instant::now(),
            first_token: None,
            prefix_to_offer: 0,
        }
    }

    pub fn phase(&self, prefill_chunk: usize) -> Phase {
        if self.pending.is_some() {
            return Phase::Decoding;
        }
        let prompt = &self.request.prompt;
        Phase::Prefilling {
            next_chunk: scheduler::next_chunk(
                self.cache.len(),
                prompt.ids.len(),
                prompt.shared_prefix,
                prefill_chunk,
            ),
        }
    }

    /// The tokens this sequence feeds into the next step for `work`.
    pub fn tokens(&self, work: scheduler::Work) -> &[u32] {
        match work {
            scheduler::Work::Decode => {
                std::slice::from_ref(self.pending.as_ref().expect("decoding has a token"))
            }
            scheduler::Work::Prefill(n) => {
                let start = self.cache.len();
                &self.request.prompt.ids[start..start + n]
            }
        }
    }

    /// Whether `work` ends the prompt (or decodes), so its logits are sampled.
    pub fn wants_logits(&self, work: scheduler::Work) -> bool {
        match work {
            scheduler::Work::Decode => true,
            scheduler::Work::Prefill(n) => self.cache.len() + n == self.request.prompt.ids.len(),
        }
    }

    /// Samples the next token from `logits` (`[vocab]`) after a step that
    /// ended the prompt or fed back a token.
    pub fn sample(
        &mut self,
        logits: &Tensor,
        tokenizer: &Tokenizer,
    ) -> Result<Progress, GenerateError> {
        let next = self.sampler.sample(logits)?;
        if self.first_token.is_none() {
            self.first_token = Some(Instant::now());
        }
        if self.request.stop_tokens.contains(&next) {
            return self.finish(FinishReason::Stop, tokenizer, None);
        }
        self.generated += 1;
        let piece = self.stream.push(next, tokenizer)?;
        if self.generated >= self.request.max_new {
            return self.finish(FinishReason::Length, tokenizer, piece);
        }
        self.pending = Some(next);
        Ok(Progress::Running(piece))
    }

    fn finish(
        &mut self,
        finish_reason: FinishReason,
        tokenizer: &Tokenizer,
        piece: Option<String>,
    ) -> Result<Progress, GenerateError> {
        let rest = self.stream.finish(tokenizer)?;
        let text = match (piece, rest) {
            (Some(piece), Some(rest)) => Some(piece + &rest),
            (piece, rest) => piece.or(rest),
        };
        let first_token = self.first_token.unwrap_or_else(Instant::now);
        let generation = Generation {
            text: self.stream.text(tokenizer)?,
            tokens: self.stream.tokens().to_vec(),
            prompt_tokens: self.request.prompt.ids.len(),
            completion_tokens: self.generated,
            prefill: first_token - self.admitted,
            decode: first_token.elapsed(),
            finish_reason,
        };
        Ok(Progress::Finished(text, generation))
    }
}
