//! The replay on a measured engine: a batch re-planned as questions join
//! and leave, profile errors naming their flag, and batching's saving.

use super::super::worker_profile::WorkerProfile;
use super::*;

const TWO_BATCH_PROFILE: &str = r#"{"formats": {"f16": {"aggregate_tokens_per_s": {"1": 10, "2": 16},
  "prefill_tokens_per_s": 1000, "roofline_ratio": 0.6}}, "llama_cpp": {"ratio_1": 0.9}}"#;

fn profiled(json: &str, slots: u32) -> WorkerModel {
    let profile = WorkerProfile::parse(json, "decode.json", None, 1.0).unwrap();
    WorkerModel {
        concurrency: slots,
        prefill_tokens_per_s: profile.prefill_tokens_per_s,
        decode_tokens_per_s: profile.per_sequence(slots),
        profile: Some(profile),
        ..model()
    }
}

#[test]
fn a_profile_replans_the_batch_whenever_a_question_joins_or_leaves() {
    // 20 answer tokens at 0 s and 8 at 1 s, one worker of two slots.
    let trace = trace(vec![arrival(0.0, 20), arrival(1.0, 8)]);
    let model = profiled(TWO_BATCH_PROFILE, 2);
    let outcome = engine::replay(&setup(&trace, &model), &mut Fixed(1), 1);
    let times: Vec<(f32, f32)> = outcome.fates.iter().copied().map(answered).collect();
    // Alone from 0 s at aggregate(1) = 10 tok/s: first token at 0.1 s, 10
    // tokens done by 1 s. Together from 1 s at 16 / 2 = 8 tok/s each: the
    // second's first token 0.125 s after it came, its 8 tokens done at
    // 2 s, when the first has 10 - 8 = 2 left: alone again at 10 tok/s, it
    // is done at 2.2 s.
    let expected = [(0.1, 2.2), (0.125, 1.0)];
    for ((first, total), (want_first, want_total)) in times.iter().zip(expected) {
        assert!((first - want_first).abs() < 1e-5, "{times:?}");
        assert!((total - want_total).abs() < 1e-5, "{times:?}");
    }
    assert!((outcome.horizon - 2.2).abs() < 1e-9, "{}", outcome.horizon);
}

#[test]
fn profile_errors_name_the_flag() {
    let dir = temp_dir("profile-errors");
    let base = SimulateArgs {
        policies: vec![PolicyName::Clairvoyant],
        ..args(write_trace(&dir))
    };
    let path = dir.join("decode.json");
    let attempt = |json: &str, format: Option<&str>, speedup: f64| {
        std::fs::write(&path, json).unwrap();
        run(&SimulateArgs {
            worker_profile: Some(path.clone()),
            worker_profile_format: format.map(str::to_owned),
            profile_speedup: speedup,
            ..base.clone()
        })
        .map(|simulation| simulation.report)
    };
    let message = |json: &str, format: Option<&str>, speedup: f64| {
        attempt(json, format, speedup).unwrap_err().to_string()
    };
    let rates = |rates: &str| {
        format!(
            r#"{{"formats": {{"f16": {{"aggregate_tokens_per_s": {rates}, "prefill_tokens_per_s": 100}}}}}}"#
        )
    };
    for (json, why) in [
        ("not json".to_owned(), "syntax"),
        (r#"{"formats": {}}"#.to_owned(), "no formats"),
        (rates(r#"{"one": 10}"#), "a batch size that is no number"),
        (rates(r#"{"0": 10}"#), "batch size 0"),
        (rates(r#"{"1": -3}"#), "a negative rate"),
        (rates("{}"), "no rates"),
        (rates(r#"{"1": "fast"}"#), "a rate that is no number"),
    ] {
        let message = message(&json, None, 1.0);
        assert!(
            message.starts_with("--worker-profile: "),
            "{why}: {message}"
        );
    }
    let two = r#"{"formats": {"gguf-q8_0": {"aggregate_tokens_per_s": {"1": 20}, "prefill_tokens_per_s": 150},
                              "gguf-q4_0": {"aggregate_tokens_per_s": {"1": 25}, "prefill_tokens_per_s": 120}}}"#;
    let several = message(two, None, 1.0);
    assert!(
        several.starts_with("--worker-profile-format: "),
        "{several}"
    );
    assert!(several.contains("gguf-q4_0, gguf-q8_0"), "{several}");
    let unknown = message(two, Some("f32"), 1.0);
    assert!(
        unknown.starts_with("--worker-profile-format: "),
        "{unknown}"
    );
    assert!(message(two, Some("gguf-q8_0"), 0.0).starts_with("--profile-speedup: "));
    let chosen = attempt(two, Some("gguf-q4_0"), 2.0).unwrap();
    let profile = chosen.worker.profile.as_ref().unwrap();
    assert_eq!(
        (profile.format.as_str(), profile.speedup),
        ("gguf-q4_0", 2.0)
    );
    assert_eq!(chosen.worker.decode_tokens_per_s, 50.0, "25 tok/s x 2");
    assert_eq!(
        chosen.worker.prefill_tokens_per_s, 240.0,
        "the profile's, x 2"
    );
    std::fs::write(&path, two).unwrap();
    let kept = run(&SimulateArgs {
        worker_profile: Some(path.clone()),
        worker_profile_format: Some("gguf-q4_0".into()),
        prefill_tokens_per_s: Some(2000.0),
        ..base.clone()
    });
    let kept = kept.unwrap().report.worker;
    assert_eq!(
        kept.prefill_tokens_per_s, 2000.0,
        "a given prefill rate holds"
    );
    let missing = run(&SimulateArgs {
        worker_profile: Some(dir.join("missing.json")),
        ..base.clone()
    });
    let missing = missing.unwrap_err().to_string();
    assert!(
        missing.starts_with("--worker-profile: cannot read"),
        "{missing}"
    );
    let alone = run(&SimulateArgs {
        worker_profile_format: Some("f16".into()),
        ..base
    });
    let alone = alone.unwrap_err().to_string();
    assert!(alone.starts_with("--worker-profile-format: "), "{alone}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_batching_profile_needs_fewer_worker_seconds_than_one_slot() {
    let dir = temp_dir("profile-batching");
    let one_slot = SimulateArgs {
        policies: vec![PolicyName::Ebb, PolicyName::Clairvoyant],
        ..args(write_trace(&dir))
    };
    // Batch 1 runs at the one-slot model's 21 tok/s and 2000 tok/s prefill.
    let path = dir.join("decode.json");
    std::fs::write(
        &path,
        r#"{"formats": {"f16": {"aggregate_tokens_per_s": {"1": 21, "2": 38, "4": 66, "8": 100},
            "prefill_tokens_per_s": 2000}}}"#,
    )
    .unwrap();
    let batching = SimulateArgs {
        worker_profile: Some(path),
        ..one_slot.clone()
    };
    let single = run(&one_slot).unwrap().report;
    let batched = run(&batching).unwrap().report;
    assert_eq!(batched.worker.concurrency, 8, "the largest batch measured");
    for (one, many) in single.policies.iter().zip(&batched.policies) {
        assert!(
            many.worker_seconds < one.worker_seconds,
            "{}: {} batched vs {} one at a time",
            one.name,
            many.worker_seconds,
            one.worker_seconds
        );
        assert!(many.worker_seconds >= batched.lower_bound_worker_seconds);
    }
    assert!(batched.lower_bound_worker_seconds < single.lower_bound_worker_seconds);
    assert!(
        batched
            .markdown()
            .contains("profile `decode.json` format f16 x1: decode tok/s by batch 1: 21.0"),
        "{}",
        batched.markdown()
    );
    // Re-planning keeps the replay a pure function of the seed.
    let json = |args: &SimulateArgs| serde_json::to_string(&run(args).unwrap().report).unwrap();
    assert_eq!(json(&batching), serde_json::to_string(&batched).unwrap());
    std::fs::remove_dir_all(dir).unwrap();
}
