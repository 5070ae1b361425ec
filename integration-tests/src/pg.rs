//! A throwaway PostgreSQL server for one test, started from the machine's PostgreSQL binaries.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
//! `postgres` user (or `nobody`) through `setpriv`, which executes it directly so that the
//! process we hold is the server itself. Readiness is the server's own "ready to accept
//! connections" line, not a timer. The server and its files go away when the value is dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};

/// A running PostgreSQL server.
pub struct Postgres {
    child: Child,
    _dir: tempfile::TempDir,
    /// A URL for the server's `postgres` database.
    pub url: String,
}

fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(Result::ok)
                .map(|d| d.path().join("bin").join(name))
                .collect()
        })
        .unwrap_or_default();
    versioned.sort();
    versioned.reverse();
    on_path
        .into_iter()
        .chain(versioned)
        .find(|path| path.is_file())
        .with_context(|| {
            format!("PostgreSQL's `{name}` was not found on PATH or in /usr/lib/postgresql/*/bin: install PostgreSQL (apt-get install postgresql) to run these tests")
        })
}

/// The user to run the server as, when we are root.
fn unprivileged_user() -> anyhow::Result<Option<(String, String)>> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .context("running id")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Ok(None);
    }
    for user in ["postgres", "nobody"] {
        let group = Command::new("id").args(["-gn", user]).output()?;
        if group.status.success() {
            let group = String::from_utf8_lossy(&group.stdout).trim().to_owned();
            return Ok(Some((user.to_owned(), group)));
        }
    }
    bail!(
        "running as root, and neither a `postgres` nor a `nobody` user exists to run PostgreSQL as"
    )
}

fn command(binary: &Path, user: &Option<(String, String)>) -> Command {
    match user {
        Some((user, group)) => {
            let mut command = Command::new("setpriv");
            command
                .arg(format!("--reuid={user}"))
                .arg(format!("--regid={group}"))
                .arg("--clear-groups")
                .arg(binary);
            command
        }
        None => Command::new(binary),
    }
}

impl Postgres {
    /// Initialises a cluster in a temporary directory and starts a server on a Unix socket there.
    pub fn start() -> anyhow::Result<Self> {
        let initdb = find_binary("initdb")?;
        let postgres = find_binary("postgres")?;
        let user = unprivileged_user()?;
        let dir = tempfile::Builder::new().prefix("onestop-pg").tempdir()?;
        let data = dir.path().join("data");
        if let Some((user, group)) = &user {
            let status = Command::new("chown")
                .arg(format!("{user}:{group}"))
                .arg(dir.path())
                .status()?;
            if !status.success() {
                bail!("chown of {} failed", dir.path().display());
            }
        }
        let output = command(&initdb, &user)
            .arg("-D")
            .arg(&data)
            .args(["-U", "onestop", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .output()
            .context("running initdb")?;
        if !output.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        // Only a Unix socket in the server's own directory: no TCP port to race other tests for.
        let mut child = command(&postgres, &user)
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(dir.path())
            .args(["-c", "listen_addresses=", "-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting postgres")?;
        let stderr = child.stderr.take().context("postgres stderr")?;
        let (ready_tx, ready_rx) = mpsc::channel();
        // Reads the server's log: the first "ready" line is the readiness signal; the rest is
        // drained so that the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut log = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("ready to accept connections") {
                    let _ = ready_tx.send(Ok(()));
                } else if log.len() < 200 {
                    log.push(line);
                }
            }
            let _ = ready_tx.send(Err(log.join("\n")));
        });
        match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => {}
            Ok(Err(log)) => {
                let _ = child.kill();
                bail!("postgres exited before it was ready:\n{log}");
            }
            Err(_) => {
                let _ = child.kill();
                bail!("postgres was not ready within 60 s");
            }
        }
        let url = format!(
            "postgres://onestop@localhost/postgres?host={}",
            dir.path().display()
        );
        Ok(Self {
            child,
            _dir: dir,
            url,
        })
    }
}

impl Postgres {
    /// A new, empty database on this server (each service has its own), and its URL.
    pub async fn database(&self, name: &str) -> anyhow::Result<String> {
        use sqlx::Connection;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            bail!("database name `{name}`: lowercase letters and `_` only");
        }
        let mut connection = sqlx::PgConnection::connect(&self.url).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut connection)
            .await
            .with_context(|| format!("creating database {name}"))?;
        connection.close().await?;
        Ok(self.url.replacen("/postgres?", &format!("/{name}?"), 1))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGTERM is PostgreSQL's "smart" shutdown; for a test server, fast (SIGINT) is enough.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}
