//! Times as the Docker API writes and reads them: RFC 3339 with
//! nanoseconds in UTC (`2024-05-01T12:00:00.123456789Z`, Go's
//! `RFC3339Nano` with fixed digits, as `docker logs -t` prints), Unix
//! timestamps with an optional fraction (`since=1714564800.5`, what the
//! CLI sends), and `docker ps`'s "Up 5 minutes".

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Go's zero `time.Time`: Docker's "never" (FinishedAt of a running one).
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

const SECONDS_PER_DAY: u64 = 86_400;

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ` in UTC. Times before 1970 are clamped
/// to the epoch (cradle never makes one).
pub fn rfc3339_nanos(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let seconds = since_epoch.as_secs();
    let (year, month, day) = civil_from_days(seconds / SECONDS_PER_DAY);
    let of_day = seconds % SECONDS_PER_DAY;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
        since_epoch.subsec_nanos()
    )
}

/// Seconds since the epoch, for `Created` in `docker ps`.
pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Parses `SECONDS` or `SECONDS.FRACTION` (up to 9 digits), as the CLI
/// sends `--since`/`--until`. Empty is `None`; so is anything else.
pub fn parse_unix_timestamp(text: &str) -> Option<SystemTime> {
    let (seconds, fraction) = text.split_once('.').unwrap_or((text, ""));
    if seconds.is_empty() || !seconds.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if fraction.len() > 9 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds: u64 = seconds.parse().ok()?;
    let nanos: u32 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<9}").parse().ok()?
    };
    UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
}

/// Docker's `units.HumanDuration`: "Less than a second", "5 minutes",
/// "About an hour", "3 days"...
pub fn human_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    let minutes = seconds / 60;
    let hours = minutes / 60;
    match () {
        _ if seconds < 1 => "Less than a second".to_owned(),
        _ if seconds == 1 => "1 second".to_owned(),
        _ if seconds < 60 => format!("{seconds} seconds"),
        _ if minutes == 1 => "About a minute".to_owned(),
        _ if minutes < 60 => format!("{minutes} minutes"),
        _ if hours == 1 => "About an hour".to_owned(),
        _ if hours < 48 => format!("{hours} hours"),
        _ if hours < 24 * 7 * 2 => format!("{} days", hours / 24),
        _ if hours < 24 * 30 * 2 => format!("{} weeks", hours / 24 / 7),
        _ if hours < 24 * 365 * 2 => format!("{} months", hours / 24 / 30),
        _ => format!("{} years", hours / 24 / 365),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_nanos_epoch_is_1970() {
        assert_eq!(rfc3339_nanos(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
    }

    #[test]
    fn rfc3339_nanos_leap_day_is_formatted() {
        // 2024-02-29T12:34:56.5Z
        let time = UNIX_EPOCH + Duration::new(1_709_210_096, 500_000_000);

        assert_eq!(rfc3339_nanos(time), "2024-02-29T12:34:56.500000000Z");
    }

    #[test]
    fn parse_unix_timestamp_with_fraction_has_nanos() {
        let time = parse_unix_timestamp("1700000000.25").unwrap();

        assert_eq!(
            time.duration_since(UNIX_EPOCH).unwrap(),
            Duration::new(1_700_000_000, 250_000_000)
        );
    }

    #[test]
    fn parse_unix_timestamp_rejects_garbage_and_empty() {
        assert_eq!(parse_unix_timestamp(""), None);
        assert_eq!(parse_unix_timestamp("-5"), None);
        assert_eq!(parse_unix_timestamp("1.1234567890"), None);
        assert_eq!(parse_unix_timestamp("abc"), None);
    }

    #[test]
    fn human_duration_matches_docker_units() {
        assert_eq!(
            human_duration(Duration::from_millis(300)),
            "Less than a second"
        );
        assert_eq!(human_duration(Duration::from_secs(45)), "45 seconds");
        assert_eq!(human_duration(Duration::from_secs(90)), "About a minute");
        assert_eq!(human_duration(Duration::from_secs(3 * 3600)), "3 hours");
    }
}
