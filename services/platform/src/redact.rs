//! The one place where what identifies a person is kept out of the logs: every line the process
//! logs passes through [`Redacting`], which masks Latvian personal codes (`DDMMYY-NNNNN`, and
//! the eleven digits without the hyphen) and the identifier part of eIDAS identifiers
//! (`CC/LV/…`) before it is written. Code should not log them in the first place (subjects and
//! bodies of messages, which no pattern can recognise, never are); this is the net under it,
//! for a value that reaches a log inside an error message or a library's debug output.

use std::io::{self, Write};

/// What a personal code is replaced with.
const MASKED_CODE: &[u8] = b"******-*****";
/// What an eIDAS identifier's own part is replaced with.
const MASKED_EIDAS: &[u8] = b"***";

/// Masks personal codes and eIDAS identifiers in `text`.
pub fn redact(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut at = 0;
    while at < text.len() {
        let before_ok = at == 0 || !text[at - 1].is_ascii_alphanumeric();
        if before_ok && let Some(len) = personal_code_at(&text[at..]) {
            out.extend_from_slice(MASKED_CODE);
            at += len;
            continue;
        }
        if before_ok && let Some((prefix, len)) = eidas_at(&text[at..]) {
            out.extend_from_slice(&text[at..at + prefix]);
            out.extend_from_slice(MASKED_EIDAS);
            at += len;
            continue;
        }
        out.push(text[at]);
        at += 1;
    }
    out
}

fn digits(text: &[u8]) -> usize {
    text.iter().take_while(|b| b.is_ascii_digit()).count()
}

/// The length of a personal code at the start of `text` (followed by no letter or digit).
fn personal_code_at(text: &[u8]) -> Option<usize> {
    let ends = |len: usize| text.get(len).is_none_or(|b| !b.is_ascii_alphanumeric());
    let head = digits(text);
    if head == 6 && text.get(6) == Some(&b'-') && digits(&text[7..]) == 5 && ends(12) {
        return Some(12);
    }
    (head == 11 && ends(11)).then_some(11)
}

/// An eIDAS identifier at the start of `text`: the length of its `CC/DD/` prefix and of the
/// whole identifier (up to a space, a quote or the end of the line).
fn eidas_at(text: &[u8]) -> Option<(usize, usize)> {
    let country = |at: usize| {
        text.get(at..at + 2)
            .is_some_and(|c| c.iter().all(u8::is_ascii_uppercase))
    };
    if !(country(0) && text.get(2) == Some(&b'/') && country(3) && text.get(5) == Some(&b'/')) {
        return None;
    }
    let rest = text[6..]
        .iter()
        .take_while(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b'`' | b'\\' | b','))
        .count();
    (rest > 0).then_some((6, 6 + rest))
}

/// A writer that masks what [`redact`] masks in everything written through it. A log line is
/// written in one piece, so a value is never split between two writes.
pub struct Redacting<W>(pub W);

impl<W: Write> Write for Redacting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(&redact(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Standard error, redacted: what the process's log layers write to.
pub fn stderr() -> Redacting<io::Stderr> {
    Redacting(io::stderr())
}

#[cfg(test)]
mod tests {
    use super::redact;

    fn text(input: &str) -> String {
        String::from_utf8(redact(input.as_bytes())).unwrap()
    }

    #[test]
    fn personal_codes_and_eidas_identifiers_are_masked() {
        assert_eq!(
            text("resident 121282-11236 filed"),
            "resident ******-***** filed"
        );
        assert_eq!(text("code=32128211236,"), "code=******-*****,");
        assert_eq!(
            text(r#"{"subject":"eidas:EE/LV/38001085718"}"#),
            r#"{"subject":"eidas:EE/LV/***"}"#
        );
        assert_eq!(text("lv:121282-11236"), "lv:******-*****");
    }

    #[test]
    fn other_numbers_and_names_are_left_alone() {
        for kept in [
            "trace_id=4bf92f3577b34da6a3ce929d0e0e4736",
            "duration_ms=1234.567 at 1733622000000",
            "member=GOV/VSAA/pensions",
            "spiffe://onestop.lv/member/MUN/GULBENE/kac",
            "a12345678901b",
            "123456-1234",
        ] {
            assert_eq!(text(kept), kept);
        }
    }
}
