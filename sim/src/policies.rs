//! The policies compared: ebb's own [`decide`] (with ebb's config, or the
//! seed article's rules), a fixed fleet, and models of KEDA and Knative built
//! from their published defaults.

use std::collections::VecDeque;
use std::time::Duration;

use chrono::{DateTime, Utc};

use ebb_control::config::ScalerConfig;
use ebb_control::controller::{Autoscaler, EbbPolicy, Verdict};
use ebb_control::policy::{Observation, Policy, PolicyState};

/// ebb's own policy, as live, continuing from `initial_workers`.
pub fn ebb(config: ScalerConfig, initial_workers: u32) -> EbbPolicy {
    EbbPolicy {
        policy: Policy::new(config),
        state: PolicyState {
            desired: initial_workers,
            ..PolicyState::default()
        },
    }
}

/// The seed article's config, in ebb's rules syntax. Its thresholds were
/// set for a service of short answers, so two are restated in this
/// service's units (documented in README):
/// - `rps > 50` with at most 10 workers reads as "arrivals above half the
///   full fleet's throughput": 5 x one worker's throughput here;
/// - `avg response > 1.5 s` reads as "answers 1.5 s slower than the service
///   time": 1.5 s + the mean service time here.
pub fn seed_rules_config(worker_throughput: f64, mean_service_s: f64) -> String {
    let rps = 5.0 * worker_throughput;
    let response = 1.5 + mean_service_s;
    format!(
        "tick: 1s
resources: {{min_instances: 1, max_instances: 10}}
rules:
  scale_up:
    - {{metric: request_per_second, threshold: {rps}, duration: 120s}}
    - {{metric: avg_response_time, threshold: {response}, duration: 120s}}
  scale_down:
    - {{metric: worker_utilization, threshold: 0.3, duration: 300s}}
cooldowns: {{scale_down_stabilization: 0s, scale_to_zero_idle: 300s}}
backend: {{kind: process}}
"
    )
}

/// Always the same number of workers.
#[derive(Debug)]
pub struct Fixed(pub u32);

impl Autoscaler for Fixed {
    fn decide(&mut self, _: &Observation, _: DateTime<Utc>) -> Verdict {
        Verdict::of("fixed", self.0, Duration::from_secs(3600))
    }

    fn wakes_on_arrival(&self) -> bool {
        false
    }
}

/// KEDA's NATS JetStream scaler driving a Kubernetes HPA, with published
/// defaults: `lagThreshold` 10, `activationLagThreshold` 0, polling every
/// 30 s (it alone moves 0 <-> 1), `cooldownPeriod` 300 s; the HPA syncs
/// every 15 s with `desired = ceil(lag / lagThreshold)`, a 10 % tolerance,
/// scale-up limited to max(+100 %, +4 pods) per sync and a 300 s scale-down
/// stabilization window (the highest recommendation in it wins).
#[derive(Debug)]
pub struct KedaLike {
    max: u32,
    replicas: u32,
    elapsed_polls: u64,
    last_active: Option<DateTime<Utc>>,
    recommendations: VecDeque<(DateTime<Utc>, u32)>,
}

impl KedaLike {
    pub const LAG_THRESHOLD: f64 = 10.0;
    pub const POLLING: Duration = Duration::from_secs(30);
    pub const HPA_SYNC: Duration = Duration::from_secs(15);
    pub const COOLDOWN: Duration = Duration::from_secs(300);
    pub const STABILIZATION: Duration = Duration::from_secs(300);
    const TOLERANCE: f64 = 0.1;

    pub fn new(max: u32, initial: u32) -> KedaLike {
        KedaLike {
            max,
            replicas: initial,
            elapsed_polls: 0,
            last_active: None,
            recommendations: VecDeque::new(),
        }
    }

    /// The HPA's answer for the current lag, before its behaviour limits.
    pub fn hpa_recommendation(current: u32, lag: u64) -> u32 {
        let ratio = lag as f64 / (Self::LAG_THRESHOLD * current.max(1) as f64);
        if (ratio - 1.0).abs() <= Self::TOLERANCE {
            current
        } else {
            (lag as f64 / Self::LAG_THRESHOLD).ceil() as u32
        }
    }
}

impl Autoscaler for KedaLike {
    fn decide(&mut self, observation: &Observation, now: DateTime<Utc>) -> Verdict {
        let (desired, next_wake) = self.count(observation, now);
        Verdict::of("keda-like", desired, next_wake)
    }

    fn wakes_on_arrival(&self) -> bool {
        false
    }
}

impl KedaLike {
    /// Replicas wanted now, and when to be asked again.
    fn count(&mut self, observation: &Observation, now: DateTime<Utc>) -> (u32, Duration) {
        let active = observation.lag > 0;
        if active {
            self.last_active = Some(now);
        }
        // Every other 15 s sync is also a 30 s KEDA poll.
        let keda_poll = self.elapsed_polls.is_multiple_of(2);
        self.elapsed_polls += 1;
        if self.replicas == 0 {
            if keda_poll && active {
                self.replicas = 1;
                self.last_active = Some(now);
            }
            return (self.replicas, Self::HPA_SYNC);
        }
        let idle_long = self
            .last_active
            .is_none_or(|at| (now - at).to_std().unwrap_or_default() >= Self::COOLDOWN);
        if keda_poll && !active && idle_long {
            self.replicas = 0;
            self.recommendations.clear();
            return (0, Self::HPA_SYNC);
        }
        let recommendation = Self::hpa_recommendation(self.replicas, observation.lag).max(1);
        self.recommendations.push_back((now, recommendation));
        while self
            .recommendations
            .front()
            .is_some_and(|(at, _)| (now - *at).to_std().unwrap_or_default() > Self::STABILIZATION)
        {
            self.recommendations.pop_front();
        }
        let stabilized = self
            .recommendations
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(recommendation);
        let up_limit = (self.replicas * 2).max(self.replicas + 4);
        self.replicas = if stabilized > self.replicas {
            stabilized.min(up_limit)
        } else {
            stabilized
        }
        .clamp(1, self.max);
        (self.replicas, Self::HPA_SYNC)
    }
}

/// Knative's KPA with published defaults: a 2 s tick, requests in flight
/// (queued ones included: the activator holds them) averaged over a 60 s
/// stable and a 6 s panic window, a target of 70 % of the container
/// concurrency per pod, panic when the panic window wants 200 % of the ready
/// pods (then never down until 60 s pass without panic), scale-down at most
/// halving per tick, zero after a stable window without traffic plus a 30 s
/// grace period. The activator asks at once when a request meets zero pods.
#[derive(Debug)]
pub struct KnativeLike {
    max: u32,
    target_per_pod: f64,
    desired: u32,
    samples: VecDeque<(DateTime<Utc>, u64)>,
    panic_since: Option<DateTime<Utc>>,
    last_traffic: Option<DateTime<Utc>>,
}

impl KnativeLike {
    pub const TICK: Duration = Duration::from_secs(2);
    pub const STABLE_WINDOW: Duration = Duration::from_secs(60);
    pub const PANIC_WINDOW: Duration = Duration::from_secs(6);
    pub const PANIC_THRESHOLD: f64 = 2.0;
    pub const TARGET_UTILIZATION: f64 = 0.7;
    pub const SCALE_TO_ZERO_GRACE: Duration = Duration::from_secs(30);
    const MAX_SCALE_DOWN_RATE: f64 = 2.0;

    pub fn new(max: u32, concurrency: u32, initial: u32) -> KnativeLike {
        KnativeLike {
            max,
            target_per_pod: concurrency as f64 * Self::TARGET_UTILIZATION,
            desired: initial,
            samples: VecDeque::new(),
            panic_since: None,
            last_traffic: None,
        }
    }

    fn average(&self, now: DateTime<Utc>, window: Duration) -> f64 {
        let (sum, count) = self
            .samples
            .iter()
            .filter(|(at, _)| (now - *at).to_std().unwrap_or_default() < window)
            .fold((0, 0), |(sum, count), (_, value)| (sum + value, count + 1));
        if count == 0 {
            0.0
        } else {
            sum as f64 / count as f64
        }
    }
}

impl Autoscaler for KnativeLike {
    fn decide(&mut self, observation: &Observation, now: DateTime<Utc>) -> Verdict {
        let (desired, next_wake) = self.count(observation, now);
        Verdict::of("knative-like", desired, next_wake)
    }

    fn wakes_on_arrival(&self) -> bool {
        true
    }
}

impl KnativeLike {
    /// Replicas wanted now, and when to be asked again.
    fn count(&mut self, observation: &Observation, now: DateTime<Utc>) -> (u32, Duration) {
        let in_flight = observation.lag;
        self.samples.push_back((now, in_flight));
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| (now - *at).to_std().unwrap_or_default() >= Self::STABLE_WINDOW)
        {
            self.samples.pop_front();
        }
        if in_flight > 0 || observation.new_arrivals > 0 {
            self.last_traffic = Some(now);
        }
        let want = |average: f64| (average / self.target_per_pod).ceil() as u32;
        let stable = want(self.average(now, Self::STABLE_WINDOW));
        let panic = want(self.average(now, Self::PANIC_WINDOW));
        let ready = observation.workers.ready().max(1) as f64;
        if panic as f64 / ready >= Self::PANIC_THRESHOLD {
            self.panic_since = Some(now);
        } else if self
            .panic_since
            .is_some_and(|at| (now - at).to_std().unwrap_or_default() >= Self::STABLE_WINDOW)
        {
            self.panic_since = None;
        }
        let mut desired = if self.panic_since.is_some() {
            panic.max(stable).max(self.desired)
        } else {
            stable.max((self.desired as f64 / Self::MAX_SCALE_DOWN_RATE).floor() as u32)
        };
        let quiet_for = self
            .last_traffic
            .map_or(Duration::MAX, |at| (now - at).to_std().unwrap_or_default());
        if desired == 0 && in_flight == 0 && self.desired > 0 {
            // Zero only after a whole quiet stable window plus the grace period.
            if quiet_for < Self::STABLE_WINDOW + Self::SCALE_TO_ZERO_GRACE {
                desired = 1;
            }
        } else if in_flight > 0 {
            desired = desired.max(1);
        }
        self.desired = desired.min(self.max);
        (self.desired, Self::TICK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use ebb_control::policy::WorkerCounts;

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, 0, 0, 0).unwrap() + chrono::Duration::seconds(seconds)
    }

    fn lag(lag: u64, ready: u32) -> Observation {
        Observation {
            lag,
            workers: WorkerCounts {
                idle: ready,
                ..WorkerCounts::default()
            },
            ..Observation::default()
        }
    }

    #[test]
    fn hpa_formula_is_ceil_lag_over_threshold_with_tolerance() {
        assert_eq!(KedaLike::hpa_recommendation(1, 35), 4);
        assert_eq!(KedaLike::hpa_recommendation(4, 41), 4, "within 10 %");
        assert_eq!(KedaLike::hpa_recommendation(4, 45), 5);
        assert_eq!(KedaLike::hpa_recommendation(4, 0), 0);
    }

    #[test]
    fn keda_activates_on_its_poll_limits_growth_and_stabilizes_down() {
        let mut keda = KedaLike::new(50, 0);
        // Poll at t=0 sees nothing; the next sync is not a poll.
        assert_eq!(keda.count(&lag(0, 0), at(0)).0, 0);
        assert_eq!(
            keda.count(&lag(300, 0), at(15)).0,
            0,
            "waits for the 30 s poll"
        );
        assert_eq!(keda.count(&lag(300, 0), at(30)).0, 1);
        // 300 lag wants 30: +4 at a time from 1, then doubling.
        assert_eq!(keda.count(&lag(300, 1), at(45)).0, 5);
        assert_eq!(keda.count(&lag(300, 5), at(60)).0, 10);
        assert_eq!(keda.count(&lag(300, 10), at(75)).0, 20);
        assert_eq!(keda.count(&lag(300, 20), at(90)).0, 30);
        // Lag gone: the highest recommendation of the last 300 s holds.
        assert_eq!(keda.count(&lag(1, 30), at(105)).0, 30);
        assert_eq!(keda.count(&lag(1, 30), at(390)).0, 30);
        assert_eq!(keda.count(&lag(1, 30), at(405)).0, 1, "after 300 s");
        // Cooldown: to zero only on a poll 300 s after the last activity.
        assert_eq!(keda.count(&lag(0, 1), at(420)).0, 1);
        assert_eq!(keda.count(&lag(0, 1), at(690)).0, 1);
        let mut t = 705;
        while keda.count(&lag(0, 1), at(t)).0 != 0 {
            t += 15;
            assert!(t < 800, "scales to zero after the cooldown");
        }
        assert!(t >= 705);
    }

    #[test]
    fn knative_panics_on_a_burst_and_scales_to_zero_after_grace() {
        let mut kpa = KnativeLike::new(100, 1, 1);
        // 1 in flight per tick: target 0.7 per pod -> 2 pods.
        let mut now = 0;
        for _ in 0..30 {
            kpa.count(&lag(1, 1), at(now));
            now += 2;
        }
        assert_eq!(kpa.desired, 2);
        // A burst of 20 in flight.
        // The panic window's 3 samples average 22/3: ceil(7.33 / 0.7) = 11 >= 2 x 2 ready.
        assert_eq!(kpa.count(&lag(20, 2), at(now)).0, 11);
        now += 2;
        let (burst, _) = kpa.count(&lag(20, 2), at(now));
        assert!(burst >= 19, "{burst}");
        assert!(kpa.panic_since.is_some());
        // Traffic stops: panic holds the count for 60 s, then halving steps.
        now += 2;
        assert_eq!(kpa.count(&lag(0, burst), at(now)).0, burst);
        while kpa.desired > 1 {
            now += 2;
            kpa.count(&lag(0, kpa.desired), at(now));
            assert!(now < 400);
        }
        let last_traffic = kpa.last_traffic.unwrap();
        while kpa.desired > 0 {
            now += 2;
            kpa.count(&lag(0, 1), at(now));
        }
        let quiet = (at(now) - last_traffic).num_seconds();
        assert!(
            (90..=92).contains(&quiet),
            "zero after 60 s + 30 s grace, got {quiet}"
        );
    }
}
