//! A real `prometheus` (Debian's package) on a port of its own, scraping
//! the targets a test names with ebb's alert rules loaded. Dropping it
//! kills the server and removes its data.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::eventually;
use crate::servers::{TempDir, free_port};

/// `deploy/prometheus/` of this checkout.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    pub url: String,
    _data: TempDir,
}

impl Prometheus {
    /// Scrapes `targets` (`(job, "127.0.0.1:port")`) every second and
    /// evaluates `rules` (the text of an alert rules file) every second.
    pub fn start(targets: &[(&str, String)], rules: &str) -> Prometheus {
        let data = TempDir::new("prometheus");
        let rules_path = data.path().join("alerts.yml");
        std::fs::write(&rules_path, rules).expect("write the rules");
        let mut config = String::from(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\nrule_files: [alerts.yml]\nscrape_configs:\n",
        );
        for (job, target) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs: [{{targets: [\"{target}\"]}}]\n"
            ));
        }
        let config_path = data.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write the config");
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                data.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus (Debian's `prometheus` package; scripts/test installs it)");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _data: data,
        }
    }

    /// `GET /api/v1/<path>`'s `data`, once Prometheus answers.
    pub async fn api(&self, path: &str) -> Result<Value, String> {
        let response = reqwest::get(format!("{}/api/v1/{path}", self.url))
            .await
            .map_err(|err| err.to_string())?;
        let body: Value = response.json().await.map_err(|err| err.to_string())?;
        match body["status"].as_str() {
            Some("success") => Ok(body["data"].clone()),
            _ => Err(body.to_string()),
        }
    }

    /// Waits until every target is up; returns the active targets.
    pub async fn wait_targets_up(&self, count: usize, within: Duration) -> Vec<Value> {
        eventually(within, "every scrape target up", || async {
            let data = self.api("targets").await?;
            let active = data["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let up = active.iter().filter(|t| t["health"] == "up").count();
            if active.len() == count && up == count {
                Ok(active)
            } else {
                Err(Value::Array(active).to_string())
            }
        })
        .await
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `promtool <args>` in `deploy/prometheus/`: its exit status and output.
pub fn promtool(args: &[&str]) -> (bool, String) {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(deploy_dir())
        .output()
        .expect("run promtool (Debian's `prometheus` package)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}
