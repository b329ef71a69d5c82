//! `kesh completion` for each shell.

use super::*;

#[test]
fn completion_scripts() {
    for shell in ["bash", "zsh", "fish"] {
        let out = kesh(&[], &["completion", shell]).ok();
        for word in ["kesh", "migrate", "identity", "probe"] {
            assert!(out.contains(word), "{shell}: {word}");
        }
    }
    kesh(&[], &["completion", "tcsh"]).fails("invalid value");
    let out = kesh(&[], &["--help"]).ok();
    assert!(
        out.contains("KES_SERVER") && out.contains("KES_API_KEY"),
        "{out}"
    );
}
