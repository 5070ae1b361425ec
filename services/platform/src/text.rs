//! Text that people and systems send: the one rule every text field of the platform follows.
//! Control characters other than tab and line breaks are refused wherever text enters (form
//! data, message subjects and bodies, file names, notes, titles): they display as nothing or
//! as something else, hide what a document says, and PostgreSQL refuses the NUL character
//! (`text` columns refuse the byte, `jsonb` the escape `\u0000`), so that what one backend
//! stored the other would not.

use serde_json::Value;

/// Why a text is refused, for a field violation's description.
pub const CONTROL_CHARACTER: &str =
    "contains a control character: only tab and line breaks are allowed";

/// Whether `c` is refused in text: a control character (Unicode category Cc, U+0000-U+001F
/// and U+007F-U+009F) other than tab, line feed and carriage return.
pub fn is_refused(c: char) -> bool {
    c.is_control() && !matches!(c, '\t' | '\n' | '\r')
}

/// The text, or why it is refused ([`CONTROL_CHARACTER`]).
pub fn check(text: &str) -> Result<(), &'static str> {
    if text.chars().any(is_refused) {
        Err(CONTROL_CHARACTER)
    } else {
        Ok(())
    }
}

/// The JSON Pointers of the strings (values or object keys) of a document that contain a
/// refused character: an object key at fault is reported at the object that holds it (a pointer
/// through the key would carry the character itself), once per object.
pub fn json_control_characters(document: &Value) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![(document, String::new())];
    while let Some((value, at)) = stack.pop() {
        match value {
            Value::String(text) if check(text).is_err() => found.push(at),
            Value::Array(items) => stack.extend(
                items
                    .iter()
                    .enumerate()
                    .rev()
                    .map(|(i, item)| (item, format!("{at}/{i}"))),
            ),
            Value::Object(map) => {
                if map.keys().any(|key| check(key).is_err()) {
                    found.push(at.clone());
                }
                stack.extend(map.iter().rev().map(|(key, item)| {
                    let here = format!("{at}/{}", key.replace('~', "~0").replace('/', "~1"));
                    (item, here)
                }));
            }
            _ => {}
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_other_than_tab_and_line_breaks_are_refused() {
        assert!(check("Iesniegums\tpar pensiju\r\nRīga").is_ok());
        for bad in [
            "a\u{0}b",
            "\u{7}",
            "\u{1b}[31m",
            "\u{7f}",
            "\u{85}",
            "\u{9f}",
        ] {
            assert_eq!(check(bad), Err(CONTROL_CHARACTER), "{bad:?}");
        }
        // Formatting characters are not control characters.
        assert!(check("\u{200b}\u{2028}").is_ok());
    }

    #[test]
    fn documents_are_searched_to_their_pointers() {
        let document: Value = serde_json::from_str(
            r#"{"a": "ok\n", "b": ["x", "y\u0000"], "c/d": {"e": "\u001b"}, "k\u0007": "v"}"#,
        )
        .unwrap_or_default();
        let mut found = json_control_characters(&document);
        found.sort();
        assert_eq!(found, ["", "/b/1", "/c~1d/e"]);
        assert!(json_control_characters(&Value::from("\t")).is_empty());
    }
}
