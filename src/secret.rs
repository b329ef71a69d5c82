//! Types that hold secrets: PINs, key bytes and plaintexts.
//!
//! Every type here zeroizes on drop and prints `<redacted>` from `Debug`, so a secret cannot
//! reach a log line through formatting. Nothing here knows where secrets come from.

use std::fmt;

use zeroize::Zeroizing;

/// A 32-byte key (master key material, HMAC key, or DEK).
pub type Key32 = Zeroizing<[u8; 32]>;

/// Bytes that must not outlive their use: plaintexts and unwrapped material.
pub type SecretBytes = Zeroizing<Vec<u8>>;

/// A token PIN. Readable only through [`Pin::expose`].
#[derive(Clone)]
pub struct Pin(Zeroizing<String>);

impl Pin {
    /// Takes the PIN text; it is zeroized when the `Pin` is dropped.
    pub fn new(pin: String) -> Self {
        Pin(Zeroizing::new(pin))
    }

    /// The PIN text, for the one call that logs in.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

/// Fresh random bytes from the operating system.
pub fn random<const N: usize>() -> Result<Zeroizing<[u8; N]>, getrandom::Error> {
    let mut buf = Zeroizing::new([0u8; N]);
    getrandom::getrandom(buf.as_mut())?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_debug_is_redacted() {
        let pin = Pin::new("1234-secret".into());
        let shown = format!("{pin:?} {:?}", Some(pin.clone()));
        assert!(!shown.contains("1234"), "{shown}");
        assert_eq!(pin.expose(), "1234-secret");
    }
}
