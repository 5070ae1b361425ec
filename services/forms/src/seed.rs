//! The reusable e-forms every installation starts with: the five most demanded services at the
//! service centres (see `seed/README.md` for the file format). They are compiled into the binary
//! so that `onestop up` needs no files beside it.

use serde::Deserialize;

use crate::model::{Field, Localized};

/// One seed file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedForm {
    /// The form id.
    pub form_id: String,
    /// The owner, `CLASS/CODE`.
    pub owner: String,
    /// The title.
    pub title: Localized,
    /// What it is for.
    pub description: Localized,
    /// The JSON Schema of version 1.
    pub schema: serde_json::Value,
    /// Labels and hints.
    pub fields: Vec<Field>,
}

/// The seed files, by form id.
pub const SEED_FILES: &[(&str, &str)] = &[
    (
        "vsaa-old-age-pension",
        include_str!("../seed/vsaa-old-age-pension.json"),
    ),
    (
        "vsaa-parental-benefit",
        include_str!("../seed/vsaa-parental-benefit.json"),
    ),
    (
        "nva-unemployed-registration",
        include_str!("../seed/nva-unemployed-registration.json"),
    ),
    (
        "pmlp-residence-declaration",
        include_str!("../seed/pmlp-residence-declaration.json"),
    ),
    (
        "vid-eds-authorisation",
        include_str!("../seed/vid-eds-authorisation.json"),
    ),
];

/// Parses the seed forms.
pub fn seed_forms() -> Result<Vec<SeedForm>, serde_json::Error> {
    SEED_FILES
        .iter()
        .map(|(_, text)| serde_json::from_str(text))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::check_fields;
    use crate::schema::CompiledSchema;

    #[test]
    fn seed_forms_are_well_formed() {
        let forms = seed_forms().unwrap();
        assert_eq!(forms.len(), 5);
        for (form, (id, _)) in forms.iter().zip(SEED_FILES) {
            assert_eq!(&form.form_id, id);
            // Seed forms are created like any other, so they meet the rules for new schemas.
            let compiled = CompiledSchema::compile_new(&form.schema).unwrap();
            check_fields(&form.fields).unwrap();
            // Each names the person it is about, so that routing can check who files it.
            let subject = if form.form_id == "pmlp-residence-declaration" {
                "/declarant/personal_code"
            } else {
                "/applicant/personal_code"
            };
            assert_eq!(compiled.subject_fields(), [subject], "{id}");
            // The mark changes no validation: the valid example stays valid.
            let example: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(format!(
                    "{}/seed/examples/{id}.valid.json",
                    env!("CARGO_MANIFEST_DIR")
                ))
                .unwrap(),
            )
            .unwrap();
            assert!(compiled.validate(&example).is_empty(), "{id}");
        }
    }
}
