//! Webhooks, their authentication and signing secrets, and the rules a
//! webhook must satisfy to be stored.

use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::catalog::{Catalog, Mode};
use super::filter::{self, EventFilter};
use crate::delivery::guard;
use crate::error::{Error, Result};

/// Longest name.
pub const MAX_NAME_CHARS: usize = 128;
/// Longest description.
pub const MAX_DESCRIPTION_CHARS: usize = 1024;
/// Longest target URL.
pub const MAX_URL_BYTES: usize = 2048;
/// Most event types one webhook may subscribe to.
pub const MAX_EVENT_TYPES: usize = 256;
/// Highest `max_in_flight`.
pub const MAX_IN_FLIGHT: u32 = 256;
/// Prefix of Standard Webhooks secrets.
pub const SECRET_PREFIX: &str = "whsec_";
/// Prefix of Standard Webhooks ed25519 private keys (base64 of the 32-byte seed).
pub const PRIVATE_KEY_PREFIX: &str = "whsk_";
/// Prefix of Standard Webhooks ed25519 public keys (base64 of the 32-byte key).
pub const PUBLIC_KEY_PREFIX: &str = "whpk_";
/// How long the key of the old algorithm keeps signing after UpdateWebhook
/// changes a webhook's signature algorithm: 24 hours.
pub const MIGRATION_GRACE_MS: i64 = 24 * 3600 * 1000;

/// A registered listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    /// `wh_…`
    pub id: String,
    /// Owning account.
    pub account_id: u64,
    /// 1-128 characters.
    pub name: String,
    /// At most 1024 characters.
    pub description: String,
    /// Destination of the POSTs.
    pub target_url: String,
    /// How requests authenticate.
    pub auth: Auth,
    /// Subscribed event types, deduplicated, in the order given.
    pub event_types: Vec<String>,
    /// Whether deliveries run.
    pub active: bool,
    /// Creation time, ms since the epoch.
    pub create_time_ms: i64,
    /// Last change, ms since the epoch.
    pub update_time_ms: i64,
    /// Set when the service disabled the webhook itself.
    pub disabled_reason: String,
    /// Real-time requests in flight at once; 0 and 1 mean one, in order.
    #[serde(default)]
    pub max_in_flight: u32,
    /// Condition on the event's `data`; None: every event of the subscribed
    /// types. Absent from webhooks stored before filters existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<EventFilter>,
}

/// Authentication of delivery requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Auth {
    /// No headers.
    None,
    /// `authorization: Basic …`
    Basic {
        /// User name.
        username: String,
        /// Password; never leaves the service through read calls.
        password: String,
    },
    /// Standard Webhooks signature with the webhook's secret.
    Signature {
        /// Which scheme. Absent in records written before ed25519 existed
        /// (`{"kind":"signature"}`), and not written for HMAC-SHA256, so those
        /// records read as they always did.
        #[serde(default, skip_serializing_if = "SignatureAlgorithm::is_hmac")]
        algorithm: SignatureAlgorithm,
    },
}

/// The Standard Webhooks signature schemes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignatureAlgorithm {
    /// `v1`: HMAC-SHA256 with a `whsec_` secret.
    #[default]
    HmacSha256,
    /// `v1a`: ed25519 with a `whsk_` private key; listeners get the `whpk_` public key.
    Ed25519,
}

impl SignatureAlgorithm {
    /// Whether this is HMAC-SHA256.
    pub fn is_hmac(&self) -> bool {
        *self == SignatureAlgorithm::HmacSha256
    }

    /// The scheme a stored secret signs with, by its prefix.
    pub fn of_secret(secret: &str) -> SignatureAlgorithm {
        if secret.starts_with(PRIVATE_KEY_PREFIX) {
            SignatureAlgorithm::Ed25519
        } else {
            SignatureAlgorithm::HmacSha256
        }
    }
}

impl Auth {
    /// HMAC-SHA256 signature auth.
    pub const HMAC: Auth = Auth::Signature {
        algorithm: SignatureAlgorithm::HmacSha256,
    };

    /// The signature scheme, for signature auth.
    pub fn signature_algorithm(&self) -> Option<SignatureAlgorithm> {
        match self {
            Auth::Signature { algorithm } => Some(*algorithm),
            _ => None,
        }
    }

    /// Whether requests are signed.
    pub fn is_signature(&self) -> bool {
        self.signature_algorithm().is_some()
    }
}

impl Webhook {
    /// How many real-time payloads may be in flight at once (at least 1).
    pub fn concurrency(&self) -> usize {
        self.max_in_flight.clamp(1, MAX_IN_FLIGHT) as usize
    }

    /// Whether events of `mode` reach this webhook's `mode` lane at all.
    pub fn subscribes_to_mode(&self, catalog: &Catalog, mode: Mode) -> bool {
        self.event_types
            .iter()
            .any(|t| catalog.mode(t) == Some(mode))
    }
}

/// What the rules need to know that the webhook itself does not say.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// Event catalog in force.
    pub catalog: &'a Catalog,
    /// `delivery.allow_private_targets`.
    pub allow_private_targets: bool,
}

/// Checks a webhook's user-settable fields; `prefix` is the request path of the
/// webhook (e.g. `webhook`) used in field names. Normalises event_types
/// (duplicates removed).
pub fn validate(w: &mut Webhook, rules: Rules<'_>, prefix: &str) -> Result<()> {
    let f = |name: &str| format!("{prefix}.{name}");
    let name_chars = w.name.chars().count();
    if w.name.trim().is_empty() {
        return Err(Error::invalid(f("name"), "is required"));
    }
    if name_chars > MAX_NAME_CHARS {
        return Err(Error::invalid(
            f("name"),
            format!("must be at most {MAX_NAME_CHARS} characters"),
        ));
    }
    if w.name.chars().any(char::is_control) {
        return Err(Error::invalid(
            f("name"),
            "must not contain control characters",
        ));
    }
    if w.description.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(Error::invalid(
            f("description"),
            format!("must be at most {MAX_DESCRIPTION_CHARS} characters"),
        ));
    }
    if w.target_url.is_empty() {
        return Err(Error::invalid(f("target_url"), "is required"));
    }
    if w.target_url.len() > MAX_URL_BYTES {
        return Err(Error::invalid(
            f("target_url"),
            format!("must be at most {MAX_URL_BYTES} bytes"),
        ));
    }
    let url = guard::check_target_url(&w.target_url, rules.allow_private_targets)
        .map_err(|reason| Error::invalid(f("target_url"), reason))?;
    // Stored in its canonical form (`https:///x` becomes `https://x/`), so
    // what is shown and compared is what requests go to.
    w.target_url = url.to_string();
    if w.target_url.len() > MAX_URL_BYTES {
        return Err(Error::invalid(
            f("target_url"),
            format!("must be at most {MAX_URL_BYTES} bytes"),
        ));
    }
    if w.event_types.is_empty() {
        return Err(Error::invalid(
            f("event_types"),
            "must name at least one event type",
        ));
    }
    if w.event_types.len() > MAX_EVENT_TYPES {
        return Err(Error::invalid(
            f("event_types"),
            format!("at most {MAX_EVENT_TYPES} entries"),
        ));
    }
    for (i, t) in w.event_types.iter().enumerate() {
        if rules.catalog.mode(t).is_none() {
            return Err(Error::invalid(
                format!("{prefix}.event_types[{i}]"),
                rules.catalog.unknown_type_reason(t),
            ));
        }
    }
    if w.max_in_flight > MAX_IN_FLIGHT {
        return Err(Error::invalid(
            f("max_in_flight"),
            format!("must be at most {MAX_IN_FLIGHT} (0 or 1: one request at a time, in order)"),
        ));
    }
    let mut kept = std::collections::HashSet::new();
    w.event_types.retain(|t| kept.insert(t.clone()));
    if let Some(flt) = &w.filter {
        filter::validate(flt, &f("filter"))?;
    }
    if let Auth::Basic { username, password } = &w.auth {
        if username.is_empty() {
            return Err(Error::invalid(f("auth.basic.username"), "is required"));
        }
        if username.contains(':') || username.chars().any(char::is_control) {
            return Err(Error::invalid(
                f("auth.basic.username"),
                "must not contain ':' or control characters",
            ));
        }
        if password.is_empty() {
            return Err(Error::invalid(f("auth.basic.password"), "is required"));
        }
        if username.len() > 256 || password.len() > 256 {
            return Err(Error::invalid(
                f("auth.basic"),
                "username and password: at most 256 bytes each",
            ));
        }
    }
    Ok(())
}

/// At most `max` characters of `s`, for echoing user input in messages.
pub fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// A webhook's signing secrets: the current one and, during a rotation's
/// grace period, the previous one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    /// The secret in use: `whsec_…` (HMAC-SHA256) or `whsk_…` (ed25519
    /// private key); its prefix decides how it signs.
    pub current: String,
    /// When `current` was created, ms.
    pub create_time_ms: i64,
    /// The secret before the last rotation or change of algorithm, still
    /// signed with until `previous_expire_ms`; it may be of the other algorithm.
    pub previous: Option<String>,
    /// End of the grace period, ms.
    pub previous_expire_ms: i64,
}

impl SecretRecord {
    /// A fresh HMAC-SHA256 secret: `whsec_` + base64 of 32 random bytes.
    pub fn generate(now_ms: i64) -> SecretRecord {
        SecretRecord::generate_for(SignatureAlgorithm::HmacSha256, now_ms)
    }

    /// A fresh secret of `algorithm`: `whsec_` or `whsk_` + base64 of 32
    /// random bytes (the HMAC key, or the ed25519 seed).
    pub fn generate_for(algorithm: SignatureAlgorithm, now_ms: i64) -> SecretRecord {
        SecretRecord {
            current: new_secret(algorithm),
            create_time_ms: now_ms,
            previous: None,
            previous_expire_ms: 0,
        }
    }

    /// The algorithm the current secret signs with.
    pub fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::of_secret(&self.current)
    }

    /// Replaces the secret by one of the same algorithm; the old one stays
    /// in use for `grace_ms`.
    pub fn rotate(&self, now_ms: i64, grace_ms: i64) -> SecretRecord {
        self.rotate_to(self.algorithm(), now_ms, grace_ms)
    }

    /// Replaces the secret by one of `algorithm` (a rotation, or a change of
    /// algorithm); the old one stays in use for `grace_ms`.
    pub fn rotate_to(
        &self,
        algorithm: SignatureAlgorithm,
        now_ms: i64,
        grace_ms: i64,
    ) -> SecretRecord {
        SecretRecord {
            current: new_secret(algorithm),
            create_time_ms: now_ms,
            previous: (grace_ms > 0).then(|| self.current.clone()),
            previous_expire_ms: if grace_ms > 0 { now_ms + grace_ms } else { 0 },
        }
    }

    /// The secrets to sign with at `now_ms`, current first.
    pub fn active_secrets(&self, now_ms: i64) -> Vec<&str> {
        let mut out = vec![self.current.as_str()];
        if let Some(prev) = &self.previous {
            if now_ms < self.previous_expire_ms {
                out.push(prev);
            }
        }
        out
    }
}

fn new_secret(algorithm: SignatureAlgorithm) -> String {
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    let prefix = match algorithm {
        SignatureAlgorithm::HmacSha256 => SECRET_PREFIX,
        SignatureAlgorithm::Ed25519 => PRIVATE_KEY_PREFIX,
    };
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// The secret record to store when a webhook's auth goes from `before` to
/// `after`, given the stored one; `None` keeps what is stored. A webhook that
/// signed with the other algorithm migrates: a key of the new algorithm is
/// generated and the old key keeps signing for [`MIGRATION_GRACE_MS`].
pub fn secret_after_auth_change(
    before: &Auth,
    after: &Auth,
    stored: Option<&SecretRecord>,
    now_ms: i64,
) -> Option<SecretRecord> {
    let algorithm = after.signature_algorithm()?;
    match stored {
        None => Some(SecretRecord::generate_for(algorithm, now_ms)),
        Some(s) if s.algorithm() == algorithm => None,
        Some(s) if before.is_signature() => {
            Some(s.rotate_to(algorithm, now_ms, MIGRATION_GRACE_MS))
        }
        // Left over from before the webhook stopped signing: nothing to migrate.
        Some(_) => Some(SecretRecord::generate_for(algorithm, now_ms)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Webhook {
        Webhook {
            id: String::new(),
            account_id: 1,
            name: "crm".into(),
            description: String::new(),
            target_url: "https://example.com/hook".into(),
            auth: Auth::HMAC,
            event_types: vec!["COURSE_ENROLLMENT".into(), "COURSE_ENROLLMENT".into()],
            active: true,
            create_time_ms: 0,
            update_time_ms: 0,
            disabled_reason: String::new(),
            max_in_flight: 0,
            filter: None,
        }
    }

    fn check(w: &mut Webhook) -> Result<()> {
        let catalog = Catalog::new(&[]);
        validate(
            w,
            Rules {
                catalog: &catalog,
                allow_private_targets: false,
            },
            "webhook",
        )
    }

    fn field_of(r: Result<()>) -> String {
        match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn valid_webhook_is_normalised() {
        let mut w = sample();
        check(&mut w).unwrap();
        assert_eq!(w.event_types, vec!["COURSE_ENROLLMENT".to_string()]);
    }

    #[test]
    fn each_rule_names_its_field() {
        let mut w = sample();
        w.name = " ".into();
        assert_eq!(field_of(check(&mut w)), "webhook.name");
        let mut w = sample();
        w.name = "x".repeat(129);
        assert_eq!(field_of(check(&mut w)), "webhook.name");
        let mut w = sample();
        w.description = "x".repeat(1025);
        assert_eq!(field_of(check(&mut w)), "webhook.description");
        let mut w = sample();
        w.target_url = "http://example.com".into();
        assert_eq!(field_of(check(&mut w)), "webhook.target_url");
        let mut w = sample();
        w.event_types.clear();
        assert_eq!(field_of(check(&mut w)), "webhook.event_types");
        let mut w = sample();
        w.event_types.push("NOPE".into());
        assert_eq!(field_of(check(&mut w)), "webhook.event_types[2]");
        let mut w = sample();
        w.auth = Auth::Basic {
            username: "a:b".into(),
            password: "p".into(),
        };
        assert_eq!(field_of(check(&mut w)), "webhook.auth.basic.username");
    }

    #[test]
    fn target_urls_are_stored_canonical() {
        for (given, stored) in [
            ("https:///example.com/x", "https://example.com/x"),
            ("HTTPS://Example.COM", "https://example.com/"),
            (
                "https://example.com:443/a/../b?q=1",
                "https://example.com/b?q=1",
            ),
        ] {
            let mut w = sample();
            w.target_url = given.into();
            check(&mut w).unwrap();
            assert_eq!(w.target_url, stored, "{given}");
        }
    }

    #[test]
    fn secrets_rotate_with_grace() {
        let s = SecretRecord::generate(0);
        assert!(s.current.starts_with(SECRET_PREFIX));
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&s.current[SECRET_PREFIX.len()..])
            .unwrap();
        assert_eq!(decoded.len(), 32);
        let r = s.rotate(1000, 500);
        assert_eq!(
            r.active_secrets(1200),
            vec![r.current.as_str(), s.current.as_str()]
        );
        assert_eq!(r.active_secrets(1500), vec![r.current.as_str()]);
        assert_eq!(s.rotate(1000, 0).previous, None);
    }

    #[test]
    fn old_signature_records_read_as_hmac() {
        let auth: Auth = serde_json::from_str(r#"{"kind":"signature"}"#).unwrap();
        assert_eq!(auth, Auth::HMAC);
        // HMAC is written as before, so older routers read it too.
        assert_eq!(
            serde_json::to_string(&Auth::HMAC).unwrap(),
            r#"{"kind":"signature"}"#
        );
        let ed = Auth::Signature {
            algorithm: SignatureAlgorithm::Ed25519,
        };
        let json = serde_json::to_string(&ed).unwrap();
        assert_eq!(json, r#"{"kind":"signature","algorithm":"ed25519"}"#);
        assert_eq!(serde_json::from_str::<Auth>(&json).unwrap(), ed);
        // A whole stored webhook of the old form.
        let mut w = serde_json::to_value(sample()).unwrap();
        w["auth"] = serde_json::json!({"kind": "signature"});
        let w: Webhook = serde_json::from_value(w).unwrap();
        assert_eq!(
            w.auth.signature_algorithm(),
            Some(SignatureAlgorithm::HmacSha256)
        );
    }

    #[test]
    fn ed25519_secrets_are_seeds() {
        let s = SecretRecord::generate_for(SignatureAlgorithm::Ed25519, 0);
        assert!(s.current.starts_with(PRIVATE_KEY_PREFIX));
        assert_eq!(s.algorithm(), SignatureAlgorithm::Ed25519);
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&s.current[PRIVATE_KEY_PREFIX.len()..])
            .unwrap();
        assert_eq!(decoded.len(), 32);
        let r = s.rotate(10, 5);
        assert_eq!(r.algorithm(), SignatureAlgorithm::Ed25519);
        assert_eq!(
            r.active_secrets(12),
            vec![r.current.as_str(), s.current.as_str()]
        );
    }

    #[test]
    fn changing_algorithm_migrates_with_a_day_of_grace() {
        let ed = Auth::Signature {
            algorithm: SignatureAlgorithm::Ed25519,
        };
        let hmac = SecretRecord::generate(0);
        let m = secret_after_auth_change(&Auth::HMAC, &ed, Some(&hmac), 1_000).unwrap();
        assert_eq!(m.algorithm(), SignatureAlgorithm::Ed25519);
        assert_eq!(m.previous.as_deref(), Some(hmac.current.as_str()));
        assert_eq!(m.previous_expire_ms, 1_000 + MIGRATION_GRACE_MS);
        assert_eq!(
            m.active_secrets(1_000 + MIGRATION_GRACE_MS - 1),
            vec![m.current.as_str(), hmac.current.as_str()]
        );
        assert_eq!(
            m.active_secrets(1_000 + MIGRATION_GRACE_MS),
            vec![m.current.as_str()]
        );
        // And back.
        let b = secret_after_auth_change(&ed, &Auth::HMAC, Some(&m), 2_000).unwrap();
        assert_eq!(b.algorithm(), SignatureAlgorithm::HmacSha256);
        assert_eq!(b.previous.as_deref(), Some(m.current.as_str()));
        // Same algorithm: the stored secret stays.
        assert_eq!(secret_after_auth_change(&ed, &ed, Some(&m), 3_000), None);
        // Not signing: nothing stored.
        assert_eq!(
            secret_after_auth_change(&ed, &Auth::None, Some(&m), 3_000),
            None
        );
        // A leftover secret of a webhook that did not sign: a fresh key, no grace.
        let f = secret_after_auth_change(&Auth::None, &ed, Some(&hmac), 3_000).unwrap();
        assert_eq!(
            (f.algorithm(), f.previous.clone()),
            (SignatureAlgorithm::Ed25519, None)
        );
        let n = secret_after_auth_change(&Auth::None, &ed, None, 3_000).unwrap();
        assert_eq!(n.algorithm(), SignatureAlgorithm::Ed25519);
    }
}
