//! Questions the queue holds below a consumer's ack floor.
//!
//! The question stream is a work queue: a message goes when it is
//! acknowledged, or when its last delivery ran out and the reaper (from the
//! server's max-deliveries advisory) ended it. Below a consumer's ack floor
//! no message is in flight or will be delivered again, yet the chaos run
//! found messages there after nats-server was killed: 2.9 writes removals
//! lazily, so a restart brings back acknowledged ones, and an advisory
//! published around the crash is lost with it. Each such message either
//! belongs to an ended question (removed) or to one that ran out of
//! deliveries and was never reaped: seen there on two rounds in a row, it
//! is ended the reaper's way. Nothing else touches the queue, so nothing
//! in flight is ever removed. Webhook calls below their consumer's floor
//! were delivered or given up, and go too.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::stream::DirectGetErrorKind;
use ebb_nats::{Priority, Topology, subjects};

use crate::lifecycle::Lifecycle;
use crate::reaper::{ReapError, delete, settle_exhausted};

/// How often [`run_janitor`] looks; also the least time a message waits
/// below the floor before the janitor ends it for the reaper.
pub const EVERY: Duration = Duration::from_secs(30);
/// Most messages looked at in one round.
const MOST_PER_ROUND: usize = 1_000;

/// Sweeps every [`EVERY`] until `shutdown` resolves.
pub async fn run_janitor(
    topology: Topology,
    lifecycle: Lifecycle,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut every = tokio::time::interval(EVERY);
    let mut unreaped = HashSet::new();
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = &mut shutdown => return,
        }
        match sweep(&topology, &lifecycle, &mut unreaped).await {
            Ok(0) => {}
            Ok(settled) => tracing::warn!(
                settled,
                "settled questions the queue kept below its ack floor (after a NATS crash)"
            ),
            Err(err) => tracing::debug!(cause = %err, "queue janitor skipped a round"),
        }
    }
}

/// One round over every priority, then the webhook queue; returns how many
/// messages it settled. `unreaped`: the unended questions below the floor
/// last round.
pub async fn sweep(
    topology: &Topology,
    lifecycle: &Lifecycle,
    unreaped: &mut HashSet<u64>,
) -> Result<u64, async_nats::Error> {
    let questions = sweep_priorities(topology, lifecycle, unreaped).await?;
    Ok(questions + sweep_webhook_calls(topology).await?)
}

/// Webhook calls below their consumer's ack floor were delivered or given
/// up (after their last attempt): none is waiting, so all go.
async fn sweep_webhook_calls(topology: &Topology) -> Result<u64, async_nats::Error> {
    let mut calls = topology
        .jetstream
        .get_stream(ebb_nats::webhook::STREAM)
        .await?;
    let floor = calls
        .consumer_info(ebb_nats::webhook::CONSUMER)
        .await?
        .ack_floor
        .stream_sequence;
    let first = calls.info().await?.state.first_sequence;
    if floor < first {
        return Ok(0);
    }
    Ok(calls.purge().sequence(floor + 1).await?.purged)
}

async fn sweep_priorities(
    topology: &Topology,
    lifecycle: &Lifecycle,
    unreaped: &mut HashSet<u64>,
) -> Result<u64, ReapError> {
    let mut settled = 0;
    let mut seen_unended = HashSet::new();
    for priority in Priority::ALL {
        let info = topology
            .questions
            .consumer_info(&subjects::consumer(priority))
            .await
            .map_err(|err| ReapError::Transient(err.into()))?;
        let floor = info.ack_floor.stream_sequence;
        let max_deliver = info.config.max_deliver;
        let subject = subjects::question(priority);
        let mut from = 1;
        for _ in 0..MOST_PER_ROUND {
            let message = match topology
                .questions
                .direct_get_next_for_subject(subject.as_str(), Some(from))
                .await
            {
                Ok(message) => message,
                Err(err) if err.kind() == DirectGetErrorKind::NotFound => break,
                Err(err) => return Err(ReapError::Transient(err.into())),
            };
            if message.sequence > floor {
                break;
            }
            from = message.sequence + 1;
            let ended = match ended_question(lifecycle, &message).await? {
                Some(ended) => ended,
                None => {
                    // Not a readable job: it cannot be in flight either.
                    settle_exhausted(topology, lifecycle, &message, max_deliver).await?;
                    settled += 1;
                    continue;
                }
            };
            if ended {
                delete(topology, message.sequence).await?;
                settled += 1;
            } else if unreaped.contains(&message.sequence) {
                settle_exhausted(topology, lifecycle, &message, max_deliver).await?;
                settled += 1;
            } else {
                seen_unended.insert(message.sequence);
            }
        }
    }
    *unreaped = seen_unended;
    Ok(settled)
}

/// Whether the message's question has ended; `None` if it is not a job.
async fn ended_question(
    lifecycle: &Lifecycle,
    message: &async_nats::jetstream::message::StreamMessage,
) -> Result<Option<bool>, ReapError> {
    let Ok(job) = serde_json::from_slice::<ebb_nats::Job>(&message.payload) else {
        return Ok(None);
    };
    let record = lifecycle.store().record(&job.id).await?;
    Ok(Some(
        record.is_some_and(|record| record.status.is_terminal()),
    ))
}
