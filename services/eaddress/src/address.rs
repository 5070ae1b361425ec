//! Mailbox addresses: who a mailbox belongs to, written as text (`lv:`, `eidas:`, `company:`,
//! `member:`), checked and normalised once, at the edge.

use std::fmt;

use onestop_platform::identity::Member;
use onestop_platform::person::{EidasId, normalize_personal_code};

/// The owner of a mailbox.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Address {
    /// A person with a Latvian personal code, `DDMMYY-NNNNN`.
    Person(String),
    /// A person identified through eIDAS, `CC/DD/identifier`.
    Eidas(String),
    /// A company, by its 11-digit registration number.
    Company(String),
    /// An institution's subsystem, `CLASS/CODE/SUBSYSTEM`.
    Member(String),
}

/// The longest address accepted.
pub const MAX_ADDRESS_BYTES: usize = 300;

impl Address {
    /// Parses and normalises an address, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_ADDRESS_BYTES {
            return Err(format!("an address is at most {MAX_ADDRESS_BYTES} bytes"));
        }
        let Some((scheme, rest)) = text.split_once(':') else {
            return Err(
                "an address starts with `lv:`, `eidas:`, `company:` or `member:`".to_owned(),
            );
        };
        match scheme {
            "lv" => normalize_personal_code(rest).map(Address::Person),
            "eidas" => EidasId::parse(rest).map(|id| Address::Eidas(id.to_string())),
            "company" => {
                if rest.len() == 11 && rest.bytes().all(|b| b.is_ascii_digit()) {
                    Ok(Address::Company(rest.to_owned()))
                } else {
                    Err(
                        "a company's address is `company:` and its 11-digit registration number"
                            .to_owned(),
                    )
                }
            }
            "member" => {
                let member = Member::parse(rest).map_err(|e| e.to_string())?;
                if member.subsystem.is_empty() {
                    return Err(
                        "a member address names a subsystem: `member:CLASS/CODE/SUBSYSTEM`"
                            .to_owned(),
                    );
                }
                Ok(Address::Member(member.to_string()))
            }
            _ => Err(format!(
                "unknown address scheme `{}`: use `lv:`, `eidas:`, `company:` or `member:`",
                onestop_platform::status::echo(scheme)
            )),
        }
    }

    /// The address of a person subject of a platform token (`lv:...` or `eidas:...`); staff
    /// have no mailbox of their own here.
    pub fn of_subject(subject: &str) -> Option<Self> {
        let address = Self::parse(subject).ok()?;
        address.is_person().then_some(address)
    }

    /// The mailbox of a member system: its subsystem's own, or for a company's system (class
    /// `COM`) the company's.
    pub fn of_member(member: &Member) -> Self {
        Address::Member(member.to_string())
    }

    /// Whether a person owns it.
    pub fn is_person(&self) -> bool {
        matches!(self, Address::Person(_) | Address::Eidas(_))
    }

    /// Whether the mailbox is active by law, without activation (companies, institutions).
    pub fn active_by_law(&self) -> bool {
        !self.is_person()
    }

    /// Whether `member` may act for this mailbox: its own subsystem, or a company's own system
    /// (`COM/<registration number>/...`) for the company.
    pub fn belongs_to_member(&self, member: &Member) -> bool {
        match self {
            Address::Member(text) => *text == member.to_string(),
            Address::Company(number) => member.class == "COM" && member.code == *number,
            _ => false,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Person(code) => write!(f, "lv:{code}"),
            Address::Eidas(id) => write!(f, "eidas:{id}"),
            Address::Company(number) => write!(f, "company:{number}"),
            Address::Member(member) => write!(f, "member:{member}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_normalised_and_checked() {
        assert_eq!(
            Address::parse("lv:32123456789").map(|a| a.to_string()),
            Ok("lv:321234-56789".to_owned())
        );
        assert!(Address::parse("lv:010190-12346").is_err(), "check digit");
        assert!(Address::parse("company:4000301234").is_err());
        assert!(Address::parse("member:GOV/VSAA").is_err(), "no subsystem");
        assert!(Address::parse("x:1").is_err());
        assert!(Address::parse("010190-12347").is_err());
        assert_eq!(
            Address::parse("member:GOV/VSAA/pensions").map(|a| a.to_string()),
            Ok("member:GOV/VSAA/pensions".to_owned())
        );
        let company =
            Address::parse("company:40003012345").unwrap_or(Address::Company(String::new()));
        let member = Member::parse("COM/40003012345/erp").unwrap_or_else(|_| unreachable!());
        assert!(company.belongs_to_member(&member));
    }
}
