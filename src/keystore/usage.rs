//! Per-version use of keys: seals, unseals and the time of last use, in this process's memory.
//!
//! Both backends count here on every seal and unseal. Nothing is written to the token or the
//! key directory per request (zero writes: the figures are since this process started; each
//! instance reports its own, and an operator sums them across instances). Knows nothing of
//! how keys are stored.

use std::collections::HashMap;
use std::sync::Mutex;

use time::OffsetDateTime;

use super::{VersionInfo, VersionState};
use crate::locks::IgnorePoison;
use crate::name::KeyName;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counter {
    seals: u64,
    unseals: u64,
    /// Unix seconds of the last seal or unseal; 0 = never.
    last_used: i64,
}

/// One key version's figures, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionUsage {
    /// The key.
    pub key: KeyName,
    /// The version.
    pub version: u32,
    /// Seals with it since start.
    pub seals: u64,
    /// Unseals with it since start.
    pub unseals: u64,
}

/// The counters of every key version used since start.
#[derive(Debug, Default)]
pub struct Usage {
    keys: Mutex<HashMap<KeyName, Vec<(u32, Counter)>>>,
}

impl Usage {
    fn bump(&self, name: &KeyName, version: u32, f: impl FnOnce(&mut Counter)) {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        // A poisoned lock holds counters a panic interrupted mid-increment: still counters.
        let mut keys = self.keys.lock().ignore_poison();
        let versions = match keys.get_mut(name) {
            Some(v) => v,
            None => keys.entry(name.clone()).or_default(),
        };
        let counter = match versions.iter().position(|(v, _)| *v == version) {
            Some(i) => &mut versions[i].1,
            None => {
                versions.push((version, Counter::default()));
                &mut versions.last_mut().expect("just pushed").1
            }
        };
        f(counter);
        counter.last_used = now;
    }

    /// Counts a seal with `version` of `name`.
    pub fn sealed(&self, name: &KeyName, version: u32) {
        self.bump(name, version, |c| c.seals += 1);
    }

    /// Counts an unseal with `version` of `name`.
    pub fn unsealed(&self, name: &KeyName, version: u32) {
        self.bump(name, version, |c| c.unseals += 1);
    }

    /// The versions listing of `name` from its versions' `(number, created_at)`, oldest first:
    /// each with this process's use of it; the newest seals.
    pub fn listing(&self, name: &KeyName, times: Vec<(u32, OffsetDateTime)>) -> Vec<VersionInfo> {
        let newest = times.last().map_or(1, |(v, _)| *v);
        times
            .into_iter()
            .map(|(version, created_at)| {
                let (seals, unseals, last_used) = self.of(name, version);
                VersionInfo {
                    version,
                    created_at,
                    state: if version == newest {
                        VersionState::Sealing
                    } else {
                        VersionState::Active
                    },
                    seals,
                    unseals,
                    last_used,
                }
            })
            .collect()
    }

    /// Seals, unseals and last use of one version (zeros and `None` when unused).
    pub fn of(&self, name: &KeyName, version: u32) -> (u64, u64, Option<OffsetDateTime>) {
        let keys = self.keys.lock().ignore_poison();
        let c = keys
            .get(name)
            .and_then(|v| v.iter().find(|(n, _)| *n == version))
            .map(|(_, c)| *c)
            .unwrap_or_default();
        let last = (c.last_used != 0)
            .then(|| OffsetDateTime::from_unix_timestamp(c.last_used).ok())
            .flatten();
        (c.seals, c.unseals, last)
    }

    /// A deleted key's counters go with it (a new key of the same name starts at zero).
    pub fn forget(&self, name: &KeyName) {
        self.keys.lock().ignore_poison().remove(name);
    }

    /// Every version used since start, sorted by key and version.
    pub fn snapshot(&self) -> Vec<VersionUsage> {
        let keys = self.keys.lock().ignore_poison();
        let mut out: Vec<VersionUsage> = keys
            .iter()
            .flat_map(|(k, versions)| {
                versions.iter().map(|(v, c)| VersionUsage {
                    key: k.clone(),
                    version: *v,
                    seals: c.seals,
                    unseals: c.unseals,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.key, a.version).cmp(&(&b.key, b.version)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_version() {
        let u = Usage::default();
        let k = KeyName::new("k").unwrap();
        u.sealed(&k, 2);
        u.sealed(&k, 2);
        u.unsealed(&k, 1);
        assert_eq!(u.of(&k, 2).0, 2);
        assert_eq!(u.of(&k, 1).1, 1);
        assert!(u.of(&k, 1).2.is_some());
        assert_eq!(u.of(&k, 3), (0, 0, None));
        assert_eq!(u.snapshot().len(), 2);
        u.forget(&k);
        assert!(u.snapshot().is_empty());
    }
}
