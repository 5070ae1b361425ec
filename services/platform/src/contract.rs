//! The contract's shared types (`onestop.type.v1`, and the identity types other services
//! carry: levels of assurance, identity documents) to and from the platform's own, once for
//! every service.

use onestop_proto::identity::v1 as identity_pb;
use onestop_proto::r#type::v1 as types;

use crate::identity::Member;
use crate::person::{self, EidasId, Level};
use crate::tokens::Subject;

/// A member as the contract carries it.
pub fn member_pb(member: &Member) -> types::MemberId {
    types::MemberId {
        member_class: member.class.clone(),
        member_code: member.code.clone(),
        subsystem: member.subsystem.clone(),
    }
}

/// A member id in its text form (`CLASS/CODE[/subsystem]`) as the contract carries it; `None`
/// when the text is not one.
pub fn member_text_pb(text: &str) -> Option<types::MemberId> {
    Member::parse(text).ok().map(|m| member_pb(&m))
}

/// A member from the contract, checked; the error says what is wrong.
pub fn member_of(id: Option<&types::MemberId>) -> Result<Member, String> {
    let id = id.ok_or_else(|| "is required".to_owned())?;
    Member::new(&id.member_class, &id.member_code, &id.subsystem).map_err(|e| e.to_string())
}

/// A level of assurance as the contract carries it.
pub fn level_pb(level: Level) -> i32 {
    (match level {
        Level::Low => identity_pb::LevelOfAssurance::Low,
        Level::Substantial => identity_pb::LevelOfAssurance::Substantial,
        Level::High => identity_pb::LevelOfAssurance::High,
    }) as i32
}

/// A level of assurance from the contract; `None` when unspecified.
pub fn level_of(value: i32) -> Result<Option<Level>, String> {
    match identity_pb::LevelOfAssurance::try_from(value) {
        Ok(identity_pb::LevelOfAssurance::Unspecified) => Ok(None),
        Ok(identity_pb::LevelOfAssurance::Low) => Ok(Some(Level::Low)),
        Ok(identity_pb::LevelOfAssurance::Substantial) => Ok(Some(Level::Substantial)),
        Ok(identity_pb::LevelOfAssurance::High) => Ok(Some(Level::High)),
        Err(_) => Err(format!("unknown level {value}")),
    }
}

/// An identity document from the contract, by its stored name.
pub fn document_of(value: i32) -> Result<&'static str, String> {
    match identity_pb::IdentityDocument::try_from(value) {
        Ok(identity_pb::IdentityDocument::Passport) => Ok("passport"),
        Ok(identity_pb::IdentityDocument::IdCard) => Ok("id_card"),
        Ok(identity_pb::IdentityDocument::ResidencePermit) => Ok("residence_permit"),
        _ => Err("say which identity document was checked".into()),
    }
}

/// An identity document's stored name as the contract carries it.
pub fn document_pb(name: &str) -> i32 {
    (match name {
        "passport" => identity_pb::IdentityDocument::Passport,
        "id_card" => identity_pb::IdentityDocument::IdCard,
        "residence_permit" => identity_pb::IdentityDocument::ResidencePermit,
        _ => identity_pb::IdentityDocument::Unspecified,
    }) as i32
}

/// A person's id from the contract as a subject, checked (personal code checksum, eIDAS
/// form). The error names the sub-field (`value`, `scheme`) and what is wrong.
pub fn subject_of(id: Option<&types::PersonId>) -> Result<Subject, (&'static str, String)> {
    let id = id.ok_or(("", "is required".to_owned()))?;
    match types::PersonIdScheme::try_from(id.scheme) {
        Ok(types::PersonIdScheme::LvPersonalCode) => person::normalize_personal_code(&id.value)
            .map(Subject::Resident)
            .map_err(|m| ("value", m)),
        Ok(types::PersonIdScheme::Eidas) => EidasId::parse(&id.value)
            .map(Subject::Foreign)
            .map_err(|m| ("value", m)),
        _ => Err((
            "scheme",
            "a personal code or an eIDAS identifier".to_owned(),
        )),
    }
}

/// A subject's person id as the contract carries it (none for staff).
pub fn person_id_pb(subject: &Subject) -> Option<types::PersonId> {
    match subject {
        Subject::Resident(code) => Some(types::PersonId {
            scheme: types::PersonIdScheme::LvPersonalCode as i32,
            value: code.clone(),
        }),
        Subject::Foreign(id) => Some(types::PersonId {
            scheme: types::PersonIdScheme::Eidas as i32,
            value: id.to_string(),
        }),
        Subject::Staff { .. } => None,
    }
}
