//! Session-object copies of master and HMAC keys (`session_keys: true`).
//!
//! Some software tokens re-read a token object's file (open, lock, read, close) on every use,
//! which doubles the cost of a seal, while their session objects live in memory; their
//! profiles turn copies on ([`super::profile`]). With `session_keys`, kesh uses each
//! key through a copy made on the device with `C_CopyObject` (`CKA_TOKEN` false): the copy is
//! made and kept inside the HSM, stays sensitive and non-extractable (PKCS#11 lets a copy
//! tighten those, never loosen them) and keeps `CKA_ALLOWED_MECHANISMS`. It dies with the
//! session that made it, so with the [`super::device::Device`] that owns this map.
//!
//! A copy outlives a delete made by another kesh instance, so every [`RECHECK`] the token
//! object is read again (its `CKA_ID`, which names the creation nonce, so a reused handle is
//! caught too) before the copy is used; a key deleted elsewhere stops working here within that
//! time. Copies are keyed by token handle and creation nonce.
//!
//! Owns the copy map and the cryptoki calls on copies; knows nothing of schemes or requests.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;

use super::error::Pkcs11Error;
use super::objects::Meta;
use crate::locks::IgnorePoison;

/// How long a copy is used before its token object is checked again.
pub const RECHECK: Duration = Duration::from_secs(1);

/// A token object as the copy map knows it: the handle alone could be reused for another
/// object, the handle with its create's nonce cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Original {
    /// The token object's raw handle.
    pub handle: std::ffi::c_ulong,
    /// The nonce of the create that made it ([`nonce_value`]).
    pub nonce: u64,
}

impl Original {
    /// The original of token object `token` made with creation nonce `nonce`.
    pub fn new(token: ObjectHandle, nonce: u64) -> Self {
        Original {
            handle: token.handle(),
            nonce,
        }
    }
}

/// What the map holds for a token object.
enum CopyState {
    Copied {
        handle: ObjectHandle,
        checked: Instant,
    },
    /// The device refused to copy it (`CKA_COPYABLE` false, say): used as it is.
    Uncopyable,
}

#[derive(Default)]
struct CopyMap {
    copies: HashMap<Original, CopyState>,
    /// Copies of keys found gone without a session at hand: destroyed by the next call.
    doomed: Vec<ObjectHandle>,
}

impl CopyMap {
    /// Removes the entries `gone` picks; returns the copies among them, to be destroyed.
    fn take(&mut self, gone: impl Fn(&Original) -> bool) -> Vec<ObjectHandle> {
        let keys: Vec<Original> = self.copies.keys().filter(|k| gone(k)).copied().collect();
        keys.iter()
            .filter_map(|k| match self.copies.remove(k) {
                Some(CopyState::Copied { handle, .. }) => Some(handle),
                _ => None,
            })
            .collect()
    }
}

/// The copies of one device generation.
pub struct SessionCopies {
    enabled: bool,
    state: Mutex<CopyMap>,
}

impl SessionCopies {
    /// A map of copies; `enabled` false makes every key used as its token object.
    pub fn new(enabled: bool) -> Self {
        SessionCopies {
            enabled,
            state: Mutex::new(CopyMap::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CopyMap> {
        // Inserts and removes only: a panic elsewhere leaves the map whole.
        self.state.lock().ignore_poison()
    }

    /// The handle to operate with for the token object `token` of the create with `nonce`:
    /// its copy (made on first use, rechecked every [`RECHECK`]), or `token` itself when
    /// copies are off or the device will not copy it.
    pub fn working(
        &self,
        s: &Session,
        token: ObjectHandle,
        nonce: u64,
    ) -> Result<ObjectHandle, Pkcs11Error> {
        if !self.enabled {
            return Ok(token);
        }
        let original = Original::new(token, nonce);
        let now = Instant::now();
        // One lock per call: the lookup, and any copies left to destroy.
        let (due, doomed) = {
            let mut state = self.state();
            let doomed = std::mem::take(&mut state.doomed);
            let due = match state.copies.get_mut(&original) {
                Some(CopyState::Uncopyable) => Some(None),
                Some(CopyState::Copied { handle, checked })
                    if now.duration_since(*checked) < RECHECK =>
                {
                    Some(Some((*handle, false)))
                }
                Some(CopyState::Copied { handle, checked }) => {
                    // This caller rechecks; others keep using the copy meanwhile.
                    *checked = now;
                    Some(Some((*handle, true)))
                }
                None => None,
            };
            (due, doomed)
        };
        for h in doomed {
            let _ = s.destroy_object(h);
        }
        match due {
            Some(None) => return Ok(token),
            Some(Some((copy, false))) => return Ok(copy),
            Some(Some((copy, true))) => {
                if still_there(s, token, nonce)? {
                    return Ok(copy);
                }
                self.discard(s, token);
                return Err(Pkcs11Error::Stale);
            }
            None => {}
        }
        let copied = s.copy_object(
            token,
            &[
                Attribute::Token(false),
                // Unlabelled, so no search for a key's label ever finds a copy.
                Attribute::Label(Vec::new()),
                Attribute::Id(Vec::new()),
            ],
        );
        let copy = match copied.map_err(Pkcs11Error::from) {
            Ok(copy) => copy,
            // A device that will not copy this key (not copyable, or no C_CopyObject): the
            // key works as the token object, only without the speed-up.
            Err(e) if !e.needs_recovery() && !e.is_stale() => {
                tracing::warn!(error = %e, "the HSM refused to copy a key into a session object; using the token object");
                self.state().copies.insert(original, CopyState::Uncopyable);
                return Ok(token);
            }
            Err(e) => return Err(e),
        };
        // The handle might have been reused for another object since the index was built.
        if !still_there(s, token, nonce)? {
            let _ = s.destroy_object(copy);
            return Err(Pkcs11Error::Stale);
        }
        let theirs = match self.state().copies.entry(original) {
            std::collections::hash_map::Entry::Occupied(held) => match held.get() {
                CopyState::Copied { handle, .. } => *handle,
                CopyState::Uncopyable => token,
            },
            std::collections::hash_map::Entry::Vacant(free) => {
                free.insert(CopyState::Copied {
                    handle: copy,
                    checked: now,
                });
                return Ok(copy);
            }
        };
        // Another worker got there first: keep theirs.
        let _ = s.destroy_object(copy);
        Ok(theirs)
    }

    /// Destroys the copies of a token object (deleted, or found gone).
    pub fn discard(&self, s: &Session, token: ObjectHandle) {
        let gone = self.state().take(|k| k.handle == token.handle());
        for h in gone {
            let _ = s.destroy_object(h);
        }
    }

    /// Stops using the copies of a token object found gone; they are destroyed by the next
    /// call that has a session.
    pub fn forget(&self, token: ObjectHandle) {
        let mut state = self.state();
        let gone = state.take(|k| k.handle == token.handle());
        state.doomed.extend(gone);
    }

    /// Destroys the copies of token objects no longer indexed (after a full scan).
    pub fn retain(&self, s: &Session, live: &HashSet<Original>) {
        let gone = self.state().take(|k| !live.contains(k));
        for h in gone {
            let _ = s.destroy_object(h);
        }
    }
}

/// Whether `token` still names the object the create with `nonce` made.
fn still_there(s: &Session, token: ObjectHandle, nonce: u64) -> Result<bool, Pkcs11Error> {
    let attrs = s.get_attributes(token, &[AttributeType::Id])?;
    Ok(attrs.into_iter().any(|a| match a {
        Attribute::Id(id) => Meta::decode(&id).is_some_and(|m| nonce_value(&m.nonce) == nonce),
        _ => false,
    }))
}

/// A creation nonce (16 hex digits) as a number; 0 for one a foreign tool wrote.
pub fn nonce_value(nonce: &str) -> u64 {
    u64::from_str_radix(nonce, 16).unwrap_or(0)
}
