//! The console's way into the WebhookAdmin service: the same handlers and the
//! same token check grpcurl meets, called in process with the signed-in
//! admin's token, so the console can do nothing the API would refuse.

use std::future::Future;
use std::sync::Arc;

use tonic::{Code, Request, Response, Status};
use tonic_types::StatusExt;

use crate::api::admin::AdminService;
use crate::api::auth::{interceptor, TokenTable};
use crate::config::Role;

/// Calls WebhookAdmin handlers as a given token.
#[derive(Clone)]
pub struct AdminApi {
    service: AdminService,
    tokens: Arc<TokenTable>,
}

impl AdminApi {
    /// Calls go to `service`, authenticated against `tokens`.
    pub fn new(service: AdminService, tokens: Arc<TokenTable>) -> AdminApi {
        AdminApi { service, tokens }
    }

    /// Runs `call` on the service with `message`, as `token`: the admin
    /// interceptor first (UNAUTHENTICATED, PERMISSION_DENIED for a wrong
    /// role), then the handler (account scope, validation, limits).
    pub async fn call<T, R, F, Fut>(&self, token: &str, message: T, call: F) -> Result<R, Status>
    where
        F: FnOnce(AdminService, Request<T>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let mut head = Request::new(());
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::unauthenticated("unknown token"))?;
        head.metadata_mut().insert("authorization", value);
        let mut check = interceptor(self.tokens.clone(), Role::Admin);
        let (metadata, extensions, ()) = check(head)?.into_parts();
        let request = Request::from_parts(metadata, extensions, message);
        call(self.service.clone(), request)
            .await
            .map(Response::into_inner)
    }
}

/// A failed call, as the console shows it.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The gRPC code.
    pub code: Code,
    /// For INVALID_ARGUMENT: the form field it names (`target_url`, ...), if
    /// the form has one.
    pub field: Option<&'static str>,
    /// Every form field the status names, with what is wrong with it.
    pub fields: Vec<(&'static str, String)>,
    /// What went wrong, in words.
    pub words: String,
}

impl From<Status> for Failure {
    fn from(s: Status) -> Failure {
        let message = s.message().to_string();
        let field = if s.code() == Code::InvalidArgument {
            let path = s
                .get_details_bad_request()
                .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
                .unwrap_or_else(|| message.split(':').next().unwrap_or("").to_string());
            form_field(&path)
        } else {
            None
        };
        let words = match s.code() {
            Code::InvalidArgument => match s.get_details_bad_request() {
                Some(b) if field.is_some() => b
                    .field_violations
                    .first()
                    .map(|v| v.description.clone())
                    .unwrap_or(message),
                _ => message,
            },
            Code::ResourceExhausted => format!("Limit reached: {message}"),
            Code::PermissionDenied => format!(
                "Not allowed: {message}. Sign in with an admin token that covers this account."
            ),
            Code::Unavailable => format!(
                "The router is unavailable: {message}. Nothing was changed; try again in a moment."
            ),
            Code::Unauthenticated => {
                "This token is not accepted (any more); sign in again.".to_string()
            }
            Code::NotFound => format!("Not found: {message}."),
            Code::FailedPrecondition => format!("Cannot do that now: {message}."),
            _ => format!("The router failed to do that ({message}); its log has the details."),
        };
        let fields = match s.get_details_bad_request() {
            Some(b) if s.code() == Code::InvalidArgument => b
                .field_violations
                .iter()
                .filter_map(|v| Some((form_field(&v.field)?, v.description.clone())))
                .collect(),
            _ => field.map(|f| vec![(f, words.clone())]).unwrap_or_default(),
        };
        Failure {
            code: s.code(),
            field,
            fields,
            words,
        }
    }
}

/// The form field a request field path is shown next to.
pub fn form_field(path: &str) -> Option<&'static str> {
    let path = path.trim();
    let rest = path.strip_prefix("webhook.").unwrap_or(path);
    let name = rest.split(['.', '[']).next().unwrap_or("");
    Some(match name {
        "name" => "name",
        "description" => "description",
        "target_url" => "target_url",
        "event_types" => "event_types",
        "auth" if rest.contains("password") => "password",
        "auth" => "username",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn field_paths_map_to_form_fields() {
        assert_eq!(form_field("webhook.target_url"), Some("target_url"));
        assert_eq!(form_field("webhook.event_types[2]"), Some("event_types"));
        assert_eq!(form_field("webhook.auth.basic.password"), Some("password"));
        assert_eq!(form_field("webhook.auth.basic.username"), Some("username"));
        assert_eq!(form_field("account_id"), None);
    }

    #[test]
    fn failures_are_explained_in_words() {
        let f = Failure::from(Status::from(Error::invalid(
            "webhook.target_url",
            "must be an absolute URL",
        )));
        assert_eq!(f.field, Some("target_url"));
        assert_eq!(f.words, "must be an absolute URL");
        let f = Failure::from(Status::from(Error::ResourceExhausted("5 webhooks".into())));
        assert!(f.words.starts_with("Limit reached:"), "{}", f.words);
        let f = Failure::from(Status::from(Error::PermissionDenied("account 1".into())));
        assert!(f.words.starts_with("Not allowed:"), "{}", f.words);
        let f = Failure::from(Status::unavailable("storage unavailable, retry later"));
        assert!(
            f.words.starts_with("The router is unavailable:"),
            "{}",
            f.words
        );
    }
}
