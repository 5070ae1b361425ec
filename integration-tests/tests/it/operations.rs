//! What operators watch: the signals on `/metrics` move as the federation works (inboxes,
//! deliveries, the e-address's deadlines, readiness, certificates, reloads, database pools),
//! and the alert rules and the dashboard in `deploy/` pass the real Prometheus's checks and
//! name only metrics the processes export.
//!
//! Metrics are the test process's, shared with every other test running in it: figures are
//! asserted to have grown by at least this test's own work, or retried until they show it
//! within a bound, never compared exactly.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use onestop_integration_tests::{Backend, http_get, sample};
use onestop_platform::config::DatabaseConfig;
use onestop_platform::identity::Member;
use onestop_platform::metrics::Readiness;
use onestop_proto::eaddress::v1::mailbox_service_client::MailboxServiceClient;
use onestop_proto::eaddress::v1::message_service_client::MessageServiceClient;
use onestop_proto::eaddress::v1::{ActivateMailboxRequest, SendMessageRequest};
use onestop_proto::forms::v1::forms_service_client::FormsServiceClient;
use onestop_proto::forms::v1::{CreateFormRequest, GetFormRequest};
use onestop_proto::identity::v1::LevelOfAssurance;
use onestop_proto::routing::v1::application_service_client::ApplicationServiceClient;
use onestop_proto::routing::v1::inbox_service_client::InboxServiceClient;
use onestop_proto::routing::v1::{
    AckDeliveriesRequest, PullDeliveriesRequest, SubmitApplicationRequest,
};
use onestop_proto::r#type::v1::MemberId;

use crate::identity::{CENTRE, INSTITUTION, World, bearer, login, tokens, world_with};
use crate::on_both_backends;

on_both_backends!(signals_move_as_the_platform_works);

const PENSIONS: &str = "GOV/VSAA/pensions";
const RESIDENT: &str = "lv:121282-11236";

/// Scrapes `/metrics` until `until` finds what it looks for, for at most 40 s (the figures
/// counted from databases are counted every 10 s, and another test's federation may count its
/// own in between).
async fn scrape_until<T>(
    admin: SocketAddr,
    what: &str,
    mut until: impl FnMut(&str) -> Option<T>,
) -> T {
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    let mut last = String::new();
    let found = tokio::time::timeout(Duration::from_secs(40), async {
        loop {
            tick.tick().await;
            let (status, metrics) = http_get(admin, "/metrics").await;
            assert_eq!(status, 200, "{metrics}");
            if let Some(found) = until(&metrics) {
                return found;
            }
            last = metrics;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("{what} within 40 s; last scrape:\n{last}"))
}

/// Waits until `series` is at least `least`.
async fn at_least(admin: SocketAddr, series: &str, least: f64) -> f64 {
    scrape_until(admin, series, |metrics| {
        let value = sample(metrics, series);
        (value >= least).then_some(value)
    })
    .await
}

/// Every value of `metric` whose labels contain `labels`.
fn values_of(metrics: &str, metric: &str, labels: &str) -> Vec<f64> {
    metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(metric)?.strip_prefix('{')?;
            let (series, value) = rest.rsplit_once("} ")?;
            series.contains(labels).then(|| value.trim().parse().ok())?
        })
        .collect()
}

fn member_id(text: &str) -> MemberId {
    let m = Member::parse(text).unwrap();
    MemberId {
        member_class: m.class,
        member_code: m.code,
        subsystem: m.subsystem,
    }
}

fn pension_application(request_id: &str) -> SubmitApplicationRequest {
    SubmitApplicationRequest {
        request_id: request_id.into(),
        service_id: "vsaa-old-age-pension".into(),
        form_version: "1".into(),
        data_json: std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../services/forms/seed/examples/vsaa-old-age-pension.valid.json"
        ))
        .unwrap(),
        municipality_code: "gulbene".into(),
        paper_intake: None,
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A federation with every service and an admin listener, re-reading its revocation list
/// every 100 ms.
async fn operated_world(backend: Backend) -> (World, SocketAddr) {
    let world = world_with(backend, |options| {
        options.admin = Some("127.0.0.1:0".parse().unwrap());
        options.reload_interval = Duration::from_millis(100);
    })
    .await;
    let admin = world.fed.admin.expect("an admin listener");
    (world, admin)
}

async fn signals_move_as_the_platform_works(backend: Backend) {
    let (World { fed, providers: _p }, admin) = operated_world(backend).await;
    onestop_integration_tests::await_serving(
        fed.gateway_client(INSTITUTION),
        "onestop.eaddress.v1.MessageService",
    )
    .await;
    let routing = |series: &str| format!("{series}{{destination=\"{PENSIONS}\"}}");
    let (_, before) = http_get(admin, "/metrics").await;

    // Readiness, as /readyz says it, per part: a part of this test's own, so that its value is
    // known (the federation's parts share their names with other tests' federations).
    let part = Readiness::process().part("operations_probe");
    let ready = r#"onestop_ready{part="operations_probe"}"#;
    let not_yet = onestop_platform::metrics::encode();
    part.set(true);
    let now_ready = onestop_platform::metrics::encode();
    drop(part);
    let gone = onestop_platform::metrics::encode();
    assert!(not_yet.contains(&format!("{ready} 0")), "{not_yet}");
    assert!(now_ready.contains(&format!("{ready} 1")), "{now_ready}");
    assert!(!gone.contains(ready), "a part that stopped leaves: {gone}");

    // An application waits in its destination's inbox: counted, and aged.
    ApplicationServiceClient::new(fed.gateway_client(CENTRE))
        .submit_application(pension_application("operations-1"))
        .await
        .unwrap();
    let waiting = routing("onestop_routing_inbox_unacknowledged_deliveries");
    let age = routing("onestop_routing_inbox_oldest_unacknowledged_age_seconds");
    scrape_until(admin, "the waiting delivery counted and aged", |metrics| {
        (sample(metrics, &waiting) >= 1.0 && sample(metrics, &age) > 0.0).then_some(())
    })
    .await;

    // Taken and acknowledged: both counted for the destination.
    let sent = routing("onestop_routing_deliveries_sent_total");
    let acknowledged = routing("onestop_routing_deliveries_acknowledged_total");
    let mut inbox = InboxServiceClient::new(fed.gateway_client(INSTITUTION));
    let pulled = inbox
        .pull_deliveries(PullDeliveriesRequest {
            inbox: Some(member_id(PENSIONS)),
            max_deliveries: 10,
        })
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert!(!pulled.is_empty());
    at_least(admin, &sent, sample(&before, &sent) + pulled.len() as f64).await;
    inbox
        .ack_deliveries(AckDeliveriesRequest {
            inbox: Some(member_id(PENSIONS)),
            delivery_ids: pulled.iter().map(|d| d.delivery_id.clone()).collect(),
        })
        .await
        .unwrap();
    at_least(
        admin,
        &acknowledged,
        sample(&before, &acknowledged) + pulled.len() as f64,
    )
    .await;

    // A delivery parked (as too many failed attempts leave it): counted as parked.
    ApplicationServiceClient::new(fed.gateway_client(CENTRE))
        .submit_application(pension_application("operations-2"))
        .await
        .unwrap();
    let db = onestop_platform::db::open(
        &DatabaseConfig::at(&fed.databases["routing"]),
        &onestop_routing::store::MIGRATIONS,
    )
    .await
    .unwrap();
    let parked = sqlx::query(
        "UPDATE deliveries SET state = 'parked', attempts = 5, park_time_ms = 0 \
         WHERE state = 'ready'",
    )
    .execute(&db.pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(parked, 1);
    at_least(
        admin,
        &routing("onestop_routing_inbox_parked_deliveries"),
        1.0,
    )
    .await;

    // A message to a resident, deemed delivered two working days after it is placed unless
    // opened first: counted as awaiting deemed delivery.
    let token = tokens(
        &login(
            &fed,
            CENTRE,
            "residents",
            onestop_integration_tests::oidc::LV_RESIDENT,
            onestop_integration_tests::oidc::ACR_HIGH,
            LevelOfAssurance::Unspecified,
        )
        .await
        .unwrap(),
    )
    .access_token
    .clone();
    MailboxServiceClient::new(fed.gateway_client(CENTRE))
        .activate_mailbox(bearer(
            ActivateMailboxRequest {
                notice_email: "janis@example.lv".into(),
            },
            &token,
        ))
        .await
        .unwrap();
    MessageServiceClient::new(fed.gateway_client(INSTITUTION))
        .send_message(SendMessageRequest {
            request_id: "operations-letter".into(),
            recipients: vec![RESIDENT.into()],
            subject: "Lēmums par pensijas piešķiršanu".into(),
            body: "Jums piešķirta vecuma pensija.".into(),
            document_type: "decision".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    at_least(
        admin,
        "onestop_eaddress_messages_awaiting_deemed_delivery",
        1.0,
    )
    .await;

    // The certificates the servers loaded: this federation's own, valid for a while yet.
    let (_, metrics) = http_get(admin, "/metrics").await;
    let expiry = "onestop_tls_certificate_expiry_timestamp_seconds";
    let pki = fed.pki.display().to_string();
    let servers = values_of(
        &metrics,
        expiry,
        &format!("certificate=\"server\",file=\"{pki}/"),
    );
    let ca = values_of(
        &metrics,
        expiry,
        &format!("certificate=\"ca\",file=\"{pki}/ca.pem\""),
    );
    assert!(servers.len() >= 4, "every server's certificate: {metrics}");
    assert!(!ca.is_empty(), "{metrics}");
    assert!(
        servers
            .iter()
            .chain(&ca)
            .all(|&not_after| not_after > unix_now() + 86_400.0),
        "{servers:?} {ca:?}"
    );

    // A revocation list that cannot be read: counted as a failed reload, the old one stays.
    let crl = fed.pki.join(onestop_platform::pki::CRL_FILE);
    let good = std::fs::read(&crl).expect("the federation's revocation list");
    let failures = r#"onestop_reload_failures_total{what="revocation_list"}"#;
    let failed_before = sample(&http_get(admin, "/metrics").await.1, failures);
    std::fs::write(&crl, "not a revocation list").unwrap();
    at_least(admin, failures, failed_before + 1.0).await;
    std::fs::write(&crl, good).unwrap();

    // The pools, sampled at every health probe (every 5 s).
    let probes = r#"onestop_db_pool_acquire_duration_seconds_count{database="routing"}"#;
    let (_, now) = http_get(admin, "/metrics").await;
    at_least(admin, probes, sample(&now, probes) + 1.0).await;
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert!(
        sample(
            &metrics,
            r#"onestop_db_pool_max_connections{database="routing"}"#
        ) >= 1.0,
        "{metrics}"
    );
    assert!(
        !values_of(
            &metrics,
            "onestop_db_pool_connections",
            "database=\"eaddress\""
        )
        .is_empty(),
        "{metrics}"
    );

    // Every metric the rules and dashboards name is one the processes export, now that every
    // service has done its work (a family shows once it has a series).
    let mut used = BTreeSet::new();
    let mut sources = vec![deploy_dir().join("prometheus/onestop-alerts.yml")];
    sources.extend(files_in(&deploy_dir().join("grafana"), "json"));
    for file in &sources {
        let names = metric_names(&std::fs::read_to_string(file).unwrap());
        assert!(!names.is_empty(), "{} names no metric", file.display());
        used.extend(names);
    }
    // A call forwarded and one refused, so that the gateway's families have series too.
    let mut centre = FormsServiceClient::new(fed.gateway_client(CENTRE));
    centre
        .get_form(GetFormRequest {
            name: "forms/vsaa-old-age-pension".into(),
        })
        .await
        .unwrap();
    centre
        .create_form(CreateFormRequest {
            request_id: "operations-form".into(),
            form_id: "operations".into(),
            ..Default::default()
        })
        .await
        .expect_err("the centre may not create forms");
    // Some families are registered as their part starts (the figures' first count, the first
    // health probe): asked again until they are there, within a bound.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    loop {
        tick.tick().await;
        let exported = exported(&http_get(admin, "/metrics").await.1);
        let missing: Vec<&String> = used.difference(&exported).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "used in deploy/ but exported by no process: {missing:?}"
        );
    }
    fed.stop().await;
}

/// The deploy/ directory.
fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Runs promtool; it must be there (Debian's `prometheus` package, which `.ci/run` installs).
fn promtool(args: &[&str], dir: &Path) {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool {args:?}: {e}; install it (Debian: apt-get install prometheus)")
        });
    assert!(
        output.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every `onestop_...` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("onestop_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // Not part of a longer word (such as a file name `docs/onestop_...`).
        let before = rest[..at].chars().next_back();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// The sample names of the families `/metrics` shows, from its `# TYPE` lines: a counter's
/// `_total`, a histogram's `_bucket`, `_sum` and `_count`.
fn exported(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        let Some(typed) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = typed.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|suffix| format!("{name}{suffix}")));
    }
    names
}

/// The names after `key:` on the lines of `yaml`.
fn values_after(yaml: &str, key: &str) -> BTreeSet<String> {
    yaml.lines()
        .filter_map(|line| {
            let value = line.trim().trim_start_matches("- ").strip_prefix(key)?;
            Some(value.trim().trim_matches('"').to_owned())
        })
        .collect()
}

fn files_in(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_pass_promtool_and_each_alert_is_tested_and_has_a_runbook() {
    let prometheus = deploy_dir().join("prometheus");
    let rules = prometheus.join("onestop-alerts.yml");
    let tests = prometheus.join("onestop-alerts.test.yml");
    promtool(&["check", "rules", "onestop-alerts.yml"], &prometheus);
    promtool(&["test", "rules", "onestop-alerts.test.yml"], &prometheus);

    // Every alert has unit tests and a runbook paragraph.
    let rules_text = std::fs::read_to_string(&rules).unwrap();
    let alerts = values_after(&rules_text, "alert:");
    assert!(alerts.len() >= 7, "{alerts:?}");
    let tested = values_after(&std::fs::read_to_string(&tests).unwrap(), "alertname:");
    assert_eq!(
        alerts, tested,
        "every alert, and only those, is unit-tested"
    );
    let operations = std::fs::read_to_string(deploy_dir().join("../docs/operations.md")).unwrap();
    for alert in &alerts {
        assert!(
            operations.contains(&format!("#### {alert}\n")),
            "docs/operations.md has no runbook for {alert}"
        );
    }
}
