//! A helper for `benches/e2e.sh`, which needs tokens holding 10 and 10,000 keys before a
//! `kesh server` starts on them.
//!
//! `KESH_POPULATE_LABEL=<token> KESH_POPULATE_PIN=<pin> KESH_POPULATE_KEYS=<n> cargo run
//! --release --example populate` writes keys `bulk-0` .. `bulk-<n-1>` in kesh's layout (see
//! `common::populate`) on the SoftHSM token that `SOFTHSM2_CONF` holds.

#[path = "../benches/common/mod.rs"]
mod common;

fn main() {
    let (Ok(label), Ok(pin)) = (
        std::env::var("KESH_POPULATE_LABEL"),
        std::env::var("KESH_POPULATE_PIN"),
    ) else {
        eprintln!(
            "populate: set KESH_POPULATE_LABEL and KESH_POPULATE_PIN (and KESH_POPULATE_KEYS)"
        );
        std::process::exit(2);
    };
    let keys: usize = std::env::var("KESH_POPULATE_KEYS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10);
    let module = kesh::keystore::pkcs11::ephemeral::module_path()
        .expect("SoftHSM is required: apt-get install softhsm2");
    let started = std::time::Instant::now();
    common::populate(&module, &label, &pin, 0, keys);
    eprintln!(
        "populate: {keys} keys on '{label}' in {:.1?}",
        started.elapsed()
    );
}
