//! Idle connections: how many idle mTLS connections of distinct member systems the gateway
//! holds, what they cost it in memory, and whether a member that connects then is still served
//! at once. The gateway and the forms service run as separate processes (`onestop serve`); each
//! connection makes one call (so that it is identified and past its first-request timeout) and
//! then stays open and idle.

use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use onestop_platform::tls::{self, TlsFiles, TlsMaterial};
use onestop_proto::forms::v1::GetFormRequest;
use onestop_proto::forms::v1::forms_service_client::FormsServiceClient;
use tonic::transport::Channel;

use crate::proxies::{Process, free_port, listening, onestop_binary, run};
use crate::routing::rss_mib;
use crate::say;

/// Connections held.
const CONNECTIONS: usize = 10_000;
/// Each member system's share: the gateway's default cap per member institution.
const PER_MEMBER: usize = 64;
/// Handshakes at once, within the gateway's places for unidentified connections per address.
const AT_ONCE: usize = 12;

fn get_form() -> GetFormRequest {
    GetFormRequest {
        name: "forms/vsaa-old-age-pension".into(),
    }
}

/// Runs the measurement.
pub async fn measure() -> anyhow::Result<()> {
    let binary = onestop_binary()?;
    let dir = tempfile::tempdir()?;
    let pki = dir.path().join("pki");
    let pki_arg = pki.to_string_lossy().into_owned();
    run(&binary, &["pki", "init", "--dir", &pki_arg])?;
    for (name, subject) in [("forms", "forms"), ("gateway", "gateway")] {
        run(
            &binary,
            &[
                "pki",
                "issue",
                "--dir",
                &pki_arg,
                "--name",
                name,
                "--platform",
                subject,
                "--serve-localhost",
            ],
        )?;
    }
    let members = CONNECTIONS.div_ceil(PER_MEMBER) + 1;
    for i in 0..members {
        let name = format!("m{i}");
        let member = format!("COM/{:08}/system", 40_000_000 + i);
        run(
            &binary,
            &[
                "pki", "issue", "--dir", &pki_arg, "--name", &name, "--member", &member,
            ],
        )?;
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
    let (forms_port, gateway_port) = (free_port()?, free_port()?);
    let write = |name: &str, text: String| -> anyhow::Result<std::path::PathBuf> {
        let path = dir.path().join(name);
        std::fs::write(&path, text)?;
        Ok(path)
    };
    let forms_config = write(
        "forms.toml",
        format!(
            "[server]\nlisten = \"127.0.0.1:{forms_port}\"\n[server.tls]\n{}\n\
             [database]\nurl = \"sqlite://{}\"\n{quiet}",
            tls("forms"),
            dir.path().join("forms.db").display()
        ),
    )?;
    let policy = write(
        "policy.toml",
        "[[allow]]\nmember = \"*\"\nmethods = [\"onestop.forms.v1.FormsService/Get*\"]\n".into(),
    )?;
    // Room for the idle connections and the newcomer; the process's descriptors above it.
    let gateway_config = write(
        "gateway.toml",
        format!(
            "[server]\nlisten = \"127.0.0.1:{gateway_port}\"\n[server.tls]\n{}\n\
             [server.limits]\nmax_connections = {}\n\
             [upstream.tls]\n{}\n\
             [routes.\"onestop.forms.v1.FormsService\"]\naddresses = [\"127.0.0.1:{forms_port}\"]\ncomponent = \"forms\"\n\
             [gateway]\npolicy = \"{}\"\n{quiet}",
            tls("gateway"),
            CONNECTIONS + 1_000,
            tls("gateway"),
            policy.display()
        ),
    )?;
    let logs = dir.path();
    let serve = |service: &'static str, config: &Path| -> anyhow::Result<Process> {
        Process::start(
            service,
            std::process::Command::new(&binary)
                .args(["serve", service, "--config"])
                .arg(config),
            &logs.join(format!("{service}.log")),
        )
    };
    let mut forms = serve("forms", &forms_config)?;
    listening(&mut forms, forms_port, "forms", &logs.join("forms.log")).await?;
    let mut gateway = serve("gateway", &gateway_config)?;
    listening(
        &mut gateway,
        gateway_port,
        "the gateway",
        &logs.join("gateway.log"),
    )
    .await?;
    let address = format!("127.0.0.1:{gateway_port}");
    let connect = |name: &str| -> anyhow::Result<Channel> {
        let material = TlsMaterial::load(&TlsFiles::in_pki_dir(&pki, name))?;
        let config = tls::client_config(&material, None)?;
        Ok(onestop_platform::client::channel(
            &address,
            "localhost",
            config,
            Duration::from_secs(30),
        )?)
    };
    // Ready when forms answers through the gateway.
    let mut probe = FormsServiceClient::new(connect(&format!("m{}", members - 1))?);
    let started = Instant::now();
    while probe.get_form(get_form()).await.is_err() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "not served within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(probe);
    let before = rss_mib(gateway.child.id());

    say(&format!(
        "\nIdle connections: {CONNECTIONS} mTLS connections of {} member systems held by the \
         gateway (`onestop serve gateway`, max_connections {}), each after one call:",
        CONNECTIONS.div_ceil(PER_MEMBER),
        CONNECTIONS + 1_000
    ));
    let opening = Instant::now();
    let mut held = Vec::with_capacity(CONNECTIONS);
    let mut failed = 0usize;
    let names: Vec<String> = (0..CONNECTIONS)
        .map(|i| format!("m{}", i / PER_MEMBER))
        .collect();
    for chunk in names.chunks(AT_ONCE) {
        let mut opened = tokio::task::JoinSet::new();
        for name in chunk {
            let channel = connect(name)?;
            opened.spawn(async move {
                let mut forms = FormsServiceClient::new(channel.clone());
                forms.get_form(get_form()).await.map(|_| channel)
            });
        }
        while let Some(result) = opened.join_next().await {
            match result? {
                Ok(channel) => held.push(channel),
                Err(_) => failed += 1,
            }
        }
    }
    let opened_in = opening.elapsed();
    let after = rss_mib(gateway.child.id());

    // A member that connects now: a new connection, then calls at a steady pace.
    let mut newcomer = FormsServiceClient::new(connect(&format!("m{}", members - 1))?);
    let mut latency = Histogram::<u64>::new(3)?;
    let mut refused = 0;
    for _ in 0..200 {
        let started = Instant::now();
        match newcomer.get_form(get_form()).await {
            Ok(_) => latency.record(started.elapsed().as_micros() as u64)?,
            Err(_) => refused += 1,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    say(&format!(
        "  held {} (failed {failed}) in {:.1} s; gateway resident memory {before:.0} MiB before, \
         {after:.0} MiB after ({:.1} KiB a connection)",
        held.len(),
        opened_in.as_secs_f64(),
        (after - before) * 1024.0 / held.len().max(1) as f64
    ));
    say(&format!(
        "  a member connecting then: {} of 200 calls refused, p50 {:.2} ms, p99 {:.2} ms",
        refused,
        latency.value_at_quantile(0.50) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0
    ));
    drop(held);
    Ok(())
}
