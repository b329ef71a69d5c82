//! The audit stream: one event per request, refused ones included, secrets never.

use super::*;

pub(super) async fn audit_stream_delivers(store: Store) {
    let hsm = store.pkcs11.is_some();
    // The pool is as large as the module's profile makes it.
    let pool = store
        .pkcs11
        .as_ref()
        .map_or(0, |(ks, _)| ks.settings().sessions);
    let srv = server().store(store).start().await;
    let c = srv.admin();
    let mut audit = c.stream("/v1/log/audit").await.unwrap();
    let k = name("audit");
    c.create_key(&k).await.unwrap();
    let g = c.generate_key(&k, b"secret context").await.unwrap();
    let _ = c.describe_key("audit-missing").await;
    // A refused request is on the trail too, with the caller's identity.
    let (creds, stranger_id) = client_cert(&rcgen::PKCS_ED25519);
    let stranger = srv.client(creds);
    let _ = stranger.delete_key(&k).await;
    let mut events = Vec::new();
    for _ in 0..4 {
        let line = harness::http::next_line(&mut audit).await;
        let text = String::from_utf8(line.to_vec()).unwrap();
        assert!(
            !text.contains(&b64e(&g.plaintext.0)),
            "audit line leaks the DEK: {text}"
        );
        assert!(!text.contains(&b64e(&g.ciphertext.0)));
        events.push(serde_json::from_str::<api::AuditEvent>(&text).unwrap());
    }
    let admin = srv.admin_id();
    let summary: Vec<(String, u16, String)> = events
        .iter()
        .map(|e| {
            (
                e.request.path.clone(),
                e.response.code,
                e.request.identity.clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (format!("/v1/key/create/{k}"), 200, admin.clone()),
            (format!("/v1/key/generate/{k}"), 200, admin.clone()),
            (
                "/v1/key/describe/audit-missing".to_owned(),
                404,
                admin.clone()
            ),
            (format!("/v1/key/delete/{k}"), 403, stranger_id.to_string()),
        ]
    );
    assert_eq!(events[0].request.ip, "127.0.0.1");
    let metrics = c.kesh_metrics().await.unwrap();
    assert!(metrics.contains("kes_log_audit_events 4"), "{metrics}");
    // As in KES, requests refused by authentication are not in the HTTP counters.
    assert!(!metrics.contains("code=\"403\""), "{metrics}");
    assert!(metrics.contains("kesh_policy_denials_total 1"), "{metrics}");
    // The HSM's session pool shows up only where there is one.
    assert_eq!(
        metrics.contains(&format!("kesh_hsm_sessions{{state=\"size\"}} {pool}\n")),
        hsm,
        "{metrics}"
    );
    assert_eq!(
        metrics.contains("kesh_hsm_session_acquired_total "),
        hsm,
        "{metrics}"
    );
    c.describe_key(&k).await.unwrap();
}
