//! Human durations for flags and env vars: `500ms`, `30s`, `5m`, `2h`, `7d`,
//! `1h 30m` (anything [`humantime`] reads), or a bare number of seconds (`2.5`).

use std::time::Duration;

use serde::Deserialize as _;

/// Parses `500ms`, `30s`, `5m`, `2h`, `7d`, `1h 30m` or a bare (fractional)
/// number of seconds.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    // humantime reads a capital `M` as months: `5M` is far likelier a typo
    // for five minutes than a wish for five months of cache.
    if text
        .split(|c: char| !c.is_alphabetic())
        .any(|unit| unit == "M")
    {
        return Err(format!(
            "ambiguous duration unit `M` in `{text}` (write m for minutes, months for months)"
        ));
    }
    let err = match humantime::parse_duration(text) {
        Ok(duration) => return Ok(duration),
        Err(err) => err,
    };
    single_span(text).unwrap_or_else(|| {
        Err(match err {
            humantime::DurationError::UnknownUnit { unit, .. } if !unit.is_empty() => {
                format!("unknown duration unit `{unit}` in `{text}`")
            }
            other => {
                format!("`{text}` is not a duration ({other}; try 500ms, 30s, 5m, 2h, 7d, 1h 30m)")
            }
        })
    })
}

/// One number and an optional unit, scaled in floating point. humantime
/// wants a unit on every number, digits on both sides of a decimal point and
/// fractions exact at the unit's resolution, but flags have always taken
/// `2.5`, `.5s` and `0.0001h`. `None` when the text is not of this shape.
fn single_span(text: &str) -> Option<Result<Duration, String>> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let unit = unit.trim_start();
    let per_unit = if unit.is_empty() {
        Duration::from_secs(1)
    } else if unit.chars().all(char::is_alphabetic) {
        humantime::parse_duration(&format!("1{unit}")).ok()?
    } else {
        return None;
    };
    let seconds = value * per_unit.as_secs_f64();
    Some(Duration::try_from_secs_f64(seconds).map_err(|err| format!("`{text}`: {err}")))
}

/// Serde support: a duration field written as `"90m"`, `"30s"` or a number
/// of seconds (`#[serde(deserialize_with = "ebb_runtime::duration::deserialize")]`).
pub fn deserialize<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Written {
        Seconds(f64),
        Text(String),
    }
    match Written::deserialize(deserializer)? {
        Written::Seconds(seconds) => {
            Duration::try_from_secs_f64(seconds).map_err(serde::de::Error::custom)
        }
        Written::Text(text) => parse(&text).map_err(serde::de::Error::custom),
    }
}

/// Serde support for writing a duration as seconds.
pub fn serialize_seconds<S: serde::Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_bare_seconds() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("7d"), Ok(Duration::from_secs(7 * 86_400)));
    }

    #[test]
    fn keeps_every_form_the_hand_parser_took() {
        assert_eq!(parse("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert_eq!(parse(".5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("0.5ms"), Ok(Duration::from_micros(500)));
        assert_eq!(parse(" 30 s "), Ok(Duration::from_secs(30)));
        assert_eq!(parse("14d"), Ok(Duration::from_secs(14 * 86_400)));
        // Decimals humantime alone refuses.
        assert_eq!(parse(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("5.s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("0.0001h"), Ok(Duration::from_millis(360)));
    }

    #[test]
    fn accepts_what_humantime_adds() {
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("3 weeks"), Ok(Duration::from_secs(21 * 86_400)));
        assert_eq!(parse("2min 5sec"), Ok(Duration::from_secs(125)));
        assert_eq!(parse("250us"), Ok(Duration::from_micros(250)));
    }

    #[test]
    fn rejects_garbage_with_a_hint() {
        assert!(parse("soon").unwrap_err().contains("not a duration"));
        assert!(parse("").unwrap_err().contains("not a duration"));
        assert!(parse("1.2.3").unwrap_err().contains("`1.2.3`"));
        assert!(
            parse("3 fortnights")
                .unwrap_err()
                .contains("unknown duration unit `fortnights`")
        );
        assert!(parse("-1s").is_err());
        assert!(parse("5S").unwrap_err().contains("`5S`"));
        assert!(parse("1e3").unwrap_err().contains("unknown duration unit"));
        assert!(parse("1e400").is_err());
        assert!(parse("99999999999999999999999").is_err());
    }

    #[test]
    fn rejects_capital_m_rather_than_read_it_as_months() {
        let message = parse("5M").unwrap_err();
        assert!(message.contains("ambiguous"), "{message}");
        assert!(message.contains("`5M`"), "{message}");
        assert_eq!(parse("5 months"), parse("5months"));
    }
}
