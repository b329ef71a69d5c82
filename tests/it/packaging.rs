//! `packaging/`: the systemd unit and its drop-ins. Where `systemd-analyze` exists the unit is
//! verified by systemd itself; everywhere its required directives are checked in the text.

use std::path::{Path, PathBuf};
use std::process::Command;

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging")
}

/// `[Service]` entries of a unit file as (key, value) pairs, comments dropped, in file order.
fn service_entries(text: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if let (true, Some((k, v))) = (in_service, line.split_once('=')) {
            out.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

fn value<'a>(entries: &'a [(String, String)], key: &str) -> Option<&'a str> {
    entries
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The unit's security-relevant directives, read from its text (works without systemd).
#[test]
fn unit_has_required_directives() {
    let text = std::fs::read_to_string(packaging().join("kesh.service")).unwrap();
    let entries = service_entries(&text);
    for (key, want) in [
        ("User", "kesh"),
        ("Group", "kesh"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("LimitMEMLOCK", "infinity"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("LimitCORE", "0"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(value(&entries, key), Some(want), "kesh.service: {key}=");
    }
    let env_file = value(&entries, "EnvironmentFile").expect("EnvironmentFile= for the PIN");
    assert!(
        !env_file.starts_with('-'),
        "the PIN file must be required, not optional: {env_file}"
    );
    let exec = value(&entries, "ExecStart").expect("ExecStart=");
    assert!(
        exec.ends_with("kesh server --config /etc/kesh/config.yaml"),
        "{exec}"
    );
    // The base unit is for network HSMs: it may write nowhere. Writable paths belong in the
    // per-HSM drop-ins.
    assert_eq!(value(&entries, "ReadWritePaths"), None, "kesh.service");
    for (dropin, path) in [
        ("softhsm.conf", "/var/lib/kesh/softhsm"),
        ("nshield.conf", "/opt/nfast/kmdata/local"),
    ] {
        let text = std::fs::read_to_string(packaging().join("kesh.service.d").join(dropin))
            .unwrap_or_else(|e| panic!("{dropin}: {e}"));
        let entries = service_entries(&text);
        let rw: Vec<_> = entries
            .iter()
            .filter(|(k, _)| k == "ReadWritePaths")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(rw, vec![path], "{dropin}: exactly one writable path");
        for (k, _) in &entries {
            assert!(
                !matches!(
                    k.as_str(),
                    "NoNewPrivileges" | "ProtectSystem" | "User" | "CapabilityBoundingSet"
                ),
                "{dropin} must not relax {k}"
            );
        }
    }
}

/// `systemd-analyze verify` accepts the unit (with ExecStart pointed at the built binary, since
/// verify checks that the command exists). Skipped, with a message, where systemd is absent.
#[test]
fn unit_passes_systemd_analyze_verify() {
    let probe = Command::new("systemd-analyze").arg("--version").output();
    if !matches!(&probe, Ok(out) if out.status.success()) {
        crate::harness::report(
            "SKIP systemd-analyze verify: systemd-analyze is not installed here; \
             unit_has_required_directives still checks the unit's text",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(packaging().join("kesh.service")).unwrap();
    assert!(text.contains("ExecStart=/usr/bin/kesh "));
    let unit = dir.path().join("kesh.service");
    std::fs::write(
        &unit,
        text.replace("/usr/bin/kesh", env!("CARGO_BIN_EXE_kesh")),
    )
    .unwrap();
    // The per-HSM drop-ins beside it, where verify loads them with the unit.
    let dropins = dir.path().join("kesh.service.d");
    std::fs::create_dir(&dropins).unwrap();
    for entry in std::fs::read_dir(packaging().join("kesh.service.d")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dropins.join(path.file_name().unwrap())).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys and bad values and only prints them: any line about our
    // unit is a failure.
    let complaints: Vec<_> = stderr
        .lines()
        .filter(|l| l.contains("kesh.service"))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    crate::harness::report("systemd-analyze verify: kesh.service and its drop-ins are clean");
}

/// `kesh --version` names the version, the commit, the compiler and the build date (or says
/// there is none), so a running binary can be matched with the SBOM of its commit.
#[test]
fn version_names_commit_compiler_and_date() {
    let out = Command::new(env!("CARGO_BIN_EXE_kesh"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success(), "kesh --version: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no `{name}` line in:\n{text}"))
            .trim()
            .to_owned()
    };
    assert_eq!(
        text.lines().next(),
        Some(concat!("kesh ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );

    let commit = field("commit:");
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    match head {
        Ok(head) if head.status.success() => {
            assert_eq!(commit, String::from_utf8(head.stdout).unwrap().trim());
        }
        // A source tarball: build.rs fell back to KESH_GIT_COMMIT or "unknown".
        _ => assert!(!commit.is_empty()),
    }

    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc = Command::new(rustc).arg("-V").output().unwrap();
    assert_eq!(
        field("rustc:"),
        String::from_utf8(rustc.stdout).unwrap().trim()
    );

    let date = field("build date:");
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(_) => assert!(date.ends_with("Z (SOURCE_DATE_EPOCH)"), "{date}"),
        Err(_) => assert_eq!(date, "none recorded (reproducible build)"),
    }
    assert!(!field("target:").is_empty());

    // `-V` stays one line for scripts that parse it.
    let short = Command::new(env!("CARGO_BIN_EXE_kesh"))
        .arg("-V")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(short.stdout).unwrap().trim(),
        concat!("kesh ", env!("CARGO_PKG_VERSION"))
    );
}
