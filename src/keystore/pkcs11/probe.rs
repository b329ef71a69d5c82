//! `kesh hsm probe`: what a PKCS#11 module and token can do for kesh, found by trying.
//!
//! Lists slots and tokens, logs in, and runs each scheme's mechanisms on temporary *session*
//! keys (`CKA_TOKEN` false: they vanish with the session and never touch the token's storage):
//! `CKM_AES_GCM` encrypt/decrypt (`gcm`), `CKM_AES_KEY_WRAP_PAD` wrap/unwrap (`kwp`),
//! `CKM_SHA256_HMAC` sign (`kes`). The session keys carry the same attributes as kesh's master
//! keys (docs/FORMAT.md §6), so "yes" means kesh's own keys will work. It also finds out
//! who draws GCM IVs: a device that generates them writes its IV into the caller's buffer (or
//! rejects caller IVs); one that takes the caller's leaves the buffer as given.
//!
//! Blocking; the CLI calls it outside any async runtime. The PIN is used for one `C_Login` and
//! never printed.

use std::path::{Path, PathBuf};

use cryptoki::context::Pkcs11;
use cryptoki::error::Error as CkError;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Limit;
use serde::Serialize;

use super::device::{self, find_slot, initialize};
use super::{objects, profile, TokenSelector};
use crate::keystore::Scheme;
use crate::secret::Pin;

/// What to probe: a module, and optionally one token on it with its PIN.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    /// The PKCS#11 module.
    pub module: PathBuf,
    /// The token to test in depth; `None` lists slots only.
    pub token: Option<TokenSelector>,
    /// Its PIN; testing a token needs it.
    pub pin: Option<Pin>,
}

/// Everything the probe found; serialises to the `--json` output.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// The module's path.
    pub module: String,
    /// What the library says of itself.
    pub library: LibraryReport,
    /// Every slot the module lists.
    pub slots: Vec<SlotReport>,
    /// The token tested in depth; `None` when no token was named.
    pub token: Option<TokenReport>,
}

#[derive(Debug, Clone, Serialize)]
/// `C_GetInfo`.
pub struct LibraryReport {
    /// Manufacturer ID.
    pub manufacturer: String,
    /// Library description.
    pub description: String,
    /// Library version.
    pub version: String,
    /// The PKCS#11 version it implements.
    pub cryptoki_version: String,
}

#[derive(Debug, Clone, Serialize)]
/// One slot of `C_GetSlotList`.
pub struct SlotReport {
    /// The slot number (informational: kesh finds tokens by label or serial).
    pub slot: u64,
    /// Slot description.
    pub description: String,
    /// `None` when the slot holds no token.
    pub token: Option<TokenSummary>,
}

#[derive(Debug, Clone, Serialize)]
/// `C_GetTokenInfo`, in short.
pub struct TokenSummary {
    /// Token label.
    pub label: String,
    /// Serial number.
    pub serial: String,
    /// Manufacturer ID.
    pub manufacturer: String,
    /// Model.
    pub model: String,
    /// Whether the token is initialized.
    pub initialized: bool,
}

/// A session limit as the token reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "value")]
pub enum SessionLimit {
    /// At most this many.
    Max(u64),
    /// No limit.
    Infinite,
    /// The token does not say.
    Unknown,
}

impl From<Limit> for SessionLimit {
    fn from(l: Limit) -> Self {
        match l {
            Limit::Max(n) => SessionLimit::Max(n),
            Limit::Infinite => SessionLimit::Infinite,
            Limit::Unavailable => SessionLimit::Unknown,
        }
    }
}

impl std::fmt::Display for SessionLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionLimit::Max(n) => write!(f, "{n}"),
            SessionLimit::Infinite => f.write_str("unlimited"),
            SessionLimit::Unknown => f.write_str("not reported"),
        }
    }
}

/// One scheme's verdict: whether it works, and why not.
#[derive(Debug, Clone, Serialize)]
pub struct SchemeCheck {
    /// The scheme (`gcm`, `kwp`, `kes`).
    pub scheme: &'static str,
    /// The mechanism it needs.
    pub mechanism: &'static str,
    /// The mechanism is in `C_GetMechanismList`.
    pub listed: bool,
    /// A key made with kesh's template did the operation.
    pub supported: bool,
    /// What failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Who draws GCM IVs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IvFinding {
    /// The device uses the IV kesh passes (kesh draws it from the HSM's RNG).
    Caller,
    /// The device generates its own IV and returns it.
    Device,
    /// GCM does not work, so the question does not arise.
    Unknown,
}

#[derive(Debug, Clone, Serialize)]
/// The in-depth test of one token.
pub struct TokenReport {
    /// Its slot.
    pub slot: u64,
    /// Label, serial, manufacturer, model.
    #[serde(flatten)]
    pub summary: TokenSummary,
    /// Whether the login succeeded (always, in a report: a refused PIN fails the probe).
    pub logged_in: bool,
    /// Sessions the token allows.
    pub max_sessions: SessionLimit,
    /// Sessions open now, if reported.
    pub sessions: Option<u64>,
    /// Read-write sessions the token allows.
    pub max_rw_sessions: SessionLimit,
    /// Read-write sessions open now, if reported.
    pub rw_sessions: Option<u64>,
    /// Each scheme's verdict.
    pub schemes: Vec<SchemeCheck>,
    /// Who draws GCM IVs.
    pub gcm_iv: IvFinding,
    /// The profile kesh detects for this module and token (`generic` when none matches).
    pub profile: &'static str,
    /// `gcm` when it works, else `kwp`, else `kes`; `None` when none does.
    pub recommended_scheme: Option<&'static str>,
    /// Suggested `sessions:`.
    pub recommended_sessions: usize,
    /// A `keystore:` section for the kesh config.
    pub recommended_config: String,
}

impl TokenReport {
    /// Whether `scheme` works on this token.
    pub fn supports(&self, scheme: &str) -> bool {
        self.schemes
            .iter()
            .any(|s| s.scheme == scheme && s.supported)
    }
}

/// Why the probe could not run at all.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProbeError(pub String);

fn ck(what: &'static str) -> impl Fn(CkError) -> ProbeError {
    move |e| ProbeError(format!("{what}: {e}"))
}

/// Runs the probe. Fails only when the module cannot be loaded or the named token cannot be
/// found or logged into; a failing mechanism is a finding, not an error.
pub fn probe(target: &ProbeTarget) -> Result<ProbeReport, ProbeError> {
    let ctx = Pkcs11::new(&target.module).map_err(|e| {
        ProbeError(format!(
            "cannot load the PKCS#11 module '{}': {e}; check the path (`kesh hsm probe` takes the vendor's .so file)",
            target.module.display()
        ))
    })?;
    initialize(&ctx).map_err(|e| ProbeError(e.to_string()))?;
    let info = ctx.get_library_info().map_err(ck("C_GetInfo"))?;
    let library = LibraryReport {
        manufacturer: info.manufacturer_id().trim_end().to_owned(),
        description: info.library_description().trim_end().to_owned(),
        version: info.library_version().to_string(),
        cryptoki_version: info.cryptoki_version().to_string(),
    };
    let mut slots = Vec::new();
    for slot in ctx.get_all_slots().map_err(ck("C_GetSlotList"))? {
        let description = ctx
            .get_slot_info(slot)
            .map(|i| i.slot_description().trim_end().to_owned())
            .unwrap_or_default();
        let token = ctx.get_token_info(slot).ok().map(|t| TokenSummary {
            label: t.label().trim_end().to_owned(),
            serial: t.serial_number().trim_end().to_owned(),
            manufacturer: t.manufacturer_id().trim_end().to_owned(),
            model: t.model().trim_end().to_owned(),
            initialized: t.token_initialized(),
        });
        slots.push(SlotReport {
            slot: slot.id(),
            description,
            token,
        });
    }
    let token = match &target.token {
        None => None,
        Some(sel) => Some(probe_token(&ctx, target, sel, &library.manufacturer)?),
    };
    Ok(ProbeReport {
        module: target.module.display().to_string(),
        library,
        slots,
        token,
    })
}

fn probe_token(
    ctx: &Pkcs11,
    target: &ProbeTarget,
    sel: &TokenSelector,
    library_manufacturer: &str,
) -> Result<TokenReport, ProbeError> {
    let slot = find_slot(ctx, sel).map_err(|e| ProbeError(e.to_string()))?;
    let pin = target.pin.as_ref().ok_or_else(|| {
        ProbeError(
            "a PIN is needed to test the token: give --pin-env VAR (the variable holding the PIN) or --config FILE"
                .into(),
        )
    })?;
    let session = ctx.open_rw_session(slot).map_err(ck("C_OpenSession"))?;
    // One attempt, never repeated: a refused PIN counts towards the token's lockout.
    device::login(&session, pin).map_err(|e| {
        ProbeError(format!(
            "{e}: check the PIN (--pin-env, or `pin:`/`pin_file:` in the config)"
        ))
    })?;
    // Read the counters while our session is open: it counts as one.
    let info = ctx.get_token_info(slot).map_err(ck("C_GetTokenInfo"))?;
    let summary = TokenSummary {
        label: info.label().trim_end().to_owned(),
        serial: info.serial_number().trim_end().to_owned(),
        manufacturer: info.manufacturer_id().trim_end().to_owned(),
        model: info.model().trim_end().to_owned(),
        initialized: info.token_initialized(),
    };
    // Asked one by one: C_GetMechanismList makes cryptoki log every mechanism it has no
    // name for.
    let listed: Vec<MechanismType> = [
        MechanismType::AES_GCM,
        MechanismType::AES_KEY_WRAP_PAD,
        MechanismType::SHA256_HMAC,
    ]
    .into_iter()
    .filter(|m| ctx.get_mechanism_info(slot, *m).is_ok())
    .collect();
    let (gcm, gcm_iv) = check_gcm(&session);
    let kwp = check_kwp(&session);
    let kes = check_kes(&session);
    let schemes = vec![
        verdict("gcm", "CKM_AES_GCM", &listed, MechanismType::AES_GCM, gcm),
        verdict(
            "kwp",
            "CKM_AES_KEY_WRAP_PAD",
            &listed,
            MechanismType::AES_KEY_WRAP_PAD,
            kwp,
        ),
        verdict(
            "kes",
            "CKM_SHA256_HMAC",
            &listed,
            MechanismType::SHA256_HMAC,
            kes,
        ),
    ];
    let _ = session.logout();
    drop(session);
    let max_rw_sessions = SessionLimit::from(info.max_rw_session_count());
    let detected = profile::detect(library_manufacturer, Some(&summary.manufacturer));
    // The profile's pool size, below the token's own limit (one session is kesh's login).
    let mut sessions = detected.sessions;
    if let SessionLimit::Max(n) = max_rw_sessions {
        let cap = usize::try_from(n.saturating_sub(1))
            .unwrap_or(usize::MAX)
            .max(1);
        sessions = sessions.min(cap);
    }
    let mut report = TokenReport {
        slot: slot.id(),
        summary,
        logged_in: true,
        max_sessions: info.max_session_count().into(),
        sessions: info.session_count(),
        max_rw_sessions,
        rw_sessions: info.rw_session_count(),
        schemes,
        gcm_iv,
        profile: detected.name,
        recommended_scheme: None,
        recommended_sessions: sessions,
        recommended_config: String::new(),
    };
    report.recommended_scheme = if report.supports("gcm") {
        Some("gcm")
    } else if report.supports("kwp") {
        Some("kwp")
    } else if report.supports("kes") {
        // HMAC on the device, AES-GCM in kesh: for devices with neither GCM nor KWP.
        Some("kes")
    } else {
        None
    };
    report.recommended_config = recommended_config(&target.module, sel, &report);
    Ok(report)
}

fn verdict(
    scheme: &'static str,
    mechanism: &'static str,
    listed: &[MechanismType],
    ty: MechanismType,
    result: Result<(), String>,
) -> SchemeCheck {
    SchemeCheck {
        scheme,
        mechanism,
        listed: listed.contains(&ty),
        supported: result.is_ok(),
        error: result.err(),
    }
}

/// A temporary session key made with the keystore's own master-key template for `scheme`.
fn session_key(s: &Session, scheme: Scheme) -> Result<ObjectHandle, String> {
    s.generate_key(
        &objects::keygen_mechanism(scheme),
        &objects::probe_template(scheme),
    )
    .map_err(|e| format!("C_GenerateKey: {e}"))
}

/// Destroys a session key on every path.
struct Temp<'a>(&'a Session, ObjectHandle);

impl Drop for Temp<'_> {
    fn drop(&mut self) {
        let _ = self.0.destroy_object(self.1);
    }
}

fn gcm_encrypt(
    s: &Session,
    key: ObjectHandle,
    iv: &mut [u8; 12],
    pt: &[u8],
) -> Result<Vec<u8>, CkError> {
    let params = GcmParams::new(iv, b"kesh probe", 128.into())?;
    s.encrypt(&Mechanism::AesGcm(params), key, pt)
}

fn check_gcm(s: &Session) -> (Result<(), String>, IvFinding) {
    let key = match session_key(s, Scheme::Gcm) {
        Ok(k) => Temp(s, k),
        Err(e) => return (Err(e), IvFinding::Unknown),
    };
    let pt = [0x5au8; 32];
    // 1. A zero IV buffer: a device that generates IVs fills it in.
    let mut zero = [0u8; 12];
    let zero_result = gcm_encrypt(s, key.1, &mut zero, &pt);
    let zero_replaced = zero_result.is_ok() && zero != [0u8; 12];
    // 2. A caller IV from the token's RNG: honoured, replaced, or rejected.
    let mut iv = [0u8; 12];
    if let Err(e) = s.generate_random_slice(&mut iv) {
        return (Err(format!("C_GenerateRandom: {e}")), IvFinding::Unknown);
    }
    let given = iv;
    let (ct, device) = match gcm_encrypt(s, key.1, &mut iv, &pt) {
        Ok(ct) => (ct, iv != given),
        Err(e) => match zero_result {
            // Caller IVs refused, device IVs work: a FIPS-style device.
            Ok(ct) if zero_replaced => {
                iv = zero;
                (ct, true)
            }
            _ => return (Err(format!("C_Encrypt: {e}")), IvFinding::Unknown),
        },
    };
    let device = device || zero_replaced;
    // Decrypt with the IV actually used.
    let params = match GcmParams::new(&mut iv, b"kesh probe", 128.into()) {
        Ok(p) => p,
        Err(e) => return (Err(format!("GCM parameters: {e}")), IvFinding::Unknown),
    };
    match s.decrypt(&Mechanism::AesGcm(params), key.1, &ct) {
        Ok(back) if back == pt => (
            Ok(()),
            if device {
                IvFinding::Device
            } else {
                IvFinding::Caller
            },
        ),
        Ok(_) => (
            Err("C_Decrypt returned different bytes".into()),
            IvFinding::Unknown,
        ),
        Err(e) => (Err(format!("C_Decrypt: {e}")), IvFinding::Unknown),
    }
}

fn check_kwp(s: &Session) -> Result<(), String> {
    let kek = Temp(s, session_key(s, Scheme::Kwp)?);
    // What the `kwp` scheme wraps: DEK ‖ SHA-256(context), 64 bytes, as a readable session
    // object.
    let mut value = vec![0u8; 64];
    s.generate_random_slice(&mut value)
        .map_err(|e| format!("C_GenerateRandom: {e}"))?;
    let obj = Temp(
        s,
        s.create_object(&objects::transient_template(value.clone()))
            .map_err(|e| format!("C_CreateObject: {e}"))?,
    );
    let wrapped = s
        .wrap_key(&Mechanism::AesKeyWrapPad, kek.1, obj.1)
        .map_err(|e| format!("C_WrapKey: {e}"))?;
    let back = Temp(
        s,
        s.unwrap_key(
            &Mechanism::AesKeyWrapPad,
            kek.1,
            &wrapped,
            &objects::transient_unwrap_template(),
        )
        .map_err(|e| format!("C_UnwrapKey: {e}"))?,
    );
    let attrs = s
        .get_attributes(back.1, &[AttributeType::Value])
        .map_err(|e| format!("C_GetAttributeValue: {e}"))?;
    match attrs.first() {
        Some(Attribute::Value(v)) if *v == value => Ok(()),
        _ => Err("C_UnwrapKey returned different bytes".into()),
    }
}

fn check_kes(s: &Session) -> Result<(), String> {
    let key = Temp(s, session_key(s, Scheme::Kes)?);
    let a = s
        .sign(&Mechanism::Sha256Hmac, key.1, b"kesh probe iv 16")
        .map_err(|e| format!("C_Sign: {e}"))?;
    let b = s
        .sign(&Mechanism::Sha256Hmac, key.1, b"kesh probe iv 16")
        .map_err(|e| format!("C_Sign: {e}"))?;
    if a.len() != 32 || a != b {
        return Err(format!("C_Sign gave {} bytes or unstable output", a.len()));
    }
    Ok(())
}

fn recommended_config(module: &Path, sel: &TokenSelector, r: &TokenReport) -> String {
    let mut y = String::from("keystore:\n  pkcs11:\n");
    y.push_str(&format!("    module: {}\n", module.display()));
    match sel {
        TokenSelector::Label(l) => y.push_str(&format!("    token: {l}\n")),
        TokenSelector::Serial(s) => y.push_str(&format!("    serial: \"{s}\"\n")),
    }
    y.push_str("    pin: ${KESH_PIN}\n    prefix: kesh/\n");
    if r.profile != profile::GENERIC.name {
        y.push_str(&format!("    profile: {}\n", r.profile));
    }
    y.push_str(&format!("    sessions: {}\n", r.recommended_sessions));
    match r.recommended_scheme {
        Some(s) => y.push_str(&format!("    scheme: {s}\n")),
        None => y.push_str(
            "    # neither gcm, kwp nor kes works on this token: kesh cannot create keys here\n",
        ),
    }
    if r.gcm_iv != IvFinding::Unknown {
        y.push_str(&format!(
            "    iv: {}\n",
            if r.gcm_iv == IvFinding::Device {
                "device"
            } else {
                "caller"
            }
        ));
    }
    if !r.supports("kes") {
        y.push_str(
            "    # CKM_SHA256_HMAC failed: keys migrated from KES (scheme kes) will not work\n",
        );
    }
    y
}
