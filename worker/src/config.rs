//! Command-line flags and environment variables of `ebb-worker`.

use std::path::PathBuf;
use std::time::Duration;

use ebb_nats::QueueConfig;
use ebb_runtime::{ModelArgs, ServiceArgs};

/// ebb's worker: pulls questions from JetStream and answers them with a
/// Qwen2 model on candle.
#[derive(Debug, clap::Parser)]
#[command(name = "ebb-worker", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Write a tiny random-weight Qwen2 model (config, safetensors, tokenizer)
    /// to DIR, for tests and offline demos. Its answers are gibberish.
    TinyModel {
        /// Directory to write the model into (created if missing).
        dir: PathBuf,
        /// Seed of the random weights: the same seed writes the same model.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Write the model as a Q8_0 GGUF file instead of safetensors.
        #[arg(long)]
        gguf: bool,
    },
}

/// Which processor runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    Cpu,
    /// NVIDIA GPU 0; needs a build with `--features cuda`.
    Cuda,
}

/// Precision of the weights of a safetensors model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DTypeChoice {
    /// f16 on CPU (bf16 is ~8x slower there), bf16 on CUDA.
    Auto,
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub services: ServiceArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Load the model from this local directory instead of the Hub
    /// (config.json, tokenizer.json and *.safetensors or one *.gguf).
    #[arg(long, env = "EBB_MODEL_DIR")]
    pub model_dir: Option<PathBuf>,
    /// Load this GGUF file (quantized) of the model repo or directory instead
    /// of safetensors, e.g. `qwen2.5-7b-instruct-q4_k_m.gguf`.
    #[arg(long, env = "EBB_GGUF_FILE")]
    pub gguf_file: Option<String>,
    /// Repo holding tokenizer.json for a GGUF model (default: `--model`
    /// without its `-GGUF` suffix).
    #[arg(long, env = "EBB_TOKENIZER_REPO")]
    pub tokenizer_repo: Option<String>,
    /// Give up on a model file download that takes longer than this.
    #[arg(long, env = "EBB_DOWNLOAD_TIMEOUT", default_value = "30m", value_parser = ebb_runtime::duration::parse)]
    pub download_timeout: Duration,
    /// Processor to run the model on.
    #[arg(long, env = "EBB_DEVICE", value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Weight precision for safetensors models.
    #[arg(long, env = "EBB_DTYPE", value_enum, default_value_t = DTypeChoice::Auto)]
    pub dtype: DTypeChoice,
    /// Most questions answered at once (decoded together in every step).
    /// Default: 8 on CPU (two cores are compute-bound by then), 32 on CUDA.
    #[arg(long, env = "EBB_MAX_BATCH", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_batch: Option<u32>,
    /// Most prompt tokens one step prefills, so a long prompt delays the
    /// answers in flight by at most one chunk.
    #[arg(long, env = "EBB_PREFILL_CHUNK", default_value_t = 512, value_parser = clap::value_parser!(u32).range(16..=65_536))]
    pub prefill_chunk: u32,
    /// Memory for keys and values of the questions in flight, in MiB. A
    /// question joins only when its prompt plus max_tokens fits. Default:
    /// half the memory available after the model is loaded (CPU), or 80 %
    /// of the free GPU memory (CUDA).
    #[arg(long, env = "EBB_KV_CACHE_MIB", value_parser = clap::value_parser!(u64).range(1..))]
    pub kv_cache_mib: Option<u64>,
    /// Tokens of shared system-prompt prefixes kept for reuse (taken from
    /// the KV budget).
    #[arg(long, env = "EBB_PREFIX_CACHE_TOKENS", default_value_t = 4096)]
    pub prefix_cache_tokens: u32,
    /// System prompt: how the tutor should answer.
    #[arg(long, env = "EBB_SYSTEM_PROMPT", default_value = crate::generate::DEFAULT_SYSTEM_PROMPT)]
    pub system_prompt: String,
    /// How long an answer stays in the cache.
    #[arg(long, env = "EBB_CACHE_TTL", default_value = "7d", value_parser = ebb_runtime::duration::parse)]
    pub cache_ttl: Duration,
    /// Delay before the first retry of a failed question; doubles per attempt (max 1 min).
    #[arg(long, env = "EBB_RETRY_BACKOFF", default_value = "1s", value_parser = ebb_runtime::duration::parse)]
    pub retry_backoff: Duration,
    /// A normal or low question that has waited this long is served before
    /// fresher, more urgent ones, so no priority starves (see README).
    #[arg(long, env = "EBB_PRIORITY_AGING", default_value = "60s", value_parser = ebb_runtime::duration::parse)]
    pub priority_aging: Duration,
    /// Name in heartbeats and logs (default: a random id). The scaler sets it.
    #[arg(long, env = "EBB_WORKER_ID")]
    pub worker_id: Option<String>,
    #[command(flatten)]
    pub hooks: TestHooks,
    #[command(flatten)]
    pub queue: QueueConfig,
}

/// Fault and timing injection for the end-to-end tests. Its flags exist only
/// in builds with `--features test-hooks` (the workspace's test build turns
/// it on), so a production binary cannot be told to fail or stall questions:
/// there this is empty and every hook is off.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TestHooks {
    /// Test hook: fail every question containing this text, as a model error
    /// would, to exercise retries and dead letters.
    #[cfg(feature = "test-hooks")]
    #[arg(long, env = "EBB_DEBUG_FAIL_MARKER")]
    pub debug_fail_marker: Option<String>,
    /// Test hook: sleep this long after each batch step that generated
    /// text, so tests can act mid-generation.
    #[cfg(feature = "test-hooks")]
    #[arg(long, env = "EBB_DEBUG_TOKEN_DELAY", value_parser = ebb_runtime::duration::parse)]
    pub debug_token_delay: Option<Duration>,
    /// Test hook: panic inside the batch step that holds a question
    /// containing this text, as a bug in candle would.
    #[cfg(feature = "test-hooks")]
    #[arg(long, env = "EBB_DEBUG_PANIC_MARKER")]
    pub debug_panic_marker: Option<String>,
}

#[cfg(feature = "test-hooks")]
impl TestHooks {
    /// Whether `question` is to fail as a model error would.
    pub fn fails(&self, question: &str) -> bool {
        self.debug_fail_marker
            .as_deref()
            .is_some_and(|marker| question.contains(marker))
    }

    /// The pause after every batch step that produced text.
    pub fn step_delay(&self) -> Option<Duration> {
        self.debug_token_delay
    }

    /// Whether a step holding `question` is to panic.
    pub fn panics(&self, question: &str) -> bool {
        self.debug_panic_marker
            .as_deref()
            .is_some_and(|marker| question.contains(marker))
    }
}

// Constant answers, so the checks compile away in production builds.
#[cfg(not(feature = "test-hooks"))]
impl TestHooks {
    /// Whether `question` is to fail as a model error would: never.
    pub fn fails(&self, _question: &str) -> bool {
        false
    }

    /// The pause after every batch step that produced text: none.
    pub fn step_delay(&self) -> Option<Duration> {
        None
    }

    /// Whether a step holding `question` is to panic: never.
    pub fn panics(&self, _question: &str) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Cli;

    const HOOK_FLAGS: [&str; 5] = [
        "ebb-worker",
        "--debug-fail-marker",
        "POISON",
        "--debug-token-delay",
        "40ms",
    ];

    #[test]
    fn no_hook_is_on_by_default() {
        let cli = Cli::try_parse_from(["ebb-worker"]).expect("no flag is required");
        assert!(!cli.config.hooks.fails("a POISON question"));
        assert_eq!(cli.config.hooks.step_delay(), None);
    }

    #[cfg(feature = "test-hooks")]
    #[test]
    fn test_builds_take_the_hook_flags() {
        let cli = Cli::try_parse_from(HOOK_FLAGS).expect("the hook flags parse");
        assert!(cli.config.hooks.fails("a POISON question"));
        assert!(!cli.config.hooks.fails("a fine question"));
        assert_eq!(
            cli.config.hooks.step_delay(),
            Some(std::time::Duration::from_millis(40))
        );
    }

    #[cfg(not(feature = "test-hooks"))]
    #[test]
    fn production_builds_refuse_the_hook_flags() {
        for hook in [&HOOK_FLAGS[1..3], &HOOK_FLAGS[3..5]] {
            let args = std::iter::once("ebb-worker").chain(hook.iter().copied());
            let err = Cli::try_parse_from(args).expect_err("no such flag");
            assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
        }
    }
}
