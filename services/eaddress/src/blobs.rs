//! Attachment content on disk, named by its SHA-256 (`<dir>/ab/cd/abcd…`), never in the
//! database and never whole in memory: an upload streams into a temporary file while it is
//! hashed and counted, and becomes visible under its name only when its size and digest match
//! what was declared; anything else leaves nothing behind.

use std::io;
use std::path::{Path, PathBuf};

use ring::digest;
use tokio::fs::{self, File};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The largest chunk of an upload or a download.
pub const MAX_CHUNK_BYTES: usize = 1024 * 1024;

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// More content arrived than the header declared.
    #[error("more than the declared {declared} bytes arrived")]
    TooLong {
        /// The declared size.
        declared: u64,
    },
    /// The stream ended before the declared size.
    #[error("the upload ended after {received} of the declared {declared} bytes")]
    CutOff {
        /// Bytes received.
        received: u64,
        /// The declared size.
        declared: u64,
    },
    /// The content's digest is not the declared one.
    #[error("the content's SHA-256 is {actual}, not the declared {declared}")]
    DigestMismatch {
        /// Declared.
        declared: String,
        /// Computed.
        actual: String,
    },
    /// The disk failed.
    #[error("attachment storage failed: {0}")]
    Io(#[from] io::Error),
}

/// The attachment store.
#[derive(Clone, Debug)]
pub struct Blobs {
    dir: PathBuf,
}

/// An upload in progress: a temporary file removed unless the upload completes.
pub struct Upload {
    file: Option<File>,
    temp: PathBuf,
    final_path: PathBuf,
    context: digest::Context,
    received: u64,
    declared_size: u64,
    declared_sha256: String,
    done: bool,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("temp", &self.temp)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.done {
            // Removal of a refused or abandoned upload; a failure here leaves a stray
            // temporary file that the next start removes.
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

impl Upload {
    /// Adds the next chunk, refusing content beyond the declared size at once.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), UploadError> {
        self.received += chunk.len() as u64;
        if self.received > self.declared_size {
            return Err(UploadError::TooLong {
                declared: self.declared_size,
            });
        }
        self.context.update(chunk);
        if let Some(file) = self.file.as_mut() {
            file.write_all(chunk).await?;
        }
        Ok(())
    }

    /// Completes the upload: the size and digest must match; the content is made durable and
    /// put under its name.
    pub async fn finish(mut self) -> Result<(String, u64), UploadError> {
        if self.received != self.declared_size {
            return Err(UploadError::CutOff {
                received: self.received,
                declared: self.declared_size,
            });
        }
        let actual = hex::encode(self.context.clone().finish().as_ref());
        if actual != self.declared_sha256 {
            return Err(UploadError::DigestMismatch {
                declared: self.declared_sha256.clone(),
                actual,
            });
        }
        if let Some(mut file) = self.file.take() {
            file.flush().await?;
            file.sync_all().await?;
        }
        if let Some(parent) = self.final_path.parent() {
            fs::create_dir_all(parent).await?;
        }
        fs::rename(&self.temp, &self.final_path).await?;
        sync_dir(self.final_path.parent()).await?;
        self.done = true;
        Ok((actual, self.received))
    }
}

async fn sync_dir(dir: Option<&Path>) -> io::Result<()> {
    if let Some(dir) = dir {
        File::open(dir).await?.sync_all().await?;
    }
    Ok(())
}

impl Blobs {
    /// The store in `dir`, created if needed; temporary files left by an earlier process are
    /// removed.
    pub async fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir.join("tmp")).await?;
        let mut stale = fs::read_dir(dir.join("tmp")).await?;
        while let Some(entry) = stale.next_entry().await? {
            let _ = fs::remove_file(entry.path()).await;
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(&sha256[..2]).join(&sha256[2..4]).join(sha256)
    }

    /// Starts an upload of `size` bytes whose SHA-256 is `sha256` (checked hex).
    pub async fn upload(&self, size: u64, sha256: &str) -> Result<Upload, UploadError> {
        let temp = self
            .dir
            .join("tmp")
            .join(uuid::Uuid::now_v7().simple().to_string());
        let file = File::create(&temp).await?;
        Ok(Upload {
            file: Some(file),
            temp,
            final_path: self.path(sha256),
            context: digest::Context::new(&digest::SHA256),
            received: 0,
            declared_size: size,
            declared_sha256: sha256.to_owned(),
            done: false,
        })
    }

    /// Whether the content is on disk.
    pub async fn exists(&self, sha256: &str) -> bool {
        fs::try_exists(self.path(sha256)).await.unwrap_or(false)
    }

    /// Opens stored content for reading.
    pub async fn open_content(&self, sha256: &str) -> io::Result<Content> {
        Ok(Content {
            file: File::open(self.path(sha256)).await?,
            context: digest::Context::new(&digest::SHA256),
            expected: sha256.to_owned(),
        })
    }

    /// Removes stored content.
    pub async fn remove(&self, sha256: &str) -> io::Result<()> {
        match fs::remove_file(self.path(sha256)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Stored content being read, checked against its name as it is read.
pub struct Content {
    file: File,
    context: digest::Context,
    expected: String,
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Content")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

/// What reading stored content gives next.
#[derive(Debug)]
pub enum Read {
    /// A chunk.
    Chunk(Vec<u8>),
    /// The end, the content whole and matching its digest.
    End,
    /// The content no longer matches its digest: it was altered on disk.
    Altered,
}

impl Content {
    /// The next chunk, at most [`MAX_CHUNK_BYTES`].
    pub async fn next(&mut self) -> io::Result<Read> {
        let mut buffer = vec![0u8; MAX_CHUNK_BYTES];
        let mut filled = 0;
        while filled < buffer.len() {
            let n = self.file.read(&mut buffer[filled..]).await?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            let actual = hex::encode(self.context.clone().finish().as_ref());
            return Ok(if actual == self.expected {
                Read::End
            } else {
                Read::Altered
            });
        }
        buffer.truncate(filled);
        self.context.update(&buffer);
        Ok(Read::Chunk(buffer))
    }
}
