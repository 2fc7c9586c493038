//! The servers' side: nats-server users with their subject permissions, and
//! a Redis ACL file with password hashes.

use std::fmt::Write as _;

use sha2::{Digest as _, Sha256};

use crate::{Credentials, Service};

/// The `authorization` block nats-server includes. Passwords are in clear:
/// bcrypt would cost every connect (a worker's cold start) a hash, and the
/// file is readable only by the server's user. No `no_auth_user`: a client
/// without a login is refused.
pub fn nats_users(credentials: &Credentials) -> String {
    let mut text = String::from(
        "# Written by ebb-credentials from the role passwords beside this directory;\n\
         # rewritten on every run, so edit ebb_nats::access instead.\n\
         authorization {\n  users = [\n",
    );
    for (role, password) in credentials.users(Service::Nats) {
        let _ = write!(
            text,
            "    {{user: {}, password: {}",
            quoted(&role.user()),
            quoted(password)
        );
        if let Some(permissions) = role.nats_permissions() {
            let _ = write!(
                text,
                ",\n      permissions: {{\n        publish: {{allow: {}}}\n        subscribe: {{allow: {}}}\n      }}\n    ",
                list(&permissions.publish),
                list(&permissions.subscribe),
            );
        }
        text.push_str("}\n");
    }
    text.push_str("  ]\n}\n");
    text
}

/// The Redis ACL file: the default (password-less) user switched off, and
/// each role's user with the SHA-256 of its password and its rules.
pub fn redis_acl(credentials: &Credentials) -> String {
    let mut text = String::from("user default off\n");
    for (role, password) in credentials.users(Service::Redis) {
        let rules = ebb_store::access::acl_rules(role)
            .expect("only roles with Redis rules have a password");
        let _ = writeln!(
            text,
            "user {} reset on #{} {rules}",
            role.user(),
            sha256_hex(password)
        );
    }
    let _ = writeln!(
        text,
        "user {} reset on #{} {}",
        ebb_store::access::REPLICATION_USER,
        sha256_hex(credentials.replication_password()),
        ebb_store::access::REPLICATION_RULES
    );
    text
}

/// The replication login a data node uses when it is a replica.
pub fn redis_replication(credentials: &Credentials) -> String {
    format!(
        "masteruser {}\nmasterauth {}\n",
        ebb_store::access::REPLICATION_USER,
        credentials.replication_password()
    )
}

fn sha256_hex(password: &str) -> String {
    let hash = Sha256::digest(password.as_bytes());
    hash.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A double-quoted string: nats-server reads `$` in unquoted values as a
/// variable, and every JetStream subject starts with one.
fn quoted(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|item| quoted(item)).collect();
    format!("[{}]", quoted.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Role;

    #[test]
    fn each_role_is_a_user_and_only_the_operator_has_no_limits() {
        let root = std::env::temp_dir().join(format!("ebb-render-{}", std::process::id()));
        let credentials = Credentials::ensure(&root, None).unwrap();
        let nats = nats_users(&credentials);
        for role in Role::ALL {
            assert!(
                nats.contains(&format!("user: \"{}\"", role.user())),
                "{nats}"
            );
        }
        assert_eq!(nats.matches("permissions:").count(), 3, "{nats}");
        assert!(
            nats.contains("\"$JS.API.CONSUMER.MSG.NEXT.EBB_QUESTIONS.*\""),
            "{nats}"
        );

        let acl = redis_acl(&credentials);
        assert!(acl.starts_with("user default off\n"), "{acl}");
        // Three roles and the replication user.
        assert_eq!(acl.lines().count(), 5, "{acl}");
        assert!(acl.contains("user ebb-replication reset on #"), "{acl}");
        let worker = credentials.password(Role::Worker, Service::Redis).unwrap();
        assert!(!acl.contains(worker), "the ACL file holds hashes only");
        assert!(!acl.contains(credentials.replication_password()), "{acl}");
        let replication = redis_replication(&credentials);
        assert!(replication.contains(credentials.replication_password()));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
