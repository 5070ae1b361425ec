//! The platform's own JSON Schema formats: identifiers whose validity a pattern cannot express.

/// `lv-personal-code`: a Latvian personal identity code, with its check digit where it has one
/// (see [`onestop_platform::person::is_personal_code`]).
pub fn is_personal_code(text: &str) -> bool {
    onestop_platform::person::is_personal_code(text)
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
    fn ibans_are_checked() {
        assert!(is_iban("LV80BANK0000435195001"));
        assert!(!is_iban("LV81BANK0000435195001"));
        assert!(!is_iban("LV80 BANK 0000 4351 9500 1"));
        assert!(!is_iban("LV80BANK000043519500"));
    }
}
