//! Why the desired count is what it is: a typed value the decision log
//! shows in words ([`Display`](std::fmt::Display)) and `/metrics` counts by
//! a bounded [`Reason::label`], so nothing is ever parsed back from prose.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::Metric;
use crate::miss_budget::BudgetReading;

/// One rule condition as it read when it fired.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub metric: Metric,
    pub value: f64,
    /// `>` for a scale-up condition, `<` for a scale-down one.
    pub above: bool,
    pub threshold: f64,
    /// How long it has held.
    pub held: Duration,
}

/// Why a decision chose its count.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    /// `POST /scale`, in force until `until`.
    Manual {
        count: u32,
        until: DateTime<Utc>,
    },
    /// Rule conditions that held for their duration (one scale-up one, or
    /// every scale-down one).
    Rules(Vec<Reading>),
    /// Rules, none of which held long enough.
    RulesQuiet,
    /// Target tracking's count for the stable window.
    Target {
        arrival_rate: f64,
        service_time: Duration,
        waiting: u64,
        drain_target: Duration,
        utilization: f64,
        slots_per_worker: u32,
        workers: u32,
    },
    /// Panic: the oldest question is older than half the latency goal.
    PanicQueueAge {
        age: Duration,
        limit: Duration,
    },
    /// Panic: the short window's arrivals need twice the ready workers.
    PanicBurst {
        arrival_rate: f64,
        window: Duration,
        needed: u32,
        ready: u32,
    },
    /// Panic entered earlier still holds: never down while it lasts.
    PanicHolding,
    /// Questions waiting while no worker runs.
    Activation {
        waiting: u64,
    },
    /// A timetable window's floor.
    TimetableFloor {
        window: String,
        workers: u32,
    },
    MinInstances(u32),
    /// What `wanted` asked for, cut to `max_instances`.
    Capped {
        wanted: Box<Reason>,
        max: u32,
    },
    /// Idle for the scale-to-zero window: the last worker goes.
    IdleToZero {
        idle: Duration,
        /// `None` with `scale_to_zero: always`; else what the miss budget read.
        budget: Option<BudgetReading>,
    },
    /// Idle long enough, but the miss budget cannot pay for the next
    /// wake-up's late first questions: the floor stays at one.
    MissBudgetFloor(BudgetReading),
    /// `scale_to_zero: never`: the last worker stays.
    NeverToZero,
    /// The last worker stays until the idle window has passed.
    AwaitingIdle {
        window: Duration,
    },
    /// Lower for the whole stabilization window: down to `to`.
    Stable {
        wanted: Box<Reason>,
        window: Duration,
        to: u32,
    },
    /// Lower, but not yet for the stabilization window.
    Stabilizing(Box<Reason>),
    /// A compared model's own count (the simulator's KEDA-, Knative-like
    /// and fixed fleets), named.
    Model(&'static str),
}

impl Reason {
    /// A bounded label for `ebb_scaler_decisions_total{reason=...}`: what
    /// moved the count (a cap or a finished stabilization is labelled by
    /// what asked for the count).
    pub fn label(&self) -> &'static str {
        match self {
            Reason::Manual { .. } => "manual",
            Reason::Rules(_) | Reason::RulesQuiet => "rules",
            Reason::Target { .. } => "target",
            Reason::PanicQueueAge { .. } | Reason::PanicBurst { .. } | Reason::PanicHolding => {
                "panic"
            }
            Reason::Activation { .. } => "activation",
            Reason::TimetableFloor { .. } => "timetable",
            Reason::MinInstances(_) => "min_instances",
            Reason::Capped { wanted, .. } | Reason::Stable { wanted, .. } => wanted.label(),
            Reason::IdleToZero { .. } => "idle",
            Reason::MissBudgetFloor(_) => "miss_budget",
            Reason::NeverToZero => "never_to_zero",
            Reason::AwaitingIdle { .. } => "waiting",
            Reason::Stabilizing(_) => "stabilizing",
            Reason::Model(name) => name,
        }
    }

    /// Whether panic mode chose this count.
    pub fn is_panic(&self) -> bool {
        matches!(self.label(), "panic")
    }
}

/// Seconds to a tenth, as the decision log writes them: `2.5s`.
fn seconds(duration: Duration) -> String {
    format!("{}s", (duration.as_secs_f64() * 10.0).round() / 10.0)
}

impl fmt::Display for Reading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:.2} {} {} for {}",
            self.metric.name(),
            self.value,
            if self.above { ">" } else { "<" },
            self.threshold,
            seconds(self.held)
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Manual { count, until } => {
                write!(
                    f,
                    "manual override {count} until {}",
                    until.format("%H:%M:%SZ")
                )
            }
            Reason::Rules(readings) => {
                for (index, reading) in readings.iter().enumerate() {
                    let separator = if index == 0 { "" } else { ", " };
                    write!(f, "{separator}{reading}")?;
                }
                Ok(())
            }
            Reason::RulesQuiet => f.write_str("rules: no condition held long enough"),
            Reason::Target {
                arrival_rate,
                service_time,
                waiting,
                drain_target,
                utilization,
                slots_per_worker,
                workers,
            } => write!(
                f,
                "target: {arrival_rate:.2} arrivals/s x {} + waiting {waiting} / {} at {:.0}% of {slots_per_worker} slot(s) each -> {workers}",
                seconds(*service_time),
                seconds(*drain_target),
                utilization * 100.0
            ),
            Reason::PanicQueueAge { age, limit } => write!(
                f,
                "panic: queue_age {} > {} (half the latency goal)",
                seconds(*age),
                seconds(*limit)
            ),
            Reason::PanicBurst {
                arrival_rate,
                window,
                needed,
                ready,
            } => write!(
                f,
                "panic: {arrival_rate:.1} arrivals/s over {} need {needed} workers, {ready} ready",
                seconds(*window)
            ),
            Reason::PanicHolding => f.write_str("panic: holding workers"),
            Reason::Activation { waiting } => {
                write!(
                    f,
                    "activation: {waiting} question(s) waiting at zero workers"
                )
            }
            Reason::TimetableFloor { window, workers } => {
                write!(f, "timetable floor '{window}' {workers}")
            }
            Reason::MinInstances(min) => write!(f, "min_instances {min}"),
            Reason::Capped { wanted, max } => {
                write!(f, "{wanted}; capped at max_instances {max}")
            }
            Reason::IdleToZero { idle, budget: None } => {
                write!(f, "idle {} -> 0", seconds(*idle))
            }
            Reason::IdleToZero {
                idle,
                budget: Some(budget),
            } => write!(f, "idle {}; {budget} -> 0", seconds(*idle)),
            Reason::MissBudgetFloor(budget) => write!(f, "floor 1: {budget}"),
            Reason::NeverToZero => f.write_str("floor 1: scale_to_zero is never"),
            Reason::AwaitingIdle { window } => {
                write!(f, "waiting for {} idle before 0", seconds(*window))
            }
            Reason::Stable { wanted, window, to } => {
                write!(f, "{wanted}; stable for {} -> {to}", seconds(*window))
            }
            Reason::Stabilizing(wanted) => write!(f, "stabilizing: {wanted}"),
            Reason::Model(name) => write!(f, "{name}"),
        }
    }
}

/// In JSON (`/status`, the decision log) a reason is its words.
impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_or_stabilized_count_is_labelled_by_what_asked_for_it() {
        let target = Reason::Target {
            arrival_rate: 2.0,
            service_time: Duration::from_millis(2500),
            waiting: 3,
            drain_target: Duration::from_secs(30),
            utilization: 0.8,
            slots_per_worker: 8,
            workers: 7,
        };
        let capped = Reason::Capped {
            wanted: Box::new(target.clone()),
            max: 6,
        };
        assert_eq!(capped.label(), "target");
        assert_eq!(
            capped.to_string(),
            "target: 2.00 arrivals/s x 2.5s + waiting 3 / 30s at 80% of 8 slot(s) each -> 7; capped at max_instances 6"
        );
        let stabilizing = Reason::Stabilizing(Box::new(Reason::PanicHolding));
        assert_eq!(stabilizing.label(), "stabilizing");
        assert_eq!(
            stabilizing.to_string(),
            "stabilizing: panic: holding workers"
        );
        assert_eq!(
            serde_json::to_value(Reason::MinInstances(2)).unwrap(),
            "min_instances 2"
        );
    }
}
