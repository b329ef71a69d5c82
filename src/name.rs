//! Validated names and list patterns (docs/api.md, "Names and
//! patterns"; KES: `auth.go` `validName`).
//!
//! A [`KeyName`] proves its text is 1–80 bytes of `[0-9A-Za-z_-]`, not starting or ending with
//! `-` and not `_` alone. A [`Pattern`] is the same with an optional trailing `*`, or empty.

const MAX_LEN: usize = 80;

fn valid_chars(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LEN
        && s != "_"
        && valid_chars(s)
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Why a name was refused; the server words the wire message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is empty, too long or contains invalid characters")]
pub struct InvalidName(pub String);

/// A key name that passed the KES rules.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyName(String);

impl KeyName {
    /// `s` as a key name, if it follows the rules above.
    pub fn new(s: &str) -> Result<Self, InvalidName> {
        if valid_name(s) {
            Ok(KeyName(s.to_owned()))
        } else {
            Err(InvalidName(s.to_owned()))
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `Display` as the text itself and `Debug` as `Type(text)`, for the validated-text newtypes
/// (key names, identities, policy names), none of which is secret.
macro_rules! text_fmt {
    ($t:ident) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!(stringify!($t), "({})"), self.0)
            }
        }
    };
}
pub(crate) use text_fmt;

text_fmt!(KeyName);

/// A listing pattern: empty, `*`, a name, or a name followed by one `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// `s` as a listing pattern, if it follows the rules above.
    pub fn new(s: &str) -> Result<Self, InvalidName> {
        let ok = s.is_empty()
            || s == "*"
            || match s.strip_suffix('*') {
                // `abc*`: the stem is a name prefix; a stem may end in `-` (`_-*` is valid).
                Some(stem) => stem.len() < MAX_LEN && valid_chars(stem) && !stem.starts_with('-'),
                None => valid_name(s),
            };
        if ok {
            Ok(Pattern(s.to_owned()))
        } else {
            Err(InvalidName(s.to_owned()))
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The prefix this pattern selects. One trailing `*` is stripped (a deliberate deviation
    /// from the reference, where `abc*` matched nothing for keys).
    pub fn prefix(&self) -> &str {
        self.0.strip_suffix('*').unwrap_or(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kes_rules() {
        for ok in ["my-key", "0", "_-___---_", "_0", "0-Z", &"a".repeat(80)] {
            assert!(KeyName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "my.key",
            "key/",
            "é",
            "_",
            "-a",
            "a-",
            "a b",
            &"a".repeat(81),
        ] {
            assert!(KeyName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns_follow_kes_rules() {
        for ok in ["", "*", "my*", "_-*", "abc", "a-*"] {
            assert!(Pattern::new(ok).is_ok(), "{ok}");
        }
        for bad in ["*-*", "_", "a*b", "**", "-*", "a.b*"] {
            assert!(Pattern::new(bad).is_err(), "{bad}");
        }
        assert_eq!(Pattern::new("abc*").unwrap().prefix(), "abc");
        assert_eq!(Pattern::new("*").unwrap().prefix(), "");
    }
}
