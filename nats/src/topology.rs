//! Streams and durable consumers, created or updated idempotently.
//!
//! Every process calls [`Topology::ensure`] at start with the same
//! [`QueueConfig`] (a shared set of flags), so whichever comes up first builds
//! the topology and the rest find it in place.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use crate::subjects::{self, Priority};

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot reach NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("cannot set up stream {stream}: {source}")]
    Stream {
        stream: String,
        source: async_nats::Error,
    },
    #[error("cannot set up consumer {consumer}: {source}")]
    Consumer {
        consumer: String,
        source: async_nats::Error,
    },
    #[error("queue depth query failed: {0}")]
    Depth(async_nats::Error),
}

/// Queue limits and delivery policy, shared as flags by every process.
#[derive(Debug, Clone, clap::Args)]
pub struct QueueConfig {
    /// Most questions the queue holds; past it the gateway answers 503 `queue_full`.
    #[arg(
        long = "queue-max-messages",
        env = "EBB_QUEUE_MAX_MESSAGES",
        default_value_t = 100_000
    )]
    pub max_messages: i64,
    /// Most bytes the queue holds; past it the gateway answers 503 `queue_full`.
    #[arg(long = "queue-max-bytes", env = "EBB_QUEUE_MAX_BYTES", default_value_t = 1 << 30)]
    pub max_bytes: i64,
    /// A question held this long by a worker without an ack or progress ack is
    /// redelivered (workers send progress acks every third of it).
    #[arg(long = "ack-wait", env = "EBB_ACK_WAIT", default_value = "30s", value_parser = parse_ack_wait)]
    pub ack_wait: Duration,
    /// Deliveries of one question before it is failed and dead-lettered.
    #[arg(long = "max-deliver", env = "EBB_MAX_DELIVER", default_value_t = 5, value_parser = clap::value_parser!(i64).range(1..))]
    pub max_deliver: i64,
    /// Window in which a republished question id is dropped as a duplicate.
    #[arg(long = "duplicate-window", env = "EBB_DUPLICATE_WINDOW", default_value = "2m", value_parser = ebb_runtime::duration::parse)]
    pub duplicate_window: Duration,
    /// How long dead letters are kept in the `EBB_DEAD` stream.
    #[arg(long = "dead-letter-max-age", env = "EBB_DEAD_LETTER_MAX_AGE", default_value = "14d", value_parser = ebb_runtime::duration::parse)]
    pub dead_letter_max_age: Duration,
}

fn parse_ack_wait(text: &str) -> Result<Duration, String> {
    let wait = ebb_runtime::duration::parse(text)?;
    if wait < Duration::from_secs(1) {
        return Err("must be at least 1s (workers send progress acks every third of it)".into());
    }
    Ok(wait)
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_messages: 100_000,
            max_bytes: 1 << 30,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            duplicate_window: Duration::from_secs(120),
            dead_letter_max_age: Duration::from_secs(14 * 86_400),
        }
    }
}

/// Handles to the JetStream objects every process uses.
#[derive(Debug, Clone)]
pub struct Topology {
    pub jetstream: jetstream::Context,
    pub questions: stream::Stream,
    pub webhooks: stream::Stream,
    pub config: QueueConfig,
}

impl Topology {
    /// Connects a JetStream context whose API calls and publish acks give up
    /// after 5 s, so a dead server surfaces as an error rather than a hang.
    pub fn context(client: async_nats::Client) -> jetstream::Context {
        jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .build(client)
    }

    /// Creates or updates the question, dead-letter, advisory and webhook
    /// streams and their consumers.
    pub async fn ensure(
        client: async_nats::Client,
        config: &QueueConfig,
    ) -> Result<Topology, QueueError> {
        let jetstream = Self::context(client);
        let questions = create_or_update_stream(&jetstream, questions_stream(config)).await?;
        create_or_update_stream(&jetstream, dead_stream(config)).await?;
        create_or_update_stream(&jetstream, advisory_stream()).await?;
        let webhooks = create_or_update_stream(&jetstream, crate::webhook::stream_config()).await?;
        webhooks
            .create_consumer(crate::webhook::consumer_config())
            .await
            .map_err(|err| QueueError::Consumer {
                consumer: crate::webhook::CONSUMER.to_owned(),
                source: err.into(),
            })?;
        for priority in Priority::ALL {
            let consumer = worker_consumer(priority, config);
            let name = subjects::consumer(priority);
            questions
                .create_consumer(consumer)
                .await
                .map_err(|err| QueueError::Consumer {
                    consumer: name,
                    source: err.into(),
                })?;
        }
        let advisories = jetstream
            .get_stream(subjects::ADVISORY_STREAM)
            .await
            .map_err(|err| QueueError::Stream {
                stream: subjects::ADVISORY_STREAM.to_owned(),
                source: err.into(),
            })?;
        advisories
            .create_consumer(consumer::pull::Config {
                durable_name: Some(subjects::ADVISORY_CONSUMER.to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(|err| QueueError::Consumer {
                consumer: subjects::ADVISORY_CONSUMER.to_owned(),
                source: err.into(),
            })?;
        Ok(Topology {
            jetstream,
            questions,
            webhooks,
            config: config.clone(),
        })
    }

    /// The durable consumer serving one priority.
    pub async fn consumer(&self, priority: Priority) -> Result<consumer::PullConsumer, QueueError> {
        let name = subjects::consumer(priority);
        self.questions
            .get_consumer(&name)
            .await
            .map_err(|err| QueueError::Consumer {
                consumer: name,
                source: err,
            })
    }
}

async fn create_or_update_stream(
    jetstream: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, QueueError> {
    let failed = |source: async_nats::Error| QueueError::Stream {
        stream: config.name.clone(),
        source,
    };
    jetstream
        .create_or_update_stream(config.clone())
        .await
        .map_err(|err| failed(err.into()))?;
    jetstream
        .get_stream(&config.name)
        .await
        .map_err(|err| failed(err.into()))
}

fn questions_stream(config: &QueueConfig) -> stream::Config {
    stream::Config {
        name: subjects::QUESTIONS_STREAM.to_owned(),
        description: Some("Accepted questions waiting for a worker".to_owned()),
        subjects: vec![subjects::QUESTIONS_WILDCARD.to_owned()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        // Refuse new questions when full: the gateway turns this into 503
        // queue_full instead of the stream silently dropping old ones.
        discard: stream::DiscardPolicy::New,
        max_messages: config.max_messages,
        max_bytes: config.max_bytes,
        duplicate_window: config.duplicate_window,
        allow_direct: true,
        ..Default::default()
    }
}

fn dead_stream(config: &QueueConfig) -> stream::Config {
    stream::Config {
        name: subjects::DEAD_STREAM.to_owned(),
        description: Some("Questions that exhausted their deliveries".to_owned()),
        subjects: vec![subjects::DEAD_WILDCARD.to_owned()],
        storage: stream::StorageType::File,
        max_age: config.dead_letter_max_age,
        allow_direct: true,
        ..Default::default()
    }
}

fn advisory_stream() -> stream::Config {
    stream::Config {
        name: subjects::ADVISORY_STREAM.to_owned(),
        description: Some("Max-deliveries advisories of the question consumers".to_owned()),
        subjects: vec![subjects::max_deliveries_advisory_wildcard()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(7 * 86_400),
        ..Default::default()
    }
}

fn worker_consumer(priority: Priority, config: &QueueConfig) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(subjects::consumer(priority)),
        description: Some(format!("Workers pulling {priority} questions")),
        filter_subject: subjects::question(priority),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        max_deliver: config.max_deliver,
        // Bounds how many questions all workers together hold unacknowledged.
        max_ack_pending: 10_000,
        ..Default::default()
    }
}

/// Connects to NATS the way every ebb process does: named, reconnecting
/// forever with a short capped backoff (so a restarted server is back in use
/// within ~2 s), and tolerant of a server that is not up yet.
/// `subscription_capacity` bounds each subscription's buffer (messages past
/// it are dropped as a slow consumer); `None` keeps the client default.
pub async fn connect(
    url: &str,
    name: &str,
    subscription_capacity: Option<usize>,
) -> Result<async_nats::Client, QueueError> {
    let options = async_nats::ConnectOptions::new();
    let options = match subscription_capacity {
        Some(capacity) => options.subscription_capacity(capacity),
        None => options,
    };
    options
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| {
            ebb_runtime::backoff::exponential(
                Duration::from_millis(100),
                attempts as u64 + 1,
                Duration::from_secs(2),
            )
        })
        .connect(url)
        .await
        .map_err(|source| QueueError::Connect {
            url: url.to_owned(),
            source,
        })
}
