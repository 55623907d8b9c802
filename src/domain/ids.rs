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
}
