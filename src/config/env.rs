//! `${VAR}` substitution as KES does it (KES: `kesconf/config.go` at
//! github.com/minio/kes).
//!
//! A scalar whose whole trimmed value is `${NAME}` becomes the value of the environment
//! variable `NAME`, as a string; there is no partial interpolation. Policy `allow`/`deny`
//! patterns are left alone, as in KES. A missing variable is an error naming it and its line.

use serde_yaml::Value;

use super::ConfigError;

/// Parses YAML text and substitutes environment references.
pub fn substitute(text: &str) -> Result<Value, ConfigError> {
    substitute_with(text, |name| std::env::var(name).ok())
}

/// [`substitute`] with an explicit lookup, for tests.
pub fn substitute_with(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Value, ConfigError> {
    let mut value: Value = serde_yaml::from_str(text)
        .map_err(|e| ConfigError::new("(file)", format!("not valid YAML: {e}")))?;
    walk(&mut value, &mut Vec::new(), text, &lookup)?;
    Ok(value)
}

/// Overwrites every string of a parsed document: it may hold the PIN (`pin:` or its
/// `${VAR}`), and the validated config keeps its own zeroizing copy.
pub fn wipe(value: &mut Value) {
    use zeroize::Zeroize;
    match value {
        Value::String(s) => s.zeroize(),
        Value::Sequence(items) => items.iter_mut().for_each(wipe),
        Value::Mapping(map) => map.iter_mut().for_each(|(_, v)| wipe(v)),
        Value::Tagged(t) => wipe(&mut t.value),
        _ => {}
    }
}

fn reference(s: &str) -> Option<&str> {
    let name = s.trim().strip_prefix("${")?.strip_suffix('}')?.trim();
    (!name.is_empty()).then_some(name)
}

fn walk(
    value: &mut Value,
    path: &mut Vec<String>,
    text: &str,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    // `policy.<name>.allow|deny` are plain strings in KES.
    let is_pattern_list =
        path.len() == 3 && path[0] == "policy" && (path[2] == "allow" || path[2] == "deny");
    match value {
        Value::String(s) if !is_pattern_list => {
            if let Some(name) = reference(s) {
                let replaced = lookup(name).ok_or_else(|| {
                    let line = text
                        .lines()
                        .position(|l| l.contains(&format!("${{{name}}}")) || l.contains(s.trim()))
                        .map_or(0, |i| i + 1);
                    ConfigError::new(
                        path.join("."),
                        format!("referenced env. variable '{name}' in line '{line}' not found: export it or write the value inline"),
                    )
                })?;
                *s = replaced;
            }
        }
        Value::Sequence(items) if !is_pattern_list => {
            for item in items {
                walk(item, path, text, lookup)?;
            }
        }
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                path.push(k.as_str().unwrap_or("?").to_owned());
                walk(v, path, text, lookup)?;
                path.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PIN" => Some("1234".into()),
            "ADMIN" => Some("abc".into()),
            _ => None,
        }
    }

    #[test]
    fn substitutes_whole_values_only() {
        let v = substitute_with(
            "admin:\n  identity: ${ADMIN}\nkeystore:\n  pkcs11:\n    pin: ' ${ PIN } '\n    token: x${PIN}\npolicy:\n  p:\n    allow: ['${PIN}']\n    identities:\n    - ${ADMIN}\n",
            env,
        )
        .unwrap();
        assert_eq!(v["admin"]["identity"].as_str(), Some("abc"));
        assert_eq!(v["keystore"]["pkcs11"]["pin"].as_str(), Some("1234"));
        assert_eq!(v["keystore"]["pkcs11"]["token"].as_str(), Some("x${PIN}"));
        assert_eq!(v["policy"]["p"]["allow"][0].as_str(), Some("${PIN}"));
        assert_eq!(v["policy"]["p"]["identities"][0].as_str(), Some("abc"));
    }

    #[test]
    fn wiping_leaves_no_string_behind() {
        let mut v = substitute_with(
            "keystore:\n  pkcs11:\n    pin: ${PIN}\n    list: [a-secret]\n    n: 3\n",
            env,
        )
        .unwrap();
        wipe(&mut v);
        let text = serde_yaml::to_string(&v).unwrap();
        assert!(
            !text.contains("1234") && !text.contains("a-secret"),
            "{text}"
        );
        assert_eq!(v["keystore"]["pkcs11"]["pin"].as_str(), Some(""));
        assert_eq!(v["keystore"]["pkcs11"]["n"].as_u64(), Some(3));
    }

    #[test]
    fn missing_variable_names_it_and_its_line() {
        let err = substitute_with("a: 1\nb: ${NOPE}\n", env).unwrap_err();
        assert_eq!(err.field, "b");
        assert!(
            err.message.contains("'NOPE' in line '2' not found"),
            "{}",
            err.message
        );
    }
}
