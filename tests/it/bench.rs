//! `kesh bench` against a `kesh server` child, over HTTP/2 and HTTP/1.1: it runs, checks every
//! answer and reports a consistent JSON record. Functional only: nothing here is timed.

use std::process::{Command, Stdio};

use serde_json::Value;

use crate::harness::{server, ServerProcess};

/// `kesh bench --json <args>` as `srv`'s admin; the parsed record.
fn bench(srv: &ServerProcess, args: &[&str]) -> Value {
    let pid = srv.pid().to_string();
    let out = Command::new(crate::harness::command::BIN)
        .args([
            "bench", "--json", "-k", "--server", &srv.addr, "--pid", &pid,
        ])
        .args(["--duration", "1500ms", "--warmup", "200ms"])
        .args(args)
        .env("KES_API_KEY", &*srv.admin.expose_text())
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
    let srv = server().spawn();
    let key = format!("bench-{}", std::process::id());
    let r = bench(&srv, &["--op", "generate", "-c", "4", "--key", &key]);
    check(&r, "generate", "h2", 1, 4);
    let r = bench(&srv, &["--op", "decrypt", "-c", "3", "--key", &key]);
    check(&r, "decrypt", "h2", 1, 3);
    let r = bench(
        &srv,
        &[
            "--op", "mixed", "-c", "4", "--key", &key, "--http1", "--conns", "2",
        ],
    );
    check(&r, "mixed", "http1", 2, 4);
    let r = bench(
        &srv,
        &["--op", "describe", "-c", "2", "--key", &key, "--http1"],
    );
    check(&r, "describe", "http1", 2, 2);
    // The soft keystore makes no device calls, and says so by leaving the figure out.
    assert!(r["device_us_per_op"].is_null(), "{r}");
}

#[test]
fn on_an_hsm_bench_reports_the_time_spent_in_device_calls() {
    // Every PKCS#11 call takes at least 1 ms, and a generate makes two (IVs and DEKs come
    // from the random pool, drawn in bulk).
    let srv = crate::faults::faulty_server(2, "5s", "latency 1000 *\n").spawn();
    let key = format!("bench-hsm-{}", std::process::id());
    let r = bench(&srv, &["--op", "generate", "-c", "1", "--key", &key]);
    check(&r, "generate", "h2", 1, 1);
    let device = r["device_us_per_op"]
        .as_f64()
        .unwrap_or_else(|| panic!("{r}"));
    let p50 = r["p50_us"].as_f64().unwrap();
    assert!(
        (2000.0..p50 * 1.5).contains(&device),
        "2 calls of ≥ 1 ms each, within the latency: {r}"
    );
}
