//! People as the platform names them: Latvian personal codes (with their check digit), eIDAS
//! identifiers, and the levels of assurance of an identification.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How surely a person was identified (eIDAS levels), ordered: `Low < Substantial < High`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Limited confidence.
    Low,
    /// Two factors.
    Substantial,
    /// A qualified device.
    High,
}

impl Level {
    /// The name used in tokens and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Low => "low",
            Level::Substantial => "substantial",
            Level::High => "high",
        }
    }

    /// The level of that name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "low" => Some(Level::Low),
            "substantial" => Some(Level::Substantial),
            "high" => Some(Level::High),
            _ => None,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Latvian personal identity code (personas kods), written `DDMMYY-NNNNN`
/// (the hyphen may be left out).
///
/// Codes issued before July 2017 start with the date of birth, then a century digit (0 for the
/// 1800s, 1 for the 1900s, 2 for the 2000s), three serial digits and a check digit:
/// `(1 - Σ wᵢ·dᵢ) mod 11` with weights 1, 6, 3, 7, 9, 10, 5, 8, 4, 2, where a result of 10 is
/// written as 0. Codes issued since start with `32` and carry neither a date nor a check digit.
pub fn is_personal_code(text: &str) -> bool {
    let digits: Vec<u32> = match text.len() {
        12 if text.as_bytes()[6] == b'-' => text[..6]
            .chars()
            .chain(text[7..].chars())
            .collect::<Vec<_>>(),
        11 => text.chars().collect(),
        _ => return false,
    }
    .into_iter()
    .map(|c| c.to_digit(10))
    .collect::<Option<Vec<_>>>()
    .unwrap_or_default();
    if digits.len() != 11 {
        return false;
    }
    if digits[0] == 3 && digits[1] == 2 {
        return true;
    }
    let century = match digits[6] {
        0 => 1800,
        1 => 1900,
        2 => 2000,
        _ => return false,
    };
    let day = digits[0] * 10 + digits[1];
    let month = digits[2] * 10 + digits[3];
    let year = century + digits[4] * 10 + digits[5];
    let Ok(month) = time::Month::try_from(u8::try_from(month).unwrap_or(0)) else {
        return false;
    };
    let Ok(year) = i32::try_from(year) else {
        return false;
    };
    if time::Date::from_calendar_date(year, month, u8::try_from(day).unwrap_or(0)).is_err() {
        return false;
    }
    const WEIGHTS: [u32; 10] = [1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    let sum: u32 = WEIGHTS.iter().zip(&digits).map(|(w, d)| w * d).sum();
    // The sum is at most 9 · 55, so the subtraction cannot underflow.
    let check = (1101 - sum) % 11 % 10;
    check == digits[10]
}

/// A personal code in its written form, `DDMMYY-NNNNN`, or an error saying what is wrong.
pub fn normalize_personal_code(text: &str) -> Result<String, String> {
    if !is_personal_code(text) {
        return Err(format!(
            "`{}` is not a Latvian personal code (DDMMYY-NNNNN, with a valid check digit)",
            crate::status::echo(text)
        ));
    }
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    Ok(format!("{}-{}", &digits[..6], &digits[6..]))
}

/// The longest identifier part of an eIDAS identifier.
pub const MAX_EIDAS_IDENTIFIER: usize = 256;

/// An eIDAS person identifier, `CC/DD/identifier`: the country that identified the person, the
/// country receiving the identification, and the identifier itself.
///
/// [`EidasId::parse`] is the platform's one reading of such an identifier, wherever one enters
/// (a login, a paper intake, a mandate, an e-address, form data): the receiving country is
/// always Latvia, and the identifying country never is, since a person Latvia identifies has a
/// personal code (one person, one subject).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EidasId {
    /// The identifying (nationality) country, two capital letters.
    pub origin: String,
    /// The receiving country.
    pub destination: String,
    /// The identifier, unique within the origin country.
    pub identifier: String,
}

impl EidasId {
    /// Parses `CC/DD/identifier`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let wrong = |why: &str| {
            Err(format!(
                "`{}` is not an eIDAS identifier (CC/DD/identifier): {why}",
                crate::status::echo(text)
            ))
        };
        let mut parts = text.splitn(3, '/');
        let (Some(origin), Some(destination), Some(identifier)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return wrong("three parts separated by `/` expected");
        };
        let country = |c: &str| c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase());
        if !country(origin) || !country(destination) {
            return wrong("the countries are two capital letters each");
        }
        if destination != "LV" {
            return wrong("only identifications for Latvia (CC/LV/...) are accepted");
        }
        if origin == "LV" {
            return wrong("a person Latvia identifies is named by their personal code");
        }
        if identifier.is_empty()
            || identifier.len() > MAX_EIDAS_IDENTIFIER
            || !identifier.chars().all(|c| c.is_ascii_graphic())
        {
            return wrong("the identifier is 1-256 printable ASCII characters");
        }
        Ok(Self {
            origin: origin.to_owned(),
            destination: destination.to_owned(),
            identifier: identifier.to_owned(),
        })
    }
}

impl fmt::Display for EidasId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.origin, self.destination, self.identifier
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn personal_codes_are_checked() {
        // Valid by the check digit.
        assert!(is_personal_code("010170-10008"));
        assert!(is_personal_code("01017010008"));
        // New codes carry no check digit.
        assert!(is_personal_code("328174-07216"));
        // A wrong check digit, an impossible date, a wrong century digit, malformed text.
        assert!(!is_personal_code("010170-10005"));
        assert!(!is_personal_code("310270-10003"));
        assert!(!is_personal_code("010170-50008"));
        assert!(!is_personal_code("010170_10008"));
        assert!(!is_personal_code("01017O-10005"));
        assert!(!is_personal_code(""));
        assert_eq!(
            normalize_personal_code("01017010008").as_deref(),
            Ok("010170-10008")
        );
    }

    #[test]
    fn eidas_identifiers_are_parsed() {
        let id = EidasId::parse("EE/LV/38001085718").unwrap();
        assert_eq!((id.origin.as_str(), id.destination.as_str()), ("EE", "LV"));
        assert_eq!(id.to_string(), "EE/LV/38001085718");
        // The identifier may itself contain `/`.
        assert_eq!(
            EidasId::parse("DE/LV/a/b").unwrap().identifier,
            "a/b".to_owned()
        );
        for bad in [
            "EE/LV/",
            "EE/38001085718",
            "ee/LV/1",
            "EST/LV/1",
            "EE/LV/a b",
            "EE/LV/a\u{0}",
            "",
            // Only other countries' identifications, for Latvia.
            "LV/LV/38001085718",
            "EE/FI/38001085718",
        ] {
            assert!(EidasId::parse(bad).is_err(), "{bad}");
        }
        assert!(Level::High > Level::Substantial && Level::Substantial > Level::Low);
    }
}
