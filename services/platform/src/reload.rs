//! Settings read again while the process runs: the revocation list of a server's TLS and the
//! gateway's access policy. A file is checked every `reload_interval`; when it changed, what it
//! holds is loaded again, and everyone who must act on the change is told through
//! [`Reloading::changes`] (open connections of a revoked certificate close, streams of a member
//! who lost a right end). A file that cannot be read or parsed is logged and the previous value
//! stays in force, so that a half-written file never opens or closes anything.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The labels of a failed reload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    /// What could not be loaded: `revocation_list`, `access_policy`.
    what: String,
}

/// `onestop_reload_failures_total{what}`: changed files that could not be loaded (the previous
/// value stayed in force). An operator's edit that did not take effect shows here, not only in
/// a log line.
fn failures() -> &'static Family<ReloadLabels, Counter> {
    static FAILURES: OnceLock<Family<ReloadLabels, Counter>> = OnceLock::new();
    FAILURES.get_or_init(|| {
        let family = Family::default();
        crate::metrics::register(
            "reload_failures",
            "Changed files that could not be loaded again (the previous value stays in force)",
            family.clone(),
        );
        family
    })
}

/// Counts a failed reload of `what`.
fn count_failure(what: &str) {
    failures()
        .get_or_create(&ReloadLabels {
            what: what.replace(' ', "_"),
        })
        .inc();
}

/// What identifies one version of a file without reading it: its modification time and size.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: Option<&Path>) -> Stamp {
    let meta = std::fs::metadata(path?).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

type Load<T, E> = Box<dyn Fn() -> Result<T, E> + Send + Sync>;

/// A value loaded from files, loaded again when `trigger` changes.
pub struct Reloading<T, E> {
    /// For logs: "revocation list", "access policy".
    what: &'static str,
    trigger: Option<PathBuf>,
    load: Load<T, E>,
    current: RwLock<(Arc<T>, Stamp)>,
    /// Counts the reloads; receivers wake on every one.
    changes: watch::Sender<u64>,
}

impl<T, E> std::fmt::Debug for Reloading<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("what", &self.what)
            .field("trigger", &self.trigger)
            .finish_non_exhaustive()
    }
}

impl<T, E> Reloading<T, E>
where
    T: Send + Sync + 'static,
    E: std::fmt::Display + Send + 'static,
{
    /// Loads the first value; `load` is called again whenever `trigger` changes (never, without
    /// one).
    pub fn new(
        what: &'static str,
        trigger: Option<PathBuf>,
        load: impl Fn() -> Result<T, E> + Send + Sync + 'static,
    ) -> Result<Self, E> {
        let stamp = stamp(trigger.as_deref());
        let value = load()?;
        // The family is there from the start, so that `rate()` sees the first failure.
        let _ = failures().get_or_create(&ReloadLabels {
            what: what.replace(' ', "_"),
        });
        Ok(Self {
            what,
            trigger,
            load: Box::new(load),
            current: RwLock::new((Arc::new(value), stamp)),
            changes: watch::Sender::new(0),
        })
    }

    /// The value in force.
    pub fn current(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .0
            .clone()
    }

    /// Wakes on every reload (see [`watch::Receiver::changed`]).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Loads the value again if the trigger file changed; returns whether it did. A file that
    /// cannot be loaded leaves the previous value in force.
    pub fn reload_if_changed(&self) -> Result<bool, E> {
        let now = stamp(self.trigger.as_deref());
        let before = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .1;
        if now == before {
            return Ok(false);
        }
        let value = (self.load)().inspect_err(|_| count_failure(self.what))?;
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = (Arc::new(value), now);
        self.changes.send_modify(|reloads| *reloads += 1);
        tracing::info!(what = self.what, "reloaded");
        Ok(true)
    }

    /// Checks the trigger file every `interval` until `shutdown`.
    pub fn watch(self: &Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        if self.trigger.is_none() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(interval.max(Duration::from_millis(10)));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = every.tick() => {}
                }
                let reloading = this.clone();
                match tokio::task::spawn_blocking(move || reloading.reload_if_changed()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => tracing::error!(
                        what = this.what,
                        %error,
                        "unusable; the previous one stays in force"
                    ),
                    Err(error) => {
                        count_failure(this.what);
                        tracing::error!(what = this.what, %error, "reload failed");
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_file_is_loaded_again_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("value");
        std::fs::write(&file, "1").unwrap();
        let path = file.clone();
        let value = Reloading::new("value", Some(file.clone()), move || {
            std::fs::read_to_string(&path)
                .unwrap()
                .parse::<u32>()
                .map_err(|e| e.to_string())
        })
        .unwrap();
        let mut changes = value.changes();
        assert_eq!(*value.current(), 1);
        assert!(!value.reload_if_changed().unwrap(), "nothing changed yet");
        std::fs::write(&file, "22").unwrap();
        assert!(value.reload_if_changed().unwrap());
        assert_eq!(*value.current(), 22);
        assert!(changes.has_changed().unwrap(), "receivers are told");
        changes.mark_unchanged();
        std::fs::write(&file, "not a number").unwrap();
        let failed = || {
            failures()
                .get_or_create(&ReloadLabels {
                    what: "value".into(),
                })
                .get()
        };
        let before = failed();
        assert!(value.reload_if_changed().is_err());
        assert_eq!(failed(), before + 1, "the failure is counted");
        assert_eq!(*value.current(), 22, "the previous value stays");
        assert!(!changes.has_changed().unwrap());
    }
}
