//! The `fixed` policy: the fewest always-on workers that meet the SLO
//! target on a trace, found by replaying fleets of different sizes, or the
//! report that no always-on fleet meets it.

use crate::engine::{self, Outcome, Setup};
use crate::policies::Fixed;
use crate::report::{PolicyResult, Slo};

/// What the `fixed` policy's search found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FixedFleet {
    /// The fewest always-on workers meeting the SLO target.
    Smallest(u32),
    /// No always-on fleet meets it (e.g. prompts too long to reach a first
    /// token in time): the best attainment the search reached, and the
    /// fewest workers it tried that reach it.
    Unattainable { workers: u32, attainment: f64 },
}

impl FixedFleet {
    pub fn detail(self, target: f64) -> String {
        match self {
            FixedFleet::Smallest(workers) => {
                format!("{workers} workers always on (the fewest meeting the SLO target)")
            }
            FixedFleet::Unattainable {
                workers,
                attainment,
            } => format!(
                "SLO target unattainable: no always-on fleet reaches {:.1} %; {workers} workers reach the best found, {:.1} %",
                target * 100.0,
                attainment * 100.0
            ),
        }
    }
}

/// Largest fleet the search tries: beyond the clairvoyant's peak nothing
/// queues, so more workers only help while smaller batches still speed
/// answers up.
const FIXED_SEARCH_FACTOR: u32 = 8;

/// The smallest always-on fleet meeting the SLO target, by doubling then
/// bisection (more workers never make FIFO waits longer). Doubling stops
/// when attainment stops rising or past [`FIXED_SEARCH_FACTOR`] times the
/// clairvoyant's peak: a target no fleet meets is reported as unattainable,
/// never as a fleet size.
pub fn smallest_fixed_fleet(
    setup: &Setup,
    slo: &Slo,
    clairvoyant_peak: u32,
) -> (FixedFleet, Outcome) {
    let attempt = |size: u32| {
        let outcome = engine::replay(setup, &mut Fixed(size), size);
        let result = PolicyResult::new("fixed", String::new(), &outcome, setup.model, slo, 0.0);
        (result.slo_attainment, outcome)
    };
    let cap = clairvoyant_peak.max(1).saturating_mul(FIXED_SEARCH_FACTOR);
    let mut high = clairvoyant_peak.max(1);
    let (mut attainment, mut outcome) = attempt(high);
    while attainment < slo.target {
        let doubled = high.saturating_mul(2);
        if doubled > cap {
            let fleet = FixedFleet::Unattainable {
                workers: high,
                attainment,
            };
            return (fleet, outcome);
        }
        let (more, more_outcome) = attempt(doubled);
        if more <= attainment {
            let fleet = FixedFleet::Unattainable {
                workers: high,
                attainment,
            };
            return (fleet, outcome);
        }
        (high, attainment, outcome) = (doubled, more, more_outcome);
    }
    let mut best = (high, outcome);
    let mut low = 0; // does not meet (or not tried below 1)
    while best.0 - low > 1 {
        let middle = low + (best.0 - low) / 2;
        match attempt(middle) {
            (met, outcome) if met >= slo.target => best = (middle, outcome),
            _ => low = middle,
        }
    }
    (FixedFleet::Smallest(best.0), best.1)
}
