//! Authorization: the admin identity and the config file's policies (docs/api.md, "Authentication
//! and authorization"; KES: `auth.go`, and `kes/policy.go` at github.com/minio/kms-go).
//!
//! An [`Authorizer`] is an immutable snapshot (replaced whole on SIGHUP). Its
//! [`Authorizer::authorize`] returns a [`Permit`] — the only proof that a request may run,
//! constructible only here — or a [`Denial`]. Each decision is logged as a structured event;
//! denials at most [`DENIAL_LOG_BURST`] a second, the rest counted into one summary line, so a
//! client without a certificate cannot fill the logs (the audit trail still has each denied
//! request of an audited route, and `kesh_policy_denials_total` counts them all).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use crate::identity::Identity;
use crate::locks::IgnorePoison;
use crate::name::KeyName;

/// Denial lines logged per second at most; the rest are summarised.
pub const DENIAL_LOG_BURST: u32 = 20;
const DENIAL_LOG_WINDOW: Duration = Duration::from_secs(1);

static DENIAL_LOG: DenialLog = DenialLog::new();

/// A fixed-window limit on denial log lines. Denials past the limit are counted, and the
/// count is logged (one line) with the first denial of a later window.
#[derive(Debug)]
struct DenialLog {
    window: Mutex<Option<DenialWindow>>,
}

#[derive(Debug, Clone, Copy)]
struct DenialWindow {
    started: Instant,
    logged: u32,
    /// Denials not logged since `unreported_since`.
    unreported: u64,
    unreported_since: Instant,
}

impl DenialLog {
    const fn new() -> Self {
        DenialLog {
            window: Mutex::new(None),
        }
    }

    /// Whether this denial gets its own line; reports the ones that did not first.
    fn admit(&self, now: Instant) -> bool {
        // A poisoned lock holds counters only: keep using them.
        let mut window = self.window.lock().ignore_poison();
        let w = window.get_or_insert(DenialWindow {
            started: now,
            logged: 0,
            unreported: 0,
            unreported_since: now,
        });
        if now.duration_since(w.started) >= DENIAL_LOG_WINDOW {
            if w.unreported > 0 {
                tracing::info!(
                    target: "kesh::server::policy",
                    denials = w.unreported,
                    over_ms = now.duration_since(w.unreported_since).as_millis() as u64,
                    limit_per_second = DENIAL_LOG_BURST,
                    "denials not logged one by one (rate limit); the audit trail and kesh_policy_denials_total have each"
                );
            }
            *w = DenialWindow {
                started: now,
                logged: 0,
                unreported: 0,
                unreported_since: now,
            };
        }
        if w.logged < DENIAL_LOG_BURST {
            w.logged += 1;
            true
        } else {
            if w.unreported == 0 {
                w.unreported_since = now;
            }
            w.unreported += 1;
            false
        }
    }
}

/// A policy name (docs/api.md, "Names and patterns"), distinct from key names and identities.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyName(String);

/// Why a policy name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy name '{0}' is empty, too long or contains invalid characters")]
pub struct InvalidPolicyName(pub String);

impl PolicyName {
    /// `s` as a policy name, if it follows the key-name rules.
    pub fn new(s: &str) -> Result<Self, InvalidPolicyName> {
        // Policy names follow the key-name grammar (kes `validName`); reuse its checker.
        match KeyName::new(s) {
            Ok(_) => Ok(PolicyName(s.to_owned())),
            Err(_) => Err(InvalidPolicyName(s.to_owned())),
        }
    }

    /// The name's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

crate::name::text_fmt!(PolicyName);

/// Allow and deny rules over decoded URL paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Path patterns the policy allows.
    pub allow: Vec<String>,
    /// Path patterns it denies; checked first.
    pub deny: Vec<String>,
}

/// KES pattern matching: empty never matches; a trailing `*` is a plain prefix test; anything
/// else must equal the path.
fn pattern_matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix('*') {
        _ if pattern.is_empty() => false,
        Some(prefix) => path.starts_with(prefix),
        None => pattern == path,
    }
}

impl Policy {
    /// Deny first, then allow; nothing matching means no.
    pub fn allows(&self, path: &str) -> bool {
        if self.deny.iter().any(|p| pattern_matches(p, path)) {
            return false;
        }
        self.allow.iter().any(|p| pattern_matches(p, path))
    }
}

/// A policy with the identities assigned to it.
#[derive(Debug, Clone)]
pub struct PolicyEntry {
    /// The allow and deny patterns.
    pub policy: Policy,
    /// The identities assigned to it.
    pub identities: Vec<Identity>,
}

/// Errors building an [`Authorizer`] (config-time).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// An identity is listed under two policies.
    #[error("cannot assign policy '{policy}' to '{identity}': identity already has a policy")]
    AlreadyAssigned {
        /// The second policy.
        policy: String,
        /// The identity.
        identity: String,
    },
    /// The admin identity is listed under a policy.
    #[error("cannot assign policy '{policy}' to '{identity}': identity is the admin")]
    AdminInPolicy {
        /// The policy.
        policy: String,
        /// The admin identity.
        identity: String,
    },
}

/// Proof that a request passed authentication and authorization.
#[derive(Debug, Clone)]
pub struct Permit {
    identity: Option<Identity>,
    admin: bool,
}

impl Permit {
    /// The caller, if it presented a certificate (always, except on `skip_auth` routes).
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// Whether the caller is the admin.
    pub fn is_admin(&self) -> bool {
        self.admin
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// The connection carried no client certificate (only possible with `skip_auth` somewhere).
    NoCertificate,
    /// Unknown identity, or its policy rejects the path.
    NotAllowed,
}

/// The admin and policies in force; swapped whole on reload.
#[derive(Debug)]
pub struct Authorizer {
    admin: Identity,
    policies: BTreeMap<PolicyName, PolicyEntry>,
    assigned: HashMap<Identity, PolicyName>,
    created_at: OffsetDateTime,
}

impl Authorizer {
    /// Builds the snapshot; each identity may belong to one policy, never the admin's.
    pub fn new(
        admin: Identity,
        policies: BTreeMap<PolicyName, PolicyEntry>,
        created_at: OffsetDateTime,
    ) -> Result<Self, PolicyError> {
        let mut assigned = HashMap::new();
        for (name, entry) in &policies {
            for id in &entry.identities {
                if *id == admin {
                    return Err(PolicyError::AdminInPolicy {
                        policy: name.to_string(),
                        identity: id.to_string(),
                    });
                }
                if assigned.insert(id.clone(), name.clone()).is_some() {
                    return Err(PolicyError::AlreadyAssigned {
                        policy: name.to_string(),
                        identity: id.to_string(),
                    });
                }
            }
        }
        Ok(Authorizer {
            admin,
            policies,
            assigned,
            created_at,
        })
    }

    /// The full check of every authenticated route: admin passes; otherwise the identity's
    /// policy must allow `path` (the decoded URL path).
    pub fn authorize(&self, identity: Option<&Identity>, path: &str) -> Result<Permit, Denial> {
        let Some(identity) = identity else {
            if DENIAL_LOG.admit(Instant::now()) {
                tracing::info!(target: "kesh::server::policy", path, decision = "deny", reason = "no client certificate");
            }
            return Err(Denial::NoCertificate);
        };
        if identity.ct_eq(&self.admin) {
            tracing::debug!(target: "kesh::server::policy", %identity, path, decision = "allow", reason = "admin");
            return Ok(Permit {
                identity: Some(identity.clone()),
                admin: true,
            });
        }
        let allowed = self
            .assigned
            .get(identity)
            .and_then(|name| self.policies.get(name).map(|e| (name, e)))
            .filter(|(_, e)| e.policy.allows(path));
        match allowed {
            Some((policy, _)) => {
                tracing::debug!(target: "kesh::server::policy", %identity, path, %policy, decision = "allow");
                Ok(Permit {
                    identity: Some(identity.clone()),
                    admin: false,
                })
            }
            None => {
                if DENIAL_LOG.admit(Instant::now()) {
                    tracing::info!(target: "kesh::server::policy", %identity, path, decision = "deny", reason = "insufficient permissions");
                }
                Err(Denial::NotAllowed)
            }
        }
    }

    /// The `insecureIdentifyOnly` authenticator: self-describe and `skip_auth` routes. Never
    /// fails; the permit carries whatever identity the connection has.
    pub fn identify_only(&self, identity: Option<&Identity>) -> Permit {
        let admin = identity.is_some_and(|id| id.ct_eq(&self.admin));
        Permit {
            identity: identity.cloned(),
            admin,
        }
    }

    /// The configured admin identity.
    pub fn admin(&self) -> &Identity {
        &self.admin
    }

    /// When this configuration was loaded (what describe calls report as `created_at`).
    pub fn created_at(&self) -> OffsetDateTime {
        self.created_at
    }

    /// The named policy, if it exists.
    pub fn policy(&self, name: &PolicyName) -> Option<&PolicyEntry> {
        self.policies.get(name)
    }

    /// Every policy name, sorted.
    pub fn policy_names(&self) -> impl Iterator<Item = &PolicyName> {
        self.policies.keys()
    }

    /// The policy an identity is assigned to.
    pub fn policy_of(&self, identity: &Identity) -> Option<(&PolicyName, &PolicyEntry)> {
        let name = self.assigned.get(identity)?;
        self.policies.get(name).map(|e| (name, e))
    }

    /// Every known identity: the admin and all assigned ones.
    pub fn identities(&self) -> impl Iterator<Item = &Identity> {
        std::iter::once(&self.admin).chain(self.assigned.keys())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(c: char) -> Identity {
        Identity::new(&c.to_string().repeat(64)).unwrap()
    }

    fn authorizer() -> Authorizer {
        let mut p = BTreeMap::new();
        p.insert(
            PolicyName::new("minio").unwrap(),
            PolicyEntry {
                policy: Policy {
                    allow: vec!["/v1/key/*".into(), "/v1/status".into()],
                    deny: vec!["/v1/key/delete/*".into(), "".into()],
                },
                identities: vec![id('b')],
            },
        );
        Authorizer::new(id('a'), p, OffsetDateTime::UNIX_EPOCH).unwrap()
    }

    #[test]
    fn deny_first_then_prefix_or_exact() {
        let a = authorizer();
        assert!(a
            .authorize(Some(&id('a')), "/v1/key/delete/x")
            .unwrap()
            .is_admin());
        assert!(a.authorize(Some(&id('b')), "/v1/key/create/x").is_ok());
        assert!(a.authorize(Some(&id('b')), "/v1/status").is_ok());
        assert_eq!(
            a.authorize(Some(&id('b')), "/v1/status/").unwrap_err(),
            Denial::NotAllowed
        );
        assert_eq!(
            a.authorize(Some(&id('b')), "/v1/key/delete/x").unwrap_err(),
            Denial::NotAllowed
        );
        assert_eq!(
            a.authorize(Some(&id('c')), "/v1/key/create/x").unwrap_err(),
            Denial::NotAllowed
        );
        assert_eq!(
            a.authorize(None, "/v1/status").unwrap_err(),
            Denial::NoCertificate
        );
        assert!(!Policy {
            allow: vec!["".into()],
            deny: vec![]
        }
        .allows(""));
        assert!(!Policy {
            allow: vec!["/v1/*/x".into()],
            deny: vec![]
        }
        .allows("/v1/a/x"));
    }

    #[test]
    fn one_policy_per_identity() {
        let entry = PolicyEntry {
            policy: Policy::default(),
            identities: vec![id('b')],
        };
        let mut p = BTreeMap::new();
        p.insert(PolicyName::new("p1").unwrap(), entry.clone());
        p.insert(PolicyName::new("p2").unwrap(), entry);
        let err = Authorizer::new(id('a'), p, OffsetDateTime::UNIX_EPOCH).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot assign policy 'p2' to '{}': identity already has a policy",
                id('b')
            )
        );
    }

    #[test]
    fn denial_lines_are_limited_per_window_and_the_rest_counted() {
        let log = DenialLog::new();
        let t0 = Instant::now();
        let admitted = (0..100).filter(|_| log.admit(t0)).count();
        assert_eq!(admitted, DENIAL_LOG_BURST as usize);
        let w = log.window.lock().unwrap().unwrap();
        assert_eq!(w.unreported, 100 - u64::from(DENIAL_LOG_BURST));
        // A new window logs again and starts counting afresh.
        assert!(log.admit(t0 + DENIAL_LOG_WINDOW));
        let w = log.window.lock().unwrap().unwrap();
        assert_eq!((w.logged, w.unreported), (1, 0));
    }
}
