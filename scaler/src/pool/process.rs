//! The local backend: `ebb-worker` processes.
//!
//! Each worker runs in its own process group (a Ctrl-C to the scaler does
//! not reach it) and is recorded in `<state_dir>/<pool>/<id>.json` with its
//! pid and the kernel's start time of that pid, so a restarted scaler adopts
//! exactly the processes it started and cannot mistake a recycled pid for
//! one of them. Output goes to `<id>.log` beside the record; when a worker
//! exits its last lines are read from there for `/status`, and the logs of
//! the last [`KEPT_LOGS`] exited workers are kept for an operator to read
//! whole (older ones are removed, so a crash loop cannot fill the disk).

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Phase, PoolError, PoolWorker, WorkerPool, last_lines};
use ebb_control::config::ProcessBackendConfig;

/// Logs of exited workers kept in the state directory.
pub const KEPT_LOGS: usize = 10;
/// How much of the end of a log is read for its last lines.
const TAIL_BYTES: u64 = 16 * 1024;

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    id: String,
    pid: u32,
    /// Field 22 of `/proc/<pid>/stat`: distinguishes a recycled pid.
    proc_start: u64,
    started_at: DateTime<Utc>,
    /// Set once the worker was asked to drain, so a restarted scaler still
    /// enforces the grace period and does not count the exit as a crash.
    #[serde(default)]
    stopping_since: Option<DateTime<Utc>>,
}

#[derive(Debug)]
struct Managed {
    record: Record,
    /// `None` for a worker adopted from an earlier scaler run.
    child: Option<Child>,
    stopping_since: Option<DateTime<Utc>>,
    killed: bool,
}

#[derive(Debug)]
pub struct ProcessPool {
    config: ProcessBackendConfig,
    dir: PathBuf,
    grace: Duration,
    workers: BTreeMap<String, Managed>,
    started: u64,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> PoolError + '_ {
    move |source| PoolError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl ProcessPool {
    /// Opens the pool's state directory and adopts the workers recorded there
    /// that are still alive; records of dead ones are removed.
    pub fn open(config: ProcessBackendConfig, grace: Duration) -> Result<ProcessPool, PoolError> {
        let dir = config.state_dir.join(&config.pool);
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let mut pool = ProcessPool {
            config,
            dir,
            grace,
            workers: BTreeMap::new(),
            started: 0,
        };
        pool.adopt_recorded()?;
        pool.prune_logs();
        Ok(pool)
    }

    /// Makes the recorded workers this pool's: alive ones are adopted (or
    /// kept, with their child handle, when this scaler started them),
    /// records of dead ones are removed, and workers no longer recorded
    /// (another scaler of the pool stopped them) are forgotten.
    fn adopt_recorded(&mut self) -> Result<(), PoolError> {
        let dir = &self.dir;
        let mut workers = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
            let path = entry.map_err(io_error(dir))?.path();
            if path.extension().is_none_or(|ext| ext != "json") {
                continue;
            }
            let record: Option<Record> = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok());
            match record {
                Some(record) if process_start(record.pid) == Some(record.proc_start) => {
                    let managed = match self.workers.remove(&record.id) {
                        Some(mine) => mine,
                        None => {
                            tracing::info!(worker_id = %record.id, pid = record.pid, "adopted a running worker");
                            Managed {
                                stopping_since: record.stopping_since,
                                record,
                                child: None,
                                killed: false,
                            }
                        }
                    };
                    workers.insert(managed.record.id.clone(), managed);
                }
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        self.workers = workers;
        Ok(())
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    /// Removes the logs of exited workers but the newest [`KEPT_LOGS`].
    fn prune_logs(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut exited: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
            .filter(|path| {
                path.file_stem()
                    .and_then(|stem| stem.to_str())
                    .is_none_or(|id| !self.workers.contains_key(id))
            })
            .map(|path| {
                let modified = std::fs::metadata(&path)
                    .and_then(|meta| meta.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                (modified, path)
            })
            .collect();
        exited.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
        for (_, path) in exited.into_iter().skip(KEPT_LOGS) {
            if let Err(err) = std::fs::remove_file(&path) {
                tracing::debug!(path = %path.display(), cause = %err, "cannot remove an old worker log");
            }
        }
    }

    /// Pids of the workers this pool tracks (for tests and diagnostics).
    pub fn pids(&self) -> Vec<u32> {
        self.workers.values().map(|w| w.record.pid).collect()
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes a record atomically (write, then rename).
    fn write_record(&self, record: &Record) -> Result<(), PoolError> {
        let path = self.record_path(&record.id);
        let staging = path.with_extension("json.tmp");
        std::fs::write(
            &staging,
            serde_json::to_vec(record).expect("records serialize"),
        )
        .and_then(|()| std::fs::rename(&staging, &path))
        .map_err(io_error(&path))
    }

    fn has_exited(managed: &mut Managed) -> Option<String> {
        match managed.child.as_mut() {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(err) => Some(format!("unknown ({err})")),
            },
            None => (process_start(managed.record.pid) != Some(managed.record.proc_start))
                .then(|| "exited (adopted worker)".to_owned()),
        }
    }
}

impl WorkerPool for ProcessPool {
    async fn adopt(&mut self) -> Result<(), PoolError> {
        self.adopt_recorded()
    }

    async fn list(&mut self) -> Result<Vec<PoolWorker>, PoolError> {
        let now = Utc::now();
        let mut listed = Vec::with_capacity(self.workers.len());
        let mut gone = Vec::new();
        for (id, managed) in &mut self.workers {
            let phase = if let Some(status) = Self::has_exited(managed) {
                gone.push(id.clone());
                Phase::Exited {
                    status,
                    requested: managed.stopping_since.is_some(),
                    last_output: tail_of(&self.dir.join(format!("{id}.log"))),
                }
            } else if let Some(since) = managed.stopping_since {
                let overdue = (now - since).to_std().unwrap_or_default() > self.grace;
                if overdue && !managed.killed {
                    tracing::warn!(worker_id = %id, "still draining after the grace period; killing it");
                    signal(managed, "KILL");
                    managed.killed = true;
                }
                Phase::Stopping { since }
            } else {
                Phase::Running
            };
            listed.push(PoolWorker {
                id: id.clone(),
                started_at: managed.record.started_at,
                phase,
            });
        }
        let exits = !gone.is_empty();
        for id in gone {
            self.workers.remove(&id);
            let _ = std::fs::remove_file(self.record_path(&id));
        }
        if exits {
            self.prune_logs();
        }
        Ok(listed)
    }

    async fn start(&mut self) -> Result<String, PoolError> {
        self.started += 1;
        let started_at = Utc::now();
        let id = format!(
            "{}-{}-{}",
            self.config.pool,
            started_at.timestamp_millis(),
            self.started
        );
        let log_path = self.log_path(&id);
        let log = std::fs::File::create(&log_path).map_err(io_error(&log_path))?;
        let child = Command::new(&self.config.command)
            .args(&self.config.args)
            .envs(&self.config.env)
            .env("EBB_WORKER_ID", &id)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_error(&log_path))?)
            .stderr(log)
            .spawn()
            .map_err(|source| PoolError::Spawn {
                command: self.config.command.display().to_string(),
                source,
            })?;
        let pid = child.id();
        let record = Record {
            id: id.clone(),
            pid,
            proc_start: process_start(pid).unwrap_or(0),
            started_at,
            stopping_since: None,
        };
        if let Err(err) = self.write_record(&record) {
            // Untracked workers are what adoption must never produce.
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            return Err(err);
        }
        tracing::info!(worker_id = %id, pid, "started worker");
        self.workers.insert(
            id.clone(),
            Managed {
                record,
                child: Some(child),
                stopping_since: None,
                killed: false,
            },
        );
        Ok(id)
    }

    async fn stop(&mut self, id: &str) -> Result<(), PoolError> {
        let managed = self
            .workers
            .get_mut(id)
            .ok_or_else(|| PoolError::UnknownWorker(id.to_owned()))?;
        if managed.stopping_since.is_none() {
            tracing::info!(worker_id = %id, "stopping worker (drain)");
            signal(managed, "TERM");
            let since = Utc::now();
            managed.stopping_since = Some(since);
            managed.record.stopping_since = Some(since);
            let path = self.dir.join(format!("{id}.json"));
            std::fs::write(
                &path,
                serde_json::to_vec(&managed.record).expect("records serialize"),
            )
            .map_err(io_error(&path))?;
        }
        Ok(())
    }
}

/// The last lines of a worker's log; none if it cannot be read.
fn tail_of(path: &Path) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let read = || -> std::io::Result<(Vec<u8>, bool)> {
        let mut file = std::fs::File::open(path)?;
        let from = file.metadata()?.len().saturating_sub(TAIL_BYTES);
        file.seek(SeekFrom::Start(from))?;
        let mut bytes = Vec::new();
        file.take(TAIL_BYTES).read_to_end(&mut bytes)?;
        Ok((bytes, from > 0))
    };
    match read() {
        Ok((bytes, cut)) => {
            // A cut-off first line is not a line: skip to the first newline.
            let start = if cut {
                bytes.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1)
            } else {
                0
            };
            last_lines(&bytes[start..])
        }
        Err(err) => {
            tracing::debug!(path = %path.display(), cause = %err, "cannot read an exited worker's log");
            Vec::new()
        }
    }
}

/// The kernel's start time (in clock ticks since boot) of a live process.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields resume
    // after the last ')', starting with field 3.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    let state = fields.next()?;
    if state == "Z" {
        return None; // a zombie has exited
    }
    fields.nth(18)?.parse().ok()
}

/// Signals the worker's whole process group (a wrapper script's children
/// too), after checking the pid still belongs to the process we started.
fn signal(managed: &Managed, name: &str) {
    let pid = managed.record.pid;
    if managed.child.is_none() && process_start(pid) != Some(managed.record.proc_start) {
        return; // an adopted worker that is already gone; its pid may be reused
    }
    let sent = Command::new("kill")
        .arg(format!("-{name}"))
        .arg("--")
        .arg(format!("-{pid}"))
        .stderr(Stdio::null())
        .status();
    if !sent.is_ok_and(|status| status.success()) {
        tracing::warn!(
            pid,
            signal = name,
            "could not signal the worker's process group"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_of_this_process_is_readable_and_stable() {
        let me = std::process::id();
        let first = process_start(me).expect("own /proc entry");
        assert_eq!(process_start(me), Some(first));
        assert_eq!(process_start(u32::MAX), None);
    }

    /// Lists `pool` until a worker exits; that exit.
    async fn next_exit(pool: &mut ProcessPool) -> PoolWorker {
        for _ in 0..200 {
            let listed = pool.list().await.expect("list");
            if let Some(exit) = listed
                .into_iter()
                .find(|w| matches!(w.phase, Phase::Exited { .. }))
            {
                return exit;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no worker exited");
    }

    #[tokio::test]
    async fn an_exited_worker_leaves_its_last_lines_and_old_logs_are_removed() {
        let state_dir = std::env::temp_dir().join(format!(
            "ebb-process-pool-{}-{}",
            std::process::id(),
            Utc::now().timestamp_nanos_opt().unwrap_or_default()
        ));
        let config = ProcessBackendConfig {
            command: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                "seq 1 40; echo 'cannot open /models/missing: No such file' >&2; exit 3".into(),
            ],
            env: Default::default(),
            state_dir: state_dir.clone(),
            pool: "p".into(),
        };
        let mut pool = ProcessPool::open(config, Duration::from_secs(5)).expect("open");
        let id = pool.start().await.expect("start");
        let exit = next_exit(&mut pool).await;
        assert_eq!(exit.id, id);
        let Phase::Exited {
            status,
            requested,
            last_output,
        } = exit.phase
        else {
            unreachable!()
        };
        assert!(!requested);
        assert!(status.contains('3'), "{status}");
        assert_eq!(last_output.len(), crate::pool::LAST_OUTPUT_LINES);
        assert_eq!(last_output[0], "22");
        assert_eq!(
            last_output.last().unwrap(),
            "cannot open /models/missing: No such file"
        );

        for _ in 0..KEPT_LOGS + 2 {
            pool.start().await.expect("start");
            next_exit(&mut pool).await;
        }
        let logs = std::fs::read_dir(state_dir.join("p"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "log"))
            })
            .count();
        assert_eq!(logs, KEPT_LOGS, "only the newest logs are kept");
        let _ = std::fs::remove_dir_all(&state_dir);
    }
}
