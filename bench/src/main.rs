//! Benchmarks that print figures (never timed tests):
//!
//! 1. Gateway overhead: the same unary call (the test echo service, no storage behind it) made
//!    straight to the service and through the gateway, both over mutual TLS, with 32 calls in
//!    flight on one HTTP/2 connection; throughput, p50 and p99 of each and the difference.
//! 2. Form validation: validations a second, p50 and p99 for each seed form's valid example,
//!    and for a document of about 20 KB.
//!
//! Run with `cargo run --release -p onestop-bench [-- SECONDS]` (default 5 s per measurement).
//! Servers and clients share this process and the machine's cores, as they would on a
//! single-machine installation.

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
    Ok(Figures {
        calls_per_second: all.len() as f64 / elapsed,
        p50_us: all.value_at_quantile(0.50),
        p99_us: all.value_at_quantile(0.99),
    })
}

fn print(label: &str, f: &Figures) {
    say(&format!(
        "{label:<16} {:>9.0} calls/s   p50 {:>6} µs   p99 {:>6} µs",
        f.calls_per_second, f.p50_us, f.p99_us
    ));
}

async fn gateway_overhead(seconds: u64) -> anyhow::Result<()> {
    let fed = TestFederation::start(Backend::Sqlite).await;
    let duration = Duration::from_secs(seconds);
    let echo = fed.echo;
    say(&format!(
        "Unary echo over mTLS, {IN_FLIGHT} calls in flight, {seconds} s each:"
    ));
    let direct = load(
        onestop_integration_tests::mtls_channel(&echo.to_string(), &fed.pki, "demo-institution"),
        duration,
    )
    .await?;
    print("direct", &direct);
    let gateway = load(fed.gateway_client("demo-institution"), duration).await?;
    print("through gateway", &gateway);
    say(&format!(
        "gateway adds      p50 {:+} µs, p99 {:+} µs; keeps {:.0}% of the direct throughput",
        i128::from(gateway.p50_us) - i128::from(direct.p50_us),
        i128::from(gateway.p99_us) - i128::from(direct.p99_us),
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
    say(&format!("\nForm validation (compiled once), {seconds} s each:"));
    let mut cases = Vec::new();
    for form in onestop_forms::seed::seed_forms()? {
        let path = format!("{seed_dir}/examples/{}.valid.json", form.form_id);
        let example: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        cases.push((form.form_id.clone(), form.schema.clone(), example));
    }
    // A 20 KB residence declaration: a family of many moving in together.
    let (_, schema, example) = cases
        .iter()
        .find(|(id, _, _)| id == "pmlp-residence-declaration")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no residence declaration"))?;
    cases.push((
        "pmlp-residence-declaration (20 KB)".into(),
        schema,
        grow(example, "/household_members", 20 * 1024),
    ));
    for (label, schema, document) in cases {
        let compiled = onestop_forms::schema::CompiledSchema::compile(&schema)
            .map_err(|v| anyhow::anyhow!("{}", v.en))?;
        let text = document.to_string();
        let mut histogram = Histogram::<u64>::new(3)?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(seconds) {
            let began = Instant::now();
            // What the service does per call: parse within limits, then validate.
            let parsed = onestop_forms::schema::parse_json(&text, onestop_forms::schema::MAX_DOCUMENT_BYTES)?;
            let violations = compiled.validate(&parsed);
            histogram.record(u64::try_from(began.elapsed().as_nanos())?)?;
            anyhow::ensure!(violations.is_empty(), "{label}: example is invalid");
        }
        say(&format!(
            "{label:<38} {:>6} bytes {:>9.0}/s   p50 {:>6.1} µs   p99 {:>6.1} µs",
            text.len(),
            histogram.len() as f64 / start.elapsed().as_secs_f64(),
            histogram.value_at_quantile(0.50) as f64 / 1000.0,
            histogram.value_at_quantile(0.99) as f64 / 1000.0,
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
    gateway_overhead(seconds).await?;
    validation(seconds)?;
    Ok(())
}
