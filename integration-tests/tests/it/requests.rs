//! The platform's record of requests, on SQLite and PostgreSQL: a retry finds the first
//! result, the same id for another method or other content is refused, a racing duplicate is a
//! conflict, and records past their retention are pruned.

use std::time::Duration;

use onestop_integration_tests::{Backend, TestDatabase};
use onestop_platform::config::DatabaseConfig;
use onestop_platform::db::{self, StoreError};
use onestop_platform::requests::{self, Fingerprint, Request, RequestError, Requests};
use onestop_proto::forms::v1::DeprecateFormVersionRequest;
use time::OffsetDateTime;

use crate::on_both_backends;

on_both_backends!(
    retries_are_found_and_reused_ids_refused,
    records_past_their_retention_are_pruned,
);

const RETENTION: Duration = Duration::from_secs(3600);

async fn open(backend: Backend) -> (TestDatabase, db::Database, Requests) {
    let test = TestDatabase::start(backend).await;
    // Any service's migrations carry the platform's tables; the forms service's will do.
    let database = db::open(
        &DatabaseConfig::at(&test.url),
        &onestop_forms::store::MIGRATIONS,
    )
    .await
    .unwrap();
    let requests = Requests::new(&database, RETENTION);
    (test, database, requests)
}

fn deprecate(request_id: &str, reason: &str) -> DeprecateFormVersionRequest {
    DeprecateFormVersionRequest {
        request_id: request_id.into(),
        name: "forms/a/versions/1".into(),
        reason: reason.into(),
    }
}

fn request(caller: &str, message: &DeprecateFormVersionRequest, method: &'static str) -> Request {
    Request::new(
        &caller,
        &message.request_id,
        method,
        Fingerprint::of(message),
    )
    .unwrap()
}

async fn record(
    database: &db::Database,
    request: &Request,
    resource: &str,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    let mut tx = database.pool.begin().await.unwrap();
    requests::record(&mut tx, request, resource, at).await?;
    tx.commit().await.unwrap();
    Ok(())
}

async fn retries_are_found_and_reused_ids_refused(backend: Backend) {
    let (_test, database, requests) = open(backend).await;
    let now = OffsetDateTime::now_utc();
    let first = deprecate("r-1", "replaced");
    let made = request("caller-a", &first, "DeprecateFormVersion");
    assert_eq!(requests.earlier(&made).await.unwrap(), None);
    record(&database, &made, "forms/a/versions/1", now)
        .await
        .unwrap();

    // The very same request again is a retry, answered from what the first produced.
    let retry = request("caller-a", &first.clone(), "DeprecateFormVersion");
    assert_eq!(
        requests.earlier(&retry).await.unwrap().as_deref(),
        Some("forms/a/versions/1")
    );
    // A retry racing the first attempt finds the id taken.
    assert!(matches!(
        record(&database, &retry, "forms/a/versions/1", now).await,
        Err(StoreError::Conflict)
    ));
    // Other content under the same id is refused, and so is another method.
    let changed = request(
        "caller-a",
        &deprecate("r-1", "withdrawn"),
        "DeprecateFormVersion",
    );
    let refused = requests.earlier(&changed).await.unwrap_err();
    assert!(
        matches!(refused, RequestError::OtherContent { .. }),
        "{refused:?}"
    );
    let status = refused.into_status().unwrap();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(crate::reason(&status), "REQUEST_ID_REUSED");
    let other_method = request("caller-a", &first, "PublishFormVersion");
    assert!(matches!(
        requests.earlier(&other_method).await,
        Err(RequestError::OtherMethod { .. })
    ));
    // Ids belong to their caller: another caller's same id is another request.
    let other_caller = request("caller-b", &first, "DeprecateFormVersion");
    assert_eq!(requests.earlier(&other_caller).await.unwrap(), None);
    // A malformed id is refused before anything is looked up.
    let bad = Request::new(
        &"caller-a",
        "",
        "DeprecateFormVersion",
        Fingerprint::of(&first),
    );
    assert!(matches!(bad, Err(RequestError::InvalidId(_))));
}

async fn records_past_their_retention_are_pruned(backend: Backend) {
    let (_test, database, requests) = open(backend).await;
    let now = OffsetDateTime::now_utc();
    let old = deprecate("old", "replaced");
    let young = deprecate("young", "replaced");
    let old_request = request("caller-a", &old, "DeprecateFormVersion");
    let young_request = request("caller-a", &young, "DeprecateFormVersion");
    record(
        &database,
        &old_request,
        "x",
        now - RETENTION - Duration::from_secs(1),
    )
    .await
    .unwrap();
    record(
        &database,
        &young_request,
        "y",
        now - RETENTION + Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(requests.prune(now).await.unwrap(), 1);
    assert_eq!(requests.earlier(&old_request).await.unwrap(), None);
    assert_eq!(
        requests.earlier(&young_request).await.unwrap().as_deref(),
        Some("y")
    );
    // Once pruned, the id may be used again.
    record(&database, &old_request, "x2", now).await.unwrap();
    assert_eq!(requests.prune(now).await.unwrap(), 0);
}
