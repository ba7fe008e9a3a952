//! Time helpers: UTC calendar arithmetic on Unix microseconds (no time-zone database, no
//! dependency), and the wall clock.

/// Microseconds in one second.
pub const MICROS_PER_SECOND: i64 = 1_000_000;
/// Microseconds in one minute.
pub const MICROS_PER_MINUTE: i64 = 60 * MICROS_PER_SECOND;

/// A UTC calendar date and time of day, to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UtcDateTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl UtcDateTime {
    /// The second that contains `micros` (rounded towards the past, also before 1970).
    pub fn from_micros(micros: i64) -> Self {
        let secs = micros.div_euclid(MICROS_PER_SECOND);
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        UtcDateTime {
            year,
            month,
            day,
            hour: (sod / 3600) as u32,
            minute: (sod % 3600 / 60) as u32,
            second: (sod % 60) as u32,
        }
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `YYYY-MM-DD HH:MM:SS` in UTC, whole seconds (the fraction is dropped, rounding towards the
/// past). This is the `event_ts` format of the enriched record and what ClickHouse's
/// `DateTime` parses.
pub fn format_datetime(micros: i64) -> String {
    let mut out = String::with_capacity(19);
    write_datetime(micros, &mut out);
    out
}

/// [`format_datetime`] appended to `out` (no allocation of its own: the per-event path of the
/// JSON record and of Redis arguments).
pub fn write_datetime(micros: i64, out: &mut String) {
    let t = UtcDateTime::from_micros(micros);
    write_year(t.year, out);
    out.push('-');
    write_2(t.month, out);
    out.push('-');
    write_2(t.day, out);
    out.push(' ');
    write_2(t.hour, out);
    out.push(':');
    write_2(t.minute, out);
    out.push(':');
    write_2(t.second, out);
}

/// `YYYYMMDDHHMM` of the UTC minute that contains `micros`.
pub fn minute_key(micros: i64) -> String {
    let mut out = String::with_capacity(12);
    write_minute_key(micros, &mut out);
    out
}

/// [`minute_key`] appended to `out`.
pub fn write_minute_key(micros: i64, out: &mut String) {
    let t = UtcDateTime::from_micros(micros);
    write_year(t.year, out);
    write_2(t.month, out);
    write_2(t.day, out);
    write_2(t.hour, out);
    write_2(t.minute, out);
}

/// A year as `{:04}` prints it (sign-aware zero padding to 4 characters).
fn write_year(year: i64, out: &mut String) {
    if (0..10_000).contains(&year) {
        let y = year as u32;
        write_2(y / 100, out);
        write_2(y % 100, out);
    } else {
        use std::fmt::Write as _;
        // Writing into a String cannot fail.
        let _ = write!(out, "{year:04}");
    }
}

/// A value below 100 as `{:02}` prints it.
fn write_2(v: u32, out: &mut String) {
    out.push(char::from(b'0' + (v / 10 % 10) as u8));
    out.push(char::from(b'0' + (v % 10) as u8));
}

/// The start of the UTC minute that contains `micros`, in Unix seconds.
pub fn minute_start_secs(micros: i64) -> i64 {
    micros.div_euclid(MICROS_PER_MINUTE) * 60
}

/// Wall-clock time in Unix microseconds (WASI `wall-clock` inside the host). A clock before
/// 1970 reads as 0.
pub fn now_micros() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_seconds() {
        // 2026-01-08T14:21:52Z
        let micros = 1_767_882_112 * MICROS_PER_SECOND;
        assert_eq!(format_datetime(micros), "2026-01-08 14:21:52");
        assert_eq!(format_datetime(micros + 999_999), "2026-01-08 14:21:52");
        assert_eq!(minute_key(micros), "202601081421");
        assert_eq!(minute_start_secs(micros), 1_767_882_060);
    }

    #[test]
    fn epoch_leap_years_and_negative_times() {
        assert_eq!(format_datetime(0), "1970-01-01 00:00:00");
        assert_eq!(format_datetime(-1), "1969-12-31 23:59:59");
        // 2024-02-29T23:59:59Z
        assert_eq!(
            format_datetime(1_709_251_199 * MICROS_PER_SECOND),
            "2024-02-29 23:59:59"
        );
        // 2000-03-01T00:00:00Z
        assert_eq!(
            format_datetime(951_868_800 * MICROS_PER_SECOND),
            "2000-03-01 00:00:00"
        );
        assert_eq!(minute_key(-1), "196912312359");
        assert_eq!(minute_start_secs(-1), -60);
    }

    /// The hand-written digits print what `format!` with `{:04}`/`{:02}` printed, also for
    /// years outside 0..=9999.
    #[test]
    fn digits_match_the_format_macro() {
        let days = 86_400 * MICROS_PER_SECOND;
        let mut micros: Vec<i64> = (-800_000..800_000)
            .step_by(997)
            .map(|d: i64| d * days + d.rem_euclid(86_400) * MICROS_PER_SECOND + d % 7)
            .collect();
        micros.extend([
            i64::MIN / 2,
            -62_167_219_200_000_001,
            253_402_300_800_000_000,
            0,
            -1,
        ]);
        for m in micros {
            let t = UtcDateTime::from_micros(m);
            let want = format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                t.year, t.month, t.day, t.hour, t.minute, t.second
            );
            assert_eq!(format_datetime(m), want, "{m}");
            let want = format!(
                "{:04}{:02}{:02}{:02}{:02}",
                t.year, t.month, t.day, t.hour, t.minute
            );
            assert_eq!(minute_key(m), want, "{m}");
        }
    }
}
