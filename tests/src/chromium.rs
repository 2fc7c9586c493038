//! Headless Chromium (Debian's package) loading a page: its DOM after the
//! page's scripts ran for a while, every URL the page requested (from
//! Chromium's own net log), and a screenshot.
//!
//! The browser's own background requests (updates, time, accounts) go to
//! a refused proxy on loopback and no name resolves: nothing leaves the
//! machine.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::servers::TempDir;

/// What Chromium made of a page.
#[derive(Debug)]
pub struct Loaded {
    /// The DOM, serialized after `virtual_ms` of the page's timers.
    pub dom: String,
    /// Every URL the page requested (its scripts, styles, fetches) while
    /// loading and running, whatever its origin.
    pub requested: Vec<String>,
}

fn chromium(profile: &Path) -> Command {
    let mut command = Command::new("chromium");
    command.args([
        "--headless",
        // Root in a container has no user namespace for the sandbox.
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--hide-scrollbars",
        "--proxy-server=http://127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ]);
    command.arg(format!("--user-data-dir={}", profile.display()));
    command
}

/// Loads `url` (of `origin`, e.g. `http://127.0.0.1:9090`), lets its
/// timers run for `virtual_ms` of virtual time, and returns the DOM and the
/// URLs the page requested.
pub fn load(origin: &str, url: &str, virtual_ms: u64) -> Loaded {
    let profile = TempDir::new("chromium");
    let net_log = profile.path().join("net-log.json");
    let output = chromium(profile.path())
        .arg(format!("--log-net-log={}", net_log.display()))
        .arg(format!("--virtual-time-budget={virtual_ms}"))
        .args(["--dump-dom", url])
        .output()
        .expect("run chromium (Debian's `chromium` package; scripts/test installs it)");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let log = std::fs::read_to_string(&net_log).expect("chromium wrote its net log");
    Loaded {
        dom: String::from_utf8_lossy(&output.stdout).into_owned(),
        requested: requested_by(&log, origin),
    }
}

/// Saves a `width` x `height` screenshot of `url` to `path` (PNG).
pub fn screenshot(url: &str, path: &Path, (width, height): (u32, u32), virtual_ms: u64) {
    let profile = TempDir::new("chromium");
    let output = chromium(profile.path())
        .arg(format!("--window-size={width},{height}"))
        .arg(format!("--virtual-time-budget={virtual_ms}"))
        .arg(format!("--screenshot={}", path.display()))
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        output.status.success() && path.is_file(),
        "no screenshot: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The URLs of the requests a page of `origin` made: the net log's events
/// whose `initiator` is that origin (the browser's own requests have none).
/// The log may end unterminated when Chromium exits: events are read one
/// per line.
fn requested_by(log: &str, origin: &str) -> Vec<String> {
    let mut urls: Vec<String> = log
        .lines()
        .filter_map(|line| {
            let line = line.trim().trim_end_matches(',');
            let event: Value = serde_json::from_str(line).ok()?;
            let params = &event["params"];
            (params["initiator"].as_str()? == origin).then_some(())?;
            Some(params["url"].as_str()?.to_owned())
        })
        .collect();
    urls.sort();
    urls.dedup();
    urls
}
