//! Command-line flags and environment variables of `ebb-gateway`.

use std::net::SocketAddr;

use ebb_nats::{ModelArgs, QueueConfig, ServiceArgs};

/// ebb's HTTP API: answers hot questions from the cache and queues the rest
/// for the workers.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "ebb-gateway", version, about)]
pub struct Config {
    /// Address the HTTP API listens on.
    #[arg(long, env = "EBB_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub services: ServiceArgs,
    #[command(flatten)]
    pub model: ModelArgs,
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
