//! The Docker backend: worker containers on the local engine (`DOCKER_HOST`
//! honoured), through the Engine API.
//!
//! Every container it creates carries `io.ebb.pool=<pool>` and
//! `io.ebb.worker-id=<id>`; it lists, signals and removes only containers
//! with its pool label, so a restarted scaler adopts its own workers and
//! never touches anything else. Stopping sends SIGTERM (the worker drains),
//! then SIGKILL after the grace period; exited containers are removed, their
//! last lines of output read first (the worker's own account of a crash
//! would otherwise go with the container).

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, DeviceRequest, HostConfig, RestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, KillContainerOptions, ListContainersOptions, LogsOptions,
    RemoveContainerOptions, StartContainerOptions,
};
use chrono::{DateTime, Utc};
use futures::StreamExt;

use super::{LAST_OUTPUT_LINES, Phase, PoolError, PoolWorker, WorkerPool, last_lines};
use ebb_control::config::{DockerBackendConfig, GpuRequest};

pub const POOL_LABEL: &str = "io.ebb.pool";
pub const WORKER_LABEL: &str = "io.ebb.worker-id";
/// Processes (threads included) a worker container may run: the engine's
/// thread pool and the runtime's, with room to spare.
const WORKER_PIDS_LIMIT: i64 = 512;

#[derive(Debug)]
pub struct DockerPool {
    docker: Docker,
    config: DockerBackendConfig,
    grace: Duration,
    /// Workers asked to drain, by id; forgotten once their container is gone.
    stopping: HashMap<String, (DateTime<Utc>, bool)>,
    started: u64,
}

fn engine_error(what: &str, err: bollard::errors::Error) -> PoolError {
    PoolError::Engine(format!("{what}: {err}"))
}

impl DockerPool {
    /// Connects to the local engine (`DOCKER_HOST` or the default socket)
    /// and agrees on an API version with it when it answers.
    pub async fn connect(
        config: DockerBackendConfig,
        grace: Duration,
    ) -> Result<DockerPool, PoolError> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(|err| engine_error("cannot reach the Docker engine", err))?;
        // An engine that is down now may be up later: keep the default API
        // version, and let each round report the error in /status.
        let docker = match docker.clone().negotiate_version().await {
            Ok(negotiated) => negotiated,
            Err(err) => {
                tracing::error!(cause = %err, "cannot reach the Docker engine (is DOCKER_HOST right and the daemon running?)");
                docker
            }
        };
        Ok(DockerPool {
            docker,
            config,
            grace,
            stopping: HashMap::new(),
            started: 0,
        })
    }

    fn container_body(&self, id: &str) -> ContainerCreateBody {
        let mut env: Vec<String> = self
            .config
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.push(format!("EBB_WORKER_ID={id}"));
        let device_requests = self.config.gpus.as_ref().map(|gpus| {
            let (count, device_ids) = match gpus {
                GpuRequest::Count { count } => (Some(*count), None),
                GpuRequest::Devices { device_ids } => (None, Some(device_ids.clone())),
            };
            vec![DeviceRequest {
                driver: Some("nvidia".into()),
                count,
                device_ids,
                capabilities: Some(vec![vec!["gpu".into()]]),
                ..Default::default()
            }]
        });
        ContainerCreateBody {
            image: Some(self.config.image.clone()),
            cmd: self.config.command.clone(),
            env: Some(env),
            labels: Some(HashMap::from([
                (POOL_LABEL.to_owned(), self.config.pool.clone()),
                (WORKER_LABEL.to_owned(), id.to_owned()),
            ])),
            host_config: Some(HostConfig {
                network_mode: self.config.network.clone(),
                binds: (!self.config.volumes.is_empty()).then(|| self.config.volumes.clone()),
                device_requests,
                nano_cpus: self.config.cpus.map(|cpus| (cpus * 1e9) as i64),
                memory: self.config.memory_bytes,
                // The scaler replaces crashed workers itself, with backoff.
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::NO),
                    maximum_retry_count: None,
                }),
                // A tiny init as PID 1 forwards SIGTERM to the worker.
                init: Some(true),
                // A worker runs a model on untrusted questions: no Linux
                // capabilities, no privilege gained through setuid files,
                // and a bounded number of processes.
                cap_drop: Some(vec!["ALL".into()]),
                security_opt: Some(vec!["no-new-privileges:true".into()]),
                pids_limit: Some(WORKER_PIDS_LIMIT),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn signal(&self, container: &str, signal: &str) -> Result<(), PoolError> {
        let options = KillContainerOptions {
            signal: signal.to_owned(),
        };
        match self.docker.kill_container(container, Some(options)).await {
            Ok(()) => Ok(()),
            // Already stopped (409) or gone (404): the goal is reached.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404 | 409,
                ..
            }) => Ok(()),
            Err(err) => Err(engine_error(&format!("signalling {container}"), err)),
        }
    }

    fn container_name(&self, id: &str) -> String {
        format!("ebb-{id}")
    }

    /// The last lines of an exited container's output; none if the engine
    /// cannot give them (a log driver without reads, an engine hiccup).
    async fn last_output(&self, container: &str) -> Vec<String> {
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            // More than kept: debug lines and blank ones are left out.
            tail: (LAST_OUTPUT_LINES * 3).to_string(),
            ..Default::default()
        };
        let mut logs = self.docker.logs(container, Some(options));
        let mut output = Vec::new();
        let mut errors = Vec::new();
        let read = async {
            while let Some(chunk) = logs.next().await {
                let chunk = chunk?;
                if matches!(chunk, bollard::container::LogOutput::StdErr { .. }) {
                    errors.extend_from_slice(chunk.as_ref());
                }
                output.extend_from_slice(chunk.as_ref());
            }
            Ok::<_, bollard::errors::Error>(())
        };
        match tokio::time::timeout(LOGS_TIMEOUT, read).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::debug!(container, cause = %err, "cannot read an exited worker's logs");
            }
            Err(_) => tracing::debug!(container, "reading an exited worker's logs timed out"),
        }
        with_last_errors(last_lines(&output), &last_lines(&errors))
    }
}

/// Error lines kept whatever the order the engine gives.
const KEPT_ERROR_LINES: usize = 5;

/// The engine orders stdout and stderr by when it read them, not when they
/// were written, so a worker's last error may sort before its last
/// ordinary lines and fall off the tail; the error is the point, so the
/// last few error lines are kept in place of the oldest lines.
fn with_last_errors(mut lines: Vec<String>, errors: &[String]) -> Vec<String> {
    let kept = &errors[errors.len().saturating_sub(KEPT_ERROR_LINES)..];
    for error in kept {
        if !lines.contains(error) {
            if lines.len() >= LAST_OUTPUT_LINES {
                lines.remove(0);
            }
            lines.push(error.clone());
        }
    }
    lines
}

/// Longest the listing waits for an exited container's logs.
const LOGS_TIMEOUT: Duration = Duration::from_secs(5);

impl WorkerPool for DockerPool {
    async fn list(&mut self) -> Result<Vec<PoolWorker>, PoolError> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("{POOL_LABEL}={}", self.config.pool)],
        )]);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|err| engine_error("listing worker containers", err))?;
        let now = Utc::now();
        let mut listed = Vec::with_capacity(containers.len());
        let mut present = Vec::new();
        for container in containers {
            let labels = container.labels.unwrap_or_default();
            // The filter already did this; never act on a container without our label.
            if labels.get(POOL_LABEL) != Some(&self.config.pool) {
                continue;
            }
            let Some(id) = labels.get(WORKER_LABEL).cloned() else {
                continue;
            };
            let started_at =
                DateTime::from_timestamp(container.created.unwrap_or_default(), 0).unwrap_or(now);
            let name = self.container_name(&id);
            let phase = match container.state {
                Some(ContainerSummaryStateEnum::EXITED | ContainerSummaryStateEnum::DEAD) => {
                    let requested = self.stopping.remove(&id).is_some();
                    let last_output = self.last_output(&name).await;
                    let options = RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    };
                    if let Err(err) = self.docker.remove_container(&name, Some(options)).await {
                        tracing::warn!(worker_id = %id, cause = %err, "cannot remove an exited worker container");
                    }
                    Phase::Exited {
                        status: container.status.unwrap_or_default(),
                        requested,
                        last_output,
                    }
                }
                _ => match self.stopping.get(&id).copied() {
                    Some((since, killed)) => {
                        let overdue = (now - since).to_std().unwrap_or_default() > self.grace;
                        if overdue && !killed {
                            tracing::warn!(worker_id = %id, "still draining after the grace period; killing it");
                            self.signal(&name, "SIGKILL").await?;
                            self.stopping.insert(id.clone(), (since, true));
                        }
                        Phase::Stopping { since }
                    }
                    None => Phase::Running,
                },
            };
            present.push(id.clone());
            listed.push(PoolWorker {
                id,
                started_at,
                phase,
            });
        }
        self.stopping.retain(|id, _| present.contains(id));
        Ok(listed)
    }

    async fn start(&mut self) -> Result<String, PoolError> {
        self.started += 1;
        let id = format!(
            "{}-{}-{}",
            self.config.pool,
            Utc::now().timestamp_millis(),
            self.started
        );
        let name = self.container_name(&id);
        let options = CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        match self
            .docker
            .create_container(Some(options), self.container_body(&id))
            .await
        {
            Ok(_) => {}
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                message,
            }) => {
                return Err(PoolError::Engine(format!(
                    "worker image `{}` not found ({message}); build it first (see README: Containers)",
                    self.config.image
                )));
            }
            Err(err) => return Err(engine_error(&format!("creating {name}"), err)),
        }
        if let Err(err) = self
            .docker
            .start_container(&name, None::<StartContainerOptions>)
            .await
        {
            let _ = self
                .docker
                .remove_container(
                    &name,
                    Some(RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    }),
                )
                .await;
            let hint = if self.config.gpus.is_some() && err.to_string().contains("gpu") {
                " (GPUs requested: is the NVIDIA container runtime installed?)"
            } else {
                ""
            };
            return Err(engine_error(&format!("starting {name}{hint}"), err));
        }
        tracing::info!(worker_id = %id, image = %self.config.image, "started worker container");
        Ok(id)
    }

    async fn stop(&mut self, id: &str) -> Result<(), PoolError> {
        if self.stopping.contains_key(id) {
            return Ok(());
        }
        tracing::info!(worker_id = %id, "stopping worker container (drain)");
        self.signal(&self.container_name(id), "SIGTERM").await?;
        self.stopping.insert(id.to_owned(), (Utc::now(), false));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_errors_stay_whatever_order_the_engine_gave() {
        let lines: Vec<String> = (0..LAST_OUTPUT_LINES)
            .map(|n| format!("line {n}"))
            .collect();
        let errors = vec!["cannot download config.json".to_owned()];
        let kept = with_last_errors(lines.clone(), &errors);
        assert_eq!(kept.len(), LAST_OUTPUT_LINES);
        assert_eq!(kept.last(), Some(&errors[0]));
        assert_eq!(kept[0], "line 1", "the oldest line made room");
        // Already among the lines: nothing changes.
        let mut with_error = lines.clone();
        with_error[3] = errors[0].clone();
        assert_eq!(with_last_errors(with_error.clone(), &errors), with_error);
    }
}
