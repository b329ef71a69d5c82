//! The call seam and recovery: every cryptoki call of a request runs through [`Inner::run`]
//! (inline for a fast device, else on a worker thread); a device-level failure takes the device out of service and
//! [`Inner::recover`] reconnects it, never retrying a PIN the token refused.
//!
//! Owns the device slot of [`Inner`], the workers' use and the login state. Knows nothing of
//! keys, schemes or the index's contents (it only replaces the index after a reconnect).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::session::Session;

use super::device::Device;
use super::error::{NextLogin, Pkcs11Error};
use super::index::{scan, Index};
use super::workers::{Outcome, Placement};
use super::{raw, Inner, RECOVERY_BACKOFF_MAX};
use crate::keystore::Result;
use crate::locks::IgnorePoison;
use crate::secret::Pin;

/// What the calls of one request return: the pkcs11 backend's own error, turned into a
/// [`crate::keystore::KeystoreError`] at the keystore boundary.
pub(super) type CallResult<T> = std::result::Result<T, Pkcs11Error>;

impl Inner {
    pub(super) fn current_device(&self) -> CallResult<Arc<Device>> {
        self.device.read().ignore_poison().clone().ok_or_else(|| {
            let why = self.last_failure.lock().ignore_poison().clone();
            let why = why.unwrap_or(Pkcs11Error::OutOfService);
            if self.login_refused.load(Ordering::Acquire) {
                why
            } else {
                Pkcs11Error::Recovering(Box::new(why))
            }
        })
    }

    /// The seam: one blocking closure on one pooled session, run where [`super::workers`]
    /// decides (inline on the asking runtime thread for a fast device, else a worker thread).
    /// The closure gets the device, whose generation lets it refuse handles from another
    /// generation before they are used (a re-initialized module may reuse handle numbers).
    pub(super) async fn run<T, F>(self: &Arc<Self>, f: F) -> CallResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Session, &Device) -> CallResult<T> + Send + 'static,
    {
        self.run_in(Placement::Anywhere, f).await
    }

    /// [`Self::run`] on a worker thread, never inline: for jobs that take the token locks
    /// ([`Inner::hold_writes`], [`Inner::hold_reads`]) and may wait on them.
    pub(super) async fn run_on_worker<T, F>(self: &Arc<Self>, f: F) -> CallResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Session, &Device) -> CallResult<T> + Send + 'static,
    {
        self.run_in(Placement::Worker, f).await
    }

    /// [`Self::run`] where `placement` says.
    pub(super) async fn run_in<T, F>(self: &Arc<Self>, placement: Placement, f: F) -> CallResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Session, &Device) -> CallResult<T> + Send + 'static,
    {
        // Fail fast while down, before queueing.
        self.current_device()?;
        let inner = self.clone();
        let call = move || {
            let _live = raw::CallGuard::enter().ok_or(Pkcs11Error::Exiting)?;
            let _calls = inner.calls.read().ignore_poison();
            // Taken where the call runs: recovery may have swapped the device since the queueing.
            let device = inner.current_device()?;
            let session = device.checkout(&inner.ctx)?;
            let result = f(&session, &device);
            match &result {
                Err(e) if e.needs_recovery() => drop(session),
                // Closing it ends the operation; any session copies it made go with it, and
                // their next use is a stale handle, retried through a fresh search.
                Err(e) if raw::leaves_operation_active(e) => {
                    tracing::warn!(error = %e, "closing an HSM session whose operation may still be active");
                    drop(session)
                }
                _ => device.checkin(session),
            }
            result
        };
        let wait = self.cfg.session_wait;
        let outcome = match self.workers.call(wait, placement, call).await {
            Outcome::Done(outcome) => outcome,
            Outcome::Busy => return Err(Pkcs11Error::Busy(wait)),
            Outcome::Lost => return Err(Pkcs11Error::WorkerLost),
        };
        if let Err(e) = &outcome {
            if e.needs_recovery() {
                self.begin_recovery(e.clone());
            }
        }
        outcome
    }

    pub(super) fn begin_recovery(self: &Arc<Self>, why: Pkcs11Error) {
        if self.recovering.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::error!(reason = %why, "PKCS#11 device failure: taking the keystore out of service to recover");
        *self.last_failure.lock().ignore_poison() = Some(why);
        let old = self.device.write().ignore_poison().take();
        let inner = self.clone();
        tokio::spawn(async move { inner.recover(old).await });
    }

    pub(super) async fn recover(self: Arc<Self>, mut old: Option<Arc<Device>>) {
        let mut backoff = Duration::from_millis(50);
        let started = Instant::now();
        loop {
            match self.clone().reconnect(old.take()).await {
                Ok(count) => {
                    tracing::info!(
                        keys = count,
                        after_ms = started.elapsed().as_millis() as u64,
                        "PKCS#11 keystore recovered"
                    );
                    return;
                }
                Err(Pkcs11Error::PinRefused { rv, .. }) => {
                    self.refuse_logins(rv);
                    return;
                }
                Err(why) => {
                    tracing::warn!(reason = %why, retry_in_ms = backoff.as_millis() as u64, "PKCS#11 recovery attempt failed");
                    *self.last_failure.lock().ignore_poison() = Some(why);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RECOVERY_BACKOFF_MAX);
                }
            }
        }
    }

    /// One connection attempt (a single `C_Login`): re-initializes the module, logs in, scans
    /// the token and puts the new device in service. Returns the number of keys found.
    pub(super) async fn reconnect(
        self: Arc<Self>,
        stale: Option<Arc<Device>>,
    ) -> CallResult<usize> {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let inner = self.clone();
        let attempt = tokio::task::spawn_blocking(move || {
            let _live = raw::CallGuard::enter().ok_or(Pkcs11Error::Exiting)?;
            // No call is in flight while the module is finalized.
            let _all = inner.calls.write().ignore_poison();
            drop(stale); // closes the old sessions (errors are expected and ignored)
            let _ = inner.ctx.clone().finalize();
            let pin = inner.pin.lock().ignore_poison().clone();
            let device =
                Device::connect(&inner.ctx, &inner.cfg, &inner.settings, &pin, generation)?;
            let session = device.checkout(&inner.ctx)?;
            let keys = scan(&session, &inner.cfg.prefix, generation)?;
            device.checkin(session);
            Ok((device, keys))
        })
        .await
        .unwrap_or_else(|e| Err(Pkcs11Error::Join(Arc::new(e))));
        let (device, keys) = attempt?;
        let count = keys.len();
        *self.index.write().ignore_poison() = Index::scanned(keys);
        // Markers were not read with this scan: the next poll rescans.
        *self.marker_seen.lock().ignore_poison() = None;
        *self.device.write().ignore_poison() = Some(Arc::new(device));
        self.login_refused.store(false, Ordering::Release);
        self.recovering.store(false, Ordering::Release);
        Ok(count)
    }

    /// Stops trying: the keystore stays out of service (requests fail fast) until the
    /// operator reloads. Logged once, with what to do.
    pub(super) fn refuse_logins(&self, rv: cryptoki::error::RvError) {
        let why = Pkcs11Error::PinRefused {
            rv,
            next: NextLogin::OnReload,
        };
        tracing::error!(reason = %why, "PKCS#11 login refused: waiting for the operator");
        *self.last_failure.lock().ignore_poison() = Some(why);
        self.login_refused.store(true, Ordering::Release);
    }

    pub(super) async fn reload_pin(self: &Arc<Self>, pin: Pin) -> Result<()> {
        *self.pin.lock().ignore_poison() = pin;
        if !self.login_refused.load(Ordering::Acquire) {
            return Ok(());
        }
        tracing::info!("reload: one login attempt with the PIN the configuration gives now");
        match self.clone().reconnect(None).await {
            Ok(keys) => {
                tracing::info!(
                    keys,
                    "PKCS#11 login accepted: the keystore is back in service"
                );
                Ok(())
            }
            Err(e @ Pkcs11Error::PinRefused { rv, .. }) => {
                self.refuse_logins(rv);
                Err(e.into())
            }
            Err(why) => {
                // Not the PIN: the device itself is away. Back to recovery's backoff, which
                // logs in once when the device answers again.
                self.login_refused.store(false, Ordering::Release);
                *self.last_failure.lock().ignore_poison() = Some(why.clone());
                tokio::spawn(self.clone().recover(None));
                Err(Pkcs11Error::Recovering(Box::new(why)).into())
            }
        }
    }
}
