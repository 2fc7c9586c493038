//! Flags every ebb process shares, defined once so their names, env vars
//! and defaults cannot drift apart between binaries.

/// Where the shared services are.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// NATS server with JetStream enabled.
    #[arg(long, env = "EBB_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Redis server for status records and the answer cache.
    #[arg(long, env = "EBB_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
}

/// Which model answers. Part of every cache key, so the gateway and the
/// workers must be given the same values.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Hugging Face repo id of the model: what workers load, what answers
    /// report, and part of the cache key.
    #[arg(
        long = "model",
        env = "EBB_MODEL",
        default_value = "Qwen/Qwen2.5-7B-Instruct"
    )]
    pub repo: String,
    /// Revision (branch, tag or commit) of the model repo; part of the cache key.
    #[arg(
        long = "model-revision",
        env = "EBB_MODEL_REVISION",
        default_value = "main"
    )]
    pub revision: String,
}

impl ModelArgs {
    /// `repo@revision`: the model identity stamped on jobs, answers and cache keys.
    pub fn identity(&self) -> String {
        format!("{}@{}", self.repo, self.revision)
    }
}
