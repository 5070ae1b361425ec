//! Form schemas: JSON Schema (draft 2020-12) compiled once per version, and validation of
//! application data into one field violation per problem, each with the JSON Pointer of the bad
//! field and a message in Latvian and English.

use std::sync::Arc;

use jsonschema::error::ValidationErrorKind;
use serde_json::Value;

use crate::formats;

/// The largest schema accepted, in bytes of JSON text.
pub const MAX_SCHEMA_BYTES: usize = 256 * 1024;
/// The largest document accepted for validation, in bytes of JSON text.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// The deepest nesting of arrays and objects accepted in a document or schema.
pub const MAX_DEPTH: usize = 64;
/// At most this many violations are reported for one document; the rest are summarised.
pub const MAX_VIOLATIONS: usize = 100;

/// A problem with one field of a document (or of a schema).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The JSON Pointer of the bad value; for a missing property, where it should be.
    pub pointer: String,
    /// A stable, machine-readable reason such as `REQUIRED` or `FORMAT`.
    pub reason: &'static str,
    /// The English message.
    pub en: String,
    /// The Latvian message.
    pub lv: String,
}

/// Why JSON text could not be used at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JsonError {
    /// Too many bytes.
    #[error("the JSON text is {size} bytes; at most {limit} are accepted")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not JSON, or nested beyond what the parser accepts.
    #[error("not valid JSON: {0}")]
    Syntax(String),
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("the JSON text is nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// Parses JSON text within a size limit and [`MAX_DEPTH`]. serde_json itself refuses nesting
/// beyond 128 levels without recursing further, so hostile depth never reaches the stack.
pub fn parse_json(text: &str, limit: usize) -> Result<Value, JsonError> {
    if text.len() > limit {
        return Err(JsonError::TooLarge {
            size: text.len(),
            limit,
        });
    }
    let value: Value = serde_json::from_str(text).map_err(|e| JsonError::Syntax(e.to_string()))?;
    if depth(&value) > MAX_DEPTH {
        return Err(JsonError::TooDeep);
    }
    Ok(value)
}

/// The nesting depth of a value, without recursion.
fn depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 1usize)];
    while let Some((value, level)) = stack.pop() {
        deepest = deepest.max(level);
        match value {
            Value::Array(items) => stack.extend(items.iter().map(|v| (v, level + 1))),
            Value::Object(map) => stack.extend(map.values().map(|v| (v, level + 1))),
            _ => {}
        }
    }
    deepest
}

/// A compiled form schema, shared by every validation of its version.
#[derive(Clone)]
pub struct CompiledSchema {
    validator: Arc<jsonschema::Validator>,
}

impl std::fmt::Debug for CompiledSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CompiledSchema")
    }
}

/// Refuses every reference outside the schema: a form must not depend on what another server
/// says today.
struct NoRemoteReferences;

impl jsonschema::Retrieve for NoRemoteReferences {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        Err(format!("remote references are not allowed in a form schema: {uri}").into())
    }
}

impl CompiledSchema {
    /// Compiles a schema. It must be draft 2020-12 (stated or implied) and refer to nothing
    /// outside itself.
    pub fn compile(schema: &Value) -> Result<Self, Violation> {
        let bad = |pointer: &str, en: String, lv: String| Violation {
            pointer: pointer.to_owned(),
            reason: "INVALID_SCHEMA",
            en,
            lv,
        };
        if !schema.is_object() {
            return Err(bad(
                "",
                "the schema must be a JSON object".into(),
                "shēmai jābūt JSON objektam".into(),
            ));
        }
        if let Some(dialect) = schema.get("$schema")
            && dialect != "https://json-schema.org/draft/2020-12/schema"
        {
            return Err(bad(
                "/$schema",
                format!("only JSON Schema draft 2020-12 is supported, not {dialect}"),
                format!("atbalstīta tikai JSON Schema 2020-12 versija, nevis {dialect}"),
            ));
        }
        // Meta-validation first: a typo such as `"type": "strin"` is the publisher's error and
        // must say where it is.
        if let Err(error) = jsonschema::meta::validate(schema) {
            return Err(bad(
                error.instance_path().as_str(),
                format!("the schema is not valid JSON Schema: {error}"),
                format!("shēma neatbilst JSON Schema: {error}"),
            ));
        }
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .with_format("lv-personal-code", formats::is_personal_code)
            .with_format("iban", formats::is_iban)
            .with_retriever(NoRemoteReferences)
            .build(schema)
            .map_err(|error| {
                bad(
                    error.instance_path().as_str(),
                    format!("the schema cannot be used: {error}"),
                    format!("shēmu nevar izmantot: {error}"),
                )
            })?;
        Ok(Self {
            validator: Arc::new(validator),
        })
    }

    /// Validates a document: an empty list means it is valid. Violations come sorted by
    /// pointer, at most [`MAX_VIOLATIONS`] of them.
    pub fn validate(&self, document: &Value) -> Vec<Violation> {
        // Most documents are valid, and answering yes or no is much cheaper than collecting
        // the reasons why not.
        if self.validator.is_valid(document) {
            return Vec::new();
        }
        let mut violations = Vec::new();
        for error in self.validator.iter_errors(document) {
            let at = error.instance_path().as_str();
            describe(at, error.kind(), &mut violations);
            if violations.len() >= MAX_VIOLATIONS {
                break;
            }
        }
        violations.sort_by(|a, b| a.pointer.cmp(&b.pointer));
        violations.truncate(MAX_VIOLATIONS);
        violations
    }
}

/// Appends `name` to a JSON Pointer, escaping `~` and `/`.
pub(crate) fn child(pointer: &str, name: &str) -> String {
    format!("{pointer}/{}", name.replace('~', "~0").replace('/', "~1"))
}

/// Turns one validation error into violations at the pointer a person would point at.
fn describe(at: &str, kind: &ValidationErrorKind, out: &mut Vec<Violation>) {
    use ValidationErrorKind as K;
    let mut push = |pointer: String, reason: &'static str, en: String, lv: String| {
        out.push(Violation {
            pointer,
            reason,
            en,
            lv,
        });
    };
    match kind {
        K::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            push(
                child(at, name),
                "REQUIRED",
                "this field is required".into(),
                "šis lauks ir obligāts".into(),
            );
        }
        K::AdditionalProperties { unexpected } | K::UnevaluatedProperties { unexpected } => {
            for name in unexpected {
                push(
                    child(at, name),
                    "UNEXPECTED_FIELD",
                    "this field is not part of the form".into(),
                    "šis lauks neietilpst veidlapā".into(),
                );
            }
        }
        K::Type { kind } => {
            let expected = match kind {
                jsonschema::error::TypeKind::Single(t) => t.to_string(),
                jsonschema::error::TypeKind::Multiple(set) => set
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(" or "),
            };
            push(
                at.to_owned(),
                "TYPE",
                format!("expected a value of type {expected}"),
                format!("vērtībai jābūt ar tipu {expected}"),
            );
        }
        K::Format { format } => {
            let (en, lv) = match format.as_str() {
                "lv-personal-code" => (
                    "not a valid personal code (DDMMYY-NNNNN with a correct check digit)",
                    "nederīgs personas kods (DDMMGG-NNNNN ar pareizu kontrolciparu)",
                ),
                "iban" => (
                    "not a valid IBAN (check the account number and its check digits)",
                    "nederīgs IBAN (pārbaudiet konta numuru un kontrolciparus)",
                ),
                "date" => (
                    "not a valid date (YYYY-MM-DD)",
                    "nederīgs datums (GGGG-MM-DD)",
                ),
                "email" => ("not a valid e-mail address", "nederīga e-pasta adrese"),
                _ => (
                    "the value has the wrong format",
                    "vērtībai ir nepareizs formāts",
                ),
            };
            push(at.to_owned(), "FORMAT", en.into(), lv.into());
        }
        K::Enum { .. } => push(
            at.to_owned(),
            "NOT_ALLOWED",
            "the value is not one of the allowed choices".into(),
            "vērtība nav neviena no atļautajām izvēlēm".into(),
        ),
        K::Constant { expected_value } => push(
            at.to_owned(),
            "NOT_ALLOWED",
            format!("the value must be {expected_value}"),
            format!("vērtībai jābūt {expected_value}"),
        ),
        K::Pattern { .. } => push(
            at.to_owned(),
            "PATTERN",
            "the value is not written in the expected form".into(),
            "vērtība nav uzrakstīta paredzētajā formā".into(),
        ),
        K::MaxLength { limit } => push(
            at.to_owned(),
            "TOO_LONG",
            format!("at most {limit} characters are allowed"),
            format!("atļautas ne vairāk kā {limit} rakstzīmes"),
        ),
        K::MinLength { limit } => push(
            at.to_owned(),
            "TOO_SHORT",
            format!("at least {limit} characters are required"),
            format!("nepieciešamas vismaz {limit} rakstzīmes"),
        ),
        K::MaxItems { limit } => push(
            at.to_owned(),
            "TOO_MANY",
            format!("at most {limit} entries are allowed"),
            format!("atļauti ne vairāk kā {limit} ieraksti"),
        ),
        K::MinItems { limit } => push(
            at.to_owned(),
            "TOO_FEW",
            format!("at least {limit} entries are required"),
            format!("nepieciešami vismaz {limit} ieraksti"),
        ),
        K::UniqueItems => push(
            at.to_owned(),
            "DUPLICATE",
            "the same entry is given more than once".into(),
            "viens un tas pats ieraksts norādīts vairākkārt".into(),
        ),
        K::Maximum { limit } | K::ExclusiveMaximum { limit } => push(
            at.to_owned(),
            "TOO_LARGE",
            format!("the value must not exceed {limit}"),
            format!("vērtība nedrīkst pārsniegt {limit}"),
        ),
        K::Minimum { limit } | K::ExclusiveMinimum { limit } => push(
            at.to_owned(),
            "TOO_SMALL",
            format!("the value must be at least {limit}"),
            format!("vērtībai jābūt vismaz {limit}"),
        ),
        other => push(
            at.to_owned(),
            "INVALID",
            format!("the value does not satisfy the form: {}", english(other)),
            "vērtība neatbilst veidlapas prasībām".into(),
        ),
    }
}

/// A short English description of the rarer kinds of error.
fn english(kind: &ValidationErrorKind) -> &'static str {
    use ValidationErrorKind as K;
    match kind {
        K::AnyOf { .. } | K::OneOfNotValid { .. } => "it matches none of the alternatives",
        K::OneOfMultipleValid { .. } => "it matches more than one alternative",
        K::Not { .. } => "it matches a value that is excluded",
        K::MultipleOf { .. } => "it is not a multiple of the required step",
        K::FalseSchema => "no value is allowed here",
        K::Contains => "a required entry is missing from the list",
        _ => "a rule of the form is broken",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pointers(schema: &Value, data: &Value) -> Vec<String> {
        CompiledSchema::compile(schema)
            .unwrap()
            .validate(data)
            .into_iter()
            .map(|v| v.pointer)
            .collect()
    }

    #[test]
    fn required_and_extra_fields_point_at_the_field() {
        let schema = json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["a"],
            "properties": {"a": {"type": "string"}, "b/c": {"type": "integer"}}
        });
        assert_eq!(pointers(&schema, &json!({"x": 1})), ["/a", "/x"]);
        assert_eq!(
            pointers(&schema, &json!({"a": "ok", "b/c": "no"})),
            ["/b~1c"]
        );
        assert!(pointers(&schema, &json!({"a": "ok"})).is_empty());
    }

    #[test]
    fn custom_formats_are_enforced() {
        let schema = json!({"properties": {
            "code": {"type": "string", "format": "lv-personal-code"},
            "iban": {"type": "string", "format": "iban"}
        }});
        assert_eq!(
            pointers(
                &schema,
                &json!({"code": "010170-10005", "iban": "LV81BANK0000435195001"})
            ),
            ["/code", "/iban"]
        );
        assert!(
            pointers(
                &schema,
                &json!({"code": "010170-10008", "iban": "LV80BANK0000435195001"})
            )
            .is_empty()
        );
    }

    #[test]
    fn remote_references_and_bad_schemas_are_refused() {
        let remote = json!({"$ref": "https://example.org/schema.json"});
        assert!(CompiledSchema::compile(&remote).is_err());
        let typo = json!({"type": "strin"});
        assert!(CompiledSchema::compile(&typo).is_err());
        let draft7 = json!({"$schema": "http://json-schema.org/draft-07/schema#"});
        assert!(CompiledSchema::compile(&draft7).is_err());
    }

    #[test]
    fn hostile_json_is_refused_before_validation() {
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        assert!(matches!(
            parse_json(&deep, usize::MAX),
            Err(JsonError::Syntax(_))
        ));
        let deep_enough = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert_eq!(
            parse_json(&deep_enough, usize::MAX),
            Err(JsonError::TooDeep)
        );
        assert!(matches!(
            parse_json("{}", 1),
            Err(JsonError::TooLarge { size: 2, limit: 1 })
        ));
        assert!(parse_json("{\"a\": [1]}", 100).is_ok());
    }
}
