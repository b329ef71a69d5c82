//! `kesh migrate`: moves the keys of a KES keystore into a kesh keystore.
//!
//! Two sources ([`KeySource`]): KES's `fs` keystore ([`fs`], one file per key) and KES's
//! `vault` keystore ([`vault`], one K/V secret per key on HashiCorp Vault or OpenBao). Either
//! yields, per key, a stored key value ([`crate::crypto::kes_key`]) in memory; everything
//! after that is shared here, so both sources give the same guarantees. Every key is imported
//! with the `kes` scheme and its own HMAC key (none for legacy JSON values) and provenance, so
//! every ciphertext KES produced still decrypts and `/v1/key/hmac` answers as before.
//!
//! Per key: read → parse → (exists? skip with `merge`, replace with `force`, else refuse) →
//! import (all-or-nothing in every keystore) → check: a ciphertext sealed in the host with the
//! KES key must decrypt through the keystore. A key that fails any step is reported and the run
//! goes on with the next one. A dry run reads, parses and checks, and changes nothing. Errors
//! never carry key material; stored values are held in zeroizing buffers and never written to
//! disk by this module.

pub mod fs;
pub mod vault;

use std::path::Path;

use serde::Serialize;
use zeroize::Zeroizing;

use crate::crypto::kes;
use crate::crypto::kes_key::{self, StoredKey};
use crate::keystore::{
    BackendError, HmacKeySource, ImportKey, KeyStore, KeystoreError, Provenance, Scheme,
};
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

/// The outcome for one key. In a dry run, `Imported` says what a real run would do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "outcome")]
pub enum Outcome {
    /// Imported into the target.
    Imported {
        /// A key of that name was there and was replaced (`--force`).
        replaced: bool,
    },
    /// Left alone.
    Skipped {
        /// Why.
        reason: String,
    },
    /// Could not be read or imported.
    Failed {
        /// Why.
        error: String,
    },
}

#[derive(Debug, Clone, Serialize)]
/// One key's line of the report.
pub struct KeyOutcome {
    /// The key's name.
    pub name: String,
    #[serde(flatten)]
    /// What happened to it.
    pub outcome: Outcome,
}

/// The whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Nothing was changed: `imported` counts the keys a real run would import.
    pub dry_run: bool,
    /// Keys imported (or, in a dry run, that would be).
    pub imported: usize,
    /// Keys left alone.
    pub skipped: usize,
    /// Keys that could not be read or imported.
    pub failed: usize,
    /// Every key, in the order read.
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

/// How a run treats the target.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// What to do with a key the target already has.
    pub existing: Existing,
    /// Read, parse and check every key; import, replace and delete nothing.
    pub dry_run: bool,
}

/// Why one entry of a source was not read.
#[derive(Debug)]
pub enum ReadError {
    /// Not a key and never one (a folder): reported as skipped.
    NotAKey(String),
    /// Reported as failed; the run goes on.
    Failed(String),
}

/// Where the KES keys come from. A source hands out stored key values in memory only.
#[async_trait::async_trait]
pub trait KeySource: Send {
    /// Where the keys are, for the summary; never holds a secret.
    fn description(&self) -> String;
    /// The names of every entry that may hold a key, sorted.
    async fn names(&mut self) -> Result<Vec<String>, MigrateError>;
    /// The stored key value of one entry: the text KES's `fs` keystore would write.
    async fn read(&mut self, name: &str) -> Result<Zeroizing<Vec<u8>>, ReadError>;
}

/// The KES config's keystore as a [`KeySource`]: `fs:` or `vault:`.
pub async fn kes_source(config: &Path) -> Result<Box<dyn KeySource>, MigrateError> {
    let mut keystore = keystore_section(config).map_err(|e| {
        MigrateError(format!(
            "{e}; --from takes the KES server config whose `keystore:` holds the keys"
        ))
    })?;
    let source: Result<Box<dyn KeySource>, MigrateError> = if let Some(fs) = keystore.get("fs") {
        fs::FsSource::from_config(config, fs).map(|s| Box::new(s) as Box<dyn KeySource>)
    } else if let Some(v) = keystore.get("vault") {
        match vault::VaultConfig::from_value(v) {
            Ok(cfg) => vault::VaultSource::connect(cfg)
                .await
                .map(|s| Box::new(s) as Box<dyn KeySource>),
            Err(e) => Err(MigrateError(format!("{}: {e}", config.display()))),
        }
    } else {
        let names: Vec<String> = keystore
            .as_mapping()
            .map(|m| {
                m.keys()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Err(MigrateError(format!(
            "{}: keystore '{}' is not supported: kesh migrate reads KES's `fs` and `vault` \
             keystores; for other backends, export the keys with `kes migrate` into an `fs` \
             keystore first",
            config.display(),
            names.join(", ")
        )))
    };
    // The section may hold an AppRole secret or a JWT; the source keeps its own copies.
    crate::config::env::wipe(&mut keystore);
    source
}

/// Imports every key of `source` into `target`. `progress` is told (done, total) after each
/// key.
pub async fn migrate(
    source: &mut dyn KeySource,
    target: &dyn KeyStore,
    options: Options,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Report, MigrateError> {
    let names = source.names().await?;
    let mut report = Report {
        dry_run: options.dry_run,
        ..Report::default()
    };
    let total = names.len();
    for (i, name) in names.into_iter().enumerate() {
        let outcome = match source.read(&name).await {
            Ok(value) => migrate_one(&value, &name, target, options).await,
            Err(ReadError::NotAKey(reason)) => Outcome::Skipped { reason },
            Err(ReadError::Failed(error)) => Outcome::Failed { error },
        };
        match &outcome {
            Outcome::Imported { .. } => report.imported += 1,
            Outcome::Skipped { .. } => report.skipped += 1,
            Outcome::Failed { .. } => report.failed += 1,
        }
        report.keys.push(KeyOutcome { name, outcome });
        progress(i + 1, total);
    }
    Ok(report)
}

async fn migrate_one(value: &[u8], name: &str, target: &dyn KeyStore, options: Options) -> Outcome {
    let fail = |error: String| Outcome::Failed { error };
    let Ok(key_name) = KeyName::new(name) else {
        return fail(
            "not a valid key name (1-80 of [0-9A-Za-z_-], no leading or trailing '-')".into(),
        );
    };
    let stored = match kes_key::parse(value) {
        Ok(k) => k,
        Err(e) => return fail(format!("not a KES key: {e}")),
    };
    let existing = options.existing;
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
            Existing::Replace if options.dry_run => {
                return Outcome::Imported { replaced: true };
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
        Err(KeystoreError::KeyNotFound) if options.dry_run => {
            return Outcome::Imported { replaced: false };
        }
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
                "the existing key was deleted and the import failed: {e}; the KES key is \
                 untouched in its keystore, rerun `kesh migrate` to import it"
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
        .map_err(|e| KeystoreError::Backend(BackendError::Random(e)))?;
    let nonce = crate::secret::random::<{ kes::NONCE_LEN }>()
        .map_err(|e| KeystoreError::Backend(BackendError::Random(e)))?;
    let probe = crate::secret::random::<32>()
        .map_err(|e| KeystoreError::Backend(BackendError::Random(e)))?;
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
