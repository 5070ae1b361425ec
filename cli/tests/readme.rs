//! The README as a user follows it: every `onestop` command of its `sh` blocks runs, in the
//! README's order, against a real `onestop up`, and does what the README says; and the session
//! `onestop login` keeps renews a token that has expired.
//!
//! The commands run in bash from a fresh directory (so `onestop-data/` is the federation's data
//! directory, as in the README), with `cargo run --release --bin onestop --` and the README's
//! `onestop` function both standing for the binary already built. The only changes to what the
//! README says: the gateway listens on a free port (`--listen 127.0.0.1:0` for `up`, the
//! address in `ONESTOP_GATEWAY` for the client commands), and the development OpenID providers
//! (`integration-tests/oidc/providers.mjs`, which `scripts/dev-oidc` runs on 4000 and 4001) run
//! on free ports too, written into `onestop-data/identity.toml` before the first start.
//! Placeholders (`applications/<id>`, `messages/<id>`, `<sha256>`, `<delivery_id>`) are filled
//! from earlier answers. A line the test does not know how to run fails it, so nothing the
//! README gains is skipped silently; the `buf curl` calls and `scripts/test` are the lines not
//! run, each by name below.

// In tests a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

const BINARY: &str = env!("CARGO_BIN_EXE_onestop");
/// How long one command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// The development providers' client secret, as `providers.mjs` takes it.
const DEV_OIDC_SECRET: &str = "dev-secret-0123456789abcdef0123";

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

// ---------------------------------------------------------------------------------------------
// The README's commands

/// One command line of a `sh` block, its continuation lines joined.
#[derive(Clone, Debug)]
struct Line {
    /// Where it starts in README.md (1-based).
    number: usize,
    text: String,
}

/// Every command line of the README's `sh` blocks, in order.
fn readme_lines() -> Vec<Line> {
    sh_lines("README.md")
}

/// Every command line of the `sh` blocks of a Markdown file of the repository, in order.
fn sh_lines(file: &str) -> Vec<Line> {
    let readme = std::fs::read_to_string(repository().join(file)).unwrap();
    let mut lines = Vec::new();
    let mut in_sh = false;
    let mut pending: Option<Line> = None;
    for (index, raw) in readme.lines().enumerate() {
        let trimmed = raw.trim_end();
        if !in_sh {
            in_sh = trimmed == "```sh";
            continue;
        }
        if trimmed == "```" {
            assert!(pending.is_none(), "a continued line ends a block");
            in_sh = false;
            continue;
        }
        let (text, continued) = match trimmed.strip_suffix('\\') {
            Some(text) => (text.trim_end(), true),
            None => (trimmed, false),
        };
        let line = match pending.take() {
            Some(mut line) => {
                line.text.push(' ');
                line.text.push_str(text.trim_start());
                line
            }
            None => Line {
                number: index + 1,
                text: text.to_owned(),
            },
        };
        if continued {
            pending = Some(line);
        } else if !line.text.trim().is_empty() {
            lines.push(line);
        }
    }
    lines
}

/// What a README line is to the test.
#[derive(Debug, PartialEq)]
enum Kind {
    /// `onestop up`: started, and kept running.
    Up(String),
    /// The README's shell function standing for `cargo run ... --`: the prelude defines it.
    Function,
    /// A plain shell command preparing a file.
    Shell,
    /// A `onestop` command, its output assigned to a variable when named.
    Onestop {
        variable: Option<String>,
        command: String,
    },
    /// Not run here, and why.
    NotRun(&'static str),
}

/// The forms a `onestop` invocation takes in the README.
const INVOCATIONS: [&str; 3] = [
    "cargo run --release --bin onestop -- ",
    "cargo run -q --release --bin onestop -- ",
    "onestop ",
];

/// `onestop <arguments>` for an invocation of the binary, in any of its forms.
fn as_onestop(text: &str) -> Option<String> {
    INVOCATIONS
        .iter()
        .find_map(|form| text.strip_prefix(form))
        .map(|arguments| format!("onestop {arguments}"))
}

fn classify(text: &str) -> Kind {
    let text = text.trim();
    if text == r#"onestop() { cargo run -q --release --bin onestop -- "$@"; }"# {
        return Kind::Function;
    }
    if text == "scripts/test" {
        return Kind::NotRun("runs every test, this one among them");
    }
    if text.starts_with(".tools/node_modules/.bin/buf curl")
        || text.starts_with("$buf curl")
        || text.starts_with("buf=")
        || text.starts_with("tls=")
    {
        return Kind::NotRun("a call with buf, not the onestop CLI");
    }
    if text.starts_with("echo ") && text.contains(" > ") {
        return Kind::Shell;
    }
    // `VAR=$(onestop ...)`, `export VAR=$(...)`.
    let assignment = text.strip_prefix("export ").unwrap_or(text);
    if let Some((variable, rest)) = assignment.split_once("=$(")
        && variable.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        && let Some(inner) = rest.strip_suffix(')')
        && let Some(command) = as_onestop(inner)
    {
        return Kind::Onestop {
            variable: Some(variable.to_owned()),
            command,
        };
    }
    match as_onestop(text) {
        Some(command) if command.split_whitespace().nth(1) == Some("up") => Kind::Up(command),
        Some(command) => Kind::Onestop {
            variable: None,
            command,
        },
        None => panic!("the README has a command this test cannot run: {text}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The processes

/// The development OpenID providers on free ports, until dropped.
struct Providers {
    resident: String,
    staff: String,
    _node: Child,
    // Kept open: the providers exit when their standard input closes.
    _stdin: ChildStdin,
}

async fn providers() -> Providers {
    let repo = repository();
    let pinned = repo.join(".tools/bin/node");
    let node = if pinned.exists() {
        pinned
    } else {
        PathBuf::from("node")
    };
    let script = repo.join("integration-tests/oidc/providers.mjs");
    assert!(
        repo.join("integration-tests/oidc/node_modules/oidc-provider")
            .exists(),
        "the development providers are not installed: run scripts/install-tools"
    );
    let mut child = Command::new(node)
        .arg(script)
        .env("OIDC_CLIENT_SECRET", DEV_OIDC_SECRET)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("node starts (scripts/install-tools installs it)");
    let stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the providers listen within 30 s")
        .unwrap()
        .expect("the providers printed their addresses");
    let addresses: Value = serde_json::from_str(&line).unwrap();
    Providers {
        resident: addresses["resident"].as_str().unwrap().to_owned(),
        staff: addresses["staff"].as_str().unwrap().to_owned(),
        _node: child,
        _stdin: stdin,
    }
}

/// Writes the identity settings `onestop up` would write on its first start, with the
/// providers where they run and `extra` settings of the `[identity]` section.
fn identity_settings(work: &Path, providers: &Providers, extra: &str) {
    let data = work.join("onestop-data");
    std::fs::create_dir_all(&data).unwrap();
    let default = onestop_cli::services::IDENTITY_LOCAL_DEFAULT;
    for issuer in [
        "http://127.0.0.1:4000\"",
        "http://127.0.0.1:4001\"",
        "key_dir = ",
    ] {
        assert_eq!(
            default.matches(issuer).count(),
            1,
            "{issuer} in the default"
        );
    }
    let settings = default
        .replace(
            "http://127.0.0.1:4000\"",
            &format!("{}\"", providers.resident),
        )
        .replace("http://127.0.0.1:4001\"", &format!("{}\"", providers.staff))
        .replace("key_dir = ", &format!("{extra}key_dir = "));
    std::fs::write(
        data.join(onestop_cli::services::IDENTITY_LOCAL_FILE),
        settings,
    )
    .unwrap();
    std::fs::write(data.join("dev-oidc-secret"), DEV_OIDC_SECRET).unwrap();
}

/// Lines a process printed, read as they come so that its pipes never fill.
#[derive(Clone, Default)]
struct Printed {
    lines: Arc<Mutex<Vec<String>>>,
    /// Told of every line as it comes.
    added: Arc<tokio::sync::Notify>,
}

impl Printed {
    fn read_from(&self, stream: impl tokio::io::AsyncRead + Unpin + Send + 'static) {
        let printed = self.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                printed.lines.lock().unwrap().push(line);
                printed.added.notify_waiters();
            }
        });
    }

    fn all(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits (bounded) until a line contains `needle`, and returns it.
    async fn wait_for(&self, needle: &str, what: &str) -> String {
        let found = async {
            loop {
                // Registered before looking, so that a line added meanwhile still wakes us.
                let added = self.added.notified();
                tokio::pin!(added);
                added.as_mut().enable();
                if let Some(line) = self.all().into_iter().find(|l| l.contains(needle)) {
                    return line;
                }
                added.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), found)
            .await
            .unwrap_or_else(|_| panic!("{what}: no line with {needle} in {:?}", self.all()))
    }
}

/// A running `onestop up`.
struct Federation {
    child: Child,
    gateway: String,
}

/// Starts `onestop up` as the README runs it, on a free port, and waits until every service
/// serves through the gateway.
async fn up(work: &Path, command: &str) -> Federation {
    let mut arguments: Vec<&str> = command.split_whitespace().skip(1).collect();
    arguments.extend(["--listen", "127.0.0.1:0"]);
    let mut child = Command::new(BINARY)
        .args(&arguments)
        .current_dir(work)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("onestop starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let gateway = support::gateway_address(&mut lines).await;
    Printed::default().read_from(lines.into_inner().into_inner());
    serving(work, &gateway).await;
    Federation { child, gateway }
}

/// Waits until the gateway reports every service serving.
async fn serving(work: &Path, gateway: &str) {
    use onestop_platform::tls;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    tls::crypto_provider();
    let pki = work.join("onestop-data/pki");
    let channel = support::member_channel(gateway, &pki, "demo-institution");
    for service in [
        "onestop.forms.v1.FormsService",
        "onestop.identity.v1.IdentityService",
        "onestop.routing.v1.ApplicationService",
        "onestop.eaddress.v1.MessageService",
    ] {
        let mut updates = HealthClient::new(channel.clone())
            .watch(HealthCheckRequest {
                service: service.into(),
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
            panic!("the health stream of {service} ended");
        })
        .await
        .unwrap_or_else(|_| panic!("{service} serves through the gateway within 30 s"));
    }
}

fn signal(child: &Child, name: &str) {
    let pid = child.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// A directory to run the README in, with the repository's example data where the README
/// names it.
fn work_dir() -> tempfile::TempDir {
    let work = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(repository().join("services"), work.path().join("services"))
        .unwrap();
    work
}

/// The shell the README's commands run in: bash, from the work directory, with the binary as
/// the README's `onestop` function.
struct Shell {
    work: PathBuf,
    gateway: String,
    variables: HashMap<String, String>,
}

/// What a command printed.
struct Output {
    stdout: String,
    stderr: String,
}

impl Output {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

impl Shell {
    fn command(&self, line: &str) -> Command {
        let script = format!("set -euo pipefail\nonestop() {{ \"$ONESTOP_BIN\" \"$@\"; }}\n{line}");
        let mut command = Command::new("bash");
        command
            .arg("-c")
            .arg(script)
            .current_dir(&self.work)
            .env("ONESTOP_BIN", BINARY)
            .env("ONESTOP_GATEWAY", &self.gateway)
            .env_remove("ONESTOP_TOKEN")
            .envs(&self.variables)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Runs a line to its end; it must exit with 0.
    async fn run(&self, line: &str) -> Output {
        let output = tokio::time::timeout(COMMAND_TIMEOUT, self.command(line).output())
            .await
            .unwrap_or_else(|_| panic!("`{line}` ran longer than {COMMAND_TIMEOUT:?}"))
            .unwrap();
        let printed = Output {
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        assert!(
            output.status.success(),
            "`{line}` exited with {}\nstdout: {}\nstderr: {}",
            output.status,
            printed.stdout,
            printed.stderr
        );
        printed
    }

    /// Starts a long-running `onestop` line as the binary itself (so that a signal reaches
    /// it); what it prints is collected.
    fn spawn(&self, line: &str) -> (Child, Printed) {
        let line = line
            .strip_prefix("onestop ")
            .map(|arguments| format!("exec \"$ONESTOP_BIN\" {arguments}"))
            .unwrap();
        let mut child = self
            .command(&line)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let printed = Printed::default();
        printed.read_from(child.stdout.take().unwrap());
        printed.read_from(child.stderr.take().unwrap());
        (child, printed)
    }
}

/// The README's placeholders, as the walk learns them.
#[derive(Default)]
struct Learned {
    application: Option<String>,
    message: Option<String>,
    sha256: Option<String>,
    delivery_id: Option<String>,
}

impl Learned {
    fn fill(&self, command: &str) -> String {
        let mut filled = command.to_owned();
        let fills = [
            ("applications/<id>", &self.application),
            ("messages/<id>", &self.message),
            ("<sha256>", &self.sha256),
            ("<delivery_id>", &self.delivery_id),
        ];
        for (placeholder, value) in fills {
            if filled.contains(placeholder) {
                let value = value
                    .as_ref()
                    .unwrap_or_else(|| panic!("nothing earlier gives {placeholder}: {command}"));
                filled = filled.replace(placeholder, value);
            }
        }
        let rest = filled.split('<').skip(1).find(|after| {
            after
                .split_once('>')
                .is_some_and(|(name, _)| !name.contains(' '))
        });
        assert!(
            rest.is_none(),
            "a placeholder this test cannot fill in: {command}"
        );
        filled
    }
}

/// Files an application and lets a consumer take it without acknowledging it five times, so
/// that the next lease parks it; returns the application.
async fn park_one(shell: &Shell) -> String {
    let receipt = shell
        .run(
            "onestop submit --as demo-centre --service vsaa-old-age-pension --form-version 1 \
             --municipality gulbene --data services/forms/seed/examples/vsaa-old-age-pension.valid.json",
        )
        .await
        .json();
    let application = receipt["application"].as_str().unwrap().to_owned();
    for attempt in 1..=5 {
        let taken = shell
            .run("onestop inbox consume --as demo-institution --inbox GOV/VSAA/pensions --no-ack --count 1")
            .await
            .stdout;
        let delivery: Value = serde_json::from_str(taken.trim()).unwrap();
        assert_eq!(delivery["application"]["name"], application.as_str());
        assert_eq!(delivery["attempt"], attempt, "{taken}");
    }
    application
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_readme_command_runs_against_onestop_up() {
    let work = work_dir();
    let providers = providers().await;
    identity_settings(work.path(), &providers, "");
    let lines = readme_lines();
    assert!(lines.len() > 20, "{lines:?}");

    let mut federation: Option<Federation> = None;
    let mut shell: Option<Shell> = None;
    let mut consumer: Option<(Child, Printed)> = None;
    let mut learned = Learned::default();
    let mut ran = Vec::new();
    for line in &lines {
        let kind = classify(&line.text);
        let command = match kind {
            Kind::Up(command) => {
                assert!(federation.is_none(), "a second `onestop up`");
                let started = up(work.path(), &command).await;
                shell = Some(Shell {
                    work: work.path().to_owned(),
                    gateway: started.gateway.clone(),
                    variables: HashMap::new(),
                });
                federation = Some(started);
                ran.push("up".to_owned());
                continue;
            }
            Kind::NotRun(_) | Kind::Function => continue,
            Kind::Shell => {
                shell
                    .as_ref()
                    .expect("onestop up first")
                    .run(&line.text)
                    .await;
                continue;
            }
            Kind::Onestop { variable, command } => (variable, command),
        };
        let (variable, command) = command;
        let shell_ref = shell
            .as_mut()
            .expect("`onestop up` comes first in the README");
        let filled = learned.fill(&command);
        let words: Vec<&str> = command.split_whitespace().collect();
        // The command and its subcommand, if it has one.
        let what = match words.get(2) {
            Some(sub) if !sub.starts_with('-') && words[1] != "submit" => {
                format!("{} {sub}", words[1])
            }
            _ => words[1].to_owned(),
        };
        let at = format!("README.md:{}: {filled}", line.number);
        ran.push(what.trim().to_owned());

        // The long-running consumer: started now, stopped once it printed what it took.
        if what == "inbox consume" {
            consumer = Some(shell_ref.spawn(&filled));
            continue;
        }
        // Parking needs a delivery that failed five times: one is made before the README
        // lists the parked ones.
        if what == "inbox pull" {
            let parked = park_one(shell_ref).await;
            learned.delivery_id = None;
            let pulled = shell_ref.run(&filled).await;
            assert!(!pulled.stdout.contains(&parked), "{at}: {}", pulled.stdout);
            continue;
        }
        let output = shell_ref.run(&filled).await;
        match what.as_str() {
            "submit" => {
                let receipt = output.json();
                assert_eq!(receipt["destination"], "GOV/VSAA/pensions", "{at}");
                let application = receipt["application"].as_str().unwrap().to_owned();
                // The README's consumer prints what the member system filed, and stops.
                if let Some((mut child, printed)) = consumer.take() {
                    let delivery = printed.wait_for(&application, "the consumer").await;
                    let delivery: Value = serde_json::from_str(&delivery).unwrap();
                    assert_eq!(delivery["application"]["provenance"]["channel"], "system");
                    signal(&child, "TERM");
                    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
                        .await
                        .expect("the consumer stops on SIGTERM")
                        .unwrap();
                    assert!(status.success(), "{at}: the consumer exited with {status}");
                }
                learned.application = Some(application);
            }
            "status set" => assert_eq!(output.json()["status"], "decided", "{at}"),
            "status get" => {
                let history = output.json()["history"].clone();
                assert!(
                    history
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|step| step["status"] == "decided"),
                    "{at}: {history}"
                );
            }
            "inbox parked" => {
                let parked: Value = serde_json::from_str(output.stdout.trim())
                    .unwrap_or_else(|_| panic!("{at}: one parked delivery: {}", output.stdout));
                assert_eq!(parked["attempts"], 5, "{at}");
                learned.delivery_id = Some(parked["delivery_id"].as_str().unwrap().to_owned());
            }
            "inbox release" => {
                assert_eq!(
                    Some(output.stdout.trim()),
                    learned.delivery_id.as_deref(),
                    "{at}"
                );
            }
            "stats export" => {
                // The README's own cases: the centre's applications of this walk.
                let mut rows = output.stdout.lines();
                assert_eq!(
                    rows.next(),
                    Some("centre,service,cases,total_duration_seconds,mean_duration_seconds"),
                    "{at}"
                );
                let counted = rows.any(|row| {
                    row.starts_with("gulbene-kac,vsaa-old-age-pension,")
                        && row.split(',').nth(2).is_some_and(|cases| cases != "0")
                });
                assert!(counted, "{at}: {}", output.stdout);
            }
            "login" => {
                let token = output.stdout.trim().to_owned();
                assert_eq!(token.split('.').count(), 3, "{at}: {token}");
                let who = output
                    .stderr
                    .lines()
                    .find(|l| l.starts_with("logged in: "))
                    .unwrap_or_else(|| panic!("{at}: {}", output.stderr))
                    .to_owned();
                if filled.contains("dev-staff") {
                    assert!(who.contains("staff j.ozola of MUN/GULBENE"), "{at}: {who}");
                } else {
                    assert!(who.contains("Jānis Bērziņš (121282-11236)"), "{at}: {who}");
                }
                let kept = onestop_cli::session::file_of(
                    &work.path().join("onestop-data/sessions"),
                    &token,
                );
                assert!(kept.exists(), "{at}: no session kept at {}", kept.display());
                let variable = variable.expect("the README keeps the token in a variable");
                shell_ref.variables.insert(variable, token);
            }
            "mailbox activate" => assert_eq!(output.json()["active"], true, "{at}"),
            "message send" => {
                learned.message = Some(output.json()["name"].as_str().unwrap().to_owned());
            }
            "message list" => {
                let message = learned.message.as_deref().unwrap();
                assert!(output.stdout.contains(message), "{at}: {}", output.stdout);
            }
            "message read" => {
                let sha256 = output.json()["attachments"][0]["sha256"].clone();
                learned.sha256 = Some(sha256.as_str().unwrap().to_owned());
            }
            "message download" => {
                let got = std::fs::read(work.path().join("got.txt")).unwrap();
                let sent = std::fs::read(work.path().join("lemums.txt")).unwrap();
                assert_eq!(got, sent, "{at}");
            }
            "evidence verify" => {
                for event in ["accepted", "placed", "retrieved"] {
                    let quoted = format!("\"event\":\"{event}\"");
                    assert!(output.stdout.contains(&quoted), "{at}: {}", output.stdout);
                }
            }
            "logout" => {
                let token = &shell_ref.variables["TOKEN"];
                let kept = onestop_cli::session::file_of(
                    &work.path().join("onestop-data/sessions"),
                    token,
                );
                assert!(!kept.exists(), "{at}: the session is still kept");
            }
            "pki show" => {
                let shown = &output.stdout;
                // The entry of the certificate revoked just before: its name, then its lines.
                let entry: String = shown
                    .lines()
                    .skip_while(|l| *l != "my-system.pem")
                    .enumerate()
                    .take_while(|(i, l)| *i == 0 || l.starts_with("  "))
                    .map(|(_, l)| format!("{l}\n"))
                    .collect();
                assert!(entry.contains("REVOKED:"), "{at}: {entry}");
                assert!(!shown.contains("[127, 0, 0, 1]"), "{at}: {shown}");
                assert!(shown.contains("127.0.0.1"), "{at}: {shown}");
            }
            // Every other command: exit 0 is what the README promises.
            _ => {}
        }
    }

    eprintln!("ran, in the README's order: {ran:?}");
    // The walk reached every part of the README.
    for expected in [
        "up",
        "inbox consume",
        "submit",
        "status get",
        "inbox parked",
        "stats export",
        "login",
        "message download",
        "evidence verify",
        "logout",
        "pki show",
    ] {
        assert!(
            ran.iter().any(|r| r == expected),
            "{expected} not run: {ran:?}"
        );
    }
    let mut federation = federation.unwrap();
    signal(&federation.child, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), federation.child.wait())
        .await
        .expect("onestop up stops on SIGTERM")
        .unwrap();
    assert!(status.success(), "onestop up exited with {status}");
    drop(providers);
}

/// The README's lines are all of a kind the test knows (the walk above runs them; this says
/// which at once, without a federation).
#[test]
fn every_readme_line_is_known() {
    let not_run: Vec<String> = readme_lines()
        .into_iter()
        .filter_map(|line| match classify(&line.text) {
            Kind::NotRun(why) => Some(format!("{}: {why}", line.text)),
            _ => None,
        })
        .collect();
    // Only the buf calls and the whole test suite are left to the reader.
    assert!(
        not_run
            .iter()
            .all(|line| line.contains("buf") || line.starts_with("scripts/test")),
        "{not_run:#?}"
    );
    assert_eq!(
        classify("onestop stats export --csv"),
        Kind::Onestop {
            variable: None,
            command: "onestop stats export --csv".into()
        }
    );
    assert_eq!(
        classify("export ONESTOP_TOKEN=$(cargo run --release --bin onestop -- login)"),
        Kind::Onestop {
            variable: Some("ONESTOP_TOKEN".into()),
            command: "onestop login".into()
        }
    );
}

/// The `exp` of a platform token (its payload is not checked here; the gateway checks it).
fn expiry_of(token: &str) -> u64 {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT");
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64url"),
    )
    .expect("JSON claims");
    claims["exp"].as_u64().expect("an exp claim")
}

/// The session file at `dir` for `token`, as JSON.
fn kept(dir: &Path, token: &str) -> Value {
    let path = onestop_cli::session::file_of(dir, token);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_login_kept_renews_an_expired_token() {
    use std::os::unix::fs::PermissionsExt;
    let work = work_dir();
    let providers = providers().await;
    // Access tokens of one second: expired for the gateway once its leeway (30 s) has passed.
    identity_settings(work.path(), &providers, "access_token_ttl_s = 1\n");
    let federation = up(work.path(), "onestop up").await;
    let shell = Shell {
        work: work.path().to_owned(),
        gateway: federation.gateway.clone(),
        variables: HashMap::new(),
    };
    let sessions = work.path().join("onestop-data/sessions");

    let token = shell
        .run("onestop login --as demo-centre --account lv-resident")
        .await
        .stdout
        .trim()
        .to_owned();
    let path = onestop_cli::session::file_of(&sessions, &token);
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600, "the session file is its owner's only");
    assert_eq!(mode(&sessions), 0o700);
    let first = kept(&sessions, &token);
    assert_eq!(first["access_token"], token.as_str());

    // The printed token alone (no session kept for it) is refused once it has expired: from
    // its `exp` plus the gateway's leeway on (whole seconds, so one more). Real time in another
    // process cannot be paused: the test waits for that very moment, once, instead of polling.
    let expired_from = std::time::UNIX_EPOCH
        + Duration::from_secs(expiry_of(&token) + onestop_platform::tokens::LEEWAY_SECONDS + 1);
    if let Ok(left) = expired_from.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
    let bare = work.path().join("no-sessions");
    let output = shell
        .command(&format!(
            "onestop mailbox show --as demo-centre --sessions {} --token {token}",
            bare.display()
        ))
        .output()
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("TOKEN_EXPIRED"),
        "the gateway refuses the printed token once it expired: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // With the session kept, the same token works: it is renewed before it is sent.
    let activated = shell
        .run(&format!(
            "onestop mailbox activate --as demo-centre --token {token}"
        ))
        .await
        .json();
    assert_eq!(activated["active"], true);
    let renewed = kept(&sessions, &token);
    assert_ne!(renewed["access_token"], token.as_str());
    assert_ne!(renewed["refresh_token"], first["refresh_token"]);

    // A session that says its token is still valid, though the gateway refuses it as expired:
    // the refusal renews it and the command runs again.
    let mut stale = renewed.clone();
    stale["access_token"] = Value::String(token.clone());
    stale["access_token_expire_time"] = Value::String("2999-01-01T00:00:00Z".into());
    std::fs::write(&path, serde_json::to_string(&stale).unwrap()).unwrap();
    let shown = shell
        .run(&format!(
            "onestop mailbox show --as demo-centre --token {token}"
        ))
        .await
        .json();
    assert_eq!(shown["address"], "lv:121282-11236");
    let after = kept(&sessions, &token);
    assert_ne!(after["access_token"], token.as_str());
    assert_ne!(after["refresh_token"], renewed["refresh_token"]);

    // Logging out forgets the session.
    shell
        .run(&format!("onestop logout --as demo-centre --token {token}"))
        .await;
    assert!(!path.exists());
}

/// The certificates `deploy/README.md` makes with a test CA are made, and serve where it says.
#[tokio::test]
async fn the_deploy_readmes_certificates_are_made_as_it_says() {
    let work = tempfile::tempdir().unwrap();
    let shell = Shell {
        work: work.path().to_owned(),
        gateway: String::new(),
        variables: HashMap::new(),
    };
    let lines = sh_lines("deploy/README.md");
    assert!(!lines.is_empty());
    for line in &lines {
        let command = as_onestop(&line.text)
            .filter(|c| c.starts_with("onestop pki "))
            .unwrap_or_else(|| panic!("not a pki command: {}", line.text));
        shell.run(&command).await;
    }
    let shown = shell.run("onestop pki show --dir pki").await.stdout;
    for component in ["gateway", "forms", "identity", "routing", "eaddress"] {
        let entry: Vec<&str> = shown
            .lines()
            .skip_while(|l| *l != format!("{component}.pem"))
            .take_while(|l| !l.starts_with("  valid:"))
            .collect();
        let entry = entry.join("\n");
        assert!(
            entry.contains(&format!("spiffe://onestop.lv/platform/{component}"))
                && entry.contains("names:    localhost, 127.0.0.1, ::1"),
            "{entry}"
        );
    }
}
