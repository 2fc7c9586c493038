//! Rotary position embedding and attention of one sequence's tokens
//! against its own KV cache.
//!
//! Why attention runs per sequence while the linear layers run on the whole
//! batch: the linear layers read every weight once per step, so batching
//! them is where the speed is; attention reads only the sequence's own
//! keys and values, so batching it buys nothing but padding. Padded batched
//! attention would copy every cache into a `[batch, longest]` tensor each
//! step (traffic growing with batch x longest sequence, plus the masked
//! padding's work), while the per-sequence calls are a few small ops a layer
//! on views of each cache, copying nothing. The decode benchmark's batch
//! curve includes this cost.
//!
//! Grouped-query attention without copying keys: the query heads that share
//! a key head are stacked as rows (`[kv_heads, groups * n, head_dim]`), so
//! one matmul per sequence and layer covers every head.

use candle_core::{DType, Device, Tensor};

use super::weights::Dims;

/// Cosine and sine tables for every position, `[max_context, head_dim / 2]`.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Computed in f32 (an f16 position times frequency loses the position
    /// past 2048), stored in `dtype`.
    pub fn new(dims: &Dims, dtype: DType, device: &Device) -> candle_core::Result<Rope> {
        let half = dims.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / dims.rope_theta.powf(2.0 * i as f64 / dims.head_dim as f64) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, dims.max_context as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((dims.max_context, 1))?;
        let freqs = positions.matmul(&inv_freq)?;
        Ok(Rope {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }

    /// The tables' rows for `positions` (`[tokens]`, u32).
    pub fn at(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }
}

/// Rotates `x` (`[tokens, heads, head_dim]`) by each token's own position.
pub fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (tokens, heads, head_dim) = x.dims3()?;
    let x = x.reshape((1, tokens, heads, head_dim))?;
    candle_nn::rotary_emb::rope_thd(&x, cos, sin)?.reshape((tokens, heads, head_dim))
}

/// Attention of `n` new tokens of one sequence (queries `[n, heads,
/// head_dim]`, at positions `start..start + n`) over its keys and values
/// `[kv_heads, start + n, head_dim]`. Returns `[n, heads * head_dim]`.
pub fn attend(
    queries: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    start: usize,
    dims: &Dims,
) -> candle_core::Result<Tensor> {
    let n = queries.dim(0)?;
    let groups = dims.heads / dims.kv_heads;
    let len = start + n;
    let q = queries.transpose(0, 1)?.contiguous()?.reshape((
        dims.kv_heads,
        groups * n,
        dims.head_dim,
    ))?;
    let scale = 1.0 / (dims.head_dim as f64).sqrt();
    let mut scores = (q.matmul(&keys.t()?)? * scale)?;
    if n > 1 {
        let mask = causal_mask(n, start, queries.dtype(), queries.device())?;
        scores = scores
            .reshape((dims.kv_heads, groups, n, len))?
            .broadcast_add(&mask)?
            .reshape((dims.kv_heads, groups * n, len))?;
    }
    let weights = candle_nn::ops::softmax_last_dim(&scores)?;
    weights
        .matmul(values)?
        .reshape((dims.heads, n, dims.head_dim))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((n, dims.heads * dims.head_dim))
}

/// `[n, start + n]`: token `i` (at position `start + i`) sees positions up to its own.
fn causal_mask(
    n: usize,
    start: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let len = start + n;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..len).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (n, len), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::D;

    #[test]
    fn the_mask_hides_only_later_positions() {
        let mask = causal_mask(2, 3, DType::F32, &Device::Cpu).unwrap();
        let rows = mask.to_vec2::<f32>().unwrap();
        let ninf = f32::NEG_INFINITY;
        assert_eq!(rows[0], [0.0, 0.0, 0.0, 0.0, ninf]);
        assert_eq!(rows[1], [0.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn grouped_heads_match_repeated_keys() {
        // 4 query heads over 2 key heads, against the textbook computation
        // with the keys repeated per head.
        let dims = Dims {
            vocab: 1,
            hidden: 8,
            heads: 4,
            kv_heads: 2,
            head_dim: 2,
            layers: 1,
            max_context: 16,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-6,
        };
        let device = Device::Cpu;
        let n = 3;
        let start = 2;
        let values_of = |count: usize, salt: f32| -> Vec<f32> {
            (0..count).map(|i| (i as f32 * 0.37 + salt).sin()).collect()
        };
        let q = Tensor::from_vec(values_of(n * 4 * 2, 0.1), (n, 4, 2), &device).unwrap();
        let k = Tensor::from_vec(values_of(2 * 5 * 2, 0.7), (2, 5, 2), &device).unwrap();
        let v = Tensor::from_vec(values_of(2 * 5 * 2, 1.3), (2, 5, 2), &device).unwrap();
        let ours = attend(&q, &k, &v, start, &dims).unwrap();

        let q_h = q.transpose(0, 1).unwrap(); // [heads, n, d]
        let repeat = |t: &Tensor| {
            Tensor::cat(
                &[
                    t.narrow(0, 0, 1).unwrap(),
                    t.narrow(0, 0, 1).unwrap(),
                    t.narrow(0, 1, 1).unwrap(),
                    t.narrow(0, 1, 1).unwrap(),
                ],
                0,
            )
            .unwrap()
        };
        let scores = (q_h.matmul(&repeat(&k).t().unwrap()).unwrap() / 2f64.sqrt()).unwrap();
        let mask = causal_mask(n, start, DType::F32, &device).unwrap();
        let scores = scores.broadcast_add(&mask).unwrap();
        let weights = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let expected = weights
            .matmul(&repeat(&v))
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .reshape((n, 8))
            .unwrap();
        let diff = (ours - expected)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(D::Minus1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "max difference {diff}");
    }
}
