//! The `onestop` binary.

/// mimalloc: the services allocate many small, short-lived objects per call (JSON values,
/// HTTP/2 frames), which the system allocator serves markedly slower.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use onestop_cli::federation::{self, Options};
use onestop_cli::pki::{self, Subject};
use onestop_cli::services;
use onestop_cli::{client, devlogin, mail, session};
use onestop_platform::config::{self, TelemetryConfig, default_trust_domain};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "onestop",
    version,
    about = "The one-stop shop for public services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole federation on this machine: development PKI, SQLite, every service and the
    /// gateway.
    Up {
        /// Where certificates, the access policy and databases are kept.
        #[arg(long, default_value = "onestop-data")]
        data_dir: PathBuf,
        /// The gateway's address.
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
        /// Serve metrics, liveness and readiness (`/metrics`, `/healthz`, `/readyz`) here.
        #[arg(long, env = "ONESTOP__ADMIN__LISTEN")]
        admin: Option<SocketAddr>,
        /// Export traces over OTLP/gRPC to this collector, such as `http://127.0.0.1:4317`.
        #[arg(long, env = "ONESTOP__TELEMETRY__OTLP_ENDPOINT")]
        otlp_endpoint: Option<String>,
        /// Which logs to write, such as `info,onestop_gateway=debug` (`RUST_LOG` wins).
        #[arg(long, env = "ONESTOP__TELEMETRY__LOG_FILTER")]
        log_filter: Option<String>,
        /// Write logs as JSON lines.
        #[arg(long, env = "ONESTOP__TELEMETRY__LOG_JSON")]
        log_json: bool,
    },
    /// Run one service from a configuration file (ONESTOP__<SECTION>__<KEY> variables override,
    /// `__` between levels: ONESTOP__SERVER__LIMITS__MAX_CONNECTIONS).
    Serve {
        /// `gateway`, or a service: `forms`, `identity`, `eaddress`, `routing`.
        service: String,
        /// The TOML configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Manage a development or test PKI.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Submit an application through the gateway (as a member system, or for a person with
    /// --token) and print its receipt.
    Submit(client::SubmitArgs),
    /// Receive applications from an inbox, as the institution's system.
    Inbox {
        #[command(subcommand)]
        command: client::InboxCommand,
    },
    /// Move an application's status (as its destination) or read it.
    Status {
        #[command(subcommand)]
        command: client::StatusCommand,
    },
    /// Service-case statistics, such as a municipality's centres are paid on.
    Stats {
        #[command(subcommand)]
        command: client::StatsCommand,
    },
    /// Log a person in at the development OpenID providers (`scripts/dev-oidc`) and print their
    /// platform token, for `--token` or `ONESTOP_TOKEN`; the session is kept in `--sessions`, and
    /// commands given that token renew it as it expires.
    Login(devlogin::LoginArgs),
    /// End the session `onestop login` kept for the token given (`--token` or `ONESTOP_TOKEN`).
    Logout(devlogin::LogoutArgs),
    /// A mailbox of the e-address: activate it, show it, look up who has one.
    Mailbox {
        #[command(subcommand)]
        command: mail::MailboxCommand,
    },
    /// Send official messages with attachments, list and read a mailbox, download attachments.
    Message {
        #[command(subcommand)]
        command: mail::MessageCommand,
    },
    /// Evidence of delivery: the keys, a message's bundle, and verifying a bundle offline.
    Evidence {
        #[command(subcommand)]
        command: mail::EvidenceCommand,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Make a new CA.
    Init {
        /// The PKI directory.
        #[arg(long)]
        dir: PathBuf,
        /// The trust domain of the identities it will issue.
        #[arg(long, default_value_t = default_trust_domain())]
        trust_domain: String,
    },
    /// Issue a certificate for a member system or a platform component.
    Issue {
        /// The PKI directory.
        #[arg(long)]
        dir: PathBuf,
        /// The file name (without .pem).
        #[arg(long)]
        name: String,
        /// A member system, CLASS/CODE/SUBSYSTEM.
        #[arg(
            long,
            conflicts_with = "platform",
            required_unless_present = "platform"
        )]
        member: Option<String>,
        /// A platform component, such as `gateway` or `forms`.
        #[arg(long)]
        platform: Option<String>,
        /// Add localhost and the loopback addresses, for a server on this machine.
        #[arg(long)]
        serve_localhost: bool,
        /// Days of validity.
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// The trust domain.
        #[arg(long, default_value_t = default_trust_domain())]
        trust_domain: String,
    },
    /// Revoke a certificate: add it to the CA's revocation list (`ca.crl`), which every server
    /// configured with it re-reads within its `reload_interval_ms`, without a restart.
    Revoke {
        /// The PKI directory.
        #[arg(long)]
        dir: PathBuf,
        /// The file name of the certificate (without .pem).
        #[arg(long)]
        name: String,
    },
    /// Describe the certificates in a PKI directory.
    Show {
        /// The PKI directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    let mut result = run(Cli::parse());
    // Refused as expired although the kept session said otherwise (clocks apart): renew it and
    // run the command once more (the refused call did nothing).
    if let Err(error) = &result
        && client::CallFailed::token_expired(error)
    {
        match runtime().and_then(|runtime| runtime.block_on(session::renew_after_refusal())) {
            Ok(true) => result = run(Cli::parse()),
            Ok(false) => {}
            Err(renewing) => {
                let _ = writeln!(std::io::stderr(), "onestop: {renewing:#}");
            }
        }
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "onestop: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn say(text: &str) {
    let _ = writeln!(std::io::stdout(), "{text}");
}

fn run(cli: Cli) -> anyhow::Result<()> {
    onestop_platform::tls::crypto_provider();
    match cli.command {
        Command::Pki { command } => {
            let out = match command {
                PkiCommand::Init { dir, trust_domain } => pki::init(&dir, &trust_domain)?,
                PkiCommand::Issue {
                    dir,
                    name,
                    member,
                    platform,
                    serve_localhost,
                    days,
                    trust_domain,
                } => {
                    let subject = match (member, platform) {
                        (Some(member), _) => Subject::Member(member),
                        (None, Some(platform)) => Subject::Platform(platform),
                        (None, None) => anyhow::bail!("name --member or --platform"),
                    };
                    pki::issue(&dir, &name, subject, &trust_domain, days, serve_localhost)?
                }
                PkiCommand::Revoke { dir, name } => pki::revoke(&dir, &name)?,
                PkiCommand::Show { dir } => pki::show(&dir)?,
            };
            say(out.trim_end());
            Ok(())
        }
        Command::Up {
            data_dir,
            listen,
            admin,
            otlp_endpoint,
            log_filter,
            log_json,
        } => {
            let telemetry = TelemetryConfig {
                otlp_endpoint,
                log_filter,
                log_json,
                ..TelemetryConfig::default()
            };
            runtime()?.block_on(up(data_dir, listen, admin, telemetry))
        }
        Command::Serve { service, config } => runtime()?.block_on(serve(service, config)),
        Command::Submit(args) => runtime()?.block_on(client::submit(args)),
        Command::Inbox { command } => runtime()?.block_on(client::inbox(command)),
        Command::Status { command } => runtime()?.block_on(client::status(command)),
        Command::Stats { command } => runtime()?.block_on(client::stats(command)),
        Command::Login(args) => runtime()?.block_on(devlogin::login(args)),
        Command::Logout(args) => runtime()?.block_on(devlogin::logout(args)),
        Command::Mailbox { command } => runtime()?.block_on(mail::mailbox(command)),
        Command::Message { command } => runtime()?.block_on(mail::message(command)),
        Command::Evidence { command } => runtime()?.block_on(mail::evidence(command)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Cancels the token on SIGTERM or SIGINT.
fn cancel_on_signal(shutdown: CancellationToken) {
    tokio::spawn(async move {
        onestop_platform::shutdown_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
}

async fn up(
    data_dir: PathBuf,
    listen: SocketAddr,
    admin: Option<SocketAddr>,
    telemetry: TelemetryConfig,
) -> anyhow::Result<()> {
    let telemetry = onestop_platform::telemetry::init(&telemetry, "onestop")?;
    let mut options = Options::new(&data_dir, listen);
    options.admin = admin;
    let fed = federation::start(options).await?;
    let pki = fed.pki_dir.display().to_string();
    let port = fed.gateway.port();
    let internal: String = fed
        .services
        .iter()
        .map(|(name, address)| format!("{:<10}{address} (internal)\n", format!("{name}:")))
        .collect();
    say(&format!(
        "onestop is up.\n\
         gateway:  {gateway} (mutual TLS; CA {pki}/ca.pem)\n\
         {internal}{admin}\
         data:     {data}\n\n\
         Validate an application through the gateway as the demo institution ({member}):\n\n\
         buf curl --protocol grpc --cacert {pki}/ca.pem \\\n  \
           --cert {pki}/{cert}.pem --key {pki}/{cert}.key \\\n  \
           --data '{{\"name\": \"forms/pmlp-residence-declaration/versions/latest\", \"data_json\": \"{{\\\"move_in_date\\\": \\\"yesterday\\\"}}\"}}' \\\n  \
           https://localhost:{port}/onestop.forms.v1.FormsService/ValidateFormData\n\n\
         Stop with Ctrl-C (or SIGTERM).",
        gateway = fed.gateway,
        admin = fed
            .admin
            .map(|address| format!("admin:    http://{address}/metrics, /healthz, /readyz\n"))
            .unwrap_or_default(),
        data = data_dir.display(),
        member = federation::DEMO_INSTITUTION_MEMBER,
        cert = federation::DEMO_INSTITUTION,
    ));
    cancel_on_signal(fed.shutdown.clone());
    let result = fed.wait().await;
    telemetry.shutdown();
    result?;
    say("onestop stopped.");
    Ok(())
}

async fn serve(name: String, path: PathBuf) -> anyhow::Result<()> {
    let env: HashMap<String, String> = config::process_env();
    if name == federation::GATEWAY {
        let config: onestop_gateway::GatewayConfig = config::load(Some(&path), &env)?;
        let (telemetry, listen) = (&config.telemetry, config.server.listen);
        return run_server(
            "onestop-gateway",
            telemetry,
            listen,
            config.admin.listen,
            |listener, shutdown| async {
                Ok(onestop_gateway::serve(&config, listener, shutdown).await?)
            },
        )
        .await;
    }
    let Some(service) = services::find(&name) else {
        let known: Vec<&str> = services::all().iter().map(|service| service.name).collect();
        anyhow::bail!(
            "no service `{name}`: `gateway` or one of {}",
            known.join(", ")
        );
    };
    let prepared = (service.from_file)(&path, &env)?;
    let (telemetry, listen, admin) = (prepared.telemetry.clone(), prepared.listen, prepared.admin);
    run_server(
        &format!("onestop-{name}"),
        &telemetry,
        listen,
        admin,
        |listener, shutdown| async move { prepared.start(listener, shutdown).await?.await },
    )
    .await
}

/// Runs one server: telemetry, the bound listener, the signal that stops it, and the flush of
/// telemetry after it has drained.
async fn run_server<F, Fut>(
    name: &str,
    telemetry: &TelemetryConfig,
    listen: SocketAddr,
    admin: Option<SocketAddr>,
    serve: F,
) -> anyhow::Result<()>
where
    F: FnOnce(TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let telemetry = onestop_platform::telemetry::init(telemetry, name)?;
    let ignored = config::ignored(&config::process_env());
    if !ignored.is_empty() {
        tracing::info!(
            ?ignored,
            "variables that start with ONESTOP_ but not ONESTOP__ are not configuration overrides"
        );
    }
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    tracing::info!(address = %listen, "{name} listening");
    let shutdown = CancellationToken::new();
    // The admin listener outlives the shutdown's drain, so that `/readyz` answers 503 while the
    // server drains instead of refusing connections.
    let admin_stop = CancellationToken::new();
    let _admin_stopped = admin_stop.clone().drop_guard();
    if let Some(admin) = admin {
        let listener = TcpListener::bind(admin)
            .await
            .with_context(|| format!("binding the admin listener to {admin}"))?;
        tokio::spawn(onestop_platform::metrics::serve_admin(listener, admin_stop));
    }
    cancel_on_signal(shutdown.clone());
    let result = serve(listener, shutdown).await;
    telemetry.shutdown();
    result
}

#[cfg(test)]
mod tests {
    /// Every command's arguments are well-formed (clap checks names, defaults and conflicts only
    /// when a command is built, so a mistake would otherwise surface at a user's first call).
    #[test]
    fn the_commands_are_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    /// `onestop serve --help` names every service it can run.
    #[test]
    fn serve_names_every_service() {
        use clap::CommandFactory;
        let mut cli = super::Cli::command();
        let help = cli
            .find_subcommand_mut("serve")
            .unwrap()
            .render_long_help()
            .to_string();
        for service in onestop_cli::services::all() {
            assert!(
                help.contains(&format!("`{}`", service.name)),
                "{} is not named in {help}",
                service.name
            );
        }
    }
}
