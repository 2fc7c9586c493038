//! Speed of the worker's batched model path on random weights at the real
//! Qwen2.5-0.5B shapes, f16 safetensors and Q8_0 GGUF, every figure beside
//! its reference measured in the same run:
//!
//! 1. aggregate decode tokens/s at batch 1, 2, 4, 8, 16 (ratio to batch 1);
//! 2. single-stream decode vs the memory roofline, measured as read
//!    bandwidth (the weights' size streamed through a sum on every thread:
//!    decoding reads each weight once and writes almost nothing);
//! 3. prefill tokens/s of one prompt;
//! 4. time to first token of a question joining a full batch vs its
//!    prefill alone, p50 and p99.
//!
//! Writes `target/bench/decode.json` (`formats.<name>.aggregate_tokens_per_s`,
//! `prefill_tokens_per_s`, `roofline_ratio`, `ttft_ratio_p50/p99`, ...);
//! `scripts/bench-peer` adds llama.cpp beside it.
//!
//! `cargo bench -p ebb-worker --bench decode` (EBB_BENCH_FORMATS=f16,gguf-q8_0;
//! EBB_BENCH_DECODE_STEPS=16; EBB_BENCH_PROMPT_TOKENS=128; EBB_BENCH_BATCHES=1,2,4,8,16;
//! EBB_BENCH_PEER_DIR=dir also writes the same weights as GGUF files that
//! llama.cpp loads, for `scripts/bench-peer`)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use ebb_worker::engine::{Engine, EngineConfig, Output, Request};
use ebb_worker::generate::Prompt;
use ebb_worker::model::batch::Segment;
use ebb_worker::model::kv_cache::SequenceCache;
use ebb_worker::model::{ModelFiles, Qwen, WeightFiles};
use ebb_worker::tiny::{Shape, write_peer_gguf, write_random_gguf, write_random_model};
use serde_json::{Value, json};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Best of several passes summing a buffer of `bytes` on `threads` threads:
/// bytes read per second.
fn read_bandwidth(bytes: usize, threads: usize) -> f64 {
    let words = vec![1u64; bytes / 8];
    let chunk = words.len().div_ceil(threads);
    (0..5)
        .map(|_| {
            let started = Instant::now();
            let total: u64 = std::thread::scope(|scope| {
                let parts: Vec<_> = words
                    .chunks(chunk)
                    .map(|part| {
                        scope.spawn(move || part.iter().fold(0u64, |a, w| a.wrapping_add(*w)))
                    })
                    .collect();
                parts.into_iter().map(|p| p.join().expect("sum")).sum()
            });
            std::hint::black_box(total);
            bytes as f64 / started.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn prompt_tokens(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 1000 + (i * 7 + salt * 131) % 50_000)
        .collect()
}

/// Aggregate decode tokens/s with `batch` sequences of `prompt_len` prompt
/// tokens each, over `steps` steps (prefill not timed).
fn aggregate_decode(model: &Qwen, batch: usize, prompt_len: usize, steps: usize) -> f64 {
    let weights = &model.forward.weights;
    let device = model.forward.device();
    let mut caches: Vec<SequenceCache> = (0..batch)
        .map(|_| {
            SequenceCache::new(&weights.dims, prompt_len + steps + 1, weights.dtype, device)
                .expect("cache")
        })
        .collect();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|b| prompt_tokens(prompt_len, b as u32))
        .collect();
    for (cache, prompt) in caches.iter_mut().zip(&prompts) {
        let mut segment = [Segment {
            cache,
            tokens: prompt,
            wants_logits: true,
        }];
        model.forward.step(&mut segment).expect("prefill");
    }
    let mut next: Vec<u32> = (0..batch as u32).map(|b| 500 + b).collect();
    let started = Instant::now();
    for _ in 0..steps {
        let tokens: Vec<[u32; 1]> = next.iter().map(|t| [*t]).collect();
        let mut segments: Vec<Segment<'_>> = caches
            .iter_mut()
            .zip(&tokens)
            .map(|(cache, token)| Segment {
                cache,
                tokens: token,
                wants_logits: true,
            })
            .collect();
        let logits = model.forward.step(&mut segments).expect("decode");
        next = logits
            .argmax(1)
            .expect("argmax")
            .to_vec1::<u32>()
            .expect("ids");
    }
    (batch * steps) as f64 / started.elapsed().as_secs_f64()
}

fn request(prompt: Vec<u32>, max_new: usize) -> Request {
    Request {
        prompt: Prompt {
            ids: prompt,
            shared_prefix: 0,
        },
        max_new,
        sampling: Default::default(),
        // No stop token: every sequence runs to max_new.
        stop_tokens: Vec::new(),
    }
}

/// Steps `engine` until sequence `id` has its first token; the time it took.
fn until_first_token(engine: &mut Engine, id: u64) -> Duration {
    let started = Instant::now();
    loop {
        let outputs = engine.step();
        let first = outputs.iter().any(|o| match o {
            Output::Text(seq, _) | Output::Finished(seq, _) => *seq == id,
        });
        if first {
            return started.elapsed();
        }
    }
}

use ebb_runtime::quantile::of as percentile;

/// Time to first token of a `prompt_len` prompt joining `batch - 1`
/// decoding sequences, and alone; `rounds` samples each, (p50, p99) ratios.
fn ttft_ratios(
    model: Qwen,
    tokenizer: &Path,
    batch: usize,
    prompt_len: usize,
    rounds: usize,
) -> (Qwen, Value) {
    let tokenizer = Arc::new(tokenizers::Tokenizer::from_file(tokenizer).expect("tokenizer"));
    let config = EngineConfig {
        prefill_chunk: 512,
        prefix_cache_tokens: 0,
    };
    let mut engine = Engine::new(model, tokenizer, config);
    let mut alone = Vec::new();
    let mut joined = Vec::new();
    for round in 0..rounds {
        let id = engine
            .admit(request(prompt_tokens(prompt_len, round as u32), 1))
            .expect("admit");
        alone.push(until_first_token(&mut engine, id).as_secs_f64());
        while !engine.is_idle() {
            engine.step();
        }
    }
    let others: Vec<u64> = (0..batch - 1)
        .map(|b| {
            engine
                .admit(request(prompt_tokens(16, 900 + b as u32), 100_000))
                .expect("admit")
        })
        .collect();
    // The batch is decoding before anyone joins.
    for _ in 0..2 {
        engine.step();
    }
    for round in 0..rounds {
        let id = engine
            .admit(request(prompt_tokens(prompt_len, round as u32), 1))
            .expect("admit");
        joined.push(until_first_token(&mut engine, id).as_secs_f64());
        engine.cancel(id);
    }
    for id in others {
        engine.cancel(id);
    }
    let figures = json!({
        "batch": batch,
        "prompt_tokens": prompt_len,
        "alone_p50_s": percentile(alone.clone(), 0.5),
        "alone_p99_s": percentile(alone.clone(), 0.99),
        "joined_p50_s": percentile(joined.clone(), 0.5),
        "joined_p99_s": percentile(joined.clone(), 0.99),
        "ratio_p50": percentile(joined.clone(), 0.5) / percentile(alone.clone(), 0.5),
        "ratio_p99": percentile(joined, 0.99) / percentile(alone, 0.99),
    });
    (engine.into_model(), figures)
}

fn bench_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("bench")
}

struct Format {
    name: String,
    files: ModelFiles,
    dtype: DType,
    /// Bytes of weights one decode step reads.
    weight_bytes: f64,
}

fn formats(dir: &Path, shape: Shape, wanted: &str) -> Vec<Format> {
    let mut formats = Vec::new();
    for name in wanted.split(',').map(str::trim) {
        let format = match name {
            "f16" | "f32" => {
                let dtype = if name == "f16" {
                    DType::F16
                } else {
                    DType::F32
                };
                let sub = dir.join(name);
                write_random_model(&sub, shape, 7, dtype).expect("write random model");
                Format {
                    name: name.into(),
                    files: ModelFiles {
                        config: Some(sub.join("config.json")),
                        tokenizer: sub.join("tokenizer.json"),
                        weights: WeightFiles::Safetensors(vec![sub.join("model.safetensors")]),
                    },
                    dtype,
                    weight_bytes: shape.parameters() as f64 * dtype.size_in_bytes() as f64,
                }
            }
            "gguf-q8_0" => {
                let sub = dir.join(name);
                write_random_gguf(&sub, shape, 7).expect("write random gguf");
                Format {
                    name: name.into(),
                    files: ModelFiles {
                        config: None,
                        tokenizer: sub.join("tokenizer.json"),
                        weights: WeightFiles::Gguf(sub.join("model-q8_0.gguf")),
                    },
                    dtype: DType::F32,
                    // Q8_0: 32 weights in 34 bytes.
                    weight_bytes: shape.parameters() as f64 * 34.0 / 32.0,
                }
            }
            other => panic!("unknown format {other} (f16, f32, gguf-q8_0)"),
        };
        formats.push(format);
    }
    formats
}

/// What to measure, from the environment.
struct Settings {
    wanted: String,
    steps: usize,
    prompt_len: usize,
    batches: Vec<usize>,
    threads: usize,
    shape: Shape,
    dir: PathBuf,
}

impl Settings {
    fn from_env() -> Settings {
        let wanted: String = env_or("EBB_BENCH_FORMATS", "f16,gguf-q8_0".to_owned());
        let steps: usize = env_or("EBB_BENCH_DECODE_STEPS", 16);
        let prompt_len: usize = env_or("EBB_BENCH_PROMPT_TOKENS", 128);
        let batches: String = env_or("EBB_BENCH_BATCHES", "1,2,4,8,16".to_owned());
        let batches: Vec<usize> = batches
            .split(',')
            .map(|b| b.trim().parse().expect("batch size"))
            .collect();
        Settings {
            wanted,
            steps,
            prompt_len,
            batches,
            threads: candle_core::utils::get_num_threads(),
            shape: Shape::QWEN2_5_0_5B,
            dir: std::env::temp_dir().join(format!("ebb-bench-qwen0.5b-{}", std::process::id())),
        }
    }
}

/// The same random weights for llama.cpp (scripts/bench-peer).
fn write_peer_weights(shape: Shape) {
    if let Some(peer_dir) = std::env::var_os("EBB_BENCH_PEER_DIR").map(PathBuf::from) {
        std::fs::create_dir_all(&peer_dir).expect("peer dir");
        for (name, ggml) in [
            ("peer-f16.gguf", GgmlDType::F16),
            ("peer-q8_0.gguf", GgmlDType::Q8_0),
        ] {
            write_peer_gguf(&peer_dir.join(name), shape, 7, ggml).expect("write peer gguf");
        }
    }
}

/// One format's measurements.
struct Figures {
    /// Prefill tokens/s.
    prefill: f64,
    /// (batch, aggregate decode tokens/s), in the order measured.
    rates: Vec<(usize, f64)>,
    /// Read bandwidth, bytes/s.
    bandwidth: f64,
    /// Decode tokens/s if every step only streamed the weights at `bandwidth`.
    roofline: f64,
    /// Decode tokens/s at batch 1.
    single: f64,
    ttft: Value,
}

fn measure(format: &Format, settings: &Settings) -> Figures {
    let model = Qwen::load(&format.files, &Device::Cpu, format.dtype).expect("load");
    // Warm up: first touches of the weights.
    model.logits(&prompt_tokens(8, 0)).expect("warm-up");
    let started = Instant::now();
    model
        .logits(&prompt_tokens(settings.prompt_len, 1))
        .expect("prefill");
    let prefill = settings.prompt_len as f64 / started.elapsed().as_secs_f64();
    let rates: Vec<(usize, f64)> = settings
        .batches
        .iter()
        .map(|&batch| (batch, aggregate_decode(&model, batch, 32, settings.steps)))
        .collect();
    // Measured right after the decode, so both see the same machine load.
    let bandwidth = read_bandwidth(format.weight_bytes as usize, settings.threads);
    let roofline = bandwidth / format.weight_bytes;
    let single = rates
        .iter()
        .find(|(b, _)| *b == 1)
        .map_or(f64::NAN, |(_, r)| *r);
    let (_model, ttft) = ttft_ratios(model, &format.files.tokenizer, 8, settings.prompt_len, 8);
    Figures {
        prefill,
        rates,
        bandwidth,
        roofline,
        single,
        ttft,
    }
}

fn print_figures(format: &Format, figures: &Figures, prompt_len: usize) {
    let Figures {
        prefill,
        bandwidth,
        roofline,
        single,
        ..
    } = *figures;
    println!("{}:", format.name);
    for (batch, rate) in &figures.rates {
        println!(
            "  batch {batch:>2}: {rate:7.1} tok/s aggregate ({:.2}x batch 1)",
            rate / single
        );
    }
    println!(
        "  single stream {single:.1} tok/s vs read roofline {roofline:.1} tok/s ({:.1} GB/s read, {:.2} GB weights) -> ratio {:.2}",
        bandwidth / 1e9,
        format.weight_bytes / 1e9,
        single / roofline
    );
    println!("  prefill {prefill:.0} tok/s ({prompt_len}-token prompt)");
    println!(
        "  time to first token joining a batch of 8 vs alone: p50 {:.2}x, p99 {:.2}x",
        figures.ttft["ratio_p50"].as_f64().unwrap_or(f64::NAN),
        figures.ttft["ratio_p99"].as_f64().unwrap_or(f64::NAN)
    );
}

fn figures_json(format: &Format, figures: &Figures) -> Value {
    let Figures {
        rates,
        single,
        roofline,
        bandwidth,
        ..
    } = figures;
    let aggregate: serde_json::Map<String, Value> = rates
        .iter()
        .map(|(batch, rate)| (batch.to_string(), json!(rate)))
        .collect();
    json!({
        "aggregate_tokens_per_s": aggregate,
        "batch_8_over_1": rates.iter().find(|(b, _)| *b == 8).map(|(_, r)| r / single),
        "prefill_tokens_per_s": figures.prefill,
        "roofline_tokens_per_s": roofline,
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "weight_gb": format.weight_bytes / 1e9,
        "roofline_ratio": single / roofline,
        "ttft": figures.ttft,
    })
}

fn write_document(results: serde_json::Map<String, Value>, settings: &Settings) {
    let out = bench_dir();
    std::fs::create_dir_all(&out).expect("target/bench");
    let path = out.join("decode.json");
    // Keep what other tools added (bench-peer's llama_cpp entry).
    let mut document: Value = std::fs::read(&path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_else(|| json!({}));
    document["formats"] = Value::Object(results);
    document["threads"] = json!(settings.threads);
    document["shape"] = json!("Qwen2.5-0.5B");
    document["decode_steps"] = json!(settings.steps);
    document["prompt_tokens"] = json!(settings.prompt_len);
    std::fs::write(&path, serde_json::to_vec_pretty(&document).expect("json"))
        .expect("write decode.json");
    println!("wrote {}", path.display());
}

fn main() {
    let settings = Settings::from_env();
    println!(
        "decode benchmark: random weights at Qwen2.5-0.5B shapes ({:.0}M parameters), {} threads",
        settings.shape.parameters() as f64 / 1e6,
        settings.threads,
    );
    write_peer_weights(settings.shape);
    let mut results = serde_json::Map::new();
    for format in formats(&settings.dir, settings.shape, &settings.wanted) {
        let figures = measure(&format, &settings);
        print_figures(&format, &figures, settings.prompt_len);
        results.insert(format.name.clone(), figures_json(&format, &figures));
    }
    let _ = std::fs::remove_dir_all(&settings.dir);
    write_document(results, &settings);
}
