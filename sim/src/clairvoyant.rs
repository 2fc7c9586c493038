//! The reference no real policy can beat by much: it knows every arrival,
//! so each question starts the moment it arrives, on a worker that was
//! started exactly one (mean) cold start earlier. A worker stops as soon as
//! it is idle unless its next question comes within a cold start: stopping
//! and starting again would cost more worker-seconds than waiting.
//!
//! With a worker profile every question takes a slot for its service at
//! the full batch's per-question rate (`aggregate(slots) / slots`, see
//! [`super::worker::WorkerModel::service`]): the reference plans its workers
//! full, which is what foresight aims at. Its answers are then slower than a
//! half-empty worker's would be, and its cost is what full batches allow;
//! the lower bound ([`super::run`]) instead takes every answer at the best
//! aggregate rate, so it stays below every policy, this one included.

use std::collections::HashSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::engine::{Fate, Outcome, PLOT_BUCKETS, Sample, Setup, measured_seconds};
use super::trace::Trace;

#[derive(Debug)]
struct Life {
    requested_at: f64,
    /// When each slot frees.
    slots: Vec<f64>,
    busy_until: f64,
}

/// Replays the trace with perfect foresight; cache draws match
/// [`super::engine::replay`]'s for the same seed.
pub fn replay(setup: &Setup) -> Outcome {
    let (trace, model, seed) = (setup.trace, setup.model, setup.seed);
    let cold_start = model.mean_cold_start();
    let mut cache_rng = ChaCha8Rng::seed_from_u64(seed);
    cache_rng.set_stream(2);
    let mut fates = Vec::with_capacity(trace.arrivals.len());
    let mut running: Vec<Life> = Vec::new();
    let mut lives: Vec<(f64, f64)> = Vec::new();
    let mut in_service: Vec<(f64, f64)> = Vec::new();
    // Answers finish out of order: an id is cached once its first answer is done.
    let mut answered: Vec<(f64, &str)> = Vec::new();
    let mut cached_ids: HashSet<&str> = HashSet::new();
    for arrival in &trace.arrivals {
        let now = arrival.at;
        let drawn_hit =
            model.cache_hit_ratio > 0.0 && cache_rng.random::<f64>() < model.cache_hit_ratio;
        answered.retain(|(done, id)| {
            let finished = *done <= now;
            if finished {
                cached_ids.insert(id);
            }
            !finished
        });
        if drawn_hit
            || arrival
                .question_id
                .as_deref()
                .is_some_and(|id| cached_ids.contains(id))
        {
            fates.push(Fate::Cached);
            continue;
        }
        // Workers idle for longer than a cold start have stopped.
        running.retain(|life| {
            let keep = life.busy_until + cold_start >= now;
            if !keep {
                lives.push((life.requested_at, life.busy_until));
            }
            keep
        });
        let (first, total) = model.service(arrival);
        let done = now + total;
        place(&mut running, now, done, cold_start, model.concurrency);
        in_service.push((now, done));
        if let Some(id) = arrival.question_id.as_deref() {
            answered.push((done, id));
        }
        fates.push(Fate::Answered {
            first_token: first as f32,
            total: total as f32,
        });
    }
    lives.extend(
        running
            .iter()
            .map(|life| (life.requested_at, life.busy_until)),
    );
    let last_done = in_service.iter().map(|(_, done)| *done).fold(0.0, f64::max);
    let horizon = trace.duration.max(last_done);
    let bucket_seconds = (trace.duration / PLOT_BUCKETS as f64).max(1.0);
    let samples = plot(trace, &in_service, &lives, horizon, bucket_seconds);
    let measured_lives = lives
        .iter()
        .filter(|(from, _)| *from >= setup.measure_from)
        .count() as u64;
    Outcome {
        fates,
        first_measured: trace
            .arrivals
            .partition_point(|a| a.at < setup.measure_from),
        worker_seconds: lives
            .iter()
            .map(|&(from, to)| measured_seconds(from, to, setup.measure_from, horizon))
            .sum(),
        cold_starts: measured_lives,
        scale_events: 2 * measured_lives,
        horizon,
        bucket_seconds,
        samples,
    }
}

/// Puts a question answered from `now` to `done` on a free slot: of the
/// running workers with one, the busiest (the others may then stop sooner),
/// else a new worker requested a cold start before `now`.
fn place(running: &mut Vec<Life>, now: f64, done: f64, cold_start: f64, concurrency: u32) {
    let chosen = running
        .iter_mut()
        .filter(|life| life.slots.iter().any(|free| *free <= now))
        .max_by(|a, b| a.busy_until.total_cmp(&b.busy_until));
    let life = match chosen {
        Some(life) => life,
        None => {
            running.push(Life {
                requested_at: now - cold_start,
                slots: vec![f64::NEG_INFINITY; concurrency as usize],
                busy_until: now,
            });
            running.last_mut().expect("just pushed")
        }
    };
    let slot = life
        .slots
        .iter_mut()
        .find(|free| **free <= now)
        .expect("a free slot");
    *slot = done;
    life.busy_until = life.busy_until.max(done);
}

/// The plot's samples: arrivals, questions in service and workers alive
/// per bucket, up to the horizon.
fn plot(
    trace: &Trace,
    in_service: &[(f64, f64)],
    lives: &[(f64, f64)],
    horizon: f64,
    bucket_seconds: f64,
) -> Vec<Sample> {
    let mut samples = vec![Sample::default(); PLOT_BUCKETS + 1];
    let bucket = |at: f64| ((at.max(0.0) / bucket_seconds) as usize).min(PLOT_BUCKETS);
    for arrival in &trace.arrivals {
        samples[bucket(arrival.at)].arrivals += 1;
    }
    let lag = bucket_maxima(in_service, &bucket, samples.len());
    let workers = bucket_maxima(lives, &bucket, samples.len());
    for ((sample, lag), workers) in samples.iter_mut().zip(lag).zip(workers) {
        sample.lag = lag;
        sample.workers = workers as u32;
    }
    samples.truncate(((horizon / bucket_seconds).ceil() as usize).clamp(1, PLOT_BUCKETS + 1));
    samples
}

/// Per plot bucket, the most `[from, to)` intervals that overlap in it.
fn bucket_maxima(
    intervals: &[(f64, f64)],
    bucket: &dyn Fn(f64) -> usize,
    buckets: usize,
) -> Vec<u64> {
    let mut changes: Vec<(f64, i64)> = intervals
        .iter()
        .flat_map(|&(from, to)| [(from, 1), (to, -1)])
        .collect();
    changes.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut maxima = vec![0; buckets];
    let (mut level, mut last) = (0i64, 0);
    for (at, change) in changes {
        let index = bucket(at).min(buckets - 1);
        // The level held from the previous change until this one.
        for held in &mut maxima[last.min(index)..=index] {
            *held = (*held).max(level.max(0) as u64);
        }
        level += change;
        maxima[index] = maxima[index].max(level.max(0) as u64);
        last = index;
    }
    for held in &mut maxima[last..] {
        *held = (*held).max(level.max(0) as u64);
    }
    maxima
}
