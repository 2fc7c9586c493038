//! What the benchmarks share: `wrk` against the gateway, medians, and one
//! printed line (and JSON figure) per side-by-side comparison.

use std::process::Command;

use serde_json::json;

/// A benchmark knob from the environment, else `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of a benchmark's rounds.
pub fn median(values: Vec<f64>) -> f64 {
    ebb_runtime::quantile::of(values, 0.5)
}

/// Prints one comparison; returns its medians and ratio for the JSON.
pub fn report(
    name: &str,
    ours: &[f64],
    baseline_name: &str,
    baseline: &[f64],
    goal: Option<f64>,
) -> serde_json::Value {
    let (ours, baseline) = (median(ours.to_vec()), median(baseline.to_vec()));
    let ratio = ours / baseline;
    let goal_text = goal.map_or(String::new(), |goal| format!(" (goal >= {goal})"));
    println!(
        "{name}: {ours:.0}/s vs {baseline_name}: {baseline:.0}/s -> ratio {ratio:.2}{goal_text}"
    );
    json!({"per_second": ours, "baseline_per_second": baseline, "ratio": ratio})
}

/// Runs `wrk` against the gateway; returns requests/s (all must succeed).
pub fn wrk(url: &str, script: &str, connections: usize, seconds: f64) -> f64 {
    let script_path = std::env::temp_dir().join(format!("ebb-wrk-{}.lua", std::process::id()));
    std::fs::write(&script_path, script).expect("write wrk script");
    let output = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "-s",
        ])
        .arg(&script_path)
        .arg(url)
        .output()
        .expect("wrk runs (apt-get install wrk)");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(!text.contains("Non-2xx"), "some requests failed:\n{text}");
    text.lines()
        .find_map(|line| line.strip_prefix("Requests/sec:"))
        .and_then(|rate| rate.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate in wrk output:\n{text}"))
}
