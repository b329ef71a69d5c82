//! docs/minio.md followed as a new user would: every `kesh` command of its shell blocks, in
//! order, with the built binary, against a `kesh server` on SoftHSM whose config carries the
//! guide's policy block. Paths under /etc/kesh and /etc/minio live in a temporary directory;
//! `kesh.example.net:7373` and `10.0.0.10` stand for the server's loopback address.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::cli::KES_VECTOR;
use crate::harness;
use crate::harness::command::{kesh, kesh_cmd};

const GUIDE: &str = include_str!("../../docs/minio.md");

/// One shell line of the guide, comment split off.
struct Line {
    text: String,
    comment: String,
}

/// The lines of the guide's ```sh blocks and the body of its ```yaml block holding `policy:`.
fn read_guide() -> (Vec<Line>, String) {
    let (mut lines, mut policy) = (Vec::new(), String::new());
    let mut block: Option<&str> = None;
    let mut yaml = String::new();
    for raw in GUIDE.lines() {
        let t = raw.trim();
        // §7 needs a Vault with KES's keys in it: tests/it/vault.rs runs that path against
        // OpenBao.
        if block.is_none() && t.starts_with("## 7. Moving from KES on Vault") {
            break;
        }
        match block {
            None if t.starts_with("```") => block = Some(t.trim_start_matches('`')),
            None => {}
            Some(kind) if t == "```" => {
                if kind == "yaml" && yaml.starts_with("policy:") {
                    policy = std::mem::take(&mut yaml);
                }
                yaml.clear();
                block = None;
            }
            Some("sh") => {
                let (text, comment) = match t.find(" #") {
                    Some(i) => (t[..i].trim(), t[i..].trim()),
                    None if t.starts_with('#') => ("", t),
                    None => (t, ""),
                };
                if !text.is_empty() {
                    lines.push(Line {
                        text: text.to_owned(),
                        comment: comment.to_owned(),
                    });
                }
            }
            Some("yaml") => {
                yaml.push_str(raw);
                yaml.push('\n');
            }
            Some(_) => {}
        }
    }
    (lines, policy)
}

struct Walk {
    root: tempfile::TempDir,
    /// What the guide exported, and what it told the reader to put in kesh.env.
    exported: BTreeMap<String, String>,
    kesh_env: BTreeMap<String, String>,
    policy: String,
    server: Option<(Child, String)>,
    ran: Vec<String>,
}

impl Drop for Walk {
    fn drop(&mut self) {
        if let Some((child, _)) = &mut self.server {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Walk {
    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p.trim_start_matches('/'))
    }

    fn work(&self) -> PathBuf {
        self.path("work")
    }

    /// The guide's words with this machine's paths and address.
    fn localize(&mut self, s: &str) -> String {
        let mut s = s
            .replace(
                "/etc/kesh/",
                &format!("{}/", self.path("etc/kesh").display()),
            )
            .replace(
                "/etc/minio/",
                &format!("{}/", self.path("etc/minio").display()),
            )
            .replace("10.0.0.10", "127.0.0.1");
        if s.contains("kesh.example.net:7373") {
            let addr = self.server_addr();
            s = s.replace("kesh.example.net:7373", &addr);
        }
        s
    }

    /// Starts the service the guide assumes (install.md), on first need.
    fn server_addr(&mut self) -> String {
        if let Some((_, addr)) = &self.server {
            return addr.clone();
        }
        let token = harness::tokens().guide.clone();
        self.kesh_env
            .insert("KESH_PIN".into(), token.pin().expose().to_owned());
        let etc = self.path("etc/kesh");
        let config = format!(
            "address: 127.0.0.1:0\nadmin:\n  identity: ${{KESH_ADMIN_IDENTITY}}\ntls:\n  key: {etc}/tls/server.key\n  cert: {etc}/tls/server.crt\n{policy}keystore:\n  pkcs11:\n    module: {module}\n    token: {label}\n    pin: ${{KESH_PIN}}\n    profile: softhsm\n",
            etc = etc.display(),
            policy = self.policy,
            module = token.module.display(),
            label = token.label,
        );
        std::fs::write(etc.join("config.yaml"), config).unwrap();
        let env_file: String = self
            .kesh_env
            .iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect();
        std::fs::write(etc.join("kesh.env"), env_file).unwrap();
        // The config is install.md's, where `kesh migrate --to` finds it: the one config
        // a test writes itself.
        let mut cmd = Command::new(harness::command::BIN);
        cmd.args(["server", "--config"])
            .arg(etc.join("config.yaml"))
            .envs(&self.kesh_env)
            .stderr(Stdio::null());
        let (child, banner) =
            harness::server::start_child(&mut cmd).expect("the guide's server serves");
        let addr = banner.addr;
        self.server = Some((child, addr.clone()));
        addr
    }

    /// Runs one guide line; returns stdout.
    fn run(&mut self, line: &Line) {
        let text = self.localize(&line.text);
        if let Some(assignments) = text.strip_prefix("export ") {
            for pair in assignments.split_whitespace() {
                let (k, v) = pair.split_once('=').expect("export NAME=value");
                self.exported.insert(k.to_owned(), v.to_owned());
            }
            return;
        }
        if text.contains(". ") && text.contains("kesh.env") {
            // `set -a && . /etc/kesh/kesh.env && set +a`
            let vars = self.kesh_env.clone();
            self.exported.extend(vars);
            return;
        }
        let words: Vec<&str> = text.split_whitespace().collect();
        let first_cmd = words.iter().position(|w| !w.contains('=')).unwrap_or(0);
        if words.get(first_cmd) != Some(&"kesh") {
            return; // chgrp, mc, …: not kesh's
        }
        let mut cmd = kesh_cmd(&[], &words[first_cmd + 1..]);
        cmd.current_dir(self.work()).envs(&self.exported);
        for pair in &words[..first_cmd] {
            let (k, v) = pair.split_once('=').unwrap();
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        if line.comment.contains("refused") {
            assert!(
                !out.status.success() && stderr.contains("not authorized"),
                "`{}` should be refused: {stdout}{stderr}",
                line.text
            );
        } else {
            assert!(
                out.status.success(),
                "`{}` failed: {stdout}{stderr}",
                line.text
            );
        }
        // The guide tells the reader to put these identities in kesh.env.
        if words[first_cmd + 1..].starts_with(&["identity", "of"]) {
            let var = if text.contains("admin.crt") {
                "KESH_ADMIN_IDENTITY"
            } else {
                "MINIO_IDENTITY"
            };
            self.kesh_env.insert(var.into(), stdout.trim().to_owned());
        }
        self.ran.push(words[first_cmd + 1..].join(" "));
    }
}

/// A KES `fs` keystore with KES's stored-key vector (KES: `internal/crypto/key_test.go`), and the KES config `kesh migrate --from` reads.
fn kes_setup(work: &Path) {
    let keys = work.join("kes-keys");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::write(keys.join("minio-from-kes"), KES_VECTOR).unwrap();
    std::fs::write(
        work.join("kes-config.yaml"),
        format!(
            "address: 0.0.0.0:7373\nadmin:\n  identity: disabled\ntls:\n  key: k.pem\n  cert: c.pem\nkeystore:\n  fs:\n    path: {}\n",
            keys.display()
        ),
    )
    .unwrap();
}

#[test]
fn minio_guide_step_by_step() {
    let (lines, policy) = read_guide();
    assert!(policy.contains("${MINIO_IDENTITY}"), "{policy}");
    let mut walk = Walk {
        root: tempfile::tempdir().unwrap(),
        exported: BTreeMap::new(),
        kesh_env: BTreeMap::new(),
        policy,
        server: None,
        ran: Vec::new(),
    };
    // What install.md left behind.
    for dir in ["etc/kesh/tls", "etc/minio/kes", "work"] {
        std::fs::create_dir_all(walk.path(dir)).unwrap();
    }
    kes_setup(&walk.work());
    for line in &lines {
        walk.run(line);
    }
    for expected in [
        "identity new --key",
        "identity of",
        "key create minio-default-key",
        "key info minio-default-key",
        "key dek minio-default-key",
        "key rm minio-default-key",
        "migrate --from kes-config.yaml",
    ] {
        assert!(
            walk.ran.iter().any(|r| r.starts_with(expected)),
            "the guide no longer runs `kesh {expected}`: {:?}",
            walk.ran
        );
    }
    // The server knows the key `kesh migrate` wrote onto its token, under its KES name (a
    // listing would show it once the index is rescanned, within 5 s; a lookup at once).
    let addr = walk.server_addr();
    let path = |p: &str| walk.path(p).display().to_string();
    let (ca, cert, key) = (
        path("etc/kesh/tls/server.crt"),
        path("etc/kesh/tls/admin.crt"),
        path("etc/kesh/tls/admin.key"),
    );
    let info = kesh(
        &[("KES_CLIENT_CERT", &cert), ("KES_CLIENT_KEY", &key)],
        &[
            "key",
            "info",
            "minio-from-kes",
            "--json",
            "-s",
            &addr,
            "--ca",
            &ca,
        ],
    )
    .ok();
    assert!(info.contains("minio-from-kes"), "{info}");
}
