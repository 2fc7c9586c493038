//! Which priority a free worker serves next.
//!
//! Strict priority (high, normal, low) can starve `low` for as long as
//! `high` keeps arriving, so a question of a lower priority that has waited
//! `aging` or longer is served first, oldest first.
//!
//! The bound: once a normal or low question has waited `aging`, the next
//! free worker takes it unless an older aged question is ahead of it. So
//! with `w` workers busy for `s` each, it starts within
//! `aging + (aged questions ahead of it + 1) * s / w`: under a flood where
//! every question ages, the queue degrades to FIFO, which starves nobody.

use std::time::Duration;

use ebb_nats::{Priority, QueueDepth};

/// The priorities in the order to try them.
pub fn order(depth: &QueueDepth, aging: Duration) -> Vec<Priority> {
    let mut aged: Vec<_> = depth
        .priorities
        .iter()
        .filter(|d| d.priority != Priority::High && d.pending > 0 && d.oldest_waiting >= aging)
        .collect();
    aged.sort_by_key(|d| std::cmp::Reverse(d.oldest_waiting));
    let mut order: Vec<Priority> = aged.iter().map(|d| d.priority).collect();
    for priority in Priority::ALL {
        if !order.contains(&priority) {
            order.push(priority);
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use ebb_nats::PriorityDepth;

    fn depth(ages_s: [Option<u64>; 3]) -> QueueDepth {
        QueueDepth {
            priorities: Priority::ALL
                .into_iter()
                .zip(ages_s)
                .map(|(priority, age)| PriorityDepth {
                    priority,
                    pending: u64::from(age.is_some()),
                    ack_pending: 0,
                    oldest_waiting: Duration::from_secs(age.unwrap_or(0)),
                })
                .collect(),
        }
    }

    const AGING: Duration = Duration::from_secs(60);

    #[test]
    fn fresh_questions_go_by_priority() {
        let order = order(&depth([Some(1), Some(50), Some(59)]), AGING);
        assert_eq!(order, [Priority::High, Priority::Normal, Priority::Low]);
    }

    #[test]
    fn an_aged_low_question_goes_before_fresh_high_ones() {
        let order = order(&depth([Some(1), None, Some(60)]), AGING);
        assert_eq!(order, [Priority::Low, Priority::High, Priority::Normal]);
    }

    #[test]
    fn aged_questions_go_oldest_first() {
        let normal_older = order(&depth([Some(500), Some(90), Some(70)]), AGING);
        assert_eq!(
            normal_older,
            [Priority::Normal, Priority::Low, Priority::High]
        );
        let low_older = order(&depth([Some(5), Some(70), Some(90)]), AGING);
        assert_eq!(low_older, [Priority::Low, Priority::Normal, Priority::High]);
    }
}
