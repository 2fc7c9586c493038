//! `ebb-scaler gen-trace`: a synthetic school's questions, in ebb's CSV.
//!
//! The breaks are the windows of a scaler config's timetable (so the replay
//! judges pre-warming on the very timetable that placed the load);
//! everything else is a fixed, documented shape, the same whatever the
//! policy. Rates are per 1,000 students, in the timetable's time zone:
//! - school hours are 08:00-15:00 on weekdays; outside the timetable's
//!   windows that is class time: 0.01 questions/s;
//! - each window's start is a break: 30 questions, decaying exponentially
//!   with a 120 s time constant;
//! - other daytime (07:00-22:00): 0.003/s; night: 0.0003/s;
//! - homework: a bell around 20:00 (sigma 60 min) peaking at 0.08/s on
//!   school nights (Sunday-Thursday), 40 % of that on Friday and Saturday;
//! - exam week (`--exam-week`): every rate x2.5, and grade 12 asks with
//!   priority `high`;
//! - prompts and answers are exponential with means 300 and 250 tokens;
//!   grades uniform 7-12; 10 % of questions are one of 200 popular ones
//!   (Zipf, s = 1), which the cache can answer once one has been.

use std::io::Write;
use std::path::PathBuf;

use chrono::{
    DateTime, Datelike, Duration as TimeDelta, NaiveDate, TimeZone, Timelike, Utc, Weekday,
};
use chrono_tz::Tz;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, Poisson, Zipf};

use ebb_control::config::{ConfigError, ScalerConfig};
use ebb_schedule::timetable::Window;

/// `ebb-scaler gen-trace` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct GenTraceArgs {
    /// Scaler config whose timetable gives the breaks and the time zone.
    #[arg(long)]
    pub timetable: PathBuf,
    /// Output file (ebb's CSV); standard output when absent.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// First local date of the trace.
    #[arg(long, default_value = "2026-03-02")]
    pub start: NaiveDate,
    /// Days to generate.
    #[arg(long, default_value_t = 14)]
    pub days: u32,
    /// Which week (1 = the first) is exam week; 0 for none.
    #[arg(long, default_value_t = 2)]
    pub exam_week: u32,
    /// Students using the tutor; every rate scales with it.
    #[arg(long, default_value_t = 20_000)]
    pub students: u32,
    /// Seed of every draw.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GenTraceError {
    #[error("--timetable: {0}")]
    Config(#[from] ConfigError),
    #[error("--timetable: the config has no timetable entries to place breaks by")]
    NoTimetable,
    #[error("--{option}: {message}")]
    Option {
        option: &'static str,
        message: String,
    },
    #[error("cannot write the trace: {0}")]
    Write(#[from] std::io::Error),
}

const SCHOOL_HOURS: std::ops::Range<f64> = 8.0..15.0;
const CLASS_RATE: f64 = 0.01;
const BREAK_QUESTIONS: f64 = 30.0;
const BREAK_DECAY_S: f64 = 120.0;
const DAY_RATE: f64 = 0.003;
const NIGHT_RATE: f64 = 0.0003;
const HOMEWORK_PEAK_RATE: f64 = 0.08;
const HOMEWORK_PEAK_HOUR: f64 = 20.0;
const HOMEWORK_SIGMA_H: f64 = 1.0;
const WEEKEND_HOMEWORK: f64 = 0.4;
const EXAM_FACTOR: f64 = 2.5;
const MEAN_INPUT_TOKENS: f64 = 300.0;
const MEAN_OUTPUT_TOKENS: f64 = 250.0;
const POPULAR_SHARE: f64 = 0.1;
const POPULAR_QUESTIONS: f64 = 200.0;

/// Questions per second (per 1,000 students) at `local` time, without
/// break bursts.
fn base_rate(local: DateTime<Tz>, in_break: bool) -> f64 {
    let hour = local.hour() as f64 + local.minute() as f64 / 60.0 + local.second() as f64 / 3600.0;
    let weekday = local.weekday();
    let school_day = !matches!(weekday, Weekday::Sat | Weekday::Sun);
    let in_class = school_day && SCHOOL_HOURS.contains(&hour) && !in_break;
    let school_night = !matches!(weekday, Weekday::Fri | Weekday::Sat);
    let homework = HOMEWORK_PEAK_RATE
        * if school_night { 1.0 } else { WEEKEND_HOMEWORK }
        * (-((hour - HOMEWORK_PEAK_HOUR) / HOMEWORK_SIGMA_H).powi(2) / 2.0).exp();
    let background = if in_class {
        CLASS_RATE
    } else if (7.0..22.0).contains(&hour) {
        DAY_RATE
    } else {
        NIGHT_RATE
    };
    background + homework
}

/// Writes the trace; returns how many questions it holds.
pub fn generate(args: &GenTraceArgs, out: &mut dyn Write) -> Result<u64, GenTraceError> {
    let config = ScalerConfig::load(&args.timetable)?;
    let zone: Tz = config
        .timetable_entries
        .first()
        .ok_or(GenTraceError::NoTimetable)?
        .timezone
        .parse()
        .map_err(|_| GenTraceError::NoTimetable)?;
    if args.days == 0 || args.students == 0 {
        return Err(GenTraceError::Option {
            option: if args.days == 0 { "days" } else { "students" },
            message: "must be at least 1".into(),
        });
    }
    let midnight = |date: NaiveDate| {
        zone.from_local_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight exists"))
            .earliest()
            .expect("midnight is not skipped in this zone")
            .with_timezone(&Utc)
    };
    let start = midnight(args.start);
    let end = midnight(args.start + TimeDelta::days(args.days.into()));
    let windows = config
        .timetable
        .windows_starting_between(start - TimeDelta::days(1), end);
    let scale = args.students as f64 / 1000.0;
    let exam = (args.exam_week > 0).then(|| {
        let from = midnight(args.start + TimeDelta::weeks(args.exam_week as i64 - 1));
        (from, from + TimeDelta::weeks(1))
    });

    writeln!(out, "# start={}", start.to_rfc3339())?;
    writeln!(
        out,
        "# ebb-scaler gen-trace: {} students, {} days from {} ({zone}), exam week {}, seed {}",
        args.students, args.days, args.start, args.exam_week, args.seed
    )?;
    writeln!(
        out,
        "arrival_s,input_tokens,output_tokens,grade,question_id,priority"
    )?;
    let mut questions = Questions::new(args.seed);
    let seconds = (end - start).num_seconds();
    let mut window_index = 0;
    for second in 0..seconds {
        let now = start + TimeDelta::seconds(second);
        while windows
            .get(window_index)
            .is_some_and(|w| w.start + TimeDelta::seconds((BREAK_DECAY_S * 10.0) as i64) < now)
        {
            window_index += 1;
        }
        let (in_break, bursts) = breaks_at(&windows[window_index..], now);
        let in_exam = exam.is_some_and(|(from, to)| (from..to).contains(&now));
        let rate = scale
            * (base_rate(now.with_timezone(&zone), in_break) + bursts)
            * if in_exam { EXAM_FACTOR } else { 1.0 };
        questions.write_second(out, second, rate, in_exam)?;
    }
    Ok(questions.count)
}

/// Whether `now` is in a break, and the arrival rate the breaks that
/// started before it still add (each burst decays exponentially).
fn breaks_at(windows: &[Window], now: DateTime<Utc>) -> (bool, f64) {
    let mut in_break = false;
    let mut bursts = 0.0;
    for window in windows.iter().take_while(|w| w.start <= now) {
        in_break |= now < window.end;
        let since = (now - window.start).num_seconds() as f64;
        bursts += BREAK_QUESTIONS / BREAK_DECAY_S * (-since / BREAK_DECAY_S).exp();
    }
    (in_break, bursts)
}

/// Draws and writes questions, all from one seeded generator.
struct Questions {
    rng: ChaCha8Rng,
    input: Exp<f64>,
    output: Exp<f64>,
    popular: Zipf<f64>,
    count: u64,
}

impl Questions {
    fn new(seed: u64) -> Questions {
        Questions {
            rng: ChaCha8Rng::seed_from_u64(seed),
            input: Exp::new(1.0 / MEAN_INPUT_TOKENS).expect("positive"),
            output: Exp::new(1.0 / MEAN_OUTPUT_TOKENS).expect("positive"),
            popular: Zipf::new(POPULAR_QUESTIONS, 1.0).expect("valid Zipf"),
            count: 0,
        }
    }

    /// A Poisson number of questions at `rate` within `second`, in order.
    fn write_second(
        &mut self,
        out: &mut dyn Write,
        second: i64,
        rate: f64,
        in_exam: bool,
    ) -> std::io::Result<()> {
        let rng = &mut self.rng;
        let arrivals = match Poisson::new(rate) {
            Ok(poisson) => poisson.sample(rng) as u64,
            Err(_) => 0,
        };
        let mut offsets: Vec<f64> = (0..arrivals).map(|_| rng.random::<f64>()).collect();
        offsets.sort_by(f64::total_cmp);
        for offset in offsets {
            self.count += 1;
            let grade: u8 = rng.random_range(7..=12);
            let id = if rng.random::<f64>() < POPULAR_SHARE {
                format!("popular-{}", self.popular.sample(rng) as u32)
            } else {
                format!("q{}", self.count)
            };
            let priority = if in_exam && grade == 12 {
                "high"
            } else {
                "normal"
            };
            writeln!(
                out,
                "{:.3},{},{},{grade},{id},{priority}",
                second as f64 + offset,
                (self.input.sample(rng).round() as u32).max(1),
                (self.output.sample(rng).round() as u32).max(1),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_CONFIG;

    fn school_config() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/school.yaml")
    }

    fn args(days: u32, exam_week: u32) -> GenTraceArgs {
        GenTraceArgs {
            timetable: school_config(),
            out: None,
            start: NaiveDate::from_ymd_opt(2026, 3, 2).unwrap(),
            days,
            exam_week,
            students: 20_000,
            seed: 7,
        }
    }

    fn generate_text(args: &GenTraceArgs) -> String {
        let mut out = Vec::new();
        generate(args, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// Arrival times (seconds) of a generated trace.
    fn times(text: &str) -> Vec<f64> {
        text.lines()
            .skip(3)
            .map(|line| line.split(',').next().unwrap().parse().unwrap())
            .collect()
    }

    #[test]
    fn breaks_burst_nights_are_quiet_and_exam_week_is_busier() {
        let text = generate_text(&args(7, 0));
        assert!(
            text.starts_with("# start=2026-03-02T05:00:00+00:00\n"),
            "New York midnight"
        );
        let arrivals = times(&text);
        let count = |from_h: f64, to_h: f64| {
            arrivals
                .iter()
                .filter(|t| (from_h * 3600.0..to_h * 3600.0).contains(*t))
                .count() as f64
        };
        // Monday: the 10 minutes after break-1 (08:45) vs the 10 before it.
        let after_break = count(8.75, 8.75 + 10.0 / 60.0);
        let in_class = count(8.75 - 10.0 / 60.0, 8.75);
        // About 600 break questions against 120 in class.
        assert!(after_break > 3.0 * in_class, "{after_break} vs {in_class}");
        // 03:00-04:00 is far quieter than 19:30-20:30 (homework).
        assert!(count(19.5, 20.5) > 50.0 * count(3.0, 4.0).max(1.0));

        let exam_text = generate_text(&args(7, 1));
        let exam = times(&exam_text).len() as f64;
        let ratio = exam / arrivals.len() as f64;
        assert!((2.3..2.7).contains(&ratio), "exam week x2.5, got {ratio}");
        assert!(exam_text.contains(",12,") && exam_text.contains(",high"));
    }

    #[test]
    fn the_same_seed_writes_the_same_trace() {
        assert_eq!(generate_text(&args(2, 0)), generate_text(&args(2, 0)));
        let other = GenTraceArgs {
            seed: 8,
            ..args(2, 0)
        };
        assert_ne!(generate_text(&args(2, 0)), generate_text(&other));
    }

    #[test]
    fn a_config_without_a_timetable_is_refused() {
        let dir = std::env::temp_dir().join(format!("ebb-gen-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("no-timetable.yaml");
        std::fs::write(&path, DEFAULT_CONFIG).unwrap();
        let args = GenTraceArgs {
            timetable: path,
            ..args(1, 0)
        };
        let err = generate(&args, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().starts_with("--timetable"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_school_config_is_the_default_policy_plus_a_timetable() {
        let default = ScalerConfig::parse(DEFAULT_CONFIG).unwrap();
        let school = ScalerConfig::load(&school_config()).unwrap();
        let policy = |c: &ScalerConfig| {
            format!(
                "{:?} {:?} {:?} {:?} {:?}",
                c.tick, c.resources, c.target, c.cooldowns, c.rules
            )
        };
        assert_eq!(policy(&default), policy(&school));
        assert!(!school.timetable.is_empty() && school.timetable_entries.iter().all(|e| e.learn));
    }
}
