//! Keys and values of the tokens a sequence has seen, one cache per
//! sequence (so sequences of any length share a batch), allocated once at
//! admission for the sequence's whole reservation (prompt + `max_tokens`):
//! a sequence that was admitted can never run out of memory mid-answer.
//!
//! [`PrefixCache`] keeps the keys and values of shared prompt prefixes (the
//! tutor's system prompt for a grade and language) so a new sequence copies
//! them instead of recomputing them.

use std::collections::VecDeque;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::weights::Dims;

/// Bytes of keys and values one token occupies across all layers.
pub fn bytes_per_token(dims: &Dims, dtype: DType) -> usize {
    2 * dims.layers * dims.kv_heads * dims.head_dim * dtype.size_in_bytes()
}

/// One sequence's cache: per layer, keys and values `[kv_heads, capacity, head_dim]`.
#[derive(Debug)]
pub struct SequenceCache {
    layers: Vec<(Tensor, Tensor)>,
    /// Tokens stored so far (the position of the next token).
    len: usize,
    capacity: usize,
}

impl SequenceCache {
    pub fn new(
        dims: &Dims,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<SequenceCache> {
        let shape = (dims.kv_heads, capacity, dims.head_dim);
        let layers = (0..dims.layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, dtype, device)?,
                    Tensor::zeros(shape, dtype, device)?,
                ))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(SequenceCache {
            layers,
            len: 0,
            capacity,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Writes `keys`/`values` (`[kv_heads, n, head_dim]`, contiguous) of
    /// layer `layer` at positions `len..len + n`, and returns the layer's
    /// keys and values for positions `0..len + n`. [`Self::advance`] moves
    /// `len` once every layer has been written.
    pub fn append(
        &mut self,
        layer: usize,
        keys: &Tensor,
        values: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let n = keys.dim(1)?;
        if self.len + n > self.capacity {
            candle_core::bail!(
                "KV cache overflow: {} + {n} tokens > capacity {}",
                self.len,
                self.capacity
            );
        }
        let (k, v) = &self.layers[layer];
        k.slice_set(keys, 1, self.len)?;
        v.slice_set(values, 1, self.len)?;
        Ok((k.narrow(1, 0, self.len + n)?, v.narrow(1, 0, self.len + n)?))
    }

    pub fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }

    /// A copy of the first `len` positions, to share as a prefix.
    pub fn snapshot(&self, len: usize) -> candle_core::Result<PrefixKv> {
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((own(&k.narrow(1, 0, len)?)?, own(&v.narrow(1, 0, len)?)?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(PrefixKv { layers, len })
    }

    /// Starts this (empty) sequence from a shared prefix.
    pub fn load_prefix(&mut self, prefix: &PrefixKv) -> candle_core::Result<()> {
        if self.len != 0 || prefix.len > self.capacity {
            candle_core::bail!("a prefix goes into an empty cache that can hold it");
        }
        for ((k, v), (pk, pv)) in self.layers.iter().zip(&prefix.layers) {
            k.slice_set(pk, 1, 0)?;
            v.slice_set(pv, 1, 0)?;
        }
        self.len = prefix.len;
        Ok(())
    }
}

/// Keys and values of a shared prompt prefix, read-only.
#[derive(Debug)]
pub struct PrefixKv {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
}

impl PrefixKv {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The most recently used shared prefixes, at most `capacity_tokens`
/// tokens in all (their memory is taken out of the KV budget up front).
#[derive(Debug)]
pub struct PrefixCache {
    /// Most recently used last.
    entries: VecDeque<(Vec<u32>, Arc<PrefixKv>)>,
    capacity_tokens: usize,
    tokens: usize,
}

impl PrefixCache {
    pub fn new(capacity_tokens: usize) -> PrefixCache {
        PrefixCache {
            entries: VecDeque::new(),
            capacity_tokens,
            tokens: 0,
        }
    }

    /// The cached prefix that is exactly `prefix`, marked as just used.
    pub fn get(&mut self, prefix: &[u32]) -> Option<Arc<PrefixKv>> {
        let index = self.entries.iter().position(|(ids, _)| ids == prefix)?;
        let entry = self.entries.remove(index)?;
        let kv = entry.1.clone();
        self.entries.push_back(entry);
        Some(kv)
    }

    /// Keeps `kv` for `prefix`, evicting the least recently used entries
    /// to stay within capacity. A prefix larger than the whole cache is not kept.
    pub fn insert(&mut self, prefix: Vec<u32>, kv: PrefixKv) {
        if prefix.len() > self.capacity_tokens || self.entries.iter().any(|(ids, _)| *ids == prefix)
        {
            return;
        }
        while self.tokens + prefix.len() > self.capacity_tokens {
            let Some((ids, _)) = self.entries.pop_front() else {
                break;
            };
            self.tokens -= ids.len();
        }
        self.tokens += prefix.len();
        self.entries.push_back((prefix, Arc::new(kv)));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A contiguous copy with storage of its own (a prefix must not share the
/// storage of the cache it came from, which goes on being written).
fn own(view: &Tensor) -> candle_core::Result<Tensor> {
    view.contiguous()?.copy()
}
