//! `ebb-scaler gen-trace` and `ebb-scaler simulate` as a user runs them:
//! the school trace from the shipped school timetable, replayed against all
//! six policies, files written, the same seed giving the same JSON, bad
//! input refused with the flag or line named.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ebb_tests::{TempDir, scaler_binary};

fn scaler(args: &[&str]) -> Output {
    Command::new(scaler_binary()).args(args).output().unwrap()
}

fn school_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sim/config/school.yaml")
}

#[test]
fn a_generated_school_day_replays_against_every_policy_reproducibly() {
    let dir = TempDir::new("simulate");
    let trace = dir.path().join("school.csv");
    let config = school_config();
    let generated = scaler(&[
        "gen-trace",
        "--timetable",
        config.to_str().unwrap(),
        "--days",
        "2",
        "--students",
        "2000",
        "--out",
        trace.to_str().unwrap(),
    ]);
    assert!(generated.status.success(), "{generated:?}");
    let simulate = |out: &Path| {
        let output = scaler(&[
            "simulate",
            "--trace",
            trace.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--warm-up",
            "1d",
            "--seed",
            "3",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    let table = simulate(&first);
    for policy in [
        "fixed",
        "seed-rules",
        "keda-like",
        "knative-like",
        "ebb",
        "clairvoyant",
    ] {
        assert!(table.contains(&format!("| {policy} |")), "{table}");
    }
    simulate(&second);
    let read = |dir: &Path, name: &str| std::fs::read(dir.join(name)).unwrap();
    assert_eq!(read(&first, "report.json"), read(&second, "report.json"));
    assert_eq!(read(&first, "report.md"), table.as_bytes());
    assert!(
        String::from_utf8(read(&first, "report.svg"))
            .unwrap()
            .starts_with("<svg")
    );
    let report: serde_json::Value = serde_json::from_slice(&read(&first, "report.json")).unwrap();
    assert_eq!(report["trace"]["warm_up_s"], 86_400.0);
    assert_eq!(report["seed"], 3);
}

#[test]
fn bad_traces_and_flags_are_named() {
    let dir = TempDir::new("simulate-bad");
    let trace = dir.path().join("bad.csv");
    let path = trace.to_str().unwrap();
    std::fs::write(
        &trace,
        "arrival_s,input_tokens,output_tokens\n1,2,3\n2,two,3\n",
    )
    .unwrap();
    refused(&["simulate", "--trace", path], "line 3: input_tokens `two`");

    std::fs::write(&trace, "when,what\n1,2\n").unwrap();
    refused(&["simulate", "--trace", path], "unknown trace format");

    std::fs::write(&trace, "arrival_s,input_tokens,output_tokens\n1,2,3\n").unwrap();
    refused(
        &["simulate", "--trace", path, "--policies", "ebb,hpa"],
        "--policies",
    );
    refused(
        &["simulate", "--trace", path, "--rate-scale", "0"],
        "--rate-scale",
    );
}

/// The command fails (non-zero exit) and its stderr names `what`.
fn refused(args: &[&str], what: &str) {
    let output = scaler(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{args:?} succeeded: {stderr}");
    assert!(stderr.contains(what), "{args:?}: {stderr}");
}
