//! The e-address's tables: mailboxes, messages and deliveries, the evidence log and its tree
//! heads, notices. Portable SQL over the `Any` driver, the same on SQLite and PostgreSQL. A
//! state change and the evidence event that records it are written in one transaction; changes
//! that background tasks make on several replicas at once are conditional on the state they
//! change from, so each happens once.

use std::collections::HashMap;

use onestop_platform::db::{self, Database, Migrations, StoreError};
use onestop_platform::inbox::AckFound;
use onestop_platform::requests::{self, Request};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use time::OffsetDateTime;

use crate::evidence::{self, Event};
use crate::model::{
    Attachment, Delivery, DeliveryState, Mailbox, Message, PendingEvidence, new_id,
};

/// The e-address's migrations.
pub static MIGRATIONS: Migrations = Migrations {
    sqlite: &PORTABLE,
    postgres: &PORTABLE,
};
static PORTABLE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The PostgreSQL channel on which a commit names the institution's mailbox it placed in.
pub const INCOMING_CHANNEL: &str = "onestop_eaddress_incoming";

fn is_person(address: &str) -> bool {
    address.starts_with("lv:") || address.starts_with("eidas:")
}

/// Rows per multi-row insert: well under both backends' limits on bound parameters.
const ROWS_PER_INSERT: usize = 200;

/// `($n, $n+1, ...), (...)` for `rows` rows of `columns` values.
fn values(rows: usize, columns: usize) -> String {
    (0..rows)
        .map(|r| {
            let row = (1..=columns)
                .map(|c| format!("${}", r * columns + c))
                .collect::<Vec<_>>()
                .join(", ");
            format!("({row})")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `$from, $from+1, ...` for `n` values.
fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn optional_time(ms: Option<i64>) -> Result<Option<OffsetDateTime>, StoreError> {
    ms.map(db::from_millis).transpose()
}

const MESSAGE_COLUMNS: &str = "id, thread_id, sender, subject, body, document_type, \
     delivery_rule, hidden_from_delegates, content_sha256, attachments, accept_time_ms, \
     recipient_count, trace_context";

fn message_of(row: &AnyRow) -> Result<Message, StoreError> {
    let attachments: String = row.try_get("attachments")?;
    let hidden: i64 = row.try_get("hidden_from_delegates")?;
    let count: i64 = row.try_get("recipient_count")?;
    Ok(Message {
        id: row.try_get("id")?,
        thread_id: row.try_get("thread_id")?,
        sender: row.try_get("sender")?,
        subject: row.try_get("subject")?,
        body: row.try_get("body")?,
        document_type: row.try_get("document_type")?,
        delivery_rule: row.try_get("delivery_rule")?,
        hidden_from_delegates: hidden != 0,
        content_sha256: row.try_get("content_sha256")?,
        attachments: serde_json::from_str(&attachments)
            .map_err(|e| StoreError::Corrupt(format!("attachments: {e}")))?,
        accept_time: db::from_millis(row.try_get("accept_time_ms")?)?,
        recipient_count: u32::try_from(count).unwrap_or(u32::MAX),
        trace_context: row.try_get("trace_context")?,
    })
}

fn delivery_of(row: &AnyRow) -> Result<Delivery, StoreError> {
    let state: String = row.try_get("state")?;
    Ok(Delivery {
        message_id: row.try_get("message_id")?,
        recipient: row.try_get("recipient")?,
        state: DeliveryState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("delivery state `{state}`")))?,
        place_time: optional_time(row.try_get("place_time_ms")?)?,
        retrieve_time: optional_time(row.try_get("retrieve_time_ms")?)?,
    })
}

/// A message to store, with its recipients.
#[derive(Debug)]
pub struct NewMessage<'a> {
    /// The message.
    pub message: &'a Message,
    /// Its recipients' addresses, distinct.
    pub recipients: &'a [String],
}

/// A delivery the dispatcher decided: placed in an active mailbox (with its due time, and a
/// notice address if the owner has one), or not delivered.
#[derive(Debug)]
pub enum Placement {
    /// Placed.
    Placed {
        /// `deemed` or `expires`, or empty.
        due_kind: &'static str,
        /// When it falls due.
        due_time: Option<OffsetDateTime>,
        /// Where to send a notice.
        notice_email: Option<String>,
    },
    /// Not delivered: no active mailbox.
    NoActiveMailbox,
}

/// A delivery waiting to be placed.
#[derive(Clone, Debug)]
pub struct Accepted {
    /// The message.
    pub message_id: String,
    /// The recipient.
    pub recipient: String,
    /// The message's delivery rule.
    pub delivery_rule: String,
}

/// A delivery whose deadline passed.
#[derive(Clone, Debug)]
pub struct Due {
    /// The message.
    pub message_id: String,
    /// The recipient.
    pub recipient: String,
    /// `deemed` or `expires`.
    pub due_kind: String,
    /// The message's delivery rule.
    pub delivery_rule: String,
    /// The trace context of the call that sent the message.
    pub trace_context: Option<String>,
}

/// A signed record of the log, as stored.
#[derive(Clone, Debug)]
pub struct LogEntry {
    /// Its position.
    pub log_index: u64,
    /// The canonical record bytes.
    pub record: String,
    /// The key that signed it.
    pub key_id: String,
    /// The signature, base64.
    pub signature: String,
}

/// A signed tree head, as stored.
#[derive(Clone, Debug)]
pub struct StoredTreeHead {
    /// The tree's size.
    pub tree_size: u64,
    /// Its root, hex.
    pub root_hash: String,
    /// When it was signed.
    pub time_ms: i64,
    /// The signed bytes, base64.
    pub head: String,
    /// The key.
    pub key_id: String,
    /// The signature, base64.
    pub signature: String,
}

/// A notice to send.
#[derive(Clone, Debug)]
pub struct Notice {
    /// Its id.
    pub id: String,
    /// Where to.
    pub email: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When it may be tried (as claimed).
    pub next_attempt_ms: i64,
    /// The trace context of the call that sent the message it tells of.
    pub trace_context: Option<String>,
}

/// The store.
#[derive(Clone, Debug)]
pub struct Store {
    db: Database,
}

impl Store {
    /// The store over an open database.
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// The database.
    pub fn database(&self) -> &Database {
        &self.db
    }

    // ---- Mailboxes

    /// A mailbox's stored settings, with its delegates; `None` if never configured.
    pub async fn mailbox(&self, address: &str) -> Result<Option<Mailbox>, StoreError> {
        let Some(row) = sqlx::query(
            "SELECT address, active, notice_email, activate_time_ms FROM mailboxes \
             WHERE address = $1",
        )
        .bind(address)
        .fetch_optional(&self.db.pool)
        .await?
        else {
            return Ok(None);
        };
        let delegates =
            sqlx::query("SELECT delegate FROM delegates WHERE mailbox = $1 ORDER BY delegate")
                .bind(address)
                .fetch_all(&self.db.pool)
                .await?
                .iter()
                .map(|row| row.try_get("delegate"))
                .collect::<Result<Vec<String>, _>>()?;
        let active: i64 = row.try_get("active")?;
        Ok(Some(Mailbox {
            address: row.try_get("address")?,
            active: active != 0,
            notice_email: row.try_get("notice_email")?,
            activate_time: optional_time(row.try_get("activate_time_ms")?)?,
            delegates,
        }))
    }

    /// Which of `addresses` have an activated mailbox row.
    pub async fn active_mailboxes(
        &self,
        addresses: &[String],
    ) -> Result<HashMap<String, bool>, StoreError> {
        let mut found = HashMap::new();
        for chunk in addresses.chunks(500) {
            let sql = format!(
                "SELECT address, active FROM mailboxes WHERE address IN ({})",
                placeholders(1, chunk.len())
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for address in chunk {
                query = query.bind(address);
            }
            for row in query.fetch_all(&self.db.pool).await? {
                let active: i64 = row.try_get("active")?;
                found.insert(row.try_get("address")?, active != 0);
            }
        }
        Ok(found)
    }

    /// Activates (or re-activates) a mailbox with a notice address.
    pub async fn activate(
        &self,
        address: &str,
        notice_email: &str,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let now = db::millis(now);
        sqlx::query(
            "INSERT INTO mailboxes (address, active, notice_email, activate_time_ms, update_time_ms) \
             VALUES ($1, 1, $2, $3, $3) \
             ON CONFLICT (address) DO UPDATE SET active = 1, notice_email = $2, \
             activate_time_ms = COALESCE(mailboxes.activate_time_ms, $3), update_time_ms = $3",
        )
        .bind(address)
        .bind(notice_email)
        .bind(now)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Changes a mailbox's notice address and delegates, creating an inactive row if needed.
    pub async fn update_mailbox(
        &self,
        address: &str,
        notice_email: &str,
        add: &[String],
        remove: &[String],
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.pool.begin().await?;
        sqlx::query(
            "INSERT INTO mailboxes (address, active, notice_email, activate_time_ms, update_time_ms) \
             VALUES ($1, 0, $2, NULL, $3) \
             ON CONFLICT (address) DO UPDATE SET notice_email = $2, update_time_ms = $3",
        )
        .bind(address)
        .bind(notice_email)
        .bind(db::millis(now))
        .execute(&mut *tx)
        .await?;
        for delegate in remove {
            sqlx::query("DELETE FROM delegates WHERE mailbox = $1 AND delegate = $2")
                .bind(address)
                .bind(delegate)
                .execute(&mut *tx)
                .await?;
        }
        for delegate in add {
            sqlx::query(
                "INSERT INTO delegates (mailbox, delegate) VALUES ($1, $2) \
                 ON CONFLICT (mailbox, delegate) DO NOTHING",
            )
            .bind(address)
            .bind(delegate)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Whether `person` may read `mailbox` as its owner's delegate.
    pub async fn is_delegate(&self, mailbox: &str, person: &str) -> Result<bool, StoreError> {
        Ok(
            sqlx::query("SELECT 1 AS one FROM delegates WHERE mailbox = $1 AND delegate = $2")
                .bind(mailbox)
                .bind(person)
                .fetch_optional(&self.db.pool)
                .await?
                .is_some(),
        )
    }

    // ---- Uploaded content

    /// Records uploaded content (again: its upload time moves, so it is kept another day).
    pub async fn put_blob(
        &self,
        sha256: &str,
        size: u64,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO blobs (sha256, size, upload_time_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (sha256) DO UPDATE SET upload_time_ms = $3",
        )
        .bind(sha256)
        .bind(i64::try_from(size).unwrap_or(i64::MAX))
        .bind(db::millis(now))
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// The sizes of the uploaded contents among `digests`.
    pub async fn blob_sizes(&self, digests: &[String]) -> Result<HashMap<String, u64>, StoreError> {
        let mut found = HashMap::new();
        if digests.is_empty() {
            return Ok(found);
        }
        let sql = format!(
            "SELECT sha256, size FROM blobs WHERE sha256 IN ({})",
            placeholders(1, digests.len())
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for digest in digests {
            query = query.bind(digest);
        }
        for row in query.fetch_all(&self.db.pool).await? {
            let size: i64 = row.try_get("size")?;
            found.insert(row.try_get("sha256")?, u64::try_from(size).unwrap_or(0));
        }
        Ok(found)
    }

    /// Uploaded contents that no message names, uploaded before `before`, at most `limit`.
    pub async fn unused_blobs(
        &self,
        before: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT b.sha256 FROM blobs b WHERE b.upload_time_ms < $1 AND NOT EXISTS \
             (SELECT 1 FROM message_blobs m WHERE m.sha256 = b.sha256) LIMIT $2",
        )
        .bind(db::millis(before))
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|row| row.try_get("sha256").map_err(StoreError::from))
            .collect()
    }

    /// Forgets uploaded content if, still, no message names it and it was uploaded before
    /// `before`; whether it was forgotten (then its file may go).
    pub async fn forget_blob(
        &self,
        sha256: &str,
        before: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "DELETE FROM blobs WHERE sha256 = $1 AND upload_time_ms < $2 AND NOT EXISTS \
             (SELECT 1 FROM message_blobs m WHERE m.sha256 = $1)",
        )
        .bind(sha256)
        .bind(db::millis(before))
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    // ---- Messages

    /// Stores a message, its thread's parties, a delivery and an `accepted` evidence event per
    /// recipient, and the request record, in one transaction.
    pub async fn insert_message(
        &self,
        new: NewMessage<'_>,
        request: &Request,
    ) -> Result<(), StoreError> {
        let m = new.message;
        let now = db::millis(m.accept_time);
        let mut tx = self.db.pool.begin().await?;
        let attachments = serde_json::to_string(&m.attachments)
            .map_err(|e| StoreError::Corrupt(format!("attachments: {e}")))?;
        db::conflict_on_duplicate(
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES ({})",
                placeholders(1, 13)
            )))
            .bind(&m.id)
            .bind(&m.thread_id)
            .bind(&m.sender)
            .bind(&m.subject)
            .bind(&m.body)
            .bind(&m.document_type)
            .bind(&m.delivery_rule)
            .bind(i64::from(m.hidden_from_delegates))
            .bind(&m.content_sha256)
            .bind(attachments)
            .bind(now)
            .bind(i64::from(m.recipient_count))
            .bind(m.trace_context.as_deref())
            .execute(&mut *tx)
            .await,
        )?;
        for attachment in &m.attachments {
            sqlx::query(
                "INSERT INTO message_blobs (message_id, sha256) VALUES ($1, $2) \
                 ON CONFLICT (message_id, sha256) DO NOTHING",
            )
            .bind(&m.id)
            .bind(&attachment.sha256)
            .execute(&mut *tx)
            .await?;
        }
        let mut parties: Vec<&String> = new.recipients.iter().collect();
        parties.push(&m.sender);
        for chunk in parties.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO thread_parties (thread_id, party) VALUES {} \
                 ON CONFLICT (thread_id, party) DO NOTHING",
                values(chunk.len(), 2)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for party in chunk {
                query = query.bind(&m.thread_id).bind(*party);
            }
            query.execute(&mut *tx).await?;
        }
        for chunk in new.recipients.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO deliveries (message_id, recipient, state, accept_time_ms, due_kind) \
                 VALUES {}",
                values(chunk.len(), 5)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for recipient in chunk {
                query = query
                    .bind(&m.id)
                    .bind(recipient)
                    .bind(DeliveryState::Accepted.as_str())
                    .bind(now)
                    .bind("");
            }
            query.execute(&mut *tx).await?;
            let events: Vec<PendingEvidence> = chunk
                .iter()
                .map(|recipient| PendingEvidence {
                    id: new_id(),
                    message_id: m.id.clone(),
                    recipient: recipient.clone(),
                    event: Event::Accepted,
                    reason: String::new(),
                    time: m.accept_time,
                })
                .collect();
            insert_pending(&mut tx, &events).await?;
        }
        requests::record(&mut tx, request, &m.id, m.accept_time).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A message.
    pub async fn message(&self, id: &str) -> Result<Option<Message>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.db.pool)
        .await?
        .as_ref()
        .map(message_of)
        .transpose()
    }

    /// Whether `party` takes part in a thread.
    pub async fn is_party(&self, thread_id: &str, party: &str) -> Result<bool, StoreError> {
        Ok(
            sqlx::query("SELECT 1 AS one FROM thread_parties WHERE thread_id = $1 AND party = $2")
                .bind(thread_id)
                .bind(party)
                .fetch_optional(&self.db.pool)
                .await?
                .is_some(),
        )
    }

    /// A thread's parties.
    pub async fn parties(&self, thread_id: &str) -> Result<Vec<String>, StoreError> {
        sqlx::query("SELECT party FROM thread_parties WHERE thread_id = $1 ORDER BY party")
            .bind(thread_id)
            .fetch_all(&self.db.pool)
            .await?
            .iter()
            .map(|row| row.try_get("party").map_err(StoreError::from))
            .collect()
    }

    /// A message's delivery to one recipient.
    pub async fn delivery(
        &self,
        message_id: &str,
        recipient: &str,
    ) -> Result<Option<Delivery>, StoreError> {
        sqlx::query(
            "SELECT message_id, recipient, state, place_time_ms, retrieve_time_ms \
             FROM deliveries WHERE message_id = $1 AND recipient = $2",
        )
        .bind(message_id)
        .bind(recipient)
        .fetch_optional(&self.db.pool)
        .await?
        .as_ref()
        .map(delivery_of)
        .transpose()
    }

    /// A page of a mailbox's messages, newest first, after the page key
    /// (`<accept ms>/<message id>`).
    #[allow(clippy::too_many_arguments)]
    pub async fn list(
        &self,
        mailbox: &str,
        unread_only: bool,
        thread_id: &str,
        document_type: &str,
        include_hidden: bool,
        after: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<(Message, Delivery)>, StoreError> {
        let (after_ms, after_id) = after.unwrap_or((i64::MAX, String::new()));
        let rows = sqlx::query(
            "SELECT m.id, m.thread_id, m.sender, m.subject, '' AS body, m.document_type, \
             m.delivery_rule, m.hidden_from_delegates, m.content_sha256, m.attachments, \
             m.accept_time_ms, m.recipient_count, m.trace_context, d.message_id, d.recipient, \
             d.state, \
             d.place_time_ms, d.retrieve_time_ms \
             FROM deliveries d JOIN messages m ON m.id = d.message_id \
             WHERE d.recipient = $1 AND d.state <> 'accepted' AND d.state <> 'not_delivered' \
             AND ($2 = 0 OR d.retrieve_time_ms IS NULL) \
             AND ($3 = '' OR m.thread_id = $3) AND ($4 = '' OR m.document_type = $4) \
             AND ($5 = 1 OR m.hidden_from_delegates = 0) \
             AND (d.accept_time_ms < $6 OR (d.accept_time_ms = $6 AND d.message_id < $7)) \
             ORDER BY d.accept_time_ms DESC, d.message_id DESC LIMIT $8",
        )
        .bind(mailbox)
        .bind(i64::from(unread_only))
        .bind(thread_id)
        .bind(document_type)
        .bind(i64::from(include_hidden))
        .bind(after_ms)
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((message_of(row)?, delivery_of(row)?)))
            .collect()
    }

    // ---- Delivery: placing, opening, deadlines

    /// Deliveries accepted and not yet placed, oldest first.
    pub async fn accepted(&self, limit: i64) -> Result<Vec<Accepted>, StoreError> {
        let rows = sqlx::query(
            "SELECT d.message_id, d.recipient, m.delivery_rule FROM deliveries d \
             JOIN messages m ON m.id = d.message_id WHERE d.state = 'accepted' \
             ORDER BY d.accept_time_ms, d.message_id, d.recipient LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Accepted {
                    message_id: row.try_get("message_id")?,
                    recipient: row.try_get("recipient")?,
                    delivery_rule: row.try_get("delivery_rule")?,
                })
            })
            .collect()
    }

    /// Places or refuses accepted deliveries, each with its evidence (and notice), in one
    /// transaction; a delivery another replica placed first is left alone.
    pub async fn place(
        &self,
        decided: &[(Accepted, Placement)],
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let now_ms = db::millis(now);
        let mut tx = self.db.pool.begin().await?;
        let mut events = Vec::with_capacity(decided.len());
        for (delivery, placement) in decided {
            let (state, due_kind, due_time) = match placement {
                Placement::Placed {
                    due_kind, due_time, ..
                } => (DeliveryState::Placed, *due_kind, due_time.map(db::millis)),
                Placement::NoActiveMailbox => (DeliveryState::NotDelivered, "", None),
            };
            let changed = sqlx::query(
                "UPDATE deliveries SET state = $1, place_time_ms = $2, due_kind = $3, \
                 due_time_ms = $4 WHERE message_id = $5 AND recipient = $6 AND state = 'accepted'",
            )
            .bind(state.as_str())
            .bind((state == DeliveryState::Placed).then_some(now_ms))
            .bind(due_kind)
            .bind(due_time)
            .bind(&delivery.message_id)
            .bind(&delivery.recipient)
            .execute(&mut *tx)
            .await?;
            if changed.rows_affected() == 0 {
                continue;
            }
            let (event, reason) = match placement {
                Placement::Placed { notice_email, .. } => {
                    if let Some(email) = notice_email {
                        sqlx::query(
                            "INSERT INTO notices (id, message_id, mailbox, email, attempts, \
                             next_attempt_ms, sent_time_ms, gave_up, last_error) \
                             VALUES ($1, $2, $3, $4, 0, $5, NULL, 0, '')",
                        )
                        .bind(new_id())
                        .bind(&delivery.message_id)
                        .bind(&delivery.recipient)
                        .bind(email)
                        .bind(now_ms)
                        .execute(&mut *tx)
                        .await?;
                    }
                    (Event::Placed, String::new())
                }
                Placement::NoActiveMailbox => (Event::NotDelivered, "no_active_mailbox".into()),
            };
            events.push(PendingEvidence {
                id: new_id(),
                message_id: delivery.message_id.clone(),
                recipient: delivery.recipient.clone(),
                event,
                reason,
                time: now,
            });
        }
        insert_pending(&mut tx, &events).await?;
        if self.db.backend == db::Backend::Postgres {
            // Streams of institutions' mailboxes on other replicas wake up too.
            let mailboxes: std::collections::BTreeSet<&str> = events
                .iter()
                .filter(|e| e.event == Event::Placed && !is_person(&e.recipient))
                .map(|e| e.recipient.as_str())
                .collect();
            for mailbox in mailboxes {
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(INCOMING_CHANNEL)
                    .bind(mailbox)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records the first opening of a delivery (placed or deemed delivered), with its evidence;
    /// whether this call was the first.
    pub async fn retrieve(
        &self,
        message_id: &str,
        recipient: &str,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let mut tx = self.db.pool.begin().await?;
        let changed = sqlx::query(
            "UPDATE deliveries SET state = 'retrieved', retrieve_time_ms = $1 \
             WHERE message_id = $2 AND recipient = $3 \
             AND state IN ('placed', 'deemed_delivered') AND retrieve_time_ms IS NULL",
        )
        .bind(db::millis(now))
        .bind(message_id)
        .bind(recipient)
        .execute(&mut *tx)
        .await?;
        if changed.rows_affected() == 0 {
            return Ok(false);
        }
        insert_pending(
            &mut tx,
            &[PendingEvidence {
                id: new_id(),
                message_id: message_id.to_owned(),
                recipient: recipient.to_owned(),
                event: Event::Retrieved,
                reason: String::new(),
                time: now,
            }],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// How many placed, unopened deliveries will be deemed delivered at their deadline: the
    /// count reads only placed deliveries (the `state` prefix of `deliveries_due`), never the
    /// finished ones, which only grow.
    pub async fn awaiting_deemed_delivery(&self) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS deliveries FROM deliveries \
             WHERE state = 'placed' AND due_kind = 'deemed'",
        )
        .fetch_one(&self.db.pool)
        .await?;
        Ok(u64::try_from(row.try_get::<i64, _>("deliveries")?).unwrap_or(0))
    }

    /// Placed deliveries whose deadline is at or before `now`, at most `limit`.
    pub async fn due(&self, now: OffsetDateTime, limit: i64) -> Result<Vec<Due>, StoreError> {
        let rows = sqlx::query(
            "SELECT d.message_id, d.recipient, d.due_kind, m.delivery_rule, m.trace_context \
             FROM deliveries d \
             JOIN messages m ON m.id = d.message_id \
             WHERE d.state = 'placed' AND d.due_time_ms <= $1 \
             ORDER BY d.due_time_ms LIMIT $2",
        )
        .bind(db::millis(now))
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Due {
                    message_id: row.try_get("message_id")?,
                    recipient: row.try_get("recipient")?,
                    due_kind: row.try_get("due_kind")?,
                    delivery_rule: row.try_get("delivery_rule")?,
                    trace_context: row.try_get("trace_context")?,
                })
            })
            .collect()
    }

    /// Records that a deadline passed: deemed delivered, or not delivered (expired), with its
    /// evidence at the deadline's own time; only if still unopened, so exactly once however
    /// many replicas try. Whether this call recorded it.
    pub async fn pass_deadline(&self, due: &Due, now: OffsetDateTime) -> Result<bool, StoreError> {
        let (state, event, reason) = if due.due_kind == "expires" {
            (
                DeliveryState::NotDelivered,
                Event::NotDelivered,
                "expired".to_owned(),
            )
        } else {
            (
                DeliveryState::DeemedDelivered,
                Event::DeemedDelivered,
                due.delivery_rule.clone(),
            )
        };
        let mut tx = self.db.pool.begin().await?;
        // The write comes first: on SQLite it takes the write lock at once (a read first would
        // have to upgrade its lock, which fails at once under a concurrent writer).
        let changed = sqlx::query(
            "UPDATE deliveries SET state = $1 WHERE message_id = $2 AND recipient = $3 \
             AND state = 'placed' AND due_time_ms <= $4",
        )
        .bind(state.as_str())
        .bind(&due.message_id)
        .bind(&due.recipient)
        .bind(db::millis(now))
        .execute(&mut *tx)
        .await?;
        if changed.rows_affected() == 0 {
            return Ok(false);
        }
        let due_ms: i64 = sqlx::query(
            "SELECT due_time_ms FROM deliveries WHERE message_id = $1 AND recipient = $2",
        )
        .bind(&due.message_id)
        .bind(&due.recipient)
        .fetch_one(&mut *tx)
        .await?
        .try_get("due_time_ms")?;
        insert_pending(
            &mut tx,
            &[PendingEvidence {
                id: new_id(),
                message_id: due.message_id.clone(),
                recipient: due.recipient.clone(),
                event,
                reason,
                time: db::from_millis(due_ms)?,
            }],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    // ---- An institution's incoming stream

    /// Leases up to `limit` unopened messages of `mailbox` to `consumer` until `until`: those
    /// nobody holds, and those whose lease ended. Oldest first; (message id, attempt).
    pub async fn claim_incoming(
        &self,
        mailbox: &str,
        consumer: &str,
        limit: u32,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Vec<(String, u32)>, StoreError> {
        let rows = sqlx::query(
            "UPDATE deliveries SET consumer = $1, lease_until_ms = $2, attempts = attempts + 1 \
             WHERE recipient = $3 AND retrieve_time_ms IS NULL \
             AND state IN ('placed', 'deemed_delivered') \
             AND (lease_until_ms IS NULL OR lease_until_ms <= $4) \
             AND message_id IN (SELECT message_id FROM deliveries WHERE recipient = $3 \
               AND retrieve_time_ms IS NULL AND state IN ('placed', 'deemed_delivered') \
               AND (lease_until_ms IS NULL OR lease_until_ms <= $4) \
               ORDER BY accept_time_ms, message_id LIMIT $5) \
             RETURNING message_id, attempts, accept_time_ms",
        )
        .bind(consumer)
        .bind(db::millis(until))
        .bind(mailbox)
        .bind(db::millis(now))
        .bind(i64::from(limit))
        .fetch_all(&self.db.pool)
        .await?;
        let mut claimed = rows
            .iter()
            .map(|row| {
                let attempts: i64 = row.try_get("attempts")?;
                let accepted: i64 = row.try_get("accept_time_ms")?;
                Ok((
                    accepted,
                    row.try_get::<String, _>("message_id")?,
                    u32::try_from(attempts).unwrap_or(u32::MAX),
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        // RETURNING gives no order: oldest first, as claimed.
        claimed.sort();
        Ok(claimed.into_iter().map(|(_, id, n)| (id, n)).collect())
    }

    /// Acknowledges `ids` of `mailbox` for `consumer` at `now` in one transaction: each
    /// becomes retrieved (with its evidence) if this consumer holds it, and the answer says
    /// what was found for each.
    pub async fn ack_incoming(
        &self,
        mailbox: &str,
        consumer: &str,
        ids: &[String],
        now: OffsetDateTime,
    ) -> Result<Vec<AckFound>, StoreError> {
        let mut tx = self.db.pool.begin().await?;
        let mut found = Vec::with_capacity(ids.len());
        let mut events = Vec::new();
        for id in ids {
            let done = sqlx::query(
                "UPDATE deliveries SET state = 'retrieved', retrieve_time_ms = $1, \
                 lease_until_ms = NULL WHERE recipient = $2 AND message_id = $3 \
                 AND consumer = $4 AND retrieve_time_ms IS NULL",
            )
            .bind(db::millis(now))
            .bind(mailbox)
            .bind(id)
            .bind(consumer)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 1 {
                events.push(PendingEvidence {
                    id: new_id(),
                    message_id: id.clone(),
                    recipient: mailbox.to_owned(),
                    event: Event::Retrieved,
                    reason: String::new(),
                    time: now,
                });
                found.push(AckFound::Acknowledged);
                continue;
            }
            let row = sqlx::query(
                "SELECT consumer, retrieve_time_ms FROM deliveries \
                 WHERE recipient = $1 AND message_id = $2",
            )
            .bind(mailbox)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            found.push(match row {
                None => AckFound::Unknown,
                Some(row) => {
                    let holder: Option<String> = row.try_get("consumer")?;
                    let retrieved: Option<i64> = row.try_get("retrieve_time_ms")?;
                    match holder {
                        Some(h) if h == consumer && retrieved.is_some() => AckFound::Acknowledged,
                        Some(_) => AckFound::OtherConsumer,
                        None => AckFound::Unknown,
                    }
                }
            });
        }
        insert_pending(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(found)
    }

    /// Ends `consumer`'s leases in `mailbox` (its stream went away); how many.
    pub async fn release_incoming(&self, mailbox: &str, consumer: &str) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE deliveries SET lease_until_ms = NULL WHERE recipient = $1 AND consumer = $2 \
             AND retrieve_time_ms IS NULL AND lease_until_ms IS NOT NULL",
        )
        .bind(mailbox)
        .bind(consumer)
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// When the next lease on `mailbox`'s unopened messages ends.
    pub async fn next_incoming_lease_end(
        &self,
        mailbox: &str,
    ) -> Result<Option<OffsetDateTime>, StoreError> {
        let row = sqlx::query(
            "SELECT MIN(lease_until_ms) AS next FROM deliveries WHERE recipient = $1 \
             AND retrieve_time_ms IS NULL AND lease_until_ms IS NOT NULL",
        )
        .bind(mailbox)
        .fetch_one(&self.db.pool)
        .await?;
        optional_time(row.try_get("next")?)
    }

    // ---- The evidence log

    /// Appends up to `limit` pending events to the log, oldest first, as records signed by
    /// `key`, in one transaction that holds the log's head row so that appends are serial
    /// across replicas. Returns the log's size after.
    pub async fn append_pending(
        &self,
        key: &evidence::EvidenceKey,
        limit: i64,
    ) -> Result<(u64, usize), StoreError> {
        let mut tx = self.db.pool.begin().await?;
        // Taking the row's lock first (SQLite: the write lock) makes the reads below see every
        // append committed before.
        sqlx::query("UPDATE evidence_head SET size = size WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        let size: i64 = sqlx::query("SELECT size FROM evidence_head WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?
            .try_get("size")?;
        let pending = sqlx::query(
            "SELECT p.id, p.message_id, p.recipient, p.event, p.reason, p.time_ms, \
             m.sender, m.document_type, m.content_sha256, m.attachments \
             FROM evidence_pending p JOIN messages m ON m.id = p.message_id \
             ORDER BY p.id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut next = u64::try_from(size).unwrap_or(0);
        for row in &pending {
            let event: String = row.try_get("event")?;
            let attachments: String = row.try_get("attachments")?;
            let attachments: Vec<Attachment> = serde_json::from_str(&attachments)
                .map_err(|e| StoreError::Corrupt(format!("attachments: {e}")))?;
            let time_ms: i64 = row.try_get("time_ms")?;
            let message_id: String = row.try_get("message_id")?;
            let recipient: String = row.try_get("recipient")?;
            let record = evidence::Record {
                version: 1,
                log_index: next,
                event: Event::parse(&event)
                    .ok_or_else(|| StoreError::Corrupt(format!("evidence event `{event}`")))?,
                message: format!("messages/{message_id}"),
                recipient: recipient.clone(),
                sender: row.try_get("sender")?,
                document_type: row.try_get("document_type")?,
                content_sha256: row.try_get("content_sha256")?,
                attachments: attachments
                    .into_iter()
                    .map(|a| evidence::AttachmentDigest {
                        name: a.file_name,
                        sha256: a.sha256,
                        size: a.size,
                    })
                    .collect(),
                time_ms,
                time: evidence::rfc3339_millis(time_ms),
                reason: row.try_get("reason")?,
            };
            let bytes = record.encode();
            let signature = key.sign(&bytes);
            let text = String::from_utf8(bytes)
                .map_err(|e| StoreError::Corrupt(format!("record: {e}")))?;
            sqlx::query(
                "INSERT INTO evidence_log (log_index, message_id, recipient, record, leaf_hash, \
                 key_id, signature) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(i64::try_from(next).unwrap_or(i64::MAX))
            .bind(&message_id)
            .bind(&recipient)
            .bind(&text)
            .bind(hex::encode(evidence::leaf_hash(text.as_bytes())))
            .bind(key.kid())
            .bind(base64_encode(&signature))
            .execute(&mut *tx)
            .await?;
            let id: String = row.try_get("id")?;
            sqlx::query("DELETE FROM evidence_pending WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            next += 1;
        }
        if !pending.is_empty() {
            sqlx::query("UPDATE evidence_head SET size = $1 WHERE id = 1")
                .bind(i64::try_from(next).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok((next, pending.len()))
    }

    /// How many events wait to be signed: in all, and for one message.
    pub async fn pending_count(&self, message_id: Option<&str>) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM evidence_pending WHERE $1 = '' OR message_id = $1",
        )
        .bind(message_id.unwrap_or(""))
        .fetch_one(&self.db.pool)
        .await?;
        let n: i64 = row.try_get("n")?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// How many records the log holds.
    pub async fn log_size(&self) -> Result<u64, StoreError> {
        let size: i64 = sqlx::query("SELECT size FROM evidence_head WHERE id = 1")
            .fetch_one(&self.db.pool)
            .await?
            .try_get("size")?;
        Ok(u64::try_from(size).unwrap_or(0))
    }

    /// The log's leaf hashes from `from` on, in order.
    pub async fn leaf_hashes(&self, from: u64) -> Result<Vec<evidence::Hash>, StoreError> {
        let rows = sqlx::query(
            "SELECT leaf_hash FROM evidence_log WHERE log_index >= $1 ORDER BY log_index",
        )
        .bind(i64::try_from(from).unwrap_or(i64::MAX))
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let text: String = row.try_get("leaf_hash")?;
                let mut hash = [0u8; 32];
                hex::decode_to_slice(&text, &mut hash)
                    .map_err(|e| StoreError::Corrupt(format!("leaf hash: {e}")))?;
                Ok(hash)
            })
            .collect()
    }

    /// A message's records (one recipient's, if given), in log order.
    pub async fn records(
        &self,
        message_id: &str,
        recipient: Option<&str>,
    ) -> Result<Vec<LogEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT log_index, record, key_id, signature FROM evidence_log \
             WHERE message_id = $1 AND ($2 = '' OR recipient = $2) ORDER BY log_index",
        )
        .bind(message_id)
        .bind(recipient.unwrap_or(""))
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let index: i64 = row.try_get("log_index")?;
                Ok(LogEntry {
                    log_index: u64::try_from(index).unwrap_or(0),
                    record: row.try_get("record")?,
                    key_id: row.try_get("key_id")?,
                    signature: row.try_get("signature")?,
                })
            })
            .collect()
    }

    /// Records a signed tree head (one per size: a second for the same size is dropped).
    pub async fn put_tree_head(&self, head: &StoredTreeHead) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tree_heads (tree_size, root_hash, time_ms, head, key_id, signature) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tree_size) DO NOTHING",
        )
        .bind(i64::try_from(head.tree_size).unwrap_or(i64::MAX))
        .bind(&head.root_hash)
        .bind(head.time_ms)
        .bind(&head.head)
        .bind(&head.key_id)
        .bind(&head.signature)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// The signed tree head of exactly `size`, or the newest when `size` is 0.
    pub async fn tree_head(&self, size: u64) -> Result<Option<StoredTreeHead>, StoreError> {
        let row = sqlx::query(
            "SELECT tree_size, root_hash, time_ms, head, key_id, signature FROM tree_heads \
             WHERE $1 = 0 OR tree_size = $1 ORDER BY tree_size DESC LIMIT 1",
        )
        .bind(i64::try_from(size).unwrap_or(i64::MAX))
        .fetch_optional(&self.db.pool)
        .await?;
        row.map(|row| {
            let size: i64 = row.try_get("tree_size")?;
            Ok(StoredTreeHead {
                tree_size: u64::try_from(size).unwrap_or(0),
                root_hash: row.try_get("root_hash")?,
                time_ms: row.try_get("time_ms")?,
                head: row.try_get("head")?,
                key_id: row.try_get("key_id")?,
                signature: row.try_get("signature")?,
            })
        })
        .transpose()
    }

    /// Publishes a signing key's public part (once).
    pub async fn publish_key(
        &self,
        key: &evidence::PublicKey,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO evidence_keys (key_id, public_key, create_time_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (key_id) DO NOTHING",
        )
        .bind(&key.key_id)
        .bind(&key.public_key)
        .bind(db::millis(now))
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Every published key, oldest first.
    pub async fn keys(&self) -> Result<Vec<evidence::PublicKey>, StoreError> {
        let rows = sqlx::query(
            "SELECT key_id, public_key FROM evidence_keys ORDER BY create_time_ms, key_id",
        )
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(evidence::PublicKey {
                    key_id: row.try_get("key_id")?,
                    algorithm: "Ed25519".to_owned(),
                    public_key: row.try_get("public_key")?,
                })
            })
            .collect()
    }

    // ---- Notices

    /// Notices due at `now`, claimed for `lease` so that another replica does not send them at
    /// the same time, at most `limit`.
    pub async fn claim_notices(
        &self,
        now: OffsetDateTime,
        lease: time::Duration,
        limit: i64,
    ) -> Result<Vec<Notice>, StoreError> {
        let rows = sqlx::query(
            "SELECT n.id, n.email, n.attempts, n.next_attempt_ms, m.trace_context FROM notices n \
             LEFT JOIN messages m ON m.id = n.message_id \
             WHERE n.sent_time_ms IS NULL AND n.gave_up = 0 AND n.next_attempt_ms <= $1 \
             ORDER BY n.next_attempt_ms LIMIT $2",
        )
        .bind(db::millis(now))
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        let until = db::millis(now + lease);
        let mut claimed = Vec::new();
        for row in &rows {
            let id: String = row.try_get("id")?;
            let next: i64 = row.try_get("next_attempt_ms")?;
            let done = sqlx::query(
                "UPDATE notices SET next_attempt_ms = $1 WHERE id = $2 AND next_attempt_ms = $3 \
                 AND sent_time_ms IS NULL",
            )
            .bind(until)
            .bind(&id)
            .bind(next)
            .execute(&self.db.pool)
            .await?;
            if done.rows_affected() == 1 {
                let attempts: i64 = row.try_get("attempts")?;
                claimed.push(Notice {
                    id,
                    email: row.try_get("email")?,
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    next_attempt_ms: until,
                    trace_context: row.try_get("trace_context")?,
                });
            }
        }
        Ok(claimed)
    }

    /// Records a notice's outcome: sent, to be retried at `retry_at`, or given up.
    pub async fn notice_outcome(
        &self,
        id: &str,
        sent: Option<OffsetDateTime>,
        retry_at: Option<OffsetDateTime>,
        error: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE notices SET sent_time_ms = $1, attempts = attempts + $2, \
             next_attempt_ms = COALESCE($3, next_attempt_ms), gave_up = $4, last_error = $5 \
             WHERE id = $6",
        )
        .bind(sent.map(db::millis))
        .bind(i64::from(sent.is_none()))
        .bind(retry_at.map(db::millis))
        .bind(i64::from(sent.is_none() && retry_at.is_none()))
        .bind(error)
        .bind(id)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Notices not yet sent nor given up.
    pub async fn unsent_notices(&self) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM notices WHERE sent_time_ms IS NULL AND gave_up = 0",
        )
        .fetch_one(&self.db.pool)
        .await?;
        let n: i64 = row.try_get("n")?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

async fn insert_pending(
    tx: &mut Transaction<'_, Any>,
    events: &[PendingEvidence],
) -> Result<(), StoreError> {
    for chunk in events.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO evidence_pending (id, message_id, recipient, event, reason, time_ms) \
             VALUES {}",
            values(chunk.len(), 6)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for e in chunk {
            query = query
                .bind(&e.id)
                .bind(&e.message_id)
                .bind(&e.recipient)
                .bind(e.event.as_str())
                .bind(&e.reason)
                .bind(db::millis(e.time));
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Standard base64.
pub fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
