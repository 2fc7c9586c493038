//! The simulated worker: what it costs, how long it takes to start, how
//! fast it answers.

use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal};
use serde::{Deserialize, Serialize};

use super::trace::Arrival;
use super::worker_profile::WorkerProfile;

/// z of the 90th percentile of the standard normal.
const Z90: f64 = 1.281_551_565_545;

/// What a worker costs and how fast it answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerModel {
    /// Median seconds from start request to ready (log-normal).
    pub cold_start_median_s: f64,
    /// 90th percentile of the cold start; equal to the median for a fixed one.
    pub cold_start_p90_s: f64,
    /// Prompt tokens per second, per question in service.
    pub prefill_tokens_per_s: f64,
    /// Answer tokens per second, per question in service; with a profile,
    /// of each question in a full batch (what [`WorkerModel::service`] and
    /// the clairvoyant reference assume).
    pub decode_tokens_per_s: f64,
    /// Questions one worker answers at once: its slots.
    pub concurrency: u32,
    /// Money per worker-hour.
    pub price_per_hour: f64,
    /// Waiting plus in-service questions beyond which new ones are rejected.
    pub queue_max: u64,
    /// Fraction of questions answered from the cache (drawn per question).
    pub cache_hit_ratio: f64,
    /// The measured engine, when `--worker-profile` gave one: then the
    /// decode rate of each question depends on how many share the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<WorkerProfile>,
}

impl WorkerModel {
    /// Seconds from service start to the first token, and to the last, at
    /// `decode_tokens_per_s` (with a profile: in a full batch).
    pub fn service(&self, arrival: &Arrival) -> (f64, f64) {
        let (_, first, total) = self.service_at(arrival, self.decode_tokens_per_s);
        (first, total)
    }

    /// Seconds from service start to the end of the prompt, the first token
    /// and the last, decoding at `tokens_per_s`.
    pub fn service_at(&self, arrival: &Arrival, tokens_per_s: f64) -> (f64, f64, f64) {
        let prefill = arrival.input_tokens as f64 / self.prefill_tokens_per_s;
        let first = prefill + 1.0 / tokens_per_s;
        let total = prefill + arrival.output_tokens.max(1) as f64 / tokens_per_s;
        (prefill, first, total)
    }

    /// Answer tokens per second of each of `active` questions on one worker.
    pub fn decode_rate(&self, active: u32) -> f64 {
        self.profile
            .as_ref()
            .map_or(self.decode_tokens_per_s, |profile| {
                profile.per_sequence(active)
            })
    }

    /// The lower bound's rate: the most answer tokens per second one worker
    /// decodes at any batch it can run.
    pub fn peak_decode_rate(&self) -> f64 {
        self.profile.as_ref().map_or(
            self.decode_tokens_per_s * f64::from(self.concurrency),
            |profile| profile.peak_aggregate(self.concurrency),
        )
    }

    /// The model in words, for the Markdown report and the plot.
    pub fn describe(&self) -> String {
        let decode = match &self.profile {
            Some(profile) => profile.describe(),
            None => format!("decode {} tok/s per question", self.decode_tokens_per_s),
        };
        format!(
            "cold start median {} s (p90 {} s), prefill {} tok/s per question, {decode}, {} slot(s) per worker, {}/worker-hour",
            self.cold_start_median_s,
            self.cold_start_p90_s,
            self.prefill_tokens_per_s,
            self.concurrency,
            self.price_per_hour
        )
    }

    pub(super) fn cold_start(&self) -> ColdStart {
        let median = self.cold_start_median_s.max(0.0);
        // p90 = median * exp(1.2816 sigma) for a log-normal.
        let sigma = (self.cold_start_p90_s / median.max(f64::MIN_POSITIVE))
            .ln()
            .max(0.0)
            / Z90;
        match LogNormal::new(median.max(f64::MIN_POSITIVE).ln(), sigma) {
            Ok(distribution) if sigma > 0.0 => ColdStart::LogNormal(distribution),
            _ => ColdStart::Fixed(median),
        }
    }

    /// Mean cold start (of the log-normal), for the clairvoyant reference.
    pub fn mean_cold_start(&self) -> f64 {
        match self.cold_start() {
            ColdStart::Fixed(seconds) => seconds,
            ColdStart::LogNormal(_) => {
                let sigma = (self.cold_start_p90_s / self.cold_start_median_s).ln() / Z90;
                self.cold_start_median_s * (sigma * sigma / 2.0).exp()
            }
        }
    }
}

pub(super) enum ColdStart {
    Fixed(f64),
    LogNormal(LogNormal<f64>),
}

impl ColdStart {
    pub(super) fn sample(&self, rng: &mut ChaCha8Rng) -> f64 {
        match self {
            ColdStart::Fixed(seconds) => *seconds,
            ColdStart::LogNormal(distribution) => distribution.sample(rng),
        }
    }
}

/// A question in service on a simulated worker, planned at the decode rate
/// its worker runs it at now. With a profile that rate changes whenever a
/// question joins or leaves the worker (processor sharing with a rate that
/// depends on how many share it), so the plan is remade from the work left
/// ([`Sequence::replan`]), and the event of the old plan goes stale.
#[derive(Debug, Clone)]
pub(super) struct Sequence {
    pub question: usize,
    /// Which of its `Done` events is current: each re-plan counts one up.
    pub plan: u32,
    pub started: f64,
    /// Seconds it waited for a worker.
    pub waited: f64,
    /// Seconds from `started` to the end of the prompt (its rate is fixed).
    pub prefill: f64,
    /// Seconds from `started` to the first token and to the answer, as
    /// planned now.
    pub first: f64,
    pub total: f64,
    /// Answer tokens in all.
    pub tokens: f64,
    /// Answer tokens per second the plan assumes.
    pub rate: f64,
}

impl Sequence {
    pub(super) fn start(
        model: &WorkerModel,
        arrival: &Arrival,
        question: usize,
        now: f64,
        rate: f64,
    ) -> Sequence {
        let (prefill, first, total) = model.service_at(arrival, rate);
        Sequence {
            question,
            plan: 0,
            started: now,
            waited: now - arrival.at,
            prefill,
            first,
            total,
            tokens: arrival.output_tokens.max(1) as f64,
            rate,
        }
    }

    /// When its current plan finishes it.
    pub(super) fn done_at(&self) -> f64 {
        self.started + self.total
    }

    /// Re-plans the work left at `now` for decoding at `rate` from now on;
    /// false when there is nothing to re-plan (same rate, or finishing now).
    pub(super) fn replan(&mut self, now: f64, rate: f64) -> bool {
        let elapsed = now - self.started;
        if rate == self.rate || elapsed >= self.total {
            return false;
        }
        if elapsed <= self.prefill {
            // Still reading the prompt: every answer token is still to come.
            self.first = self.prefill + 1.0 / rate;
            self.total = self.prefill + self.tokens / rate;
        } else {
            if elapsed < self.first {
                let to_first = (self.first - elapsed) * self.rate;
                self.first = elapsed + to_first / rate;
            }
            let left = (self.total - elapsed) * self.rate;
            self.total = elapsed + left / rate;
        }
        self.rate = rate;
        self.plan += 1;
        true
    }
}
