//! Continuous batching: many questions decode together, new ones join
//! between steps, finished ones leave at once.
//!
//! # Layout
//! - [`scheduler`]: which sequences run what in the next step (pure).
//! - [`sequence`]: one question's state: prompt, cache, sampler, text.
//! - this module: [`Engine`], the synchronous core: admit, step, cancel.
//! - [`thread`]: the engine on its own thread, fed by the async worker, and
//!   the KV memory budget that decides who may join.

pub mod scheduler;
pub mod sequence;
pub mod thread;

use std::collections::BTreeMap;
use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::generate::{GenerateError, Generation};
use crate::model::Qwen;
use crate::model::batch::Segment;
use crate::model::kv_cache::{PrefixCache, SequenceCache};
use sequence::Sequence;
pub use sequence::{Progress, Request, positions_needed};

/// Identifies a sequence inside one engine.
pub type SeqId = u64;

/// How the engine batches.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Most prompt tokens one step carries.
    pub prefill_chunk: usize,
    /// Tokens of shared prefixes kept (least recently used go first).
    pub prefix_cache_tokens: usize,
}

/// What a step produced for one sequence.
#[derive(Debug)]
pub enum Output {
    Text(SeqId, String),
    Finished(SeqId, Result<Generation, GenerateError>),
}

/// Prompt tokens run and saved by the prefix cache, since the engine started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PrefillCounts {
    pub run: u64,
    pub saved: u64,
}

/// The model with its sequences in flight.
#[derive(Debug)]
pub struct Engine {
    model: Qwen,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
    /// In admission order (ids only grow).
    sequences: BTreeMap<SeqId, Sequence>,
    prefixes: PrefixCache,
    next_id: SeqId,
    counts: PrefillCounts,
}

impl Engine {
    pub fn new(model: Qwen, tokenizer: Arc<Tokenizer>, config: EngineConfig) -> Engine {
        Engine {
            model,
            tokenizer,
            prefixes: PrefixCache::new(config.prefix_cache_tokens),
            config,
            sequences: BTreeMap::new(),
            next_id: 0,
            counts: PrefillCounts::default(),
        }
    }

    pub fn model(&self) -> &Qwen {
        &self.model
    }

    pub fn into_model(self) -> Qwen {
        self.model
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn active(&self) -> usize {
        self.sequences.len()
    }

    pub fn is_idle(&self) -> bool {
        self.sequences.is_empty()
    }

    pub fn prefill_counts(&self) -> PrefillCounts {
        self.counts
    }

    /// Bytes of KV cache one token takes in this model.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.model.kv_bytes_per_token()
    }

    /// Adds a sequence; it joins the next step. Its cache is allocated now,
    /// for its whole reservation, and starts from a cached shared prefix
    /// when there is one.
    pub fn admit(&mut self, request: Request) -> Result<SeqId, GenerateError> {
        let prompt_len = request.prompt.ids.len();
        let max = self.model.max_context;
        if prompt_len == 0 || prompt_len >= max {
            return Err(GenerateError::PromptTooLong {
                tokens: prompt_len,
                max,
            });
        }
        let capacity = positions_needed(prompt_len, request.max_new).min(max);
        let weights = &self.model.forward.weights;
        let mut cache = SequenceCache::new(
            &weights.dims,
            capacity,
            weights.dtype,
            self.model.forward.device(),
        )?;
        let shared = request.prompt.shared_prefix;
        let mut prefix_to_offer = 0;
        if shared > 0 {
            match self.prefixes.get(&request.prompt.ids[..shared]) {
                Some(prefix) => {
                    cache.load_prefix(&prefix)?;
                    self.counts.saved += shared as u64;
                }
                None => prefix_to_offer = shared,
            }
        }
        let mut sequence = Sequence::new(request, cache);
        sequence.prefix_to_offer = prefix_to_offer;
        let id = self.next_id;
        self.next_id += 1;
        self.sequences.insert(id, sequence);
        Ok(id)
    }

    /// Drops a sequence (its client is gone); frees its cache.
    pub fn cancel(&mut self, id: SeqId) {
        self.sequences.remove(&id);
    }

    /// Runs one step over the sequences in flight. A model error fails
    /// every sequence of the step (they are retried elsewhere); a sampling
    /// error fails its sequence alone.
    pub fn step(&mut self) -> Vec<Output> {
        let phases: Vec<_> = self
            .sequences
            .values()
            .map(|s| s.phase(self.config.prefill_chunk))
            .collect();
        let plan = scheduler::plan(&phases, self.config.prefill_chunk);
        let ids: Vec<SeqId> = self.sequences.keys().copied().collect();
        let planned: Vec<(SeqId, scheduler::Work)> =
            plan.iter().map(|&(i, w)| (ids[i], w)).collect();
        if planned.is_empty() {
            return Vec::new();
        }
        match self.run(&planned) {
            Ok(outputs) => outputs,
            Err(err) => {
                let message = err.to_string();
                planned
                    .iter()
                    .filter_map(|(id, _)| self.sequences.remove(id).map(|_| *id))
                    .map(|id| Output::Finished(id, Err(GenerateError::Step(message.clone()))))
                    .collect()
            }
        }
    }

    fn run(&mut self, planned: &[(SeqId, scheduler::Work)]) -> Result<Vec<Output>, GenerateError> {
        // Owned token lists first: a segment borrows its sequence's cache
        // mutably while the tokens come from the same sequence.
        let mut inputs = Vec::with_capacity(planned.len());
        for (id, work) in planned {
            let sequence = &self.sequences[id];
            if let scheduler::Work::Prefill(n) = work {
                self.counts.run += *n as u64;
            }
            inputs.push((
                sequence.tokens(*work).to_vec(),
                sequence.wants_logits(*work),
            ));
        }
        let logits = {
            let mut segments: Vec<Segment<'_>> = Vec::with_capacity(planned.len());
            let mut next = planned.iter().zip(&inputs).peekable();
            for (id, sequence) in self.sequences.iter_mut() {
                if let Some(((_, _), (tokens, wants_logits))) = next.next_if(|((p, _), _)| p == id)
                {
                    segments.push(Segment {
                        cache: &mut sequence.cache,
                        tokens,
                        wants_logits: *wants_logits,
                    });
                }
            }
            self.model.forward.step(&mut segments)?
        };
        let mut outputs = Vec::new();
        let mut row = 0;
        for ((id, _), (_, wants_logits)) in planned.iter().zip(&inputs) {
            self.offer_prefix(*id);
            if !*wants_logits {
                continue;
            }
            let sequence = self.sequences.get_mut(id).expect("still in flight");
            let progress = logits
                .get(row)
                .map_err(GenerateError::from)
                .and_then(|l| sequence.sample(&l, &self.tokenizer));
            row += 1;
            match progress {
                Ok(Progress::Running(text)) => outputs.extend(text.map(|t| Output::Text(*id, t))),
                Ok(Progress::Finished(text, generation)) => {
                    outputs.extend(text.map(|t| Output::Text(*id, t)));
                    self.sequences.remove(id);
                    outputs.push(Output::Finished(*id, Ok(generation)));
                }
                Err(err) => {
                    self.sequences.remove(id);
                    outputs.push(Output::Finished(*id, Err(err)));
                }
            }
        }
        Ok(outputs)
    }

    /// Keeps the sequence's shared prefix for others once its cache holds
    /// exactly that prefix (chunks end there, see [`scheduler::next_chunk`]).
    fn offer_prefix(&mut self, id: SeqId) {
        let Some(sequence) = self.sequences.get_mut(&id) else {
            return;
        };
        let len = sequence.prefix_to_offer;
        if len == 0 || sequence.cache.len() != len {
            return;
        }
        sequence.prefix_to_offer = 0;
        match sequence.cache.snapshot(len) {
            Ok(kv) => {
                let prefix = sequence.request.prompt.ids[..len].to_vec();
                self.prefixes.insert(prefix, kv);
            }
            // Only a lost saving: the sequence itself is fine.
            Err(err) => tracing::warn!(cause = %err, "cannot keep a shared prompt prefix"),
        }
    }
}
