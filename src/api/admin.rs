//! WebhookAdmin: webhook CRUD, secrets, tests and the delivery log.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::auth::{authorize_account, principal};
use super::convert::{self, page_size, page_token, parse_page_token};
use super::AppState;
use crate::delivery::ops;
use crate::domain::ids::{self, DELIVERY_PREFIX, WEBHOOK_PREFIX};
use crate::domain::now_ms;
use crate::domain::webhook::{self, Auth, Rules, SecretRecord, Webhook};
use crate::error::{Error, Result};
use crate::proto::v1 as pb;
use crate::proto::v1::webhook_admin_server::WebhookAdmin;
use crate::store::{ConfigStore, DeliveryLog};

/// Longest rotation grace period.
const MAX_GRACE_SECONDS: u32 = 7 * 24 * 3600;

/// The WebhookAdmin service.
#[derive(Clone)]
pub struct AdminService {
    state: AppState,
}

impl AdminService {
    /// A service over the shared state.
    pub fn new(state: AppState) -> Self {
        AdminService { state }
    }

    fn rules(&self) -> Rules<'_> {
        Rules {
            catalog: &self.state.catalog,
            allow_private_targets: self.state.config.delivery.allow_private_targets,
        }
    }

    async fn load(&self, account_id: u64, webhook_id: &str) -> Result<Webhook> {
        check_webhook_id(webhook_id, "webhook_id")?;
        let id = webhook_id.to_string();
        self.state
            .store
            .get_webhook(account_id, &id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("webhook {webhook_id}")))
    }

    /// A webhook and its secret.
    async fn load_with_secret(
        &self,
        account_id: u64,
        webhook_id: &str,
    ) -> Result<(Webhook, Option<SecretRecord>)> {
        let w = self.load(account_id, webhook_id).await?;
        let id = w.id.clone();
        let secret = self.state.store.get_secret(&id).await?;
        Ok((w, secret))
    }

    async fn set_active(
        &self,
        account_id: u64,
        webhook_id: &str,
        active: bool,
    ) -> Result<pb::Webhook> {
        check_webhook_id(webhook_id, "webhook_id")?;
        let w = self
            .state
            .store
            .update_webhook(account_id, webhook_id, move |w, _| {
                w.active = active;
                w.disabled_reason.clear();
                w.update_time_ms = now_ms();
                Ok(None)
            })
            .await?;
        if active {
            // Activation starts the circuit breaker afresh.
            self.state.dispatcher.reset_circuit(webhook_id);
        }
        self.state.dispatcher.refresh(account_id, webhook_id).await;
        let change = if active {
            ops::Change::Activated
        } else {
            ops::Change::Retired
        };
        ops::webhook_updated(&self.state.dispatcher, change, None, &w).await;
        Ok(convert::webhook_to_proto(&w))
    }
}

fn check_webhook_id(id: &str, field: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if !ids::is_valid(WEBHOOK_PREFIX, id) {
        return Err(Error::invalid(field, "is not a webhook id (wh_…)"));
    }
    Ok(())
}

/// Applies an update mask (or, when empty, every set field) from `src` onto `dst`.
fn apply_mask(dst: &mut Webhook, src: &pb::Webhook, paths: &[String]) -> Result<()> {
    let all_set: Vec<String>;
    let paths = if paths.is_empty() {
        let mut p = Vec::new();
        if !src.name.is_empty() {
            p.push("name".to_string());
        }
        if !src.description.is_empty() {
            p.push("description".to_string());
        }
        if !src.target_url.is_empty() {
            p.push("target_url".to_string());
        }
        if src.auth.is_some() {
            p.push("auth".to_string());
        }
        if !src.event_types.is_empty() {
            p.push("event_types".to_string());
        }
        if src.max_in_flight != 0 {
            p.push("max_in_flight".to_string());
        }
        if src.filter.is_some() {
            p.push("filter".to_string());
        }
        if p.is_empty() {
            return Err(Error::invalid("webhook", "sets no field to update"));
        }
        all_set = p;
        &all_set[..]
    } else {
        paths
    };
    for (i, path) in paths.iter().enumerate() {
        match path.strip_prefix("webhook.").unwrap_or(path) {
            "name" => dst.name = src.name.clone(),
            "description" => dst.description = src.description.clone(),
            "target_url" => dst.target_url = src.target_url.trim().to_string(),
            "event_types" => {
                dst.event_types = src
                    .event_types
                    .iter()
                    .map(|t| t.trim().to_string())
                    .collect()
            }
            "max_in_flight" => dst.max_in_flight = src.max_in_flight,
            "filter" => {
                dst.filter = super::filter::filter_from_proto(src.filter.as_ref(), "webhook.filter")?
            }
            "auth" => {
                convert::check_auth(src.auth.as_ref(), "webhook.auth")?;
                let mut new_auth = convert::auth_from_proto(src.auth.as_ref());
                // An empty password keeps the stored one for the same user.
                if let (
                    Auth::Basic { username, password },
                    Auth::Basic {
                        username: old_user,
                        password: old_pass,
                    },
                ) = (&mut new_auth, &dst.auth)
                {
                    if password.is_empty() && username == old_user {
                        *password = old_pass.clone();
                    }
                }
                dst.auth = new_auth;
            }
            other => {
                return Err(Error::invalid(
                    format!("update_mask.paths[{i}]"),
                    format!(
                    "{:?} cannot be updated (use name, description, target_url, auth, event_types, max_in_flight, filter)",
                    webhook::truncate(other, 64)
                ),
                ))
            }
        }
    }
    Ok(())
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchDeliveriesResponse, Status>> + Send>>;
type OperationalStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchOperationalEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl WebhookAdmin for AdminService {
    async fn create_webhook(
        &self,
        req: Request<pb::CreateWebhookRequest>,
    ) -> Result<Response<pb::CreateWebhookResponse>, Status> {
        let r = req.get_ref();
        authorize_account(&req, r.account_id)?;
        let src = r
            .webhook
            .as_ref()
            .ok_or_else(|| Error::invalid("webhook", "is required"))?;
        let now = now_ms();
        convert::check_auth(src.auth.as_ref(), "webhook.auth")?;
        let mut w = convert::webhook_from_proto(r.account_id, src, now);
        w.filter = super::filter::filter_from_proto(src.filter.as_ref(), "webhook.filter")?;
        webhook::validate(&mut w, self.rules(), "webhook")?;
        w.id = ids::new_id(WEBHOOK_PREFIX);
        let secret = w
            .auth
            .signature_algorithm()
            .map(|a| SecretRecord::generate_for(a, now));
        self.state
            .store
            .create_webhook(
                w.clone(),
                secret,
                self.state.config.limits.max_webhooks_per_account,
            )
            .await?;
        self.state.dispatcher.refresh(w.account_id, &w.id).await;
        ops::webhook_created(&self.state.dispatcher, &w).await;
        tracing::info!(account_id = w.account_id, webhook_id = %w.id, "webhook created");
        Ok(Response::new(pb::CreateWebhookResponse {
            webhook: Some(convert::webhook_to_proto(&w)),
        }))
    }

    async fn get_webhook(
        &self,
        req: Request<pb::GetWebhookRequest>,
    ) -> Result<Response<pb::GetWebhookResponse>, Status> {
        let r = req.get_ref();
        authorize_account(&req, r.account_id)?;
        let w = self.load(r.account_id, &r.webhook_id).await?;
        Ok(Response::new(pb::GetWebhookResponse {
            webhook: Some(convert::webhook_to_proto(&w)),
        }))
    }

    async fn list_webhooks(
        &self,
        req: Request<pb::ListWebhooksRequest>,
    ) -> Result<Response<pb::ListWebhooksResponse>, Status> {
        let r = req.get_ref();
        authorize_account(&req, r.account_id)?;
        let limit = page_size(r.page_size, 50, 1000)?;
        let after = parse_page_token("wh", &r.page_token)?;
        if let Some(a) = &after {
            if !ids::is_valid(WEBHOOK_PREFIX, a) {
                return Err(
                    Error::invalid("page_token", "not a token returned by this call").into(),
                );
            }
        }
        let account_id = r.account_id;
        let (items, more) = self
            .state
            .store
            .list_webhooks(account_id, after, limit)
            .await?;
        let next_page_token = match (more, items.last()) {
            (true, Some(last)) => page_token("wh", &last.id),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListWebhooksResponse {
            webhooks: items.iter().map(convert::webhook_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn update_webhook(
        &self,
        req: Request<pb::UpdateWebhookRequest>,
    ) -> Result<Response<pb::UpdateWebhookResponse>, Status> {
        let r = req.get_ref();
        authorize_account(&req, r.account_id)?;
        let src = r
            .webhook
            .as_ref()
            .ok_or_else(|| Error::invalid("webhook", "is required"))?;
        check_webhook_id(&src.id, "webhook.id")?;
        let paths = r
            .update_mask
            .as_ref()
            .map(|m| m.paths.clone())
            .unwrap_or_default();
        let catalog = self.state.catalog.clone();
        let allow_private_targets = self.state.config.delivery.allow_private_targets;
        let change = src.clone();
        let before = Arc::new(std::sync::Mutex::new(None));
        let seen = before.clone();
        let w = self
            .state
            .store
            .update_webhook(r.account_id, &src.id, move |w, secret| {
                *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(w.clone());
                let auth_before = w.auth.clone();
                apply_mask(w, &change, &paths)?;
                let rules = Rules {
                    catalog: &catalog,
                    allow_private_targets,
                };
                webhook::validate(w, rules, "webhook")?;
                let now = now_ms();
                w.update_time_ms = now;
                // A new signature webhook gets a key; a change of algorithm
                // migrates (the old key signs on for a grace period).
                Ok(webhook::secret_after_auth_change(
                    &auth_before,
                    &w.auth,
                    secret.as_ref(),
                    now,
                ))
            })
            .await?;
        self.state.dispatcher.refresh(r.account_id, &w.id).await;
        let before = before.lock().unwrap_or_else(|p| p.into_inner()).take();
        let dispatcher = &self.state.dispatcher;
        ops::webhook_updated(dispatcher, ops::Change::Updated, before.as_ref(), &w).await;
        Ok(Response::new(pb::UpdateWebhookResponse {
            webhook: Some(convert::webhook_to_proto(&w)),
        }))
    }

    async fn delete_webhook(
        &self,
        req: Request<pb::DeleteWebhookRequest>,
    ) -> Result<Response<pb::DeleteWebhookResponse>, Status> {
        let r = req.get_ref();
        authorize_account(&req, r.account_id)?;
        // Only touch lanes of a webhook of this account: stopping them for
        // another account's id would silence that webhook until a restart.
        self.load(r.account_id, &r.webhook_id).await?;
        // From here no lane of it starts again (a racing Update, Activate,
        // Rotate or Redeliver included), and the running ones are stopped
        // before the store deletes it.
        let dispatcher = &self.state.dispatcher;
        dispatcher.begin_delete(&r.webhook_id).await;
        let deleted = self
            .state
            .store
            .delete_webhook(r.account_id, &r.webhook_id)
            .await;
        // Not deleted (e.g. not found, storage unavailable): its lanes run again.
        dispatcher
            .end_delete(r.account_id, &r.webhook_id, deleted.is_ok())
            .await;
        deleted?;
        ops::webhook_deleted(dispatcher, r.account_id, &r.webhook_id).await;
        tracing::info!(account_id = r.account_id, webhook_id = %r.webhook_id, "webhook deleted");
        Ok(Response::new(pb::DeleteWebhookResponse {}))
    }

    async fn retire_webhook(
        &self,
        req: Request<pb::RetireWebhookRequest>,
    ) -> Result<Response<pb::RetireWebhookResponse>, Status> {
        let r = req.get_ref();
        authorize_account(&req, r.account_id)?;
        let webhook = self.set_active(r.account_id, &r.webhook_id, false).await?;
        Ok(Response::new(pb::RetireWebhookResponse {
            webhook: Some(webhook),
        }))
    }

    async fn activate_webhook(
        &self,
        req: Request<pb::ActivateWebhookRequest>,
    ) -> Result<Response<pb::ActivateWebhookResponse>, Status> {
        let r = req.get_ref();
        authorize_account(&req, r.account_id)?;
        let webhook = self.set_active(r.account_id, &r.webhook_id, true).await?;
        Ok(Response::new(pb::ActivateWebhookResponse {
            webhook: Some(webhook),
        }))
    }

    async fn get_webhook_secret(
        &self,
        req: Request<pb::GetWebhookSecretRequest>,
    ) -> Result<Response<pb::GetWebhookSecretResponse>, Status> {
        let r = req.get_ref();
        authorize_account(&req, r.account_id)?;
        let (w, secret) = self.load_with_secret(r.account_id, &r.webhook_id).await?;
        if !w.auth.is_signature() {
            return Err(Error::FailedPrecondition(format!(
                "webhook {} does not use signature auth",
                w.id
            ))
            .into());
        }
        let secret =
            secret.ok_or_else(|| Error::Internal(format!("webhook {} has no secret", w.id)))?;
        Ok(Response::new(pb::GetWebhookSecretResponse {
            secret: Some(convert::secret_to_proto(&w.id, &secret, now_ms())?),
        }))
    }

    async fn rotate_webhook_secret(
        &self,
        req: Request<pb::RotateWebhookSecretRequest>,
    ) -> Result<Response<pb::RotateWebhookSecretResponse>, Status> {
        let r = req.get_ref();
        authorize_account(&req, r.account_id)?;
        check_webhook_id(&r.webhook_id, "webhook_id")?;
        if r.grace_period_seconds > MAX_GRACE_SECONDS {
            return Err(Error::invalid(
                "grace_period_seconds",
                format!("must be at most {MAX_GRACE_SECONDS} (7 days)"),
            )
            .into());
        }
        let now = now_ms();
        let grace_ms = i64::from(r.grace_period_seconds) * 1000;
        let rotated = Arc::new(std::sync::Mutex::new(None));
        let out = rotated.clone();
        let w = self
            .state
            .store
            .update_webhook(r.account_id, &r.webhook_id, move |w, secret| {
                if !w.auth.is_signature() {
                    return Err(Error::FailedPrecondition(format!(
                        "webhook {} does not use signature auth",
                        w.id
                    )));
                }
                let algorithm = w.auth.signature_algorithm().unwrap_or_default();
                let old = secret.unwrap_or_else(|| SecretRecord::generate_for(algorithm, now));
                let new = old.rotate_to(algorithm, now, grace_ms);
                *out.lock().unwrap_or_else(|p| p.into_inner()) = Some(new.clone());
                Ok(Some(new))
            })
            .await?;
        self.state
            .dispatcher
            .refresh(r.account_id, &r.webhook_id)
            .await;
        let secret = rotated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| Error::Internal("rotation produced no secret".into()))?;
        let change = ops::Change::SecretRotated;
        ops::webhook_updated(&self.state.dispatcher, change, None, &w).await;
        tracing::info!(account_id = r.account_id, webhook_id = %r.webhook_id, "webhook secret rotated");
        Ok(Response::new(pb::RotateWebhookSecretResponse {
            secret: Some(convert::secret_to_proto(&r.webhook_id, &secret, now)?),
        }))
    }

    async fn list_event_types(
        &self,
        req: Request<pb::ListEventTypesRequest>,
    ) -> Result<Response<pb::ListEventTypesResponse>, Status> {
        let r = req.get_ref();
        let entries = self.state.catalog.entries();
        let limit = page_size(r.page_size, 1000, 1000)?;
        let start = match parse_page_token("et", &r.page_token)? {
            Some(s) => s
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= entries.len())
                .ok_or_else(|| Error::invalid("page_token", "not a token returned by this call"))?,
            None => 0,
        };
        let end = (start + limit).min(entries.len());
        Ok(Response::new(pb::ListEventTypesResponse {
            event_types: entries[start..end]
                .iter()
                .map(convert::event_type_to_proto)
                .collect(),
            next_page_token: if end < entries.len() {
                page_token("et", &end.to_string())
            } else {
                String::new()
            },
        }))
    }

    async fn test_webhook(
        &self,
        req: Request<pb::TestWebhookRequest>,
    ) -> Result<Response<pb::TestWebhookResponse>, Status> {
        use pb::test_webhook_request::Target;
        let r = req.get_ref();
        authorize_account(&req, r.account_id)?;
        let now = now_ms();
        let (w, secret) = match &r.target {
            Some(Target::WebhookId(id)) => self.load_with_secret(r.account_id, id).await?,
            Some(Target::Webhook(src)) => {
                convert::check_auth(src.auth.as_ref(), "webhook.auth")?;
                let mut w = convert::webhook_from_proto(r.account_id, src, now);
                webhook::validate(&mut w, self.rules(), "webhook")?;
                w.id = "wh_test".into();
                let secret = w
                    .auth
                    .signature_algorithm()
                    .map(|a| SecretRecord::generate_for(a, now));
                (w, secret)
            }
            None => return Err(Error::invalid("target", "set webhook_id or webhook").into()),
        };
        let event_name = if r.event_name.is_empty() {
            w.event_types.first().cloned().unwrap_or_default()
        } else if self.state.catalog.mode(&r.event_name).is_some() {
            r.event_name.clone()
        } else {
            let reason = self.state.catalog.unknown_type_reason(&r.event_name);
            return Err(Error::invalid("event_name", reason).into());
        };
        let outcome = self
            .state
            .dispatcher
            .test_webhook(&w, secret.as_ref(), &event_name)
            .await;
        Ok(Response::new(pb::TestWebhookResponse {
            success: outcome.success,
            status_code: u32::from(outcome.status_code),
            latency_ms: outcome.latency_ms,
            error: outcome.error,
            response_body: outcome.response_body,
        }))
    }

    async fn list_deliveries(
        &self,
        req: Request<pb::ListDeliveriesRequest>,
    ) -> Result<Response<pb::ListDeliveriesResponse>, Status> {
        let r = req.get_ref();
        authorize_account(&req, r.account_id)?;
        self.load(r.account_id, &r.webhook_id).await?;
        let state = convert::state_filter(r.state)?;
        let limit = page_size(r.page_size, 50, 1000)?;
        let after = parse_page_token("msg", &r.page_token)?;
        if let Some(a) = &after {
            if !ids::is_valid(DELIVERY_PREFIX, a) {
                return Err(
                    Error::invalid("page_token", "not a token returned by this call").into(),
                );
            }
        }
        let webhook_id = r.webhook_id.clone();
        let page = self
            .state
            .store
            .list_deliveries(&webhook_id, state, after, limit)
            .await?;
        Ok(Response::new(pb::ListDeliveriesResponse {
            deliveries: page
                .deliveries
                .iter()
                .map(convert::delivery_to_proto)
                .collect(),
            next_page_token: page
                .next_after
                .map(|a| page_token("msg", &a))
                .unwrap_or_default(),
        }))
    }

    async fn redeliver_events(
        &self,
        req: Request<pb::RedeliverEventsRequest>,
    ) -> Result<Response<pb::RedeliverEventsResponse>, Status> {
        let r = req.get_ref();
        authorize_account(&req, r.account_id)?;
        let w = self.load(r.account_id, &r.webhook_id).await?;
        let ids = if r.delivery_ids.is_empty() {
            None
        } else {
            for (i, id) in r.delivery_ids.iter().enumerate() {
                if !ids::is_valid(DELIVERY_PREFIX, id) {
                    return Err(Error::invalid(
                        format!("delivery_ids[{i}]"),
                        "is not a delivery id (msg_…)",
                    )
                    .into());
                }
            }
            Some(r.delivery_ids.clone())
        };
        let (account_id, webhook_id) = (r.account_id, w.id.clone());
        let metrics = self.state.metrics.clone();
        let progress_webhook = webhook_id.clone();
        let mut reported = 0;
        let total = self
            .state
            .store
            .redeliver(&webhook_id, ids, now_ms(), move |done, total| {
                metrics.redelivery_requeued((done - reported) as u64);
                reported = done;
                // Large requeues show their progress in the log.
                if total > 1000 {
                    tracing::info!(
                        account_id,
                        webhook_id = %progress_webhook,
                        done,
                        total,
                        "redelivery progress"
                    );
                }
            })
            .await?;
        tracing::info!(
            account_id = r.account_id,
            webhook_id = %w.id,
            requeued = total,
            "redelivery requeued"
        );
        self.state.dispatcher.wake(&w.id);
        Ok(Response::new(pb::RedeliverEventsResponse {
            requeued_count: total as u32,
        }))
    }

    type WatchDeliveriesStream = WatchStream;

    async fn watch_deliveries(
        &self,
        req: Request<pb::WatchDeliveriesRequest>,
    ) -> Result<Response<Self::WatchDeliveriesStream>, Status> {
        let r = req.get_ref();
        authorize_account(&req, r.account_id)?;
        if !r.webhook_id.is_empty() {
            self.load(r.account_id, &r.webhook_id).await?;
        }
        let permit = principal(&req)?.open_stream()?;
        let webhook_id = r.webhook_id.clone();
        let account_id = r.account_id;
        let dispatcher = self.state.dispatcher.clone();
        let circuit = move |id: &str| {
            Some(pb::WebhookCircuit {
                webhook_id: id.to_string(),
                state: convert::circuit_to_proto(dispatcher.circuit(id).map(|v| v.state)) as i32,
            })
        };
        let rx = self.state.dispatcher.subscribe_outcomes(r.account_id);
        let outcomes = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map({
            let webhook_id = webhook_id.clone();
            move |item| match item {
                Ok(d) if webhook_id.is_empty() || d.webhook_id == webhook_id => {
                    Some(Ok(pb::WatchDeliveriesResponse {
                        delivery: Some(convert::delivery_to_proto(&d)),
                        missed_count: 0,
                        circuit: circuit(&d.webhook_id),
                    }))
                }
                Ok(_) => None,
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "WatchDeliveries consumer too slow; told it how many outcomes it missed"
                    );
                    Some(Ok(pb::WatchDeliveriesResponse {
                        delivery: None,
                        missed_count: n,
                        circuit: None,
                    }))
                }
            }
        });
        // Changes of the watched webhooks' breakers, as messages of their
        // own; a watcher far behind skips some (the next delivery message
        // carries the state again).
        let circuits = tokio_stream::wrappers::BroadcastStream::new(
            self.state.dispatcher.subscribe_circuits(),
        )
        .filter_map(move |item| match item {
            Ok(c)
                if c.account_id == account_id
                    && (webhook_id.is_empty() || c.webhook_id == webhook_id) =>
            {
                Some(Ok(pb::WatchDeliveriesResponse {
                    delivery: None,
                    missed_count: 0,
                    circuit: Some(pb::WebhookCircuit {
                        webhook_id: c.webhook_id.clone(),
                        state: convert::circuit_to_proto(Some(c.state)) as i32,
                    }),
                }))
            }
            _ => None,
        });
        let stream = outcomes.merge(circuits).map(move |m| {
            // The stream owns the token's stream permit until it ends.
            let _held = &permit;
            m
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type RecoverDeliveriesStream = super::recovery::RecoverStream;

    async fn recover_deliveries(
        &self,
        req: Request<pb::RecoverDeliveriesRequest>,
    ) -> Result<Response<Self::RecoverDeliveriesStream>, Status> {
        let r = req.get_ref();
        authorize_account(&req, r.account_id)?;
        let w = self.load(r.account_id, &r.webhook_id).await?;
        let window = super::recovery::window(r, now_ms())?;
        let permit = principal(&req)?.open_stream()?;
        Ok(Response::new(super::recovery::start(
            self.state.clone(),
            r.account_id,
            w.id,
            window,
            permit,
        )))
    }

    async fn explain_routing(
        &self,
        req: Request<pb::ExplainRoutingRequest>,
    ) -> Result<Response<pb::ExplainRoutingResponse>, Status> {
        let r = req.get_ref();
        authorize_account(&req, r.account_id)?;
        let decisions =
            super::filter::explain_routing(&self.state, r.account_id, r.event.as_ref()).await?;
        Ok(Response::new(pb::ExplainRoutingResponse { decisions }))
    }

    type WatchOperationalEventsStream = OperationalStream;

    async fn watch_operational_events(
        &self,
        req: Request<pb::WatchOperationalEventsRequest>,
    ) -> Result<Response<Self::WatchOperationalEventsStream>, Status> {
        let account_id = req.get_ref().account_id;
        if account_id == 0 {
            if principal(&req)?.accounts.is_some() {
                return Err(Error::PermissionDenied(
                    "account_id 0 (every account) needs a token for every account; \
                     set the account_id this token may act on"
                        .into(),
                )
                .into());
            }
        } else {
            authorize_account(&req, account_id)?;
        }
        let permit = principal(&req)?.open_stream()?;
        let rx = ops::subscribe(&self.state.dispatcher, account_id);
        let stream = tokio_stream::wrappers::BroadcastStream::new(rx).map(move |item| {
            // The stream owns the token's stream permit until it ends.
            let _held = &permit;
            match item {
                Ok(e) => Ok(pb::WatchOperationalEventsResponse {
                    event: Some(convert::operational_event_to_proto(&e)),
                    missed_count: 0,
                }),
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "WatchOperationalEvents consumer too slow; told it how many events it missed"
                    );
                    Ok(pb::WatchOperationalEventsResponse {
                        event: None,
                        missed_count: n,
                    })
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_webhook_health(
        &self,
        req: Request<pb::GetWebhookHealthRequest>,
    ) -> Result<Response<pb::GetWebhookHealthResponse>, Status> {
        let r = req.get_ref();
        authorize_account(&req, r.account_id)?;
        let w = self.load(r.account_id, &r.webhook_id).await?;
        let health = super::health::webhook_health(&self.state, &w).await?;
        Ok(Response::new(pb::GetWebhookHealthResponse {
            health: Some(convert::health_to_proto(&health)),
        }))
    }
}
