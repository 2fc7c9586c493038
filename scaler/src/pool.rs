//! Backends that turn a worker count into running workers.
//!
//! [`WorkerPool`] is what the scaler needs of any backend: list the workers
//! it started, start one, stop one gracefully. Implementations must be
//! idempotent and must never touch a worker they did not start; after a
//! scaler restart they adopt the workers they started before. The process
//! backend lives in [`process`], the Docker one (labels, images, GPU
//! requests) in [`docker`]; a Kubernetes one (a Deployment's scale
//! subresource) fits the same three calls.

pub mod docker;
pub mod process;

use std::future::Future;

pub use ebb_control::listing::{Phase, PoolWorker};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot start worker `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("no worker `{0}` in this pool")]
    UnknownWorker(String),
    #[error("docker: {0}")]
    Engine(String),
}

/// Lines of an exited worker's output kept for `/status` and the log.
pub const LAST_OUTPUT_LINES: usize = 20;
/// Longest line kept; the rest is cut (a stray binary dump stays bounded).
const LAST_OUTPUT_LINE_BYTES: usize = 400;

/// The last [`LAST_OUTPUT_LINES`] non-empty lines of a worker's output, as
/// `/status` shows them: terminal colour codes stripped, lines cut to
/// [`LAST_OUTPUT_LINE_BYTES`], and debug- or trace-level lines left out.
/// Workers log question text at debug level at most, so leaving those
/// lines out keeps students' questions out of `/status` and the scaler's
/// log even when an operator ran the workers with `RUST_LOG=debug`.
pub fn last_lines(output: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(output);
    let mut lines: Vec<String> = text
        .lines()
        .rev()
        .map(strip_ansi)
        .filter(|line| !line.trim().is_empty() && !is_debug(line))
        .take(LAST_OUTPUT_LINES)
        .map(|line| cut(line.trim_end(), LAST_OUTPUT_LINE_BYTES))
        .collect();
    lines.reverse();
    lines
}

/// Removes ANSI escape sequences (`ESC [ ... final`), which the worker's
/// text logs carry when its colours are on.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            // Parameters and intermediates, up to the final byte @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// A tracing line at debug or trace level, in the text or JSON format.
fn is_debug(line: &str) -> bool {
    let text_level = line
        .split_whitespace()
        .take(2)
        .any(|word| word == "DEBUG" || word == "TRACE");
    text_level || line.contains(r#""level":"DEBUG""#) || line.contains(r#""level":"TRACE""#)
}

fn cut(line: &str, max: usize) -> String {
    if line.len() <= max {
        return line.to_owned();
    }
    let mut end = max;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} …", &line[..end])
}

/// A set of workers the scaler owns.
pub trait WorkerPool: Send {
    /// Every worker this pool started and still tracks; exits since the last
    /// call are reported once. Also enforces stop grace periods.
    fn list(&mut self) -> impl Future<Output = Result<Vec<PoolWorker>, PoolError>> + Send;
    /// Starts one worker; returns its id.
    fn start(&mut self) -> impl Future<Output = Result<String, PoolError>> + Send;
    /// Asks one worker to drain and stop (SIGTERM or equivalent); it is
    /// killed if it has not exited within the grace period. Stopping a
    /// worker that is already stopping does nothing.
    fn stop(&mut self, id: &str) -> impl Future<Output = Result<(), PoolError>> + Send;
    /// Takes over the workers another scaler of the pool left (called
    /// when this one becomes the active scaler). Nothing to do for a pool
    /// that finds its workers afresh at every `list` (Docker's labels).
    fn adopt(&mut self) -> impl Future<Output = Result<(), PoolError>> + Send {
        async { Ok(()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_lines_are_kept_without_colours_debug_lines_or_blank_ones() {
        let mut output = String::new();
        for n in 0..30 {
            output.push_str(&format!("line {n}\n"));
        }
        output.push_str("\n2026-01-01T00:00:00Z DEBUG ebb_worker: Why is the sky blue?\n");
        output.push_str(r#"{"timestamp":"x","level":"TRACE","fields":{"message":"secret"}}"#);
        output.push('\n');
        output.push_str(
            "\u{1b}[2m2026-01-01T00:00:00Z\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m ebb_worker: cannot download model.safetensors from huggingface.co\n\n",
        );
        let lines = last_lines(output.as_bytes());
        assert_eq!(lines.len(), LAST_OUTPUT_LINES);
        assert_eq!(lines[0], "line 11");
        assert_eq!(
            lines.last().unwrap(),
            "2026-01-01T00:00:00Z ERROR ebb_worker: cannot download model.safetensors from huggingface.co"
        );
        assert!(
            !lines
                .iter()
                .any(|l| l.contains("sky") || l.contains("secret")),
            "{lines:?}"
        );
    }

    #[test]
    fn long_lines_and_broken_utf8_are_bounded() {
        let mut output = "é".repeat(1000).into_bytes();
        output.extend_from_slice(b"\n\xff\xfe tail\n");
        let lines = last_lines(&output);
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].len() <= LAST_OUTPUT_LINE_BYTES + 4,
            "{}",
            lines[0].len()
        );
        assert!(lines[1].ends_with(" tail"));
        assert!(last_lines(b"").is_empty());
    }
}
