//! Fairness between members: how much one member's floods slow another member's calls.
//!
//! `onestop up` runs as its own process with its default limits. The victim (the demo centre,
//! `MUN/GULBENE/kac`) calls `GetForm` at a steady 200 a second, well within its rate, and its
//! latency is measured alone and then while the demo institution (`GOV/VSAA`), a process of its
//! own, floods the gateway:
//! with health `Watch` streams opened and dropped as fast as its connections take them, and with
//! new connections made as fast as it can. The figure to read is the victim's p99 under each
//! flood against its p99 alone (the target: at most twice).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use onestop_proto::forms::v1::GetFormRequest;
use onestop_proto::forms::v1::forms_service_client::FormsServiceClient;
use tokio::io::AsyncBufReadExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::proxies::channel;
use crate::say;

/// The victim's steady rate.
const VICTIM_RATE: u64 = 200;
/// The flooder's connections.
const FLOOD_CONNECTIONS: usize = 8;

/// Runs the measurement, `seconds` per part.
pub async fn measure(seconds: u64) -> anyhow::Result<()> {
    let binary = crate::proxies::onestop_binary()?;
    let dir = tempfile::tempdir()?;
    let (_up, gateway) = up(&binary, dir.path()).await?;
    let pki = dir.path().join("pki");
    say(&format!(
        "\nFairness: the demo centre's GetForm at {VICTIM_RATE}/s while the demo institution floods, \
         `onestop up` with its default limits, {seconds} s each; times in ms:"
    ));
    say(&format!(
        "{:<34} {:>8} {:>8} {:>8} {:>9} {:>12}",
        "victim's calls", "p50", "p99", "max", "failed", "flood/s"
    ));
    let mut alone = None;
    for flood in [Flood::None, Flood::Watches, Flood::Connections] {
        let stop = Arc::new(AtomicBool::new(false));
        let flooded = Arc::new(AtomicU64::new(0));
        // The victim is connected before the flood begins: what is measured is what the flood
        // does to calls, not to a connection made in the middle of it from the same address.
        let victim = channel(&gateway, &pki, "demo-centre")?;
        FormsServiceClient::new(victim.clone())
            .get_form(get_form())
            .await?;
        // The flooding member is a process of its own, as it would be (its client's work is
        // not the victim's), for as long as the victim calls.
        let flooder = match flood {
            Flood::None => None,
            _ => Some(
                tokio::process::Command::new(std::env::current_exe()?)
                    .env(FLOOD_ENV, flood.name())
                    .env("ONESTOP_BENCH_GATEWAY", &gateway)
                    .env("ONESTOP_BENCH_PKI", &pki)
                    .env("ONESTOP_BENCH_SECONDS", seconds.to_string())
                    .stdout(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()?,
            ),
        };
        let (latency, failed) = victim_calls(victim, seconds).await?;
        stop.store(true, Ordering::Relaxed);
        if let Some(flooder) = flooder {
            let output = flooder.wait_with_output().await?;
            let count = String::from_utf8_lossy(&output.stdout)
                .trim()
                .parse()
                .unwrap_or(0);
            flooded.store(count, Ordering::Relaxed);
        }
        let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
        let p99 = ms(0.99);
        let versus = match alone {
            None => {
                alone = Some(p99);
                String::new()
            }
            Some(base) => format!("  ({:.1}× alone)", p99 / base),
        };
        say(&format!(
            "{:<34} {:>8.2} {:>8.2} {:>8.2} {:>9} {:>12.0}{versus}",
            flood.label(),
            ms(0.50),
            p99,
            latency.max() as f64 / 1000.0,
            failed.values().sum::<u64>(),
            flooded.load(Ordering::Relaxed) as f64 / seconds as f64
        ));
        for (why, count) in &failed {
            say(&format!("    failed: {count} × {why}"));
        }
    }
    Ok(())
}

/// Starts `onestop up` on a free port and returns it with the gateway's address.
async fn up(binary: &Path, data: &Path) -> anyhow::Result<(tokio::process::Child, String)> {
    let log = data.join("up.log");
    let mut command = tokio::process::Command::new(binary);
    command
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no output"))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let gateway = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix("gateway: ") {
                return Ok(rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned());
            }
        }
        anyhow::bail!(
            "onestop up stopped: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    })
    .await??;
    // Keep reading, so that the pipe never fills.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    // Ready when forms answers through the gateway.
    let mut forms = FormsServiceClient::new(channel(&gateway, &data.join("pki"), "demo-centre")?);
    let started = Instant::now();
    while forms.get_form(get_form()).await.is_err() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "forms not served within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((child, gateway))
}

fn get_form() -> GetFormRequest {
    GetFormRequest {
        name: "forms/vsaa-old-age-pension".into(),
    }
}

/// The victim's calls at a steady rate for `seconds`: their latency, and how many failed.
async fn victim_calls(
    channel: tonic::transport::Channel,
    seconds: u64,
) -> anyhow::Result<(Histogram<u64>, BTreeMap<String, u64>)> {
    let mut latency = Histogram::<u64>::new(3)?;
    let mut failed = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / VICTIM_RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut calls = tokio::task::JoinSet::new();
    let until = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < until {
        tick.tick().await;
        let mut forms = FormsServiceClient::new(channel.clone());
        calls.spawn(async move {
            let started = Instant::now();
            let answer = forms.get_form(get_form()).await;
            (
                started.elapsed(),
                answer.err().map(|status| reason_of(&status)),
            )
        });
        while let Some(Ok((took, refused))) = calls.try_join_next() {
            record(&mut latency, &mut failed, took, refused);
        }
    }
    while let Some(Ok((took, refused))) = calls.join_next().await {
        record(&mut latency, &mut failed, took, refused);
    }
    Ok((latency, failed))
}

/// A failed call's code and reason, to say why the victim's calls failed.
fn reason_of(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    let reason = status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default();
    let mut message = status.message().to_owned();
    message.truncate(80);
    format!("{:?} {reason} {message}", status.code())
}

fn record(
    latency: &mut Histogram<u64>,
    failed: &mut BTreeMap<String, u64>,
    took: Duration,
    refused: Option<String>,
) {
    match refused {
        None => {
            let _ = latency.record(took.as_micros() as u64);
        }
        Some(why) => *failed.entry(why).or_default() += 1,
    }
}

/// The variable that makes this binary a flooding member (see [`Flooder::asked`]).
const FLOOD_ENV: &str = "ONESTOP_BENCH_FLOOD";

/// The flooding member, as a process of its own: asked for by [`FLOOD_ENV`], it floods the
/// gateway named by `ONESTOP_BENCH_GATEWAY` for `ONESTOP_BENCH_SECONDS` and prints how many
/// calls it made.
pub struct Flooder {
    flood: Flood,
    gateway: String,
    pki: std::path::PathBuf,
    seconds: u64,
}

impl Flooder {
    /// The flooder this process is to be, if it was started as one.
    pub fn asked() -> Option<Self> {
        let flood = match std::env::var(FLOOD_ENV).ok()?.as_str() {
            "watches" => Flood::Watches,
            "connections" => Flood::Connections,
            _ => return None,
        };
        Some(Self {
            flood,
            gateway: std::env::var("ONESTOP_BENCH_GATEWAY").ok()?,
            pki: std::env::var("ONESTOP_BENCH_PKI").ok()?.into(),
            seconds: std::env::var("ONESTOP_BENCH_SECONDS").ok()?.parse().ok()?,
        })
    }

    /// Floods, then prints the number of calls made.
    pub async fn run(self) -> anyhow::Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let flooded = Arc::new(AtomicU64::new(0));
        // The watch flood shares a few connections, as a member's system would.
        let shared: Vec<_> = (0..FLOOD_CONNECTIONS)
            .map(|_| channel(&self.gateway, &self.pki, "demo-institution"))
            .collect::<Result<_, _>>()?;
        let mut flooders = tokio::task::JoinSet::new();
        for task in 0..self.flood.tasks() {
            let (stop, flooded) = (stop.clone(), flooded.clone());
            let (gateway, pki, flood) = (self.gateway.clone(), self.pki.clone(), self.flood);
            let connection = shared[task % shared.len()].clone();
            flooders
                .spawn(async move { flood.run(&gateway, &pki, connection, &stop, &flooded).await });
        }
        tokio::time::sleep(Duration::from_secs(self.seconds)).await;
        stop.store(true, Ordering::Relaxed);
        while flooders.join_next().await.is_some() {}
        say(&flooded.load(Ordering::Relaxed).to_string());
        Ok(())
    }
}

/// What the flooding member does.
#[derive(Clone, Copy)]
enum Flood {
    None,
    /// Opens health watches and drops them as soon as they answer, eight tasks on each of a
    /// few connections.
    Watches,
    /// Connects, makes one call and disconnects, again and again.
    Connections,
}

impl Flood {
    fn name(self) -> &'static str {
        match self {
            Flood::None => "none",
            Flood::Watches => "watches",
            Flood::Connections => "connections",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Flood::None => "alone",
            Flood::Watches => "during a Health/Watch flood",
            Flood::Connections => "during a reconnection flood",
        }
    }

    fn tasks(self) -> usize {
        match self {
            Flood::None => 0,
            Flood::Watches => FLOOD_CONNECTIONS * 8,
            Flood::Connections => FLOOD_CONNECTIONS,
        }
    }

    async fn run(
        self,
        gateway: &str,
        pki: &Path,
        shared: tonic::transport::Channel,
        stop: &AtomicBool,
        flooded: &AtomicU64,
    ) {
        let connect = || channel(gateway, pki, "demo-institution");
        match self {
            Flood::None => {}
            Flood::Watches => {
                let mut health = HealthClient::new(shared);
                while !stop.load(Ordering::Relaxed) {
                    // Refusals (over the member's rate or streams) count as much as answers.
                    if let Ok(watch) = health.watch(HealthCheckRequest::default()).await {
                        let _ = watch.into_inner().message().await;
                    }
                    flooded.fetch_add(1, Ordering::Relaxed);
                }
            }
            Flood::Connections => {
                drop(shared);
                while !stop.load(Ordering::Relaxed) {
                    let Ok(channel) = connect() else { return };
                    let _ = HealthClient::new(channel)
                        .check(HealthCheckRequest::default())
                        .await;
                    flooded.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
