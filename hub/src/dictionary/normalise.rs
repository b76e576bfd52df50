//! Turning a legacy system's spelling of a value into the national dictionary's: text trimmed and
//! in Unicode NFC (legacy Vietnamese text is often decomposed, so `Nguyễn` has two spellings that
//! compare unequal), dates from the formats provincial systems use, gender from `Nam`/`Nữ`/`M`/`F`
//! to the national code. Each function is pure and says why a value does not normalise.

use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

/// Trimmed, NFC, inner runs of white space as one space.
pub fn text(s: &str) -> String {
    // Nearly every value is clean already: one pass to say so, no rebuilding.
    let spaced_once = !s.starts_with(' ')
        && !s.ends_with(' ')
        && !s.contains("  ")
        && !s.chars().any(|c| c.is_whitespace() && c != ' ');
    if spaced_once && (s.is_ascii() || is_nfc_quick(s.chars()) == IsNormalized::Yes) {
        return s.to_string();
    }
    let nfc: String = s.nfc().collect();
    nfc.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// How a source writes a date held as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub enum DateFormat {
    /// `17/05/1990`, the usual Vietnamese form.
    #[serde(rename = "dd/mm/yyyy")]
    DayMonthYearSlash,
    /// `17-05-1990`.
    #[serde(rename = "dd-mm-yyyy")]
    DayMonthYearDash,
    /// `1990-05-17`.
    #[serde(rename = "yyyy-mm-dd")]
    Iso,
    /// `19900517`.
    #[serde(rename = "yyyymmdd")]
    Compact,
}

impl DateFormat {
    fn name(self) -> &'static str {
        match self {
            DateFormat::DayMonthYearSlash => "dd/mm/yyyy",
            DateFormat::DayMonthYearDash => "dd-mm-yyyy",
            DateFormat::Iso => "yyyy-mm-dd",
            DateFormat::Compact => "yyyymmdd",
        }
    }
}

/// A calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date {
    /// Year.
    pub year: i32,
    /// 1–12.
    pub month: u32,
    /// 1–31.
    pub day: u32,
}

impl std::fmt::Display for Date {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

fn days_in(year: i32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 0,
    }
}

impl Date {
    /// The date, if it exists.
    pub fn new(year: i32, month: u32, day: u32) -> Option<Self> {
        (1..=12).contains(&month).then_some(())?;
        (1..=days_in(year, month)).contains(&day).then_some(Self { year, month, day })
    }

    /// Today, UTC.
    pub fn today() -> Self {
        let now = time::OffsetDateTime::now_utc().date();
        Self { year: now.year(), month: u32::from(u8::from(now.month())), day: u32::from(now.day()) }
    }

    /// Parses `s` (trimmed) in `format`; a native date value arrives as `yyyy-mm-dd`.
    pub fn parse(s: &str, format: DateFormat) -> Result<Self, String> {
        let s = s.trim();
        let parts: Option<(&str, &str, &str)> = match format {
            DateFormat::DayMonthYearSlash | DateFormat::DayMonthYearDash => {
                let sep = if format == DateFormat::DayMonthYearSlash { '/' } else { '-' };
                match s.split(sep).collect::<Vec<_>>().as_slice() {
                    // A day or month of one digit (`7/5/1990`) is common in hand-typed records.
                    [d, m, y] if (1..=2).contains(&d.len()) && (1..=2).contains(&m.len()) => Some((y, m, d)),
                    _ => None,
                }
            }
            DateFormat::Iso => match s.split('-').collect::<Vec<_>>().as_slice() {
                [y, m, d] if m.len() == 2 && d.len() == 2 => Some((y, m, d)),
                _ => None,
            },
            DateFormat::Compact if s.len() == 8 && s.is_ascii() => Some((&s[..4], &s[4..6], &s[6..])),
            DateFormat::Compact => None,
        };
        let bad = || format!("{s:?} is not a date written {}", format.name());
        let (y, m, d) = parts.ok_or_else(bad)?;
        let num =
            |p: &str| (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())).then(|| p.parse::<u32>().ok()).flatten();
        let (Some(y), Some(m), Some(d)) = (num(y).filter(|_| y.len() == 4), num(m), num(d)) else { return Err(bad()) };
        Date::new(y as i32, m, d).ok_or_else(|| format!("{s:?}: there is no day {d} in month {m} of {y}"))
    }
}

/// The national gender codes: `1` Nam, `2` Nữ.
pub fn gender(s: &str) -> Result<&'static str, String> {
    match text(s).to_lowercase().as_str() {
        "nam" | "m" | "male" | "1" => Ok("1"),
        "nữ" | "nu" | "f" | "female" | "2" => Ok("2"),
        _ => Err(format!("{s:?} is not a gender the dictionary knows (Nam/Nữ, M/F, or the national code 1/2)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_trimmed_and_composed() {
        // "Nguyễn" decomposed: e + circumflex + tilde.
        let decomposed = "  Nguye\u{0302}\u{0303}n   Văn  A ";
        assert_eq!(text(decomposed), "Nguyễn Văn A");
        assert_eq!(text(decomposed).chars().count(), 12);
        // Clean text (the fast path) comes back as it is; a tab or a double space does not.
        assert_eq!(text("Nguyễn Văn A"), "Nguyễn Văn A");
        assert_eq!(text("Nguyễn\tVăn  A"), "Nguyễn Văn A");
        assert_eq!(text("Nguyễn Văn A "), "Nguyễn Văn A");
    }

    #[test]
    fn dates_parse_in_each_format_and_impossible_ones_say_why() {
        let d = Date { year: 1990, month: 5, day: 17 };
        assert_eq!(Date::parse("17/05/1990", DateFormat::DayMonthYearSlash), Ok(d));
        assert_eq!(Date::parse(" 7/5/1990", DateFormat::DayMonthYearSlash), Ok(Date { day: 7, ..d }));
        assert_eq!(Date::parse("17-05-1990", DateFormat::DayMonthYearDash), Ok(d));
        assert_eq!(Date::parse("1990-05-17", DateFormat::Iso), Ok(d));
        assert_eq!(Date::parse("19900517", DateFormat::Compact), Ok(d));
        assert_eq!(d.to_string(), "1990-05-17");
        assert_eq!(Date::parse("29/02/2000", DateFormat::DayMonthYearSlash).unwrap().day, 29);
        let e = Date::parse("29/02/1900", DateFormat::DayMonthYearSlash).unwrap_err();
        assert_eq!(e, "\"29/02/1900\": there is no day 29 in month 2 of 1900");
        for bad in ["1990-05-17", "17/05/90", "17/13/1990", "a/b/cdef", "", "17/05/1990/1"] {
            assert!(Date::parse(bad, DateFormat::DayMonthYearSlash).is_err(), "{bad}");
        }
        assert!(Date::parse("31/04/1990", DateFormat::DayMonthYearSlash).unwrap_err().contains("no day 31"));
        assert!(Date::today() > d);
    }

    #[test]
    fn genders_map_to_the_national_code() {
        for (s, code) in [("Nam", "1"), ("nữ", "2"), ("Nu\u{031b}\u{0303}", "2"), (" M ", "1"), ("F", "2"), ("2", "2")]
        {
            assert_eq!(gender(s), Ok(code), "{s:?}");
        }
        assert!(gender("X").unwrap_err().contains("not a gender"));
    }
}
