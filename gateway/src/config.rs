//! Command-line flags and environment variables of `ebb-gateway`, and the
//! optional YAML file (`--config`) with API keys and priority rules.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ebb_nats::QueueConfig;
use ebb_runtime::{ModelArgs, ServiceArgs};
use ebb_schedule::timetable::TimetableEntry;
use ipnet::IpNet;

use crate::auth::ApiKey;
use crate::priority::PriorityConfig;

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
    /// Most requests held open for an answer (waiting, streaming or
    /// following events); past it questions get their status URL at once and
    /// streams are refused with 503.
    #[arg(long, env = "EBB_MAX_WAITING", default_value_t = 10_000)]
    pub max_waiting: usize,
    /// Most of those one API key may hold; past it that key's chats and
    /// `/events` get 429 `too_many_waiting_for_key` (questions their status
    /// URL), so one client cannot take every slot.
    #[arg(long, env = "EBB_MAX_WAITING_PER_KEY", default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_waiting_per_key: u32,
    /// YAML file with API keys, priority rules and their timetable (README:
    /// "Gateway config").
    #[arg(long = "config", env = "EBB_GATEWAY_CONFIG")]
    pub config_file: Option<PathBuf>,
    /// Serve without API keys, for development only: logs a warning at start.
    /// Without it the gateway refuses to start with no key configured.
    #[arg(long, env = "EBB_INSECURE_DEV")]
    pub insecure_dev: bool,
    /// Bearer token for the `/admin/*` routes (they are off without it).
    #[arg(long, env = "EBB_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// File holding the admin token instead (compose's, from
    /// `ebb-credentials`), so it is in no environment.
    #[arg(long, env = "EBB_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    pub admin_token_file: Option<PathBuf>,
    /// The scalers' HTTP addresses, comma-separated; `POST /admin/scale`
    /// forwards to the `/scale` of the one that is active (a standby
    /// answers 503 `standby`, and the next is tried).
    #[arg(long, env = "EBB_SCALER_URL", value_delimiter = ',')]
    pub scaler_url: Vec<String>,
    /// The scaler's `/scale` bearer token, sent when forwarding.
    #[arg(long, env = "EBB_SCALER_TOKEN", hide_env_values = true)]
    pub scaler_token: Option<String>,
    /// File holding the scaler's token instead.
    #[arg(long, env = "EBB_SCALER_TOKEN_FILE", conflicts_with = "scaler_token")]
    pub scaler_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub overload: OverloadArgs,
    #[command(flatten)]
    pub webhooks: WebhookArgs,
    /// Longest a client may take to send a request body: a slow sender
    /// holds a connection and memory, so it gets `408 body_timeout`.
    #[arg(long, env = "EBB_BODY_TIMEOUT", default_value = "10s", value_parser = ebb_runtime::duration::parse)]
    pub body_timeout: Duration,
    /// Interval of SSE keep-alive comments on idle streams.
    #[arg(long, env = "EBB_SSE_KEEP_ALIVE", default_value = "15s", value_parser = ebb_runtime::duration::parse)]
    pub sse_keep_alive: Duration,
    /// Memory for hot answers in this gateway, in MiB: cache hits served
    /// from it need no Redis round trip (0: every lookup goes to Redis).
    #[arg(long, env = "EBB_HOT_CACHE_MIB", default_value_t = 64)]
    pub hot_cache_mib: u64,
    #[command(flatten)]
    pub queue: QueueConfig,
}

/// Per-client rate limits on the question routes.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Questions per minute from one client IP (token bucket, bursts up to it).
    #[arg(long = "rate-limit-per-ip", env = "EBB_RATE_LIMIT_PER_IP", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub per_ip: u32,
    /// Questions per minute per API key, unless its config entry says otherwise.
    #[arg(long = "rate-limit-per-key", env = "EBB_RATE_LIMIT_PER_KEY", default_value_t = 6_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub per_key: u32,
    /// Proxies (CIDRs, comma-separated) whose `X-Forwarded-For` is believed.
    #[arg(long, env = "EBB_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<IpNet>,
    /// Failed authentications per minute from one client IP (an IPv6
    /// client's /64): past it the client is refused (429) before its key is
    /// even checked, so keys cannot be guessed at speed.
    #[arg(long = "auth-failures-per-ip", env = "EBB_AUTH_FAILURES_PER_IP", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub auth_failures_per_ip: u32,
    /// Most client IPs tracked at once; past it new clients get 429.
    #[arg(
        long = "rate-limit-max-clients",
        env = "EBB_RATE_LIMIT_MAX_CLIENTS",
        default_value_t = 100_000
    )]
    pub max_clients: usize,
}

/// When to shed new questions instead of queueing them.
#[derive(Debug, Clone, clap::Args)]
pub struct OverloadArgs {
    /// The most workers the backlog can get when no scaler is heard. A
    /// running scaler announces its `resources.max_instances` on
    /// `ebb.scaler.status` every 2 s and that is used instead; this applies
    /// until the first announcement, and again after 10 s without one.
    #[arg(long, env = "EBB_MAX_WORKERS", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_workers: u32,
    /// A new question is refused (429 overloaded) when the questions ahead of
    /// it would take longer than this even at the fleet's maximum (the
    /// scaler's, else --max-workers).
    #[arg(long, env = "EBB_LATENCY_GOAL", default_value = "60s", value_parser = ebb_runtime::duration::parse)]
    pub latency_goal: Duration,
    /// Time one worker takes per question until heartbeats report it.
    #[arg(long, env = "EBB_SERVICE_TIME_ESTIMATE", default_value = "10s", value_parser = ebb_runtime::duration::parse)]
    pub service_time_estimate: Duration,
}

/// Webhook delivery.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// HMAC-SHA256 key for the `X-Ebb-Signature` header; webhooks (the
    /// `callback_url` field) are refused without it.
    #[arg(long, env = "EBB_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// File holding the webhook signing secret instead.
    #[arg(
        long,
        env = "EBB_WEBHOOK_SECRET_FILE",
        conflicts_with = "webhook_secret"
    )]
    pub webhook_secret_file: Option<PathBuf>,
    /// Private networks (CIDRs, comma-separated) webhooks may call anyway;
    /// loopback, private and link-local targets are refused otherwise.
    #[arg(long, env = "EBB_WEBHOOK_ALLOW", value_delimiter = ',')]
    pub webhook_allow: Vec<IpNet>,
    /// Longest one webhook call may take.
    #[arg(long, env = "EBB_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = ebb_runtime::duration::parse)]
    pub webhook_timeout: Duration,
    /// Most webhook calls one API key may have waiting for delivery; past
    /// it its questions with a `callback_url` get 429
    /// `too_many_webhooks_for_key`, so one key's dead receiver cannot fill
    /// the queue every key's calls share.
    #[arg(long, env = "EBB_MAX_QUEUED_WEBHOOKS_PER_KEY", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_queued_webhooks_per_key: u64,
}

/// The `--config` file.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub api_keys: Vec<ApiKey>,
    /// Named time windows, in the scaler's timetable syntax.
    #[serde(default)]
    pub timetable: Vec<TimetableEntry>,
    #[serde(default)]
    pub priority: PriorityConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read --config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("no API keys: set `api_keys` in --config, or --insecure-dev to serve without keys")]
    NoKeys,
}

impl FileConfig {
    pub fn load(path: Option<&std::path::Path>) -> Result<FileConfig, ConfigError> {
        let Some(path) = path else {
            return Ok(FileConfig::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_norway::from_str(&text).map_err(|err| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: err.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_compose_config_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/gateway.yaml");
        let file = FileConfig::load(Some(&path)).unwrap();
        assert_eq!(file.api_keys.len(), 1);
        crate::auth::Keys::new(&file.api_keys, None, false, 1).unwrap();
        crate::priority::PriorityRules::new(file.priority, &file.timetable).unwrap();
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = std::env::temp_dir().join(format!("ebb-gw-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gateway.yaml");
        std::fs::write(
            &path,
            "priority:\n  rules:\n    - grade: [12]\n      priority: high\n",
        )
        .unwrap();
        let err = FileConfig::load(Some(&path)).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(err.contains("unknown field `grade`"), "{err}");
    }
}
