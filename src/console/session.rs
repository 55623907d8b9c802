//! Browser sessions of the console: the admin token lives here, in memory,
//! for as long as the browser session does (a cookie without an expiry holds
//! only a random session id), and ends after `console.session_idle_timeout_ms`
//! without a request or when the admin signs out. Every session has its own
//! CSRF token, which each form carries back.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;
use subtle::ConstantTimeEq;

/// Name of the session cookie.
pub const COOKIE: &str = "wr_console";
/// Name of the cookie that protects the sign-in form (double submit).
pub const SIGNIN_COOKIE: &str = "wr_console_signin";

/// One signed-in browser.
#[derive(Clone)]
pub struct Session {
    /// The admin token every call is made with.
    pub token: String,
    /// The account picked at sign-in (pages name theirs in the URL).
    pub account: u64,
    /// What every form must carry back.
    pub csrf: String,
    /// Shown once on the next page (after a redirect).
    pub flash: Option<String>,
    last_seen: Instant,
}

/// Every session of this console.
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    idle: Duration,
    max: usize,
}

/// 32 random bytes, hex.
pub fn random_id() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Whether two secrets are equal, in constant time.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

impl Sessions {
    /// No sessions yet.
    pub fn new(idle: Duration, max: usize) -> Sessions {
        Sessions {
            map: Mutex::new(HashMap::new()),
            idle,
            max: max.max(1),
        }
    }

    /// Starts a session; returns its id (the cookie value). The session
    /// least recently used goes when `max` are open.
    pub fn create(&self, token: String, account: u64) -> String {
        let id = random_id();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        map.retain(|_, s| now.duration_since(s.last_seen) < self.idle);
        while map.len() >= self.max {
            let oldest = map
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => map.remove(&k),
                None => break,
            };
        }
        map.insert(
            id.clone(),
            Session {
                token,
                account,
                csrf: random_id(),
                flash: None,
                last_seen: now,
            },
        );
        id
    }

    /// The live session `id`, touched; its flash message is taken out when
    /// `take_flash`.
    pub fn get(&self, id: &str, take_flash: bool) -> Option<Session> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let live = map
            .get(id)
            .is_some_and(|s| now.duration_since(s.last_seen) < self.idle);
        if !live {
            map.remove(id);
            return None;
        }
        let s = map.get_mut(id)?;
        s.last_seen = now;
        let copy = s.clone();
        if take_flash {
            s.flash = None;
        }
        Some(copy)
    }

    /// Whether session `id` is still signed in (does not count as use).
    pub fn contains(&self, id: &str) -> bool {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id)
            .is_some_and(|s| s.last_seen.elapsed() < self.idle)
    }

    /// Leaves `message` for the next page of session `id`.
    pub fn flash(&self, id: &str, message: impl Into<String>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get_mut(id) {
            s.flash = Some(message.into());
        }
    }

    /// Remembers the account last opened by session `id`.
    pub fn set_account(&self, id: &str, account: u64) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get_mut(id) {
            s.account = account;
        }
    }

    /// Ends session `id`.
    pub fn remove(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Open sessions (expired ones not yet swept count too).
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The value of cookie `name` in a `cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|part| {
        let (k, v) = part.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_evict_the_oldest() {
        let s = Sessions::new(Duration::from_millis(200), 2);
        let a = s.create("t1".into(), 1);
        std::thread::sleep(Duration::from_millis(5));
        let b = s.create("t2".into(), 2);
        assert_eq!(s.get(&a, false).unwrap().token, "t1");
        std::thread::sleep(Duration::from_millis(5));
        // b is now the least recently used.
        let c = s.create("t3".into(), 3);
        assert!(s.get(&b, false).is_none());
        assert!(s.get(&a, false).is_some());
        assert!(s.get(&c, false).is_some());
        std::thread::sleep(Duration::from_millis(250));
        assert!(s.get(&a, false).is_none(), "idle sessions end");
    }

    #[test]
    fn flash_is_shown_once() {
        let s = Sessions::new(Duration::from_secs(60), 10);
        let a = s.create("t".into(), 1);
        s.flash(&a, "done");
        assert_eq!(s.get(&a, true).unwrap().flash.as_deref(), Some("done"));
        assert_eq!(s.get(&a, true).unwrap().flash, None);
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        let h = "a=1; wr_console_signin=x; wr_console=y";
        assert_eq!(cookie(h, COOKIE), Some("y"));
        assert_eq!(cookie(h, SIGNIN_COOKIE), Some("x"));
        assert_eq!(cookie(h, "b"), None);
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("a", "ab"));
    }
}
