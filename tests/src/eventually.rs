//! The one way tests wait for something to happen: poll a check until it
//! yields, or fail naming what never happened and what was seen instead.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

const POLL_EVERY: Duration = Duration::from_millis(50);

/// Runs `check` every 50 ms until it returns `Ok(value)`, and returns that
/// value; after `within`, panics with `what` and the last `Err` (what the
/// check saw instead). The check runs at least once, however short `within`.
pub async fn eventually<T, Seen: Display, Checked: Future<Output = Result<T, Seen>>>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> Checked,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "never within {within:?}: {what}; last seen: {seen}"
            ),
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}
