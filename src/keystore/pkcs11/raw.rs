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
use std::path::Path;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, Rv, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki_sys::{CK_FUNCTION_LIST, CK_RV, CK_SESSION_HANDLE, CK_ULONG};
use zeroize::Zeroizing;

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

/// The module's `C_Encrypt` and `C_Decrypt`, while the library stays loaded.
pub struct RawCalls {
    encrypt: DataFn,
    decrypt: DataFn,
    /// Our reference to the library (counted by the loader), released on drop.
    library: *mut libc::c_void,
}

// SAFETY: the two are plain function pointers into a module loaded for the process, and the
// handle is only passed to dlclose once; PKCS#11 modules initialized with OS locking are
// called from any thread.
unsafe impl Send for RawCalls {}
unsafe impl Sync for RawCalls {}

impl Drop for RawCalls {
    fn drop(&mut self) {
        // SAFETY: `library` came from a successful dlopen and is closed exactly once.
        unsafe {
            libc::dlclose(self.library);
        }
    }
}

impl RawCalls {
    /// The functions of the module at `path`, which cryptoki has loaded; `None` when the module
    /// cannot be found that way or lacks them (kesh then uses cryptoki's two-call path).
    pub fn of_loaded(path: &Path) -> Option<RawCalls> {
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
        if library.is_null() {
            return None;
        }
        let close = |found: Option<(DataFn, DataFn)>| match found {
            Some((encrypt, decrypt)) => Some(RawCalls {
                encrypt,
                decrypt,
                library,
            }),
            None => {
                // SAFETY: the handle from the dlopen above, closed once.
                unsafe { libc::dlclose(library) };
                None
            }
        };
        // SAFETY: a valid handle and a NUL-terminated symbol name.
        let symbol = unsafe { libc::dlsym(library, c"C_GetFunctionList".as_ptr()) };
        if symbol.is_null() {
            return close(None);
        }
        type GetList = unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV;
        // SAFETY: C_GetFunctionList has this signature in every PKCS#11 module.
        let get_list: GetList =
            unsafe { std::mem::transmute::<*mut libc::c_void, GetList>(symbol) };
        let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
        // SAFETY: the out-pointer is valid storage for one pointer.
        if unsafe { get_list(&mut list) } != cryptoki_sys::CKR_OK || list.is_null() {
            return close(None);
        }
        // SAFETY: the module returned a pointer to its function list, valid while it is loaded.
        let list = unsafe { &*list };
        close(list.C_Encrypt.zip(list.C_Decrypt))
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
