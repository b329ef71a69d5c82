//! Build facts for `kesh --version`, so an auditor can tie a running binary to a commit, a
//! compiler and the SBOM made from the same checkout (docs/install.md, "Verifying").
//!
//! Nothing here reads the clock: the build date is `SOURCE_DATE_EPOCH` when it is set (the
//! release script sets it to the commit's time), else none at all, so two builds of one commit
//! can be byte-identical.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=KESH_GIT_COMMIT");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");

    let commit = git_commit().unwrap_or_else(|| {
        std::env::var("KESH_GIT_COMMIT")
            .ok()
            .filter(|c| !c.trim().is_empty())
            .map(|c| c.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned())
    });
    println!("cargo:rustc-env=KESH_GIT_COMMIT={commit}");

    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let rustc_version = Command::new(&rustc)
        .arg("-V")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=KESH_RUSTC_VERSION={rustc_version}");

    let built = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(epoch) => {
            let secs: i64 = epoch
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("SOURCE_DATE_EPOCH is not a number: {epoch:?}"));
            format!("{} (SOURCE_DATE_EPOCH)", utc_date(secs))
        }
        Err(_) => "none recorded (reproducible build)".to_owned(),
    };
    println!("cargo:rustc-env=KESH_BUILD_DATE={built}");
    println!(
        "cargo:rustc-env=KESH_BUILD_TARGET={}",
        std::env::var("TARGET").unwrap_or_default()
    );
}

/// `git rev-parse HEAD` of the checkout, with rerun triggers on the files that move when HEAD
/// does. In a worktree `.git` is a file and the branch ref lives in the common directory, so
/// both directories come from git itself rather than from `.git/`.
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).output().ok()?;
        if !out.status.success() {
            return None;
        }
        Some(String::from_utf8(out.stdout).ok()?.trim().to_owned())
    };
    let commit = git(&["rev-parse", "HEAD"])?;
    if commit.len() != 40 && commit.len() != 64 {
        return None;
    }
    let abs = |p: String| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join(p)
        }
    };
    let git_dir = abs(git(&["rev-parse", "--git-dir"])?);
    let common_dir = abs(git(&["rev-parse", "--git-common-dir"])?);
    let mut watch = vec![git_dir.join("HEAD"), common_dir.join("packed-refs")];
    if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(common_dir.join(&reference));
        watch.push(git_dir.join(&reference));
    }
    // A watched path that does not exist would make cargo rerun this script on every build.
    for path in watch.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    Some(commit)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch (proleptic Gregorian, UTC).
fn utc_date(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
