//! The one retry backoff: doubling from a base, capped.

use std::time::Duration;

/// Before attempt `attempt + 1`: `base x 2^(attempt - 1)`, at most `max`
/// (attempts 0 and 1 both wait `base`).
pub fn exponential(base: Duration, attempt: u64, max: Duration) -> Duration {
    let doublings = attempt.saturating_sub(1).min(16) as u32;
    base.saturating_mul(1 << doublings).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_base_up_to_the_cap() {
        let second = Duration::from_secs(1);
        let minute = Duration::from_secs(60);
        let waits: Vec<u64> = (0..9)
            .map(|attempt| exponential(second, attempt, minute).as_secs())
            .collect();
        assert_eq!(waits, [1, 1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(exponential(second, u64::MAX, minute), minute);
    }
}
