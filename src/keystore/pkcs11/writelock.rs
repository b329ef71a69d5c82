//! A host-wide lock that kesh processes sharing a token take around every token write.
//!
//! Some software tokens (the profiles with `host_write_lock`, see [`super::profile`]) keep a
//! per-process list of a token's objects and re-read the token directory only when the
//! token's generation counter moved since it last looked. A process's own write moves
//! the counter and marks it seen, so when two processes write at the same moment, each can
//! swallow the other's change and never list the other's new object file: the key another
//! instance just created stays invisible here (404, and a create that waits on the other's
//! "pending" objects until it gives up) until some third write happens. Serialising writes
//! between processes closes that window: a process only writes while no other is writing, so
//! every foreign change it has not listed yet is still unseen, and the next look lists it.
//!
//! Software tokens whose store is a database file that processes share need it too, for
//! another reason: their write transactions read before they write, and of two processes
//! writing at once one fails (`CKR_DEVICE_MEMORY`) instead of waiting.
//!
//! Network HSMs keep objects on the device and need no lock; only processes on one host can
//! share one (such a token's directory is local anyway). Owns the lock file; knows nothing of
//! what is written under it.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::Pkcs11Error;

/// The lock file, opened once per keystore.
#[derive(Debug)]
pub struct WriteLock {
    path: PathBuf,
    file: File,
}

/// Held while writing; released on drop.
pub struct Held<'a>(&'a File);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

impl WriteLock {
    /// Opens (creating) the lock file.
    pub fn open(path: &Path) -> std::io::Result<WriteLock> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        Ok(WriteLock {
            path: path.to_owned(),
            file,
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the lock, waiting at most `limit` for another process to release it.
    pub fn hold(&self, limit: Duration) -> Result<Held<'_>, Pkcs11Error> {
        let deadline = Instant::now() + limit;
        loop {
            match self.file.try_lock() {
                Ok(()) => return Ok(Held(&self.file)),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(Pkcs11Error::WriteLockBusy {
                        path: self.path.clone(),
                        limit,
                    })
                }
                Err(TryLockError::Error(e)) => {
                    return Err(Pkcs11Error::WriteLockFailed {
                        path: self.path.clone(),
                        source: Arc::new(e),
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_across_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("writes.lock");
        // Two opens stand for two processes: flock-style locks belong to the open file.
        let (a, b) = (
            WriteLock::open(&path).unwrap(),
            WriteLock::open(&path).unwrap(),
        );
        let held = a.hold(Duration::from_secs(1)).unwrap();
        let refused = b.hold(Duration::from_millis(20)).err().unwrap().to_string();
        assert!(refused.contains("held the token write lock"), "{refused}");
        drop(held);
        b.hold(Duration::from_secs(1)).unwrap();
    }
}
