//! Command-line flags and environment variables of `ebb-gateway`.

use std::net::SocketAddr;

use ebb_nats::QueueConfig;

/// ebb's HTTP API: answers hot questions from the cache and queues the rest
/// for the workers.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "ebb-gateway", version, about)]
pub struct Config {
    /// Address the HTTP API listens on.
    #[arg(long, env = "EBB_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// NATS server with JetStream enabled.
    #[arg(long, env = "EBB_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Redis server for status records and the answer cache.
    #[arg(long, env = "EBB_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Model the workers serve (Hugging Face repo id): reported in answers and
    /// part of the cache key. Must match the workers' `--model`.
    #[arg(long, env = "EBB_MODEL", default_value = "Qwen/Qwen2.5-7B-Instruct")]
    pub model: String,
    /// Revision of that model; part of the cache key. Must match the workers'.
    #[arg(long, env = "EBB_MODEL_REVISION", default_value = "main")]
    pub model_revision: String,
    /// `max_tokens` for questions that do not set it.
    #[arg(long, env = "EBB_DEFAULT_MAX_TOKENS", default_value_t = 512)]
    pub default_max_tokens: u32,
    /// Largest `max_tokens` a question may ask for.
    #[arg(long, env = "EBB_MAX_TOKENS_LIMIT", default_value_t = 4096)]
    pub max_tokens_limit: u32,
    /// Most requests held open waiting for an answer; past it new questions
    /// are still accepted but answered `202` at once with their status URL.
    #[arg(long, env = "EBB_MAX_WAITING", default_value_t = 10_000)]
    pub max_waiting: usize,
    #[command(flatten)]
    pub queue: QueueConfig,
}

impl Config {
    /// `id@revision`: the model identity stamped on jobs and cache keys.
    pub fn model_identity(&self) -> String {
        format!("{}@{}", self.model, self.model_revision)
    }
}
