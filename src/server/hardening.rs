//! Process hardening for the server: keep secrets out of swap and out of core dumps.
//!
//! Owns the few OS calls that protect memory (`mlockall`, `RLIMIT_CORE`, `PR_SET_DUMPABLE`).
//! Knows nothing of keys or requests. Each step that cannot be taken is reported, with what
//! the operator can do, never fatal: kesh keeps its master keys in the HSM, so these protect
//! only data keys and plaintexts in flight.

/// What [`harden`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Hardening {
    /// `mlockall` succeeded: no page of the process is swapped out.
    pub memory_locked: bool,
    /// No core file can be written and the process is not dumpable.
    pub core_dumps_disabled: bool,
    /// One line per step that could not be taken, saying what to change.
    pub warnings: Vec<String>,
}

/// Locks the process's memory (as KES does) and disables core dumps.
///
/// `mlockall(MCL_FUTURE)` makes every later allocation count against `RLIMIT_MEMLOCK`, so it
/// is attempted only when the limit cannot be hit: unlimited, or the process may exceed it
/// (root). Under a finite limit an allocation past it would fail and abort the server.
pub fn harden() -> Hardening {
    let mut h = Hardening::default();
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setrlimit/prctl/mlockall/getrlimit/geteuid take plain values or a pointer
        // to a local struct; they have no memory-safety preconditions.
        unsafe {
            let zero = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            let core_off = libc::setrlimit(libc::RLIMIT_CORE, &zero) == 0;
            // Not dumpable: no core file, and other processes of the same user cannot ptrace
            // or read this one's memory.
            let undumpable = libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) == 0;
            h.core_dumps_disabled = core_off && undumpable;
            if !h.core_dumps_disabled {
                h.warnings.push(format!(
                    "core dumps could not be disabled ({}): a crash could write plaintexts to disk; set LimitCORE=0",
                    std::io::Error::last_os_error()
                ));
            }
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            let unlimited = libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) == 0
                && limit.rlim_cur == libc::RLIM_INFINITY;
            if unlimited || libc::geteuid() == 0 {
                // MCL_ONFAULT locks pages as they are touched instead of populating every mapping
                // (thread stacks are reserved at 2 MiB and mostly never used); kernels before 4.4
                // reject it, and then everything is locked up front.
                h.memory_locked =
                    libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) == 0
                        || libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) == 0;
                if !h.memory_locked {
                    h.warnings.push(format!(
                        "memory could not be locked ({}): data keys may reach swap; give kesh LimitMEMLOCK=infinity",
                        std::io::Error::last_os_error()
                    ));
                }
            } else {
                h.warnings.push(format!(
                    "memory not locked: RLIMIT_MEMLOCK is {} bytes, too little to lock the process safely; data keys may reach swap. Set LimitMEMLOCK=infinity (systemd) or `ulimit -l unlimited`",
                    limit.rlim_cur
                ));
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    h.warnings
        .push("memory locking and core-dump protection are implemented for Linux only".to_owned());
    h
}
