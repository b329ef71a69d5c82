//! Runs the built `kesh` binary as an operator would, with exactly the client environment a
//! test gives it. Starts no server ([`super::server`] does).

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// The `kesh` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_kesh");

/// Variables the client reads; cleared so the caller's environment cannot leak in.
pub const CLIENT_VARS: &[&str] = &[
    "MINIO_KES_SERVER",
    "KES_SERVER",
    "MINIO_KMS_KES_ENDPOINT",
    "MINIO_KES_API_KEY",
    "KES_API_KEY",
    "MINIO_KMS_KES_API_KEY",
    "MINIO_KES_KEY_FILE",
    "KES_CLIENT_KEY",
    "MINIO_KES_CLIENT_KEY",
    "MINIO_KES_CERT_FILE",
    "KES_CLIENT_CERT",
    "MINIO_KES_CLIENT_CERT",
    "SSL_CERT_FILE",
    "RUST_LOG",
    "VAULT_TOKEN",
];

/// A finished `kesh` run.
pub struct Run {
    pub out: Output,
    args: String,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    /// Asserts success; returns stdout.
    pub fn ok(&self) -> String {
        assert!(
            self.out.status.success(),
            "`kesh {}` failed ({}): {}\nstdout: {}",
            self.args,
            self.out.status,
            self.stderr(),
            self.stdout()
        );
        self.stdout()
    }
    /// Asserts success and one JSON value per stdout line; returns the first.
    pub fn json(&self) -> Value {
        self.json_lines().remove(0)
    }
    pub fn json_lines(&self) -> Vec<Value> {
        self.ok()
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("`kesh {}`: not JSON: {l:?}: {e}", self.args))
            })
            .collect()
    }
    /// Asserts failure with a message on stderr containing `needle`, nothing on stdout.
    pub fn fails(&self, needle: &str) -> String {
        assert!(
            !self.out.status.success(),
            "`kesh {}` should fail; stdout: {}",
            self.args,
            self.stdout()
        );
        let err = self.stderr();
        assert!(
            err.contains(needle),
            "`kesh {}`: stderr lacks {needle:?}: {err}",
            self.args
        );
        assert!(self.out.stdout.is_empty(), "stdout: {}", self.stdout());
        err
    }
}

/// A `kesh <args>` command with exactly the given client environment.
pub fn kesh_cmd(env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null());
    for v in CLIENT_VARS {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Two lists of variables as one.
pub fn join<'a>(a: &[(&'a str, &'a str)], b: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    a.iter().chain(b).copied().collect()
}

/// Runs `kesh <args>` with exactly the given client environment.
pub fn kesh(env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = kesh_cmd(env, args);
    Run {
        out: cmd.output().expect("run kesh"),
        args: args.join(" "),
    }
}

/// `kesh migrate --from <from> --to <to> <extra>` with exactly the given client environment.
pub fn kesh_migrate(env: &[(&str, &str)], from: &Path, to: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        "migrate",
        "--from",
        from.to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    kesh(env, &args)
}

/// Waits for a `kesh` child started in the background; asserts it succeeded, returns stdout.
pub fn wait_ok(child: std::process::Child) -> String {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The entry for key `name` in a `kesh migrate --json` report.
pub fn migration_outcome(report: &Value, name: &str) -> Value {
    report["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {report}"))
        .clone()
}

/// The error `kesh migrate --json` reported for key `name`.
pub fn migration_error(run: &Run, name: &str) -> String {
    let report: Value = serde_json::from_str(run.stdout().trim()).unwrap();
    migration_outcome(&report, name)["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error for {name} in {report}"))
        .to_owned()
}
