//! HSM faults injected through `kesh-fault-shim` (softhsm-tests/fault-shim) into a running
//! `kesh server`: what a client sees during the fault, and that kesh recovers without a
//! restart and loses nothing.
//!
//! Each test runs its own server process: recovery finalizes and re-initializes the module,
//! which must not disturb the other tests' keystores in this process.

use std::process::Stdio;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use kesh::client::{Client, ClientError};

use crate::harness::shim::now_ms;
use crate::harness::{self, server, ServerBuilder, ServerProcess};

/// A `kesh server` on the faults token, loading SoftHSM through the shim, which applies
/// `rules` from its first call and counts calls ([`ServerProcess::calls`]).
pub(crate) fn faulty_server(sessions: u64, session_wait: &str, rules: &str) -> ServerBuilder {
    server()
        .pkcs11_private(&harness::tokens().faults)
        .pkcs11_setting("sessions", sessions)
        .pkcs11_setting("session_wait", session_wait)
        .fault_shim(rules)
}

/// Generates under `key` until it works again; returns how long that took. Every failure
/// meanwhile is the outage's clear 5xx.
pub(crate) async fn wait_for_recovery(c: &Client, key: &str) -> Duration {
    let start = Instant::now();
    loop {
        match c.generate_key(key, b"probe").await {
            Ok(_) => return start.elapsed(),
            Err(e) if start.elapsed() < Duration::from_secs(20) => {
                assert_server_error(&e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("kesh did not recover within 20 s: {e}"),
        }
    }
}

/// A new key named after `hint`, and a DEK under it (empty context) made before any fault.
async fn key_and_dek(
    c: &Client,
    hint: &str,
) -> (kesh::name::KeyName, kesh::api::GenerateKeyResponse) {
    let key = harness::name(hint);
    c.create_key(key.as_str()).await.unwrap();
    let dek = c.generate_key(key.as_str(), b"").await.unwrap();
    (key, dek)
}

/// During an outage a request gets a clear 5xx, never a success or a client error.
pub(crate) fn assert_server_error(e: &ClientError) {
    let api = e.api().unwrap_or_else(|| panic!("not an HTTP error: {e}"));
    assert_eq!(
        (api.status, api.message.as_ref()),
        (504, "key store is not reachable"),
        "{e}"
    );
}

/// The whole story for one kind of fault: a DEK made before, requests during the fault fail
/// fast and clearly, `/v1/status` says unreachable, kesh recovers by itself, the old DEK
/// still decrypts, and no key was duplicated or lost.
async fn outage(rv: &str) {
    let srv = faulty_server(2, "2s", "").spawn();
    let c = &srv.client();
    let key = harness::name(&format!("fault-{}", rv.to_lowercase().replace('_', "-")));
    let key = key.as_str();
    c.create_key(key).await.unwrap();
    let before = c.generate_key(key, b"ctx").await.unwrap();

    let fault_ms = 1500;
    srv.inject(&format!("fail {rv} * until={}\n", now_ms() + fault_ms));
    let t = Instant::now();
    let err = c.generate_key(key, b"ctx").await.unwrap_err();
    assert_server_error(&err);
    let first_failure = t.elapsed();
    assert!(
        srv.status_unreachable().await,
        "status must report the keystore unreachable"
    );
    assert_server_error(
        &c.decrypt(key, &before.ciphertext.0, b"ctx")
            .await
            .unwrap_err(),
    );
    assert_server_error(&c.create_key(&format!("{key}-during")).await.unwrap_err());

    let recovered = wait_for_recovery(c, key).await;
    let since_fault = t.elapsed();
    // Requests fail fast during the fault, and service is back within the recovery backoff
    // cap (plus a reconnect) of the fault's end.
    assert!(first_failure < Duration::from_secs(1), "{first_failure:?}");
    let bound = Duration::from_millis(fault_ms as u64)
        + kesh::keystore::pkcs11::RECOVERY_BACKOFF_MAX
        + Duration::from_millis(1500);
    assert!(
        since_fault < bound,
        "served again {since_fault:?} after the fault began"
    );
    assert!(!srv.status_unreachable().await);
    let plain = c.decrypt(key, &before.ciphertext.0, b"ctx").await.unwrap();
    assert_eq!(
        &plain.0[..],
        &before.plaintext.0[..],
        "a DEK from before the fault decrypts after it"
    );
    let after = c.generate_key(key, b"ctx").await.unwrap();
    assert_eq!(
        &c.decrypt(key, &after.ciphertext.0, b"ctx").await.unwrap().0[..],
        &after.plaintext.0[..]
    );
    assert_eq!(
        c.list_keys(key).await.unwrap(),
        vec![key.to_owned()],
        "no key created twice or lost"
    );
    assert!(
        c.describe_key(&format!("{key}-during")).await.is_err(),
        "the create during the outage did not happen"
    );
    harness::report(&format!(
        "faults: {rv}: first failure after {first_failure:?}; served again {since_fault:?} after a \
         {fault_ms} ms fault began ({recovered:?} of waiting)"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_error() {
    outage("CKR_DEVICE_ERROR").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_removed() {
    outage("CKR_DEVICE_REMOVED").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_handle_invalid() {
    outage("CKR_SESSION_HANDLE_INVALID").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_not_logged_in() {
    outage("CKR_USER_NOT_LOGGED_IN").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_not_present() {
    outage("CKR_TOKEN_NOT_PRESENT").await;
}

/// One failing call (the next C_Encrypt only) is enough to start recovery, and `C_Initialize`
/// failing keeps kesh out of service — answering, not hanging — until the HSM is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initialize_fails_until_cleared() {
    let srv = faulty_server(2, "2s", "").spawn();
    let c = &srv.client();
    let (key, before) = key_and_dek(c, "fault-init").await;
    let key = key.as_str();
    srv.inject("fail CKR_DEVICE_ERROR C_Encrypt count=1\nfail CKR_GENERAL_ERROR C_Initialize\n");
    assert_server_error(&c.generate_key(key, b"").await.unwrap_err());
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            srv.status_unreachable().await,
            "still down while C_Initialize fails"
        );
        assert_server_error(&c.generate_key(key, b"").await.unwrap_err());
    }
    srv.inject("");
    let recovered = wait_for_recovery(c, key).await;
    let plain = c.decrypt(key, &before.ciphertext.0, b"").await.unwrap();
    assert_eq!(&plain.0[..], &before.plaintext.0[..]);
    assert!(
        recovered < kesh::keystore::pkcs11::RECOVERY_BACKOFF_MAX + Duration::from_millis(1500),
        "{recovered:?}"
    );
    harness::report(&format!(
        "faults: C_Initialize failing: served again {recovered:?} after the HSM came back"
    ));
}

/// A slow HSM with a full session pool: requests past the wait get 503 with Retry-After (the
/// KES client retries 503), the others succeed, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_session_pool_answers_503_retry_after() {
    let srv = faulty_server(1, "100ms", "").spawn();
    let c = srv.client();
    let (key, before) = key_and_dek(&c, "fault-busy").await;
    let key = key.as_str().to_owned();
    srv.inject("latency 400000 C_Encrypt\n");
    let body = bytes::Bytes::from_static(b"{}");
    let path = format!("/v1/key/generate/{key}");
    let calls: Vec<_> = (0..4)
        .map(|_| {
            c.send(
                Method::POST,
                &path,
                Some(body.clone()),
                Some("application/json"),
            )
        })
        .collect();
    let responses = futures_util::future::join_all(calls).await;
    let mut busy = 0;
    for r in responses {
        let r = r.unwrap();
        match r.status {
            StatusCode::OK => {}
            StatusCode::SERVICE_UNAVAILABLE => {
                busy += 1;
                assert_eq!(r.headers["retry-after"], "1");
                assert_eq!(&r.body[..], b"{\"message\":\"key store is busy\"\n}");
            }
            other => panic!("unexpected {other}: {:?}", String::from_utf8_lossy(&r.body)),
        }
    }
    assert!(
        busy >= 1,
        "four calls on one 400 ms session with a 100 ms wait: some must be refused"
    );
    srv.inject("");
    c.generate_key(&key, b"").await.unwrap();
    let plain = c.decrypt(&key, &before.ciphertext.0, b"").await.unwrap();
    assert_eq!(&plain.0[..], &before.plaintext.0[..]);
}

/// A module that claims a one-shot `C_Encrypt`/`C_Decrypt` needs a terabyte gets no terabyte:
/// the request fails, the session whose operation the module left active is closed, and the
/// next requests on the only session work (SoftHSM would answer `CKR_OPERATION_ACTIVE` on a
/// reused one). A modest extra length within the cap is still granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_asking_for_a_huge_output_buffer_is_refused_and_its_session_closed() {
    let mut srv = faulty_server(1, "2s", "").spawn();
    let c = &srv.client();
    let (key, dek) = key_and_dek(c, "fault-toosmall").await;
    let key = key.as_str();

    srv.inject("toosmall 60 C_Encrypt count=1\n");
    let grown = c.generate_key(key, b"").await.unwrap();
    assert_eq!(
        &c.decrypt(key, &grown.ciphertext.0, b"").await.unwrap().0[..],
        &grown.plaintext.0[..]
    );

    for (function, op) in [("C_Encrypt", "generate"), ("C_Decrypt", "decrypt")] {
        let closed_before = srv.calls("C_CloseSession").await;
        srv.inject(&format!("toosmall 1099511627776 {function} count=1\n"));
        let failed = match op {
            "generate" => c.generate_key(key, b"").await.map(drop),
            _ => c.decrypt(key, &dek.ciphertext.0, b"").await.map(drop),
        };
        let status = failed.unwrap_err().api().map(|e| e.status);
        assert!(status.is_some_and(|s| s >= 500), "{op}: {status:?}");
        assert_eq!(
            srv.calls("C_CloseSession").await,
            closed_before + 1,
            "{op}: the session with an active operation was closed"
        );
        for _ in 0..3 {
            let fresh = c.generate_key(key, b"").await.unwrap();
            let opened = c.decrypt(key, &dek.ciphertext.0, b"").await.unwrap();
            assert_eq!(&opened.0[..], &dek.plaintext.0[..]);
            assert_eq!(fresh.plaintext.0.len(), 32);
        }
    }
    assert!(
        srv.child().try_wait().unwrap().is_none(),
        "the server lives"
    );
}

/// The shim's `C_Login` count once it has been steady for a moment (recovery runs in the
/// background).
async fn logins_settled(srv: &ServerProcess, at_least: u64) -> u64 {
    let start = Instant::now();
    loop {
        let n = srv.calls("C_Login").await;
        if n >= at_least || start.elapsed() > Duration::from_secs(10) {
            return n;
        }
    }
}

/// Recovery never guesses a PIN: after a device error, a token that refuses the PIN gets no
/// second login from kesh for as long as it runs; requests fail fast and clearly meanwhile.
/// The operator's reload makes exactly one attempt, and once the PIN is accepted the server
/// serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_pin_is_never_retried_until_the_operator_reloads() {
    let srv = faulty_server(2, "2s", "").spawn();
    let c = &srv.client();
    let (key, dek) = key_and_dek(c, "fault-pin").await;
    let key = key.as_str();
    let at_start = srv.calls("C_Login").await;
    assert_eq!(at_start, 1, "one login at start");

    srv.inject("fail CKR_DEVICE_ERROR C_Encrypt count=1\nfail CKR_PIN_INCORRECT C_Login\n");
    assert_server_error(&c.generate_key(key, b"").await.unwrap_err());
    assert_eq!(logins_settled(&srv, 2).await, 2, "recovery logged in once");

    // Ten seconds of waiting and of requests: no login reaches the token.
    let refused_at = Instant::now();
    while refused_at.elapsed() < Duration::from_secs(10) {
        let t = Instant::now();
        assert_server_error(&c.generate_key(key, b"").await.unwrap_err());
        assert!(t.elapsed() < Duration::from_millis(500), "fails fast");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(srv.calls("C_Login").await, 2, "no login for 10 s");
    assert!(srv.status_unreachable().await);
    assert_server_error(&c.ready().await.unwrap_err());
    let metrics = c.kesh_metrics().await.unwrap();
    assert!(metrics.contains("kesh_hsm_login_refused 1\n"), "{metrics}");
    let log = srv.stderr();
    assert_eq!(
        log.matches("PKCS#11 login refused").count(),
        1,
        "logged once, with the fix:\n{log}"
    );
    assert!(log.contains("reload (SIGHUP"), "{log}");

    // A reload with the token still refusing: exactly one attempt, still out of service.
    srv.signal("-HUP");
    assert_eq!(logins_settled(&srv, 3).await, 3);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(srv.calls("C_Login").await, 3, "one login per reload");
    assert!(srv.status_unreachable().await);

    // The operator fixes the PIN (here: the token accepts it again) and reloads.
    srv.inject("");
    srv.write_pin(harness::tokens().faults.token.pin().expose());
    let t = Instant::now();
    srv.signal("-HUP");
    let back = wait_for_recovery(c, key).await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "served {back:?} after the reload"
    );
    assert_eq!(srv.calls("C_Login").await, 4);
    let opened = c.decrypt(key, &dek.ciphertext.0, b"").await.unwrap();
    assert_eq!(&opened.0[..], &dek.plaintext.0[..]);
    let metrics = c.kesh_metrics().await.unwrap();
    assert!(metrics.contains("kesh_hsm_login_refused 0\n"), "{metrics}");
    harness::report(&format!(
        "faults: refused PIN: 1 login in 10 s of waiting; served again {back:?} after the reload"
    ));
}

/// A start with a PIN the token refuses is one login attempt, then a clear error and exit.
#[test]
fn a_start_with_a_refused_pin_makes_one_login_attempt() {
    let srv = faulty_server(2, "2s", "fail CKR_PIN_INCORRECT C_Login\n").prepare();
    let out = srv.command().stdout(Stdio::null()).status().unwrap();
    assert!(!out.success());
    let log = srv.stderr();
    assert!(log.contains("refused the PIN"), "{log}");
    assert_eq!(srv.calls_now("C_Login"), 1, "{log}");
}

/// Round trips: once the HSM's random bytes are drawn in bulk, a generate is
/// `C_EncryptInit` + `C_Encrypt` and nothing else, and the bulk draws are one
/// `C_GenerateRandom` per 4 KiB (93 generates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generate_is_two_device_calls_with_the_random_pool_warm() {
    let srv = faulty_server(2, "2s", "").spawn();
    let key = harness::name("fault-calls");
    let key = key.as_str();
    let c = &srv.client();
    c.create_key(key).await.unwrap();
    for _ in 0..5 {
        c.generate_key(key, b"").await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (init, enc, rnd) = (
        srv.calls("C_EncryptInit").await,
        srv.calls("C_Encrypt").await,
        srv.calls("C_GenerateRandom").await,
    );
    const N: u64 = 200;
    for _ in 0..N {
        c.generate_key(key, b"").await.unwrap();
    }
    let (init, enc, rnd) = (
        srv.calls("C_EncryptInit").await - init,
        srv.calls("C_Encrypt").await - enc,
        srv.calls("C_GenerateRandom").await - rnd,
    );
    assert_eq!(
        (init, enc),
        (N, N),
        "one C_EncryptInit and one C_Encrypt per generate"
    );
    let bulk = N * 44 / kesh::keystore::pkcs11::randomness::DRAW_BYTES as u64 + 2;
    assert!(
        rnd <= bulk,
        "{rnd} C_GenerateRandom calls for {N} generates"
    );
    harness::report(&format!(
        "calls: {N} generates made {init} C_EncryptInit, {enc} C_Encrypt, {rnd} C_GenerateRandom"
    ));
}

/// The change-marker poll reads the markers it found by handle and searches the token every
/// 2 s at most: a search on SoftHSM opens the file of every object on the token, and every
/// instance polled four times a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_instance_searches_the_token_every_two_seconds_at_most() {
    let srv = faulty_server(2, "2s", "").spawn();
    let key = harness::name("fault-poll");
    let c = &srv.client();
    // A create replaces the marker; the polls after it start from a search.
    c.create_key(key.as_str()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (finds, reads) = (
        srv.calls("C_FindObjectsInit").await,
        srv.calls("C_GetAttributeValue").await,
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (finds, reads) = (
        srv.calls("C_FindObjectsInit").await - finds,
        srv.calls("C_GetAttributeValue").await - reads,
    );
    // 3 s of polls every 0.25 s: about 12, of which at most 2 search.
    assert!(finds <= 2, "{finds} searches in 3 s of idle polls");
    assert!(
        reads >= 8,
        "only {reads} marker reads in 3 s: the poll is not running"
    );
    harness::report(&format!(
        "calls: an idle instance made {finds} searches and {reads} marker reads in 3 s"
    ));
}

/// On a slow HSM under load, the pool's refill waits behind the queued requests. The requests
/// that find the pool short meanwhile each draw 4 KiB and leave the rest in it, so the draws
/// stay about one per 93 generates; when each drew only its own 44 bytes, 210 of 640
/// generates here paid a third round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_draws_stay_bulk_under_load_on_a_slow_hsm() {
    let srv = faulty_server(4, "10s", "latency 1000 *\n").spawn();
    let key = harness::name("fault-bulk");
    let key = key.as_str();
    let c = &srv.client();
    c.create_key(key).await.unwrap();
    let before = srv.calls("C_GenerateRandom").await;
    const N: u64 = 640;
    let generates = (0..N).map(|_| c.generate_key(key, b""));
    for outcome in futures_util::future::join_all(generates).await {
        outcome.unwrap();
    }
    let rnd = srv.calls("C_GenerateRandom").await - before;
    let bulk = N * 44 / kesh::keystore::pkcs11::randomness::DRAW_BYTES as u64;
    assert!(
        rnd <= 2 * bulk + 4,
        "{rnd} C_GenerateRandom calls for {N} concurrent generates (bulk alone: {bulk})"
    );
    harness::report(&format!(
        "calls: {N} concurrent generates on a 1 ms HSM made {rnd} C_GenerateRandom"
    ));
}
