//! `onestop up` as a user runs it: the real binary starts the federation, answers a health
//! check through the gateway with the demo institution's certificate, keeps what it
//! acknowledged when it is killed, and stops cleanly on SIGTERM.

// In tests a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use onestop_platform::tls::{self, TlsFiles, TlsMaterial};
use onestop_proto::forms::v1::forms_service_client::FormsServiceClient;
use onestop_proto::forms::v1::{CreateFormRequest, GetFormRequest};
use onestop_proto::r#type::v1::{LocalizedText, MemberId};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

struct Running {
    child: Child,
    /// Everything the process prints after its address, read as it comes so that the pipe
    /// never fills up and blocks the process; the task ends when the process closes it.
    output: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
    channel: Channel,
    gateway: String,
}

impl Running {
    fn printed(&self, needle: &str) -> bool {
        self.output
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains(needle))
    }
}

/// Keeps reading a process's standard output into a shared list.
fn keep_reading(
    mut lines: Lines<BufReader<ChildStdout>>,
) -> (Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let output = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let output = output.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                output.lock().unwrap().push(line);
            }
        })
    };
    (output, reader)
}

/// Starts `onestop up` on a free port and waits until forms serves through the gateway.
async fn up(data: &Path) -> Running {
    up_with_open_files(data, None).await
}

/// Starts `onestop up` with at most `open_files` file descriptors, when given.
async fn up_with_open_files(data: &Path, open_files: Option<u32>) -> Running {
    let binary = env!("CARGO_BIN_EXE_onestop");
    let mut command = match open_files {
        // prlimit sets the limit and then becomes the program (same process).
        Some(limit) => {
            let mut command = Command::new("prlimit");
            command
                .arg(format!("--nofile={limit}:{limit}"))
                .arg("--")
                .arg(binary);
            command
        }
        None => Command::new(binary),
    };
    let mut child = command
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("onestop starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    // The gateway's address is printed once everything is listening.
    let gateway = support::gateway_address(&mut lines).await;
    // (The lines reader below takes over from here.)

    // The printed command names the demo certificate; use it.
    let pki = data.join("pki");
    let channel = support::member_channel(&gateway, &pki, "demo-institution");
    let mut health = HealthClient::new(channel.clone());
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
    let (output, reader) = keep_reading(lines);
    // The logs, on standard error, into the same list.
    let errors = BufReader::new(child.stderr.take().unwrap()).lines();
    {
        let output = output.clone();
        tokio::spawn(async move {
            let mut errors = errors;
            while let Ok(Some(line)) = errors.next_line().await {
                output.lock().unwrap().push(line);
            }
        });
    }
    Running {
        child,
        output,
        reader,
        channel,
        gateway,
    }
}

/// CPU seconds a process has used so far (user and system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

fn signal(child: &Child, name: &str) {
    let pid = child.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

fn text(en: &str) -> Option<LocalizedText> {
    Some(LocalizedText {
        lv: format!("{en} (lv)"),
        en: en.into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_keeps_what_it_acknowledged_and_stops_on_sigterm() {
    let data = tempfile::tempdir().unwrap();

    // Acknowledged, then killed without warning.
    let mut first = up(data.path()).await;
    let mut forms = FormsServiceClient::new(first.channel.clone());
    forms
        .create_form(CreateFormRequest {
            request_id: "durable-1".into(),
            form_id: "durable-form".into(),
            owner: Some(MemberId {
                member_class: "GOV".into(),
                member_code: "VSAA".into(),
                subsystem: String::new(),
            }),
            title: text("Durable"),
            description: text("Survives a killed process"),
            schema_json: r#"{"type": "object", "properties": {"a": {"type": "string"}}}"#.into(),
            fields: Vec::new(),
        })
        .await
        .expect("the form is created");
    signal(&first.child, "KILL");
    first.child.wait().await.unwrap();

    // The second start finds the PKI, the policy and the acknowledged form.
    let mut second = up(data.path()).await;
    let mut forms = FormsServiceClient::new(second.channel.clone());
    let form = forms
        .get_form(GetFormRequest {
            name: "forms/durable-form".into(),
        })
        .await
        .expect("the acknowledged form survived the kill")
        .into_inner()
        .form
        .unwrap();
    assert_eq!(form.title.unwrap().en, "Durable");

    // SIGTERM: a clean stop, exit status 0.
    signal(&second.child, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), second.child.wait())
        .await
        .expect("onestop stopped within 30 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "onestop exited with {status}");
    second.reader.await.unwrap();
    let rest = second.output.lock().unwrap().clone();
    assert!(rest.iter().any(|l| l == "onestop stopped."), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_gateway_backs_off_and_recovers() {
    let data = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let running = up_with_open_files(data.path(), Some(128)).await;
    let pid = running.child.id().unwrap();
    let gateway: std::net::SocketAddr = running.gateway.parse().unwrap();

    // Connections that never start TLS, from enough addresses that the per-address limit does
    // not stop them before the process runs out of descriptors.
    let mut connecting = tokio::task::JoinSet::new();
    for source in 2..=40u8 {
        for _ in 0..12 {
            connecting.spawn(async move {
                let socket = tokio::net::TcpSocket::new_v4().ok()?;
                socket
                    .bind(std::net::SocketAddr::from(([127, 0, 0, source], 0)))
                    .ok()?;
                // Once the listen backlog is full too, the kernel drops further attempts.
                tokio::time::timeout(Duration::from_secs(2), socket.connect(gateway))
                    .await
                    .ok()?
                    .ok()
            });
        }
    }
    let mut held = Vec::new();
    while let Some(connected) = connecting.join_next().await {
        held.extend(connected.unwrap());
    }
    assert!(
        held.len() > 150,
        "only {} connections were made",
        held.len()
    );

    // Out of descriptors, accept fails; the gateway pauses between tries instead of spinning.
    let failing = async {
        while !running.printed("Too many open files") {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), failing)
        .await
        .expect("the process ran out of descriptors");
    let before = cpu_seconds(pid);
    let window = std::time::Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..10 {
        ticker.tick().await;
    }
    let used = cpu_seconds(pid) - before;
    let wall = window.elapsed().as_secs_f64();
    eprintln!("out of descriptors: {used:.2} s of CPU in {wall:.2} s");
    assert!(
        used < 0.5 * wall,
        "{used:.2} s of CPU in {wall:.2} s: spinning"
    );

    // The attack ends; new connections are accepted again.
    drop(held);
    let material = TlsMaterial::load(&TlsFiles::in_pki_dir(
        &data.path().join("pki"),
        "demo-centre",
    ))
    .unwrap();
    let config = tls::client_config(&material, None).unwrap();
    let recovered = async {
        loop {
            let channel = onestop_platform::client::channel(
                &running.gateway,
                "localhost",
                config.clone(),
                Duration::from_secs(30),
            )
            .unwrap();
            let mut forms = FormsServiceClient::new(channel);
            let answer = forms
                .get_form(GetFormRequest {
                    name: "forms/vsaa-old-age-pension".into(),
                })
                .await;
            if answer.is_ok() {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), recovered)
        .await
        .expect("a member connects again once descriptors are free");
    eprintln!("recovered after {:?}", started.elapsed());
    drop(running);
}

/// A channel to the gateway of a running `onestop up` with a demo certificate.
fn demo_channel(data: &Path, gateway: &str, name: &str) -> Channel {
    support::member_channel(gateway, &data.join("pki"), name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applications_acknowledged_before_a_kill_are_all_delivered() {
    use onestop_proto::routing::v1::application_service_client::ApplicationServiceClient;
    use onestop_proto::routing::v1::inbox_service_client::InboxServiceClient;
    use onestop_proto::routing::v1::*;

    const FILED: usize = 40;
    const ACKED: usize = 10;
    let data = tempfile::tempdir().unwrap();
    let inbox = || {
        Some(MemberId {
            member_class: "GOV".into(),
            member_code: "VSAA".into(),
            subsystem: "pensions".into(),
        })
    };
    let form = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../services/forms/seed/examples/vsaa-old-age-pension.valid.json"
    ))
    .unwrap();

    // Applications filed concurrently by the demo centre; each acknowledged one is counted.
    let first = up(data.path()).await;
    let centre = demo_channel(data.path(), &first.gateway, "demo-centre");
    let mut filing = tokio::task::JoinSet::new();
    for i in 0..FILED {
        let mut client = ApplicationServiceClient::new(centre.clone());
        let data_json = form.clone();
        filing.spawn(async move {
            client
                .submit_application(SubmitApplicationRequest {
                    request_id: format!("kill-{i}"),
                    service_id: "vsaa-old-age-pension".into(),
                    form_version: "1".into(),
                    data_json,
                    municipality_code: "gulbene".into(),
                    paper_intake: None,
                })
                .await
                .expect("the application is accepted")
                .into_inner()
                .receipt
                .unwrap()
                .application
        });
    }
    let mut filed = std::collections::BTreeSet::new();
    while let Some(name) = filing.join_next().await {
        filed.insert(name.unwrap());
    }
    assert_eq!(filed.len(), FILED);
    // The institution takes and acknowledges some of them before the kill.
    let mut institution = InboxServiceClient::new(first.channel.clone());
    let pulled = institution
        .pull_deliveries(PullDeliveriesRequest {
            inbox: inbox(),
            max_deliveries: ACKED as u32,
        })
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert_eq!(pulled.len(), ACKED);
    let acked = institution
        .ack_deliveries(AckDeliveriesRequest {
            inbox: inbox(),
            delivery_ids: pulled.iter().map(|d| d.delivery_id.clone()).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(acked.acknowledged.len(), ACKED);
    let mut first = first;
    signal(&first.child, "KILL");
    first.child.wait().await.unwrap();

    // After the restart a consumer's stream gets every other one, and none acknowledged.
    let second = up(data.path()).await;
    let (requests, incoming) = tokio::sync::mpsc::channel(4);
    requests
        .send(StreamInboxRequest {
            kind: Some(stream_inbox_request::Kind::Open(OpenInbox {
                inbox: inbox(),
                max_unacknowledged: 50,
            })),
        })
        .await
        .unwrap();
    let mut stream = InboxServiceClient::new(second.channel.clone())
        .stream_inbox(tokio_stream::wrappers::ReceiverStream::new(incoming))
        .await
        .unwrap()
        .into_inner();
    let mut delivered = std::collections::BTreeSet::new();
    while delivered.len() < FILED - ACKED {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("a delivery within 30 s")
            .unwrap()
            .unwrap();
        if let Some(stream_inbox_response::Kind::Delivery(d)) = message.kind {
            let name = d.application.unwrap().name;
            assert!(
                !pulled
                    .iter()
                    .any(|p| p.application.as_ref().unwrap().name == name),
                "{name} was acknowledged before the kill"
            );
            delivered.insert(name);
        }
    }
    let acked_names: std::collections::BTreeSet<String> = pulled
        .into_iter()
        .map(|d| d.application.unwrap().name)
        .collect();
    let all: std::collections::BTreeSet<String> = delivered.union(&acked_names).cloned().collect();
    assert_eq!(all, filed, "every acknowledged application was delivered");
    drop(requests);
}
