//! Real NATS and Redis servers, one per test, killed on Drop. Both run as
//! ebb deploys them: only the users of `ebb-credentials` get in, each role
//! with its permissions. Test clients log in as the operator (everything):
//! [`NatsServer::client`], [`RedisServer::url`]; ebb's processes as their
//! role, with `login_args`.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ebb_credentials::{Credentials, Role, Service};

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not open port {port} within 15 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A directory removed on Drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "ebb-{label}-{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            ebb_nats::now_ms()
        ));
        std::fs::create_dir_all(&path).expect("create a temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn spawn(program: &str, args: &[String]) -> Child {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|err| {
            panic!("cannot start {program} ({err}); install it: apt-get install nats-server redis-server")
        })
}

pub(crate) fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Where ebb's processes find NATS and how they log in as a role: a
/// single server or a cluster.
pub trait NatsLogin {
    /// `--nats-url`, `--nats-user` and `--nats-password-file` of `role`.
    fn login_args(&self, role: Role) -> Vec<String>;
}

impl NatsLogin for NatsServer {
    fn login_args(&self, role: Role) -> Vec<String> {
        NatsServer::login_args(self, role)
    }
}

/// `--nats-url url`, and `role`'s user and password file in `credentials`.
pub fn nats_login_args(url: &str, credentials: &Credentials, role: Role) -> Vec<String> {
    let password_file = credentials.password_file(role, Service::Nats);
    vec![
        "--nats-url".to_owned(),
        url.to_owned(),
        "--nats-user".to_owned(),
        role.user(),
        "--nats-password-file".to_owned(),
        password_file.display().to_string(),
    ]
}

/// Where ebb's processes find Redis and how they log in as a role: one
/// server or a group behind Sentinels.
pub trait RedisLogin {
    /// `--redis-url` (or `--redis-sentinels`), `--redis-user` and
    /// `--redis-password-file` of `role`.
    fn login_args(&self, role: Role) -> Vec<String>;
}

impl RedisLogin for RedisServer {
    fn login_args(&self, role: Role) -> Vec<String> {
        RedisServer::login_args(self, role)
    }
}

/// `--redis-user` and `--redis-password-file` of `role` in `credentials`.
pub fn redis_user_args(credentials: &Credentials, role: Role) -> Vec<String> {
    let password_file = credentials.password_file(role, Service::Redis);
    vec![
        "--redis-user".to_owned(),
        role.user(),
        "--redis-password-file".to_owned(),
        password_file.display().to_string(),
    ]
}

/// `nats-server -js` with its own store directory and credentials.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    store: TempDir,
    credentials: Credentials,
    extra_args: Vec<String>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        NatsServer::start_with(None, Vec::new())
    }

    /// Starts on a copy of the config file `base` (if any), which gets the
    /// users of this server's credentials, with extra arguments; the port
    /// and store directory flags given here still win over the file.
    /// The server picks its own port (`-p -1`, read back from its ports
    /// file), so parallel tests cannot race for one.
    pub fn start_with(base: Option<&Path>, extra_args: Vec<String>) -> NatsServer {
        let store = TempDir::new("nats");
        let credentials = Credentials::ensure(&store.path().join("credentials"), None)
            .expect("write the credentials");
        let mut config = match base {
            Some(base) => std::fs::read_to_string(base).expect("read the nats-server config"),
            None => String::new(),
        };
        // nats/server.conf includes them already (as compose mounts them).
        if !config.contains(INCLUDE_USERS) {
            config.push_str(&format!("\n{INCLUDE_USERS}\n"));
        }
        let config_path = store.path().join("server.conf");
        std::fs::write(&config_path, config).expect("write the nats-server config");
        let mut args = vec!["-c".to_owned(), config_path.display().to_string()];
        args.extend(extra_args);
        let mut server = NatsServer {
            child: None,
            port: 0,
            store,
            credentials,
            extra_args: args,
        };
        server.resume();
        server
    }

    /// The server's address; a client needs a login too
    /// ([`NatsServer::client`], [`NatsServer::login_args`]).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The URL with the operator's login in it, for clients that read one
    /// from the URL (nats-py; async-nats does not).
    pub fn operator_url(&self) -> String {
        format!(
            "nats://{}:{}@127.0.0.1:{}",
            Role::Operator.user(),
            self.operator_password(),
            self.port
        )
    }

    fn operator_password(&self) -> &str {
        let password = self.credentials.password(Role::Operator, Service::Nats);
        password.expect("the operator has a NATS password")
    }

    /// Connect options with the operator's login: a client that may do
    /// everything, for the tests' own reads and faults.
    pub fn operator(&self) -> async_nats::ConnectOptions {
        async_nats::ConnectOptions::with_user_and_password(
            Role::Operator.user(),
            self.operator_password().to_owned(),
        )
    }

    /// A client of the operator's.
    pub async fn client(&self) -> async_nats::Client {
        self.operator()
            .connect(self.url())
            .await
            .expect("connect to NATS as the operator")
    }

    /// `--nats-url`, `--nats-user` and `--nats-password-file` of `role`.
    pub fn login_args(&self, role: Role) -> Vec<String> {
        nats_login_args(&self.url(), &self.credentials, role)
    }

    /// What [`NatsServer::login_args`] parse to: for `ebb_nats::connect`.
    pub fn nats_args(&self, role: Role) -> ebb_runtime::NatsArgs {
        ebb_runtime::NatsArgs {
            nats_url: self.url(),
            nats_user: Some(role.user()),
            nats_password_file: Some(self.credentials.password_file(role, Service::Nats)),
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server; its JetStream store stays for [`NatsServer::resume`].
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again on the same port with the same store (the first
    /// start lets the server choose the port).
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "nats-server is already running");
        let ports_dir = self.store.path().join("ports");
        std::fs::create_dir_all(&ports_dir).expect("create the ports file directory");
        let port = match self.port {
            0 => "-1".to_owned(),
            port => port.to_string(),
        };
        let mut args = self.extra_args.clone();
        args.extend([
            "-js".to_owned(),
            "-a".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            port,
            "-sd".to_owned(),
            self.store.path().display().to_string(),
            "--ports_file_dir".to_owned(),
            ports_dir.display().to_string(),
        ]);
        let child = spawn("nats-server", &args);
        if self.port == 0 {
            self.port = client_port(&ports_dir.join(format!("nats-server_{}.ports", child.id())));
        }
        self.child = Some(child);
        wait_for_port(self.port, "nats-server");
    }
}

/// The line of nats/server.conf that brings in the users; its path is where
/// compose mounts the nats-server credentials and where the harness and
/// run-local write them, next to the config.
pub const INCLUDE_USERS: &str = "include \"credentials/nats-server/users.conf\"";

/// The client port in a nats-server ports file (`{"nats":["nats://host:port"]}`),
/// waiting for the server to write it.
fn client_port(ports_file: &Path) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ports = std::fs::read(ports_file)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
        let port = ports
            .as_ref()
            .and_then(|ports| ports["nats"][0].as_str())
            .and_then(|url| url.rsplit_once(':').and_then(|(_, port)| port.parse().ok()));
        if let Some(port) = port {
            return port;
        }
        assert!(
            Instant::now() < deadline,
            "nats-server wrote no ports file at {} within 15 s",
            ports_file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// `redis-server` persisting as ebb deploys it: an append-only file, written
/// before each reply and synced every second, so [`RedisServer::stop`]
/// (SIGKILL) and [`RedisServer::resume`] lose nothing.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: TempDir,
    credentials: Credentials,
    /// Flags after the usual ones (a replica's `--replicaof`).
    extra_args: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir = TempDir::new("redis");
        let credentials = Credentials::ensure(&dir.path().join("credentials"), None)
            .expect("write the credentials");
        RedisServer::start_with(dir, credentials, Vec::new())
    }

    /// A server in `dir` checking `credentials` (shared with other servers
    /// of a replication group), with `extra_args`.
    pub fn start_with(
        dir: TempDir,
        credentials: Credentials,
        extra_args: Vec<String>,
    ) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            dir,
            credentials,
            extra_args,
        };
        server.resume();
        server
    }

    /// The operator's URL: a login that may do everything.
    pub fn url(&self) -> String {
        let password = self.credentials.password(Role::Operator, Service::Redis);
        let password = password.expect("the operator has a Redis password");
        format!(
            "redis://{}:{password}@127.0.0.1:{}",
            Role::Operator.user(),
            self.port
        )
    }

    /// The operator's user and password (for `redis-cli`, `redis-benchmark`).
    pub fn operator_login(&self) -> (String, String) {
        let password = self.credentials.password(Role::Operator, Service::Redis);
        let password = password.expect("the operator has a Redis password");
        (Role::Operator.user(), password.to_owned())
    }

    /// The URL without a login (the server refuses its commands).
    pub fn anonymous_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `--redis-url`, `--redis-user` and `--redis-password-file` of `role`.
    pub fn login_args(&self, role: Role) -> Vec<String> {
        let mut args = vec!["--redis-url".to_owned(), self.anonymous_url()];
        args.extend(redis_user_args(&self.credentials, role));
        args
    }

    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            &self.dir.path().display().to_string(),
            "--aclfile",
            &self.credentials.redis_acl().display().to_string(),
        ]
        .into_iter()
        .map(str::to_owned)
        .chain(self.extra_args.iter().cloned())
        .collect();
        self.child = Some(spawn("redis-server", &args));
        wait_for_port(self.port, "redis-server");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}
