//! Benchmarks that print figures (never timed tests):
//!
//! 1. Gateway overhead: the same unary call (the test echo service, no storage behind it) made
//!    straight to the service and through the gateway, both over mutual TLS, with 32 calls in
//!    flight on one HTTP/2 connection; throughput, p50 and p99 of each and the difference.
//! 2. Form validation: validations a second, p50 and p99 for each seed form's valid example,
//!    and for a document of about 20 KB.
//!
//! Run with `cargo run --release -p onestop-bench [-- SECONDS [gateway|validation]]` (default
//! 5 s per measurement, both parts).
//! Servers and the load generator share this process, its runtime and the machine's two cores,
//! as on a single-machine installation; figures vary by some 10% from run to run.

/// mimalloc: the services allocate many small, short-lived objects per call (JSON values,
/// HTTP/2 frames), which the system allocator serves markedly slower.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use onestop_integration_tests::echo::pb::EchoRequest;
use onestop_integration_tests::echo::pb::echo_service_client::EchoServiceClient;
use onestop_integration_tests::{Backend, TestFederation};
use serde_json::Value;
use tonic::transport::Channel;

const IN_FLIGHT: usize = 32;

struct Figures {
    calls_per_second: f64,
    p50_us: u64,
    p99_us: u64,
    /// CPU time of the whole process (load generator, gateway, service) per call.
    cpu_us_per_call: f64,
}

/// CPU time this process has used so far, from /proc (user + system), in microseconds. Steadier
/// than throughput on a shared machine: it does not depend on what else gets the cores.
fn cpu_time_us() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name; 100 ticks a
    // second on Linux.
    (ticks(11) + ticks(12)) * 10_000.0
}

fn say(text: &str) {
    let _ = writeln!(std::io::stdout(), "{text}");
}

async fn load(channel: Channel, duration: Duration) -> anyhow::Result<Figures> {
    // Warm up: connections, TLS sessions, caches.
    let mut warm = EchoServiceClient::new(channel.clone());
    for _ in 0..200 {
        warm.unary(EchoRequest {
            text: "warm".into(),
            ..Default::default()
        })
        .await?;
    }
    let start = Instant::now();
    let cpu_start = cpu_time_us();
    let mut workers = Vec::new();
    for _ in 0..IN_FLIGHT {
        let mut client = EchoServiceClient::new(channel.clone());
        workers.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new(3)?;
            while start.elapsed() < duration {
                let began = Instant::now();
                client
                    .unary(EchoRequest {
                        text: "application 2026-000123".into(),
                        ..Default::default()
                    })
                    .await?;
                histogram.record(u64::try_from(began.elapsed().as_micros())?)?;
            }
            anyhow::Ok(histogram)
        }));
    }
    let mut all = Histogram::<u64>::new(3)?;
    for worker in workers {
        all.add(worker.await??)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_time_us() - cpu_start;
    Ok(Figures {
        calls_per_second: all.len() as f64 / elapsed,
        p50_us: all.value_at_quantile(0.50),
        p99_us: all.value_at_quantile(0.99),
        cpu_us_per_call: cpu / all.len() as f64,
    })
}

fn print(label: &str, f: &Figures) {
    say(&format!(
        "{label:<16} {:>9.0} calls/s   p50 {:>6} µs   p99 {:>6} µs   CPU {:>5.1} µs/call",
        f.calls_per_second, f.p50_us, f.p99_us, f.cpu_us_per_call
    ));
}

async fn gateway_overhead(seconds: u64) -> anyhow::Result<()> {
    // The member rate would otherwise be what is measured.
    let fed = TestFederation::start_with(Backend::Sqlite, |options| {
        options.member_rate = (10_000_000, 10_000_000);
    })
    .await;
    let duration = Duration::from_secs(seconds);
    say(&format!(
        "Unary echo over mTLS, {IN_FLIGHT} calls in flight, {seconds} s each:"
    ));
    // Straight to the service as a platform component: members may only come through the
    // gateway.
    let direct = load(
        onestop_integration_tests::mtls_channel(&fed.echo.to_string(), &fed.pki, "gateway"),
        duration,
    )
    .await?;
    print("direct", &direct);
    let gateway = load(fed.gateway_client("demo-institution"), duration).await?;
    print("through gateway", &gateway);
    say(&format!(
        "gateway adds      p50 {:+} µs, p99 {:+} µs, CPU {:+.1} µs/call; keeps {:.0}% of the direct throughput",
        i128::from(gateway.p50_us) - i128::from(direct.p50_us),
        i128::from(gateway.p99_us) - i128::from(direct.p99_us),
        gateway.cpu_us_per_call - direct.cpu_us_per_call,
        100.0 * gateway.calls_per_second / direct.calls_per_second
    ));
    fed.stop().await;
    Ok(())
}

/// Grows the largest array of a valid example by repeating its items until the document is
/// about `target` bytes.
fn grow(mut document: Value, array: &str, target: usize) -> Value {
    let item = document.pointer(array).and_then(|a| a.get(0)).cloned();
    if let (Some(item), Some(Value::Array(items))) = (item, document.pointer_mut(array)) {
        while serde_json::to_string(items).map(|s| s.len()).unwrap_or(0) < target {
            items.push(item.clone());
        }
    }
    document
}

fn validation(seconds: u64) -> anyhow::Result<()> {
    let seed_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../services/forms/seed");
    say(&format!(
        "\nForm validation (compiled once), {seconds} s each:"
    ));
    let mut cases = Vec::new();
    for form in onestop_forms::seed::seed_forms()? {
        let path = format!("{seed_dir}/examples/{}.valid.json", form.form_id);
        let example: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        cases.push((form.form_id.clone(), form.schema.clone(), example));
    }
    // A 20 KB pension application: a long working life with many insurance periods.
    let (_, schema, example) = cases
        .iter()
        .find(|(id, _, _)| id == "vsaa-old-age-pension")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no pension form"))?;
    cases.push((
        "vsaa-old-age-pension (20 KB)".into(),
        schema,
        grow(example, "/insurance_periods", 20 * 1024),
    ));
    for (label, schema, document) in cases {
        let compiled = onestop_forms::schema::CompiledSchema::compile(&schema)
            .map_err(|v| anyhow::anyhow!("{}", v.en))?;
        let text = document.to_string();
        let mut parse = Histogram::<u64>::new(3)?;
        let mut check = Histogram::<u64>::new(3)?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(seconds) {
            // What the service does per call: parse within limits, then validate.
            let began = Instant::now();
            let parsed = onestop_forms::schema::parse_json(
                &text,
                onestop_forms::schema::MAX_DOCUMENT_BYTES,
            )?;
            let parsed_at = Instant::now();
            let violations = compiled.validate(&parsed);
            let checked_at = Instant::now();
            parse.record(u64::try_from((parsed_at - began).as_nanos())?)?;
            check.record(u64::try_from((checked_at - parsed_at).as_nanos())?)?;
            anyhow::ensure!(violations.is_empty(), "{label}: example is invalid");
            drop(parsed);
        }
        let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        say(&format!(
            "{label:<30} {:>6} B {:>8.0}/s   validate p50 {:>6.1} µs p99 {:>6.1} µs   parse p50 {:>6.1} µs p99 {:>6.1} µs",
            text.len(),
            check.len() as f64 / start.elapsed().as_secs_f64(),
            us(&check, 0.50),
            us(&check, 0.99),
            us(&parse, 0.50),
            us(&parse, 0.99),
        ));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5);
    let only = std::env::args().nth(2);
    if only.as_deref() != Some("validation") {
        gateway_overhead(seconds).await?;
    }
    if only.as_deref() != Some("gateway") {
        validation(seconds)?;
    }
    Ok(())
}
