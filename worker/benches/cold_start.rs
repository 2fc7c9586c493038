//! A worker's cold start against the floor it cannot beat: reading its
//! weight files. Random weights at the real Qwen2.5-0.5B shapes, as
//! safetensors in the dtype a CPU worker loads (f16: nothing to convert)
//! and as Q8_0 GGUF. For each, measured side by side in one run:
//!
//! - ready: the worker's own in-process start path ([`load_generator`]:
//!   resolve the files, weights and tokenizer in parallel, warm-up
//!   forward), with the page cache cold and warm, and its phases;
//! - read: the same weight files read sequentially with `std::fs::read`,
//!   cold and warm.
//!
//! Cold means the files' pages were evicted (`fsync`, then
//! `posix_fadvise(DONTNEED)`); the output shows how much of them stayed
//! resident (`mincore`), and falls back to `/proc/sys/vm/drop_caches` when
//! eviction left pages behind and the file is writable. Medians of
//! `EBB_BENCH_REPS` (5) repetitions. Writes `target/bench/cold_start.json`:
//! `{"<format>": {"ready_s", "ready_warm_s", "read_cold_s", "read_warm_s",
//! "ratio", "phases_s": {..}}}`, `ratio` = cold ready / cold read.
//!
//! `cargo bench -p ebb-worker --bench cold_start` (EBB_BENCH_FORMATS=safetensors,gguf)

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::DType;
use clap::Parser as _;
use ebb_nats::{PhaseTime, StartPhase};
use ebb_worker::config::Cli;
use ebb_worker::start::StartProgress;
use ebb_worker::tiny::{Shape, write_random_gguf, write_random_model};
use serde_json::{Value, json};

fn bench_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("bench")
}

/// One format's model directory and the weight files in it.
struct Format {
    name: &'static str,
    /// What is stored, for the output.
    stored: &'static str,
    dir: PathBuf,
    weights: Vec<PathBuf>,
}

fn write_format(name: &str, root: &Path, shape: Shape) -> Format {
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    match name {
        "safetensors" => {
            // f16: what `--dtype auto` loads on CPU, so no conversion.
            write_random_model(&dir, shape, 7, DType::F16).expect("write safetensors");
            Format {
                name: "safetensors",
                stored: "f16 safetensors, loaded as f16 (CPU --dtype auto)",
                weights: vec![dir.join("model.safetensors")],
                dir,
            }
        }
        "gguf" => {
            write_random_gguf(&dir, shape, 7).expect("write gguf");
            Format {
                name: "gguf",
                stored: "Q8_0 GGUF",
                weights: vec![dir.join("model-q8_0.gguf")],
                dir,
            }
        }
        other => panic!("unknown format {other} (safetensors, gguf)"),
    }
}

/// Every file of the model directory (weights, config, tokenizer).
fn model_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("model dir")
        .map(|entry| entry.expect("dir entry").path())
        .collect()
}

/// Evicts `paths` from the page cache; returns the fraction of their
/// pages still resident afterwards and how they were evicted.
fn evict(paths: &[PathBuf]) -> (f64, &'static str) {
    for path in paths {
        page_cache::drop_file(path).expect("evict");
    }
    let resident = page_cache::resident(paths).expect("mincore");
    if resident < 0.01 {
        return (resident, "fsync + posix_fadvise(DONTNEED)");
    }
    // Pages can stay, e.g. when another process maps the file.
    if std::fs::write("/proc/sys/vm/drop_caches", "1").is_ok() {
        let resident = page_cache::resident(paths).expect("mincore");
        return (resident, "fadvise left pages; /proc/sys/vm/drop_caches");
    }
    (resident, "fsync + posix_fadvise(DONTNEED), incomplete")
}

/// `posix_fadvise` and `mincore`, which std does not offer.
#[allow(unsafe_code)]
mod page_cache {
    use std::os::fd::AsRawFd;
    use std::path::{Path, PathBuf};

    pub fn drop_file(path: &Path) -> std::io::Result<()> {
        let file = std::fs::File::open(path)?;
        file.sync_all()?;
        // SAFETY: a valid open descriptor; advice has no memory effects.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    /// Fraction of the files' pages in the page cache.
    pub fn resident(paths: &[PathBuf]) -> std::io::Result<f64> {
        let (mut pages, mut cached) = (0usize, 0usize);
        for path in paths {
            let file = std::fs::File::open(path)?;
            let len = file.metadata()?.len() as usize;
            if len == 0 {
                continue;
            }
            // SAFETY: sysconf has no memory effects.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
            let count = len.div_ceil(page);
            let mut vec = vec![0u8; count];
            // SAFETY: a fresh read-only shared mapping of `len` bytes of an
            // open file, only passed to mincore (never read) and unmapped
            // before returning; `vec` has one byte per page as mincore needs.
            let rc = unsafe {
                let addr = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                );
                if addr == libc::MAP_FAILED {
                    return Err(std::io::Error::last_os_error());
                }
                let rc = libc::mincore(addr, len, vec.as_mut_ptr());
                libc::munmap(addr, len);
                rc
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            pages += count;
            cached += vec.iter().filter(|b| *b & 1 == 1).count();
        }
        Ok(cached as f64 / pages.max(1) as f64)
    }
}

/// `std::fs::read` of every weight file, one after another.
fn read_all(paths: &[PathBuf]) -> Duration {
    let started = Instant::now();
    for path in paths {
        std::hint::black_box(std::fs::read(path).expect("read weights"));
    }
    started.elapsed()
}

/// The worker's start path, in process: `--model-dir` and defaults.
fn ready(runtime: &tokio::runtime::Runtime, format: &Format) -> (Duration, Vec<PhaseTime>) {
    let dir = format.dir.display().to_string();
    let args = [
        "ebb-worker",
        "--model-dir",
        &dir,
        "--model",
        "bench/qwen2.5-0.5b-random",
    ];
    let cli = Cli::try_parse_from(args).expect("worker flags parse");
    let progress = StartProgress::detached("bench", "bench");
    let started = Instant::now();
    let generator = runtime
        .block_on(ebb_worker::load_generator(&cli.config, &progress))
        .expect("the worker loads the model");
    let took = started.elapsed();
    drop(generator);
    (took, progress.phases())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

#[derive(Default)]
struct Samples {
    ready_cold: Vec<f64>,
    ready_warm: Vec<f64>,
    read_cold: Vec<f64>,
    read_warm: Vec<f64>,
    /// Per phase, cold runs.
    phases: Vec<Vec<PhaseTime>>,
    resident_after_eviction: Vec<f64>,
    eviction: &'static str,
}

fn measure(runtime: &tokio::runtime::Runtime, format: &Format, reps: usize) -> Samples {
    let all = model_files(&format.dir);
    let mut samples = Samples::default();
    // Once unmeasured: the process's one-off costs (thread pools) are not
    // a cold start's, and the decode benchmark covers steady state.
    let _ = ready(runtime, format);
    for _ in 0..reps {
        let (resident, how) = evict(&all);
        samples.resident_after_eviction.push(resident);
        samples.eviction = how;
        samples
            .read_cold
            .push(read_all(&format.weights).as_secs_f64());
        samples
            .read_warm
            .push(read_all(&format.weights).as_secs_f64());
        let (resident, _) = evict(&all);
        samples.resident_after_eviction.push(resident);
        let (took, phases) = ready(runtime, format);
        samples.ready_cold.push(took.as_secs_f64());
        samples.phases.push(phases);
        samples
            .ready_warm
            .push(ready(runtime, format).0.as_secs_f64());
    }
    samples
}

fn phase_medians(samples: &Samples) -> Vec<(StartPhase, f64)> {
    StartPhase::ALL
        .into_iter()
        .map(|phase| {
            let times = samples
                .phases
                .iter()
                .map(|run| ebb_worker::start::phase_ms(run, phase) as f64 / 1e3)
                .collect();
            (phase, median(times))
        })
        .collect()
}

fn report(format: &Format, samples: &Samples) -> Value {
    let bytes: u64 = format
        .weights
        .iter()
        .map(|p| std::fs::metadata(p).expect("size").len())
        .sum();
    let ready_cold = median(samples.ready_cold.clone());
    let ready_warm = median(samples.ready_warm.clone());
    let read_cold = median(samples.read_cold.clone());
    let read_warm = median(samples.read_warm.clone());
    let worst_resident = samples
        .resident_after_eviction
        .iter()
        .copied()
        .fold(0.0, f64::max);
    let phases = phase_medians(samples);
    println!(
        "{} ({}, {:.2} GB weights; cold = {}, at most {:.1} % still resident):",
        format.name,
        format.stored,
        bytes as f64 / 1e9,
        samples.eviction,
        worst_resident * 100.0
    );
    println!(
        "  {:<14} {:>9} {:>9} {:>7}",
        "", "cold s", "warm s", "ratio"
    );
    println!(
        "  {:<14} {:>9.3} {:>9.3} {:>7}",
        "read weights", read_cold, read_warm, ""
    );
    println!(
        "  {:<14} {:>9.3} {:>9.3} {:>7.2}  (ready / read, cold); warm {:.2}",
        "ready",
        ready_cold,
        ready_warm,
        ready_cold / read_cold,
        ready_warm / read_warm
    );
    let line: Vec<String> = phases
        .iter()
        .map(|(phase, s)| format!("{} {s:.3}", phase.as_str()))
        .collect();
    println!(
        "  cold phases (s, weights and tokenizer in parallel): {}",
        line.join(", ")
    );
    let phases_s: serde_json::Map<String, Value> = phases
        .iter()
        .map(|(phase, s)| (phase.as_str().to_owned(), json!(s)))
        .collect();
    json!({
        "stored": format.stored,
        "weight_bytes": bytes,
        "ready_s": ready_cold,
        "ready_warm_s": ready_warm,
        "read_cold_s": read_cold,
        "read_warm_s": read_warm,
        "ratio": ready_cold / read_cold,
        "ratio_warm": ready_warm / read_warm,
        "phases_s": phases_s,
        "eviction": samples.eviction,
        "max_resident_after_eviction": worst_resident,
        "repetitions": samples.ready_cold.len(),
    })
}

fn main() {
    let reps: usize = std::env::var("EBB_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let wanted = std::env::var("EBB_BENCH_FORMATS").unwrap_or_else(|_| "safetensors,gguf".into());
    let shape = Shape::QWEN2_5_0_5B;
    println!(
        "cold start benchmark: random weights at Qwen2.5-0.5B shapes ({:.0}M parameters), median of {reps}",
        shape.parameters() as f64 / 1e6
    );
    // On the target's disk, not a tmpfs: the page cache must be real.
    let root = bench_dir().join("cold-start-models");
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let mut document = serde_json::Map::new();
    for name in wanted.split(',').map(str::trim) {
        let format = write_format(name, &root, shape);
        let samples = measure(&runtime, &format, reps);
        document.insert(format.name.to_owned(), report(&format, &samples));
        let _ = std::fs::remove_dir_all(&format.dir);
    }
    let _ = std::fs::remove_dir_all(&root);
    let path = bench_dir().join("cold_start.json");
    std::fs::create_dir_all(bench_dir()).expect("target/bench");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&Value::Object(document)).expect("json"),
    )
    .expect("write cold_start.json");
    println!("wrote {}", path.display());
}
