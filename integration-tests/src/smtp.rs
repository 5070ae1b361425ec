//! A real SMTP server for the tests: Python's aiosmtpd (Debian's `python3-aiosmtpd`), run by
//! `smtp/server.py` on a free port. It reports every message it accepts, and can refuse every
//! recipient with a temporary failure, or reject them for good, until told otherwise.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

/// A message the server accepted.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Mail {
    /// The envelope sender.
    pub from: String,
    /// The envelope recipients.
    pub to: Vec<String>,
    /// The decoded subject.
    pub subject: String,
    /// The `Message-ID` header.
    pub message_id: String,
    /// The plain-text body.
    pub body: String,
}

/// The running server, stopped when dropped.
#[derive(Debug)]
pub struct SmtpServer {
    _child: Child,
    stdin: ChildStdin,
    port: u16,
    mails: mpsc::UnboundedReceiver<Mail>,
    modes: mpsc::UnboundedReceiver<String>,
}

/// The Python that has aiosmtpd: Debian's own, which `.ci/run` installs it for.
fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

impl SmtpServer {
    /// Starts the server, refusing every recipient at first if `refusing`.
    pub async fn start(refusing: bool) -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/smtp/server.py");
        let mut child = Command::new(python())
            .arg(script)
            .arg(if refusing { "refuse" } else { "accept" })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs the SMTP server (Debian: python3-aiosmtpd)");
        let stdin = child.stdin.take().expect("stdin");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the SMTP server starts within 20 s")
            .expect("its output")
            .expect("the SMTP server printed nothing (is python3-aiosmtpd installed?)");
        let port = first
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the SMTP server said `{first}`"));
        let (mail_tx, mails) = mpsc::unbounded_channel();
        let (mode_tx, modes) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(mode) = line.strip_prefix("mode ") {
                    let _ = mode_tx.send(mode.to_owned());
                } else if let Ok(mail) = serde_json::from_str::<Mail>(&line) {
                    let _ = mail_tx.send(mail);
                }
            }
        });
        Self {
            _child: child,
            stdin,
            port,
            mails,
            modes,
        }
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The next message it accepts, waited for at most 30 s.
    pub async fn next_mail(&mut self) -> Mail {
        tokio::time::timeout(Duration::from_secs(30), self.mails.recv())
            .await
            .expect("a mail within 30 s")
            .expect("the SMTP server is running")
    }

    /// A message it accepted already, if any.
    pub fn try_mail(&mut self) -> Option<Mail> {
        self.mails.try_recv().ok()
    }

    /// Makes it refuse (temporarily) or accept recipients from now on.
    pub async fn set_refusing(&mut self, refusing: bool) {
        self.switch(if refusing { "refuse" } else { "accept" })
            .await;
    }

    /// Makes it reject every recipient for good (550) from now on.
    pub async fn reject_all(&mut self) {
        self.switch("reject").await;
    }

    async fn switch(&mut self, mode: &str) {
        self.stdin
            .write_all(format!("{mode}\n").as_bytes())
            .await
            .expect("the SMTP server reads its commands");
        self.stdin.flush().await.expect("flush");
        let confirmed = tokio::time::timeout(Duration::from_secs(10), self.modes.recv())
            .await
            .expect("the switch is confirmed within 10 s");
        assert_eq!(confirmed.as_deref(), Some(mode));
    }
}
