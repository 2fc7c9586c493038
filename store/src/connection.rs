//! The Redis connection every clone of a [`crate::Store`] shares, and how
//! it follows a failover.
//!
//! One server (`--redis-url`): a [`ConnectionManager`], which reconnects by
//! itself. Behind Sentinels (`--redis-sentinels`): the Sentinels name the
//! master. A ConnectionManager alone would keep dialling the old address
//! after a failover, or keep writing into a demoted master that answers
//! `READONLY`, so [`RedisConnection`] asks the Sentinels again when a
//! command meets either (and every few seconds while commands flow, since a
//! demoted master still answers reads), and moves every clone to the new
//! master at once. A command refused with `READONLY` was not applied, so it
//! is sent again to the new master; any other failure is returned as it is:
//! callers already treat a Redis failure as an outage.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{
    Client, Cmd, ErrorKind, Pipeline, RedisConnectionInfo, RedisError, RedisFuture, RedisResult,
    Value,
};

/// How long a command may wait for a connection or an answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one lookup of the master may take, every Sentinel tried.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Lookups start at most this often: a burst of failing commands asks once.
const LOOKUP_GAP: Duration = Duration::from_millis(250);
/// While commands succeed, the Sentinels are asked again this often.
const RECHECK: Duration = Duration::from_secs(5);

/// A Redis connection that survives reconnects and, behind Sentinels,
/// failovers. Cheap to clone; every clone follows the same master.
#[derive(Clone)]
pub struct RedisConnection {
    shared: Arc<Shared>,
}

struct Shared {
    /// `None` behind Sentinels until the first lookup.
    master: Mutex<Option<Master>>,
    sentinels: Option<Sentinels>,
}

#[derive(Clone)]
struct Master {
    address: String,
    connection: ConnectionManager,
}

struct Sentinels {
    /// Held through a lookup, so lookups never run two at once.
    sentinel: tokio::sync::Mutex<Sentinel>,
    master_name: String,
    /// How to log in to the master they name.
    node: SentinelNodeConnectionInfo,
    /// When the last lookup started.
    looked_up: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let master = self.master().map(|master| master.address);
        f.debug_struct("RedisConnection")
            .field("master", &master)
            .field("behind_sentinels", &self.has_replicas())
            .finish()
    }
}

impl RedisConnection {
    /// One server; nothing is dialled until the first command.
    pub fn single(client: Client) -> RedisResult<RedisConnection> {
        let master = Master::lazy(client)?;
        Ok(RedisConnection {
            shared: Arc::new(Shared {
                master: Mutex::new(Some(master)),
                sentinels: None,
            }),
        })
    }

    /// The master the Sentinels at `urls` name `master_name`, logged in with
    /// `login`; nothing is asked until the first command.
    pub fn sentinel(
        urls: &[String],
        master_name: &str,
        login: RedisConnectionInfo,
    ) -> RedisResult<RedisConnection> {
        let urls: Vec<String> = urls
            .iter()
            .map(|url| match url.contains("://") {
                true => url.clone(),
                false => format!("redis://{url}"),
            })
            .collect();
        let sentinel = Sentinel::build(urls)?;
        Ok(RedisConnection {
            shared: Arc::new(Shared {
                master: Mutex::new(None),
                sentinels: Some(Sentinels {
                    sentinel: tokio::sync::Mutex::new(sentinel),
                    master_name: master_name.to_owned(),
                    node: SentinelNodeConnectionInfo::default().set_redis_connection_info(login),
                    looked_up: Mutex::new(None),
                }),
            }),
        })
    }

    /// Whether a master has replicas that a failover would promote: then a
    /// write that must survive one waits for a replica's copy.
    pub fn has_replicas(&self) -> bool {
        self.shared.sentinels.is_some()
    }

    fn master(&self) -> Option<Master> {
        self.shared.master.lock().expect("not poisoned").clone()
    }

    /// Sends through the current master; behind Sentinels, looks it up
    /// again when the send shows it moved (and resends a refused write).
    async fn run<T, S, F>(&self, send: S) -> RedisResult<T>
    where
        S: Fn(ConnectionManager) -> F,
        F: Future<Output = RedisResult<T>>,
    {
        let Some(sentinels) = &self.shared.sentinels else {
            let master = self.master().expect("a single server is set at once");
            return send(master.connection).await;
        };
        let master = match self.master() {
            Some(master) => {
                if sentinels.lookup_due(RECHECK) {
                    let this = self.clone();
                    tokio::spawn(async move { this.look_up().await });
                }
                master
            }
            None => self.look_up().await?,
        };
        let result = send(master.connection.clone()).await;
        let Err(err) = &result else { return result };
        if !master_lost(err) {
            return result;
        }
        match self.look_up().await {
            Ok(moved) if moved.address != master.address && refused_as_replica(err) => {
                send(moved.connection).await
            }
            _ => result,
        }
    }

    /// Asks the Sentinels for the master and moves every clone to it when
    /// it changed. Callers that arrive while a lookup runs share its answer.
    async fn look_up(&self) -> RedisResult<Master> {
        let sentinels = self.shared.sentinels.as_ref().expect("behind Sentinels");
        let mut sentinel = sentinels.sentinel.lock().await;
        if let Some(master) = self.master()
            && !sentinels.lookup_due(LOOKUP_GAP)
        {
            return Ok(master);
        }
        *sentinels.looked_up.lock().expect("not poisoned") = Some(Instant::now());
        let lookup = sentinel.async_master_for(&sentinels.master_name, Some(&sentinels.node));
        let client = tokio::time::timeout(LOOKUP_TIMEOUT, lookup)
            .await
            .map_err(|_| RedisError::from((ErrorKind::Io, "no Sentinel answered in time")))??;
        let address = client.get_connection_info().addr().to_string();
        let mut current = self.shared.master.lock().expect("not poisoned");
        if let Some(master) = current.as_ref()
            && master.address == address
        {
            return Ok(master.clone());
        }
        let master = Master::lazy(client)?;
        match current.as_ref() {
            Some(old) => {
                tracing::warn!(from = %old.address, to = %address, name = sentinels.master_name, "the Redis master moved: following it")
            }
            None => {
                tracing::info!(at = %address, name = sentinels.master_name, "the Sentinels name the Redis master")
            }
        }
        *current = Some(master.clone());
        Ok(master)
    }
}

impl Sentinels {
    fn lookup_due(&self, every: Duration) -> bool {
        let looked_up = self.looked_up.lock().expect("not poisoned");
        looked_up.is_none_or(|at| at.elapsed() >= every)
    }
}

impl Master {
    fn lazy(client: Client) -> RedisResult<Master> {
        let address = client.get_connection_info().addr().to_string();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let connection = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Master {
            address,
            connection,
        })
    }
}

/// Whether `err` may mean the master is elsewhere now: it is gone, or it
/// was demoted to a replica.
fn master_lost(err: &RedisError) -> bool {
    refused_as_replica(err)
        || err.is_io_error()
        || err.is_connection_refusal()
        || err.is_connection_dropped()
        || err.is_timeout()
}

/// A write refused by a replica: not applied, safe to send again.
fn refused_as_replica(err: &RedisError) -> bool {
    err.code() == Some("READONLY")
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(
            self.run(move |mut connection| async move { connection.req_packed_command(cmd).await }),
        )
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(self.run(move |mut connection| async move {
            connection
                .req_packed_commands(pipeline, offset, count)
                .await
        }))
    }

    fn get_db(&self) -> i64 {
        0
    }
}
