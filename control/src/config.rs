//! The scaler's YAML config file, in the shape of the seed's `config.yaml`:
//! `resources`, `rules.scale_up` / `rules.scale_down`, plus ebb's target
//! tracking, cooldowns, timetable and backend. Every error names its key.
//!
//! YAML is parsed with `serde_norway`, a maintained fork of the archived
//! `serde_yaml` with the same data model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::miss_budget::ScaleToZero;
use ebb_schedule::timetable::{Timetable, TimetableEntry, TimetableError};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error(transparent)]
    Timetable(#[from] TimetableError),
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Far beyond any batch a worker runs (CUDA's default is 32); a larger
/// value is a typo, and would plan a fleet of almost nothing.
pub const MAX_SLOTS_PER_WORKER: u32 = 4096;

/// Everything the scaler is told, from one file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalerConfig {
    /// How often signals are read and the decision re-made (arrivals at zero
    /// workers wake the scaler at once, whatever the tick).
    #[serde(
        default = "defaults::tick",
        deserialize_with = "ebb_runtime::duration::deserialize"
    )]
    pub tick: Duration,
    pub resources: Resources,
    /// Seed-style rules; when absent, target tracking decides.
    #[serde(default)]
    pub rules: Option<Rules>,
    #[serde(default)]
    pub target: TargetTracking,
    #[serde(default)]
    pub cooldowns: Cooldowns,
    /// The file's `timetable:` entries as written.
    #[serde(default, rename = "timetable")]
    pub timetable_entries: Vec<TimetableEntry>,
    /// The entries compiled (cron parsed, zones resolved) by [`Self::parse`].
    #[serde(skip)]
    pub timetable: Timetable,
    /// How early a timetable window starts its workers. Default: the measured
    /// cold-start p90 (60 s until one is measured).
    #[serde(default, deserialize_with = "optional_duration")]
    pub prewarm_lead: Option<Duration>,
    /// Whether the last worker may stop: `budgeted` (default: only while
    /// the SLO's miss budget pays for the next wake-up's late questions),
    /// `always` or `never`.
    #[serde(default)]
    pub scale_to_zero: ScaleToZero,
    #[serde(default)]
    pub health: Health,
    pub backend: BackendConfig,
    /// Environment variable holding the bearer token for `POST /scale`; the
    /// same name with `_FILE` appended may name a file holding it instead.
    #[serde(default = "defaults::admin_token_env")]
    pub admin_token_env: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub min_instances: u32,
    pub max_instances: u32,
    /// What a worker runs on (informational, e.g. `nvidia-a10`).
    #[serde(default)]
    pub instance_type: Option<String>,
    /// What one worker costs per hour running (any currency): the
    /// console's cost so far today, and the fixed fleet's beside it.
    #[serde(default)]
    pub price_per_hour: Option<f64>,
}

/// Seed-style rules: scale up when ANY `scale_up` condition has held for its
/// duration, down when ALL `scale_down` conditions have.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    #[serde(default)]
    pub scale_up: Vec<Condition>,
    #[serde(default)]
    pub scale_down: Vec<Condition>,
    #[serde(default = "defaults::step")]
    pub step_up: u32,
    #[serde(default = "defaults::step")]
    pub step_down: u32,
}

/// `metric` above (scale_up) or below (scale_down) `threshold` for `duration`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub metric: Metric,
    pub threshold: f64,
    #[serde(
        default,
        deserialize_with = "ebb_runtime::duration::deserialize",
        serialize_with = "ebb_runtime::duration::serialize_seconds"
    )]
    pub duration: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Arrivals per second (stable window).
    RequestPerSecond,
    /// Mean acceptance-to-answer time, seconds.
    AvgResponseTime,
    /// Questions waiting or being answered.
    QueueDepth,
    /// Age of the oldest question no worker has taken, seconds.
    QueueAge,
    /// Busy fraction of ready workers' slots (active / slots), 0-1.
    #[serde(alias = "cpu_usage")]
    WorkerUtilization,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::RequestPerSecond => "request_per_second",
            Metric::AvgResponseTime => "avg_response_time",
            Metric::QueueDepth => "queue_depth",
            Metric::QueueAge => "queue_age",
            Metric::WorkerUtilization => "worker_utilization",
        }
    }
}

/// Target tracking, the default policy: enough workers that the arrival
/// rate plus draining the backlog keeps them at `utilization`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TargetTracking {
    /// Highest busy fraction to plan for, 0-1.
    pub utilization: f64,
    /// Fraction of questions that should wait at most half the latency goal
    /// for a worker. Workers are planned for it with the M/M/N (Erlang C)
    /// queue, which small fleets need (a few workers at 80 % busy make many
    /// students wait); 0 plans by `utilization` alone.
    pub attainment: f64,
    /// Time in which a backlog should be drained.
    #[serde(
        deserialize_with = "ebb_runtime::duration::deserialize",
        serialize_with = "ebb_runtime::duration::serialize_seconds"
    )]
    pub drain_target: Duration,
    /// End-to-end latency students should see; an oldest waiting question
    /// older than half of it means panic.
    #[serde(
        deserialize_with = "ebb_runtime::duration::deserialize",
        serialize_with = "ebb_runtime::duration::serialize_seconds"
    )]
    pub latency_goal: Duration,
    /// Service time per question until workers report one: with batching,
    /// the time one question spends in its slot (heartbeat `mean_job_ms`).
    #[serde(
        deserialize_with = "ebb_runtime::duration::deserialize",
        serialize_with = "ebb_runtime::duration::serialize_seconds"
    )]
    pub default_service_time: Duration,
    /// Questions one worker answers at once (its `--max-batch`) until
    /// workers report their `slots`. Capacity is planned in slots, so a
    /// wrong value here only misplans the first round after a cold start.
    pub slots_per_worker: u32,
    /// Window of the stable arrival rate.
    #[serde(
        deserialize_with = "ebb_runtime::duration::deserialize",
        serialize_with = "ebb_runtime::duration::serialize_seconds"
    )]
    pub stable_window: Duration,
    /// Window of the panic arrival rate.
    #[serde(
        deserialize_with = "ebb_runtime::duration::deserialize",
        serialize_with = "ebb_runtime::duration::serialize_seconds"
    )]
    pub panic_window: Duration,
    /// Window over which the SLO's miss budget, `(1 - attainment) x
    /// questions`, is counted for `scale_to_zero: budgeted`. A day: the
    /// busy hours earn what the quiet ones spend on wake-ups from zero.
    #[serde(
        deserialize_with = "ebb_runtime::duration::deserialize",
        serialize_with = "ebb_runtime::duration::serialize_seconds"
    )]
    pub miss_budget_window: Duration,
}

/// Longest `target.miss_budget_window`: an SLO judged over more than a
/// month would let a long-gone busy week pay for today's misses.
pub const MAX_MISS_BUDGET_WINDOW: Duration = Duration::from_secs(31 * 24 * 3600);

impl Default for TargetTracking {
    fn default() -> Self {
        TargetTracking {
            utilization: 0.8,
            attainment: 0.999,
            drain_target: Duration::from_secs(30),
            latency_goal: Duration::from_secs(10),
            default_service_time: Duration::from_secs(10),
            slots_per_worker: 1,
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            miss_budget_window: Duration::from_secs(24 * 3600),
        }
    }
}

/// Scale-up is immediate. These two windows only slow scale-down, and are
/// separate on purpose: stepping from N to N-1 workers is cheap to undo,
/// going from 1 to 0 costs the next student a cold start.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cooldowns {
    /// The policy must want fewer workers for this long before scaling down
    /// (never below 1 this way). Longer than `target.stable_window`, a
    /// just-started scaler cannot scale down on its half-empty rate window.
    #[serde(
        deserialize_with = "ebb_runtime::duration::deserialize",
        serialize_with = "ebb_runtime::duration::serialize_seconds"
    )]
    pub scale_down_stabilization: Duration,
    /// No question waiting, arriving or being answered for this long before
    /// the last worker stops (the seed's 5-minute scale-down duration).
    #[serde(
        deserialize_with = "ebb_runtime::duration::deserialize",
        serialize_with = "ebb_runtime::duration::serialize_seconds"
    )]
    pub scale_to_zero_idle: Duration,
}

impl Default for Cooldowns {
    fn default() -> Self {
        Cooldowns {
            scale_down_stabilization: Duration::from_secs(120),
            scale_to_zero_idle: Duration::from_secs(300),
        }
    }
}

/// When a worker stops counting as capacity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    /// A worker not ready this long after its start is unhealthy and replaced.
    #[serde(deserialize_with = "ebb_runtime::duration::deserialize")]
    pub init_timeout: Duration,
    /// A ready worker whose heartbeat is older than this is unhealthy.
    #[serde(deserialize_with = "ebb_runtime::duration::deserialize")]
    pub heartbeat_timeout: Duration,
    /// First delay before replacing a crashed worker; doubles per crash in a row (max 5 min).
    #[serde(deserialize_with = "ebb_runtime::duration::deserialize")]
    pub restart_backoff: Duration,
    /// How long a stopping worker may drain before it is killed.
    #[serde(deserialize_with = "ebb_runtime::duration::deserialize")]
    pub stop_grace: Duration,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            init_timeout: Duration::from_secs(600),
            heartbeat_timeout: Duration::from_secs(10),
            restart_backoff: Duration::from_secs(1),
            stop_grace: Duration::from_secs(120),
        }
    }
}

/// Where workers run.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BackendConfig {
    /// `ebb-worker` processes on this machine.
    Process(ProcessBackendConfig),
    /// Worker containers on the local Docker engine.
    Docker(DockerBackendConfig),
}

impl BackendConfig {
    /// The pool's name: its workers' label or records, its lease.
    pub fn pool(&self) -> &str {
        match self {
            BackendConfig::Process(process) => &process.pool,
            BackendConfig::Docker(docker) => &docker.pool,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessBackendConfig {
    /// The worker executable.
    #[serde(default = "defaults::worker_command")]
    pub command: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Where the scaler keeps its workers' pid files and logs; a restarted
    /// scaler adopts the workers recorded here and touches nothing else.
    #[serde(default = "defaults::state_dir")]
    pub state_dir: PathBuf,
    /// Name of this pool (several scalers may share a state directory).
    #[serde(default = "defaults::pool")]
    pub pool: String,
}

mod defaults {
    use std::path::PathBuf;
    use std::time::Duration;

    pub fn tick() -> Duration {
        Duration::from_secs(1)
    }
    pub fn step() -> u32 {
        1
    }
    pub fn admin_token_env() -> String {
        "EBB_SCALER_ADMIN_TOKEN".into()
    }
    pub fn worker_command() -> PathBuf {
        "ebb-worker".into()
    }
    pub fn state_dir() -> PathBuf {
        std::env::temp_dir().join("ebb-scaler")
    }
    pub fn pool() -> String {
        "default".into()
    }
}

fn optional_duration<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    ebb_runtime::duration::deserialize(deserializer).map(Some)
}

impl TargetTracking {
    /// Errors name the key under `target`.
    fn validate(&self) -> Result<(), ConfigError> {
        let target = self;
        if !(target.utilization > 0.0 && target.utilization <= 1.0) {
            return Err(invalid("target.utilization", "must be in (0, 1]"));
        }
        if !(0.0..1.0).contains(&target.attainment) {
            return Err(invalid("target.attainment", "must be in [0, 1)"));
        }
        if !(1..=MAX_SLOTS_PER_WORKER).contains(&target.slots_per_worker) {
            return Err(invalid(
                "target.slots_per_worker",
                format!("must be from 1 to {MAX_SLOTS_PER_WORKER}"),
            ));
        }
        for (key, value) in [
            ("target.drain_target", target.drain_target),
            ("target.latency_goal", target.latency_goal),
            ("target.default_service_time", target.default_service_time),
            ("target.stable_window", target.stable_window),
            ("target.panic_window", target.panic_window),
            ("target.miss_budget_window", target.miss_budget_window),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be more than zero"));
            }
        }
        if target.miss_budget_window > MAX_MISS_BUDGET_WINDOW {
            return Err(invalid(
                "target.miss_budget_window",
                "must be at most 31 days",
            ));
        }
        Ok(())
    }
}

impl ScalerConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<ScalerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|err| match err {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<ScalerConfig, ConfigError> {
        let mut config: ScalerConfig =
            serde_norway::from_str(text).map_err(|err| ConfigError::Syntax {
                path: PathBuf::from("config"),
                message: err.to_string(),
            })?;
        config.timetable = config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<Timetable, ConfigError> {
        let resources = &self.resources;
        resources.validate()?;
        if self.tick.is_zero() || self.tick > Duration::from_secs(60) {
            return Err(invalid("tick", "must be more than zero and at most 60s"));
        }
        self.health.validate()?;
        self.target.validate()?;
        if let Some(rules) = &self.rules {
            rules.validate()?;
        }
        for (index, entry) in self.timetable_entries.iter().enumerate() {
            if entry.min_workers > resources.max_instances {
                return Err(invalid(
                    format!("timetable[{index}].min_workers"),
                    format!(
                        "{} is more than resources.max_instances ({})",
                        entry.min_workers, resources.max_instances
                    ),
                ));
            }
        }
        let pool = self.backend.pool();
        if pool.is_empty() || !pool.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(invalid("backend.pool", "must be letters, digits and '-'"));
        }
        Ok(Timetable::new(&self.timetable_entries)?)
    }
}

impl Resources {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_instances == 0 {
            return Err(invalid("resources.max_instances", "must be at least 1"));
        }
        if self
            .price_per_hour
            .is_some_and(|price| !price.is_finite() || price < 0.0)
        {
            return Err(invalid(
                "resources.price_per_hour",
                "must be a number of at least 0",
            ));
        }
        if self.min_instances > self.max_instances {
            return Err(invalid(
                "resources.min_instances",
                format!(
                    "{} is more than resources.max_instances ({})",
                    self.min_instances, self.max_instances
                ),
            ));
        }
        Ok(())
    }
}

impl Health {
    fn validate(&self) -> Result<(), ConfigError> {
        // Workers beat every 2 s: anything shorter would call healthy ones dead.
        if self.heartbeat_timeout < Duration::from_secs(5) {
            return Err(invalid(
                "health.heartbeat_timeout",
                "must be at least 5s (workers beat every 2s)",
            ));
        }
        for (key, value) in [
            ("health.init_timeout", self.init_timeout),
            ("health.restart_backoff", self.restart_backoff),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be more than zero"));
            }
        }
        Ok(())
    }
}

impl Rules {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.scale_up.is_empty() && self.scale_down.is_empty() {
            return Err(invalid(
                "rules",
                "has neither scale_up nor scale_down conditions",
            ));
        }
        for (key, step) in [
            ("rules.step_up", self.step_up),
            ("rules.step_down", self.step_down),
        ] {
            if step == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        for (list, conditions) in [
            ("scale_up", &self.scale_up),
            ("scale_down", &self.scale_down),
        ] {
            for (index, condition) in conditions.iter().enumerate() {
                if !condition.threshold.is_finite() || condition.threshold < 0.0 {
                    return Err(invalid(
                        format!("rules.{list}[{index}].threshold"),
                        "must be a non-negative number",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `backend: {kind: docker, ...}` in the scaler config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerBackendConfig {
    /// Worker image, e.g. `ebb-worker:latest`.
    pub image: String,
    /// Network the workers join (e.g. the compose network).
    #[serde(default)]
    pub network: Option<String>,
    /// Overrides the image's command (the worker's flags).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Bind mounts and volumes, `source:target[:ro]` (e.g. the shared
    /// `HF_HOME` model cache, so a new worker does not download again).
    #[serde(default)]
    pub volumes: Vec<String>,
    /// GPUs per worker: a count (`-1` = all) or device ids.
    #[serde(default)]
    pub gpus: Option<GpuRequest>,
    /// CPU limit in cores.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Memory limit in bytes.
    #[serde(default)]
    pub memory_bytes: Option<i64>,
    #[serde(default = "default_pool")]
    pub pool: String,
}

fn default_pool() -> String {
    "default".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum GpuRequest {
    Count { count: i64 },
    Devices { device_ids: Vec<String> },
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
