//! Percentiles of samples: one definition for `/metrics`, the scaler's
//! signals, the simulator's report and the benchmarks.

/// The `q` quantile (0..=1) of `sorted` (ascending) by nearest rank: the
/// smallest sample with at least `q` of all samples at or below it. `None`
/// when there are no samples.
pub fn nearest_rank<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

/// Sorts `samples` and returns their `q` quantile (0 when empty).
pub fn of(mut samples: Vec<f64>, q: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    nearest_rank(&samples, q).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_over_the_sorted_samples() {
        let sorted: Vec<u32> = (1..=100).collect();
        assert_eq!(nearest_rank(&sorted, 0.5), Some(50));
        assert_eq!(nearest_rank(&sorted, 0.9), Some(90));
        assert_eq!(nearest_rank(&sorted, 0.99), Some(99));
        assert_eq!(nearest_rank(&sorted, 1.0), Some(100));
        assert_eq!(nearest_rank(&sorted, 0.0), Some(1));
        assert_eq!(nearest_rank(&sorted[..1], 0.9), Some(1));
        assert_eq!(nearest_rank::<u32>(&[], 0.5), None);
        assert_eq!(of(vec![3.0, 1.0, 2.0], 0.5), 2.0);
    }
}
