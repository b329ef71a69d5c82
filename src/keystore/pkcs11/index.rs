//! The name index: which token objects hold each key, found by one scan at start, kept
//! current on create, delete, misses and stale handles, and refreshed when the token's change
//! marker says another instance changed it ([`super::changes`]).
//!
//! Owns [`Index`], the searches of the token (full scans and targeted ones) and the marker
//! poll. Knows nothing of sealing or of how keys are written.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::copies::{self, nonce_value};
use super::device::Device;
use super::error::Pkcs11Error;
use super::objects::{Meta, Role, State};
use super::seal::Key;
use super::seam::CallResult;
use super::workers::Placement;
use super::{changes, Inner, NEGATIVE_TTL_MAX, NEGATIVE_TTL_MIN, TOKEN_WRITES};
use crate::keystore::{KeyInfo, KeystoreError, Result};
use crate::locks::IgnorePoison;
use crate::name::KeyName;

/// A key as the index knows it: the token objects that hold it, their handles valid for one
/// device generation.
#[derive(Debug)]
pub(super) struct IndexedKey {
    pub(super) master: ObjectHandle,
    pub(super) hmac: Option<ObjectHandle>,
    pub(super) info: KeyInfo,
    /// The creation nonce linking the key's objects ([`objects::Meta`]).
    pub(super) nonce: u64,
    pub(super) generation: u64,
    /// The creation nonce as recorded: what versions 2 and up name as their `base`.
    pub(super) nonce_text: String,
    /// Versions 2 and up, oldest first (version 1 is `master`).
    pub(super) versions: Vec<VersionObject>,
}

/// One master object of a key version ≥ 2.
#[derive(Debug, Clone)]
pub(super) struct VersionObject {
    pub(super) version: u32,
    pub(super) master: ObjectHandle,
    pub(super) nonce: u64,
    pub(super) created_at: time::OffsetDateTime,
}

/// Which version of a key an operation uses.
#[derive(Debug, Clone, Copy)]
pub(super) enum Pick {
    /// The newest: what seals.
    Sealing,
    Version(u32),
}

impl IndexedKey {
    /// The newest version's number and creation time.
    pub(super) fn newest(&self) -> (u32, time::OffsetDateTime) {
        self.versions
            .last()
            .map_or((1, self.info.created_at), |v| (v.version, v.created_at))
    }

    /// The version's number, token handle and creation nonce.
    pub(super) fn resolve(&self, pick: Pick) -> Option<(u32, ObjectHandle, u64)> {
        let wanted = match pick {
            Pick::Sealing => self.info.version,
            Pick::Version(v) => v,
        };
        if wanted == 1 {
            return Some((1, self.master, self.nonce));
        }
        self.versions
            .iter()
            .find(|v| v.version == wanted)
            .map(|v| (v.version, v.master, v.nonce))
    }

    /// Every version's number and creation time, oldest first.
    pub(super) fn version_times(&self) -> Vec<(u32, time::OffsetDateTime)> {
        std::iter::once((1, self.info.created_at))
            .chain(self.versions.iter().map(|v| (v.version, v.created_at)))
            .collect()
    }

    /// Every token object of the key with its nonce: masters of all versions, then HMAC.
    pub(super) fn objects(&self) -> impl Iterator<Item = (ObjectHandle, u64)> + '_ {
        std::iter::once((self.master, self.nonce))
            .chain(self.versions.iter().map(|v| (v.master, v.nonce)))
            .chain(self.hmac.map(|h| (h, self.nonce)))
    }
}

#[derive(Default)]
pub(super) struct Index {
    pub(super) keys: HashMap<KeyName, Arc<IndexedKey>>,
    pub(super) scanned_at: Option<Instant>,
    /// While a scan runs: what the instance learned meanwhile (an entry, or `None` for gone),
    /// applied over the scan's result so the older scan cannot undo it.
    pub(super) learned_during_scan: Option<Vec<(KeyName, Option<Arc<IndexedKey>>)>>,
}

impl Index {
    pub(super) fn scanned(keys: HashMap<KeyName, Arc<IndexedKey>>) -> Self {
        Index {
            keys,
            scanned_at: Some(Instant::now()),
            learned_during_scan: None,
        }
    }

    pub(super) fn learn(
        &mut self,
        name: &KeyName,
        entry: Option<Arc<IndexedKey>>,
    ) -> Option<Arc<IndexedKey>> {
        if let Some(learned) = &mut self.learned_during_scan {
            learned.push((name.clone(), entry.clone()));
        }
        match entry {
            Some(e) => self.keys.insert(name.clone(), e),
            None => self.keys.remove(name),
        }
    }
}

impl Inner {
    pub(super) fn label(&self, name: &KeyName) -> String {
        format!("{}{}", self.cfg.prefix, name)
    }

    pub(super) fn cached(&self, name: &KeyName) -> Option<Arc<IndexedKey>> {
        self.index.read().ignore_poison().keys.get(name).cloned()
    }

    /// Drops a key from the index, and its session copies with it.
    pub(super) fn forget(&self, name: &KeyName) {
        let gone = self.index.write().ignore_poison().learn(name, None);
        if let (Some(e), Ok(device)) = (gone, self.current_device()) {
            for (h, _) in e.objects() {
                device.copies.forget(h);
            }
        }
    }

    pub(super) fn remember(&self, entry: IndexedKey) -> Arc<IndexedKey> {
        let entry = Arc::new(entry);
        self.index
            .write()
            .ignore_poison()
            .learn(&entry.info.name, Some(entry.clone()));
        entry
    }

    /// The indexed key `name`, searching the token on a miss.
    pub(super) async fn indexed_key(
        self: &Arc<Self>,
        name: &KeyName,
        force: bool,
    ) -> Result<Arc<IndexedKey>> {
        if !force {
            if let Some(e) = self.cached(name) {
                return Ok(e);
            }
        }
        let mut misses = self.misses.lock().await;
        if let Some(e) = self.cached(name) {
            return Ok(e);
        }
        let now = Instant::now();
        misses.retain(|_, until| now < *until);
        if !force && misses.contains_key(name) {
            return Err(KeystoreError::KeyNotFound);
        }
        let found = self.search_token(name).await?;
        match found {
            Some(key) => {
                misses.remove(name);
                Ok(self.remember(key))
            }
            None => {
                let ttl = (now.elapsed() * 10).clamp(NEGATIVE_TTL_MIN, NEGATIVE_TTL_MAX);
                misses.insert(name.clone(), Instant::now() + ttl);
                Err(KeystoreError::KeyNotFound)
            }
        }
    }

    /// One targeted search of the token for `name`'s ready key (counted in `searches`).
    async fn search_token(self: &Arc<Self>, name: &KeyName) -> Result<Option<IndexedKey>> {
        let label = self.label(name);
        let wanted = name.clone();
        self.searches.fetch_add(1, Ordering::Relaxed);
        let inner = self.clone();
        Ok(self
            .run_on_worker(move |s, d| {
                let _reads = inner.hold_reads();
                find_ready(s, &label, &wanted, d.generation)
            })
            .await?)
    }

    /// Searches the token for `name` now, even when it is indexed, and indexes what it finds:
    /// for versions another instance made or destroyed. Serialised with misses.
    pub(super) async fn refresh(self: &Arc<Self>, name: &KeyName) -> Result<Arc<IndexedKey>> {
        let _misses = self.misses.lock().await;
        let found = self.search_token(name).await?;
        match found {
            Some(key) => Ok(self.remember(key)),
            None => {
                self.forget(name);
                Err(KeystoreError::KeyNotFound)
            }
        }
    }

    /// Runs `op` with the handles to use a key version by (its session copies when
    /// `session_keys` is on), retrying once through a fresh search when they turn out stale.
    /// A version the entry lacks fails with `VersionNotFound`.
    pub(super) async fn with_key<T, F>(
        self: &Arc<Self>,
        name: &KeyName,
        pick: Pick,
        op: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Session, &Key) -> CallResult<T> + Clone + Send + Sync + 'static,
    {
        self.with_indexed_key(name, Placement::Anywhere, move |s, d, indexed| {
            let (version, handle, nonce) =
                indexed.resolve(pick).ok_or(Pkcs11Error::VersionNotFound)?;
            let key = Key {
                master: d.copies.working(s, handle, nonce)?,
                device: d,
                indexed,
                version,
                nonce,
            };
            op(s, &key)
        })
        .await
    }

    /// [`Self::with_key`] for one version; a version this instance has not seen (another
    /// instance just rotated) is looked up on the token once, at most every
    /// [`NEGATIVE_TTL_MIN`] per key, so ciphertexts naming made-up versions cost no searches.
    pub(super) async fn with_version<T, F>(
        self: &Arc<Self>,
        name: &KeyName,
        version: u32,
        op: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Session, &Key) -> CallResult<T> + Clone + Send + Sync + 'static,
    {
        match self
            .with_key(name, Pick::Version(version), op.clone())
            .await
        {
            Err(KeystoreError::VersionNotFound) if self.may_look_up_versions(name) => {
                self.refresh(name).await?;
                self.with_key(name, Pick::Version(version), op).await
            }
            other => other,
        }
    }

    fn may_look_up_versions(&self, name: &KeyName) -> bool {
        let mut last = self.version_lookups.lock().ignore_poison();
        let now = Instant::now();
        if last
            .get(name)
            .is_some_and(|at| now.duration_since(*at) < NEGATIVE_TTL_MIN)
        {
            return false;
        }
        if last.len() > 10_000 {
            last.retain(|_, at| now.duration_since(*at) < NEGATIVE_TTL_MIN);
        }
        last.insert(name.clone(), now);
        true
    }

    /// Runs `op` against an indexed key (its token objects), retrying once through a fresh
    /// search when the handles turn out stale (deleted by another instance, or from before a
    /// recovery).
    pub(super) async fn with_indexed_key<T, F>(
        self: &Arc<Self>,
        name: &KeyName,
        placement: Placement,
        op: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Session, &Device, &IndexedKey) -> CallResult<T> + Clone + Send + Sync + 'static,
    {
        let mut force = false;
        for _ in 0..2 {
            let indexed = self.indexed_key(name, force).await?;
            let op = op.clone();
            let outcome = self
                .run_in(placement, move |s, d| {
                    if d.generation != indexed.generation {
                        return Err(Pkcs11Error::Stale);
                    }
                    match op(s, d, &indexed) {
                        // The module's way of saying the key may be gone: search once more
                        // (a key still there then fails with the error itself).
                        Err(e) if !force && d.gone_objects.maybe_gone(&e) => {
                            Err(Pkcs11Error::Stale)
                        }
                        other => other,
                    }
                })
                .await;
            match outcome {
                Ok(v) => return Ok(v),
                Err(e) if e.is_stale() => {
                    self.forget(name);
                    force = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.forget(name);
        Err(KeystoreError::KeyNotFound)
    }

    pub(super) async fn rescan(self: &Arc<Self>) -> Result<()> {
        let _writes = TOKEN_WRITES.lock().await;
        let prefix = self.cfg.prefix.clone();
        self.searches.fetch_add(1, Ordering::Relaxed);
        self.index.write().ignore_poison().learned_during_scan = Some(Vec::new());
        let scanned = self
            .run_on_worker(move |s, d| {
                let keys = scan(s, &prefix, d.generation)?;
                let live: HashSet<_> = keys
                    .values()
                    .flat_map(|e| {
                        e.objects()
                            .map(|(h, nonce)| copies::Original::new(h, nonce))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                d.copies.retain(s, &live);
                Ok(keys)
            })
            .await
            .map_err(KeystoreError::from);
        let mut index = self.index.write().ignore_poison();
        let learned = index.learned_during_scan.take().unwrap_or_default();
        let mut keys = scanned?;
        for (name, entry) in learned {
            match entry {
                Some(e) => keys.insert(name, e),
                None => keys.remove(&name),
            };
        }
        *index = Index::scanned(keys);
        Ok(())
    }

    /// The change-marker poll, for as long as the keystore lives. Each [`changes::POLL`] it
    /// replaces the marker if this instance changed the token since the last poll (one
    /// marker write however many keys changed), then reads it, and rescans the token when
    /// someone else changed it, or [`changes::FULL_RESCAN`] after the last scan. Rescans take
    /// at most half of the time (a scan that took t waits t before the next), so a bulk load
    /// on another instance cannot keep a worker scanning.
    pub(super) async fn watch(inner: std::sync::Weak<Self>) {
        let mut next_scan_after = Instant::now();
        loop {
            tokio::time::sleep(changes::POLL).await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            if inner.current_device().is_err() {
                continue;
            }
            let Ok(stamp) = inner.clone().poll_marker().await else {
                continue;
            };
            let seen = inner.marker_seen.lock().ignore_poison().clone();
            let old = inner
                .index
                .read()
                .ignore_poison()
                .scanned_at
                .is_none_or(|at| at.elapsed() > changes::FULL_RESCAN);
            if (seen.as_ref() == Some(&stamp) && !old) || Instant::now() < next_scan_after {
                continue;
            }
            let started = Instant::now();
            match inner.rescan().await {
                Ok(()) => *inner.marker_seen.lock().ignore_poison() = Some(stamp),
                Err(e) => {
                    tracing::debug!(error = %e, "rescan after a change marker failed; next poll retries")
                }
            }
            next_scan_after = Instant::now() + started.elapsed();
        }
    }

    /// Replaces the marker when this instance's own changes are due, then returns the marker
    /// as it is now.
    pub(super) async fn poll_marker(self: Arc<Self>) -> CallResult<changes::Stamp> {
        // Not beside this process's own writes and scans (see TOKEN_WRITES).
        let _writes = TOKEN_WRITES.lock().await;
        let due = self.marker_due.swap(false, Ordering::AcqRel);
        let inner = self.clone();
        let polled = self
            .run_on_worker(move |s, d| {
                let mut known = inner.markers_known.lock().ignore_poison();
                if !due {
                    return changes::read_known(s, &inner.cfg.prefix, &mut known, d.generation);
                }
                // The next poll searches: the markers are new.
                *known = None;
                let _held = inner.hold_writes()?;
                let (before, after) = changes::touch(s, &inner.cfg.prefix)?;
                let mut seen = inner.marker_seen.lock().ignore_poison();
                // Our own changes are in our index already; anyone else's are not.
                if seen.as_ref() == Some(&before) {
                    *seen = Some(after.clone());
                }
                Ok(after)
            })
            .await;
        if due && polled.is_err() {
            self.marker_due.store(true, Ordering::Release);
        }
        polled
    }
}

/// One object found under a key's label, with its decoded metadata: a master or HMAC key,
/// pending or ready, or a foreign object (no metadata).
pub(super) struct LabelledObject {
    pub(super) handle: ObjectHandle,
    pub(super) meta: Option<Meta>,
}

pub(super) fn survey(s: &Session, label: &str) -> CallResult<Vec<LabelledObject>> {
    // Token objects only: never a session copy ([`copies`]) or a `kwp` transient.
    let handles = s.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Token(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ])?;
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        let meta = match s
            .get_attributes(handle, &[AttributeType::Id])
            .map_err(Pkcs11Error::from)
        {
            Ok(attrs) => attrs.into_iter().find_map(|a| match a {
                Attribute::Id(id) => Meta::decode(&id),
                _ => None,
            }),
            // Deleted between the search and the read: not there.
            Err(e) if e.is_stale() => continue,
            Err(e) => return Err(e),
        };
        out.push(LabelledObject { handle, meta });
    }
    Ok(out)
}

/// The ready key under `label`, if any.
pub(super) fn find_ready(
    s: &Session,
    label: &str,
    name: &KeyName,
    generation: u64,
) -> CallResult<Option<IndexedKey>> {
    let found = survey(s, label)?;
    Ok(pick_ready(&found, name, generation))
}

/// Whether a committed master key is under the label, readable by this version or not: a
/// create must never remove one (a newer kesh may have written a scheme this one can't name).
pub(super) fn has_ready_master(found: &[LabelledObject]) -> bool {
    found.iter().any(|f| {
        f.meta
            .as_ref()
            .is_some_and(|m| m.role == Role::Key && m.state == State::Ready && m.version == 1)
    })
}

/// The ready key among the objects under one label, as the index holds it.
pub(super) fn pick_ready(
    found: &[LabelledObject],
    name: &KeyName,
    generation: u64,
) -> Option<IndexedKey> {
    // Two ready masters cannot come out of the create protocol; if a foreign tool made them,
    // the smallest nonce wins on every instance alike.
    let master = found
        .iter()
        .filter_map(|f| f.meta.as_ref().map(|m| (f, m)))
        .filter(|(_, m)| m.role == Role::Key && m.state == State::Ready && m.version == 1)
        .min_by(|a, b| a.1.nonce.cmp(&b.1.nonce))?;
    let mut info = master.1.key_info(name)?;
    // Versions of this key (their `base` names its master); one object per version, the
    // smallest nonce if a foreign tool made two.
    let mut versions: Vec<(VersionObject, &str)> = Vec::new();
    for (f, m) in found.iter().filter_map(|f| f.meta.as_ref().map(|m| (f, m))) {
        if m.role != Role::Key
            || m.state != State::Ready
            || m.version < 2
            || m.base != master.1.nonce
        {
            continue;
        }
        let candidate = VersionObject {
            version: m.version,
            master: f.handle,
            nonce: nonce_value(&m.nonce),
            created_at: m.created_at,
        };
        match versions.iter_mut().find(|(v, _)| v.version == m.version) {
            Some(slot) if m.nonce.as_str() < slot.1 => *slot = (candidate, &m.nonce),
            Some(_) => {}
            None => versions.push((candidate, &m.nonce)),
        }
    }
    versions.sort_by_key(|(v, _)| v.version);
    let versions: Vec<VersionObject> = versions.into_iter().map(|(v, _)| v).collect();
    info.version = versions.last().map_or(1, |v| v.version);
    let nonce = nonce_value(&master.1.nonce);
    let hmac = found
        .iter()
        .find(|f| {
            f.meta.as_ref().is_some_and(|m| {
                m.role == Role::Hmac && m.state == State::Ready && m.nonce == master.1.nonce
            })
        })
        .map(|f| f.handle);
    Some(IndexedKey {
        master: master.0.handle,
        hmac,
        info,
        nonce,
        generation,
        nonce_text: master.1.nonce.clone(),
        versions,
    })
}

/// Scans every secret key on the token once and builds the index.
pub(super) fn scan(
    s: &Session,
    prefix: &str,
    generation: u64,
) -> CallResult<HashMap<KeyName, Arc<IndexedKey>>> {
    let handles = s.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Token(true),
    ])?;
    let mut by_name: HashMap<KeyName, Vec<LabelledObject>> = HashMap::new();
    for handle in handles {
        let attrs = match s
            .get_attributes(handle, &[AttributeType::Label, AttributeType::Id])
            .map_err(Pkcs11Error::from)
        {
            Ok(a) => a,
            Err(e) if e.is_stale() => continue,
            Err(e) => return Err(e),
        };
        let (mut label, mut meta) = (None, None);
        for a in attrs {
            match a {
                Attribute::Label(l) => label = String::from_utf8(l).ok(),
                Attribute::Id(id) => meta = Meta::decode(&id),
                _ => {}
            }
        }
        let Some(name) = label
            .as_deref()
            .and_then(|l| l.strip_prefix(prefix))
            .and_then(|n| KeyName::new(n).ok())
        else {
            continue;
        };
        if meta.is_some() {
            by_name
                .entry(name)
                .or_default()
                .push(LabelledObject { handle, meta });
        }
    }
    Ok(by_name
        .into_iter()
        .filter_map(|(name, found)| {
            let key = pick_ready(&found, &name, generation)?;
            Some((name, Arc::new(key)))
        })
        .collect())
}
