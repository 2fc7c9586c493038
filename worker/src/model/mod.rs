//! Qwen2 models on candle: full-precision safetensors through
//! `models::qwen2`, quantized GGUF through `models::quantized_qwen2`.
//!
//! # Layout
//! - [`files`]: locating or downloading the model's files.
//! - this module: [`ModelError`], the device and dtype choice, and [`Qwen`],
//!   one interface over both weight formats.

pub mod files;

use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::{quantized_qwen2, qwen2};

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
    #[error("downloading `{file}`: {source}")]
    Download {
        file: String,
        source: hf_hub::api::tokio::ApiError,
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

enum Weights {
    Full(qwen2::ModelForCausalLM),
    Quantized(quantized_qwen2::ModelWeights),
}

/// A loaded Qwen2 model with its KV cache.
pub struct Qwen {
    weights: Weights,
    device: Device,
    /// Longest sequence (prompt + answer) the model supports.
    pub max_context: usize,
}

impl std::fmt::Debug for Qwen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qwen")
            .field("device", &self.device)
            .field("max_context", &self.max_context)
            .finish_non_exhaustive()
    }
}

impl Qwen {
    pub fn load(files: &ModelFiles, device: &Device, dtype: DType) -> Result<Qwen, ModelError> {
        match &files.weights {
            WeightFiles::Safetensors(shards) => {
                let config_path = files
                    .config
                    .as_ref()
                    .ok_or_else(|| ModelError::MissingFile {
                        file: "config.json".into(),
                        location: "the model files".into(),
                    })?;
                let config = read_config(config_path)?;
                // SAFETY: the weights are memory-mapped read-only; ebb never
                // writes model files while a worker runs, and a user who
                // edits them underneath a running worker gets garbage, not UB
                // in ebb's own data.
                #[allow(unsafe_code)]
                let vars = unsafe {
                    candle_nn::VarBuilder::from_mmaped_safetensors(shards, dtype, device)?
                };
                let model = qwen2::ModelForCausalLM::new(&config, vars)?;
                Ok(Qwen {
                    weights: Weights::Full(model),
                    device: device.clone(),
                    max_context: config.max_position_embeddings,
                })
            }
            WeightFiles::Gguf(path) => {
                let mut file = std::fs::File::open(path).map_err(|source| ModelError::Io {
                    path: path.clone(),
                    source,
                })?;
                let content = candle_core::quantized::gguf_file::Content::read(&mut file)
                    .map_err(|err| err.with_path(path))?;
                let max_context = content
                    .metadata
                    .get("qwen2.context_length")
                    .and_then(|value| value.to_u32().ok())
                    .unwrap_or(32_768) as usize;
                let model = quantized_qwen2::ModelWeights::from_gguf(content, &mut file, device)?;
                Ok(Qwen {
                    weights: Weights::Quantized(model),
                    device: device.clone(),
                    max_context,
                })
            }
        }
    }

    /// Runs `tokens` at `position` (the number of tokens already in the KV
    /// cache) and returns the next-token logits as a 1-D f32 tensor.
    pub fn forward(&mut self, tokens: &[u32], position: usize) -> candle_core::Result<Tensor> {
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let logits = match &mut self.weights {
            Weights::Full(model) => model.forward(&input, position)?,
            Weights::Quantized(model) => model.forward(&input, position)?,
        };
        logits.flatten_all()?.to_dtype(DType::F32)
    }

    /// Forgets the previous conversation; call between jobs.
    pub fn clear_kv_cache(&mut self) {
        match &mut self.weights {
            Weights::Full(model) => model.clear_kv_cache(),
            Weights::Quantized(model) => model.clear_kv_cache(),
        }
    }
}

fn read_config(path: &std::path::Path) -> Result<qwen2::Config, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|err| ModelError::Invalid {
        path: path.to_path_buf(),
        message: format!("not a Qwen2 config: {err}"),
    })
}
