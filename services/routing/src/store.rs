//! The routing database: the catalogue, applications with their status history, deliveries,
//! the notification outbox and service cases. Portable SQL over the `Any` driver, the same on
//! SQLite and PostgreSQL, except where PostgreSQL lets concurrent consumers skip each other's
//! locked rows.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use onestop_platform::db::{self, Backend, Database, Migrations, StoreError};
use onestop_platform::inbox::AckFound;
use onestop_platform::requests::{self, Request};
use sqlx::any::AnyRow;
use sqlx::{Any, AssertSqlSafe, Row, Transaction};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use crate::model::{
    Application, CaseKind, ContactChannel, Decision, Delivery, Dimension, Parked, ServiceCase,
    StatisticsRow, Status, StatusChange,
};

/// The routing migrations, the same SQL for both backends.
pub static MIGRATIONS: Migrations = Migrations {
    sqlite: &PORTABLE,
    postgres: &PORTABLE,
};
static PORTABLE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How many deliveries of one inbox are in one state, and the oldest of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboxFigure {
    /// The inbox (a destination).
    pub inbox: String,
    /// `ready`, `leased` or `parked`.
    pub state: String,
    /// How many.
    pub deliveries: u64,
    /// The oldest one's id (a UUIDv7: it carries the time the application was accepted).
    pub oldest: String,
}

/// The PostgreSQL channel on which a commit names the inbox it added to.
pub const INBOX_CHANNEL: &str = "onestop_routing_inbox";

/// A decision for the applicant's e-address.
#[derive(Clone, Debug)]
pub struct Notification {
    /// Its id.
    pub id: String,
    /// The application decided.
    pub application_id: String,
    /// The applicant's subject, or the submitting member for a system's application.
    pub recipient: String,
    /// The centre where the applicant picks the decision up, if they filed there.
    pub pickup_centre: String,
    /// The status reached.
    pub status: Status,
    /// What the e-address message carries (JSON).
    pub payload: String,
}

/// The store.
#[derive(Clone, Debug)]
pub struct Store {
    db: Database,
    /// On SQLite, the queue of the single writer of applications.
    writer: Option<mpsc::Sender<Pending>>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("id", &self.application.id)
            .finish_non_exhaustive()
    }
}

const APPLICATION_COLUMNS: &str = "a.id, a.service_id, a.form_id, a.form_version, a.data_json, \
     a.municipality_code, a.destination, a.provenance, a.content_sha256, a.accept_time_ms, a.status, \
     a.trace_context";

fn application_of(row: &AnyRow) -> Result<Application, StoreError> {
    let provenance: String = row.try_get("provenance")?;
    let status: String = row.try_get("status")?;
    Ok(Application {
        id: row.try_get("id")?,
        service_id: row.try_get("service_id")?,
        form_id: row.try_get("form_id")?,
        form_version: row.try_get("form_version")?,
        data_json: row.try_get("data_json")?,
        municipality_code: row.try_get("municipality_code")?,
        destination: row.try_get("destination")?,
        provenance: serde_json::from_str(&provenance)
            .map_err(|e| StoreError::Corrupt(format!("provenance: {e}")))?,
        content_sha256: row.try_get("content_sha256")?,
        accept_time: db::from_millis(row.try_get("accept_time_ms")?)?,
        status: Status::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("status `{status}`")))?,
        history: Vec::new(),
        trace_context: row.try_get("trace_context")?,
    })
}

/// `$from, $from+1, ...` for `n` values.
fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    /// The store over an open database (on SQLite, with its writer task started).
    pub fn new(db: Database) -> Self {
        let writer = (db.backend == Backend::Sqlite).then(|| {
            let (writer, waiting) = mpsc::channel(4 * MAX_BATCH);
            tokio::spawn(write_batches(db.pool.clone(), waiting));
            writer
        });
        Self { db, writer }
    }

    /// The database.
    pub fn database(&self) -> &Database {
        &self.db
    }

    // ---- Catalogue

    /// Every catalogue entry: (kind, body).
    pub async fn catalogue_entries(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query("SELECT kind, body FROM catalogue_entries ORDER BY kind, id")
            .fetch_all(&self.db.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("kind")?, row.try_get("body")?)))
            .collect()
    }

    /// Creates or replaces catalogue entries, in one transaction.
    pub async fn put_catalogue_entries(
        &self,
        entries: &[(&str, String, String)],
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.pool.begin().await?;
        for (kind, id, body) in entries {
            sqlx::query(
                "INSERT INTO catalogue_entries (kind, id, body, update_time_ms) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (kind, id) DO UPDATE SET body = $3, update_time_ms = $4",
            )
            .bind(*kind)
            .bind(id)
            .bind(body)
            .bind(db::millis(now))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    // ---- Applications

    /// Stores an accepted application with its first status, its delivery, its service case
    /// (for a centre) and the request record, in one transaction: when this returns, all of it
    /// is durable. On SQLite, applications submitted at the same moment share one transaction
    /// (one commit, one sync to disk) through the store's single writer; on PostgreSQL, whose
    /// commits scale with connections, each has its own, and the commit also tells every
    /// replica's waiting consumers.
    pub async fn insert_application(
        &self,
        application: &Application,
        delivery_id: &str,
        case: Option<&ServiceCase>,
        request: &Request,
    ) -> Result<(), StoreError> {
        let Some(writer) = &self.writer else {
            let mut tx = self.db.pool.begin().await?;
            write_application(&mut tx, application, delivery_id, case, request).await?;
            self.announce(&mut tx, &application.destination).await?;
            tx.commit().await?;
            return Ok(());
        };
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            application: application.clone(),
            delivery_id: delivery_id.to_owned(),
            case: case.cloned(),
            request: request.clone(),
            reply,
        };
        writer
            .send(pending)
            .await
            .map_err(|_| StoreError::Corrupt("the store's writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Corrupt("the store's writer has stopped".into()))?
    }

    async fn announce(&self, tx: &mut Transaction<'_, Any>, inbox: &str) -> Result<(), StoreError> {
        if self.db.backend == Backend::Postgres {
            // Delivered to listeners when (and only if) the transaction commits.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(INBOX_CHANNEL)
                .bind(inbox)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// An application with its status history.
    pub async fn application(&self, id: &str) -> Result<Option<Application>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {APPLICATION_COLUMNS} FROM applications a WHERE a.id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.db.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut application = application_of(&row)?;
        let rows = sqlx::query(
            "SELECT status, note, time_ms, by_member, decision_title, decision_media_type, \
             decision_base64, decision_sha256 FROM status_changes WHERE application_id = $1 \
             ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.db.pool)
        .await?;
        for row in rows {
            let status: String = row.try_get("status")?;
            let decision = match row.try_get::<Option<String>, _>("decision_base64")? {
                Some(content) => Some(Decision {
                    title: row
                        .try_get::<Option<String>, _>("decision_title")?
                        .unwrap_or_default(),
                    media_type: row
                        .try_get::<Option<String>, _>("decision_media_type")?
                        .unwrap_or_default(),
                    content: STANDARD
                        .decode(content)
                        .map_err(|e| StoreError::Corrupt(format!("decision: {e}")))?,
                    content_sha256: row
                        .try_get::<Option<String>, _>("decision_sha256")?
                        .unwrap_or_default(),
                }),
                None => None,
            };
            application.history.push(StatusChange {
                status: Status::parse(&status)
                    .ok_or_else(|| StoreError::Corrupt(format!("status `{status}`")))?,
                note: row.try_get("note")?,
                time: db::from_millis(row.try_get("time_ms")?)?,
                by: row.try_get("by_member")?,
                decision,
            });
        }
        Ok(Some(application))
    }

    /// Records a status step if the application is still at `from` (else `Conflict`), with
    /// its notification and the request record, in one transaction.
    pub async fn change_status(
        &self,
        id: &str,
        from: Status,
        change: &StatusChange,
        notification: Option<&Notification>,
        request: &Request,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.pool.begin().await?;
        let moved =
            sqlx::query("UPDATE applications SET status = $1 WHERE id = $2 AND status = $3")
                .bind(change.status.as_str())
                .bind(id)
                .bind(from.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if moved != 1 {
            return Err(StoreError::Conflict);
        }
        let seq: i64 = sqlx::query(
            "SELECT COALESCE(MAX(seq), 0) + 1 AS next FROM status_changes WHERE application_id = $1",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?
        .try_get("next")?;
        insert_change(&mut tx, id, seq, change).await?;
        if let Some(n) = notification {
            sqlx::query(
                "INSERT INTO notifications (id, application_id, recipient, pickup_centre, status, \
                 payload, create_time_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&n.id)
            .bind(id)
            .bind(&n.recipient)
            .bind(&n.pickup_centre)
            .bind(n.status.as_str())
            .bind(&n.payload)
            .bind(db::millis(change.time))
            .execute(&mut *tx)
            .await?;
        }
        requests::record(&mut tx, request, &format!("{id}#{seq}"), change.time).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The notifications not yet drained, oldest first.
    pub async fn undrained_notifications(
        &self,
        limit: i64,
    ) -> Result<Vec<Notification>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, application_id, recipient, pickup_centre, status, payload FROM notifications \
             WHERE drain_time_ms IS NULL ORDER BY id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let status: String = row.try_get("status")?;
                Ok(Notification {
                    id: row.try_get("id")?,
                    application_id: row.try_get("application_id")?,
                    recipient: row.try_get("recipient")?,
                    pickup_centre: row.try_get("pickup_centre")?,
                    status: Status::parse(&status)
                        .ok_or_else(|| StoreError::Corrupt(format!("status `{status}`")))?,
                    payload: row.try_get("payload")?,
                })
            })
            .collect()
    }

    /// Marks a notification drained (delivered to the e-address service).
    pub async fn mark_drained(&self, id: &str, now: OffsetDateTime) -> Result<(), StoreError> {
        sqlx::query("UPDATE notifications SET drain_time_ms = $1 WHERE id = $2")
            .bind(db::millis(now))
            .bind(id)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    /// The decision document of an application's latest `decided` step: title, media type and
    /// content.
    pub async fn decision_document(
        &self,
        application_id: &str,
    ) -> Result<Option<(String, String, Vec<u8>)>, StoreError> {
        let row = sqlx::query(
            "SELECT decision_title, decision_media_type, decision_base64 FROM status_changes \
             WHERE application_id = $1 AND status = 'decided' AND decision_base64 IS NOT NULL \
             ORDER BY seq DESC LIMIT 1",
        )
        .bind(application_id)
        .fetch_optional(&self.db.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let encoded: String = row.try_get("decision_base64")?;
        let content = STANDARD
            .decode(encoded)
            .map_err(|e| StoreError::Corrupt(format!("decision content: {e}")))?;
        Ok(Some((
            row.try_get("decision_title")?,
            row.try_get("decision_media_type")?,
            content,
        )))
    }

    // ---- Deliveries

    /// Leases up to `limit` deliveries of `inbox` to `consumer` until `until`: those ready, and
    /// those whose lease ended. A delivery leased `max_attempts` times already is parked
    /// instead. Oldest first.
    pub async fn claim(
        &self,
        inbox: &str,
        consumer: &str,
        limit: u32,
        now: OffsetDateTime,
        until: OffsetDateTime,
        max_attempts: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        let now_ms = db::millis(now);
        let mut tx = self.db.pool.begin().await?;
        // A write first: on SQLite the transaction takes the write lock now rather than
        // upgrading a read lock later, which could fail under concurrent claims.
        sqlx::query(
            "UPDATE deliveries SET state = 'parked', park_time_ms = $1 \
             WHERE inbox = $2 AND attempts >= $3 \
             AND (state = 'ready' OR (state = 'leased' AND lease_until_ms <= $1))",
        )
        .bind(now_ms)
        .bind(inbox)
        .bind(i64::from(max_attempts))
        .execute(&mut *tx)
        .await?;
        let lock = match self.db.backend {
            // Concurrent consumers of one inbox skip each other's rows instead of waiting.
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let ids: Vec<String> = sqlx::query(AssertSqlSafe(format!(
            "SELECT id FROM deliveries WHERE inbox = $1 \
             AND (state = 'ready' OR (state = 'leased' AND lease_until_ms <= $2)) \
             ORDER BY id LIMIT $3{lock}"
        )))
        .bind(inbox)
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|row| row.try_get("id"))
        .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let mut update = sqlx::query(AssertSqlSafe(format!(
            "UPDATE deliveries SET state = 'leased', consumer = $1, lease_until_ms = $2, \
             attempts = attempts + 1 WHERE id IN ({})",
            placeholders(3, ids.len())
        )))
        .bind(consumer)
        .bind(db::millis(until));
        for id in &ids {
            update = update.bind(id);
        }
        update.execute(&mut *tx).await?;
        let mut select = sqlx::query(AssertSqlSafe(format!(
            "SELECT d.id AS delivery_id, d.attempts, {APPLICATION_COLUMNS} FROM deliveries d \
             JOIN applications a ON a.id = d.application_id WHERE d.id IN ({}) ORDER BY d.id",
            placeholders(1, ids.len())
        )));
        for id in &ids {
            select = select.bind(id);
        }
        let rows = select.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        rows.iter()
            .map(|row| {
                Ok(Delivery {
                    id: row.try_get("delivery_id")?,
                    attempt: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
                    lease_until: until,
                    application: application_of(row)?,
                })
            })
            .collect()
    }

    /// Every inbox's deliveries not yet acknowledged, counted by state, with the oldest of
    /// each: one aggregate over the index of unacknowledged deliveries.
    pub async fn inbox_figures(&self) -> Result<Vec<InboxFigure>, StoreError> {
        let rows = sqlx::query(
            "SELECT inbox, state, COUNT(*) AS deliveries, MIN(id) AS oldest FROM deliveries \
             WHERE state <> 'acked' GROUP BY inbox, state",
        )
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(InboxFigure {
                    inbox: row.try_get("inbox")?,
                    state: row.try_get("state")?,
                    deliveries: u64::try_from(row.try_get::<i64, _>("deliveries")?).unwrap_or(0),
                    oldest: row.try_get("oldest")?,
                })
            })
            .collect()
    }

    /// Acknowledges deliveries of `inbox` that were last leased to `consumer`.
    pub async fn ack(
        &self,
        inbox: &str,
        consumer: &str,
        ids: &[String],
        now: OffsetDateTime,
    ) -> Result<Vec<AckFound>, StoreError> {
        Ok(self.ack_counted(inbox, consumer, ids, now).await?.0)
    }

    /// [`Store::ack`], with how many deliveries this call acknowledged (an ack repeated by
    /// the same consumer is answered as acknowledged, but counted once).
    pub async fn ack_counted(
        &self,
        inbox: &str,
        consumer: &str,
        ids: &[String],
        now: OffsetDateTime,
    ) -> Result<(Vec<AckFound>, u64), StoreError> {
        let mut newly = 0;
        let mut found = Vec::with_capacity(ids.len());
        let mut tx = self.db.pool.begin().await?;
        for id in ids {
            let acked = sqlx::query(
                "UPDATE deliveries SET state = 'acked', ack_time_ms = $1 \
                 WHERE id = $2 AND inbox = $3 AND consumer = $4 AND state <> 'acked'",
            )
            .bind(db::millis(now))
            .bind(id)
            .bind(inbox)
            .bind(consumer)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if acked == 1 {
                newly += 1;
                found.push(AckFound::Acknowledged);
                continue;
            }
            let row = sqlx::query(
                "SELECT state, consumer, attempts FROM deliveries WHERE id = $1 AND inbox = $2",
            )
            .bind(id)
            .bind(inbox)
            .fetch_optional(&mut *tx)
            .await?;
            found.push(match row {
                None => AckFound::Unknown,
                Some(row) => {
                    let holder: Option<String> = row.try_get("consumer")?;
                    let attempts: i64 = row.try_get("attempts")?;
                    if attempts == 0 {
                        AckFound::Unknown
                    } else if holder.as_deref() == Some(consumer) {
                        AckFound::Acknowledged
                    } else {
                        AckFound::OtherConsumer
                    }
                }
            });
        }
        tx.commit().await?;
        Ok((found, newly))
    }

    /// Makes the deliveries of `inbox` leased to `consumer` available again at once (its
    /// stream ended), telling the other replicas' consumers on PostgreSQL.
    pub async fn release_consumer(&self, inbox: &str, consumer: &str) -> Result<u64, StoreError> {
        let mut tx = self.db.pool.begin().await?;
        let released = sqlx::query(
            "UPDATE deliveries SET state = 'ready', lease_until_ms = NULL \
             WHERE consumer = $1 AND state = 'leased'",
        )
        .bind(consumer)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if released > 0 {
            self.announce(&mut tx, inbox).await?;
        }
        tx.commit().await?;
        Ok(released)
    }

    /// When the next lease of `inbox` ends, if any delivery is leased.
    pub async fn next_lease_end(&self, inbox: &str) -> Result<Option<OffsetDateTime>, StoreError> {
        let row = sqlx::query(
            "SELECT MIN(lease_until_ms) AS next FROM deliveries WHERE inbox = $1 AND state = 'leased'",
        )
        .bind(inbox)
        .fetch_one(&self.db.pool)
        .await?;
        row.try_get::<Option<i64>, _>("next")?
            .map(db::from_millis)
            .transpose()
    }

    /// Parked deliveries of `inbox` after `after` (a delivery id), oldest first.
    pub async fn parked(
        &self,
        inbox: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<Parked>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, application_id, attempts, park_time_ms FROM deliveries \
             WHERE inbox = $1 AND state = 'parked' AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(inbox)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Parked {
                    id: row.try_get("id")?,
                    application_id: row.try_get("application_id")?,
                    attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(0),
                    park_time: db::from_millis(
                        row.try_get::<Option<i64>, _>("park_time_ms")?.unwrap_or(0),
                    )?,
                })
            })
            .collect()
    }

    /// Puts parked deliveries of `inbox` back, attempts starting over; returns those released.
    pub async fn release_parked(
        &self,
        inbox: &str,
        ids: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let mut released = Vec::new();
        let mut tx = self.db.pool.begin().await?;
        for id in ids {
            let done = sqlx::query(
                "UPDATE deliveries SET state = 'ready', attempts = 0, lease_until_ms = NULL, \
                 park_time_ms = NULL, consumer = NULL WHERE id = $1 AND inbox = $2 AND state = 'parked'",
            )
            .bind(id)
            .bind(inbox)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if done == 1 {
                released.push(id.clone());
            }
        }
        if !released.is_empty() {
            self.announce(&mut tx, inbox).await?;
        }
        tx.commit().await?;
        Ok(released)
    }

    // ---- Service cases

    /// Stores a service case with its request record.
    pub async fn insert_case(
        &self,
        case: &ServiceCase,
        request: &Request,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.pool.begin().await?;
        insert_case(&mut tx, case).await?;
        requests::record(&mut tx, request, &case.id, case.start_time).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A service case.
    pub async fn case(&self, id: &str) -> Result<Option<ServiceCase>, StoreError> {
        let row = sqlx::query(
            "SELECT id, centre_id, clerk, service_id, institution, topic, channel, kind, \
             start_time_ms, end_time_ms, application_id FROM service_cases WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.db.pool)
        .await?;
        row.map(|row| {
            let channel: String = row.try_get("channel")?;
            let kind: String = row.try_get("kind")?;
            Ok(ServiceCase {
                id: row.try_get("id")?,
                centre_id: row.try_get("centre_id")?,
                clerk: row.try_get("clerk")?,
                service_id: row.try_get("service_id")?,
                institution: row.try_get("institution")?,
                topic: row.try_get("topic")?,
                channel: ContactChannel::parse(&channel)
                    .ok_or_else(|| StoreError::Corrupt(format!("channel `{channel}`")))?,
                kind: CaseKind::parse(&kind)
                    .ok_or_else(|| StoreError::Corrupt(format!("kind `{kind}`")))?,
                start_time: db::from_millis(row.try_get("start_time_ms")?)?,
                end_time: db::from_millis(row.try_get("end_time_ms")?)?,
                application_id: row.try_get("application_id")?,
            })
        })
        .transpose()
    }

    /// Counts and durations of the cases starting in `[from, to)`, grouped by `by`, of the
    /// centres in `centres` (all when `None`).
    pub async fn statistics(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
        by: &[Dimension],
        centres: Option<&[String]>,
    ) -> Result<Vec<StatisticsRow>, StoreError> {
        let columns: Vec<&str> = by.iter().map(|d| d.column()).collect();
        let select = columns.iter().map(|c| format!("{c}, ")).collect::<String>();
        let group = if columns.is_empty() {
            String::new()
        } else {
            format!(" GROUP BY {0} ORDER BY {0}", columns.join(", "))
        };
        let filter = match centres {
            Some(centres) if !centres.is_empty() => {
                format!(" AND centre_id IN ({})", placeholders(3, centres.len()))
            }
            // No centre at all: nothing to count.
            Some(_) => " AND 1 = 0".to_owned(),
            None => String::new(),
        };
        let sql = format!(
            "SELECT {select}COUNT(*) AS cases, \
             CAST(COALESCE(SUM(end_time_ms - start_time_ms), 0) AS BIGINT) AS total_ms \
             FROM service_cases WHERE start_time_ms >= $1 AND start_time_ms < $2{filter}{group}"
        );
        let mut query = sqlx::query(AssertSqlSafe(sql))
            .bind(db::millis(from))
            .bind(db::millis(to));
        for centre in centres.unwrap_or_default() {
            query = query.bind(centre);
        }
        let rows = query.fetch_all(&self.db.pool).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let cases: i64 = row.try_get("cases")?;
            if cases == 0 {
                continue;
            }
            let total_ms: i64 = row.try_get("total_ms")?;
            let mut stats = StatisticsRow {
                cases: cases as u64,
                total_duration_seconds: (total_ms.max(0) / 1000) as u64,
                ..StatisticsRow::default()
            };
            for dimension in by {
                let value: String = row.try_get(dimension.column())?;
                match dimension {
                    Dimension::Centre => stats.centre_id = Some(value),
                    Dimension::Institution => stats.institution = Some(value),
                    Dimension::Service => stats.service = Some(value),
                    Dimension::Channel => stats.channel = ContactChannel::parse(&value),
                    Dimension::Kind => stats.kind = CaseKind::parse(&value),
                }
            }
            out.push(stats);
        }
        Ok(out)
    }
}

/// The rows of one accepted application, in the caller's transaction.
async fn write_application(
    tx: &mut Transaction<'_, Any>,
    application: &Application,
    delivery_id: &str,
    case: Option<&ServiceCase>,
    request: &Request,
) -> Result<(), StoreError> {
    let provenance = serde_json::to_string(&application.provenance)
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let applicant = application.provenance.applicant.as_ref().map_or_else(
        || application.provenance.submitted_by.clone(),
        |a| a.subject.clone(),
    );
    sqlx::query(
        "INSERT INTO applications (id, service_id, form_id, form_version, data_json, \
         municipality_code, destination, provenance, applicant, centre_id, content_sha256, \
         accept_time_ms, status, trace_context) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(&application.id)
    .bind(&application.service_id)
    .bind(&application.form_id)
    .bind(&application.form_version)
    .bind(&application.data_json)
    .bind(&application.municipality_code)
    .bind(&application.destination)
    .bind(provenance)
    .bind(applicant)
    .bind(application.provenance.centre_id.clone().unwrap_or_default())
    .bind(&application.content_sha256)
    .bind(db::millis(application.accept_time))
    .bind(application.status.as_str())
    .bind(application.trace_context.as_deref())
    .execute(&mut **tx)
    .await?;
    for (seq, change) in application.history.iter().enumerate() {
        insert_change(tx, &application.id, seq as i64 + 1, change).await?;
    }
    sqlx::query(
        "INSERT INTO deliveries (id, application_id, inbox, state, attempts) \
         VALUES ($1, $2, $3, 'ready', 0)",
    )
    .bind(delivery_id)
    .bind(&application.id)
    .bind(&application.destination)
    .execute(&mut **tx)
    .await?;
    if let Some(case) = case {
        insert_case(tx, case).await?;
    }
    requests::record(tx, request, &application.id, application.accept_time).await
}

/// An application waiting for the SQLite writer.
struct Pending {
    application: Application,
    delivery_id: String,
    case: Option<ServiceCase>,
    request: Request,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// Most applications one SQLite transaction takes.
const MAX_BATCH: usize = 128;

/// The SQLite writer: takes every application waiting and writes them in one transaction,
/// each inside a savepoint so that one refused (a raced request id) leaves the others in.
/// Replies only after the commit. Ends when the store is dropped.
async fn write_batches(pool: sqlx::AnyPool, mut waiting: mpsc::Receiver<Pending>) {
    while let Some(first) = waiting.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match waiting.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        match write_batch(&pool, &batch).await {
            Ok(outcomes) => {
                for (pending, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = pending.reply.send(outcome);
                }
            }
            Err(error) => {
                tracing::warn!(%error, applications = batch.len(), "a batch of applications failed");
                let message = error.to_string();
                for pending in batch {
                    let failed = sqlx::Error::Protocol(format!("the batch failed: {message}"));
                    let _ = pending.reply.send(Err(StoreError::from(failed)));
                }
            }
        }
    }
}

async fn write_batch(
    pool: &sqlx::AnyPool,
    batch: &[Pending],
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    let mut tx = pool.begin().await?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for p in batch {
        sqlx::query("SAVEPOINT application")
            .execute(&mut *tx)
            .await?;
        let written = write_application(
            &mut tx,
            &p.application,
            &p.delivery_id,
            p.case.as_ref(),
            &p.request,
        )
        .await;
        if written.is_err() {
            sqlx::query("ROLLBACK TO SAVEPOINT application")
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("RELEASE SAVEPOINT application")
            .execute(&mut *tx)
            .await?;
        outcomes.push(written);
    }
    tx.commit().await?;
    Ok(outcomes)
}

async fn insert_change(
    tx: &mut Transaction<'_, Any>,
    id: &str,
    seq: i64,
    change: &StatusChange,
) -> Result<(), StoreError> {
    let decision = change.decision.as_ref();
    sqlx::query(
        "INSERT INTO status_changes (application_id, seq, status, note, time_ms, by_member, \
         decision_title, decision_media_type, decision_base64, decision_sha256) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(id)
    .bind(seq)
    .bind(change.status.as_str())
    .bind(&change.note)
    .bind(db::millis(change.time))
    .bind(&change.by)
    .bind(decision.map(|d| d.title.clone()))
    .bind(decision.map(|d| d.media_type.clone()))
    .bind(decision.map(|d| STANDARD.encode(&d.content)))
    .bind(decision.map(|d| d.content_sha256.clone()))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn insert_case(tx: &mut Transaction<'_, Any>, case: &ServiceCase) -> Result<(), StoreError> {
    let service_key = if case.service_id.is_empty() {
        format!("topic:{}", case.topic)
    } else {
        case.service_id.clone()
    };
    sqlx::query(
        "INSERT INTO service_cases (id, centre_id, clerk, service_id, institution, topic, \
         service_key, channel, kind, start_time_ms, end_time_ms, application_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(&case.id)
    .bind(&case.centre_id)
    .bind(&case.clerk)
    .bind(&case.service_id)
    .bind(&case.institution)
    .bind(&case.topic)
    .bind(service_key)
    .bind(case.channel.as_str())
    .bind(case.kind.as_str())
    .bind(db::millis(case.start_time))
    .bind(db::millis(case.end_time))
    .bind(case.application_id.clone())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
