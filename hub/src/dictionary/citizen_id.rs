//! The 12-digit citizen id, `PPP G YY RRRRRR`: PPP the province of birth registration in the old
//! 63-province scheme (`0` and its 2-digit code: 001 Hà Nội … 096 Cà Mau), G century and gender
//! (0/1 a man/woman born 1900–1999, 2/3 2000–2099, 4/5 2100–2199, …), YY the last two digits of
//! the birth year, six more digits. There is no check digit. The province part never changes with
//! the 2025 mergers and is never remapped.
//!
//! [`check`] says why an id breaks a rule, in words an operator can act on; it is pure and reads
//! only the compiled code list.

use std::collections::HashSet;

/// A gender as the national dictionary codes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gender {
    /// Nam.
    Male,
    /// Nữ.
    Female,
}

/// Why a citizen id is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CitizenIdError {
    /// Not 12 ASCII digits.
    #[error("citizen id {0:?} is not 12 digits")]
    Shape(String),
    /// The first three digits name no province of birth registration.
    #[error("citizen id {id}: {code} is not one of the 63 provinces of birth registration (001–096)")]
    Province {
        /// The id.
        id: String,
        /// Its first three digits.
        code: String,
    },
    /// The fourth and fifth digits disagree with the birth year or the gender.
    #[error("citizen id {id}: digits {digits} say {says}, but the record says {record}")]
    Birth {
        /// The id.
        id: String,
        /// The digits in question.
        digits: String,
        /// What the id says.
        says: String,
        /// What the rest of the record says.
        record: String,
    },
}

/// The 2-digit codes of the 63 provinces before 1 July 2025, from the compiled code list.
fn birth_provinces() -> &'static HashSet<String> {
    super::admin_units::legacy_provinces()
}

/// Checks `id` alone, or also against a birth year and gender when the record has them.
pub fn check(id: &str, birth: Option<(i32, Gender)>) -> Result<(), CitizenIdError> {
    if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CitizenIdError::Shape(id.to_string()));
    }
    let province = &id[..3];
    if !province.starts_with('0') || !birth_provinces().contains(&province[1..]) {
        return Err(CitizenIdError::Province { id: id.to_string(), code: province.to_string() });
    }
    let Some((year, gender)) = birth else { return Ok(()) };
    let g = u32::from(id.as_bytes()[3] - b'0');
    let yy: i32 = id[4..6].parse().expect("two digits");
    let century = 1900 + 100 * (g / 2) as i32;
    let says_gender = if g % 2 == 0 { Gender::Male } else { Gender::Female };
    let says_year = century + yy;
    if says_year != year || says_gender != gender {
        let name = |g: Gender| if g == Gender::Male { "a man" } else { "a woman" };
        return Err(CitizenIdError::Birth {
            id: id.to_string(),
            digits: id[3..6].to_string(),
            says: format!("{} born in {says_year}", name(says_gender)),
            record: format!("{} born in {year}", name(gender)),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_list_has_the_63_provinces_of_birth_registration() {
        assert_eq!(birth_provinces().len(), 63);
        for code in ["01", "79", "96"] {
            assert!(birth_provinces().contains(code), "{code}");
        }
    }

    #[test]
    fn an_id_agrees_with_its_province_century_and_gender_or_says_why_not() {
        // Hồ Chí Minh City (079), a man born 1990; Hà Nội (001), a woman born 2003.
        assert_eq!(check("079090000123", Some((1990, Gender::Male))), Ok(()));
        assert_eq!(check("001303000456", Some((2003, Gender::Female))), Ok(()));
        assert_eq!(check("001303000456", None), Ok(()));
        assert!(matches!(check("07909000012", None), Err(CitizenIdError::Shape(_))));
        assert!(matches!(check("07909000012a", None), Err(CitizenIdError::Shape(_))));
        // 003 (old code 03) was never a province code; 179 does not start with 0.
        for bad in ["003090000123", "179090000123", "097090000123"] {
            assert!(matches!(check(bad, None), Err(CitizenIdError::Province { .. })), "{bad}");
        }
        let e = check("079090000123", Some((1990, Gender::Female))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "citizen id 079090000123: digits 090 say a man born in 1990, but the record says a woman born in 1990"
        );
        let e = check("079290000123", Some((1990, Gender::Male))).unwrap_err();
        assert!(e.to_string().contains("a man born in 2090"), "{e}");
    }
}
