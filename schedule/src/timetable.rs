//! School timetables: "classes start at 07:50 on weekdays in Shanghai" as cron
//! lines in IANA time zones, turned into windows of real (UTC) time during
//! which the scaler keeps a floor of warm workers, so the first question of a
//! lesson does not wait for a cold start.
//!
//! The gateway reads the same entries to name time windows ("exam week")
//! that its priority rules match; `min_workers` and `learn` are the scaler's.
//!
//! Every local wall-clock minute an entry's cron matches opens a window of the
//! entry's duration. Daylight-saving changes must never lose a window, since a
//! missing floor leaves students waiting: a local time skipped by
//! spring-forward opens at the first instant after the gap, and a local time
//! repeated by fall-back opens once, at its first occurrence.
//!
//! Searches walk local dates, skip the days the cron cannot match and expand
//! only the matching times, so [`Timetable::floor_at`] is cheap enough to call
//! on every scaler tick.

use std::time::Duration;

use chrono::{DateTime, LocalResult, NaiveDate, NaiveDateTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;

use crate::cron::{CronError, CronSchedule};

/// How far ahead [`Timetable::next_window`] looks: a yearly entry still shows.
const HORIZON_DAYS: i64 = 366;
/// Longest window accepted. [`Timetable::floor_at`] looks back this far; a
/// standing floor belongs in `resources.min_instances` instead.
const LONGEST_WINDOW: Duration = Duration::from_secs(HORIZON_DAYS as u64 * 86_400);
/// Longest clock jump stepped across: Samoa skipped all of 2011-12-30.
const LONGEST_GAP_MINUTES: i64 = 2 * 24 * 60;
/// Local dates searched before a range, for times in a gap that open a day later.
const GAP_MARGIN_DAYS: i64 = 2;

/// One timetable line from the scaler's YAML config.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimetableEntry {
    /// Shown in logs and status, e.g. `morning-classes`.
    pub name: String,
    /// Standard five-field cron, read in `timezone`'s wall-clock time.
    pub cron: String,
    /// IANA time zone, e.g. `Asia/Shanghai`.
    pub timezone: String,
    /// How long each window stays open: `90m`, `2h`, or seconds.
    #[serde(deserialize_with = "ebb_runtime::duration::deserialize")]
    pub duration: Duration,
    /// Workers kept running while a window is open (scaler only).
    #[serde(default)]
    pub min_workers: u32,
    /// Pre-warm to what the previous opening of this entry needed, when more
    /// than `min_workers`: a break's burst sizes the next break's floor.
    #[serde(default)]
    pub learn: bool,
}

/// One opening of a timetable entry in real time: `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    pub name: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub min_workers: u32,
    pub learn: bool,
}

/// A timetable entry that cannot be used; the message starts with its key path.
#[derive(Debug, thiserror::Error)]
pub enum TimetableError {
    #[error("timetable[{index}].cron: {problem}")]
    Cron { index: usize, problem: CronError },
    #[error("timetable[{index}].timezone: unknown IANA time zone `{zone}`")]
    TimeZone { index: usize, zone: String },
    #[error("timetable[{index}].{key}: {problem}")]
    Invalid {
        index: usize,
        key: &'static str,
        problem: &'static str,
    },
}

/// The validated timetable, ready to answer "what floor now?" every tick.
#[derive(Debug, Clone, Default)]
pub struct Timetable {
    entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    schedule: CronSchedule,
    zone: Tz,
    duration: TimeDelta,
    min_workers: u32,
    learn: bool,
}

impl Timetable {
    /// Validates every entry, naming the first offending key.
    pub fn new(entries: &[TimetableEntry]) -> Result<Timetable, TimetableError> {
        let entries = entries
            .iter()
            .enumerate()
            .map(|(index, entry)| Entry::compile(index, entry))
            .collect::<Result<_, _>>()?;
        Ok(Timetable { entries })
    }

    /// Whether the config has no timetable at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Windows whose start lies in [from, to), ordered by start then name.
    pub fn windows_starting_between(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<Window> {
        let mut windows: Vec<Window> = self
            .entries
            .iter()
            .flat_map(|entry| {
                entry
                    .openings_between(from, to)
                    .filter(move |start| *start < to)
                    .map(move |start| entry.window(start))
            })
            .collect();
        windows.sort_by(|a, b| a.start.cmp(&b.start).then_with(|| a.name.cmp(&b.name)));
        // Every minute of a DST gap opens at the same instant: one window is enough.
        windows.dedup();
        windows
    }

    /// The window that sets the floor at `now`: among the
    /// [active](Timetable::active_windows) ones, the one with the highest
    /// `min_workers` (ties: earliest start). `None` when none is active.
    pub fn floor_at(&self, now: DateTime<Utc>, lead: Duration) -> Option<Window> {
        highest_floor(self.active_windows(now, lead))
    }

    /// Windows with `start - lead <= now < end` (lead = pre-warm time, so
    /// workers are ready when the window opens).
    pub fn active_windows(&self, now: DateTime<Utc>, lead: Duration) -> Vec<Window> {
        // A lead past the horizon means nothing; capping keeps the arithmetic in range.
        let lead =
            TimeDelta::from_std(lead.min(LONGEST_WINDOW)).unwrap_or_else(|_| TimeDelta::zero());
        self.entries
            .iter()
            .flat_map(|entry| {
                // A window that opened at or before this instant has already closed.
                let closed_if_opened_by = now - entry.duration;
                entry
                    .openings_between(closed_if_opened_by, now + lead)
                    .filter(move |start| *start > closed_if_opened_by)
                    .map(move |start| entry.window(start))
            })
            .collect()
    }

    /// The first window starting after `now` (within the next 366 days).
    pub fn next_window(&self, now: DateTime<Utc>) -> Option<Window> {
        let horizon = now + TimeDelta::days(HORIZON_DAYS);
        self.entries
            .iter()
            .filter_map(|entry| {
                let start = entry
                    .openings_between(now, horizon)
                    .find(|start| *start > now)?;
                Some(entry.window(start))
            })
            .min_by(|a, b| a.start.cmp(&b.start).then_with(|| a.name.cmp(&b.name)))
    }
}

/// The window with the highest `min_workers` (ties: earliest start, then name).
pub fn highest_floor(windows: impl IntoIterator<Item = Window>) -> Option<Window> {
    windows.into_iter().max_by(|a, b| {
        a.min_workers
            .cmp(&b.min_workers)
            .then_with(|| b.start.cmp(&a.start))
            .then_with(|| b.name.cmp(&a.name))
    })
}

impl Entry {
    fn compile(index: usize, entry: &TimetableEntry) -> Result<Entry, TimetableError> {
        let invalid = |key, problem| TimetableError::Invalid {
            index,
            key,
            problem,
        };
        if entry.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        let schedule = CronSchedule::parse(&entry.cron)
            .map_err(|problem| TimetableError::Cron { index, problem })?;
        let zone = entry
            .timezone
            .parse::<Tz>()
            .map_err(|_| TimetableError::TimeZone {
                index,
                zone: entry.timezone.clone(),
            })?;
        if entry.duration.is_zero() {
            return Err(invalid("duration", "must be more than zero"));
        }
        let duration = TimeDelta::from_std(entry.duration)
            .ok()
            .filter(|_| entry.duration <= LONGEST_WINDOW)
            .ok_or_else(|| invalid("duration", "must be at most 366 days"))?;
        Ok(Entry {
            name: entry.name.clone(),
            schedule,
            zone,
            duration,
            min_workers: entry.min_workers,
            learn: entry.learn,
        })
    }

    fn window(&self, start: DateTime<Utc>) -> Window {
        Window {
            name: self.name.clone(),
            start,
            end: start + self.duration,
            min_workers: self.min_workers,
            learn: self.learn,
        }
    }

    /// Opening instants in `[from, to]`, earliest first. Local time order is
    /// real time order (gap times collapse onto one instant, repeated times
    /// take their first), so callers may stop at the first instant they want.
    fn openings_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> impl Iterator<Item = DateTime<Utc>> {
        let margin = TimeDelta::days(GAP_MARGIN_DAYS);
        let first = from.with_timezone(&self.zone).date_naive() - margin;
        let last = to.with_timezone(&self.zone).date_naive();
        first
            .iter_days()
            .take_while(move |date| *date <= last)
            .filter(move |date| self.schedule.matches_date(*date))
            .flat_map(move |date: NaiveDate| {
                self.schedule
                    .times_of_day()
                    .map(move |time| date.and_time(time))
            })
            .filter_map(move |local| open_at(self.zone, local))
            .filter(move |start| (from..=to).contains(start))
    }
}

/// The real instant at which a local wall-clock time opens. A time skipped by
/// a DST gap opens at the first minute after the gap rather than never; a time
/// that occurs twice opens once, at the first occurrence.
fn open_at(zone: Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    (0..=LONGEST_GAP_MINUTES).find_map(|shift| {
        match zone.from_local_datetime(&(local + TimeDelta::minutes(shift))) {
            LocalResult::Single(at) | LocalResult::Ambiguous(at, _) => Some(at.with_timezone(&Utc)),
            LocalResult::None => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::Asia::Shanghai;

    const LEAD: Duration = Duration::from_secs(120);

    fn entry(name: &str, cron: &str, zone: &str, duration: &str, workers: u32) -> TimetableEntry {
        TimetableEntry {
            name: name.into(),
            cron: cron.into(),
            timezone: zone.into(),
            duration: ebb_runtime::duration::parse(duration).unwrap(),
            min_workers: workers,
            learn: false,
        }
    }

    fn timetable(entries: &[TimetableEntry]) -> Timetable {
        Timetable::new(entries).unwrap()
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    fn shanghai(d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Shanghai
            .with_ymd_and_hms(2026, 3, d, h, mi, 0)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn starts(windows: &[Window]) -> Vec<DateTime<Utc>> {
        windows.iter().map(|window| window.start).collect()
    }

    fn floor_of(table: &Timetable, now: DateTime<Utc>, lead: Duration) -> Option<(String, u32)> {
        table
            .floor_at(now, lead)
            .map(|window| (window.name, window.min_workers))
    }

    #[test]
    fn a_shanghai_weekday_window_opens_at_midnight_utc_and_prewarms_by_the_lead() {
        let table = timetable(&[entry("classes", "0 8 * * 1-5", "Asia/Shanghai", "90m", 3)]);
        let expected = Window {
            name: "classes".into(),
            start: utc(2026, 3, 9, 0, 0), // Monday 08:00 in Shanghai
            end: utc(2026, 3, 9, 1, 30),
            min_workers: 3,
            learn: false,
        };
        assert_eq!(
            table.floor_at(shanghai(9, 7, 59), LEAD),
            Some(expected.clone())
        );
        assert_eq!(
            table.floor_at(shanghai(9, 7, 58), LEAD),
            Some(expected.clone())
        );
        assert_eq!(table.floor_at(shanghai(9, 7, 57), LEAD), None);
        assert_eq!(table.floor_at(shanghai(9, 9, 0), LEAD), Some(expected));
        assert_eq!(
            table.floor_at(shanghai(9, 9, 30), LEAD),
            None,
            "the end is exclusive"
        );
        assert_eq!(table.floor_at(shanghai(14, 8, 30), LEAD), None, "Saturday");
        assert_eq!(
            table.next_window(shanghai(9, 8, 0)).unwrap().start,
            utc(2026, 3, 10, 0, 0)
        );
        assert_eq!(
            table.next_window(shanghai(13, 9, 0)).unwrap().start,
            utc(2026, 3, 16, 0, 0)
        );
    }

    #[test]
    fn an_overlapping_exam_week_raises_the_floor_while_it_lasts() {
        let table = timetable(&[
            entry("morning-classes", "50 7 * * 1-5", "Asia/Shanghai", "90m", 2),
            entry("exam-week", "0 8 9-13 3 *", "Asia/Shanghai", "4h", 5),
        ]);
        let lead = Duration::from_secs(60);
        let morning = Some(("morning-classes".to_string(), 2));
        let exams = Some(("exam-week".to_string(), 5));
        assert_eq!(floor_of(&table, shanghai(9, 7, 50), lead), morning);
        assert_eq!(
            floor_of(&table, shanghai(9, 7, 59), lead),
            exams,
            "exams pre-warm"
        );
        assert_eq!(floor_of(&table, shanghai(9, 9, 0), lead), exams);
        assert_eq!(
            floor_of(&table, shanghai(9, 11, 0), lead),
            exams,
            "classes closed at 9:20"
        );
        assert_eq!(floor_of(&table, shanghai(9, 12, 0), lead), None);
        assert_eq!(
            floor_of(&table, shanghai(16, 8, 30), lead),
            morning,
            "exam week is over"
        );
        // Equal floors: the window that opened first sets it.
        let tie = timetable(&[
            entry("second", "30 8 * * *", "Asia/Shanghai", "2h", 2),
            entry("first", "0 8 * * *", "Asia/Shanghai", "2h", 2),
        ]);
        assert_eq!(
            floor_of(&tie, shanghai(9, 9, 0), lead),
            Some(("first".to_string(), 2))
        );
    }

    #[test]
    fn a_time_in_the_spring_forward_gap_opens_when_the_gap_ends() {
        let (from, to) = (utc(2026, 3, 7, 0, 0), utc(2026, 3, 10, 0, 0));
        let night = timetable(&[entry("night", "30 2 * * *", "America/New_York", "1h", 1)]);
        let expected = [
            utc(2026, 3, 7, 7, 30),
            utc(2026, 3, 8, 7, 0),
            utc(2026, 3, 9, 6, 30),
        ];
        assert_eq!(starts(&night.windows_starting_between(from, to)), expected);
        assert!(
            night
                .floor_at(utc(2026, 3, 8, 7, 30), Duration::ZERO)
                .is_some()
        );
        let morning = timetable(&[entry("morning", "0 8 * * *", "America/New_York", "1h", 1)]);
        let expected = [
            utc(2026, 3, 7, 13, 0),
            utc(2026, 3, 8, 12, 0),
            utc(2026, 3, 9, 12, 0),
        ];
        assert_eq!(
            starts(&morning.windows_starting_between(from, to)),
            expected
        );
        // 02:00-02:45 all open at 03:00 EDT: one window, not four.
        let quarters = timetable(&[entry("q", "*/15 2 * * *", "America/New_York", "1h", 1)]);
        let gap_day =
            quarters.windows_starting_between(utc(2026, 3, 8, 0, 0), utc(2026, 3, 9, 0, 0));
        assert_eq!(starts(&gap_day), [utc(2026, 3, 8, 7, 0)]);
    }

    #[test]
    fn a_time_repeated_by_fall_back_opens_once_at_its_first_occurrence() {
        let table = timetable(&[entry("late", "30 1 * * *", "America/New_York", "1h", 1)]);
        let day = table.windows_starting_between(utc(2026, 11, 1, 0, 0), utc(2026, 11, 2, 0, 0));
        assert_eq!(starts(&day), [utc(2026, 11, 1, 5, 30)]); // 01:30 EDT
        let next = table.next_window(utc(2026, 11, 1, 5, 30)).unwrap();
        assert_eq!(next.start, utc(2026, 11, 2, 6, 30)); // 01:30 EST, the next day
    }

    #[test]
    fn a_week_of_weekday_windows_comes_back_in_order_of_start_then_name() {
        let table = timetable(&[
            entry("morning", "0 8 * * 1-5", "Asia/Shanghai", "90m", 2),
            entry("assembly", "0 8 * * MON", "Asia/Shanghai", "30m", 1),
        ]);
        let week = table.windows_starting_between(shanghai(9, 0, 0), shanghai(16, 0, 0));
        assert_eq!(
            starts(&week),
            [9, 9, 10, 11, 12, 13].map(|day| utc(2026, 3, day, 0, 0))
        );
        let names: Vec<&str> = week.iter().map(|window| window.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "assembly", "morning", "morning", "morning", "morning", "morning"
            ]
        );
        assert!(
            table
                .windows_starting_between(shanghai(16, 0, 0), shanghai(9, 0, 0))
                .is_empty()
        );
    }

    #[test]
    fn errors_name_the_key_path() {
        let good = entry("ok", "0 8 * * *", "UTC", "1h", 1);
        fn message(entries: &[TimetableEntry]) -> String {
            Timetable::new(entries).unwrap_err().to_string()
        }
        let bad_cron = entry("bad", "0 24 * * *", "UTC", "1h", 1);
        assert_eq!(
            message(&[good.clone(), bad_cron]),
            "timetable[1].cron: hour: 24 is out of range 0-23"
        );
        let on_mars = entry("mars", "0 8 * * *", "Mars/Base", "1h", 1);
        assert_eq!(
            message(&[on_mars]),
            "timetable[0].timezone: unknown IANA time zone `Mars/Base`"
        );
        let zero = TimetableEntry {
            duration: Duration::ZERO,
            ..good.clone()
        };
        assert_eq!(
            message(&[good.clone(), good.clone(), zero]),
            "timetable[2].duration: must be more than zero"
        );
        assert!(Timetable::new(&[]).unwrap().is_empty());
    }
}
