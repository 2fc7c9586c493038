//! Redis that fails over: a master, a replica and three Sentinels (quorum
//! two), each a process on its own loopback port, logging in as ebb deploys
//! them: the roles' users of `ebb-credentials` on the data nodes, the
//! replication user between them. Killed on Drop.
//!
//! The Sentinels declare a master down after 1 s without an answer (a
//! deployment would wait longer; `deploy/redis/sentinel.conf`), so a test's
//! failover takes a few seconds.

use std::process::Child;
use std::time::Duration;

use ebb_credentials::Credentials;
use ebb_nats::access::Role;
use ebb_store::access::REPLICATION_USER;

use crate::eventually;
use crate::servers::{
    RedisLogin, RedisServer, TempDir, free_port, kill, redis_user_args, spawn, wait_for_port,
};

/// The name the Sentinels monitor the master under (ebb's default).
pub const MASTER_NAME: &str = "ebb";

/// Two data nodes (either may be the master) and three Sentinels.
#[derive(Debug)]
pub struct SentinelRedis {
    pub nodes: [RedisServer; 2],
    sentinels: Vec<(u16, Option<Child>)>,
    credentials: Credentials,
    dir: TempDir,
}

impl SentinelRedis {
    /// Starts the group and waits until every Sentinel sees the master, its
    /// replica in sync and the other Sentinels: from then on a failover can
    /// happen.
    pub async fn start() -> SentinelRedis {
        let dir = TempDir::new("redis-group");
        let credentials = Credentials::ensure(&dir.path().join("credentials"), None)
            .expect("write the credentials");
        let replication = [
            "--masteruser".to_owned(),
            REPLICATION_USER.to_owned(),
            "--masterauth".to_owned(),
            credentials.replication_password().to_owned(),
        ];
        let master = RedisServer::start_with(
            TempDir::new("redis-node"),
            credentials.clone(),
            replication.to_vec(),
        );
        let mut replica_args = replication.to_vec();
        replica_args.extend([
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            master.port.to_string(),
        ]);
        let replica = RedisServer::start_with(
            TempDir::new("redis-node"),
            credentials.clone(),
            replica_args,
        );
        let sentinels = (0..3)
            .map(|n| {
                let port = free_port();
                let config = dir.path().join(format!("sentinel-{n}.conf"));
                std::fs::write(&config, sentinel_config(port, master.port, &credentials))
                    .expect("write a sentinel config");
                let child = spawn(
                    "redis-server",
                    &[config.display().to_string(), "--sentinel".to_owned()],
                );
                wait_for_port(port, "redis-sentinel");
                (port, Some(child))
            })
            .collect();
        let group = SentinelRedis {
            nodes: [master, replica],
            sentinels,
            credentials,
            dir,
        };
        group.wait_formed().await;
        group
    }

    async fn wait_formed(&self) {
        for &(port, _) in &self.sentinels {
            eventually(
                Duration::from_secs(30),
                "a Sentinel sees the whole group",
                || async move {
                    let replicas = sentinel_query(port, "replicas").await?;
                    let others = sentinel_query(port, "sentinels").await?;
                    let in_sync = replicas.iter().any(|replica| {
                        field(replica, "flags") == Some("slave")
                            && field(replica, "master-link-status") == Some("ok")
                    });
                    match (in_sync, others.len()) {
                        (true, 2) => Ok(()),
                        seen => Err(format!("replica in sync, other Sentinels: {seen:?}")),
                    }
                },
            )
            .await;
        }
    }

    /// The port of the master the Sentinels name now (asked of the first
    /// one that answers).
    pub async fn master_port(&self) -> Option<u16> {
        for &(port, _) in &self.sentinels {
            let mut connection = match connect(port).await {
                Ok(connection) => connection,
                Err(_) => continue,
            };
            let address: Result<(String, String), _> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(MASTER_NAME)
                .query_async(&mut connection)
                .await;
            if let Ok((_, port)) = address {
                return port.parse().ok();
            }
        }
        None
    }

    /// The data node listening on `port`.
    pub fn node(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|node| node.port == port)
            .expect("a node of the group")
    }

    /// `ROLE` of the node on `port`: "master" or "slave".
    pub async fn role_of(&self, port: u16) -> Result<String, String> {
        let node = self
            .nodes
            .iter()
            .find(|node| node.port == port)
            .expect("a node");
        let client = redis::Client::open(node.url()).map_err(|err| err.to_string())?;
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|err| err.to_string())?;
        let role: Vec<redis::Value> = redis::cmd("ROLE")
            .query_async(&mut connection)
            .await
            .map_err(|err| err.to_string())?;
        match role.first() {
            Some(redis::Value::BulkString(name)) => Ok(String::from_utf8_lossy(name).into_owned()),
            other => Err(format!("{other:?}")),
        }
    }

    fn sentinel_list(&self) -> String {
        let addresses: Vec<String> = self
            .sentinels
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect();
        addresses.join(",")
    }
}

impl RedisLogin for SentinelRedis {
    fn login_args(&self, role: Role) -> Vec<String> {
        let mut args = vec![
            "--redis-sentinels".to_owned(),
            self.sentinel_list(),
            "--redis-master-name".to_owned(),
            MASTER_NAME.to_owned(),
        ];
        args.extend(redis_user_args(&self.credentials, role));
        args
    }
}

impl Drop for SentinelRedis {
    fn drop(&mut self) {
        for (_, child) in &mut self.sentinels {
            kill(child);
        }
        let _ = &self.dir;
    }
}

fn sentinel_config(port: u16, master_port: u16, credentials: &Credentials) -> String {
    format!(
        "port {port}\nbind 127.0.0.1\n\
         sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
         sentinel auth-user {MASTER_NAME} {REPLICATION_USER}\n\
         sentinel auth-pass {MASTER_NAME} {}\n\
         sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
         sentinel failover-timeout {MASTER_NAME} 5000\n",
        credentials.replication_password()
    )
}

async fn connect(port: u16) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    client.get_multiplexed_async_connection().await
}

type Fields = Vec<(String, String)>;

/// `SENTINEL <what> ebb` (replicas, sentinels): one field list per entry.
async fn sentinel_query(port: u16, what: &str) -> Result<Vec<Fields>, String> {
    let mut connection = connect(port).await.map_err(|err| err.to_string())?;
    let entries: Vec<Vec<String>> = redis::cmd("SENTINEL")
        .arg(what)
        .arg(MASTER_NAME)
        .query_async(&mut connection)
        .await
        .map_err(|err| err.to_string())?;
    Ok(entries
        .into_iter()
        .map(|flat| {
            flat.chunks(2)
                .filter_map(|pair| Some((pair.first()?.clone(), pair.get(1)?.clone())))
                .collect()
        })
        .collect())
}

fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}
