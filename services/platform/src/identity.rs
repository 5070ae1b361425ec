//! Who is calling: the identities carried in certificates, SPIFFE style.
//!
//! A member system is `spiffe://<trust-domain>/member/<class>/<code>/<subsystem>` and one of the
//! platform's own components is `spiffe://<trust-domain>/platform/<component>`. The textual form
//! of a member without the trust domain, `<class>/<code>[/<subsystem>]`, is what policies and
//! forms name.

use std::fmt;

/// The parts of an identity that failed to parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct IdentityError(String);

/// A member of the federation: an institution or municipality, possibly one subsystem of it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Member {
    /// `GOV`, `MUN`, `COM`, ...
    pub class: String,
    /// The registration number or official abbreviation.
    pub code: String,
    /// One system of the member; empty for the whole member.
    pub subsystem: String,
}

impl Member {
    /// Builds a member after checking each part.
    pub fn new(class: &str, code: &str, subsystem: &str) -> Result<Self, IdentityError> {
        check_class(class)?;
        check_part("member code", code, false, false)?;
        check_part("subsystem", subsystem, true, false)?;
        Ok(Self {
            class: class.to_owned(),
            code: code.to_owned(),
            subsystem: subsystem.to_owned(),
        })
    }

    /// Parses `<class>/<code>[/<subsystem>]`.
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let mut parts = text.split('/');
        let (Some(class), Some(code)) = (parts.next(), parts.next()) else {
            return Err(IdentityError(format!(
                "`{text}` is not a member id: expected CLASS/CODE or CLASS/CODE/SUBSYSTEM"
            )));
        };
        let subsystem = match parts.next() {
            // `CLASS/CODE/` is a typo, not the whole institution.
            Some("") => {
                return Err(IdentityError(format!(
                    "`{text}` is not a member id: the subsystem after the last `/` is empty"
                )));
            }
            Some(subsystem) => subsystem,
            None => "",
        };
        if parts.next().is_some() {
            return Err(IdentityError(format!(
                "`{text}` is not a member id: too many `/`"
            )));
        }
        Self::new(class, code, subsystem)
    }

    /// The member itself, without the subsystem: the institution that owns things.
    pub fn institution(&self) -> Member {
        Member {
            subsystem: String::new(),
            ..self.clone()
        }
    }

    /// Whether `self` is the same institution as `other`, whatever the subsystems.
    pub fn same_institution(&self, other: &Member) -> bool {
        self.class == other.class && self.code == other.code
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.class, self.code)?;
        if !self.subsystem.is_empty() {
            write!(f, "/{}", self.subsystem)?;
        }
        Ok(())
    }
}

/// An identity from a certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A member system.
    Member(Member),
    /// One of the platform's own components (`gateway`, `forms`, ...).
    Platform(String),
}

/// A SPIFFE identity within one trust domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    /// The trust domain, such as `onestop.lv`.
    pub trust_domain: String,
    /// Who it is.
    pub principal: Principal,
}

impl SpiffeId {
    /// The identity of a member system.
    pub fn member(trust_domain: &str, member: Member) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            principal: Principal::Member(member),
        }
    }

    /// The identity of a platform component.
    pub fn platform(trust_domain: &str, component: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            principal: Principal::Platform(component.to_owned()),
        }
    }

    /// Parses `spiffe://<trust-domain>/member/<class>/<code>[/<subsystem>]` or
    /// `spiffe://<trust-domain>/platform/<component>`.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError(format!("`{uri}` is not a spiffe:// URI")))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| IdentityError(format!("`{uri}` has no path")))?;
        check_part("trust domain", trust_domain, false, true)?;
        let principal = match path.split_once('/') {
            Some(("member", member)) => Principal::Member(Member::parse(member)?),
            Some(("platform", component)) => {
                check_part("component", component, false, false)?;
                Principal::Platform(component.to_owned())
            }
            _ => {
                return Err(IdentityError(format!(
                    "`{uri}` names neither a member (/member/...) nor a platform component (/platform/...)"
                )));
            }
        };
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            principal,
        })
    }

    /// The member, when this is one.
    pub fn as_member(&self) -> Option<&Member> {
        match &self.principal {
            Principal::Member(member) => Some(member),
            Principal::Platform(_) => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.principal {
            Principal::Member(member) => {
                write!(f, "spiffe://{}/member/{member}", self.trust_domain)
            }
            Principal::Platform(component) => {
                write!(f, "spiffe://{}/platform/{component}", self.trust_domain)
            }
        }
    }
}

fn check_class(class: &str) -> Result<(), IdentityError> {
    if (2..=16).contains(&class.len()) && class.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(IdentityError(format!(
            "member class `{class}` must be 2-16 upper-case letters"
        )))
    }
}

/// Checks one part of an identity; only a trust domain may hold dots.
fn check_part(
    what: &str,
    value: &str,
    may_be_empty: bool,
    dots: bool,
) -> Result<(), IdentityError> {
    if value.is_empty() && may_be_empty {
        return Ok(());
    }
    let allowed =
        |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (dots && b == b'.');
    if (1..=64).contains(&value.len()) && value.bytes().all(allowed) {
        Ok(())
    } else {
        let extra = if dots { ", `_` or `.`" } else { " or `_`" };
        Err(IdentityError(format!(
            "{what} `{value}` must be 1-64 letters, digits, `-`{extra}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_identity_round_trips() {
        let uri = "spiffe://onestop.lv/member/GOV/90009113/pensions";
        let id = SpiffeId::parse(uri).unwrap();
        let member = id.as_member().unwrap();
        assert_eq!(member.class, "GOV");
        assert_eq!(member.code, "90009113");
        assert_eq!(member.subsystem, "pensions");
        assert_eq!(id.to_string(), uri);
        assert_eq!(member.institution().to_string(), "GOV/90009113");
    }

    #[test]
    fn platform_identity_round_trips() {
        let id = SpiffeId::parse("spiffe://onestop.lv/platform/gateway").unwrap();
        assert_eq!(id.principal, Principal::Platform("gateway".into()));
        assert_eq!(id.to_string(), "spiffe://onestop.lv/platform/gateway");
    }

    #[test]
    fn malformed_identities_are_refused() {
        for bad in [
            "https://onestop.lv/member/GOV/1",
            "spiffe://onestop.lv",
            "spiffe://onestop.lv/member/gov/1",
            "spiffe://onestop.lv/member/GOV",
            "spiffe://onestop.lv/member/GOV/1/a/b",
            "spiffe://onestop.lv/member/GOV/1/",
            "spiffe://onestop.lv/member/GOV/../x",
            "spiffe://onestop.lv/other/x",
            "spiffe://onestop.lv/platform/",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} was accepted");
        }
    }
}
