//! Whether a new version of a form schema may reject data the previous version accepted.
//!
//! The check walks both schemas side by side and reports every change that narrows what is
//! accepted: a newly required field, a narrowed type, enumeration, length, count or range, extra
//! fields newly refused or constrained, and a field named in one version only, compared with
//! what governs unnamed fields in the other (removing a number field where extra fields must be
//! text narrows, as does adding a field stricter than extra fields were; `true` compares as the
//! schema without keywords). Every other keyword (`pattern`, `format`, `allOf`, `anyOf`,
//! `oneOf`, `not`, `if`/`then`/`else`, `dependentRequired`, ...) counts as narrowing whenever it
//! is added or changed: the check may call a harmless change breaking, never the reverse, and a
//! publisher who knows better declares the version breaking.

use std::collections::BTreeSet;
use std::sync::LazyLock;

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
        // `false` accepted nothing, so nothing can narrow it; `false` now refuses everything.
        if old == &Value::Bool(false) {
            return;
        }
        if new == &Value::Bool(false) {
            self.report(pointer, "no value is accepted any more".into());
            return;
        }
        let (Some(old_map), Some(new_map)) = (as_schema(old), as_schema(new)) else {
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
        // A field named on one side only is governed on the other by what governs the fields
        // it does not name.
        let properties =
            |map: &'a Map<String, Value>| map.get("properties").and_then(Value::as_object);
        let (old_props, new_props) = (properties(old_map), properties(new_map));
        let names: BTreeSet<&'a String> = old_props
            .into_iter()
            .chain(new_props)
            .flat_map(|props| props.keys())
            .collect();
        for name in names {
            let at = child(pointer, name);
            match (
                old_props.and_then(|props| props.get(name)),
                new_props.and_then(|props| props.get(name)),
            ) {
                (Some(before), Some(after)) => self.compare(before, after, &at, depth + 1),
                (Some(before), None) => {
                    for after in unnamed(new_map) {
                        if after == &Value::Bool(false) {
                            self.report(&at, "the field was removed".into());
                        } else {
                            self.compare(before, after, &at, depth + 1);
                        }
                    }
                }
                (None, Some(after)) => {
                    for before in unnamed(old_map) {
                        self.compare(before, after, &at, depth + 1);
                    }
                }
                (None, None) => {}
            }
        }
        // Fields named on neither side. Refusing them all was reported above.
        let extra = |map: &'a Map<String, Value>| map.get("additionalProperties").unwrap_or(&ANY);
        if !refuses_extra(new_map) {
            self.compare(
                extra(old_map),
                extra(new_map),
                &child(pointer, "*"),
                depth + 1,
            );
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

/// A schema's keywords; `true` (anything) has none.
fn as_schema(value: &Value) -> Option<&Map<String, Value>> {
    match value {
        Value::Bool(true) => Some(&*NO_KEYWORDS),
        other => other.as_object(),
    }
}

/// The keywords of the schema that accepts anything.
static NO_KEYWORDS: LazyLock<Map<String, Value>> = LazyLock::new(Map::new);

/// Every schema that may govern a field an object schema does not name: `additionalProperties`
/// (anything, when absent), each of `patternProperties` (whose patterns this check does not
/// match, so each is assumed to apply) and `unevaluatedProperties`. Comparing with each of them
/// may call a harmless change narrowing, never miss one.
fn unnamed(map: &Map<String, Value>) -> Vec<&Value> {
    let mut governing = vec![map.get("additionalProperties").unwrap_or(&ANY)];
    if let Some(patterns) = map.get("patternProperties").and_then(Value::as_object) {
        governing.extend(patterns.values());
    }
    governing.extend(map.get("unevaluatedProperties"));
    governing
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

    /// An object whose unnamed fields must be strings.
    fn open_object() -> Value {
        json!({
            "type": "object",
            "properties": {
                "count": {"type": "integer"},
                "note": {"type": "string", "maxLength": 10}
            },
            "additionalProperties": {"type": "string"}
        })
    }

    fn open_changes(edit: impl FnOnce(&mut Value)) -> Vec<String> {
        let mut new = open_object();
        edit(&mut new);
        let mut found: Vec<String> = narrowings(&open_object(), &new)
            .into_iter()
            .map(|n| n.pointer)
            .collect();
        found.dedup();
        found
    }

    #[test]
    fn fields_removed_or_added_beside_a_schema_for_extra_fields_are_compared_with_it() {
        // `count` falls to the extra-field schema, which refuses the integers it took.
        assert_eq!(
            open_changes(|s| {
                s["properties"].as_object_mut().unwrap().remove("count");
            }),
            ["/count"]
        );
        // `note` was a short string; any string is accepted now.
        assert!(
            open_changes(|s| {
                s["properties"].as_object_mut().unwrap().remove("note");
            })
            .is_empty()
        );
        // A new field narrows what any string was accepted as, or does not.
        assert_eq!(
            open_changes(|s| s["properties"]["code"] = json!({"type": "string", "maxLength": 5})),
            ["/code"]
        );
        assert!(
            open_changes(|s| s["properties"]["code"] = json!({"type": ["string", "null"]}))
                .is_empty()
        );
        // The extra-field schema itself is compared, and refusing extra fields is found.
        assert_eq!(
            open_changes(|s| s["additionalProperties"] = json!({"type": "string", "maxLength": 3})),
            ["/*"]
        );
        assert!(open_changes(|s| s["additionalProperties"] = json!(true)).is_empty());
        assert_eq!(
            open_changes(|s| s["additionalProperties"] = json!(false)),
            [""]
        );
        // A field that was not named and is refused by a pattern's schema now is found too.
        let mut patterned = open_object();
        patterned["properties"]
            .as_object_mut()
            .unwrap()
            .remove("count");
        patterned["additionalProperties"] = json!(true);
        patterned["patternProperties"] = json!({"^c": {"type": "string"}});
        let found: Vec<String> = narrowings(&open_object(), &patterned)
            .into_iter()
            .map(|n| n.pointer)
            .collect();
        assert!(found.contains(&"/count".to_owned()), "{found:?}");
    }

    #[test]
    fn a_schema_that_accepted_anything_is_compared_like_an_empty_one() {
        let old = json!({"type": "array", "items": true});
        let new = json!({"type": "array", "items": {"type": "string"}});
        assert_eq!(
            narrowings(&old, &new)
                .into_iter()
                .map(|n| n.pointer)
                .collect::<Vec<_>>(),
            ["/-"]
        );
        assert!(narrowings(&new, &old).is_empty());
        let old = json!({"properties": {"a": false}});
        let new = json!({"properties": {"a": {"type": "string"}}});
        assert!(narrowings(&old, &new).is_empty());
    }
}
