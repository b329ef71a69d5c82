//! `kesh policy`, `identity ls`, `status`, `metrics` and `log` as the admin and as an
//! application under a policy.

use super::*;

#[test]
fn policies_identities_status_metrics_logs() {
    let app = ApiKey::generate().unwrap();
    let policy = format!(
        "policy:\n  app:\n    allow:\n    - /v1/key/create/app-*\n    - /v1/key/list/*\n    deny:\n    - /v1/key/create/app-secret*\n    identities:\n    - {}\n",
        app.identity()
    );
    let srv = server().config(&policy).spawn();
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
    let mut json_child = srv.spawn_cli(&["log", "--audit", "--json", "--count", "1"]);
    let mut human_child = srv.spawn_cli(&["log", "--count", "1"]);
    // The subscriptions race the first create: create keys until both subscribers have one.
    let mut created = Vec::new();
    while json_child.try_wait().unwrap().is_none() || human_child.try_wait().unwrap().is_none() {
        assert!(created.len() < 500, "a log subscriber saw no event");
        let n = unique("cli-log");
        srv.run(&["key", "create", &n]).ok();
        created.push(n);
    }
    let line = wait_ok(json_child);
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
    let line = wait_ok(human_child);
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
