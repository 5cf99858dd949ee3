//! Duration flags, one syntax for every view: `500ms`, `5s`, `1m`, `200us`,
//! or a bare number of seconds (`5`, `1.5`).
use std::time::Duration;

/// The longest `--interval` or `--duration` a view takes.
const LONGEST_WINDOW: Duration = Duration::from_secs(3600);

/// Parses "250ms", "1.5s", "200us"/"200µs", "2m" (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 5s or 1m"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "m" => value * 60.0,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {s:?}: use us, ms, s or m"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{s:?} is out of range"))
}

/// Parses a window to measure over (`--interval`, `--duration`): a duration
/// above zero and at most an hour, in seconds.
pub fn window_seconds(s: &str) -> Result<f64, String> {
    let window = parse_duration(s)?;
    if window.is_zero() || window > LONGEST_WINDOW {
        return Err(format!("{s} must be above 0 and at most 1h"));
    }
    Ok(window.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("200us"), Ok(Duration::from_micros(200)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn windows_take_every_unit_and_stay_within_an_hour() {
        assert_eq!(window_seconds("500ms"), Ok(0.5));
        assert_eq!(window_seconds("5s"), Ok(5.0));
        assert_eq!(window_seconds("5"), Ok(5.0));
        assert_eq!(window_seconds("1m"), Ok(60.0));
        assert_eq!(window_seconds("60m"), Ok(3600.0));
        assert!(window_seconds("0").is_err());
        assert!(window_seconds("0ms").is_err());
        assert!(window_seconds("61m").is_err());
        assert!(window_seconds("soon").is_err());
    }
}
