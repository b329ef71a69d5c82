//! `kesh migrate`: moves the keys of a KES `fs` keystore into a kesh keystore.
//!
//! Each file of the KES key directory is one key, named as the file (`kes-api.md` §5.6), whose
//! content is a stored key value ([`crate::crypto::kes_key`]). Every key is imported with the
//! `kes` scheme and its own HMAC key (none for legacy JSON values) and provenance, so every
//! ciphertext KES produced still decrypts and `/v1/key/hmac` answers as before.
//!
//! Per key: parse → (exists? skip with `merge`, replace with `force`, else refuse) → import
//! (all-or-nothing in every keystore) → check: a ciphertext sealed in the host with the KES
//! key must decrypt through the keystore. A key that fails any step is reported and the run
//! goes on with the next one. Errors never carry key material.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::crypto::kes;
use crate::crypto::kes_key::{self, StoredKey};
use crate::keystore::{HmacKeySource, ImportKey, KeyStore, KeystoreError, Provenance, Scheme};
use crate::name::KeyName;

/// What to do with a key name that already exists in the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Existing {
    /// Refuse: report the key as failed and leave it alone.
    #[default]
    Refuse,
    /// `--merge`: keep the existing key; report it as skipped (after checking it is the same
    /// key, when it can be checked).
    Skip,
    /// `--force`: delete the existing key, then import.
    Replace,
}

/// The outcome for one key file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "outcome")]
pub enum Outcome {
    Imported { replaced: bool },
    Skipped { reason: String },
    Failed { error: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyOutcome {
    pub name: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// The whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub imported: usize,
    pub skipped: usize,
    pub failed: usize,
    pub keys: Vec<KeyOutcome>,
}

/// Why a migration could not start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MigrateError(pub String);

/// The `keystore:` section of a KES or kesh config file, with its `${VAR}`s substituted.
/// Only that section is substituted, so variables the rest of the file names (a TLS key
/// password, an admin identity) need not be set to migrate or probe.
/// The caller should [`crate::config::env::wipe`] the section once done: it may hold a PIN.
pub fn keystore_section(config: &Path) -> Result<serde_yaml::Value, MigrateError> {
    use crate::config::env::wipe;
    use zeroize::Zeroizing;
    let text = Zeroizing::new(
        std::fs::read_to_string(config)
            .map_err(|e| MigrateError(format!("cannot read '{}': {e}", config.display())))?,
    );
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text)
        .map_err(|e| MigrateError(format!("{}: not valid YAML: {e}", config.display())))?;
    let mut only = serde_yaml::Mapping::new();
    if let Some(keystore) = doc.get("keystore") {
        only.insert("keystore".into(), keystore.clone());
    }
    wipe(&mut doc);
    let mut only = serde_yaml::Value::Mapping(only);
    let section_text = serde_yaml::to_string(&only).map(Zeroizing::new);
    wipe(&mut only);
    let section_text =
        section_text.map_err(|e| MigrateError(format!("{}: {e}", config.display())))?;
    let mut substituted = crate::config::env::substitute(&section_text)
        .map_err(|e| MigrateError(format!("{}: {e}", config.display())))?;
    let keystore = substituted.get("keystore").cloned();
    wipe(&mut substituted);
    keystore.ok_or_else(|| MigrateError(format!("{}: no `keystore:` section", config.display())))
}

/// The `keystore.fs.path` of a KES config file. Relative paths are taken from the current
/// directory, as KES does.
pub fn kes_fs_path(config: &Path) -> Result<PathBuf, MigrateError> {
    let keystore = keystore_section(config).map_err(|e| {
        MigrateError(format!(
            "{e}; --from takes the KES server config whose `keystore: fs: path:` holds the keys"
        ))
    })?;
    let Some(fs) = keystore.get("fs") else {
        let names: Vec<String> = keystore
            .as_mapping()
            .map(|m| {
                m.keys()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        return Err(MigrateError(format!(
            "{}: keystore '{}' is not supported: kesh migrate reads KES's `fs` keystore; for other backends, \
             export the keys with `kes migrate` into an `fs` keystore first",
            config.display(),
            names.join(", ")
        )));
    };
    match fs.get("path").and_then(|p| p.as_str()) {
        Some(p) if !p.trim().is_empty() => Ok(PathBuf::from(p.trim())),
        _ => Err(MigrateError(format!(
            "{}: keystore.fs.path is missing",
            config.display()
        ))),
    }
}

/// Imports every key file of `dir` into `target`.
pub async fn migrate_dir(
    dir: &Path,
    target: &dyn KeyStore,
    existing: Existing,
) -> Result<Report, MigrateError> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        MigrateError(format!(
            "cannot read the KES key directory '{}': {e}",
            dir.display()
        ))
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| MigrateError(format!("{}: {e}", dir.display())))?;
        files.push(entry.path());
    }
    files.sort();
    let mut report = Report::default();
    for path in files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // KES's fs store writes nothing else into the directory; dot files are an editor's
        // or an operator's, never keys (KES refuses '.' in names).
        if name.starts_with('.') || path.is_dir() {
            continue;
        }
        let outcome = migrate_one(&path, &name, target, existing).await;
        match &outcome {
            Outcome::Imported { .. } => report.imported += 1,
            Outcome::Skipped { .. } => report.skipped += 1,
            Outcome::Failed { .. } => report.failed += 1,
        }
        report.keys.push(KeyOutcome { name, outcome });
    }
    Ok(report)
}

async fn migrate_one(
    path: &Path,
    name: &str,
    target: &dyn KeyStore,
    existing: Existing,
) -> Outcome {
    let fail = |error: String| Outcome::Failed { error };
    let Ok(key_name) = KeyName::new(name) else {
        return fail(
            "not a valid key name (1-80 of [0-9A-Za-z_-], no leading or trailing '-')".into(),
        );
    };
    let value = match std::fs::read(path) {
        Ok(v) => zeroize::Zeroizing::new(v),
        Err(e) => return fail(format!("cannot read '{}': {e}", path.display())),
    };
    let stored = match kes_key::parse(&value) {
        Ok(k) => k,
        Err(e) => return fail(e.to_string()),
    };
    let mut replaced = false;
    match target.describe(&key_name).await {
        Ok(_) => match existing {
            Existing::Refuse => {
                return fail(
                    "a key of this name already exists; use --merge to keep it or --force to replace it"
                        .into(),
                )
            }
            Existing::Skip => {
                return match same_key(target, &key_name, &stored).await {
                    Ok(true) => Outcome::Skipped {
                        reason: "already migrated".into(),
                    },
                    Ok(false) => fail(
                        "a different key of this name exists; use --force to replace it".into(),
                    ),
                    Err(e) => fail(format!("cannot check the existing key: {e}")),
                }
            }
            Existing::Replace => {
                // Prove the import works before the existing key goes: a rehearsal under a
                // name of its own, removed again.
                if let Err(why) = rehearse(target, &stored).await {
                    return fail(format!("not replacing the existing key: {why}"));
                }
                if let Err(e) = target.delete(&key_name).await {
                    return fail(format!("cannot delete the existing key: {e}"));
                }
                replaced = true;
            }
        },
        Err(KeystoreError::KeyNotFound) => {}
        Err(e) => return fail(format!("cannot look the key up: {e}")),
    }
    let mut imported = target.import(&key_name, import_of(&stored)).await;
    if replaced && imported.is_err() {
        // The rehearsal went through moments ago: one more try before giving up.
        imported = target.import(&key_name, import_of(&stored)).await;
    }
    if let Err(e) = imported {
        return fail(if replaced {
            format!(
                "the existing key was deleted and the import failed: {e}; the KES key file is \
                 untouched, rerun `kesh migrate` to import it"
            )
        } else {
            format!("import failed: {e}")
        });
    }
    match same_key(target, &key_name, &stored).await {
        Ok(true) => Outcome::Imported { replaced },
        Ok(false) => {
            // Never leave a key that is not the KES key under the KES key's name.
            let removed = target.delete(&key_name).await.is_ok();
            fail(format!(
                "imported, but a KES ciphertext does not decrypt under it ({}): check the keystore",
                if removed {
                    "the import was removed"
                } else {
                    "removing the import failed too"
                }
            ))
        }
        Err(e) => fail(format!("imported, but the check failed: {e}")),
    }
}

fn import_of(stored: &StoredKey) -> ImportKey {
    ImportKey {
        key: stored.key.clone(),
        algorithm: stored.algorithm,
        scheme: Scheme::Kes,
        hmac: match &stored.hmac {
            Some(h) => HmacKeySource::Given(h.clone()),
            None => HmacKeySource::None,
        },
        provenance: Provenance {
            created_at: stored.created_at,
            created_by: stored.created_by.clone(),
        },
    }
}

/// Imports `stored` under a throwaway name, checks it, and removes it again.
async fn rehearse(target: &dyn KeyStore, stored: &StoredKey) -> Result<(), String> {
    let suffix = crate::secret::random::<6>().map_err(|e| e.to_string())?;
    let name = KeyName::new(&format!("kesh-migrate-check-{}", hex::encode(*suffix)))
        .map_err(|e| e.to_string())?;
    target
        .import(&name, import_of(stored))
        .await
        .map_err(|e| format!("a trial import failed: {e}"))?;
    let checked = same_key(target, &name, stored).await;
    let removed = target.delete(&name).await;
    match (checked, removed) {
        (Ok(true), Ok(())) => Ok(()),
        (Ok(false), _) => Err("a trial import does not decrypt KES ciphertexts".into()),
        (Err(e), _) => Err(format!("a trial import could not be checked: {e}")),
        (Ok(true), Err(e)) => Err(format!(
            "the trial key '{name}' could not be removed: {e}; delete it by hand"
        )),
    }
}

/// Whether `name` in the keystore is `stored`: a ciphertext sealed in the host in KES's format
/// with the stored key must decrypt through the keystore.
async fn same_key(
    target: &dyn KeyStore,
    name: &KeyName,
    stored: &StoredKey,
) -> Result<bool, KeystoreError> {
    let iv = crate::secret::random::<{ kes::IV_LEN }>()
        .map_err(|e| KeystoreError::Backend(e.to_string()))?;
    let nonce = crate::secret::random::<{ kes::NONCE_LEN }>()
        .map_err(|e| KeystoreError::Backend(e.to_string()))?;
    let probe = crate::secret::random::<32>().map_err(|e| KeystoreError::Backend(e.to_string()))?;
    let context = b"kesh migrate check";
    let derived = kes::derive_soft(stored.algorithm, &stored.key, &iv);
    let ct = kes::seal(
        stored.algorithm,
        &derived,
        &iv,
        &nonce,
        probe.as_ref(),
        context,
    );
    match target.decrypt(name, &ct, context).await {
        Ok(pt) => Ok(pt.as_slice() == probe.as_ref()),
        Err(KeystoreError::NotAuthentic) => Ok(false),
        Err(e) => Err(e),
    }
}
