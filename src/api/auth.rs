//! Bearer-token authentication: an interceptor per service checks the token
//! and its role; handlers check the account scope with [`authorize_account`].
//! Tokens are kept as SHA-256 hashes and compared in constant time.

use std::collections::HashSet;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Status};

use crate::config::{Role, TokenConfig};
use crate::error::{Error, Result};

/// Who is calling, as established by the interceptor.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The token's role.
    pub role: Role,
    /// Accounts the token may act on; None means all.
    pub accounts: Option<Arc<HashSet<u64>>>,
    /// The token's rate limit, shared by all its calls; None: unlimited.
    pub bucket: Option<Arc<TokenBucket>>,
    /// The token's open streams (`limits.max_streams_per_token`); None: unlimited.
    pub streams: Option<Arc<Semaphore>>,
}

impl Principal {
    /// Takes one request from the token's rate limit, or says when to retry.
    pub fn charge(&self) -> Result<()> {
        match &self.bucket {
            Some(b) => b.take(),
            None => Ok(()),
        }
    }

    /// Counts a stream against the token's limit for as long as the returned
    /// permit lives, or RESOURCE_EXHAUSTED when the token has that many open.
    pub fn open_stream(&self) -> Result<Option<OwnedSemaphorePermit>> {
        match &self.streams {
            None => Ok(None),
            Some(s) => s.clone().try_acquire_owned().map(Some).map_err(|_| {
                Error::ResourceExhausted(
                    "this token has the most streams open that it may \
                     (limits.max_streams_per_token); close one or retry later"
                        .into(),
                )
            }),
        }
    }
}

/// The principal of a request, as the interceptor left it.
pub fn principal<T>(req: &Request<T>) -> Result<&Principal> {
    req.extensions()
        .get::<Principal>()
        .ok_or(Error::Unauthenticated(
            "missing authorization: Bearer <token>",
        ))
}

/// A token bucket: `rate` requests per second, refilled continuously, at
/// most `burst` saved up.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    /// (tokens available, when last refilled).
    state: std::sync::Mutex<(f64, std::time::Instant)>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(per_second: u32, burst: u32) -> TokenBucket {
        let burst = if burst == 0 { per_second } else { burst };
        TokenBucket {
            rate: f64::from(per_second),
            burst: f64::from(burst.max(1)),
            state: std::sync::Mutex::new((f64::from(burst.max(1)), std::time::Instant::now())),
        }
    }

    /// Takes one request, or RESOURCE_EXHAUSTED saying when one is available.
    pub fn take(&self) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let (tokens, last) = *state;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.burst);
        if tokens >= 1.0 {
            *state = (tokens - 1.0, now);
            Ok(())
        } else {
            *state = (tokens, now);
            let wait_ms = ((1.0 - tokens) / self.rate * 1000.0).ceil();
            Err(Error::ResourceExhausted(format!(
                "rate limit of this token exceeded ({} requests/s, \
                 limits.requests_per_second_per_token); retry in {wait_ms} ms",
                self.rate
            )))
        }
    }
}

/// The configured tokens, hashed.
#[derive(Debug, Default)]
pub struct TokenTable {
    entries: Vec<([u8; 32], Principal)>,
}

/// SHA-256 of a token, hex encoded (for `token_sha256` in config).
pub fn token_sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl TokenTable {
    /// Builds the table from validated config entries.
    pub fn new(tokens: &[TokenConfig]) -> TokenTable {
        let entries = tokens
            .iter()
            .map(|t| {
                let hash: [u8; 32] = match (&t.token, &t.token_sha256) {
                    (Some(tok), _) => Sha256::digest(tok.as_bytes()).into(),
                    (None, Some(h)) => {
                        let mut out = [0u8; 32];
                        // Validated at config load: 64 hex characters.
                        let _ = hex::decode_to_slice(h, &mut out);
                        out
                    }
                    (None, None) => [0u8; 32],
                };
                let principal = Principal {
                    role: t.role,
                    accounts: t
                        .account_ids
                        .as_ref()
                        .map(|ids| Arc::new(ids.iter().copied().collect())),
                    bucket: None,
                    streams: None,
                };
                (hash, principal)
            })
            .collect();
        TokenTable { entries }
    }

    /// Gives every token its own rate limit of `per_second` requests with
    /// `burst` (0: same as `per_second`); `per_second` 0 leaves them unlimited.
    pub fn with_rate_limit(mut self, per_second: u32, burst: u32) -> TokenTable {
        if per_second > 0 {
            for (_, principal) in &mut self.entries {
                principal.bucket = Some(Arc::new(TokenBucket::new(per_second, burst)));
            }
        }
        self
    }

    /// Lets every token have at most `max` streams open at once.
    pub fn with_stream_limit(mut self, max: u32) -> TokenTable {
        for (_, principal) in &mut self.entries {
            principal.streams = Some(Arc::new(Semaphore::new(max as usize)));
        }
        self
    }

    /// Number of configured tokens.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no token is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The principal of `token`, checking every entry so timing does not
    /// reveal which one matched or how close a guess came.
    pub fn authenticate(&self, token: &str) -> Option<Principal> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (hash, principal) in &self.entries {
            if bool::from(hash.ct_eq(&presented)) && found.is_none() {
                found = Some(principal.clone());
            }
        }
        found
    }
}

/// What a token the table does not know gets: where the valid ones are.
/// Never the data folder's real path, nor anything of the token sent.
pub const UNKNOWN_TOKEN: &str = "unknown token (tokens are in [[tokens]] of the config, \
     or in data_dir/initial-credentials.toml after the first start when none are configured)";

/// The interceptor for a service that needs `role`.
pub fn interceptor(
    table: Arc<TokenTable>,
    role: Role,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut req: Request<()>| {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Status::from(Error::Unauthenticated(
                    "missing authorization: Bearer <token>",
                ))
            })?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Status::from(Error::Unauthenticated(
                    "authorization must be Bearer <token>",
                ))
            })?;
        let principal = table
            .authenticate(token)
            .ok_or_else(|| Status::from(Error::Unauthenticated(UNKNOWN_TOKEN)))?;
        if principal.role != role {
            let need = match role {
                Role::Admin => "admin",
                Role::Ingest => "ingest",
            };
            return Err(
                Error::PermissionDenied(format!("this service needs an {need} token")).into(),
            );
        }
        principal.charge()?;
        req.extensions_mut().insert(principal);
        Ok(req)
    }
}

/// Checks that the caller may act on `account_id` (and that it is set).
pub fn authorize_account<T>(req: &Request<T>, account_id: u64) -> Result<()> {
    if account_id == 0 {
        return Err(Error::invalid("account_id", "is required"));
    }
    let principal = principal(req)?;
    match &principal.accounts {
        Some(set) if !set.contains(&account_id) => Err(Error::PermissionDenied(format!(
            "token may not act on account {account_id}"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_and_plain_tokens_authenticate() {
        let plain = "plain-token-0123456789";
        let hashed = "hashed-token-0123456789";
        let table = TokenTable::new(&[
            TokenConfig {
                token: Some(plain.into()),
                token_sha256: None,
                role: Role::Admin,
                account_ids: Some(vec![7]),
            },
            TokenConfig {
                token: None,
                token_sha256: Some(token_sha256_hex(hashed)),
                role: Role::Ingest,
                account_ids: None,
            },
        ]);
        assert_eq!(table.authenticate(plain).unwrap().role, Role::Admin);
        assert_eq!(table.authenticate(hashed).unwrap().role, Role::Ingest);
        assert!(table.authenticate("other").is_none());
    }
}
