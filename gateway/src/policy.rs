//! Access rights: which member (or one subsystem of it) may call which methods. Anything not
//! allowed is denied.
//!
//! The policy is a TOML file of `[[allow]]` entries:
//!
//! ```toml
//! [[allow]]
//! member = "GOV/VSAA"                       # every subsystem of the institution
//! methods = ["onestop.forms.v1.FormsService/*"]
//!
//! [[allow]]
//! member = "MUN/GULBENE/kac"                # one subsystem only
//! methods = ["onestop.forms.v1.FormsService/ValidateFormData",
//!            "onestop.forms.v1.FormsService/Get*"]
//! ```
//!
//! A method pattern is `package.Service/Method`, where a trailing `*` matches any rest, and `*`
//! alone matches every method. `member = "*"` names every member.
//!
//! Methods that act for a person require a person's platform token, and may require a level
//! of assurance (a call below it is refused with the level to log in with again):
//!
//! ```toml
//! [[require_person]]
//! methods = ["onestop.identity.v1.IdentityService/RegisterMandate"]
//! min_level = "substantial"                 # low (the default), substantial or high
//! ```

use std::path::Path;

use onestop_platform::identity::Member;
use onestop_platform::person::Level;
use serde::Deserialize;

/// Why a policy file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read access policy {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is malformed.
    #[error("access policy {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    allow: Vec<AllowEntry>,
    #[serde(default)]
    require_person: Vec<PersonEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PersonEntry {
    methods: Vec<String>,
    #[serde(default)]
    min_level: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowEntry {
    member: String,
    methods: Vec<String>,
}

/// Who an entry is for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Grantee {
    Everyone,
    /// A whole institution when its subsystem is empty, else one subsystem.
    Member(Member),
}

impl Grantee {
    fn covers(&self, member: &Member) -> bool {
        match self {
            Grantee::Everyone => true,
            Grantee::Member(granted) => {
                granted.same_institution(member)
                    && (granted.subsystem.is_empty() || granted.subsystem == member.subsystem)
            }
        }
    }
}

/// A method pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(text: &str) -> Result<Self, String> {
        let valid = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'/')
        };
        let pattern = match text.strip_suffix('*') {
            Some(prefix) if !prefix.contains('*') && valid(prefix) => {
                Pattern::Prefix(prefix.to_owned())
            }
            None if valid(text) && text.contains('/') => Pattern::Exact(text.to_owned()),
            _ => {
                return Err(format!(
                    "`{text}` is not a method pattern (package.Service/Method, optionally ending in *)"
                ));
            }
        };
        Ok(pattern)
    }

    fn matches(&self, method: &str) -> bool {
        match self {
            Pattern::Exact(exact) => exact == method,
            Pattern::Prefix(prefix) => method.starts_with(prefix.as_str()),
        }
    }
}

/// The parsed access policy.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    entries: Vec<(Grantee, Vec<Pattern>)>,
    people: Vec<(Level, Vec<Pattern>)>,
}

impl Policy {
    /// Reads a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|message| PolicyError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses policy text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut entries = Vec::with_capacity(file.allow.len());
        for (i, entry) in file.allow.into_iter().enumerate() {
            let grantee = if entry.member == "*" {
                Grantee::Everyone
            } else {
                Grantee::Member(
                    Member::parse(&entry.member).map_err(|e| format!("allow[{i}].member: {e}"))?,
                )
            };
            let patterns = entry
                .methods
                .iter()
                .map(|m| Pattern::parse(m).map_err(|e| format!("allow[{i}].methods: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            entries.push((grantee, patterns));
        }
        let mut people = Vec::with_capacity(file.require_person.len());
        for (i, entry) in file.require_person.into_iter().enumerate() {
            let level = match entry.min_level.as_deref() {
                None => Level::Low,
                Some(name) => Level::parse(name).ok_or_else(|| {
                    format!(
                        "require_person[{i}].min_level: `{name}` is not low, substantial or high"
                    )
                })?,
            };
            let patterns = entry
                .methods
                .iter()
                .map(|m| Pattern::parse(m).map_err(|e| format!("require_person[{i}].methods: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            people.push((level, patterns));
        }
        Ok(Self { entries, people })
    }

    /// The least level of assurance of the person a call of `method` must carry a token for,
    /// if it must carry one (the highest of the entries that name it).
    pub fn person_required(&self, method: &str) -> Option<Level> {
        self.people
            .iter()
            .filter(|(_, patterns)| patterns.iter().any(|p| p.matches(method)))
            .map(|(level, _)| *level)
            .max()
    }

    /// Whether `member` may call `method` (`package.Service/Method`).
    pub fn allows(&self, member: &Member, method: &str) -> bool {
        self.entries.iter().any(|(grantee, patterns)| {
            grantee.covers(member) && patterns.iter().any(|p| p.matches(method))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
        [[allow]]
        member = "GOV/VSAA"
        methods = ["onestop.forms.v1.FormsService/*"]

        [[allow]]
        member = "MUN/GULBENE/kac"
        methods = ["onestop.forms.v1.FormsService/ValidateFormData", "onestop.forms.v1.FormsService/Get*"]
    "#;

    fn member(text: &str) -> Member {
        Member::parse(text).unwrap()
    }

    #[test]
    fn members_get_what_is_allowed_and_nothing_else() {
        let policy = Policy::parse(POLICY).unwrap();
        let forms = "onestop.forms.v1.FormsService/";
        assert!(policy.allows(&member("GOV/VSAA/pensions"), &format!("{forms}CreateForm")));
        assert!(policy.allows(&member("GOV/VSAA"), &format!("{forms}CreateForm")));
        assert!(policy.allows(
            &member("MUN/GULBENE/kac"),
            &format!("{forms}GetFormVersion")
        ));
        assert!(policy.allows(
            &member("MUN/GULBENE/kac"),
            &format!("{forms}ValidateFormData")
        ));
        assert!(!policy.allows(&member("MUN/GULBENE/kac"), &format!("{forms}CreateForm")));
        assert!(!policy.allows(&member("MUN/GULBENE/other"), &format!("{forms}GetForm")));
        assert!(!policy.allows(&member("GOV/VID/eds"), &format!("{forms}GetForm")));
        assert!(!policy.allows(&member("GOV/VSAA"), "onestop.routing.v1.RoutingService/X"));
        assert!(!Policy::default().allows(&member("GOV/VSAA"), &format!("{forms}GetForm")));
    }

    #[test]
    fn malformed_policies_are_refused() {
        for bad in [
            "[[allow]]\nmember = \"vsaa\"\nmethods = [\"*\"]",
            "[[allow]]\nmember = \"GOV/VSAA\"\nmethods = [\"a*b*\"]",
            "[[allow]]\nmember = \"GOV/VSAA\"\nmethods = [\"NoSlash\"]",
            "[[allow]]\nmember = \"GOV/VSAA\"\nmethod = [\"*\"]",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
        let everyone = Policy::parse("[[allow]]\nmember = \"*\"\nmethods = [\"*\"]").unwrap();
        assert!(everyone.allows(&member("COM/1/x"), "a.B/C"));
        assert!(
            Policy::parse("[[require_person]]\nmethods = [\"a.B/C\"]\nmin_level = \"top\"")
                .is_err()
        );
    }

    #[test]
    fn methods_may_require_a_person_at_a_level() {
        let policy = Policy::parse(
            "[[require_person]]\nmethods = [\"a.B/*\"]\n\n\
             [[require_person]]\nmethods = [\"a.B/Strong\"]\nmin_level = \"high\"",
        )
        .unwrap();
        assert_eq!(policy.person_required("a.B/Weak"), Some(Level::Low));
        assert_eq!(policy.person_required("a.B/Strong"), Some(Level::High));
        assert_eq!(policy.person_required("a.C/Any"), None);
    }
}
