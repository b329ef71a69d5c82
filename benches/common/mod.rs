//! Shared by the bench targets and the `examples/` helpers of `benches/e2e.sh`: filling a SoftHSM
//! token with keys in kesh's layout, fast.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "shared by several bench and example binaries, each using part of it"
)]

use cryptoki::context::Pkcs11;
use cryptoki::mechanism::Mechanism;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use kesh::crypto::kes::Algorithm;
use kesh::keystore::pkcs11::{device, objects, TokenSelector};
use kesh::keystore::{Provenance, Scheme};

/// The encryption context of every benchmarked operation, shaped like MinIO's.
pub const CONTEXT: &[u8] = br#"{"bucket":"bucket/objects/0001.bin"}"#;

/// The example helpers' settings: the `required` variables' values, or a usage line naming
/// them (and the `optional` ones) and exit code 2.
pub fn required_env<const N: usize>(
    program: &str,
    required: [&str; N],
    optional: &str,
) -> [String; N] {
    required.map(|var| {
        std::env::var(var).unwrap_or_else(|_| {
            eprintln!("{program}: set {} (and {optional})", required.join(", "));
            std::process::exit(2);
        })
    })
}

/// A positive count from the variable `var`, else `default`.
pub fn env_count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// The module loaded and initialized, the token's slot, and a session logged in as the user.
pub fn login(module: &std::path::Path, label: &str, pin: &str) -> (Pkcs11, Slot, Session) {
    let ctx = Pkcs11::new(module).expect("load the PKCS#11 module");
    device::initialize(&ctx).expect("C_Initialize");
    let slot = device::find_slot(&ctx, &TokenSelector::Label(label.to_owned())).expect("token");
    let session = ctx.open_rw_session(slot).expect("open a session");
    match session.login(UserType::User, Some(&AuthPin::new(pin.into()))) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
        }
        Err(e) => panic!("login: {e}"),
    }
    (ctx, slot, session)
}

/// Writes `count` GCM master keys named `bulk-<i>` (label `kesh/bulk-<i>`), starting at
/// `first`, straight onto the token labelled `label`.
///
/// kesh's create protocol searches the token for each new name, which makes loading 10,000
/// keys quadratic on SoftHSM; the objects here are the ones a finished create leaves (state
/// ready, kesh's template), so a keystore opened afterwards indexes and uses them as its own.
pub fn populate(module: &std::path::Path, label: &str, pin: &str, first: usize, count: usize) {
    let (_ctx, _slot, session) = login(module, label, pin);
    let provenance = Provenance::now("kesh-bench");
    for i in first..first + count {
        let meta = objects::Meta::new(
            objects::Role::Key,
            &format!("{i:016x}"),
            Scheme::Gcm,
            Algorithm::Aes256,
            &provenance,
        )
        .ready();
        let template =
            objects::master_template(&format!("kesh/bulk-{i}"), &meta, Scheme::Gcm, None);
        session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .expect("generate a master key");
    }
}

/// SoftHSM without kesh: one logged-in session and one AES key with kesh's master template.
pub struct Direct {
    key: cryptoki::object::ObjectHandle,
    /// Randomness drawn in bulk, as kesh's pool does; used from the end.
    random: std::cell::RefCell<Vec<u8>>,
    // Dropped before the context it belongs to.
    session: cryptoki::session::Session,
    slot: Slot,
    ctx: Pkcs11,
}

impl Direct {
    pub fn open(module: &std::path::Path, label: &str, pin: &str, on_token: bool) -> Self {
        let (ctx, slot, session) = login(module, label, pin);
        Self::with_session(ctx, slot, session, on_token)
    }

    /// Another session with its own key on the same module, for another thread.
    pub fn another(&self, on_token: bool) -> Self {
        let session = self.ctx.open_rw_session(self.slot).expect("open a session");
        Self::with_session(self.ctx.clone(), self.slot, session, on_token)
    }

    fn with_session(ctx: Pkcs11, slot: Slot, session: Session, on_token: bool) -> Self {
        use cryptoki::object::Attribute;
        let meta = objects::Meta::new(
            objects::Role::Key,
            "00000000000000ff",
            kesh::keystore::Scheme::Gcm,
            kesh::crypto::kes::Algorithm::Aes256,
            &Provenance::now("bench"),
        );
        let mut template =
            objects::master_template("bench/direct", &meta, kesh::keystore::Scheme::Gcm, None);
        template.retain(|a| !matches!(a, Attribute::Token(_)));
        template.push(Attribute::Token(on_token));
        let key = session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .expect("generate a key");
        Direct {
            key,
            random: std::cell::RefCell::new(Vec::new()),
            session,
            slot,
            ctx,
        }
    }

    /// IV ‖ GCM(DEK) with the tag, as kesh's seal without its header.
    pub fn seal(&self) -> Vec<u8> {
        use cryptoki::mechanism::{aead::GcmParams, Mechanism};
        let mut random = self.random.borrow_mut();
        if random.len() < 44 {
            random.resize(4096, 0);
            self.session
                .generate_random_slice(&mut random)
                .expect("random");
        }
        let at = random.len() - 44;
        let mut iv = [0u8; 12];
        iv.copy_from_slice(&random[at + 32..]);
        let params = GcmParams::new(&mut iv, CONTEXT, 128.into()).expect("params");
        let sealed = self
            .session
            .encrypt(&Mechanism::AesGcm(params), self.key, &random[at..at + 32])
            .expect("seal");
        random.truncate(at);
        [&iv[..], &sealed].concat()
    }

    pub fn unseal(&self, sealed: &[u8]) -> Vec<u8> {
        use cryptoki::mechanism::{aead::GcmParams, Mechanism};
        let mut iv = [0u8; 12];
        iv.copy_from_slice(&sealed[..12]);
        let params = GcmParams::new(&mut iv, CONTEXT, 128.into()).expect("params");
        self.session
            .decrypt(&Mechanism::AesGcm(params), self.key, &sealed[12..])
            .expect("unseal")
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        let _ = self.session.destroy_object(self.key);
    }
}
