//! The e-forms domain: forms, their immutable versions, and the rules their inputs follow.

use onestop_platform::identity::Member;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The longest title, description, label or help text, in characters.
pub const MAX_TEXT_CHARS: usize = 1000;
/// The most fields a version may describe.
pub const MAX_FIELDS: usize = 2000;
/// The most choices a field may list.
pub const MAX_CHOICES: usize = 500;

/// A text in Latvian and English.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Localized {
    /// Latvian.
    pub lv: String,
    /// English.
    pub en: String,
}

/// One allowed value of an enumerated field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Choice {
    /// The value in the data.
    pub value: String,
    /// Its label.
    pub label: Localized,
}

/// How one field is labelled and shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    /// The JSON Pointer of the field in the data (`-` for array items).
    pub pointer: String,
    /// The label.
    pub label: Localized,
    /// A longer explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub help: Option<Localized>,
    /// A display hint.
    pub widget: String,
    /// Labels of the allowed values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<Choice>,
}

/// The display hints a field may carry.
pub const WIDGETS: &[&str] = &[
    "text",
    "textarea",
    "date",
    "select",
    "radio",
    "checkbox",
    "email",
    "phone",
    "iban",
    "personal-code",
    "registration-number",
    "postal-code",
    "group",
    "list",
    "country",
    "number",
];

/// A form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Form {
    /// The id, the last part of `forms/{id}`.
    pub id: String,
    /// The owning institution (no subsystem).
    pub owner: Member,
    /// The title.
    pub title: Localized,
    /// What it is for.
    pub description: Localized,
    /// The newest version number.
    pub latest_version: u32,
    /// When it was created.
    pub create_time: OffsetDateTime,
    /// When a version was last published or deprecated.
    pub update_time: OffsetDateTime,
}

impl Form {
    /// The resource name.
    pub fn name(&self) -> String {
        format!("forms/{}", self.id)
    }
}

/// One immutable version of a form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormVersion {
    /// The form's id.
    pub form_id: String,
    /// The number, from 1.
    pub version: u32,
    /// The JSON Schema text, as published.
    pub schema_json: String,
    /// Labels and hints.
    pub fields: Vec<Field>,
    /// Declared as narrowing the previous version.
    pub breaking: bool,
    /// Set once deprecated.
    pub deprecation: Option<Deprecation>,
    /// When it was published.
    pub create_time: OffsetDateTime,
}

/// Why and when a version stopped accepting data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deprecation {
    /// The reason given.
    pub reason: String,
    /// When.
    pub time: OffsetDateTime,
}

impl FormVersion {
    /// The resource name.
    pub fn name(&self) -> String {
        version_name(&self.form_id, self.version)
    }
}

/// `forms/{form_id}/versions/{version}`.
pub fn version_name(form_id: &str, version: u32) -> String {
    format!("forms/{form_id}/versions/{version}")
}

/// Which version a caller means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VersionRef {
    /// A numbered version.
    Number(u32),
    /// The newest active version.
    Latest,
}

/// Checks a form id: 3-63 lower-case letters, digits and `-`, starting with a letter, not
/// ending with `-`.
pub fn check_form_id(id: &str) -> Result<(), String> {
    let ok = (3..=63).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && !id.ends_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{id}` is not a form id: 3-63 lower-case letters, digits and `-`, starting with a letter"
        ))
    }
}

/// Parses `forms/{form_id}`.
pub fn parse_form_name(name: &str) -> Result<String, String> {
    let id = name
        .strip_prefix("forms/")
        .filter(|rest| !rest.contains('/'))
        .ok_or_else(|| format!("`{}` is not a form name (forms/{{form_id}})", shorten(name)))?;
    check_form_id(id)?;
    Ok(id.to_owned())
}

/// Parses `forms/{form_id}/versions/{version|latest}`.
pub fn parse_version_name(name: &str) -> Result<(String, VersionRef), String> {
    let malformed = || {
        format!(
            "`{}` is not a form version name (forms/{{form_id}}/versions/{{number or latest}})",
            shorten(name)
        )
    };
    let (form, version) = name.rsplit_once("/versions/").ok_or_else(malformed)?;
    let form_id = parse_form_name(form)?;
    let version = match version {
        "latest" => VersionRef::Latest,
        number => match number.parse::<u32>() {
            Ok(n) if n >= 1 && !number.starts_with('0') => VersionRef::Number(n),
            _ => return Err(malformed()),
        },
    };
    Ok((form_id, version))
}

/// Checks a localized text: both languages present (unless optional), neither too long.
pub fn check_text(what: &str, text: &Localized, required: bool) -> Result<(), String> {
    for (language, value) in [("lv", &text.lv), ("en", &text.en)] {
        if required && value.trim().is_empty() {
            return Err(format!("{what}.{language} must not be empty"));
        }
        if value.chars().count() > MAX_TEXT_CHARS {
            return Err(format!(
                "{what}.{language} is longer than {MAX_TEXT_CHARS} characters"
            ));
        }
        onestop_platform::text::check(value).map_err(|why| format!("{what}.{language} {why}"))?;
    }
    Ok(())
}

/// Checks the labels and hints of a version; returns the field path and message of the first
/// problem.
pub fn check_fields(fields: &[Field]) -> Result<(), (String, String)> {
    if fields.len() > MAX_FIELDS {
        return Err((
            "fields".into(),
            format!("at most {MAX_FIELDS} fields may be described"),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, field) in fields.iter().enumerate() {
        let at = |what: &str| format!("fields[{i}].{what}");
        if !(field.pointer.is_empty() || field.pointer.starts_with('/'))
            || field.pointer.len() > 512
        {
            return Err((
                at("pointer"),
                "must be a JSON Pointer such as /applicant/name".into(),
            ));
        }
        if !seen.insert(field.pointer.as_str()) {
            return Err((
                at("pointer"),
                format!("`{}` is described twice", field.pointer),
            ));
        }
        check_text("label", &field.label, true).map_err(|m| (at("label"), m))?;
        if let Some(help) = &field.help {
            check_text("help", help, false).map_err(|m| (at("help"), m))?;
        }
        if !WIDGETS.contains(&field.widget.as_str()) {
            return Err((
                at("widget"),
                format!(
                    "`{}` is not a widget; use one of {}",
                    field.widget,
                    WIDGETS.join(", ")
                ),
            ));
        }
        if field.choices.len() > MAX_CHOICES {
            return Err((at("choices"), format!("at most {MAX_CHOICES} choices")));
        }
        let mut values = std::collections::HashSet::new();
        for choice in &field.choices {
            if choice.value.is_empty() || choice.value.chars().count() > MAX_TEXT_CHARS {
                return Err((
                    at("choices"),
                    format!("a value must be 1-{MAX_TEXT_CHARS} characters"),
                ));
            }
            if !values.insert(choice.value.as_str()) {
                return Err((at("choices"), format!("`{}` is listed twice", choice.value)));
            }
            check_text("label", &choice.label, true).map_err(|m| (at("choices"), m))?;
        }
    }
    Ok(())
}

fn shorten(text: &str) -> String {
    text.chars().take(100).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_malformed_names_are_refused() {
        assert_eq!(
            parse_form_name("forms/vsaa-old-age-pension").unwrap(),
            "vsaa-old-age-pension"
        );
        assert_eq!(
            parse_version_name("forms/abc/versions/3").unwrap(),
            ("abc".into(), VersionRef::Number(3))
        );
        assert_eq!(
            parse_version_name("forms/abc/versions/latest").unwrap().1,
            VersionRef::Latest
        );
        for bad in [
            "forms/abc/versions/0",
            "forms/abc/versions/01",
            "forms/abc/versions/x",
            "abc",
        ] {
            assert!(parse_version_name(bad).is_err(), "{bad}");
        }
        for bad in [
            "forms/AB",
            "forms/ab",
            "forms/a/b",
            "forms/1abc",
            "forms/abc-",
            "x/abc",
        ] {
            assert!(parse_form_name(bad).is_err(), "{bad}");
        }
    }
}
