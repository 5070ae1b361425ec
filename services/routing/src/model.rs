//! The records of routing: applications with their provenance and status, deliveries, and
//! service cases.

use onestop_platform::person::Level;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// How an application reached the platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// The resident themself.
    Online,
    /// Paper intake at a centre.
    Centre,
    /// A clerk under the resident's mandate.
    AuthorisedEService,
    /// A member system on its own.
    System,
}

/// A person behind an application and how surely they were identified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// `lv:...`, `eidas:...` or `staff:...`.
    pub subject: String,
    /// How surely.
    pub level: Level,
    /// The login provider, or `desk`.
    pub provider_id: String,
    /// The country of the eID means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// When they authenticated, seconds since the epoch.
    pub auth_time: i64,
}

/// The mandate an authorised e-service was filed under.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MandateReference {
    /// Its id.
    pub mandate_id: String,
    /// SHA-256 of the signed authorisation.
    pub authorisation_sha256: String,
}

/// Where an application came from and who stands behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// How.
    pub channel: Channel,
    /// The submitting member system.
    pub submitted_by: String,
    /// The centre.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub centre_id: Option<String>,
    /// The clerk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clerk: Option<Identity>,
    /// The resident it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applicant: Option<Identity>,
    /// The mandate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mandate: Option<MandateReference>,
    /// SHA-256 of the scanned paper original.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paper_original_sha256: Option<String>,
    /// The identity document checked at the desk (`passport`, `id_card`, `residence_permit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_document: Option<String>,
}

/// Where an application stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// Waiting in the destination's inbox.
    Submitted,
    /// The institution has it.
    Received,
    /// Being worked on.
    InProgress,
    /// Waiting for the applicant.
    MoreInformationNeeded,
    /// Decided.
    Decided,
    /// Closed.
    Closed,
}

impl Status {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Submitted => "submitted",
            Status::Received => "received",
            Status::InProgress => "in_progress",
            Status::MoreInformationNeeded => "more_information_needed",
            Status::Decided => "decided",
            Status::Closed => "closed",
        }
    }

    /// The status of a stored name.
    pub fn parse(name: &str) -> Option<Self> {
        [
            Status::Submitted,
            Status::Received,
            Status::InProgress,
            Status::MoreInformationNeeded,
            Status::Decided,
            Status::Closed,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

    /// Whether an application may go from `self` to `next`: forward only, except that work and
    /// waiting for the applicant may alternate.
    pub fn may_become(self, next: Status) -> bool {
        use Status::*;
        match (self, next) {
            (InProgress, MoreInformationNeeded) | (MoreInformationNeeded, InProgress) => true,
            (Closed, _) | (_, Submitted) => false,
            (from, to) => to > from,
        }
    }
}

/// A decision document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Its title.
    pub title: String,
    /// Its media type.
    pub media_type: String,
    /// The document.
    pub content: Vec<u8>,
    /// SHA-256 of the content, hex.
    pub content_sha256: String,
}

/// One step of an application's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusChange {
    /// The status reached.
    pub status: Status,
    /// Why, or what is needed.
    pub note: String,
    /// When.
    pub time: OffsetDateTime,
    /// The subsystem that made the step (`platform` for the first).
    pub by: String,
    /// The decision document.
    pub decision: Option<Decision>,
}

/// An application as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Application {
    /// Its id (a UUIDv7: ordered by acceptance).
    pub id: String,
    /// The catalogue service.
    pub service_id: String,
    /// The e-form.
    pub form_id: String,
    /// Its version.
    pub form_version: String,
    /// The data, JSON as submitted.
    pub data_json: String,
    /// The municipality code that chose the route.
    pub municipality_code: String,
    /// The destination subsystem.
    pub destination: String,
    /// Who stands behind it.
    pub provenance: Provenance,
    /// SHA-256 of the canonical data.
    pub content_sha256: String,
    /// When it was accepted.
    pub accept_time: OffsetDateTime,
    /// The current status.
    pub status: Status,
    /// Every step, oldest first (filled when read whole).
    pub history: Vec<StatusChange>,
    /// The W3C trace context of the call that submitted it, which the spans of its later
    /// deliveries link to; none when it came untraced.
    pub trace_context: Option<String>,
}

impl Application {
    /// Its name in the contract.
    pub fn name(&self) -> String {
        format!("applications/{}", self.id)
    }
}

/// One delivery of an application, leased to a consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Its id.
    pub id: String,
    /// The attempt, from 1.
    pub attempt: u32,
    /// When the lease ends.
    pub lease_until: OffsetDateTime,
    /// The application.
    pub application: Application,
}

/// A delivery parked after too many attempts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parked {
    /// Its id.
    pub id: String,
    /// The application's id.
    pub application_id: String,
    /// Attempts made.
    pub attempts: u32,
    /// When it was parked.
    pub park_time: OffsetDateTime,
}

/// How a client contacted a centre.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContactChannel {
    /// At the desk.
    InPerson,
    /// Phone.
    Phone,
    /// E-mail.
    Email,
    /// Remote video.
    RemoteVideo,
}

/// What a service case was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaseKind {
    /// An application taken.
    Application,
    /// A consultation.
    Consultation,
    /// Help with an e-service.
    EServiceHelp,
    /// An authorised e-service.
    AuthorisedEService,
}

macro_rules! names {
    ($t:ty { $($variant:ident = $name:literal),* $(,)? }) => {
        impl $t {
            /// The stored name.
            pub fn as_str(self) -> &'static str {
                match self { $(<$t>::$variant => $name),* }
            }
            /// The value of a stored name.
            pub fn parse(name: &str) -> Option<Self> {
                match name { $($name => Some(<$t>::$variant),)* _ => None }
            }
        }
    };
}

names!(ContactChannel {
    InPerson = "in_person",
    Phone = "phone",
    Email = "email",
    RemoteVideo = "remote_video",
});
names!(CaseKind {
    Application = "application",
    Consultation = "consultation",
    EServiceHelp = "e_service_help",
    AuthorisedEService = "authorised_e_service",
});

/// One contact at a centre.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceCase {
    /// Its id.
    pub id: String,
    /// The centre.
    pub centre_id: String,
    /// The clerk's subject.
    pub clerk: String,
    /// The catalogue service (empty for a topic).
    pub service_id: String,
    /// The owning institution of the service (empty for a topic).
    pub institution: String,
    /// The consultation topic.
    pub topic: String,
    /// How the client made contact.
    pub channel: ContactChannel,
    /// What it was.
    pub kind: CaseKind,
    /// When it started.
    pub start_time: OffsetDateTime,
    /// When it ended.
    pub end_time: OffsetDateTime,
    /// The application it produced.
    pub application_id: Option<String>,
}

/// A statistics dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dimension {
    /// The centre.
    Centre,
    /// The institution.
    Institution,
    /// The service or topic.
    Service,
    /// The contact channel.
    Channel,
    /// The case kind.
    Kind,
}

impl Dimension {
    /// The column it groups by.
    pub fn column(self) -> &'static str {
        match self {
            Dimension::Centre => "centre_id",
            Dimension::Institution => "institution",
            Dimension::Service => "service_key",
            Dimension::Channel => "channel",
            Dimension::Kind => "kind",
        }
    }
}

/// One group of service cases.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatisticsRow {
    /// Grouped values by dimension (absent when not grouped).
    pub centre_id: Option<String>,
    /// The institution.
    pub institution: Option<String>,
    /// The service id or `topic:<topic>`.
    pub service: Option<String>,
    /// The channel.
    pub channel: Option<ContactChannel>,
    /// The kind.
    pub kind: Option<CaseKind>,
    /// Cases.
    pub cases: u64,
    /// Their durations added up, seconds.
    pub total_duration_seconds: u64,
}

#[cfg(test)]
mod tests {
    use super::Status::*;

    #[test]
    fn status_goes_forward_only() {
        assert!(Submitted.may_become(Received));
        assert!(Received.may_become(Decided));
        assert!(InProgress.may_become(MoreInformationNeeded));
        assert!(MoreInformationNeeded.may_become(InProgress));
        assert!(Decided.may_become(Closed));
        assert!(!Decided.may_become(InProgress));
        assert!(!Closed.may_become(Closed));
        assert!(!Received.may_become(Received));
        assert!(!Received.may_become(Submitted));
    }
}
