//! Locks that stay usable after a panic elsewhere.
//!
//! Every lock in kesh guards data that each holder changes in one step (a push, an insert, a
//! swap of an `Arc`), so a thread that panicked while holding one cannot have left it
//! half-written: the data is still whole, and failing every later request over it would turn
//! one bug into an outage. Owns that one rule; callers say at the lock why it holds for them.

use std::sync::{LockResult, PoisonError};

/// The guard of a lock whether or not a holder panicked (see the module's doc).
pub trait IgnorePoison<G> {
    /// The guard, poisoned or not.
    fn ignore_poison(self) -> G;
}

impl<G> IgnorePoison<G> for LockResult<G> {
    fn ignore_poison(self) -> G {
        self.unwrap_or_else(PoisonError::into_inner)
    }
}
