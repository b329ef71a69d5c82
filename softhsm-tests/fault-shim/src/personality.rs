//! Vendor personalities: what each vendor's public documentation says its PKCS#11 module does
//! differently from SoftHSM, reproduced over SoftHSM.
//!
//! Selected with `KESH_SHIM_PERSONALITY=luna|nshield|cloudhsm|yubihsm|utimaco` (unset or
//! `softhsm`: none). A personality replaces a few entries of the shim's function list with
//! wrappers that check or rewrite arguments and results, then call the fault layer
//! (`functions.rs`), so `fail`/`latency`/`toosmall` rules and call counts still apply.
//!
//! Every rule names its source. Where a vendor documents nothing about a property, the
//! personality leaves SoftHSM's standard behaviour in place and says so, rather than guess.
//!
//! Rules shared by every personality (PKCS#11 v2.40 base specification, OASIS,
//! <https://docs.oasis-open.org/pkcs11/pkcs11-base/v2.40/os/pkcs11-base-v2.40-os.html>, §5.6
//! C_Login and §5.1 return values), which all five vendors claim to follow:
//! * the login belongs to the application, not the session: a second `C_Login` while logged
//!   in answers `CKR_USER_ALREADY_LOGGED_IN`; the login ends with `C_Logout`,
//!   `C_CloseAllSessions`, the last `C_CloseSession` or `C_Finalize`;
//! * a failed GCM tag answers `CKR_ENCRYPTED_DATA_INVALID` (and a failed KWP check
//!   `CKR_WRAPPED_KEY_INVALID`), not SoftHSM's `CKR_GENERAL_ERROR`;
//! * `C_GetInfo` and `C_GetTokenInfo` report the vendor's manufacturer strings ([`VENDOR_IDS`]).

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use cryptoki_sys::*;

use crate::functions as f;

/// How a module treats the IV of a `CKM_AES_GCM` encryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcmIv {
    /// Uses the IV the caller gives (PKCS#11's default).
    Caller,
    /// Ignores the caller's IV bytes, draws its own of `len` bytes, and writes it into the
    /// caller's `CK_GCM_PARAMS.pIv` buffer, whose `ulIvLen` must be `len`.
    DeviceIntoParams { len: usize },
}

/// What a personality changes. `None`/`false`/empty fields leave SoftHSM's behaviour.
#[derive(Debug)]
pub struct Personality {
    pub name: &'static str,
    /// `C_GetInfo.manufacturerID` and `libraryDescription`.
    pub library_manufacturer: &'static str,
    pub library_description: &'static str,
    /// `C_GetTokenInfo.manufacturerID` and `model`.
    pub token_manufacturer: &'static str,
    pub token_model: &'static str,
    /// Whether the four strings above are the vendor's own, read from vendor material
    /// (`true`), or the vendor's name only, pending a capture from a real module (`false`).
    pub ids_documented: bool,
    pub gcm_iv: GcmIv,
    /// The PKCS#11 functions the vendor lists as supported; any other answers
    /// `CKR_FUNCTION_NOT_SUPPORTED`. `None`: all of SoftHSM's.
    pub functions: Option<&'static [&'static str]>,
    /// `C_CopyObject` answers `CKR_FUNCTION_NOT_SUPPORTED`.
    pub no_copy_object: bool,
    /// Mechanisms the module lacks: left out of `C_GetMechanismList`, `CKR_MECHANISM_INVALID`
    /// from `C_GetMechanismInfo` and every init or wrap call that names them.
    pub absent_mechanisms: &'static [CK_MECHANISM_TYPE],
    /// A secret-key template with `CKA_ALLOWED_MECHANISMS` answers this code.
    pub refuses_allowed_mechanisms: Option<CK_RV>,
    /// Secret keys of type `CKK_GENERIC_SECRET` cannot be made (HMAC keys must be typed by
    /// hash): `CKR_TEMPLATE_INCONSISTENT`.
    pub no_generic_secret: bool,
    /// Longest `CKA_LABEL` / `CKA_ID` accepted in a template; longer: `CKR_ATTRIBUTE_VALUE_INVALID`.
    pub max_label: Option<usize>,
    pub max_id: Option<usize>,
    /// Longest `CKA_VALUE` of a `CKO_DATA` object; longer: `CKR_ATTRIBUTE_VALUE_INVALID`.
    pub max_data_object: Option<usize>,
    /// Sessions open at once in this process; one more: `CKR_SESSION_COUNT`.
    pub max_sessions: Option<usize>,
    /// Read-only sessions are not offered: a `C_OpenSession` without `CKF_RW_SESSION`
    /// answers `CKR_FUNCTION_NOT_SUPPORTED`.
    pub rw_sessions_only: bool,
}

/// AWS CloudHSM Client SDK 5: the functions of "Supported API operations for the PKCS #11
/// library for AWS CloudHSM Client SDK 5",
/// <https://docs.aws.amazon.com/cloudhsm/latest/userguide/pkcs11-apis.html>. Absent, among
/// others: `C_CopyObject`, `C_SetAttributeValue` (attributes are changed with CloudHSM CLI's
/// `key set-attribute`, per "Modifying PKCS #11 library attributes for AWS CloudHSM Client SDK
/// 5", <https://docs.aws.amazon.com/cloudhsm/latest/userguide/modify-attr.html>).
const CLOUDHSM_FUNCTIONS: &[&str] = &[
    "C_CloseAllSessions",
    "C_CloseSession",
    "C_CreateObject",
    "C_Decrypt",
    "C_DecryptFinal",
    "C_DecryptInit",
    "C_DecryptUpdate",
    "C_DeriveKey",
    "C_DestroyObject",
    "C_Digest",
    "C_DigestFinal",
    "C_DigestInit",
    "C_DigestUpdate",
    "C_Encrypt",
    "C_EncryptFinal",
    "C_EncryptInit",
    "C_EncryptUpdate",
    "C_Finalize",
    "C_FindObjects",
    "C_FindObjectsFinal",
    "C_FindObjectsInit",
    "C_GenerateKey",
    "C_GenerateKeyPair",
    "C_GenerateRandom",
    "C_GetAttributeValue",
    "C_GetInfo",
    "C_GetMechanismInfo",
    "C_GetMechanismList",
    "C_GetSessionInfo",
    "C_GetSlotInfo",
    "C_GetSlotList",
    "C_GetTokenInfo",
    "C_Initialize",
    "C_Login",
    "C_Logout",
    "C_OpenSession",
    "C_Sign",
    "C_SignFinal",
    "C_SignInit",
    "C_SignUpdate",
    "C_UnwrapKey",
    "C_Verify",
    "C_VerifyFinal",
    "C_VerifyInit",
    "C_VerifyUpdate",
    "C_WrapKey",
];

/// The personalities, and in them the vendor ID strings profile detection can match
/// (`library_manufacturer`, `token_manufacturer`, `token_model`; see `ids_documented`).
/// A module that behaves as PKCS#11 says (SoftHSM's behaviour stands): each vendor below
/// states only where it differs.
const PLAIN_MODULE: Personality = Personality {
    name: "",
    library_manufacturer: "",
    library_description: "",
    token_manufacturer: "",
    token_model: "",
    ids_documented: false,
    gcm_iv: GcmIv::Caller,
    functions: None,
    no_copy_object: false,
    absent_mechanisms: &[],
    refuses_allowed_mechanisms: None,
    no_generic_secret: false,
    max_label: None,
    max_id: None,
    max_data_object: None,
    max_sessions: None,
    rw_sessions_only: false,
};

pub const VENDOR_IDS: &[Personality] = &[
    // Thales Luna 7, partition on an HSM not in FIPS mode (HSM policy 12 off), as the `luna`
    // profile assumes:
    // * GCM: the caller supplies the IV ("CKM_AES_GCM", Luna 7 SDK reference,
    //   https://thalesdocs.com/gphsm/luna/7/docs/network/Content/sdk/mechanisms/CKM_AES_GCM.htm).
    //   In FIPS mode the HSM would draw a 16-byte IV and return it with the output; kesh's
    //   12-byte format cannot carry it, which is why the profile says to use kwp there.
    // * IDs: "SafeNet, Inc." / "Chrystoki" are what Luna clients report in C_GetInfo (e.g.
    //   `pkcs11-tool -I`); Thales publishes no table of them, hence ids_documented: false.
    // * C_CopyObject, CKA_ALLOWED_MECHANISMS, session limits, label lengths: Thales documents
    //   no difference from PKCS#11 for kesh's use; SoftHSM's behaviour stands.
    Personality {
        name: "luna",
        library_manufacturer: "SafeNet, Inc.",
        library_description: "Chrystoki",
        token_manufacturer: "SafeNet, Inc.",
        token_model: "LunaSA",
        ..PLAIN_MODULE
    },
    // Entrust nShield with Security World:
    // * data objects hold at most one command's worth, normally 8192 bytes ("nShield PKCS #11
    //   library" limits, Entrust nShield Security World documentation, as quoted in
    //   hsm-config/profiles/nshield.yaml).
    // * IDs: nShield's library has reported "nCipher Corp. Ltd" / "nFast PKCS#11 module"
    //   since nCipher days; not in a public Entrust table, hence ids_documented: false.
    // * GCM IVs, C_CopyObject, CKA_ALLOWED_MECHANISMS, sessions: nothing public that differs
    //   for kesh's use; SoftHSM's behaviour stands.
    Personality {
        name: "nshield",
        library_manufacturer: "nCipher Corp. Ltd",
        library_description: "nFast PKCS#11 module",
        token_manufacturer: "nCipher Corp. Ltd",
        token_model: "",
        max_data_object: Some(8192),
        ..PLAIN_MODULE
    },
    // AWS CloudHSM, Client SDK 5 PKCS#11 library:
    // * GCM: the HSM ignores the IV in the request, generates its own and writes it to the
    //   memory CK_GCM_PARAMS.pIv points to; the IV is 12 bytes ("Supported mechanisms for the
    //   PKCS #11 library for AWS CloudHSM Client SDK 5", mechanism annotations,
    //   https://docs.aws.amazon.com/cloudhsm/latest/userguide/pkcs11-mechanisms.html; the
    //   pIv sentence is quoted in github.com/miekg/pkcs11 pull request 72).
    // * Functions: only those of CLOUDHSM_FUNCTIONS (pkcs11-apis.html, above): no
    //   C_CopyObject, no C_SetAttributeValue.
    // * Read-only sessions: not supported by SDK 5 (AWS "Known issues for the PKCS #11
    //   library", https://docs.aws.amazon.com/cloudhsm/latest/userguide/ki-pkcs11-sdk.html, as
    //   cited by hsm-config/profiles/cloudhsm.yaml); the error code is not documented.
    // * IDs: not published by AWS; the vendor name stands in (ids_documented: false).
    Personality {
        name: "cloudhsm",
        library_manufacturer: "Amazon Web Services",
        library_description: "AWS CloudHSM PKCS#11",
        token_manufacturer: "Amazon Web Services",
        token_model: "CloudHSM",
        gcm_iv: GcmIv::DeviceIntoParams { len: 12 },
        functions: Some(CLOUDHSM_FUNCTIONS),
        no_copy_object: true,
        rw_sessions_only: true,
        ..PLAIN_MODULE
    },
    // Yubico YubiHSM 2, yubihsm_pkcs11 (Yubico's own module, github.com/Yubico/yubihsm-shell,
    // pkcs11/ and lib/; read at commit 428bfdd1):
    // * Mechanisms: no CKM_AES_GCM, no CKM_AES_KEY_WRAP(_PAD) in its mechanism list
    //   (pkcs11/util_pkcs11.c); CKM_SHA256_HMAC and CKM_GENERIC_SECRET_KEY_GEN are listed.
    // * C_CopyObject: CKR_FUNCTION_NOT_SUPPORTED (pkcs11/yubihsm_pkcs11.c).
    // * HMAC key templates: CKA_KEY_TYPE must be CKK_SHA_1/256/384/512_HMAC, anything else
    //   CKR_TEMPLATE_INCONSISTENT; an attribute outside its list (CKA_ALLOWED_MECHANISMS,
    //   CKA_VALUE_LEN among them) CKR_ATTRIBUTE_TYPE_INVALID (parse_hmac_template).
    // * CKA_LABEL and CKA_ID: up to 40 bytes / 2 bytes natively, longer ones kept in a meta
    //   object of at most 256 bytes each (CKA_ATTRIBUTE_VALUE_SIZE); longer:
    //   CKR_ATTRIBUTE_VALUE_INVALID (parse_meta_label_template, parse_meta_id_template).
    // * Sessions: at most 16 per connector (YH_MAX_SESSIONS, lib/yubihsm.h); one more:
    //   CKR_SESSION_COUNT (C_OpenSession).
    // * IDs: C_GetInfo manufacturer "Yubico (www.yubico.com)", description "YubiHSM PKCS#11
    //   Library"; C_GetTokenInfo manufacturer "Yubico (www.yubico.com)", model "YubiHSM".
    Personality {
        name: "yubihsm",
        library_manufacturer: "Yubico (www.yubico.com)",
        library_description: "YubiHSM PKCS#11 Library",
        token_manufacturer: "Yubico (www.yubico.com)",
        token_model: "YubiHSM",
        ids_documented: true,
        no_copy_object: true,
        absent_mechanisms: &[CKM_AES_GCM, CKM_AES_KEY_WRAP, CKM_AES_KEY_WRAP_PAD],
        refuses_allowed_mechanisms: Some(CKR_ATTRIBUTE_TYPE_INVALID),
        no_generic_secret: true,
        max_label: Some(256),
        max_id: Some(256),
        max_sessions: Some(16),
        ..PLAIN_MODULE
    },
    // Utimaco CryptoServer / u.trust GP HSM, PKCS#11 R3:
    // * IDs: "Utimaco IS GmbH" is the publisher named in Utimaco's PKCS#11 developer guides
    //   (e.g. "CryptoServer PKCS#11 R2 Developer Guide", document 2012-0007); the strings the
    //   R3 library reports are not published (ids_documented: false).
    // * GCM IVs, C_CopyObject, CKA_ALLOWED_MECHANISMS, sessions, labels: nothing public that
    //   differs for kesh's use; SoftHSM's behaviour stands.
    Personality {
        name: "utimaco",
        library_manufacturer: "Utimaco IS GmbH",
        library_description: "Utimaco CryptoServer PKCS#11 R3",
        token_manufacturer: "Utimaco IS GmbH",
        token_model: "CryptoServer",
        ..PLAIN_MODULE
    },
];

/// The personality `KESH_SHIM_PERSONALITY` names, read once.
pub fn active() -> Option<&'static Personality> {
    static ACTIVE: OnceLock<Option<&'static Personality>> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let name = std::env::var("KESH_SHIM_PERSONALITY").ok()?;
        let found = VENDOR_IDS.iter().find(|p| p.name == name.trim());
        if found.is_none() && name.trim() != "softhsm" && !name.trim().is_empty() {
            eprintln!("kesh-fault-shim: unknown personality {name:?}; behaving as SoftHSM");
        }
        found
    })
}

fn p() -> &'static Personality {
    // Only installed when a personality is active.
    active().expect("a personality is active")
}

/// Replaces the entries of `list` the active personality changes.
pub fn install(list: &mut CK_FUNCTION_LIST) {
    let Some(p) = active() else {
        return;
    };
    list.C_GetInfo = Some(C_GetInfo);
    list.C_GetTokenInfo = Some(C_GetTokenInfo);
    list.C_Login = Some(C_Login);
    list.C_Logout = Some(C_Logout);
    list.C_OpenSession = Some(C_OpenSession);
    list.C_CloseSession = Some(C_CloseSession);
    list.C_CloseAllSessions = Some(C_CloseAllSessions);
    list.C_Finalize = Some(C_Finalize);
    list.C_Decrypt = Some(C_Decrypt);
    list.C_UnwrapKey = Some(C_UnwrapKey);
    list.C_EncryptInit = Some(C_EncryptInit);
    list.C_Encrypt = Some(C_Encrypt);
    list.C_DecryptInit = Some(C_DecryptInit);
    list.C_WrapKey = Some(C_WrapKey);
    list.C_GetMechanismList = Some(C_GetMechanismList);
    list.C_GetMechanismInfo = Some(C_GetMechanismInfo);
    list.C_CreateObject = Some(C_CreateObject);
    list.C_GenerateKey = Some(C_GenerateKey);
    list.C_CopyObject = Some(C_CopyObject);
    if let Some(supported) = p.functions {
        not_supported_unless_listed(list, supported);
    }
}

/// Points every entry whose function the vendor does not list at a refusal.
fn not_supported_unless_listed(list: &mut CK_FUNCTION_LIST, supported: &[&str]) {
    macro_rules! refuse {
        ($($name:ident => $stub:ident ( $($arg:ty),* )),* $(,)?) => {$(
            if !supported.contains(&stringify!($name)) {
                unsafe extern "C" fn $stub($(_: $arg),*) -> CK_RV {
                    CKR_FUNCTION_NOT_SUPPORTED
                }
                list.$name = Some($stub);
            }
        )*};
    }
    refuse!(
        C_CopyObject => copy(CK_SESSION_HANDLE, CK_OBJECT_HANDLE, *mut CK_ATTRIBUTE, CK_ULONG, *mut CK_OBJECT_HANDLE),
        C_SetAttributeValue => set_attr(CK_SESSION_HANDLE, CK_OBJECT_HANDLE, *mut CK_ATTRIBUTE, CK_ULONG),
        C_GetObjectSize => object_size(CK_SESSION_HANDLE, CK_OBJECT_HANDLE, *mut CK_ULONG),
        C_SeedRandom => seed(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG),
        C_InitToken => init_token(CK_SLOT_ID, *mut CK_UTF8CHAR, CK_ULONG, *mut CK_UTF8CHAR),
        C_InitPIN => init_pin(CK_SESSION_HANDLE, *mut CK_UTF8CHAR, CK_ULONG),
        C_SetPIN => set_pin(CK_SESSION_HANDLE, *mut CK_UTF8CHAR, CK_ULONG, *mut CK_UTF8CHAR, CK_ULONG),
        C_DigestKey => digest_key(CK_SESSION_HANDLE, CK_OBJECT_HANDLE),
    );
}

/// Writes `s` blank-padded into a fixed PKCS#11 string field.
fn pad(field: &mut [u8], s: &str) {
    field.fill(b' ');
    let n = s.len().min(field.len());
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

unsafe extern "C" fn C_GetInfo(info: *mut CK_INFO) -> CK_RV {
    // SAFETY: the caller's pointer goes to the real function unchanged.
    let rv = unsafe { f::C_GetInfo(info) };
    if rv == CKR_OK && !info.is_null() {
        // SAFETY: the module just filled it: valid and writable.
        let info = unsafe { &mut *info };
        pad(&mut info.manufacturerID, p().library_manufacturer);
        pad(&mut info.libraryDescription, p().library_description);
    }
    rv
}

unsafe extern "C" fn C_GetTokenInfo(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO) -> CK_RV {
    // SAFETY: the caller's arguments go to the real function unchanged.
    let rv = unsafe { f::C_GetTokenInfo(slot, info) };
    if rv == CKR_OK && !info.is_null() {
        // SAFETY: the module just filled it: valid and writable.
        let info = unsafe { &mut *info };
        pad(&mut info.manufacturerID, p().token_manufacturer);
        pad(&mut info.model, p().token_model);
        if let Some(max) = p().max_sessions {
            info.ulMaxSessionCount = max as CK_ULONG;
        }
    }
    rv
}

/// Open sessions and the login, as the application holds them.
static SESSIONS: AtomicUsize = AtomicUsize::new(0);
static LOGGED_IN: AtomicBool = AtomicBool::new(false);

fn session_state_reset() {
    SESSIONS.store(0, Ordering::SeqCst);
    LOGGED_IN.store(false, Ordering::SeqCst);
    gcm_pending().clear();
}

unsafe extern "C" fn C_Login(
    s: CK_SESSION_HANDLE,
    user: CK_USER_TYPE,
    pin: *mut CK_UTF8CHAR,
    len: CK_ULONG,
) -> CK_RV {
    if LOGGED_IN.load(Ordering::SeqCst) {
        return CKR_USER_ALREADY_LOGGED_IN;
    }
    // SAFETY: the caller's arguments go to the real function unchanged.
    let rv = unsafe { f::C_Login(s, user, pin, len) };
    if rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN {
        LOGGED_IN.store(true, Ordering::SeqCst);
    }
    rv
}

unsafe extern "C" fn C_Logout(s: CK_SESSION_HANDLE) -> CK_RV {
    // SAFETY: the caller's argument goes to the real function unchanged.
    let rv = unsafe { f::C_Logout(s) };
    if rv == CKR_OK {
        LOGGED_IN.store(false, Ordering::SeqCst);
    }
    rv
}

unsafe extern "C" fn C_OpenSession(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    app: *mut std::ffi::c_void,
    notify: CK_NOTIFY,
    out: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    if p().rw_sessions_only && flags & CKF_RW_SESSION == 0 {
        return CKR_FUNCTION_NOT_SUPPORTED;
    }
    // A place is taken before the call, so concurrent opens cannot overshoot the cap.
    let before = SESSIONS.fetch_add(1, Ordering::SeqCst);
    if p().max_sessions.is_some_and(|max| before >= max) {
        SESSIONS.fetch_sub(1, Ordering::SeqCst);
        return CKR_SESSION_COUNT;
    }
    // SAFETY: the caller's arguments go to the real function unchanged.
    let rv = unsafe { f::C_OpenSession(slot, flags, app, notify, out) };
    if rv != CKR_OK {
        SESSIONS.fetch_sub(1, Ordering::SeqCst);
    }
    rv
}

unsafe extern "C" fn C_CloseSession(s: CK_SESSION_HANDLE) -> CK_RV {
    // SAFETY: the caller's argument goes to the real function unchanged.
    let rv = unsafe { f::C_CloseSession(s) };
    if rv == CKR_OK {
        gcm_pending().remove(&s);
        let left = SESSIONS
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_sub(1))
            })
            .map_or(0, |n| n.saturating_sub(1));
        if left == 0 {
            LOGGED_IN.store(false, Ordering::SeqCst);
        }
    }
    rv
}

unsafe extern "C" fn C_CloseAllSessions(slot: CK_SLOT_ID) -> CK_RV {
    // SAFETY: the caller's argument goes to the real function unchanged.
    let rv = unsafe { f::C_CloseAllSessions(slot) };
    if rv == CKR_OK {
        session_state_reset();
    }
    rv
}

unsafe extern "C" fn C_Finalize(reserved: *mut std::ffi::c_void) -> CK_RV {
    // SAFETY: the caller's argument goes to the real function unchanged.
    let rv = unsafe { f::C_Finalize(reserved) };
    if rv == CKR_OK {
        session_state_reset();
    }
    rv
}

/// SoftHSM's way of saying "tag mismatch", in the standard's words.
fn standard_tag_failure(rv: CK_RV, standard: CK_RV) -> CK_RV {
    match rv {
        CKR_GENERAL_ERROR | CKR_FUNCTION_FAILED => standard,
        other => other,
    }
}

unsafe extern "C" fn C_Decrypt(
    s: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's arguments go to the real function unchanged.
    let rv = unsafe { f::C_Decrypt(s, data, len, out, out_len) };
    standard_tag_failure(rv, CKR_ENCRYPTED_DATA_INVALID)
}

unsafe extern "C" fn C_UnwrapKey(
    s: CK_SESSION_HANDLE,
    m: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
    wrapped: *mut CK_BYTE,
    wrapped_len: CK_ULONG,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    out: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: read-only looks at the caller's mechanism, valid per its contract.
    if let Some(rv) = unsafe { absent(m) } {
        return rv;
    }
    // SAFETY: the caller's arguments go to the real function unchanged.
    let rv = unsafe { f::C_UnwrapKey(s, m, key, wrapped, wrapped_len, template, count, out) };
    standard_tag_failure(rv, CKR_WRAPPED_KEY_INVALID)
}

/// `CKR_MECHANISM_INVALID` when `m` names a mechanism the module lacks.
///
/// # Safety
/// `m` is null or valid for reads.
unsafe fn absent(m: *const CK_MECHANISM) -> Option<CK_RV> {
    if m.is_null() {
        return None;
    }
    // SAFETY: non-null and valid per the caller's contract.
    let t = unsafe { (*m).mechanism };
    p().absent_mechanisms
        .contains(&t)
        .then_some(CKR_MECHANISM_INVALID)
}

/// Device-drawn GCM IVs waiting for the `C_Encrypt` that ends the operation: the caller's
/// `pIv` address and the IV, by session.
type Pending = HashMap<CK_SESSION_HANDLE, (usize, Vec<u8>)>;

fn gcm_pending() -> std::sync::MutexGuard<'static, Pending> {
    static PENDING: OnceLock<Mutex<Pending>> = OnceLock::new();
    PENDING
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn random(n: usize) -> Option<Vec<u8>> {
    let mut v = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut v))
        .ok()?;
    Some(v)
}

unsafe extern "C" fn C_EncryptInit(
    s: CK_SESSION_HANDLE,
    m: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's mechanism is null or valid.
    if let Some(rv) = unsafe { absent(m) } {
        return rv;
    }
    let GcmIv::DeviceIntoParams { len } = p().gcm_iv else {
        // SAFETY: the caller's arguments go to the real function unchanged.
        return unsafe { f::C_EncryptInit(s, m, key) };
    };
    // SAFETY: non-null checked; the caller's mechanism is valid for reads.
    let gcm = !m.is_null()
        && unsafe { (*m).mechanism } == CKM_AES_GCM
        && unsafe { (*m).ulParameterLen } as usize == std::mem::size_of::<CK_GCM_PARAMS>()
        && !unsafe { (*m).pParameter }.is_null();
    if !gcm {
        // SAFETY: as above.
        return unsafe { f::C_EncryptInit(s, m, key) };
    }
    // SAFETY: a CKM_AES_GCM mechanism's parameter is a CK_GCM_PARAMS of the length checked.
    let caller = unsafe { *((*m).pParameter as *const CK_GCM_PARAMS) };
    if caller.ulIvLen as usize != len || caller.pIv.is_null() {
        return CKR_MECHANISM_PARAM_INVALID;
    }
    // The caller's IV bytes are ignored: the device draws its own.
    let Some(mut iv) = random(len) else {
        return CKR_DEVICE_ERROR;
    };
    let mut params = caller;
    params.pIv = iv.as_mut_ptr();
    params.ulIvBits = (len * 8) as CK_ULONG;
    // SAFETY: valid for reads (checked above); copied so the caller's stays untouched.
    let mut mech = unsafe { *m };
    mech.pParameter = (&mut params as *mut CK_GCM_PARAMS).cast();
    // SAFETY: `mech` and `params` live across the call; SoftHSM copies the IV at init.
    let rv = unsafe { f::C_EncryptInit(s, &mut mech, key) };
    if rv == CKR_OK {
        gcm_pending().insert(s, (caller.pIv as usize, iv));
    }
    rv
}

unsafe extern "C" fn C_Encrypt(
    s: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's arguments go to the real function unchanged.
    let rv = unsafe { f::C_Encrypt(s, data, len, out, out_len) };
    let ended = match rv {
        // A length query (no output buffer) or a short buffer keeps the operation going.
        CKR_OK => !out.is_null(),
        CKR_BUFFER_TOO_SMALL => false,
        _ => true,
    };
    if ended {
        if let Some((piv, iv)) = gcm_pending().remove(&s) {
            if rv == CKR_OK {
                // SAFETY: `piv` is the caller's CK_GCM_PARAMS.pIv of `iv.len()` bytes
                // (checked at C_EncryptInit), which the caller keeps until its encryption
                // ends, as a device that writes the IV back requires.
                unsafe { std::ptr::copy_nonoverlapping(iv.as_ptr(), piv as *mut u8, iv.len()) };
            }
        }
    }
    rv
}

unsafe extern "C" fn C_DecryptInit(
    s: CK_SESSION_HANDLE,
    m: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's mechanism is null or valid.
    if let Some(rv) = unsafe { absent(m) } {
        return rv;
    }
    // SAFETY: the caller's arguments go to the real function unchanged.
    unsafe { f::C_DecryptInit(s, m, key) }
}

unsafe extern "C" fn C_WrapKey(
    s: CK_SESSION_HANDLE,
    m: *mut CK_MECHANISM,
    wrapping: CK_OBJECT_HANDLE,
    key: CK_OBJECT_HANDLE,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's mechanism is null or valid.
    if let Some(rv) = unsafe { absent(m) } {
        return rv;
    }
    // SAFETY: the caller's arguments go to the real function unchanged.
    unsafe { f::C_WrapKey(s, m, wrapping, key, out, out_len) }
}

unsafe extern "C" fn C_GetMechanismList(
    slot: CK_SLOT_ID,
    list: *mut CK_MECHANISM_TYPE,
    count: *mut CK_ULONG,
) -> CK_RV {
    let hidden = p().absent_mechanisms;
    if hidden.is_empty() || count.is_null() {
        // SAFETY: the caller's arguments go to the real function unchanged.
        return unsafe { f::C_GetMechanismList(slot, list, count) };
    }
    // The whole list, filtered, then the caller's buffer filled as PKCS#11 says.
    let mut n: CK_ULONG = 0;
    // SAFETY: a length query into our own variable.
    let rv = unsafe { f::C_GetMechanismList(slot, std::ptr::null_mut(), &mut n) };
    if rv != CKR_OK {
        return rv;
    }
    let mut all = vec![0 as CK_MECHANISM_TYPE; n as usize];
    // SAFETY: `all` holds `n` entries.
    let rv = unsafe { f::C_GetMechanismList(slot, all.as_mut_ptr(), &mut n) };
    if rv != CKR_OK {
        return rv;
    }
    all.truncate(n as usize);
    all.retain(|m| !hidden.contains(m));
    // SAFETY: `count` is non-null and valid per the caller's contract.
    let room = unsafe { *count } as usize;
    // SAFETY: as above.
    unsafe { *count = all.len() as CK_ULONG };
    if list.is_null() {
        return CKR_OK;
    }
    if room < all.len() {
        return CKR_BUFFER_TOO_SMALL;
    }
    // SAFETY: the caller's buffer holds `room` >= all.len() entries.
    unsafe { std::ptr::copy_nonoverlapping(all.as_ptr(), list, all.len()) };
    CKR_OK
}

unsafe extern "C" fn C_GetMechanismInfo(
    slot: CK_SLOT_ID,
    t: CK_MECHANISM_TYPE,
    info: *mut CK_MECHANISM_INFO,
) -> CK_RV {
    if p().absent_mechanisms.contains(&t) {
        return CKR_MECHANISM_INVALID;
    }
    // SAFETY: the caller's arguments go to the real function unchanged.
    unsafe { f::C_GetMechanismInfo(slot, t, info) }
}

/// The parts of a template the personalities look at.
#[derive(Default)]
struct Template {
    class: Option<CK_ULONG>,
    key_type: Option<CK_ULONG>,
    label_len: usize,
    id_len: usize,
    value_len: usize,
    allowed_mechanisms: bool,
}

/// # Safety
/// `t` is null or valid for `n` attributes, as PKCS#11 requires of a template.
unsafe fn read_template(t: *const CK_ATTRIBUTE, n: CK_ULONG) -> Template {
    let mut out = Template::default();
    if t.is_null() {
        return out;
    }
    // SAFETY: per the caller's contract.
    let attrs = unsafe { std::slice::from_raw_parts(t, n as usize) };
    let ulong = |a: &CK_ATTRIBUTE| {
        (a.ulValueLen as usize == std::mem::size_of::<CK_ULONG>() && !a.pValue.is_null())
            // SAFETY: a CK_ULONG-sized value the template owns (read unaligned to be safe).
            .then(|| unsafe { std::ptr::read_unaligned(a.pValue as *const CK_ULONG) })
    };
    for a in attrs {
        match a.type_ {
            CKA_CLASS => out.class = ulong(a),
            CKA_KEY_TYPE => out.key_type = ulong(a),
            CKA_LABEL => out.label_len = a.ulValueLen as usize,
            CKA_ID => out.id_len = a.ulValueLen as usize,
            CKA_VALUE => out.value_len = a.ulValueLen as usize,
            CKA_ALLOWED_MECHANISMS => out.allowed_mechanisms = true,
            _ => {}
        }
    }
    out
}

/// The personality's verdict on a template for a new object of `class` (when the template
/// does not say).
fn judge(t: &Template, default_class: CK_ULONG) -> Option<CK_RV> {
    let p = p();
    let class = t.class.unwrap_or(default_class);
    if class == CKO_SECRET_KEY {
        if p.no_generic_secret && t.key_type == Some(CKK_GENERIC_SECRET) {
            return Some(CKR_TEMPLATE_INCONSISTENT);
        }
        if t.allowed_mechanisms {
            if let Some(rv) = p.refuses_allowed_mechanisms {
                return Some(rv);
            }
        }
    }
    if class == CKO_DATA && p.max_data_object.is_some_and(|max| t.value_len > max) {
        return Some(CKR_ATTRIBUTE_VALUE_INVALID);
    }
    if p.max_label.is_some_and(|max| t.label_len > max)
        || p.max_id.is_some_and(|max| t.id_len > max)
    {
        return Some(CKR_ATTRIBUTE_VALUE_INVALID);
    }
    None
}

unsafe extern "C" fn C_CreateObject(
    s: CK_SESSION_HANDLE,
    t: *mut CK_ATTRIBUTE,
    n: CK_ULONG,
    out: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's template is valid for `n` attributes.
    if let Some(rv) = judge(&unsafe { read_template(t, n) }, CKO_DATA) {
        return rv;
    }
    // SAFETY: the caller's arguments go to the real function unchanged.
    unsafe { f::C_CreateObject(s, t, n, out) }
}

unsafe extern "C" fn C_GenerateKey(
    s: CK_SESSION_HANDLE,
    m: *mut CK_MECHANISM,
    t: *mut CK_ATTRIBUTE,
    n: CK_ULONG,
    out: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's mechanism is null or valid.
    if let Some(rv) = unsafe { absent(m) } {
        return rv;
    }
    // SAFETY: the caller's template is valid for `n` attributes.
    if let Some(rv) = judge(&unsafe { read_template(t, n) }, CKO_SECRET_KEY) {
        return rv;
    }
    // SAFETY: the caller's arguments go to the real function unchanged.
    unsafe { f::C_GenerateKey(s, m, t, n, out) }
}

unsafe extern "C" fn C_CopyObject(
    s: CK_SESSION_HANDLE,
    o: CK_OBJECT_HANDLE,
    t: *mut CK_ATTRIBUTE,
    n: CK_ULONG,
    out: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    if p().no_copy_object {
        return CKR_FUNCTION_NOT_SUPPORTED;
    }
    // SAFETY: the caller's arguments go to the real function unchanged.
    unsafe { f::C_CopyObject(s, o, t, n, out) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_strings_fit_their_fields() {
        let mut names: Vec<_> = VENDOR_IDS.iter().map(|p| p.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), VENDOR_IDS.len());
        for p in VENDOR_IDS {
            assert!(p.library_manufacturer.len() <= 32, "{}", p.name);
            assert!(p.library_description.len() <= 32, "{}", p.name);
            assert!(p.token_manufacturer.len() <= 32, "{}", p.name);
            assert!(p.token_model.len() <= 16, "{}", p.name);
        }
    }

    #[test]
    fn cloudhsm_lists_neither_copy_nor_set_attribute() {
        for f in ["C_CopyObject", "C_SetAttributeValue"] {
            assert!(!CLOUDHSM_FUNCTIONS.contains(&f));
        }
    }
}
