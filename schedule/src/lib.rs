//! School timetables: when the breaks are, in the school's own time zone.
//!
//! # Layout
//! - [`cron`]: 5-field cron expressions evaluated in IANA time zones,
//!   daylight-saving gaps and repeats included.
//! - [`timetable`]: named windows (cron + duration + zone) that put a floor
//!   under the worker count and label questions' priority.

pub mod cron;
pub mod timetable;
