//! Terminal failure: the `failed` status, the dead letter, the final event.
//!
//! A question reaches here in one of two ways. A worker whose last allowed
//! attempt fails calls [`fail_question`] itself, with the error as reason.
//! A worker that dies during the last attempt cannot, so the server's
//! max-deliveries advisory (captured in the `EBB_ADVISORIES` stream) is
//! drained by [`run_reaper`], which fails the question on its behalf.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;

use crate::messages::{AnswerEvent, DeadLetter, Job};
use crate::store::{QuestionRecord, QuestionStatus, Store};
use crate::subjects;
use crate::topology::Topology;

/// Marks the question `failed`, keeps a dead letter on `ebb.dead.<id>` and
/// tells any waiting client. The dead letter is written first: it is the
/// durable evidence, the status record and event follow from it.
pub async fn fail_question(
    topology: &Topology,
    store: &Store,
    job: &Job,
    reason: &str,
    deliveries: i64,
) -> Result<(), async_nats::Error> {
    let now = crate::now_ms();
    let letter = DeadLetter {
        job: job.clone(),
        reason: reason.to_owned(),
        deliveries,
        failed_at_ms: now,
    };
    let publish = jetstream::message::PublishMessage::build()
        .payload(serde_json::to_vec(&letter)?.into())
        .message_id(format!("dead-{}", job.id));
    topology
        .jetstream
        .send_publish(subjects::dead_letter(&job.id), publish)
        .await?
        .await?;

    let record = QuestionRecord {
        status: QuestionStatus::Failed,
        error: Some(reason.to_owned()),
        model: Some(job.model.clone()),
        attempts: deliveries,
        updated_at_ms: now,
        ..QuestionRecord::of_job(job)
    };
    store.put_record(&record).await?;
    let event = AnswerEvent::Failed {
        error: reason.to_owned(),
    };
    topology
        .jetstream
        .client()
        .publish(
            subjects::answers(&job.id),
            Bytes::from(serde_json::to_vec(&event)?),
        )
        .await?;
    // After the event: a full webhook queue must not cost the waiting client
    // its answer.
    if let Some(url) = &job.callback_url
        && let Err(err) = crate::webhook::enqueue(&topology.jetstream, &job.id, url, &record).await
    {
        tracing::error!(question_id = %job.id, cause = %err, "cannot queue the webhook call");
    }
    tracing::warn!(question_id = %job.id, deliveries, reason, "question failed and dead-lettered");
    Ok(())
}

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
    store: Store,
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
                    Some(Ok(message)) => handle_advisory(&topology, &store, message).await,
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

async fn handle_advisory(topology: &Topology, store: &Store, message: jetstream::Message) {
    match reap(topology, store, &message.payload).await {
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
enum ReapError {
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

impl From<crate::store::StoreError> for ReapError {
    fn from(err: crate::store::StoreError) -> Self {
        ReapError::Transient(err.into())
    }
}

async fn delete(topology: &Topology, sequence: u64) -> Result<(), ReapError> {
    topology
        .questions
        .delete_message(sequence)
        .await
        .map_err(|err| ReapError::Transient(err.into()))?;
    Ok(())
}

async fn reap(topology: &Topology, store: &Store, payload: &[u8]) -> Result<(), ReapError> {
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
    let job: Job = serde_json::from_slice(&message.payload)?;
    // The last attempt may have finished and only its ack been lost.
    if store
        .record(&job.id)
        .await?
        .is_some_and(|record| record.status.is_terminal())
    {
        delete(topology, advisory.stream_seq).await?;
        return Ok(());
    }
    let reason = format!(
        "no answer after {} deliveries: the worker stopped responding during the last one",
        advisory.deliveries
    );
    fail_question(topology, store, &job, &reason, advisory.deliveries)
        .await
        .map_err(ReapError::Transient)?;
    delete(topology, advisory.stream_seq).await?;
    Ok(())
}
