//! Asterisk's time conditions (`GotoIfTime`): `times,weekdays,mdays,months[,timezone]`,
//! each field `*` or ranges joined by `&` (`09:00-12:00&13:00-17:00`, `mon-fri`,
//! `1-15`, `dec-feb`). Ranges wrap (`fri-mon`, `22:00-06:00`) and include their end
//! (the minute `17:00` is inside `09:00-17:00`). Evaluated at a time the caller gives
//! (sans-IO), in the condition's time zone or the node's; the zone rules are the IANA
//! database bundled with jiff.

use jiff::tz::TimeZone;
use jiff::Timestamp;

const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];

/// Inclusive ranges of one field; `None`: `*`.
type Ranges = Option<Vec<(u16, u16)>>;

/// A parsed time condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeSpec {
    /// Minutes of the day.
    minutes: Ranges,
    /// 0 = Sunday.
    weekdays: Ranges,
    mdays: Ranges,
    /// 1 = January.
    months: Ranges,
    timezone: Option<String>,
}

/// Whether `name` is a time zone of the bundled database (`UTC`, `Europe/Berlin`).
pub fn valid_timezone(name: &str) -> bool {
    TimeZone::get(name).is_ok()
}

fn parse_field(
    field: &str,
    what: &str,
    one: &dyn Fn(&str) -> Option<u16>,
) -> Result<Ranges, String> {
    let field = field.trim();
    if field.is_empty() || field == "*" {
        return Ok(None);
    }
    field
        .split('&')
        .map(|r| {
            let r = r.trim();
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            match (one(a.trim()), one(b.trim())) {
                (Some(a), Some(b)) => Ok((a, b)),
                _ => Err(format!("{what}: {r:?} is not a {what} or a range of them")),
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn minute(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    // 24:00 is the end of the day, as Asterisk accepts it.
    (h < 24 && m < 60 || h == 24 && m == 0).then(|| (h * 60 + m).min(24 * 60 - 1))
}

fn named(names: &'static [&'static str], base: u16) -> impl Fn(&str) -> Option<u16> {
    move |s: &str| {
        let s = s.to_ascii_lowercase();
        names
            .iter()
            .position(|n| s.starts_with(n))
            .map(|i| i as u16 + base)
    }
}

fn in_ranges(ranges: &Ranges, v: u16) -> bool {
    match ranges {
        None => true,
        Some(rs) => rs.iter().any(|&(a, b)| {
            if a <= b {
                (a..=b).contains(&v)
            } else {
                v >= a || v <= b
            }
        }),
    }
}

impl TimeSpec {
    /// `times,weekdays,mdays,months[,timezone]` (missing trailing fields are `*`).
    pub fn parse(spec: &str) -> Result<TimeSpec, String> {
        let parts: Vec<&str> = spec.split(',').collect();
        if parts.len() > 5 {
            return Err("expected times,weekdays,mdays,months[,timezone]".into());
        }
        let part = |i: usize| parts.get(i).copied().unwrap_or("*");
        let mday = |s: &str| s.parse::<u16>().ok().filter(|d| (1..=31).contains(d));
        let timezone = parts
            .get(4)
            .map(|t| t.trim())
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        if let Some(tz) = &timezone {
            if !valid_timezone(tz) {
                return Err(format!(
                    "unknown time zone {tz:?} (an IANA name, e.g. Europe/Berlin)"
                ));
            }
        }
        Ok(TimeSpec {
            minutes: parse_field(part(0), "time (hh:mm)", &minute)?,
            weekdays: parse_field(part(1), "weekday", &named(&WEEKDAYS, 0))?,
            mdays: parse_field(part(2), "day of the month", &mday)?,
            months: parse_field(part(3), "month", &named(&MONTHS, 1))?,
            timezone,
        })
    }

    /// Whether Unix time `unix_ms` falls inside, in the spec's zone or `default_tz`.
    pub fn matches(&self, unix_ms: i64, default_tz: &str) -> Result<bool, String> {
        let name = self.timezone.as_deref().unwrap_or(default_tz);
        let tz = TimeZone::get(name).map_err(|e| format!("time zone {name:?}: {e}"))?;
        let t = tz.to_datetime(Timestamp::from_millisecond(unix_ms).map_err(|e| e.to_string())?);
        let minute = t.hour() as u16 * 60 + t.minute() as u16;
        let weekday = t.weekday().to_sunday_zero_offset() as u16;
        Ok(in_ranges(&self.minutes, minute)
            && in_ranges(&self.weekdays, weekday)
            && in_ranges(&self.mdays, t.day() as u16)
            && in_ranges(&self.months, t.month() as u16))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix ms of a civil time in a zone.
    fn at(civil: &str, tz: &str) -> i64 {
        let dt: jiff::civil::DateTime = civil.parse().unwrap();
        dt.in_tz(tz).unwrap().timestamp().as_millisecond()
    }

    #[test]
    fn office_hours_in_a_time_zone() {
        let spec = TimeSpec::parse("09:00-17:00,mon-fri,*,*,Europe/Berlin").unwrap();
        // Friday 2026-12-04.
        assert!(spec
            .matches(at("2026-12-04T09:00", "Europe/Berlin"), "UTC")
            .unwrap());
        assert!(spec
            .matches(at("2026-12-04T17:00", "Europe/Berlin"), "UTC")
            .unwrap());
        assert!(!spec
            .matches(at("2026-12-04T17:01", "Europe/Berlin"), "UTC")
            .unwrap());
        assert!(!spec
            .matches(at("2026-12-05T10:00", "Europe/Berlin"), "UTC")
            .unwrap());
        // 08:30 UTC is 09:30 in Berlin in winter: open.
        assert!(spec.matches(at("2026-12-04T08:30", "UTC"), "UTC").unwrap());
        // Without a zone in the spec, the default one.
        let local = TimeSpec::parse("09:00-17:00,mon-fri,*,*").unwrap();
        assert!(!local.matches(at("2026-12-04T08:30", "UTC"), "UTC").unwrap());
        assert!(local
            .matches(at("2026-12-04T08:30", "UTC"), "Europe/Berlin")
            .unwrap());
    }

    #[test]
    fn ranges_wrap_and_lists_join() {
        let night = TimeSpec::parse("22:00-06:00,*,*,*").unwrap();
        assert!(night.matches(at("2026-12-04T23:30", "UTC"), "UTC").unwrap());
        assert!(night.matches(at("2026-12-04T05:59", "UTC"), "UTC").unwrap());
        assert!(!night.matches(at("2026-12-04T12:00", "UTC"), "UTC").unwrap());
        let weekend = TimeSpec::parse("*,fri-mon,*,*").unwrap();
        assert!(weekend
            .matches(at("2026-12-06T12:00", "UTC"), "UTC")
            .unwrap()); // Sunday
        assert!(!weekend
            .matches(at("2026-12-08T12:00", "UTC"), "UTC")
            .unwrap()); // Tuesday
        let holidays = TimeSpec::parse("*,*,24-26&31,dec").unwrap();
        assert!(holidays
            .matches(at("2026-12-25T12:00", "UTC"), "UTC")
            .unwrap());
        assert!(holidays
            .matches(at("2026-12-31T12:00", "UTC"), "UTC")
            .unwrap());
        assert!(!holidays
            .matches(at("2026-12-27T12:00", "UTC"), "UTC")
            .unwrap());
        assert!(!holidays
            .matches(at("2026-11-25T12:00", "UTC"), "UTC")
            .unwrap());
        let winter = TimeSpec::parse("*,*,*,Dec-Feb").unwrap();
        assert!(winter
            .matches(at("2027-01-15T12:00", "UTC"), "UTC")
            .unwrap());
        assert!(!winter
            .matches(at("2027-03-01T12:00", "UTC"), "UTC")
            .unwrap());
        let all_day = TimeSpec::parse("00:00-24:00,*,*,*").unwrap();
        assert!(all_day
            .matches(at("2026-12-04T23:59", "UTC"), "UTC")
            .unwrap());
    }

    #[test]
    fn bad_specs_are_refused_with_the_field() {
        for (spec, what) in [
            ("9-17,*,*,*", "time"),
            ("09:00-25:00,*,*,*", "time"),
            ("*,funday,*,*", "weekday"),
            ("*,*,0-40,*", "day of the month"),
            ("*,*,*,smarch", "month"),
            ("*,*,*,*,Mars/Olympus", "time zone"),
            ("*,*,*,*,UTC,extra", "expected"),
        ] {
            let e = TimeSpec::parse(spec).unwrap_err();
            assert!(e.contains(what), "{spec}: {e}");
        }
    }
}
