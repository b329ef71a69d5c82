//! Bytes from the HSM's random number generator, drawn in bulk so a seal needs no
//! `C_GenerateRandom` of its own: a generate is then `C_EncryptInit` + `C_Encrypt`, two round
//! trips on a network HSM instead of three.
//!
//! The pool holds at most [`POOL_BYTES`] in one buffer that is locked in memory (`mlock`,
//! when the limit allows) and zeroized; each byte is handed out once and wiped from the pool
//! as it leaves. Below [`LOW_WATER`] the keystore refills it off any request's path,
//! [`DRAW_BYTES`] per `C_GenerateRandom`. A request that finds it short draws [`DRAW_BYTES`]
//! itself, keeps its share and leaves the rest in the pool: under load on a slow HSM a refill
//! waits behind the queued requests, and without that every request meanwhile paid a third
//! round trip (0.46 extra calls per generate at c=128, 1 ms per call).
//! The entropy is the HSM's either way: only when the bytes are drawn changes.
//!
//! Owns the buffer; knows nothing of sessions (the caller draws the bytes).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use zeroize::{Zeroize, Zeroizing};

use crate::locks::IgnorePoison;

/// Bytes one `C_GenerateRandom` draws: 93 generates' DEKs and IVs.
pub const DRAW_BYTES: usize = 4096;
/// The most the pool holds: four draws.
pub const POOL_BYTES: usize = 4 * DRAW_BYTES;
/// A refill starts when fewer bytes than this are left: 186 generates, about 17 ms at 11,000
/// generates/s, longer than a refill waits behind 128 queued requests on a 1 ms HSM.
pub const LOW_WATER: usize = POOL_BYTES / 2;

/// Random bytes drawn from the HSM in bulk, handed out once each (module doc).
pub struct RandomPool {
    bytes: Mutex<Zeroizing<Vec<u8>>>,
    refilling: AtomicBool,
}

impl RandomPool {
    /// An empty pool: the first seals draw their bytes directly until a refill lands.
    pub fn new() -> Self {
        let bytes = Zeroizing::new(Vec::<u8>::with_capacity(POOL_BYTES));
        // SAFETY: the range is the Vec's own allocation of POOL_BYTES bytes, which is never
        // reallocated (the pool never grows past its capacity) and outlives the lock (munlock
        // is implicit when the allocation is freed; the pages are zeroized first).
        let _ = unsafe { libc::mlock(bytes.as_ptr().cast(), POOL_BYTES) };
        RandomPool {
            bytes: Mutex::new(bytes),
            refilling: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Zeroizing<Vec<u8>>> {
        // Taking and adding bytes leave the Vec whole even if a holder panicked.
        self.bytes.lock().ignore_poison()
    }

    /// Fills `out` from the pool, wiping what it hands out; `false` (nothing taken) when the
    /// pool holds too few bytes.
    pub fn take(&self, out: &mut [u8]) -> bool {
        let mut bytes = self.lock();
        let Some(start) = bytes.len().checked_sub(out.len()) else {
            return false;
        };
        out.copy_from_slice(&bytes[start..]);
        bytes[start..].zeroize();
        bytes.truncate(start);
        true
    }

    /// Whether a refill should start now: below [`LOW_WATER`] and none running. Marks one
    /// as running; [`Self::refill_ended`] ends it.
    pub fn wants_refill(&self) -> bool {
        self.lock().len() < LOW_WATER
            && self
                .refilling
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Adds fresh bytes, as many as fit; the rest stay with the caller, who wipes them.
    pub fn add(&self, fresh: &[u8]) {
        let mut bytes = self.lock();
        let room = POOL_BYTES - bytes.len();
        bytes.extend_from_slice(&fresh[..room.min(fresh.len())]);
    }

    /// Room for a whole draw.
    pub fn has_room_for_a_draw(&self) -> bool {
        POOL_BYTES - self.lock().len() >= DRAW_BYTES
    }

    /// Ends a refill, done or failed, so the next low pool asks again.
    pub fn refill_ended(&self) {
        self.refilling.store(false, Ordering::Release);
    }
}

impl Default for RandomPool {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_handed_out_once_and_wiped() {
        let pool = RandomPool::new();
        let mut out = [0u8; 44];
        assert!(!pool.take(&mut out), "empty");
        assert!(pool.wants_refill());
        assert!(!pool.wants_refill(), "one refill at a time");
        let fresh: Vec<u8> = (0..=255u8).cycle().take(POOL_BYTES + 10).collect();
        pool.add(&fresh);
        pool.refill_ended();
        assert!(!pool.has_room_for_a_draw());
        assert_eq!(pool.lock().len(), POOL_BYTES);
        assert!(pool.take(&mut out));
        assert_eq!(out[..], fresh[POOL_BYTES - 44..POOL_BYTES]);
        let mut next = [0u8; 44];
        assert!(pool.take(&mut next));
        assert_ne!(out, next, "never the same bytes twice");
    }
}
