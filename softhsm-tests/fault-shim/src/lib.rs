//! A PKCS#11 module that forwards every call to a real one (SoftHSM) and injects faults.
//!
//! kesh loads it exactly as it loads a vendor module. The real module is
//! `KESH_SHIM_TARGET` (default: SoftHSM's usual paths). Faults come from the control file named
//! by `KESH_SHIM_CONTROL`, re-read whenever it changes; every change starts the rules afresh.
//! One rule a line:
//!
//! ```text
//! fail <CKR_NAME|0xHEX> <C_Function,...|*> [count=N] [until=<unix ms>]
//! latency <microseconds> <C_Function,...|*>
//! toosmall <length> <C_Encrypt|C_Decrypt,...> [count=N]
//! ```
//!
//! `fail` answers the named functions with the code instead of calling the real module: for
//! the next `count` calls, or until the time, or (with neither) until the line is removed.
//! `latency` sleeps before forwarding. `fail CKR_GENERAL_ERROR C_Initialize` makes
//! `C_Initialize` fail until told otherwise. `toosmall` answers a one-shot `C_Encrypt` or
//! `C_Decrypt` with `CKR_BUFFER_TOO_SMALL` and claims to need `length` bytes, without calling
//! the real module, whose operation therefore stays active (a module that misreports
//! lengths).
//!
//! With `KESH_SHIM_STATS` set, the number of calls so far is written to that file: the total
//! on the first line, then one `C_Function count` line per function called. A thread of the
//! shim rewrites it within 20 ms of a change (benches count calls per operation with it; the
//! fault tests count logins).
//!
//! With `KESH_SHIM_PERSONALITY` set to a vendor (`luna`, `nshield`, `cloudhsm`, `yubihsm`,
//! `utimaco`), the shim also behaves as that vendor's module documents it does where it differs
//! from SoftHSM (GCM IVs, unsupported functions and mechanisms, template limits, session
//! limits, manufacturer strings): see [`personality`].

#![allow(non_snake_case)]

mod functions;
pub mod personality;

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cryptoki_sys::*;

const SOFTHSM_PATHS: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

struct Real {
    _lib: libloading::Library,
    list: CK_FUNCTION_LIST,
}

// SAFETY: the function list is plain data (version and function pointers) that never changes
// after loading; the library handle is only kept alive.
unsafe impl Sync for Real {}
unsafe impl Send for Real {}

fn load_real() -> Result<Real, String> {
    let path = std::env::var_os("KESH_SHIM_TARGET")
        .map(PathBuf::from)
        .or_else(|| SOFTHSM_PATHS.iter().map(PathBuf::from).find(|p| p.exists()))
        .ok_or("no target module: set KESH_SHIM_TARGET or install softhsm2")?;
    // SAFETY: loading a PKCS#11 module runs its initialisers, which is what it is built for.
    let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| e.to_string())?;
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: C_GetFunctionList is the PKCS#11 entry point with exactly this signature.
    let rv = unsafe {
        let get: libloading::Symbol<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV> =
            lib.get(b"C_GetFunctionList\0").map_err(|e| e.to_string())?;
        get(&mut list)
    };
    if rv != CKR_OK || list.is_null() {
        return Err(format!(
            "C_GetFunctionList of {} returned {rv:#x}",
            path.display()
        ));
    }
    // SAFETY: the module returned a valid pointer to its static function list.
    let list = unsafe { *list };
    Ok(Real { _lib: lib, list })
}

fn real_module() -> Option<&'static Real> {
    static REAL: OnceLock<Result<Real, String>> = OnceLock::new();
    REAL.get_or_init(load_real).as_ref().ok()
}

/// The real module's function list (loaded by `C_GetFunctionList` before any other call).
pub(crate) fn real() -> &'static CK_FUNCTION_LIST {
    static EMPTY: OnceLock<CK_FUNCTION_LIST> = OnceLock::new();
    match real_module() {
        Some(r) => &r.list,
        // SAFETY: an all-zero function list is valid: every entry is `None`.
        None => EMPTY.get_or_init(|| unsafe { std::mem::zeroed() }),
    }
}

/// The PKCS#11 entry point.
///
/// # Safety
/// `list` must be a valid pointer to writable storage for one pointer.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    static WRAPPED: OnceLock<usize> = OnceLock::new();
    if list.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    let Some(real) = real_module() else {
        return CKR_GENERAL_ERROR;
    };
    // Leaked once: the list must outlive every caller, as a module's static list does.
    let ptr = *WRAPPED.get_or_init(|| {
        let mut list = functions::wrapped(&real.list);
        personality::install(&mut list);
        Box::into_raw(Box::new(list)) as usize
    });
    // SAFETY: checked non-null above; the caller owns the storage.
    unsafe { *list = ptr as *mut CK_FUNCTION_LIST };
    CKR_OK
}

/// A rule of the control file.
#[derive(Debug, Clone, PartialEq)]
enum Rule {
    Fail {
        rv: CK_RV,
        functions: Vec<String>,
        count: Option<u64>,
        until_ms: Option<u128>,
    },
    Latency {
        micros: u64,
        functions: Vec<String>,
    },
    TooSmall {
        length: CK_ULONG,
        functions: Vec<String>,
        count: Option<u64>,
    },
}

fn matches(functions: &[String], name: &str) -> bool {
    functions.iter().any(|f| f == "*" || f == name)
}

fn rv_named(s: &str) -> Option<CK_RV> {
    Some(match s {
        "CKR_GENERAL_ERROR" => CKR_GENERAL_ERROR,
        "CKR_DEVICE_ERROR" => CKR_DEVICE_ERROR,
        "CKR_DEVICE_REMOVED" => CKR_DEVICE_REMOVED,
        "CKR_DEVICE_MEMORY" => CKR_DEVICE_MEMORY,
        "CKR_SESSION_HANDLE_INVALID" => CKR_SESSION_HANDLE_INVALID,
        "CKR_SESSION_CLOSED" => CKR_SESSION_CLOSED,
        "CKR_USER_NOT_LOGGED_IN" => CKR_USER_NOT_LOGGED_IN,
        "CKR_TOKEN_NOT_PRESENT" => CKR_TOKEN_NOT_PRESENT,
        "CKR_CRYPTOKI_NOT_INITIALIZED" => CKR_CRYPTOKI_NOT_INITIALIZED,
        "CKR_SESSION_COUNT" => CKR_SESSION_COUNT,
        "CKR_FUNCTION_FAILED" => CKR_FUNCTION_FAILED,
        "CKR_PIN_INCORRECT" => CKR_PIN_INCORRECT,
        "CKR_PIN_LOCKED" => CKR_PIN_LOCKED,
        _ => CK_RV::from_str_radix(s.strip_prefix("0x")?, 16).ok()?,
    })
}

/// Parses the control file; unreadable lines are ignored (and reported once on stderr).
fn parse(text: &str) -> Vec<Rule> {
    let mut rules = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        let rule = match words.as_slice() {
            ["fail", rv, functions, options @ ..] => rv_named(rv).map(|rv| {
                let mut count = None;
                let mut until_ms = None;
                for o in options {
                    if let Some(n) = o.strip_prefix("count=") {
                        count = n.parse().ok();
                    } else if let Some(t) = o.strip_prefix("until=") {
                        until_ms = t.parse().ok();
                    }
                }
                Rule::Fail {
                    rv,
                    functions: functions.split(',').map(str::to_owned).collect(),
                    count,
                    until_ms,
                }
            }),
            ["latency", micros, functions] => micros.parse().ok().map(|micros| Rule::Latency {
                micros,
                functions: functions.split(',').map(str::to_owned).collect(),
            }),
            ["toosmall", length, functions, options @ ..] => {
                length.parse().ok().map(|length| Rule::TooSmall {
                    length,
                    functions: functions.split(',').map(str::to_owned).collect(),
                    count: options
                        .iter()
                        .find_map(|o| o.strip_prefix("count=")?.parse().ok()),
                })
            }
            _ => None,
        };
        match rule {
            Some(r) => rules.push(r),
            None => eprintln!("kesh-fault-shim: ignoring control line {line:?}"),
        }
    }
    rules
}

struct Control {
    /// What the rules were parsed from: changes of the file restart them.
    seen: Option<String>,
    /// The file's metadata when last read, and when that was.
    stat: Option<(SystemTime, SystemTime, u64, u64)>,
    read_at: Option<Instant>,
    rules: Vec<Rule>,
}

/// The control file's modification and change times, inode and length.
fn stat_of(path: &std::ffi::OsStr) -> Option<(SystemTime, SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    let changed = UNIX_EPOCH + Duration::new(m.ctime().max(0) as u64, m.ctime_nsec() as u32);
    Some((m.modified().ok()?, changed, m.ino(), m.len()))
}

/// How long rules read from an unchanged-looking file are trusted: a rewrite within one
/// timestamp tick that keeps the length is still picked up this soon.
const REREAD: Duration = Duration::from_millis(50);

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Calls so far, by function. Locked once per call; the control rules take a lock per call
/// too, and the latency benchmarks measured no difference.
static CALLS: Mutex<Option<std::collections::BTreeMap<&'static str, u64>>> = Mutex::new(None);

/// Calls that start or end a module's, a session's or a login's life: rare, and often the
/// last a process makes before it exits, so their counts are written at once.
const LIFECYCLE: [&str; 5] = [
    "C_Initialize",
    "C_Finalize",
    "C_OpenSession",
    "C_CloseSession",
    "C_Login",
];

/// Counts a call; the first one starts the thread that writes `KESH_SHIM_STATS`.
fn count_call(function: &'static str) {
    static WRITER: OnceLock<()> = OnceLock::new();
    let mut calls = CALLS.lock().unwrap_or_else(|e| e.into_inner());
    *calls
        .get_or_insert_with(Default::default)
        .entry(function)
        .or_default() += 1;
    drop(calls);
    let Some(path) = std::env::var_os("KESH_SHIM_STATS").map(PathBuf::from) else {
        return;
    };
    if LIFECYCLE.contains(&function) {
        write_stats(&path);
    }
    WRITER.get_or_init(|| {
        let _ = std::thread::Builder::new()
            .name("kesh-shim-stats".into())
            .spawn(move || loop {
                write_stats(&path);
                std::thread::sleep(Duration::from_millis(20));
            });
    });
}

/// Rewrites the stats file when the counts changed since it was last written.
fn write_stats(path: &std::path::Path) {
    static WRITTEN: Mutex<Option<String>> = Mutex::new(None);
    let text = {
        let calls = CALLS.lock().unwrap_or_else(|e| e.into_inner());
        let calls = calls.iter().flatten();
        let total: u64 = calls.clone().map(|(_, n)| *n).sum();
        let mut text = format!("{total}\n");
        for (function, n) in calls {
            text.push_str(&format!("{function} {n}\n"));
        }
        text
    };
    let mut written = WRITTEN.lock().unwrap_or_else(|e| e.into_inner());
    if written.as_ref() == Some(&text) {
        return;
    }
    // Written aside and renamed, so a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, &text).is_ok() && std::fs::rename(&tmp, path).is_ok() {
        *written = Some(text);
    }
}

/// What a rule makes of one call.
enum Verdict {
    Fail(CK_RV),
    TooSmall(CK_ULONG),
}

/// Decides what happens to one call: `Some(rv)` to answer with a fault, `None` to forward
/// (after any latency).
pub(crate) fn before(function: &'static str) -> Option<CK_RV> {
    match decide(function, false)? {
        Verdict::Fail(rv) => Some(rv),
        Verdict::TooSmall(_) => None,
    }
}

/// [`before`] for a data call whose output length is `len`: `toosmall` rules apply too.
///
/// # Safety
/// `len` is the caller's output-length pointer: null or valid for one write.
pub(crate) unsafe fn before_output(function: &'static str, len: *mut CK_ULONG) -> Option<CK_RV> {
    match decide(function, !len.is_null())? {
        Verdict::Fail(rv) => Some(rv),
        Verdict::TooSmall(length) => {
            // SAFETY: checked non-null; the caller's contract makes it writable.
            unsafe { *len = length };
            Some(CKR_BUFFER_TOO_SMALL)
        }
    }
}

fn decide(function: &'static str, has_output: bool) -> Option<Verdict> {
    count_call(function);
    static CONTROL: Mutex<Control> = Mutex::new(Control {
        seen: None,
        stat: None,
        read_at: None,
        rules: Vec::new(),
    });
    let path = std::env::var_os("KESH_SHIM_CONTROL")?;
    let mut sleep = 0u64;
    // A stat per call, a read only when the file looks changed (or every REREAD): with the
    // latency rule 32 sessions make tens of thousands of calls a second, and a read of the
    // file under the lock each time made the shim, not kesh, the bottleneck.
    let stat = stat_of(&path);
    let fresh = {
        let control = CONTROL.lock().unwrap_or_else(|e| e.into_inner());
        control.stat == stat && control.read_at.is_some_and(|t| t.elapsed() < REREAD)
    };
    let text = (!fresh).then(|| std::fs::read_to_string(&path).unwrap_or_default());
    let verdict = {
        let mut control = CONTROL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(text) = text {
            // A rewrite (new times) starts the rules afresh even with the same text.
            if control.stat != stat || control.seen.as_deref() != Some(text.as_str()) {
                control.rules = parse(&text);
                control.seen = Some(text);
            }
            control.stat = stat;
            control.read_at = Some(Instant::now());
        }
        let now = now_ms();
        let mut verdict = None;
        for rule in control.rules.iter_mut() {
            match rule {
                Rule::Latency { micros, functions } if matches(functions, function) => {
                    sleep += *micros
                }
                Rule::Fail {
                    rv,
                    functions,
                    count,
                    until_ms,
                } if verdict.is_none() && matches(functions, function) => {
                    let live = until_ms.is_none_or(|t| now < t) && count.is_none_or(|c| c > 0);
                    if live {
                        if let Some(c) = count {
                            *c -= 1;
                        }
                        verdict = Some(Verdict::Fail(*rv));
                    }
                }
                Rule::TooSmall {
                    length,
                    functions,
                    count,
                } if has_output
                    && verdict.is_none()
                    && matches(functions, function)
                    && count.is_none_or(|c| c > 0) =>
                {
                    if let Some(c) = count {
                        *c -= 1;
                    }
                    verdict = Some(Verdict::TooSmall(*length));
                }
                _ => {}
            }
        }
        verdict
    };
    if sleep > 0 && verdict.is_none() {
        std::thread::sleep(Duration::from_micros(sleep));
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rules() {
        let rules = parse("# comment\nfail CKR_DEVICE_ERROR C_Encrypt,C_Decrypt count=2\nfail 0x32 * until=5\nlatency 1000 *\nbogus\ntoosmall 4096 C_Encrypt count=1\n");
        assert_eq!(rules.len(), 4);
        assert_eq!(
            rules[3],
            Rule::TooSmall {
                length: 4096,
                functions: vec!["C_Encrypt".into()],
                count: Some(1)
            }
        );
        assert_eq!(
            rules[0],
            Rule::Fail {
                rv: CKR_DEVICE_ERROR,
                functions: vec!["C_Encrypt".into(), "C_Decrypt".into()],
                count: Some(2),
                until_ms: None
            }
        );
        assert!(matches!(
            rules[1],
            Rule::Fail {
                rv: 0x32,
                until_ms: Some(5),
                ..
            }
        ));
        assert!(matches!(rules[2], Rule::Latency { micros: 1000, .. }));
    }
}
