//! Decode and prefill speed of the worker's model path on random weights at
//! the real Qwen2.5-0.5B shapes, against the memory-bandwidth roofline
//! measured on the same machine in the same run.
//!
//! Decoding one token reads every weight once, so the roofline is
//! `copy bandwidth / weight bytes` tokens/s; the ratio says how close candle
//! gets. Prefill is compute-bound and reported as tokens/s.
//!
//! `cargo bench -p ebb-worker --bench decode` (EBB_BENCH_DTYPES=f16,f32;
//! EBB_BENCH_DECODE_TOKENS=48; EBB_BENCH_PROMPT_TOKENS=128)

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ebb_worker::model::{ModelFiles, Qwen, WeightFiles};
use ebb_worker::tiny::{Shape, write_random_model};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Best of several copies of a 512 MiB buffer: bytes copied per second.
fn copy_bandwidth() -> f64 {
    let len = 512 << 20;
    let source = vec![1u8; len];
    let mut target = vec![0u8; len];
    (0..5)
        .map(|_| {
            let started = Instant::now();
            target.copy_from_slice(&source);
            std::hint::black_box(&mut target);
            len as f64 / started.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn argmax(logits: &Tensor) -> u32 {
    logits
        .argmax(0)
        .and_then(|t| t.to_scalar::<u32>())
        .expect("argmax")
}

fn main() {
    let dtypes: String = env_or("EBB_BENCH_DTYPES", "f16,f32".to_owned());
    let decode_tokens: usize = env_or("EBB_BENCH_DECODE_TOKENS", 48);
    let prompt_tokens: usize = env_or("EBB_BENCH_PROMPT_TOKENS", 128);
    let shape = Shape::QWEN2_5_0_5B;
    let dir = std::env::temp_dir().join(format!("ebb-bench-qwen0.5b-{}", std::process::id()));
    println!(
        "decode benchmark: random weights at Qwen2.5-0.5B shapes ({:.0}M parameters), {} threads",
        shape.parameters() as f64 / 1e6,
        candle_core::utils::get_num_threads()
    );
    write_random_model(&dir, shape, 7, DType::F16).expect("write random model");
    let files = ModelFiles {
        config: Some(dir.join("config.json")),
        tokenizer: dir.join("tokenizer.json"),
        weights: WeightFiles::Safetensors(vec![dir.join("model.safetensors")]),
    };
    let prompt: Vec<u32> = (0..prompt_tokens as u32).map(|i| 1000 + i * 7).collect();

    for name in dtypes.split(',') {
        let dtype = match name.trim() {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            other => panic!("unknown dtype {other}"),
        };
        let mut model = Qwen::load(&files, &Device::Cpu, dtype).expect("load");
        // Warm up (first touches of the memory map).
        model.forward(&prompt[..8], 0).expect("warm-up");
        model.clear_kv_cache();

        let started = Instant::now();
        let logits = model.forward(&prompt, 0).expect("prefill");
        let prefill = started.elapsed().as_secs_f64();
        let mut next = argmax(&logits);
        let started = Instant::now();
        for step in 0..decode_tokens {
            let logits = model.forward(&[next], prompt.len() + step).expect("decode");
            next = argmax(&logits);
        }
        let decode = started.elapsed().as_secs_f64();

        // Measured right after the decode, so both see the same machine load.
        let bandwidth = copy_bandwidth();
        let weight_bytes = shape.parameters() as f64 * dtype.size_in_bytes() as f64;
        let roofline = bandwidth / weight_bytes;
        let decode_rate = decode_tokens as f64 / decode;
        println!(
            "{name}: decode {decode_rate:.1} tok/s vs roofline {roofline:.1} tok/s ({:.1} GB/s copy, {:.2} GB weights) -> ratio {:.2}; prefill {:.0} tok/s ({prompt_tokens}-token prompt)",
            bandwidth / 1e9,
            weight_bytes / 1e9,
            decode_rate / roofline,
            prompt_tokens as f64 / prefill,
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
