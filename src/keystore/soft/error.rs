//! The soft keystore's one error type: what failed, and on which file.
//!
//! Turned into a [`crate::keystore::KeystoreError`] where the soft keystore answers, wrapped
//! whole. Names files and modes, never key material.

use std::path::PathBuf;

use crate::keystore::Scheme;

/// Every failure inside the soft keystore.
#[allow(
    missing_docs,
    reason = "each variant's #[error] message says what it and its fields are"
)]
#[derive(Debug, thiserror::Error)]
pub enum SoftError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key directory {}: {source}", path.display())]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the {0} scheme takes AES256 keys only")]
    SchemeTakesAes256(Scheme),
    #[error(
        "KEK file {} must hold 32 bytes as base64 (44 characters) or hex (64 characters)",
        .0.display()
    )]
    KekFormat(PathBuf),
    #[error(
        "KEK file {} is open to other users (mode {mode:o}): `chmod 600` it, or 640 with the \
         kesh group",
        path.display()
    )]
    KekMode { path: PathBuf, mode: u32 },
    #[error(
        "none of the {failures} key files in {} opens under the KEK: is `kek_file:` the right one?",
        dir.display()
    )]
    WrongKek { failures: usize, dir: PathBuf },
    #[error("not a valid key name")]
    FileName,
    #[error("key file {} does not open under the KEK (wrong KEK or corrupt file)", .0.display())]
    KeyFileNotOpening(PathBuf),
    #[error("key file {} is malformed", .0.display())]
    KeyFileMalformed(PathBuf),
    #[error("too many concurrent rotations of '{0}'; try again")]
    RotateContended(String),
    #[error("key version file {}: {why}", path.display())]
    VersionFile { path: PathBuf, why: String },
    #[error("cannot wrap key record: {0}")]
    Wrap(aes_kw::Error),
}
