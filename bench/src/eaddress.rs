//! The e-address through the gateway, as separate processes over mutual TLS (SQLite):
//!
//! 1. a 1 GiB attachment uploaded and downloaded as streams, generated and checked on the fly
//!    on the client's side, with the e-address process's resident memory sampled throughout
//!    (it must stay flat: content goes to and from disk in chunks);
//! 2. one message to 10,000 recipients: how long the call takes, and how long until every
//!    recipient's evidence (accepted, placed) is signed into the log;
//! 3. small messages to one recipient from 32 concurrent senders: messages a second, p50, p99.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use onestop_proto::eaddress::v1::evidence_service_client::EvidenceServiceClient;
use onestop_proto::eaddress::v1::message_service_client::MessageServiceClient;
use onestop_proto::eaddress::v1::*;
use tonic::transport::Channel;

use crate::proxies::{Process, channel, free_port, listening, run};
use crate::routing::rss_mib;
use crate::say;

const GIB: u64 = 1 << 30;
const CHUNK: usize = 1 << 20;
const COMPANY: &str = "company:40003012345";

struct Federation {
    _dir: tempfile::TempDir,
    pki: std::path::PathBuf,
    gateway: String,
    eaddress: Process,
    _gateway: Process,
}

async fn start(binary: &Path) -> anyhow::Result<Federation> {
    let dir = tempfile::tempdir()?;
    let pki = dir.path().join("pki");
    let pki_arg = pki.to_string_lossy().into_owned();
    run(binary, &["pki", "init", "--dir", &pki_arg])?;
    for (name, subject) in [
        ("eaddress", ["--platform", "eaddress"]),
        ("gateway", ["--platform", "gateway"]),
        ("institution", ["--member", "GOV/VSAA/pensions"]),
    ] {
        let mut args = vec!["pki", "issue", "--dir", &pki_arg, "--name", name];
        args.extend(subject);
        args.push("--serve-localhost");
        run(binary, &args)?;
    }
    let file = |name: &str| pki.join(name).to_string_lossy().into_owned();
    let tls = |name: &str| {
        format!(
            "ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            file("ca.pem"),
            file(&format!("{name}.pem")),
            file(&format!("{name}.key"))
        )
    };
    let quiet = "[telemetry]\nlog_filter = \"warn\"\n";
    let (eaddress_port, gateway_port) = (free_port()?, free_port()?);
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let write = |name: &str, text: String| -> anyhow::Result<std::path::PathBuf> {
        let path = dir.path().join(name);
        std::fs::write(&path, text)?;
        Ok(path)
    };
    let eaddress_config = write(
        "eaddress.toml",
        format!(
            "[server]\nlisten = \"127.0.0.1:{eaddress_port}\"\n[server.tls]\n{}\n\
             [server.limits]\nrequest_timeout_ms = 3600000\n\
             [database]\nurl = \"sqlite://{}\"\nmax_connections = 4\n\
             [eaddress]\nattachments_dir = \"{}\"\nevidence_key_dir = \"{}\"\n\
             generate_evidence_key = true\nmax_attachment_bytes = {}\n{quiet}",
            tls("eaddress"),
            path("eaddress.db"),
            path("attachments"),
            path("keys"),
            2 * GIB,
        ),
    )?;
    let policy = write(
        "policy.toml",
        "[[allow]]\nmember = \"GOV/VSAA\"\nmethods = [\"onestop.eaddress.v1.MessageService/*\", \
         \"onestop.eaddress.v1.EvidenceService/*\"]\n"
            .into(),
    )?;
    let routes: String = ["MailboxService", "MessageService", "EvidenceService"]
        .iter()
        .map(|s| {
            format!(
                "[routes.\"onestop.eaddress.v1.{s}\"]\naddresses = [\"127.0.0.1:{eaddress_port}\"]\ncomponent = \"eaddress\"\n"
            )
        })
        .collect();
    let gateway_config = write(
        "gateway.toml",
        format!(
            "[server]\nlisten = \"127.0.0.1:{gateway_port}\"\n[server.tls]\n{}\n\
             [server.limits]\nmax_concurrent_streams = 1000\nmax_concurrent_requests = 20000\n\
             [upstream.tls]\n{}\n{routes}\
             [gateway]\npolicy = \"{}\"\nrate_per_second = 10000000\nburst = 10000000\n\
             max_in_flight_per_member = 4096\n\
             [gateway.method_deadlines_ms]\n\
             \"onestop.eaddress.v1.MessageService/UploadAttachment\" = 0\n\
             \"onestop.eaddress.v1.MessageService/DownloadAttachment\" = 0\n{quiet}",
            tls("gateway"),
            tls("gateway"),
            policy.display()
        ),
    )?;
    let logs = dir.path();
    let serve = |service: &'static str, config: &Path| -> anyhow::Result<Process> {
        Process::start(
            service,
            Command::new(binary)
                .args(["serve", service, "--config"])
                .arg(config),
            &logs.join(format!("{service}.log")),
        )
    };
    let mut eaddress = serve("eaddress", &eaddress_config)?;
    listening(
        &mut eaddress,
        eaddress_port,
        "the e-address",
        &logs.join("eaddress.log"),
    )
    .await?;
    let mut gateway = serve("gateway", &gateway_config)?;
    listening(
        &mut gateway,
        gateway_port,
        "the gateway",
        &logs.join("gateway.log"),
    )
    .await?;
    Ok(Federation {
        pki,
        gateway: format!("127.0.0.1:{gateway_port}"),
        eaddress,
        _gateway: gateway,
        _dir: dir,
    })
}

/// The `i`-th chunk of the test content: a pattern that differs from chunk to chunk.
fn chunk(i: u64) -> Vec<u8> {
    (0..CHUNK as u64)
        .map(|j| (i.wrapping_mul(31).wrapping_add(j * 7) % 251) as u8)
        .collect()
}

/// Samples a process's resident memory every 100 ms until stopped; the peak, in MiB.
fn sample_peak(pid: u32) -> (Arc<AtomicBool>, tokio::task::JoinHandle<f64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let task = tokio::spawn(async move {
        let mut peak: f64 = 0.0;
        while !stopping.load(Ordering::Relaxed) {
            peak = peak.max(rss_mib(pid));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        peak.max(rss_mib(pid))
    });
    (stop, task)
}

async fn big_attachment(
    fed: &Federation,
    messages: &mut MessageServiceClient<Channel>,
) -> anyhow::Result<()> {
    let chunks = GIB / CHUNK as u64;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for i in 0..chunks {
        context.update(&chunk(i));
    }
    let sha256 = hex::encode(context.finish().as_ref());
    let pid = fed.eaddress.child.id();
    let before = rss_mib(pid);

    let (stop, peak) = sample_peak(pid);
    let started = Instant::now();
    let header = UploadAttachmentRequest {
        part: Some(upload_attachment_request::Part::Header(UploadHeader {
            size: GIB,
            sha256: sha256.clone(),
        })),
    };
    let parts = futures_util::stream::iter(std::iter::once(header).chain((0..chunks).map(|i| {
        UploadAttachmentRequest {
            part: Some(upload_attachment_request::Part::Chunk(chunk(i))),
        }
    })));
    let uploaded = messages.upload_attachment(parts).await?.into_inner();
    let upload_time = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let upload_peak = peak.await?;
    anyhow::ensure!(uploaded.sha256 == sha256, "the upload's digest differs");

    let sent = messages
        .send_message(SendMessageRequest {
            request_id: "big".into(),
            recipients: vec![COMPANY.into()],
            subject: "Liels pielikums".into(),
            document_type: "letter".into(),
            attachments: vec![AttachmentRef {
                sha256: sha256.clone(),
                file_name: "big.bin".into(),
                media_type: "application/octet-stream".into(),
            }],
            ..Default::default()
        })
        .await?
        .into_inner();
    let (stop, peak) = sample_peak(pid);
    let started = Instant::now();
    let mut stream = messages
        .download_attachment(DownloadAttachmentRequest {
            name: sent.name.clone(),
            mailbox: String::new(),
            sha256: sha256.clone(),
        })
        .await?
        .into_inner();
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut received = 0u64;
    while let Some(part) = stream.message().await? {
        received += part.chunk.len() as u64;
        context.update(&part.chunk);
    }
    let download_time = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let download_peak = peak.await?;
    let matched = received == GIB && hex::encode(context.finish().as_ref()) == sha256;
    let mb = GIB as f64 / 1e6;
    say(&format!(
        "\nE-address, 1 GiB attachment through the gateway: upload {:.0} MB/s (e-address RSS peak \
         {upload_peak:.0} MiB, from {before:.0}); download {:.0} MB/s (peak {download_peak:.0} MiB), \
         content {}",
        mb / upload_time.as_secs_f64(),
        mb / download_time.as_secs_f64(),
        if matched { "identical" } else { "DIFFERENT" }
    ));
    Ok(())
}

async fn many_recipients(
    fed: &Federation,
    messages: &mut MessageServiceClient<Channel>,
) -> anyhow::Result<()> {
    let recipients: Vec<String> = (0..10_000).map(|i| format!("company:4{i:010}")).collect();
    let started = Instant::now();
    let sent = messages
        .send_message(SendMessageRequest {
            request_id: "many".into(),
            recipients,
            subject: "Paziņojums visiem".into(),
            body: "Paziņojums par izmaiņām.".into(),
            document_type: "letter".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let answered = started.elapsed();
    // Recipients are placed in the order of their addresses: when the last one's records are
    // signed and none of the message's waits, every recipient's are.
    let last = "company:40000009999";
    let mut evidence = EvidenceServiceClient::new(channel(&fed.gateway, &fed.pki, "institution")?);
    let complete = loop {
        let answer = evidence
            .get_evidence_bundle(GetEvidenceBundleRequest {
                name: sent.name.clone(),
                recipient: last.into(),
            })
            .await?
            .into_inner();
        let bundle: serde_json::Value = serde_json::from_str(&answer.bundle_json)?;
        let entries = bundle["entries"].as_array().map_or(0, Vec::len);
        if answer.pending_records == 0 && entries == 2 {
            break started.elapsed();
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the evidence of 10,000 recipients was not complete within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    say(&format!(
        "E-address, one message to 10,000 recipients: the call answered in {:.0} ms; every \
         recipient placed, with its accepted and placed records signed into the log, after {:.1} s",
        answered.as_secs_f64() * 1000.0,
        complete.as_secs_f64()
    ));
    Ok(())
}

async fn small_messages(fed: &Federation, seconds: u64) -> anyhow::Result<()> {
    const SENDERS: usize = 32;
    let until = Instant::now() + Duration::from_secs(seconds);
    let channel = channel(&fed.gateway, &fed.pki, "institution")?;
    let mut tasks = Vec::new();
    for sender in 0..SENDERS {
        let mut messages = MessageServiceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Histogram::<u64>::new(3)?;
            let mut n = 0u64;
            while Instant::now() < until {
                let started = Instant::now();
                messages
                    .send_message(SendMessageRequest {
                        request_id: format!("small-{sender}-{n}"),
                        recipients: vec![COMPANY.into()],
                        subject: "Atgādinājums".into(),
                        body: "Lūdzu iesniegt dokumentus.".into(),
                        document_type: "letter".into(),
                        ..Default::default()
                    })
                    .await?;
                latencies.record(started.elapsed().as_micros() as u64)?;
                n += 1;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Histogram::<u64>::new(3)?;
    for task in tasks {
        all.add(task.await??)?;
    }
    say(&format!(
        "E-address, small messages through the gateway from {SENDERS} senders, {seconds} s: \
         {:.0} messages/s, p50 {:.1} ms, p99 {:.1} ms",
        all.len() as f64 / seconds as f64,
        all.value_at_quantile(0.5) as f64 / 1000.0,
        all.value_at_quantile(0.99) as f64 / 1000.0
    ));
    Ok(())
}

/// The whole measurement.
pub async fn measure(seconds: u64) -> anyhow::Result<()> {
    let binary = crate::proxies::onestop_binary()?;
    let fed = start(&binary).await?;
    let mut messages = MessageServiceClient::new(channel(&fed.gateway, &fed.pki, "institution")?)
        .max_decoding_message_size(4 << 20);
    big_attachment(&fed, &mut messages).await?;
    many_recipients(&fed, &mut messages).await?;
    small_messages(&fed, seconds).await?;
    Ok(())
}
