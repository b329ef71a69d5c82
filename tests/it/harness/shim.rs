//! The fault-injection PKCS#11 module (`softhsm-tests/fault-shim`, crate `kesh-fault-shim`):
//! where it is, built on first use when a plain `cargo test` has not built it, and what its
//! call counts say. Writes no rules ([`super::ServerProcess::inject`] does).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The shim next to this test binary (`target/<profile>/libkesh_fault_shim.so`). When it is
/// missing it is built once per test process with `cargo build -p kesh-fault-shim` into the
/// same target directory and profile; cargo's own lock keeps other builds from racing it.
pub fn shim_path() -> PathBuf {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/it-… → target/<profile>
        let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
        let shim = profile_dir.join("libkesh_fault_shim.so");
        if !shim.exists() {
            build(&profile_dir);
        }
        assert!(
            shim.exists(),
            "{} is missing after building it: run `cargo build -p kesh-fault-shim` \
             (softhsm-tests/run does)",
            shim.display()
        );
        shim
    })
    .clone()
}

fn build(profile_dir: &Path) {
    let target_dir = profile_dir.parent().unwrap();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_owned(),
        Some(other) => other.to_owned(),
        None => panic!("no profile directory above {}", profile_dir.display()),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building the fault shim: cargo build -p kesh-fault-shim --profile {profile}");
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "kesh-fault-shim",
            "--profile",
            &profile,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo to build the fault shim");
    assert!(
        status.success(),
        "building the fault shim failed ({status}): run `cargo build -p kesh-fault-shim` \
         (softhsm-tests/run does) and read its errors"
    );
}

/// Every function's count in a shim stats file (empty before the first call).
pub fn shim_counts(stats: &Path) -> BTreeMap<String, u64> {
    std::fs::read_to_string(stats)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(f, n)| (f.to_owned(), n.parse().unwrap()))
        .collect()
}

/// The count of one function's calls in a shim stats file (0 before its first call).
pub fn shim_calls(stats: &Path, function: &str) -> u64 {
    shim_counts(stats).get(function).copied().unwrap_or(0)
}

/// Milliseconds since the epoch: the clock the shim's `until=` rules are written in.
pub fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}
