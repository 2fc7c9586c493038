//! What the scaler hears of the traffic beyond the queue: questions
//! arriving, the timings workers report for each answer, and the gateways'
//! cache hits. Histograms for `/metrics` (every answer since the start),
//! and a tally per console step (see [`crate::console`]).

use std::sync::Mutex;

use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use ebb_nats::Timings;

/// Bucket bounds of the answer histograms: a cache-warm first token comes
/// in tens of milliseconds, a question queued through a cold start in
/// minutes.
const ANSWER_BUCKETS: [f64; 16] = [
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// Latencies kept per console step for its percentiles; beyond, the step's
/// percentiles come from its first answers (memory stays flat under a flood).
const SAMPLES_PER_STEP: usize = 20_000;

/// What one console step heard.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    pub arrivals: u64,
    pub cache_hits: u64,
    pub answers: u64,
    /// Acceptance to first token of the step's answers, seconds.
    pub first_token_s: Vec<f64>,
    /// Acceptance to the answer's end, seconds.
    pub response_s: Vec<f64>,
}

#[derive(Debug)]
pub struct Traffic {
    queue_wait: Histogram,
    first_token: Histogram,
    inference: Histogram,
    response: Histogram,
    step: Mutex<Tally>,
}

impl Default for Traffic {
    fn default() -> Self {
        let histogram = || Histogram::new(ANSWER_BUCKETS);
        Traffic {
            queue_wait: histogram(),
            first_token: histogram(),
            inference: histogram(),
            response: histogram(),
            step: Mutex::default(),
        }
    }
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

impl Traffic {
    pub fn arrived(&self) {
        self.tally().arrivals += 1;
    }

    pub fn cache_hits(&self, hits: u64) {
        self.tally().cache_hits += hits;
    }

    /// One answer a worker generated (answers a worker found cached have
    /// no timings and are not reported).
    pub fn answered(&self, timings: &Timings) {
        let response = seconds(timings.response_ms());
        let first_token = timings.first_token_ms.map(seconds);
        self.queue_wait.observe(seconds(timings.queue_ms));
        self.inference.observe(seconds(timings.inference_ms));
        self.response.observe(response);
        if let Some(first_token) = first_token {
            self.first_token.observe(first_token);
        }
        let mut tally = self.tally();
        tally.answers += 1;
        if tally.response_s.len() < SAMPLES_PER_STEP {
            tally.response_s.push(response);
            tally.first_token_s.extend(first_token);
        }
    }

    /// What was heard since the last call.
    pub fn take_step(&self) -> Tally {
        std::mem::take(&mut *self.tally())
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.step.lock().expect("traffic lock")
    }

    pub fn register(&self, registry: &mut Registry) {
        for (name, help, histogram) in [
            (
                "ebb_worker_queue_wait",
                "Acceptance by the gateway to the start of generation, per answer workers generated",
                &self.queue_wait,
            ),
            (
                "ebb_worker_first_token",
                "Acceptance by the gateway to the first token, per answer workers generated",
                &self.first_token,
            ),
            (
                "ebb_worker_inference",
                "Prompt processing plus decoding, per answer workers generated",
                &self.inference,
            ),
            (
                "ebb_worker_response",
                "Acceptance by the gateway to the answer's end, per answer workers generated",
                &self.response,
            ),
        ] {
            registry.register_with_unit(name, help, Unit::Seconds, histogram.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timings(queue_ms: u64, inference_ms: u64, first_token_ms: Option<u64>) -> Timings {
        Timings {
            queue_ms,
            inference_ms,
            prompt_tokens: 10,
            completion_tokens: 5,
            first_token_ms,
        }
    }

    #[test]
    fn a_step_tallies_what_it_heard_and_starts_the_next_empty() {
        let traffic = Traffic::default();
        traffic.arrived();
        traffic.arrived();
        traffic.cache_hits(3);
        traffic.answered(&timings(200, 1300, Some(450)));
        traffic.answered(&timings(0, 800, None));
        let step = traffic.take_step();
        assert_eq!((step.arrivals, step.cache_hits, step.answers), (2, 3, 2));
        assert_eq!(step.response_s, vec![1.5, 0.8]);
        assert_eq!(step.first_token_s, vec![0.45]);
        assert_eq!(traffic.take_step(), Tally::default());
    }

    #[test]
    fn the_histograms_count_every_answer_under_conventional_names() {
        let traffic = Traffic::default();
        traffic.answered(&timings(200, 1300, Some(450)));
        let mut registry = Registry::default();
        traffic.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "# TYPE ebb_worker_first_token_seconds histogram",
            r#"ebb_worker_first_token_seconds_bucket{le="0.5"} 1"#,
            r#"ebb_worker_first_token_seconds_bucket{le="0.25"} 0"#,
            "ebb_worker_queue_wait_seconds_sum 0.2",
            "ebb_worker_response_seconds_sum 1.5",
            "ebb_worker_inference_seconds_count 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }
}
