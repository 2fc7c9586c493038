//! Watching and guarding model downloads from the Hub.
//!
//! hf-hub 0.4.3 does the transfer: it fetches a file in 10 MB `Range`
//! chunks into `blobs/<etag>.sync.part`, records the bytes committed at the
//! end of that file, and resumes from there after an interrupted download
//! (so a killed worker loses at most one chunk). It also lays out the cache
//! (`blobs/`, `snapshots/<commit>/`, `refs/<revision>`) that offline mode
//! reads. What it lacks, this module adds:
//! - [`Tracker`]: progress over all the model's files (bytes, rate, ETA),
//!   logged at a sane interval and handed to a callback (the worker's
//!   heartbeat), fed through hf-hub's [`Progress`] trait.
//! - [`FileLock`]: hf-hub's own lock gives up after 5 s and then downloads
//!   the file again; this one waits for the other process and lets the
//!   caller find the file in the cache instead.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ebb_nats::DownloadProgress;
use hf_hub::api::tokio::Progress;

use super::ModelError;

/// Receives the download's progress, at most about once a second.
pub type ReportFn = Arc<dyn Fn(&DownloadProgress) + Send + Sync>;

/// How often progress reaches the report callback (heartbeats go out every
/// 2 s, so more often would be wasted).
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// The rate is measured over this recent window, so a stall shows quickly.
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// Samples kept for the rate: one per 100 ms over the window, bounded.
const RATE_SAMPLES: usize = 64;

/// When a progress log line is due: `interval` after the last one, or on
/// crossing a 10 % step of the total.
pub fn log_due(
    last: (Instant, Option<f64>),
    now: Instant,
    fraction: Option<f64>,
    interval: Duration,
) -> bool {
    let step = |f: f64| (f * 10.0).floor() as i64;
    // Nothing logged yet counts as 0 %.
    let crossed = fraction.is_some_and(|after| step(after) > step(last.1.unwrap_or(0.0)));
    crossed || now.saturating_duration_since(last.0) >= interval
}

/// Bytes a second over the recent window.
#[derive(Debug, Default)]
pub struct Rate {
    samples: VecDeque<(Instant, u64)>,
}

impl Rate {
    /// Records that `done` bytes are done at `now`.
    pub fn record(&mut self, now: Instant, done: u64) {
        let spaced = self
            .samples
            .back()
            .is_none_or(|(at, _)| now.saturating_duration_since(*at) >= Duration::from_millis(100));
        if spaced {
            self.samples.push_back((now, done));
        }
        while self.samples.len() > RATE_SAMPLES
            || self.samples.front().is_some_and(|(at, _)| {
                now.saturating_duration_since(*at) > RATE_WINDOW && self.samples.len() > 2
            })
        {
            self.samples.pop_front();
        }
    }

    /// Forgets the history: bytes found on disk (a resumed file) came at no
    /// measurable rate.
    pub fn restart(&mut self, now: Instant, done: u64) {
        self.samples.clear();
        self.samples.push_back((now, done));
    }

    /// Bytes a second from the oldest sample to `(now, done)`.
    pub fn per_second(&self, now: Instant, done: u64) -> f64 {
        let Some((at, before)) = self.samples.front() else {
            return 0.0;
        };
        let seconds = now.saturating_duration_since(*at).as_secs_f64();
        if seconds < 0.05 {
            return 0.0;
        }
        done.saturating_sub(*before) as f64 / seconds
    }
}

/// Progress over all the files of one model download.
pub struct Tracker {
    state: Mutex<State>,
    report: Option<ReportFn>,
    log_every: Duration,
}

struct State {
    /// Files to fetch and their sizes (`None`: the Hub did not say).
    files: Vec<(String, Option<u64>)>,
    file: String,
    /// The next update is hf-hub's "already on disk" count of a resumed file.
    resuming: bool,
    done: u64,
    file_started: Instant,
    file_done_at_start: u64,
    rate: Rate,
    last_log: (Instant, Option<f64>),
    last_report: Option<Instant>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker").finish_non_exhaustive()
    }
}

impl Tracker {
    pub fn new(report: Option<ReportFn>, log_every: Duration) -> Arc<Tracker> {
        let now = Instant::now();
        Arc::new(Tracker {
            state: Mutex::new(State {
                files: Vec::new(),
                file: String::new(),
                resuming: false,
                done: 0,
                file_started: now,
                file_done_at_start: 0,
                rate: Rate::default(),
                last_log: (now, None),
                last_report: None,
            }),
            report,
            log_every,
        })
    }

    /// Counts these files (not yet in the cache) into the total.
    pub fn announce(&self, files: impl IntoIterator<Item = (String, Option<u64>)>) {
        let mut state = self.lock();
        for (name, size) in files {
            if !state.files.iter().any(|(known, _)| *known == name) {
                state.files.push((name, size));
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn start_file(&self, file: &str, size: u64) {
        let mut state = self.lock();
        match state.files.iter_mut().find(|(name, _)| name == file) {
            Some((_, known)) => *known = Some(size),
            None => state.files.push((file.to_owned(), Some(size))),
        }
        let now = Instant::now();
        state.file = file.to_owned();
        state.resuming = true;
        state.file_started = now;
        state.file_done_at_start = state.done;
        let done = state.done;
        state.rate.restart(now, done);
        tracing::info!(file, bytes = size, "downloading model file");
    }

    fn add(&self, bytes: u64) {
        let now = Instant::now();
        let mut state = self.lock();
        state.done += bytes;
        if std::mem::take(&mut state.resuming) {
            let done = state.done;
            state.rate.restart(now, done);
            if bytes > 0 {
                tracing::info!(file = %state.file, bytes_on_disk = bytes, "resuming a partial download");
            }
            return;
        }
        let done = state.done;
        state.rate.record(now, done);
        let progress = progress_of(&state, now);
        let fraction = progress
            .bytes_total
            .map(|total| progress.bytes_done as f64 / total.max(1) as f64);
        if log_due(state.last_log, now, fraction, self.log_every) {
            state.last_log = (now, fraction);
            log(&progress);
        }
        let report_due = state
            .last_report
            .is_none_or(|at| now.saturating_duration_since(at) >= REPORT_EVERY);
        if report_due {
            state.last_report = Some(now);
            drop(state);
            self.send(&progress);
        }
    }

    fn finish_file(&self) {
        let now = Instant::now();
        let state = self.lock();
        let seconds = now
            .saturating_duration_since(state.file_started)
            .as_secs_f64();
        let bytes = state.done - state.file_done_at_start;
        tracing::info!(
            file = %state.file,
            bytes,
            seconds,
            bytes_per_second = bytes as f64 / seconds.max(1e-3),
            "downloaded model file"
        );
        let progress = progress_of(&state, now);
        drop(state);
        self.send(&progress);
    }

    fn send(&self, progress: &DownloadProgress) {
        if let Some(report) = &self.report {
            report(progress);
        }
    }

    /// hf-hub's progress hook for one file download.
    pub fn hook(self: &Arc<Self>) -> Hook {
        Hook(self.clone())
    }
}

fn progress_of(state: &State, now: Instant) -> DownloadProgress {
    DownloadProgress {
        file: state.file.clone(),
        bytes_done: state.done,
        bytes_total: state.files.iter().map(|(_, size)| *size).sum(),
        bytes_per_second: state.rate.per_second(now, state.done),
    }
}

fn log(progress: &DownloadProgress) {
    tracing::info!(
        file = %progress.file,
        bytes_done = progress.bytes_done,
        bytes_total = progress.bytes_total,
        bytes_per_second = progress.bytes_per_second.round(),
        eta_s = progress.eta_seconds().map(f64::round),
        "{progress}"
    );
}

/// Feeds hf-hub's per-chunk callbacks into a [`Tracker`]. hf-hub clones it
/// into each chunk's task, and its first `update` after `init` is the count
/// already on disk when resuming.
#[derive(Debug, Clone)]
pub struct Hook(Arc<Tracker>);

impl Progress for Hook {
    async fn init(&mut self, size: usize, filename: &str) {
        self.0.start_file(filename, size as u64);
    }

    async fn update(&mut self, size: usize) {
        self.0.add(size as u64);
    }

    async fn finish(&mut self) {
        self.0.finish_file();
    }
}

/// An exclusive lock on one file of one repo in the cache, shared by every
/// process using this `HF_HOME`; released on drop.
#[derive(Debug)]
pub struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    /// Waits (up to `timeout`) until no other process holds the lock on
    /// `file`. `Ok(None)`: waited out the timeout.
    pub async fn acquire(
        cache: &Path,
        repo_folder: &str,
        file: &str,
        timeout: Duration,
    ) -> Result<Option<FileLock>, ModelError> {
        let path = lock_path(cache, repo_folder, file);
        let io = |source| ModelError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(path.parent().unwrap_or(cache)).map_err(io)?;
        let handle = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let deadline = Instant::now() + timeout;
        let mut told = false;
        loop {
            match handle.try_lock() {
                Ok(()) => return Ok(Some(FileLock { _file: handle })),
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(source)) => return Err(io(source)),
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            if !std::mem::replace(&mut told, true) {
                tracing::info!(file, lock = %path.display(), "another process is downloading this file; waiting for it");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `<cache>/.locks/<repo folder>/<file>.ebb.lock` (next to where the Python
/// client keeps its locks).
fn lock_path(cache: &Path, repo_folder: &str, file: &str) -> PathBuf {
    cache
        .join(".locks")
        .join(repo_folder)
        .join(format!("{}.ebb.lock", file.replace('/', "--")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_every_interval_or_each_tenth_of_the_total() {
        let start = Instant::now();
        let every = Duration::from_secs(5);
        let at = |s: u64| start + Duration::from_secs(s);
        assert!(!log_due((start, Some(0.0)), at(1), Some(0.05), every));
        assert!(log_due((start, Some(0.05)), at(1), Some(0.11), every));
        assert!(!log_due((start, Some(0.11)), at(2), Some(0.19), every));
        assert!(log_due((start, Some(0.11)), at(5), Some(0.12), every));
        // Unknown total: time alone.
        assert!(!log_due((start, None), at(4), None, every));
        assert!(log_due((start, None), at(1), Some(0.1), every));
        assert!(log_due((start, None), at(6), None, every));
    }

    #[test]
    fn the_rate_covers_the_recent_window_only() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut rate = Rate::default();
        // 1 MB/s for 10 s, then 4 MB/s for 6 s.
        for tenth in 0..=100 {
            rate.record(at(tenth * 100), tenth * 100_000);
        }
        for tenth in 1..=60 {
            rate.record(at(10_000 + tenth * 100), 10_000_000 + tenth * 400_000);
        }
        let now = at(16_000);
        let per_second = rate.per_second(now, 34_000_000);
        assert!((per_second - 4e6).abs() < 0.2e6, "{per_second}");
        rate.restart(now, 34_000_000);
        assert_eq!(rate.per_second(now, 34_000_000), 0.0);
    }

    #[test]
    fn a_tracker_reports_the_total_over_all_files_and_counts_resumed_bytes() {
        let seen = Arc::new(Mutex::new(Vec::<DownloadProgress>::new()));
        let sink = seen.clone();
        let tracker = Tracker::new(
            Some(Arc::new(move |p: &DownloadProgress| {
                sink.lock().unwrap().push(p.clone())
            })),
            Duration::from_secs(5),
        );
        tracker.announce([("a".to_owned(), Some(100)), ("b".to_owned(), Some(50))]);
        tracker.start_file("a", 100);
        tracker.add(40); // already on disk
        tracker.add(60);
        tracker.finish_file();
        let last = seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!(last.file, "a");
        assert_eq!(last.bytes_done, 100);
        assert_eq!(last.bytes_total, Some(150));
        // A size the listing did not give is filled in when the file starts.
        tracker.announce([("c".to_owned(), None)]);
        tracker.start_file("b", 50);
        assert_eq!(
            progress_of(&tracker.lock(), Instant::now()).bytes_total,
            None
        );
        tracker.start_file("c", 10);
        assert_eq!(
            progress_of(&tracker.lock(), Instant::now()).bytes_total,
            Some(160)
        );
    }
}
