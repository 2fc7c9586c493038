//! Timetable windows that learn their floor. A break's burst arrives at the
//! same time every school day, and a cold start is longer than students
//! will wait, so a `learn` window remembers how many workers each minute of
//! its previous opening needed and pre-warms the next opening to that
//! profile, one cold start (the pre-warm lead) ahead. A quiet opening
//! teaches the next one to keep fewer: the profile is the last opening's,
//! not the all-time peak.
//!
//! A busier day than the last (an exam week's first day) shows in the first
//! window that opens: while it lasts and for the rest of the day, every
//! learned profile is scaled by how much more that window needed than it
//! had learned (the surge, at most x4).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use ebb_schedule::timetable::Window;

/// Resolution of a learned profile.
const STEP_SECONDS: i64 = 60;
/// How long a measured surge scales the other windows.
const SURGE_HOURS: i64 = 12;
const MAX_SURGE: f64 = 4.0;

/// One opening being watched: its start and the most workers each of its
/// minutes needed so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Opening {
    pub start: DateTime<Utc>,
    pub profile: Vec<u32>,
}

/// What the `learn` entries have learned. The live scaler keeps a copy in
/// NATS KV (`ebb-scaler`'s `memory` module), so a restart keeps it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LearnedFloors {
    /// Per entry: the profile of its last finished opening.
    pub profiles: BTreeMap<String, Vec<u32>>,
    /// Per entry: the opening being watched.
    pub openings: BTreeMap<String, Opening>,
    /// Latest measure of this opening's need over the last one's, and when.
    pub surge: Option<(DateTime<Utc>, f64)>,
}

fn minute(window: &Window, at: DateTime<Utc>) -> usize {
    ((at - window.start).num_seconds().max(0) / STEP_SECONDS) as usize
}

impl LearnedFloors {
    /// Starts watching each active `learn` window; a new opening of an
    /// entry first files its previous opening's profile.
    pub fn open(&mut self, active: &[Window]) {
        for window in active.iter().filter(|window| window.learn) {
            let watched = self.openings.get(&window.name);
            if watched.is_some_and(|opening| opening.start == window.start) {
                continue;
            }
            let minutes = (window.end - window.start).num_seconds().max(1) / STEP_SECONDS + 1;
            let fresh = Opening {
                start: window.start,
                profile: vec![0; minutes as usize],
            };
            if let Some(finished) = self.openings.insert(window.name.clone(), fresh) {
                self.profiles.insert(window.name.clone(), finished.profile);
            }
        }
    }

    /// The floor a `learn` window asks for at `now`: the most its previous
    /// opening needed from now until one lead ahead, and at least its
    /// `min_workers`.
    pub fn floor(&self, window: &Window, now: DateTime<Utc>, lead: Duration) -> u32 {
        let learned = self.profiles.get(&window.name).map_or(0, |profile| {
            let lead = chrono::Duration::from_std(lead).unwrap_or_default();
            let (from, to) = (minute(window, now), minute(window, now + lead));
            profile
                .iter()
                .skip(from)
                .take(to.saturating_sub(from) + 1)
                .copied()
                .max()
                .unwrap_or(0)
        });
        let surge = self
            .surge
            .filter(|(at, _)| now - *at < chrono::Duration::hours(SURGE_HOURS))
            .map_or(1.0, |(_, surge)| surge.clamp(1.0, MAX_SURGE));
        window
            .min_workers
            .max((learned as f64 * surge).ceil() as u32)
    }

    /// Records what the load needed at `now` in every active `learn` window
    /// that has opened.
    pub fn record(&mut self, active: &[Window], now: DateTime<Utc>, needed: u32) {
        for window in active.iter().filter(|w| w.learn && w.start <= now) {
            let at = minute(window, now);
            let Some(opening) = self.openings.get_mut(&window.name) else {
                continue;
            };
            if let Some(slot) = opening.profile.get_mut(at) {
                *slot = (*slot).max(needed);
            }
            let peak = |profile: &[u32]| profile.iter().take(at + 1).copied().max().unwrap_or(0);
            if let Some(learned) = self.profiles.get(&window.name).map(|p| peak(p))
                && learned > 0
            {
                self.surge = Some((now, peak(&opening.profile) as f64 / learned as f64));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn window(name: &str, day: u32, hour: u32) -> Window {
        let start = Utc.with_ymd_and_hms(2026, 3, day, hour, 0, 0).unwrap();
        Window {
            name: name.into(),
            start,
            end: start + chrono::Duration::minutes(10),
            min_workers: 1,
            learn: true,
        }
    }

    fn minutes(window: &Window, m: i64) -> DateTime<Utc> {
        window.start + chrono::Duration::minutes(m)
    }

    const LEAD: Duration = Duration::from_secs(45);

    #[test]
    fn the_next_opening_follows_the_last_ones_profile_a_lead_ahead() {
        let mut learned = LearnedFloors::default();
        let monday = window("break", 2, 13);
        learned.open(std::slice::from_ref(&monday));
        for (minute, needed) in [(0, 10), (1, 30), (2, 20), (5, 4)] {
            learned.record(
                std::slice::from_ref(&monday),
                minutes(&monday, minute),
                needed,
            );
        }
        assert_eq!(
            learned.floor(&monday, minutes(&monday, 1), LEAD),
            1,
            "nothing learned yet"
        );

        let tuesday = window("break", 3, 13);
        learned.open(std::slice::from_ref(&tuesday));
        let before = tuesday.start - chrono::Duration::seconds(40);
        assert_eq!(
            learned.floor(&tuesday, before, LEAD),
            10,
            "minute 0, a lead early"
        );
        assert_eq!(
            learned.floor(
                &tuesday,
                minutes(&tuesday, 0) + chrono::Duration::seconds(30),
                LEAD
            ),
            30,
            "minute 1 is within the lead"
        );
        let late = minutes(&tuesday, 4) + chrono::Duration::seconds(30);
        assert_eq!(
            learned.floor(&tuesday, late, LEAD),
            4,
            "minute 5 is within the lead"
        );
        assert_eq!(
            learned.floor(&tuesday, minutes(&tuesday, 7), LEAD),
            1,
            "min_workers"
        );
    }

    #[test]
    fn what_was_learned_survives_a_json_round_trip() {
        let mut learned = LearnedFloors::default();
        let monday = window("break", 2, 13);
        learned.open(std::slice::from_ref(&monday));
        for (minute, needed) in [(0, 3), (1, 7)] {
            learned.record(
                std::slice::from_ref(&monday),
                minutes(&monday, minute),
                needed,
            );
        }
        let tuesday = window("break", 3, 13);
        learned.open(std::slice::from_ref(&tuesday));
        learned.record(std::slice::from_ref(&tuesday), tuesday.start, 9);
        assert!(learned.surge.is_some() && !learned.profiles.is_empty());
        let json = serde_json::to_string(&learned).unwrap();
        let back: LearnedFloors = serde_json::from_str(&json).unwrap();
        assert_eq!(back, learned);
        // Tuesday's 9 against Monday's 3: minute 1's 7 scaled x3.
        assert_eq!(back.floor(&tuesday, minutes(&tuesday, 1), LEAD), 21);
    }

    #[test]
    fn a_busier_window_scales_the_rest_of_the_day_and_then_expires() {
        let mut learned = LearnedFloors::default();
        let (morning, afternoon) = (window("morning", 2, 13), window("afternoon", 2, 18));
        for (w, needed) in [(&morning, 10), (&afternoon, 20)] {
            learned.open(std::slice::from_ref(w));
            learned.record(std::slice::from_ref(w), w.start, needed);
        }
        // Exam day: the morning window needs 2.5x what it learned.
        let (exam_morning, exam_afternoon) = (window("morning", 3, 13), window("afternoon", 3, 18));
        learned.open(std::slice::from_ref(&exam_morning));
        learned.record(std::slice::from_ref(&exam_morning), exam_morning.start, 25);
        learned.open(std::slice::from_ref(&exam_afternoon));
        assert_eq!(
            learned.floor(&exam_afternoon, exam_afternoon.start, LEAD),
            50
        );
        // The next day the surge has expired; profiles carry what was needed.
        let next_morning = window("morning", 4, 13);
        learned.open(std::slice::from_ref(&next_morning));
        assert_eq!(learned.floor(&next_morning, next_morning.start, LEAD), 25);
    }
}
