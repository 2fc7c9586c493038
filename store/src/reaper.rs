//! Failing questions for workers that died. A worker whose last allowed
//! attempt fails calls [`Lifecycle::fail`] itself; one that dies during the
//! last attempt cannot, so the server's max-deliveries advisory (captured in
//! the `EBB_ADVISORIES` stream) is drained by [`run_reaper`], which fails the
//! question on its behalf through the same lifecycle.

use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::{self, AckKind};
use ebb_nats::{Job, Topology, subjects};
use futures::StreamExt;
use serde::Deserialize;

use crate::lifecycle::Lifecycle;
use crate::store::StoreError;

/// The fields of `io.nats.jetstream.advisory.v1.max_deliver` that matter here.
#[derive(Debug, Deserialize)]
struct MaxDeliveriesAdvisory {
    stream_seq: u64,
    deliveries: i64,
}

/// Drains max-deliveries advisories until `shutdown` resolves: each names a
/// question whose last delivery was never acknowledged (its worker died).
/// Safe to run in several processes at once: the advisory consumer is a
/// shared durable work queue.
pub async fn run_reaper(
    topology: Topology,
    lifecycle: Lifecycle,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // (Re)attach on every failure: NATS may be restarting.
        let messages = match advisory_messages(&topology).await {
            Ok(messages) => Some(messages),
            Err(err) => {
                tracing::error!(cause = %err, "dead-letter reaper cannot pull; retrying");
                None
            }
        };
        if let Some(mut messages) = messages {
            loop {
                let message = tokio::select! {
                    message = messages.next() => message,
                    _ = &mut shutdown => return,
                };
                match message {
                    Some(Ok(message)) => handle_advisory(&topology, &lifecycle, message).await,
                    Some(Err(err)) => {
                        tracing::warn!(cause = %err, "dead-letter reaper pull error");
                        break;
                    }
                    None => break,
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = &mut shutdown => return,
        }
    }
}

async fn advisory_messages(
    topology: &Topology,
) -> Result<jetstream::consumer::pull::Stream, async_nats::Error> {
    let advisories = topology
        .jetstream
        .get_stream(subjects::ADVISORY_STREAM)
        .await?;
    let consumer: jetstream::consumer::PullConsumer =
        advisories.get_consumer(subjects::ADVISORY_CONSUMER).await?;
    Ok(consumer.messages().await?)
}

async fn handle_advisory(topology: &Topology, lifecycle: &Lifecycle, message: jetstream::Message) {
    match reap(topology, lifecycle, &message.payload).await {
        Ok(()) => {
            if let Err(err) = message.ack().await {
                tracing::warn!(cause = %err, "cannot ack max-deliveries advisory");
            }
        }
        Err(ReapError::Unreadable(err)) => {
            // Retrying cannot help; keep the advisory out of the way.
            tracing::error!(cause = %err, "unreadable max-deliveries advisory or job; dropping it");
            let _ = message.ack_with(AckKind::Term).await;
        }
        Err(ReapError::Transient(err)) => {
            tracing::error!(cause = %err, "cannot fail an exhausted question; will retry");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReapError {
    #[error("{0}")]
    Unreadable(#[from] serde_json::Error),
    #[error("{0}")]
    Transient(async_nats::Error),
}

impl From<async_nats::Error> for ReapError {
    fn from(err: async_nats::Error) -> Self {
        ReapError::Transient(err)
    }
}

impl From<StoreError> for ReapError {
    fn from(err: StoreError) -> Self {
        ReapError::Transient(err.into())
    }
}

pub(crate) async fn delete(topology: &Topology, sequence: u64) -> Result<(), ReapError> {
    topology
        .questions
        .delete_message(sequence)
        .await
        .map_err(|err| ReapError::Transient(err.into()))?;
    Ok(())
}

async fn reap(topology: &Topology, lifecycle: &Lifecycle, payload: &[u8]) -> Result<(), ReapError> {
    let advisory: MaxDeliveriesAdvisory = serde_json::from_slice(payload)?;
    let message = match topology
        .questions
        .get_raw_message(advisory.stream_seq)
        .await
    {
        Ok(message) => message,
        // Already acknowledged or removed: the question has its status.
        Err(err) if err.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            return Ok(());
        }
        Err(err) => return Err(ReapError::Transient(err.into())),
    };
    settle_exhausted(topology, lifecycle, &message, advisory.deliveries).await
}

/// Ends a question whose message ran out of deliveries (`deliveries`, the
/// last one's count) and removes the message: the record stands if the
/// last attempt ended it (announced again, in case that worker died before
/// telling anyone), else the question fails; a message that is not a job
/// fails under the id it carries.
pub(crate) async fn settle_exhausted(
    topology: &Topology,
    lifecycle: &Lifecycle,
    message: &StreamMessage,
    deliveries: i64,
) -> Result<(), ReapError> {
    let job: Job = match serde_json::from_slice(&message.payload) {
        Ok(job) => job,
        Err(err) => {
            let message_id = message
                .headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|id| id.as_str());
            let id = ebb_nats::messages::carried_id(&message.payload, message_id)
                .unwrap_or_else(|| format!("unreadable-{}", message.sequence));
            let reason = format!("not a question a worker can read: {err}");
            lifecycle
                .fail_unreadable(&id, &message.payload, &reason, deliveries)
                .await
                .map_err(ReapError::Transient)?;
            return delete(topology, message.sequence).await;
        }
    };
    // The last attempt may have ended the question and died (or lost its
    // ack) before its event or webhook call went out.
    if let Some(record) = lifecycle.store().record(&job.id).await?
        && record.status.is_terminal()
    {
        lifecycle.reannounce(&job, &record).await;
        delete(topology, message.sequence).await?;
        return Ok(());
    }
    let reason = format!(
        "no answer after {} deliveries: the worker stopped responding during the last one",
        deliveries
    );
    lifecycle
        .fail(&job, &reason, deliveries)
        .await
        .map_err(ReapError::Transient)?;
    delete(topology, message.sequence).await?;
    Ok(())
}
