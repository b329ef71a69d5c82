//! The client commands: one function per `kes` command, each a few API calls and a printout.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::json;

use kesh::api;

use super::client::Conn;
use super::output::{self, b64, fields, unb64, Table};
use super::{
    ClientOpts, Fatal, KeyCommand, LogArgs, LsArgs, MetricArgs, PolicyCommand, StatusArgs,
};

pub(super) async fn key(cmd: KeyCommand) -> Result<(), Fatal> {
    match cmd {
        KeyCommand::Create { opts, names } => change_keys(&opts, &names, KeyChange::Create).await,
        KeyCommand::Import {
            opts,
            name,
            key,
            cipher,
        } => {
            let bytes = zeroize::Zeroizing::new(unb64("the key", &key)?);
            if bytes.len() != 32 {
                return Err(Fatal(format!(
                    "the key is {} bytes; it must be 32 bytes (base64 of 32 random bytes, e.g. `head -c 32 /dev/urandom | base64`)",
                    bytes.len()
                )));
            }
            let conn = Conn::new(&opts, None)?;
            let (n, b, ci) = (&name, &bytes, &cipher);
            conn.call(|c| async move { c.import_key(n, b, ci).await })
                .await?;
            done(&opts, &name, "imported")
        }
        KeyCommand::Info { opts, names } => {
            let conn = Conn::new(&opts, None)?;
            let mut table =
                Table::new(&["Name", "Algorithm", "Version", "Created At", "Created By"]);
            for name in &names {
                let d = conn
                    .call(|c| async move { c.describe_key(name).await })
                    .await?;
                if opts.json {
                    output::json(&d)?;
                } else {
                    table.row(vec![
                        d.name,
                        d.algorithm,
                        d.version.to_string(),
                        output::time(&d.created_at),
                        d.created_by,
                    ]);
                }
            }
            if !opts.json {
                table.print()?;
            }
            Ok(())
        }
        KeyCommand::Rotate { opts, name } => {
            let conn = Conn::new(&opts, None)?;
            let n = &name;
            let r = conn.call(|c| async move { c.rotate_key(n).await }).await?;
            if opts.json {
                output::json(&r)
            } else {
                output::line(&format!(
                    "rotated key '{}': version {} seals from now on",
                    r.name, r.version
                ))
            }
        }
        KeyCommand::Versions { opts, name } => {
            let conn = Conn::new(&opts, None)?;
            let n = &name;
            let r = conn
                .call(|c| async move { c.key_versions(n).await })
                .await?;
            if opts.json {
                return output::json(&r);
            }
            let mut table = Table::new(&[
                "Version",
                "State",
                "Created At",
                "Seals",
                "Unseals",
                "Last Used",
            ]);
            for v in r.versions {
                table.row(vec![
                    v.version.to_string(),
                    v.state,
                    output::time(&v.created_at),
                    v.seals.to_string(),
                    v.unseals.to_string(),
                    v.last_used.unwrap_or_else(|| "-".into()),
                ]);
            }
            table.print()
        }
        KeyCommand::DestroyVersion {
            opts,
            name,
            version,
        } => {
            let conn = Conn::new(&opts, None)?;
            let n = &name;
            conn.call(|c| async move { c.destroy_key_version(n, version).await })
                .await?;
            if opts.json {
                output::json(&json!({ "name": name, "version": version, "status": "destroyed" }))
            } else {
                output::line(&format!("destroyed version {version} of key '{name}'"))
            }
        }
        KeyCommand::Ls { opts, pattern } => {
            let conn = Conn::new(&opts, None)?;
            let names = list_keys(&conn, &pattern).await?;
            print_names(&opts, "Key", "names", &names)
        }
        KeyCommand::Rm { opts, names } => change_keys(&opts, &names, KeyChange::Delete).await,
        KeyCommand::Dek {
            opts,
            name,
            context,
        } => {
            let context = context_bytes(context.as_deref())?;
            let conn = Conn::new(&opts, None)?;
            let (n, ctx) = (&name, &context);
            let r = conn
                .call(|c| async move { c.generate_key(n, ctx).await })
                .await?;
            let (pt, ct) = (b64(&r.plaintext.0), b64(&r.ciphertext.0));
            if opts.json {
                output::json(&json!({ "plaintext": pt, "ciphertext": ct }))
            } else {
                fields(&[("Plaintext", pt), ("Ciphertext", ct)])
            }
        }
        KeyCommand::Encrypt {
            opts,
            name,
            message,
            context,
        } => {
            let context = context_bytes(context.as_deref())?;
            let conn = Conn::new(&opts, None)?;
            let (n, m, ctx) = (&name, message.as_bytes(), &context);
            let ct = conn
                .call(|c| async move { c.encrypt(n, m, ctx).await })
                .await?;
            if opts.json {
                output::json(&json!({ "ciphertext": b64(&ct) }))
            } else {
                output::line(&b64(&ct))
            }
        }
        KeyCommand::Decrypt {
            opts,
            name,
            ciphertext,
            context,
        } => {
            let ct = unb64("the ciphertext", &ciphertext)?;
            let context = context_bytes(context.as_deref())?;
            let conn = Conn::new(&opts, None)?;
            let (n, ct, ctx) = (&name, &ct, &context);
            let pt = conn
                .call(|c| async move { c.decrypt(n, ct, ctx).await })
                .await?;
            let pt = zeroize::Zeroizing::new(b64(&pt.0));
            if opts.json {
                output::json(&json!({ "plaintext": pt.as_str() }))
            } else {
                output::line(&pt)
            }
        }
    }
}

/// Confirms a change: a JSON line, or a sentence.
/// The `--context` argument: base64, empty when left out.
fn context_bytes(context: Option<&str>) -> Result<Vec<u8>, Fatal> {
    context.map_or(Ok(Vec::new()), |c| unb64("the context", c))
}

/// What `kes key create` and `kes key rm` do to each named key.
#[derive(Clone, Copy)]
enum KeyChange {
    Create,
    Delete,
}

/// One call per named key, in order, each reported once it succeeded.
async fn change_keys(opts: &ClientOpts, names: &[String], change: KeyChange) -> Result<(), Fatal> {
    let conn = Conn::new(opts, None)?;
    for name in names {
        conn.call(|c| async move {
            match change {
                KeyChange::Create => c.create_key(name).await,
                KeyChange::Delete => c.delete_key(name).await,
            }
        })
        .await?;
        let what = match change {
            KeyChange::Create => "created",
            KeyChange::Delete => "deleted",
        };
        done(opts, name, what)?;
    }
    Ok(())
}

fn done(opts: &ClientOpts, name: &str, what: &str) -> Result<(), Fatal> {
    if opts.json {
        output::json(&json!({ "name": name, "status": what }))
    } else {
        output::line(&format!("{what} key '{name}'"))
    }
}

async fn list_keys(conn: &Conn, pattern: &str) -> Result<Vec<String>, Fatal> {
    conn.call(|c| async move { c.list_keys(pattern).await })
        .await
}

fn print_names(
    opts: &ClientOpts,
    header: &str,
    field: &str,
    names: &[String],
) -> Result<(), Fatal> {
    if opts.json {
        let mut m = serde_json::Map::new();
        m.insert(field.to_owned(), json!(names));
        output::json(&m)
    } else {
        let mut t = Table::new(&[header]);
        for n in names {
            t.row(vec![n.clone()]);
        }
        t.print()
    }
}

fn patterns(p: &api::PatternSet) -> Vec<String> {
    p.keys().cloned().collect()
}

pub(super) async fn policy(cmd: PolicyCommand) -> Result<(), Fatal> {
    match cmd {
        PolicyCommand::Info { opts, name } => {
            let conn = Conn::new(&opts, None)?;
            let n = &name;
            let d = conn
                .call(|c| async move { c.describe_policy(n).await })
                .await?;
            if opts.json {
                output::json(&d)
            } else {
                fields(&[
                    ("Name", d.name),
                    ("Created At", output::time(&d.created_at)),
                    ("Created By", d.created_by),
                ])
            }
        }
        PolicyCommand::Ls { opts, pattern } => {
            let conn = Conn::new(&opts, None)?;
            let p = &pattern;
            let names = conn
                .call(|c| async move { c.list_policies(p).await })
                .await?;
            print_names(&opts, "Policy", "names", &names)
        }
        PolicyCommand::Show { opts, name } => {
            let conn = Conn::new(&opts, None)?;
            let n = &name;
            let p = conn.call(|c| async move { c.read_policy(n).await }).await?;
            if opts.json {
                output::json(&p)
            } else {
                fields(&[
                    ("Name", p.name.clone()),
                    ("Allow", patterns(&p.allow).join(", ")),
                    ("Deny", patterns(&p.deny).join(", ")),
                    ("Created At", output::time(&p.created_at)),
                    ("Created By", p.created_by.clone()),
                ])
            }
        }
    }
}

pub(super) async fn identity_info(opts: ClientOpts, identity: Option<String>) -> Result<(), Fatal> {
    let conn = Conn::new(&opts, None)?;
    match identity {
        None => {
            let d = conn
                .call(|c| async move { c.describe_self().await })
                .await?;
            if opts.json {
                return output::json(&d);
            }
            let mut rows = vec![("Identity", d.identity.clone())];
            if d.admin {
                rows.push(("Admin", "yes".into()));
            } else {
                rows.push(("Policy", d.policy.clone()));
                rows.push(("Allow", patterns(&d.allow).join(", ")));
                rows.push(("Deny", patterns(&d.deny).join(", ")));
            }
            rows.push(("Created At", output::time(&d.created_at)));
            if !d.created_by.is_empty() {
                rows.push(("Created By", d.created_by.clone()));
            }
            fields(&rows)
        }
        Some(id) => {
            let i = &id;
            let d = conn
                .call(|c| async move { c.describe_identity(i).await })
                .await?;
            if opts.json {
                return output::json(&d);
            }
            let mut rows = vec![("Identity", id.clone())];
            if d.admin {
                rows.push(("Admin", "yes".into()));
            } else {
                rows.push(("Policy", d.policy.clone()));
            }
            rows.push(("Created At", output::time(&d.created_at)));
            if !d.created_by.is_empty() {
                rows.push(("Created By", d.created_by.clone()));
            }
            fields(&rows)
        }
    }
}

pub(super) async fn identity_ls(opts: ClientOpts, pattern: &str) -> Result<(), Fatal> {
    let conn = Conn::new(&opts, None)?;
    let ids = conn
        .call(|c| async move { c.list_identities(pattern).await })
        .await?;
    print_names(&opts, "Identity", "identities", &ids)
}

pub(super) async fn ls(args: LsArgs) -> Result<(), Fatal> {
    let conn = Conn::new(&args.opts, args.api_key.as_deref())?;
    let p = args.prefix.as_str();
    if args.identity {
        let ids = conn
            .call(|c| async move { c.list_identities(p).await })
            .await?;
        print_names(&args.opts, "Identity", "identities", &ids)
    } else if args.policy {
        let names = conn
            .call(|c| async move { c.list_policies(p).await })
            .await?;
        print_names(&args.opts, "Policy", "names", &names)
    } else {
        let names = list_keys(&conn, p).await?;
        print_names(&args.opts, "Key", "names", &names)
    }
}

pub(super) async fn status(args: StatusArgs) -> Result<(), Fatal> {
    let conn = Conn::new(&args.opts, None)?;
    let endpoint = super::client::endpoints(args.opts.server.as_deref())
        .into_iter()
        .next()
        .unwrap_or_default();
    let s = conn.call(|c| async move { c.status().await }).await?;
    let routes = if args.api {
        Some(conn.call(|c| async move { c.api().await }).await?)
    } else {
        None
    };
    if args.opts.json {
        let mut v = serde_json::to_value(&s).map_err(|e| Fatal(e.to_string()))?;
        if let (Some(routes), Some(m)) = (&routes, v.as_object_mut()) {
            m.insert("api".into(), json!(routes));
        }
        return output::json(&v);
    }
    let keystore = if s.keystore_unreachable {
        "unreachable".to_owned()
    } else {
        format!("reachable, {} ms", s.keystore_latency)
    };
    if args.short {
        return output::line(&format!("{endpoint}  online  keystore {keystore}"));
    }
    fields(&[
        ("Endpoint", endpoint),
        ("Version", s.version.clone()),
        ("OS/Arch", format!("{}/{}", s.os, s.arch)),
        ("Uptime", duration(s.uptime)),
        ("CPUs", format!("{} ({} used)", s.num_cpu, s.num_cpu_used)),
        (
            "Memory",
            format!(
                "{} heap, {} stack",
                bytes(s.mem_heap_used),
                bytes(s.mem_stack_used)
            ),
        ),
        ("Keystore", keystore),
    ])?;
    if let Some(mut routes) = routes {
        routes.sort_by(|a, b| a.path.cmp(&b.path));
        output::line("")?;
        let mut t = Table::new(&["Method", "Path", "Max Body", "Timeout"]);
        for r in routes {
            t.row(vec![
                r.method,
                r.path,
                r.max_body.to_string(),
                if r.timeout == 0 {
                    "none".into()
                } else {
                    format!("{}s", r.timeout)
                },
            ]);
        }
        t.print()?;
    }
    Ok(())
}

fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h {m}m")
    } else if h > 0 {
        format!("{h}h {m}m {s}s")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// One metrics snapshot, as kms-go's `kes.Metric` reads `/v1/metrics` (docs/api.md, `/v1/metrics`):
/// request counters summed over their `code` labels, the latency histogram in milliseconds.
#[derive(Debug, Default, Serialize)]
pub(super) struct Snapshot {
    pub kes_http_request_success: u64,
    pub kes_http_request_error: u64,
    pub kes_http_request_failure: u64,
    pub kes_http_request_active: u64,
    pub kes_log_audit_events: u64,
    pub kes_log_error_events: u64,
    /// Upper bound in milliseconds → cumulative count.
    pub kes_http_response_time: BTreeMap<u64, u64>,
    pub kes_system_up_time: f64,
    pub kes_system_num_cpu: u64,
    pub kes_system_num_cpu_used: u64,
    pub kes_system_num_threads: u64,
    pub kes_system_mem_heap_used: u64,
    pub kes_system_mem_heap_objects: u64,
    pub kes_system_mem_stack_used: u64,
}

/// Parses the Prometheus text exposition into a [`Snapshot`]; unknown families are ignored.
pub(super) fn parse_metrics(text: &str) -> Result<Snapshot, Fatal> {
    let mut s = Snapshot::default();
    for l in text.lines() {
        let l = l.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let (series, value) = l
            .rsplit_once(' ')
            .ok_or_else(|| Fatal(format!("invalid metrics line: {l}")))?;
        let value: f64 = value
            .parse()
            .map_err(|_| Fatal(format!("invalid metric value in: {l}")))?;
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let n = value as u64;
        match name {
            "kes_http_request_success" => s.kes_http_request_success += n,
            "kes_http_request_error" => s.kes_http_request_error += n,
            "kes_http_request_failure" => s.kes_http_request_failure += n,
            "kes_http_request_active" => s.kes_http_request_active = n,
            "kes_log_audit_events" => s.kes_log_audit_events = n,
            "kes_log_error_events" => s.kes_log_error_events = n,
            "kes_http_response_time_bucket" => {
                let le = labels
                    .split(',')
                    .find_map(|kv| kv.trim().strip_prefix("le="))
                    .map(|v| v.trim_matches('"'))
                    .unwrap_or("");
                // kms-go skips +Inf (which Rust would parse as infinity).
                if let Some(bound) = le.parse::<f64>().ok().filter(|b| b.is_finite()) {
                    s.kes_http_response_time
                        .insert((bound * 1000.0).round() as u64, n);
                }
            }
            "kes_system_up_time" => s.kes_system_up_time = value,
            "kes_system_num_cpu" => s.kes_system_num_cpu = n,
            "kes_system_num_cpu_used" => s.kes_system_num_cpu_used = n,
            "kes_system_num_threads" => s.kes_system_num_threads = n,
            "kes_system_mem_heap_used" => s.kes_system_mem_heap_used = n,
            "kes_system_mem_heap_objects" => s.kes_system_mem_heap_objects = n,
            "kes_system_mem_stack_used" => s.kes_system_mem_stack_used = n,
            _ => {}
        }
    }
    Ok(s)
}

pub(super) async fn metric(args: MetricArgs) -> Result<(), Fatal> {
    let rate = match &args.rate {
        Some(r) => Some(
            kesh::config::parse_duration(r)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    Fatal(format!(
                        "--rate '{r}' is not a duration: write e.g. 5s or 500ms"
                    ))
                })?,
        ),
        None => None,
    };
    let count = args.count.unwrap_or(if rate.is_some() { 0 } else { 1 });
    let conn = Conn::new(&args.opts, None)?;
    let mut n = 0u64;
    loop {
        let text = conn.call(|c| async move { c.metrics().await }).await?;
        let s = parse_metrics(&text)?;
        if args.opts.json {
            output::json(&s)?;
        } else {
            print_snapshot(&s, n > 0)?;
        }
        n += 1;
        if count != 0 && n >= count {
            return Ok(());
        }
        match rate {
            Some(r) => tokio::time::sleep(r).await,
            None => return Ok(()),
        }
    }
}

fn print_snapshot(s: &Snapshot, separate: bool) -> Result<(), Fatal> {
    if separate {
        output::line("")?;
    }
    let total = s.kes_http_request_success + s.kes_http_request_error + s.kes_http_request_failure;
    let mut rows = vec![
        ("Requests", total.to_string()),
        ("  OK (2xx)", s.kes_http_request_success.to_string()),
        ("  Errors (4xx)", s.kes_http_request_error.to_string()),
        ("  Failures (5xx)", s.kes_http_request_failure.to_string()),
        ("  Active", s.kes_http_request_active.to_string()),
        ("Audit events", s.kes_log_audit_events.to_string()),
        ("Error events", s.kes_log_error_events.to_string()),
        ("Uptime", duration(s.kes_system_up_time as u64)),
        (
            "CPUs",
            format!(
                "{} ({} used)",
                s.kes_system_num_cpu, s.kes_system_num_cpu_used
            ),
        ),
        ("Threads", s.kes_system_num_threads.to_string()),
        ("Heap", bytes(s.kes_system_mem_heap_used)),
    ];
    let hist: Vec<String> = s
        .kes_http_response_time
        .iter()
        .map(|(ms, n)| format!("≤{ms}ms: {n}"))
        .collect();
    if !hist.is_empty() {
        rows.push(("Latency", hist.join("  ")));
    }
    fields(&rows)
}

pub(super) async fn log(args: LogArgs) -> Result<(), Fatal> {
    let path = if args.error {
        "/v1/log/error"
    } else {
        "/v1/log/audit"
    };
    let conn = Conn::new(&args.opts, None)?;
    let mut stream = conn.call(|c| async move { c.stream(path).await }).await?;
    let mut n = 0u64;
    if args.count == Some(0) {
        return Ok(());
    }
    while let Some(line) = stream
        .next_line()
        .await
        .map_err(|e| Fatal(format!("log stream: {e}")))?
    {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if args.opts.json {
            output::line(&String::from_utf8_lossy(&line))?;
        } else if args.error {
            match serde_json::from_slice::<api::ErrorEvent>(&line) {
                Ok(e) => output::line(&e.message)?,
                Err(_) => output::line(&String::from_utf8_lossy(&line))?,
            }
        } else {
            match serde_json::from_slice::<api::AuditEvent>(&line) {
                Ok(e) => output::line(&format!(
                    "{}  {}  {:<15}  {}  {}  {}ms",
                    output::time(&e.time),
                    e.response.code,
                    e.request.ip,
                    if e.request.identity.is_empty() {
                        "-"
                    } else {
                        &e.request.identity
                    },
                    e.request.path,
                    e.response.time
                ))?,
                Err(_) => output::line(&String::from_utf8_lossy(&line))?,
            }
        }
        n += 1;
        if args.count.is_some_and(|c| n >= c) {
            return Ok(());
        }
    }
    Err(Fatal("the server closed the log stream".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_snapshot_sums_codes() {
        let text = "# HELP x\nkes_http_request_success{code=\"200\"} 5\nkes_http_request_success{code=\"201\"} 1\nkes_http_request_error{code=\"404\"} 2\nkes_http_response_time_bucket{le=\"0.01\"} 3\nkes_http_response_time_bucket{le=\"+Inf\"} 9\nkes_system_up_time 12.5\nkes_system_num_cpu 2\n";
        let s = parse_metrics(text).unwrap_or_else(|f| panic!("{}", f.0));
        assert_eq!(s.kes_http_request_success, 6);
        assert_eq!(s.kes_http_request_error, 2);
        assert_eq!(s.kes_http_response_time.get(&10), Some(&3));
        assert_eq!(s.kes_http_response_time.len(), 1);
        assert_eq!(s.kes_system_num_cpu, 2);
        assert!((s.kes_system_up_time - 12.5).abs() < 1e-9);
        assert_eq!(duration(3661), "1h 1m 1s");
        assert_eq!(bytes(2048), "2.0 KiB");
    }
}
