//! Attacks on who a client is: the identity must be the key that signed the TLS handshake,
//! whatever else the client puts in its certificate chain (docs/SECURITY.md, "Identities").

use http::Method;
use kesh::client::Credentials;
use kesh::identity::Identity;

use crate::harness::certs::credentials;
use crate::harness::{assert_not_allowed, assert_request_error, send, server, TestPolicy};

/// The attacker's own CA-flagged certificate and key: what `openssl req -x509` makes.
fn ca_flagged_self_signed() -> (rcgen::Certificate, rcgen::KeyPair) {
    crate::harness::certs::ca("mallory")
}

/// A public key rcgen can put into a certificate without holding its private half: what an
/// attacker has of the admin after seeing its certificate.
struct ForeignEd25519([u8; 32]);

impl rcgen::PublicKeyData for ForeignEd25519 {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

/// The forgery from the security review: the client signs the handshake with its own
/// CA-flagged certificate and puts a certificate carrying the admin's public key behind it.
/// KES (and kesh before the fix) hashed the second one and served the client as the admin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_carrying_the_admins_public_key_gets_no_identity() {
    let srv = server().store(crate::harness::soft()).start().await;
    let (own, own_key) = ca_flagged_self_signed();
    let forged = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .signed_by(&ForeignEd25519(srv.admin.public_key()), &own, &own_key)
        .unwrap();
    assert_eq!(
        Identity::from_certificate(forged.der()).unwrap(),
        srv.admin.identity(),
        "the forged certificate carries the admin's key"
    );
    let attacker = srv.client(credentials(
        vec![own.der().clone(), forged.der().clone()],
        &own_key,
    ));
    assert_request_error(
        &attacker,
        Method::GET,
        "/v1/identity/self/describe",
        None,
        404,
        "identity does not exist",
    )
    .await;
    for (method, path) in [
        (Method::PUT, "/v1/key/create/forged"),
        (Method::GET, "/v1/key/list/*"),
        (Method::DELETE, "/v1/key/delete/forged"),
    ] {
        assert_request_error(
            &attacker,
            method,
            path,
            None,
            400,
            "tls: received more than one client certificate",
        )
        .await;
    }
    let keys = send(&srv.admin(), Method::GET, "/v1/key/list/*", None).await;
    assert!(
        !String::from_utf8_lossy(&keys.body).contains("forged"),
        "no key was created: {}",
        String::from_utf8_lossy(&keys.body)
    );
}

/// A lone self-signed certificate with `CA:TRUE` signed the handshake with its own key: it is
/// that key's identity (KES would refuse it as "no certificate").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_ca_flagged_self_signed_certificate_is_its_own_identity() {
    let (cert, key) = ca_flagged_self_signed();
    let identity = Identity::from_certificate(cert.der()).unwrap();
    let policies = [TestPolicy::allowing(
        "status",
        &["/v1/status"],
        [identity.clone()],
    )];
    let srv = server().policies(policies).start().await;
    let client = srv.client(credentials(vec![cert.der().clone()], &key));
    client.status().await.unwrap();
    let me = client.describe_self().await.unwrap();
    assert_eq!(me.identity, identity.to_string());
    assert!(!me.admin);
    assert_not_allowed(&client, Method::PUT, "/v1/key/create/nope").await;
}

/// An unauthenticated flood cannot fill the server's log: denial lines are limited per
/// second and the rest summarised with their number, while the audit trail keeps one line
/// per denied request and the denial counter counts every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_are_logged_at_a_bounded_rate_and_none_goes_uncounted() {
    let srv = server().spawn();
    let stranger = srv.client_as(Credentials::ApiKey(
        kesh::identity::ApiKey::generate().unwrap(),
    ));
    const FLOOD: usize = 300;
    let mut trail = srv.client().stream("/v1/log/audit").await.unwrap();
    let audited = tokio::spawn(async move {
        let mut denied = 0;
        while denied < FLOOD + 1 {
            match tokio::time::timeout(std::time::Duration::from_secs(10), trail.next_line()).await
            {
                Ok(Ok(Some(line))) => {
                    let e: kesh::api::AuditEvent = serde_json::from_slice(&line).unwrap();
                    denied += usize::from(e.response.code == 403);
                }
                _ => break,
            }
        }
        denied
    });
    let started = std::time::Instant::now();
    for _ in 0..FLOOD {
        let r = send(&stranger, Method::GET, "/v1/key/describe/secret", None).await;
        assert_eq!(r.status, 403);
    }
    let flood_secs = started.elapsed().as_secs() + 1;
    // The next window's first denial reports the ones that were not logged.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = send(&stranger, Method::GET, "/v1/key/describe/secret", None).await;
    assert_eq!(r.status, 403);
    let metrics = srv.client().kesh_metrics().await.unwrap();
    assert!(
        metrics.contains(&format!("kesh_policy_denials_total {}\n", FLOOD + 1)),
        "{metrics}"
    );
    assert_eq!(
        audited.await.unwrap(),
        FLOOD + 1,
        "one audit event per denied request"
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let log = srv.stderr();
    let lines = log
        .lines()
        .filter(|l| l.contains("decision=\"deny\""))
        .count();
    let summarised: usize = log
        .lines()
        .filter_map(|l| l.split("denials=").nth(1))
        .map(|n| n.split(' ').next().unwrap().parse::<usize>().unwrap())
        .sum();
    let limit = kesh::server::policy::DENIAL_LOG_BURST as usize * (flood_secs as usize + 1);
    assert!(
        lines <= limit,
        "{lines} denial lines for {FLOOD} denials:\n{log}"
    );
    assert_eq!(
        lines + summarised,
        FLOOD + 1,
        "every denial logged or counted:\n{log}"
    );
}
