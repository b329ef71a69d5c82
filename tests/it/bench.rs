//! `kesh bench` against a `kesh server` child, over HTTP/2 and HTTP/1.1: it runs, checks every
//! answer and reports a consistent JSON record. Functional only: nothing here is timed.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use kesh::identity::ApiKey;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_kesh");

/// A `kesh server` on the soft keystore with a self-signed certificate; killed on drop.
struct Server {
    child: Child,
    addr: String,
    admin: ApiKey,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        let admin = ApiKey::generate().unwrap();
        let config = dir.path().join("kesh.yaml");
        std::fs::write(
            &config,
            format!(
                "address: 127.0.0.1:0\nadmin:\n  identity: {}\ntls:\n  key: {d}/key.pem\n  cert: {d}/cert.pem\nkeystore:\n  soft: {{}}\n",
                admin.identity(),
                d = dir.path().display()
            ),
        )
        .unwrap();
        let mut child = Command::new(BIN)
            .args(["server", "--config", config.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addr = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("API         · https://") {
                addr = Some(rest.trim().to_owned());
            } else if line.contains("Server is up and running") {
                break;
            }
        }
        // Audit records go to stdout: keep draining so the server never blocks on the pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            addr: addr.expect("the server printed its address"),
            admin,
            _dir: dir,
        }
    }

    /// `kesh bench --json <args>` as the admin; the parsed record.
    fn bench(&self, args: &[&str]) -> Value {
        let pid = self.child.id().to_string();
        let out = Command::new(BIN)
            .args([
                "bench", "--json", "-k", "--server", &self.addr, "--pid", &pid,
            ])
            .args(["--duration", "1500ms", "--warmup", "200ms"])
            .args(args)
            .env("KES_API_KEY", &*self.admin.expose_text())
            .env_remove("KES_SERVER")
            .env_remove("MINIO_KES_SERVER")
            .env_remove("MINIO_KES_API_KEY")
            .stdin(Stdio::null())
            .output()
            .expect("run kesh bench");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "kesh bench {args:?} failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    }
}

fn check(record: &Value, op: &str, proto: &str, connections: u64, concurrency: u64) {
    let f = |k: &str| {
        record[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {record}"))
    };
    assert_eq!(record["op"], op, "{record}");
    assert_eq!(record["proto"], proto, "{record}");
    assert_eq!(record["connections"], connections, "{record}");
    assert_eq!(record["concurrency"], concurrency, "{record}");
    assert!(record["ops"].as_u64().unwrap() > 0, "{record}");
    assert_eq!(record["errors"], 0, "{record}");
    assert!(record["first_error"].is_null(), "{record}");
    assert!(f("ops_per_sec") > 0.0, "{record}");
    let (p50, p90, p99, max) = (f("p50_us"), f("p90_us"), f("p99_us"), f("max_us"));
    assert!(
        0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= max,
        "percentiles out of order: {record}"
    );
    let server = &record["server"];
    assert!(server["rss_kb"].as_u64().unwrap() > 0, "{record}");
    assert!(server["cpu_us_per_op"].as_f64().unwrap() >= 0.0, "{record}");
}

#[test]
fn bench_over_h2_and_http1() {
    let server = Server::start();
    let key = format!("bench-{}", std::process::id());
    let r = server.bench(&["--op", "generate", "-c", "4", "--key", &key]);
    check(&r, "generate", "h2", 1, 4);
    let r = server.bench(&["--op", "decrypt", "-c", "3", "--key", &key]);
    check(&r, "decrypt", "h2", 1, 3);
    let r = server.bench(&[
        "--op", "mixed", "-c", "4", "--key", &key, "--http1", "--conns", "2",
    ]);
    check(&r, "mixed", "http1", 2, 4);
    let r = server.bench(&["--op", "describe", "-c", "2", "--key", &key, "--http1"]);
    check(&r, "describe", "http1", 2, 2);
}
