//! The platform's own JSON Schema formats: identifiers whose validity a pattern cannot express.

/// `lv-personal-code`: a Latvian personal identity code (personas kods), written `DDMMYY-NNNNN`
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

/// `iban`: an International Bank Account Number in its compact form (no spaces), with the
/// length of its country and valid check digits.
pub fn is_iban(text: &str) -> bool {
    !text.contains(' ') && text.parse::<iban::Iban>().is_ok()
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
    }

    #[test]
    fn ibans_are_checked() {
        assert!(is_iban("LV80BANK0000435195001"));
        assert!(!is_iban("LV81BANK0000435195001"));
        assert!(!is_iban("LV80 BANK 0000 4351 9500 1"));
        assert!(!is_iban("LV80BANK000043519500"));
    }
}
