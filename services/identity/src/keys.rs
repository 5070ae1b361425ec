//! The keys that sign platform tokens: kept as private files in one directory, rotated with
//! overlap, published as a JWK set.
//!
//! Each key is `<kid>.p8` (PKCS#8, mode 0600, in a directory of mode 0700). A new key is made a
//! publication lead before the newest is a rotation period old, and published at once, but it
//! signs only once the lead has passed: by then every replica has read it and every verifier
//! has fetched it, so no token arrives signed with a key a verifier has not seen. The newest
//! key past its lead signs. An older key stays in
//! the published set until every token it signed has expired (rotation period plus the longest
//! token lifetime), and its file is removed a rotation period after that. Replicas sharing the
//! directory read it again every `[identity] key_rescan_s` (a minute by default), so that a key another replica made is
//! published everywhere soon; verifiers also fetch the set when they meet an unknown `kid`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use onestop_platform::tokens::{self, SigningKey};
use time::OffsetDateTime;

/// Why the keys cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The directory or a file could not be read or written.
    #[error("key directory {path}: {error}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A key file does not hold a usable key.
    #[error("{0}")]
    Invalid(String),
}

struct Key {
    created: OffsetDateTime,
    signing: SigningKey,
}

/// The current keys.
struct Ring {
    /// Oldest first.
    keys: Vec<Key>,
    /// The one that signs.
    signer: usize,
    jwks: String,
}

/// The signing keys of one identity service.
pub struct Keys {
    dir: PathBuf,
    rotation: Duration,
    /// The longest lifetime of a token they sign.
    token_lifetime: Duration,
    /// How long a new key is published before it signs.
    lead: Duration,
    ring: RwLock<Arc<Ring>>,
}

impl Keys {
    /// Opens the key directory (made if missing), making a first key when there is none.
    pub fn open(
        dir: &Path,
        rotation: Duration,
        token_lifetime: Duration,
        lead: Duration,
    ) -> Result<Self, KeyError> {
        let keys = Self {
            dir: dir.to_owned(),
            rotation,
            token_lifetime,
            lead: lead.min(rotation / 2),
            ring: RwLock::new(Arc::new(Ring {
                keys: Vec::new(),
                signer: 0,
                jwks: tokens::key_set([]),
            })),
        };
        keys.refresh(OffsetDateTime::now_utc())?;
        Ok(keys)
    }

    /// Reads the directory again, makes a new key when the newest is due for rotation, and
    /// retires keys whose tokens have all expired.
    pub fn refresh(&self, now: OffsetDateTime) -> Result<(), KeyError> {
        make_private_dir(&self.dir)?;
        let mut keys = self.read_dir()?;
        let due = keys
            .last()
            .is_none_or(|newest| newest.created + self.rotation <= now + self.lead);
        if due {
            keys.push(self.create(now)?);
        }
        // The newest key past its lead signs; with none past it (a first start), the oldest.
        let signing = keys
            .iter()
            .rposition(|k| k.created + self.lead <= now)
            .unwrap_or(0);
        // A key stops signing a lead after the next is made (a rotation period after its own
        // making, plus the lead, at the latest), and its last tokens expire a token lifetime
        // after that.
        let publish_until =
            |key: &Key| key.created + self.rotation * 2 + self.lead + self.token_lifetime;
        let mut published = Vec::new();
        let mut signer = 0;
        for (i, key) in keys.into_iter().enumerate() {
            if i >= signing || publish_until(&key) > now {
                if i == signing {
                    signer = published.len();
                }
                published.push(key);
            } else if publish_until(&key) + self.rotation <= now {
                let path = self.dir.join(format!("{}.p8", key.signing.kid()));
                if let Err(error) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), %error, "removing a retired key failed");
                }
            }
        }
        let jwks = tokens::key_set(published.iter().map(|k| &k.signing));
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Ring {
            keys: published,
            signer,
            jwks,
        });
        Ok(())
    }

    /// Refreshes every `interval` until `shutdown`.
    pub async fn keep_fresh(
        self: Arc<Self>,
        interval: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            if let Err(error) = self.refresh(OffsetDateTime::now_utc()) {
                tracing::error!(%error, "refreshing the signing keys failed");
            }
        }
    }

    /// Signs claims with the newest key.
    pub fn sign(&self, claims: &tokens::Claims) -> Result<String, String> {
        let ring = self.ring.read().unwrap_or_else(|p| p.into_inner()).clone();
        let key = ring.keys.get(ring.signer).ok_or("no signing key")?;
        key.signing.sign(claims)
    }

    /// The published key set (JWKS JSON).
    pub fn jwks(&self) -> String {
        self.ring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .jwks
            .clone()
    }

    /// The id of the key that signs now.
    pub fn current_kid(&self) -> Option<String> {
        let ring = self.ring.read().unwrap_or_else(|p| p.into_inner()).clone();
        ring.keys
            .get(ring.signer)
            .map(|k| k.signing.kid().to_owned())
    }

    fn read_dir(&self) -> Result<Vec<Key>, KeyError> {
        let io = |error| KeyError::Io {
            path: self.dir.clone(),
            error,
        };
        let mut keys = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let Some(kid) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".p8"))
            else {
                continue;
            };
            let created = created_of(kid)
                .ok_or_else(|| KeyError::Invalid(format!("{}: not a key name", path.display())))?;
            let der = match std::fs::read(&path) {
                Ok(der) => der,
                // Retired by another replica between the listing and now.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(KeyError::Io { path, error }),
            };
            let signing = SigningKey::from_pkcs8(kid, &der).map_err(KeyError::Invalid)?;
            keys.push(Key { created, signing });
        }
        keys.sort_by_key(|k| (k.created, k.signing.kid().to_owned()));
        Ok(keys)
    }

    fn create(&self, now: OffsetDateTime) -> Result<Key, KeyError> {
        let mut suffix = [0u8; 4];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut suffix)
            .map_err(|_| KeyError::Invalid("no randomness".into()))?;
        let kid = format!(
            "k{}-{}",
            now.unix_timestamp(),
            suffix
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let (signing, der) = SigningKey::generate(&kid).map_err(KeyError::Invalid)?;
        // Written whole under a temporary name, then renamed: a replica reading the directory
        // never sees half a key.
        let path = self.dir.join(format!("{kid}.p8"));
        let partial = self.dir.join(format!(".{kid}.tmp"));
        write_private(&partial, &der).map_err(|error| KeyError::Io {
            path: partial.clone(),
            error,
        })?;
        std::fs::rename(&partial, &path).map_err(|error| KeyError::Io {
            path: path.clone(),
            error,
        })?;
        tracing::info!(kid, "made a new token signing key");
        Ok(Key {
            created: now,
            signing,
        })
    }
}

/// The creation time written in a key id (`k<unix seconds>-<random>`).
fn created_of(kid: &str) -> Option<OffsetDateTime> {
    let seconds = kid.strip_prefix('k')?.split('-').next()?.parse().ok()?;
    OffsetDateTime::from_unix_timestamp(seconds).ok()
}

fn make_private_dir(dir: &Path) -> Result<(), KeyError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |error| KeyError::Io {
        path: dir.to_owned(),
        error,
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    let mode = std::fs::metadata(dir).map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(KeyError::Invalid(format!(
            "key directory {} is open to others (mode {:o}); make it 0700",
            dir.display(),
            mode & 0o777
        )));
    }
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    // Durable before it is used: a token signed with a key lost in a crash could never be
    // verified.
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_rotate_with_overlap_and_retire() {
        let dir = tempfile::tempdir().unwrap();
        let keydir = dir.path().join("keys");
        let hour = Duration::from_secs(3600);
        let lead = Duration::from_secs(120);
        let keys = Keys::open(&keydir, hour * 24, Duration::from_secs(300), lead).unwrap();
        let first = keys.current_kid().unwrap();
        let start = created_of(&first).unwrap();
        // Within the period the same key signs.
        keys.refresh(start + hour).unwrap();
        assert_eq!(keys.current_kid().unwrap(), first);
        // A lead before the period ends the next key is published, but does not sign yet.
        keys.refresh(start + hour * 24 - lead / 2).unwrap();
        assert_eq!(keys.current_kid().unwrap(), first);
        assert_eq!(keys.jwks().matches("\"kid\"").count(), 2);
        // After it, a new one signs and the old one is still published.
        keys.refresh(start + hour * 25).unwrap();
        let second = keys.current_kid().unwrap();
        assert_ne!(second, first);
        assert!(keys.jwks().contains(&first) && keys.jwks().contains(&second));
        // Much later, the first is neither published nor kept.
        keys.refresh(start + hour * 24 * 4).unwrap();
        assert!(!keys.jwks().contains(&first));
        assert!(!keydir.join(format!("{first}.p8")).exists());
        // Files are private.
        use std::os::unix::fs::PermissionsExt;
        let file = keydir.join(format!("{}.p8", keys.current_kid().unwrap()));
        assert_eq!(
            std::fs::metadata(file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Another instance on the same directory signs with the same key.
        let again = Keys::open(&keydir, hour * 24, Duration::from_secs(300), lead).unwrap();
        assert_eq!(again.current_kid(), keys.current_kid());
    }
}
