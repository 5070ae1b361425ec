//! Working days and the legal delivery rules counted in them. Latvia's law deems a document sent
//! to the e-address delivered on the second working day after it was sent; working days skip
//! weekends and public holidays, counted in the country's own time zone.

use std::collections::BTreeSet;
use std::fmt;

use chrono::{Datelike, Duration, NaiveDate, TimeZone, Weekday};
use chrono_tz::Tz;
use time::OffsetDateTime;

/// Which days are worked, where.
#[derive(Clone, Debug)]
pub struct Calendar {
    timezone: Tz,
    holidays: BTreeSet<NaiveDate>,
}

/// Western Easter Sunday of `year` (the anonymous Gregorian algorithm).
pub fn easter(year: i32) -> Option<NaiveDate> {
    let a = year % 19;
    let b = year / 100;
    let c = year % 100;
    let d = b / 4;
    let e = b % 4;
    let f = (b + 8) / 25;
    let g = (b - f + 1) / 3;
    let h = (19 * a + b - d - g + 15) % 30;
    let i = c / 4;
    let k = c % 4;
    let l = (32 + 2 * e + 2 * i - h - k) % 7;
    let m = (a + 11 * h + 22 * l) / 451;
    let month = (h + l - 7 * m + 114) / 31;
    let day = (h + l - 7 * m + 114) % 31 + 1;
    NaiveDate::from_ymd_opt(year, u32::try_from(month).ok()?, u32::try_from(day).ok()?)
}

/// Latvia's public holidays of `year`: the fixed days, Good Friday and Easter Monday, and the
/// Monday after 4 May or 18 November when these fall on a weekend.
pub fn latvian_holidays(year: i32) -> Vec<NaiveDate> {
    let day = |m: u32, d: u32| NaiveDate::from_ymd_opt(year, m, d);
    let mut days: Vec<NaiveDate> = [
        (1, 1),
        (5, 1),
        (5, 4),
        (6, 23),
        (6, 24),
        (11, 18),
        (12, 24),
        (12, 25),
        (12, 26),
        (12, 31),
    ]
    .iter()
    .filter_map(|&(m, d)| day(m, d))
    .collect();
    if let Some(sunday) = easter(year) {
        days.push(sunday - Duration::days(2));
        days.push(sunday + Duration::days(1));
    }
    for (m, d) in [(5, 4), (11, 18)] {
        if let Some(date) = day(m, d) {
            match date.weekday() {
                Weekday::Sat => days.push(date + Duration::days(2)),
                Weekday::Sun => days.push(date + Duration::days(1)),
                _ => {}
            }
        }
    }
    days
}

impl Calendar {
    /// Working days in `timezone` (an IANA name such as `Europe/Riga`) with `holidays`.
    pub fn new(
        timezone: &str,
        holidays: impl IntoIterator<Item = NaiveDate>,
    ) -> Result<Self, String> {
        let timezone: Tz = timezone
            .parse()
            .map_err(|_| format!("`{timezone}` is not an IANA time zone"))?;
        Ok(Self {
            timezone,
            holidays: holidays.into_iter().collect(),
        })
    }

    /// Latvia: Europe/Riga, and Latvia's public holidays from 2024 to 2040.
    pub fn latvia() -> Self {
        Self {
            timezone: chrono_tz::Europe::Riga,
            holidays: (2024..=2040).flat_map(latvian_holidays).collect(),
        }
    }

    /// The public holidays.
    pub fn holidays(&self) -> Vec<NaiveDate> {
        self.holidays.iter().copied().collect()
    }

    /// Whether `date` is worked.
    pub fn is_working_day(&self, date: NaiveDate) -> bool {
        !matches!(date.weekday(), Weekday::Sat | Weekday::Sun) && !self.holidays.contains(&date)
    }

    /// The `n`-th working day after `date`.
    pub fn add_working_days(&self, date: NaiveDate, n: u32) -> NaiveDate {
        let mut day = date;
        let mut left = n;
        while left > 0 {
            day += Duration::days(1);
            if self.is_working_day(day) {
                left -= 1;
            }
        }
        day
    }

    /// The local date of a moment.
    pub fn local_date(&self, utc: OffsetDateTime) -> NaiveDate {
        let local = self
            .timezone
            .timestamp_opt(utc.unix_timestamp(), 0)
            .single()
            .map(|t| t.date_naive());
        local.unwrap_or_default()
    }

    /// The start of a local day (its first moment, also on a day clocks change), in UTC.
    pub fn start_of_day_utc(&self, date: NaiveDate) -> OffsetDateTime {
        let midnight = date.and_hms_opt(0, 0, 0).unwrap_or_default();
        let start = self
            .timezone
            .from_local_datetime(&midnight)
            .earliest()
            // No zone skips midnight today; should one, the day starts an hour later.
            .or_else(|| {
                self.timezone
                    .from_local_datetime(&(midnight + Duration::hours(1)))
                    .earliest()
            })
            .map_or(0, |t| t.timestamp());
        OffsetDateTime::from_unix_timestamp(start).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// When a message placed at `placed_at` is deemed delivered or expires under `rule`.
    pub fn deadline(&self, rule: &DeliveryRule, placed_at: OffsetDateTime) -> Deadline {
        match rule {
            DeliveryRule::WorkingDays(n) => Deadline {
                deemed_at: Some(
                    self.start_of_day_utc(self.add_working_days(self.local_date(placed_at), *n)),
                ),
                expires_at: None,
            },
            DeliveryRule::Opened { expires_after_days } => Deadline {
                deemed_at: None,
                expires_at: Some(placed_at + time::Duration::days(i64::from(*expires_after_days))),
            },
        }
    }
}

/// When a message counts as delivered, by its document type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliveryRule {
    /// Only when opened; not delivered if still unopened after the days given.
    Opened {
        /// Calendar days until an unopened message expires.
        expires_after_days: u32,
    },
    /// Deemed delivered at the start of the N-th working day after placement, unless opened
    /// first.
    WorkingDays(u32),
}

impl DeliveryRule {
    /// Parses `opened`, `opened:D` (1-365) or `working-days:N` (1-30).
    pub fn parse(text: &str) -> Result<Self, String> {
        let number = |value: &str, max: u32| -> Result<u32, String> {
            value
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| format!("`{text}`: the number must be 1-{max}"))
        };
        match text.split_once(':') {
            None if text == "opened" => Ok(DeliveryRule::Opened {
                expires_after_days: 30,
            }),
            Some(("opened", days)) => Ok(DeliveryRule::Opened {
                expires_after_days: number(days, 365)?,
            }),
            Some(("working-days", n)) => Ok(DeliveryRule::WorkingDays(number(n, 30)?)),
            _ => Err(format!(
                "`{text}` is not a delivery rule: use `working-days:N` or `opened[:DAYS]`"
            )),
        }
    }
}

impl fmt::Display for DeliveryRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeliveryRule::Opened { expires_after_days } => write!(f, "opened:{expires_after_days}"),
            DeliveryRule::WorkingDays(n) => write!(f, "working-days:{n}"),
        }
    }
}

/// When a placed message falls due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    /// When it is deemed delivered, unless opened first.
    pub deemed_at: Option<OffsetDateTime>,
    /// When it expires unopened.
    pub expires_at: Option<OffsetDateTime>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    #[test]
    fn easter_and_latvian_holidays() {
        assert_eq!(easter(2025), Some(date(2025, 4, 20)));
        assert_eq!(easter(2026), Some(date(2026, 4, 5)));
        assert_eq!(easter(2027), Some(date(2027, 3, 28)));
        assert_eq!(easter(2028), Some(date(2028, 4, 16)));
        let latvia = Calendar::latvia();
        assert!(!latvia.is_working_day(date(2026, 4, 3)), "Good Friday");
        assert!(!latvia.is_working_day(date(2026, 4, 6)), "Easter Monday");
        assert!(
            !latvia.is_working_day(date(2028, 11, 20)),
            "18 November 2028 is a Saturday"
        );
        assert!(latvia.is_working_day(date(2026, 11, 17)));
        assert!(!latvia.is_working_day(date(2026, 11, 18)));
    }

    #[test]
    fn the_second_working_day_after_placement() {
        let latvia = Calendar::latvia();
        let rule = DeliveryRule::WorkingDays(2);
        // Thursday 19 November 2026 (local) → Monday 23 November.
        assert_eq!(
            latvia
                .deadline(&rule, datetime!(2026-11-19 10:00 UTC))
                .deemed_at,
            Some(datetime!(2026-11-22 22:00 UTC))
        );
        // Friday → Tuesday; Saturday → Tuesday.
        assert_eq!(
            latvia.add_working_days(date(2026, 11, 20), 2),
            date(2026, 11, 24)
        );
        assert_eq!(
            latvia.add_working_days(date(2026, 11, 21), 2),
            date(2026, 11, 24)
        );
        // Thursday before Easter 2026 → Wednesday 8 April.
        assert_eq!(
            latvia.add_working_days(date(2026, 4, 2), 2),
            date(2026, 4, 8)
        );
        // Late evening UTC is already the next day in Riga.
        assert_eq!(
            latvia.local_date(datetime!(2026-11-19 22:30 UTC)),
            date(2026, 11, 20)
        );
        // Summer time starts on 29 March 2026: midnight of 30 March is 21:00 UTC.
        assert_eq!(
            latvia.start_of_day_utc(date(2026, 3, 30)),
            datetime!(2026-03-29 21:00 UTC)
        );
    }

    #[test]
    fn rules_parse_and_print() {
        for text in ["working-days:2", "opened:30", "opened:1"] {
            assert_eq!(DeliveryRule::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(
            DeliveryRule::parse("opened").unwrap().to_string(),
            "opened:30"
        );
        for bad in [
            "",
            "working-days",
            "working-days:0",
            "working-days:31",
            "opened:0",
            "deemed:2",
        ] {
            assert!(DeliveryRule::parse(bad).is_err(), "{bad}");
        }
        let opened = DeliveryRule::parse("opened:30").unwrap();
        let deadline = Calendar::latvia().deadline(&opened, datetime!(2026-04-02 07:00 UTC));
        assert_eq!(deadline.expires_at, Some(datetime!(2026-05-02 07:00 UTC)));
        assert_eq!(deadline.deemed_at, None);
    }
}
