//! `/version`, `/v1/status`, `/v1/api` and the metrics: KES's families on `/v1/metrics`, as
//! MinIO's client decodes them.

use super::*;

pub(super) async fn status_metrics_api_version(store: Store) {
    let hsm = store.pkcs11.is_some();
    let srv = server().store(store).start().await;
    let c = srv.admin();
    let v: api::VersionResponse = json(&send(&c, Method::GET, "/version", None).await);
    assert_eq!(v.version, env!("CARGO_PKG_VERSION"));
    assert!(!v.commit.is_empty());
    assert_empty_ok(&send(&c, Method::GET, "/v1/ready", None).await);

    let raw = send(&c, Method::GET, "/v1/status", None).await;
    let s: serde_json::Value = json(&raw);
    for f in [
        "version",
        "os",
        "arch",
        "uptime",
        "num_cpu",
        "num_cpu_used",
        "mem_heap_used",
        "mem_stack_used",
        "keystore_latency",
    ] {
        assert!(s.get(f).is_some(), "status lacks {f}: {s}");
    }
    assert!(s["keystore_latency"].as_u64().unwrap() >= 1);
    assert!(s.get("keystore_unreachable").is_none());
    assert!(s.get("keystore_unavailable").is_none());

    let routes: Vec<api::ApiRoute> = json(&send(&c, Method::GET, "/v1/api", None).await);
    assert_eq!(
        routes.len(),
        26,
        "KES's 22, /v1/metrics/kesh and the three key-version routes"
    );
    let find = |p: &str| routes.iter().find(|r| r.path == p).unwrap().clone();
    assert_eq!(
        find("/v1/key/generate/"),
        api::ApiRoute {
            method: "PUT".into(),
            path: "/v1/key/generate/".into(),
            max_body: 1_000_000,
            timeout: 15
        }
    );
    assert_eq!(
        find("/version"),
        api::ApiRoute {
            method: "GET".into(),
            path: "/version".into(),
            max_body: 0,
            timeout: 10
        }
    );
    assert_eq!(find("/v1/log/audit").timeout, 0);
    assert_eq!(find("/v1/key/delete/").method, "DELETE");

    assert_eq!(find("/v1/metrics/kesh").method, "GET");

    let k = name("metrics");
    c.create_key(&k).await.unwrap();
    c.generate_key(&k, b"").await.unwrap();
    let _ = c.describe_key("no-such-key").await;
    let raw = send(&c, Method::GET, "/v1/metrics", None).await;
    assert_eq!(raw.status, 200);
    assert_eq!(
        raw.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8; escaping=underscores"
    );
    let text = String::from_utf8(raw.body.to_vec()).unwrap();
    let families = decode_like_kms_go(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    for family in KES_METRIC_FAMILIES {
        assert!(
            families.contains(family),
            "/v1/metrics lacks {family}:\n{text}"
        );
    }
    assert!(
        !text.contains("kesh_"),
        "kesh's families are on /v1/metrics/kesh:\n{text}"
    );
    for needle in [
        "# TYPE kes_http_request_active gauge",
        "kes_http_request_success{code=\"200\"} 2",
        "kes_http_request_error{code=\"404\"} 1",
        "# TYPE kes_http_response_time histogram",
        "kes_http_response_time_bucket{le=\"+Inf\"} 3",
        "kes_log_audit_events 0",
        "kes_system_up_time ",
        "kes_system_num_cpu ",
    ] {
        assert!(text.contains(needle), "metrics lack {needle:?}:\n{text}");
    }

    let raw = send(&c, Method::GET, "/v1/metrics/kesh", None).await;
    assert_eq!(
        raw.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8; escaping=underscores"
    );
    let all = String::from_utf8(raw.body.to_vec()).unwrap();
    for needle in [
        "kes_http_request_success{code=\"200\"} 2",
        "kesh_keystore_operation_seconds_count{op=\"generate\"} 1",
        "kesh_keystore_errors_total{kind=\"key_not_found\",op=\"describe\"} 1",
        &format!("kesh_seals_total{{key=\"{k}\"}} 1"),
    ] {
        assert!(all.contains(needle), "kesh metrics lack {needle:?}:\n{all}");
    }
    for hsm_family in [
        "kesh_hsm_sessions{state=\"size\"} ",
        "kesh_hsm_login_refused 0\n",
    ] {
        assert_eq!(all.contains(hsm_family), hsm, "{hsm_family}:\n{all}");
    }
    // The generate above ran on the device, and its time there is counted.
    let device_seconds = all
        .lines()
        .find_map(|l| l.strip_prefix("kesh_hsm_call_seconds_total "))
        .map(|v| v.parse::<f64>().unwrap());
    assert_eq!(device_seconds.is_some_and(|s| s > 0.0), hsm, "{all}");
}

/// The families MinIO reads from `/v1/metrics` (kms-go `kes.Client.Metrics`); the three
/// request counters appear after the first request of their class, as in KES.
const KES_METRIC_FAMILIES: [&str; 13] = [
    "kes_http_request_active",
    "kes_http_request_error",
    "kes_http_request_success",
    "kes_http_response_time",
    "kes_log_audit_events",
    "kes_log_error_events",
    "kes_system_mem_heap_objects",
    "kes_system_mem_heap_used",
    "kes_system_mem_stack_used",
    "kes_system_num_cpu",
    "kes_system_num_cpu_used",
    "kes_system_num_threads",
    "kes_system_up_time",
];

/// Decodes a metrics page the way kms-go's `kes.Client.Metrics` does (Prometheus' text
/// decoder, then its checks): a family with no series is refused, and so is one with more than
/// one series unless it is one of the three `kes_http_request_*` counters, which it sums.
/// Returns the family names.
fn decode_like_kms_go(text: &str) -> Result<std::collections::BTreeSet<String>, String> {
    use std::collections::BTreeSet;
    let mut kinds = BTreeMap::new();
    let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or("TYPE without a kind")?;
            kinds.insert(name.to_owned(), kind.to_owned());
            series.entry(name.to_owned()).or_default();
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (sample, value) = line.rsplit_once(' ').ok_or("sample without a value")?;
        value.parse::<f64>().map_err(|e| format!("{line}: {e}"))?;
        let (name, labels) = match sample.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').ok_or("unclosed labels")?),
            None => (sample, ""),
        };
        // A histogram's buckets, sum and count are one series per label set without `le`.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|f| kinds.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        let labels: Vec<&str> = labels
            .split(',')
            .filter(|l| !l.is_empty() && !l.starts_with("le="))
            .collect();
        series
            .entry(family.to_owned())
            .or_default()
            .insert(labels.join(","));
    }
    const SUMMED: [&str; 3] = [
        "kes_http_request_success",
        "kes_http_request_error",
        "kes_http_request_failure",
    ];
    for (family, s) in &series {
        if s.is_empty() {
            return Err(format!(
                "kes: server response contains no metric ({family})"
            ));
        }
        if s.len() > 1 && !SUMMED.contains(&family.as_str()) {
            return Err(format!(
                "kes: server response contains more than one metric ({family})"
            ));
        }
    }
    Ok(series.into_keys().collect())
}
