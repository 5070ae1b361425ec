//! Retried requests, for every service that changes something.
//!
//! Every mutating call carries a `request_id` chosen by the client. The change it makes is
//! recorded under the caller and that id, in the same transaction as the change, so that a
//! retry (after a lost answer, a timeout, a failover to another replica) finds the first
//! result and nothing happens twice. The record also keeps the method and a fingerprint of the
//! whole request message: the same id sent with another method or other content is the
//! client's mistake and is refused (`REQUEST_ID_REUSED`), never answered with the first
//! request's result.
//!
//! Records are kept for a retention period (`[database] request_retention_hours`, a week by
//! default) and pruned after it; a retry later than that is a new request.
//!
//! A service uses it in three steps: [`Requests::earlier`] before doing anything (a repeat is
//! answered from the resource it names), [`record`] inside the transaction of the change, and
//! after that transaction fails as conflicting, [`Requests::earlier`] again, to tell a retry
//! that raced the first attempt from another request's conflict.

use std::time::Duration;

use sqlx::{Any, AnyPool, Row, Transaction};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tonic_types::FieldViolation;

use crate::db::{self, Database, StoreError};
use crate::status::{self, Reason};

/// The longest request id.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// How often records past their retention are removed.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// The most records one pruning statement removes, so that it never holds a long lock; the
/// pruning goes on until none is left.
pub const PRUNE_BATCH: i64 = 10_000;

/// The SHA-256 of a request message's protobuf encoding. Two requests with equal fields have
/// equal fingerprints within one version of the contract: prost encodes fields in order and
/// the contract's maps are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a request message.
    pub fn of(message: &impl prost::Message) -> Self {
        Self::of_bytes(&message.encode_to_vec())
    }

    /// The fingerprint of a request that is not a message (work a service does on its own,
    /// such as seeding), from bytes that say all it asks.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let mut bytes = [0; 32];
        bytes.copy_from_slice(digest.as_ref());
        Self(bytes)
    }

    fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A mutating request as it is recorded.
#[derive(Clone, Debug)]
pub struct Request {
    /// The caller's identity (its SPIFFE id).
    pub caller: String,
    /// The id the client chose.
    pub request_id: String,
    /// The method (`CreateForm`).
    pub method: &'static str,
    /// What was asked.
    pub fingerprint: Fingerprint,
}

impl Request {
    /// A request, after checking its id.
    pub fn new(
        caller: &impl std::fmt::Display,
        request_id: &str,
        method: &'static str,
        fingerprint: Fingerprint,
    ) -> Result<Self, RequestError> {
        check_request_id(request_id).map_err(RequestError::InvalidId)?;
        Ok(Self {
            caller: caller.to_string(),
            request_id: request_id.to_owned(),
            method,
            fingerprint,
        })
    }
}

/// Checks a request id: 1 to [`MAX_REQUEST_ID_BYTES`] bytes, no control characters.
pub fn check_request_id(request_id: &str) -> Result<(), String> {
    if request_id.is_empty() || request_id.len() > MAX_REQUEST_ID_BYTES {
        return Err(format!(
            "request_id must be 1-{MAX_REQUEST_ID_BYTES} bytes: choose one per change and repeat it only to retry"
        ));
    }
    if request_id.chars().any(char::is_control) {
        return Err("request_id must not contain control characters".into());
    }
    Ok(())
}

/// Why a request cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The id is malformed.
    #[error("request_id: {0}")]
    InvalidId(String),
    /// The id was used before for another method.
    #[error(
        "request_id `{}` was already used for {method}; choose a new one for each change",
        status::echo(.request_id)
    )]
    OtherMethod {
        /// The id.
        request_id: String,
        /// The method it was used for.
        method: String,
    },
    /// The id was used before for a request with other content.
    #[error(
        "request_id `{}` was already used for a different {method} request; repeat a request id only to retry the very same request",
        status::echo(.request_id)
    )]
    OtherContent {
        /// The id.
        request_id: String,
        /// The method.
        method: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RequestError {
    /// The status of a refused request id. A store failure is the service's own and is mapped
    /// by the service, so it is returned unchanged.
    pub fn into_status(self) -> Result<Status, StoreError> {
        if let RequestError::Store(error) = self {
            return Err(error);
        }
        let reason = match self {
            RequestError::InvalidId(_) => Reason::InvalidField,
            _ => Reason::RequestIdReused,
        };
        let message = self.to_string();
        Ok(status::error(
            Code::InvalidArgument,
            reason,
            message.clone(),
            vec![FieldViolation::new("request_id", message)],
        ))
    }
}

/// The record of requests in a service's database.
#[derive(Clone, Debug)]
pub struct Requests {
    pool: AnyPool,
    retention: Duration,
}

impl Requests {
    /// The records in `db`, kept for `retention`.
    pub fn new(db: &Database, retention: Duration) -> Self {
        Self {
            pool: db.pool.clone(),
            retention,
        }
    }

    /// What an earlier request with the same caller and id produced, if there was one; an
    /// error if it was another method or other content.
    pub async fn earlier(&self, request: &Request) -> Result<Option<String>, RequestError> {
        let row = sqlx::query(
            "SELECT method, fingerprint, resource FROM platform_requests \
             WHERE caller = $1 AND request_id = $2",
        )
        .bind(&request.caller)
        .bind(&request.request_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::from)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let method: String = row.try_get("method").map_err(StoreError::from)?;
        let fingerprint: String = row.try_get("fingerprint").map_err(StoreError::from)?;
        if method != request.method {
            return Err(RequestError::OtherMethod {
                request_id: request.request_id.clone(),
                method,
            });
        }
        if fingerprint != request.fingerprint.hex() {
            return Err(RequestError::OtherContent {
                request_id: request.request_id.clone(),
                method,
            });
        }
        Ok(Some(row.try_get("resource").map_err(StoreError::from)?))
    }

    /// Removes the records older than the retention, in batches; returns how many.
    pub async fn prune(&self, now: OffsetDateTime) -> Result<u64, StoreError> {
        let cutoff = db::millis(now - self.retention);
        let mut removed = 0;
        loop {
            // A bounded batch by primary key: portable, and no statement holds a long lock.
            let done = sqlx::query(
                "DELETE FROM platform_requests WHERE (caller, request_id) IN ( \
                 SELECT caller, request_id FROM platform_requests \
                 WHERE create_time_ms < $1 LIMIT $2)",
            )
            .bind(cutoff)
            .bind(PRUNE_BATCH)
            .execute(&self.pool)
            .await?
            .rows_affected();
            removed += done;
            if done < PRUNE_BATCH as u64 {
                return Ok(removed);
            }
        }
    }

    /// Prunes now and every [`PRUNE_INTERVAL`] until `shutdown`. A failure is logged and
    /// tried again at the next interval: records past their retention do no harm meanwhile.
    pub async fn keep_pruned(self, shutdown: CancellationToken) {
        loop {
            match self.prune(OffsetDateTime::now_utc()).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "pruned request records"),
                Err(error) => tracing::warn!(%error, "pruning request records failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(PRUNE_INTERVAL) => {}
            }
        }
    }
}

/// Records a request and the resource it produced, in the transaction of its change. Fails
/// with [`StoreError::Conflict`] when the id is recorded already: a retry raced this one, or
/// the id was reused ([`Requests::earlier`] tells which).
pub async fn record(
    tx: &mut Transaction<'_, Any>,
    request: &Request,
    resource: &str,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    let insert = sqlx::query(
        "INSERT INTO platform_requests \
         (caller, request_id, method, fingerprint, resource, create_time_ms) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&request.caller)
    .bind(&request.request_id)
    .bind(request.method)
    .bind(request.fingerprint.hex())
    .bind(resource)
    .bind(db::millis(now))
    .execute(&mut **tx)
    .await;
    db::conflict_on_duplicate(insert)
}
