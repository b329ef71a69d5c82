//! A helper for `benches/e2e.sh`, which needs tokens holding 10 and 10,000 keys before a
//! `kesh server` starts on them.
//!
//! `KESH_POPULATE_LABEL=<token> KESH_POPULATE_PIN=<pin> KESH_POPULATE_KEYS=<n> cargo run
//! --release --example populate` writes keys `bulk-0` .. `bulk-<n-1>` in kesh's layout (see
//! `common::populate`) on the SoftHSM token that `SOFTHSM2_CONF` holds.

#[path = "../benches/common/mod.rs"]
mod common;

fn main() {
    let [label, pin] = common::required_env(
        "populate",
        ["KESH_POPULATE_LABEL", "KESH_POPULATE_PIN"],
        "KESH_POPULATE_KEYS",
    );
    let keys = common::env_count("KESH_POPULATE_KEYS", 10);
    let module = kesh::keystore::pkcs11::ephemeral::module_path()
        .expect("SoftHSM is required: apt-get install softhsm2");
    let started = std::time::Instant::now();
    common::populate(&module, &label, &pin, 0, keys);
    eprintln!(
        "populate: {keys} keys on '{label}' in {:.1?}",
        started.elapsed()
    );
}
