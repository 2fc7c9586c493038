//! Qwen2 weights in one form for both file formats: safetensors (f16, bf16,
//! f32 matrices) and GGUF (quantized matrices). Both become [`Linear`]s, so
//! the batch step in [`super::batch`] has one code path. On CPU, f16 and
//! Q8_0 matrices go through ebb's own kernels ([`super::matmul`]) with f32
//! activations; everything else (CUDA, f32, bf16, other quantizations)
//! through candle's `QMatMul`.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Layout, Module, Storage, Tensor, WithDType};
use candle_transformers::models::qwen2;
use half::f16;

use super::ModelError;
use super::matmul::{self, Q8Matrix};

/// Sizes the forward pass and the KV cache need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dims {
    pub vocab: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    /// Longest sequence (prompt + answer) the model supports.
    pub max_context: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
}

/// `x W^T + b` with `W` full-precision or quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Matrix,
    bias: Option<Tensor>,
}

/// A [`Linear`]'s `W`, `[out, in]`, and the kernel that multiplies by it.
#[derive(Debug, Clone)]
enum Matrix {
    Candle(QMatMul),
    /// f16 on CPU, read in place by [`matmul::f16_product`].
    F16(Tensor),
    /// Q8_0 on CPU, [`matmul::Q8Matrix::product`].
    Q8_0(Arc<Q8Matrix>),
}

impl Linear {
    /// `x` is `[tokens, in]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            Matrix::Candle(weight) => weight.forward(x)?,
            Matrix::F16(weight) => {
                let (cols, k) = weight.dims2()?;
                let (storage, layout) = weight.storage_and_layout();
                let w = cpu_slice::<f16>(&storage, layout)?;
                on_rows(x, cols, |xs, rows| {
                    matmul::f16_product(xs, rows, w, cols, k)
                })?
            }
            Matrix::Q8_0(weight) => on_rows(x, weight.cols(), |xs, rows| weight.product(xs, rows))?,
        };
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }
}

/// `product(x, rows)` on `x` as contiguous f32 `[rows, in]`, returned as
/// `[rows, cols]`.
fn on_rows(
    x: &Tensor,
    cols: usize,
    product: impl FnOnce(&[f32], usize) -> Vec<f32>,
) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let (rows, _) = x.dims2()?;
    let out = {
        let (storage, layout) = x.storage_and_layout();
        product(cpu_slice::<f32>(&storage, layout)?, rows)
    };
    Tensor::from_vec(out, (rows, cols), x.device())
}

fn cpu_slice<'a, T: WithDType>(
    storage: &'a Storage,
    layout: &Layout,
) -> candle_core::Result<&'a [T]> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("ebb's CPU matmul got a tensor on another device")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("ebb's CPU matmul needs contiguous tensors")
    };
    Ok(&cpu.as_slice::<T>()?[start..end])
}

/// The token embedding table, `[vocab, hidden]`, looked up by token id.
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    /// Q8_0 on CPU (GGUF): rows are dequantized as they are looked up, so
    /// loading never expands the whole table to f32; with tied embeddings
    /// it is the LM head's own matrix.
    Q8_0 {
        table: Arc<Q8Matrix>,
        hidden: usize,
    },
}

impl Embedding {
    /// Rows `ids` (`[tokens]`, u32) as `[tokens, hidden]`.
    pub fn lookup(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Embedding::Dense(table) => table.index_select(ids, 0),
            Embedding::Q8_0 { table, hidden } => {
                let (ids, hidden) = (ids.to_vec1::<u32>()?, *hidden);
                let mut rows = Vec::with_capacity(ids.len() * hidden);
                for id in &ids {
                    let id = *id as usize;
                    if id >= table.cols() {
                        candle_core::bail!("token id {id} is outside the vocabulary");
                    }
                    table.dequantize_row(id, &mut rows);
                }
                Tensor::from_vec(rows, (ids.len(), hidden), &Device::Cpu)
            }
        }
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Layer {
    pub attn_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub mlp_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// Everything read from the weight files.
#[derive(Debug, Clone)]
pub struct Weights {
    pub dims: Dims,
    /// Activations and the KV cache are kept in this dtype.
    pub dtype: DType,
    pub embed: Embedding,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub lm_head: Linear,
}

impl Weights {
    /// Safetensors shards plus `config.json`, in `dtype`.
    pub fn from_safetensors(
        config_path: &Path,
        shards: &[std::path::PathBuf],
        device: &Device,
        dtype: DType,
    ) -> Result<Weights, ModelError> {
        let config = read_config(config_path)?;
        // f16 matrices on CPU take ebb's kernels, which want f32 activations
        // (f16 arithmetic on CPU is emulated and slow).
        let own_kernels = device.is_cpu() && dtype == DType::F16;
        let activations = if own_kernels { DType::F32 } else { dtype };
        // SAFETY: the weights are memory-mapped read-only; ebb never writes
        // model files while a worker runs, and a user who edits them
        // underneath a running worker gets garbage, not UB in ebb's own data.
        #[allow(unsafe_code)]
        let vars =
            unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(shards, dtype, device)? };
        let dims = Dims {
            vocab: config.vocab_size,
            hidden: config.hidden_size,
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim: config.hidden_size / config.num_attention_heads,
            layers: config.num_hidden_layers,
            max_context: config.max_position_embeddings,
            rope_theta: config.rope_theta,
            rms_norm_eps: config.rms_norm_eps,
        };
        let hidden = dims.hidden;
        let kv = dims.kv_heads * dims.head_dim;
        let inner = config.intermediate_size;
        let matrix = |weight: Tensor| match own_kernels {
            true => Matrix::F16(weight),
            false => Matrix::Candle(QMatMul::Tensor(weight)),
        };
        let dense = |name: &str, len: usize| vars.get(len, name)?.to_dtype(activations);
        let linear =
            |name: &str, rows: usize, cols: usize, bias: bool| -> candle_core::Result<Linear> {
                let weight = vars.get((rows, cols), &format!("{name}.weight"))?;
                let bias = bias
                    .then(|| dense(&format!("{name}.bias"), rows))
                    .transpose()?;
                Ok(Linear {
                    weight: matrix(weight),
                    bias,
                })
            };
        let embed = vars.get((dims.vocab, hidden), "model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(dims.layers);
        for layer in 0..dims.layers {
            let p = format!("model.layers.{layer}");
            layers.push(Layer {
                attn_norm: dense(&format!("{p}.input_layernorm.weight"), hidden)?,
                q: linear(&format!("{p}.self_attn.q_proj"), hidden, hidden, true)?,
                k: linear(&format!("{p}.self_attn.k_proj"), kv, hidden, true)?,
                v: linear(&format!("{p}.self_attn.v_proj"), kv, hidden, true)?,
                o: linear(&format!("{p}.self_attn.o_proj"), hidden, hidden, false)?,
                mlp_norm: dense(&format!("{p}.post_attention_layernorm.weight"), hidden)?,
                gate: linear(&format!("{p}.mlp.gate_proj"), inner, hidden, false)?,
                up: linear(&format!("{p}.mlp.up_proj"), inner, hidden, false)?,
                down: linear(&format!("{p}.mlp.down_proj"), hidden, inner, false)?,
            });
        }
        let lm_head = if config.tie_word_embeddings {
            Linear {
                weight: matrix(embed.clone()),
                bias: None,
            }
        } else {
            linear("lm_head", dims.vocab, hidden, false)?
        };
        Ok(Weights {
            dims,
            dtype: activations,
            embed: Embedding::Dense(embed),
            layers,
            norm: dense("model.norm.weight", hidden)?,
            lm_head,
        })
    }

    /// One GGUF file in llama.cpp's Qwen2 layout.
    pub fn from_gguf(path: &Path, device: &Device) -> Result<Weights, ModelError> {
        let mut gguf = Gguf::open(path, device)?;
        let heads = gguf.number("qwen2.attention.head_count")? as usize;
        let hidden = gguf.number("qwen2.embedding_length")? as usize;
        let vocab = gguf.dims("token_embd.weight")?[0];
        let dims = Dims {
            vocab,
            hidden,
            heads,
            kv_heads: gguf.number("qwen2.attention.head_count_kv")? as usize,
            head_dim: hidden / heads,
            layers: gguf.number("qwen2.block_count")? as usize,
            max_context: gguf
                .number("qwen2.context_length")
                .map_or(32_768, |n| n as usize),
            rope_theta: gguf.number("qwen2.rope.freq_base").unwrap_or(10_000.0),
            rms_norm_eps: gguf.number("qwen2.attention.layer_norm_rms_epsilon")?,
        };
        let mut layers = Vec::with_capacity(dims.layers);
        for layer in 0..dims.layers {
            let p = format!("blk.{layer}");
            layers.push(Layer {
                q: gguf.linear(&format!("{p}.attn_q"), true)?,
                k: gguf.linear(&format!("{p}.attn_k"), true)?,
                v: gguf.linear(&format!("{p}.attn_v"), true)?,
                o: gguf.linear(&format!("{p}.attn_output"), false)?,
                gate: gguf.linear(&format!("{p}.ffn_gate"), false)?,
                up: gguf.linear(&format!("{p}.ffn_up"), false)?,
                down: gguf.linear(&format!("{p}.ffn_down"), false)?,
                attn_norm: gguf.dense(&format!("{p}.attn_norm.weight"))?,
                mlp_norm: gguf.dense(&format!("{p}.ffn_norm.weight"))?,
            });
        }
        let embed_matrix = gguf.matrix("token_embd.weight")?;
        let embed = match &embed_matrix {
            Matrix::Q8_0(table) => Embedding::Q8_0 {
                table: table.clone(),
                hidden,
            },
            _ => Embedding::Dense(gguf.tensor("token_embd.weight")?.dequantize(device)?),
        };
        let lm_head = if gguf.content.tensor_infos.contains_key("output.weight") {
            gguf.linear("output", false)?
        } else {
            // Tied embeddings: the quantized embedding matrix is the head.
            Linear {
                weight: embed_matrix,
                bias: None,
            }
        };
        Ok(Weights {
            dims,
            dtype: DType::F32,
            embed,
            layers,
            norm: gguf.dense("output_norm.weight")?,
            lm_head,
        })
    }
}

/// An open GGUF file, memory-mapped: Q8_0 matrices are read in place in
/// the page cache, other tensors built from it.
struct Gguf {
    content: gguf_file::Content,
    data: Arc<memmap2::Mmap>,
    path: std::path::PathBuf,
    device: Device,
}

impl Gguf {
    fn open(path: &Path, device: &Device) -> Result<Gguf, ModelError> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // Every byte is needed: populating the mapping reads the file in
        // one sequential pass up front instead of a page fault per 4 KiB
        // in the warm-up forward. The Q8_0 matrices are read in place from
        // it; decoding from the page cache measured as fast as from a copy
        // in anonymous memory (`cargo bench -p ebb-worker --bench decode`,
        // side by side), and the copy cost as long as the read.
        // SAFETY: mapped read-only for as long as the weights live; ebb
        // never writes model files while a worker runs (as for safetensors
        // above), and a download replaces a file by renaming a new one
        // over it, which leaves this mapping's inode as it was.
        #[allow(unsafe_code)]
        let data = unsafe { memmap2::MmapOptions::new().populate().map(&file) }.map_err(io)?;
        let content = gguf_file::Content::read(&mut std::io::Cursor::new(&data[..]))
            .map_err(|err| err.with_path(path))?;
        Ok(Gguf {
            content,
            data: Arc::new(data),
            path: path.to_path_buf(),
            device: device.clone(),
        })
    }

    fn invalid(&self, message: String) -> ModelError {
        ModelError::Invalid {
            path: self.path.clone(),
            message,
        }
    }

    fn number(&self, key: &str) -> Result<f64, ModelError> {
        let value = self
            .content
            .metadata
            .get(key)
            .ok_or_else(|| self.invalid(format!("GGUF metadata `{key}` is missing")))?;
        value
            .to_u32()
            .map(f64::from)
            .or_else(|_| value.to_f32().map(f64::from))
            .or_else(|_| value.to_u64().map(|n| n as f64))
            .map_err(|err| self.invalid(format!("GGUF metadata `{key}`: {err}")))
    }

    fn tensor(&mut self, name: &str) -> Result<QTensor, ModelError> {
        Ok(self
            .content
            .tensor(
                &mut std::io::Cursor::new(&self.data[..]),
                name,
                &self.device,
            )
            .map_err(|err| err.with_path(&self.path))?)
    }

    /// A small tensor (norm, bias) as a plain f32 tensor.
    fn dense(&mut self, name: &str) -> Result<Tensor, ModelError> {
        let device = self.device.clone();
        Ok(self.tensor(name)?.dequantize(&device)?)
    }

    fn info(&self, name: &str) -> Result<&gguf_file::TensorInfo, ModelError> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.invalid(format!("GGUF tensor `{name}` is missing")))
    }

    fn dims(&self, name: &str) -> Result<Vec<usize>, ModelError> {
        Ok(self.info(name)?.shape.dims().to_vec())
    }

    /// A matrix for a [`Linear`]. Q8_0 on CPU is read where it lies in
    /// the mapping: no candle tensor, no copy.
    fn matrix(&mut self, name: &str) -> Result<Matrix, ModelError> {
        let info = self.info(name)?;
        if !(self.device.is_cpu() && info.ggml_dtype == GgmlDType::Q8_0) {
            let weight = self.tensor(name)?;
            return Ok(Matrix::Candle(QMatMul::from_qtensor(weight)?));
        }
        let (cols, k) = info.shape.dims2()?;
        let at = (self.content.tensor_data_offset + info.offset) as usize;
        let matrix = Q8Matrix::mapped(self.data.clone(), at, cols, k)
            .map_err(|message| self.invalid(format!("{name}: {message} ({cols} x {k})")))?;
        Ok(Matrix::Q8_0(Arc::new(matrix)))
    }

    fn linear(&mut self, name: &str, bias: bool) -> Result<Linear, ModelError> {
        let weight = self.matrix(&format!("{name}.weight"))?;
        let bias = bias
            .then(|| self.dense(&format!("{name}.bias")))
            .transpose()?;
        Ok(Linear { weight, bias })
    }
}

fn read_config(path: &Path) -> Result<qwen2::Config, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|err| ModelError::Invalid {
        path: path.to_path_buf(),
        message: format!("not a Qwen2 config: {err}"),
    })
}
