//! Human durations for flags and env vars: `500ms`, `30s`, `5m`, `2h`, `7d`,
//! or a bare number of seconds (`2.5`).

use std::time::Duration;

use serde::Deserialize as _;

/// Parses `500ms`, `30s`, `5m`, `2h`, `7d` or a bare (fractional) number of seconds.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (try 500ms, 30s, 5m, 2h, 7d)"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        other => return Err(format!("unknown duration unit `{other}` in `{text}`")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|err| format!("`{text}`: {err}"))
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
    fn rejects_garbage_with_a_hint() {
        assert!(parse("soon").unwrap_err().contains("not a duration"));
        assert!(
            parse("3 weeks")
                .unwrap_err()
                .contains("unknown duration unit")
        );
        assert!(parse("-1s").is_err());
    }
}
