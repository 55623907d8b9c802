//! The console's pages and actions. Each reads or changes webhooks only
//! through [`AdminApi`], as the signed-in token; what the API refuses is
//! shown in words (field errors next to their field).

use std::collections::HashMap;
use std::fmt::Write;

use prost_types::FieldMask;
use tonic::Code;

use crate::proto::v1::webhook_admin_server::WebhookAdmin;
use crate::proto::v1::{self as pb, webhook_auth::Method};

use super::api::Failure;
use super::chart;
use super::html::{alert, button_form, csrf_field, esc, page, ts, Chrome};
use super::{Ctx, Reply};

/// The values of the Add/Edit form.
#[derive(Debug, Default, Clone)]
pub struct WebhookForm {
    name: String,
    description: String,
    target_url: String,
    /// `none`, `basic`, `signature` (HMAC-SHA256) or `ed25519` (signature, ed25519).
    auth: String,
    username: String,
    password: String,
    event_types: Vec<String>,
    active: bool,
}

impl WebhookForm {
    /// A new webhook's form: signature authentication, active.
    fn blank() -> WebhookForm {
        WebhookForm {
            auth: "signature".into(),
            active: true,
            ..Default::default()
        }
    }

    /// The form filled from a posted body.
    pub fn from_pairs(pairs: &[(String, String)]) -> WebhookForm {
        let mut f = WebhookForm::default();
        for (k, v) in pairs {
            match k.as_str() {
                "name" => f.name = v.clone(),
                "description" => f.description = v.clone(),
                "target_url" => f.target_url = v.trim().to_string(),
                "auth" => f.auth = v.clone(),
                "username" => f.username = v.clone(),
                "password" => f.password = v.clone(),
                "event_types" => f.event_types.push(v.clone()),
                "active" => f.active = v == "on",
                _ => {}
            }
        }
        f
    }

    fn from_webhook(w: &pb::Webhook) -> WebhookForm {
        let (auth, username) = match w.auth.as_ref().and_then(|a| a.method.as_ref()) {
            Some(Method::Basic(b)) => ("basic", b.username.clone()),
            Some(Method::Signature(s)) if s.algorithm == pb::SignatureAlgorithm::Ed25519 as i32 => {
                ("ed25519", String::new())
            }
            Some(Method::Signature(_)) => ("signature", String::new()),
            _ => ("none", String::new()),
        };
        WebhookForm {
            name: w.name.clone(),
            description: w.description.clone(),
            target_url: w.target_url.clone(),
            auth: auth.into(),
            username,
            password: String::new(),
            event_types: w.event_types.clone(),
            active: w.active,
        }
    }

    fn to_webhook(&self, id: &str) -> pb::Webhook {
        let method = match self.auth.as_str() {
            "basic" => Method::Basic(pb::BasicAuth {
                username: self.username.clone(),
                password: self.password.clone(),
            }),
            "signature" => Method::Signature(pb::SignatureAuth {
                algorithm: pb::SignatureAlgorithm::HmacSha256 as i32,
            }),
            "ed25519" => Method::Signature(pb::SignatureAuth {
                algorithm: pb::SignatureAlgorithm::Ed25519 as i32,
            }),
            _ => Method::None(pb::NoAuth {}),
        };
        pb::Webhook {
            id: id.into(),
            name: self.name.clone(),
            description: self.description.clone(),
            target_url: self.target_url.clone(),
            auth: Some(pb::WebhookAuth {
                method: Some(method),
            }),
            event_types: self.event_types.clone(),
            ..Default::default()
        }
    }
}

/// Field errors and a general message shown above a form.
#[derive(Default)]
struct Problems {
    fields: HashMap<&'static str, String>,
    general: Option<String>,
}

impl Problems {
    fn from_failure(f: Failure) -> Problems {
        let mut p = Problems::default();
        if f.fields.is_empty() {
            p.general = Some(f.words);
        }
        for (field, words) in f.fields {
            p.fields.entry(field).or_insert(words);
        }
        p
    }
}

fn base(a: u64) -> String {
    format!("/accounts/{a}/webhooks")
}

fn chrome<'a>(ctx: &'a Ctx<'_>, account: u64) -> Chrome<'a> {
    Chrome {
        account,
        csrf: &ctx.session.csrf,
        flash: ctx.session.flash.as_deref(),
    }
}

/// After a failed action: back to sign-in when the token is no longer
/// accepted (the reply), otherwise the failure in words on the next page.
fn flash_failure(ctx: &Ctx<'_>, f: Failure) -> Option<Reply> {
    if f.code == Code::Unauthenticated {
        return Some(Reply::SignedOut(f.words));
    }
    ctx.flash(f.words);
    None
}

/// A page that only says what went wrong (a failed read).
fn failure_page(ctx: &Ctx<'_>, account: u64, f: Failure) -> Reply {
    if f.code == Code::Unauthenticated {
        return Reply::SignedOut(f.words);
    }
    let status = match f.code {
        Code::NotFound => 404,
        Code::PermissionDenied => 403,
        Code::Unavailable => 503,
        Code::InvalidArgument | Code::FailedPrecondition => 400,
        Code::ResourceExhausted => 429,
        _ => 500,
    };
    let body = format!("<h1>Something went wrong</h1>{}", alert(&f.words));
    Reply::Html(status, page("Error", Some(&chrome(ctx, account)), &body))
}

async fn catalog(ctx: &Ctx<'_>) -> Result<Vec<pb::EventType>, Failure> {
    let r = ctx
        .api
        .call(
            &ctx.session.token,
            pb::ListEventTypesRequest::default(),
            |s, r| async move { s.list_event_types(r).await },
        )
        .await?;
    Ok(r.event_types)
}

async fn get_webhook(ctx: &Ctx<'_>, account: u64, id: &str) -> Result<pb::Webhook, Failure> {
    let req = pb::GetWebhookRequest {
        account_id: account,
        webhook_id: id.into(),
    };
    let r = ctx
        .api
        .call(&ctx.session.token, req, |s, r| async move {
            s.get_webhook(r).await
        })
        .await?;
    r.webhook
        .ok_or_else(|| Failure::from(tonic::Status::internal("no webhook in the answer")))
}

async fn list_webhooks(ctx: &Ctx<'_>, account: u64) -> Result<Vec<pb::Webhook>, Failure> {
    let mut all = Vec::new();
    let mut token = String::new();
    // Bounded: the account limit caps the list; 10 pages is far beyond it.
    for _ in 0..10 {
        let req = pb::ListWebhooksRequest {
            account_id: account,
            page_size: 1000,
            page_token: token,
        };
        let r = ctx
            .api
            .call(&ctx.session.token, req, |s, r| async move {
                s.list_webhooks(r).await
            })
            .await?;
        all.extend(r.webhooks);
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    Ok(all)
}

async fn list_deliveries(
    ctx: &Ctx<'_>,
    account: u64,
    id: &str,
    state: pb::DeliveryState,
    page_size: i32,
    page_token: String,
) -> Result<pb::ListDeliveriesResponse, Failure> {
    let req = pb::ListDeliveriesRequest {
        account_id: account,
        webhook_id: id.into(),
        state: state as i32,
        page_size,
        page_token,
    };
    Ok(ctx
        .api
        .call(&ctx.session.token, req, |s, r| async move {
            s.list_deliveries(r).await
        })
        .await?)
}

fn status_text(w: &pb::Webhook) -> String {
    if w.active {
        "Active".into()
    } else if !w.disabled_reason.is_empty() {
        format!("Disabled: {}", w.disabled_reason)
    } else {
        "Retired".into()
    }
}

/// The word for a delivery state.
pub fn state_name(state: i32) -> &'static str {
    match pb::DeliveryState::try_from(state).unwrap_or(pb::DeliveryState::Unspecified) {
        pb::DeliveryState::Pending => "Pending",
        pb::DeliveryState::Retrying => "Retrying",
        pb::DeliveryState::Delivered => "Delivered",
        pb::DeliveryState::Dead => "Dead",
        pb::DeliveryState::Expired => "Expired",
        pb::DeliveryState::Unspecified => "Unknown",
    }
}

fn auth_text(w: &pb::Webhook) -> String {
    match w.auth.as_ref().and_then(|a| a.method.as_ref()) {
        Some(Method::Basic(b)) => format!("Basic (username {})", b.username),
        Some(Method::Signature(s)) if s.algorithm == pb::SignatureAlgorithm::Ed25519 as i32 => {
            "Signature (Standard Webhooks, ed25519)".into()
        }
        Some(Method::Signature(_)) => "Signature (Standard Webhooks, HMAC-SHA256)".into(),
        _ => "None".into(),
    }
}

fn attempt_text(a: &pb::DeliveryAttempt) -> String {
    let status = if a.status_code == 0 {
        "No response".to_string()
    } else {
        format!("HTTP {}", a.status_code)
    };
    let mut s = format!("{status}, {} ms", a.latency_ms);
    if !a.error.is_empty() {
        let _ = write!(s, ", {}", a.error);
    }
    s
}

/// Rows of the webhook list that show their last delivery.
const LAST_DELIVERY_ROWS: usize = 50;

/// The webhook list of an account.
pub async fn list(ctx: &Ctx<'_>, account: u64) -> Reply {
    let hooks = match list_webhooks(ctx, account).await {
        Ok(h) => h,
        Err(f) => return failure_page(ctx, account, f),
    };
    ctx.remember_account(account);
    let limit = ctx.max_webhooks;
    let mut body = String::from("<h1>Webhooks</h1>");
    if hooks.len() as u64 >= u64::from(limit) {
        let _ = write!(
            body,
            "<p><button type=\"button\" disabled aria-describedby=\"limit-reason\">Add Webhook</button></p>\
             <p id=\"limit-reason\" class=\"hint\">This account has {n} webhooks, the most it may have \
             (limits.max_webhooks_per_account = {limit}). Delete one to add another.</p>",
            n = hooks.len()
        );
    } else {
        let _ = write!(
            body,
            "<p><a class=\"button\" href=\"{}/new\">Add Webhook</a> \
             <span class=\"hint\">{} of {limit} webhooks used.</span></p>",
            base(account),
            hooks.len()
        );
    }
    body.push_str(
        "<div class=\"scroll\"><table><caption>Webhooks of this account</caption><thead><tr>\
         <th scope=\"col\">Name</th><th scope=\"col\">Target URL</th>\
         <th scope=\"col\">Trigger events</th><th scope=\"col\">Status</th>\
         <th scope=\"col\">Last delivery</th></tr></thead><tbody>",
    );
    if hooks.is_empty() {
        body.push_str("<tr><td colspan=\"5\">No webhooks yet.</td></tr>");
    }
    {
        for (row, w) in hooks.iter().enumerate() {
            // Bounded work per page: the last delivery of the first 50 only.
            let last = if row >= LAST_DELIVERY_ROWS {
                "See the delivery log".to_string()
            } else {
                match list_deliveries(
                    ctx,
                    account,
                    &w.id,
                    pb::DeliveryState::Unspecified,
                    1,
                    String::new(),
                )
                .await
                {
                    Ok(r) => match r.deliveries.first() {
                        Some(d) => {
                            let mut s = state_name(d.state).to_string();
                            if let Some(a) = d.attempts.last() {
                                let _ = write!(s, ", {}", attempt_text(a));
                            }
                            s
                        }
                        None => "None yet".into(),
                    },
                    Err(f) => f.words,
                }
            };
            let _ = write!(
                body,
                "<tr><td><a href=\"{}/{}\">{}</a></td><td class=\"url\">{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td></tr>",
                base(account),
                esc(&w.id),
                esc(&w.name),
                esc(&w.target_url),
                esc(&w.event_types.join(", ")),
                esc(&status_text(w)),
                esc(&last)
            );
        }
    }
    body.push_str("</tbody></table></div>");
    Reply::Html(200, page("Webhooks", Some(&chrome(ctx, account)), &body))
}

/// What "Test webhook" reported.
pub struct TestOutcome(Result<pb::TestWebhookResponse, Failure>);

fn test_result(t: &TestOutcome) -> String {
    let mut out = String::from(
        "<section class=\"result\" role=\"region\" aria-label=\"Test result\"><h2>Test result</h2>",
    );
    match &t.0 {
        Ok(r) => {
            let _ = write!(
                out,
                "<p class=\"{}\"><strong>{}</strong></p><ul><li>HTTP status: {}</li>\
                 <li>Latency: {} ms</li>",
                if r.success { "ok" } else { "bad" },
                if r.success { "Success" } else { "Failed" },
                if r.status_code == 0 {
                    "No response".to_string()
                } else {
                    r.status_code.to_string()
                },
                r.latency_ms
            );
            if !r.error.is_empty() {
                let _ = write!(out, "<li>Error: {}</li>", esc(&r.error));
            }
            out.push_str("</ul>");
            if !r.response_body.is_empty() {
                let _ = write!(
                    out,
                    "<p>First KiB of the answer:</p><pre>{}</pre>",
                    esc(&r.response_body)
                );
            }
        }
        Err(f) => {
            let _ = write!(
                out,
                "<p class=\"bad\"><strong>Failed</strong></p>{}",
                alert(&f.words)
            );
        }
    }
    out.push_str("</section>");
    out
}

fn field_error(p: &Problems, field: &str) -> (String, String) {
    match p.fields.get(field) {
        Some(msg) => (
            format!(" aria-invalid=\"true\" aria-describedby=\"{field}-error\""),
            format!(
                "<p id=\"{field}-error\" class=\"field-error\">{}</p>",
                esc(msg)
            ),
        ),
        None => (String::new(), String::new()),
    }
}

fn text_input(
    p: &Problems,
    field: &str,
    label: &str,
    value: &str,
    extra: &str,
    hint: &str,
) -> String {
    let (mut attrs, err) = field_error(p, field);
    let hint = if hint.is_empty() {
        String::new()
    } else {
        if attrs.is_empty() {
            attrs = format!(" aria-describedby=\"f-{field}-hint\"");
        } else {
            attrs = attrs.replace(
                &format!("aria-describedby=\"{field}-error\""),
                &format!("aria-describedby=\"{field}-error f-{field}-hint\""),
            );
        }
        format!("<p class=\"hint\" id=\"f-{field}-hint\">{}</p>", esc(hint))
    };
    let kind = if extra.contains("type=") {
        ""
    } else {
        " type=\"text\""
    };
    format!(
        "<div class=\"field\"><label for=\"f-{field}\">{label}</label>{hint}\
         <input id=\"f-{field}\"{kind} name=\"{field}\" value=\"{}\"{extra}{attrs}>{err}</div>",
        esc(value)
    )
}

#[allow(clippy::too_many_arguments)]
fn webhook_form(
    ctx: &Ctx<'_>,
    account: u64,
    action: &str,
    heading: &str,
    editing: bool,
    form: &WebhookForm,
    types: &[pb::EventType],
    problems: &Problems,
    test: Option<&TestOutcome>,
) -> String {
    let mut b = format!("<h1>{}</h1>", esc(heading));
    if !problems.fields.is_empty() {
        b.push_str(&alert("Check the fields marked below."));
    }
    if let Some(g) = &problems.general {
        b.push_str(&alert(g));
    }
    if let Some(t) = test {
        b.push_str(&test_result(t));
    }
    let _ = write!(
        b,
        "<form method=\"post\" action=\"{}\" novalidate>{}",
        esc(action),
        csrf_field(&ctx.session.csrf)
    );
    b.push_str(&text_input(
        problems,
        "name",
        "Name",
        &form.name,
        " maxlength=\"128\" autocomplete=\"off\"",
        "",
    ));
    {
        let (attrs, err) = field_error(problems, "description");
        let _ = write!(
            b,
            "<div class=\"field\"><label for=\"f-description\">Description</label>\
             <textarea id=\"f-description\" name=\"description\" rows=\"3\" maxlength=\"1024\"{attrs}>{}</textarea>{err}</div>",
            esc(&form.description)
        );
    }
    b.push_str(&text_input(
        problems,
        "target_url",
        "Target URL",
        &form.target_url,
        " inputmode=\"url\" autocomplete=\"off\" spellcheck=\"false\"",
        "Where events are POSTed, e.g. https://crm.example.com/hooks",
    ));
    b.push_str("<fieldset><legend>Authentication</legend>");
    for (value, label, hint) in [
        ("none", "None", "No authentication headers."),
        (
            "basic",
            "Basic",
            "HTTP Basic with the username and password below.",
        ),
        (
            "signature",
            "Signature",
            "Standard Webhooks signature; the router generates the secret (Download signature).",
        ),
        (
            "ed25519",
            "Signature, ed25519",
            "Standard Webhooks ed25519 signature; listeners verify with the public key \
             (Download signature), the private key stays in the router. Switching between \
             the two signatures signs with both for 24 hours.",
        ),
    ] {
        let checked = if form.auth == value { " checked" } else { "" };
        let _ = write!(
            b,
            "<div class=\"choice\"><input type=\"radio\" id=\"f-auth-{value}\" name=\"auth\" \
             value=\"{value}\" aria-describedby=\"f-auth-{value}-hint\"{checked}> \
             <label for=\"f-auth-{value}\">{label}</label> \
             <span class=\"hint\" id=\"f-auth-{value}-hint\">{hint}</span></div>"
        );
    }
    b.push_str(&text_input(
        problems,
        "username",
        "Username",
        &form.username,
        " autocomplete=\"off\"",
        "Basic only.",
    ));
    b.push_str(&text_input(
        problems,
        "password",
        "Password",
        "",
        " type=\"password\" autocomplete=\"new-password\"",
        if editing {
            "Basic only. Leave empty to keep the stored password (same username)."
        } else {
            "Basic only."
        },
    ));
    b.push_str("</fieldset>");
    {
        let (attrs, err) = field_error(problems, "event_types");
        let _ = write!(
            b,
            "<fieldset id=\"f-event_types\"{attrs}><legend>Trigger events</legend>{err}"
        );
        for (mode, legend) in [
            (pb::DeliveryMode::Realtime, "Real-time events"),
            (pb::DeliveryMode::Batch, "Batch events"),
        ] {
            let _ = write!(b, "<fieldset class=\"group\"><legend>{legend}</legend>");
            for (i, t) in types
                .iter()
                .enumerate()
                .filter(|(_, t)| t.delivery_mode == mode as i32)
            {
                let checked = if form.event_types.contains(&t.name) {
                    " checked"
                } else {
                    ""
                };
                let _ = write!(
                    b,
                    "<div class=\"choice\"><input type=\"checkbox\" id=\"f-et-{i}\" \
                     name=\"event_types\" value=\"{n}\" aria-describedby=\"f-et-{i}-hint\"{checked}> \
                     <label for=\"f-et-{i}\">{n}</label> \
                     <span class=\"hint\" id=\"f-et-{i}-hint\">{d}</span></div>",
                    n = esc(&t.name),
                    d = esc(&t.description)
                );
            }
            b.push_str("</fieldset>");
        }
        // Subscribed types the catalog no longer has stay checked, so saving
        // the form does not drop them unseen.
        let unknown: Vec<&String> = form
            .event_types
            .iter()
            .filter(|n| !types.iter().any(|t| &t.name == *n))
            .collect();
        if !unknown.is_empty() {
            b.push_str("<fieldset class=\"group\"><legend>Not in the catalog</legend>");
            for (i, n) in unknown.iter().enumerate() {
                let _ = write!(
                    b,
                    "<div class=\"choice\"><input type=\"checkbox\" id=\"f-etx-{i}\" \
                     name=\"event_types\" value=\"{n}\" checked> <label for=\"f-etx-{i}\">{n}</label></div>",
                    n = esc(n)
                );
            }
            b.push_str("</fieldset>");
        }
        b.push_str("</fieldset>");
    }
    let _ = write!(
        b,
        "<div class=\"field choice\"><input type=\"checkbox\" role=\"switch\" id=\"f-active\" \
         name=\"active\" value=\"on\" aria-describedby=\"f-active-hint\"{}> \
         <label for=\"f-active\">Activation status</label> \
         <span class=\"hint\" id=\"f-active-hint\">On: events are delivered. Off: retired, \
         events wait until it is switched on again.</span></div>",
        if form.active { " checked" } else { "" }
    );
    b.push_str(
        "<div class=\"actions\"><button type=\"submit\" name=\"action\" value=\"save\">Save</button> \
         <button type=\"submit\" name=\"action\" value=\"test\">Test webhook</button> \
         <button type=\"submit\" name=\"action\" value=\"cancel\">Cancel</button></div></form>",
    );
    let _ = account;
    b
}

/// The Add Webhook form.
pub async fn new_form(ctx: &Ctx<'_>, account: u64) -> Reply {
    let types = match catalog(ctx).await {
        Ok(t) => t,
        Err(f) => return failure_page(ctx, account, f),
    };
    let action = format!("{}/new", base(account));
    let body = webhook_form(
        ctx,
        account,
        &action,
        "Add Webhook",
        false,
        &WebhookForm::blank(),
        &types,
        &Problems::default(),
        None,
    );
    Reply::Html(200, page("Add Webhook", Some(&chrome(ctx, account)), &body))
}

async fn test_form(ctx: &Ctx<'_>, account: u64, form: &WebhookForm) -> TestOutcome {
    test_target(
        ctx,
        account,
        pb::test_webhook_request::Target::Webhook(form.to_webhook("")),
    )
    .await
}

/// TestWebhook on a saved (`WebhookId`) or an unsaved (`Webhook`) target.
async fn test_target(
    ctx: &Ctx<'_>,
    account: u64,
    target: pb::test_webhook_request::Target,
) -> TestOutcome {
    let req = pb::TestWebhookRequest {
        account_id: account,
        target: Some(target),
        event_name: String::new(),
    };
    TestOutcome(
        ctx.api
            .call(&ctx.session.token, req, |s, r| async move {
                s.test_webhook(r).await
            })
            .await
            .map_err(Failure::from),
    )
}

/// Posted Add Webhook form: save, test or cancel.
pub async fn create(ctx: &Ctx<'_>, account: u64, pairs: &[(String, String)]) -> Reply {
    let form = WebhookForm::from_pairs(pairs);
    let action = field(pairs, "action");
    if action == "cancel" {
        return Reply::Redirect(base(account));
    }
    let types = match catalog(ctx).await {
        Ok(t) => t,
        Err(f) => return failure_page(ctx, account, f),
    };
    let again = |problems: Problems, test: Option<TestOutcome>, status: u16| {
        let body = webhook_form(
            ctx,
            account,
            &format!("{}/new", base(account)),
            "Add Webhook",
            false,
            &form,
            &types,
            &problems,
            test.as_ref(),
        );
        Reply::Html(
            status,
            page("Add Webhook", Some(&chrome(ctx, account)), &body),
        )
    };
    if action == "test" {
        let t = test_form(ctx, account, &form).await;
        return match t.0 {
            Err(f) if f.code == Code::Unauthenticated => Reply::SignedOut(f.words),
            Err(f) if f.field.is_some() => again(Problems::from_failure(f), None, 400),
            _ => again(Problems::default(), Some(t), 200),
        };
    }
    let req = pb::CreateWebhookRequest {
        account_id: account,
        webhook: Some(form.to_webhook("")),
    };
    let created = ctx
        .api
        .call(&ctx.session.token, req, |s, r| async move {
            s.create_webhook(r).await
        })
        .await;
    let w = match created {
        Ok(r) => r.webhook.unwrap_or_default(),
        Err(s) => {
            let f = Failure::from(s);
            if f.code == Code::Unauthenticated {
                return Reply::SignedOut(f.words);
            }
            let status = if f.code == Code::ResourceExhausted {
                429
            } else {
                400
            };
            return again(Problems::from_failure(f), None, status);
        }
    };
    let mut note = "Webhook saved.".to_string();
    if !form.active {
        if let Err(f) = set_active(ctx, account, &w.id, false).await {
            note = format!("Webhook saved, but it could not be retired: {}", f.words);
        }
    }
    ctx.flash(note);
    Reply::Redirect(format!("{}/{}", base(account), w.id))
}

async fn set_active(ctx: &Ctx<'_>, account: u64, id: &str, active: bool) -> Result<(), Failure> {
    if active {
        let req = pb::ActivateWebhookRequest {
            account_id: account,
            webhook_id: id.into(),
        };
        ctx.api
            .call(&ctx.session.token, req, |s, r| async move {
                s.activate_webhook(r).await
            })
            .await?;
    } else {
        let req = pb::RetireWebhookRequest {
            account_id: account,
            webhook_id: id.into(),
        };
        ctx.api
            .call(&ctx.session.token, req, |s, r| async move {
                s.retire_webhook(r).await
            })
            .await?;
    }
    Ok(())
}

/// One webhook: its settings, actions and chart.
pub async fn show(ctx: &Ctx<'_>, account: u64, id: &str, test: Option<TestOutcome>) -> Reply {
    let w = match get_webhook(ctx, account, id).await {
        Ok(w) => w,
        Err(f) => return failure_page(ctx, account, f),
    };
    let here = format!("{}/{}", base(account), esc(id));
    let csrf = &ctx.session.csrf;
    let mut b = format!("<h1>{}</h1>", esc(&w.name));
    if let Some(t) = &test {
        b.push_str(&test_result(t));
    }
    let _ = write!(
        b,
        "<dl class=\"props\"><dt>ID</dt><dd><code>{}</code></dd>\
         <dt>Description</dt><dd>{}</dd><dt>Target URL</dt><dd class=\"url\">{}</dd>\
         <dt>Authentication</dt><dd>{}</dd><dt>Trigger events</dt><dd>{}</dd>\
         <dt>Status</dt><dd>{}</dd><dt>Created</dt><dd>{}</dd><dt>Updated</dt><dd>{}</dd></dl>",
        esc(&w.id),
        if w.description.is_empty() {
            "-".into()
        } else {
            esc(&w.description)
        },
        esc(&w.target_url),
        esc(&auth_text(&w)),
        esc(&w.event_types.join(", ")),
        esc(&status_text(&w)),
        ts(&w.create_time),
        ts(&w.update_time)
    );
    b.push_str("<div class=\"actions\">");
    let _ = write!(b, "<a class=\"button\" href=\"{here}/edit\">Edit</a> ");
    b.push_str(&button_form(
        &format!("{here}/test"),
        csrf,
        "Test webhook",
        "",
    ));
    b.push_str(&button_form(
        &format!("{here}/{}", if w.active { "retire" } else { "activate" }),
        csrf,
        if w.active { "Retire" } else { "Activate" },
        "",
    ));
    let _ = write!(
        b,
        " <a class=\"button\" href=\"{here}/deliveries\">Delivery log</a> \
         <a class=\"button danger\" href=\"{here}/delete\">Delete</a></div>"
    );
    if matches!(
        w.auth.as_ref().and_then(|a| a.method.as_ref()),
        Some(Method::Signature(_))
    ) {
        let _ = write!(
            b,
            "<section aria-labelledby=\"secret-h\"><h2 id=\"secret-h\">Signing secret</h2>\
             <p>{}</p>{}\
             <form class=\"inline\" method=\"post\" action=\"{here}/rotate\">{}\
             <label for=\"f-grace\">Grace period</label> <select id=\"f-grace\" name=\"grace_seconds\">\
             <option value=\"0\">None: drop the old secret at once</option>\
             <option value=\"3600\">1 hour</option><option value=\"86400\" selected>24 hours</option>\
             <option value=\"604800\">7 days</option></select> \
             <button type=\"submit\">Rotate secret</button></form></section>",
            if auth_text(&w).contains("ed25519") {
                "The public key is in the downloaded file; the private key never leaves \
                 the router. Listeners verify the <code>webhook-signature</code> header \
                 with the public key (Standard Webhooks, <code>v1a</code>)."
            } else {
                "The secret is shown only in the downloaded file. Listeners verify the \
                 <code>webhook-signature</code> header with it (Standard Webhooks)."
            },
            button_form(&format!("{here}/signature"), csrf, "Download signature", ""),
            csrf_field(csrf)
        );
    }
    b.push_str(
        "<section aria-labelledby=\"chart-h\"><h2 id=\"chart-h\">Deliveries per minute, last hour</h2>",
    );
    match recent_deliveries(ctx, account, id).await {
        Ok((ds, cut_short)) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            b.push_str(&chart::render(&chart::bucket(&ds, now)));
            if cut_short {
                let _ = write!(
                    b,
                    "<p class=\"hint\">Counted from the newest {} deliveries only: the real \
                     numbers are at least these.</p>",
                    ds.len()
                );
            }
        }
        Err(f) => b.push_str(&alert(&f.words)),
    }
    b.push_str("</section>");
    Reply::Html(200, page(&w.name, Some(&chrome(ctx, account)), &b))
}

/// Deliveries that may have an attempt in the last hour, newest first, and
/// whether the read stopped at its bound (5,000) before reaching older ones.
async fn recent_deliveries(
    ctx: &Ctx<'_>,
    account: u64,
    id: &str,
) -> Result<(Vec<pb::Delivery>, bool), Failure> {
    let cutoff = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
        - 3600;
    let mut out = Vec::new();
    let mut token = String::new();
    for _ in 0..5 {
        let r = list_deliveries(
            ctx,
            account,
            id,
            pb::DeliveryState::Unspecified,
            1000,
            token,
        )
        .await?;
        let mut older = false;
        for d in r.deliveries {
            let last = d
                .attempts
                .last()
                .and_then(|a| a.attempt_time.as_ref())
                .or(d.create_time.as_ref())
                .map(|t| t.seconds)
                .unwrap_or(0);
            let created = d.create_time.as_ref().map(|t| t.seconds).unwrap_or(0);
            // Newest first: a delivery created before the last hour minus the
            // longest retry span has no attempt in the hour, nor do older ones.
            if created < cutoff - ctx.retry_max_age_s && last < cutoff {
                older = true;
            }
            out.push(d);
        }
        if older || r.next_page_token.is_empty() {
            return Ok((out, false));
        }
        token = r.next_page_token;
    }
    Ok((out, true))
}

/// "Test webhook" on a saved webhook.
pub async fn test_saved(ctx: &Ctx<'_>, account: u64, id: &str) -> Reply {
    let t = test_target(
        ctx,
        account,
        pb::test_webhook_request::Target::WebhookId(id.into()),
    )
    .await;
    show(ctx, account, id, Some(t)).await
}

/// The Edit form.
pub async fn edit_form(ctx: &Ctx<'_>, account: u64, id: &str) -> Reply {
    let (w, types) = match (get_webhook(ctx, account, id).await, catalog(ctx).await) {
        (Ok(w), Ok(t)) => (w, t),
        (Err(f), _) | (_, Err(f)) => return failure_page(ctx, account, f),
    };
    let body = webhook_form(
        ctx,
        account,
        &format!("{}/{}/edit", base(account), id),
        "Edit webhook",
        true,
        &WebhookForm::from_webhook(&w),
        &types,
        &Problems::default(),
        None,
    );
    Reply::Html(
        200,
        page("Edit webhook", Some(&chrome(ctx, account)), &body),
    )
}

/// Posted Edit form.
pub async fn update(ctx: &Ctx<'_>, account: u64, id: &str, pairs: &[(String, String)]) -> Reply {
    let form = WebhookForm::from_pairs(pairs);
    let action = field(pairs, "action");
    let here = format!("{}/{}", base(account), id);
    if action == "cancel" {
        return Reply::Redirect(here);
    }
    let (current, types) = match (get_webhook(ctx, account, id).await, catalog(ctx).await) {
        (Ok(w), Ok(t)) => (w, t),
        (Err(f), _) | (_, Err(f)) => return failure_page(ctx, account, f),
    };
    let again = |problems: Problems, test: Option<TestOutcome>, status: u16| {
        let body = webhook_form(
            ctx,
            account,
            &format!("{here}/edit"),
            "Edit webhook",
            true,
            &form,
            &types,
            &problems,
            test.as_ref(),
        );
        Reply::Html(
            status,
            page("Edit webhook", Some(&chrome(ctx, account)), &body),
        )
    };
    if action == "test" {
        // A Basic webhook whose password field is left empty keeps its stored
        // password: with the same username and target, test the saved
        // webhook (the API never hands out the stored password); otherwise
        // test the form, whose missing password the API names.
        let saved_basic_same_user = matches!(
            current.auth.as_ref().and_then(|a| a.method.as_ref()),
            Some(Method::Basic(b)) if b.username == form.username
        );
        let t = if form.auth == "basic"
            && form.password.is_empty()
            && saved_basic_same_user
            && form.target_url == current.target_url
        {
            test_target(
                ctx,
                account,
                pb::test_webhook_request::Target::WebhookId(id.into()),
            )
            .await
        } else {
            test_form(ctx, account, &form).await
        };
        return match t.0 {
            Err(f) if f.code == Code::Unauthenticated => Reply::SignedOut(f.words),
            Err(f) if f.field.is_some() => again(Problems::from_failure(f), None, 400),
            _ => again(Problems::default(), Some(t), 200),
        };
    }
    let req = pb::UpdateWebhookRequest {
        account_id: account,
        webhook: Some(form.to_webhook(id)),
        update_mask: Some(FieldMask {
            paths: ["name", "description", "target_url", "auth", "event_types"]
                .map(String::from)
                .to_vec(),
        }),
    };
    let updated = ctx
        .api
        .call(&ctx.session.token, req, |s, r| async move {
            s.update_webhook(r).await
        })
        .await;
    if let Err(s) = updated {
        let f = Failure::from(s);
        return match f.code {
            Code::Unauthenticated => Reply::SignedOut(f.words),
            Code::InvalidArgument | Code::FailedPrecondition => {
                again(Problems::from_failure(f), None, 400)
            }
            Code::ResourceExhausted => again(Problems::from_failure(f), None, 429),
            Code::Unavailable => again(Problems::from_failure(f), None, 503),
            _ => failure_page(ctx, account, f),
        };
    }
    let mut note = "Webhook saved.".to_string();
    if form.active != current.active {
        if let Err(f) = set_active(ctx, account, id, form.active).await {
            note = format!(
                "Webhook saved, but its activation status did not change: {}",
                f.words
            );
        }
    }
    ctx.flash(note);
    Reply::Redirect(here)
}

/// Retire or Activate.
pub async fn toggle(ctx: &Ctx<'_>, account: u64, id: &str, active: bool) -> Reply {
    match set_active(ctx, account, id, active).await {
        Ok(()) => ctx.flash(if active {
            "Webhook activated: events are delivered again."
        } else {
            "Webhook retired: events wait until it is activated."
        }),
        Err(f) => {
            if let Some(out) = flash_failure(ctx, f) {
                return out;
            }
        }
    }
    Reply::Redirect(format!("{}/{}", base(account), id))
}

/// The GetWebhookSecret answer as a JSON file.
pub async fn download_secret(ctx: &Ctx<'_>, account: u64, id: &str) -> Reply {
    let req = pb::GetWebhookSecretRequest {
        account_id: account,
        webhook_id: id.into(),
    };
    let r = ctx
        .api
        .call(&ctx.session.token, req, |s, r| async move {
            s.get_webhook_secret(r).await
        })
        .await;
    match r {
        Ok(r) => {
            let s = r.secret.unwrap_or_default();
            let time = |t: &Option<prost_types::Timestamp>| {
                t.as_ref().map(|t| {
                    serde_json::Value::String(
                        super::html::utc(t.seconds)
                            .replace(" UTC", "Z")
                            .replacen(' ', "T", 1),
                    )
                })
            };
            let json = serde_json::json!({
                "webhook_id": s.webhook_id,
                "secret": s.secret,
                "algorithm": s.algorithm,
                "signature_header": s.signature_header,
                "id_header": s.id_header,
                "timestamp_header": s.timestamp_header,
                "create_time": time(&s.create_time),
                "previous_secret_expire_time": time(&s.previous_secret_expire_time),
            });
            Reply::Download {
                filename: format!("{id}-signature.json"),
                body: serde_json::to_vec_pretty(&json).unwrap_or_default(),
            }
        }
        Err(s) => flash_failure(ctx, Failure::from(s))
            .unwrap_or_else(|| Reply::Redirect(format!("{}/{}", base(account), id))),
    }
}

/// Rotate secret with the chosen grace period.
pub async fn rotate(ctx: &Ctx<'_>, account: u64, id: &str, pairs: &[(String, String)]) -> Reply {
    let Ok(grace) = field(pairs, "grace_seconds").parse::<u32>() else {
        ctx.flash("Choose a grace period; the secret was not rotated.");
        return Reply::Redirect(format!("{}/{}", base(account), id));
    };
    let req = pb::RotateWebhookSecretRequest {
        account_id: account,
        webhook_id: id.into(),
        grace_period_seconds: grace,
    };
    let r = ctx
        .api
        .call(&ctx.session.token, req, |s, r| async move {
            s.rotate_webhook_secret(r).await
        })
        .await;
    match r {
        Ok(_) if grace == 0 => ctx.flash(
            "Secret rotated; the previous secret no longer signs. Download the new signature.",
        ),
        Ok(_) => ctx.flash(format!(
            "Secret rotated; for {} payloads carry a signature with the previous secret too. \
             Download the new signature.",
            match grace {
                3600 => "1 hour".to_string(),
                86_400 => "24 hours".to_string(),
                604_800 => "7 days".to_string(),
                s => format!("{s} seconds"),
            }
        )),
        Err(s) => {
            if let Some(out) = flash_failure(ctx, Failure::from(s)) {
                return out;
            }
        }
    }
    Reply::Redirect(format!("{}/{}", base(account), id))
}

/// Delete: the confirmation page.
pub async fn delete_confirm(ctx: &Ctx<'_>, account: u64, id: &str) -> Reply {
    let w = match get_webhook(ctx, account, id).await {
        Ok(w) => w,
        Err(f) => return failure_page(ctx, account, f),
    };
    let here = format!("{}/{}", base(account), id);
    let body = format!(
        "<h1>Delete webhook</h1><p>Delete the webhook “{}” ({})? Events still queued for it \
         are dropped and its delivery log goes with it. This cannot be undone.</p>\
         <div class=\"actions\"><form class=\"inline\" method=\"post\" action=\"{here}/delete\">{}\
         <button type=\"submit\" class=\"danger\">Delete</button></form> \
         <form class=\"inline\" method=\"get\" action=\"{here}\"><button type=\"submit\">Cancel</button></form></div>",
        esc(&w.name),
        esc(&w.target_url),
        csrf_field(&ctx.session.csrf)
    );
    Reply::Html(
        200,
        page("Delete webhook", Some(&chrome(ctx, account)), &body),
    )
}

/// Delete, confirmed.
pub async fn delete(ctx: &Ctx<'_>, account: u64, id: &str) -> Reply {
    let req = pb::DeleteWebhookRequest {
        account_id: account,
        webhook_id: id.into(),
    };
    let r = ctx
        .api
        .call(&ctx.session.token, req, |s, r| async move {
            s.delete_webhook(r).await
        })
        .await;
    match r {
        Ok(_) => {
            ctx.flash("Webhook deleted.");
            Reply::Redirect(base(account))
        }
        Err(s) => failure_page(ctx, account, Failure::from(s)),
    }
}

const STATES: [(&str, pb::DeliveryState, &str); 6] = [
    ("", pb::DeliveryState::Unspecified, "All"),
    ("pending", pb::DeliveryState::Pending, "Pending"),
    ("retrying", pb::DeliveryState::Retrying, "Retrying"),
    ("delivered", pb::DeliveryState::Delivered, "Delivered"),
    ("dead", pb::DeliveryState::Dead, "Dead"),
    ("expired", pb::DeliveryState::Expired, "Expired"),
];

/// The delivery log of one webhook, with its live view.
pub async fn deliveries(
    ctx: &Ctx<'_>,
    account: u64,
    id: &str,
    query: &[(String, String)],
) -> Reply {
    let w = match get_webhook(ctx, account, id).await {
        Ok(w) => w,
        Err(f) => return failure_page(ctx, account, f),
    };
    let state_key = field(query, "state");
    let state = STATES
        .iter()
        .find(|(k, _, _)| *k == state_key)
        .map(|s| s.1)
        .unwrap_or(pb::DeliveryState::Unspecified);
    let page_token = field(query, "page").to_string();
    let r = match list_deliveries(ctx, account, id, state, 50, page_token).await {
        Ok(r) => r,
        Err(f) => return failure_page(ctx, account, f),
    };
    let here = format!("{}/{}", base(account), id);
    let csrf = &ctx.session.csrf;
    let mut b = format!(
        "<h1>Delivery log</h1><p>Webhook <a href=\"{here}\">{}</a>, newest first.</p>",
        esc(&w.name)
    );
    let _ = write!(
        b,
        "<form class=\"inline\" method=\"get\" action=\"{here}/deliveries\">\
         <label for=\"f-state\">State</label> <select id=\"f-state\" name=\"state\">"
    );
    for (k, _, label) in STATES {
        let sel = if k == state_key { " selected" } else { "" };
        let _ = write!(b, "<option value=\"{k}\"{sel}>{label}</option>");
    }
    b.push_str("</select> <button type=\"submit\">Filter</button></form> ");
    b.push_str(&button_form(
        &format!("{here}/deliveries/redeliver"),
        csrf,
        "Redeliver all dead",
        &format!(
            "<input type=\"hidden\" name=\"back_state\" value=\"{}\">",
            esc(state_key)
        ),
    ));
    if r.deliveries.is_empty() {
        b.push_str("<p>No deliveries match.</p>");
    } else {
        b.push_str(
            "<div class=\"scroll\"><table><caption>Deliveries</caption><thead><tr>\
             <th scope=\"col\">Delivery</th><th scope=\"col\">State</th><th scope=\"col\">Events</th>\
             <th scope=\"col\">Attempts</th><th scope=\"col\">Next attempt</th>\
             <th scope=\"col\">Action</th></tr></thead><tbody>",
        );
        for d in &r.deliveries {
            let mut attempts = String::from("<ol class=\"attempts\">");
            for a in &d.attempts {
                let _ = write!(
                    attempts,
                    "<li><span class=\"when\">{}</span> {}</li>",
                    ts(&a.attempt_time),
                    esc(&attempt_text(a))
                );
            }
            attempts.push_str("</ol>");
            let redeliver = button_form(
                &format!("{here}/deliveries/redeliver"),
                csrf,
                "Redeliver",
                &format!(
                    "<input type=\"hidden\" name=\"delivery_id\" value=\"{}\">\
                     <input type=\"hidden\" name=\"back_state\" value=\"{}\">",
                    esc(&d.id),
                    esc(state_key)
                ),
            );
            let _ = write!(
                b,
                "<tr><td><code>{}</code><br><span class=\"when\">{}</span></td><td>{}</td>\
                 <td>{}</td><td>{attempts}</td><td>{}</td><td>{redeliver}</td></tr>",
                esc(&d.id),
                ts(&d.create_time),
                state_name(d.state),
                d.event_ids.len(),
                ts(&d.next_attempt_time)
            );
        }
        b.push_str("</tbody></table></div>");
    }
    if !r.next_page_token.is_empty() {
        let _ = write!(
            b,
            "<p><a href=\"?state={}&amp;page={}\">Older deliveries</a></p>",
            esc(state_key),
            esc(&url_escape(&r.next_page_token))
        );
    }
    let _ = write!(
        b,
        "<section aria-labelledby=\"live-h\"><h2 id=\"live-h\">Live</h2>\
         <p id=\"live-status\" class=\"hint\">Finished attempts appear here as they happen \
         (needs JavaScript).</p><ol id=\"live\" aria-live=\"polite\" data-src=\"{here}/deliveries/live\"></ol></section>"
    );
    Reply::Html(200, page("Delivery log", Some(&chrome(ctx, account)), &b))
}

/// Redeliver one delivery, or every dead one.
pub async fn redeliver(ctx: &Ctx<'_>, account: u64, id: &str, pairs: &[(String, String)]) -> Reply {
    let one = field(pairs, "delivery_id");
    let req = pb::RedeliverEventsRequest {
        account_id: account,
        webhook_id: id.into(),
        delivery_ids: if one.is_empty() {
            Vec::new()
        } else {
            vec![one.to_string()]
        },
    };
    let r = ctx
        .api
        .call(&ctx.session.token, req, |s, r| async move {
            s.redeliver_events(r).await
        })
        .await;
    match r {
        Ok(r) if r.requeued_count == 0 => ctx.flash(
            "Requeued 0 deliveries: no dead delivery that was not requeued already \
             (each dead delivery is requeued once by this button; Redeliver on a row sends one again).",
        ),
        Ok(r) if r.requeued_count == 1 => ctx.flash("Requeued 1 delivery."),
        Ok(r) => ctx.flash(format!("Requeued {} deliveries.", r.requeued_count)),
        Err(s) => {
            if let Some(out) = flash_failure(ctx, Failure::from(s)) {
                return out;
            }
        }
    }
    let back = field(pairs, "back_state");
    let state = STATES
        .iter()
        .find(|(k, _, _)| *k == back)
        .map(|s| s.0)
        .unwrap_or("");
    Reply::Redirect(if state.is_empty() {
        format!("{}/{}/deliveries", base(account), id)
    } else {
        format!("{}/{}/deliveries?state={state}", base(account), id)
    })
}

/// The event catalog.
pub async fn event_types(ctx: &Ctx<'_>, account: u64) -> Reply {
    let types = match catalog(ctx).await {
        Ok(t) => t,
        Err(f) => return failure_page(ctx, account, f),
    };
    let mut b = String::from(
        "<h1>Event catalog</h1><p>The event types webhooks can subscribe to. Real-time events are \
         sent as soon as they are published; batch events are collected and sent together.</p>",
    );
    for (mode, title) in [
        (pb::DeliveryMode::Realtime, "Real-time"),
        (pb::DeliveryMode::Batch, "Batch"),
    ] {
        let _ = write!(
            b,
            "<h2>{title}</h2><div class=\"scroll\"><table><caption>{title} events</caption><thead><tr>\
             <th scope=\"col\">Name</th><th scope=\"col\">Description</th></tr></thead><tbody>"
        );
        for t in types.iter().filter(|t| t.delivery_mode == mode as i32) {
            let _ = write!(
                b,
                "<tr><td><code>{}</code></td><td>{}</td></tr>",
                esc(&t.name),
                esc(&t.description)
            );
        }
        b.push_str("</tbody></table></div>");
    }
    Reply::Html(200, page("Event catalog", Some(&chrome(ctx, account)), &b))
}

/// The first value of `key` in form or query pairs, or "".
pub fn field<'a>(pairs: &'a [(String, String)], key: &str) -> &'a str {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

fn url_escape(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_form_round_trips_a_webhook() {
        let f = WebhookForm::from_pairs(&pairs(&[
            ("name", "CRM"),
            ("target_url", " https://crm.example.com/h "),
            ("auth", "basic"),
            ("username", "u"),
            ("password", "p"),
            ("event_types", "A"),
            ("event_types", "B"),
            ("active", "on"),
        ]));
        let w = f.to_webhook("wh_1");
        assert_eq!(w.target_url, "https://crm.example.com/h");
        assert_eq!(w.event_types, ["A", "B"]);
        match w.auth.clone().unwrap().method.unwrap() {
            Method::Basic(b) => assert_eq!((b.username.as_str(), b.password.as_str()), ("u", "p")),
            other => panic!("{other:?}"),
        }
        let back = WebhookForm::from_webhook(&w);
        assert_eq!(back.auth, "basic");
        assert!(
            back.password.is_empty(),
            "passwords are never filled back in"
        );
        assert!(!WebhookForm::from_pairs(&pairs(&[("name", "x")])).active);
    }
}
