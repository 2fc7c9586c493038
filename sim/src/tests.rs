//! The replay on tiny hand-made traces whose answers are known, the
//! clairvoyant reference, determinism and the report's JSON.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use ebb_nats::Priority;

use super::engine::{self, Autoscaler, Fate, Setup, WorkerModel};
use super::policies::Fixed;
use super::report::Report;
use super::trace::{Arrival, Trace, TraceFormat};
use super::*;
use ebb_control::config::Health;
use ebb_control::controller::Verdict;
use ebb_control::policy::Observation;

/// Answers take exactly `output_tokens` seconds; the first token 1 s.
fn model() -> WorkerModel {
    WorkerModel {
        cold_start_median_s: 5.0,
        cold_start_p90_s: 5.0,
        prefill_tokens_per_s: 1000.0,
        decode_tokens_per_s: 1.0,
        concurrency: 1,
        price_per_hour: 3.6,
        queue_max: 100,
        cache_hit_ratio: 0.0,
        profile: None,
    }
}

fn arrival(at: f64, seconds: u32) -> Arrival {
    Arrival {
        at,
        input_tokens: 0,
        output_tokens: seconds,
        priority: Priority::Normal,
        grade: None,
        question_id: None,
    }
}

fn trace(arrivals: Vec<Arrival>) -> Trace {
    let duration = arrivals.iter().map(|a| a.at).fold(0.0, f64::max);
    Trace {
        format: TraceFormat::Ebb,
        start: Utc.with_ymd_and_hms(2026, 3, 2, 12, 0, 0).unwrap(),
        duration,
        arrivals,
    }
}

fn setup<'a>(trace: &'a Trace, model: &'a WorkerModel) -> Setup<'a> {
    Setup {
        trace,
        model,
        seed: 1,
        measure_from: 0.0,
        health: &HEALTH,
    }
}

static HEALTH: std::sync::LazyLock<Health> = std::sync::LazyLock::new(Health::default);

fn answered(fate: Fate) -> (f32, f32) {
    match fate {
        Fate::Answered { first_token, total } => (first_token, total),
        other => panic!("not answered: {other:?}"),
    }
}

/// One worker whenever anything waits or runs, none otherwise; asked every
/// second and at once on an arrival at zero.
struct OnDemand;

impl Autoscaler for OnDemand {
    fn decide(&mut self, observation: &Observation, _: DateTime<Utc>) -> Verdict {
        let desired = u32::from(observation.lag > 0);
        Verdict::of("on-demand", desired, Duration::from_secs(1))
    }
    fn wakes_on_arrival(&self) -> bool {
        true
    }
}

#[test]
fn one_worker_serves_first_in_first_out_with_exact_waits() {
    let trace = trace(vec![arrival(0.0, 10), arrival(1.0, 10), arrival(2.0, 10)]);
    let model = model();
    let outcome = engine::replay(&setup(&trace, &model), &mut Fixed(1), 1);
    let times: Vec<(f32, f32)> = outcome.fates.iter().copied().map(answered).collect();
    // Waits 0, 9 and 18 s; the first token 1 s into each answer.
    assert_eq!(times, vec![(1.0, 10.0), (10.0, 19.0), (19.0, 28.0)]);
    assert_eq!(outcome.horizon, 30.0);
    assert_eq!(outcome.worker_seconds, 30.0);
    assert_eq!(outcome.cold_starts, 0);
}

#[test]
fn concurrency_answers_side_by_side() {
    let trace = trace(vec![arrival(0.0, 10), arrival(0.0, 10), arrival(0.0, 10)]);
    let model = WorkerModel {
        concurrency: 2,
        ..model()
    };
    let outcome = engine::replay(&setup(&trace, &model), &mut Fixed(1), 1);
    let totals: Vec<f32> = outcome.fates.iter().map(|f| answered(*f).1).collect();
    assert_eq!(totals, vec![10.0, 10.0, 20.0]);
}

#[test]
fn a_cold_start_is_waited_for_and_paid_for() {
    let trace = trace(vec![arrival(0.0, 10), arrival(100.0, 10)]);
    let model = model();
    let outcome = engine::replay(&setup(&trace, &model), &mut OnDemand, 0);
    let times: Vec<(f32, f32)> = outcome.fates.iter().copied().map(answered).collect();
    // Each question wakes a worker: 5 s cold start, then 10 s of answer.
    assert_eq!(times, vec![(6.0, 15.0), (6.0, 15.0)]);
    assert_eq!(outcome.cold_starts, 2);
    // Each worker lives from its start request until the tick after its
    // answer (the policy is asked once a second): 15-16 s, twice.
    assert!(
        (30.0..=32.0).contains(&outcome.worker_seconds),
        "{}",
        outcome.worker_seconds
    );
}

#[test]
fn a_busy_worker_drains_before_it_exits() {
    /// Wants one worker for the first 3 s, then none.
    struct Shrink;
    impl Autoscaler for Shrink {
        fn decide(&mut self, _: &Observation, now: DateTime<Utc>) -> Verdict {
            let start = Utc.with_ymd_and_hms(2026, 3, 2, 12, 0, 0).unwrap();
            let desired = u32::from((now - start).num_seconds() < 3);
            Verdict::of("shrink", desired, Duration::from_secs(1))
        }
        fn wakes_on_arrival(&self) -> bool {
            false
        }
    }
    let trace = trace(vec![arrival(0.0, 10)]);
    let model = model();
    let outcome = engine::replay(&setup(&trace, &model), &mut Shrink, 1);
    assert_eq!(
        answered(outcome.fates[0]),
        (1.0, 10.0),
        "finished, not cut off"
    );
    assert_eq!(outcome.worker_seconds, 10.0, "paid until it drained");
}

#[test]
fn urgent_questions_go_first_and_a_full_queue_rejects() {
    let mut urgent = arrival(1.0, 10);
    urgent.priority = Priority::High;
    let trace = trace(vec![
        arrival(0.0, 10),
        arrival(0.5, 10),
        urgent,
        arrival(1.5, 10),
    ]);
    let model = WorkerModel {
        queue_max: 3,
        ..model()
    };
    let outcome = engine::replay(&setup(&trace, &model), &mut Fixed(1), 1);
    assert_eq!(
        answered(outcome.fates[2]).0,
        10.0,
        "high starts second, at 10 s"
    );
    assert_eq!(
        answered(outcome.fates[1]).0,
        20.5,
        "normal waits for both: 19.5 s + 1 s"
    );
    assert_eq!(
        outcome.fates[3],
        Fate::Rejected,
        "3 already waiting or in service"
    );
}

#[test]
fn a_repeated_question_is_a_cache_hit_once_its_first_answer_is_done() {
    let with_id = |at, id: &str| Arrival {
        question_id: Some(id.into()),
        ..arrival(at, 10)
    };
    let trace = trace(vec![
        with_id(0.0, "q"),
        with_id(5.0, "q"),
        with_id(20.0, "q"),
    ]);
    let model = WorkerModel {
        concurrency: 2,
        ..model()
    };
    let outcome = engine::replay(&setup(&trace, &model), &mut Fixed(1), 1);
    assert!(
        matches!(outcome.fates[1], Fate::Answered { .. }),
        "still being answered"
    );
    assert_eq!(outcome.fates[2], Fate::Cached);
    let reference = clairvoyant::replay(&setup(&trace, &model));
    assert_eq!(reference.fates[2], Fate::Cached);
}

#[test]
fn clairvoyant_starts_a_cold_start_early_and_keeps_a_worker_through_short_gaps() {
    // Gap of 2 s (< 5 s cold start): kept. Gap of 100 s: stopped and restarted.
    let trace = trace(vec![
        arrival(10.0, 10),
        arrival(22.0, 10),
        arrival(132.0, 10),
    ]);
    let model = model();
    let outcome = clairvoyant::replay(&setup(&trace, &model));
    for fate in &outcome.fates {
        assert_eq!(answered(*fate), (1.0, 10.0), "nobody waits");
    }
    assert_eq!(outcome.cold_starts, 2);
    // (5 + 10 + 2 + 10) + (5 + 10)
    assert!(
        (outcome.worker_seconds - 42.0).abs() < 1e-9,
        "{}",
        outcome.worker_seconds
    );
}

#[test]
fn the_warm_up_is_replayed_but_not_counted() {
    let trace = trace(vec![arrival(0.0, 10), arrival(50.0, 10)]);
    let model = model();
    let measured = Setup {
        measure_from: 40.0,
        ..setup(&trace, &model)
    };
    let outcome = engine::replay(&measured, &mut Fixed(1), 1);
    assert_eq!(outcome.first_measured, 1);
    assert_eq!(outcome.worker_seconds, 20.0, "from 40 s to the end at 60 s");
}

fn write_trace(dir: &std::path::Path) -> std::path::PathBuf {
    let mut text = String::from("arrival_s,input_tokens,output_tokens,grade,question_id\n");
    // Bursts separated by quiet spells, with a few repeated questions.
    for i in 0..400u32 {
        let at = (i / 40) as f64 * 300.0 + (i % 40) as f64 * 0.7;
        text.push_str(&format!(
            "{at},{},{},9,q{}\n",
            200 + i % 7 * 50,
            20 + i % 13 * 10,
            i % 50
        ));
    }
    let path = dir.join("trace.csv");
    std::fs::write(&path, text).unwrap();
    path
}

fn args(trace: std::path::PathBuf) -> SimulateArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimulateArgs,
    }
    let path = trace.display().to_string();
    Cli::parse_from([
        "simulate",
        "--trace",
        &path,
        "--cold-start",
        "10s",
        "--cold-start-p90",
        "20s",
    ])
    .args
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ebb-simulate-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_same_seed_gives_byte_identical_json_and_another_seed_differs() {
    let dir = temp_dir("determinism");
    let args = args(write_trace(&dir));
    let json = |args: &SimulateArgs| serde_json::to_string(&run(args).unwrap().report).unwrap();
    assert_eq!(json(&args), json(&args));
    let other = SimulateArgs {
        seed: 2,
        ..args.clone()
    };
    assert_ne!(
        json(&args),
        json(&other),
        "cold starts are drawn from the seed"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_report_has_every_policy_and_round_trips_through_its_schema() {
    let dir = temp_dir("schema");
    let simulation = run(&args(write_trace(&dir))).unwrap();
    write(&simulation, &dir).unwrap();
    let text = std::fs::read_to_string(dir.join("report.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let names: Vec<&str> = value["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "fixed",
            "seed-rules",
            "keda-like",
            "knative-like",
            "ebb",
            "clairvoyant"
        ]
    );
    for policy in value["policies"].as_array().unwrap() {
        for key in [
            "worker_seconds",
            "cost",
            "saving_vs_fixed",
            "vs_clairvoyant",
            "utilization",
            "slo_attainment",
            "rejected",
            "cold_starts",
            "scale_events",
        ] {
            assert!(policy[key].is_number(), "{key} in {policy}");
        }
        for key in ["first_token_s", "total_s"] {
            for quantile in ["p50", "p95", "p99"] {
                assert!(policy[key][quantile].is_number(), "{key}.{quantile}");
            }
        }
    }
    // Typed and closed: the file reads back as exactly the report.
    let back: Report = serde_json::from_str(&text).unwrap();
    assert_eq!(back, simulation.report);
    let clairvoyant = back.policies.last().unwrap();
    assert_eq!(clairvoyant.vs_clairvoyant, Some(1.0));
    assert!(
        back.policies
            .iter()
            .all(|p| p.worker_seconds >= back.lower_bound_worker_seconds)
    );
    let markdown = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(markdown.contains("| knative-like |"), "{markdown}");
    let svg = std::fs::read_to_string(dir.join("report.svg")).unwrap();
    for policy in &back.policies {
        let caption = format!("font-weight=\"bold\">\n{}\n</text>", policy.name);
        let caption_inline = format!("font-weight=\"bold\">{}</text>", policy.name);
        assert!(
            svg.contains(&caption) || svg.contains(&caption_inline),
            "a panel captioned {}",
            policy.name
        );
    }
    assert_eq!(
        svg.matches("font-weight=\"bold\">").count(),
        6,
        "a panel per policy"
    );
    // Two lines a panel (questions in system, workers) beside the area.
    assert!(svg.matches("<polyline").count() >= 12, "{svg}");
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(html.contains("<td>knative-like</td>"), "{html}");
    assert!(html.contains("Content-Security-Policy"), "{html}");
    assert!(html.contains(svg.trim()), "the page holds the same plots");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_fixed_fleet_is_the_smallest_meeting_the_slo() {
    let dir = temp_dir("fixed");
    let args = SimulateArgs {
        policies: vec![PolicyName::Fixed],
        ..args(write_trace(&dir))
    };
    let report = run(&args).unwrap().report;
    let fixed = &report.policies[0];
    assert!(fixed.slo_attainment >= report.slo.target);
    let size: u32 = fixed.detail.split(' ').next().unwrap().parse().unwrap();
    let trace = Trace::load(
        &args.trace,
        &args.load_options(),
        &mut rand::SeedableRng::seed_from_u64(1),
    )
    .unwrap();
    let model = args.worker_model().unwrap();
    let one_fewer = engine::replay(&setup(&trace, &model), &mut Fixed(size - 1), size - 1);
    let result =
        report::PolicyResult::new("fixed", String::new(), &one_fewer, &model, &report.slo, 0.0);
    assert!(
        result.slo_attainment < report.slo.target,
        "{size} - 1 would do"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_target_no_fleet_can_meet_is_unattainable_not_a_fleet_size() {
    use crate::fixed::{FixedFleet, smallest_fixed_fleet};
    // Every first token takes 1 s: no number of workers brings it under 0.5 s.
    let trace = trace((0..20).map(|i| arrival(f64::from(i), 3)).collect());
    let model = model();
    let slo = Slo {
        first_token_s: 0.5,
        target: 0.9,
    };
    let (fleet, outcome) = smallest_fixed_fleet(&setup(&trace, &model), &slo, 3);
    assert_eq!(
        fleet,
        FixedFleet::Unattainable {
            workers: 3,
            attainment: 0.0
        }
    );
    assert!(!outcome.fates.is_empty());
    let detail = fleet.detail(slo.target);
    assert!(detail.starts_with("SLO target unattainable"), "{detail}");

    // The same trace with a target the first token meets: a fleet size.
    let slo = Slo {
        first_token_s: 1.5,
        target: 0.9,
    };
    let (fleet, _) = smallest_fixed_fleet(&setup(&trace, &model), &slo, 3);
    assert!(
        matches!(fleet, FixedFleet::Smallest(n) if (1..=3).contains(&n)),
        "{fleet:?}"
    );
}

#[test]
fn bad_options_name_the_flag() {
    let dir = temp_dir("options");
    let base = args(write_trace(&dir));
    let message = |args: SimulateArgs| run(&args).unwrap_err().to_string();
    assert!(
        message(SimulateArgs {
            concurrency: Some(0),
            ..base.clone()
        })
        .starts_with("--concurrency")
    );
    assert!(
        message(SimulateArgs {
            warm_up: Duration::from_secs(1 << 20),
            ..base.clone()
        })
        .starts_with("--warm-up")
    );
    assert!(
        message(SimulateArgs {
            cold_start_p90: Duration::from_secs(1),
            ..base.clone()
        })
        .starts_with("--cold-start-p90")
    );
    assert!(
        message(SimulateArgs {
            config: Some(dir.join("missing.yaml")),
            ..base
        })
        .starts_with("--config")
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_plot_carries_workers_through_quiet_buckets() {
    let trace = trace(vec![arrival(0.0, 10), arrival(6000.0, 10)]);
    let model = model();
    let fixed = engine::replay(&setup(&trace, &model), &mut Fixed(3), 3);
    assert!(
        fixed.samples.iter().all(|s| s.workers == 3),
        "{:?}",
        fixed.samples
    );
    let reference = clairvoyant::replay(&setup(&trace, &model));
    let busy = reference.samples.iter().filter(|s| s.workers == 1).count();
    // Two lives of 15 s in 10 s buckets: a few buckets each, never 0 within.
    assert!((2..=6).contains(&busy), "{busy}");
}

/// The measured engine (`--worker-profile`).
#[path = "profile_tests.rs"]
mod profile;

/// A question every 10 minutes for three hours, against 30 s cold starts
/// (longer than the default config's 4 s wait goal): the replay runs the
/// same miss-budget rule as the live scaler.
#[test]
fn sparse_traffic_keeps_a_worker_unless_told_to_scale_to_zero() {
    let trace = trace((0..18).map(|n| arrival(f64::from(n) * 600.0, 1)).collect());
    let model = WorkerModel {
        cold_start_median_s: 30.0,
        cold_start_p90_s: 30.0,
        ..model()
    };
    let replay = |extra: &str| {
        let config = ScalerConfig::parse(&format!("{DEFAULT_CONFIG}{extra}")).unwrap();
        let mut ebb = policies::ebb(config, 1);
        engine::replay(&setup(&trace, &model), &mut ebb, 1)
    };
    let late = |outcome: &engine::Outcome| {
        outcome
            .fates
            .iter()
            .filter(|fate| answered(**fate).0 > 5.0)
            .count()
    };
    // 18 questions at 99.9 % never pay for a late one: the floor stays 1.
    let budgeted = replay("");
    assert_eq!((budgeted.cold_starts, late(&budgeted)), (0, 0));
    // Told to always scale to zero, every question after the first wakes
    // workers and waits a cold start.
    let always = replay("scale_to_zero: always\n");
    assert_eq!(late(&always), 17);
    assert!(always.cold_starts >= 17, "{}", always.cold_starts);
}
