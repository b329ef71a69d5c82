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

/// A SoftHSM token in a token directory of its own, served only to `kesh server` children
/// (which get [`PrivateToken::conf`] as `SOFTHSM2_CONF`).
///
/// SoftHSM's `C_Initialize` reads every token in its directory, object file by object file. In
/// the suite's shared directory that includes the 10,000-key test's token: a child that
/// re-initializes the module to recover then spends seconds (and 100 MB) loading tokens it never
/// uses, and a recovery test measures the suite instead of kesh.
pub struct PrivateToken {
    pub token: std::sync::Arc<kesh::keystore::pkcs11::ephemeral::EphemeralToken>,
    pub conf: PathBuf,
}

impl PrivateToken {
    /// Initializes the token with `softhsm2-util`, beside the suite's token directory.
    pub fn create(name: &str) -> PrivateToken {
        let suite = std::env::var_os("SOFTHSM2_CONF").expect("the suite's SOFTHSM2_CONF is set");
        let dir = Path::new(&suite)
            .parent()
            .expect("SOFTHSM2_CONF names a file")
            .join(format!("private-{}-{name}", std::process::id()));
        let conf = softhsm_conf(&dir);
        let label = format!(
            "kesh-{name}-{}",
            hex::encode(*kesh::secret::random::<4>().unwrap())
        );
        let pin = hex::encode(*kesh::secret::random::<8>().unwrap());
        let out = std::process::Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args(["--init-token", "--free", "--label", &label])
            .args(["--so-pin", &pin, "--pin", &pin])
            .output()
            .unwrap_or_else(|e| panic!("{}: softhsm2-util: {e}", super::SOFTHSM_HINT));
        assert!(
            out.status.success(),
            "softhsm2-util --init-token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = kesh::keystore::pkcs11::ephemeral::EphemeralToken::existing(
            label,
            kesh::secret::Pin::new(pin),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", super::SOFTHSM_HINT));
        PrivateToken {
            token: std::sync::Arc::new(token),
            conf,
        }
    }
}
