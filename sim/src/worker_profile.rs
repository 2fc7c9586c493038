//! A simulated worker on the measured engine: `--worker-profile` reads the
//! worker benchmark's JSON (`target/bench/decode.json`, written by `cargo
//! bench -p ebb-worker --bench decode`) and models a worker with k active
//! sequences as decoding each at `aggregate(k) / k` tokens/s.
//!
//! Between measured batch sizes the aggregate is interpolated linearly;
//! beyond the largest it stays flat (a bigger batch would only share the
//! same rate); below the smallest it falls in proportion (each sequence at
//! the smallest batch's per-sequence rate). Every rate is multiplied by
//! `--profile-speedup`, which scales a curve measured on a CPU to the GPU
//! the replay assumes.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The part of the benchmark file read here; every other key is ignored,
/// so the benchmark can report more without breaking the simulator.
#[derive(Debug, Deserialize)]
struct BenchFile {
    formats: BTreeMap<String, BenchFormat>,
}

#[derive(Debug, Deserialize)]
struct BenchFormat {
    /// Batch size (a JSON object key, so a string) -> tokens/s of the batch.
    aggregate_tokens_per_s: BTreeMap<String, f64>,
    prefill_tokens_per_s: f64,
}

/// A flag that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{option}: {message}")]
pub struct ProfileError {
    pub option: &'static str,
    pub message: String,
}

fn error(option: &'static str, message: impl Into<String>) -> ProfileError {
    ProfileError {
        option,
        message: message.into(),
    }
}

/// One measured batch size, rates after the speedup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRate {
    pub batch: u32,
    /// Answer tokens per second of all the batch's sequences together.
    pub aggregate_tokens_per_s: f64,
    /// Of each sequence: aggregate / batch.
    pub per_sequence_tokens_per_s: f64,
}

/// The measured engine a simulated worker runs, as the report states it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerProfile {
    /// The benchmark file's name.
    pub file: String,
    /// Which of its formats (weights) this is.
    pub format: String,
    /// Every measured rate was multiplied by this.
    pub speedup: f64,
    /// Prompt tokens per second of one sequence, after the speedup.
    pub prefill_tokens_per_s: f64,
    /// By batch size, ascending; never empty.
    pub batches: Vec<BatchRate>,
}

fn positive(option: &'static str, what: &str, value: f64) -> Result<f64, ProfileError> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(error(
            option,
            format!("{what} must be a positive number, got {value}"),
        ))
    }
}

impl WorkerProfile {
    /// Reads `path`; see [`WorkerProfile::parse`].
    pub fn load(
        path: &Path,
        format: Option<&str>,
        speedup: f64,
    ) -> Result<WorkerProfile, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            error(
                "worker-profile",
                format!("cannot read {}: {err}", path.display()),
            )
        })?;
        let file = path.file_name().map_or_else(
            || path.display().to_string(),
            |name| name.to_string_lossy().into_owned(),
        );
        Self::parse(&text, &file, format, speedup)
    }

    /// Parses the benchmark's JSON and picks `format` (default: `f16` when
    /// the file has it, else its only format). Errors name the flag to fix.
    pub fn parse(
        text: &str,
        file: &str,
        format: Option<&str>,
        speedup: f64,
    ) -> Result<WorkerProfile, ProfileError> {
        let speedup = positive("profile-speedup", "the speedup", speedup)?;
        let bench: BenchFile = serde_json::from_str(text)
            .map_err(|err| error("worker-profile", format!("{file}: {err}")))?;
        let names = || bench.formats.keys().cloned().collect::<Vec<_>>().join(", ");
        let name = match format {
            Some(name) if bench.formats.contains_key(name) => name.to_owned(),
            Some(name) => {
                return Err(error(
                    "worker-profile-format",
                    format!("{file} has no format `{name}` (it has: {})", names()),
                ));
            }
            None if bench.formats.contains_key("f16") => "f16".to_owned(),
            None => {
                let mut keys = bench.formats.keys();
                match (keys.next(), keys.next()) {
                    (Some(only), None) => only.clone(),
                    (None, _) => {
                        return Err(error("worker-profile", format!("{file} has no formats")));
                    }
                    _ => {
                        return Err(error(
                            "worker-profile-format",
                            format!(
                                "{file} has several formats and no f16 ({}): name one",
                                names()
                            ),
                        ));
                    }
                }
            }
        };
        let measured = &bench.formats[&name];
        let key = format!("formats.{name}.aggregate_tokens_per_s");
        let mut batches = measured
            .aggregate_tokens_per_s
            .iter()
            .map(|(batch, rate)| {
                let batch: u32 = batch.parse().ok().filter(|b| *b >= 1).ok_or_else(|| {
                    error(
                        "worker-profile",
                        format!("{file}: {key}: `{batch}` is not a batch size"),
                    )
                })?;
                let what = format!("{file}: {key}.{batch}");
                let aggregate = positive("worker-profile", &what, *rate)? * speedup;
                Ok(BatchRate {
                    batch,
                    aggregate_tokens_per_s: aggregate,
                    per_sequence_tokens_per_s: aggregate / f64::from(batch),
                })
            })
            .collect::<Result<Vec<_>, ProfileError>>()?;
        if batches.is_empty() {
            return Err(error("worker-profile", format!("{file}: {key} is empty")));
        }
        // Keys sort as strings ("16" before "2"); the curve wants numbers.
        batches.sort_by_key(|b| b.batch);
        let what = format!("{file}: formats.{name}.prefill_tokens_per_s");
        let prefill = positive("worker-profile", &what, measured.prefill_tokens_per_s)?;
        Ok(WorkerProfile {
            file: file.to_owned(),
            format: name,
            speedup,
            prefill_tokens_per_s: prefill * speedup,
            batches,
        })
    }

    /// The largest batch measured: the default slots per worker.
    pub fn largest_batch(&self) -> u32 {
        self.batches.last().map_or(1, |b| b.batch)
    }

    /// Tokens/s of a worker decoding `active` sequences together.
    pub fn aggregate(&self, active: u32) -> f64 {
        let k = f64::from(active);
        let (Some(first), Some(last)) = (self.batches.first(), self.batches.last()) else {
            return 0.0;
        };
        if active <= first.batch {
            return first.per_sequence_tokens_per_s * k;
        }
        if active >= last.batch {
            return last.aggregate_tokens_per_s;
        }
        let above = self.batches.partition_point(|b| b.batch < active);
        let (low, high) = (&self.batches[above - 1], &self.batches[above]);
        let share = (k - f64::from(low.batch)) / f64::from(high.batch - low.batch);
        low.aggregate_tokens_per_s
            + share * (high.aggregate_tokens_per_s - low.aggregate_tokens_per_s)
    }

    /// Tokens/s of each of `active` sequences decoding together.
    pub fn per_sequence(&self, active: u32) -> f64 {
        self.aggregate(active.max(1)) / f64::from(active.max(1))
    }

    /// The most tokens/s a worker of `slots` slots decodes at any batch it
    /// can run: the lower bound's rate (a measured dip at the full batch,
    /// noise or not, must not make the bound exceed what a policy reaches).
    pub fn peak_aggregate(&self, slots: u32) -> f64 {
        self.batches
            .iter()
            .filter(|b| b.batch <= slots)
            .map(|b| b.aggregate_tokens_per_s)
            .fold(self.aggregate(slots), f64::max)
    }

    /// The curve in words, for the Markdown report and the plot.
    pub fn describe(&self) -> String {
        let rates: Vec<String> = self
            .batches
            .iter()
            .map(|b| {
                format!(
                    "{}: {:.1} ({:.1} each)",
                    b.batch, b.aggregate_tokens_per_s, b.per_sequence_tokens_per_s
                )
            })
            .collect();
        format!(
            "profile `{}` format {} x{}: decode tok/s by batch {} (measured prefill x{}: {:.1} tok/s)",
            self.file,
            self.format,
            self.speedup,
            rates.join(", "),
            self.speedup,
            self.prefill_tokens_per_s
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CURVE: &str = r#"{"formats": {
        "f16": {"aggregate_tokens_per_s": {"1": 10, "2": 16, "16": 40, "4": 24}, "prefill_tokens_per_s": 200},
        "gguf-q8_0": {"aggregate_tokens_per_s": {"2": 16}, "prefill_tokens_per_s": 100}}}"#;

    #[test]
    fn the_curve_is_interpolated_between_batches_and_flat_beyond() {
        let profile = WorkerProfile::parse(CURVE, "decode.json", None, 1.0).unwrap();
        assert_eq!(profile.format, "f16", "f16 unless told");
        let batches: Vec<u32> = profile.batches.iter().map(|b| b.batch).collect();
        assert_eq!(batches, [1, 2, 4, 16], "by number, not as strings");
        assert_eq!(profile.largest_batch(), 16);
        assert_eq!(profile.aggregate(2), 16.0);
        assert_eq!(profile.aggregate(3), 20.0);
        assert!((profile.aggregate(8) - (24.0 + 16.0 / 3.0)).abs() < 1e-12);
        assert_eq!(profile.aggregate(64), 40.0, "flat beyond the largest");
        assert_eq!(profile.per_sequence(64), 40.0 / 64.0);
        assert_eq!(profile.per_sequence(0), 10.0, "a worker has one slot");
        // Below the smallest measured batch: that batch's rate per sequence.
        let small = WorkerProfile::parse(CURVE, "decode.json", Some("gguf-q8_0"), 1.0).unwrap();
        assert_eq!(small.aggregate(1), 8.0);
    }

    #[test]
    fn the_speedup_scales_every_rate_and_the_peak_is_the_best_reachable() {
        let doubled = WorkerProfile::parse(CURVE, "decode.json", None, 2.0).unwrap();
        assert_eq!(doubled.aggregate(16), 80.0);
        assert_eq!(doubled.prefill_tokens_per_s, 400.0);
        let dip = r#"{"formats": {"f16": {"aggregate_tokens_per_s": {"1": 10, "8": 50, "16": 45}, "prefill_tokens_per_s": 200}}}"#;
        let dip = WorkerProfile::parse(dip, "decode.json", None, 1.0).unwrap();
        assert_eq!(
            dip.peak_aggregate(16),
            50.0,
            "a measured dip is not the bound"
        );
        assert_eq!(dip.peak_aggregate(4), dip.aggregate(4));
    }
}
