//! The gateway's call log, kept affordable: one line per call, but of the refusals of one member
//! for one reason only the first in each second is written, and the rest are counted into one
//! summary line a second later. A member at its rate limit, refused thousands of times a
//! second, thus writes two lines a second, not megabytes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Why the gateway refused a call, carried on its answer to the call's log line.
#[derive(Clone, Debug)]
pub struct Refused(pub Arc<str>);

/// A member and a reason it was refused for.
type Key = (Arc<str>, Arc<str>);

/// Refusals seen in the current second, by member and reason: how many were not written.
#[derive(Default)]
pub struct RefusalLog {
    seen: Mutex<HashMap<Key, u64>>,
}

/// The process's refusal log (the gateway's log lines are the process's too).
pub fn refusals() -> &'static RefusalLog {
    static LOG: OnceLock<RefusalLog> = OnceLock::new();
    LOG.get_or_init(RefusalLog::default)
}

impl RefusalLog {
    /// Whether this refusal of `member` for `reason` gets its own line: the first in the
    /// current second does, the others are counted for the summary.
    pub fn admit(&self, member: &Arc<str>, reason: &Arc<str>) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get_mut(&(member.clone(), reason.clone())) {
            Some(suppressed) => {
                *suppressed += 1;
                false
            }
            None => {
                // Bounded: members and reasons are bounded sets, and the map is emptied every
                // second; a flood of distinct keys is capped all the same.
                if seen.len() < 10_000 {
                    seen.insert((member.clone(), reason.clone()), 0);
                }
                true
            }
        }
    }

    /// Ends the second: one summary line for every member and reason with refusals not written.
    pub fn summarize(&self) {
        let seen = std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()));
        for ((member, reason), suppressed) in seen {
            if suppressed > 0 {
                tracing::info!(
                    target: "onestop_gateway::call",
                    member = %member,
                    reason = %reason,
                    more = suppressed,
                    "more calls refused in the last second for the same reason"
                );
            }
        }
    }

    /// Ends a second every second until `shutdown`.
    pub fn keep_summarizing(&'static self, shutdown: CancellationToken) {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => {
                        self.summarize();
                        return;
                    }
                    _ = every.tick() => self.summarize(),
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_refusal_of_a_second_is_written_and_the_rest_counted() {
        let log = RefusalLog::default();
        let (member, limited, denied): (Arc<str>, Arc<str>, Arc<str>) = (
            "GOV/VSAA".into(),
            "RATE_LIMITED".into(),
            "ACCESS_DENIED".into(),
        );
        assert!(log.admit(&member, &limited));
        assert!(!log.admit(&member, &limited));
        assert!(!log.admit(&member, &limited));
        assert!(
            log.admit(&member, &denied),
            "another reason has its own line"
        );
        assert_eq!(
            log.seen.lock().unwrap()[&(member.clone(), limited.clone())],
            2
        );
        log.summarize();
        assert!(log.admit(&member, &limited), "a new second starts again");
    }
}
