//! Names on the wire. Changing any of these is a protocol change.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The work-queue stream that holds every accepted, unanswered question.
pub const QUESTIONS_STREAM: &str = "EBB_QUESTIONS";
/// Every question subject: `ebb.questions.<priority>`.
pub const QUESTIONS_WILDCARD: &str = "ebb.questions.*";
/// The stream that keeps dead letters (`ebb.dead.<id>`) for inspection.
pub const DEAD_STREAM: &str = "EBB_DEAD";
/// Every dead-letter subject.
pub const DEAD_WILDCARD: &str = "ebb.dead.*";
/// Captures the server's "max deliveries reached" advisories for the
/// question consumers, so a question whose last attempt died with its
/// worker still gets a terminal status.
pub const ADVISORY_STREAM: &str = "EBB_ADVISORIES";
/// Durable consumer on [`ADVISORY_STREAM`] that the gateway drains.
pub const ADVISORY_CONSUMER: &str = "ebb-dead-letter";
/// Core NATS subject on which workers announce themselves every 2 s.
pub const HEARTBEAT: &str = "ebb.workers.heartbeat";
/// Core NATS subject on which the scaler announces its fleet's limits
/// ([`crate::FleetStatus`]) every 2 s.
pub const SCALER_STATUS: &str = "ebb.scaler.status";
/// Core NATS subject on which a worker reports each answer it generated:
/// its [`crate::Timings`], no text (the scaler's latency histograms).
pub const ANSWERED: &str = "ebb.workers.answered";
/// Core NATS subject on which each gateway reports its cache hits since its
/// last report ([`crate::CacheHits`]).
pub const CACHE_HITS: &str = "ebb.gateway.cache_hits";

/// The scaler's key-value bucket (what it learned, kept across restarts).
pub const SCALER_STATE_BUCKET: &str = "ebb_scaler_state";
/// The scalers' lease bucket: one active scaler per pool.
pub const SCALER_LEASE_BUCKET: &str = "ebb_scaler_lease";

/// Subject of the server's advisory for a question consumer that exhausted
/// `max_deliver`.
pub fn max_deliveries_advisory_wildcard() -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{QUESTIONS_STREAM}.*")
}

/// Subject a question of this priority is published on.
pub fn question(priority: Priority) -> String {
    format!("ebb.questions.{priority}")
}

/// Core NATS subject of a question's answer events (tokens, then final).
pub fn answers(id: &str) -> String {
    format!("ebb.answers.{id}")
}

/// Dead-letter subject of a question that exhausted its deliveries.
pub fn dead_letter(id: &str) -> String {
    format!("ebb.dead.{id}")
}

/// Durable pull consumer that serves one priority. One per priority because a
/// WorkQueue stream rejects consumers with overlapping filters (error 10099).
pub fn consumer(priority: Priority) -> String {
    format!("ebb-workers-{priority}")
}

/// How urgently a question should be answered. Workers serve `High` before
/// `Normal` before `Low`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// Serving order: most urgent first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str() == text)
            .ok_or_else(|| format!("unknown priority `{text}` (expected high, normal or low)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_documented_layout() {
        assert_eq!(question(Priority::Normal), "ebb.questions.normal");
        assert_eq!(consumer(Priority::High), "ebb-workers-high");
        assert_eq!(answers("q1"), "ebb.answers.q1");
        assert_eq!(dead_letter("q1"), "ebb.dead.q1");
        for p in Priority::ALL {
            assert_eq!(p.as_str().parse::<Priority>(), Ok(p));
        }
        assert!("urgent".parse::<Priority>().is_err());
    }
}
