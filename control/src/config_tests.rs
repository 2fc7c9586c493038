use super::*;

const FULL: &str = r#"
tick: 1s
resources:
  min_instances: 0
  max_instances: 8
  instance_type: nvidia-a10
rules:
  scale_up:
    - metric: queue_depth
      threshold: 10
      duration: 30s
    - metric: avg_response_time
      threshold: 5
      duration: 1m
  scale_down:
    - metric: cpu_usage
      threshold: 0.3
      duration: 5m
cooldowns:
  scale_to_zero_idle: 5m
timetable:
  - name: morning-classes
    cron: "50 7 * * 1-5"
    timezone: Asia/Shanghai
    duration: 90m
    min_workers: 2
backend:
  kind: process
  command: /usr/local/bin/ebb-worker
  args: ["--model", "Qwen/Qwen2.5-7B-Instruct"]
"#;

fn key_of(text: &str) -> String {
    match ScalerConfig::parse(text) {
        Err(ConfigError::Invalid { key, .. }) => key,
        Err(other) => other.to_string(),
        Ok(_) => panic!("expected an error"),
    }
}

#[test]
fn the_seed_shaped_config_parses() {
    let config = ScalerConfig::parse(FULL).unwrap();
    assert_eq!(config.resources.max_instances, 8);
    let rules = config.rules.unwrap();
    assert_eq!(rules.scale_up[1].duration, Duration::from_secs(60));
    assert_eq!(
        rules.scale_down[0].metric,
        Metric::WorkerUtilization,
        "cpu_usage is an alias"
    );
    assert_eq!(
        config.cooldowns.scale_to_zero_idle,
        Duration::from_secs(300)
    );
    assert!(!config.timetable.is_empty());
}

#[test]
fn errors_name_the_offending_key() {
    assert_eq!(
        key_of(&FULL.replace("min_instances: 0", "min_instances: 9")),
        "resources.min_instances"
    );
    assert_eq!(
        key_of(&FULL.replace("max_instances: 8", "max_instances: 0")),
        "resources.max_instances"
    );
    assert_eq!(
        key_of(&FULL.replace("max_instances: 8", "max_instances: 8\n  price_per_hour: -2")),
        "resources.price_per_hour"
    );
    assert_eq!(
        key_of(&FULL.replace("threshold: 10", "threshold: -1")),
        "rules.scale_up[0].threshold"
    );
    assert_eq!(
        key_of(&FULL.replace("min_workers: 2", "min_workers: 20")),
        "timetable[0].min_workers"
    );
    let bad_metric = key_of(&FULL.replace("metric: queue_depth", "metric: queue_length"));
    assert!(
        bad_metric.contains("queue_length") && bad_metric.contains("rules.scale_up"),
        "{bad_metric}"
    );
    let typo = key_of(&FULL.replace("instance_type", "instance_typo"));
    assert!(typo.contains("instance_typo"), "{typo}");
    let bad_cron = key_of(&FULL.replace("50 7 * * 1-5", "50 25 * * 1-5"));
    assert!(bad_cron.contains("timetable[0].cron"), "{bad_cron}");
    let bad_zone = key_of(&FULL.replace("Asia/Shanghai", "Asia/Atlantis"));
    assert!(bad_zone.contains("timetable[0].timezone"), "{bad_zone}");
    let slots = |value: &str| format!("{FULL}target: {{slots_per_worker: {value}}}\n");
    assert_eq!(key_of(&slots("0")), "target.slots_per_worker");
    assert_eq!(key_of(&slots("100000")), "target.slots_per_worker");
    let config = ScalerConfig::parse(&slots("8")).unwrap();
    assert_eq!(config.target.slots_per_worker, 8);
    assert_eq!(
        ScalerConfig::parse(FULL).unwrap().target.slots_per_worker,
        1,
        "one slot unless told"
    );
    let bad_duration = key_of(&FULL.replace("duration: 90m", "duration: soon"));
    assert!(bad_duration.contains("duration"), "{bad_duration}");
}

#[test]
fn scale_to_zero_is_budgeted_over_a_day_unless_told() {
    let config = ScalerConfig::parse(FULL).unwrap();
    assert_eq!(config.scale_to_zero, ScaleToZero::Budgeted);
    assert_eq!(
        config.target.miss_budget_window,
        Duration::from_secs(24 * 3600)
    );
    let told = ScalerConfig::parse(&format!(
        "{FULL}scale_to_zero: never\ntarget: {{miss_budget_window: 1h}}\n"
    ))
    .unwrap();
    assert_eq!(
        (told.scale_to_zero, told.target.miss_budget_window),
        (ScaleToZero::Never, Duration::from_secs(3600))
    );
    let bad_mode = key_of(&format!("{FULL}scale_to_zero: sometimes\n"));
    assert!(
        bad_mode.contains("scale_to_zero") && bad_mode.contains("budgeted"),
        "{bad_mode}"
    );
    let window = |value: &str| format!("{FULL}target: {{miss_budget_window: {value}}}\n");
    assert_eq!(key_of(&window("0s")), "target.miss_budget_window");
    assert_eq!(key_of(&window("40d")), "target.miss_budget_window");
}
