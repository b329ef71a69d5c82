//! The `keystore:` section: `pkcs11:` (an HSM) or `soft:` (embedded), raw → validated.
//!
//! ```yaml
//! keystore:
//!   pkcs11:
//!     module: /usr/lib/vendor/libpkcs11.so     # path to the PKCS#11 module
//!     token: kesh                               # token label (or `serial: ...`)
//!     pin: ${KESH_PIN}                          # or `pin_file: /path`
//!     prefix: kesh/                             # label namespace
//!     sessions: 4                               # session pool size
//!     profile: generic                          # HSM family; detected when left out
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde_yaml::Value;

use super::ConfigError;
// The backends' settings and profile tables, not the backends: config validates, never opens.
use crate::keystore::pkcs11::profile;
use crate::keystore::pkcs11::settings::{IvSource, Pkcs11Config, TokenSelector};
pub use crate::keystore::settings::{KeystoreConfig, SoftConfig, SoftDir};
use crate::keystore::Scheme;
use crate::secret::Pin;

/// KES backends kesh does not serve; named so the error can point at `kesh migrate`.
const KES_BACKENDS: &[&str] = &[
    "fs", "vault", "aws", "azure", "gcp", "gemalto", "fortanix", "entrust", "kes",
];

impl KeystoreConfig {
    /// Validates the `keystore:` mapping (after `${VAR}` substitution).
    pub fn from_value(value: &Value) -> Result<Self, ConfigError> {
        let map = value.as_mapping().ok_or_else(|| {
            ConfigError::new("keystore", "expected a mapping with `pkcs11:` or `soft:`")
        })?;
        let mut found: Option<(&str, &Value)> = None;
        for (k, v) in map {
            let key = k.as_str().unwrap_or_default();
            if KES_BACKENDS.contains(&key) {
                return Err(ConfigError::new(
                    format!("keystore.{key}"),
                    format!(
                        "kesh does not serve KES's '{key}' keystore; use `pkcs11:` (keys in an HSM) or `soft:` (embedded keystore), \
                         and move existing keys with `kesh migrate --from <kes-config.yaml> --to <kesh-config.yaml>`"
                    ),
                ));
            }
            if key != "pkcs11" && key != "soft" {
                return Err(ConfigError::new(
                    format!("keystore.{key}"),
                    "unknown keystore; use `pkcs11:` or `soft:`",
                ));
            }
            if found.is_some() {
                return Err(ConfigError::new(
                    "keystore",
                    "more than one keystore specified; keep exactly one of `pkcs11:` and `soft:`",
                ));
            }
            found = Some((key, v));
        }
        match found {
            Some(("pkcs11", v)) => parse_pkcs11(v).map(KeystoreConfig::Pkcs11),
            Some((_, v)) => parse_soft(v).map(KeystoreConfig::Soft),
            None => Err(ConfigError::new(
                "keystore",
                "no keystore specified; add `pkcs11:` or `soft:`",
            )),
        }
    }
}

/// Field access that reports the full path on error.
struct Section<'a> {
    path: &'static str,
    map: Option<&'a serde_yaml::Mapping>,
}

impl<'a> Section<'a> {
    fn new(path: &'static str, value: &'a Value) -> Result<Self, ConfigError> {
        match value {
            Value::Mapping(m) => Ok(Section { path, map: Some(m) }),
            Value::Null => Ok(Section { path, map: None }),
            _ => Err(ConfigError::new(path, "expected a mapping")),
        }
    }

    fn field(&self, name: &str) -> String {
        format!("{}.{name}", self.path)
    }

    fn string(&self, name: &str) -> Result<Option<String>, ConfigError> {
        match self.map.and_then(|m| m.get(name)) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(Value::Bool(b)) => Ok(Some(b.to_string())),
            Some(_) => Err(ConfigError::new(
                self.field(name),
                "expected a single value",
            )),
        }
    }

    fn number(&self, name: &str) -> Result<Option<usize>, ConfigError> {
        self.string(name)?
            .map(|s| {
                s.trim().parse::<usize>().map_err(|_| {
                    ConfigError::new(self.field(name), format!("'{s}' is not a whole number"))
                })
            })
            .transpose()
    }

    fn duration(&self, name: &str) -> Result<Option<Duration>, ConfigError> {
        self.string(name)?
            .map(|s| {
                super::parse_duration(&s).ok_or_else(|| {
                    ConfigError::new(
                        self.field(name),
                        format!("'{s}' is not a duration; write e.g. `2s` or `500ms`"),
                    )
                })
            })
            .transpose()
    }

    fn boolean(&self, name: &str) -> Result<Option<bool>, ConfigError> {
        self.string(name)?
            .map(|s| super::parse_bool(&s, &self.field(name)))
            .transpose()
    }

    fn scheme(&self, name: &str) -> Result<Option<Scheme>, ConfigError> {
        self.string(name)?
            .map(|s| {
                Scheme::parse(&s).ok_or_else(|| {
                    ConfigError::new(
                        self.field(name),
                        format!("'{s}' is not a scheme; use `gcm`, `kwp` or `kes`"),
                    )
                })
            })
            .transpose()
    }

    fn reject_unknown(&self, known: &[&str]) -> Result<(), ConfigError> {
        for k in self.map.into_iter().flat_map(|m| m.keys()) {
            let k = k.as_str().unwrap_or("?");
            if !known.contains(&k) {
                return Err(ConfigError::new(
                    self.field(k),
                    format!("unknown field; known fields are: {}", known.join(", ")),
                ));
            }
        }
        Ok(())
    }
}

fn parse_pkcs11(value: &Value) -> Result<Pkcs11Config, ConfigError> {
    let s = Section::new("keystore.pkcs11", value)?;
    s.reject_unknown(&[
        "module",
        "token",
        "serial",
        "pin",
        "pin_file",
        "prefix",
        "sessions",
        "profile",
        "scheme",
        "iv",
        "session_wait",
        "session_keys",
        "message_aead",
        "write_lock",
    ])?;
    let module = s.string("module")?.ok_or_else(|| {
        ConfigError::new(
            s.field("module"),
            "required: the path of the PKCS#11 module (the vendor's .so file; see hsm-config/profiles/)",
        )
    })?;
    let token = match (s.string("token")?, s.string("serial")?) {
        (Some(label), None) => TokenSelector::Label(label),
        (None, Some(serial)) => TokenSelector::Serial(serial),
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                s.field("token"),
                "give either `token:` (label) or `serial:`, not both",
            ))
        }
        (None, None) => {
            return Err(ConfigError::new(
                s.field("token"),
                "required: the token label (or `serial:`)",
            ))
        }
    };
    let pin = match (s.string("pin")?, s.string("pin_file")?) {
        (Some(pin), None) => Pin::new(pin),
        (None, Some(file)) => {
            let text = zeroize::Zeroizing::new(std::fs::read_to_string(&file).map_err(|e| {
                ConfigError::new(s.field("pin_file"), format!("cannot read '{file}': {e}"))
            })?);
            Pin::new(text.trim_end_matches(['\n', '\r']).to_owned())
        }
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                s.field("pin"),
                "give either `pin:` or `pin_file:`, not both",
            ))
        }
        (None, None) => {
            return Err(ConfigError::new(
                s.field("pin"),
                "required: `pin: ${KESH_PIN}` (from the environment) or `pin_file: /path`",
            ))
        }
    };
    let profile = match s.string("profile")? {
        Some(name) => Some(profile::by_name(&name).ok_or_else(|| {
            let names: Vec<_> = profile::PROFILES.iter().map(|p| p.name).collect();
            ConfigError::new(
                s.field("profile"),
                format!("unknown profile '{name}'; known: {}", names.join(", ")),
            )
        })?),
        None => None,
    };
    let sessions = s.number("sessions")?;
    if sessions.is_some_and(|n| n == 0 || n > 1024) {
        return Err(ConfigError::new(
            s.field("sessions"),
            "must be between 1 and 1024",
        ));
    }
    let iv = match s.string("iv")?.as_deref() {
        None => None,
        Some("caller") => Some(IvSource::Caller),
        Some("device") => Some(IvSource::Device),
        Some(other) => {
            return Err(ConfigError::new(
                s.field("iv"),
                format!("'{other}': use `caller` or `device`"),
            ))
        }
    };
    let prefix = s.string("prefix")?.unwrap_or_else(|| "kesh/".to_owned());
    if prefix.len() > 64 {
        return Err(ConfigError::new(s.field("prefix"), "at most 64 bytes"));
    }
    Ok(Pkcs11Config {
        module: PathBuf::from(module),
        token,
        pin,
        prefix,
        session_wait: s
            .duration("session_wait")?
            .unwrap_or(Duration::from_secs(2)),
        profile,
        sessions,
        scheme: s.scheme("scheme")?,
        iv,
        session_keys: s.boolean("session_keys")?,
        message_aead: s.boolean("message_aead")?,
        write_lock: match s.string("write_lock")?.as_deref() {
            Some("none") => Some(None),
            Some(path) => Some(Some(PathBuf::from(path))),
            None => None,
        },
    })
}

fn parse_soft(value: &Value) -> Result<SoftConfig, ConfigError> {
    let s = Section::new("keystore.soft", value)?;
    s.reject_unknown(&["path", "kek_file", "scheme"])?;
    let dir = match (s.string("path")?, s.string("kek_file")?) {
        (Some(path), Some(kek)) => Some(SoftDir {
            path: path.into(),
            kek_file: kek.into(),
        }),
        (None, None) => None,
        (Some(_), None) => return Err(ConfigError::new(
            s.field("kek_file"),
            "required with `path:`: a file holding the 32-byte key-encryption key (base64 or hex)",
        )),
        (None, Some(_)) => {
            return Err(ConfigError::new(
                s.field("path"),
                "required with `kek_file:`: the key directory",
            ))
        }
    };
    Ok(SoftConfig {
        dir,
        scheme: s.scheme("scheme")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<KeystoreConfig, ConfigError> {
        let v: Value = serde_yaml::from_str(yaml).unwrap();
        KeystoreConfig::from_value(&v)
    }

    #[test]
    fn pkcs11_section_with_profile_defaults() {
        let cfg =
            parse("pkcs11:\n  module: /m.so\n  token: kesh\n  pin: '1234'\n  profile: softhsm\n")
                .unwrap();
        let KeystoreConfig::Pkcs11(c) = cfg else {
            panic!("not pkcs11")
        };
        assert_eq!(c.profile.map(|p| p.name), Some("softhsm"));
        // Left to the profile, resolved when the module is known.
        assert_eq!(c.sessions, None);
        assert_eq!(c.prefix, "kesh/");
        assert_eq!(c.token, TokenSelector::Label("kesh".into()));
        assert!(!format!("{c:?}").contains("1234"), "PIN leaked into Debug");
    }

    #[test]
    fn errors_name_the_field_and_the_fix() {
        let e = parse("fs:\n  path: /keys\n").unwrap_err();
        assert!(
            e.message.contains("pkcs11")
                && e.message.contains("soft")
                && e.message.contains("kesh migrate"),
            "{e}"
        );
        let e = parse("pkcs11:\n  module: /m.so\n  pin: x\n").unwrap_err();
        assert_eq!(e.field, "keystore.pkcs11.token");
        let e =
            parse("pkcs11:\n  module: /m.so\n  token: t\n  pin: x\n  sesions: 3\n").unwrap_err();
        assert_eq!(e.field, "keystore.pkcs11.sesions");
        let e =
            parse("pkcs11:\n  module: /m.so\n  token: t\n  pin: x\n  profile: nope\n").unwrap_err();
        assert!(e.message.contains("softhsm"), "{e}");
        let e = parse("soft: {}\npkcs11: {}\n").unwrap_err();
        assert!(e.message.contains("more than one"), "{e}");
        assert!(parse("{}").unwrap_err().message.contains("no keystore"));
        let e = parse("soft:\n  path: /k\n").unwrap_err();
        assert_eq!(e.field, "keystore.soft.kek_file");
    }
}
