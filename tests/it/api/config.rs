//! The server from its config file and as a process: reloads (in process and on SIGHUP),
//! refused backends, and `kesh server --dev`.

use kesh::server::audit::{AuditLog, ErrorLog};
use kesh::server::metrics::Metrics;
use kesh::server::routes::RouteSettings;
use kesh::server::service::Service;
use kesh::server::ServerParts;

use super::*;

/// A config file drives the server; editing it and reloading (what SIGHUP runs) swaps the
/// policies without restarting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_and_reload() {
    let (creds, id) = client_cert(&rcgen::PKCS_ED25519);
    let policy = |allow: &str| {
        format!("policy:\n  app:\n    allow:\n    - {allow}\n    identities:\n    - {id}\nkeys:\n  - name: predefined-key\n")
    };
    // The files a `kesh server` child would get, served in this process instead.
    let files = server().config(&policy("/v1/key/list/*")).prepare();
    let admin = &files.admin;
    let cfg = ServerConfig::load(&files.config_path()).unwrap();
    assert_eq!(cfg.admin, admin.identity());
    let ca = harness::certs::read_certificate(&files.ca);

    let ks = cfg.keystore.open().await.unwrap();
    let metrics = Arc::new(Metrics::new());
    let service = Arc::new(Service::new(
        ks,
        cfg.authorizer(OffsetDateTime::now_utc()).unwrap(),
        metrics.clone(),
    ));
    kesh::server::create_keys(&service, &cfg.keys)
        .await
        .unwrap();
    let parts = ServerParts {
        service,
        tls: kesh::server::tls_from_config(&cfg).unwrap(),
        routes: RouteSettings::new(&cfg.api),
        // Not to stdout: the test harness cannot capture lines written there.
        audit: AuditLog::new(metrics.clone(), false),
        errors: ErrorLog::new(metrics, cfg.log.error),
    };
    let (addr, handle, task) = harness::server::serve(
        parts,
        cfg.address.unwrap(),
        kesh::server::DEFAULT_MAX_CONNECTIONS,
    )
    .await;

    let c = Client::new(
        &addr.to_string(),
        creds,
        ServerTrust::Roots(vec![ca.clone()]),
    )
    .unwrap();
    assert_eq!(
        c.list_keys("").await.unwrap(),
        vec!["predefined-key".to_owned()]
    );
    assert_eq!(
        c.create_key("new-key").await.unwrap_err().api(),
        Some(&errors::NOT_ALLOWED)
    );

    // A keep-alive connection opened before the reload must survive it.
    let mut tls_cfg = harness::raw_tls::client_config(&ca, false, Some(admin));
    tls_cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = harness::raw_tls::connect(addr, Arc::new(tls_cfg))
        .await
        .unwrap();
    let (mut kept, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    let conn_task = tokio::spawn(conn);
    let status_req = || {
        http::Request::get("/v1/status")
            .header("host", "127.0.0.1")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };
    assert_eq!(kept.send_request(status_req()).await.unwrap().status(), 200);

    files.write_config(&policy("/v1/key/create/*"));
    handle
        .reload(&ServerConfig::load(&files.config_path()).unwrap())
        .await
        .unwrap();
    c.create_key("new-key").await.unwrap();
    assert_eq!(
        c.list_keys("").await.unwrap_err().api(),
        Some(&errors::NOT_ALLOWED)
    );

    let resp = kept.send_request(status_req()).await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "the kept-alive connection still serves after the reload"
    );
    assert!(!conn_task.is_finished());

    // A broken file leaves the running configuration alone.
    std::fs::write(files.config_path(), "admin: [").unwrap();
    assert!(ServerConfig::load(&files.config_path()).is_err());
    c.create_key("newer-key").await.unwrap();

    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// `kesh server --config FILE`: a real process, a real SIGHUP reload of a policy, SIGTERM.
#[test]
fn server_process_reloads_policies_on_sighup() {
    let (creds, id) = client_cert(&rcgen::PKCS_ECDSA_P256_SHA256);
    let policy = |allow: &str| {
        format!("policy:\n  app:\n    allow: [{allow}]\n    identities: [\"{id}\"]\nkeys:\n  - name: k1\n")
    };
    let mut srv = server()
        .admin_identity("disabled")
        .config(&policy("/v1/status"))
        .spawn();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = srv.client_as(creds);
        c.status().await.unwrap();
        assert_eq!(
            c.list_keys("").await.unwrap_err().api(),
            Some(&errors::NOT_ALLOWED)
        );
        srv.write_config(&policy("/v1/key/list/*"));
        srv.signal("-HUP");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match c.list_keys("").await {
                Ok(names) => {
                    assert_eq!(names, vec!["k1".to_owned()]);
                    break;
                }
                Err(e) if Instant::now() < deadline => {
                    assert_eq!(e.api(), Some(&errors::NOT_ALLOWED));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("policy not reloaded after SIGHUP: {e}"),
            }
        }
        assert_eq!(
            c.status().await.unwrap_err().api(),
            Some(&errors::NOT_ALLOWED)
        );
    });
    srv.signal("-TERM");
    assert!(srv.child().wait().unwrap().success());
}

/// A KES backend kesh does not serve is refused at start with the way out.
#[test]
fn server_refuses_kes_backends() {
    let err = server()
        .admin_identity("disabled")
        .keystore_yaml("  vault:\n    endpoint: https://127.0.0.1:8200\n")
        .try_spawn()
        .err()
        .expect("kesh server refuses to start");
    for word in ["pkcs11", "soft", "kesh migrate"] {
        assert!(err.contains(word), "{err}");
    }
}

/// `kesh server --dev` on a machine with SoftHSM: an ephemeral token of its own.
#[test]
fn dev_server_with_softhsm() {
    // The user's SOFTHSM2_CONF names a real token directory; --dev must leave it untouched.
    let users = tempfile::tempdir().unwrap();
    let conf = harness::softhsm::softhsm_conf(users.path());
    let keystore = run_dev_server(&[("SOFTHSM2_CONF", conf.to_str().unwrap())]);
    assert!(
        keystore.contains("SoftHSM"),
        "SoftHSM is installed, so --dev must use it: {keystore}"
    );
    assert_eq!(
        std::fs::read_dir(users.path().join("tokens"))
            .unwrap()
            .count(),
        0,
        "--dev wrote into the user's token directory"
    );
}

/// `kesh server --dev` on a machine without SoftHSM: the in-memory soft keystore.
#[test]
fn dev_server_without_softhsm() {
    let keystore = run_dev_server(&[("KESH_SOFTHSM_MODULE", "/nonexistent/libsofthsm2.so")]);
    assert!(keystore.contains("soft keystore in memory"), "{keystore}");
}

/// Starts `kesh server --dev`, checks it prints an admin API key like KES, uses it as the
/// admin, stops it with SIGTERM, and returns the banner's keystore line. Start-up time is
/// printed, not asserted (timing is a benchmark's job on shared machines).
fn run_dev_server(env: &[(&str, &str)]) -> String {
    let start = Instant::now();
    let mut cmd = std::process::Command::new(harness::command::BIN);
    cmd.args(["server", "--dev", "--addr", "127.0.0.1:0"])
        .stderr(std::process::Stdio::null())
        .env_remove("SOFTHSM2_CONF");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (mut child, banner) =
        harness::server::start_child(&mut cmd).expect("kesh server --dev serves");
    let (api_key, admin, addr, keystore) = (
        banner.api_key.unwrap(),
        banner.admin.unwrap(),
        banner.addr,
        banner.keystore,
    );
    let took = start.elapsed();
    crate::harness::report(&format!(
        "kesh server --dev ({keystore}) was serving after {took:?}"
    ));
    // The bound for a fresh machine; measured here in tens of milliseconds.
    assert!(
        took < Duration::from_secs(2),
        "--dev took {took:?} to serve"
    );
    let key = ApiKey::parse(&api_key).unwrap();
    assert!(api_key.starts_with("kes:v1:"));
    assert_eq!(key.identity().to_string(), admin);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = Client::new(&addr, Credentials::ApiKey(key), ServerTrust::DangerInsecure).unwrap();
        let me = c.describe_self().await.unwrap();
        assert!(me.admin);
        c.create_key("dev-key").await.unwrap();
        c.generate_key("dev-key", b"").await.unwrap();
    });
    // Hardened at start: no core dumps, and (as root, as CI runs) memory locked.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let locked_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code, reason = "geteuid: std does not offer it")]
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        assert!(locked_kb > 0, "memory not locked: {status}");
    }
    harness::server::signal(&child, "-TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    keystore
}
