//! Each vendor profile in `hsm-config/profiles/` against its vendor personality of the fault
//! shim (`softhsm-tests/fault-shim/src/personality.rs`, which cites the vendor documents): a
//! `kesh server` with the profile's keystore settings, the module replaced by the shim and the
//! token by a test token, runs create, generate, decrypt, import, delete, restart and
//! recovery. Every (personality × operation × scheme) is reported as pass, fail or
//! unsupported-by-design; the test fails on any result other than the expected one, so the
//! conformance matrix in the README cannot drift from what kesh does.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kesh::client::Client;
use kesh::keystore::pkcs11::ephemeral::EphemeralToken;
use kesh::keystore::Scheme;

use crate::harness::{self, server, ServerProcess};

/// What the server's log must name when a create is refused by design: the call and code the
/// vendor documents.
fn refusal_marker(profile: &str) -> Option<&'static str> {
    match profile {
        "cloudhsm" => Some("SetAttributeValue returned FunctionNotSupported"),
        "yubihsm" => Some("GenerateKey returned TemplateInconsistent"),
        _ => None,
    }
}

/// What a profile is expected to do against its personality, and why not where it cannot.
fn expected(profile: &str, op: &str) -> Result<(), &'static str> {
    match (profile, op) {
        // AWS lists no C_SetAttributeValue for Client SDK 5: kesh's create commit (pending →
        // ready in CKA_ID) cannot run, so keys must be made out of band. Keys already on the
        // token (provisioned here as kesh would have written them) are served.
        ("cloudhsm", "create" | "import") => Err(
            "no C_SetAttributeValue in AWS CloudHSM Client SDK 5: kesh's create commit cannot run",
        ),
        // Yubico's module refuses CKK_GENERIC_SECRET HMAC keys and CKA_ALLOWED_MECHANISMS, so
        // no kes key (the only scheme without GCM or KWP) can be created, and there is no
        // key to run the rest on.
        ("yubihsm", "create" | "import") => Err(
            "yubihsm_pkcs11 refuses CKK_GENERIC_SECRET and CKA_ALLOWED_MECHANISMS in key templates",
        ),
        ("yubihsm", _) => Err("no key can be created on this module"),
        _ => Ok(()),
    }
}

/// Marks a refusal the server did not explain: wrong even where a refusal is expected.
const UNEXPLAINED: &str = "unexplained refusal:";

const OPS: [&str; 7] = [
    "create", "generate", "decrypt", "import", "restart", "recovery", "delete",
];

/// A profile's keystore settings, from its YAML in `hsm-config/profiles/`.
fn profile_keystore(profile: &str) -> serde_yaml::Mapping {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("hsm-config/profiles")
        .join(format!("{profile}.yaml"));
    let text = std::fs::read_to_string(&path).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    doc["keystore"]["pkcs11"].as_mapping().unwrap().clone()
}

/// A `kesh server` with one profile's settings on the shim in that vendor's personality;
/// restartable on the same token and configuration.
struct Persona {
    profile: &'static str,
    srv: ServerProcess,
}

impl Persona {
    fn new(profile: &'static str, token: &Arc<EphemeralToken>) -> Self {
        let srv = server()
            .pkcs11(token)
            .pkcs11_settings(profile_keystore(profile))
            .fault_shim("")
            .shim_personality(profile)
            .prepare();
        Persona { profile, srv }
    }

    /// Starts the server; `Err` holds its stderr when it exits without serving.
    fn start(&mut self) -> Result<Client, String> {
        self.srv.start()?;
        // The shim answered as the vendor's module: its C_GetInfo manufacturer is what kesh
        // names the keystore by.
        let maker = kesh_fault_shim_manufacturer(self.profile);
        if !self.srv.keystore_line.contains(maker) {
            self.srv.stop();
            return Err(format!(
                "banner keystore line {:?} lacks {maker:?}",
                self.srv.keystore_line
            ));
        }
        Ok(self.srv.client())
    }

    fn stop(&mut self) {
        self.srv.stop();
    }

    fn stderr(&self) -> String {
        self.srv.stderr()
    }

    fn inject(&self, rules: &str) {
        self.srv.inject(rules);
    }
}

/// The library manufacturer each personality reports (the shim's `VENDOR_IDS`).
fn kesh_fault_shim_manufacturer(profile: &str) -> &'static str {
    match profile {
        "luna" => "SafeNet, Inc.",
        "nshield" => "nCipher Corp. Ltd",
        "cloudhsm" => "Amazon Web Services",
        "yubihsm" => "Yubico (www.yubico.com)",
        "utimaco" => "Utimaco IS GmbH",
        other => panic!("no personality {other}"),
    }
}

/// One operation's result: `Ok` passed, `Err` why not.
type Step = Result<(), String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A DEK under `key` that decrypts to what was generated.
async fn generate_and_decrypt(c: &Client, key: &str) -> (Step, Step, Option<(Vec<u8>, Vec<u8>)>) {
    let dek = match c.generate_key(key, b"persona").await {
        Ok(d) => d,
        Err(e) => return (Err(err(e)), Err("no DEK".into()), None),
    };
    let (pt, ct) = (dek.plaintext.0.to_vec(), dek.ciphertext.0.to_vec());
    let dec = match c.decrypt(key, &ct, b"persona").await {
        Ok(p) if p.0[..] == pt[..] => Ok(()),
        Ok(_) => Err("decrypted to other bytes".into()),
        Err(e) => Err(err(e)),
    };
    (Ok(()), dec, Some((pt, ct)))
}

async fn decrypts(c: &Client, key: &str, dek: &(Vec<u8>, Vec<u8>)) -> Step {
    match c.decrypt(key, &dek.1, b"persona").await {
        Ok(p) if p.0[..] == dek.0[..] => Ok(()),
        Ok(_) => Err("decrypted to other bytes".into()),
        Err(e) => Err(err(e)),
    }
}

/// Runs every operation for `profile`; returns (operation, scheme, result) rows.
async fn run(profile: &'static str) -> Vec<(&'static str, Scheme, Step)> {
    let token = harness::tokens().personalities[profile].clone();
    let scheme = kesh::keystore::pkcs11::profile::by_name(profile)
        .unwrap()
        .scheme;
    let mut rows = Vec::new();
    let tag = format!("{profile}-{}", std::process::id());
    let created = format!("persona-{tag}");
    let provisioned = format!("persona-prov-{tag}");
    let imported = format!("persona-imp-{tag}");
    // Keys a module cannot create may be made out of band (e.g. by the vendor's tool); one is
    // provisioned in kesh's layout so the other operations still run against the module.
    let provision = expected(profile, "create").is_err() && scheme == Scheme::Gcm;
    if provision {
        harness::write_ready_keys(&token, [provisioned.clone()]);
    }
    let mut srv = Persona::new(profile, &token);
    let started = Instant::now();
    let c = match srv.start() {
        Ok(c) => c,
        Err(log) => {
            for op in OPS {
                rows.push((op, scheme, Err(format!("server did not start: {log}"))));
            }
            return rows;
        }
    };

    let create = c.create_key(&created).await.map_err(err);
    let create = match create {
        // A refusal must be explained in the server's log, not only answered with a 502, and
        // be the one the vendor documents.
        Err(e) => {
            let log = srv.stderr();
            let why = refusal_marker(profile).unwrap_or("(no refusal expected)");
            if log.contains("cannot hold keys in kesh's layout") && log.contains(why) {
                Err(e)
            } else {
                Err(format!(
                    "{UNEXPLAINED} {e}; the log does not name {why:?}:\n{log}"
                ))
            }
        }
        ok => ok,
    };
    let key = match (&create, provision) {
        (Ok(()), _) => Some(created.clone()),
        (Err(_), true) => Some(provisioned.clone()),
        (Err(_), false) => None,
    };
    rows.push(("create", scheme, create));

    let no_key = || Err::<(), String>("no key to run it on".into());
    let mut dek = None;
    match &key {
        Some(k) => {
            let (g, d, made) = generate_and_decrypt(&c, k).await;
            rows.push(("generate", scheme, g));
            rows.push(("decrypt", scheme, d));
            dek = made;
        }
        None => {
            rows.push(("generate", scheme, no_key()));
            rows.push(("decrypt", scheme, no_key()));
        }
    }

    // KES keys come in as the kes scheme, on every profile.
    let mut imported_dek = None;
    let import = match c.import_key(&imported, &[7u8; 32], "AES256").await {
        Ok(()) => {
            let (g, d, made) = generate_and_decrypt(&c, &imported).await;
            imported_dek = made;
            g.and(d)
        }
        Err(e) => Err(err(e)),
    };
    rows.push(("import", Scheme::Kes, import));

    // Restart: a new process on the same token serves the old DEKs.
    srv.stop();
    let c = match srv.start() {
        Ok(c) => c,
        Err(log) => {
            for op in ["restart", "recovery", "delete"] {
                rows.push((op, scheme, Err(format!("restart failed: {log}"))));
            }
            return rows;
        }
    };
    let restart = match (&key, &dek) {
        (Some(k), Some(d)) => {
            let mut r = decrypts(&c, k, d).await;
            if let Some(i) = &imported_dek {
                r = r.and(decrypts(&c, &imported, i).await);
            }
            r
        }
        _ => no_key(),
    };
    rows.push(("restart", scheme, restart));

    // Recovery: one device error on the next seal; kesh recovers by itself and the old DEK
    // still decrypts.
    let recovery = match (&key, &dek) {
        (Some(k), Some(d)) => {
            srv.inject("fail CKR_DEVICE_ERROR C_Encrypt,C_Sign count=1\n");
            let failed = c.generate_key(k, b"persona").await;
            let t = Instant::now();
            let mut back = Err("not served again within 20 s".to_owned());
            while t.elapsed() < Duration::from_secs(20) {
                if c.generate_key(k, b"persona").await.is_ok() {
                    back = Ok(());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            match failed {
                Ok(_) => Err("the injected device error did not reach the request".into()),
                Err(_) => back.and(decrypts(&c, k, d).await),
            }
        }
        _ => no_key(),
    };
    rows.push(("recovery", scheme, recovery));

    let delete = match &key {
        Some(k) => match c.delete_key(k).await {
            Ok(()) => match c.describe_key(k).await {
                Err(e) if e.api().is_some_and(|a| a.status == 404) => Ok(()),
                Err(e) => Err(format!("describe after delete: {e}")),
                Ok(_) => Err("still described after delete".into()),
            },
            Err(e) => Err(err(e)),
        },
        None => no_key(),
    };
    rows.push(("delete", scheme, delete));
    harness::report(&format!(
        "personalities: {profile}: all operations in {:?}",
        started.elapsed()
    ));
    rows
}

/// Reports every row and fails on any that differs from [`expected`].
async fn conformance(profile: &'static str) {
    let rows = run(profile).await;
    let mut wrong = Vec::new();
    for (op, scheme, result) in &rows {
        let line = match (expected(profile, op), result) {
            (Ok(()), Ok(())) => "pass".to_owned(),
            (Err(_), Err(e)) if e.starts_with(UNEXPLAINED) => {
                wrong.push(format!("{op}: {e}"));
                format!("FAIL ({e})")
            }
            (Err(why), Err(_)) => format!("unsupported-by-design ({why})"),
            (Ok(()), Err(e)) => {
                wrong.push(format!("{op}: {e}"));
                format!("FAIL ({e})")
            }
            (Err(why), Ok(())) => {
                wrong.push(format!("{op}: expected unsupported ({why}) but it passed"));
                "FAIL (passed where the matrix says unsupported: update it)".to_owned()
            }
        };
        // A row of the conformance matrix (softhsm-tests/conformance-matrix).
        harness::report(&format!(
            "conformance | {profile} (emulated) | {scheme} | {op} | {line}"
        ));
    }
    assert_eq!(rows.len(), OPS.len(), "{rows:?}");
    assert!(wrong.is_empty(), "{profile}: {wrong:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn luna() {
    conformance("luna").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nshield() {
    conformance("nshield").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudhsm() {
    conformance("cloudhsm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yubihsm() {
    conformance("yubihsm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn utimaco() {
    conformance("utimaco").await;
}

/// Every vendor profile has a personality and a test above, and no test lacks its profile.
#[test]
fn every_profile_has_a_personality() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("hsm-config/profiles");
    let mut profiles: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".yaml").map(str::to_owned)
        })
        // The software tokens the suite loads for real need no emulation.
        .filter(|p| p != "softhsm" && p != "kryoptic")
        .collect();
    profiles.sort();
    assert_eq!(profiles, harness::PERSONALITIES.map(str::to_owned));
    for p in &profiles {
        assert!(
            kesh::keystore::pkcs11::profile::by_name(p).is_some(),
            "{p}: no PROFILES entry"
        );
    }
}
