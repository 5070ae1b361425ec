//! The e-address's records: mailboxes, messages and their deliveries, as the domain sees them.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::evidence::Event;

/// A mailbox's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mailbox {
    /// Its address.
    pub address: String,
    /// Whether messages are placed in it.
    pub active: bool,
    /// Where notices go; empty for none.
    pub notice_email: String,
    /// When it was activated.
    pub activate_time: Option<OffsetDateTime>,
    /// People who may read it.
    pub delegates: Vec<String>,
}

/// An attachment of a message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The file's name.
    pub file_name: String,
    /// Its media type.
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its content's SHA-256, lower-case hex.
    pub sha256: String,
}

/// A message, whatever the number of its recipients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Its id.
    pub id: String,
    /// Its thread (the id of the thread's first message).
    pub thread_id: String,
    /// The sender's address.
    pub sender: String,
    /// The subject.
    pub subject: String,
    /// The body.
    pub body: String,
    /// The document type.
    pub document_type: String,
    /// The legal delivery rule that applied when it was sent (`working-days:2`, `opened:30`).
    pub delivery_rule: String,
    /// Whether delegates may not see it.
    pub hidden_from_delegates: bool,
    /// The digest of its content (see [`content_sha256`]).
    pub content_sha256: String,
    /// Its attachments.
    pub attachments: Vec<Attachment>,
    /// When it was accepted.
    pub accept_time: OffsetDateTime,
    /// How many recipients it has.
    pub recipient_count: u32,
    /// The W3C trace context of the call that sent it, which the spans of the work it causes
    /// later (notices, deemed delivery) link to; none when it came untraced.
    pub trace_context: Option<String>,
}

impl Message {
    /// Its resource name.
    pub fn name(&self) -> String {
        format!("messages/{}", self.id)
    }
}

/// Where a message stands for one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryState {
    /// Accepted, not yet placed.
    Accepted,
    /// In the mailbox, unopened.
    Placed,
    /// Opened.
    Retrieved,
    /// Deemed delivered by its rule, unopened.
    DeemedDelivered,
    /// Not delivered.
    NotDelivered,
}

impl DeliveryState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Accepted => "accepted",
            DeliveryState::Placed => "placed",
            DeliveryState::Retrieved => "retrieved",
            DeliveryState::DeemedDelivered => "deemed_delivered",
            DeliveryState::NotDelivered => "not_delivered",
        }
    }

    /// The state of a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "accepted" => DeliveryState::Accepted,
            "placed" => DeliveryState::Placed,
            "retrieved" => DeliveryState::Retrieved,
            "deemed_delivered" => DeliveryState::DeemedDelivered,
            "not_delivered" => DeliveryState::NotDelivered,
            _ => return None,
        })
    }
}

/// A message for one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The message.
    pub message_id: String,
    /// The recipient's address.
    pub recipient: String,
    /// Where it stands.
    pub state: DeliveryState,
    /// When it was placed in the mailbox.
    pub place_time: Option<OffsetDateTime>,
    /// When it was first opened.
    pub retrieve_time: Option<OffsetDateTime>,
}

/// An evidence event waiting to be signed into the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingEvidence {
    /// Its id (time-ordered).
    pub id: String,
    /// The message.
    pub message_id: String,
    /// The recipient.
    pub recipient: String,
    /// What happened.
    pub event: Event,
    /// Why, for events that have a reason.
    pub reason: String,
    /// When it happened.
    pub time: OffsetDateTime,
}

/// The digest of a message's content, which every evidence record of it carries: SHA-256 over
/// the subject, a zero byte and the body (UTF-8), lower-case hex. Attachments are digested one
/// by one in the records.
pub fn content_sha256(subject: &str, body: &str) -> String {
    let mut bytes = Vec::with_capacity(subject.len() + 1 + body.len());
    bytes.extend_from_slice(subject.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(body.as_bytes());
    hex::encode(crate::evidence::sha256(&bytes))
}

/// A new time-ordered id.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}
