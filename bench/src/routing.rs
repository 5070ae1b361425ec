//! The application path end to end, as separate processes over mutual TLS: a member system
//! submits through the gateway, routing validates through the forms service, stores, routes
//! and streams to the institution's consumers, which acknowledge. On SQLite and on PostgreSQL,
//! at full speed (throughput) and at a fixed rate (latency): accepted applications a second,
//! p50, p95 and p99 of submission and of submit-to-delivery. Then idle inbox streams held
//! open through the gateway, and the resident memory that costs.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use onestop_proto::routing::v1::application_service_client::ApplicationServiceClient;
use onestop_proto::routing::v1::inbox_service_client::InboxServiceClient;
use onestop_proto::routing::v1::*;
use onestop_proto::r#type::v1::MemberId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::proxies::{Process, channel, free_port, listening, run};
use crate::say;

/// Consumers of the inbox during the throughput and latency runs, and each one's window.
const CONSUMERS: usize = 4;
const WINDOW: u32 = 200;

fn inbox() -> Option<MemberId> {
    Some(MemberId {
        member_class: "GOV".into(),
        member_code: "VSAA".into(),
        subsystem: "pensions".into(),
    })
}

/// When each application was submitted, or delivered if its delivery came first: the second
/// of the two events gives the submit-to-delivery time.
#[derive(Default)]
struct Timings {
    seen: Mutex<HashMap<String, (bool, Instant)>>,
    delivery: Mutex<Option<Histogram<u64>>>,
}

impl Timings {
    fn event(&self, name: String, submitted: bool, at: Instant) {
        let other = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            match seen.remove(&name) {
                Some(first) => Some(first),
                None => {
                    seen.insert(name, (submitted, at));
                    None
                }
            }
        };
        if let Some((first_was_submit, first_at)) = other {
            let latency = if first_was_submit {
                at.saturating_duration_since(first_at)
            } else {
                // Delivered before the submitter saw its reply: the delivery came first.
                first_at.saturating_duration_since(at)
            };
            if let Some(h) = self
                .delivery
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                let _ = h.record(latency.as_micros() as u64);
            }
        }
    }
}

struct Federation {
    dir: tempfile::TempDir,
    pki: std::path::PathBuf,
    gateway: String,
    routing: Process,
    gateway_process: Process,
    _forms: Process,
}

async fn start(binary: &Path, database: Option<String>) -> anyhow::Result<Federation> {
    let dir = tempfile::tempdir()?;
    let pki = dir.path().join("pki");
    let pki_arg = pki.to_string_lossy().into_owned();
    run(binary, &["pki", "init", "--dir", &pki_arg])?;
    for (name, subject) in [
        ("forms", ["--platform", "forms"]),
        ("routing", ["--platform", "routing"]),
        ("gateway", ["--platform", "gateway"]),
        ("centre", ["--member", "MUN/GULBENE/kac"]),
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
    let (forms_port, routing_port, gateway_port) = (free_port()?, free_port()?, free_port()?);
    let sqlite = |name: &str| format!("sqlite://{}", dir.path().join(name).display());
    let write = |name: &str, text: String| -> anyhow::Result<std::path::PathBuf> {
        let path = dir.path().join(name);
        std::fs::write(&path, text)?;
        Ok(path)
    };
    let forms_config = write(
        "forms.toml",
        format!(
            "[server]\nlisten = \"127.0.0.1:{forms_port}\"\n[server.tls]\n{}\n\
             [database]\nurl = \"{}\"\n{quiet}",
            tls("forms"),
            sqlite("forms.db")
        ),
    )?;
    // SQLite takes one writer at a time: more connections only wait on its lock.
    let connections = if database.is_some() { 32 } else { 1 };
    let routing_db = database.unwrap_or_else(|| sqlite("routing.db"));
    // Many streams arrive over the gateway's few connections.
    let routing_config = write(
        "routing.toml",
        format!(
            "[server]\nlisten = \"127.0.0.1:{routing_port}\"\n[server.tls]\n{}\n\
             [server.limits]\nmax_concurrent_streams = 20000\nmax_concurrent_requests = 20000\n\
             [database]\nurl = \"{routing_db}\"\nmax_connections = {connections}\n\
             [routing]\nforms_address = \"127.0.0.1:{forms_port}\"\n{quiet}",
            tls("routing"),
        ),
    )?;
    let policy = write(
        "policy.toml",
        "[[allow]]\nmember = \"MUN/GULBENE/kac\"\nmethods = [\"onestop.routing.v1.ApplicationService/*\"]\n\
         [[allow]]\nmember = \"GOV/VSAA\"\nmethods = [\"onestop.routing.v1.InboxService/*\"]\n"
            .into(),
    )?;
    let routes: String = [
        "CatalogueService",
        "ApplicationService",
        "InboxService",
        "ServiceCaseService",
    ]
    .iter()
    .map(|s| {
        format!(
            "[routes.\"onestop.routing.v1.{s}\"]\naddresses = [\"127.0.0.1:{routing_port}\"]\ncomponent = \"routing\"\n"
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
             max_in_flight_per_member = 4096\nmax_streams = 20000\nmax_streams_per_member = 20000\n\
             max_connections_per_member = 200\n\
             [gateway.method_deadlines_ms]\n\"onestop.routing.v1.InboxService/StreamInbox\" = 0\n{quiet}",
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
    let mut forms = serve("forms", &forms_config)?;
    listening(&mut forms, forms_port, "forms", &logs.join("forms.log")).await?;
    let mut routing = serve("routing", &routing_config)?;
    listening(
        &mut routing,
        routing_port,
        "routing",
        &logs.join("routing.log"),
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
        routing,
        gateway_process: gateway,
        _forms: forms,
        dir,
    })
}

/// An inbox consumer that acknowledges every delivery at once, reporting each.
async fn consume(
    fed: &Federation,
    timings: Arc<Timings>,
    delivered: Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (requests, outgoing) = mpsc::channel(WINDOW as usize + 4);
    requests
        .send(StreamInboxRequest {
            kind: Some(stream_inbox_request::Kind::Open(OpenInbox {
                inbox: inbox(),
                max_unacknowledged: WINDOW,
            })),
        })
        .await?;
    let mut stream = InboxServiceClient::new(channel(&fed.gateway, &fed.pki, "institution")?)
        .stream_inbox(ReceiverStream::new(outgoing))
        .await?
        .into_inner();
    Ok(tokio::spawn(async move {
        while let Ok(Some(message)) = stream.message().await {
            if let Some(stream_inbox_response::Kind::Delivery(d)) = message.kind {
                let name = d.application.map(|a| a.name).unwrap_or_default();
                timings.event(name, false, Instant::now());
                delivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let ack = StreamInboxRequest {
                    kind: Some(stream_inbox_request::Kind::Ack(Acknowledge {
                        delivery_ids: vec![d.delivery_id],
                    })),
                };
                if requests.send(ack).await.is_err() {
                    return;
                }
            }
        }
    }))
}

/// One run: `concurrency` submitters for `seconds`, each at `rate / concurrency` a second
/// when a rate is given; then the deliveries still on their way are awaited.
async fn load(
    fed: &Federation,
    label: &str,
    seconds: u64,
    concurrency: usize,
    rate: Option<u32>,
) -> anyhow::Result<()> {
    let timings = Arc::new(Timings {
        seen: Mutex::default(),
        delivery: Mutex::new(Some(Histogram::new(3)?)),
    });
    let delivered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut consumers = Vec::new();
    for _ in 0..CONSUMERS {
        consumers.push(consume(fed, timings.clone(), delivered.clone()).await?);
    }
    let data = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../services/forms/seed/examples/vsaa-old-age-pension.valid.json"
    ))?;
    let client = ApplicationServiceClient::new(channel(&fed.gateway, &fed.pki, "centre")?);
    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let mut submitters = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let (mut client, data, timings) = (client.clone(), data.clone(), timings.clone());
        let label = label.to_owned();
        submitters.spawn(async move {
            let mut histogram = Histogram::<u64>::new(3).expect("histogram");
            let mut failed = 0u64;
            let period = rate.map(|r| Duration::from_secs_f64(concurrency as f64 / f64::from(r)));
            let mut next = Instant::now();
            let mut i = 0u64;
            while Instant::now() < end {
                if let Some(period) = period {
                    tokio::time::sleep_until(next.into()).await;
                    next += period;
                }
                let sent = Instant::now();
                let answer = client
                    .submit_application(SubmitApplicationRequest {
                        request_id: format!("{label}-{worker}-{i}"),
                        service_id: "vsaa-old-age-pension".into(),
                        form_version: "1".into(),
                        data_json: data.clone(),
                        municipality_code: "gulbene".into(),
                        paper_intake: None,
                    })
                    .await;
                i += 1;
                match answer {
                    Ok(reply) => {
                        let _ = histogram.record(sent.elapsed().as_micros() as u64);
                        let name = reply.into_inner().receipt.map(|r| r.application);
                        timings.event(name.unwrap_or_default(), true, sent);
                    }
                    Err(_) => failed += 1,
                }
            }
            (histogram, failed)
        });
    }
    let mut submit = Histogram::<u64>::new(3)?;
    let mut failed = 0;
    while let Some(joined) = submitters.join_next().await {
        let (histogram, f) = joined?;
        submit.add(histogram)?;
        failed += f;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let accepted = submit.len();
    // The deliveries still on their way, for at most 30 s.
    let waiting = Instant::now();
    while delivered.load(std::sync::atomic::Ordering::Relaxed) < accepted
        && waiting.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = started.elapsed().as_secs_f64();
    for consumer in consumers {
        consumer.abort();
    }
    let delivery = timings
        .delivery
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or(Histogram::new(3)?);
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    say(&format!(
        "{label:<28} {:>8.0}/s {:>8.0}/s  {:>7.1} {:>7.1} {:>7.1}   {:>7.1} {:>7.1} {:>7.1}  {accepted:>7} {:>7} {failed:>5}",
        accepted as f64 / elapsed,
        delivered.load(std::sync::atomic::Ordering::Relaxed) as f64 / drained,
        ms(&submit, 0.5),
        ms(&submit, 0.95),
        ms(&submit, 0.99),
        ms(&delivery, 0.5),
        ms(&delivery, 0.95),
        ms(&delivery, 0.99),
        delivered.load(std::sync::atomic::Ordering::Relaxed),
    ));
    Ok(())
}

/// Resident memory of a process, in MiB.
pub(crate) fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// `streams` idle inbox streams through the gateway, and the memory they cost.
async fn idle_streams(fed: &Federation, streams: usize) -> anyhow::Result<()> {
    let before = (
        rss_mib(fed.routing.child.id()),
        rss_mib(fed.gateway_process.child.id()),
    );
    // 200 streams a connection: under the gateway's 1000 per connection.
    let per_connection = 200;
    let mut open = Vec::with_capacity(streams);
    let mut channels = Vec::new();
    let started = Instant::now();
    for i in 0..streams {
        if i % per_connection == 0 {
            channels.push(channel(&fed.gateway, &fed.pki, "institution")?);
        }
        let (requests, outgoing) = mpsc::channel(1);
        requests
            .send(StreamInboxRequest {
                kind: Some(stream_inbox_request::Kind::Open(OpenInbox {
                    inbox: inbox(),
                    max_unacknowledged: 1,
                })),
            })
            .await?;
        let stream = InboxServiceClient::new(channels[channels.len() - 1].clone())
            .stream_inbox(ReceiverStream::new(outgoing))
            .await?
            .into_inner();
        open.push((requests, stream));
    }
    let opened = started.elapsed();
    let after = (
        rss_mib(fed.routing.child.id()),
        rss_mib(fed.gateway_process.child.id()),
    );
    say(&format!(
        "\n{streams} idle inbox streams through the gateway (opened in {:.1} s): routing {:.0} MiB \
         (from {:.0}), gateway {:.0} MiB (from {:.0}); together {:.0} MiB",
        opened.as_secs_f64(),
        after.0,
        before.0,
        after.1,
        before.1,
        after.0 + after.1
    ));
    drop(open);
    Ok(())
}

/// The whole measurement.
pub async fn measure(seconds: u64) -> anyhow::Result<()> {
    let binary = crate::proxies::onestop_binary()?;
    say(&format!(
        "\nApplications end to end (submit through the gateway, validate, store, route, stream to {CONSUMERS} \
         consumers, ack), {seconds} s each; times in ms:"
    ));
    say(&format!(
        "{:<28} {:>10} {:>10}  {:>7} {:>7} {:>7}   {:>7} {:>7} {:>7}  {:>7} {:>7} {:>5}",
        "run",
        "accepted",
        "delivered",
        "sub p50",
        "p95",
        "p99",
        "del p50",
        "p95",
        "p99",
        "acc",
        "del",
        "fail"
    ));
    let postgres = tokio::task::spawn_blocking(onestop_integration_tests::pg::Postgres::start)
        .await?
        .map_err(|e| say(&format!("(PostgreSQL not measured: {e})")))
        .ok();
    let mut backends = vec![("SQLite", None)];
    if let Some(pg) = &postgres {
        backends.push(("PostgreSQL", Some(pg.database("routing_bench").await?)));
    }
    for (name, database) in backends {
        let fed = start(&binary, database).await?;
        load(&fed, &format!("{name}, 64 at once"), seconds, 64, None).await?;
        load(&fed, &format!("{name}, 200/s"), seconds, 16, Some(200)).await?;
        if name == "SQLite" {
            idle_streams(&fed, 10_000).await?;
        }
        let _ = &fed.dir;
    }
    Ok(())
}
