//! A helper for `benches/e2e.sh`, not a measurement of kesh: the ceiling it compares its
//! latency-injected server with. N threads, each with its own session, call C_GenerateRandom through the fault
//! shim (with its `latency` rule) as fast as they can; the calls per second they reach are what
//! the shim and this machine allow at that many sessions, below the ideal N × 1000/s when the
//! sleeps overshoot.
//!
//! `KESH_CEILING_MODULE=<shim.so> KESH_CEILING_LABEL=<token> KESH_CEILING_PIN=<pin>
//! KESH_CEILING_THREADS=32 cargo run --release --example shim_ceiling` prints
//! `calls_per_sec=<n>`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[path = "../benches/common/mod.rs"]
mod common;

fn main() {
    let [module, label, pin] = common::required_env(
        "shim_ceiling",
        [
            "KESH_CEILING_MODULE",
            "KESH_CEILING_LABEL",
            "KESH_CEILING_PIN",
        ],
        "KESH_CEILING_THREADS",
    );
    let threads = common::env_count("KESH_CEILING_THREADS", 32);
    let (ctx, slot, _login) = common::login(std::path::Path::new(&module), &label, &pin);
    let calls = AtomicU64::new(0);
    let window = Duration::from_secs(3);
    let end = Instant::now() + window;
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let s = ctx.open_rw_session(slot).expect("session");
                let mut buf = [0u8; 32];
                while Instant::now() < end {
                    s.generate_random_slice(&mut buf).expect("C_GenerateRandom");
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    println!(
        "calls_per_sec={:.0}",
        calls.load(Ordering::Relaxed) as f64 / window.as_secs_f64()
    );
}
