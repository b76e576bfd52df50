//! Turning a legacy system's spelling of a value into the national dictionary's: text trimmed and
//! in Unicode NFC (legacy Vietnamese text is often decomposed, so `Nguyễn` has two spellings that
//! compare unequal), dates from the formats provincial systems use, gender from `Nam`/`Nữ`/`M`/`F`
//! to the national code. Each function is pure and says why a value does not normalise.

use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

/// Trimmed, NFC, inner runs of white space as one space: `s` itself when it is so already.
pub fn text(s: &str) -> std::borrow::Cow<'_, str> {
    // Nearly every value is clean already: one pass to say so, no rebuilding.
    if is_clean(s) {
        return std::borrow::Cow::Borrowed(s);
    }
    let nfc: String = s.nfc().collect();
    std::borrow::Cow::Owned(nfc.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Whether `s` is already what [`text`] makes of it: no white space but single inner spaces, and
/// NFC.
fn is_clean(s: &str) -> bool {
    let b = s.as_bytes();
    if b.first() == Some(&b' ') || b.last() == Some(&b' ') {
        return false;
    }
    let mut ascii = true;
    let mut after_space = false;
    for &x in b {
        if x == b' ' {
            if after_space {
                return false;
            }
            after_space = true;
            continue;
        }
        after_space = false;
        if x.is_ascii_whitespace() || x == 0x0b {
            return false;
        }
        ascii &= x.is_ascii();
    }
    ascii || s.chars().all(is_plain_letter) || {
        !s.chars().any(|c| c.is_whitespace() && c != ' ') && is_nfc_quick(s.chars()) == IsNormalized::Yes
    }
}

/// A character Vietnamese text is nearly always written in that is NFC on its own and not white
/// space: Latin letters below the combining marks (U+0300) and Latin Extended Additional (U+1E00
/// to U+1EFF, the precomposed ạ…ỹ), so the common case needs no Unicode table lookup.
fn is_plain_letter(c: char) -> bool {
    let u = c as u32;
    (u < 0x300 && !matches!(u, 0x09..=0x0d | 0x85 | 0xa0)) || (0x1e00..=0x1eff).contains(&u)
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

impl Date {
    /// `yyyy-mm-dd`, as [`std::fmt::Display`] writes it, without the formatter (once per row).
    pub fn iso(&self) -> String {
        if !(0..=9999).contains(&self.year) {
            return self.to_string();
        }
        let digit = |n: u32| char::from(b'0' + (n % 10) as u8);
        let y = self.year as u32;
        let mut s = String::with_capacity(10);
        s.extend([digit(y / 1000), digit(y / 100), digit(y / 10), digit(y), '-']);
        s.extend([digit(self.month / 10), digit(self.month), '-', digit(self.day / 10), digit(self.day)]);
        s
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
        let three = |sep: char| {
            let mut it = s.split(sep);
            let parts = (it.next()?, it.next()?, it.next()?);
            it.next().is_none().then_some(parts)
        };
        let parts: Option<(&str, &str, &str)> = match format {
            DateFormat::DayMonthYearSlash | DateFormat::DayMonthYearDash => {
                let sep = if format == DateFormat::DayMonthYearSlash { '/' } else { '-' };
                // A day or month of one digit (`7/5/1990`) is common in hand-typed records.
                three(sep)
                    .filter(|(d, m, _)| (1..=2).contains(&d.len()) && (1..=2).contains(&m.len()))
                    .map(|(d, m, y)| (y, m, d))
            }
            DateFormat::Iso => three('-').filter(|(_, m, d)| m.len() == 2 && d.len() == 2),
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
    // The spellings sources use, as they write them, before any rebuilding.
    match s {
        "1" | "Nam" | "M" => return Ok("1"),
        "2" | "Nữ" | "F" => return Ok("2"),
        _ => {}
    }
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
        assert_eq!(text("Nguyễn\u{a0}Văn"), "Nguyễn Văn");
        assert_eq!(text("Nguyễn\u{3000}Văn"), "Nguyễn Văn");
    }

    #[test]
    fn the_plain_letter_shortcut_agrees_with_the_unicode_tables() {
        // Every character the shortcut passes without a table lookup is NFC on its own and not
        // white space, so the shortcut never keeps a value the full check would rebuild.
        for c in (0u32..0x300).chain(0x1e00..=0x1eff).filter_map(char::from_u32).filter(|&c| is_plain_letter(c)) {
            assert_eq!(is_nfc_quick(std::iter::once(c)), IsNormalized::Yes, "U+{:04X}", c as u32);
            assert!(c == ' ' || !c.is_whitespace(), "U+{:04X}", c as u32);
        }
        // A letter followed by a combining mark is not clean, though the letter alone passes.
        assert!(!is_clean("Nguye\u{0302}\u{0303}n"));
        assert!(is_clean("Nguyễn Văn Ánh"));
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
        for d in [d, Date { year: 1900, month: 12, day: 1 }, Date { year: 2025, month: 1, day: 31 }] {
            assert_eq!(d.iso(), d.to_string());
        }
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
