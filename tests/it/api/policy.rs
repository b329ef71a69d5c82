//! Policies and identities: who may call which route, and the policy and identity routes.

use super::*;

pub(super) async fn policy_matrix(store: Store) {
    let (app_creds, app) = client_cert(&rcgen::PKCS_ED25519);
    let (ro_creds, ro) = client_cert(&rcgen::PKCS_ECDSA_P256_SHA256);
    let policies = [
        TestPolicy {
            name: "app",
            allow: vec![
                "/v1/key/generate/app-*",
                "/v1/key/decrypt/app-*",
                "/v1/key/create/app-*",
                "/v1/status",
                "/v1/key/list/*",
            ],
            deny: vec!["/v1/key/generate/app-secret*", "/v1/key/create/app-secret*"],
            identities: vec![app],
        },
        TestPolicy::allowing("readonly", &["/v1/key/describe/*"], [ro]),
    ];
    let srv = server().store(store).policies(policies).start().await;
    let admin = srv.admin();
    let a = srv.client(app_creds);
    let r = srv.client(ro_creds);
    let k = format!("app-{}", name("m"));
    let secret = format!("app-secret-{}", name("m"));
    admin.create_key(&secret).await.unwrap();
    let allowed =
        |res: &Result<(), ClientError>| res.as_ref().map_err(|e| e.api().cloned()).is_ok();
    let denied = |res: &Result<(), ClientError>| {
        res.as_ref().err().and_then(|e| e.api()) == Some(&errors::NOT_ALLOWED)
    };

    let res = a.create_key(&k).await;
    assert!(allowed(&res), "{res:?}");
    assert!(denied(&a.create_key(&secret).await));
    assert!(denied(&a.create_key("other-key").await));
    assert!(allowed(&a.generate_key(&k, b"").await.map(drop)));
    assert!(denied(&a.generate_key(&secret, b"").await.map(drop)));
    assert!(denied(&a.encrypt(&k, b"x", b"").await.map(drop)));
    assert!(denied(&a.delete_key(&k).await));
    // MinIO lists with the slash-less path; policies see it as `/v1/key/list/`, as after KES's 301.
    assert!(allowed(&a.list_keys("").await.map(drop)));
    assert!(allowed(&a.list_keys("app*").await.map(drop)));
    assert!(allowed(&a.status().await.map(drop)));
    // Exact patterns match exactly.
    assert_not_allowed(&a, Method::GET, "/v1/metrics").await;
    assert!(denied(&r.create_key(&name("ro")).await));
    assert!(allowed(&r.describe_key(&k).await.map(drop)));
    assert!(denied(&r.status().await.map(drop)));
    assert!(denied(&r.list_keys("").await.map(drop)));
    // The admin bypasses every policy.
    assert!(allowed(&admin.delete_key(&k).await));
}

pub(super) async fn policy_and_identity_routes(store: Store) {
    let (creds, id) = client_cert(&rcgen::PKCS_ED25519);
    let policies = [
        TestPolicy {
            name: "minio",
            allow: vec!["/v1/key/*", "/v1/identity/self/describe"],
            deny: vec!["/v1/key/delete/*"],
            identities: vec![id.clone()],
        },
        TestPolicy::allowing("monitor", &["/v1/metrics"], []),
    ];
    let srv = server().store(store).policies(policies).start().await;
    let c = srv.admin();
    let admin = srv.admin_id();

    let p: api::DescribePolicyResponse =
        json(&send(&c, Method::GET, "/v1/policy/describe/minio", None).await);
    assert_eq!(
        (p.name.as_str(), p.created_by.as_str()),
        ("minio", admin.as_str())
    );
    let raw = send(&c, Method::GET, "/v1/policy/read/minio", None).await;
    let p: api::ReadPolicyResponse = json(&raw);
    assert_eq!(
        p.allow.keys().collect::<Vec<_>>(),
        vec!["/v1/identity/self/describe", "/v1/key/*"]
    );
    assert_eq!(p.deny.keys().collect::<Vec<_>>(), vec!["/v1/key/delete/*"]);
    assert!(String::from_utf8_lossy(&raw.body).contains("\"deny\":{\"/v1/key/delete/*\":{}}"));
    let p: api::ReadPolicyResponse =
        json(&send(&c, Method::GET, "/v1/policy/read/monitor", None).await);
    assert!(p.deny.is_empty());
    assert_request_error(
        &c,
        Method::GET,
        "/v1/policy/read/nope",
        None,
        404,
        "policy does not exist",
    )
    .await;

    for (pattern, expect) in [
        ("", vec!["minio", "monitor"]),
        ("*", vec!["minio", "monitor"]),
        ("mon*", vec!["monitor"]),
        ("x", vec![]),
    ] {
        let path = if pattern.is_empty() {
            "/v1/policy/list".to_owned()
        } else {
            format!("/v1/policy/list/{pattern}")
        };
        let raw = send(&c, Method::GET, &path, None).await;
        let l: api::ListPoliciesResponse = json(&raw);
        assert_eq!(l.names, expect, "{pattern}");
        assert!(String::from_utf8_lossy(&raw.body).contains("\"continue_at\":\"\""));
    }

    let d: api::DescribeIdentityResponse = json(
        &send(
            &c,
            Method::GET,
            &format!("/v1/identity/describe/{id}"),
            None,
        )
        .await,
    );
    assert_eq!(
        (d.admin, d.policy.as_str(), d.created_by.as_str()),
        (false, "minio", admin.as_str())
    );
    let d: api::DescribeIdentityResponse = json(
        &send(
            &c,
            Method::GET,
            &format!("/v1/identity/describe/{admin}"),
            None,
        )
        .await,
    );
    assert!(d.admin && d.policy.is_empty() && d.created_by.is_empty());
    assert_request_error(
        &c,
        Method::GET,
        &format!("/v1/identity/describe/{}", "0".repeat(64)),
        None,
        404,
        "identity does not exist",
    )
    .await;
    let l: api::ListIdentitiesResponse =
        json(&send(&c, Method::GET, "/v1/identity/list/*", None).await);
    let mut expect = vec![admin.clone(), id.to_string()];
    expect.sort();
    assert_eq!(l.identities, expect);

    // Self-describe for a policy identity, in the shape kms-go decodes (a deliberate deviation).
    let me = srv.client(creds);
    let raw = send(&me, Method::GET, "/v1/identity/self/describe", None).await;
    let s: api::SelfDescribeResponse = json(&raw);
    assert_eq!(s.identity, id.to_string());
    assert_eq!(s.policy, "minio");
    assert!(s.allow.contains_key("/v1/key/*") && s.deny.contains_key("/v1/key/delete/*"));
    assert_eq!(s.created_by, admin);
    let v: serde_json::Value = serde_json::from_slice(&raw.body).unwrap();
    assert!(v["policy"].is_string());
}
