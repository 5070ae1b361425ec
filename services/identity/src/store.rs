//! Where identity keeps its state: pending logins, sessions and their refresh tokens, mandates
//! and the audit trail. Portable SQL over the `Any` driver, the same on SQLite and PostgreSQL;
//! every change that must not half-happen is one transaction.

use onestop_platform::db::{
    Database, Migrations, StoreError, conflict_on_duplicate, from_millis, millis,
};
use onestop_platform::person::Level;
use onestop_platform::requests::{self, Request};
use onestop_platform::tokens::{Authentication, Staff};
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use time::OffsetDateTime;

/// The embedded migrations (portable SQL, one directory for both backends).
pub static MIGRATIONS: Migrations = Migrations {
    sqlite: &PORTABLE,
    postgres: &PORTABLE,
};
static PORTABLE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A login between its start and its completion.
#[derive(Clone, Debug)]
pub struct PendingLogin {
    /// SHA-256 (hex) of the `state`.
    pub state_hash: String,
    /// The provider.
    pub provider_id: String,
    /// The member system that started it.
    pub client: String,
    /// Where the provider returns the browser.
    pub redirect_uri: String,
    /// The nonce the ID token must carry.
    pub nonce: String,
    /// The PKCE verifier.
    pub verifier: String,
    /// The lowest level accepted.
    pub minimum_level: Level,
    /// When it may no longer be completed.
    pub expire_time: OffsetDateTime,
}

/// Who a session is for: what its tokens say, times apart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// The subject (`lv:...`, `eidas:...`, `staff:...`).
    pub sub: String,
    /// How they logged in.
    pub auth: Authentication,
    /// Given name.
    pub given_name: Option<String>,
    /// Family name.
    pub family_name: Option<String>,
    /// For staff: where they work.
    pub staff: Option<Staff>,
}

/// A session.
#[derive(Clone, Debug)]
pub struct Session {
    /// Its id.
    pub session_id: String,
    /// The member system it was issued to.
    pub client: String,
    /// Who.
    pub profile: Profile,
    /// When it ends at the latest.
    pub expire_time: OffsetDateTime,
}

/// What a refresh token turned out to be.
#[derive(Debug)]
pub enum Refreshed {
    /// Valid and now used up; the session goes on with the new token.
    Renewed(Box<Session>),
    /// Unknown, expired, of an ended session, or another system's.
    NotActive,
    /// Used before: the session has been ended.
    Reused,
}

/// A mandate as kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mandate {
    /// Its id.
    pub id: String,
    /// The resident's subject (`lv:...` or `eidas:...`).
    pub principal: String,
    /// The catalogue services covered.
    pub services: Vec<String>,
    /// From when.
    pub valid_from: OffsetDateTime,
    /// Until when.
    pub valid_until: OffsetDateTime,
    /// SHA-256 of the signed authorisation (hex).
    pub document_sha256: String,
    /// The identity document checked (`passport`, `id_card`, `residence_permit`).
    pub identity_document: String,
    /// The centre where it was given.
    pub centre: String,
    /// The clerk's subject.
    pub clerk: String,
    /// The clerk's place.
    pub clerk_staff: Staff,
    /// When registered.
    pub create_time: OffsetDateTime,
    /// When revoked, why and by whom, if it was.
    pub revoked: Option<Revocation>,
}

/// A mandate's revocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// When.
    pub time: OffsetDateTime,
    /// Why.
    pub reason: String,
    /// By whom (a subject).
    pub by: String,
}

/// One audit event.
#[derive(Clone, Debug)]
pub struct AuditEvent {
    /// `mandate.registered`, `mandate.exchanged`, `mandate.revoked`, ...
    pub kind: &'static str,
    /// Who did it (a subject).
    pub actor: String,
    /// Whom it concerns (a subject).
    pub subject: String,
    /// The mandate, if one is concerned.
    pub mandate_id: Option<String>,
    /// The member system it was done from.
    pub client: String,
    /// The trace of the call that did it.
    pub trace_id: String,
    /// More, as JSON.
    pub details: String,
    /// When.
    pub time: OffsetDateTime,
}

/// Where a page of mandates resumes: after this creation time and id (newest first).
pub type MandateCursor = (i64, String);

/// The identity store.
#[derive(Clone, Debug)]
pub struct Store {
    db: Database,
}

/// The columns of `mandates`.
macro_rules! mandate_columns {
    () => {
        "mandate_id, principal, services_json, valid_from_ms, valid_until_ms, document_sha256, \
         identity_document, centre, clerk, clerk_json, create_time_ms, revoke_time_ms, \
         revoke_reason, revoked_by"
    };
}

impl Store {
    /// Wraps an opened database.
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// The database.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Keeps a started login.
    pub async fn insert_login(&self, login: &PendingLogin) -> Result<(), StoreError> {
        let insert = sqlx::query(
            "INSERT INTO logins (state_hash, provider_id, client, redirect_uri, nonce, verifier, \
             minimum_level, expire_time_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&login.state_hash)
        .bind(&login.provider_id)
        .bind(&login.client)
        .bind(&login.redirect_uri)
        .bind(&login.nonce)
        .bind(&login.verifier)
        .bind(login.minimum_level.as_str())
        .bind(millis(login.expire_time))
        .execute(&self.db.pool)
        .await;
        conflict_on_duplicate(insert)
    }

    /// The pending login of this state that `client` started, while it may still be completed;
    /// `None` otherwise. Reading it spends nothing: another system's try, or a completion that
    /// fails on the way (timed out, provider unavailable), leaves it for the front end that
    /// started it. It ends with the session it starts ([`Store::create_session`]) or with a
    /// refusal ([`Store::end_login`]).
    pub async fn login(
        &self,
        state_hash: &str,
        client: &str,
        now: OffsetDateTime,
    ) -> Result<Option<PendingLogin>, StoreError> {
        let row = sqlx::query(
            "SELECT provider_id, client, redirect_uri, nonce, verifier, minimum_level, \
             expire_time_ms FROM logins WHERE state_hash = $1 AND client = $2 \
             AND expire_time_ms > $3",
        )
        .bind(state_hash)
        .bind(client)
        .bind(millis(now))
        .fetch_optional(&self.db.pool)
        .await?;
        row.map(|row| {
            let level: String = row.try_get("minimum_level")?;
            Ok(PendingLogin {
                state_hash: state_hash.to_owned(),
                provider_id: row.try_get("provider_id")?,
                client: row.try_get("client")?,
                redirect_uri: row.try_get("redirect_uri")?,
                nonce: row.try_get("nonce")?,
                verifier: row.try_get("verifier")?,
                minimum_level: Level::parse(&level)
                    .ok_or_else(|| StoreError::Corrupt(format!("level {level}")))?,
                expire_time: from_millis(row.try_get("expire_time_ms")?)?,
            })
        })
        .transpose()
    }

    /// Ends a pending login that starts no session (the provider refused it, or the person
    /// declined there).
    pub async fn end_login(&self, state_hash: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM logins WHERE state_hash = $1")
            .bind(state_hash)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    /// Removes logins and sessions past their time; returns how many rows went.
    pub async fn prune(&self, now: OffsetDateTime) -> Result<u64, StoreError> {
        let now = millis(now);
        let logins = sqlx::query("DELETE FROM logins WHERE expire_time_ms < $1")
            .bind(now)
            .execute(&self.db.pool)
            .await?
            .rows_affected();
        // A session's rows are kept a day past its end, for questions about it.
        let day = 24 * 3600 * 1000;
        // Their refresh tokens go with them (ON DELETE CASCADE).
        let sessions = sqlx::query("DELETE FROM sessions WHERE expire_time_ms < $1")
            .bind(now - day)
            .execute(&self.db.pool)
            .await?
            .rows_affected();
        Ok(logins + sessions)
    }

    /// Starts a session with its first refresh token, ending the login `login_state_hash` in
    /// the same transaction; false (and no session) when that login was ended already, by a
    /// completion that came first.
    pub async fn create_session(
        &self,
        session: &Session,
        refresh_hash: &str,
        login_state_hash: &str,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let person = serde_json::to_string(&session.profile)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut tx = self.db.pool.begin().await?;
        // First, so that of two completions of one login exactly one starts a session (and
        // SQLite's write lock is taken at once).
        let ended = sqlx::query("DELETE FROM logins WHERE state_hash = $1")
            .bind(login_state_hash)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if ended != 1 {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO sessions (session_id, subject, client, person_json, create_time_ms, \
             expire_time_ms) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&session.session_id)
        .bind(&session.profile.sub)
        .bind(&session.client)
        .bind(person)
        .bind(millis(now))
        .bind(millis(session.expire_time))
        .execute(&mut *tx)
        .await?;
        insert_refresh(&mut tx, refresh_hash, &session.session_id, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The sessions that ended at or after `since`, oldest end first, at most `limit`: their ids
    /// and end times.
    pub async fn ended_sessions(
        &self,
        since: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<(String, OffsetDateTime)>, StoreError> {
        let rows = sqlx::query(
            "SELECT session_id, end_time_ms FROM sessions WHERE end_time_ms >= $1 \
             ORDER BY end_time_ms, session_id LIMIT $2",
        )
        .bind(millis(since))
        .bind(i64::from(limit))
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let ended: i64 = row.try_get("end_time_ms")?;
                Ok((row.try_get("session_id")?, from_millis(ended)?))
            })
            .collect()
    }

    /// Uses a refresh token presented by `client`: on success it is spent and `next_hash`
    /// continues the session. A token used before ends its session.
    pub async fn refresh(
        &self,
        hash: &str,
        next_hash: &str,
        client: &str,
        now: OffsetDateTime,
    ) -> Result<Refreshed, StoreError> {
        let mut tx = self.db.pool.begin().await?;
        // Spend it first, only if nobody spent it before: of two concurrent uses one wins and
        // the other counts as a reuse. Writing first also takes SQLite's write lock at once, so
        // that the loser waits instead of failing to upgrade a read.
        let spent = sqlx::query(
            "UPDATE refresh_tokens SET used_time_ms = $1 WHERE token_hash = $2 \
             AND used_time_ms IS NULL",
        )
        .bind(millis(now))
        .bind(hash)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let row = sqlx::query(
            "SELECT s.session_id, s.client, s.person_json, s.expire_time_ms, s.end_time_ms \
             FROM refresh_tokens t JOIN sessions s ON s.session_id = t.session_id \
             WHERE t.token_hash = $1",
        )
        .bind(hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Refreshed::NotActive);
        };
        let session_id: String = row.try_get("session_id")?;
        let ended: Option<i64> = row.try_get("end_time_ms")?;
        let session_client: String = row.try_get("client")?;
        let expire_time = from_millis(row.try_get("expire_time_ms")?)?;
        if ended.is_some() || expire_time <= now || session_client != client {
            // Rolled back: another system's try does not spend the token.
            return Ok(Refreshed::NotActive);
        }
        if spent != 1 {
            end_session(&mut tx, &session_id, "refresh token reused", now).await?;
            tx.commit().await?;
            return Ok(Refreshed::Reused);
        }
        insert_refresh(&mut tx, next_hash, &session_id, now).await?;
        tx.commit().await?;
        let person: String = row.try_get("person_json")?;
        Ok(Refreshed::Renewed(Box::new(Session {
            session_id,
            client: session_client,
            profile: serde_json::from_str(&person)
                .map_err(|e| StoreError::Corrupt(format!("session person: {e}")))?,
            expire_time,
        })))
    }

    /// Ends the session of a refresh token presented by `client`; false if it was not active.
    pub async fn logout(
        &self,
        hash: &str,
        client: &str,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let mut tx = self.db.pool.begin().await?;
        let row = sqlx::query(
            "SELECT s.session_id FROM refresh_tokens t JOIN sessions s \
             ON s.session_id = t.session_id WHERE t.token_hash = $1 AND s.client = $2 \
             AND s.end_time_ms IS NULL",
        )
        .bind(hash)
        .bind(client)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        let session_id: String = row.try_get("session_id")?;
        end_session(&mut tx, &session_id, "logged out", now).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Registers a mandate, recording its request and audit event in the same transaction.
    pub async fn insert_mandate(
        &self,
        mandate: &Mandate,
        request: &Request,
        event: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.pool.begin().await?;
        requests::record(&mut tx, request, &mandate.id, mandate.create_time).await?;
        let services = serde_json::to_string(&mandate.services)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let clerk = serde_json::to_string(&mandate.clerk_staff)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query(concat!(
            "INSERT INTO mandates (",
            mandate_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, NULL, NULL, NULL)"
        ))
        .bind(&mandate.id)
        .bind(&mandate.principal)
        .bind(services)
        .bind(millis(mandate.valid_from))
        .bind(millis(mandate.valid_until))
        .bind(&mandate.document_sha256)
        .bind(&mandate.identity_document)
        .bind(&mandate.centre)
        .bind(&mandate.clerk)
        .bind(clerk)
        .bind(millis(mandate.create_time))
        .execute(&mut *tx)
        .await?;
        insert_event(&mut tx, event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// One mandate.
    pub async fn mandate(&self, id: &str) -> Result<Option<Mandate>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            mandate_columns!(),
            " FROM mandates WHERE mandate_id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.db.pool)
        .await?
        .map(|row| mandate_from_row(&row))
        .transpose()
    }

    /// Mandates newest first, after `after`, of one principal, one centre, or both.
    pub async fn mandates(
        &self,
        principal: Option<&str>,
        centre: Option<&str>,
        after: Option<&MandateCursor>,
        limit: u32,
    ) -> Result<Vec<Mandate>, StoreError> {
        // With no cursor, a time no mandate reaches: every row is "after" it.
        let (after_time, after_id) = after.cloned().unwrap_or((i64::MAX, String::new()));
        // Empty filters match everything: the statement stays one literal.
        let rows = sqlx::query(concat!(
            "SELECT ",
            mandate_columns!(),
            " FROM mandates WHERE ($1 = '' OR principal = $1) AND ($2 = '' OR centre = $2) \
             AND (create_time_ms < $3 OR (create_time_ms = $3 AND mandate_id < $4)) \
             ORDER BY create_time_ms DESC, mandate_id DESC LIMIT $5"
        ))
        .bind(principal.unwrap_or(""))
        .bind(centre.unwrap_or(""))
        .bind(after_time)
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter().map(mandate_from_row).collect()
    }

    /// Revokes a mandate (keeping the first revocation), with its audit event; returns it.
    pub async fn revoke_mandate(
        &self,
        id: &str,
        revocation: &Revocation,
        event: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.pool.begin().await?;
        let changed = sqlx::query(
            "UPDATE mandates SET revoke_time_ms = $1, revoke_reason = $2, revoked_by = $3 \
             WHERE mandate_id = $4 AND revoke_time_ms IS NULL",
        )
        .bind(millis(revocation.time))
        .bind(&revocation.reason)
        .bind(&revocation.by)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 1 {
            insert_event(&mut tx, event).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records an audit event on its own.
    pub async fn audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        let mut tx = self.db.pool.begin().await?;
        insert_event(&mut tx, event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The audit events of a mandate, oldest first: (kind, actor, trace id).
    pub async fn mandate_events(
        &self,
        mandate_id: &str,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT kind, actor, trace_id FROM audit_events WHERE mandate_id = $1 \
             ORDER BY time_ms, event_id",
        )
        .bind(mandate_id)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("kind")?,
                    row.try_get("actor")?,
                    row.try_get("trace_id")?,
                ))
            })
            .collect()
    }
}

async fn insert_refresh(
    tx: &mut Transaction<'_, Any>,
    hash: &str,
    session_id: &str,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    let insert = sqlx::query(
        "INSERT INTO refresh_tokens (token_hash, session_id, create_time_ms) VALUES ($1, $2, $3)",
    )
    .bind(hash)
    .bind(session_id)
    .bind(millis(now))
    .execute(&mut **tx)
    .await;
    conflict_on_duplicate(insert)
}

async fn end_session(
    tx: &mut Transaction<'_, Any>,
    session_id: &str,
    reason: &str,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE sessions SET end_time_ms = $1, end_reason = $2 WHERE session_id = $3 \
         AND end_time_ms IS NULL",
    )
    .bind(millis(now))
    .bind(reason)
    .bind(session_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn insert_event(tx: &mut Transaction<'_, Any>, event: &AuditEvent) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_events (event_id, time_ms, kind, actor, subject, mandate_id, client, \
         trace_id, details) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(crate::random_id().map_err(|e| StoreError::Corrupt(e.to_string()))?)
    .bind(millis(event.time))
    .bind(event.kind)
    .bind(&event.actor)
    .bind(&event.subject)
    .bind(event.mandate_id.clone())
    .bind(&event.client)
    .bind(&event.trace_id)
    .bind(&event.details)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn mandate_from_row(row: &AnyRow) -> Result<Mandate, StoreError> {
    let services: String = row.try_get("services_json")?;
    let clerk: String = row.try_get("clerk_json")?;
    let revoke_time: Option<i64> = row.try_get("revoke_time_ms")?;
    Ok(Mandate {
        id: row.try_get("mandate_id")?,
        principal: row.try_get("principal")?,
        services: serde_json::from_str(&services)
            .map_err(|e| StoreError::Corrupt(format!("services: {e}")))?,
        valid_from: from_millis(row.try_get("valid_from_ms")?)?,
        valid_until: from_millis(row.try_get("valid_until_ms")?)?,
        document_sha256: row.try_get("document_sha256")?,
        identity_document: row.try_get("identity_document")?,
        centre: row.try_get("centre")?,
        clerk: row.try_get("clerk")?,
        clerk_staff: serde_json::from_str(&clerk)
            .map_err(|e| StoreError::Corrupt(format!("clerk: {e}")))?,
        create_time: from_millis(row.try_get("create_time_ms")?)?,
        revoked: match revoke_time {
            Some(ms) => Some(Revocation {
                time: from_millis(ms)?,
                reason: row
                    .try_get::<Option<String>, _>("revoke_reason")?
                    .unwrap_or_default(),
                by: row
                    .try_get::<Option<String>, _>("revoked_by")?
                    .unwrap_or_default(),
            }),
            None => None,
        },
    })
}
