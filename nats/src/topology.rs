//! Streams and durable consumers: the gateway creates or updates them
//! ([`Topology::ensure`]), every other process opens and verifies them
//! ([`Topology::open`]).
//!
//! One owner, because the queue's bounds and delivery policy are one
//! decision: when every process wrote its own flags, the last one started
//! won. A reader whose flags differ logs each difference and keeps the
//! server's settings; before the owner has created the topology it gets
//! [`QueueError::NotCreated`] and waits.

use std::fmt::Debug;
use std::time::Duration;

use async_nats::jetstream::consumer::IntoConsumerConfig as _;
use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
use async_nats::jetstream::{self, ErrorCode, consumer, stream};

use crate::subjects::{self, Priority};

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot reach NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error(transparent)]
    Login(#[from] ebb_runtime::LoginError),
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
    /// The owner (the gateway) has not created this part of the topology yet.
    #[error(
        "the queue is not created yet: {object} is missing (the gateway creates it at its start)"
    )]
    NotCreated { object: String },
}

/// Queue limits and delivery policy: the gateway applies them, the other
/// processes compare them with what the gateway applied.
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
    /// Copies of every ebb stream (and so of its consumers, which inherit
    /// it) kept on different servers of a JetStream cluster: 3 in a
    /// three-node cluster, so losing one node loses no question; 1 on a
    /// single server. A stream's count can be raised or lowered in place.
    #[arg(long = "stream-replicas", env = "EBB_STREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub replicas: u8,
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
            replicas: 1,
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
    /// streams and their consumers to this process's flags: the owner's
    /// (the gateway's) step. Each setting it changes is logged.
    pub async fn ensure(
        client: async_nats::Client,
        config: &QueueConfig,
    ) -> Result<Topology, QueueError> {
        let jetstream = Self::context(client);
        let mut streams = Vec::new();
        for Wanted { stream, consumers } in wanted(config) {
            let handle = create_or_update_stream(&jetstream, stream).await?;
            for consumer in consumers {
                create_or_update_consumer(&handle, consumer).await?;
            }
            streams.push(handle);
        }
        Ok(Self::assemble(jetstream, streams, config))
    }

    /// Opens the streams and consumers the owner created, logging at warn
    /// each setting that differs from what this process's flags would
    /// create; changes nothing. [`QueueError::NotCreated`] until the owner
    /// has created all of them.
    pub async fn open(
        client: async_nats::Client,
        config: &QueueConfig,
    ) -> Result<Topology, QueueError> {
        let jetstream = Self::context(client);
        let mut streams = Vec::new();
        for Wanted { stream, consumers } in wanted(config) {
            let handle = existing_stream(&jetstream, &stream.name).await?;
            log_differences(
                &stream.name,
                None,
                &mismatches(&stream, &handle.cached_info().config),
                VERIFIED,
            );
            for consumer in consumers {
                verify_consumer(&handle, consumer).await?;
            }
            streams.push(handle);
        }
        Ok(Self::assemble(jetstream, streams, config))
    }

    /// Opens the question stream alone, for a process that only reads it
    /// and has no queue flags to compare (the scaler).
    /// [`QueueError::NotCreated`] until the owner has created it.
    pub async fn question_stream(client: async_nats::Client) -> Result<stream::Stream, QueueError> {
        existing_stream(&Self::context(client), subjects::QUESTIONS_STREAM).await
    }

    fn assemble(
        jetstream: jetstream::Context,
        streams: Vec<stream::Stream>,
        config: &QueueConfig,
    ) -> Topology {
        let named = |name: &str| {
            streams
                .iter()
                .find(|stream| stream.cached_info().config.name == name)
                .cloned()
                .expect("wanted() lists every stream a Topology holds")
        };
        Topology {
            questions: named(subjects::QUESTIONS_STREAM),
            webhooks: named(crate::webhook::STREAM),
            jetstream,
            config: config.clone(),
        }
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

/// One stream and its durable consumers, as this process's flags want them.
struct Wanted {
    stream: stream::Config,
    consumers: Vec<consumer::pull::Config>,
}

/// The whole topology, in creation order.
fn wanted(config: &QueueConfig) -> Vec<Wanted> {
    vec![
        Wanted {
            stream: questions_stream(config),
            consumers: Priority::ALL
                .into_iter()
                .map(|priority| worker_consumer(priority, config))
                .collect(),
        },
        Wanted {
            stream: dead_stream(config),
            consumers: Vec::new(),
        },
        Wanted {
            stream: advisory_stream(config),
            consumers: vec![advisory_consumer()],
        },
        Wanted {
            stream: crate::webhook::stream_config(config),
            consumers: vec![crate::webhook::consumer_config()],
        },
    ]
}

const CHANGED: &str = "changing the queue topology to this process's flag";
const VERIFIED: &str = "the queue topology differs from this process's flag; keeping the server's (the gateway owns it)";

fn log_differences(stream: &str, consumer: Option<&str>, found: &[Mismatch], message: &str) {
    for mismatch in found {
        tracing::warn!(
            stream,
            consumer,
            setting = mismatch.setting,
            expected = %mismatch.expected,
            actual = %mismatch.actual,
            "{message}"
        );
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
    // Only for the log: whether it exists or not, the update below decides.
    if let Ok(existing) = jetstream.get_stream(&config.name).await {
        let changes = mismatches(&config, &existing.cached_info().config);
        log_differences(&config.name, None, &changes, CHANGED);
    }
    jetstream
        .create_or_update_stream(config.clone())
        .await
        .map_err(|err| failed(err.into()))?;
    jetstream
        .get_stream(&config.name)
        .await
        .map_err(|err| failed(err.into()))
}

async fn create_or_update_consumer(
    stream: &stream::Stream,
    config: consumer::pull::Config,
) -> Result<(), QueueError> {
    let stream_name = &stream.cached_info().config.name;
    let name = config.durable_name.clone().unwrap_or_default();
    if let Ok(existing) = stream.consumer_info(&name).await {
        let changes = mismatches(&config.clone().into_consumer_config(), &existing.config);
        log_differences(stream_name, Some(&name), &changes, CHANGED);
    }
    stream
        .create_consumer(config)
        .await
        .map(drop)
        .map_err(|err| QueueError::Consumer {
            consumer: name,
            source: err.into(),
        })
}

/// The stream as the owner created it; [`QueueError::NotCreated`] if absent.
async fn existing_stream(
    jetstream: &jetstream::Context,
    name: &str,
) -> Result<stream::Stream, QueueError> {
    jetstream
        .get_stream(name)
        .await
        .map_err(|err| match err.kind() {
            GetStreamErrorKind::JetStream(reply)
                if reply.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                QueueError::NotCreated {
                    object: format!("stream {name}"),
                }
            }
            _ => QueueError::Stream {
                stream: name.to_owned(),
                source: err.into(),
            },
        })
}

async fn verify_consumer(
    stream: &stream::Stream,
    wanted: consumer::pull::Config,
) -> Result<(), QueueError> {
    let stream_name = &stream.cached_info().config.name;
    let name = wanted.durable_name.clone().unwrap_or_default();
    let info = stream
        .consumer_info(&name)
        .await
        .map_err(|err| match err.kind() {
            ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound => {
                QueueError::NotCreated {
                    object: format!("consumer {name} on stream {stream_name}"),
                }
            }
            _ => QueueError::Consumer {
                consumer: name.clone(),
                source: err.into(),
            },
        })?;
    let found = mismatches(&wanted.into_consumer_config(), &info.config);
    log_differences(stream_name, Some(&name), &found, VERIFIED);
    Ok(())
}

/// One setting a stream or consumer has on the server other than this
/// process's flags would give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub setting: &'static str,
    pub expected: String,
    pub actual: String,
}

/// One setting of a stream or consumer, shown as text for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub name: &'static str,
    pub value: String,
    /// Left at zero for the server to fill in its own default (`-1`, 2 min,
    /// 30 s...): such a setting is not compared, as the server's value
    /// never reads back as zero.
    pub server_default: bool,
}

impl Setting {
    /// A setting compared whatever its value (zero means what it says).
    fn exact(name: &'static str, value: impl Debug) -> Setting {
        Setting {
            name,
            value: format!("{value:?}"),
            server_default: false,
        }
    }

    /// A setting the server fills in when it is left at zero.
    fn defaulted<T: Debug + Default + PartialEq>(name: &'static str, value: T) -> Setting {
        Setting {
            server_default: value == T::default(),
            ..Setting::exact(name, value)
        }
    }
}

/// The settings of a stream or consumer that ebb decides, in a fixed order.
pub trait Settings {
    fn settings(&self) -> Vec<Setting>;
}

impl Settings for stream::Config {
    fn settings(&self) -> Vec<Setting> {
        vec![
            Setting::exact("subjects", &self.subjects),
            Setting::exact("retention", self.retention),
            Setting::exact("storage", self.storage),
            Setting::exact("discard", self.discard),
            Setting::defaulted("max_messages", self.max_messages),
            Setting::defaulted("max_bytes", self.max_bytes),
            Setting::exact("max_age", self.max_age),
            Setting::defaulted("duplicate_window", self.duplicate_window),
            Setting::exact("num_replicas", self.num_replicas),
        ]
    }
}

impl Settings for consumer::Config {
    fn settings(&self) -> Vec<Setting> {
        vec![
            Setting::exact("filter_subject", &self.filter_subject),
            Setting::exact("ack_policy", self.ack_policy),
            Setting::defaulted("ack_wait", self.ack_wait),
            Setting::defaulted("max_deliver", self.max_deliver),
            Setting::defaulted("max_ack_pending", self.max_ack_pending),
        ]
    }
}

/// The settings of `actual` (on the server) that differ from `expected`
/// (what this process's flags would create).
pub fn mismatches<C: Settings>(expected: &C, actual: &C) -> Vec<Mismatch> {
    expected
        .settings()
        .into_iter()
        .zip(actual.settings())
        .filter(|(want, have)| !want.server_default && want.value != have.value)
        .map(|(want, have)| Mismatch {
            setting: want.name,
            expected: want.value,
            actual: have.value,
        })
        .collect()
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
        num_replicas: config.replicas.into(),
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
        num_replicas: config.replicas.into(),
        ..Default::default()
    }
}

fn advisory_stream(config: &QueueConfig) -> stream::Config {
    stream::Config {
        name: subjects::ADVISORY_STREAM.to_owned(),
        description: Some("Max-deliveries advisories of the question consumers".to_owned()),
        subjects: vec![subjects::max_deliveries_advisory_wildcard()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(7 * 86_400),
        num_replicas: config.replicas.into(),
        ..Default::default()
    }
}

fn advisory_consumer() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(subjects::ADVISORY_CONSUMER.to_owned()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_flags_match() {
        let config = QueueConfig::default();
        let stream = questions_stream(&config);
        assert_eq!(mismatches(&stream, &stream), []);
        let consumer = worker_consumer(Priority::High, &config).into_consumer_config();
        assert_eq!(mismatches(&consumer, &consumer), []);
    }

    /// (setting, expected, actual) of each mismatch.
    fn differences<C: Settings>(expected: &C, actual: &C) -> Vec<(&'static str, String, String)> {
        let found = mismatches(expected, actual).into_iter();
        found.map(|m| (m.setting, m.expected, m.actual)).collect()
    }

    #[test]
    fn each_differing_setting_is_named_with_both_values() {
        let theirs = QueueConfig::default();
        let mine = QueueConfig {
            max_messages: 50,
            duplicate_window: Duration::from_secs(60),
            ack_wait: Duration::from_secs(3),
            max_deliver: 2,
            ..QueueConfig::default()
        };
        assert_eq!(
            differences(&questions_stream(&mine), &questions_stream(&theirs)),
            [
                ("max_messages", "50".to_owned(), "100000".to_owned()),
                ("duplicate_window", "60s".to_owned(), "120s".to_owned()),
            ]
        );
        let consumer = |config| worker_consumer(Priority::Low, config).into_consumer_config();
        assert_eq!(
            differences(&consumer(&mine), &consumer(&theirs)),
            [
                ("ack_wait", "3s".to_owned(), "30s".to_owned()),
                ("max_deliver", "2".to_owned(), "5".to_owned()),
            ]
        );
    }

    #[test]
    fn settings_left_to_the_server_are_not_compared() {
        // The server reads an unset limit back as -1 and an unset duplicate
        // window as 2 min: neither is a difference.
        let expected = advisory_stream(&QueueConfig::default());
        let actual = stream::Config {
            max_messages: -1,
            max_bytes: -1,
            duplicate_window: Duration::from_secs(120),
            ..advisory_stream(&QueueConfig::default())
        };
        assert_eq!(mismatches(&expected, &actual), []);
        let consumer = advisory_consumer().into_consumer_config();
        let read_back = consumer::Config {
            max_deliver: -1,
            max_ack_pending: 1_000,
            ..consumer.clone()
        };
        assert_eq!(mismatches(&consumer, &read_back), []);
        // A zero age is "unlimited", which the server keeps: compared.
        let aged = stream::Config {
            max_age: Duration::from_secs(3_600),
            ..expected.clone()
        };
        assert_eq!(mismatches(&expected, &aged)[0].setting, "max_age");
    }
}
