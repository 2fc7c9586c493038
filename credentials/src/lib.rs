//! `ebb-credentials`: a password for each role on NATS and Redis, and the
//! server files that check them.
//!
//! One directory holds everything, a subdirectory per reader, so each part
//! of a deployment mounts only its own (compose gives each a volume):
//!
//! ```text
//! <dir>/gateway/nats-password   <dir>/gateway/redis-password
//! <dir>/worker/nats-password    <dir>/worker/redis-password
//! <dir>/scaler/nats-password
//! <dir>/operator/nats-password  <dir>/operator/redis-password
//! <dir>/nats-server/users.conf  (`authorization` block: users, permissions)
//! <dir>/redis-server/users.acl  (ACL file: users, password hashes, rules)
//! <dir>/redis-server/replication-password  (replicas' and Sentinels' login)
//! <dir>/redis-server/replication.conf  (`masteruser`/`masterauth` lines, for
//!                                       `redis-server <it> --replicaof ...`)
//! <dir>/{gateway,operator}/admin-token          (the gateway's `/admin/*`)
//! <dir>/{gateway,scaler,operator}/scaler-token  (the scaler's `/scale`)
//! ```
//!
//! [`Credentials::ensure`] keeps every password already there and makes the
//! missing ones, then rewrites both server files from them: running it
//! again (every `docker-compose up`) never locks out a running process, and
//! a new release's permissions reach the servers on their next start.
//! Subject permissions are `ebb_nats::access`, key rules `ebb_store::access`.
//!
//! # Layout
//! - this file: [`Credentials`] (load or make, write, locate).
//! - [`render`]: the nats-server and Redis files.
//! - `main.rs`: the `ebb-credentials` command.

pub mod render;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

pub use ebb_nats::access::Role;

/// A server a role logs in to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Service {
    Nats,
    Redis,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::Nats => "nats",
            Service::Redis => "redis",
        }
    }

    /// Whether `role` has a user on this server (the scaler has no Redis).
    pub fn serves(self, role: Role) -> bool {
        match self {
            Service::Nats => true,
            Service::Redis => ebb_store::access::acl_rules(role).is_some(),
        }
    }
}

/// The bearer tokens between ebb's HTTP APIs, and the roles that read each
/// (a copy in each one's directory).
pub const TOKENS: [(&str, &[Role]); 2] = [
    ("admin-token", &[Role::Gateway, Role::Operator]),
    // The gateway's `/admin/scale` forwards to the scaler's `/scale`.
    (
        "scaler-token",
        &[Role::Gateway, Role::Scaler, Role::Operator],
    ),
];

/// Characters of a password: safe unquoted in URLs, configs and shells.
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// 32 of 62 characters: about 190 bits.
const PASSWORD_LENGTH: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is empty: delete it to make a new password", path.display())]
    Empty { path: PathBuf },
    #[error("no randomness from the operating system: {0}")]
    Random(getrandom::Error),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CredentialsError + '_ {
    move |source| CredentialsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The passwords under one directory.
#[derive(Debug, Clone)]
pub struct Credentials {
    root: PathBuf,
    passwords: BTreeMap<(Service, &'static str), (Role, String)>,
    /// [`ebb_store::access::REPLICATION_USER`]'s password.
    replication: String,
}

impl Credentials {
    /// Reads the passwords under `root`, makes the missing ones, and writes
    /// the server files. Files are readable by their owner only; with
    /// `owner`, files and directories are given to that user id (compose's
    /// services run as 10001, the tool as root).
    pub fn ensure(root: &Path, owner: Option<u32>) -> Result<Credentials, CredentialsError> {
        let mut credentials = Credentials {
            root: root.to_owned(),
            passwords: BTreeMap::new(),
            replication: String::new(),
        };
        let writer = Writer { owner };
        for role in Role::ALL {
            writer.directory(&root.join(role.name()))?;
            for service in [Service::Nats, Service::Redis] {
                if !service.serves(role) {
                    continue;
                }
                let path = credentials.password_file(role, service);
                let password = match std::fs::read_to_string(&path) {
                    Ok(text) => existing(text, &path)?,
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                        let password = new_password()?;
                        writer.file(&path, &format!("{password}\n"))?;
                        password
                    }
                    Err(err) => return Err(io_error(&path)(err)),
                };
                credentials
                    .passwords
                    .insert((service, role.name()), (role, password));
            }
        }
        for (name, readers) in TOKENS {
            let copies: Vec<PathBuf> = readers
                .iter()
                .map(|role| credentials.token_file(*role, name))
                .collect();
            ensure_copies(&writer, &copies)?;
        }
        writer.directory(&root.join("nats-server"))?;
        writer.file(&credentials.nats_users(), &render::nats_users(&credentials))?;
        writer.directory(&root.join("redis-server"))?;
        let replication = credentials.replication_password_file();
        ensure_copies(&writer, std::slice::from_ref(&replication))?;
        credentials.replication = existing(
            std::fs::read_to_string(&replication).map_err(io_error(&replication))?,
            &replication,
        )?;
        writer.file(&credentials.redis_acl(), &render::redis_acl(&credentials))?;
        writer.file(
            &credentials.redis_replication_conf(),
            &render::redis_replication(&credentials),
        )?;
        Ok(credentials)
    }

    /// `<dir>/<role>/<service>-password`.
    pub fn password_file(&self, role: Role, service: Service) -> PathBuf {
        self.root
            .join(role.name())
            .join(format!("{}-password", service.name()))
    }

    /// `<dir>/<role>/<token>` (see [`TOKENS`]).
    pub fn token_file(&self, role: Role, token: &str) -> PathBuf {
        self.root.join(role.name()).join(token)
    }

    /// The nats-server `authorization` block, for its config's `include`.
    pub fn nats_users(&self) -> PathBuf {
        self.root.join("nats-server").join("users.conf")
    }

    /// The Redis ACL file, for `redis-server --aclfile`.
    pub fn redis_acl(&self) -> PathBuf {
        self.root.join("redis-server").join("users.acl")
    }

    /// The password replicas and Sentinels log in to the master with (user
    /// [`ebb_store::access::REPLICATION_USER`]).
    pub fn replication_password_file(&self) -> PathBuf {
        self.root.join("redis-server").join("replication-password")
    }

    /// A redis-server config file with the replication login: every data
    /// node of a replicated Redis starts with it, since any may become a
    /// replica.
    pub fn redis_replication_conf(&self) -> PathBuf {
        self.root.join("redis-server").join("replication.conf")
    }

    pub fn replication_password(&self) -> &str {
        &self.replication
    }

    /// The password of `role` on `service`, if it has a user there.
    pub fn password(&self, role: Role, service: Service) -> Option<&str> {
        self.passwords
            .get(&(service, role.name()))
            .map(|(_, password)| password.as_str())
    }

    /// Every role with a user on `service`, and its password.
    pub fn users(&self, service: Service) -> impl Iterator<Item = (Role, &str)> {
        self.passwords
            .iter()
            .filter(move |((of, _), _)| *of == service)
            .map(|(_, (role, password))| (*role, password.as_str()))
    }
}

/// One secret in every file of `copies`: the first one there is kept (a
/// reader that lost its copy gets it back), or a new one.
fn ensure_copies(writer: &Writer, copies: &[PathBuf]) -> Result<(), CredentialsError> {
    let found = copies
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok().map(|text| (text, path)));
    let secret = match found {
        Some((text, path)) => existing(text, path)?,
        None => new_password()?,
    };
    for path in copies {
        let current = std::fs::read_to_string(path).unwrap_or_default();
        if current.trim_end_matches(['\r', '\n']) != secret {
            writer.file(path, &format!("{secret}\n"))?;
        }
    }
    Ok(())
}

fn existing(text: String, path: &Path) -> Result<String, CredentialsError> {
    let password = text.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err(CredentialsError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(password.to_owned())
}

fn new_password() -> Result<String, CredentialsError> {
    let mut password = String::with_capacity(PASSWORD_LENGTH);
    let mut bytes = [0u8; 64];
    while password.len() < PASSWORD_LENGTH {
        getrandom::fill(&mut bytes).map_err(CredentialsError::Random)?;
        // Only bytes below a multiple of the alphabet's size: no bias.
        let fair = 256 - 256 % ALPHABET.len();
        for byte in bytes.iter().filter(|byte| usize::from(**byte) < fair) {
            if password.len() == PASSWORD_LENGTH {
                break;
            }
            password.push(char::from(ALPHABET[usize::from(*byte) % ALPHABET.len()]));
        }
    }
    Ok(password)
}

/// Writes owner-only files and directories.
struct Writer {
    owner: Option<u32>,
}

impl Writer {
    fn directory(&self, path: &Path) -> Result<(), CredentialsError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io_error(path))?;
        // A directory that existed (a volume's root) keeps no wider mode.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error(path))?;
        self.chown(path)
    }

    /// Replaces `path` whole (a reader never sees half a file).
    fn file(&self, path: &Path, text: &str) -> Result<(), CredentialsError> {
        let staging = path.with_extension("new");
        let _ = std::fs::remove_file(&staging);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&staging)
            .map_err(io_error(&staging))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_error(&staging))?;
        self.chown(&staging)?;
        std::fs::rename(&staging, path).map_err(io_error(path))
    }

    fn chown(&self, path: &Path) -> Result<(), CredentialsError> {
        match self.owner {
            Some(uid) => {
                std::os::unix::fs::chown(path, Some(uid), Some(uid)).map_err(io_error(path))
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_root(label: &str) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("ebb-credentials-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        root
    }

    #[test]
    fn passwords_are_made_once_and_kept() {
        let root = temp_root("kept");
        let first = Credentials::ensure(&root, None).unwrap();
        let worker = first
            .password(Role::Worker, Service::Redis)
            .unwrap()
            .to_owned();
        assert_eq!(worker.len(), PASSWORD_LENGTH);
        assert!(worker.bytes().all(|byte| ALPHABET.contains(&byte)));
        assert_ne!(
            Some(worker.as_str()),
            first.password(Role::Gateway, Service::Redis)
        );
        assert_eq!(first.password(Role::Scaler, Service::Redis), None);
        let mode = std::fs::metadata(first.password_file(Role::Worker, Service::Nats))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400);

        let again = Credentials::ensure(&root, None).unwrap();
        assert_eq!(
            again.password(Role::Worker, Service::Redis),
            Some(worker.as_str())
        );
        let users = std::fs::read_to_string(again.nats_users()).unwrap();
        assert!(users.contains(again.password(Role::Scaler, Service::Nats).unwrap()));

        // A token is one secret in each of its readers' directories, and a
        // lost copy comes back.
        let scaler = again.token_file(Role::Scaler, "scaler-token");
        let token = std::fs::read_to_string(&scaler).unwrap();
        std::fs::remove_file(&scaler).unwrap();
        let third = Credentials::ensure(&root, None).unwrap();
        for role in [Role::Gateway, Role::Scaler, Role::Operator] {
            let copy = std::fs::read_to_string(third.token_file(role, "scaler-token")).unwrap();
            assert_eq!(copy, token, "{role:?}");
        }
        let admin =
            std::fs::read_to_string(third.token_file(Role::Gateway, "admin-token")).unwrap();
        assert_ne!(admin, token);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_emptied_password_file_is_an_error_naming_it() {
        let root = temp_root("empty");
        let credentials = Credentials::ensure(&root, None).unwrap();
        let path = credentials.password_file(Role::Gateway, Service::Nats);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "\n").unwrap();
        let err = Credentials::ensure(&root, None).unwrap_err().to_string();
        assert!(err.contains("gateway/nats-password is empty"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
