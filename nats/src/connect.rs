//! How every ebb process connects to NATS: named, logged in as its role,
//! reconnecting forever.

use std::time::Duration;

use async_nats::{ClientError, Event, ServerError};
use ebb_runtime::{Login, NatsArgs};

use crate::QueueError;

/// Connects to NATS the way every ebb process does: named, logged in with
/// the user and password file of `args` (if given), reconnecting forever
/// with a short capped backoff (so a restarted server is back in use within
/// ~2 s), to any of the seed URLs (a cluster's nodes), and tolerant of a
/// server that is not up yet.
/// `subscription_capacity` bounds each subscription's buffer (messages past
/// it are dropped as a slow consumer); `None` keeps the client default.
pub async fn connect(
    args: &NatsArgs,
    name: &str,
    subscription_capacity: Option<usize>,
) -> Result<async_nats::Client, QueueError> {
    let login = args.login()?;
    let options = with_login(async_nats::ConnectOptions::new(), login.as_ref());
    let options = match subscription_capacity {
        Some(capacity) => options.subscription_capacity(capacity),
        None => options,
    };
    let url = &args.nats_url;
    let seeds = args.seed_urls();
    options
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        // async-nats asks for a delay before every attempt, the first
        // (`attempts == 1`) included: that one must be immediate, or every
        // worker's cold start pays for it (it was 200 ms, 90 % of the tiny
        // model's start).
        .reconnect_delay_callback(|attempts| match attempts {
            0 | 1 => Duration::ZERO,
            retry => ebb_runtime::backoff::exponential(
                Duration::from_millis(100),
                retry as u64 - 1,
                Duration::from_secs(2),
            ),
        })
        .connect(&seeds[..])
        .await
        .map_err(|source| QueueError::Connect {
            url: url.to_owned(),
            source,
        })
}

/// Logs in as `login`, with replies on the user's own inbox prefix: each
/// role may subscribe only to `_INBOX.<user>.>`, so no client reads
/// another's replies. The server's refusals (a wrong password, a forbidden
/// subject) are logged, since the client retries them silently otherwise.
fn with_login(
    options: async_nats::ConnectOptions,
    login: Option<&Login>,
) -> async_nats::ConnectOptions {
    let Some(login) = login else {
        return options.event_callback(|event| async move { log_refusal(&event, "") });
    };
    let user = login.user.clone();
    options
        .user_and_password(login.user.clone(), login.password.clone())
        .custom_inbox_prefix(crate::access::inbox_prefix(&login.user))
        .event_callback(move |event| {
            let user = user.clone();
            async move { log_refusal(&event, &user) }
        })
}

fn log_refusal(event: &Event, user: &str) {
    match event {
        // A refused first connect comes as the client's error, a refused
        // reconnect as the server's.
        Event::ServerError(ServerError::AuthorizationViolation) => refused_login(user),
        Event::ClientError(ClientError::Other(error))
            if error.contains("authorization violation") =>
        {
            refused_login(user)
        }
        Event::ServerError(ServerError::Other(error))
            if error.contains("Permissions Violation") =>
        {
            tracing::error!(user, error, "NATS refused a subject to this user")
        }
        _ => {}
    }
}

fn refused_login(user: &str) {
    tracing::error!(
        user,
        "NATS refused the login (is the password file right?); retrying"
    );
}
