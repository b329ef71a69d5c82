//! KES's `fs` keystore as a [`KeySource`]: each file of the key directory is one key, named
//! as the file (KES: `internal/keystore/fs` at
//! github.com/minio/kes), whose content is a stored key value. Reads only; never
//! writes to or removes from the directory.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::{KeySource, MigrateError, ReadError};

/// A KES `fs` key directory, read file by file.
pub struct FsSource {
    dir: PathBuf,
}

impl FsSource {
    /// The key directory `dir`; nothing is read until the migration asks.
    pub fn new(dir: PathBuf) -> Self {
        FsSource { dir }
    }

    /// From the `keystore.fs` section of the KES config at `config`. Relative paths are taken
    /// from the current directory, as KES does.
    pub fn from_config(config: &Path, fs: &serde_yaml::Value) -> Result<Self, MigrateError> {
        match fs.get("path").and_then(|p| p.as_str()) {
            Some(p) if !p.trim().is_empty() => Ok(FsSource::new(PathBuf::from(p.trim()))),
            _ => Err(MigrateError(format!(
                "{}: keystore.fs.path is missing",
                config.display()
            ))),
        }
    }
}

#[async_trait::async_trait]
impl KeySource for FsSource {
    fn description(&self) -> String {
        self.dir.display().to_string()
    }

    async fn names(&mut self) -> Result<Vec<String>, MigrateError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| {
            MigrateError(format!(
                "cannot read the KES key directory '{}': {e}",
                self.dir.display()
            ))
        })?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| MigrateError(format!("{}: {e}", self.dir.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // KES's fs store writes nothing else into the directory; dot files are an
            // editor's or an operator's, never keys (KES refuses '.' in names).
            if name.starts_with('.') || entry.path().is_dir() {
                continue;
            }
            names.push(name);
        }
        names.sort();
        Ok(names)
    }

    async fn read(&mut self, name: &str) -> Result<Zeroizing<Vec<u8>>, ReadError> {
        let path = self.dir.join(name);
        std::fs::read(&path)
            .map(Zeroizing::new)
            .map_err(|e| ReadError::Failed(format!("cannot read '{}': {e}", path.display())))
    }
}
