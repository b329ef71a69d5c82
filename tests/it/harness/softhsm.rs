//! SoftHSM's configuration file for a test that needs a token directory of its own, written by
//! `softhsm-tests/softhsm-conf`, the one writer the scripts share.

use std::path::{Path, PathBuf};

/// Makes `dir/tokens` and `dir/softhsm2.conf` naming it; returns the configuration's path.
pub fn softhsm_conf(dir: &Path) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm-tests/softhsm-conf");
    let out = std::process::Command::new(&script)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim_end())
}
