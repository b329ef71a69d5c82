//! Single-call `C_Encrypt` and `C_Decrypt` into a buffer kesh sizes itself.
//!
//! cryptoki's `Session::encrypt` and `decrypt` ask the module for the output length first (a
//! `C_Encrypt` with no buffer) and then call again: on a network HSM every call is a round
//! trip, so a seal cost three (init, length, data) where two suffice. kesh knows the output
//! size of its mechanisms (GCM: the input plus a 16-byte tag, or less), so it calls the
//! module's own function once, with that buffer; a module that still wants more says so
//! (`CKR_BUFFER_TOO_SMALL`, the operation stays active) and gets it, up to
//! [`MAX_EXPANSION`] bytes past the input. A module asking for more is refused with
//! `CKR_BUFFER_TOO_SMALL`, its operation still active: the caller must not reuse the session
//! ([`leaves_operation_active`]).
//!
//! The function pointers come from the module's `C_GetFunctionList`, looked up in the library
//! cryptoki already loaded (`dlopen` with `RTLD_NOLOAD`: the same library, never a second
//! copy, and `RTLD_NODELETE`: never unloaded while the process runs). Owns that lookup and the two calls; knows nothing of keys or schemes.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, Rv, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki_sys::{CK_FUNCTION_LIST, CK_RV, CK_SESSION_HANDLE, CK_ULONG};
use zeroize::Zeroizing;

use crate::locks::IgnorePoison;

use super::error::Pkcs11Error;

/// How much longer than its input an output may be: a GCM tag (16) and a block of padding.
/// A module that claims to need more is wrong, and kesh will not allocate what it says.
pub const MAX_EXPANSION: usize = 32;

/// Whether a failed call may have left an encrypt or decrypt operation active on its session
/// (PKCS#11 ends it on every other error). Such a session is closed, not reused: 2.40 has no
/// call that cancels an operation.
pub fn leaves_operation_active(e: &Pkcs11Error) -> bool {
    matches!(
        e,
        Pkcs11Error::Call {
            rv: RvError::BufferTooSmall | RvError::OperationActive,
            ..
        }
    )
}

type DataFn =
    unsafe extern "C" fn(CK_SESSION_HANDLE, *mut u8, CK_ULONG, *mut u8, *mut CK_ULONG) -> CK_RV;

/// Our reference to a module cryptoki has loaded, for looking up functions cryptoki does not
/// call the way kesh needs. Never a second copy and never unloaded (module doc).
pub struct LoadedModule {
    library: *mut libc::c_void,
}

// SAFETY: the handle is only used for dlsym, which is thread-safe, and passed to dlclose once.
unsafe impl Send for LoadedModule {}
// SAFETY: as for Send: `&LoadedModule` only looks symbols up.
unsafe impl Sync for LoadedModule {}

impl Drop for LoadedModule {
    fn drop(&mut self) {
        // SAFETY: `library` came from a successful dlopen and is closed exactly once.
        unsafe {
            libc::dlclose(self.library);
        }
    }
}

impl LoadedModule {
    /// The module at `path` if it is loaded in this process already.
    pub fn of_loaded(path: &Path) -> Option<LoadedModule> {
        let path = CString::new(path.as_os_str().as_bytes()).ok()?;
        // RTLD_NODELETE pins the module for the process's lifetime: modules keep thread-local
        // state and statics that outlive one cryptoki context (a Rust module's thread-local
        // destructors, a C++ module's singletons), and unloading one while a thread that called
        // it still lives crashes that thread when it exits.
        // SAFETY: a valid C string; RTLD_NOLOAD only returns a library that is loaded already,
        // so no initialiser runs.
        let library = unsafe {
            libc::dlopen(
                path.as_ptr(),
                libc::RTLD_NOW | libc::RTLD_NOLOAD | libc::RTLD_NODELETE,
            )
        };
        (!library.is_null()).then_some(LoadedModule { library })
    }

    /// The address of an exported function, if the module has it.
    pub fn symbol(&self, name: &std::ffi::CStr) -> Option<*mut libc::c_void> {
        // SAFETY: a valid handle and a NUL-terminated symbol name.
        let symbol = unsafe { libc::dlsym(self.library, name.as_ptr()) };
        (!symbol.is_null()).then_some(symbol)
    }
}

/// The module's `C_Encrypt` and `C_Decrypt`, while the library stays loaded.
pub struct RawCalls {
    encrypt: DataFn,
    decrypt: DataFn,
    _module: LoadedModule,
}

impl RawCalls {
    /// The functions of the module at `path`, which cryptoki has loaded; `None` when the module
    /// cannot be found that way or lacks them (kesh then uses cryptoki's two-call path).
    pub fn of_loaded(path: &Path) -> Option<RawCalls> {
        let module = LoadedModule::of_loaded(path)?;
        let symbol = module.symbol(c"C_GetFunctionList")?;
        type GetList = unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV;
        // SAFETY: C_GetFunctionList has this signature in every PKCS#11 module.
        let get_list: GetList =
            unsafe { std::mem::transmute::<*mut libc::c_void, GetList>(symbol) };
        let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
        // SAFETY: the out-pointer is valid storage for one pointer.
        if unsafe { get_list(&mut list) } != cryptoki_sys::CKR_OK || list.is_null() {
            return None;
        }
        // SAFETY: the module returned a pointer to its function list, valid while it is loaded.
        let list = unsafe { &*list };
        Some(RawCalls {
            encrypt: list.C_Encrypt?,
            decrypt: list.C_Decrypt?,
            _module: module,
        })
    }

    /// `C_EncryptInit` and one `C_Encrypt` of `data`, whose output is at most `max_out` bytes.
    pub fn encrypt(
        &self,
        s: &Session,
        mechanism: &Mechanism,
        key: ObjectHandle,
        data: &[u8],
        max_out: usize,
    ) -> Result<Vec<u8>, CkError> {
        let data_len = CK_ULONG::try_from(data.len())?;
        s.encrypt_init(mechanism, key)?;
        let mut out = vec![0u8; max_out];
        let len = self.call(self.encrypt, Function::Encrypt, s, data, data_len, &mut out)?;
        out.truncate(len);
        Ok(out)
    }

    /// `C_DecryptInit` and one `C_Decrypt` of `data`; the plaintext is at most `data.len()`.
    pub fn decrypt(
        &self,
        s: &Session,
        mechanism: &Mechanism,
        key: ObjectHandle,
        data: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CkError> {
        let data_len = CK_ULONG::try_from(data.len())?;
        s.decrypt_init(mechanism, key)?;
        let mut out = Zeroizing::new(vec![0u8; data.len()]);
        let len = self.call(self.decrypt, Function::Decrypt, s, data, data_len, &mut out)?;
        out.truncate(len);
        Ok(out)
    }

    /// One data call into `out`, a second only if the module asks for a bigger buffer within
    /// [`MAX_EXPANSION`]. `data_len` is `data.len()`, converted before the operation began.
    fn call(
        &self,
        f: DataFn,
        function: Function,
        s: &Session,
        data: &[u8],
        data_len: CK_ULONG,
        out: &mut Vec<u8>,
    ) -> Result<usize, CkError> {
        let cap = data.len().saturating_add(MAX_EXPANSION);
        for _ in 0..2 {
            let mut len = CK_ULONG::try_from(out.len())?;
            // SAFETY: an operation was initialised on this session; `data` is read-only input
            // of `data_len` bytes (PKCS#11 takes it as non-const but does not write it) and
            // `out` is writable for `len` bytes, as C_Encrypt/C_Decrypt require.
            let rv = unsafe {
                f(
                    s.handle(),
                    data.as_ptr().cast_mut(),
                    data_len,
                    out.as_mut_ptr(),
                    &mut len,
                )
            };
            match Rv::from(rv) {
                Rv::Ok => return Ok(usize::try_from(len)?),
                // The operation stays active, and `len` now says how much is needed.
                Rv::Error(RvError::BufferTooSmall) => match usize::try_from(len) {
                    Ok(needed) if needed > out.len() && needed <= cap => out.resize(needed, 0),
                    _ => break,
                },
                other => {
                    other.into_result(function)?;
                }
            }
        }
        Err(CkError::Pkcs11(RvError::BufferTooSmall, function))
    }
}

/// PKCS#11 calls in progress in this process, and whether it is exiting.
static CALLS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static EXITING: AtomicBool = AtomicBool::new(false);
/// Modules the exit hook was registered after.
static HOOKED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// How long the exit hook waits for calls in progress.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// Held around every PKCS#11 call kesh makes on a module after start; refused once the
/// process is exiting.
///
/// RTLD_NODELETE keeps a module mapped, but a process's exit still runs the module's static
/// destructors (SoftHSM's C++ singletons) while other threads may be inside it — the change
/// poll, a request — and that crashed processes at exit. [`CallGuard::install_exit_hook`]
/// registers an exit handler after a module is initialized (when its singletons register
/// their destructors), so it runs before them: it stops new calls and waits up to
/// `EXIT_WAIT` (2 s) for those in progress.
pub struct CallGuard(());

impl CallGuard {
    /// A guard for one call, or `None` when the process is exiting.
    pub fn enter() -> Option<CallGuard> {
        // Count first, then look: the exit hook sets the flag, then reads the count, so one
        // of the two sees the other (both sequentially consistent).
        CALLS_IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        let guard = CallGuard(());
        (!EXITING.load(Ordering::SeqCst)).then_some(guard)
    }

    /// Registers the exit handler after `module`'s first initialization in this process
    /// (exit handlers run in reverse order, so it runs before anything the module registered).
    pub fn install_exit_hook(module: &Path) {
        let mut hooked = HOOKED.lock().ignore_poison();
        if hooked.iter().any(|m| m == module) {
            return;
        }
        hooked.push(module.to_owned());
        // SAFETY: `quiesce` is an `extern "C" fn()` that never unwinds (it only touches
        // atomics and sleeps), as atexit requires.
        unsafe {
            libc::atexit(quiesce);
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        CALLS_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

extern "C" fn quiesce() {
    EXITING.store(true, Ordering::SeqCst);
    let started = Instant::now();
    while CALLS_IN_FLIGHT.load(Ordering::SeqCst) > 0 && started.elapsed() < EXIT_WAIT {
        std::thread::sleep(Duration::from_millis(1));
    }
}
