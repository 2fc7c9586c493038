//! Qwen2 on candle ops, written for batching: full-precision safetensors
//! and quantized GGUF share one forward pass over many sequences, each with
//! its own KV cache. (candle-transformers' Qwen2 keeps one cache and one
//! position for the whole batch, which cannot batch questions that start
//! and end at different times.)
//!
//! # Layout
//! - [`files`]: locating or downloading the model's files.
//! - [`weights`]: reading both formats into one set of layers.
//! - [`attention`]: rotary positions and per-sequence attention.
//! - [`kv_cache`]: per-sequence caches and the shared-prefix cache.
//! - [`matmul`]: ebb's CPU kernels for f16 and Q8_0 matrices.
//! - [`batch`]: one forward step over many sequences.
//! - this module: [`ModelError`], the device and dtype choice, and [`Qwen`].

pub mod attention;
pub mod batch;
pub mod download;
pub mod files;
pub mod kv_cache;
pub mod matmul;
pub mod weights;

use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};

use crate::config::{DTypeChoice, DeviceKind};
pub use files::{HubOptions, ModelFiles, ModelRequest, WeightFiles};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file `{file}` is missing from {location}")]
    MissingFile { file: String, location: String },
    #[error(
        "offline (HF_HUB_OFFLINE) and `{file}` of {repo} is not in the Hugging Face cache at {}",
        cache.display()
    )]
    NotCached {
        file: String,
        repo: String,
        cache: PathBuf,
    },
    #[error("downloading `{file}` from {endpoint} took longer than {timeout:?}")]
    DownloadTimeout {
        file: String,
        endpoint: String,
        timeout: Duration,
    },
    #[error("downloading `{file}` from {endpoint}: {message}")]
    Download {
        file: String,
        endpoint: String,
        /// The error with its causes (`connection refused` and the like).
        message: String,
    },
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("tokenizer {}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    #[error("--device cuda needs a worker built with `--features cuda`")]
    CudaNotBuilt,
    #[error("model: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The processor the model runs on.
pub fn device(kind: DeviceKind) -> Result<Device, ModelError> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda if candle_core::utils::cuda_is_available() => Ok(Device::new_cuda(0)?),
        DeviceKind::Cuda => Err(ModelError::CudaNotBuilt),
    }
}

/// Weight precision: measured here, bf16 decodes ~8x slower than f16 on CPU,
/// so `auto` picks f16 on CPU and bf16 on CUDA.
pub fn dtype(choice: DTypeChoice, device: &Device) -> DType {
    match choice {
        DTypeChoice::Auto if device.is_cuda() => DType::BF16,
        DTypeChoice::Auto | DTypeChoice::F16 => DType::F16,
        DTypeChoice::F32 => DType::F32,
        DTypeChoice::Bf16 => DType::BF16,
    }
}

/// A loaded Qwen2 model.
#[derive(Debug)]
pub struct Qwen {
    pub forward: batch::Forward,
    /// Longest sequence (prompt + answer) the model supports.
    pub max_context: usize,
}

impl Qwen {
    pub fn load(files: &ModelFiles, device: &Device, dtype: DType) -> Result<Qwen, ModelError> {
        let weights = match &files.weights {
            WeightFiles::Safetensors(shards) => {
                let config_path = files
                    .config
                    .as_ref()
                    .ok_or_else(|| ModelError::MissingFile {
                        file: "config.json".into(),
                        location: "the model files".into(),
                    })?;
                weights::Weights::from_safetensors(config_path, shards, device, dtype)?
            }
            WeightFiles::Gguf(path) => weights::Weights::from_gguf(path, device)?,
        };
        Ok(Qwen {
            max_context: weights.dims.max_context,
            forward: batch::Forward::new(weights, device)?,
        })
    }

    /// Bytes of keys and values one token takes.
    pub fn kv_bytes_per_token(&self) -> usize {
        let weights = &self.forward.weights;
        kv_cache::bytes_per_token(&weights.dims, weights.dtype)
    }

    /// Runs `prompt` and then one decoded token through the batched forward
    /// pass on a throwaway cache, so that lazy setup (the matmul thread
    /// pool, first-touch allocations, CUDA kernels) is paid at start and not
    /// by the first question. The logits are discarded; the cache is freed.
    pub fn warm_up(&self, prompt: &[u32]) -> candle_core::Result<()> {
        let Some(&last) = prompt.last() else {
            candle_core::bail!("the warm-up prompt is empty")
        };
        let weights = &self.forward.weights;
        let device = self.forward.device();
        let mut cache =
            kv_cache::SequenceCache::new(&weights.dims, prompt.len() + 1, weights.dtype, device)?;
        for tokens in [prompt, &[last]] {
            let mut segments = [batch::Segment {
                cache: &mut cache,
                tokens,
                wants_logits: true,
            }];
            self.forward.step(&mut segments)?;
        }
        // CUDA runs asynchronously: the warm-up is done when the device is.
        device.synchronize()
    }

    /// Next-token logits (`[vocab]`, f32) after `tokens`, as a fresh sequence.
    pub fn logits(&self, tokens: &[u32]) -> candle_core::Result<Tensor> {
        let weights = &self.forward.weights;
        let mut cache = kv_cache::SequenceCache::new(
            &weights.dims,
            tokens.len(),
            weights.dtype,
            self.forward.device(),
        )?;
        let mut segments = [batch::Segment {
            cache: &mut cache,
            tokens,
            wants_logits: true,
        }];
        self.forward.step(&mut segments)?.squeeze(0)
    }
}

/// The KV budget when `--kv-cache-mib` is not given: half the memory
/// available once the model is loaded (CPU: the system's `MemAvailable`,
/// or less under a container's cgroup limit; the other half is headroom for
/// activations, the tokenizer and everything else), or 80 % of the GPU's
/// free memory (CUDA).
pub fn default_kv_budget_bytes(device: &Device) -> Result<u64, ModelError> {
    if device.is_cuda() {
        return cuda_free_bytes().map(|free| free / 5 * 4);
    }
    let path = std::path::Path::new("/proc/meminfo");
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let available = text
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .ok_or_else(|| ModelError::Invalid {
            path: path.to_path_buf(),
            message: "no MemAvailable line; pass --kv-cache-mib".into(),
        })?;
    let available = cgroup_room().map_or(available, |room| room.min(available));
    Ok(available / 2)
}

/// Bytes this process's cgroup (v2) may still take, when it has a limit.
fn cgroup_room() -> Option<u64> {
    let read = |file: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{file}")).ok();
    let limit: u64 = read("memory.max")?.trim().parse().ok()?;
    let current: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(limit.saturating_sub(current))
}

#[cfg(feature = "cuda")]
fn cuda_free_bytes() -> Result<u64, ModelError> {
    // The device is created (its context current) before this is asked.
    let (free, _total) = candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
        .map_err(|err| ModelError::Candle(candle_core::Error::wrap(err)))?;
    Ok(free as u64)
}

#[cfg(not(feature = "cuda"))]
fn cuda_free_bytes() -> Result<u64, ModelError> {
    Err(ModelError::CudaNotBuilt)
}
