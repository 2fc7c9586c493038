//! Redis: one status record per question, the answer cache and the
//! streamed pieces of answers in progress.
//!
//! Keys: `ebb:question:<id>` (JSON [`QuestionRecord`], 24 h),
//! `ebb:cache:<sha256>` (JSON [`CachedAnswer`], TTL set by the writer) and
//! `ebb:pieces:<id>` (list of the answer's streamed pieces, 1 h, for clients
//! that join a stream late) with `ebb:pieces-attempt:<id>` (the delivery
//! attempt they are from).
//! The connection is lazy and reconnects by itself, so a process starts and
//! keeps serving while Redis is down; callers decide whether a failure is
//! fatal (a worker's answer record) or a degradation (a cache lookup, a
//! `running` mark): every degradation goes through [`Store::degradable`],
//! which logs an outage once, when it starts, and once when it ends.

use std::future::Future;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ebb_runtime::{Login, RedisArgs};
use redis::{AsyncCommands, IntoConnectionInfo as _, RedisConnectionInfo};
use serde::Serialize;

use ebb_nats::{CachedAnswer, QuestionRecord};

use crate::connection::RedisConnection;

/// How long a status record lives after its last update.
pub const RECORD_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long an answer's streamed pieces stay readable after the last one.
pub const PIECES_TTL: Duration = Duration::from_secs(3600);
/// How long a terminal record waits for a replica's copy (behind
/// Sentinels); below the connection's 1 s answer timeout.
pub const REPLICA_WAIT: Duration = Duration::from_millis(500);
/// How long answers go without waiting once one found no replica.
pub const REPLICA_RECHECK: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Login(#[from] ebb_runtime::LoginError),
    #[error("{0} took too long")]
    TimedOut(&'static str),
    #[error("corrupt record under {key}: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
}

/// An answer's streamed pieces and the delivery attempt they belong to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pieces {
    /// 0 when nothing is stored.
    pub attempt: i64,
    pub texts: Vec<String>,
}

/// What [`Store::put_record`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Put {
    Written,
    /// The question had already ended: this record, which stands.
    Ended(Box<QuestionRecord>),
}

/// Status records and the answer cache, over one multiplexed connection.
#[derive(Clone)]
pub struct Store {
    pub(crate) connection: RedisConnection,
    /// Whether the last degradable call failed: shared by every clone, so
    /// an outage is logged once per process, not once per request.
    degraded: Arc<AtomicBool>,
    /// When a terminal record last had no replica's copy in time, if the
    /// one after it has not had one either.
    unreplicated: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Prepares a lazy connection: nothing is dialled until the first command,
    /// and every command fails fast (1 s) while Redis is unreachable.
    pub fn connect_lazy(url: &str) -> Result<Store, StoreError> {
        Store::connect_lazy_as(url, None)
    }

    /// [`Store::connect_lazy`] as the user of --redis-user and
    /// --redis-password-file (when given), or behind --redis-sentinels.
    pub fn connect(args: &RedisArgs) -> Result<Store, StoreError> {
        let login = args.login()?;
        match args.redis_sentinels.as_slice() {
            [] => Store::connect_lazy_as(&args.redis_url, login.as_ref()),
            sentinels => {
                Store::connect_sentinel(sentinels, &args.redis_master_name, login.as_ref())
            }
        }
    }

    fn connect_lazy_as(url: &str, login: Option<&Login>) -> Result<Store, StoreError> {
        let info = url.into_connection_info()?;
        let settings = with_login(info.redis_settings().clone(), login);
        let info = info.set_redis_settings(settings);
        let connection = RedisConnection::single(redis::Client::open(info)?)?;
        Ok(Store::over(connection))
    }

    /// The master the Sentinels at `sentinels` name `master_name`, followed
    /// through failovers (see [`RedisConnection`]).
    pub fn connect_sentinel(
        sentinels: &[String],
        master_name: &str,
        login: Option<&Login>,
    ) -> Result<Store, StoreError> {
        let login = with_login(RedisConnectionInfo::default(), login);
        let connection = RedisConnection::sentinel(sentinels, master_name, login)?;
        Ok(Store::over(connection))
    }

    fn over(connection: RedisConnection) -> Store {
        Store {
            connection,
            degraded: Arc::default(),
            unreplicated: Arc::default(),
        }
    }

    /// Runs a Redis call whose failure only degrades the service (no cache,
    /// no late-join pieces, a stale status): `None` on failure. Logs the
    /// first failure of an outage with what it costs (`loses`), and the
    /// recovery; not each failure in between.
    pub async fn degradable<T>(
        &self,
        loses: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Option<T> {
        match call.await {
            Ok(value) => {
                if self.degraded.swap(false, Ordering::Relaxed) {
                    tracing::info!("redis is back");
                }
                Some(value)
            }
            Err(err @ StoreError::Corrupt { .. }) => {
                // Redis answered: the unreadable entry is treated as missing.
                tracing::warn!(cause = %err, "ignoring an unreadable Redis entry");
                None
            }
            Err(err) => {
                if !self.degraded.swap(true, Ordering::Relaxed) {
                    tracing::error!(cause = %err, loses, "redis unavailable: degrading until it is back");
                } else {
                    tracing::debug!(cause = %err, loses, "redis still unavailable");
                }
                None
            }
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let _: String = redis::cmd("PING").query_async(&mut connection).await?;
        Ok(())
    }

    pub async fn record(&self, id: &str) -> Result<Option<QuestionRecord>, StoreError> {
        self.get_json(&record_key(id)).await
    }

    /// Writes the first `queued` record unless a worker already wrote a later
    /// one (it may answer before the gateway gets here). Returns whether it wrote.
    pub async fn insert_queued(&self, record: &QuestionRecord) -> Result<bool, StoreError> {
        let body = serde_json::to_string(record).expect("records serialize");
        let mut connection = self.connection.clone();
        let written: Option<String> = redis::cmd("SET")
            .arg(record_key(&record.id))
            .arg(body)
            .arg("NX")
            .arg("EX")
            .arg(RECORD_TTL.as_secs())
            .query_async(&mut connection)
            .await?;
        Ok(written.is_some())
    }

    /// Removes a question's record: one written before a publish that
    /// failed, for a question never accepted.
    pub async fn forget_record(&self, id: &str) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let _: () = connection.del(record_key(id)).await?;
        Ok(())
    }

    /// Writes a view of the question unless the stored record is terminal:
    /// an ended question stays as it ended, so a stale or duplicate
    /// delivery (or a worker that wakes after the reaper failed its
    /// question) can neither reopen it nor give it a second answer.
    pub async fn put_record(&self, record: &QuestionRecord) -> Result<Put, StoreError> {
        // Built once: a Script hashes its source (SHA-1, for EVALSHA) when made.
        static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
            redis::Script::new(
                r#"
            local current = redis.call('GET', KEYS[1])
            if current then
              local stored = cjson.decode(current)
              if stored['status'] == 'done' or stored['status'] == 'failed' then
                return {1, current}
              end
            end
            redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
            return {0, ''}
            "#,
            )
        });
        let script = &*SCRIPT;
        let key = record_key(&record.id);
        let body = serde_json::to_string(record).expect("records serialize");
        let mut connection = self.connection.clone();
        let (outcome, stored): (i64, Vec<u8>) = script
            .key(&key)
            .arg(body)
            .arg(RECORD_TTL.as_secs())
            .invoke_async(&mut connection)
            .await?;
        let stored = || {
            serde_json::from_slice(&stored).map_err(|source| StoreError::Corrupt {
                key: key.clone(),
                source,
            })
        };
        Ok(match outcome {
            0 => {
                if record.status.is_terminal() {
                    self.wait_for_replica().await?;
                }
                Put::Written
            }
            _ => Put::Ended(Box::new(stored()?)),
        })
    }

    /// Behind Sentinels, waits until a replica holds what was written so
    /// far: Redis replicates after it answers, and a terminal record must
    /// outlive its master once the question's message is acknowledged.
    /// Without a replica's copy in [`REPLICA_WAIT`] the write stands (the
    /// replica may be down: answering goes on), the risk is logged once per
    /// stretch, and the next [`REPLICA_RECHECK`] of answers do not wait.
    async fn wait_for_replica(&self) -> Result<(), StoreError> {
        if !self.connection.has_replicas() {
            return Ok(());
        }
        let unreplicated = *self.unreplicated.lock().expect("not poisoned");
        if unreplicated.is_some_and(|since| since.elapsed() < REPLICA_RECHECK) {
            return Ok(());
        }
        let mut connection = self.connection.clone();
        let copies: i64 = redis::cmd("WAIT")
            .arg(1)
            .arg(REPLICA_WAIT.as_millis() as u64)
            .query_async(&mut connection)
            .await?;
        let mut unreplicated = self.unreplicated.lock().expect("not poisoned");
        match (copies, unreplicated.is_some()) {
            (0, false) => tracing::warn!(
                waited_ms = REPLICA_WAIT.as_millis() as u64,
                "no Redis replica copied an answer: answers written until one does are lost if the master fails"
            ),
            (1.., true) => tracing::info!("a Redis replica copies answers again"),
            _ => {}
        }
        *unreplicated = (copies == 0).then(std::time::Instant::now);
        Ok(())
    }

    pub async fn cached_answer(&self, key: &str) -> Result<Option<CachedAnswer>, StoreError> {
        self.get_json(&cache_key(key)).await
    }

    pub async fn put_cached_answer(
        &self,
        key: &str,
        answer: &CachedAnswer,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.set_json(&cache_key(key), answer, ttl).await
    }

    /// Appends piece `seq` of delivery `attempt` of question `id`. A later
    /// attempt replaces an earlier one's pieces, atomically, so the list and
    /// its attempt number always agree; pieces of an earlier attempt that
    /// arrive after a later one started (a worker paused past the ack wait
    /// and resumed) are dropped, so two deliveries running at once never
    /// interleave in the list late joiners read. A piece goes only at its
    /// own position (`seq` = the list's length): two deliveries under the
    /// same attempt number (a nats-server killed before it synced the
    /// delivery count) cannot mix either, and a list that lost its tail (a
    /// Redis crash) stops growing rather than shift every later piece.
    pub async fn append_piece(
        &self,
        id: &str,
        attempt: i64,
        seq: u64,
        text: &str,
    ) -> Result<(), StoreError> {
        // Built once: a Script hashes its source (SHA-1, for EVALSHA) when made.
        static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
            redis::Script::new(
                r#"
            local current = tonumber(redis.call('GET', KEYS[2]) or '0')
            local attempt = tonumber(ARGV[1])
            if attempt < current then
              return 0
            end
            if attempt > current or ARGV[2] == '0' then
              redis.call('DEL', KEYS[1])
              redis.call('SET', KEYS[2], attempt)
            end
            if tonumber(ARGV[2]) ~= redis.call('LLEN', KEYS[1]) then
              return 0
            end
            redis.call('RPUSH', KEYS[1], ARGV[3])
            redis.call('EXPIRE', KEYS[1], ARGV[4])
            redis.call('EXPIRE', KEYS[2], ARGV[4])
            return 1
            "#,
            )
        });
        let script = &*SCRIPT;
        let mut connection = self.connection.clone();
        let _: i64 = script
            .key(pieces_key(id))
            .key(pieces_attempt_key(id))
            .arg(attempt)
            .arg(seq)
            .arg(text)
            .arg(PIECES_TTL.as_secs())
            .invoke_async(&mut connection)
            .await?;
        Ok(())
    }

    /// The pieces of the answer streamed so far (none when none or expired).
    pub async fn pieces(&self, id: &str) -> Result<Pieces, StoreError> {
        let mut connection = self.connection.clone();
        let (attempt, texts): (Option<i64>, Vec<String>) = redis::pipe()
            .atomic()
            .get(pieces_attempt_key(id))
            .lrange(pieces_key(id), 0, -1)
            .query_async(&mut connection)
            .await?;
        Ok(Pieces {
            attempt: attempt.unwrap_or(0),
            texts,
        })
    }

    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let mut connection = self.connection.clone();
        let body: Option<Vec<u8>> = connection.get(key).await?;
        body.map(|body| {
            serde_json::from_slice(&body).map_err(|source| StoreError::Corrupt {
                key: key.to_owned(),
                source,
            })
        })
        .transpose()
    }

    /// Sets `key` unless it exists (`SET NX GET`, one round trip): `None`
    /// when it wrote, else the value already there.
    pub async fn set_json_if_absent<T: Serialize + serde::de::DeserializeOwned>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<Option<T>, StoreError> {
        let body = serde_json::to_string(value).expect("values serialize");
        let mut connection = self.connection.clone();
        let earlier: Option<Vec<u8>> = redis::cmd("SET")
            .arg(key)
            .arg(body)
            .arg("NX")
            .arg("GET")
            .arg("EX")
            .arg(ttl.as_secs().max(1))
            .query_async(&mut connection)
            .await?;
        earlier
            .map(|body| {
                serde_json::from_slice(&body).map_err(|source| StoreError::Corrupt {
                    key: key.to_owned(),
                    source,
                })
            })
            .transpose()
    }

    async fn set_json<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let body = serde_json::to_string(value).expect("records serialize");
        let mut connection = self.connection.clone();
        let _: () = connection.set_ex(key, body, ttl.as_secs().max(1)).await?;
        Ok(())
    }
}

fn with_login(settings: RedisConnectionInfo, login: Option<&Login>) -> RedisConnectionInfo {
    match login {
        Some(login) => settings
            .set_username(&login.user)
            .set_password(&login.password),
        None => settings,
    }
}

pub fn record_key(id: &str) -> String {
    format!("ebb:question:{id}")
}

pub fn pieces_key(id: &str) -> String {
    format!("ebb:pieces:{id}")
}

pub fn pieces_attempt_key(id: &str) -> String {
    format!("ebb:pieces-attempt:{id}")
}

pub fn cache_key(key: &str) -> String {
    format!("ebb:cache:{key}")
}
