//! Queue depth, as the scaler sees it.
//!
//! Lag is `num_pending + num_ack_pending` of each worker consumer: questions
//! no worker has taken yet plus those taken and not yet answered. The oldest
//! waiting age looks only at questions not yet delivered, so a long answer in
//! progress does not read as a stuck queue.

use std::time::Duration;

use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use serde::Serialize;

use crate::subjects::{self, Priority};
use crate::topology::QueueError;

/// Depth of one priority's consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PriorityDepth {
    pub priority: Priority,
    /// Not yet delivered to any worker.
    pub pending: u64,
    /// Delivered, not yet acknowledged (being answered or waiting for redelivery).
    pub ack_pending: u64,
    /// Age of the oldest question not yet delivered; zero when none waits.
    #[serde(serialize_with = "ebb_runtime::duration::serialize_seconds")]
    pub oldest_waiting: Duration,
}

impl PriorityDepth {
    pub fn lag(&self) -> u64 {
        self.pending + self.ack_pending
    }
}

/// Depth summed over the worker consumers, with the per-priority breakdown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueDepth {
    pub priorities: Vec<PriorityDepth>,
}

impl QueueDepth {
    /// `num_pending + num_ack_pending` over every priority.
    pub fn lag(&self) -> u64 {
        self.priorities.iter().map(PriorityDepth::lag).sum()
    }

    /// `num_pending` over every priority: questions no worker has taken.
    pub fn waiting(&self) -> u64 {
        self.priorities.iter().map(|p| p.pending).sum()
    }

    /// The oldest waiting question of any priority.
    pub fn oldest_waiting(&self) -> Duration {
        self.priorities
            .iter()
            .map(|depth| depth.oldest_waiting)
            .max()
            .unwrap_or_default()
    }
}

/// Reads every worker consumer's state from the question stream.
pub async fn queue_depth(questions: &Stream) -> Result<QueueDepth, QueueError> {
    let mut priorities = Vec::with_capacity(Priority::ALL.len());
    for priority in Priority::ALL {
        let info = questions
            .consumer_info(subjects::consumer(priority))
            .await
            .map_err(|err| QueueError::Depth(err.into()))?;
        let oldest_waiting = if info.num_pending == 0 {
            Duration::ZERO
        } else {
            // The first question past the consumer's delivered sequence is the
            // oldest one no worker has seen.
            let first_waiting = questions
                .direct_get_next_for_subject(
                    subjects::question(priority),
                    Some(info.delivered.stream_sequence + 1),
                )
                .await;
            match first_waiting {
                Ok(message) => age_of(message.time.unix_timestamp_nanos()),
                // Delivered between the two queries: nothing waits any more.
                Err(err) if err.kind() == DirectGetErrorKind::NotFound => Duration::ZERO,
                Err(err) => return Err(QueueError::Depth(err.into())),
            }
        };
        priorities.push(PriorityDepth {
            priority,
            pending: info.num_pending,
            ack_pending: info.num_ack_pending as u64,
            oldest_waiting,
        });
    }
    Ok(QueueDepth { priorities })
}

fn age_of(unix_nanos: i128) -> Duration {
    let now = crate::now_ms() as i128 * 1_000_000;
    Duration::from_nanos((now - unix_nanos).max(0) as u64)
}
