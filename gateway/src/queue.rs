//! Handing a question to the workers.

use async_nats::connection::State;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use ebb_nats::{Job, subjects};
use ebb_runtime::telemetry;

use crate::error::ApiError;

/// Publishes `job` and returns once JetStream has stored it. Retries once on
/// a lost ack: the `Nats-Msg-Id` makes the retry a no-op if the first landed.
pub async fn publish(
    jetstream: &async_nats::jetstream::Context,
    job: &Job,
) -> Result<(), ApiError> {
    if jetstream.client().connection_state() != State::Connected {
        return Err(ApiError::QueueUnavailable("not connected to NATS".into()));
    }
    let payload = serde_json::to_vec(job).expect("jobs serialize");
    let mut headers = async_nats::HeaderMap::new();
    telemetry::inject(&tracing::Span::current(), &mut headers);
    let subject = subjects::question(job.priority);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let message = PublishMessage::build()
            .payload(payload.clone().into())
            .headers(headers.clone())
            .message_id(&job.id);
        let result = match jetstream.send_publish(subject.clone(), message).await {
            Ok(ack) => ack.await,
            Err(err) => Err(err),
        };
        match result {
            Ok(_) => return Ok(()),
            Err(err) if is_queue_full(&err) => return Err(ApiError::QueueFull),
            Err(err)
                if attempt < 2
                    && matches!(
                        err.kind(),
                        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe
                    ) =>
            {
                tracing::warn!(question_id = %job.id, cause = %err, "publish ack lost; retrying");
            }
            Err(err) => return Err(ApiError::QueueUnavailable(err.to_string())),
        }
    }
}

fn is_queue_full(err: &async_nats::jetstream::context::PublishError) -> bool {
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|error| {
            matches!(
                error.error_code(),
                ErrorCode::STREAM_STORE_FAILED | ErrorCode::STORAGE_RESOURCES_EXCEEDED
            )
        })
}
