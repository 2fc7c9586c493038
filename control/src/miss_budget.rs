//! Whether the last worker may go. Scaling to zero costs late questions:
//! the first question after it waits a whole cold start, and so does every
//! question arriving before the new worker is ready. When the cold start
//! is longer than the wait goal (half `target.latency_goal`, the wait
//! `target.attainment` plans for), that is a budgeted decision.
//!
//! The SLO allows `(1 - attainment) x questions` late questions over the
//! budget window (`target.miss_budget_window`). What the wake-ups from zero
//! in that window already made late is spent; the rest must cover the next
//! wake-up's expected late questions, `1 + rate x (cold start p90 - wait
//! goal)` (the first one, plus those arriving while it still waits past the
//! goal, at the window's mean arrival rate). If it can, zero is allowed;
//! otherwise the floor stays at one.
//!
//! Counts are kept in [`BUCKETS`] slices of the window, so the state is
//! bounded whatever the window and the traffic.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::ScalerConfig;
use crate::policy::Observation;

/// Slices of the budget window the counts are kept in.
pub const BUCKETS: u32 = 48;
/// Cold start assumed before one is measured or `prewarm_lead` is set: the
/// same default the pre-warm lead uses.
const ASSUMED_COLD_START: Duration = Duration::from_secs(60);

/// `scale_to_zero:` in the config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleToZero {
    /// Only while the miss budget pays for the next wake-up's late questions.
    #[default]
    Budgeted,
    /// Whenever the idle window has passed (the late questions are accepted).
    Always,
    /// Never: once woken, one worker stays (`min_instances` 0 still lets the
    /// scaler start with none).
    Never,
}

/// Questions and the late first questions of wake-ups in one slice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Bucket {
    start: DateTime<Utc>,
    questions: u64,
    late: u64,
}

/// A wake-up from zero not yet served by a ready worker: questions that
/// arrive before `late_until` wait past the goal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Wake {
    at: DateTime<Utc>,
    late_until: DateTime<Utc>,
}

/// The counts the rule reads, kept in the policy state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MissBudget {
    buckets: VecDeque<Bucket>,
    waking: Option<Wake>,
}

/// What the rule read when it decided, for the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetReading {
    /// Questions in the budget window.
    pub questions: u64,
    pub attainment: f64,
    pub window: Duration,
    /// Late first questions of the window's wake-ups from zero.
    pub spent: u64,
    /// Expected late questions of the next wake-up.
    pub cost: f64,
    pub cold_start: Duration,
    pub wait_goal: Duration,
}

impl BudgetReading {
    /// Late questions the SLO allows over the window.
    pub fn allowed(&self) -> f64 {
        (1.0 - self.attainment) * self.questions as f64
    }

    /// What is left after the wake-ups already paid.
    pub fn left(&self) -> f64 {
        self.allowed() - self.spent as f64
    }

    /// A wake-up within the goal costs nothing; no attainment goal
    /// (`attainment: 0`) accepts any miss.
    pub fn pays(&self) -> bool {
        self.cost == 0.0 || self.attainment == 0.0 || self.left() >= self.cost
    }
}

/// The cold start a wake-up waits: measured, else the configured lead.
fn cold_start(observation: &Observation, config: &ScalerConfig) -> Duration {
    observation
        .cold_start_p90
        .or(config.prewarm_lead)
        .unwrap_or(ASSUMED_COLD_START)
}

/// The wait `attainment` plans for: half the latency goal.
fn wait_goal(config: &ScalerConfig) -> Duration {
    config.target.latency_goal / 2
}

impl MissBudget {
    /// Counts one decision's arrivals, and the late ones of a wake-up from
    /// zero: it begins when questions come while none was wanted and none
    /// is ready, and ends when a worker is ready.
    pub fn observe(
        &mut self,
        observation: &Observation,
        was_desired: u32,
        config: &ScalerConfig,
        now: DateTime<Utc>,
    ) {
        let window = config.target.miss_budget_window;
        self.prune(window, now);
        let asked = observation.lag > 0 || observation.new_arrivals > 0;
        let lateness = cold_start(observation, config).saturating_sub(wait_goal(config));
        let mut late = 0;
        if observation.workers.ready() > 0 {
            self.waking = None;
        } else if let Some(wake) = &self.waking {
            if now < wake.late_until {
                late = observation.new_arrivals;
            }
        } else if was_desired == 0 && asked && !lateness.is_zero() {
            let late_until = now + chrono::Duration::from_std(lateness).unwrap_or_default();
            self.waking = Some(Wake {
                at: now,
                late_until,
            });
            // Everything queued at zero waits the whole cold start.
            late = observation.waiting.max(observation.new_arrivals).max(1);
        }
        let bucket = self.bucket(window, now);
        bucket.questions += observation.new_arrivals;
        bucket.late += late;
    }

    fn prune(&mut self, window: Duration, now: DateTime<Utc>) {
        let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
        while self
            .buckets
            .front()
            .is_some_and(|bucket| now - bucket.start >= window)
        {
            self.buckets.pop_front();
        }
        self.waking = self.waking.take().filter(|wake| now - wake.at < window);
    }

    fn bucket(&mut self, window: Duration, now: DateTime<Utc>) -> &mut Bucket {
        let width = chrono::Duration::from_std(window / BUCKETS).unwrap_or(chrono::Duration::MAX);
        let fresh = self
            .buckets
            .back()
            .is_none_or(|last| now - last.start >= width);
        if fresh {
            self.buckets.push_back(Bucket {
                start: now,
                questions: 0,
                late: 0,
            });
            // Slices are at least `width` apart and older ones are pruned,
            // so this only trims after a clock jump backwards.
            while self.buckets.len() > BUCKETS as usize + 1 {
                self.buckets.pop_front();
            }
        }
        self.buckets.back_mut().expect("a bucket was just ensured")
    }

    /// Questions in the window.
    pub fn questions(&self) -> u64 {
        self.buckets.iter().map(|bucket| bucket.questions).sum()
    }

    /// Late first questions of the window's wake-ups.
    pub fn spent(&self) -> u64 {
        self.buckets.iter().map(|bucket| bucket.late).sum()
    }

    /// What the rule reads now: the window's counts and the next wake-up's
    /// expected late questions, at the window's mean arrival rate (over the
    /// time counted so far, at least a minute, while the window fills).
    pub fn reading(
        &self,
        observation: &Observation,
        config: &ScalerConfig,
        now: DateTime<Utc>,
    ) -> BudgetReading {
        let window = config.target.miss_budget_window;
        let cold_start = cold_start(observation, config);
        let wait_goal = wait_goal(config);
        let questions = self.questions();
        let counted = self
            .buckets
            .front()
            .map_or(Duration::ZERO, |first| {
                (now - first.start).to_std().unwrap_or_default()
            })
            .clamp(Duration::from_secs(60), window.max(Duration::from_secs(60)));
        let late_for = cold_start.saturating_sub(wait_goal);
        let cost = if late_for.is_zero() {
            0.0
        } else {
            1.0 + questions as f64 / counted.as_secs_f64() * late_for.as_secs_f64()
        };
        BudgetReading {
            questions,
            attainment: config.target.attainment,
            window,
            spent: self.spent(),
            cost,
            cold_start,
            wait_goal,
        }
    }
}

/// Seconds as the decision log writes them, and hours for long windows.
fn span(duration: Duration) -> String {
    let seconds = duration.as_secs_f64();
    if seconds >= 3600.0 && seconds % 3600.0 == 0.0 {
        format!("{}h", seconds / 3600.0)
    } else {
        format!("{}s", (seconds * 10.0).round() / 10.0)
    }
}

impl fmt::Display for BudgetReading {
    /// `the miss budget (1.50 of 1500 questions at 99.9 % over 24h, 1 spent)
    /// cannot pay for 1.8 late first question(s) (cold start 45s, wait goal
    /// 4s)`, or why a wake-up costs nothing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.cost == 0.0 {
            return write!(
                f,
                "a wake-up costs no late question (cold start {} within the wait goal {})",
                span(self.cold_start),
                span(self.wait_goal)
            );
        }
        if self.attainment == 0.0 {
            return f.write_str("no attainment goal (target.attainment 0) to budget");
        }
        let percent = (self.attainment * 1000.0).round() / 10.0;
        let verb = if self.pays() { "pays" } else { "cannot pay" };
        write!(
            f,
            "the miss budget ({:.2} of {} questions at {percent} % over {}, {} spent) {verb} for {:.1} late first question(s) (cold start {}, wait goal {})",
            self.allowed(),
            self.questions,
            span(self.window),
            self.spent,
            self.cost,
            span(self.cold_start),
            span(self.wait_goal),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn the_counts_stay_bounded_and_slide_with_the_window() {
        let config = ScalerConfig::parse(
            "resources: {min_instances: 0, max_instances: 1}\ntarget: {miss_budget_window: 1h}\nbackend: {kind: process}\n",
        )
        .unwrap();
        let start = Utc.with_ymd_and_hms(2026, 11, 25, 0, 0, 0).unwrap();
        let one = Observation {
            new_arrivals: 1,
            ..Observation::default()
        };
        let mut budget = MissBudget::default();
        // A question a second for three hours, waking from zero each time.
        for second in 0..3 * 3600 {
            let now = start + chrono::Duration::seconds(second);
            budget.observe(&one, 0, &config, now);
            assert!(budget.buckets.len() <= BUCKETS as usize + 1);
        }
        // The last hour's 3,600 questions, one slice more at most.
        let questions = budget.questions();
        assert!((3600..=3675).contains(&questions), "{questions}");
        // One wake-up per window at most while nothing gets ready: its
        // questions in the first 55 s (60 s assumed cold start, 5 s goal)
        // are late.
        assert!(budget.spent() <= 2 * 56, "{}", budget.spent());
    }
}
