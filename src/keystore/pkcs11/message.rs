//! PKCS#11 3.0 message-based AEAD: one device call per `gcm` seal or unseal.
//!
//! With `C_EncryptInit` + `C_Encrypt` a seal is two calls, because GCM's IV and additional data
//! are parameters of the init. PKCS#11 3.0 (§5.13–5.14 of the base specification) moves them
//! to the per-message call: a session is prepared once for a key (`C_MessageEncryptInit`), and
//! each `C_EncryptMessage` then seals one message under its own IV and AAD. kesh keeps one
//! prepared operation per session, direction and key, so a stream of requests on one key costs
//! one call each; a session asked for another key ends its operation first
//! (`C_MessageEncryptFinal`) and prepares the new one (two calls, once).
//!
//! Used only when the module exports `C_GetInterface` with a 3.x function list and reports
//! `CKF_MESSAGE_ENCRYPT` and `CKF_MESSAGE_DECRYPT` for `CKM_AES_GCM` (Kryoptic does; SoftHSM
//! 2.6 is a 2.40 module). The ciphertext bytes are the same as the two-call path's.
//!
//! A prepared operation holds the key inside the module, where a delete by another process
//! does not reach it: like a session copy of a key, it is prepared afresh (ended and begun
//! again, two calls) once it is [`super::copies::RECHECK`] old, which is when the delete shows.
//!
//! Owns the 3.0 function pointers and which key each session is prepared for. Knows nothing of
//! the index, the other schemes or recovery; the caller supplies the IV (never the device).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use cryptoki::context::{Function, Pkcs11};
use cryptoki::error::{Error as CkError, Rv, RvError};
use cryptoki::mechanism::MechanismType;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use cryptoki_sys::{
    CKG_NO_GENERATE, CKM_AES_GCM, CK_FUNCTION_LIST_3_0, CK_GCM_MESSAGE_PARAMS, CK_INTERFACE,
    CK_MECHANISM, CK_OBJECT_HANDLE, CK_RV, CK_SESSION_HANDLE, CK_ULONG,
};
use zeroize::Zeroizing;

use super::raw::LoadedModule;
use crate::locks::IgnorePoison;

type InitFn = unsafe extern "C" fn(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE) -> CK_RV;
type MessageFn = unsafe extern "C" fn(
    CK_SESSION_HANDLE,
    *mut libc::c_void,
    CK_ULONG,
    *mut u8,
    CK_ULONG,
    *mut u8,
    CK_ULONG,
    *mut u8,
    *mut CK_ULONG,
) -> CK_RV;
type FinalFn = unsafe extern "C" fn(CK_SESSION_HANDLE) -> CK_RV;

/// One direction's three functions.
#[derive(Clone, Copy)]
struct Direction {
    init: InitFn,
    message: MessageFn,
    finish: FinalFn,
    names: (Function, Function),
}

/// The key a session's operation was prepared for: its handle in that session and the index
/// entry's nonce, so a handle number the module reused for another key never matches.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Prepared {
    key: CK_OBJECT_HANDLE,
    nonce: u64,
    at: Instant,
}

impl Prepared {
    /// Whether this operation serves `key`/`nonce` without being prepared afresh.
    fn serves(&self, key: CK_OBJECT_HANDLE, nonce: u64) -> bool {
        self.key == key && self.nonce == nonce && self.at.elapsed() < super::copies::RECHECK
    }
}

/// What a session's encrypt and decrypt operations are prepared for.
#[derive(Default)]
struct SessionOperations {
    encrypt: Option<Prepared>,
    decrypt: Option<Prepared>,
}

impl SessionOperations {
    fn side(&mut self, side: Side) -> &mut Option<Prepared> {
        match side {
            Side::Encrypt => &mut self.encrypt,
            Side::Decrypt => &mut self.decrypt,
        }
    }
}

/// The module's message-based AEAD functions, and the operations prepared on its sessions.
pub struct MessageCalls {
    encrypt: Direction,
    decrypt: Direction,
    prepared: Mutex<HashMap<CK_SESSION_HANDLE, SessionOperations>>,
    calls: MessageCallCounts,
    _module: LoadedModule,
}

/// The calls made through [`MessageCalls`] since the device connected.
#[derive(Debug, Default)]
pub struct MessageCallCounts {
    /// `C_MessageEncryptInit` and `C_MessageDecryptInit`.
    pub prepares: AtomicU64,
    /// `C_EncryptMessage` and `C_DecryptMessage`.
    pub messages: AtomicU64,
    /// `C_MessageEncryptFinal` and `C_MessageDecryptFinal`.
    pub finals: AtomicU64,
}

impl MessageCalls {
    /// The functions, when the module at `path` (loaded by cryptoki) offers message-based
    /// AES-GCM on `slot`; `None` otherwise (kesh then seals in two calls).
    pub fn of_loaded(path: &std::path::Path, ctx: &Pkcs11, slot: Slot) -> Option<MessageCalls> {
        let info = ctx.get_mechanism_info(slot, MechanismType::AES_GCM).ok()?;
        if !(info.message_encrypt() && info.message_decrypt()) {
            return None;
        }
        let module = LoadedModule::of_loaded(path)?;
        let symbol = module.symbol(c"C_GetInterface")?;
        type GetInterface = unsafe extern "C" fn(
            *mut u8,
            *mut cryptoki_sys::CK_VERSION,
            *mut *mut CK_INTERFACE,
            cryptoki_sys::CK_FLAGS,
        ) -> CK_RV;
        // SAFETY: C_GetInterface has this signature in every PKCS#11 3.x module.
        let get: GetInterface =
            unsafe { std::mem::transmute::<*mut libc::c_void, GetInterface>(symbol) };
        let mut name = *b"PKCS 11\0";
        let mut interface: *mut CK_INTERFACE = std::ptr::null_mut();
        // SAFETY: a NUL-terminated name, no version (the module's default "PKCS 11" interface)
        // and valid storage for the out-pointer.
        let rv = unsafe { get(name.as_mut_ptr(), std::ptr::null_mut(), &mut interface, 0) };
        if rv != cryptoki_sys::CKR_OK || interface.is_null() {
            return None;
        }
        // SAFETY: the module returned a pointer to its interface, valid while it is loaded.
        let list = unsafe { (*interface).pFunctionList }.cast::<CK_FUNCTION_LIST_3_0>();
        if list.is_null() {
            return None;
        }
        // SAFETY: every "PKCS 11" interface's list starts with its version; a 3.x list begins
        // with the 3.0 layout (3.1 and 3.2 only append).
        let list = unsafe { &*list };
        if list.version.major < 3 {
            return None;
        }
        Some(MessageCalls {
            encrypt: Direction {
                init: list.C_MessageEncryptInit?,
                message: list.C_EncryptMessage?,
                finish: list.C_MessageEncryptFinal?,
                names: (Function::MessageEncryptInit, Function::EncryptMessage),
            },
            decrypt: Direction {
                init: list.C_MessageDecryptInit?,
                message: list.C_DecryptMessage?,
                finish: list.C_MessageDecryptFinal?,
                names: (Function::MessageDecryptInit, Function::DecryptMessage),
            },
            prepared: Mutex::new(HashMap::new()),
            calls: MessageCallCounts::default(),
            _module: module,
        })
    }

    /// Seals `plaintext` under `key` with this IV and AAD: GCM ciphertext ‖ 16-byte tag.
    pub fn seal(
        &self,
        s: &Session,
        key: ObjectHandle,
        nonce: u64,
        iv: &[u8; 12],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CkError> {
        let mut out = vec![0u8; plaintext.len() + TAG_LEN];
        let mut tag = [0u8; TAG_LEN];
        let message = Message {
            iv,
            aad,
            input: plaintext,
            output: &mut out[..plaintext.len()],
            tag: &mut tag,
        };
        self.one_message(s, Side::Encrypt, key, nonce, message)?;
        out[plaintext.len()..].copy_from_slice(&tag);
        Ok(out)
    }

    /// Opens GCM ciphertext ‖ tag under `key` with this IV and AAD.
    pub fn open(
        &self,
        s: &Session,
        key: ObjectHandle,
        nonce: u64,
        iv: &[u8; 12],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CkError> {
        let Some(body_len) = sealed.len().checked_sub(TAG_LEN) else {
            return Err(CkError::Pkcs11(
                RvError::EncryptedDataLenRange,
                Function::DecryptMessage,
            ));
        };
        let (body, tag) = sealed.split_at(body_len);
        let mut tag = <[u8; TAG_LEN]>::try_from(tag).map_err(|_| {
            CkError::Pkcs11(RvError::EncryptedDataLenRange, Function::DecryptMessage)
        })?;
        let mut out = Zeroizing::new(vec![0u8; body_len]);
        let message = Message {
            iv,
            aad,
            input: body,
            output: &mut out,
            tag: &mut tag,
        };
        self.one_message(s, Side::Decrypt, key, nonce, message)?;
        Ok(out)
    }

    /// Prepares the session for `key` if it is not, then makes the one message call. A session
    /// this map believes prepared but the module does not (its handle number was reused after
    /// a close) is prepared once more.
    fn one_message(
        &self,
        s: &Session,
        side: Side,
        key: ObjectHandle,
        nonce: u64,
        mut m: Message,
    ) -> Result<(), CkError> {
        let want = Prepared {
            key: key.handle(),
            nonce,
            at: Instant::now(),
        };
        let mut was_prepared = self
            .prepared_for(s, side)
            .is_some_and(|p| p.serves(want.key, nonce));
        loop {
            if !was_prepared {
                self.prepare(s, side, want)?;
            }
            match self.message(s, side, &mut m) {
                Err(CkError::Pkcs11(RvError::OperationNotInitialized, _)) if was_prepared => {
                    self.set_prepared(s, side, None);
                    was_prepared = false;
                }
                Err(e) => {
                    // Whether the operation survives a failed message is the module's choice:
                    // end it, so the next use of this session starts clean.
                    self.finish(s, side);
                    return Err(e);
                }
                Ok(()) => return Ok(()),
            }
        }
    }

    /// What this device has called so far.
    pub fn calls(&self) -> &MessageCallCounts {
        &self.calls
    }

    fn direction(&self, side: Side) -> &Direction {
        match side {
            Side::Encrypt => &self.encrypt,
            Side::Decrypt => &self.decrypt,
        }
    }

    fn prepared_for(&self, s: &Session, side: Side) -> Option<Prepared> {
        let mut map = self.prepared.lock().ignore_poison();
        *map.get_mut(&s.handle())?.side(side)
    }

    fn set_prepared(&self, s: &Session, side: Side, to: Option<Prepared>) {
        let mut map = self.prepared.lock().ignore_poison();
        *map.entry(s.handle()).or_default().side(side) = to;
    }

    /// Ends the session's operation on another key, if any, and prepares one for `want`.
    fn prepare(&self, s: &Session, side: Side, want: Prepared) -> Result<(), CkError> {
        if self.prepared_for(s, side).is_some() {
            self.finish(s, side);
        }
        let d = self.direction(side);
        let mut mechanism = CK_MECHANISM {
            mechanism: CKM_AES_GCM,
            pParameter: std::ptr::null_mut(),
            ulParameterLen: 0,
        };
        // SAFETY: a session handle of this module and a parameterless mechanism structure that
        // lives across the call; message-based GCM takes its parameters per message.
        let rv = unsafe { (d.init)(s.handle(), &mut mechanism, want.key) };
        self.calls.prepares.fetch_add(1, Ordering::Relaxed);
        Rv::from(rv).into_result(d.names.0)?;
        self.set_prepared(s, side, Some(want));
        Ok(())
    }

    /// Ends the session's operation in this direction; errors are ignored (there may be none).
    fn finish(&self, s: &Session, side: Side) {
        self.set_prepared(s, side, None);
        // SAFETY: a session handle of this module; the call takes nothing else.
        let _ = unsafe { (self.direction(side).finish)(s.handle()) };
        self.calls.finals.fetch_add(1, Ordering::Relaxed);
    }

    fn message(&self, s: &Session, side: Side, m: &mut Message) -> Result<(), CkError> {
        let d = self.direction(side);
        let mut iv = *m.iv;
        let mut params = CK_GCM_MESSAGE_PARAMS {
            pIv: iv.as_mut_ptr(),
            ulIvLen: iv.len() as CK_ULONG,
            ulIvFixedBits: 0,
            ivGenerator: CKG_NO_GENERATE,
            pTag: m.tag.as_mut_ptr(),
            ulTagBits: (TAG_LEN * 8) as CK_ULONG,
        };
        let mut out_len = CK_ULONG::try_from(m.output.len())?;
        // SAFETY: `params` (with the IV and tag buffers it points to) lives across the call;
        // `aad` and `input` are read-only inputs of the given lengths (PKCS#11 types them
        // non-const but does not write them); `output` is writable for `out_len` bytes, which
        // is the input's length, all GCM produces; for a seal the module writes the tag into
        // `tag`, for an open it reads it from there.
        let rv = unsafe {
            (d.message)(
                s.handle(),
                std::ptr::addr_of_mut!(params).cast(),
                std::mem::size_of::<CK_GCM_MESSAGE_PARAMS>() as CK_ULONG,
                m.aad.as_ptr().cast_mut(),
                CK_ULONG::try_from(m.aad.len())?,
                m.input.as_ptr().cast_mut(),
                CK_ULONG::try_from(m.input.len())?,
                m.output.as_mut_ptr(),
                &mut out_len,
            )
        };
        self.calls.messages.fetch_add(1, Ordering::Relaxed);
        Rv::from(rv).into_result(d.names.1)?;
        if usize::try_from(out_len).ok() != Some(m.output.len()) {
            return Err(CkError::Pkcs11(RvError::GeneralError, d.names.1));
        }
        Ok(())
    }
}

/// One message's buffers: the IV and AAD in, the data in and out, and the tag (out when
/// sealing, in when opening).
struct Message<'a> {
    iv: &'a [u8; 12],
    aad: &'a [u8],
    input: &'a [u8],
    output: &'a mut [u8],
    tag: &'a mut [u8; TAG_LEN],
}

#[derive(Clone, Copy)]
enum Side {
    Encrypt,
    Decrypt,
}

const TAG_LEN: usize = 16;
