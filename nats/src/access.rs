//! Who may use which subject: the NATS users of ebb's roles and their
//! permissions, written next to the subjects so a new subject and its
//! permission change together. `ebb-credentials` renders them into the
//! server's `authorization` block; every process logs in as its role
//! ([`crate::connect`]).
//!
//! Each role gets what it does and no more. Above all, only the gateway may
//! touch the JetStream API beyond reading (create, delete, purge), and no
//! role may publish on `$JS.EVENT.>` (a forged max-deliveries advisory would
//! fail a question), on `$SYS.>`, or read another role's replies.

use crate::subjects::{self, QUESTIONS_STREAM};
use crate::webhook;

/// The part a process plays; each logs in as its own NATS user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Gateway,
    Worker,
    Scaler,
    /// People and tools (the `nats` CLI, the chaos harness): everything.
    Operator,
}

/// Subjects a user may publish to and subscribe to; `None` is everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Gateway, Role::Worker, Role::Scaler, Role::Operator];

    /// `gateway`, `worker`, ...: names its directory of credentials.
    pub fn name(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Worker => "worker",
            Role::Scaler => "scaler",
            Role::Operator => "operator",
        }
    }

    /// Its user name on NATS and Redis: `ebb-<role>`.
    pub fn user(self) -> String {
        format!("ebb-{}", self.name())
    }

    /// What the role may do on NATS; `None` (the operator) is everything.
    pub fn nats_permissions(self) -> Option<Permissions> {
        let inbox = format!("{}.>", inbox_prefix(&self.user()));
        let questions = subjects::QUESTIONS_WILDCARD.to_owned();
        let answers = subjects::answers("*");
        let dead = subjects::DEAD_WILDCARD.to_owned();
        let webhooks = webhook::WILDCARD.to_owned();
        let heartbeat = subjects::HEARTBEAT.to_owned();
        let status = subjects::SCALER_STATUS.to_owned();
        let answered = subjects::ANSWERED.to_owned();
        let cache_hits = subjects::CACHE_HITS.to_owned();
        // Reading stream and consumer state is harmless and every role's
        // start checks it; workers and the scaler read the oldest waiting
        // question of each priority (its age orders and sizes the work).
        let read_api = [
            "$JS.API.INFO".to_owned(),
            "$JS.API.STREAM.INFO.*".to_owned(),
            "$JS.API.CONSUMER.INFO.*.*".to_owned(),
            format!("$JS.API.DIRECT.GET.{QUESTIONS_STREAM}"),
            format!("$JS.API.DIRECT.GET.{QUESTIONS_STREAM}.>"),
            format!("$JS.API.STREAM.MSG.GET.{QUESTIONS_STREAM}"),
        ];
        let (publish, subscribe) = match self {
            Role::Operator => return None,
            // The gateway owns the topology: it creates and repairs the
            // streams, reaps dead letters, delivers webhooks and settles
            // what a killed server left (the janitor).
            Role::Gateway => (
                vec![
                    questions,
                    answers.clone(),
                    dead,
                    webhooks,
                    "$JS.API.>".to_owned(),
                    "$JS.ACK.>".to_owned(),
                    cache_hits.clone(),
                ],
                vec![inbox, answers, heartbeat, status],
            ),
            Role::Worker => {
                let mut publish = read_api.to_vec();
                publish.extend([
                    format!("$JS.API.CONSUMER.MSG.NEXT.{QUESTIONS_STREAM}.*"),
                    format!("$JS.ACK.{QUESTIONS_STREAM}.>"),
                    answers,
                    dead,
                    webhooks,
                    heartbeat,
                    answered,
                ]);
                (publish, vec![inbox, questions])
            }
            Role::Scaler => {
                let mut publish = read_api.to_vec();
                publish.push(status);
                for bucket in [subjects::SCALER_STATE_BUCKET, subjects::SCALER_LEASE_BUCKET] {
                    publish.extend([
                        format!("$KV.{bucket}.>"),
                        format!("$JS.API.STREAM.CREATE.KV_{bucket}"),
                        format!("$JS.API.STREAM.UPDATE.KV_{bucket}"),
                        format!("$JS.API.STREAM.MSG.GET.KV_{bucket}"),
                        format!("$JS.API.DIRECT.GET.KV_{bucket}.>"),
                    ]);
                }
                (
                    publish,
                    vec![inbox, questions, heartbeat, answered, cache_hits],
                )
            }
        };
        Some(Permissions { publish, subscribe })
    }
}

/// The inbox prefix of a user's replies: `_INBOX.<user>`.
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX.{user}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(patterns: &[String], subject: &str) -> bool {
        patterns.iter().any(|pattern| matches(pattern, subject))
    }

    /// NATS subject matching: `*` is one token, `>` the rest.
    fn matches(pattern: &str, subject: &str) -> bool {
        let mut tokens = subject.split('.');
        for want in pattern.split('.') {
            match (want, tokens.next()) {
                (">", Some(_)) => return true,
                ("*", Some(_)) => {}
                (want, Some(token)) if want == token => {}
                _ => return false,
            }
        }
        tokens.next().is_none()
    }

    #[test]
    fn only_the_gateway_changes_streams_and_nobody_forges_advisories() {
        let advisory = format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{QUESTIONS_STREAM}.ebb-workers-normal"
        );
        let delete = format!("$JS.API.STREAM.DELETE.{QUESTIONS_STREAM}");
        for role in [Role::Gateway, Role::Worker, Role::Scaler] {
            let permissions = role.nats_permissions().unwrap();
            assert!(!allowed(&permissions.publish, &advisory), "{role:?}");
            assert!(
                !allowed(&permissions.publish, "$SYS.REQ.SERVER.PING"),
                "{role:?}"
            );
            assert_eq!(
                allowed(&permissions.publish, &delete),
                role == Role::Gateway
            );
            for other in [Role::Gateway, Role::Worker, Role::Scaler] {
                let reply = format!("{}.abc.1", inbox_prefix(&other.user()));
                assert_eq!(allowed(&permissions.subscribe, &reply), role == other);
            }
        }
        let worker = Role::Worker.nats_permissions().unwrap();
        assert!(allowed(
            &worker.publish,
            "$JS.API.CONSUMER.MSG.NEXT.EBB_QUESTIONS.ebb-workers-high"
        ));
        assert!(allowed(
            &worker.publish,
            "$JS.ACK.EBB_QUESTIONS.ebb-workers-high.1.2.3.4.5.6"
        ));
        assert!(!allowed(&worker.publish, "ebb.questions.high"));
        assert!(!allowed(&worker.publish, subjects::SCALER_STATUS));
        assert_eq!(Role::Operator.nats_permissions(), None);
    }
}
