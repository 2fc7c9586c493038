//! One forward step over many sequences at once.
//!
//! The step's tokens (one per decoding sequence, a chunk of prompt per
//! prefilling one) are laid end to end as `[tokens, hidden]`, so every
//! linear layer (QKV, output, MLP, LM head) is one matmul that reads each
//! weight once for the whole batch. Each token is rotated by its own
//! position, and attention runs per sequence over that sequence's cache
//! ([`super::attention`]).

use candle_core::{DType, Device, Tensor};

use super::attention::{self, Rope};
use super::kv_cache::SequenceCache;
use super::weights::{Layer, Weights};

/// One sequence's part of a step: `tokens` at positions `cache.len()..`.
#[derive(Debug)]
pub struct Segment<'a> {
    pub cache: &'a mut SequenceCache,
    pub tokens: &'a [u32],
    /// Whether the step must return logits for this segment's last token
    /// (not for a prompt chunk that is not the prompt's last).
    pub wants_logits: bool,
}

/// The weights with their position tables: the forward pass.
#[derive(Debug)]
pub struct Forward {
    pub weights: Weights,
    rope: Rope,
    device: Device,
}

impl Forward {
    pub fn new(weights: Weights, device: &Device) -> candle_core::Result<Forward> {
        let rope = Rope::new(&weights.dims, weights.dtype, device)?;
        Ok(Forward {
            weights,
            rope,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs every segment's tokens, appends their keys and values to their
    /// caches, and returns `[segments wanting logits, vocab]` f32 logits in
    /// segment order.
    pub fn step(&self, segments: &mut [Segment<'_>]) -> candle_core::Result<Tensor> {
        // On a thread of the matmul pool, so that each of the step's ~170
        // matmuls runs partly on this thread instead of waking the pool and
        // sleeping until it is done.
        rayon::scope(|_| self.run(segments))
    }

    fn run(&self, segments: &mut [Segment<'_>]) -> candle_core::Result<Tensor> {
        let dims = &self.weights.dims;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut last_rows = Vec::new();
        for segment in segments.iter() {
            let start = segment.cache.len();
            ids.extend_from_slice(segment.tokens);
            positions.extend((start..start + segment.tokens.len()).map(|p| p as u32));
            if segment.wants_logits {
                last_rows.push(ids.len() as u32 - 1);
            }
        }
        if ids.is_empty() {
            candle_core::bail!("a step needs at least one token");
        }
        let tokens = ids.len();
        let ids = Tensor::from_vec(ids, tokens, &self.device)?;
        let positions = Tensor::from_vec(positions, tokens, &self.device)?;
        let (cos, sin) = self.rope.at(&positions)?;
        let mut x = self
            .weights
            .embed
            .lookup(&ids)?
            .to_dtype(self.weights.dtype)?;
        for (index, layer) in self.weights.layers.iter().enumerate() {
            x = self.layer(index, layer, &x, segments, &cos, &sin)?;
        }
        for segment in segments.iter_mut() {
            segment.cache.advance(segment.tokens.len());
        }
        if last_rows.is_empty() {
            return Tensor::zeros((0, dims.vocab), DType::F32, &self.device);
        }
        let count = last_rows.len();
        let rows = Tensor::from_vec(last_rows, count, &self.device)?;
        let last = self.norm(&x.index_select(&rows, 0)?, &self.weights.norm)?;
        self.weights.lm_head.forward(&last)?.to_dtype(DType::F32)
    }

    fn layer(
        &self,
        index: usize,
        layer: &Layer,
        x: &Tensor,
        segments: &mut [Segment<'_>],
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let dims = &self.weights.dims;
        let tokens = x.dim(0)?;
        let h = self.norm(x, &layer.attn_norm)?;
        let q = layer
            .q
            .forward(&h)?
            .reshape((tokens, dims.heads, dims.head_dim))?;
        let k = layer
            .k
            .forward(&h)?
            .reshape((tokens, dims.kv_heads, dims.head_dim))?;
        let v = layer
            .v
            .forward(&h)?
            .reshape((tokens, dims.kv_heads, dims.head_dim))?;
        let q = attention::rotate(&q, cos, sin)?;
        let k = attention::rotate(&k, cos, sin)?;
        let mut outputs = Vec::with_capacity(segments.len());
        let mut offset = 0;
        for segment in segments.iter_mut() {
            let n = segment.tokens.len();
            let start = segment.cache.len();
            let heads_first = |t: &Tensor| t.narrow(0, offset, n)?.transpose(0, 1)?.contiguous();
            let (keys, values) =
                segment
                    .cache
                    .append(index, &heads_first(&k)?, &heads_first(&v)?)?;
            let q = q.narrow(0, offset, n)?;
            outputs.push(attention::attend(&q, &keys, &values, start, dims)?);
            offset += n;
        }
        let attended = Tensor::cat(&outputs, 0)?;
        let x = (x + layer.o.forward(&attended)?)?;
        let h = self.norm(&x, &layer.mlp_norm)?;
        let mlp = (layer.gate.forward(&h)?.silu()? * layer.up.forward(&h)?)?;
        x + layer.down.forward(&mlp)?
    }

    fn norm(&self, x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(x, weight, self.weights.dims.rms_norm_eps as f32)
    }
}
