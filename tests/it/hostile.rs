//! Hostile input: property tests over every parser a client or a config file reaches —
//! ciphertexts (native, KES, legacy MessagePack and JSON), request bodies, names and patterns,
//! the config file and the policy matcher. Each starts from the committed corpus in
//! `tests/corpus/` and mutates it, plus arbitrary input; none may panic, and the security
//! properties (tampering never authenticates, deny wins) must hold.
//!
//! Bounded for CI: `PROPTEST_CASES` sets the count per property (256 by default; the test
//! command runs 1024). A failure is
//! minimised and printed; add the input to the corpus when fixing it.

use std::path::Path;

use kesh::api::{
    self, DecryptKeyRequest, EncryptKeyRequest, GenerateKeyRequest, HmacRequest, ImportKeyRequest,
};
use kesh::crypto::{kes, native};
use kesh::name::{KeyName, Pattern};
use kesh::server::policy::Policy;
use proptest::prelude::*;

fn corpus(dir: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "empty corpus {}", dir.display());
    seeds
}

/// A corpus entry, with a few bytes flipped, inserted or cut.
fn mutated(dir: &'static str) -> impl Strategy<Value = (usize, Vec<u8>)> {
    let seeds = corpus(dir);
    let n = seeds.len();
    (
        0..n,
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..4),
    )
        .prop_map(move |(i, edits)| {
            let mut bytes = seeds[i].clone();
            for (at, value, kind) in edits {
                if bytes.is_empty() {
                    bytes.push(value);
                    continue;
                }
                let at = at.index(bytes.len());
                match kind {
                    0 => bytes[at] ^= value | 1,
                    1 => bytes.insert(at, value),
                    _ => bytes.truncate(at),
                }
            }
            (i, bytes)
        })
}

fn open_all_ways(ct: &[u8], key: &[u8; 32], ctx: &[u8]) -> [bool; 4] {
    let kes_ok = |alg| {
        kes::parse(ct)
            .ok()
            .and_then(|parts| {
                let derived = kes::derive_soft(alg, key, &parts.iv);
                kes::open(alg, &derived, &parts, ctx).ok()
            })
            .is_some()
    };
    [
        kes_ok(kes::Algorithm::Aes256),
        kes_ok(kes::Algorithm::ChaCha20),
        native::open_gcm_soft(key, ct, ctx).is_ok(),
        native::open_kwp_soft(key, ct, ctx).is_ok(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// Any bytes: every ciphertext parser answers, none panics.
    #[test]
    fn ciphertext_parsers_take_any_bytes(ct in prop::collection::vec(any::<u8>(), 0..300), key in any::<[u8; 32]>()) {
        let _ = open_all_ways(&ct, &key, b"");
        let _ = native::parse_gcm(&ct);
        let _ = native::parse_kwp(&ct);
    }

    /// The corpus vectors, tampered: never authentic under their keys (the seeds use the zero
    /// key for KES and 00..1f for the native formats), unless the edit changed nothing.
    #[test]
    fn tampered_ciphertexts_never_authenticate((i, ct) in mutated("ciphertext")) {
        let seeds = corpus("ciphertext");
        let zero = [0u8; 32];
        let native_key: [u8; 32] = core::array::from_fn(|i| i as u8);
        let ctx = br#"{"bucket":"bucket/object"}"#;
        let opened = open_all_ways(&ct, &zero, b"").into_iter().chain(open_all_ways(&ct, &native_key, ctx)).any(|ok| ok);
        if ct != seeds[i] {
            // A re-encoded legacy container with the same fields may still open; a changed
            // sealed part, IV or nonce never does.
            let same_parts = kes::parse(&ct).ok().zip(kes::parse(&seeds[i]).ok())
                .is_some_and(|(a, b)| a.sealed == b.sealed && a.iv == b.iv && a.nonce == b.nonce);
            prop_assert!(!opened || same_parts, "tampered ciphertext opened: {ct:?}");
        } else {
            prop_assert!(opened);
        }
    }

    /// Whatever the plaintext and context, sealing then opening gives it back, and any other
    /// context fails.
    #[test]
    fn seal_open_round_trips(pt in prop::collection::vec(any::<u8>(), 0..200), ctx in prop::collection::vec(any::<u8>(), 0..64), key in any::<[u8; 32]>(), iv in any::<[u8; 12]>()) {
        let gcm = native::seal_gcm_soft(&key, &iv, &pt, &ctx);
        prop_assert_eq!(&native::open_gcm_soft(&key, &gcm, &ctx).unwrap()[..], &pt[..]);
        let kwp = native::seal_kwp_soft(&key, &pt, &ctx);
        prop_assert_eq!(&native::open_kwp_soft(&key, &kwp, &ctx).unwrap()[..], &pt[..]);
        let mut other = ctx.clone();
        other.push(0);
        prop_assert!(native::open_gcm_soft(&key, &gcm, &other).is_err());
        prop_assert!(native::open_kwp_soft(&key, &kwp, &other).is_err());
    }

    /// Request bodies: the corpus mutated, and arbitrary bytes, through every request type.
    #[test]
    fn request_bodies_decode_or_fail_cleanly((_, body) in mutated("body"), noise in prop::collection::vec(any::<u8>(), 0..200)) {
        for b in [&body, &noise] {
            let _ = api::decode_request::<GenerateKeyRequest>(b);
            let _ = api::decode_request::<EncryptKeyRequest>(b);
            let _ = api::decode_request::<DecryptKeyRequest>(b);
            let _ = api::decode_request::<ImportKeyRequest>(b);
            let _ = api::decode_request::<HmacRequest>(b);
        }
    }

    /// Names and patterns: any string is either refused or valid by the KES rules.
    #[test]
    fn names_and_patterns_follow_the_rules(s in "\\PC{0,90}|[-_a-zA-Z0-9*]{0,90}") {
        let ok_chars = |t: &str| t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if let Ok(n) = KeyName::new(&s) {
            prop_assert!(!s.is_empty() && s.len() <= 80 && ok_chars(&s) && !s.starts_with('-') && !s.ends_with('-') && s != "_");
            prop_assert_eq!(n.as_str(), s.as_str());
        }
        if let Ok(p) = Pattern::new(&s) {
            prop_assert!(ok_chars(p.prefix()) && !s[..s.len().saturating_sub(1)].contains('*'));
        }
    }

    /// The config file: the corpus mutated and arbitrary text either validate or give an
    /// error naming a field.
    #[test]
    fn config_files_parse_or_name_the_field((_, text) in mutated("config"), noise in "\\PC{0,200}") {
        for t in [String::from_utf8_lossy(&text).into_owned(), noise] {
            if let Err(e) = kesh::config::server::ServerConfig::parse_with(&t, |_| Some("0123456789abcdef".into())) {
                prop_assert!(!e.field.is_empty(), "{e}");
            }
        }
    }

    /// Policies: deny wins over allow; a trailing `*` is a prefix; anything else is exact.
    #[test]
    fn policy_matching(path in "/v1/[a-z/]{0,30}", allow in prop::collection::vec("[/a-z*]{0,12}", 0..4), deny in prop::collection::vec("[/a-z*]{0,12}", 0..4)) {
        let policy = Policy { allow: allow.clone(), deny: deny.clone() };
        let matches = |p: &String| !p.is_empty() && match p.strip_suffix('*') { Some(pre) => path.starts_with(pre), None => *p == path };
        let expected = !deny.iter().any(matches) && allow.iter().any(matches);
        prop_assert_eq!(policy.allows(&path), expected);
        let with_deny_all = Policy { allow, deny: vec!["*".into()] };
        prop_assert!(!with_deny_all.allows(&path));
    }
}
