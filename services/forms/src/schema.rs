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

/// The schema keyword that marks a field as the application's subject: the person the data is
/// about, who must be the person filing it (see [`subject_fields`]).
pub const SUBJECT_KEYWORD: &str = "x-onestop-subject";

/// A compiled form schema, shared by every validation of its version.
#[derive(Clone)]
pub struct CompiledSchema {
    validator: Arc<jsonschema::Validator>,
    subject_fields: Arc<[String]>,
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
    /// Compiles the schema of a stored version. It must be draft 2020-12 (stated or implied) and
    /// refer to nothing outside itself. A format this service does not know is not checked: only
    /// versions published before unknown formats were refused can have one, and they must keep
    /// accepting what they accepted.
    pub fn compile(schema: &Value) -> Result<Self, Violation> {
        Self::build(schema, false)
    }

    /// Compiles a schema submitted for a new form or version: as [`CompiledSchema::compile`],
    /// and every `format` must be one of [`STANDARD_FORMATS`] or [`OWN_FORMATS`], since a
    /// misspelt format would silently check nothing.
    pub fn compile_new(schema: &Value) -> Result<Self, Violation> {
        Self::build(schema, true)
    }

    fn build(schema: &Value, refuse_unknown_formats: bool) -> Result<Self, Violation> {
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
        // A new schema is walked for unknown formats first, which names the place; refusing
        // them here as well covers subschemas only a reference the walk cannot follow reaches.
        if refuse_unknown_formats && let Some(violation) = unknown_format(schema) {
            return Err(violation);
        }
        if refuse_unknown_formats && let Some(violation) = misplaced_subject_mark(schema) {
            return Err(violation);
        }
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .should_ignore_unknown_formats(!refuse_unknown_formats)
            // A mailbox is an address alone: `Name <name@example.lv>` is not one.
            .with_email_options(jsonschema::EmailOptions::default().without_display_text())
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
            subject_fields: subject_fields(schema).into(),
        })
    }

    /// The JSON Pointers of the data's subject fields (see [`subject_fields`]).
    pub fn subject_fields(&self) -> &[String] {
        &self.subject_fields
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

/// The formats of JSON Schema 2020-12's format vocabulary, all of them enforced.
pub const STANDARD_FORMATS: &[&str] = &[
    "date-time",
    "date",
    "time",
    "duration",
    "email",
    "idn-email",
    "hostname",
    "idn-hostname",
    "ipv4",
    "ipv6",
    "uri",
    "uri-reference",
    "iri",
    "iri-reference",
    "uuid",
    "uri-template",
    "json-pointer",
    "relative-json-pointer",
    "regex",
];

/// The platform's own formats (see [`formats`]).
pub const OWN_FORMATS: &[&str] = &["lv-personal-code", "iban"];

/// Keywords whose value is a subschema (`items` may also be a list, as before 2020-12).
const SUBSCHEMA: &[&str] = &[
    "additionalProperties",
    "propertyNames",
    "items",
    "contains",
    "not",
    "if",
    "then",
    "else",
    "unevaluatedItems",
    "unevaluatedProperties",
    "contentSchema",
    "additionalItems",
];
/// Keywords whose value names subschemas (`dependencies` also names lists of fields, which
/// are no schemas and hold no format).
const SUBSCHEMA_MAPS: &[&str] = &[
    "properties",
    "patternProperties",
    "dependentSchemas",
    "$defs",
    "definitions",
    "dependencies",
];
/// Keywords whose value lists subschemas.
const SUBSCHEMA_LISTS: &[&str] = &["allOf", "anyOf", "oneOf", "prefixItems", "items"];

/// The first `format` (by place in the schema) that is neither standard nor the platform's.
///
/// Only places that hold a subschema are searched, and places that local references (`#/...`)
/// point to, so that a field of data named `format` (under `properties`) or a `format` inside
/// `enum`, `const` or `examples` is not taken for the keyword.
fn unknown_format(schema: &Value) -> Option<Violation> {
    let mut unknown: Vec<(String, &str)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![(schema, String::new())];
    while let Some((node, pointer)) = stack.pop() {
        let Some(map) = node.as_object() else {
            continue;
        };
        if !seen.insert(pointer.clone()) {
            continue;
        }
        if let Some(Value::String(name)) = map.get("format")
            && !STANDARD_FORMATS.contains(&name.as_str())
            && !OWN_FORMATS.contains(&name.as_str())
        {
            unknown.push((child(&pointer, "format"), name));
        }
        for (keyword, value) in map {
            let at = child(&pointer, keyword);
            let keyword = keyword.as_str();
            if SUBSCHEMA.contains(&keyword) && value.is_object() {
                stack.push((value, at.clone()));
            }
            if SUBSCHEMA_MAPS.contains(&keyword)
                && let Some(named) = value.as_object()
            {
                stack.extend(named.iter().map(|(name, sub)| (sub, child(&at, name))));
            }
            if SUBSCHEMA_LISTS.contains(&keyword)
                && let Some(list) = value.as_array()
            {
                stack.extend(
                    list.iter()
                        .enumerate()
                        .map(|(i, sub)| (sub, child(&at, &i.to_string()))),
                );
            }
            if matches!(keyword, "$ref" | "$dynamicRef")
                && let Some(target) = value.as_str().and_then(|r| r.strip_prefix('#'))
                && let Some(sub) = schema.pointer(target)
            {
                stack.push((sub, target.to_owned()));
            }
        }
    }
    let (pointer, name) = unknown.into_iter().min()?;
    let known = STANDARD_FORMATS
        .iter()
        .chain(OWN_FORMATS)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    Some(Violation {
        pointer,
        reason: "UNKNOWN_FORMAT",
        en: format!("`{name}` is not a format this service checks; use one of: {known}"),
        lv: format!(
            "formātu `{name}` šis pakalpojums nepārbauda; izmantojiet kādu no šiem: {known}"
        ),
    })
}

/// The JSON Pointers, in the data, of the fields a schema marks as its subject
/// (`"x-onestop-subject": true`): the properties reached from the root through `properties`,
/// directly or through local references (`"$ref": "#/$defs/person"`), whose schema carries the
/// mark. The data at such a pointer names the person the application is about, which routing
/// compares with the person filing it. Marks anywhere else (array items, conditional
/// subschemas) name no single field and are refused in new schemas
/// ([`CompiledSchema::compile_new`]). Sorted, each once.
pub fn subject_fields(schema: &Value) -> Vec<String> {
    let mut found = std::collections::BTreeSet::new();
    // (the schema node, the data pointer, the references followed to reach it)
    let mut stack: Vec<(&Value, String, Vec<&str>)> = vec![(schema, String::new(), Vec::new())];
    while let Some((node, at, followed)) = stack.pop() {
        let Some(map) = node.as_object() else {
            continue;
        };
        if followed.len() > MAX_DEPTH || at.matches('/').count() > MAX_DEPTH {
            continue;
        }
        if !at.is_empty() && map.get(SUBJECT_KEYWORD) == Some(&Value::Bool(true)) {
            found.insert(at.clone());
        }
        if let Some(target) = map
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix('#'))
            && !followed.contains(&target)
            && let Some(sub) = schema.pointer(target)
        {
            let mut followed = followed.clone();
            followed.push(target);
            stack.push((sub, at.clone(), followed));
        }
        if let Some(properties) = map.get("properties").and_then(Value::as_object) {
            stack.extend(
                properties
                    .iter()
                    .map(|(name, sub)| (sub, child(&at, name), followed.clone())),
            );
        }
    }
    found.into_iter().collect()
}

/// The first subject mark that is not `true` or `false`, or that no data field reaches
/// through `properties` and local references (so it would check nothing).
fn misplaced_subject_mark(schema: &Value) -> Option<Violation> {
    // Every place of the schema that carries the keyword, by its pointer in the schema.
    let mut marks = Vec::new();
    let mut stack = vec![(schema, String::new())];
    while let Some((node, pointer)) = stack.pop() {
        match node {
            Value::Object(map) => {
                if let Some(mark) = map.get(SUBJECT_KEYWORD) {
                    marks.push((pointer.clone(), mark));
                }
                for (key, value) in map {
                    // Data (`const`, `enum`, `default`, `examples`) holds no marks.
                    if !matches!(key.as_str(), "const" | "enum" | "default" | "examples") {
                        stack.push((value, child(&pointer, key)));
                    }
                }
            }
            Value::Array(items) => stack.extend(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (v, child(&pointer, &i.to_string()))),
            ),
            _ => {}
        }
    }
    marks.sort_by(|a, b| a.0.cmp(&b.0));
    // The places of the schema that data fields reach.
    let mut reached = std::collections::HashSet::new();
    let mut walk: Vec<(String, Vec<String>)> = vec![(String::new(), Vec::new())];
    while let Some((pointer, followed)) = walk.pop() {
        let Some(map) = schema.pointer(&pointer).and_then(Value::as_object) else {
            continue;
        };
        if followed.len() > MAX_DEPTH || pointer.matches('/').count() > 2 * MAX_DEPTH {
            continue;
        }
        if let Some(target) = map
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix('#'))
            && !followed.iter().any(|f| f == target)
        {
            let mut followed = followed.clone();
            followed.push(target.to_owned());
            walk.push((target.to_owned(), followed));
        }
        if let Some(properties) = map.get("properties").and_then(Value::as_object) {
            let under = child(&pointer, "properties");
            walk.extend(
                properties
                    .keys()
                    .map(|name| (child(&under, name), followed.clone())),
            );
        }
        reached.insert(pointer);
    }
    let (pointer, mark) = marks.into_iter().find(|(pointer, mark)| {
        !mark.is_boolean()
            || (**mark == Value::Bool(true) && (pointer.is_empty() || !reached.contains(pointer)))
    })?;
    let at = child(&pointer, SUBJECT_KEYWORD);
    Some(if mark.is_boolean() {
        Violation {
            pointer: at,
            reason: "MISPLACED_SUBJECT",
            en: format!(
                "`{SUBJECT_KEYWORD}` marks a property reached from the root through \
                 `properties` (and local `$ref`); this one names no single field of the data"
            ),
            lv: format!(
                "`{SUBJECT_KEYWORD}` atzīmē īpašību, kas sasniedzama no saknes caur `properties` \
                 (un lokālām `$ref`); šī nenorāda uz vienu datu lauku"
            ),
        }
    } else {
        Violation {
            pointer: at,
            reason: "MISPLACED_SUBJECT",
            en: format!("`{SUBJECT_KEYWORD}` is `true` or `false`"),
            lv: format!("`{SUBJECT_KEYWORD}` ir `true` vai `false`"),
        }
    })
}

/// The violation of a string of the data (or an object's key) holding a control character
/// other than tab and line breaks (see [`onestop_platform::text`]).
pub fn control_character(pointer: String) -> Violation {
    Violation {
        pointer,
        reason: "CONTROL_CHARACTER",
        en: format!("the text {}", onestop_platform::text::CONTROL_CHARACTER),
        lv: "tekstā ir vadības rakstzīme: atļauta tikai tabulācija un rindas pārnese".into(),
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
                "email" | "idn-email" => ("not a valid e-mail address", "nederīga e-pasta adrese"),
                "hostname" | "idn-hostname" => ("not a valid domain name", "nederīgs domēna vārds"),
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
    fn subject_fields_are_the_marked_properties_reached_from_the_root() {
        let schema = json!({
            "type": "object",
            "properties": {
                "applicant": {
                    "$ref": "#/$defs/person",
                    "properties": {"code": {"x-onestop-subject": true}}
                },
                "other": {"$ref": "#/$defs/person"},
                "self": {"type": "object", "properties": {"id": {"x-onestop-subject": true}}},
                "loop": {"$ref": "#/$defs/loop"}
            },
            "$defs": {
                "person": {"type": "object", "properties": {"code": {"type": "string"}}},
                "loop": {"$ref": "#/$defs/loop"}
            }
        });
        assert_eq!(subject_fields(&schema), ["/applicant/code", "/self/id"]);
        assert_eq!(
            CompiledSchema::compile_new(&schema)
                .unwrap()
                .subject_fields(),
            ["/applicant/code", "/self/id"]
        );
        // A mark that names no single field, or is no boolean, is refused in a new schema.
        for (bad, at) in [
            (
                json!({"type": "array", "items": {"x-onestop-subject": true}}),
                "/items/x-onestop-subject",
            ),
            (
                json!({"properties": {"a": {"x-onestop-subject": "yes"}}}),
                "/properties/a/x-onestop-subject",
            ),
            (json!({"x-onestop-subject": true}), "/x-onestop-subject"),
        ] {
            let violation = CompiledSchema::compile_new(&bad).unwrap_err();
            assert_eq!(
                (violation.pointer.as_str(), violation.reason),
                (at, "MISPLACED_SUBJECT")
            );
        }
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
    fn internationalised_mailboxes_and_host_names_are_checked() {
        let schema = json!({"properties": {
            "mail": {"type": "string", "format": "idn-email"},
            "host": {"type": "string", "format": "idn-hostname"},
            "ascii": {"type": "string", "format": "email"}
        }});
        for good in [
            json!({"mail": "jānis.bērziņš@piemērs.lv", "host": "piemērs.lv"}),
            json!({"mail": "anna@example.com", "host": "xn--piemrs-s3a.lv"}),
            json!({"mail": "\u{4f8b}\u{3048}@\u{4f8b}\u{3048}.\u{30c6}\u{30b9}\u{30c8}"}),
        ] {
            assert!(pointers(&schema, &good).is_empty(), "{good}");
        }
        for (bad, at) in [
            (json!({"mail": "not an address"}), "/mail"),
            (json!({"mail": "jānis@-piemērs.lv"}), "/mail"),
            (json!({"mail": "jānis@piemērs..lv"}), "/mail"),
            (json!({"mail": "Jānis <janis@piemērs.lv>"}), "/mail"),
            (json!({"ascii": "Anna <anna@example.com>"}), "/ascii"),
            (json!({"host": "-piemērs.lv"}), "/host"),
            (json!({"host": "piemērs lv"}), "/host"),
            (json!({"host": "a..lv"}), "/host"),
            (json!({"host": "xn--zz.lv"}), "/host"),
        ] {
            assert_eq!(pointers(&schema, &bad), [at], "{bad}");
        }
        // Both speak of e-mail in both languages.
        let violations = CompiledSchema::compile(&schema)
            .unwrap()
            .validate(&json!({"mail": "x"}));
        assert_eq!(violations[0].reason, "FORMAT");
        assert_eq!(violations[0].en, "not a valid e-mail address");
    }

    #[test]
    fn unknown_formats_are_refused_in_new_schemas_only() {
        let at = |schema: &Value| CompiledSchema::compile_new(schema).err().map(|v| v.pointer);
        let typo = json!({"properties": {"mail": {"type": "string", "format": "emial"}}});
        assert_eq!(at(&typo).as_deref(), Some("/properties/mail/format"));
        // Versions stored before keep validating, the unknown format unchecked.
        assert!(CompiledSchema::compile(&typo).is_ok());
        let refused = CompiledSchema::compile_new(&typo).unwrap_err();
        assert_eq!(refused.reason, "UNKNOWN_FORMAT");
        assert!(refused.en.contains("`emial`") && refused.en.contains("idn-email"));

        for (schema, pointer) in [
            (json!({"format": "ipv5"}), "/format"),
            (
                json!({"items": {"format": "x"}, "$defs": {"a": {"format": "date"}}}),
                "/items/format",
            ),
            (
                json!({"$defs": {"a/b": {"format": "x"}}}),
                "/$defs/a~1b/format",
            ),
            (
                json!({"allOf": [{}, {"not": {"format": "x"}}]}),
                "/allOf/1/not/format",
            ),
            (
                json!({"properties": {"a": {"additionalProperties": {"format": "x"}}}}),
                "/properties/a/additionalProperties/format",
            ),
            // Reached only through a reference into a keyword this service does not know.
            (
                json!({"$ref": "#/x-parts/code", "x-parts": {"code": {"format": "x"}}}),
                "/x-parts/code/format",
            ),
            // The first by place is named.
            (
                json!({"properties": {"b": {"format": "y"}, "a": {"format": "x"}}}),
                "/properties/a/format",
            ),
        ] {
            assert_eq!(at(&schema).as_deref(), Some(pointer), "{schema}");
        }

        // `format` as a field name or inside data is no keyword; every known format passes.
        let fine = json!({
            "properties": {"format": {"type": "string", "format": "date"}},
            "enum": [{"format": "anything"}],
            "const": {"format": "anything"},
            "examples": [{"format": "anything"}],
            "x-unreferenced": {"format": "anything"}
        });
        assert_eq!(at(&fine), None);
        for name in STANDARD_FORMATS.iter().chain(OWN_FORMATS) {
            assert_eq!(at(&json!({"format": name})), None, "{name}");
        }
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
