//! `ebb-scaler simulate`: replays a real or generated trace on a virtual
//! clock against several scaling policies at once (the same arrivals, the
//! same seeded draws) and reports cost and SLO figures for each.
//!
//! # Layout
//! - [`trace`]: trace formats, rate and time scaling, rate-profile expansion.
//! - [`engine`]: the discrete-event replay and the [`engine::Autoscaler`] trait;
//!   [`worker`]: the simulated worker's cost and speed; [`worker_profile`]:
//!   the measured engine's decode rate by batch size (`--worker-profile`).
//! - [`policies`]: ebb's [`ebb_control::policy::decide`], the seed's rules, a fixed
//!   fleet, KEDA-like and Knative-like models.
//! - [`clairvoyant`]: the perfect-foresight reference; [`fixed`]: the search
//!   for the smallest always-on fleet meeting the SLO.
//! - [`report`]: the JSON schema and the Markdown table; [`plot`]: the SVG
//!   plots (plotters) and `report.html`.
//! - [`school`]: the school-day trace generator (`ebb-scaler gen-trace`).

pub mod clairvoyant;
pub mod engine;
pub mod fixed;
pub mod plot;
pub mod policies;
pub mod report;
pub mod school;
pub mod trace;
pub mod worker;
pub mod worker_profile;

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use ebb_control::config::{ConfigError, ScalerConfig};
use engine::{Fate, Outcome, Setup, WorkerModel};
use policies::{KedaLike, KnativeLike};
use report::{PolicyResult, Report, Slo, TraceSummary};
use trace::{LoadOptions, Trace, TraceError};
use worker_profile::{ProfileError, WorkerProfile};

/// Prompt tokens per second without a profile: an assumption for a GPU
/// (README's Simulation section), not measured here.
const DEFAULT_PREFILL: f64 = 2000.0;

/// ebb's default policy, the one `simulate` uses without `--config`.
pub const DEFAULT_CONFIG: &str = include_str!("../config/default.yaml");

/// The policies `simulate` can compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyName {
    /// The smallest always-on fleet that meets the SLO (found by search).
    Fixed,
    /// The seed article's rules (rps, response time, utilisation), min 1, max 10.
    SeedRules,
    /// KEDA's NATS JetStream scaler on a Kubernetes HPA, default settings.
    KedaLike,
    /// Knative's KPA, default settings.
    KnativeLike,
    /// ebb's own policy, from `--config` or the default config.
    Ebb,
    /// Knows every arrival: the practical limit.
    Clairvoyant,
}

impl PolicyName {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyName::Fixed => "fixed",
            PolicyName::SeedRules => "seed-rules",
            PolicyName::KedaLike => "keda-like",
            PolicyName::KnativeLike => "knative-like",
            PolicyName::Ebb => "ebb",
            PolicyName::Clairvoyant => "clairvoyant",
        }
    }
}

/// `ebb-scaler simulate` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Trace file: Azure LLM inference CSV, a 10-minute rate profile, or
    /// ebb's CSV; the header tells which.
    #[arg(long)]
    pub trace: PathBuf,
    /// Scaler config of the `ebb` policy (default: ebb's shipped default).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Policies to compare, comma-separated (default: all six).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fixed,seed-rules,keda-like,knative-like,ebb,clairvoyant"
    )]
    pub policies: Vec<PolicyName>,
    /// Seed of every random draw; the same seed gives byte-identical JSON.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Directory for report.json, report.md, report.svg and report.html.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replay this much of the trace first without counting it: policies
    /// that learn (timetable floors) start from what they would know.
    #[arg(long, default_value = "0s", value_parser = ebb_runtime::duration::parse)]
    pub warm_up: Duration,
    /// Multiply arrival rates by this (per-request traces are thinned or copied).
    #[arg(long, default_value_t = 1.0)]
    pub rate_scale: f64,
    /// Stretch time by this (0.5 replays twice as fast).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Coefficient of variation of gaps when expanding a rate profile (1 = Poisson).
    #[arg(long, default_value_t = 1.0)]
    pub arrival_cv: f64,
    /// Time of the trace's start for traces with relative times (RFC 3339).
    #[arg(long, default_value = "2026-03-02T00:00:00Z")]
    pub start: DateTime<Utc>,
    /// Mean prompt tokens drawn for traces without token counts.
    #[arg(long, default_value_t = 1024.0)]
    pub mean_input_tokens: f64,
    /// Mean answer tokens drawn for traces without token counts.
    #[arg(long, default_value_t = 211.0)]
    pub mean_output_tokens: f64,
    /// Median cold start of a worker (start request to ready).
    #[arg(long, default_value = "30s", value_parser = ebb_runtime::duration::parse)]
    pub cold_start: Duration,
    /// 90th percentile cold start (log-normal between the two).
    #[arg(long, default_value = "45s", value_parser = ebb_runtime::duration::parse)]
    pub cold_start_p90: Duration,
    /// Prompt tokens per second per question in service (default: 2000, or
    /// with --worker-profile the profile's; given, it holds with one too).
    #[arg(long)]
    pub prefill_tokens_per_s: Option<f64>,
    /// Answer tokens per second per question in service (replaced by the
    /// profile's with --worker-profile).
    #[arg(long, default_value_t = 21.0)]
    pub decode_tokens_per_s: f64,
    /// Questions one worker answers at once, its slots (default: 1; with
    /// --worker-profile, the largest batch size measured).
    #[arg(long)]
    pub concurrency: Option<u32>,
    /// The worker benchmark's JSON (`target/bench/decode.json`): a worker
    /// with k questions in flight decodes each at the measured aggregate(k)
    /// / k tokens/s, interpolated between measured batch sizes and flat
    /// beyond the largest; prefill at the measured rate.
    #[arg(long)]
    pub worker_profile: Option<PathBuf>,
    /// The profile's format (weights) to use (default: `f16` if the file
    /// has it, else its only one).
    #[arg(long)]
    pub worker_profile_format: Option<String>,
    /// Multiply every rate of the profile by this: scales a curve measured
    /// on a CPU to the GPU the replay assumes.
    #[arg(long, default_value_t = 1.0)]
    pub profile_speedup: f64,
    /// Money per worker-hour.
    #[arg(long, default_value_t = 1.0)]
    pub price_per_hour: f64,
    /// Questions waiting or in service beyond which new ones are rejected.
    #[arg(long, default_value_t = 100_000)]
    pub queue_max: u64,
    /// Fraction of questions answered from the cache (repeated
    /// `question_id`s in ebb's CSV are cache hits anyway).
    #[arg(long, default_value_t = 0.0)]
    pub cache_hit_ratio: f64,
    /// Time to first token a question must get to count as served in time.
    #[arg(long, default_value = "5s", value_parser = ebb_runtime::duration::parse)]
    pub slo_first_token: Duration,
    /// Fraction of questions that must meet the SLO (the fixed fleet is sized by it).
    #[arg(long, default_value_t = 0.999)]
    pub slo_target: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error("--config: {0}")]
    Config(#[from] ConfigError),
    #[error("--{option}: {message}")]
    Option {
        option: &'static str,
        message: String,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn bad(option: &'static str, message: impl Into<String>) -> SimulateError {
    SimulateError::Option {
        option,
        message: message.into(),
    }
}

impl From<ProfileError> for SimulateError {
    fn from(err: ProfileError) -> SimulateError {
        bad(err.option, err.message)
    }
}

/// A finished run: the report and each policy's time series for the plot.
#[derive(Debug)]
pub struct Simulation {
    pub report: Report,
    pub outcomes: Vec<(PolicyName, Outcome)>,
}

impl SimulateArgs {
    fn worker_model(&self) -> Result<WorkerModel, SimulateError> {
        let positive = |option, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(value)
            } else {
                Err(bad(
                    option,
                    format!("must be a positive number, got {value}"),
                ))
            }
        };
        if self.cold_start_p90 < self.cold_start {
            return Err(bad("cold-start-p90", "must not be below --cold-start"));
        }
        let profile = match &self.worker_profile {
            Some(path) => Some(WorkerProfile::load(
                path,
                self.worker_profile_format.as_deref(),
                self.profile_speedup,
            )?),
            None if self.worker_profile_format.is_some() => {
                return Err(bad("worker-profile-format", "needs --worker-profile"));
            }
            None => None,
        };
        positive("profile-speedup", self.profile_speedup)?;
        let concurrency = self
            .concurrency
            .or(profile.as_ref().map(WorkerProfile::largest_batch))
            .unwrap_or(1);
        if concurrency == 0 {
            return Err(bad("concurrency", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.cache_hit_ratio) {
            return Err(bad("cache-hit-ratio", "must be in [0, 1)"));
        }
        if !(self.slo_target > 0.0 && self.slo_target <= 1.0) {
            return Err(bad("slo-target", "must be in (0, 1]"));
        }
        let prefill = self.prefill_tokens_per_s;
        let prefill = positive("prefill-tokens-per-s", prefill.unwrap_or(DEFAULT_PREFILL))?;
        let decode = positive("decode-tokens-per-s", self.decode_tokens_per_s)?;
        // With a profile, the decode rate is a full batch's (what the
        // clairvoyant reference and the initial fleet assume), and prefill
        // is the profile's unless given: a GPU's prefill is compute-bound,
        // so a CPU's, scaled by the decode speedup, can be far off.
        let (prefill, decode) = match &profile {
            Some(profile) => (
                self.prefill_tokens_per_s
                    .map_or(profile.prefill_tokens_per_s, |_| prefill),
                profile.per_sequence(concurrency),
            ),
            None => (prefill, decode),
        };
        Ok(WorkerModel {
            cold_start_median_s: self.cold_start.as_secs_f64(),
            cold_start_p90_s: self.cold_start_p90.as_secs_f64(),
            prefill_tokens_per_s: prefill,
            decode_tokens_per_s: decode,
            concurrency,
            price_per_hour: positive("price-per-hour", self.price_per_hour)?,
            queue_max: self.queue_max.max(1),
            cache_hit_ratio: self.cache_hit_ratio,
            profile,
        })
    }

    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            rate_scale: self.rate_scale,
            time_scale: self.time_scale,
            arrival_cv: self.arrival_cv,
            mean_input_tokens: self.mean_input_tokens,
            mean_output_tokens: self.mean_output_tokens,
            start: self.start,
        }
    }
}

/// Loads the trace and config, replays every policy asked for, and reports.
pub fn run(args: &SimulateArgs) -> Result<Simulation, SimulateError> {
    let model = args.worker_model()?;
    let config = match &args.config {
        Some(path) => ScalerConfig::load(path)?,
        None => ScalerConfig::parse(DEFAULT_CONFIG)?,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let trace = Trace::load(&args.trace, &args.load_options(), &mut rng)?;
    let slo = Slo {
        first_token_s: args.slo_first_token.as_secs_f64(),
        target: args.slo_target,
    };
    let warm_up = args.warm_up.as_secs_f64();
    if warm_up >= trace.duration {
        return Err(bad(
            "warm-up",
            format!(
                "{warm_up}s is not shorter than the trace ({:.0}s)",
                trace.duration
            ),
        ));
    }
    let setup = Setup {
        trace: &trace,
        model: &model,
        seed: args.seed,
        measure_from: warm_up,
        health: &config.health,
    };

    let progress = progress(args.policies.len());
    // The clairvoyant replay is also the yardstick: its answers are pure
    // service work, and its peak bounds the fixed fleet's search.
    let reference = clairvoyant::replay(&setup);
    progress.inc(1);
    let (work, mean_service) = service_work(&reference);
    let lower_bound = lower_bound(&trace, &reference, &model, work);
    let bench = Bench {
        setup,
        slo: &slo,
        config: &config,
        config_name: args
            .config
            .as_deref()
            .map_or("default config".to_owned(), |p| p.display().to_string()),
        initial: initial_workers(&trace, &model),
        mean_service,
        reference: &reference,
    };
    let mut results = Vec::new();
    let mut outcomes = Vec::new();
    for &name in &args.policies {
        progress.set_message(name.as_str());
        let (detail, outcome) = bench.replay(name)?;
        progress.inc(1);
        results.push(PolicyResult::new(
            name.as_str(),
            detail,
            &outcome,
            &model,
            &slo,
            lower_bound,
        ));
        outcomes.push((name, outcome));
    }
    let mut report = Report {
        trace: summarize(&trace, args),
        seed: args.seed,
        worker: model.clone(),
        slo,
        lower_bound_worker_seconds: (lower_bound * 10.0).round() / 10.0,
        policies: results,
    };
    report.compare();
    progress.finish_and_clear();
    Ok(Simulation { report, outcomes })
}

/// A bar on stderr over the reference replay and each policy's (a long
/// trace takes minutes); indicatif draws nothing when stderr is not a
/// terminal, so logs and tests stay quiet.
fn progress(policies: usize) -> indicatif::ProgressBar {
    let style = indicatif::ProgressStyle::with_template(
        "{elapsed:>4} [{bar:30}] {pos}/{len} replays: {msg}",
    )
    .expect("a valid template")
    .progress_chars("=> ");
    let bar = indicatif::ProgressBar::new(policies as u64 + 1)
        .with_style(style)
        .with_message("clairvoyant reference");
    bar.enable_steady_tick(std::time::Duration::from_millis(250));
    bar
}

/// Seconds of service the measured answers took in all, and per answer.
fn service_work(reference: &Outcome) -> (f64, f64) {
    let measured = &reference.fates[reference.first_measured..];
    let (work, served) = measured
        .iter()
        .fold((0.0, 0u64), |(work, served), fate| match fate {
            Fate::Answered { total, .. } => (work + *total as f64, served + 1),
            _ => (work, served),
        });
    (work, work / served.max(1) as f64)
}

/// What every policy's replay in one run shares.
struct Bench<'a> {
    setup: Setup<'a>,
    slo: &'a Slo,
    /// The `ebb` policy's config; its `max_instances` caps KEDA and Knative too.
    config: &'a ScalerConfig,
    config_name: String,
    initial: u32,
    mean_service: f64,
    reference: &'a Outcome,
}

impl Bench<'_> {
    /// Replays one policy; returns its parameters in words and the outcome.
    fn replay(&self, name: PolicyName) -> Result<(String, Outcome), SimulateError> {
        let setup = &self.setup;
        let concurrency = setup.model.concurrency;
        let max = self.config.resources.max_instances;
        let initial = self.initial.min(max);
        Ok(match name {
            PolicyName::Clairvoyant => (
                format!(
                    "perfect foresight; keeps a worker through gaps shorter than the mean cold start ({:.1} s)",
                    setup.model.mean_cold_start()
                ),
                self.reference.clone(),
            ),
            PolicyName::Fixed => {
                let peak = self
                    .reference
                    .samples
                    .iter()
                    .map(|s| s.workers)
                    .max()
                    .unwrap_or(1);
                let (fleet, outcome) = fixed::smallest_fixed_fleet(setup, self.slo, peak);
                (fleet.detail(self.slo.target), outcome)
            }
            PolicyName::SeedRules => {
                let throughput = concurrency as f64 / self.mean_service;
                let text = policies::seed_rules_config(throughput, self.mean_service);
                let config = ScalerConfig::parse(&text)?;
                let rules = config.rules.as_ref().expect("seed config has rules");
                let detail = format!(
                    "up if rps > {:.3} or avg response > {:.2} s for 120 s, down if utilization < 30% for 300 s, 1..10 workers",
                    rules.scale_up[0].threshold, rules.scale_up[1].threshold
                );
                let start = self.initial.clamp(1, 10);
                let mut policy = policies::ebb(config, start);
                (detail, engine::replay(setup, &mut policy, start))
            }
            PolicyName::KedaLike => (
                format!(
                    "lagThreshold {}, polling {} s, HPA sync {} s, cooldown {} s, stabilization {} s, max {max}",
                    KedaLike::LAG_THRESHOLD,
                    KedaLike::POLLING.as_secs(),
                    KedaLike::HPA_SYNC.as_secs(),
                    KedaLike::COOLDOWN.as_secs(),
                    KedaLike::STABILIZATION.as_secs()
                ),
                engine::replay(setup, &mut KedaLike::new(max, initial), initial),
            ),
            PolicyName::KnativeLike => (
                format!(
                    "KPA: stable {} s, panic {} s at {}%, target {}% of concurrency {concurrency}, tick {} s, scale-to-zero grace {} s, max {max}",
                    KnativeLike::STABLE_WINDOW.as_secs(),
                    KnativeLike::PANIC_WINDOW.as_secs(),
                    KnativeLike::PANIC_THRESHOLD * 100.0,
                    KnativeLike::TARGET_UTILIZATION * 100.0,
                    KnativeLike::TICK.as_secs(),
                    KnativeLike::SCALE_TO_ZERO_GRACE.as_secs()
                ),
                engine::replay(
                    setup,
                    &mut KnativeLike::new(max, concurrency, initial),
                    initial,
                ),
            ),
            PolicyName::Ebb => {
                let config = self.config;
                let detail = format!(
                    "{}: target {}% utilization, panic, {} timetable entries, {}..{max} workers",
                    self.config_name,
                    config.target.utilization * 100.0,
                    config.timetable_entries.len(),
                    config.resources.min_instances
                );
                let start = self.initial.clamp(config.resources.min_instances, max);
                let mut policy = policies::ebb(config.clone(), start);
                (detail, engine::replay(setup, &mut policy, start))
            }
        })
    }
}

/// Worker-seconds of the measured answers at no idle and no cold start:
/// the clairvoyant's service work over the slots per worker. With a
/// profile, a question's work is its prompt (per slot, at the measured
/// prefill rate) plus its answer at the best aggregate decode rate a worker
/// reaches (normally the full batch's); no policy can do with less.
fn lower_bound(trace: &Trace, reference: &Outcome, model: &WorkerModel, work: f64) -> f64 {
    let slots = f64::from(model.concurrency);
    if model.profile.is_none() {
        return work / slots;
    }
    let peak = model.peak_decode_rate();
    trace.arrivals[reference.first_measured..]
        .iter()
        .zip(&reference.fates[reference.first_measured..])
        .filter(|(_, fate)| matches!(fate, Fate::Answered { .. }))
        .map(|(arrival, _)| {
            let (prefill, _, _) = model.service_at(arrival, model.decode_tokens_per_s);
            prefill / slots + arrival.output_tokens.max(1) as f64 / peak
        })
        .sum()
}

/// A replay starts as if the service had been running: every dynamic policy
/// begins with enough ready workers for the busiest of the trace's first
/// five minutes (offered load: arrivals x service time). A trace cut from a
/// busy hour would otherwise charge every policy a cold start and a backlog
/// the real service never had.
pub fn initial_workers(trace: &Trace, model: &WorkerModel) -> u32 {
    let mut per_minute = [0.0f64; 5];
    for arrival in trace.arrivals.iter().take_while(|a| a.at < 300.0) {
        per_minute[(arrival.at / 60.0) as usize] += model.service(arrival).1;
    }
    let busiest = per_minute.into_iter().fold(0.0, f64::max);
    (busiest / 60.0 / model.concurrency as f64).ceil() as u32
}

fn summarize(trace: &Trace, args: &SimulateArgs) -> TraceSummary {
    let warm_up = args.warm_up.as_secs_f64();
    let measured = &trace.arrivals[trace.arrivals.partition_point(|a| a.at < warm_up)..];
    let mut per_minute = std::collections::BTreeMap::<u64, u64>::new();
    for arrival in measured {
        *per_minute.entry((arrival.at / 60.0) as u64).or_default() += 1;
    }
    let peak = per_minute.values().copied().max().unwrap_or(0);
    TraceSummary {
        file: args.trace.file_name().map_or_else(
            || args.trace.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        format: trace.format,
        start: trace.start.to_rfc3339(),
        duration_s: (trace.duration * 1000.0).round() / 1000.0,
        questions: measured.len() as u64,
        warm_up_s: warm_up,
        mean_rate_rps: ((measured.len() as f64 / (trace.duration - warm_up).max(1.0)) * 1000.0)
            .round()
            / 1000.0,
        peak_minute_rate_rps: ((peak as f64 / 60.0) * 1000.0).round() / 1000.0,
        rate_scale: args.rate_scale,
        time_scale: args.time_scale,
        arrival_cv: args.arrival_cv,
    }
}

/// Writes report.json, report.md and report.svg into `dir`.
pub fn write(simulation: &Simulation, dir: &Path) -> Result<(), SimulateError> {
    let write = |name: &str, contents: String| {
        let path = dir.join(name);
        std::fs::write(&path, contents).map_err(|source| SimulateError::Write { path, source })
    };
    std::fs::create_dir_all(dir).map_err(|source| SimulateError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let json = serde_json::to_string_pretty(&simulation.report).expect("the report serializes");
    write("report.json", json + "\n")?;
    write("report.md", simulation.report.markdown())?;
    let panels: Vec<(&str, &Outcome)> = simulation
        .outcomes
        .iter()
        .map(|(name, outcome)| (name.as_str(), outcome))
        .collect();
    let plots = plot::svg(&panels, &simulation.report.worker);
    write("report.html", plot::html(&simulation.report, &plots))?;
    write("report.svg", plots)
}

#[cfg(test)]
mod tests;
