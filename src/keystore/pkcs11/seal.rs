//! Sealing and unsealing on the device: the key handles to use (session copies or token
//! objects), the GCM / KWP / `kes` calls, and the four key operations that run them.
//!
//! Owns every cryptoki call that touches data. Knows nothing of how keys are found (the
//! index), created or recovered.

use std::sync::Arc;

use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;
use zeroize::Zeroizing;

use super::device::Device;
use super::error::Pkcs11Error;
use super::index::{IndexedKey, Pick};
use super::objects;
use super::seam::CallResult;
use super::{randomness, Inner, IvSource};
use crate::crypto::{kes, native};
use crate::keystore::{DataKey, KeyInfo, KeystoreError, Result, Scheme};
use crate::name::KeyName;
use crate::secret::SecretBytes;

impl Inner {
    pub(super) async fn generate(
        self: &Arc<Self>,
        name: &KeyName,
        context: &[u8],
    ) -> Result<DataKey> {
        let context = Arc::new(context.to_vec());
        let iv_source = self.settings.iv;
        let inner = self.clone();
        let (plaintext, ciphertext, version) = self
            .with_key(name, Pick::Sealing, move |s, key| {
                let extra = seal_random_len(key.info().scheme, iv_source);
                // The DEK and the IV from the pool: no C_GenerateRandom on this request.
                let mut rnd = Zeroizing::new([0u8; 32 + kes::TRAILER_LEN]);
                inner.draw(s, &mut rnd[..32 + extra])?;
                let mut dek = Zeroizing::new([0u8; 32]);
                dek.copy_from_slice(&rnd[..32]);
                let ct = seal_on_device(
                    s,
                    key,
                    iv_source,
                    &rnd[32..32 + extra],
                    dek.as_ref(),
                    &context,
                )?;
                Ok((dek, ct, key.version))
            })
            .await?;
        self.usage.sealed(name, version);
        self.top_up_randomness();
        Ok(DataKey {
            plaintext,
            ciphertext,
        })
    }

    pub(super) async fn encrypt(
        self: &Arc<Self>,
        name: &KeyName,
        plaintext: &[u8],
        context: &[u8],
    ) -> Result<Vec<u8>> {
        let plaintext = Arc::new(Zeroizing::new(plaintext.to_vec()));
        let context = Arc::new(context.to_vec());
        let iv_source = self.settings.iv;
        let inner = self.clone();
        let (ct, version) = self
            .with_key(name, Pick::Sealing, move |s, key| {
                let mut rnd = [0u8; kes::TRAILER_LEN];
                let extra = seal_random_len(key.info().scheme, iv_source);
                inner.draw(s, &mut rnd[..extra])?;
                let ct = seal_on_device(s, key, iv_source, &rnd[..extra], &plaintext, &context)?;
                Ok((ct, key.version))
            })
            .await?;
        self.usage.sealed(name, version);
        self.top_up_randomness();
        Ok(ct)
    }

    /// Fills `out` with the HSM's random bytes: from the pool, else from a draw made now
    /// whose rest goes into the pool, so the requests behind this one find it filled.
    fn draw(&self, s: &Session, out: &mut [u8]) -> CallResult<()> {
        if self.randomness.take(out) {
            return Ok(());
        }
        let mut fresh = Zeroizing::new(vec![0u8; randomness::DRAW_BYTES.max(out.len())]);
        s.generate_random_slice(&mut fresh)?;
        let (mine, rest) = fresh.split_at(out.len());
        out.copy_from_slice(mine);
        self.randomness.add(rest);
        Ok(())
    }

    /// Refills the random pool on a worker when it runs low, after the request that noticed.
    fn top_up_randomness(self: &Arc<Self>) {
        if !self.randomness.wants_refill() {
            return;
        }
        let inner = self.clone();
        tokio::spawn(async move {
            let pool = inner.clone();
            // Draws until full, at most a pool's worth (requests keep taking meanwhile);
            // bytes drawn before a failure are kept.
            let _ = inner
                .run(move |s, _| {
                    let mut fresh = Zeroizing::new(vec![0u8; randomness::DRAW_BYTES]);
                    let draws = randomness::POOL_BYTES / randomness::DRAW_BYTES;
                    for _ in 0..draws {
                        if !pool.randomness.has_room_for_a_draw() {
                            break;
                        }
                        s.generate_random_slice(&mut fresh)?;
                        pool.randomness.add(&fresh);
                    }
                    Ok(())
                })
                .await;
            inner.randomness.refill_ended();
        });
    }

    pub(super) async fn decrypt(
        self: &Arc<Self>,
        name: &KeyName,
        ciphertext: &[u8],
        context: &[u8],
    ) -> Result<SecretBytes> {
        let context = Arc::new(context.to_vec());
        // The version the ciphertext names, then (for `kes` look-alikes) version 1.
        for (version, inner) in crate::crypto::versioned::readings(ciphertext) {
            let inner = Arc::new(inner.to_vec());
            let context = context.clone();
            let opened = self
                .with_version(name, version, move |s, key| {
                    open_on_device(s, key, &inner, &context)
                })
                .await;
            match opened {
                Ok(pt) => {
                    self.usage.unsealed(name, version);
                    return Ok(pt);
                }
                Err(KeystoreError::NotAuthentic | KeystoreError::VersionNotFound) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(KeystoreError::NotAuthentic)
    }

    pub(super) async fn hmac(self: &Arc<Self>, name: &KeyName, message: &[u8]) -> Result<[u8; 32]> {
        let message = Arc::new(message.to_vec());
        self.with_key(name, Pick::Sealing, move |s, key| {
            let mac = s.sign(&Mechanism::Sha256Hmac, key.hmac(s)?, &message)?;
            let len = mac.len();
            mac.try_into().map_err(|_| Pkcs11Error::MacLength(len))
        })
        .await
    }
}

/// A key for one operation: the master handle to use, and what the index and the device know.
pub(super) struct Key<'a> {
    /// The handle of the version in use.
    pub(super) master: ObjectHandle,
    pub(super) device: &'a Device,
    pub(super) indexed: &'a IndexedKey,
    pub(super) version: u32,
    /// The version's creation nonce (version 1's is `indexed.nonce`).
    pub(super) nonce: u64,
}

impl Key<'_> {
    fn info(&self) -> &KeyInfo {
        &self.indexed.info
    }

    /// The HMAC key's handle to use; resolved only by the operation that needs it.
    fn hmac(&self, s: &Session) -> CallResult<ObjectHandle> {
        let h = self.indexed.hmac.ok_or(Pkcs11Error::HmacUnsupported)?;
        self.device.copies.working(s, h, self.indexed.nonce)
    }
}

/// An unsealing call's error: "not authentic" in the module's own words, or the error.
pub(super) fn unseal_error(e: cryptoki::error::Error, key: &Key) -> Pkcs11Error {
    Pkcs11Error::from(e).unsealing(key.device.tag_failures)
}

/// Seals `plaintext` on the device with the key version's scheme, in the ciphertext format
/// that names the version. `rnd` holds fresh random bytes for the IV (and nonce): 12 for
/// `gcm`, 28 for `kes`, none for `kwp`.
pub(super) fn seal_on_device(
    s: &Session,
    key: &Key,
    iv_source: IvSource,
    rnd: &[u8],
    plaintext: &[u8],
    context: &[u8],
) -> CallResult<Vec<u8>> {
    // Version 1's format for the scheme; the envelope then names the version.
    let inner = match key.info().scheme {
        Scheme::Gcm => {
            let mut iv = [0u8; native::GCM_IV_LEN];
            if iv_source == IvSource::Caller {
                iv.copy_from_slice(&rnd[..native::GCM_IV_LEN]);
            }
            let sealed = if let (Some(message), IvSource::Caller) = (&key.device.message, iv_source)
            {
                message.seal(s, key.master, key.nonce, &iv, context, plaintext)?
            } else {
                let params =
                    GcmParams::new(&mut iv, context, (native::GCM_TAG_LEN as u64 * 8).into())?;
                let gcm = Mechanism::AesGcm(params);
                match key.device.raw.as_ref() {
                    Some(raw) => raw.encrypt(
                        s,
                        &gcm,
                        key.master,
                        plaintext,
                        plaintext.len() + native::GCM_TAG_LEN,
                    )?,
                    None => s.encrypt(&gcm, key.master, plaintext)?,
                }
            };
            // The buffer now holds the IV the device used: ours, or one it drew itself. A
            // device that neither took ours nor wrote one back sealed under the all-zero IV
            // we handed it, and every such seal would reuse that nonce: refuse.
            if iv_source == IvSource::Device && iv == [0u8; native::GCM_IV_LEN] {
                return Err(Pkcs11Error::NoIvReturned);
            }
            native::encode_gcm(&iv, &sealed)
        }
        Scheme::Kwp => {
            let (pad, inner) = native::kwp_inner(plaintext, context);
            let mut t = objects::transient_template(inner.to_vec());
            let obj = s.create_object(&t);
            objects::wipe(&mut t);
            let obj = obj?;
            let wrapped = s.wrap_key(&Mechanism::AesKeyWrapPad, key.master, obj);
            let _ = s.destroy_object(obj);
            native::encode_kwp(pad, &wrapped?)
        }
        Scheme::Kes => {
            let short = |_| Pkcs11Error::ShortRandom(rnd.len());
            let iv: [u8; kes::IV_LEN] = rnd[..kes::IV_LEN].try_into().map_err(short)?;
            let nonce: [u8; kes::NONCE_LEN] = rnd[kes::IV_LEN..kes::TRAILER_LEN]
                .try_into()
                .map_err(short)?;
            let derived = derive_on_device(s, key, &iv)?;
            kes::seal(
                key.info().algorithm,
                &derived,
                &iv,
                &nonce,
                plaintext,
                context,
            )
        }
    };
    Ok(crate::crypto::versioned::wrap(key.version, inner))
}

/// The `kes` scheme's per-message key, HMAC-SHA256(master, iv), computed on the device.
pub(super) fn derive_on_device(
    s: &Session,
    key: &Key,
    iv: &[u8; kes::IV_LEN],
) -> CallResult<Zeroizing<[u8; 32]>> {
    let mac = Zeroizing::new(s.sign(&Mechanism::Sha256Hmac, key.master, iv)?);
    let mut out = Zeroizing::new([0u8; 32]);
    if mac.len() != 32 {
        return Err(Pkcs11Error::MacLength(mac.len()));
    }
    out.copy_from_slice(&mac);
    Ok(out)
}

pub(super) fn open_on_device(
    s: &Session,
    key: &Key,
    ciphertext: &[u8],
    context: &[u8],
) -> CallResult<SecretBytes> {
    match key.info().scheme {
        Scheme::Gcm => {
            let (mut iv, sealed) = native::parse_gcm(ciphertext)?;
            if let Some(message) = &key.device.message {
                return message
                    .open(s, key.master, key.nonce, &iv, context, sealed)
                    .map_err(|err| unseal_error(err, key));
            }
            let params = GcmParams::new(&mut iv, context, (native::GCM_TAG_LEN as u64 * 8).into())?;
            let gcm = Mechanism::AesGcm(params);
            match key.device.raw.as_ref() {
                Some(raw) => raw.decrypt(s, &gcm, key.master, sealed),
                None => s.decrypt(&gcm, key.master, sealed).map(Zeroizing::new),
            }
            .map_err(|err| unseal_error(err, key))
        }
        Scheme::Kwp => {
            let (pad, wrapped) = native::parse_kwp(ciphertext)?;
            let obj = match s.unwrap_key(
                &Mechanism::AesKeyWrapPad,
                key.master,
                wrapped,
                &objects::transient_unwrap_template(),
            ) {
                Ok(obj) => obj,
                Err(err) => return Err(unseal_error(err, key)),
            };
            let value = s.get_attributes(obj, &[AttributeType::Value]);
            let _ = s.destroy_object(obj);
            let inner = value?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::Value(v) => Some(Zeroizing::new(v)),
                    _ => None,
                })
                .ok_or(Pkcs11Error::NotAuthentic)?;
            Ok(native::kwp_open(&inner, pad, context)?)
        }
        Scheme::Kes => {
            let parts = kes::parse(ciphertext)?;
            let derived = derive_on_device(s, key, &parts.iv)?;
            Ok(kes::open(key.info().algorithm, &derived, &parts, context)?)
        }
    }
}

/// Random bytes a seal needs besides the plaintext.
pub(super) fn seal_random_len(scheme: Scheme, iv: IvSource) -> usize {
    match (scheme, iv) {
        (Scheme::Gcm, IvSource::Caller) => native::GCM_IV_LEN,
        (Scheme::Gcm, IvSource::Device) | (Scheme::Kwp, _) => 0,
        (Scheme::Kes, _) => kes::TRAILER_LEN,
    }
}
