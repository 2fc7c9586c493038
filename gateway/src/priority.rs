//! Which priority a question gets: the first matching rule of the gateway
//! config, e.g. "grade 12 during exam week is high".
//!
//! Time windows are timetable entries in the scaler's syntax (cron, IANA
//! time zone, duration), so one `timetable:` block can serve both: the
//! scaler pre-warms for the window, the gateway prioritises inside it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use ebb_nats::Priority;
use ebb_schedule::timetable::{Timetable, TimetableEntry};

/// The `priority:` block of the gateway config.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorityConfig {
    /// Priority of a question no rule matches.
    #[serde(default)]
    pub default: Priority,
    #[serde(default)]
    pub rules: Vec<PriorityRule>,
}

/// Every condition given must hold; an empty list matches anything.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorityRule {
    /// The student's grade is one of these.
    #[serde(default)]
    pub grades: Vec<u8>,
    /// The course is one of these (case-insensitive).
    #[serde(default)]
    pub courses: Vec<String>,
    /// One of these timetable windows is open now.
    #[serde(default)]
    pub windows: Vec<String>,
    pub priority: Priority,
}

/// Validated rules with their timetable.
#[derive(Debug, Clone, Default)]
pub struct PriorityRules {
    config: PriorityConfig,
    timetable: Timetable,
}

impl PriorityRules {
    /// Checks that every window a rule names is in the timetable.
    pub fn new(config: PriorityConfig, entries: &[TimetableEntry]) -> Result<Self, String> {
        let timetable = Timetable::new(entries).map_err(|err| err.to_string())?;
        for (index, rule) in config.rules.iter().enumerate() {
            if let Some(unknown) = rule
                .windows
                .iter()
                .find(|window| !entries.iter().any(|entry| &entry.name == *window))
            {
                return Err(format!(
                    "priority.rules[{index}].windows: no timetable entry is named `{unknown}`"
                ));
            }
        }
        Ok(PriorityRules { config, timetable })
    }

    pub fn classify(
        &self,
        grade: Option<u8>,
        course: Option<&str>,
        now: DateTime<Utc>,
    ) -> Priority {
        let needs_windows = self
            .config
            .rules
            .iter()
            .any(|rule| !rule.windows.is_empty());
        let open: Vec<String> = if needs_windows {
            self.timetable
                .active_windows(now, Duration::ZERO)
                .into_iter()
                .map(|window| window.name)
                .collect()
        } else {
            Vec::new()
        };
        self.config
            .rules
            .iter()
            .find(|rule| {
                (rule.grades.is_empty() || grade.is_some_and(|g| rule.grades.contains(&g)))
                    && (rule.courses.is_empty()
                        || course.is_some_and(|c| {
                            rule.courses.iter().any(|rc| rc.eq_ignore_ascii_case(c))
                        }))
                    && (rule.windows.is_empty() || rule.windows.iter().any(|w| open.contains(w)))
            })
            .map_or(self.config.default, |rule| rule.priority)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
timetable:
  - name: exam-week
    cron: "0 8 * * 1-5"
    timezone: America/New_York
    duration: 9h
priority:
  default: normal
  rules:
    - grades: [12]
      windows: [exam-week]
      priority: high
    - courses: [Free reading]
      priority: low
"#;

    #[derive(serde::Deserialize)]
    struct File {
        timetable: Vec<TimetableEntry>,
        priority: PriorityConfig,
    }

    fn rules() -> PriorityRules {
        let file: File = serde_norway::from_str(CONFIG).unwrap();
        PriorityRules::new(file.priority, &file.timetable).unwrap()
    }

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn grade_12_is_high_only_inside_the_window() {
        let rules = rules();
        // Wednesday 2026-12-02 10:00 in New York = 15:00 UTC.
        let inside = at("2026-12-02T15:00:00Z");
        let outside = at("2026-12-02T23:30:00Z");
        assert_eq!(rules.classify(Some(12), None, inside), Priority::High);
        assert_eq!(rules.classify(Some(12), None, outside), Priority::Normal);
        assert_eq!(rules.classify(Some(11), None, inside), Priority::Normal);
        assert_eq!(rules.classify(None, None, inside), Priority::Normal);
    }

    #[test]
    fn courses_match_case_insensitively_and_first_rule_wins() {
        let rules = rules();
        let inside = at("2026-12-02T15:00:00Z");
        assert_eq!(
            rules.classify(Some(3), Some("free READING"), inside),
            Priority::Low
        );
        assert_eq!(
            rules.classify(Some(12), Some("free reading"), inside),
            Priority::High
        );
    }

    #[test]
    fn an_unknown_window_is_named() {
        let mut file: File = serde_norway::from_str(CONFIG).unwrap();
        file.priority.rules[0].windows = vec!["exam-wek".into()];
        let err = PriorityRules::new(file.priority, &file.timetable).unwrap_err();
        assert!(
            err.contains("priority.rules[0].windows") && err.contains("exam-wek"),
            "{err}"
        );
    }
}
