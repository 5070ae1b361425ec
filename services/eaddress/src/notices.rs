//! Content-free e-mail notices over SMTP: "an official message is waiting in your e-address",
//! never who sent it or what it says. The outbox they come from, and its retries, are the
//! service's; this is the sending and the back-off schedule.

use std::path::PathBuf;
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Deserialize;

/// Attempts at one notice before it is given up.
pub const MAX_ATTEMPTS: u32 = 20;
/// The longest pause between attempts.
pub const MAX_RETRY: Duration = Duration::from_secs(3600);

/// How the SMTP connection is protected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain SMTP (a relay on the same host or a test server).
    None,
    /// STARTTLS, required.
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS).
    Tls,
}

/// The `[eaddress.smtp]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpSettings {
    /// The server's host name.
    pub host: String,
    /// Its port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// How the connection is protected.
    #[serde(default)]
    pub tls: SmtpTls,
    /// The notices' sender address.
    #[serde(default = "default_from")]
    pub from: String,
    /// The user to log in as, if the server wants a login.
    #[serde(default)]
    pub username: Option<String>,
    /// A file holding the password (never in the configuration itself).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// How long one sending may take, seconds.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// Where the notice tells people to log in.
    #[serde(default = "default_portal")]
    pub portal_url: String,
}

fn default_port() -> u16 {
    25
}
fn default_from() -> String {
    "no-reply@onestop.lv".to_owned()
}
fn default_timeout() -> u64 {
    10
}
fn default_portal() -> String {
    "https://onestop.lv/e-address".to_owned()
}

/// Why a notice was not sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// It may go through later (the server is down, busy, or answered 4xx).
    #[error("temporary: {0}")]
    Temporary(String),
    /// It will not (a bad address, a 5xx answer).
    #[error("permanent: {0}")]
    Permanent(String),
}

/// Sends notices through one SMTP server.
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: String,
    portal_url: String,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer")
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl Mailer {
    /// A mailer for `settings` (it connects when it first sends).
    pub fn new(settings: &SmtpSettings) -> Result<Self, String> {
        let builder = match settings.tls {
            SmtpTls::None => {
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&settings.host)
            }
            SmtpTls::Starttls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&settings.host)
                    .map_err(|e| e.to_string())?
            }
            SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&settings.host)
                .map_err(|e| e.to_string())?,
        };
        let mut builder = builder
            .port(settings.port)
            .timeout(Some(Duration::from_secs(settings.timeout_s.max(1))));
        if let Some(user) = &settings.username {
            let password = match &settings.password_file {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| format!("smtp.password_file {}: {e}", path.display()))?
                    .trim()
                    .to_owned(),
                None => return Err("smtp.username needs smtp.password_file".into()),
            };
            builder = builder.credentials(Credentials::new(user.clone(), password));
        }
        settings
            .from
            .parse::<lettre::Address>()
            .map_err(|e| format!("smtp.from `{}`: {e}", settings.from))?;
        Ok(Self {
            transport: builder.build(),
            from: settings.from.clone(),
            portal_url: settings.portal_url.clone(),
        })
    }

    /// Sends the notice `notice_id` to `to`.
    pub async fn send(&self, to: &str, notice_id: &str) -> Result<(), SendError> {
        let email = notice_email(&self.from, to, notice_id, &self.portal_url)?;
        match self.transport.send(email).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(SendError::Permanent(e.to_string())),
            Err(e) => Err(SendError::Temporary(e.to_string())),
        }
    }
}

/// The notice itself: a fixed text in Latvian and English, with a `Message-ID` from the
/// notice's id so that a repeated sending is recognisable.
pub(crate) fn notice_email(
    from: &str,
    to: &str,
    notice_id: &str,
    portal_url: &str,
) -> Result<Message, SendError> {
    let to = to
        .parse::<lettre::message::Mailbox>()
        .map_err(|e| SendError::Permanent(format!("recipient `{to}`: {e}")))?;
    let from = from
        .parse::<lettre::message::Mailbox>()
        .map_err(|e| SendError::Permanent(format!("sender `{from}`: {e}")))?;
    let body = format!(
        "Jūsu oficiālajā elektroniskajā adresē ir jauns paziņojums.\n\
         Lai to izlasītu, piesakieties: {portal_url}\n\n\
         A new official message is waiting in your e-address.\n\
         Log in to read it: {portal_url}\n"
    );
    Message::builder()
        .from(from)
        .to(to)
        .message_id(Some(format!("<{notice_id}@notices.onestop.lv>")))
        .subject("Jauns oficiāls paziņojums e-adresē / A new official message in your e-address")
        .header(ContentType::TEXT_PLAIN)
        .body(body)
        .map_err(|e| SendError::Permanent(e.to_string()))
}

/// The pause after `attempts` failed attempts: `first`, doubling, at most [`MAX_RETRY`].
pub fn retry_after(attempts: u32, first: Duration) -> Duration {
    let factor = 1u32 << attempts.saturating_sub(1).min(20);
    first.saturating_mul(factor).min(MAX_RETRY)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_up_to_an_hour() {
        let first = Duration::from_secs(30);
        assert_eq!(retry_after(1, first), first);
        assert_eq!(retry_after(2, first), Duration::from_secs(60));
        assert_eq!(retry_after(5, first), Duration::from_secs(480));
        assert_eq!(retry_after(19, first), MAX_RETRY);
    }

    #[test]
    fn a_notice_says_nothing_of_the_message() {
        let email = notice_email(
            "no-reply@onestop.lv",
            "janis@example.lv",
            "n1",
            "https://onestop.lv/e-address",
        )
        .unwrap();
        let text = String::from_utf8(email.formatted()).unwrap();
        assert!(
            text.contains("Message-ID: <n1@notices.onestop.lv>"),
            "{text}"
        );
        assert!(text.contains("https://onestop.lv/e-address"));
        assert!(notice_email("no-reply@onestop.lv", "not an address", "n2", "x").is_err());
    }
}
