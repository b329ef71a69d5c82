//! Vendor profiles: every way one PKCS#11 implementation differs from another that kesh
//! relies on, as one value per family, and how a module is recognised as one of them.
//!
//! This is the only module that names vendors (its [`ephemeral`] submodule makes the
//! throwaway SoftHSM tokens of `--dev` and the tests). The rest of the backend reads capabilities
//! and quirks from the [`Profile`] in force (chosen by `profile:` in the config, else
//! detected from the library's and the token's manufacturer IDs at start); it never asks
//! which vendor it talks to. `hsm-config/profiles/*.yaml` documents each row with its sources.

pub mod ephemeral;

use std::path::PathBuf;

use super::settings::IvSource;
use crate::keystore::Scheme;

/// What kesh assumes of one family of PKCS#11 modules.
#[derive(Debug)]
pub struct Profile {
    /// The profile's name, as `profile:` in the config names it.
    pub name: &'static str,
    /// Manufacturer IDs (`C_GetInfo`'s library one or `C_GetTokenInfo`'s) that identify the
    /// family, compared as case-insensitive prefixes after trimming.
    pub manufacturers: &'static [&'static str],
    /// Default session pool size.
    pub sessions: usize,
    /// Default GCM IV source.
    pub iv: IvSource,
    /// Default scheme of created keys.
    pub scheme: Scheme,
    /// Default for using keys through session-object copies (`copies`): where token objects
    /// are slow to use.
    pub session_keys: bool,
    /// Where processes on one host sharing the token take a file lock around token writes,
    /// when the module needs one to keep its object list consistent (`writelock`).
    pub host_write_lock: Option<fn() -> Option<PathBuf>>,
    /// How the module reports a failed GCM tag or KWP integrity check.
    pub tag_failures: TagFailures,
    /// How the module reports a key another process deleted.
    pub gone_objects: GoneObjects,
    /// Re-initialise the module while looking for a token it could not read: a module that
    /// reads its token list once at `C_Initialize` misses a token another process was
    /// rewriting at that moment.
    pub reinit_on_unreadable_slots: bool,
    /// Paths where the family's module is usually installed (for dev mode and hints).
    pub module_paths: &'static [&'static str],
}

/// A module kesh does not recognise: the PKCS#11 standard's behaviour, nothing more.
pub const GENERIC: Profile = Profile {
    name: "generic",
    manufacturers: &[],
    sessions: 4,
    iv: IvSource::Caller,
    scheme: Scheme::Gcm,
    session_keys: false,
    host_write_lock: None,
    tag_failures: TagFailures::Standard,
    gone_objects: GoneObjects::Standard,
    reinit_on_unreadable_slots: false,
    module_paths: &[],
};

/// SoftHSMv2: token objects are files re-read on every use (copies are twice as fast), each
/// process keeps its own object list that two writing processes can leave stale (a host lock
/// ends that), threads within a process are serialised (two sessions measured fastest), a
/// failed tag is `CKR_GENERAL_ERROR`, and the token list is read once per `C_Initialize`.
pub const SOFTHSM: Profile = Profile {
    name: "softhsm",
    manufacturers: &["SoftHSM"],
    sessions: 2,
    iv: IvSource::Caller,
    scheme: Scheme::Gcm,
    session_keys: true,
    host_write_lock: Some(softhsm_write_lock_path),
    tag_failures: TagFailures::GeneralError,
    gone_objects: GoneObjects::Standard,
    reinit_on_unreadable_slots: true,
    module_paths: &[
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
        "/usr/lib64/pkcs11/libsofthsm2.so",
    ],
};

/// Every profile `profile:` may name, and detection tries, in order.
pub const PROFILES: &[&Profile] = &[
    &SOFTHSM,
    // Kryoptic: a software token whose store is an sqlite file that processes share. Two
    // processes' write transactions fail one at once (`CKR_DEVICE_MEMORY`) rather than wait,
    // so writes take the host lock; a key another process deleted fails as
    // `CKR_GENERAL_ERROR`; no CKM_AES_KEY_WRAP_PAD (hsm-config/profiles/kryoptic.yaml).
    &Profile {
        name: "kryoptic",
        manufacturers: &["Kryoptic"],
        sessions: 4,
        host_write_lock: Some(kryoptic_write_lock_path),
        gone_objects: GoneObjects::GeneralError,
        ..GENERIC
    },
    &Profile {
        name: "luna",
        manufacturers: &["SafeNet", "Thales"],
        sessions: 16,
        ..GENERIC
    },
    // nShield's IV handling is not verified here: kesh draws the IVs, which fails closed on a
    // module that insists on its own (hsm-config/profiles/nshield.yaml).
    &Profile {
        name: "nshield",
        manufacturers: &["nCipher", "Entrust"],
        sessions: 16,
        ..GENERIC
    },
    &Profile {
        name: "cloudhsm",
        manufacturers: &["Marvell", "Cavium", "Amazon", "AWS"],
        sessions: 32,
        iv: IvSource::Device,
        ..GENERIC
    },
    // No CKM_AES_GCM or CKM_AES_KEY_WRAP_PAD on a YubiHSM 2: only HMAC-based `kes` works.
    &Profile {
        name: "yubihsm",
        manufacturers: &["Yubico"],
        sessions: 4,
        scheme: Scheme::Kes,
        ..GENERIC
    },
    &Profile {
        name: "utimaco",
        manufacturers: &["Utimaco"],
        sessions: 16,
        ..GENERIC
    },
    &GENERIC,
];

/// The profile `profile:` names (case-insensitive).
pub fn by_name(name: &str) -> Option<&'static Profile> {
    PROFILES
        .iter()
        .copied()
        .find(|p| p.name.eq_ignore_ascii_case(name))
}

/// The profile whose manufacturer IDs match the library's or the token's, else [`GENERIC`].
pub fn detect(library_manufacturer: &str, token_manufacturer: Option<&str>) -> &'static Profile {
    let matches = |p: &Profile, id: &str| {
        let id = id.trim().to_ascii_lowercase();
        p.manufacturers
            .iter()
            .any(|m| id.starts_with(&m.to_ascii_lowercase()))
    };
    PROFILES
        .iter()
        .copied()
        .find(|p| {
            matches(p, library_manufacturer) || token_manufacturer.is_some_and(|t| matches(p, t))
        })
        .unwrap_or(&GENERIC)
}

/// SoftHSM's host lock lives beside its tokens, in the `directories.tokendir` of the SoftHSM
/// config this process reads (`SOFTHSM2_CONF`, else /etc/softhsm/softhsm2.conf). `None` when
/// that config is unreadable.
pub fn softhsm_write_lock_path() -> Option<PathBuf> {
    let conf = std::env::var_os("SOFTHSM2_CONF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/softhsm/softhsm2.conf"));
    let text = std::fs::read_to_string(conf).ok()?;
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == "directories.tokendir")
        .map(|(_, v)| PathBuf::from(v.trim()).join(".kesh-writes.lock"))
}

/// Kryoptic's host lock lives beside the config `KRYOPTIC_CONF` names (which names the sqlite
/// store). `None` when the variable is unset.
pub fn kryoptic_write_lock_path() -> Option<PathBuf> {
    let conf = PathBuf::from(std::env::var_os("KRYOPTIC_CONF")?);
    Some(conf.parent()?.join(".kesh-writes.lock"))
}

/// How a module reports a failed integrity check when unsealing (GCM tag, KWP check); each
/// [`Profile`] says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagFailures {
    /// `CKR_ENCRYPTED_DATA_INVALID` / `CKR_WRAPPED_KEY_INVALID`, as the standard says.
    Standard,
    /// `CKR_GENERAL_ERROR` (or `CKR_FUNCTION_FAILED`) from `C_Decrypt`/`C_UnwrapKey`.
    GeneralError,
}

/// How a module reports a handle whose token object another process deleted; each
/// [`Profile`] says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoneObjects {
    /// `CKR_OBJECT_HANDLE_INVALID` / `CKR_KEY_HANDLE_INVALID`.
    Standard,
    /// The handle still names the object, whose row in a store shared with other processes
    /// is gone, and the lookup fails as `CKR_GENERAL_ERROR`. Such an error from a call on a
    /// key handle may mean the key is gone: kesh searches the token once more to tell.
    GeneralError,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_recognised_by_their_manufacturer_ids() {
        assert_eq!(detect("SoftHSM", Some("SoftHSM project")).name, "softhsm");
        assert_eq!(
            detect("Kryoptic", Some("Kryoptic Project")).name,
            "kryoptic"
        );
        assert_eq!(detect("SafeNet, Inc.", None).name, "luna");
        assert_eq!(
            detect("Some Vendor", Some("nCipher Corp. Ltd")).name,
            "nshield"
        );
        assert_eq!(detect("Yubico (www.yubico.com)", None).name, "yubihsm");
        assert_eq!(detect("  utimaco IS GmbH ", None).name, "utimaco");
        assert_eq!(detect("OpenSC Project", Some("Unknown")).name, "generic");
        assert_eq!(by_name("SoftHSM").map(|p| p.name), Some("softhsm"));
        assert!(by_name("nope").is_none());
        // Every profile can be named, and names are unique.
        let mut names: Vec<_> = PROFILES.iter().map(|p| p.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), PROFILES.len());
    }
}
