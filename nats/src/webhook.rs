//! Webhook calls: a question with a `callback_url` gets its final record
//! POSTed there once it is `done` or `failed`.
//!
//! Whoever finishes the question (a worker, or the dead-letter reaper) only
//! publishes a [`WebhookCall`] to the `EBB_WEBHOOKS` work-queue stream, which
//! takes a millisecond and never waits on the receiver. The gateway's
//! dispatcher delivers it (signed, retried with backoff, SSRF-checked), so a
//! slow or dead receiver costs no worker time and survives restarts.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::TryStreamExt as _;
use serde::{Deserialize, Serialize};

use crate::record::QuestionRecord;

/// The stream of webhook calls not yet delivered.
pub const STREAM: &str = "EBB_WEBHOOKS";
/// Every webhook subject: `ebb.webhooks.<owner>.<call id>` (see
/// [`subject`]); releases before per-key counts used `ebb.webhooks.<call id>`,
/// which this matches too.
pub const WILDCARD: &str = "ebb.webhooks.>";
/// The durable consumer the gateways' dispatchers share.
pub const CONSUMER: &str = "ebb-webhooks";
/// Deliveries of one call before it is given up (with backoff, ~10 minutes).
pub const MAX_DELIVER: i64 = 10;

/// One call to make: the final record goes to `callback_url` as the body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookCall {
    pub callback_url: String,
    pub record: QuestionRecord,
}

/// The subject of a call for a question of `owner` (an API key's name):
/// the owner is a token of its own, so the calls one key has queued can be
/// counted ([`queued_for`]).
pub fn subject(owner: Option<&str>, call_id: &str) -> String {
    format!("ebb.webhooks.{}.{call_id}", owner_token(owner))
}

/// A key's name as one subject token: its bytes in hex (names may hold
/// dots or spaces), `_` for questions no key owns.
fn owner_token(owner: Option<&str>) -> String {
    match owner {
        Some(name) => name.bytes().map(|byte| format!("{byte:02x}")).collect(),
        None => "_".to_owned(),
    }
}

/// How many calls for questions of `owner` wait for delivery.
pub async fn queued_for(stream: &stream::Stream, owner: &str) -> Result<u64, async_nats::Error> {
    let filter = format!("ebb.webhooks.{}.*", owner_token(Some(owner)));
    let mut subjects = stream.info_with_subjects(filter).await?;
    let mut queued = 0u64;
    while let Some((_, count)) = subjects.try_next().await? {
        queued += count as u64;
    }
    Ok(queued)
}

/// Queues the call. `call_id` is the question id (the gateway uses a fresh
/// one for an answer from the cache): with the outcome it is the message id,
/// so a repeated finish (a redelivered question, a reaper racing a worker) is
/// one call within the duplicate window.
pub async fn enqueue(
    jetstream: &jetstream::Context,
    call_id: &str,
    callback_url: &str,
    record: &QuestionRecord,
) -> Result<(), async_nats::Error> {
    let call = WebhookCall {
        callback_url: callback_url.to_owned(),
        record: record.for_clients(),
    };
    let message = jetstream::message::PublishMessage::build()
        .payload(serde_json::to_vec(&call)?.into())
        .message_id(format!("webhook-{call_id}-{:?}", record.status));
    jetstream
        .send_publish(subject(record.owner.as_deref(), call_id), message)
        .await?
        .await?;
    Ok(())
}

pub(crate) fn stream_config(config: &crate::QueueConfig) -> stream::Config {
    stream::Config {
        name: STREAM.to_owned(),
        description: Some("Webhook calls waiting for delivery".to_owned()),
        subjects: vec![WILDCARD.to_owned()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::New,
        max_messages: 100_000,
        max_age: Duration::from_secs(86_400),
        duplicate_window: Duration::from_secs(120),
        num_replicas: config.replicas.into(),
        ..Default::default()
    }
}

pub(crate) fn consumer_config() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(CONSUMER.to_owned()),
        description: Some("Gateways delivering webhook calls".to_owned()),
        ack_policy: consumer::AckPolicy::Explicit,
        // Longer than one delivery attempt's timeout.
        ack_wait: Duration::from_secs(60),
        max_deliver: MAX_DELIVER,
        max_ack_pending: 1_000,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_has_a_subject_token_of_its_own() {
        assert_eq!(subject(None, "q1"), "ebb.webhooks._.q1");
        assert_eq!(subject(Some("a.b c"), "q1"), "ebb.webhooks.612e622063.q1");
        assert_ne!(owner_token(Some("a.b")), owner_token(Some("a_b")));
        // The stream still takes calls queued under the old layout.
        assert_eq!(WILDCARD, "ebb.webhooks.>");
    }
}
