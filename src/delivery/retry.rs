//! The retry schedule: exponential backoff with jitter, `Retry-After`
//! honoured within bounds, and the age after which a payload is given up.

use std::time::Duration;

use rand::Rng;

/// When to try again and when to stop.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Longest delay between two attempts.
    pub max_interval: Duration,
    /// Age (since the first attempt) after which the payload is dead.
    pub max_age: Duration,
}

/// Shortest delay ever used, even when the listener asks for less.
const MIN_DELAY: Duration = Duration::from_millis(50);

impl RetryPolicy {
    /// Delay after `failures` consecutive failures (1 for the first).
    /// A listener's `Retry-After` replaces the backoff, clamped to
    /// [50 ms, max_interval]; otherwise initial × 2^(failures-1), capped,
    /// with ±20% jitter so many lanes failing together do not retry in step.
    pub fn delay(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(ra) = retry_after {
            return ra.clamp(MIN_DELAY, self.max_interval.max(MIN_DELAY));
        }
        let exp = failures.saturating_sub(1).min(40);
        let base = self
            .initial
            .saturating_mul(1u32 << exp.min(31))
            .min(self.max_interval);
        let factor = rand::thread_rng().gen_range(0.8..=1.2);
        base.mul_f64(factor).min(self.max_interval).max(MIN_DELAY)
    }

    /// Whether a payload first tried at `first_ms` is past its age at `at_ms`.
    pub fn expired(&self, first_ms: i64, at_ms: i64) -> bool {
        at_ms.saturating_sub(first_ms) > self.max_age.as_millis() as i64
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    httpdate::parse_http_date(v)
        .ok()
        .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_secs(5),
            max_interval: Duration::from_secs(300),
            max_age: Duration::from_secs(3600),
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let p = policy();
        for (failures, base) in [
            (1u32, 5.0f64),
            (2, 10.0),
            (3, 20.0),
            (7, 300.0),
            (30, 300.0),
        ] {
            let d = p.delay(failures, None).as_secs_f64();
            assert!(
                d >= base * 0.8 - 1e-9 && d <= (base * 1.2).min(300.0) + 1e-9,
                "{failures}: {d}"
            );
        }
    }

    #[test]
    fn retry_after_is_honoured_within_bounds() {
        let p = policy();
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(99_999))),
            Duration::from_secs(300)
        );
        assert_eq!(p.delay(1, Some(Duration::ZERO)), MIN_DELAY);
    }

    #[test]
    fn parses_retry_after_forms() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn expiry_uses_max_age() {
        let p = policy();
        assert!(!p.expired(0, 3_600_000));
        assert!(p.expired(0, 3_600_001));
    }
}
