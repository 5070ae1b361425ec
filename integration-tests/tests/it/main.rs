//! End-to-end tests: the federation started for real on ephemeral ports, with real
//! certificates, called the way a member's system calls it. One binary, one module per area.

// In tests a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod access;
mod attacks;
mod eaddress;
mod forms;
mod gateway;
mod identity;
mod operations;
mod requests;
mod routing;

pub use onestop_integration_tests::Backend;

/// Runs an `async fn(Backend)` test once on SQLite and once on a throwaway PostgreSQL.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::Backend::Sqlite).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::Backend::Postgres).await;
                }
            }
        )*
    };
}

/// The field violations of a status, in order.
pub fn violations(status: &tonic::Status) -> Vec<tonic_types::FieldViolation> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|bad| bad.field_violations)
        .unwrap_or_default()
}

/// The `ErrorInfo.reason` of a status.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// Calls `path` with an empty message, expecting a refusal, and returns it.
pub async fn refusal_of_path(channel: tonic::transport::Channel, path: &str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary::<_, (), _>(
        tonic::Request::new(()),
        path.parse().unwrap(),
        tonic_prost::ProstCodec::<(), ()>::default(),
    )
    .await
    .expect_err("the call is refused")
}

/// Repeats a call until it fails, for at most 10 s, and returns the failure: for what takes
/// effect after a moment (a reload, an expiry).
#[macro_export]
macro_rules! first_refusal {
    ($call:expr) => {
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                match $call.await {
                    Ok(_) => tokio::task::yield_now().await,
                    Err(status) => break status,
                }
            }
        })
        .await
        .expect("refused within 10 s")
    };
}
