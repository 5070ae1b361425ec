//! The real forms path measured against the proxies users would pick: the `onestop` binary's
//! forms service and gateway as separate processes, and nginx (`grpc_pass`) and HAProxy in front
//! of the same forms service, mutual TLS on every leg. The same `ValidateFormData` call (a valid
//! 0.7 KB residence declaration) is made straight to the service, through the gateway, through
//! nginx and through HAProxy, in alternating rounds, with the same number of calls in flight;
//! the service's own health `Check`, made the same way, shows what the platform's stack costs
//! a call that does no work.
//!
//! CPU per call counts every process on the path (the load generator, the proxy, the service),
//! read from /proc: steadier than throughput on a shared machine.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use onestop_platform::tls::{self, TlsFiles, TlsMaterial};
use onestop_proto::forms::v1::ValidateFormDataRequest;
use onestop_proto::forms::v1::forms_service_client::FormsServiceClient;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::say;

/// Calls in flight on each path.
const IN_FLIGHT: usize = 32;

/// A process started for the measurement, in a process group of its own (so that its CPU, and
/// its workers', can be summed), stopped when dropped.
pub(crate) struct Process {
    pub(crate) child: Child,
}

impl Process {
    pub(crate) fn start(
        name: &'static str,
        command: &mut Command,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let log = std::fs::File::create(log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { child })
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // The whole group (nginx's workers too); `--` so that the negative id is not read as
        // an option, which some `kill`s would take as -1, every process there is.
        let _ = Command::new("kill")
            .args(["-s", "TERM", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

/// CPU seconds (user and system) of every process whose group is `group`.
fn group_cpu_seconds(group: u32) -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return f64::NAN;
    };
    let mut ticks = 0u64;
    for entry in entries.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the name: state, ppid, pgrp, ..., utime (12th) and stime (13th).
        if fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(group) {
            let field = |i: usize| {
                fields
                    .get(i)
                    .and_then(|f| f.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            ticks += field(11) + field(12);
        }
    }
    ticks as f64 / 100.0
}

/// This process's CPU seconds.
fn own_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (field(11) + field(12)) / 100.0
}

/// The `onestop` binary built beside this one, which the benchmarks run their servers with.
pub(crate) fn onestop_binary() -> anyhow::Result<PathBuf> {
    let binary = std::env::current_exe()?.with_file_name("onestop");
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: build it first (cargo build --release --bin onestop)",
        binary.display()
    );
    Ok(binary)
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits, within `bound`, until `process` listens on `port`; says what its log says if it
/// stopped instead.
pub(crate) async fn listening(
    process: &mut Process,
    port: u16,
    what: &str,
    log: &Path,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Some(status) = process.child.try_wait()? {
            anyhow::bail!(
                "{what} stopped ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "{what} did not listen on {port} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn find(program: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.exists())
}

pub(crate) fn run(binary: &Path, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(binary).args(args).output()?;
    anyhow::ensure!(
        output.status.success(),
        "{} {}: {}",
        binary.display(),
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

pub(crate) fn channel(address: &str, pki: &Path, cert: &str) -> anyhow::Result<Channel> {
    let material = TlsMaterial::load(&TlsFiles::in_pki_dir(pki, cert))?;
    let config = tls::client_config(&material, None)?;
    Ok(onestop_platform::client::channel(
        address,
        "localhost",
        config,
        Duration::from_secs(30),
    )?)
}

/// One path to the forms service, and its figures summed over its rounds.
struct Target {
    label: &'static str,
    /// Health `Check` instead of the validation: the service's floor, for comparison.
    health: bool,
    channel: Channel,
    /// The processes on the path besides the load generator.
    processes: Vec<u32>,
    /// The proxy on the path (gateway, nginx, HAProxy), whose CPU is also counted alone.
    proxy: Option<u32>,
    /// A person's bearer token sent with every call.
    token: Option<String>,
    histogram: Histogram<u64>,
    seconds: f64,
    cpu: f64,
    proxy_cpu: f64,
}

impl Target {
    fn new(
        label: &'static str,
        health: bool,
        channel: Channel,
        processes: Vec<u32>,
    ) -> anyhow::Result<Self> {
        // The second process of a path, when there is one, is its proxy.
        let proxy = processes.get(1).copied();
        Ok(Self {
            label,
            health,
            channel,
            processes,
            proxy,
            token: None,
            histogram: Histogram::new(3)?,
            seconds: 0.0,
            cpu: 0.0,
            proxy_cpu: 0.0,
        })
    }

    fn with_token(mut self, token: String) -> Self {
        self.token = Some(token);
        self
    }
}

async fn round(
    path: &mut Target,
    request: &ValidateFormDataRequest,
    duration: Duration,
) -> anyhow::Result<()> {
    let cpu = |processes: &[u32]| {
        processes.iter().map(|p| group_cpu_seconds(*p)).sum::<f64>() + own_cpu_seconds()
    };
    let cpu_start = cpu(&path.processes);
    let proxy_start = path.proxy.map(group_cpu_seconds).unwrap_or(0.0);
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..IN_FLIGHT {
        let mut client = FormsServiceClient::new(path.channel.clone());
        let mut health = HealthClient::new(path.channel.clone());
        let request = request.clone();
        let checks_health = path.health;
        let bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = path
            .token
            .as_ref()
            .map(|t| format!("Bearer {t}").parse())
            .transpose()?;
        workers.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new(3)?;
            while start.elapsed() < duration {
                let began = Instant::now();
                if checks_health {
                    health.check(HealthCheckRequest::default()).await?;
                } else {
                    let mut call = tonic::Request::new(request.clone());
                    if let Some(bearer) = &bearer {
                        call.metadata_mut().insert("authorization", bearer.clone());
                    }
                    client.validate_form_data(call).await?;
                }
                histogram.record(u64::try_from(began.elapsed().as_micros())?)?;
            }
            anyhow::Ok(histogram)
        }));
    }
    for worker in workers {
        path.histogram.add(worker.await??)?;
    }
    path.seconds += start.elapsed().as_secs_f64();
    path.cpu += cpu(&path.processes) - cpu_start;
    path.proxy_cpu += path.proxy.map(group_cpu_seconds).unwrap_or(0.0) - proxy_start;
    Ok(())
}

/// Runs the comparison: `rounds` rounds of `seconds` per path.
pub async fn compare(seconds: u64, rounds: u32) -> anyhow::Result<()> {
    let binary = onestop_binary()?;
    let dir = tempfile::tempdir()?;
    let pki = dir.path().join("pki");
    let pki_arg = pki.to_string_lossy().into_owned();
    run(&binary, &["pki", "init", "--dir", &pki_arg])?;
    for (name, subject) in [
        ("forms", ["--platform", "forms"]),
        ("gateway", ["--platform", "gateway"]),
        ("identity", ["--platform", "identity"]),
        ("proxy", ["--platform", "proxy"]),
        ("bench", ["--platform", "bench"]),
        ("member", ["--member", "GOV/VSAA/bench"]),
    ] {
        let mut args = vec!["pki", "issue", "--dir", &pki_arg, "--name", name];
        args.extend(subject);
        args.push("--serve-localhost");
        run(&binary, &args)?;
    }
    let file = |name: &str| pki.join(name).to_string_lossy().into_owned();
    // HAProxy wants the certificate and its key in one file.
    std::fs::write(
        pki.join("proxy.both.pem"),
        std::fs::read_to_string(pki.join("proxy.pem"))?
            + &std::fs::read_to_string(pki.join("proxy.key"))?,
    )?;

    let (forms_port, gateway_port, nginx_port, haproxy_port, identity_port) = (
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
    );
    let quiet = "[telemetry]\nlog_filter = \"warn\"\n";
    let tls_section = |name: &str| {
        format!(
            "ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            file("ca.pem"),
            file(&format!("{name}.pem")),
            file(&format!("{name}.key"))
        )
    };
    let forms_config = dir.path().join("forms.toml");
    std::fs::write(
        &forms_config,
        format!(
            // nginx opens an upstream connection per call in flight (it does not multiplex
            // gRPC), many at once from one address: more than the per-address limits allow a
            // stranger by default.
            "[server]\nlisten = \"127.0.0.1:{forms_port}\"\n[server.tls]\n{}\n\
             [server.limits]\nmax_unidentified_per_source = 1024\nhandshakes_per_source_per_second = 100000\n\
             [database]\nurl = \"sqlite://{}\"\n{quiet}",
            tls_section("forms"),
            dir.path().join("forms.db").display()
        ),
    )?;
    // Identity, for the key set that verifies people's tokens (no login providers needed: the
    // benchmark signs its token with identity's own key).
    let keys = dir.path().join("identity-keys");
    let identity_config = dir.path().join("identity.toml");
    std::fs::write(
        &identity_config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{identity_port}\"\n[server.tls]\n{}\n\
             [database]\nurl = \"sqlite://{}\"\n[identity]\nkey_dir = \"{}\"\n{quiet}",
            tls_section("identity"),
            dir.path().join("identity.db").display(),
            keys.display()
        ),
    )?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[allow]]\nmember = \"GOV/VSAA\"\nmethods = [\"onestop.forms.v1.FormsService/*\"]\n",
    )?;
    let gateway_config = dir.path().join("gateway.toml");
    std::fs::write(
        &gateway_config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{gateway_port}\"\n[server.tls]\n{}\n[upstream.tls]\n{}\n\
             [routes.\"onestop.forms.v1.FormsService\"]\naddresses = [\"127.0.0.1:{forms_port}\"]\ncomponent = \"forms\"\n\
             [routes.\"onestop.identity.v1.IdentityService\"]\naddresses = [\"127.0.0.1:{identity_port}\"]\ncomponent = \"identity\"\n\
             [gateway]\npolicy = \"{}\"\nrate_per_second = 10000000\nburst = 10000000\n\
             person_rate_per_second = 10000000\nperson_burst = 10000000\n{quiet}",
            tls_section("gateway"),
            tls_section("gateway"),
            policy.display()
        ),
    )?;
    let logs = dir.path();
    let mut forms = Process::start(
        "forms",
        Command::new(&binary)
            .args(["serve", "forms", "--config"])
            .arg(&forms_config),
        &logs.join("forms.log"),
    )?;
    listening(&mut forms, forms_port, "forms", &logs.join("forms.log")).await?;
    let mut identity = Process::start(
        "identity",
        Command::new(&binary)
            .args(["serve", "identity", "--config"])
            .arg(&identity_config),
        &logs.join("identity.log"),
    )?;
    listening(
        &mut identity,
        identity_port,
        "identity",
        &logs.join("identity.log"),
    )
    .await?;
    let token = crate::tokens::person_token(&keys, "spiffe://onestop.lv/member/GOV/VSAA/bench")?;
    let mut gateway = Process::start(
        "gateway",
        Command::new(&binary)
            .args(["serve", "gateway", "--config"])
            .arg(&gateway_config),
        &logs.join("gateway.log"),
    )?;
    listening(
        &mut gateway,
        gateway_port,
        "the gateway",
        &logs.join("gateway.log"),
    )
    .await?;

    let mut paths = vec![
        Target::new(
            "health",
            true,
            channel(&format!("127.0.0.1:{forms_port}"), &pki, "bench")?,
            vec![forms.child.id()],
        )?,
        Target::new(
            "direct",
            false,
            channel(&format!("127.0.0.1:{forms_port}"), &pki, "bench")?,
            vec![forms.child.id()],
        )?,
        Target::new(
            "gateway",
            false,
            channel(&format!("127.0.0.1:{gateway_port}"), &pki, "member")?,
            vec![forms.child.id(), gateway.child.id()],
        )?,
        Target::new(
            "gw+token",
            false,
            channel(&format!("127.0.0.1:{gateway_port}"), &pki, "member")?,
            vec![forms.child.id(), gateway.child.id()],
        )?
        .with_token(token),
    ];
    let mut proxies = Vec::new();
    match find("nginx") {
        Some(nginx) => {
            let config = dir.path().join("nginx.conf");
            std::fs::create_dir_all(dir.path().join("nginx"))?;
            std::fs::write(
                &config,
                format!(
                    "user root;\nworker_processes 2;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx.err warn;\n\
                     events {{ worker_connections 4096; }}\n\
                     http {{\n  access_log off;\n  client_body_temp_path {dir}/nginx;\n\
                       upstream forms {{ server 127.0.0.1:{forms_port}; keepalive 64; keepalive_requests 100000000; }}\n\
                       server {{\n    listen 127.0.0.1:{nginx_port} ssl http2;\n\
                         ssl_certificate {cert};\n    ssl_certificate_key {key};\n\
                         ssl_client_certificate {ca};\n    ssl_verify_client on;\n\
                         keepalive_requests 100000000;\n\
                         location / {{\n      grpc_pass grpcs://forms;\n\
                           grpc_ssl_certificate {cert};\n      grpc_ssl_certificate_key {key};\n\
                           grpc_ssl_trusted_certificate {ca};\n      grpc_ssl_verify on;\n\
                           grpc_ssl_name localhost;\n      grpc_ssl_session_reuse on;\n    }}\n  }}\n}}\n",
                    dir = dir.path().display(),
                    cert = file("proxy.pem"),
                    key = file("proxy.key"),
                    ca = file("ca.pem"),
                ),
            )?;
            let mut process = Process::start(
                "nginx",
                Command::new(nginx)
                    .arg("-c")
                    .arg(&config)
                    .arg("-p")
                    .arg(dir.path()),
                &logs.join("nginx.log"),
            )?;
            listening(&mut process, nginx_port, "nginx", &logs.join("nginx.log")).await?;
            paths.push(Target::new(
                "nginx",
                false,
                channel(&format!("127.0.0.1:{nginx_port}"), &pki, "bench")?,
                vec![forms.child.id(), process.child.id()],
            )?);
            proxies.push(process);
        }
        None => say("nginx is not installed (scripts/install-proxies): left out"),
    }
    match find("haproxy") {
        Some(haproxy) => {
            let config = dir.path().join("haproxy.cfg");
            std::fs::write(
                &config,
                format!(
                    "global\n  nbthread 2\n  maxconn 4000\n\
                     defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
                     frontend grpc\n  bind 127.0.0.1:{haproxy_port} ssl crt {both} ca-file {ca} verify required alpn h2\n  default_backend forms\n\
                     backend forms\n  server forms 127.0.0.1:{forms_port} ssl crt {both} ca-file {ca} verify required verifyhost localhost sni str(localhost) alpn h2\n",
                    both = file("proxy.both.pem"),
                    ca = file("ca.pem"),
                ),
            )?;
            let mut process = Process::start(
                "haproxy",
                Command::new(haproxy).arg("-db").arg("-f").arg(&config),
                &logs.join("haproxy.log"),
            )?;
            listening(
                &mut process,
                haproxy_port,
                "HAProxy",
                &logs.join("haproxy.log"),
            )
            .await?;
            paths.push(Target::new(
                "haproxy",
                false,
                channel(&format!("127.0.0.1:{haproxy_port}"), &pki, "bench")?,
                vec![forms.child.id(), process.child.id()],
            )?);
            proxies.push(process);
        }
        None => say("HAProxy is not installed (scripts/install-proxies): left out"),
    }

    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../services/forms/seed/examples/pmlp-residence-declaration.valid.json"
    ))?;
    let request = ValidateFormDataRequest {
        name: "forms/pmlp-residence-declaration/versions/latest".into(),
        data_json: example,
    };
    // Warm up every path: connections, sessions, caches; a path that fails is reported now.
    for path in &paths {
        let mut client = FormsServiceClient::new(path.channel.clone());
        for _ in 0..200 {
            let mut call = tonic::Request::new(request.clone());
            if let Some(token) = &path.token {
                call.metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse()?);
            }
            client
                .validate_form_data(call)
                .await
                .with_context(|| format!("warming up {}", path.label))?;
        }
    }
    say(&format!(
        "ValidateFormData (valid, {} B) over mutual TLS, separate processes, {IN_FLIGHT} calls in flight, {rounds} rounds of {seconds} s per path, alternating:",
        request.data_json.len()
    ));
    let duration = Duration::from_secs(seconds);
    for _ in 0..rounds {
        for path in &mut paths {
            let label = path.label;
            if let Err(error) = round(path, &request, duration).await {
                // The proxies' own words on what went wrong.
                let logs: String = ["nginx.err", "haproxy.log", "gateway.log", "forms.log"]
                    .iter()
                    .map(|name| {
                        let text =
                            std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(5).collect();
                        format!(
                            "--- {name}\n{}\n",
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        )
                    })
                    .collect();
                return Err(error.context(format!("measuring {label}\n{logs}")));
            }
        }
    }
    let figures: Vec<_> = paths
        .iter()
        .map(|p| {
            let calls = p.histogram.len() as f64;
            (
                p.label,
                calls / p.seconds,
                p.histogram.value_at_quantile(0.50),
                p.histogram.value_at_quantile(0.99),
                p.cpu / calls * 1e6,
            )
        })
        .collect();
    say(&format!(
        "{:<10} {:>10} {:>9} {:>9} {:>12} {:>14}",
        "path", "calls/s", "p50 µs", "p99 µs", "CPU µs/call", "proxy µs/call"
    ));
    for ((label, rate, p50, p99, cpu), path) in figures.iter().zip(&paths) {
        let proxy = path
            .proxy
            .map(|_| format!("{:.1}", path.proxy_cpu / path.histogram.len() as f64 * 1e6))
            .unwrap_or_else(|| "-".into());
        say(&format!(
            "{label:<10} {rate:>10.0} {p50:>9} {p99:>9} {cpu:>12.1} {proxy:>14}"
        ));
    }
    let proxy_cpu = |label: &str| {
        paths
            .iter()
            .find(|p| p.label == label)
            .map(|p| p.proxy_cpu / p.histogram.len() as f64 * 1e6)
    };
    if let (Some(plain), Some(token)) = (proxy_cpu("gateway"), proxy_cpu("gw+token")) {
        say(&format!(
            "a bearer token adds {:+.1} µs ({:+.0}%) to the gateway's CPU per call",
            token - plain,
            100.0 * (token - plain) / plain
        ));
    }
    if let (Some(health), Some(direct)) = (figures.first(), figures.get(1)) {
        say(&format!(
            "direct ValidateFormData at {:.0}% of the same service's health Check rate",
            100.0 * direct.1 / health.1
        ));
    }
    if let Some((_, direct_rate, direct_p50, direct_p99, direct_cpu)) = figures.get(1).copied() {
        say("added to the direct path:");
        for (label, rate, p50, p99, cpu) in figures.iter().skip(2) {
            say(&format!(
                "{label:<10} p50 {:+} µs, p99 {:+} µs, CPU {:+.1} µs/call, keeps {:.0}% of the direct throughput",
                i128::from(*p50) - i128::from(direct_p50),
                i128::from(*p99) - i128::from(direct_p99),
                cpu - direct_cpu,
                100.0 * rate / direct_rate
            ));
        }
    }
    drop(proxies);
    drop(gateway);
    drop(forms);
    Ok(())
}
