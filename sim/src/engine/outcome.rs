//! What a replay measured ([`Outcome`]): each question's fate, worker
//! time, and the plot's samples, which the engine takes as it goes.

use super::{PLOT_BUCKETS, Sim};

/// One question's fate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fate {
    /// Seconds to the first token and to the whole answer.
    Answered {
        first_token: f32,
        total: f32,
    },
    Cached,
    Rejected,
}

/// A point of the plot: the maxima over one bucket of time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    pub arrivals: u32,
    pub lag: u64,
    pub workers: u32,
}

/// Everything a replay measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Per arrival, in trace order.
    pub fates: Vec<Fate>,
    /// The first arrival measured (the warm-up's are not).
    pub first_measured: usize,
    /// Start request to exit, summed over workers, from the measurement's
    /// start up to `horizon`.
    pub worker_seconds: f64,
    /// Worker starts after the warm-up.
    pub cold_starts: u64,
    /// Changes of the desired count after the warm-up.
    pub scale_events: u64,
    /// Seconds replayed: the trace, or the last answer if later.
    pub horizon: f64,
    pub bucket_seconds: f64,
    pub samples: Vec<Sample>,
}

impl Sim<'_> {
    pub(super) fn bucket_index(&self, at: f64) -> usize {
        ((at / self.bucket_seconds) as usize).min(PLOT_BUCKETS)
    }

    pub(super) fn bucket(&mut self) -> &mut Sample {
        let index = self.bucket_index(self.now);
        &mut self.samples[index]
    }

    /// Buckets since the last sample held its state until now.
    pub(super) fn carry_to(&mut self, index: usize) {
        let (last, state) = self.sampled;
        for bucket in &mut self.samples[(last + 1).min(index)..=index] {
            bucket.lag = bucket.lag.max(state.lag);
            bucket.workers = bucket.workers.max(state.workers);
        }
    }

    pub(super) fn sample(&mut self) {
        let index = self.bucket_index(self.now);
        self.carry_to(index);
        let state = Sample {
            arrivals: 0,
            lag: self.waiting() + self.in_service(),
            workers: self
                .alive
                .iter()
                .filter(|&&i| self.workers[i].exited_at.is_none())
                .count() as u32,
        };
        let bucket = &mut self.samples[index];
        bucket.lag = bucket.lag.max(state.lag);
        bucket.workers = bucket.workers.max(state.workers);
        self.sampled = (index, state);
    }

    pub(super) fn finish(mut self) -> Outcome {
        let horizon = self.now;
        self.carry_to(self.bucket_index(horizon));
        let worker_seconds = self
            .workers
            .iter()
            .map(|w| (w.requested_at, w.exited_at.unwrap_or(horizon)))
            .map(|(from, to)| measured_seconds(from, to, self.measure_from, horizon))
            .sum();
        let buckets = ((horizon / self.bucket_seconds).ceil() as usize).clamp(1, PLOT_BUCKETS + 1);
        let mut samples = self.samples;
        samples.truncate(buckets);
        Outcome {
            fates: self
                .fates
                .into_iter()
                .map(|fate| fate.expect("every arrival is answered, cached or rejected"))
                .collect(),
            first_measured: self
                .trace
                .arrivals
                .partition_point(|a| a.at < self.measure_from),
            worker_seconds,
            cold_starts: self.started,
            scale_events: self.scale_events,
            horizon,
            bucket_seconds: self.bucket_seconds,
            samples,
        }
    }
}

/// The part of `[from, to)` inside `[measure_from, horizon)`, in seconds.
pub fn measured_seconds(from: f64, to: f64, measure_from: f64, horizon: f64) -> f64 {
    (to.min(horizon) - from.max(measure_from)).max(0.0)
}
