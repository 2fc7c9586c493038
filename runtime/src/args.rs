//! Flags every process shares, defined once so their names, env vars
//! and defaults cannot drift apart between binaries.

use std::path::{Path, PathBuf};

/// Where the shared services are, and who this process is to them.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
}

/// The NATS server, and this process's user on it.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    /// NATS server with JetStream enabled; for a cluster, every node's URL,
    /// comma-separated (the client tries them all, and moves to another
    /// when its node goes).
    #[arg(long, env = "EBB_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS user of this process (e.g. `ebb-worker`); its password is read
    /// from --nats-password-file.
    #[arg(long, env = "EBB_NATS_USER", requires = "nats_password_file")]
    pub nats_user: Option<String>,
    /// File holding the NATS user's password (`ebb-credentials` writes
    /// them), so the secret is in no command line or environment.
    #[arg(long, env = "EBB_NATS_PASSWORD_FILE", requires = "nats_user")]
    pub nats_password_file: Option<PathBuf>,
}

/// The Redis server, and this process's ACL user on it.
#[derive(Debug, Clone, clap::Args)]
pub struct RedisArgs {
    /// Redis server for status records and the answer cache (not used when
    /// --redis-sentinels is given).
    #[arg(long, env = "EBB_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Redis Sentinels that name the master (`host:port`, comma-separated).
    /// With them, ebb asks the Sentinels where the master is and follows it
    /// through a failover, instead of dialling --redis-url.
    #[arg(long, env = "EBB_REDIS_SENTINELS", value_delimiter = ',')]
    pub redis_sentinels: Vec<String>,
    /// The name the Sentinels monitor the master under (`sentinel monitor
    /// <name> ...`).
    #[arg(long, env = "EBB_REDIS_MASTER_NAME", default_value = "ebb")]
    pub redis_master_name: String,
    /// Redis ACL user of this process (e.g. `ebb-worker`); its password is
    /// read from --redis-password-file.
    #[arg(long, env = "EBB_REDIS_USER", requires = "redis_password_file")]
    pub redis_user: Option<String>,
    /// File holding the Redis user's password.
    #[arg(long, env = "EBB_REDIS_PASSWORD_FILE", requires = "redis_user")]
    pub redis_password_file: Option<PathBuf>,
}

/// A user name and its password, as read from a password file.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// A password file that cannot be used; names the flag that gave it.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("cannot read {flag} {}: {source}", path.display())]
    Unreadable {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} {} is empty", path.display())]
    Empty { flag: &'static str, path: PathBuf },
}

/// Reads a secret (a password, a token) from the file `flag` named: one
/// line, the trailing newline not part of it.
pub fn read_secret(path: &Path, flag: &'static str) -> Result<String, LoginError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoginError::Unreadable {
        flag,
        path: path.to_owned(),
        source,
    })?;
    let secret = text.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err(LoginError::Empty {
            flag,
            path: path.to_owned(),
        });
    }
    Ok(secret.to_owned())
}

impl Login {
    /// Reads the password of `user` from `path`.
    pub fn read(user: &str, path: &Path, flag: &'static str) -> Result<Login, LoginError> {
        Ok(Login {
            user: user.to_owned(),
            password: read_secret(path, flag)?,
        })
    }

    fn from_flags(
        user: &Option<String>,
        path: &Option<PathBuf>,
        flag: &'static str,
    ) -> Result<Option<Login>, LoginError> {
        match (user, path) {
            (Some(user), Some(path)) => Login::read(user, path, flag).map(Some),
            // clap's `requires` makes the flags come in pairs.
            _ => Ok(None),
        }
    }
}

impl NatsArgs {
    /// The servers of --nats-url, one per comma-separated entry.
    pub fn seed_urls(&self) -> Vec<&str> {
        self.nats_url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .collect()
    }

    /// The login given by --nats-user and --nats-password-file, if any
    /// (credentials in the URL work too, for development).
    pub fn login(&self) -> Result<Option<Login>, LoginError> {
        Login::from_flags(
            &self.nats_user,
            &self.nats_password_file,
            "--nats-password-file",
        )
    }
}

impl RedisArgs {
    /// The login given by --redis-user and --redis-password-file, if any.
    pub fn login(&self) -> Result<Option<Login>, LoginError> {
        Login::from_flags(
            &self.redis_user,
            &self.redis_password_file,
            "--redis-password-file",
        )
    }
}

/// Which model answers. Part of every cache key, so the gateway and the
/// workers must be given the same values.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Hugging Face repo id of the model: what workers load, what answers
    /// report, and part of the cache key.
    #[arg(
        long = "model",
        env = "EBB_MODEL",
        default_value = "Qwen/Qwen2.5-7B-Instruct"
    )]
    pub repo: String,
    /// Revision (branch, tag or commit) of the model repo; part of the cache key.
    #[arg(
        long = "model-revision",
        env = "EBB_MODEL_REVISION",
        default_value = "main"
    )]
    pub revision: String,
}

impl ModelArgs {
    /// `repo@revision`: the model identity stamped on jobs, answers and cache keys.
    pub fn identity(&self) -> String {
        format!("{}@{}", self.repo, self.revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        services: ServiceArgs,
    }

    #[test]
    fn a_password_file_is_read_without_its_newline() {
        let path = std::env::temp_dir().join(format!("ebb-login-{}", std::process::id()));
        std::fs::write(&path, "s3cret\n").unwrap();
        let cli = Cli::try_parse_from([
            "x",
            "--nats-user",
            "ebb-worker",
            "--nats-password-file",
            path.to_str().unwrap(),
        ])
        .unwrap();
        let login = cli.services.nats.login().unwrap().unwrap();
        assert_eq!(
            (login.user.as_str(), login.password.as_str()),
            ("ebb-worker", "s3cret")
        );
        assert!(!format!("{login:?}").contains("s3cret"));
        assert_eq!(cli.services.redis.login().unwrap(), None);
        std::fs::write(&path, "\n").unwrap();
        let empty = cli.services.nats.login().unwrap_err().to_string();
        assert!(
            empty.contains("--nats-password-file") && empty.contains("empty"),
            "{empty}"
        );
        std::fs::remove_file(&path).unwrap();
        let missing = cli.services.nats.login().unwrap_err().to_string();
        assert!(
            missing.starts_with("cannot read --nats-password-file"),
            "{missing}"
        );
    }

    #[test]
    fn a_user_without_a_password_file_is_refused() {
        let err = Cli::try_parse_from(["x", "--redis-user", "ebb-worker"]).unwrap_err();
        assert!(err.to_string().contains("--redis-password-file"), "{err}");
    }
}
