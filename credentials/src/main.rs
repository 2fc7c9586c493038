use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ebb_credentials::{Credentials, Role, Service};

/// Makes the passwords of ebb's roles (gateway, worker, scaler, operator) on
/// NATS and Redis and the admin tokens of the gateway and the scaler,
/// keeping those already there, and writes the servers' files:
/// nats-server/users.conf (users and subject permissions) and
/// redis-server/users.acl. Prints where each is; never a secret.
#[derive(Debug, Parser)]
#[command(name = "ebb-credentials", version, about)]
struct Cli {
    /// Directory of the credentials (created when missing).
    dir: PathBuf,
    /// Give files and directories to this user id (compose's services run
    /// as 10001).
    #[arg(long, env = "EBB_CREDENTIALS_OWNER")]
    owner: Option<u32>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match Credentials::ensure(&cli.dir, cli.owner) {
        Ok(credentials) => {
            for role in Role::ALL {
                for service in [Service::Nats, Service::Redis] {
                    if service.serves(role) {
                        let file = credentials.password_file(role, service);
                        println!("{} {service:?}: {}", role.user(), file.display());
                    }
                }
            }
            for (token, readers) in ebb_credentials::TOKENS {
                for role in readers {
                    let file = credentials.token_file(*role, token);
                    println!("{} {token}: {}", role.user(), file.display());
                }
            }
            println!(
                "nats-server include: {}",
                credentials.nats_users().display()
            );
            println!(
                "redis-server --aclfile {}",
                credentials.redis_acl().display()
            );
            println!(
                "redis replicas and Sentinels: {} (redis-server {})",
                credentials.replication_password_file().display(),
                credentials.redis_replication_conf().display()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
