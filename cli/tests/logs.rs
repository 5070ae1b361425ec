//! The logs an operator keeps: `onestop up` run as a user runs it, its standard error read
//! whole. At every level, no personal code, eIDAS identifier, message subject or body reaches
//! a log line, whatever path a call takes; and a member flooding the gateway past its rate
//! writes a few lines a second, not one per refused call.

// In tests a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use onestop_proto::eaddress::v1::SendMessageRequest;
use onestop_proto::eaddress::v1::message_service_client::MessageServiceClient;
use onestop_proto::forms::v1::GetFormRequest;
use onestop_proto::forms::v1::forms_service_client::FormsServiceClient;
use onestop_proto::routing::v1::application_service_client::ApplicationServiceClient;
use onestop_proto::routing::v1::{GetApplicationRequest, SubmitApplicationRequest};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::Channel;

/// A resident of the examples; their personal code must never be logged.
const PERSONAL_CODE: &str = "140261-14282";
const EIDAS_IDENTIFIER: &str = "EE/LV/38001085718";
const SUBJECT: &str = "Lēmums par pabalstu Nr. 4711-slepens";
const BODY: &str = "Jums piešķirts pabalsts; konta Nr. LV80BANK0000435195001";

struct Up {
    child: tokio::process::Child,
    gateway: String,
    log: Arc<Mutex<Vec<String>>>,
    /// Reads standard error until the process closes it.
    reader: tokio::task::JoinHandle<()>,
    data: tempfile::TempDir,
}

/// Starts `onestop up` with `filter` as its log filter; its standard error is kept.
async fn up(filter: &str) -> Up {
    let data = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_onestop"))
        .args(["up", "--listen", "127.0.0.1:0", "--log-json", "--data-dir"])
        .arg(data.path())
        .env("RUST_LOG", filter)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut errors = BufReader::new(child.stderr.take().unwrap()).lines();
    let reader = {
        let log = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = errors.next_line().await {
                log.lock().unwrap().push(line);
            }
        })
    };
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let gateway = support::gateway_address(&mut lines).await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let up = Up {
        child,
        gateway,
        log,
        reader,
        data,
    };
    // Ready when forms answers through the gateway.
    let mut forms = FormsServiceClient::new(up.channel("demo-centre"));
    tokio::time::timeout(Duration::from_secs(30), async {
        while forms.get_form(get_form()).await.is_err() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("forms serves within 30 s");
    up
}

impl Up {
    fn channel(&self, name: &str) -> Channel {
        support::member_channel(&self.gateway, &self.data.path().join("pki"), name)
    }

    /// Stops the process (SIGTERM, as an operator does) and returns everything it logged.
    async fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().unwrap().to_string();
        std::process::Command::new("kill")
            .args(["-s", "TERM", &pid])
            .status()
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("stopped within 30 s")
            .unwrap();
        assert!(status.success(), "{status}");
        // The reader has the last lines once the pipe closes, which it did with the process.
        tokio::time::timeout(Duration::from_secs(5), &mut self.reader)
            .await
            .expect("the log is read to its end")
            .unwrap();
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

fn get_form() -> GetFormRequest {
    GetFormRequest {
        name: "forms/vsaa-old-age-pension".into(),
    }
}

fn pension_data() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../services/forms/seed/examples/vsaa-old-age-pension.valid.json"
        ))
        .unwrap(),
    )
    .unwrap()
}

fn submission(request_id: &str, data: &serde_json::Value) -> SubmitApplicationRequest {
    SubmitApplicationRequest {
        request_id: request_id.into(),
        service_id: "vsaa-old-age-pension".into(),
        form_version: "1".into(),
        data_json: data.to_string(),
        municipality_code: "gulbene".into(),
        paper_intake: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_names_a_person_or_quotes_a_message() {
    // Everything, down to the libraries' trace output.
    let up = up("trace").await;
    let mut desk = ApplicationServiceClient::new(up.channel("demo-centre"));
    // Accepted, naming the resident.
    let data = pension_data();
    assert_eq!(data["applicant"]["personal_code"], PERSONAL_CODE);
    let receipt = desk
        .submit_application(submission("logged-1", &data))
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    // Refused: bad data around the code, a personal code where a date goes, the code as a
    // request id and as an application's name.
    let mut wrong = data.clone();
    wrong["pension_start_date"] = PERSONAL_CODE.into();
    wrong["applicant"]["email"] = format!("{PERSONAL_CODE}@").into();
    desk.submit_application(submission("logged-2", &wrong))
        .await
        .unwrap_err();
    desk.submit_application(submission(PERSONAL_CODE, &wrong))
        .await
        .unwrap_err();
    desk.get_application(GetApplicationRequest {
        name: format!("applications/{PERSONAL_CODE}"),
    })
    .await
    .unwrap_err();
    desk.get_application(GetApplicationRequest {
        name: receipt.application.clone(),
    })
    .await
    .unwrap();
    // A forged person and a token that is no token, both naming the resident.
    let mut forged = tonic::Request::new(GetApplicationRequest {
        name: receipt.application.clone(),
    });
    forged.metadata_mut().insert(
        "x-onestop-person",
        format!("{{\"sub\":\"lv:{PERSONAL_CODE}\"}}")
            .parse()
            .unwrap(),
    );
    forged.metadata_mut().insert(
        "authorization",
        format!("Bearer lv:{PERSONAL_CODE}").parse().unwrap(),
    );
    desk.get_application(forged).await.unwrap_err();
    // Official messages to people without an e-address, and to one the sender may not name.
    let mut mail = MessageServiceClient::new(up.channel("demo-institution"));
    for (id, recipient) in [
        ("m-1", format!("lv:{PERSONAL_CODE}")),
        ("m-2", format!("eidas:{EIDAS_IDENTIFIER}")),
        ("m-3", format!("lv:{PERSONAL_CODE}x")),
    ] {
        let _ = mail
            .send_message(SendMessageRequest {
                request_id: id.into(),
                sender: "member:GOV/VSAA/pensions".into(),
                recipients: vec![recipient],
                subject: SUBJECT.into(),
                body: BODY.into(),
                document_type: "decision".into(),
                ..Default::default()
            })
            .await;
    }
    let log = up.stop().await;
    assert!(log.len() > 100, "the trace level wrote {} lines", log.len());
    let masked = log
        .iter()
        .filter(|line| line.contains("******-*****"))
        .count();
    eprintln!(
        "{} log lines, {masked} with a personal code masked",
        log.len()
    );
    let digits = PERSONAL_CODE.replace('-', "");
    for secret in [
        PERSONAL_CODE,
        &digits,
        "38001085718",
        SUBJECT,
        "4711-slepens",
        BODY,
        "LV80BANK",
    ] {
        let leaks: Vec<&String> = log.iter().filter(|line| line.contains(secret)).collect();
        assert!(
            leaks.is_empty(),
            "`{secret}` is in {} log lines, such as {}",
            leaks.len(),
            leaks[0]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_refused_thousands_of_times_writes_a_few_lines() {
    let up = up("info").await;
    let channel = up.channel("demo-centre");
    let started = std::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    // Three times its burst of 1,000: many are refused as RATE_LIMITED.
    for worker in 0..30 {
        let mut forms = FormsServiceClient::new(channel.clone());
        calls.spawn(async move {
            let mut refused = 0;
            for _ in 0..100 {
                if forms.get_form(get_form()).await.is_err() {
                    refused += 1;
                }
            }
            let _ = worker;
            refused
        });
    }
    let mut refused = 0;
    while let Some(count) = calls.join_next().await {
        refused += count.unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    let log = up.stop().await;
    let limited: Vec<&String> = log
        .iter()
        .filter(|line| line.contains("RATE_LIMITED"))
        .collect();
    eprintln!(
        "{refused} calls refused in {seconds:.1} s; {} log lines name the refusal",
        limited.len()
    );
    // Past its burst of 1,000, most of the rest are refused (how many depends on how long the
    // gateway holds the member's connections between them).
    assert!(refused >= 200, "only {refused} refused");
    // A line for the first refusal of each second and one summary after it.
    let bound = 2 * (seconds.ceil() as usize + 2);
    assert!(
        limited.len() <= bound,
        "{} lines for {refused} refusals in {seconds:.1} s",
        limited.len()
    );
    let counted: u64 = limited
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|line| line["fields"]["more"].as_u64())
        .sum();
    assert!(
        counted as usize + limited.len() >= refused,
        "the summaries count {counted} of {refused} refusals"
    );
}
