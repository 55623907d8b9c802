//! Prefixed, time-ordered identifiers (`wh_…`, `msg_…`): readable in logs and
//! sorted by creation time, so key order is creation order.

use rand::RngCore;

/// Prefix of webhook ids.
pub const WEBHOOK_PREFIX: &str = "wh_";
/// Prefix of delivery (message) ids, also sent as `webhook-id`.
pub const DELIVERY_PREFIX: &str = "msg_";

/// A new id: prefix, 12 hex digits of milliseconds, 16 random hex digits.
pub fn new_id(prefix: &str) -> String {
    let ms = super::now_ms().max(0) as u64 & 0xffff_ffff_ffff;
    let rand = rand::thread_rng().next_u64();
    format!("{prefix}{ms:012x}{rand:016x}")
}

/// An id of the same shape as [`new_id`], derived from `time_ms` and
/// `parts` instead of the clock and chance: the same inputs give the same
/// id, so a delivery rebuilt after a crash from the same events keeps its
/// `webhook-id`.
pub fn derived_id(prefix: &str, time_ms: i64, parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let ms = time_ms.max(0) as u64 & 0xffff_ffff_ffff;
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let d = h.finalize();
    let tail = u64::from_be_bytes(d[..8].try_into().unwrap_or_default());
    format!("{prefix}{ms:012x}{tail:016x}")
}

/// Whether `id` looks like an id made by [`new_id`] with `prefix`.
pub fn is_valid(prefix: &str, id: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == 28
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefixed_unique_and_valid() {
        let a = new_id(WEBHOOK_PREFIX);
        let b = new_id(WEBHOOK_PREFIX);
        assert_ne!(a, b);
        assert!(is_valid(WEBHOOK_PREFIX, &a));
        assert!(!is_valid(DELIVERY_PREFIX, &a));
        assert!(!is_valid(WEBHOOK_PREFIX, "wh_xyz"));
    }

    #[test]
    fn derived_ids_are_stable_valid_and_distinct() {
        let a = derived_id(
            DELIVERY_PREFIX,
            1_000,
            &[b"wh_1", b"r", &7u64.to_be_bytes()],
        );
        assert_eq!(
            a,
            derived_id(
                DELIVERY_PREFIX,
                1_000,
                &[b"wh_1", b"r", &7u64.to_be_bytes()]
            )
        );
        assert!(is_valid(DELIVERY_PREFIX, &a));
        assert_ne!(
            a,
            derived_id(
                DELIVERY_PREFIX,
                1_000,
                &[b"wh_1", b"b", &7u64.to_be_bytes()]
            )
        );
        assert_ne!(
            a,
            derived_id(
                DELIVERY_PREFIX,
                1_000,
                &[b"wh_1r", b"", &7u64.to_be_bytes()]
            )
        );
    }
}
