//! What a simulation run prints: per-policy cost and SLO figures as JSON
//! (typed, so the schema is this file) and a Markdown table; the plots and
//! the HTML page are [`crate::plot`]'s.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::engine::{Fate, Outcome, WorkerModel};
use super::trace::TraceFormat;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub trace: TraceSummary,
    pub seed: u64,
    pub worker: WorkerModel,
    pub slo: Slo,
    /// Total service work / slots per worker: no idle, no cold start (with
    /// a profile, answers at the best aggregate decode rate).
    pub lower_bound_worker_seconds: f64,
    pub policies: Vec<PolicyResult>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceSummary {
    pub file: String,
    pub format: TraceFormat,
    /// Wall-clock time of the first instant replayed (RFC 3339).
    pub start: String,
    pub duration_s: f64,
    pub questions: u64,
    /// Seconds replayed before measuring (the policy learns, nothing counts).
    pub warm_up_s: f64,
    pub mean_rate_rps: f64,
    /// Highest arrival rate over any aligned minute.
    pub peak_minute_rate_rps: f64,
    pub rate_scale: f64,
    pub time_scale: f64,
    pub arrival_cv: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    /// A question meets the SLO when its first token comes within this.
    pub first_token_s: f64,
    /// Fraction of questions that must meet it.
    pub target: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyResult {
    pub name: String,
    /// Parameters worth knowing (the fixed fleet's size, derived thresholds).
    pub detail: String,
    /// Start request to exit, cold starts and drains included.
    pub worker_seconds: f64,
    pub cost: f64,
    /// 1 - worker_seconds / fixed's; absent when `fixed` did not run.
    pub saving_vs_fixed: Option<f64>,
    /// worker_seconds / clairvoyant's; absent when `clairvoyant` did not run.
    pub vs_clairvoyant: Option<f64>,
    /// lower_bound_worker_seconds / worker_seconds.
    pub utilization: f64,
    pub answered: u64,
    pub cached: u64,
    pub rejected: u64,
    /// Fraction of all questions (rejected ones count as missed) whose
    /// first token came within the SLO.
    pub slo_attainment: f64,
    /// Seconds from arrival to the first token (cache hits: 0).
    pub first_token_s: Percentiles,
    /// Seconds from arrival to the whole answer.
    pub total_s: Percentiles,
    pub cold_starts: u64,
    pub scale_events: u64,
}

fn round(value: f64, decimals: i32) -> f64 {
    let factor = 10f64.powi(decimals);
    (value * factor).round() / factor
}

fn percentiles(mut values: Vec<f32>) -> Percentiles {
    values.sort_by(f32::total_cmp);
    let at = |quantile: f64| {
        ebb_runtime::quantile::nearest_rank(&values, quantile).map_or(0.0, |v| round(v as f64, 3))
    };
    Percentiles {
        p50: at(0.5),
        p95: at(0.95),
        p99: at(0.99),
    }
}

impl PolicyResult {
    /// Figures of one replay; comparisons are filled in by [`Report::compare`].
    pub fn new(
        name: &str,
        detail: String,
        outcome: &Outcome,
        model: &WorkerModel,
        slo: &Slo,
        lower_bound: f64,
    ) -> PolicyResult {
        let (mut answered, mut cached, mut rejected, mut met) = (0, 0, 0, 0);
        let mut first_tokens = Vec::with_capacity(outcome.fates.len());
        let mut totals = Vec::with_capacity(outcome.fates.len());
        let measured = &outcome.fates[outcome.first_measured..];
        for fate in measured {
            match *fate {
                Fate::Answered { first_token, total } => {
                    answered += 1;
                    met += u64::from(first_token as f64 <= slo.first_token_s);
                    first_tokens.push(first_token);
                    totals.push(total);
                }
                Fate::Cached => {
                    cached += 1;
                    met += 1;
                    first_tokens.push(0.0);
                    totals.push(0.0);
                }
                Fate::Rejected => rejected += 1,
            }
        }
        let questions = measured.len().max(1) as f64;
        PolicyResult {
            name: name.to_owned(),
            detail,
            worker_seconds: round(outcome.worker_seconds, 1),
            cost: round(outcome.worker_seconds / 3600.0 * model.price_per_hour, 2),
            saving_vs_fixed: None,
            vs_clairvoyant: None,
            utilization: round(lower_bound / outcome.worker_seconds.max(1e-9), 4),
            answered,
            cached,
            rejected,
            slo_attainment: round(met as f64 / questions, 6),
            first_token_s: percentiles(first_tokens),
            total_s: percentiles(totals),
            cold_starts: outcome.cold_starts,
            scale_events: outcome.scale_events,
        }
    }
}

impl Report {
    /// Fills in each policy's saving against `fixed` and ratio to `clairvoyant`.
    pub fn compare(&mut self) {
        let seconds_of = |name: &str| {
            self.policies
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.worker_seconds)
        };
        let (fixed, clairvoyant) = (seconds_of("fixed"), seconds_of("clairvoyant"));
        for policy in &mut self.policies {
            policy.saving_vs_fixed =
                fixed.map(|fixed| round(1.0 - policy.worker_seconds / fixed.max(1e-9), 4));
            policy.vs_clairvoyant =
                clairvoyant.map(|best| round(policy.worker_seconds / best.max(1e-9), 3));
        }
    }

    /// The per-policy table, as the Markdown and the HTML report show it.
    pub fn table(&self) -> ([&'static str; 12], Vec<[String; 12]>) {
        let header = [
            "policy",
            "worker-hours",
            "cost",
            "saving vs fixed",
            "x clairvoyant",
            "utilization",
            "SLO met",
            "first token p50 / p95 / p99 (s)",
            "answer p99 (s)",
            "rejected",
            "cold starts",
            "scale events",
        ];
        let optional = |value: Option<f64>, percent: bool| match value {
            Some(v) if percent => format!("{:.1}%", v * 100.0),
            Some(v) => format!("{v:.2}"),
            None => "-".to_owned(),
        };
        let rows = self
            .policies
            .iter()
            .map(|p| {
                [
                    p.name.clone(),
                    format!("{:.1}", p.worker_seconds / 3600.0),
                    format!("{:.2}", p.cost),
                    optional(p.saving_vs_fixed, true),
                    optional(p.vs_clairvoyant, false),
                    format!("{:.1}%", p.utilization * 100.0),
                    format!("{:.3}%", p.slo_attainment * 100.0),
                    format!(
                        "{:.2} / {:.2} / {:.2}",
                        p.first_token_s.p50, p.first_token_s.p95, p.first_token_s.p99
                    ),
                    format!("{:.1}", p.total_s.p99),
                    p.rejected.to_string(),
                    p.cold_starts.to_string(),
                    p.scale_events.to_string(),
                ]
            })
            .collect();
        (header, rows)
    }

    /// What was replayed and against what: two sentences.
    pub fn summary(&self) -> [String; 2] {
        let trace = &self.trace;
        [
            format!(
                "Trace `{}` ({:?}): {} questions measured over {:.1} h from {} after a {:.1} h warm-up, mean {:.2}/s, peak minute {:.2}/s; rate x{}, time x{}, arrival cv {}, seed {}.",
                trace.file,
                trace.format,
                trace.questions,
                (trace.duration_s - trace.warm_up_s) / 3600.0,
                trace.start,
                trace.warm_up_s / 3600.0,
                trace.mean_rate_rps,
                trace.peak_minute_rate_rps,
                trace.rate_scale,
                trace.time_scale,
                trace.arrival_cv,
                self.seed
            ),
            format!(
                "Worker: {}. SLO: first token <= {} s for {}% of questions. Lower bound: {:.1} worker-hours.",
                self.worker.describe(),
                self.slo.first_token_s,
                self.slo.target * 100.0,
                self.lower_bound_worker_seconds / 3600.0
            ),
        ]
    }

    pub fn markdown(&self) -> String {
        let [trace, worker] = self.summary();
        let mut out = format!("{trace}\n{worker}\n\n");
        let (header, rows) = self.table();
        let _ = writeln!(out, "| {} |", header.join(" | "));
        let _ = writeln!(out, "|---|{}", "---:|".repeat(header.len() - 1));
        for row in rows {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        out.push('\n');
        for p in &self.policies {
            let _ = writeln!(out, "- `{}`: {}", p.name, p.detail);
        }
        out
    }
}
