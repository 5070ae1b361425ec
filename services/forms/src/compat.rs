//! Whether a new version of a form schema may reject data the previous version accepted.
//!
//! The check walks both schemas side by side and reports every change that narrows what is
//! accepted: a removed field (where extra fields are refused), a newly required field, a
//! narrowed type, enumeration, length, count or range, extra fields newly refused or
//! constrained, and a new field constrained where any field was accepted. Every other keyword
//! (`pattern`, `format`, `allOf`, `anyOf`, `oneOf`, `not`, `if`/`then`/`else`,
//! `dependentRequired`, ...) counts as narrowing whenever it is added or changed: the check may
//! call a harmless change breaking, never the reverse, and a publisher who knows better declares
//! the version breaking.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use crate::schema::child;

/// One way in which the new schema narrows the old one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Narrowing {
    /// The JSON Pointer of the affected field in the data (`-` stands for any array item).
    pub pointer: String,
    /// What changed.
    pub change: String,
}

/// Keywords that only annotate: changing them never changes what is accepted.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "$comment",
    "examples",
    "default",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$schema",
    "$id",
    "$anchor",
    "$defs",
    "definitions",
];

/// Keywords this check compares by their meaning; every other keyword that is added or changed
/// counts as narrowing.
const COMPARED: &[&str] = &[
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "$ref",
    "maxLength",
    "maxItems",
    "maxProperties",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "minItems",
    "minProperties",
    "minimum",
    "exclusiveMinimum",
];

/// Upper bounds: lowering or adding one narrows.
const UPPER: &[&str] = &[
    "maxLength",
    "maxItems",
    "maxProperties",
    "maximum",
    "exclusiveMaximum",
];
/// Lower bounds: raising or adding one narrows.
const LOWER: &[&str] = &[
    "minLength",
    "minItems",
    "minProperties",
    "minimum",
    "exclusiveMinimum",
];

/// Everything the new schema rejects that the old one accepted, as far as can be told.
pub fn narrowings(old: &Value, new: &Value) -> Vec<Narrowing> {
    let mut walk = Walk {
        old_root: old,
        new_root: new,
        found: Vec::new(),
        budget: MAX_NODES,
        definitions_unchanged: ["$defs", "definitions"]
            .iter()
            .all(|key| old.get(key) == new.get(key)),
    };
    walk.compare(old, new, "", 0);
    walk.found
}

struct Walk<'a> {
    old_root: &'a Value,
    new_root: &'a Value,
    found: Vec<Narrowing>,
    budget: usize,
    /// When the definitions are the same, a reference means the same in both schemas.
    definitions_unchanged: bool,
}

/// The schema that accepts anything.
static ANY: Value = Value::Bool(true);

/// References are followed at most this deep, which also stops recursive schemas.
const MAX_DEPTH: usize = 32;
/// At most this many pairs of subschemas are compared, so that a schema whose references
/// branch cannot make the comparison explode.
const MAX_NODES: usize = 20_000;

impl<'a> Walk<'a> {
    fn report(&mut self, pointer: &str, change: String) {
        self.found.push(Narrowing {
            pointer: pointer.to_owned(),
            change,
        });
    }

    fn compare(&mut self, old: &'a Value, new: &'a Value, pointer: &str, depth: usize) {
        // Identical subschemas accept the same data unless a reference inside them leads to
        // definitions that changed.
        if old == new && (self.definitions_unchanged || !has_reference(old)) {
            return;
        }
        if depth > MAX_DEPTH || self.budget == 0 {
            self.report(
                pointer,
                "the schema is too deep or recursive to compare".into(),
            );
            return;
        }
        self.budget -= 1;
        let old = resolve(self.old_root, old);
        let new = resolve(self.new_root, new);
        let (Some(old_map), Some(new_map)) = (as_schema(old), as_schema(new)) else {
            // `true`/`false` schemas: only `false` where there was something else narrows.
            if new == &Value::Bool(false) && old != &Value::Bool(false) {
                self.report(pointer, "no value is accepted any more".into());
            }
            return;
        };

        self.compare_types(old_map, new_map, pointer);
        self.compare_values(old_map, new_map, pointer);
        self.compare_bounds(old_map, new_map, pointer);

        for (keyword, after) in new_map {
            let keyword = keyword.as_str();
            if ANNOTATIONS.contains(&keyword) || COMPARED.contains(&keyword) {
                continue;
            }
            if old_map.get(keyword) != Some(after) {
                self.report(pointer, format!("`{keyword}` was added or changed"));
            }
        }

        // A reference beside other keywords: what it points to must not narrow either.
        match (old_map.get("$ref"), new_map.get("$ref")) {
            (Some(before), Some(after)) => {
                let (before, after) = (
                    target(self.old_root, before).unwrap_or(&Value::Bool(true)),
                    target(self.new_root, after).unwrap_or(&Value::Bool(false)),
                );
                self.compare(before, after, pointer, depth + 1);
            }
            (None, Some(_)) => self.report(pointer, "a reference was added".into()),
            _ => {}
        }

        // Objects.
        let required = |map: &Map<String, Value>| -> BTreeSet<String> {
            map.get("required")
                .and_then(Value::as_array)
                .map(|names| {
                    names
                        .iter()
                        .filter_map(|n| n.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let old_required = required(old_map);
        for name in required(new_map).difference(&old_required) {
            self.report(&child(pointer, name), "the field became required".into());
        }
        let refuses_extra =
            |map: &Map<String, Value>| map.get("additionalProperties") == Some(&Value::Bool(false));
        if refuses_extra(new_map) && !refuses_extra(old_map) {
            self.report(
                pointer,
                "fields not named in the form are refused now".into(),
            );
        }
        let properties =
            |map: &'a Map<String, Value>| map.get("properties").and_then(Value::as_object);
        let new_props = properties(new_map);
        let old_props = properties(old_map);
        for (name, old_prop) in old_props.into_iter().flatten() {
            match new_props.and_then(|props| props.get(name)) {
                Some(new_prop) => {
                    self.compare(old_prop, new_prop, &child(pointer, name), depth + 1)
                }
                None if refuses_extra(new_map) => {
                    self.report(&child(pointer, name), "the field was removed".into());
                }
                None => {}
            }
        }
        // What an object accepted beyond its named fields: anything, when not said.
        let any = &ANY;
        let old_extra = old_map.get("additionalProperties").unwrap_or(any);
        if old_extra == any {
            // A field new to an object that accepted any field constrains what was free.
            for (name, new_prop) in new_props.into_iter().flatten() {
                let known = old_props.is_some_and(|props| props.contains_key(name));
                if !known && new_prop != any && new_prop != &Value::Object(Map::new()) {
                    self.report(
                        &child(pointer, name),
                        "a field that was free is constrained now".into(),
                    );
                }
            }
        }
        if let Some(new_extra) = new_map
            .get("additionalProperties")
            .filter(|e| e.is_object())
        {
            if old_extra.is_object() {
                self.compare(old_extra, new_extra, &child(pointer, "*"), depth + 1);
            } else if old_extra == any {
                self.report(
                    &child(pointer, "*"),
                    "extra fields are constrained now".into(),
                );
            }
        }

        // Arrays.
        match (old_map.get("items"), new_map.get("items")) {
            (Some(old_items), Some(new_items)) => {
                self.compare(old_items, new_items, &child(pointer, "-"), depth + 1);
            }
            (None, Some(_)) => {
                self.report(pointer, "the entries of the list are restricted now".into())
            }
            _ => {}
        }
    }

    fn compare_types(&mut self, old: &Map<String, Value>, new: &Map<String, Value>, pointer: &str) {
        let Some(new_types) = types(new) else {
            return;
        };
        let Some(old_types) = types(old) else {
            self.report(
                pointer,
                format!("the type is restricted to {new_types:?} now"),
            );
            return;
        };
        for old_type in &old_types {
            // Every integer is a number, so `integer` may widen to `number`, not the reverse.
            let kept = new_types.contains(old_type)
                || (old_type == "integer" && new_types.contains("number"));
            if !kept {
                self.report(
                    pointer,
                    format!("values of type {old_type} are refused now"),
                );
            }
        }
    }

    fn compare_values(
        &mut self,
        old: &Map<String, Value>,
        new: &Map<String, Value>,
        pointer: &str,
    ) {
        let allowed = |map: &Map<String, Value>| -> Option<Vec<Value>> {
            if let Some(constant) = map.get("const") {
                return Some(vec![constant.clone()]);
            }
            map.get("enum").and_then(Value::as_array).cloned()
        };
        match (allowed(old), allowed(new)) {
            (_, None) => {}
            (None, Some(_)) => self.report(pointer, "the value is restricted to a list now".into()),
            (Some(old_values), Some(new_values)) => {
                for value in old_values.iter().filter(|v| !new_values.contains(v)) {
                    self.report(pointer, format!("the value {value} is refused now"));
                }
            }
        }
    }

    fn compare_bounds(
        &mut self,
        old: &Map<String, Value>,
        new: &Map<String, Value>,
        pointer: &str,
    ) {
        for (keywords, tighter) in [(UPPER, true), (LOWER, false)] {
            for keyword in keywords {
                let Some(after) = new.get(*keyword).and_then(Value::as_f64) else {
                    continue;
                };
                let narrowed = match old.get(*keyword).and_then(Value::as_f64) {
                    None => true,
                    Some(before) if tighter => after < before,
                    Some(before) => after > before,
                };
                if narrowed {
                    self.report(pointer, format!("`{keyword}` was added or tightened"));
                }
            }
        }
    }
}

fn has_reference(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.contains_key("$ref") || map.values().any(has_reference),
        Value::Array(items) => items.iter().any(has_reference),
        _ => false,
    }
}

fn as_schema(value: &Value) -> Option<&Map<String, Value>> {
    value.as_object()
}

/// The types a schema names, or `None` when it names none (any type).
fn types(map: &Map<String, Value>) -> Option<BTreeSet<String>> {
    match map.get("type")? {
        Value::String(single) => Some([single.clone()].into()),
        Value::Array(many) => Some(
            many.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect(),
        ),
        _ => None,
    }
}

/// What a local `$ref` (`#/...`) points to.
fn target<'a>(root: &'a Value, reference: &Value) -> Option<&'a Value> {
    root.pointer(reference.as_str()?.strip_prefix('#')?)
}

/// Follows a local `$ref` (`#/...`) of a schema that consists of nothing else, a few times.
fn resolve<'a>(root: &'a Value, mut schema: &'a Value) -> &'a Value {
    for _ in 0..8 {
        let Some(reference) = schema
            .as_object()
            .filter(|map| map.len() == 1)
            .and_then(|map| map.get("$ref"))
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix('#'))
        else {
            break;
        };
        match root.pointer(reference) {
            Some(target) => schema = target,
            None => break,
        }
    }
    schema
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn base() -> Value {
        json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "maxLength": 100},
                "age": {"type": ["integer", "null"], "minimum": 0},
                "kind": {"enum": ["a", "b"]},
                "list": {"type": "array", "maxItems": 10, "items": {"$ref": "#/$defs/item"}}
            },
            "$defs": {"item": {"type": "object", "properties": {"x": {"type": "string"}}}}
        })
    }

    fn changes(edit: impl FnOnce(&mut Value)) -> Vec<String> {
        let mut new = base();
        edit(&mut new);
        narrowings(&base(), &new)
            .into_iter()
            .map(|n| n.pointer)
            .collect()
    }

    #[test]
    fn compatible_changes_pass() {
        assert!(changes(|_| {}).is_empty());
        assert!(changes(|s| s["properties"]["extra"] = json!({"type": "string"})).is_empty());
        assert!(changes(|s| s["properties"]["name"]["maxLength"] = json!(200)).is_empty());
        assert!(changes(|s| s["properties"]["kind"]["enum"] = json!(["a", "b", "c"])).is_empty());
        assert!(changes(|s| s["required"] = json!([])).is_empty());
        assert!(changes(|s| s["properties"]["age"]["type"] = json!(["number", "null"])).is_empty());
    }

    #[test]
    fn narrowing_changes_are_found_where_they_are() {
        assert_eq!(
            changes(|s| {
                s["properties"].as_object_mut().unwrap().remove("age");
            }),
            ["/age"]
        );
        assert_eq!(
            changes(|s| s["required"] = json!(["name", "age"])),
            ["/age"]
        );
        assert_eq!(
            changes(|s| s["properties"]["age"]["type"] = json!("integer")),
            ["/age"]
        );
        assert_eq!(
            changes(|s| s["properties"]["kind"]["enum"] = json!(["a"])),
            ["/kind"]
        );
        assert_eq!(
            changes(|s| s["properties"]["name"]["maxLength"] = json!(50)),
            ["/name"]
        );
        assert_eq!(
            changes(|s| s["$defs"]["item"]["properties"]["x"]["type"] = json!("integer")),
            ["/list/-/x"]
        );
        assert_eq!(
            changes(|s| s["properties"]["name"]["pattern"] = json!("^[A-Z]")),
            ["/name"]
        );
        // `$defs/item` accepts any extra field: constraining a new one narrows.
        assert_eq!(
            changes(|s| s["$defs"]["item"]["properties"]["y"] = json!({"type": "integer"})),
            ["/list/-/y"]
        );
        assert_eq!(
            changes(|s| s["$defs"]["item"]["additionalProperties"] = json!({"type": "string"})),
            ["/list/-/*"]
        );
        assert_eq!(
            changes(|s| s["properties"]["kind"]["minContains"] = json!(1)),
            ["/kind"]
        );
    }
}
