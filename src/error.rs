//! The one error type of the service and the one place that chooses a gRPC
//! status code for it. Internal failures are logged in full and returned
//! opaque; everything else says what is wrong and, for bad input, which field.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Every failure a request can meet.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: `field` names the offending field (e.g. `webhook.target_url`,
    /// `events[3].event_name`).
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Path of the field in the request.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The named resource does not exist (or belongs to another account).
    #[error("{0} not found")]
    NotFound(String),
    /// A limit was reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The request is valid but does not apply to the resource's state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Missing or unknown token.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The token may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// Storage could not take the write (disk full, read-only); retry later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The service is stopping.
    #[error("server is shutting down")]
    ShuttingDown,
    /// Anything else: a bug or a corrupt record. Logged, returned opaque.
    #[error("internal: {0}")]
    Internal(String),
    /// The service cannot start as configured (TLS files, storage key);
    /// the message says what to fix.
    #[error("{0}")]
    Startup(String),
}

/// Result with the service's error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::InvalidArgument`] for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Internal(format!("corrupt record: {e}"))
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::InvalidArgument { field, reason } => {
                // Both may echo client input; a status travels in HTTP/2
                // headers, which must stay small.
                let field = bounded(field, MAX_FIELD_BYTES);
                let reason = bounded(reason, MAX_REASON_BYTES);
                let details =
                    ErrorDetails::with_bad_request_violation(field.clone(), reason.clone());
                Status::with_error_details(
                    Code::InvalidArgument,
                    format!("{field}: {reason}"),
                    details,
                )
            }
            Error::NotFound(what) => Status::not_found(format!("{what} not found")),
            Error::ResourceExhausted(m) => Status::resource_exhausted(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::Unauthenticated(m) => Status::unauthenticated(m),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::Unavailable(m) => {
                tracing::error!(error = %m, "storage unavailable");
                Status::unavailable("storage unavailable, retry later")
            }
            Error::ShuttingDown => Status::unavailable("server is shutting down"),
            Error::Internal(m) | Error::Startup(m) => {
                tracing::error!(error = %m, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// Most bytes of a field path in a status.
const MAX_FIELD_BYTES: usize = 512;
/// Most bytes of a reason in a status.
const MAX_REASON_BYTES: usize = 1024;

/// `s` cut to at most `max` bytes on a character boundary, marked with `…`.
fn bounded(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_the_field() {
        let s: Status = Error::invalid("webhook.name", "must not be empty").into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "webhook.name: must not be empty");
        let br = s.get_details_bad_request().expect("bad request details");
        assert_eq!(br.field_violations[0].field, "webhook.name");
    }

    #[test]
    fn echoed_input_is_bounded() {
        let s: Status = Error::invalid("f".repeat(5000), "é".repeat(5000)).into();
        assert!(s.message().len() < 2000, "{}", s.message().len());
        let br = s.get_details_bad_request().unwrap();
        assert!(br.field_violations[0].field.ends_with('…'));
    }

    #[test]
    fn internal_errors_are_opaque() {
        let s: Status = Error::Internal("secret detail".into()).into();
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("secret"));
    }
}
