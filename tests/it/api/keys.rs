//! Keys through the API: create, describe, list, generate, decrypt, import of KES keys, and
//! what MinIO does at start.

use super::*;

pub(super) async fn key_lifecycle(store: Store) {
    let srv = server().store(store).start().await;
    let c = srv.admin();
    let k = name("life");

    // PUT and POST both create; a second create is the typed "exists" error.
    assert_empty_ok(&send(&c, Method::PUT, &format!("/v1/key/create/{k}"), None).await);
    let again = send(&c, Method::POST, &format!("/v1/key/create/{k}"), None).await;
    assert_error(&again, 400, "key already exists");
    let k2 = name("life");
    assert_empty_ok(&send(&c, Method::POST, &format!("/v1/key/create/{k2}"), None).await);

    let d: api::DescribeKeyResponse =
        json(&send(&c, Method::GET, &format!("/v1/key/describe/{k}"), None).await);
    assert_eq!(d.name, k);
    assert_eq!(d.algorithm, "AES256");
    assert_eq!(d.created_by, srv.admin_id());
    assert!(
        (OffsetDateTime::now_utc() - d.created_at)
            .whole_seconds()
            .abs()
            < 60
    );

    // Listing: slash-less (MinIO's `*`), `%2A`, the empty prefix, a literal prefix and `abc*`.
    let prefix = k
        .rsplit_once('-')
        .unwrap()
        .0
        .rsplit_once('-')
        .unwrap()
        .0
        .to_owned();
    for path in [
        "/v1/key/list".to_owned(),
        "/v1/key/list/".into(),
        "/v1/key/list/%2A".into(),
        format!("/v1/key/list/{prefix}"),
        format!("/v1/key/list/{prefix}*"),
    ] {
        let l: api::ListKeysResponse = json(&send(&c, Method::GET, &path, None).await);
        assert!(
            l.names.contains(&k) && l.names.contains(&k2),
            "{path}: {:?}",
            l.names
        );
        let mut sorted = l.names.clone();
        sorted.sort();
        assert_eq!(l.names, sorted);
        assert!(l.continue_at.is_empty());
    }
    let none: api::ListKeysResponse =
        json(&send(&c, Method::GET, "/v1/key/list/zzz-none*", None).await);
    assert_eq!(none.names, Vec::<String>::new());
    let raw = send(&c, Method::GET, "/v1/key/list/zzz-none", None).await;
    assert_eq!(&raw.body[..], b"{\"names\":[]}\n");

    // Generate → decrypt with the same context; a different context is not authentic.
    let g: api::GenerateKeyResponse = json(
        &send(
            &c,
            Method::POST,
            &format!("/v1/key/generate/{k}"),
            Some(format!("{{\"context\":\"{}\"}}", b64e(b"ctx")).as_bytes()),
        )
        .await,
    );
    assert_eq!(g.plaintext.0.len(), 32);
    let dec = decrypt_body(&g.ciphertext.0, b"ctx");
    let p: api::DecryptKeyResponse = json(
        &send(
            &c,
            Method::PUT,
            &format!("/v1/key/decrypt/{k}"),
            Some(dec.as_bytes()),
        )
        .await,
    );
    assert_eq!(*p.plaintext.0, *g.plaintext.0);
    // A different context, or a different key, is not authentic.
    for (key, context) in [(&k, &b"other"[..]), (&k2, &b"ctx"[..])] {
        assert_request_error(
            &c,
            Method::POST,
            &format!("/v1/key/decrypt/{key}"),
            Some(decrypt_body(&g.ciphertext.0, context).as_bytes()),
            400,
            "decryption failed: ciphertext is not authentic",
        )
        .await;
    }

    // Encrypt → decrypt, through the typed client too.
    let ct = c.encrypt(&k, b"hello kesh", b"").await.unwrap();
    assert_eq!(&**c.decrypt(&k, &ct, b"").await.unwrap().0, b"hello kesh");
    let e: api::EncryptKeyResponse = json(
        &send(
            &c,
            Method::PUT,
            &format!("/v1/key/encrypt/{k}"),
            Some(format!("{{\"plaintext\":\"{}\"}}", b64e(b"x")).as_bytes()),
        )
        .await,
    );
    assert!(!e.ciphertext.0.is_empty());

    // HMAC: 32 bytes, deterministic per key, different across keys.
    let m1 = c.hmac(&k, b"root access key").await.unwrap();
    assert_eq!(m1.len(), 32);
    assert_eq!(m1, c.hmac(&k, b"root access key").await.unwrap());
    assert_ne!(m1, c.hmac(&k2, b"root access key").await.unwrap());
    assert_ne!(m1, c.hmac(&k, b"root secret key").await.unwrap());

    // Delete, then everything about the key is 404.
    assert_empty_ok(&send(&c, Method::DELETE, &format!("/v1/key/delete/{k}"), None).await);
    for (method, route, body) in [
        (Method::DELETE, "delete", None),
        (Method::GET, "describe", None),
        (Method::POST, "generate", Some(&b"{}"[..])),
        (Method::POST, "encrypt", Some(b"{}")),
        (Method::POST, "decrypt", Some(dec.as_bytes())),
        (Method::PUT, "hmac", Some(b"{}")),
    ] {
        let path = format!("/v1/key/{route}/{k}");
        assert_request_error(&c, method, &path, body, 404, "key does not exist").await;
    }
    let l: api::ListKeysResponse = json(&send(&c, Method::GET, "/v1/key/list", None).await);
    assert!(!l.names.contains(&k) && l.names.contains(&k2));
}

/// KES's ciphertext vectors (docs/FORMAT.md §5): a key imported as KES had it decrypts KES ciphertexts, current and legacy.
pub(super) async fn import_kes_key_and_decrypt_kes_ciphertexts(store: Store) {
    let srv = server().store(store).start().await;
    let c = srv.admin();
    let k = name("kesimp");
    c.import_key(
        &k,
        &b64("dDHbTWgo+Yh3u804SYB5OyVMy6RiLeJYBQth1f6KlEU="),
        "AES256",
    )
    .await
    .unwrap();
    let d = c.describe_key(&k).await.unwrap();
    assert_eq!(d.algorithm, "AES256");
    let ct = b64("s2gmfQHeGdlyL8x1yEWSACUV3GrSoz3t160hugMgzKWgyqesXDVUJ5Dw5Mt076rR1PNiU9X4YjLH14D8a81t2r2xsz4gVZac");
    let pt = c.decrypt(&k, &ct, &[0u8; 16]).await.unwrap();
    assert_eq!(*pt.0, b64("CLcJoykFCWZDkEIiUq9bJRqwCwW9ZDvdgu8EMA=="));
    assert_eq!(
        c.decrypt(&k, &ct, b"").await.unwrap_err().api(),
        Some(&errors::DECRYPT)
    );

    let zero = name("kesimp0");
    c.import_key(&zero, &[0u8; 32], "AES256-GCM_SHA256")
        .await
        .unwrap();
    for legacy in [
        b"{\"aead\":\"AES-256-GCM-HMAC-SHA-256\",\"iv\":\"xLxIN3tSCkg2xMafuvwUwg==\",\"nonce\":\"gu0mGwUkwcvMEoi5\",\"bytes\":\"WVgRjeIJm3w50C/l+y7y2i6mbNg5NCAqN1zvOYWZKmc=\"}".to_vec(),
        b64("lbFBRVMyNTYtR0NNX1NIQTI1NtkgNjY2ODdhYWRmODYyYmQ3NzZjOGZjMThiOGU5ZjhlMjDEEExv7LAd4oz0SaHZrX5LBufEDEKME1ow1CDfUFrqv8QgJuy7Sw+jVqz99TK1HV851LT3K4mwwDv46TB2ngWkAJQ="),
        b64("zwdDgHeRlIFRnJ7+DIhs/ka7GFK2CFSfDELqg1VCyTQzZ58o7MAdupMLk3ZjlMo2ZUDwldL2o41nAWDc"),
    ] {
        assert_eq!(*c.decrypt(&zero, &legacy, b"").await.unwrap().0, vec![0u8; 16]);
    }
    // A data key generated under an imported key is in KES's format: 76 bytes.
    let g = c.generate_key(&zero, b"{}").await.unwrap();
    assert_eq!(g.plaintext.0.len(), 32);
    assert_eq!(g.ciphertext.0.len(), 76);
}

/// What MinIO does (minio: `cmd/common-main.go`, `internal/kms/kes.go`) at start-up and for `mc admin kms key status`.
pub(super) async fn minio_startup_and_key_status(store: Store) {
    let srv = server().store(store).start().await;
    let c = srv.admin();
    let k = name("minio-default");
    let _ = c.describe_key(&k).await;
    let ctx = b"{}";
    match c.generate_key(&k, ctx).await {
        Err(e) if e.api() == Some(&errors::KEY_NOT_FOUND) => {}
        other => panic!("expected ErrKeyNotFound, got {other:?}"),
    }
    // Several MinIO nodes start at once: one create wins, the others see ErrKeyExists.
    let results = futures_util::future::join_all((0..4).map(|_| c.create_key(&k))).await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.api(), Some(&errors::KEY_EXISTS));
    }
    let g = c.generate_key(&k, ctx).await.unwrap();
    assert_eq!(g.plaintext.0.len(), 32);
    c.status().await.unwrap();

    // mc admin kms key status
    let ctx = br#"{"MinIO admin API":"KMSKeyStatusHandler"}"#;
    let g = c.generate_key(&k, ctx).await.unwrap();
    assert_eq!(
        *c.decrypt(&k, &g.ciphertext.0, ctx).await.unwrap().0,
        *g.plaintext.0
    );
    // The readiness probe: generate on every probe.
    c.generate_key(&k, br#"{"healthcheck":""}"#).await.unwrap();
}
