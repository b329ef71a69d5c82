//! The `kesh` binary's client commands, `migrate` and `hsm probe`, run as an operator would:
//! the built binary against a `kesh server --config` child on 127.0.0.1 port 0, in human and
//! `--json` mode, with their error exits (non-zero, message on stderr).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

use kesh::crypto::kes::{self, Algorithm};
use kesh::crypto::kes_key;
use kesh::identity::ApiKey;

use crate::harness;

const BIN: &str = env!("CARGO_BIN_EXE_kesh");

/// Variables the client reads; cleared so the caller's environment cannot leak in.
pub(crate) const CLIENT_VARS: &[&str] = &[
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

use crate::harness::{b64 as b64d, b64e};

/// A finished `kesh` run.
pub(crate) struct Run {
    pub(crate) out: Output,
    args: String,
}

impl Run {
    pub(crate) fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    pub(crate) fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    /// Asserts success; returns stdout.
    pub(crate) fn ok(&self) -> String {
        assert!(
            self.out.status.success(),
            "`kesh {}` failed: {}\nstdout: {}",
            self.args,
            self.stderr(),
            self.stdout()
        );
        self.stdout()
    }
    /// Asserts success and one JSON value per stdout line; returns the first.
    pub(crate) fn json(&self) -> Value {
        self.json_lines().remove(0)
    }
    pub(crate) fn json_lines(&self) -> Vec<Value> {
        self.ok()
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("`kesh {}`: not JSON: {l:?}: {e}", self.args))
            })
            .collect()
    }
    /// Asserts failure with a message on stderr containing `needle`, nothing on stdout.
    pub(crate) fn fails(&self, needle: &str) -> String {
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
fn kesh_cmd(env: &[(&str, &str)], args: &[&str]) -> Command {
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
fn join<'a>(a: &[(&'a str, &'a str)], b: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    a.iter().chain(b).copied().collect()
}

/// Runs `kesh <args>` with exactly the given client environment.
pub(crate) fn kesh(env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = kesh_cmd(env, args);
    Run {
        out: cmd.output().expect("run kesh"),
        args: args.join(" "),
    }
}

/// A CA and a server certificate for 127.0.0.1 written to `dir`.
fn write_certs(dir: &Path) -> PathBuf {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kesh cli test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("server.crt"), leaf.pem()).unwrap();
    let ca_path = dir.join("ca.crt");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    ca_path
}

/// A `kesh server --config` child; killed on drop. Its stderr goes to a file ([`Server::stderr`]).
pub(crate) struct Server {
    child: Child,
    addr: String,
    ca: PathBuf,
    admin: ApiKey,
    /// Holds the config, certificates and stderr for the server's lifetime.
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts a server with `admin` (an API key) and the given extra YAML (policies) and
    /// keystore section.
    pub(crate) fn start(extra: &str, keystore: &str) -> Self {
        Self::start_env(extra, keystore, &[])
    }

    /// [`Server::start`] with variables in the server's environment (the config's `${VAR}`s).
    pub(crate) fn start_env(extra: &str, keystore: &str, vars: &[(&str, &str)]) -> Self {
        Self::start_full(extra, keystore, vars, None)
    }

    /// With `tls` = (key, certificate) files, the server uses that self-signed certificate and
    /// clients trust exactly it.
    fn start_full(
        extra: &str,
        keystore: &str,
        vars: &[(&str, &str)],
        tls: Option<(&Path, &Path)>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = write_certs(dir.path());
        if let Some((key, cert)) = tls {
            std::fs::copy(key, dir.path().join("server.key")).unwrap();
            std::fs::copy(cert, dir.path().join("server.crt")).unwrap();
            ca = dir.path().join("server.crt");
        }
        let admin = ApiKey::generate().unwrap();
        let config = dir.path().join("kesh.yaml");
        std::fs::write(
            &config,
            format!(
                "address: 127.0.0.1:0\nadmin:\n  identity: {}\ntls:\n  key: {1}/server.key\n  cert: {1}/server.crt\n{extra}keystore:\n{keystore}",
                admin.identity(),
                dir.path().display()
            ),
        )
        .unwrap();
        let mut child = Command::new(BIN)
            .args(["server", "--config", config.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
            .stdin(Stdio::null())
            .envs(vars.iter().copied())
            .spawn()
            .unwrap();
        let addr = harness::wait_for_banner(&mut child);
        Server {
            child,
            addr,
            ca,
            admin,
            dir,
        }
    }

    fn soft(extra: &str) -> Self {
        Self::start(extra, "  soft: {}\n")
    }

    /// What the server wrote to stderr so far (its error and policy log).
    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// A library client as the admin.
    pub(crate) fn client(&self) -> kesh::client::Client {
        self.client_as(kesh::client::Credentials::ApiKey(
            ApiKey::parse(&self.admin.expose_text()).unwrap(),
        ))
    }

    /// A library client with other credentials, trusting the test CA.
    pub(crate) fn client_as(&self, creds: kesh::client::Credentials) -> kesh::client::Client {
        use rustls::pki_types::pem::PemObject as _;
        let pem = std::fs::read(&self.ca).unwrap();
        let ca = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
        kesh::client::Client::new(
            &self.addr,
            creds,
            kesh::client::ServerTrust::Roots(vec![ca]),
        )
        .unwrap()
    }

    /// The admin's client environment, verifying the server against the test CA.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KES_SERVER", self.addr.clone()),
            ("KES_API_KEY", self.admin.expose_text().to_string()),
            ("SSL_CERT_FILE", self.ca.display().to_string()),
        ]
    }

    /// `kesh <args>` as the admin, running in the background (`kesh log`).
    fn spawn(&self, args: &[&str]) -> Child {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        kesh_cmd(&env, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `kesh <args>` as the admin.
    pub(crate) fn run(&self, args: &[&str]) -> Run {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        kesh(&env, args)
    }
}

fn unique(hint: &str) -> String {
    harness::name(hint).to_string()
}

#[test]
fn key_commands_human_and_json() {
    let srv = Server::soft("");
    let (a, b) = (unique("cli-a"), unique("cli-b"));

    // create: a sentence for people, a JSON line per key for scripts.
    let out = srv.run(&["key", "create", &a]).ok();
    assert_eq!(out.trim(), format!("created key '{a}'"));
    let lines = srv.run(&["key", "create", "--json", &b]).json_lines();
    assert_eq!(
        lines,
        vec![serde_json::json!({"name": b, "status": "created"})]
    );
    let err = srv.run(&["key", "create", &a]).fails("key already exists");
    assert!(err.starts_with("Error: "), "{err}");

    // info
    let out = srv.run(&["key", "info", &a]).ok();
    let mut rows = out.lines();
    assert!(rows.next().unwrap().starts_with("Name"), "{out}");
    let row = rows.next().unwrap();
    assert!(row.starts_with(&a) && row.contains("AES256"), "{out}");
    assert!(row.contains(&srv.admin.identity().to_string()), "{out}");
    let v = srv.run(&["key", "info", "--json", &a]).json();
    assert_eq!(v["name"], a.as_str());
    assert_eq!(v["algorithm"], "AES256");
    assert_eq!(v["created_by"], srv.admin.identity().as_str());
    srv.run(&["key", "info", "missing-key"])
        .fails("key does not exist");

    // ls: prefix and all
    let v = srv.run(&["key", "ls", "--json", "cli"]).json();
    let names: Vec<&str> = v["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(
        names.contains(&a.as_str()) && names.contains(&b.as_str()),
        "{v}"
    );
    let out = srv.run(&["key", "ls"]).ok();
    assert_eq!(out.lines().next(), Some("Key"));
    assert!(out.lines().any(|l| l == a), "{out}");
    let out = srv.run(&["ls"]).ok();
    assert!(out.lines().any(|l| l == b), "{out}");
    // `kes` flags kesh accepts and ignores.
    let same = srv.run(&["ls", "--color", "never", "-e", "default"]).ok();
    assert_eq!(same, out);

    // dek → decrypt with the same context; a wrong context is refused.
    let ctx = b64e(b"{\"bucket\":\"b\"}");
    let v = srv.run(&["key", "dek", "--json", &a, &ctx]).json();
    let (pt, ct) = (
        v["plaintext"].as_str().unwrap(),
        v["ciphertext"].as_str().unwrap(),
    );
    assert_eq!(b64d(pt).len(), 32);
    let v = srv.run(&["key", "decrypt", "--json", &a, ct, &ctx]).json();
    assert_eq!(v["plaintext"], pt);
    let out = srv.run(&["key", "decrypt", &a, ct, &ctx]).ok();
    assert_eq!(out.trim(), pt);
    srv.run(&["key", "decrypt", &a, ct, &b64e(b"other")])
        .fails("decryption failed: ciphertext is not authentic");
    let out = srv.run(&["key", "dek", &a]).ok();
    assert!(
        out.starts_with("Plaintext") && out.contains("\nCiphertext"),
        "{out}"
    );

    // import, encrypt a message, decrypt it back.
    let imported = unique("cli-imp");
    let key = b64e(&[7u8; 32]);
    let out = srv.run(&["key", "import", &imported, &key]).ok();
    assert_eq!(out.trim(), format!("imported key '{imported}'"));
    let chacha = unique("cli-chacha");
    let v = srv
        .run(&[
            "key", "import", "--json", "--cipher", "ChaCha20", &chacha, &key,
        ])
        .json();
    assert_eq!(v, serde_json::json!({"name": chacha, "status": "imported"}));
    let v = srv.run(&["key", "info", "--json", &chacha]).json();
    assert_eq!(v["algorithm"], "ChaCha20");
    srv.run(&["key", "import", "--cipher", "DES", &unique("cli-des"), &key])
        .fails("algorithm 'DES' is not supported");
    srv.run(&["key", "dek", "missing-key"])
        .fails("key does not exist");
    srv.run(&["key", "encrypt", &imported, "x", "--context", "%%"])
        .fails("the context is not valid base64");
    srv.run(&["key", "rm", &chacha]).ok();
    srv.run(&["key", "import", &imported, &b64e(&[1u8; 16])])
        .fails("must be 32 bytes");
    srv.run(&["key", "import", &unique("cli-bad"), "not base64!"])
        .fails("not valid base64");
    let v = srv
        .run(&["key", "encrypt", "--json", &imported, "hello kesh"])
        .json();
    let ct = v["ciphertext"].as_str().unwrap().to_owned();
    // A KES key: the ciphertext is KES's format, so it opens in the host with the raw key.
    let raw = b64d(&ct);
    let parts = kes::parse(&raw).unwrap();
    let derived = kes::derive_soft(Algorithm::Aes256, &[7u8; 32], &parts.iv);
    assert_eq!(
        kes::open(Algorithm::Aes256, &derived, &parts, b"")
            .unwrap()
            .as_slice(),
        b"hello kesh"
    );
    let out = srv.run(&["key", "decrypt", &imported, &ct]).ok();
    assert_eq!(b64d(&out), b"hello kesh");
    let ct_human = srv.run(&["key", "encrypt", &imported, "again"]).ok();
    let v = srv
        .run(&["key", "decrypt", "--json", &imported, ct_human.trim()])
        .json();
    assert_eq!(b64d(v["plaintext"].as_str().unwrap()), b"again");

    // rm
    let out = srv.run(&["key", "rm", &a]).ok();
    assert_eq!(out.trim(), format!("deleted key '{a}'"));
    let v = srv
        .run(&["key", "rm", "--json", &b, &imported])
        .json_lines();
    assert_eq!(v.len(), 2);
    srv.run(&["key", "rm", &a]).fails("key does not exist");
    srv.run(&["key", "info", &b])
        .fails("key does not exist (404)");

    // Usage errors exit non-zero with clap's message on stderr.
    srv.run(&["key", "create"]).fails("required");
    srv.run(&["key", "frobnicate"])
        .fails("unrecognized subcommand");
}

/// `kesh log --error` follows the error stream, in both modes: a keystore whose key directory
/// vanished under it fails every create with a 502, and each failure is an error event.
#[test]
fn error_log_follows_server_errors() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let kek = dir.path().join("kek");
    harness::write_private(&kek, hex::encode([7u8; 32]));
    let srv = Server::start(
        "",
        &format!(
            "  soft:\n    path: {}\n    kek_file: {}\n",
            keys.display(),
            kek.display()
        ),
    );
    srv.run(&["key", "create", &unique("before")]).ok();
    std::fs::remove_dir_all(&keys).unwrap();
    let mut json_child = srv.spawn(&["log", "--error", "--json", "--count", "1"]);
    let mut human_child = srv.spawn(&["log", "--error", "--count", "1"]);
    let mut tries = 0;
    while json_child.try_wait().unwrap().is_none() || human_child.try_wait().unwrap().is_none() {
        assert!(tries < 500, "an error-log subscriber saw no event");
        tries += 1;
        srv.run(&["key", "create", &unique("lost")])
            .fails("failed to create key");
    }
    for child in [json_child, human_child] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains("level=ERROR") && text.contains("failed to create key"),
            "{text}"
        );
    }
}

#[test]
fn policies_identities_status_metrics_logs() {
    let app = ApiKey::generate().unwrap();
    let policy = format!(
        "policy:\n  app:\n    allow:\n    - /v1/key/create/app-*\n    - /v1/key/list/*\n    deny:\n    - /v1/key/create/app-secret*\n    identities:\n    - {}\n",
        app.identity()
    );
    let srv = Server::soft(&policy);
    let ca_str = srv.ca.display().to_string();
    let app_env = [
        ("KES_SERVER", srv.addr.clone()),
        ("KES_API_KEY", app.expose_text().to_string()),
        ("SSL_CERT_FILE", srv.ca.display().to_string()),
    ];
    let app_env: Vec<(&str, &str)> = app_env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // policy ls / info / show
    let v = srv.run(&["policy", "ls", "--json"]).json();
    assert_eq!(v["names"], serde_json::json!(["app"]));
    assert_eq!(srv.run(&["policy", "ls"]).ok(), "Policy\napp\n");
    assert_eq!(srv.run(&["ls", "-p"]).ok(), "Policy\napp\n");
    let v = srv.run(&["policy", "info", "--json", "app"]).json();
    assert_eq!(v["name"], "app");
    let out = srv.run(&["policy", "info", "app"]).ok();
    assert!(
        out.starts_with("Name") && out.contains("Created At"),
        "{out}"
    );
    let v = srv.run(&["policy", "show", "--json", "app"]).json();
    assert!(v["allow"]["/v1/key/create/app-*"].is_object(), "{v}");
    assert!(v["deny"]["/v1/key/create/app-secret*"].is_object(), "{v}");
    let out = srv.run(&["policy", "show", "app"]).ok();
    assert!(
        out.lines()
            .any(|l| l.starts_with("Allow") && l.contains("/v1/key/create/app-*")),
        "{out}"
    );
    srv.run(&["policy", "show", "nope"])
        .fails("policy does not exist");

    // identity ls / info
    let v = srv.run(&["identity", "ls", "--json"]).json();
    let ids = v["identities"].as_array().unwrap();
    assert!(ids.contains(&Value::from(app.identity().as_str())), "{v}");
    assert!(
        ids.contains(&Value::from(srv.admin.identity().as_str())),
        "{v}"
    );
    let out = srv.run(&["identity", "ls"]).ok();
    assert_eq!(out.lines().next(), Some("Identity"), "{out}");
    assert!(
        out.lines().any(|l| l == srv.admin.identity().as_str()),
        "{out}"
    );
    let out = srv.run(&["ls", "-i"]).ok();
    assert!(out.lines().any(|l| l == app.identity().as_str()), "{out}");
    let v = srv.run(&["identity", "info", "--json"]).json();
    assert_eq!(v["identity"], srv.admin.identity().as_str());
    assert_eq!(v["admin"], true);
    let out = srv.run(&["identity", "info"]).ok();
    assert!(out.contains("Admin") && out.contains("yes"), "{out}");
    let v = srv
        .run(&["identity", "info", "--json", app.identity().as_str()])
        .json();
    assert_eq!(v["policy"], "app");
    let out = kesh(&app_env, &["identity", "info"]).ok();
    assert!(
        out.lines()
            .any(|l| l.starts_with("Policy") && l.ends_with("app")),
        "{out}"
    );
    srv.run(&["identity", "info", &"0".repeat(64)])
        .fails("identity does not exist");

    // The policy applies to the CLI: allowed, denied, and the hint on 403.
    let ok_name = unique("app-ok");
    kesh(&app_env, &["key", "create", &ok_name]).ok();
    let err = kesh(&app_env, &["key", "create", &unique("app-secret")])
        .fails("not authorized: insufficient permissions");
    assert!(err.contains("kesh identity info"), "{err}");
    kesh(&app_env, &["key", "rm", &ok_name]).fails("403");
    let v = kesh(&app_env, &["ls", "--json", "app"]).json();
    assert_eq!(v["names"], serde_json::json!([ok_name]));

    // status
    let v = srv.run(&["status", "--json"]).json();
    assert_eq!(v["os"], std::env::consts::OS);
    assert!(v["keystore_latency"].as_u64().unwrap() >= 1, "{v}");
    assert!(v.get("api").is_none());
    let v = srv.run(&["status", "--api", "--json"]).json();
    assert_eq!(v["api"].as_array().unwrap().len(), 26, "{v}");
    let out = srv.run(&["status"]).ok();
    for field in ["Endpoint", "Version", "Uptime", "Keystore  reachable"] {
        assert!(out.contains(field), "{field}: {out}");
    }
    let out = srv.run(&["status", "--api"]).ok();
    assert!(
        out.lines()
            .any(|l| l.starts_with("PUT") && l.contains("/v1/key/create/")),
        "{out}"
    );
    let out = srv.run(&["status", "--short"]).ok();
    assert!(
        out.starts_with(&srv.addr) && out.contains("online"),
        "{out}"
    );
    kesh(&app_env, &["status"]).fails("not authorized");

    // metric: one snapshot, or --count snapshots at --rate.
    let v = srv.run(&["metric", "--json"]).json();
    assert!(v["kes_http_request_success"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["kes_http_request_error"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["kes_http_response_time"].is_object(), "{v}");
    let lines = srv
        .run(&["metric", "--json", "--rate", "10ms", "--count", "2"])
        .json_lines();
    assert_eq!(lines.len(), 2);
    let out = srv.run(&["metric"]).ok();
    assert!(
        out.starts_with("Requests") && out.contains("Latency"),
        "{out}"
    );
    srv.run(&["metric", "--rate", "soon"])
        .fails("not a duration");

    // log: a subscriber sees the audit event of a key the CLI creates.
    let mut json_child = srv.spawn(&["log", "--audit", "--json", "--count", "1"]);
    let mut human_child = srv.spawn(&["log", "--count", "1"]);
    // The subscriptions race the first create: create keys until both subscribers have one.
    let mut created = Vec::new();
    while json_child.try_wait().unwrap().is_none() || human_child.try_wait().unwrap().is_none() {
        assert!(created.len() < 500, "a log subscriber saw no event");
        let n = unique("cli-log");
        srv.run(&["key", "create", &n]).ok();
        created.push(n);
    }
    let out = json_child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    let event: Value = serde_json::from_str(line.trim()).unwrap();
    let path = event["request"]["path"].as_str().unwrap();
    assert!(
        created
            .iter()
            .any(|n| path == format!("/v1/key/create/{n}")),
        "{event}"
    );
    assert_eq!(event["request"]["identity"], srv.admin.identity().as_str());
    assert_eq!(event["response"]["code"], 200);
    // Human: time, status, client address, identity, path, duration on one line.
    let out = human_child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.len(), 6, "{line}");
    assert_eq!(fields[1], "200", "{line}");
    assert_eq!(fields[2], "127.0.0.1", "{line}");
    assert_eq!(fields[3], srv.admin.identity().as_str(), "{line}");
    assert!(fields[4].starts_with("/v1/key/create/cli-log-"), "{line}");
    assert!(fields[5].ends_with("ms"), "{line}");
    kesh(&app_env, &["log", "--error"]).fails("not authorized");
    // Every read command refuses an identity without a policy, on stderr, in both modes.
    let stranger = ApiKey::generate().unwrap().expose_text().to_string();
    let stranger_env = [
        ("KES_SERVER", srv.addr.as_str()),
        ("KES_API_KEY", stranger.as_str()),
        ("SSL_CERT_FILE", ca_str.as_str()),
    ];
    for args in [
        &["key", "ls"][..],
        &["key", "info", "k"],
        &["key", "dek", "k"],
        &["key", "encrypt", "k", "m"],
        &["key", "decrypt", "k", "AAAA"],
        &[
            "key",
            "import",
            "k",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        ],
        &["key", "rm", "k"],
        &["policy", "ls"],
        &["policy", "info", "app"],
        &["policy", "show", "app"],
        &["identity", "ls"],
        &["identity", "info", app.identity().as_str()],
        &["ls", "-i"],
        &["ls", "-p"],
        &["status", "--api"],
        &["metric"],
        &["log"],
    ] {
        for json in [false, true] {
            let mut a = args.to_vec();
            if json {
                a.push("--json");
            }
            kesh(&stranger_env, &a).fails("not authorized: insufficient permissions (403)");
        }
    }
    // Self-describe needs no policy, but a stranger is no identity the server knows.
    kesh(&stranger_env, &["identity", "info"]).fails("identity does not exist");
}

#[test]
fn server_and_credentials_from_the_environment() {
    // A certificate and key file pair made by `kesh identity new`, given a policy.
    let dir = tempfile::tempdir().unwrap();
    let (kp, cp) = (dir.path().join("c.key"), dir.path().join("c.crt"));
    let v = kesh(
        &[],
        &[
            "identity",
            "new",
            "--json",
            "--key",
            kp.to_str().unwrap(),
            "--cert",
            cp.to_str().unwrap(),
        ],
    )
    .json();
    let id = v["identity"].as_str().unwrap().to_owned();
    let (kp, cp) = (kp.to_str().unwrap(), cp.to_str().unwrap());
    let srv = Server::soft(&format!(
        "policy:\n  files:\n    allow: [/v1/key/list/*]\n    identities: [{id}]\n"
    ));
    let addr = srv.addr.as_str();
    let key = srv.admin.expose_text().to_string();
    let ca = srv.ca.display().to_string();
    let down = "127.0.0.1:1";

    // MINIO_KES_SERVER wins over KES_SERVER, which wins over MINIO_KMS_KES_ENDPOINT.
    let base = [
        ("KES_API_KEY", key.as_str()),
        ("SSL_CERT_FILE", ca.as_str()),
    ];
    let ls = |extra: &[(&str, &str)]| kesh(&join(&base, extra), &["key", "ls"]);
    ls(&[("MINIO_KES_SERVER", addr), ("KES_SERVER", down)]).ok();
    ls(&[("MINIO_KES_SERVER", down), ("KES_SERVER", addr)]).fails("is the server running?");
    ls(&[("KES_SERVER", addr), ("MINIO_KMS_KES_ENDPOINT", down)]).ok();
    ls(&[("MINIO_KMS_KES_ENDPOINT", addr)]).ok();
    // A comma-separated list: an unreachable endpoint is skipped.
    let list = format!("{down},https://{addr}");
    ls(&[("KES_SERVER", list.as_str())]).ok();
    // --server overrides the environment.
    kesh(
        &join(&base, &[("KES_SERVER", down)]),
        &["key", "ls", "--server", addr],
    )
    .ok();
    // Default server: 127.0.0.1:7373, which this test's CA never vouches for.
    ls(&[]).fails("127.0.0.1:7373");

    // API key precedence: MINIO_KES_API_KEY over KES_API_KEY over MINIO_KMS_KES_API_KEY.
    let stranger = ApiKey::generate().unwrap().expose_text().to_string();
    let run = |vars: &[(&str, &str)]| {
        let mut env = vec![("KES_SERVER", addr), ("SSL_CERT_FILE", ca.as_str())];
        env.extend_from_slice(vars);
        kesh(&env, &["key", "ls"])
    };
    run(&[("MINIO_KES_API_KEY", &key), ("KES_API_KEY", &stranger)]).ok();
    run(&[("MINIO_KES_API_KEY", &stranger), ("KES_API_KEY", &key)]).fails("not authorized");
    run(&[("KES_API_KEY", &key), ("MINIO_KMS_KES_API_KEY", &stranger)]).ok();
    run(&[("MINIO_KMS_KES_API_KEY", &key)]).ok();
    run(&[("KES_API_KEY", "kes:v1:AAAA")]).fails("invalid API key");
    run(&[]).fails("no credentials");
    // ls -a gives the key on the command line.
    kesh(
        &[("KES_SERVER", addr), ("SSL_CERT_FILE", ca.as_str())],
        &["ls", "-a", &key],
    )
    .ok();

    let files = |k: &'static str, c: &'static str| {
        vec![
            ("KES_SERVER", addr),
            ("SSL_CERT_FILE", ca.as_str()),
            (k, kp),
            (c, cp),
        ]
    };
    // Each variable pair works: the server identifies the certificate and applies its policy.
    let out = kesh(
        &files("KES_CLIENT_KEY", "KES_CLIENT_CERT"),
        &["identity", "info", "--json"],
    );
    assert_eq!(out.json()["identity"], id.as_str());
    assert_eq!(out.json()["policy"], "files");
    kesh(&files("KES_CLIENT_KEY", "KES_CLIENT_CERT"), &["key", "ls"]).ok();
    kesh(&files("KES_CLIENT_KEY", "KES_CLIENT_CERT"), &["status"]).fails("not authorized");
    let out = kesh(
        &files("MINIO_KES_KEY_FILE", "MINIO_KES_CERT_FILE"),
        &["identity", "info", "--json"],
    );
    assert_eq!(out.json()["identity"], id.as_str());
    let out = kesh(
        &files("MINIO_KES_CLIENT_KEY", "MINIO_KES_CLIENT_CERT"),
        &["identity", "info", "--json"],
    );
    assert_eq!(out.json()["identity"], id.as_str());
    let mut both = files("KES_CLIENT_KEY", "KES_CLIENT_CERT");
    both.push(("KES_API_KEY", key.as_str()));
    kesh(&both, &["key", "ls"]).fails("not both");
    kesh(
        &[("KES_SERVER", addr), ("KES_CLIENT_CERT", cp)],
        &["key", "ls"],
    )
    .fails("KES_CLIENT_KEY");
    kesh(
        &[
            ("KES_SERVER", addr),
            ("KES_CLIENT_CERT", cp),
            ("KES_CLIENT_KEY", "/nonexistent/key.pem"),
        ],
        &["key", "ls"],
    )
    .fails("cannot read the client key");

    // Server verification: -k skips it; an unrelated CA fails with the way out.
    kesh(
        &[("KES_SERVER", addr), ("KES_API_KEY", &key)],
        &["key", "ls", "-k"],
    )
    .ok();
    let other = tempfile::tempdir().unwrap();
    let other_ca = write_certs(other.path());
    let err = kesh(
        &[("KES_SERVER", addr), ("KES_API_KEY", &key)],
        &["key", "ls", "--ca", other_ca.to_str().unwrap()],
    )
    .fails("not trusted");
    assert!(err.contains("--insecure"), "{err}");
}

#[test]
fn identity_commands() {
    // No arguments: a fresh API key and its identity, which `identity of` agrees with.
    let out = kesh(&[], &["identity"]).ok();
    let mut lines = out.lines();
    let key = lines
        .next()
        .unwrap()
        .strip_prefix("API Key")
        .unwrap()
        .trim()
        .to_owned();
    let id = lines
        .next()
        .unwrap()
        .strip_prefix("Identity")
        .unwrap()
        .trim()
        .to_owned();
    assert!(key.starts_with("kes:v1:"), "{out}");
    assert_eq!(ApiKey::parse(&key).unwrap().identity().as_str(), id);
    assert_eq!(kesh(&[], &["identity", "of", &key]).ok().trim(), id);
    assert_eq!(kesh(&[], &["identity", &key]).ok().trim(), id);
    let v = kesh(&[], &["identity", "new", "--json"]).json();
    let k = ApiKey::parse(v["api_key"].as_str().unwrap()).unwrap();
    assert_eq!(k.identity().as_str(), v["identity"]);
    let out = kesh(&[], &["identity", "new"]).ok();
    assert!(out.starts_with("API Key   kes:v1:"), "{out}");
    // The §3.3 vector.
    let v = kesh(
        &[],
        &[
            "identity",
            "of",
            "--json",
            "kes:v1:AGaV6VXHasF0FnaB60WdCOeTZ8eTIDikL4zlN16c8NAs",
        ],
    )
    .json();
    assert_eq!(
        v["identity"],
        "ea9826089311fe44d7590408ede9150f7c637b6cab0a91ee6fe1aa5d9fb366f6"
    );
    kesh(&[], &["identity", "of", "kes:v1:AAAA"]).fails("neither a file nor an API key");

    // A server key/certificate pair with SANs.
    let dir = tempfile::tempdir().unwrap();
    let (kp, cp) = (dir.path().join("s.key"), dir.path().join("s.crt"));
    let (ks, cs) = (kp.to_str().unwrap(), cp.to_str().unwrap());
    let out = kesh(
        &[],
        &[
            "identity",
            "new",
            "--key",
            ks,
            "--cert",
            cs,
            "--ip",
            "127.0.0.1",
            "--dns",
            "kesh.local",
            "--expiry",
            "24h",
            "my-server",
        ],
    )
    .ok();
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("Identity"))
        .unwrap()
        .trim()
        .to_owned();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&kp).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let pem = std::fs::read(&cp).unwrap();
    use rustls::pki_types::pem::PemObject as _;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    assert!(kesh::identity::has_dns_or_ip_san(&der).unwrap());
    assert_eq!(
        kesh::identity::Identity::from_certificate(&der)
            .unwrap()
            .as_str(),
        id
    );
    assert_eq!(kesh(&[], &["identity", "of", cs]).ok().trim(), id);
    // The private key file gives back the API key of the same identity.
    let v = kesh(&[], &["identity", "of", "--json", ks]).json();
    assert_eq!(v["identity"], id.as_str());
    assert_eq!(
        ApiKey::parse(v["api_key"].as_str().unwrap())
            .unwrap()
            .identity()
            .as_str(),
        id
    );
    // The pair serves as kesh's own TLS certificate; clients verify it with --ca.
    let srv = Server::start_full("", "  soft: {}\n", &[], Some((&kp, &cp)));
    let key_text = srv.admin.expose_text().to_string();
    let out = kesh(
        &[
            ("KES_SERVER", srv.addr.as_str()),
            ("KES_API_KEY", key_text.as_str()),
        ],
        &["status", "--short", "--ca", cs],
    )
    .ok();
    assert!(out.contains("online"), "{out}");
    drop(srv);
    // No overwriting without -f.
    kesh(&[], &["identity", "new", "--key", ks, "--cert", cs]).fails("already exists");
    let v = kesh(
        &[],
        &["identity", "new", "-f", "--json", "--key", ks, "--cert", cs],
    )
    .json();
    assert_ne!(v["identity"], id.as_str());
    kesh(&[], &["identity", "new", "--key", ks]).fails("--cert");
    kesh(
        &[],
        &[
            "identity", "new", "-f", "--key", ks, "--cert", cs, "--expiry", "soon",
        ],
    )
    .fails("not a duration");
}

#[test]
fn completion_scripts() {
    for shell in ["bash", "zsh", "fish"] {
        let out = kesh(&[], &["completion", shell]).ok();
        for word in ["kesh", "migrate", "identity", "probe"] {
            assert!(out.contains(word), "{shell}: {word}");
        }
    }
    kesh(&[], &["completion", "tcsh"]).fails("invalid value");
    let out = kesh(&[], &["--help"]).ok();
    assert!(
        out.contains("KES_SERVER") && out.contains("KES_API_KEY"),
        "{out}"
    );
}

/// Writes a KES `fs` key directory and its KES config; returns the config path.
fn kes_layout(dir: &Path, files: &[(&str, &[u8])]) -> PathBuf {
    let keys = dir.join("kes-keys");
    std::fs::create_dir_all(&keys).unwrap();
    for (name, value) in files {
        std::fs::write(keys.join(name), value).unwrap();
    }
    let config = dir.join("kes.yaml");
    std::fs::write(
        &config,
        "address: 0.0.0.0:7373\nadmin:\n  identity: ${KES_TEST_UNSET_ADMIN}\ntls:\n  key: k.pem\n  cert: c.pem\nkeystore:\n  fs:\n    path: ${KES_TEST_KEY_DIR}\n",
    )
    .unwrap();
    config
}

/// The §7.4 test vector: a KES key file as KES writes it.
pub(crate) const KES_VECTOR: &str = "CiQKIMiHG7XrN94FuwblJJor4f7f6rbqAl7DwsLaiIoyz0D2EAESJAognLXl4yqa4cjZTcSbsU6sNnN8kP9ARWkXwa20YQZa9HgQARoMCNithK0GEID67qYDIkAzZWNmY2RmMzhmY2JlMTQxYWUyNmExMDMwZjgxZTk2Yjc1MzM2NWE0Njc2MGFlNmI1Nzg2OThhOTdjNTlmZDIy";

/// Seals `plaintext` in KES's format with a raw key, as KES did before the migration.
fn kes_seal(key: &[u8; 32], plaintext: &[u8], context: &[u8]) -> String {
    let iv: [u8; 16] = *kesh::secret::random::<16>().unwrap();
    let nonce: [u8; 12] = *kesh::secret::random::<12>().unwrap();
    let derived = kes::derive_soft(Algorithm::Aes256, key, &iv);
    b64e(&kes::seal(
        Algorithm::Aes256,
        &derived,
        &iv,
        &nonce,
        plaintext,
        context,
    ))
}

#[test]
fn migrate_from_kes_to_softhsm() {
    // Only this test's child processes use the `migrate` token.
    let token = harness::tokens().migrate.clone();
    let dir = tempfile::tempdir().unwrap();
    let suffix = unique("m");
    let (vector, proto, legacy, corrupt, bad_name) = (
        format!("vec-{suffix}"),
        format!("proto-{suffix}"),
        format!("legacy-{suffix}"),
        format!("corrupt-{suffix}"),
        format!("bad.name-{suffix}"),
    );
    let vector_key: [u8; 32] = b64d("yIcbtes33gW7BuUkmivh/t/qtuoCXsPCwtqIijLPQPY=")
        .try_into()
        .unwrap();
    let proto_key = [0x11u8; 32];
    let proto_hmac = [0x22u8; 32];
    let legacy_key = [0x33u8; 32];
    let created = time::macros::datetime!(2023-05-06 07:08:09.123456 UTC);
    let proto_value = kes_key::encode(
        &proto_key,
        Algorithm::Aes256,
        &proto_hmac,
        created,
        "creator-id",
    );
    let legacy_value = format!(
        "{{\"bytes\":\"{}\",\"algorithm\":\"AES256-GCM_SHA256\",\"created_at\":\"2019-01-02T03:04:05Z\",\"created_by\":\"old-admin\"}}",
        b64e(&legacy_key)
    );
    let kes_config = kes_layout(
        dir.path(),
        &[
            (&vector, KES_VECTOR.as_bytes()),
            (&proto, proto_value.as_bytes()),
            (&legacy, legacy_value.as_bytes()),
            (&corrupt, b"CiQKIMiHG7XrN94Fuwbl"),
            (&bad_name, KES_VECTOR.as_bytes()),
        ],
    );
    let key_dir = dir.path().join("kes-keys");
    let keystore = format!(
        "  pkcs11:\n    module: {}\n    token: {}\n    pin: ${{KESH_TEST_PIN}}\n    profile: softhsm\n",
        token.module.display(),
        token.label
    );
    let kesh_config = dir.path().join("kesh.yaml");
    // Variables outside `keystore:` need not be set to migrate.
    std::fs::write(
        &kesh_config,
        format!("admin:\n  identity: ${{KESH_TEST_UNSET_ADMIN}}\nkeystore:\n{keystore}"),
    )
    .unwrap();

    // Ciphertexts KES produced before the migration.
    let ctx = b"{\"bucket\":\"photos\",\"object\":\"cat.jpg\"}";
    let sealed = [
        (&vector, kes_seal(&vector_key, b"vector secret", ctx)),
        (&proto, kes_seal(&proto_key, b"proto secret", ctx)),
        (&legacy, kes_seal(&legacy_key, b"legacy secret", ctx)),
    ];

    let pin = token.pin().expose().to_owned();
    let key_dir_s = key_dir.display().to_string();
    let env = [
        ("KESH_TEST_PIN", pin.as_str()),
        ("KES_TEST_KEY_DIR", key_dir_s.as_str()),
    ];
    let migrate = |extra: &[&str]| {
        let mut args = vec![
            "migrate",
            "--from",
            kes_config.to_str().unwrap(),
            "--to",
            kesh_config.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        kesh(&env, &args)
    };

    // First run: three imported, the corrupt file and the bad name reported, exit non-zero.
    let run = migrate(&["--json"]);
    assert!(!run.out.status.success());
    assert!(
        run.stderr().contains("2 of 5 keys failed"),
        "{}",
        run.stderr()
    );
    let report: Value = serde_json::from_str(run.stdout().trim()).unwrap();
    assert_eq!(report["imported"], 3, "{report}");
    assert_eq!(report["failed"], 2, "{report}");
    let outcome = |r: &Value, name: &str| -> Value {
        r["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in {r}"))
            .clone()
    };
    for n in [&vector, &proto, &legacy] {
        assert_eq!(outcome(&report, n)["outcome"], "imported", "{report}");
    }
    let c = outcome(&report, &corrupt);
    assert_eq!(c["outcome"], "failed");
    assert!(
        c["error"]
            .as_str()
            .unwrap()
            .contains("invalid KES key value"),
        "{c}"
    );
    assert!(outcome(&report, &bad_name)["error"]
        .as_str()
        .unwrap()
        .contains("not a valid key name"));
    // No key material in the report or on stderr.
    for secret in [b64e(&vector_key), b64e(&proto_key), b64e(&legacy_key)] {
        assert!(!run.stdout().contains(&secret) && !run.stderr().contains(&secret));
    }

    // Without --merge or --force, existing keys are refused and left alone.
    let run = migrate(&[]);
    assert!(!run.out.status.success());
    assert!(
        run.stdout().contains("already exists; use --merge"),
        "{}",
        run.stdout()
    );
    assert!(
        run.stderr().contains("5 of 5 keys failed to migrate") && run.stderr().contains("--merge"),
        "{}",
        run.stderr()
    );

    // Fix the corrupt file and rerun with --merge: idempotent for the rest.
    std::fs::remove_file(key_dir.join(&bad_name)).unwrap();
    std::fs::write(key_dir.join(&corrupt), KES_VECTOR).unwrap();
    let report = migrate(&["--merge", "--json"]).json();
    assert_eq!(report["imported"], 1, "{report}");
    assert_eq!(report["skipped"], 3, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(outcome(&report, &vector)["reason"], "already migrated");
    let out = migrate(&["--merge"]).ok();
    assert!(out.contains("0 imported, 4 skipped, 0 failed"), "{out}");

    // A different key under an existing name: --merge refuses, --force replaces.
    let replacement = [0x44u8; 32];
    std::fs::write(
        key_dir.join(&proto),
        kes_key::encode(&replacement, Algorithm::Aes256, &proto_hmac, created, "x"),
    )
    .unwrap();
    let run = migrate(&["--merge", "--json"]);
    assert!(!run.out.status.success());
    let report: Value = serde_json::from_str(run.stdout().trim()).unwrap();
    assert!(outcome(&report, &proto)["error"]
        .as_str()
        .unwrap()
        .contains("--force"));
    // Put the original back, then force: every key is replaced by the same key.
    std::fs::write(key_dir.join(&proto), &proto_value).unwrap();
    let report = migrate(&["--force", "--json"]).json();
    assert_eq!(report["imported"], 4, "{report}");
    assert_eq!(outcome(&report, &proto)["replaced"], true, "{report}");

    // Serve the migrated keys: every KES ciphertext decrypts; provenance survives.
    let srv = Server::start_env("", &keystore, &[("KESH_TEST_PIN", &pin)]);
    let ctx_b64 = b64e(ctx);
    for (name, ct) in &sealed {
        let v = srv
            .run(&["key", "decrypt", "--json", name, ct, &ctx_b64])
            .json();
        let pt = b64d(v["plaintext"].as_str().unwrap());
        assert!(pt.ends_with(b" secret"), "{name}");
    }
    let v = srv.run(&["key", "info", "--json", &proto]).json();
    assert_eq!(v["created_by"], "creator-id");
    assert_eq!(v["created_at"], "2023-05-06T07:08:09.123456Z");
    let v = srv.run(&["key", "info", "--json", &vector]).json();
    assert_eq!(v["created_at"], "2024-01-12T10:39:20.886816Z");
    let v = srv.run(&["key", "info", "--json", &legacy]).json();
    assert_eq!(v["created_by"], "old-admin");
    // New data keys under a migrated key are KES-format and open with the KES key.
    let v = srv.run(&["key", "dek", "--json", &proto, &ctx_b64]).json();
    let ct = b64d(v["ciphertext"].as_str().unwrap());
    let parts = kes::parse(&ct).unwrap();
    let derived = kes::derive_soft(Algorithm::Aes256, &proto_key, &parts.iv);
    assert_eq!(
        kes::open(Algorithm::Aes256, &derived, &parts, ctx)
            .unwrap()
            .as_slice(),
        b64d(v["plaintext"].as_str().unwrap()).as_slice()
    );
    for n in [&vector, &proto, &legacy, &corrupt] {
        srv.run(&["key", "rm", n]).ok();
    }

    // ChaCha20 keys: an HSM cannot hold them (reported, the run exits non-zero); the embedded
    // keystore can, and their KES ciphertexts decrypt there.
    let chacha_dir = dir.path().join("chacha");
    let chacha = format!("chacha-{suffix}");
    let chacha_key = [0x55u8; 32];
    let chacha_config = kes_layout(
        &chacha_dir,
        &[(
            &chacha,
            kes_key::encode(&chacha_key, Algorithm::ChaCha20, &proto_hmac, created, "c").as_bytes(),
        )],
    );
    let chacha_keys = chacha_dir.join("kes-keys").display().to_string();
    let args = |to: &Path| {
        vec![
            "migrate".to_owned(),
            "--json".to_owned(),
            "--from".to_owned(),
            chacha_config.display().to_string(),
            "--to".to_owned(),
            to.display().to_string(),
        ]
    };
    let run_chacha = |to: &Path| {
        let a = args(to);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        kesh(
            &[
                ("KESH_TEST_PIN", pin.as_str()),
                ("KES_TEST_KEY_DIR", chacha_keys.as_str()),
            ],
            &a,
        )
    };
    let run = run_chacha(&kesh_config);
    assert!(!run.out.status.success());
    let report: Value = serde_json::from_str(run.stdout().trim()).unwrap();
    assert!(
        outcome(&report, &chacha)["error"]
            .as_str()
            .unwrap()
            .contains("ChaCha20"),
        "{report}"
    );
    let soft_config = chacha_dir.join("soft.yaml");
    harness::write_private(&chacha_dir.join("kek"), b64e(&[0x66u8; 32]));
    std::fs::write(
        &soft_config,
        format!(
            "keystore:\n  soft:\n    path: {0}/soft-keys\n    kek_file: {0}/kek\n",
            chacha_dir.display()
        ),
    )
    .unwrap();
    let report = run_chacha(&soft_config).json();
    assert_eq!(outcome(&report, &chacha)["outcome"], "imported", "{report}");
    let store = kesh::keystore::soft::SoftKeyStore::open_dir(
        &chacha_dir.join("soft-keys"),
        &chacha_dir.join("kek"),
    )
    .unwrap();
    let iv = [3u8; 16];
    let nonce = [4u8; 12];
    let derived = kes::derive_soft(Algorithm::ChaCha20, &chacha_key, &iv);
    let ct = kes::seal(Algorithm::ChaCha20, &derived, &iv, &nonce, b"xchacha", ctx);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let name = kesh::name::KeyName::new(&chacha).unwrap();
    let pt = rt
        .block_on(kesh::keystore::KeyStore::decrypt(&store, &name, &ct, ctx))
        .unwrap();
    assert_eq!(pt.as_slice(), b"xchacha");

    // Errors that stop the run before any key: a KES keystore kesh does not read, a Vault
    // keystore without a way to log in, a missing directory.
    let aws = dir.path().join("aws.yaml");
    std::fs::write(
        &aws,
        "keystore:\n  aws:\n    secretsmanager:\n      region: us-east-1\n",
    )
    .unwrap();
    let vault = dir.path().join("vault.yaml");
    std::fs::write(
        &vault,
        "keystore:\n  vault:\n    endpoint: https://127.0.0.1:8200\n",
    )
    .unwrap();
    for (from, needle) in [
        (&aws, "kesh migrate reads KES's `fs` and `vault` keystores"),
        (&vault, "export VAULT_TOKEN"),
    ] {
        kesh(
            &[("KESH_TEST_PIN", pin.as_str())],
            &[
                "migrate",
                "--from",
                from.to_str().unwrap(),
                "--to",
                kesh_config.to_str().unwrap(),
            ],
        )
        .fails(needle);
    }
    kesh(
        &[
            ("KESH_TEST_PIN", pin.as_str()),
            ("KES_TEST_KEY_DIR", "/nonexistent/kes"),
        ],
        &[
            "migrate",
            "--from",
            kes_config.to_str().unwrap(),
            "--to",
            kesh_config.to_str().unwrap(),
        ],
    )
    .fails("cannot read the KES key directory");
    kesh(
        &[("KES_TEST_KEY_DIR", key_dir_s.as_str())],
        &[
            "migrate",
            "--from",
            kes_config.to_str().unwrap(),
            "--to",
            kesh_config.to_str().unwrap(),
        ],
    )
    .fails("KESH_TEST_PIN");
}

#[test]
fn hsm_probe_on_softhsm() {
    let token = harness::tokens().probe.clone();
    let pin = token.pin().expose().to_owned();
    let module = token.module.display().to_string();
    let env = [("KESH_PROBE_PIN", pin.as_str())];

    let run = kesh(
        &env,
        &[
            "hsm",
            "probe",
            "--module",
            &module,
            "--token",
            &token.label,
            "--pin-env",
            "KESH_PROBE_PIN",
        ],
    );
    let out = run.ok();
    for line in [
        "gcm        yes (CKM_AES_GCM)",
        "kwp        yes (CKM_AES_KEY_WRAP_PAD)",
        "kes        yes (CKM_SHA256_HMAC)",
        "GCM IVs    from the caller",
        "Logged in  yes",
    ] {
        assert!(
            out.lines().any(|l| l == line || l.starts_with(line)),
            "{line}: {out}"
        );
    }
    assert!(
        out.contains(&format!("    token: {}\n", token.label)),
        "{out}"
    );
    assert!(out.contains("    scheme: gcm\n    iv: caller\n"), "{out}");

    // The same through --config, as JSON; the recommended section parses as a keystore.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kesh.yaml");
    std::fs::write(
        &config,
        format!(
            "keystore:\n  pkcs11:\n    module: {module}\n    token: {}\n    pin: ${{KESH_PROBE_PIN}}\n",
            token.label
        ),
    )
    .unwrap();
    let v = kesh(
        &env,
        &[
            "hsm",
            "probe",
            "--json",
            "--config",
            config.to_str().unwrap(),
        ],
    )
    .json();
    let t = &v["token"];
    assert_eq!(t["label"], token.label.as_str());
    for s in t["schemes"].as_array().unwrap() {
        assert_eq!(s["supported"], true, "{s}");
        assert_eq!(s["listed"], true, "{s}");
    }
    assert_eq!(t["gcm_iv"], "caller");
    assert_eq!(t["recommended_scheme"], "gcm");
    assert!(v["slots"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["token"]["label"] == token.label.as_str()));
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(t["recommended_config"].as_str().unwrap()).unwrap();
    let section = yaml.get("keystore").unwrap();
    let mut section = section.clone();
    section["pkcs11"]["pin"] = serde_yaml::Value::from("x");
    assert!(kesh::config::keystore::KeystoreConfig::from_value(&section).is_ok());

    // Without a token: the slot list and what to add.
    let out = kesh(&[], &["hsm", "probe", "--module", &module]).ok();
    assert!(
        out.contains(&token.label) && out.contains("--pin-env"),
        "{out}"
    );
    // Errors that say what to do.
    kesh(
        &[],
        &["hsm", "probe", "--module", "/nonexistent/libpkcs11.so"],
    )
    .fails("cannot load the PKCS#11 module");
    kesh(
        &[],
        &["hsm", "probe", "--module", &module, "--token", &token.label],
    )
    .fails("--pin-env");
    kesh(
        &[("KESH_PROBE_PIN", "wrong-pin")],
        &[
            "hsm",
            "probe",
            "--module",
            &module,
            "--token",
            &token.label,
            "--pin-env",
            "KESH_PROBE_PIN",
        ],
    )
    .fails("check the PIN");
    kesh(
        &env,
        &[
            "hsm",
            "probe",
            "--module",
            &module,
            "--token",
            "no-such-token",
            "--pin-env",
            "KESH_PROBE_PIN",
        ],
    )
    .fails("no initialized token");
}
