//! Standard five-field cron (`minute hour day-of-month month day-of-week`),
//! the syntax KEDA's cron scaler and Kubernetes CronJobs use, so a school can
//! paste its timetable from either without translating it.
//!
//! Only matching lives here, not "next fire time": the timetable has to
//! resolve every match in an IANA time zone anyway (DST gaps and repeats), so
//! it walks local dates, skips whole days with [`CronSchedule::matches_date`]
//! and expands [`CronSchedule::times_of_day`].
//!
//! Hand-written because no cron crate does what this module's tests and
//! timetable.rs's tests require. `cron` 0.17 rejects standard 5-field
//! expressions. `croner` 4.0.3 (5 fields, seconds and years disallowed),
//! tried against those tests and the cases their comments name, gets these
//! wrong:
//! - `50/5` and `1/2` are rejected unless `sloppy_ranges` is on, and then a
//!   day-of-week `1/2` runs to 7 and so also fires on Sundays;
//! - `*/1` in a day field counts as a restriction, so `0 0 */1 * 5` fires
//!   daily instead of on Fridays;
//! - names are replaced across the whole pattern, so `MON * * * *` is minute
//!   1; `0 1,,2 * * *` and `0 0 30 2 *` (never fires) are accepted;
//! - errors do not name the field (`Component error: Number out of bounds.`);
//! - its own next-occurrence search drops interval times in a DST gap
//!   (`*/15 2 * * *` opens nothing on the spring-forward day) and gives up on
//!   gaps over 2 hours (Samoa's lost 2011-12-30: `TimeSearchLimitExceeded`).

use chrono::{Datelike, NaiveDate, NaiveDateTime, NaiveTime, Timelike};

/// Why a cron expression was rejected; field errors start with the field's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error("got {0} fields; expected 5: minute hour day-of-month month day-of-week")]
    FieldCount(usize),
    #[error("{field}: {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
}

/// A parsed cron expression: one bit per allowed value of each field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronSchedule {
    minutes: u64,
    hours: u64,
    days_of_month: u64,
    months: u64,
    /// Bits 0-6, Sunday = 0 (a written 7 is folded onto 0).
    days_of_week: u64,
    /// Both day fields restricted: cron then fires when EITHER matches.
    either_day: bool,
}

impl CronSchedule {
    /// Parses `minute hour day-of-month month day-of-week`, e.g. `50 7 * * 1-5`.
    pub fn parse(expression: &str) -> Result<CronSchedule, CronError> {
        let fields: Vec<&str> = expression.split_whitespace().collect();
        let [minute, hour, day_of_month, month, day_of_week] = fields[..] else {
            return Err(CronError::FieldCount(fields.len()));
        };
        let minutes = MINUTE.parse(minute)?;
        let hours = HOUR.parse(hour)?;
        let days_of_month = DAY_OF_MONTH.parse(day_of_month)?;
        let months = MONTH.parse(month)?;
        let days_of_week = DAY_OF_WEEK.parse(day_of_week)?;
        let schedule = CronSchedule {
            minutes: minutes.bits,
            hours: hours.bits,
            days_of_month: days_of_month.bits,
            months: months.bits,
            days_of_week: (days_of_week.bits | (days_of_week.bits >> 7)) & 0x7f,
            either_day: !days_of_month.star && !days_of_week.star,
        };
        // `0 8 30 2 *` is valid cron that never fires; a timetable entry that
        // silently never opens would leave students waiting, so say so now.
        if !schedule.either_day && !schedule.some_listed_day_exists() {
            return Err(DAY_OF_MONTH.error("none of these days exists in the listed months"));
        }
        Ok(schedule)
    }

    /// Whether the schedule fires at this local wall-clock minute (seconds ignored).
    pub fn matches(&self, local: NaiveDateTime) -> bool {
        has(self.minutes, local.minute())
            && has(self.hours, local.hour())
            && self.matches_date(local.date())
    }

    /// Whether any minute of this local date can match (lets callers skip whole days fast).
    pub fn matches_date(&self, date: NaiveDate) -> bool {
        let by_month_day = has(self.days_of_month, date.day());
        let by_weekday = has(self.days_of_week, date.weekday().num_days_from_sunday());
        let by_day = if self.either_day {
            by_month_day || by_weekday
        } else {
            by_month_day && by_weekday
        };
        by_day && has(self.months, date.month())
    }

    /// The local times of day the schedule fires on a date that
    /// [`matches_date`](Self::matches_date), earliest first.
    pub fn times_of_day(&self) -> impl Iterator<Item = NaiveTime> {
        let (hours, minutes) = (self.hours, self.minutes);
        (0..24)
            .filter(move |&hour| has(hours, hour))
            .flat_map(move |hour| {
                (0..60)
                    .filter(move |&minute| has(minutes, minute))
                    .filter_map(move |minute| NaiveTime::from_hms_opt(hour, minute, 0))
            })
    }

    fn some_listed_day_exists(&self) -> bool {
        // February counts 29 days: a leap-day schedule is rare, not broken.
        const LONGEST_MONTH: [u32; 13] = [0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
        (1..=12u32).any(|month| {
            has(self.months, month)
                && (1..=LONGEST_MONTH[month as usize]).any(|day| has(self.days_of_month, day))
        })
    }
}

fn has(bits: u64, value: u32) -> bool {
    (bits >> value) & 1 == 1
}

/// One cron field's name, bounds and the names it accepts in place of numbers.
struct FieldSpec {
    name: &'static str,
    min: u32,
    max: u32,
    /// `names[i]` stands for `min + i`.
    names: &'static [&'static str],
    expected: &'static str,
}

const MINUTE: FieldSpec = FieldSpec::numeric("minute", 0, 59);
const HOUR: FieldSpec = FieldSpec::numeric("hour", 0, 23);
const DAY_OF_MONTH: FieldSpec = FieldSpec::numeric("day-of-month", 1, 31);
const MONTH: FieldSpec = FieldSpec {
    name: "month",
    min: 1,
    max: 12,
    names: &[
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ],
    expected: "a number or a month name (JAN-DEC)",
};
const DAY_OF_WEEK: FieldSpec = FieldSpec {
    name: "day-of-week",
    min: 0,
    max: 7,
    names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
    expected: "a number or a day name (SUN-SAT)",
};

/// A parsed field: its bits, and whether it was written as `*` (which
/// decides how the two day fields combine).
struct ParsedField {
    bits: u64,
    star: bool,
}

impl FieldSpec {
    const fn numeric(name: &'static str, min: u32, max: u32) -> FieldSpec {
        FieldSpec {
            name,
            min,
            max,
            names: &[],
            expected: "a number",
        }
    }

    fn error(&self, problem: impl Into<String>) -> CronError {
        CronError::Field {
            field: self.name,
            problem: problem.into(),
        }
    }

    /// A comma list of `*`, `n`, `a-b`, each optionally followed by `/step`.
    fn parse(&self, text: &str) -> Result<ParsedField, CronError> {
        let mut parsed = ParsedField {
            bits: 0,
            star: false,
        };
        for item in text.split(',') {
            if item.is_empty() {
                return Err(self.error(format!("empty item in `{text}`")));
            }
            let (range, step) = match item.split_once('/') {
                None => (item, 1),
                // `u32::from_str` also takes `+2`; cron steps are digits only.
                Some((range, step)) => match step.parse::<u32>() {
                    Ok(value) if value >= 1 && !step.starts_with('+') => (range, value),
                    _ => {
                        let problem = format!("`{item}`: the step must be a whole number from 1");
                        return Err(self.error(problem));
                    }
                },
            };
            // Open-ended steps over day-of-week stop at Saturday (6): 7 is only
            // an alias of Sunday, so `1/2` is Mon, Wed, Fri as in robfig/cron.
            let step_end = if self.name == DAY_OF_WEEK.name {
                6
            } else {
                self.max
            };
            let (low, high) = if range == "*" {
                // As in robfig/cron v3 (behind KEDA and Kubernetes), `*/2` is
                // a restriction for the day rule; only `*` and `*/1` are not.
                parsed.star |= step == 1;
                (self.min, if step > 1 { step_end } else { self.max })
            } else if let Some((low, high)) = range.split_once('-') {
                let (low, high) = (self.value(low, item)?, self.range_end(high, item)?);
                if low > high {
                    return Err(self.error(format!("`{range}` runs backwards")));
                }
                (low, high)
            } else {
                let value = self.value(range, item)?;
                // `a/n` means from a to the field's maximum, every n.
                (value, if item.contains('/') { step_end } else { value })
            };
            for value in (low..=high).step_by(step as usize) {
                parsed.bits |= 1u64 << value;
            }
        }
        Ok(parsed)
    }

    fn value(&self, text: &str, item: &str) -> Result<u32, CronError> {
        if text.is_empty() {
            return Err(self.error(format!("a value is missing in `{item}`")));
        }
        let value = if text.bytes().all(|byte| byte.is_ascii_digit()) {
            // Too many digits for u32 is simply out of range.
            text.parse().unwrap_or(u32::MAX)
        } else if let Some(index) = self.name_index(text) {
            self.min + index as u32
        } else {
            return Err(self.error(format!("`{text}` is not {}", self.expected)));
        };
        if !(self.min..=self.max).contains(&value) {
            return Err(self.error(format!("{text} is out of range {}-{}", self.min, self.max)));
        }
        Ok(value)
    }

    fn name_index(&self, text: &str) -> Option<usize> {
        self.names
            .iter()
            .position(|name| name.eq_ignore_ascii_case(text))
    }

    fn range_end(&self, text: &str, item: &str) -> Result<u32, CronError> {
        // SUN is 0, but `FRI-SUN` plainly means through Sunday: use its other number, 7.
        if self.name == DAY_OF_WEEK.name && text.eq_ignore_ascii_case("SUN") {
            return Ok(7);
        }
        self.value(text, item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i32, m: u32, d: u32, hour: u32, minute: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(y, m, d)
            .and_then(|date| date.and_hms_opt(hour, minute, 0))
            .unwrap()
    }

    fn cron(expression: &str) -> CronSchedule {
        CronSchedule::parse(expression).unwrap()
    }

    fn rejection(expression: &str) -> String {
        CronSchedule::parse(expression).unwrap_err().to_string()
    }

    #[test]
    fn weekday_mornings_match_only_their_minute_on_weekdays() {
        let schedule = cron("50 7 * * 1-5");
        assert!(schedule.matches(at(2026, 3, 9, 7, 50))); // a Monday
        assert!(schedule.matches(at(2026, 3, 9, 7, 50).with_second(59).unwrap()));
        assert!(!schedule.matches(at(2026, 3, 9, 7, 51)));
        assert!(!schedule.matches(at(2026, 3, 14, 7, 50))); // a Saturday
        assert!(schedule.matches_date(at(2026, 3, 13, 0, 0).date()));
        assert!(!schedule.matches_date(at(2026, 3, 15, 0, 0).date()));
        assert_eq!(
            schedule.times_of_day().collect::<Vec<_>>(),
            [at(2026, 1, 1, 7, 50).time()]
        );
    }

    #[test]
    fn names_are_case_insensitive_aliases_for_numbers() {
        assert_eq!(cron("0 8 * * MON-FRI"), cron("0 8 * * 1-5"));
        assert_eq!(cron("0 8 * * mon,Wed"), cron("0 8 * * 1,3"));
        assert_eq!(cron("0 0 1 jan-MAR,dec *"), cron("0 0 1 1-3,12 *"));
    }

    #[test]
    fn steps_ranges_and_lists_expand_to_the_right_minutes() {
        let schedule = cron("*/15 9-17 * 1,2,3 *");
        let minutes: Vec<u32> = schedule
            .times_of_day()
            .take(5)
            .map(|t| t.minute())
            .collect();
        assert_eq!(minutes, [0, 15, 30, 45, 0]);
        assert!(schedule.matches(at(2026, 1, 5, 17, 45)));
        assert!(!schedule.matches(at(2026, 1, 5, 18, 0)));
        assert!(!schedule.matches(at(2026, 4, 6, 9, 0)));
        assert_eq!(cron("10-30/10 * * * *"), cron("10,20,30 * * * *"));
        assert_eq!(cron("50/5 * * * *"), cron("50,55 * * * *"));
        assert_eq!(cron("*/1 * * * *"), cron("* * * * *"));
    }

    #[test]
    fn day_of_week_steps_stop_at_saturday() {
        let schedule = CronSchedule::parse("0 8 * * 1/2").unwrap();
        let sunday = chrono::NaiveDate::from_ymd_opt(2026, 11, 29).unwrap();
        let monday = chrono::NaiveDate::from_ymd_opt(2026, 11, 30).unwrap();
        assert!(
            !schedule.matches_date(sunday),
            "7 is only an alias of Sunday"
        );
        assert!(schedule.matches_date(monday));
    }

    #[test]
    fn seven_is_sunday_too() {
        assert_eq!(cron("0 0 * * 7"), cron("0 0 * * 0"));
        assert_eq!(cron("0 0 * * SUN"), cron("0 0 * * 0"));
        assert_eq!(cron("0 0 * * FRI-SUN"), cron("0 0 * * 5-7"));
        assert!(cron("0 0 * * 7").matches(at(2026, 3, 8, 0, 0))); // a Sunday
    }

    #[test]
    fn restricted_day_fields_combine_with_or_otherwise_and() {
        let thirteenth_or_friday = cron("0 0 13 * 5");
        assert!(thirteenth_or_friday.matches_date(at(2026, 3, 6, 0, 0).date())); // Friday the 6th
        assert!(thirteenth_or_friday.matches_date(at(2026, 4, 13, 0, 0).date())); // Monday the 13th
        assert!(!thirteenth_or_friday.matches_date(at(2026, 3, 7, 0, 0).date()));
        assert!(!cron("0 0 13 * *").matches_date(at(2026, 3, 6, 0, 0).date()));
        assert!(!cron("0 0 * * 5").matches_date(at(2026, 4, 13, 0, 0).date()));
        // `*/2` counts as a restriction, as in robfig/cron: odd days or
        // Fridays. `*/1` is a star: Fridays only.
        assert!(cron("0 0 */2 * 5").matches_date(at(2026, 3, 6, 0, 0).date()));
        assert!(!cron("0 0 */1 * 5").matches_date(at(2026, 3, 7, 0, 0).date()));
    }

    #[test]
    fn wrong_field_counts_say_what_is_expected() {
        for expression in ["0 8 * *", "0 8 * * 1 2026", ""] {
            let message = rejection(expression);
            assert!(message.contains("expected 5"), "{message}");
            assert!(
                message.contains("minute hour day-of-month month day-of-week"),
                "{message}"
            );
        }
        assert!(rejection("0 8 * *").contains("got 4"));
    }

    #[test]
    fn each_rejection_names_its_field() {
        assert_eq!(rejection("0 24 * * *"), "hour: 24 is out of range 0-23");
        for (expression, field) in [
            ("60 * * * *", "minute: "),
            ("MON * * * *", "minute: "),
            ("*/0 * * * *", "minute: "),
            ("*/+2 * * * *", "minute: "),
            ("0 17-9 * * *", "hour: "),
            ("0 1,,2 * * *", "hour: "),
            ("0 8- * * *", "hour: "),
            ("0 0 0 * *", "day-of-month: "),
            ("0 0 30 2 *", "day-of-month: "),
            ("0 0 1 13 *", "month: "),
            ("0 0 1 FOO *", "month: "),
            ("0 0 * * 8", "day-of-week: "),
            ("0 0 * * MONDAY", "day-of-week: "),
            ("0 0 * * 5-1", "day-of-week: "),
        ] {
            let message = rejection(expression);
            assert!(message.starts_with(field), "`{expression}`: {message}");
        }
        // With both day fields set, the weekdays still fire: not an error.
        assert!(CronSchedule::parse("0 0 30 2 1").is_ok());
        assert!(CronSchedule::parse("0 0 29 2 *").is_ok());
    }
}
