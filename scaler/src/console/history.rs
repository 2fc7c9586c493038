//! The console's memory: one [`Sample`] per step in a bounded ring (24 h
//! of them), so memory stays flat however long the scaler runs. It lives
//! in the scaler's memory: a page reload keeps it, a scaler restart starts
//! it afresh.

use std::collections::VecDeque;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::scaler::Status;
use crate::traffic::Tally;
use ebb_nats::Priority;

/// How far back the console remembers.
pub const KEPT: Duration = Duration::from_secs(24 * 3600);

/// The 50th and 99th percentiles of one step's answers, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
}

impl Percentiles {
    fn of(mut seconds: Vec<f64>) -> Option<Percentiles> {
        seconds.sort_by(f64::total_cmp);
        let at = |q| ebb_runtime::quantile::nearest_rank(&seconds, q);
        Some(Percentiles {
            p50: at(0.5)?,
            p99: at(0.99)?,
        })
    }
}

/// What one step looked like.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    pub at: DateTime<Utc>,
    /// Questions waiting or being answered, by priority (in
    /// [`Priority::ALL`]'s order: high, normal, low).
    pub lag: [u64; 3],
    pub oldest_waiting_s: f64,
    /// Workers by condition: starting, idle, busy, draining, unhealthy.
    pub workers: [u32; 5],
    pub desired: u32,
    pub slots: u32,
    pub slots_in_use: u32,
    pub arrivals_per_s: f64,
    pub cache_hits_per_s: f64,
    pub answers_per_s: f64,
    pub first_token: Option<Percentiles>,
    pub response: Option<Percentiles>,
}

impl Sample {
    /// The loop's last status and what was heard during the step.
    pub fn new(at: DateTime<Utc>, status: &Status, tally: Tally, step: Duration) -> Sample {
        let lag = Priority::ALL.map(|priority| {
            status
                .lag_by_priority
                .iter()
                .find(|depth| depth.priority == priority)
                .map_or(0, |depth| depth.lag())
        });
        let workers = status.actual;
        let per_second = |count: u64| count as f64 / step.as_secs_f64().max(1e-3);
        Sample {
            at,
            lag,
            oldest_waiting_s: status.signals.oldest_waiting.as_secs_f64(),
            workers: [
                workers.starting,
                workers.idle,
                workers.busy,
                workers.draining,
                workers.unhealthy,
            ],
            desired: status.desired,
            slots: workers.slots,
            slots_in_use: workers.active_slots,
            arrivals_per_s: per_second(tally.arrivals),
            cache_hits_per_s: per_second(tally.cache_hits),
            answers_per_s: per_second(tally.answers),
            first_token: Percentiles::of(tally.first_token_s),
            response: Percentiles::of(tally.response_s),
        }
    }

    /// Workers that cost money: every one the pool has, starting or not.
    pub fn running(&self) -> u32 {
        self.workers.iter().sum()
    }
}

/// The ring of samples, oldest first.
#[derive(Debug, Clone)]
pub struct History {
    step: Duration,
    samples: VecDeque<Sample>,
}

impl History {
    pub fn new(step: Duration) -> History {
        History {
            step,
            samples: VecDeque::with_capacity(Self::capacity(step)),
        }
    }

    fn capacity(step: Duration) -> usize {
        (KEPT.as_secs_f64() / step.as_secs_f64().max(1.0)).ceil() as usize
    }

    pub fn step(&self) -> Duration {
        self.step
    }

    pub fn push(&mut self, sample: Sample) {
        if self.samples.len() == Self::capacity(self.step) {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// The samples taken after `since`, oldest first.
    pub fn since(&self, since: DateTime<Utc>) -> Vec<Sample> {
        let first = self.samples.partition_point(|sample| sample.at <= since);
        self.samples.range(first..).cloned().collect()
    }
}

/// Worker-hours since a time, and what a fixed fleet would have taken.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cost {
    /// The start of what is counted: midnight UTC, or the first sample
    /// after it when the scaler started later.
    pub since: DateTime<Utc>,
    pub worker_hours: f64,
    /// The day's peak of workers, the fleet it would take without scaling.
    pub fixed_workers: u32,
    pub fixed_worker_hours: f64,
}

impl Cost {
    /// Today's samples (UTC), each counted for one step.
    pub fn today(samples: &[Sample], step: Duration, now: DateTime<Utc>) -> Option<Cost> {
        let midnight = now.date_naive().and_hms_opt(0, 0, 0)?.and_utc();
        let today: Vec<&Sample> = samples.iter().filter(|s| s.at >= midnight).collect();
        let first = today.first()?;
        let step_hours = step.as_secs_f64() / 3600.0;
        let since = (first.at - chrono::Duration::from_std(step).ok()?).max(midnight);
        let fixed_workers = today.iter().map(|s| s.running()).max().unwrap_or(0);
        let hours = (now - since).num_milliseconds() as f64 / 3_600_000.0;
        Some(Cost {
            since,
            worker_hours: today
                .iter()
                .map(|s| f64::from(s.running()) * step_hours)
                .sum(),
            fixed_workers,
            fixed_worker_hours: f64::from(fixed_workers) * hours,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn sample(at: DateTime<Utc>, running: u32) -> Sample {
        let mut status = Status::default();
        status.actual.busy = running;
        Sample::new(at, &status, Tally::default(), Duration::from_secs(10))
    }

    #[test]
    fn the_ring_keeps_a_day_and_drops_the_oldest() {
        let step = Duration::from_secs(60);
        let mut history = History::new(step);
        let start = Utc.with_ymd_and_hms(2026, 12, 4, 0, 0, 0).unwrap();
        for minute in 0..(24 * 60 + 5) {
            history.push(sample(start + chrono::Duration::minutes(minute), 1));
        }
        assert_eq!(history.samples.len(), 24 * 60);
        assert_eq!(
            history.samples.front().unwrap().at,
            start + chrono::Duration::minutes(5)
        );
        let last_hour = history.since(start + chrono::Duration::minutes(24 * 60 + 4 - 60));
        assert_eq!(last_hour.len(), 60);
    }

    #[test]
    fn a_step_becomes_rates_and_percentiles() {
        let mut status = Status::default();
        status.actual.starting = 1;
        status.actual.busy = 2;
        status.desired = 4;
        status.lag_by_priority = vec![ebb_nats::PriorityDepth {
            priority: Priority::Low,
            pending: 7,
            ack_pending: 2,
            oldest_waiting: Duration::ZERO,
        }];
        let tally = Tally {
            arrivals: 50,
            cache_hits: 20,
            answers: 3,
            first_token_s: vec![0.4, 0.2, 3.0],
            response_s: vec![1.0, 2.0, 9.0],
        };
        let at = Utc::now();
        let sample = Sample::new(at, &status, tally, Duration::from_secs(10));
        assert_eq!(sample.lag, [0, 0, 9]);
        assert_eq!(sample.workers, [1, 0, 2, 0, 0]);
        assert_eq!(sample.running(), 3);
        assert_eq!((sample.arrivals_per_s, sample.cache_hits_per_s), (5.0, 2.0));
        assert_eq!(sample.first_token, Some(Percentiles { p50: 0.4, p99: 3.0 }));
        assert_eq!(sample.response.unwrap().p50, 2.0);
        let quiet = Sample::new(at, &status, Tally::default(), Duration::from_secs(10));
        assert_eq!(quiet.response, None, "no answers, no percentiles");
    }

    #[test]
    fn todays_cost_counts_worker_steps_and_the_peak_held_all_day() {
        let step = Duration::from_secs(3600);
        let midnight = Utc.with_ymd_and_hms(2026, 12, 4, 0, 0, 0).unwrap();
        let hour = |h| midnight + chrono::Duration::hours(h);
        // Yesterday's sample is not today's cost.
        let samples = [
            sample(hour(-1), 9),
            sample(hour(1), 0),
            sample(hour(2), 3),
            sample(hour(3), 1),
            sample(hour(4), 0),
        ];
        let cost = Cost::today(&samples, step, hour(4)).unwrap();
        assert_eq!(cost.since, midnight);
        assert_eq!(cost.worker_hours, 4.0);
        assert_eq!(cost.fixed_workers, 3);
        assert_eq!(cost.fixed_worker_hours, 12.0);
        // A scaler started at 02:30 counts from its first step.
        let late = [sample(hour(3), 2), sample(hour(4), 2)];
        let cost = Cost::today(&late, step, hour(4)).unwrap();
        assert_eq!(cost.since, hour(2));
        assert_eq!(cost.fixed_worker_hours, 4.0);
        assert_eq!(Cost::today(&[], step, hour(4)), None);
    }
}
