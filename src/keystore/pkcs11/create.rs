//! Creating and deleting keys on the token: the create protocol that lets instances on
//! several hosts race for one name and get exactly one key (`docs/FORMAT.md` §6), imports, and
//! deletes.
//!
//! Owns the token writes and the host-wide write lock. Knows nothing of sealing.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;
use zeroize::Zeroizing;

use super::copies::nonce_value;
use super::error::Pkcs11Error;
use super::index::{has_ready_master, pick_ready, survey, IndexedKey, LabelledObject};
use super::objects::{self, Meta, Role, State};
use super::seam::CallResult;
use super::workers::Placement;
use super::writelock::Held;
use super::{Inner, CREATE_CONTENTION_LIMIT, TOKEN_OBJECTS, TOKEN_WRITES};
use crate::crypto::kes::Algorithm;
use crate::keystore::{KeyInfo, KeystoreError, Provenance, Result, Scheme};
use crate::locks::IgnorePoison;
use crate::name::KeyName;

/// What a create writes.
pub(super) struct NewKey {
    pub(super) scheme: Scheme,
    pub(super) algorithm: Algorithm,
    /// `None`: the device generates the master key.
    pub(super) material: Option<Zeroizing<Vec<u8>>>,
    pub(super) hmac: NewHmac,
    pub(super) provenance: Provenance,
}

pub(super) enum NewHmac {
    Generate,
    Given(Zeroizing<Vec<u8>>),
    None,
}

/// Held by a job while it writes token objects: this process's searches wait
/// ([`TOKEN_OBJECTS`]), and so do other processes' writes (the host lock, when configured).
pub(super) struct Writing<'a> {
    _host: Option<Held<'a>>,
    _process: RwLockWriteGuard<'static, ()>,
}

impl Inner {
    /// Taken by jobs that write token objects, on a worker thread ([`Inner::run_on_worker`]).
    pub(super) fn hold_writes(&self) -> CallResult<Writing<'_>> {
        // The process lock first: this process's threads share the host lock's file, and an
        // `flock` does not keep them apart.
        let process = TOKEN_OBJECTS.write().ignore_poison();
        let host = self
            .write_lock
            .as_ref()
            .map(|l| l.hold(CREATE_CONTENTION_LIMIT))
            .transpose()?;
        Ok(Writing {
            _host: host,
            _process: process,
        })
    }

    /// Taken by jobs that search token objects, on a worker thread: none runs while this
    /// process writes one.
    pub(super) fn hold_reads(&self) -> RwLockReadGuard<'static, ()> {
        TOKEN_OBJECTS.read().ignore_poison()
    }

    /// Creates a key's objects through the on-token protocol.
    pub(super) async fn create_key(self: &Arc<Self>, name: &KeyName, spec: NewKey) -> Result<()> {
        let _writes = TOKEN_WRITES.lock().await;
        let label = self.label(name);
        let key_name = name.clone();
        let inner = self.clone();
        let created = self
            .run_on_worker(move |s, d| {
                d.offers(spec.scheme)?;
                let _held = inner.hold_writes()?;
                // A device that refuses kesh's layout gets a log line saying so (not just a 502).
                create_on_token(s, &label, &key_name, spec, d.generation).map_err(|e| {
                    match e.refuses_layout() {
                        Some(refusal) => {
                            tracing::error!("{refusal}");
                            refusal
                        }
                        None => e,
                    }
                })
            })
            .await
            .map_err(KeystoreError::from);
        self.misses.lock().await.remove(name);
        match created {
            Ok(entry) => {
                self.remember(entry);
                self.marker_due.store(true, Ordering::Release);
                Ok(())
            }
            Err(KeystoreError::KeyExists) => {
                // Another instance made it: this one now knows, and lists it.
                drop(_writes);
                let _ = self.indexed_key(name, true).await;
                Err(KeystoreError::KeyExists)
            }
            Err(e) => Err(e),
        }
    }

    pub(super) async fn delete_key(self: &Arc<Self>, name: &KeyName) -> Result<()> {
        let _writes = TOKEN_WRITES.lock().await;
        let inner = self.clone();
        let result = self
            .with_indexed_key(name, Placement::Worker, move |s, d, key| {
                let _held = inner.hold_writes()?;
                // The master goes first: that is the commit point of a delete. Versions left
                // by a delete that stopped after it name a base that is gone: a later create
                // removes them and no lookup takes them for a key.
                s.destroy_object(key.master)?;
                d.copies.discard(s, key.master);
                for v in &key.versions {
                    let _ = s.destroy_object(v.master);
                    d.copies.discard(s, v.master);
                }
                if let Some(h) = key.hmac {
                    let _ = s.destroy_object(h);
                    d.copies.discard(s, h);
                }
                Ok(())
            })
            .await;
        self.forget(name);
        if result.is_ok() {
            self.usage.forget(name);
            self.marker_due.store(true, Ordering::Release);
        }
        result
    }

    /// Makes the key's next version on the token ([`rotate_on_token`]); with `due`, only when
    /// the newest version is that old and still the newest at commit (`None` otherwise).
    pub(super) async fn rotate_key(
        self: &Arc<Self>,
        name: &KeyName,
        due: Option<Duration>,
        provenance: Provenance,
    ) -> Result<Option<u32>> {
        // The index never knows a newer version than the token, so a version young enough
        // here is young enough there: scheduled checks of keys not due cost no token call.
        if let (Some(period), Some(e)) = (due, self.cached(name)) {
            let newest = e.version_times().last().map(|(_, at)| *at);
            if newest.is_some_and(|at| time::OffsetDateTime::now_utc() - at < period) {
                return Ok(None);
            }
        }
        let _writes = TOKEN_WRITES.lock().await;
        let label = self.label(name);
        let key_name = name.clone();
        let inner = self.clone();
        let made = self
            .run_on_worker(move |s, d| {
                let _held = inner.hold_writes()?;
                rotate_on_token(s, &label, &key_name, due, &provenance, d.generation)
            })
            .await
            .map_err(KeystoreError::from);
        drop(_writes);
        match made {
            Ok(Some((version, entry))) => {
                self.remember(entry);
                self.marker_due.store(true, Ordering::Release);
                Ok(Some(version))
            }
            Ok(None) => {
                // Another instance rotated (or it is not due): learn its versions now.
                let _ = self.refresh(name).await;
                Ok(None)
            }
            Err(KeystoreError::KeyNotFound) => {
                self.forget(name);
                Err(KeystoreError::KeyNotFound)
            }
            Err(e) => Err(e),
        }
    }

    /// Destroys one old version's master object, after checking against the token (not the
    /// index) that it may go.
    pub(super) async fn destroy_version(
        self: &Arc<Self>,
        name: &KeyName,
        version: u32,
    ) -> Result<()> {
        let _writes = TOKEN_WRITES.lock().await;
        let fresh = self.refresh(name).await?;
        crate::keystore::check_destroy(&fresh.version_times(), version)?;
        let inner = self.clone();
        self.with_indexed_key(name, Placement::Worker, move |s, d, indexed| {
            let v = indexed
                .versions
                .iter()
                .find(|v| v.version == version)
                .ok_or(Pkcs11Error::VersionNotFound)?;
            let _held = inner.hold_writes()?;
            s.destroy_object(v.master)?;
            d.copies.discard(s, v.master);
            Ok(())
        })
        .await?;
        drop(_writes);
        let _ = self.refresh(name).await;
        self.marker_due.store(true, Ordering::Release);
        Ok(())
    }
}

/// Makes version N+1 of a key, N the newest ready version, with the create protocol's
/// guarantees across processes: write the version's master `pending`, look again, commit
/// (`ready`) only if no other live object claims N+1. Two rotations at once never make one
/// version twice: whoever looks second sees the first and backs off, then (manual) takes the
/// next number, or (scheduled, `due`) stops, since someone else rotated. Returns the version
/// made and the key's fresh index entry.
pub(super) fn rotate_on_token(
    s: &Session,
    label: &str,
    name: &KeyName,
    due: Option<Duration>,
    provenance: &Provenance,
    generation: u64,
) -> CallResult<Option<(u32, IndexedKey)>> {
    let deadline = Instant::now() + CREATE_CONTENTION_LIMIT;
    let mut backoff_ms = 2u64;
    loop {
        let found = survey(s, label)?;
        let located = pick_ready(&found, name, generation).ok_or(Pkcs11Error::KeyNotFound)?;
        let (newest, newest_at) = located.newest();
        if let Some(period) = due {
            if time::OffsetDateTime::now_utc() - newest_at < period {
                return Ok(None);
            }
        }
        let target = newest + 1;
        let base = located.nonce_text.clone();
        let claims = |found: &[LabelledObject], ours: Option<&str>, ready_only: bool| {
            found.iter().any(|f| {
                f.meta.as_ref().is_some_and(|m| {
                    Some(m.nonce.as_str()) != ours
                        && m.role == Role::Key
                        && m.version == target
                        && m.base == base
                        && (m.state == State::Ready
                            || (!ready_only && unix_now() - m.ts <= objects::STALE_PENDING_SECS))
                })
            })
        };
        // Leftovers: pending versions of crashed rotations, versions of a deleted key.
        let now = unix_now();
        for f in &found {
            if let Some(m) = &f.meta {
                let leftover = m.role == Role::Key
                    && m.version >= 2
                    && (m.base != base || m.is_stale_pending(now));
                if leftover {
                    let _ = s.destroy_object(f.handle);
                }
            }
        }
        if !claims(&found, None, false) {
            let nonce = random_nonce(s)?;
            let meta = Meta::new(
                Role::Key,
                &nonce,
                located.info.scheme,
                located.info.algorithm,
                provenance,
            )
            .of_version(target, &base);
            let t = objects::master_template(label, &meta, located.info.scheme, None);
            let handle = s.generate_key(&objects::keygen_mechanism(located.info.scheme), &t)?;
            let found = survey(s, label)?;
            if !claims(&found, Some(&nonce), false) {
                if let Err(e) = s.update_attributes(handle, &[Attribute::Id(meta.ready().encode())])
                {
                    let _ = s.destroy_object(handle);
                    return Err(e.into());
                }
                let found = survey(s, label)?;
                let located =
                    pick_ready(&found, name, generation).ok_or(Pkcs11Error::KeyNotFound)?;
                return Ok(Some((target, located)));
            }
            let _ = s.destroy_object(handle);
            if claims(&found, Some(&nonce), true) {
                if due.is_some() {
                    return Ok(None);
                }
                // Someone committed this number: take the next one at once.
                continue;
            }
        }
        if Instant::now() > deadline {
            return Err(Pkcs11Error::RotateContended(name.clone()));
        }
        let mut jitter = [0u8; 1];
        let _ = s.generate_random_slice(&mut jitter);
        std::thread::sleep(Duration::from_millis(backoff_ms + u64::from(jitter[0] % 8)));
        backoff_ms = (backoff_ms * 2).min(64);
    }
}

pub(super) fn random_nonce(s: &Session) -> CallResult<String> {
    let mut n = [0u8; 8];
    s.generate_random_slice(&mut n)?;
    Ok(hex::encode(n))
}

pub(super) fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Creates a key so that concurrent creators of one name, in any process, end with exactly
/// one key (docs/FORMAT.md §6, the create protocol). Each creator writes its objects `pending`, then looks again:
///
/// 1. a `ready` key under the label → "key already exists";
/// 2. a live (not stale) object of another creator → remove ours, back off, start over;
/// 3. otherwise commit: the HMAC key `ready`, then the master `ready` (the commit point).
///
/// Two creators cannot both pass step 2: whoever looks second sees the first's objects,
/// pending or ready. Objects of a creator that crashed go stale after
/// [`objects::STALE_PENDING_SECS`] and are removed by the next create, and so is a ready HMAC
/// key whose master is gone (a delete removes the master first: one that crashed half-way).
/// Processes sharing a host lock ([`writelock`]) never contend here; the protocol is what
/// keeps instances on different hosts apart.
pub(super) fn create_on_token(
    s: &Session,
    label: &str,
    name: &KeyName,
    spec: NewKey,
    generation: u64,
) -> CallResult<IndexedKey> {
    let deadline = Instant::now() + CREATE_CONTENTION_LIMIT;
    let mut backoff_ms = 2u64;
    loop {
        let found = survey(s, label)?;
        if has_ready_master(&found) {
            return Err(Pkcs11Error::KeyExists);
        }
        let now = unix_now();
        let mut contended = false;
        for f in &found {
            match &f.meta {
                Some(m) if now - m.ts > objects::STALE_PENDING_SECS || orphan(&found, m) => {
                    let _ = s.destroy_object(f.handle);
                }
                Some(_) => contended = true,
                None => {}
            }
        }
        if !contended {
            let nonce = random_nonce(s)?;
            let written = write_pending(s, label, &nonce, &spec)?;
            let found = survey(s, label)?;
            let others_live = found.iter().any(|f| {
                f.meta.as_ref().is_some_and(|m| {
                    m.nonce != nonce
                        && (m.state == State::Ready
                            || unix_now() - m.ts <= objects::STALE_PENDING_SECS)
                })
            });
            if !others_live {
                return commit(s, written, name, generation);
            }
            let exists = has_ready_master(&found);
            written.destroy(s);
            if exists {
                return Err(Pkcs11Error::KeyExists);
            }
        }
        if Instant::now() > deadline {
            return Err(Pkcs11Error::CreateContended(name.clone()));
        }
        // Random jitter breaks ties between instances that back off together.
        let mut jitter = [0u8; 1];
        let _ = s.generate_random_slice(&mut jitter);
        std::thread::sleep(Duration::from_millis(backoff_ms + u64::from(jitter[0] % 8)));
        backoff_ms = (backoff_ms * 2).min(64);
    }
}

/// A ready HMAC key or key version without its version-1 master: what a delete that stopped
/// half-way leaves.
pub(super) fn orphan(found: &[LabelledObject], m: &Meta) -> bool {
    let anchor = match (m.role, m.version) {
        (Role::Hmac, _) => &m.nonce,
        (Role::Key, v) if v >= 2 => &m.base,
        _ => return false,
    };
    m.state == State::Ready
        && !found.iter().any(|f| {
            f.meta
                .as_ref()
                .is_some_and(|k| k.role == Role::Key && k.version == 1 && &k.nonce == anchor)
        })
}

pub(super) struct Written {
    pub(super) master: ObjectHandle,
    pub(super) master_meta: Meta,
    pub(super) hmac: Option<(ObjectHandle, Meta)>,
    pub(super) scheme: Scheme,
}

impl Written {
    fn destroy(&self, s: &Session) {
        let _ = s.destroy_object(self.master);
        if let Some((h, _)) = &self.hmac {
            let _ = s.destroy_object(*h);
        }
    }
}

pub(super) fn write_pending(
    s: &Session,
    label: &str,
    nonce: &str,
    spec: &NewKey,
) -> CallResult<Written> {
    let hmac_meta = Meta::new(
        Role::Hmac,
        nonce,
        spec.scheme,
        spec.algorithm,
        &spec.provenance,
    );
    let hmac = match &spec.hmac {
        NewHmac::None => None,
        NewHmac::Generate => {
            let t = objects::hmac_template(label, &hmac_meta, None);
            Some(s.generate_key(&Mechanism::GenericSecretKeyGen, &t)?)
        }
        NewHmac::Given(v) => {
            let mut t = objects::hmac_template(label, &hmac_meta, Some(v.to_vec()));
            let h = s.create_object(&t);
            objects::wipe(&mut t);
            Some(h?)
        }
    };
    let master_meta = Meta::new(
        Role::Key,
        nonce,
        spec.scheme,
        spec.algorithm,
        &spec.provenance,
    );
    let master = match &spec.material {
        None => {
            let t = objects::master_template(label, &master_meta, spec.scheme, None);
            let keygen = objects::keygen_mechanism(spec.scheme);
            s.generate_key(&keygen, &t)
        }
        Some(v) => {
            let mut t =
                objects::master_template(label, &master_meta, spec.scheme, Some(v.to_vec()));
            let h = s.create_object(&t);
            objects::wipe(&mut t);
            h
        }
    };
    match master {
        Ok(master) => Ok(Written {
            master,
            master_meta,
            hmac: hmac.map(|h| (h, hmac_meta)),
            scheme: spec.scheme,
        }),
        Err(e) => {
            if let Some(h) = hmac {
                let _ = s.destroy_object(h);
            }
            Err(e.into())
        }
    }
}

pub(super) fn commit(
    s: &Session,
    w: Written,
    name: &KeyName,
    generation: u64,
) -> CallResult<IndexedKey> {
    let result = (|| -> std::result::Result<Meta, cryptoki::error::Error> {
        if let Some((h, meta)) = &w.hmac {
            s.update_attributes(*h, &[Attribute::Id(meta.clone().ready().encode())])?;
        }
        let ready = w.master_meta.clone().ready();
        s.update_attributes(w.master, &[Attribute::Id(ready.encode())])?;
        Ok(ready)
    })();
    match result {
        Ok(meta) => {
            let info = meta.key_info(name).unwrap_or(KeyInfo {
                name: name.clone(),
                scheme: w.scheme,
                algorithm: Algorithm::Aes256,
                created_at: meta.created_at,
                created_by: meta.created_by.clone(),
                version: 1,
            });
            Ok(IndexedKey {
                master: w.master,
                hmac: w.hmac.map(|(h, _)| h),
                info,
                nonce: nonce_value(&meta.nonce),
                generation,
                nonce_text: meta.nonce.clone(),
                versions: Vec::new(),
            })
        }
        Err(e) => {
            w.destroy(s);
            Err(e.into())
        }
    }
}
