//! A person's session as `onestop login` keeps it, so that the short-lived access token it
//! printed keeps working for the session's whole life.
//!
//! `onestop login` prints the access token and writes the session (that token's successor, its
//! expiry, the single-use refresh token) to `<sessions dir>/<hash of the printed token>.json`,
//! readable by its owner only. A later command given the printed token (`--token` or
//! `ONESTOP_TOKEN`) finds the file by the token's hash and sends the session's current access
//! token instead, renewing it through identity's `RefreshSession` first when it expires within
//! [`MARGIN`]; a call the gateway still refuses as `TOKEN_EXPIRED` (clocks apart) renews it and
//! runs the command once more ([`renew_after_refusal`]). A token without a kept session is sent
//! as it is.
//!
//! Renewing uses up the refresh token, and one used twice ends the session: the file is locked
//! while it is read and renewed, so that commands run at the same time renew it once.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use onestop_proto::identity::v1 as identity;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::client::{Connection, failed};

/// An access token expiring sooner than this is renewed before it is sent, so that it does not
/// expire on the way or during a short command.
pub const MARGIN: Duration = Duration::from_secs(30);

/// A session's tokens as kept on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// The access token to send now.
    pub access_token: String,
    /// When it expires.
    pub access_expire_time: OffsetDateTime,
    /// The refresh token that renews it (single use).
    pub refresh_token: String,
    /// When the session ends, renewed or not.
    pub session_expire_time: OffsetDateTime,
}

impl Session {
    /// The session of tokens identity returned.
    pub fn from_tokens(tokens: &identity::Tokens) -> anyhow::Result<Self> {
        let time = |t: Option<&prost_types::Timestamp>, what: &str| {
            t.and_then(|t| OffsetDateTime::from_unix_timestamp(t.seconds).ok())
                .with_context(|| format!("identity returned tokens without {what}"))
        };
        if tokens.refresh_token.is_empty() {
            bail!("identity returned tokens without a refresh token");
        }
        Ok(Self {
            access_token: tokens.access_token.clone(),
            access_expire_time: time(
                tokens.access_token_expire_time.as_ref(),
                "the access token's expiry",
            )?,
            refresh_token: tokens.refresh_token.clone(),
            session_expire_time: time(tokens.session_expire_time.as_ref(), "the session's expiry")?,
        })
    }

    fn to_json(&self) -> anyhow::Result<String> {
        Ok(serde_json::to_string_pretty(&json!({
            "access_token": self.access_token,
            "access_token_expire_time": self.access_expire_time.format(&Rfc3339)?,
            "refresh_token": self.refresh_token,
            "session_expire_time": self.session_expire_time.format(&Rfc3339)?,
        }))?)
    }

    fn from_json(text: &str) -> anyhow::Result<Self> {
        let value: Value = serde_json::from_str(text)?;
        let text = |name: &str| {
            value[name]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("no `{name}`"))
        };
        let time = |name: &str| -> anyhow::Result<OffsetDateTime> {
            Ok(OffsetDateTime::parse(&text(name)?, &Rfc3339)?)
        };
        Ok(Self {
            access_token: text("access_token")?,
            access_expire_time: time("access_token_expire_time")?,
            refresh_token: text("refresh_token")?,
            session_expire_time: time("session_expire_time")?,
        })
    }
}

/// The file that keeps the session of the access token `onestop login` printed.
pub fn file_of(dir: &Path, printed_token: &str) -> PathBuf {
    let digest = ring::digest::digest(&ring::digest::SHA256, printed_token.as_bytes());
    let name = hex::encode(digest.as_ref());
    dir.join(format!("{}.json", &name[..32]))
}

/// Keeps a new session under the token printed for it; returns the file.
pub fn keep(dir: &Path, printed_token: &str, session: &Session) -> anyhow::Result<PathBuf> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let path = file_of(dir, printed_token);
    let _lock = Lock::take(&path)?;
    write(&path, session)?;
    Ok(path)
}

/// A kept session, as it is now.
pub fn read_kept(path: &Path) -> anyhow::Result<Session> {
    let _lock = Lock::take(path)?;
    read(path)
}

/// Forgets a kept session (once it has ended at identity).
pub fn forget(path: &Path) -> anyhow::Result<()> {
    let _lock = Lock::take(path)?;
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    let _ = std::fs::remove_file(path.with_extension("lock"));
    Ok(())
}

/// Writes a session file whole (a new file renamed over the old one), owner-only.
fn write(path: &Path, session: &Session) -> anyhow::Result<()> {
    let partial = path.with_extension("partial");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .with_context(|| format!("writing {}", partial.display()))?;
    file.write_all(session.to_json()?.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<Session> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Session::from_json(&text).with_context(|| format!("{} is not a kept session", path.display()))
}

/// An exclusive lock on a session file, held while it is read and renewed.
struct Lock(File);

impl Lock {
    fn take(path: &Path) -> anyhow::Result<Self> {
        let lock = path.with_extension("lock");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock)
            .with_context(|| format!("opening {}", lock.display()))?;
        file.lock()
            .with_context(|| format!("locking {}", lock.display()))?;
        Ok(Self(file))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// The session this command sends the token of, for [`renew_after_refusal`].
static IN_USE: Mutex<Option<(Connection, PathBuf)>> = Mutex::new(None);

/// The access token to send for the token given: the kept session's current one (renewed
/// when it expires within [`MARGIN`]), or the given one when no session is kept for it.
pub async fn current_token(connection: &Connection, given: &str) -> anyhow::Result<String> {
    let path = file_of(connection.sessions_dir(), given);
    if !path.exists() {
        return Ok(given.to_owned());
    }
    if let Ok(mut in_use) = IN_USE.lock() {
        *in_use = Some((connection.clone(), path.clone()));
    }
    let _lock = Lock::take(&path)?;
    let session = read(&path)?;
    let now = OffsetDateTime::now_utc();
    if now + MARGIN < session.access_expire_time {
        return Ok(session.access_token);
    }
    Ok(renew(connection, &path, &session).await?.access_token)
}

/// After a call was refused as `TOKEN_EXPIRED`: renews the session whose token was sent, if
/// any. `Ok(true)` when it was renewed and the command may run again.
pub async fn renew_after_refusal() -> anyhow::Result<bool> {
    let in_use = IN_USE.lock().ok().and_then(|in_use| in_use.clone());
    let Some((connection, path)) = in_use else {
        return Ok(false);
    };
    let _lock = Lock::take(&path)?;
    let session = read(&path)?;
    renew(&connection, &path, &session).await?;
    Ok(true)
}

/// Renews a session at identity, as the member system it was issued to, and keeps the new
/// tokens. A session identity no longer renews is forgotten.
async fn renew(connection: &Connection, path: &Path, session: &Session) -> anyhow::Result<Session> {
    let forget = || {
        let _ = std::fs::remove_file(path);
    };
    if OffsetDateTime::now_utc() >= session.session_expire_time {
        forget();
        bail!(
            "the session of this token ended at {}: log in again (`onestop login`)",
            session
                .session_expire_time
                .format(&Rfc3339)
                .unwrap_or_default()
        );
    }
    let mut client =
        identity::identity_service_client::IdentityServiceClient::new(connection.channel()?);
    // Fields the contract may gain keep their defaults.
    #[allow(clippy::needless_update)]
    let request = identity::RefreshSessionRequest {
        refresh_token: session.refresh_token.clone(),
        ..Default::default()
    };
    let tokens = match client.refresh_session(request).await {
        Ok(answer) => answer.into_inner().tokens.unwrap_or_default(),
        Err(status) => {
            // Refused for the session itself (ended, reused, unknown): it will never renew.
            if status.code() == tonic::Code::Unauthenticated {
                forget();
            }
            return Err(failed(status).context(
                "renewing the session kept by `onestop login` (log in again if it has ended)",
            ));
        }
    };
    let renewed = Session::from_tokens(&tokens)?;
    write(path, &renewed)?;
    Ok(renewed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            access_token: "a.b.c".into(),
            access_expire_time: time::macros::datetime!(2026-02-14 10:05 UTC),
            refresh_token: "r".into(),
            session_expire_time: time::macros::datetime!(2026-02-14 22:00 UTC),
        }
    }

    #[test]
    fn a_session_reads_back_as_written() {
        let text = session().to_json().unwrap();
        assert_eq!(Session::from_json(&text).unwrap(), session());
        assert!(Session::from_json("{}").is_err());
    }
}
