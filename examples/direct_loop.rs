//! A helper for `benches/e2e.sh`: what SoftHSM itself costs per seal on a given token, without
//! kesh (`common::Direct`: a session, `C_EncryptInit` + `C_Encrypt` on a session key,
//! randomness drawn 4 KiB at a time).
//!
//! `KESH_DIRECT_LABEL=<token> KESH_DIRECT_PIN=<pin> cargo run --release --example direct_loop`
//! seals for `KESH_DIRECT_SECS` (default 2) on the SoftHSM token that `SOFTHSM2_CONF` holds and
//! prints the sealing threads' CPU time per seal, in µs. With `KESH_DIRECT_THREADS=N` (default
//! 1), N threads seal at once, each with its own session and key: a server calls the module
//! from several threads, and SoftHSM's (and OpenSSL's) shared state then moves between cores.
//!
//! The sealing threads are never the one that opened the module, as in kesh, whose calls run on
//! its runtime and worker threads. It matters: beside a 10,000-key token, the same session's
//! seal took 7.3 µs from the opening thread and 10.5–10.7 µs from another one (10 keys: 7.0
//! either way).
//!
//! SoftHSM loads every object of every token in its directory into memory when the module is
//! opened, so the figure also depends on what else the directory holds: e2e.sh compares the
//! 10-key and the 10,000-key tokens' directories with it. The difference follows glibc's
//! per-thread malloc arenas, not the objects' number as such: with `MALLOC_ARENA_MAX=1` a seal
//! beside the 10,000 keys took 7.5–7.8 µs instead of 8.6–9.3, and with jemalloc preloaded
//! 6.6–6.7 against 6.2–6.3 beside 10 keys (this loop, 2026-12-04). kesh keeps glibc's
//! defaults. In the server, on SoftHSM at c=16, one arena did not lower the CPU per operation
//! (43.6–52.8 µs against 41.2–48.9); jemalloc or mimalloc preloaded took about 4 µs less per
//! operation, but the server then held 3.4–3.7 MiB more at c=64 (17.0 MiB with glibc).

#[path = "../benches/common/mod.rs"]
mod common;

use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

fn main() {
    let [label, pin] = common::required_env(
        "direct_loop",
        ["KESH_DIRECT_LABEL", "KESH_DIRECT_PIN"],
        "KESH_DIRECT_SECS, KESH_DIRECT_THREADS",
    );
    let secs = common::env_count("KESH_DIRECT_SECS", 2) as u64;
    let threads = common::env_count("KESH_DIRECT_THREADS", 1);
    let module = kesh::keystore::pkcs11::ephemeral::module_path()
        .expect("SoftHSM is required: apt-get install softhsm2");
    let first = common::Direct::open(&module, &label, &pin, false);
    let mut directs: Vec<_> = (1..threads).map(|_| first.another(false)).collect();
    directs.push(first);

    // Every thread warms up (caches, its randomness buffer), then all seal in one window.
    let warm = Arc::new(Barrier::new(directs.len() + 1));
    let go = Arc::new(Barrier::new(directs.len() + 1));
    let until = Arc::new(OnceLock::new());
    let workers: Vec<_> = directs
        .into_iter()
        .map(|direct| {
            let (warm, go, until) = (warm.clone(), go.clone(), until.clone());
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    std::hint::black_box(direct.seal());
                }
                warm.wait();
                go.wait();
                let until: Instant = *until.get().expect("set before the start");
                let cpu_at_start = thread_cpu();
                let mut seals = 0u64;
                while Instant::now() < until {
                    std::hint::black_box(direct.seal());
                    seals += 1;
                }
                (seals, thread_cpu() - cpu_at_start)
            })
        })
        .collect();
    warm.wait();
    let _ = until.set(Instant::now() + Duration::from_secs(secs));
    go.wait();
    let (seals, cpu) = workers
        .into_iter()
        .map(|w| w.join().expect("a sealing thread panicked"))
        .fold((0u64, Duration::ZERO), |(n, t), (seals, cpu)| {
            (n + seals, t + cpu)
        });
    println!("{:.3}", cpu.as_secs_f64() * 1e6 / seals.max(1) as f64);
}

/// CPU time of the calling thread so far (the first field of its schedstat, in ns).
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("read schedstat");
    let nanos = stat
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("schedstat starts with the time on CPU");
    Duration::from_nanos(nanos)
}
