//! The e-address's use cases and who may do what: mailboxes, sending, reading, evidence, and
//! the background work (placing accepted messages, signing evidence into the log, deadlines,
//! notices, removing unused uploads). Plain Rust over the store; the api layer decodes and
//! encodes the contract.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use onestop_platform::caller::Caller;
use onestop_platform::identity::{Member, Principal, SpiffeId};
use onestop_platform::paging::{PageTokens, Query};
use onestop_platform::requests::{Fingerprint, Request, Requests};
use prometheus_client::metrics::gauge::Gauge;
use time::OffsetDateTime;
use tokio::sync::{Mutex, Notify};
use tracing::Instrument;

use crate::address::Address;
use crate::blobs::Blobs;
use crate::calendar::{Calendar, DeliveryRule};
use crate::error::EaddressError;
use crate::evidence::{self, EvidenceKey, Hash};
use crate::model::{Attachment, Delivery, Mailbox, Message, content_sha256, new_id};
use crate::notices::{self, Mailer, SendError};
use crate::store::{Accepted, Due, LogEntry, NewMessage, Placement, Store, StoredTreeHead};

/// Recipients of one message, at most.
pub const MAX_RECIPIENTS: usize = 10_000;
/// Addresses of one lookup, at most.
pub const MAX_LOOKUP: usize = 1_000;
/// Attachments of one message, at most.
pub const MAX_ATTACHMENTS: usize = 50;
/// A subject's characters, at most.
pub const MAX_SUBJECT_CHARS: usize = 500;
/// A body's characters, at most.
pub const MAX_BODY_CHARS: usize = 100_000;
/// Delegates of one mailbox, at most.
pub const MAX_DELEGATES: usize = 20;
/// The mandate scope entry that lets a clerk read and answer a resident's e-address.
pub const MANDATE_SCOPE: &str = "e-address";
/// How long uploaded content that no message names is kept.
pub const UNUSED_UPLOAD_TTL: time::Duration = time::Duration::days(1);
/// Records in one evidence bundle, at most: a bundle must fit in one answer (about 1 KiB a
/// record with its proof).
pub const MAX_BUNDLE_RECORDS: usize = 2_000;
/// Rows one background pass handles, at most.
const BATCH: i64 = 500;

/// Who calls, as the e-address sees it.
#[derive(Clone, Debug)]
pub enum Who {
    /// A person through a front end (their own token), or a clerk acting for them under a
    /// mandate.
    Person {
        /// Their mailbox.
        address: Address,
        /// The clerk, under a mandate.
        clerk: Option<String>,
        /// What the mandate covers.
        mandate: Vec<String>,
    },
    /// A member system without a person.
    Member(Member),
    /// A platform component (calling directly, over internal mTLS).
    Component(SpiffeId),
    /// Staff acting as themselves: they have no mailbox here.
    Staff,
}

impl Who {
    /// The caller of a request.
    pub fn of(caller: &Caller) -> Self {
        if let Some(person) = &caller.person {
            return match Address::of_subject(&person.sub) {
                Some(address) => Who::Person {
                    address,
                    clerk: person.act.as_ref().map(|actor| actor.sub.clone()),
                    mandate: person
                        .mandate
                        .as_ref()
                        .map(|m| m.services.clone())
                        .unwrap_or_default(),
                },
                None => Who::Staff,
            };
        }
        match (&caller.identity.principal, caller.via_gateway) {
            (Principal::Member(member), true) => Who::Member(member.clone()),
            (Principal::Platform(_), false) => Who::Component((*caller.identity).clone()),
            _ => Who::Staff,
        }
    }
}

/// How a reader may see a mailbox.
#[derive(Clone, Debug)]
pub struct Reader {
    /// The mailbox.
    pub mailbox: Address,
    /// Whether messages hidden from delegates are shown.
    pub include_hidden: bool,
}

/// Delivery rules by document type.
#[derive(Clone, Debug)]
pub struct Rules {
    /// For types not listed.
    pub default: DeliveryRule,
    /// By document type.
    pub by_type: HashMap<String, DeliveryRule>,
}

impl Rules {
    fn of(&self, document_type: &str) -> &DeliveryRule {
        self.by_type.get(document_type).unwrap_or(&self.default)
    }
}

/// What to send.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// The stated sender (empty: the caller's own).
    pub sender: String,
    /// Recipients.
    pub recipients: Vec<String>,
    /// Subject.
    pub subject: String,
    /// Body.
    pub body: String,
    /// Document type.
    pub document_type: String,
    /// Thread, or empty.
    pub thread_id: String,
    /// Attachments: (sha256, file name, media type).
    pub attachments: Vec<(String, String, String)>,
    /// Hidden from delegates.
    pub hidden_from_delegates: bool,
}

/// The evidence signing key, read from its directory: the newest key file signs. When the
/// directory holds none (a key being provisioned, a secret not mounted), signing waits and
/// evidence stays pending; it is read again on each pass.
#[derive(Debug)]
pub struct Signer {
    dir: PathBuf,
    current: std::sync::Mutex<Option<Arc<EvidenceKey>>>,
}

impl Signer {
    /// Keys in `dir`; with `generate`, a first key is made there when it has none.
    pub fn open(dir: &Path, generate: bool) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let signer = Self {
            dir: dir.to_owned(),
            current: std::sync::Mutex::new(None),
        };
        if generate && signer.newest().is_none() {
            let kid = format!("e{}", OffsetDateTime::now_utc().unix_timestamp());
            let (_, der) = EvidenceKey::generate(&kid)?;
            write_private(&dir.join(format!("{kid}.p8")), &der)?;
        }
        Ok(signer)
    }

    fn newest(&self) -> Option<EvidenceKey> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .ok()?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.ends_with(".p8"))
            .collect();
        names.sort();
        let name = names.pop()?;
        let kid = name.trim_end_matches(".p8");
        let der = std::fs::read(self.dir.join(&name)).ok()?;
        match EvidenceKey::from_pkcs8(kid, &der) {
            Ok(key) => Some(key),
            Err(error) => {
                tracing::error!(%error, file = %name, "an evidence key file does not load");
                None
            }
        }
    }

    /// The key to sign with now, if there is one.
    pub fn key(&self) -> Option<Arc<EvidenceKey>> {
        let newest = self.newest().map(Arc::new);
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match (&newest, current.as_ref()) {
            (Some(new), Some(old)) if new.kid() == old.kid() => {}
            _ => current.clone_from(&newest),
        }
        current.clone()
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Figures the background work keeps current.
#[derive(Clone, Debug, Default)]
pub struct Gauges {
    /// Evidence events waiting to be signed.
    pub evidence_pending: Gauge,
    /// Notices not yet sent.
    pub notices_unsent: Gauge,
    /// Placed messages not opened, to be deemed delivered at their deadline (counted from the
    /// database: the same on every replica).
    pub awaiting_deemed_delivery: Gauge,
}

/// What wakes the background work early.
#[derive(Debug, Default)]
pub struct Wake {
    /// New accepted deliveries.
    pub dispatch: Notify,
    /// New evidence events.
    pub evidence: Notify,
    /// New notices.
    pub notices: Notify,
}

/// The e-address.
#[derive(Debug)]
pub struct Eaddress {
    store: Store,
    requests: Requests,
    blobs: Blobs,
    calendar: Calendar,
    rules: Rules,
    max_attachment_bytes: u64,
    trusted_senders: Vec<SpiffeId>,
    signer: Signer,
    leaves: Mutex<Vec<Hash>>,
    page_tokens: PageTokens,
    mailer: Option<(Mailer, std::time::Duration)>,
    inboxes: Arc<onestop_platform::inbox::Inboxes>,
    incoming_lease: std::time::Duration,
    /// Wake-ups for the background work.
    pub wake: Wake,
    /// Figures for metrics.
    pub gauges: Gauges,
}

/// The parts the e-address is made of.
#[derive(Debug)]
pub struct Parts {
    /// The store.
    pub store: Store,
    /// The request records.
    pub requests: Requests,
    /// Attachment content.
    pub blobs: Blobs,
    /// Working days.
    pub calendar: Calendar,
    /// Delivery rules.
    pub rules: Rules,
    /// The largest attachment.
    pub max_attachment_bytes: u64,
    /// Components that may send in any member's name.
    pub trusted_senders: Vec<SpiffeId>,
    /// The evidence key.
    pub signer: Signer,
    /// Notices by e-mail, with the first retry's delay.
    pub mailer: Option<(Mailer, std::time::Duration)>,
    /// How long an incoming stream holds a message unacknowledged before it is delivered
    /// again.
    pub incoming_lease: std::time::Duration,
}

fn invalid(field: &str, message: impl Into<String>) -> EaddressError {
    EaddressError::invalid(field, message)
}

fn check_sha256(field: &str, text: &str) -> Result<(), EaddressError> {
    if text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(invalid(field, "a SHA-256 is 64 lower-case hex digits"))
    }
}

fn check_token(field: &str, text: &str, max: usize) -> Result<(), EaddressError> {
    if text.is_empty()
        || text.len() > max
        || !text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(
            field,
            format!("1-{max} lower-case letters, digits and `-`"),
        ));
    }
    Ok(())
}

/// A message id from its resource name.
pub fn message_id(name: &str) -> Result<&str, EaddressError> {
    name.strip_prefix("messages/")
        .filter(|id| {
            !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
        })
        .ok_or_else(|| invalid("name", "a message's name is `messages/{message_id}`"))
}

fn hidden_from_delegates() -> EaddressError {
    EaddressError::denied(
        "HIDDEN_FROM_DELEGATES",
        "the sender made this message visible to the mailbox's owner only",
    )
}

fn not_your_mailbox() -> EaddressError {
    EaddressError::denied(
        "NOT_YOUR_MAILBOX",
        "the caller may not read this mailbox: only its owner, a delegate the owner named, or a clerk under the owner's mandate",
    )
}

impl Eaddress {
    /// The e-address over its parts; the signing key's public part is published.
    pub async fn new(parts: Parts) -> Result<Self, EaddressError> {
        let page_tokens = PageTokens::open(parts.store.database()).await?;
        let eaddress = Self {
            store: parts.store,
            requests: parts.requests,
            blobs: parts.blobs,
            calendar: parts.calendar,
            rules: parts.rules,
            max_attachment_bytes: parts.max_attachment_bytes,
            trusted_senders: parts.trusted_senders,
            signer: parts.signer,
            leaves: Mutex::new(Vec::new()),
            page_tokens,
            mailer: parts.mailer,
            inboxes: Arc::default(),
            incoming_lease: parts.incoming_lease,
            wake: Wake::default(),
            gauges: Gauges::default(),
        };
        if let Some(key) = eaddress.signer.key() {
            eaddress
                .store
                .publish_key(&key.public(), onestop_platform::clock::now())
                .await?;
        }
        Ok(eaddress)
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The request records.
    pub fn requests(&self) -> &Requests {
        &self.requests
    }

    /// The attachment store.
    pub fn blobs(&self) -> &Blobs {
        &self.blobs
    }

    /// The wake-ups of the incoming streams.
    pub fn inboxes(&self) -> &Arc<onestop_platform::inbox::Inboxes> {
        &self.inboxes
    }

    /// How long an incoming stream holds a message.
    pub fn incoming_lease(&self) -> std::time::Duration {
        self.incoming_lease
    }

    /// The mailbox whose incoming stream `who` may open: its own member or company mailbox.
    pub fn incoming_mailbox(&self, who: &Who, mailbox: &str) -> Result<String, EaddressError> {
        match who {
            Who::Member(_) => Ok(self.own_mailbox(who, mailbox)?.to_string()),
            _ => Err(EaddressError::denied(
                "SYSTEMS_ONLY",
                "an incoming stream is for an institution's or a company's own system",
            )),
        }
    }

    /// The largest attachment accepted.
    pub fn max_attachment_bytes(&self) -> u64 {
        self.max_attachment_bytes
    }

    // ---- Mailboxes

    /// Which addresses have an active e-address.
    pub async fn lookup(
        &self,
        who: &Who,
        addresses: &[String],
    ) -> Result<Vec<(String, bool)>, EaddressError> {
        // Whether someone has an e-address is for the systems that write to them, not for
        // other people to find out.
        if !matches!(who, Who::Member(_) | Who::Component(_)) {
            return Err(EaddressError::denied(
                "SENDERS_ONLY",
                "looking up mailboxes is for senders' systems",
            ));
        }
        if addresses.is_empty() || addresses.len() > MAX_LOOKUP {
            return Err(invalid("addresses", format!("1-{MAX_LOOKUP} addresses")));
        }
        let parsed = addresses
            .iter()
            .enumerate()
            .map(|(i, text)| Address::parse(text).map_err(|e| (format!("addresses[{i}]"), e)))
            .collect::<Vec<_>>();
        let violations: Vec<(String, String)> =
            parsed.iter().filter_map(|p| p.clone().err()).collect();
        if !violations.is_empty() {
            return Err(EaddressError::Invalid(violations));
        }
        let parsed: Vec<Address> = parsed.into_iter().filter_map(Result::ok).collect();
        let persons: Vec<String> = parsed
            .iter()
            .filter(|a| a.is_person())
            .map(ToString::to_string)
            .collect();
        let active = self.store.active_mailboxes(&persons).await?;
        Ok(parsed
            .iter()
            .map(|address| {
                let text = address.to_string();
                let on = address.active_by_law() || active.get(&text).copied().unwrap_or(false);
                (text, on)
            })
            .collect())
    }

    /// The caller's own mailbox (a person's, or a member's or its company's by address).
    pub async fn mailbox(&self, who: &Who, address: &str) -> Result<Mailbox, EaddressError> {
        let own = self.own_mailbox(who, address)?;
        let text = own.to_string();
        Ok(match self.store.mailbox(&text).await? {
            Some(mut mailbox) => {
                mailbox.active |= own.active_by_law();
                mailbox
            }
            None => Mailbox {
                active: own.active_by_law(),
                address: text,
                notice_email: String::new(),
                activate_time: None,
                delegates: Vec::new(),
            },
        })
    }

    fn own_mailbox(&self, who: &Who, address: &str) -> Result<Address, EaddressError> {
        match who {
            Who::Person {
                address: own,
                clerk: None,
                ..
            } if address.is_empty() || address == own.to_string() => Ok(own.clone()),
            Who::Member(member) => {
                if address.is_empty() {
                    return Ok(Address::of_member(member));
                }
                let wanted = Address::parse(address).map_err(|e| invalid("address", e))?;
                if wanted.belongs_to_member(member) {
                    Ok(wanted)
                } else {
                    Err(not_your_mailbox())
                }
            }
            _ => Err(not_your_mailbox()),
        }
    }

    fn person_only(who: &Who) -> Result<Address, EaddressError> {
        match who {
            Who::Person {
                address,
                clerk: None,
                ..
            } => Ok(address.clone()),
            _ => Err(EaddressError::denied(
                "OWNER_ONLY",
                "only the person themself, logged in, changes their mailbox",
            )),
        }
    }

    /// The calling person activates their mailbox.
    pub async fn activate(&self, who: &Who, notice_email: &str) -> Result<Mailbox, EaddressError> {
        let own = Self::person_only(who)?;
        check_email(notice_email)?;
        self.store
            .activate(
                &own.to_string(),
                notice_email,
                onestop_platform::clock::now(),
            )
            .await?;
        self.mailbox(who, "").await
    }

    /// The calling person changes their notice address and delegates.
    pub async fn update_mailbox(
        &self,
        who: &Who,
        notice_email: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<Mailbox, EaddressError> {
        let own = Self::person_only(who)?;
        check_email(notice_email)?;
        let people = |field: &str, list: &[String]| {
            list.iter()
                .enumerate()
                .map(|(i, text)| match Address::parse(text) {
                    Ok(a) if a.is_person() && a != own => Ok(a.to_string()),
                    Ok(_) => Err(invalid(
                        &format!("{field}[{i}]"),
                        "a delegate is another person (`lv:` or `eidas:`)",
                    )),
                    Err(e) => Err(invalid(&format!("{field}[{i}]"), e)),
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let add = people("add_delegates", add)?;
        let remove = people("remove_delegates", remove)?;
        let current = self.mailbox(who, "").await?;
        let after: HashSet<&String> = current
            .delegates
            .iter()
            .chain(add.iter())
            .filter(|d| !remove.contains(d))
            .collect();
        if after.len() > MAX_DELEGATES {
            return Err(invalid(
                "add_delegates",
                format!("a mailbox has at most {MAX_DELEGATES} delegates"),
            ));
        }
        self.store
            .update_mailbox(
                &own.to_string(),
                notice_email,
                &add,
                &remove,
                onestop_platform::clock::now(),
            )
            .await?;
        self.mailbox(who, "").await
    }

    /// How `who` may read `mailbox` (empty: their own).
    pub async fn reader(&self, who: &Who, mailbox: &str) -> Result<Reader, EaddressError> {
        let wanted = if mailbox.is_empty() {
            None
        } else {
            Some(Address::parse(mailbox).map_err(|e| invalid("mailbox", e))?)
        };
        match who {
            Who::Person {
                address,
                clerk: None,
                ..
            } => match wanted {
                None => Ok(Reader {
                    mailbox: address.clone(),
                    include_hidden: true,
                }),
                Some(w) if w == *address => Ok(Reader {
                    mailbox: w,
                    include_hidden: true,
                }),
                Some(w) => {
                    if self
                        .store
                        .is_delegate(&w.to_string(), &address.to_string())
                        .await?
                    {
                        Ok(Reader {
                            mailbox: w,
                            include_hidden: false,
                        })
                    } else {
                        Err(not_your_mailbox())
                    }
                }
            },
            Who::Person {
                address,
                clerk: Some(_),
                mandate,
            } => {
                if wanted.as_ref().is_some_and(|w| w != address) {
                    return Err(not_your_mailbox());
                }
                if !mandate.iter().any(|s| s == MANDATE_SCOPE) {
                    return Err(EaddressError::denied(
                        "MANDATE_DOES_NOT_COVER",
                        format!(
                            "the mandate does not cover the resident's e-address (`{MANDATE_SCOPE}`)"
                        ),
                    ));
                }
                Ok(Reader {
                    mailbox: address.clone(),
                    include_hidden: true,
                })
            }
            Who::Member(member) => {
                let own = match wanted {
                    None => Address::of_member(member),
                    Some(w) if w.belongs_to_member(member) => w,
                    Some(_) => return Err(not_your_mailbox()),
                };
                Ok(Reader {
                    mailbox: own,
                    include_hidden: true,
                })
            }
            _ => Err(not_your_mailbox()),
        }
    }

    // ---- Sending

    /// Sends a message: checked whole, stored with a delivery and `accepted` evidence per
    /// recipient in one transaction; placing happens after the answer.
    pub async fn send(
        &self,
        who: &Who,
        request_key: &str,
        request_id: &str,
        fingerprint: Fingerprint,
        out: Outgoing,
    ) -> Result<Message, EaddressError> {
        let request = Request::new(&request_key, request_id, "SendMessage", fingerprint)?;
        if let Some(id) = self.requests.earlier(&request).await? {
            return self.store.message(&id).await?.ok_or_else(|| {
                EaddressError::Internal(format!("recorded message {id} is missing"))
            });
        }
        let sender = self.sender(who, &out.sender)?;
        let mut violations = Vec::new();
        let subject_chars = out.subject.chars().count();
        if subject_chars == 0 || subject_chars > MAX_SUBJECT_CHARS {
            violations.push((
                "subject".to_owned(),
                format!("1-{MAX_SUBJECT_CHARS} characters"),
            ));
        }
        if out.body.chars().count() > MAX_BODY_CHARS {
            violations.push((
                "body".to_owned(),
                format!("at most {MAX_BODY_CHARS} characters"),
            ));
        }
        for (field, value) in [("subject", &out.subject), ("body", &out.body)] {
            if let Err(why) = onestop_platform::text::check(value) {
                violations.push((field.to_owned(), why.to_owned()));
            }
        }
        if let Err(EaddressError::Invalid(mut v)) =
            check_token("document_type", &out.document_type, 64)
        {
            violations.append(&mut v);
        }
        if out.recipients.len() > MAX_RECIPIENTS {
            violations.push((
                "recipients".to_owned(),
                format!("at most {MAX_RECIPIENTS} recipients"),
            ));
        }
        let mut recipients = Vec::with_capacity(out.recipients.len());
        let mut seen = HashSet::new();
        for (i, text) in out.recipients.iter().enumerate() {
            match Address::parse(text) {
                Ok(address) => {
                    let text = address.to_string();
                    if !seen.insert(text.clone()) {
                        violations.push((format!("recipients[{i}]"), "named twice".to_owned()));
                    }
                    recipients.push(text);
                }
                Err(e) => violations.push((format!("recipients[{i}]"), e)),
            }
            if violations.len() >= 50 {
                break;
            }
        }
        if out.attachments.len() > MAX_ATTACHMENTS {
            violations.push((
                "attachments".to_owned(),
                format!("at most {MAX_ATTACHMENTS} attachments"),
            ));
        }
        for (i, (sha, name, media)) in out.attachments.iter().enumerate() {
            if let Err(EaddressError::Invalid(mut v)) =
                check_sha256(&format!("attachments[{i}].sha256"), sha)
            {
                violations.append(&mut v);
            }
            // A file name is one line: no control character at all, tab and line breaks
            // included (stricter than [`onestop_platform::text::check`]).
            if name.is_empty()
                || name.chars().count() > 255
                || name.contains('/')
                || name.chars().any(char::is_control)
            {
                violations.push((
                    format!("attachments[{i}].file_name"),
                    "1-255 characters, no `/` or control characters".to_owned(),
                ));
            }
            if media.len() > 127
                || media
                    .split_once('/')
                    .is_none_or(|(a, b)| a.is_empty() || b.is_empty())
            {
                violations.push((
                    format!("attachments[{i}].media_type"),
                    "a media type such as `application/pdf`".to_owned(),
                ));
            }
        }
        if !violations.is_empty() {
            return Err(EaddressError::Invalid(violations));
        }
        // The thread: a new one, or one the sender takes part in.
        let id = new_id();
        let thread_id = if out.thread_id.is_empty() {
            if sender.is_person() {
                return Err(EaddressError::refused(
                    "REPLIES_ONLY",
                    "a person writes only in a thread an institution started: name its thread_id",
                ));
            }
            id.clone()
        } else {
            let thread = self.store.message(&out.thread_id).await?;
            let known = match thread {
                Some(first) if first.thread_id == out.thread_id => {
                    self.store
                        .is_party(&out.thread_id, &sender.to_string())
                        .await?
                }
                _ => false,
            };
            if !known {
                return Err(EaddressError::refused(
                    "NOT_A_THREAD_PARTY",
                    "the sender takes no part in that thread (or there is no such thread)",
                ));
            }
            out.thread_id.clone()
        };
        if recipients.is_empty() {
            if out.thread_id.is_empty() {
                return Err(invalid("recipients", "name 1-10,000 recipients"));
            }
            recipients = self
                .store
                .parties(&thread_id)
                .await?
                .into_iter()
                .filter(|p| *p != sender.to_string())
                .collect();
        } else if sender.is_person() {
            // A person answers only the thread's own parties.
            let parties: HashSet<String> =
                self.store.parties(&thread_id).await?.into_iter().collect();
            if let Some(stranger) = recipients.iter().find(|r| !parties.contains(*r)) {
                return Err(EaddressError::refused(
                    "NOT_A_THREAD_PARTY",
                    format!("`{stranger}` takes no part in the thread"),
                ));
            }
        }
        // Attachments must have been uploaded.
        let digests: Vec<String> = out.attachments.iter().map(|a| a.0.clone()).collect();
        let sizes = self.store.blob_sizes(&digests).await?;
        let mut attachments = Vec::with_capacity(out.attachments.len());
        for (i, (sha, name, media)) in out.attachments.iter().enumerate() {
            let Some(size) = sizes.get(sha) else {
                return Err(EaddressError::refused(
                    "ATTACHMENT_NOT_UPLOADED",
                    format!(
                        "attachments[{i}]: no uploaded content has SHA-256 {sha}; upload it first"
                    ),
                ));
            };
            attachments.push(Attachment {
                file_name: name.clone(),
                media_type: media.clone(),
                size: *size,
                sha256: sha.clone(),
            });
        }
        let message = Message {
            thread_id,
            sender: sender.to_string(),
            content_sha256: content_sha256(&out.subject, &out.body),
            subject: out.subject,
            body: out.body,
            delivery_rule: self.rules.of(&out.document_type).to_string(),
            document_type: out.document_type,
            hidden_from_delegates: out.hidden_from_delegates,
            attachments,
            accept_time: onestop_platform::clock::now(),
            recipient_count: u32::try_from(recipients.len()).unwrap_or(u32::MAX),
            trace_context: onestop_platform::telemetry::current_traceparent(),
            id,
        };
        self.store
            .insert_message(
                NewMessage {
                    message: &message,
                    recipients: &recipients,
                },
                &request,
            )
            .await?;
        self.wake.dispatch.notify_one();
        self.wake.evidence.notify_one();
        Ok(message)
    }

    fn sender(&self, who: &Who, stated: &str) -> Result<Address, EaddressError> {
        match who {
            Who::Member(member) => {
                if stated.is_empty() {
                    return Ok(Address::of_member(member));
                }
                let address = Address::parse(stated).map_err(|e| invalid("sender", e))?;
                if address.belongs_to_member(member) {
                    Ok(address)
                } else {
                    Err(EaddressError::denied(
                        "NOT_YOUR_ADDRESS",
                        "a member system sends from its own address only",
                    ))
                }
            }
            Who::Component(id) if self.trusted_senders.contains(id) => {
                let address = Address::parse(stated).map_err(|e| invalid("sender", e))?;
                if address.is_person() {
                    return Err(invalid(
                        "sender",
                        "a component sends in an institution's name",
                    ));
                }
                Ok(address)
            }
            Who::Person {
                address,
                clerk,
                mandate,
            } => {
                if !stated.is_empty() && stated != address.to_string() {
                    return Err(EaddressError::denied(
                        "NOT_YOUR_ADDRESS",
                        "a person sends from their own address only",
                    ));
                }
                if clerk.is_some() && !mandate.iter().any(|s| s == MANDATE_SCOPE) {
                    return Err(EaddressError::denied(
                        "MANDATE_DOES_NOT_COVER",
                        format!(
                            "the mandate does not cover the resident's e-address (`{MANDATE_SCOPE}`)"
                        ),
                    ));
                }
                Ok(address.clone())
            }
            _ => Err(EaddressError::denied(
                "NOT_A_SENDER",
                "only member systems and persons send messages",
            )),
        }
    }

    // ---- Reading

    /// A page of a mailbox's messages.
    pub async fn list(
        &self,
        reader: &Reader,
        unread_only: bool,
        thread_id: &str,
        document_type: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<(Message, Delivery)>, String), EaddressError> {
        let mailbox = reader.mailbox.to_string();
        let query = Query::new("ListMessages")
            .with("mailbox", &mailbox)
            .with("unread", if unread_only { "1" } else { "0" })
            .with("thread", thread_id)
            .with("type", document_type)
            .with("hidden", if reader.include_hidden { "1" } else { "0" });
        let after = if page_token.is_empty() {
            None
        } else {
            let key = self
                .page_tokens
                .resume(&query, page_token)
                .map_err(|e| invalid("page_token", e))?
                .unwrap_or_default();
            let (ms, id) = key
                .split_once('/')
                .ok_or_else(|| invalid("page_token", "not a token this list issued"))?;
            Some((
                ms.parse()
                    .map_err(|_| invalid("page_token", "not a token this list issued"))?,
                id.to_owned(),
            ))
        };
        let page = self
            .store
            .list(
                &mailbox,
                unread_only,
                thread_id,
                document_type,
                reader.include_hidden,
                after,
                page_size + 1,
            )
            .await?;
        let more = page.len() > page_size as usize;
        let page: Vec<_> = page.into_iter().take(page_size as usize).collect();
        let next = match page.last() {
            Some((m, _)) if more => self.page_tokens.issue(
                &query,
                &format!("{}/{}", onestop_platform::db::millis(m.accept_time), m.id),
            ),
            _ => String::new(),
        };
        Ok((page, next))
    }

    /// A message as `reader` sees it; the first read by the mailbox's side records `retrieved`.
    pub async fn read(
        &self,
        reader: &Reader,
        id: &str,
    ) -> Result<(Message, Delivery), EaddressError> {
        let (message, delivery) = self.visible(reader, id).await?;
        if delivery.retrieve_time.is_none()
            && self
                .store
                .retrieve(id, &delivery.recipient, onestop_platform::clock::now())
                .await?
        {
            self.wake.evidence.notify_one();
            let delivery = self
                .store
                .delivery(id, &delivery.recipient)
                .await?
                .unwrap_or(delivery);
            return Ok((message, delivery));
        }
        Ok((message, delivery))
    }

    async fn visible(
        &self,
        reader: &Reader,
        id: &str,
    ) -> Result<(Message, Delivery), EaddressError> {
        let not_found =
            || EaddressError::NotFound(format!("no message messages/{id} in this mailbox"));
        let delivery = self
            .store
            .delivery(id, &reader.mailbox.to_string())
            .await?
            .filter(|d| {
                !matches!(
                    d.state,
                    crate::model::DeliveryState::Accepted
                        | crate::model::DeliveryState::NotDelivered
                )
            })
            .ok_or_else(not_found)?;
        let message = self.store.message(id).await?.ok_or_else(not_found)?;
        if message.hidden_from_delegates && !reader.include_hidden {
            return Err(hidden_from_delegates());
        }
        Ok((message, delivery))
    }

    /// An attachment of a message the caller may see (its sender, or a reader of a mailbox it
    /// is in), checked to be one of the message's.
    pub async fn attachment(
        &self,
        who: &Who,
        mailbox: &str,
        id: &str,
        sha256: &str,
    ) -> Result<Attachment, EaddressError> {
        check_sha256("sha256", sha256)?;
        let message = if mailbox.is_empty() && self.is_sender(who, id).await? {
            self.store.message(id).await?
        } else {
            let reader = self.reader(who, mailbox).await?;
            Some(self.visible(&reader, id).await?.0)
        };
        message
            .and_then(|m| m.attachments.into_iter().find(|a| a.sha256 == sha256))
            .ok_or_else(|| {
                EaddressError::NotFound(format!("messages/{id} has no attachment {sha256}"))
            })
    }

    async fn is_sender(&self, who: &Who, id: &str) -> Result<bool, EaddressError> {
        let Some(message) = self.store.message(id).await? else {
            return Ok(false);
        };
        let Ok(sender) = Address::parse(&message.sender) else {
            return Ok(false);
        };
        Ok(match who {
            Who::Member(member) => sender.belongs_to_member(member),
            Who::Person {
                address,
                clerk: None,
                ..
            } => *address == sender,
            Who::Component(id) => self.trusted_senders.contains(id),
            _ => false,
        })
    }

    // ---- Evidence

    /// The published evidence keys.
    pub async fn keys(&self) -> Result<Vec<evidence::PublicKey>, EaddressError> {
        Ok(self.store.keys().await?)
    }

    async fn leaves(&self, size: u64) -> Result<Vec<Hash>, EaddressError> {
        let mut cache = self.leaves.lock().await;
        if (cache.len() as u64) < size {
            let more = self.store.leaf_hashes(cache.len() as u64).await?;
            cache.extend(more);
        }
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if cache.len() < size {
            return Err(EaddressError::Internal(format!(
                "the log has {} records, fewer than {size}",
                cache.len()
            )));
        }
        Ok(cache[..size].to_vec())
    }

    /// Signs a tree head over the whole log as it is now, unless one of that size exists.
    async fn sign_tree_head(&self, size: u64) -> Result<Option<StoredTreeHead>, EaddressError> {
        if let Some(head) = self.store.tree_head(size).await?
            && head.tree_size == size
        {
            return Ok(Some(head));
        }
        let Some(key) = self.signer.key() else {
            return Ok(None);
        };
        let leaves = self.leaves(size).await?;
        let head = evidence::TreeHead {
            tree_size: size,
            root_hash: evidence::root(&leaves),
            time_ms: onestop_platform::db::millis(onestop_platform::clock::now()),
        };
        let bytes = head.encode();
        let stored = StoredTreeHead {
            tree_size: size,
            root_hash: hex::encode(head.root_hash),
            time_ms: head.time_ms,
            signature: crate::store::base64_encode(&key.sign(&bytes)),
            head: crate::store::base64_encode(&bytes),
            key_id: key.kid().to_owned(),
        };
        self.store
            .publish_key(&key.public(), onestop_platform::clock::now())
            .await?;
        self.store.put_tree_head(&stored).await?;
        Ok(self.store.tree_head(size).await?)
    }

    /// A tree head: of exactly `size`, or the newest.
    pub async fn tree_head(&self, size: u64) -> Result<StoredTreeHead, EaddressError> {
        self.store
            .tree_head(size)
            .await?
            .filter(|h| size == 0 || h.tree_size == size)
            .ok_or_else(|| {
                EaddressError::NotFound(format!("no tree head of size {size} was signed"))
            })
    }

    /// A consistency proof between two sizes, the second no larger than the newest tree head.
    pub async fn consistency(&self, first: u64, second: u64) -> Result<Vec<Hash>, EaddressError> {
        let newest = self.tree_head(0).await?.tree_size;
        if first == 0 || first > second || second > newest {
            return Err(invalid(
                "first_tree_size",
                format!("need 1 <= first_tree_size <= second_tree_size <= {newest}"),
            ));
        }
        let leaves = self.leaves(second).await?;
        evidence::consistency_proof(&leaves, first)
            .map_err(|e| EaddressError::Internal(e.to_string()))
    }

    /// A message's evidence bundle for `who`: the sender sees every recipient's records, a
    /// recipient's side only their own. Also how many records still wait for signing.
    pub async fn bundle(
        &self,
        who: &Who,
        id: &str,
        recipient: &str,
    ) -> Result<(evidence::Bundle, u64), EaddressError> {
        let only = if self.is_sender(who, id).await? {
            if recipient.is_empty() {
                None
            } else {
                Some(Address::parse(recipient).map_err(|e| invalid("recipient", e))?)
            }
        } else {
            let reader = self.reader(who, recipient).await?;
            self.store
                .delivery(id, &reader.mailbox.to_string())
                .await?
                .ok_or_else(|| {
                    EaddressError::NotFound(format!("no message messages/{id} for this mailbox"))
                })?;
            let hidden = self
                .store
                .message(id)
                .await?
                .is_some_and(|m| m.hidden_from_delegates);
            if hidden && !reader.include_hidden {
                return Err(hidden_from_delegates());
            }
            Some(reader.mailbox)
        };
        let only = only.map(|a| a.to_string());
        let mut entries: Vec<LogEntry> = self.store.records(id, only.as_deref()).await?;
        if entries.len() > MAX_BUNDLE_RECORDS {
            return Err(EaddressError::TooLarge(format!(
                "the message has {} evidence records, more than one bundle holds ({MAX_BUNDLE_RECORDS}): ask for one recipient's bundle with `recipient`",
                entries.len()
            )));
        }
        let pending = self.store.pending_count(Some(id)).await?;
        let needed = entries.last().map_or(0, |e| e.log_index + 1);
        let mut head = self.store.tree_head(0).await?;
        if head.as_ref().is_none_or(|h| h.tree_size < needed) {
            let size = self.store.log_size().await?;
            head = self.sign_tree_head(size).await?.or(head);
        }
        let Some(head) = head else {
            return Err(EaddressError::Unavailable(
                "no tree head is signed yet: evidence signing is pending; retry later".into(),
            ));
        };
        entries.retain(|e| e.log_index < head.tree_size);
        let tree = evidence::MerkleTree::new(&self.leaves(head.tree_size).await?);
        let keys = self.store.keys().await?;
        let mut used: HashSet<&str> = entries.iter().map(|e| e.key_id.as_str()).collect();
        used.insert(&head.key_id);
        let bundle = evidence::Bundle {
            format: "onestop-evidence-bundle/1".to_owned(),
            message: format!("messages/{id}"),
            entries: entries
                .iter()
                .map(|e| {
                    let proof = tree
                        .inclusion_proof(e.log_index)
                        .map_err(|err| EaddressError::Internal(err.to_string()))?;
                    Ok(evidence::Entry {
                        record: crate::store::base64_encode(e.record.as_bytes()),
                        key_id: e.key_id.clone(),
                        signature: e.signature.clone(),
                        inclusion_proof: proof.iter().map(hex::encode).collect(),
                    })
                })
                .collect::<Result<Vec<_>, EaddressError>>()?,
            tree_head: evidence::SignedTreeHead {
                head: head.head.clone(),
                key_id: head.key_id.clone(),
                signature: head.signature.clone(),
            },
            keys: keys
                .into_iter()
                .filter(|k| used.contains(k.key_id.as_str()))
                .collect(),
        };
        let unsigned = pending
            + self
                .store
                .records(id, only.as_deref())
                .await?
                .len()
                .saturating_sub(bundle.entries.len()) as u64;
        Ok((bundle, unsigned))
    }

    // ---- Background work

    /// Places accepted deliveries (or records that they cannot be); how many were decided.
    pub async fn dispatch(&self, now: OffsetDateTime) -> Result<usize, EaddressError> {
        let accepted = self.store.accepted(BATCH).await?;
        if accepted.is_empty() {
            return Ok(0);
        }
        let persons: Vec<String> = accepted
            .iter()
            .map(|a| a.recipient.clone())
            .filter(|r| r.starts_with("lv:") || r.starts_with("eidas:"))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let active = self.store.active_mailboxes(&persons).await?;
        let mut emails: HashMap<String, Option<String>> = HashMap::new();
        let mut decided: Vec<(Accepted, Placement)> = Vec::with_capacity(accepted.len());
        for delivery in accepted {
            let by_law = !(delivery.recipient.starts_with("lv:")
                || delivery.recipient.starts_with("eidas:"));
            if !by_law && !active.get(&delivery.recipient).copied().unwrap_or(false) {
                decided.push((delivery, Placement::NoActiveMailbox));
                continue;
            }
            let notice_email = match emails.get(&delivery.recipient) {
                Some(known) => known.clone(),
                None => {
                    let email = if self.mailer.is_some() {
                        self.store
                            .mailbox(&delivery.recipient)
                            .await?
                            .map(|m| m.notice_email)
                            .filter(|e| !e.is_empty())
                    } else {
                        None
                    };
                    emails.insert(delivery.recipient.clone(), email.clone());
                    email
                }
            };
            let rule = DeliveryRule::parse(&delivery.delivery_rule)
                .map_err(|e| EaddressError::Internal(format!("stored delivery rule: {e}")))?;
            let deadline = self.calendar.deadline(&rule, now);
            let (due_kind, due_time) = match (deadline.deemed_at, deadline.expires_at) {
                (Some(at), _) => ("deemed", Some(at)),
                (None, Some(at)) => ("expires", Some(at)),
                (None, None) => ("", None),
            };
            decided.push((
                delivery,
                Placement::Placed {
                    due_kind,
                    due_time,
                    notice_email,
                },
            ));
        }
        let n = decided.len();
        self.store.place(&decided, now).await?;
        let systems: HashSet<&str> = decided
            .iter()
            .filter(|(d, p)| {
                matches!(p, Placement::Placed { .. })
                    && !(d.recipient.starts_with("lv:") || d.recipient.starts_with("eidas:"))
            })
            .map(|(d, _)| d.recipient.as_str())
            .collect();
        for mailbox in systems {
            self.inboxes.wake(mailbox);
        }
        self.wake.evidence.notify_one();
        self.wake.notices.notify_one();
        Ok(n)
    }

    /// Signs pending evidence into the log and a tree head over it; how many records were
    /// appended (0 also when no key is available: the events wait).
    pub async fn sign_evidence(&self) -> Result<usize, EaddressError> {
        let Some(key) = self.signer.key() else {
            let pending = self.store.pending_count(None).await?;
            self.gauges
                .evidence_pending
                .set(i64::try_from(pending).unwrap_or(i64::MAX));
            if pending > 0 {
                tracing::warn!(
                    pending,
                    "no evidence key is available: evidence waits to be signed"
                );
            }
            return Ok(0);
        };
        self.store
            .publish_key(&key.public(), onestop_platform::clock::now())
            .await?;
        let mut appended = 0;
        let size = loop {
            let (size, n) = self.store.append_pending(&key, BATCH).await?;
            appended += n;
            if n < BATCH as usize {
                break size;
            }
        };
        if appended > 0 {
            // Only a pass that signed something is a span: most passes find nothing to do.
            let span = tracing::info_span!(
                "evidence.sign",
                onestop.component = "eaddress",
                records = appended,
                tree_size = size,
            );
            self.sign_tree_head(size).instrument(span).await?;
        }
        let pending = self.store.pending_count(None).await?;
        self.gauges
            .evidence_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        Ok(appended)
    }

    /// Records the deadlines passed at `now` (deemed delivery, expiry), each once; how many.
    pub async fn pass_deadlines(&self, now: OffsetDateTime) -> Result<usize, EaddressError> {
        let mut passed = 0;
        loop {
            let due: Vec<Due> = self.store.due(now, BATCH).await?;
            let n = due.len();
            for d in &due {
                // Work the sending call caused, in a trace of its own linked to it.
                let span = tracing::info_span!(
                    "delivery.deadline",
                    onestop.component = "eaddress",
                    due = %d.due_kind,
                );
                onestop_platform::telemetry::linked_to(&span, d.trace_context.as_deref());
                if self.store.pass_deadline(d, now).instrument(span).await? {
                    passed += 1;
                }
            }
            if n < BATCH as usize {
                break;
            }
        }
        if passed > 0 {
            self.wake.evidence.notify_one();
        }
        Ok(passed)
    }

    /// Sends the notices due at `now`; how many went out.
    pub async fn send_notices(&self, now: OffsetDateTime) -> Result<usize, EaddressError> {
        let Some((mailer, first_retry)) = &self.mailer else {
            return Ok(0);
        };
        let notices = self
            .store
            .claim_notices(now, time::Duration::minutes(5), 50)
            .await?;
        let mut sent = 0;
        for notice in notices {
            // Work the sending call caused, in a trace of its own linked to it.
            let span = tracing::info_span!(
                "notice.send",
                onestop.component = "eaddress",
                attempt = notice.attempts + 1,
            );
            onestop_platform::telemetry::linked_to(&span, notice.trace_context.as_deref());
            match mailer
                .send(&notice.email, &notice.id)
                .instrument(span)
                .await
            {
                Ok(()) => {
                    self.store
                        .notice_outcome(&notice.id, Some(onestop_platform::clock::now()), None, "")
                        .await?;
                    sent += 1;
                }
                Err(SendError::Temporary(error)) if notice.attempts + 1 < notices::MAX_ATTEMPTS => {
                    let delay = notices::retry_after(notice.attempts + 1, *first_retry);
                    tracing::warn!(%error, notice = %notice.id, ?delay, "a notice could not be sent; it is retried");
                    let at = onestop_platform::clock::now()
                        + time::Duration::try_from(delay).unwrap_or(time::Duration::HOUR);
                    self.store
                        .notice_outcome(&notice.id, None, Some(at), &error)
                        .await?;
                }
                Err(SendError::Temporary(error) | SendError::Permanent(error)) => {
                    tracing::error!(%error, notice = %notice.id, "a notice is given up (the message itself is delivered)");
                    self.store
                        .notice_outcome(&notice.id, None, None, &error)
                        .await?;
                }
            }
        }
        let unsent = self.store.unsent_notices().await?;
        self.gauges
            .notices_unsent
            .set(i64::try_from(unsent).unwrap_or(i64::MAX));
        Ok(sent)
    }

    /// Removes uploaded content no message named within a day of its upload.
    pub async fn remove_unused_uploads(&self, now: OffsetDateTime) -> Result<usize, EaddressError> {
        let before = now - UNUSED_UPLOAD_TTL;
        let mut removed = 0;
        for sha in self.store.unused_blobs(before, BATCH).await? {
            if self.store.forget_blob(&sha, before).await? {
                if let Err(error) = self.blobs.remove(&sha).await {
                    tracing::warn!(%error, sha256 = %sha, "an unused upload's file was not removed");
                }
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The earliest time a notice may be due (for the loop's next wake-up), none if none.
    pub fn has_mailer(&self) -> bool {
        self.mailer.is_some()
    }
}

fn check_email(email: &str) -> Result<(), EaddressError> {
    if email.is_empty() {
        return Ok(());
    }
    let ok = email.len() <= 254
        && email.matches('@').count() == 1
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && domain.contains('.') && !domain.starts_with('.')
        })
        && !email.chars().any(|c| c.is_control() || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "notice_email",
            "an e-mail address such as name@example.lv",
        ))
    }
}
