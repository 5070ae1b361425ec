//! Benchmarks that print figures (never timed tests):
//!
//! 1. The forms path against the proxies ([`proxies`]): `ValidateFormData` straight to the forms
//!    service, through the gateway, through nginx and through HAProxy, each a separate process,
//!    mutual TLS on every leg, in alternating rounds; throughput, p50, p99 and CPU per call.
//!    The gateway path is measured twice, without and with a person's bearer token
//!    (`gw+token`), and the proxies' own CPU per call is shown apart.
//! 2. Form validation in process: validations a second, p50 and p99 for each seed form's valid
//!    and invalid example, and for a valid document of about 20 KB.
//! 3. Token verification on one core ([`tokens`]).
//! 4. Applications end to end ([`routing`]): submit through the gateway, validate, store, route,
//!    stream to consumers, ack, each service its own process; on SQLite and PostgreSQL, at full
//!    speed and at 200 a second; then 10,000 idle inbox streams and their memory.
//! 5. The e-address ([`eaddress`]): a 1 GiB attachment up and down through the gateway with the
//!    service's memory sampled, one message to 10,000 recipients until their evidence is
//!    signed, and small messages a second.
//! 6. Fairness ([`fairness`]): one member's calls at a steady rate, alone and while another
//!    member floods the gateway with health watches or with new connections.
//! 7. Idle connections ([`connections`]): 10,000 idle mTLS connections of 157 member systems,
//!    the gateway's memory, and a member connecting then.
//!
//! Run with `cargo build --release --bin onestop -p onestop-bench && target/release/onestop-bench
//! [SECONDS [proxies|validation|tokens|routing|eaddress|fairness|connections [ROUNDS]]]` (default 5 s per measurement, 3 rounds, both parts).
//! nginx and HAProxy come from `scripts/install-proxies`; a path whose proxy is missing is left
//! out. Everything shares the machine's two cores; figures vary by some 10% from run to run.

mod connections;
mod eaddress;
mod fairness;
mod proxies;
mod routing;
mod tokens;

/// mimalloc: the services allocate many small, short-lived objects per call (JSON values,
/// HTTP/2 frames), which the system allocator serves markedly slower.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::Value;

fn say(text: &str) {
    let _ = writeln!(std::io::stdout(), "{text}");
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
    let mut invalid = Vec::new();
    for form in onestop_forms::seed::seed_forms()? {
        let path = format!("{seed_dir}/examples/{}.valid.json", form.form_id);
        let example: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        cases.push((form.form_id.clone(), form.schema.clone(), example));
        // The first invalid case of each form: an application with something to correct.
        let path = format!("{seed_dir}/examples/{}.invalid.json", form.form_id);
        let wrong: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        if let Some(data) = wrong.get(0).and_then(|case| case.get("data")) {
            invalid.push((
                format!("{} (invalid)", form.form_id),
                form.schema.clone(),
                data.clone(),
            ));
        }
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
    let valid = cases.len();
    cases.extend(invalid);
    for (index, (label, schema, document)) in cases.into_iter().enumerate() {
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
            anyhow::ensure!(
                violations.is_empty() == (index < valid),
                "{label}: the example's validity is not what it should be"
            );
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

/// The parts, as the second argument names them.
const PARTS: [&str; 7] = [
    "proxies",
    "validation",
    "tokens",
    "routing",
    "eaddress",
    "fairness",
    "connections",
];

fn usage() -> String {
    format!(
        "usage: onestop-bench [SECONDS [PART [ROUNDS]]]\n\n\
         Prints figures of every part, or of PART only: {}.\n\
         SECONDS per measurement (default 5), ROUNDS of the proxies' comparison (default 3).\n\
         Build with `cargo build --release --bin onestop -p onestop-bench`; nginx and HAProxy\n\
         come from `scripts/install-proxies` (a path whose proxy is missing is left out).",
        PARTS.join(", ")
    )
}

/// What to measure.
#[derive(Debug, PartialEq)]
struct Arguments {
    seconds: u64,
    only: Option<String>,
    rounds: u32,
}

/// Reads the arguments (without the program's name); `Ok(None)` asks for the usage.
fn arguments(given: &[String]) -> Result<Option<Arguments>, String> {
    if given
        .iter()
        .any(|a| a == "-h" || a == "--help" || a == "help")
    {
        return Ok(None);
    }
    if given.len() > 3 {
        return Err(format!("too many arguments: {}", given.join(" ")));
    }
    let number = |index: usize, what: &str, default: u64| -> Result<u64, String> {
        given.get(index).map_or(Ok(default), |text| {
            text.parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{what} must be a whole number above 0, not `{text}`"))
        })
    };
    let only = given.get(1).cloned();
    if let Some(part) = &only
        && !PARTS.contains(&part.as_str())
    {
        return Err(format!("no part `{part}`: one of {}", PARTS.join(", ")));
    }
    let rounds = u32::try_from(number(2, "ROUNDS", 3)?).map_err(|_| "ROUNDS is too large")?;
    Ok(Some(Arguments {
        seconds: number(0, "SECONDS", 5)?,
        only,
        rounds,
    }))
}

fn main() -> std::process::ExitCode {
    // The fairness benchmark runs its flooding member as a process of its own (this binary).
    if let Some(flood) = fairness::Flooder::asked() {
        let flooded = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(flood.run()));
        return match flooded {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                let _ = writeln!(std::io::stderr(), "onestop-bench flooder: {error:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let given: Vec<String> = std::env::args().skip(1).collect();
    let arguments = match arguments(&given) {
        Ok(Some(arguments)) => arguments,
        Ok(None) => {
            say(&usage());
            return std::process::ExitCode::SUCCESS;
        }
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "onestop-bench: {error}\n\n{}", usage());
            return std::process::ExitCode::from(2);
        }
    };
    let measured = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(measure(arguments)));
    match measured {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "onestop-bench: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn measure(arguments: Arguments) -> anyhow::Result<()> {
    let Arguments {
        seconds,
        only,
        rounds,
    } = arguments;
    if only.is_none() || only.as_deref() == Some("proxies") {
        proxies::compare(seconds, rounds).await?;
    }
    if only.is_none() || only.as_deref() == Some("validation") {
        validation(seconds)?;
    }
    if only.is_none() || only.as_deref() == Some("tokens") {
        tokens::verification(seconds)?;
    }
    if only.is_none() || only.as_deref() == Some("routing") {
        routing::measure(seconds).await?;
    }
    if only.is_none() || only.as_deref() == Some("eaddress") {
        eaddress::measure(seconds).await?;
    }
    if only.is_none() || only.as_deref() == Some("fairness") {
        fairness::measure(seconds).await?;
    }
    if only.is_none() || only.as_deref() == Some("connections") {
        connections::measure().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Option<Arguments>, String> {
        let given: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        arguments(&given)
    }

    #[test]
    fn help_is_an_answer_and_bad_arguments_say_what_is_wrong() {
        assert_eq!(parse("--help"), Ok(None));
        assert_eq!(parse("5 routing -h"), Ok(None));
        assert_eq!(
            parse("").unwrap(),
            Some(Arguments {
                seconds: 5,
                only: None,
                rounds: 3
            })
        );
        assert_eq!(
            parse("2 eaddress").unwrap().unwrap().only.as_deref(),
            Some("eaddress")
        );
        assert!(parse("five").unwrap_err().contains("SECONDS"));
        assert!(parse("5 nothing").unwrap_err().contains("no part"));
        assert!(usage().contains("fairness"));
    }
}
