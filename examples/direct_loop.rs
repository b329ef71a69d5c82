//! A helper for `benches/e2e.sh`: what SoftHSM itself costs per seal on a given token, without
//! kesh (`common::Direct`: one thread, one session, `C_EncryptInit` + `C_Encrypt` on a session
//! key, randomness drawn 4 KiB at a time).
//!
//! `KESH_DIRECT_LABEL=<token> KESH_DIRECT_PIN=<pin> cargo run --release --example direct_loop`
//! seals for `KESH_DIRECT_SECS` (default 2) on the SoftHSM token that `SOFTHSM2_CONF` holds and
//! prints the mean µs per seal. SoftHSM keeps every object of every token in its directory in
//! memory, so the figure depends on what else the directory holds: e2e.sh compares the
//! 10-key and the 10,000-key tokens' directories with it.

#[path = "../benches/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

fn main() {
    let (Ok(label), Ok(pin)) = (
        std::env::var("KESH_DIRECT_LABEL"),
        std::env::var("KESH_DIRECT_PIN"),
    ) else {
        eprintln!("direct_loop: set KESH_DIRECT_LABEL and KESH_DIRECT_PIN (and KESH_DIRECT_SECS)");
        std::process::exit(2);
    };
    let secs: u64 = std::env::var("KESH_DIRECT_SECS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2);
    let module = kesh::keystore::pkcs11::ephemeral::module_path()
        .expect("SoftHSM is required: apt-get install softhsm2");
    let direct = common::Direct::open(&module, &label, &pin, false);
    // Warm up the caches and the randomness buffer before measuring.
    for _ in 0..1000 {
        std::hint::black_box(direct.seal());
    }
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let mut seals = 0u64;
    while Instant::now() < until {
        std::hint::black_box(direct.seal());
        seals += 1;
    }
    println!(
        "{:.3}",
        started.elapsed().as_secs_f64() * 1e6 / seals as f64
    );
}
