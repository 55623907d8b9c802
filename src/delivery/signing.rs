//! Standard Webhooks signatures, as the specification's "Signature scheme"
//! and "Webhook headers" sections (of "Verifying webhook authenticity",
//! spec/standard-webhooks.md, version 1.0.0) define them. The signed content
//! is `{msg_id}.{timestamp}.{body}`; `webhook-signature` carries one or more
//! space-separated signatures, each `<identifier>,<base64>`:
//!
//! - symmetric, `v1`: base64(HMAC-SHA256(key, content)), where the key is the
//!   base64-decoded part of a `whsec_` secret;
//! - asymmetric, `v1a`: base64 of the 64-byte ed25519 signature (RFC 8032) of
//!   the content. The private key is `whsk_` + base64 of the 32-byte ed25519
//!   secret key (the RFC 8032 seed, not the 64-byte seed‖public form), the
//!   public key `whpk_` + base64 of the 32-byte public key; this is what the
//!   reference libraries of the specification read (e.g. Go's
//!   `NewWebhookAsymmetric` takes the seed).
//!
//! Which scheme a stored secret signs with follows from its prefix.

use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::domain::webhook::{PRIVATE_KEY_PREFIX, PUBLIC_KEY_PREFIX, SECRET_PREFIX};

/// How far `webhook-timestamp` may be from the verifier's clock, as the
/// specification's libraries check: 5 minutes.
pub const TOLERANCE_SECONDS: i64 = 300;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Decodes a `whsec_…` secret into its HMAC key.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, String> {
    let b64 = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    B64.decode(b64)
        .map_err(|e| format!("secret is not valid base64: {e}"))
}

/// One `v1,<base64>` signature.
pub fn sign(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(47);
    out.push_str("v1,");
    B64.encode_string(digest, &mut out);
    out
}

/// The signed content `{msg_id}.{timestamp}.{body}`.
fn content(msg_id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let ts = timestamp.to_string();
    let mut c = Vec::with_capacity(msg_id.len() + ts.len() + body.len() + 2);
    c.extend_from_slice(msg_id.as_bytes());
    c.push(b'.');
    c.extend_from_slice(ts.as_bytes());
    c.push(b'.');
    c.extend_from_slice(body);
    c
}

/// One `v1a,<base64>` signature.
pub fn sign_ed25519(key: &SigningKey, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let sig = key.sign(&content(msg_id, timestamp, body));
    let mut out = String::with_capacity(92);
    out.push_str("v1a,");
    B64.encode_string(sig.to_bytes(), &mut out);
    out
}

/// A key the router signs with.
#[derive(Clone)]
pub enum Key {
    /// `v1`: the HMAC key of a `whsec_` secret.
    Hmac(Vec<u8>),
    /// `v1a`: the ed25519 key of a `whsk_` private key.
    Ed25519(Box<SigningKey>),
}

impl std::fmt::Debug for Key {
    /// Names the scheme only: keys never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Hmac(_) => f.write_str("Key::Hmac(..)"),
            Key::Ed25519(_) => f.write_str("Key::Ed25519(..)"),
        }
    }
}

impl Key {
    /// The key of a stored secret: `whsk_…` signs with ed25519, anything else
    /// (`whsec_…`) with HMAC.
    pub fn from_secret(secret: &str) -> Result<Key, String> {
        match secret.strip_prefix(PRIVATE_KEY_PREFIX) {
            Some(b64) => Ok(Key::Ed25519(Box::new(decode_private_key(b64)?))),
            None => decode_secret(secret).map(Key::Hmac),
        }
    }

    /// One signature of the content.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        match self {
            Key::Hmac(k) => sign(k, msg_id, timestamp, body),
            Key::Ed25519(k) => sign_ed25519(k, msg_id, timestamp, body),
        }
    }
}

fn decode_private_key(b64: &str) -> Result<SigningKey, String> {
    let raw = B64
        .decode(b64)
        .map_err(|e| format!("private key is not valid base64: {e}"))?;
    let seed: [u8; 32] = raw
        .try_into()
        .map_err(|r: Vec<u8>| format!("private key has {} bytes, not 32", r.len()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// `whpk_…`, the public key of a `whsk_…` private key.
pub fn public_key_of(private_key: &str) -> Result<String, String> {
    let b64 = private_key
        .strip_prefix(PRIVATE_KEY_PREFIX)
        .ok_or_else(|| format!("not a {PRIVATE_KEY_PREFIX} private key"))?;
    let key = decode_private_key(b64)?;
    Ok(format!(
        "{PUBLIC_KEY_PREFIX}{}",
        B64.encode(key.verifying_key().as_bytes())
    ))
}

/// The `webhook-signature` header value: one signature per key, space-separated.
pub fn signature_header(keys: &[&Key], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|k| k.sign(msg_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A key a listener verifies with.
#[derive(Clone)]
pub enum VerifyKey {
    /// `v1` signatures, with the HMAC key of a `whsec_` secret.
    Hmac(Vec<u8>),
    /// `v1a` signatures, with an ed25519 public key.
    Ed25519(VerifyingKey),
}

impl VerifyKey {
    /// Reads `whsec_…` (HMAC), `whpk_…` (public key) or `whsk_…` (its public half).
    pub fn parse(s: &str) -> Result<VerifyKey, String> {
        if let Some(b64) = s.strip_prefix(PUBLIC_KEY_PREFIX) {
            let raw = B64
                .decode(b64)
                .map_err(|e| format!("public key is not valid base64: {e}"))?;
            let bytes: [u8; 32] = raw
                .try_into()
                .map_err(|r: Vec<u8>| format!("public key has {} bytes, not 32", r.len()))?;
            let key = VerifyingKey::from_bytes(&bytes)
                .map_err(|e| format!("public key is not an ed25519 point: {e}"))?;
            return Ok(VerifyKey::Ed25519(key));
        }
        if let Some(b64) = s.strip_prefix(PRIVATE_KEY_PREFIX) {
            return Ok(VerifyKey::Ed25519(decode_private_key(b64)?.verifying_key()));
        }
        if s.starts_with(SECRET_PREFIX) {
            return decode_secret(s).map(VerifyKey::Hmac);
        }
        Err(format!(
            "a key starts with {SECRET_PREFIX}, {PUBLIC_KEY_PREFIX} or {PRIVATE_KEY_PREFIX}"
        ))
    }

    fn verifies(&self, scheme: &str, sig: &[u8], content: &[u8]) -> bool {
        match (self, scheme) {
            (VerifyKey::Hmac(k), "v1") => {
                let mut mac =
                    Hmac::<Sha256>::new_from_slice(k).expect("HMAC takes keys of any length");
                mac.update(content);
                // Constant time, as the specification asks.
                mac.verify_slice(sig).is_ok()
            }
            (VerifyKey::Ed25519(k), "v1a") => {
                let Ok(bytes) = <[u8; 64]>::try_from(sig) else {
                    return false;
                };
                let sig = ed25519_dalek::Signature::from_bytes(&bytes);
                k.verify_strict(content, &sig).is_ok()
            }
            _ => false,
        }
    }
}

/// Checks a delivery as a listener does: `Ok` when some signature of
/// `header` verifies with one of `keys` and `timestamp` is within
/// [`TOLERANCE_SECONDS`] of `now` (both unix seconds); the reason otherwise.
/// Signatures of other schemes or keys, and malformed entries, are skipped.
pub fn verify(
    header: &str,
    keys: &[VerifyKey],
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
    now: i64,
) -> Result<(), String> {
    if now.abs_diff(timestamp) > TOLERANCE_SECONDS as u64 {
        return Err(format!(
            "timestamp {timestamp} is more than {TOLERANCE_SECONDS} s from now ({now})"
        ));
    }
    let content = content(msg_id, timestamp, body);
    for entry in header.split(' ').filter(|e| !e.is_empty()) {
        let Some((scheme, b64)) = entry.split_once(',') else {
            continue;
        };
        let Ok(sig) = B64.decode(b64) else {
            continue;
        };
        if keys.iter().any(|k| k.verifies(scheme, &sig, &content)) {
            return Ok(());
        }
    }
    Err("no signature in the header verifies with the given keys".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_known_answers() {
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            sign(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let key = decode_secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        assert_eq!(
            sign(
                &key,
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1649367553,
                br#"{"email":"test@example.com","username":"test_user"}"#
            ),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
    }

    /// The asymmetric answer of the specification's Go library
    /// (`TestAsymmetricWebhookSign`): its key is the base64 of a 32-byte seed.
    #[test]
    fn standard_webhooks_ed25519_known_answer() {
        let key = Key::from_secret("whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=").unwrap();
        assert_eq!(
            key.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1a,tQ9V2XOqn7jL/DQenEFpqIugdBVtiMmER5mhSkXBNwM0mkATuDe6KYYUuxqtaiHeYGb7KaaBRdM5WqyeFiL8Ag=="
        );
    }

    #[test]
    fn header_carries_every_key() {
        let a = Key::from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let b = Key::from_secret("whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=").unwrap();
        let h = signature_header(&[&b, &a], "msg_1", 1, b"{}");
        let parts: Vec<&str> = h.split(' ').collect();
        assert_eq!(
            parts,
            vec![b.sign("msg_1", 1, b"{}"), a.sign("msg_1", 1, b"{}")]
        );
        assert!(parts[0].starts_with("v1a,") && parts[1].starts_with("v1,"));
    }

    #[test]
    fn verify_checks_signature_key_and_time() {
        let sk = "whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=";
        let pk = VerifyKey::parse(&public_key_of(sk).unwrap()).unwrap();
        let other = VerifyKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let h = Key::from_secret(sk).unwrap().sign("msg_1", 1000, b"{}");
        let keys = std::slice::from_ref(&pk);
        assert!(verify(&h, keys, "msg_1", 1000, b"{}", 1300).is_ok());
        assert!(verify(&h, keys, "msg_1", 1000, b"{}", 1301).is_err());
        assert!(verify(&h, keys, "msg_1", 1000, b"{ }", 1000).is_err());
        assert!(verify(&h, keys, "msg_2", 1000, b"{}", 1000).is_err());
        assert!(verify(&h, &[other], "msg_1", 1000, b"{}", 1000).is_err());
        // The ed25519 bytes labelled `v1` do not count.
        let relabelled = h.replacen("v1a,", "v1,", 1);
        assert!(verify(&relabelled, &[pk], "msg_1", 1000, b"{}", 1000).is_err());
    }

    #[test]
    fn keys_parse_by_prefix() {
        assert!(matches!(
            Key::from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Ok(Key::Hmac(_))
        ));
        assert!(Key::from_secret("whsk_AAAA").is_err());
        assert!(VerifyKey::parse("whpk_AAAA").is_err());
        assert!(VerifyKey::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        let pk = public_key_of("whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=").unwrap();
        assert!(pk.starts_with(PUBLIC_KEY_PREFIX));
        assert_eq!(
            B64.decode(&pk[PUBLIC_KEY_PREFIX.len()..]).unwrap().len(),
            32
        );
    }
}

#[cfg(test)]
#[path = "signing_vectors.rs"]
mod vectors;
