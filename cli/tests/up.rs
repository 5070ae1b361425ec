//! `onestop up` as a user runs it: the real binary starts the federation, answers a health
//! check through the gateway with the demo institution's certificate, and stops cleanly on
//! SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use onestop_platform::tls::{self, TlsFiles, TlsMaterial};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_through_the_gateway_and_stops_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_onestop"))
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("onestop starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    // The gateway's address is printed once everything is listening.
    let gateway = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.strip_prefix("gateway: ") {
                return rest.split_whitespace().next().unwrap().to_owned();
            }
        }
        panic!("onestop exited without printing the gateway address");
    })
    .await
    .expect("onestop printed its address within 60 s");

    // The printed command names the demo certificate; use it for a health check.
    let pki = data.path().join("pki");
    let material = TlsMaterial::load(&TlsFiles::in_pki_dir(&pki, "demo-institution")).unwrap();
    let config = tls::client_config(&material).unwrap();
    let channel =
        onestop_platform::client::channel(&gateway, "localhost", config, Duration::from_secs(30))
            .unwrap();
    let mut health = HealthClient::new(channel);
    let mut updates = health
        .watch(HealthCheckRequest {
            service: "onestop.forms.v1.FormsService".into(),
        })
        .await
        .expect("health through the gateway")
        .into_inner();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(update) = updates.message().await.unwrap() {
            if update.status() == ServingStatus::Serving {
                return;
            }
        }
        panic!("the health stream ended");
    })
    .await
    .expect("forms is serving through the gateway");
    drop(updates);

    // SIGTERM: a clean stop, exit status 0.
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("onestop stopped within 30 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "onestop exited with {status}");
    let mut rest = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        rest.push(line);
    }
    assert!(rest.iter().any(|l| l == "onestop stopped."), "{rest:?}");

    // A second start finds the PKI, policy and seeded forms of the first.
    let again = Command::new(env!("CARGO_BIN_EXE_onestop"))
        .args(["pki", "show", "--dir"])
        .arg(&pki)
        .output()
        .await
        .unwrap();
    let shown = String::from_utf8_lossy(&again.stdout);
    assert!(shown.contains("spiffe://onestop.lv/member/GOV/VSAA/pensions"), "{shown}");
}
