//! Encryption at rest of webhook signing secrets and Basic-auth passwords
//! (`storage.secret_key`). Each value is sealed on its own with AES-256-GCM
//! under a fresh random nonce, bound to the record it belongs to (the
//! webhook id and the kind of value are the associated data), and written as
//! `wrenc1:<key id>:<base64 nonce ‖ ciphertext>`. Values without that
//! marker are plain (written before a key was set) and are read as they are.
//!
//! The key id (the first 8 bytes of HMAC-SHA256(key, "webhook-router key
//! id"), hex) is kept in the `meta` tree, so starting with no key or the
//! wrong key on a folder holding sealed values fails at once with a clear
//! message instead of at the first delivery.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::error::{Error, Result};

/// Prefix of a sealed value.
pub const MARKER: &str = "wrenc1:";

/// What a sealed value is, part of its associated data.
#[derive(Debug, Clone, Copy)]
pub enum Purpose {
    /// A `whsec_…` signing secret (current or previous).
    SigningSecret,
    /// A Basic-auth password.
    BasicPassword,
}

impl Purpose {
    fn tag(self) -> &'static [u8] {
        match self {
            Purpose::SigningSecret => b"secret",
            Purpose::BasicPassword => b"password",
        }
    }
}

/// The configured key.
pub struct SecretCipher {
    aead: Aes256Gcm,
    key_id: String,
}

impl std::fmt::Debug for SecretCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        f.debug_struct("SecretCipher")
            .field("key_id", &self.key_id)
            .finish()
    }
}

/// The key id of `key`: names it without revealing it.
pub fn key_id(key: &[u8; 32]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"webhook-router key id");
    hex::encode(&mac.finalize().into_bytes()[..8])
}

impl SecretCipher {
    /// A cipher for a 32-byte key.
    pub fn new(key: &[u8; 32]) -> SecretCipher {
        SecretCipher {
            aead: Aes256Gcm::new(key.into()),
            key_id: key_id(key),
        }
    }

    /// The key's id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Seals `plain`, which belongs to `purpose` of webhook `owner`.
    pub fn seal(&self, plain: &str, purpose: Purpose, owner: &str) -> Result<String> {
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let aad = associated_data(purpose, owner);
        let sealed = self
            .aead
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain.as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| Error::Internal("sealing a secret failed".into()))?;
        let mut raw = nonce.to_vec();
        raw.extend_from_slice(&sealed);
        Ok(format!(
            "{MARKER}{}:{}",
            self.key_id,
            base64::engine::general_purpose::STANDARD.encode(raw)
        ))
    }

    /// Opens a value read from disk: sealed values are decrypted, plain ones
    /// (no marker) returned as they are.
    pub fn open(&self, stored: &str, purpose: Purpose, owner: &str) -> Result<String> {
        let Some(rest) = stored.strip_prefix(MARKER) else {
            return Ok(stored.to_string());
        };
        let (kid, b64) = rest
            .split_once(':')
            .ok_or_else(|| Error::Internal(format!("malformed sealed value of {owner}")))?;
        if kid != self.key_id {
            return Err(Error::Internal(format!(
                "a secret of {owner} is sealed with key id {kid}, not the configured {}",
                self.key_id
            )));
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| Error::Internal(format!("malformed sealed value of {owner}")))?;
        if raw.len() < 12 + 16 {
            return Err(Error::Internal(format!(
                "malformed sealed value of {owner}"
            )));
        }
        let aad = associated_data(purpose, owner);
        let plain = self
            .aead
            .decrypt(
                Nonce::from_slice(&raw[..12]),
                Payload {
                    msg: &raw[12..],
                    aad: &aad,
                },
            )
            .map_err(|_| {
                Error::Internal(format!(
                    "a secret of {owner} does not decrypt (tampered or moved record)"
                ))
            })?;
        String::from_utf8(plain)
            .map_err(|_| Error::Internal(format!("a secret of {owner} is not UTF-8")))
    }
}

/// Whether a stored value is sealed.
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(MARKER)
}

fn associated_data(purpose: Purpose, owner: &str) -> Vec<u8> {
    let mut aad = purpose.tag().to_vec();
    aad.push(b':');
    aad.extend_from_slice(owner.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_bound_to_owner_and_purpose() {
        let c = SecretCipher::new(&[7u8; 32]);
        let sealed = c.seal("whsec_abc", Purpose::SigningSecret, "wh_1").unwrap();
        assert!(is_sealed(&sealed));
        assert!(!sealed.contains("whsec_abc"));
        assert_eq!(
            c.open(&sealed, Purpose::SigningSecret, "wh_1").unwrap(),
            "whsec_abc"
        );
        // Moved to another webhook or used as another kind of value: refused.
        assert!(c.open(&sealed, Purpose::SigningSecret, "wh_2").is_err());
        assert!(c.open(&sealed, Purpose::BasicPassword, "wh_1").is_err());
        // Another key: refused, naming both key ids.
        let other = SecretCipher::new(&[8u8; 32]);
        let e = other
            .open(&sealed, Purpose::SigningSecret, "wh_1")
            .unwrap_err();
        assert!(e.to_string().contains(c.key_id()), "{e}");
        // Plain values pass through.
        assert_eq!(
            c.open("plain", Purpose::BasicPassword, "wh_1").unwrap(),
            "plain"
        );
        // Same plaintext, different nonce: different ciphertext.
        assert_ne!(
            sealed,
            c.seal("whsec_abc", Purpose::SigningSecret, "wh_1").unwrap()
        );
    }
}
