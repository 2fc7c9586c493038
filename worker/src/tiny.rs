//! `ebb-worker tiny-model`: a random-weight model with the real Qwen2
//! architecture, file layout and special tokens, so tests and offline demos
//! exercise the production loading path without downloading anything. The
//! same writer produces random weights at real Qwen2.5 shapes for benchmarks.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

use crate::model::ModelError;

/// Special tokens of Qwen's chat template, in Qwen's order.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A few BPE merges, so the tokenizer is a real byte-level BPE and not just
/// a byte table.
const MERGES: [(&str, &str); 6] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġ", "a"),
    ("i", "n"),
    ("e", "r"),
    ("o", "n"),
];

/// Dimensions of a Qwen2 model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
}

impl Shape {
    /// Small enough that a CPU answers in milliseconds.
    pub const TINY: Shape = Shape {
        vocab_size: tokenizer_vocab_size(),
        hidden_size: 64,
        intermediate_size: 192,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 8_192,
    };

    /// Qwen2.5-0.5B-Instruct (tied embeddings).
    pub const QWEN2_5_0_5B: Shape = Shape {
        vocab_size: 151_936,
        hidden_size: 896,
        intermediate_size: 4_864,
        num_hidden_layers: 24,
        num_attention_heads: 14,
        num_key_value_heads: 2,
        max_position_embeddings: 32_768,
    };

    /// Parameters read per decoded token (tied embeddings read once, as the LM head).
    pub fn parameters(&self) -> usize {
        let head_dim = self.hidden_size / self.num_attention_heads;
        let kv = self.num_key_value_heads * head_dim;
        let attention = self.hidden_size * self.hidden_size * 2 + self.hidden_size * kv * 2;
        let mlp = 3 * self.hidden_size * self.intermediate_size;
        self.num_hidden_layers * (attention + mlp) + self.vocab_size * self.hidden_size
    }
}

/// 256 byte symbols + merges + special tokens.
const fn tokenizer_vocab_size() -> usize {
    256 + MERGES.len() + SPECIAL_TOKENS.len()
}

/// Writes `config.json`, `model.safetensors` and `tokenizer.json` to `dir`.
/// Deterministic: the same shape, seed and dtype give the same bytes.
pub fn write_random_model(
    dir: &Path,
    shape: Shape,
    seed: u64,
    dtype: DType,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    write_json(&dir.join("config.json"), &config_json(shape))?;
    write_json(&dir.join("tokenizer.json"), &tokenizer_json())?;
    let weights = random_weights(shape, seed, dtype)?;
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&weights, &path).map_err(|err| err.with_path(&path))?;
    // Weights are not secrets, and a container worker runs as another user.
    make_readable(&path)
}

fn make_readable(path: &Path) -> Result<(), ModelError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(|source| {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Writes the same random model as a Q8_0-quantized GGUF file (plus
/// `tokenizer.json`), in llama.cpp's Qwen2 layout: the quantized loading path.
pub fn write_random_gguf(dir: &Path, shape: Shape, seed: u64) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    write_json(&dir.join("tokenizer.json"), &tokenizer_json())?;
    write_gguf(
        &dir.join("model-q8_0.gguf"),
        shape,
        seed,
        GgmlDType::Q8_0,
        false,
    )
}

/// The same random model as one GGUF file that llama.cpp loads as it is:
/// matrices in `matrices` (F16, Q8_0, ...) and the tokenizer in GGUF
/// metadata (the tiny BPE vocabulary, padded with unused tokens up to the
/// shape's vocabulary size). For benchmarks against llama.cpp.
pub fn write_peer_gguf(
    path: &Path,
    shape: Shape,
    seed: u64,
    matrices: GgmlDType,
) -> Result<(), ModelError> {
    write_gguf(path, shape, seed, matrices, true)
}

fn write_gguf(
    path: &Path,
    shape: Shape,
    seed: u64,
    matrices: GgmlDType,
    tokenizer: bool,
) -> Result<(), ModelError> {
    let weights = random_weights(shape, seed, DType::F32)?;
    let mut tensors = Vec::with_capacity(weights.len());
    for (name, tensor) in &weights {
        // Matrices are quantized; norms and biases stay f32, as llama.cpp does.
        let ggml = if tensor.rank() == 2 {
            matrices
        } else {
            GgmlDType::F32
        };
        tensors.push((gguf_name(name), QTensor::quantize(tensor, ggml)?));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let u32_value = |n: usize| gguf_file::Value::U32(n as u32);
    let mut metadata = vec![
        (
            "general.architecture",
            gguf_file::Value::String("qwen2".into()),
        ),
        (
            "qwen2.attention.head_count",
            u32_value(shape.num_attention_heads),
        ),
        (
            "qwen2.attention.head_count_kv",
            u32_value(shape.num_key_value_heads),
        ),
        ("qwen2.embedding_length", u32_value(shape.hidden_size)),
        (
            "qwen2.context_length",
            u32_value(shape.max_position_embeddings),
        ),
        ("qwen2.block_count", u32_value(shape.num_hidden_layers)),
        (
            "qwen2.feed_forward_length",
            u32_value(shape.intermediate_size),
        ),
        (
            "qwen2.attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(1e-6),
        ),
        ("qwen2.rope.freq_base", gguf_file::Value::F32(1_000_000.0)),
    ];
    if tokenizer {
        metadata.extend(gguf_tokenizer(shape.vocab_size));
    }
    let mut file = std::fs::File::create(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let metadata: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &metadata, &tensors).map_err(|err| err.with_path(path))?;
    make_readable(path)
}

/// llama.cpp's tokenizer keys for the tiny BPE vocabulary, padded to `vocab_size`.
fn gguf_tokenizer(vocab_size: usize) -> Vec<(&'static str, gguf_file::Value)> {
    use gguf_file::Value;
    // llama.cpp's token types.
    const NORMAL: i32 = 1;
    const CONTROL: i32 = 3;
    const UNUSED: i32 = 5;
    let mut tokens: Vec<String> = byte_symbols().into_iter().map(String::from).collect();
    tokens.extend(MERGES.iter().map(|(l, r)| format!("{l}{r}")));
    let normal = tokens.len();
    tokens.extend(SPECIAL_TOKENS.iter().map(|t| t.to_string()));
    let named = tokens.len();
    tokens.extend((named..vocab_size.max(named)).map(|i| format!("<|unused_{i}|>")));
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| {
            Value::I32(if i < normal {
                NORMAL
            } else if i < named {
                CONTROL
            } else {
                UNUSED
            })
        })
        .collect();
    let id = |token: &str| {
        Value::U32(
            tokens
                .iter()
                .position(|t| t == token)
                .expect("special token") as u32,
        )
    };
    vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("qwen2".into())),
        ("tokenizer.ggml.bos_token_id", id("<|endoftext|>")),
        ("tokenizer.ggml.eos_token_id", id("<|im_end|>")),
        ("tokenizer.ggml.padding_token_id", id("<|endoftext|>")),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        (
            "tokenizer.ggml.merges",
            Value::Array(
                MERGES
                    .iter()
                    .map(|(l, r)| Value::String(format!("{l} {r}")))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
    ]
}

/// Hugging Face tensor name -> llama.cpp GGUF tensor name.
fn gguf_name(name: &str) -> String {
    if name == "model.embed_tokens.weight" {
        return "token_embd.weight".into();
    }
    if name == "model.norm.weight" {
        return "output_norm.weight".into();
    }
    let rest = name.strip_prefix("model.layers.").expect("layer tensor");
    let (layer, rest) = rest.split_once('.').expect("layer index");
    let renamed = [
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
    ]
    .into_iter()
    .find_map(|(hf, gguf)| {
        rest.strip_prefix(hf)
            .map(|suffix| format!("{gguf}{suffix}"))
    })
    .expect("known tensor");
    format!("blk.{layer}.{renamed}")
}

fn write_json(path: &Path, value: &Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    std::fs::write(path, text).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn config_json(shape: Shape) -> Value {
    let eos = (256 + MERGES.len() + 2) as u32;
    json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "max_position_embeddings": shape.max_position_embeddings,
        "sliding_window": shape.max_position_embeddings,
        "max_window_layers": shape.num_hidden_layers,
        "tie_word_embeddings": true,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": false,
        "hidden_act": "silu",
        "bos_token_id": 256 + MERGES.len(),
        "eos_token_id": eos,
        "torch_dtype": "float32",
    })
}

/// GPT-2's byte-to-unicode table: printable bytes map to themselves, the
/// rest to code points from U+0100 up, so every byte is one visible symbol.
fn byte_symbols() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|byte| {
            if printable(byte) {
                char::from_u32(byte).expect("valid code point")
            } else {
                let symbol = char::from_u32(next).expect("valid code point");
                next += 1;
                symbol
            }
        })
        .collect()
}

fn tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    for (id, symbol) in byte_symbols().into_iter().enumerate() {
        vocab.insert(symbol.to_string(), json!(id));
    }
    for (offset, (left, right)) in MERGES.iter().enumerate() {
        vocab.insert(format!("{left}{right}"), json!(256 + offset));
    }
    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(offset, token)| {
            json!({
                "id": 256 + MERGES.len() + offset, "content": token, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true
            })
        })
        .collect();
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true
    });
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab,
            "merges": MERGES.iter().map(|(l, r)| format!("{l} {r}")).collect::<Vec<_>>(),
        },
    })
}

/// SplitMix64: tiny, seedable, and good enough for random weights.
struct SplitMix(u64);

impl SplitMix {
    fn next_unit(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // Uniform in [-1, 1).
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn random_weights(
    shape: Shape,
    seed: u64,
    dtype: DType,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let mut weights = RandomWeights {
        rng: SplitMix(seed),
        dtype,
        tensors: HashMap::new(),
    };
    let hidden = shape.hidden_size;
    let head_dim = hidden / shape.num_attention_heads;
    let kv = shape.num_key_value_heads * head_dim;
    let inner = shape.intermediate_size;
    // Uniform(-a, a) with a = sqrt(3 / fan_in) keeps activations at unit scale.
    let scale = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    weights.random(
        "model.embed_tokens.weight".into(),
        &[shape.vocab_size, hidden],
        1.0,
    )?;
    for layer in 0..shape.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        for (name, rows) in [("q_proj", hidden), ("k_proj", kv), ("v_proj", kv)] {
            weights.random(
                format!("{p}.self_attn.{name}.weight"),
                &[rows, hidden],
                scale(hidden),
            )?;
            weights.random(format!("{p}.self_attn.{name}.bias"), &[rows], 0.02)?;
        }
        weights.random(
            format!("{p}.self_attn.o_proj.weight"),
            &[hidden, hidden],
            scale(hidden),
        )?;
        weights.random(
            format!("{p}.mlp.gate_proj.weight"),
            &[inner, hidden],
            scale(hidden),
        )?;
        weights.random(
            format!("{p}.mlp.up_proj.weight"),
            &[inner, hidden],
            scale(hidden),
        )?;
        weights.random(
            format!("{p}.mlp.down_proj.weight"),
            &[hidden, inner],
            scale(inner),
        )?;
        weights.ones(format!("{p}.input_layernorm.weight"), hidden)?;
        weights.ones(format!("{p}.post_attention_layernorm.weight"), hidden)?;
    }
    weights.ones("model.norm.weight".into(), hidden)?;
    Ok(weights.tensors)
}

struct RandomWeights {
    rng: SplitMix,
    dtype: DType,
    tensors: HashMap<String, Tensor>,
}

impl RandomWeights {
    fn random(&mut self, name: String, dims: &[usize], scale: f32) -> Result<(), ModelError> {
        let count: usize = dims.iter().product();
        let values: Vec<f32> = (0..count).map(|_| self.rng.next_unit() * scale).collect();
        let tensor = Tensor::from_vec(values, dims, &Device::Cpu)?.to_dtype(self.dtype)?;
        self.tensors.insert(name, tensor);
        Ok(())
    }

    fn ones(&mut self, name: String, len: usize) -> Result<(), ModelError> {
        self.tensors
            .insert(name, Tensor::ones(len, self.dtype, &Device::Cpu)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tokenizer_round_trips_text_and_knows_the_chat_tokens() {
        let dir = std::env::temp_dir().join(format!("ebb-tiny-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        write_json(&path, &tokenizer_json()).unwrap();
        let tokenizer = tokenizers::Tokenizer::from_file(&path).unwrap();
        let text = "<|im_start|>user\nWhat is the area of a circle? 圆的面积<|im_end|>";
        let encoding = tokenizer.encode(text, false).unwrap();
        let ids = encoding.get_ids();
        assert_eq!(ids[0], tokenizer.token_to_id("<|im_start|>").unwrap());
        assert_eq!(
            *ids.last().unwrap(),
            tokenizer.token_to_id("<|im_end|>").unwrap()
        );
        assert!(
            ids.contains(&tokenizer.token_to_id("he").unwrap()),
            "merges apply"
        );
        assert_eq!(tokenizer.decode(ids, false).unwrap(), text);
        assert_eq!(tokenizer.get_vocab_size(true), Shape::TINY.vocab_size);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn random_weights_are_deterministic_in_the_seed() {
        let a = random_weights(Shape::TINY, 7, DType::F32).unwrap();
        let b = random_weights(Shape::TINY, 7, DType::F32).unwrap();
        let c = random_weights(Shape::TINY, 8, DType::F32).unwrap();
        let name = "model.layers.1.mlp.up_proj.weight";
        let values =
            |w: &HashMap<String, Tensor>| w[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&a), values(&b));
        assert_ne!(values(&a), values(&c));
    }
}
