//! The simulated worker: what it costs, how long it takes to start, how
//! fast it answers.

use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal};
use serde::{Deserialize, Serialize};

use super::trace::Arrival;

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
    /// Answer tokens per second, per question in service.
    pub decode_tokens_per_s: f64,
    /// Questions one worker answers at once.
    pub concurrency: u32,
    /// Money per worker-hour.
    pub price_per_hour: f64,
    /// Waiting plus in-service questions beyond which new ones are rejected.
    pub queue_max: u64,
    /// Fraction of questions answered from the cache (drawn per question).
    pub cache_hit_ratio: f64,
}

impl WorkerModel {
    /// Seconds from service start to the first token, and to the last.
    pub fn service(&self, arrival: &Arrival) -> (f64, f64) {
        let prefill = arrival.input_tokens as f64 / self.prefill_tokens_per_s;
        let first = prefill + 1.0 / self.decode_tokens_per_s;
        let total = prefill + arrival.output_tokens.max(1) as f64 / self.decode_tokens_per_s;
        (first, total)
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
