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
