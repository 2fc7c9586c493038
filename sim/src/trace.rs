//! Traces: when questions arrive and how long their answers are. Three
//! formats, told apart by their header line:
//! - Azure LLM inference CSV: `TIMESTAMP,ContextTokens,GeneratedTokens`, one
//!   row per request, timestamps in UTC;
//! - a rate profile: `window_start_s,total_rate_rps,...`, one row per window,
//!   expanded to arrivals by a seeded Poisson (or Gamma) process;
//! - ebb's own CSV: `arrival_s,input_tokens,output_tokens[,grade][,question_id][,priority]`,
//!   optionally preceded by a `# start=<RFC 3339 time>` line.

use std::path::Path;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use ebb_nats::Priority;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, Gamma};
use serde::Serialize;

/// One question as the simulator replays it.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrival {
    /// Seconds since the trace's start.
    pub at: f64,
    pub input_tokens: u32,
    pub output_tokens: u32,
    pub priority: Priority,
    pub grade: Option<u8>,
    /// Questions with the same id have the same answer (cacheable).
    pub question_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TraceFormat {
    Azure,
    RateProfile,
    Ebb,
}

/// A loaded trace, sorted by arrival time.
#[derive(Debug, Clone)]
pub struct Trace {
    pub format: TraceFormat,
    /// Wall-clock time of `at = 0` (drives the timetable).
    pub start: DateTime<Utc>,
    /// Seconds covered: the last arrival, or the end of the last window.
    pub duration: f64,
    pub arrivals: Vec<Arrival>,
}

/// How a trace is turned into arrivals; all of it is printed in the report.
#[derive(Debug, Clone, Serialize)]
pub struct LoadOptions {
    /// Arrivals per second are multiplied by this.
    pub rate_scale: f64,
    /// Time is stretched by this (0.5 replays twice as fast).
    pub time_scale: f64,
    /// Coefficient of variation of gaps when expanding a rate profile: 1 is
    /// Poisson, above 1 a burstier Gamma process.
    pub arrival_cv: f64,
    /// Mean prompt tokens for traces without token counts (exponential).
    pub mean_input_tokens: f64,
    /// Mean answer tokens for traces without token counts (exponential).
    pub mean_output_tokens: f64,
    /// Start time for traces that only have relative times.
    pub start: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path}: unknown trace format; the header must start with `TIMESTAMP,ContextTokens,GeneratedTokens`, `window_start_s,total_rate_rps` or `arrival_s,input_tokens,output_tokens`, found `{header}`"
    )]
    UnknownFormat { path: String, header: String },
    #[error("{path} line {line}: {message}")]
    Row {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path}: no arrivals")]
    Empty { path: String },
    #[error("--{option}: {message}")]
    Option {
        option: &'static str,
        message: String,
    },
}

/// Longest answer drawn for traces without token counts.
const MAX_DRAWN_TOKENS: f64 = 8192.0;

impl Trace {
    /// Reads a trace file in any of the three formats.
    pub fn load(
        path: &Path,
        options: &LoadOptions,
        rng: &mut ChaCha8Rng,
    ) -> Result<Trace, TraceError> {
        let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Trace::parse(&text, &path.display().to_string(), options, rng)
    }

    pub fn parse(
        text: &str,
        path: &str,
        options: &LoadOptions,
        rng: &mut ChaCha8Rng,
    ) -> Result<Trace, TraceError> {
        for (option, value) in [
            ("rate-scale", options.rate_scale),
            ("time-scale", options.time_scale),
            ("arrival-cv", options.arrival_cv),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(TraceError::Option {
                    option,
                    message: format!("must be a positive number, got {value}"),
                });
            }
        }
        let mut start = options.start;
        let mut lines = text.lines().enumerate().peekable();
        while let Some((_, line)) = lines.next_if(|(_, line)| line.starts_with('#')) {
            if let Some(value) = line.trim_start_matches('#').trim().strip_prefix("start=") {
                start = DateTime::parse_from_rfc3339(value.trim())
                    .map_err(|err| TraceError::Row {
                        path: path.into(),
                        line: 1,
                        message: format!("start={value}: {err}"),
                    })?
                    .with_timezone(&Utc);
            }
        }
        let Some((_, header)) = lines.next() else {
            return Err(TraceError::Empty { path: path.into() });
        };
        let columns: Vec<&str> = header.split(',').map(str::trim).collect();
        let rows = lines.filter(|(_, line)| !line.trim().is_empty());
        let row_error = |line: usize, message: String| TraceError::Row {
            path: path.into(),
            line: line + 1,
            message,
        };
        let mut trace = match columns.as_slice() {
            ["TIMESTAMP", "ContextTokens", "GeneratedTokens", ..] => parse_azure(rows, row_error)?,
            ["window_start_s", "total_rate_rps", ..] => {
                parse_rate_profile(rows, row_error, options, start, rng)?
            }
            ["arrival_s", "input_tokens", "output_tokens", ..] => {
                parse_ebb(&columns, rows, row_error, start)?
            }
            _ => {
                return Err(TraceError::UnknownFormat {
                    path: path.into(),
                    header: header.chars().take(80).collect(),
                });
            }
        };
        if trace.arrivals.is_empty() {
            return Err(TraceError::Empty { path: path.into() });
        }
        trace.arrivals.sort_by(|a, b| a.at.total_cmp(&b.at));
        if trace.format != TraceFormat::RateProfile {
            // A rate profile's rates were scaled while expanding.
            trace.arrivals =
                scale_rate(std::mem::take(&mut trace.arrivals), options.rate_scale, rng);
            trace.duration = trace
                .duration
                .max(trace.arrivals.last().map_or(0.0, |a| a.at));
        }
        for arrival in &mut trace.arrivals {
            arrival.at *= options.time_scale;
        }
        trace.duration *= options.time_scale;
        Ok(trace)
    }
}

type RowError<'a> = &'a dyn Fn(usize, String) -> TraceError;

fn field<T: std::str::FromStr>(
    value: Option<&str>,
    name: &str,
    line: usize,
    row_error: RowError,
) -> Result<T, TraceError> {
    let value = value.ok_or_else(|| row_error(line, format!("missing {name}")))?;
    value
        .trim()
        .parse()
        .map_err(|_| row_error(line, format!("{name} `{value}` is not a valid number")))
}

fn parse_azure<'a>(
    rows: impl Iterator<Item = (usize, &'a str)>,
    row_error: impl Fn(usize, String) -> TraceError,
) -> Result<Trace, TraceError> {
    let mut times = Vec::new();
    for (line, row) in rows {
        let mut cells = row.split(',');
        let stamp = cells.next().unwrap_or_default().trim();
        let time = NaiveDateTime::parse_from_str(stamp, "%Y-%m-%d %H:%M:%S%.f")
            .map_err(|err| row_error(line, format!("TIMESTAMP `{stamp}`: {err}")))?;
        let input = field(cells.next(), "ContextTokens", line, &row_error)?;
        let output = field(cells.next(), "GeneratedTokens", line, &row_error)?;
        times.push((Utc.from_utc_datetime(&time), input, output));
    }
    let start = times.iter().map(|(t, _, _)| *t).min().unwrap_or_default();
    let arrivals = times
        .into_iter()
        .map(|(time, input_tokens, output_tokens)| Arrival {
            at: (time - start).as_seconds_f64(),
            input_tokens,
            output_tokens,
            priority: Priority::Normal,
            grade: None,
            question_id: None,
        })
        .collect::<Vec<_>>();
    let duration = arrivals.iter().map(|a| a.at).fold(0.0, f64::max);
    Ok(Trace {
        format: TraceFormat::Azure,
        start,
        duration,
        arrivals,
    })
}

fn parse_rate_profile<'a>(
    rows: impl Iterator<Item = (usize, &'a str)>,
    row_error: impl Fn(usize, String) -> TraceError,
    options: &LoadOptions,
    start: DateTime<Utc>,
    rng: &mut ChaCha8Rng,
) -> Result<Trace, TraceError> {
    let mut windows: Vec<(f64, f64)> = Vec::new();
    for (line, row) in rows {
        let mut cells = row.split(',');
        let window_start: f64 = field(cells.next(), "window_start_s", line, &row_error)?;
        let rate: f64 = field(cells.next(), "total_rate_rps", line, &row_error)?;
        if !(rate.is_finite() && rate >= 0.0) {
            return Err(row_error(
                line,
                format!("total_rate_rps {rate} is negative"),
            ));
        }
        if windows
            .last()
            .is_some_and(|(last, _)| *last >= window_start)
        {
            return Err(row_error(line, "window_start_s must increase".into()));
        }
        windows.push((window_start, rate * options.rate_scale));
    }
    // The last window is as long as the one before it.
    let width = match windows.as_slice() {
        [.., (a, _), (b, _)] => b - a,
        _ => 600.0,
    };
    let shape = 1.0 / (options.arrival_cv * options.arrival_cv);
    let tokens = |mean: f64, rng: &mut ChaCha8Rng| {
        let exp = Exp::new(1.0 / mean.max(1.0)).expect("positive rate");
        exp.sample(rng).clamp(1.0, MAX_DRAWN_TOKENS).round() as u32
    };
    let first = windows.first().map_or(0.0, |(s, _)| *s);
    let mut arrivals = Vec::new();
    for (index, &(window_start, rate)) in windows.iter().enumerate() {
        let end = windows
            .get(index + 1)
            .map_or(window_start + width, |(s, _)| *s);
        if rate <= 0.0 {
            continue;
        }
        let gaps = Gamma::new(shape, 1.0 / (shape * rate)).expect("positive shape and scale");
        // Each window starts its own renewal process at a random phase.
        let mut at = window_start + rng.random::<f64>() * gaps.sample(rng);
        while at < end {
            arrivals.push(Arrival {
                at: at - first,
                input_tokens: tokens(options.mean_input_tokens, rng),
                output_tokens: tokens(options.mean_output_tokens, rng),
                priority: Priority::Normal,
                grade: None,
                question_id: None,
            });
            at += gaps.sample(rng);
        }
    }
    let duration = windows.last().map_or(0.0, |(s, _)| s + width) - first;
    Ok(Trace {
        format: TraceFormat::RateProfile,
        start,
        duration,
        arrivals,
    })
}

fn parse_ebb<'a>(
    columns: &[&str],
    rows: impl Iterator<Item = (usize, &'a str)>,
    row_error: impl Fn(usize, String) -> TraceError,
    start: DateTime<Utc>,
) -> Result<Trace, TraceError> {
    let index_of = |name: &str| columns.iter().position(|c| *c == name);
    let (grade_at, id_at, priority_at) = (
        index_of("grade"),
        index_of("question_id"),
        index_of("priority"),
    );
    let mut arrivals = Vec::new();
    for (line, row) in rows {
        let cells: Vec<&str> = row.split(',').map(str::trim).collect();
        let optional = |at: Option<usize>| at.and_then(|i| cells.get(i)).filter(|c| !c.is_empty());
        let at: f64 = field(cells.first().copied(), "arrival_s", line, &row_error)?;
        if !(at.is_finite() && at >= 0.0) {
            return Err(row_error(line, format!("arrival_s {at} is negative")));
        }
        let grade = optional(grade_at)
            .map(|g| field(Some(g), "grade", line, &row_error))
            .transpose()?;
        let priority = match optional(priority_at) {
            None => Priority::Normal,
            Some(p) => p.parse().map_err(|_| {
                row_error(line, format!("priority `{p}` is not high, normal or low"))
            })?,
        };
        arrivals.push(Arrival {
            at,
            input_tokens: field(cells.get(1).copied(), "input_tokens", line, &row_error)?,
            output_tokens: field(cells.get(2).copied(), "output_tokens", line, &row_error)?,
            priority,
            grade,
            question_id: optional(id_at).map(|id| id.to_string()),
        });
    }
    let duration = arrivals.iter().map(|a| a.at).fold(0.0, f64::max);
    Ok(Trace {
        format: TraceFormat::Ebb,
        start,
        duration,
        arrivals,
    })
}

/// Thins (scale < 1) or copies (scale > 1) per-request arrivals: each one
/// is kept `floor(scale)` times, plus once more with the fractional part's
/// probability.
fn scale_rate(arrivals: Vec<Arrival>, scale: f64, rng: &mut ChaCha8Rng) -> Vec<Arrival> {
    if scale == 1.0 {
        return arrivals;
    }
    let whole = scale.floor() as usize;
    let fraction = scale - scale.floor();
    let mut scaled = Vec::with_capacity((arrivals.len() as f64 * scale) as usize + 1);
    for arrival in arrivals {
        let copies = whole + usize::from(rng.random::<f64>() < fraction);
        scaled.extend(std::iter::repeat_n(arrival, copies));
    }
    scaled
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn options() -> LoadOptions {
        LoadOptions {
            rate_scale: 1.0,
            time_scale: 1.0,
            arrival_cv: 1.0,
            mean_input_tokens: 500.0,
            mean_output_tokens: 200.0,
            start: Utc.with_ymd_and_hms(2026, 3, 2, 0, 0, 0).unwrap(),
        }
    }

    fn parse(text: &str, options: &LoadOptions) -> Result<Trace, TraceError> {
        Trace::parse(text, "t.csv", options, &mut ChaCha8Rng::seed_from_u64(7))
    }

    #[test]
    fn azure_rows_become_relative_arrivals() {
        let trace = parse(
            "TIMESTAMP,ContextTokens,GeneratedTokens\n\
             2023-11-16 18:15:46.5000000,374,44\n\
             2023-11-16 18:15:50.0000000,396,109\n",
            &options(),
        )
        .unwrap();
        assert_eq!(trace.format, TraceFormat::Azure);
        assert_eq!(trace.start.to_rfc3339(), "2023-11-16T18:15:46.500+00:00");
        assert_eq!(trace.arrivals.len(), 2);
        assert!((trace.arrivals[1].at - 3.5).abs() < 1e-9);
        assert_eq!(trace.arrivals[1].output_tokens, 109);
    }

    #[test]
    fn ebb_csv_reads_optional_columns_and_start() {
        let trace = parse(
            "# start=2026-03-02T08:00:00+08:00\n\
             arrival_s,input_tokens,output_tokens,grade,question_id,priority\n\
             1.5,10,20,12,q1,high\n\
             0.5,10,20,,,\n",
            &options(),
        )
        .unwrap();
        assert_eq!(trace.start.to_rfc3339(), "2026-03-02T00:00:00+00:00");
        assert_eq!(trace.arrivals[0].at, 0.5, "sorted");
        let first = &trace.arrivals[1];
        assert_eq!(first.grade, Some(12));
        assert_eq!(first.question_id.as_deref(), Some("q1"));
        assert_eq!(first.priority, Priority::High);
        assert_eq!(trace.arrivals[0].priority, Priority::Normal);
    }

    #[test]
    fn rate_profile_expands_to_about_the_right_count() {
        let text =
            "window_start_s,total_rate_rps,requests_in_window\n0,10,6000\n600,0,0\n1200,5,3000\n";
        let trace = parse(text, &options()).unwrap();
        assert_eq!(trace.format, TraceFormat::RateProfile);
        assert_eq!(trace.duration, 1800.0);
        let n = trace.arrivals.len() as f64;
        // 9,000 expected; Poisson sd ~95.
        assert!((n - 9000.0).abs() < 500.0, "{n}");
        assert!(
            !trace
                .arrivals
                .iter()
                .any(|a| (600.0..1200.0).contains(&a.at))
        );
        let scaled = parse(
            text,
            &LoadOptions {
                rate_scale: 0.5,
                time_scale: 2.0,
                ..options()
            },
        )
        .unwrap();
        assert_eq!(scaled.duration, 3600.0);
        let n = scaled.arrivals.len() as f64;
        assert!((n - 4500.0).abs() < 350.0, "{n}");
    }

    #[test]
    fn rate_scale_thins_and_copies_request_traces() {
        let mut text = String::from("arrival_s,input_tokens,output_tokens\n");
        for i in 0..1000 {
            text.push_str(&format!("{i},1,1\n"));
        }
        let half = parse(
            &text,
            &LoadOptions {
                rate_scale: 0.5,
                ..options()
            },
        )
        .unwrap();
        assert!((half.arrivals.len() as i64 - 500).abs() < 60);
        let double = parse(
            &text,
            &LoadOptions {
                rate_scale: 2.0,
                ..options()
            },
        )
        .unwrap();
        assert_eq!(double.arrivals.len(), 2000);
    }

    #[test]
    fn bad_input_is_named() {
        let err = parse("foo,bar\n1,2\n", &options()).unwrap_err();
        assert!(err.to_string().contains("unknown trace format"), "{err}");
        let err = parse("arrival_s,input_tokens,output_tokens\n1,x,3\n", &options()).unwrap_err();
        assert!(
            err.to_string().contains("line 2: input_tokens `x`"),
            "{err}"
        );
        let err = parse("arrival_s,input_tokens,output_tokens\n", &options()).unwrap_err();
        assert!(err.to_string().contains("no arrivals"), "{err}");
        let err = parse(
            "arrival_s,input_tokens,output_tokens\n1,1,1\n",
            &LoadOptions {
                rate_scale: 0.0,
                ..options()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("--rate-scale"), "{err}");
    }
}
