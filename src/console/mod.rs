//! The web console: the WebhookAdmin screens in a browser, on their own
//! listener (`[console] listen`), served by the router itself.
//!
//! Pages are rendered on the server and every action calls the WebhookAdmin
//! handlers in process with the signed-in admin's token ([`api::AdminApi`]),
//! so the console can do exactly what that token may do over gRPC, no more.
//! Server-side pages rather than gRPC-Web: the token never reaches browser
//! JavaScript (it stays in this process's memory for the browser session),
//! the pages work with scripts off (only the live delivery view needs
//! them), and nothing needs a JavaScript toolchain to build.
//!
//! Security: a session cookie (random id, `HttpOnly`, `SameSite=Strict`,
//! `Secure` over TLS, no expiry so it ends with the browser session); a CSRF
//! token in every form and a same-origin check on every POST; a strict
//! Content-Security-Policy (`default-src 'none'`, scripts and styles only
//! from the console itself); no secret is ever shown, only downloaded.
//!
//! - [`session`]: browser sessions and cookies.
//! - [`api`]: calling WebhookAdmin as a token; errors in words.
//! - [`pages`]: the pages and actions.
//! - [`html`]: escaping and the page layout.
//! - [`chart`]: the deliveries-per-minute chart.

pub mod api;
pub mod chart;
pub mod html;
pub mod pages;
pub mod session;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{header, HeaderValue, Method, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::proto::v1::webhook_admin_server::WebhookAdmin;
use crate::proto::v1::{self as pb};

use api::{AdminApi, Failure};
use html::{alert, esc, page};
use session::{Session, Sessions, COOKIE, SIGNIN_COOKIE};

/// Over TLS the cookies carry the `__Host-` prefix: the browser then takes
/// them only from this host over HTTPS, with `Path=/` and no `Domain`, so a
/// sibling subdomain cannot plant one.
fn cookie_name(console: &Console, name: &'static str) -> String {
    if console.tls {
        format!("__Host-{name}")
    } else {
        name.to_string()
    }
}

/// Largest form body accepted.
const MAX_FORM_BYTES: usize = 64 * 1024;

const CSS: &str = include_str!("static/console.css");
const JS: &str = include_str!("static/console.js");

/// The Content-Security-Policy of every answer.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Everything the console's requests share.
pub struct Console {
    api: AdminApi,
    sessions: Arc<Sessions>,
    tls: bool,
    max_webhooks: u32,
    /// How far back a delivery can have had an attempt
    /// (`delivery.retry_max_age_ms`), for the chart's reads.
    retry_max_age_s: i64,
    /// Open connections allowed at once.
    connections: Arc<tokio::sync::Semaphore>,
}

/// Most console connections open at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
/// How long a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the live view checks that its session is still signed in.
const LIVE_CHECK: Duration = Duration::from_secs(5);

impl Console {
    /// A console calling `api`, with sessions as `config.console` says.
    pub fn new(api: AdminApi, config: &crate::config::Config) -> Console {
        Console {
            api,
            sessions: Arc::new(Sessions::new(
                Duration::from_millis(config.console.session_idle_timeout_ms),
                config.console.max_sessions as usize,
            )),
            tls: config.console.uses_tls(&config.tls),
            max_webhooks: config.limits.max_webhooks_per_account,
            retry_max_age_s: (config.delivery.retry_max_age_ms / 1000) as i64,
            connections: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        }
    }
}

/// One signed-in request: what pages get.
pub struct Ctx<'a> {
    api: &'a AdminApi,
    sessions: &'a Arc<Sessions>,
    sid: String,
    session: Session,
    max_webhooks: u32,
    retry_max_age_s: i64,
}

impl Ctx<'_> {
    fn flash(&self, message: impl Into<String>) {
        self.sessions.flash(&self.sid, message);
    }

    fn remember_account(&self, account: u64) {
        self.sessions.set_account(&self.sid, account);
    }

    fn sessions_handle(&self) -> Arc<Sessions> {
        self.sessions.clone()
    }
}

/// What a page handler answers.
pub enum Reply {
    /// A page with a status code.
    Html(u16, String),
    /// 303 See Other to a path of the console.
    Redirect(String),
    /// A file to save (`Content-Disposition: attachment`).
    Download {
        /// Suggested file name.
        filename: String,
        /// Its content (JSON).
        body: Vec<u8>,
    },
    /// The token is no longer accepted: end the session, back to sign-in.
    SignedOut(String),
}

/// TLS for the console listener: the `[tls]` certificate and key.
pub fn tls_acceptor(config: &crate::config::Config) -> Result<Option<tokio_rustls::TlsAcceptor>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    if !config.console.uses_tls(&config.tls) {
        return Ok(None);
    }
    let startup = |key: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
        Error::Startup(format!(
            "console.tls: tls.{key}: cannot read {}: {e}",
            path.display()
        ))
    };
    let certs = CertificateDer::pem_file_iter(&config.tls.cert_path)
        .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| startup("cert_path", &config.tls.cert_path, &e))?;
    let key = PrivateKeyDer::from_pem_file(&config.tls.key_path)
        .map_err(|e| startup("key_path", &config.tls.key_path, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Startup(format!("console.tls: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Startup(format!("console.tls: {e}")))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls))))
}

/// Serves the console on `listener` until `shutdown` turns true.
pub async fn serve(
    console: Arc<Console>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, tls = tls.is_some(), "console listening");
        if tls.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "the console listens beyond loopback without TLS: admin tokens and session \
                 cookies cross the network in clear; configure [tls] (console.tls follows it)"
            );
        }
    }
    loop {
        let permit = tokio::select! {
            p = console.connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "console accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
        };
        let _ = stream.set_nodelay(true);
        let console = console.clone();
        let tls = tls.clone();
        let conn_shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = {
                let shutdown = conn_shutdown.clone();
                service_fn(move |req| {
                    let console = console.clone();
                    let shutdown = shutdown.clone();
                    async move { Ok::<_, Infallible>(handle(&console, req, shutdown).await) }
                })
            };
            match tls {
                Some(acceptor) => {
                    let accepted =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                            .await;
                    if let Ok(Ok(s)) = accepted {
                        serve_conn(TokioIo::new(s), svc, conn_shutdown).await;
                    }
                }
                None => serve_conn(TokioIo::new(stream), svc, conn_shutdown).await,
            }
        });
    }
}

async fn serve_conn<I, S>(io: I, svc: S, mut shutdown: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = Body> + Send,
    S::Future: Send,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(io, svc);
    tokio::select! {
        _ = conn => {}
        _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {}
    }
}

/// The request's parts the console looks at.
struct Incoming_ {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    cookies: String,
    host: String,
    origin: Option<String>,
    fetch_site: Option<String>,
}

async fn handle(
    console: &Console,
    req: hyper::Request<Incoming>,
    shutdown: watch::Receiver<bool>,
) -> hyper::Response<Body> {
    let (parts, body) = req.into_parts();
    let text = |name: header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let inc = Incoming_ {
        method: parts.method.clone(),
        path: parts.uri.path().to_string(),
        query: parts
            .uri
            .query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default(),
        cookies: text(header::COOKIE).unwrap_or_default(),
        host: text(header::HOST).unwrap_or_default(),
        origin: text(header::ORIGIN),
        fetch_site: parts
            .headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    let form = if inc.method == Method::POST {
        let is_form = text(header::CONTENT_TYPE)
            .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
        if !is_form {
            return finish(
                console,
                plain(StatusCode::UNSUPPORTED_MEDIA_TYPE, "forms only\n"),
            );
        }
        match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_FORM_BYTES).collect()).await
        {
            Ok(Ok(b)) => url::form_urlencoded::parse(&b.to_bytes())
                .into_owned()
                .collect::<Vec<(String, String)>>(),
            Err(_) => {
                return finish(
                    console,
                    plain(
                        StatusCode::REQUEST_TIMEOUT,
                        "the form took too long to arrive\n",
                    ),
                )
            }
            Ok(Err(_)) => {
                return finish(
                    console,
                    plain(StatusCode::PAYLOAD_TOO_LARGE, "form too large\n"),
                )
            }
        }
    } else {
        Vec::new()
    };
    let resp = route(console, &inc, &form, shutdown).await;
    finish(console, resp)
}

/// Adds the headers every answer carries.
fn finish(console: &Console, mut resp: hyper::Response<Body>) -> hyper::Response<Body> {
    let h = resp.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if console.tls {
        h.insert(
            "strict-transport-security",
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    resp
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed_unsync()
}

fn plain(status: StatusCode, text: &'static str) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(full(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn html_response(status: u16, body: String) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(full(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

fn redirect(to: &str) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(full(""));
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn set_cookie(r: &mut hyper::Response<Body>, console: &Console, name: &'static str, value: &str) {
    let name = cookie_name(console, name);
    let secure = if console.tls { "; Secure" } else { "" };
    let clear = if value.is_empty() { "; Max-Age=0" } else { "" };
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict{secure}{clear}"
    )) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// Whether a POST comes from the console's own pages: same origin when the
/// browser says where it comes from.
fn same_origin(console: &Console, inc: &Incoming_) -> bool {
    if let Some(site) = &inc.fetch_site {
        if site != "same-origin" && site != "none" {
            return false;
        }
    }
    match &inc.origin {
        None => true,
        Some(o) => {
            let scheme = if console.tls { "https" } else { "http" };
            *o == format!("{scheme}://{}", inc.host)
        }
    }
}

fn forbidden(text: &str) -> hyper::Response<Body> {
    html_response(
        403,
        page(
            "Refused",
            None,
            &format!(
                "<h1>Refused</h1>{}<p><a href=\"/\">Back to the console</a></p>",
                alert(text)
            ),
        ),
    )
}

async fn route(
    console: &Console,
    inc: &Incoming_,
    form: &[(String, String)],
    shutdown: watch::Receiver<bool>,
) -> hyper::Response<Body> {
    let get = inc.method == Method::GET || inc.method == Method::HEAD;
    let post = inc.method == Method::POST;
    match (inc.path.as_str(), get, post) {
        ("/static/console.css", true, _) => return asset(CSS, "text/css; charset=utf-8"),
        ("/static/console.js", true, _) => return asset(JS, "text/javascript; charset=utf-8"),
        ("/favicon.ico", true, _) => return plain(StatusCode::NOT_FOUND, "none\n"),
        _ => {}
    }
    if post && !same_origin(console, inc) {
        return forbidden("This form did not come from the console's own pages.");
    }
    let sid = session::cookie(&inc.cookies, &cookie_name(console, COOKIE))
        .unwrap_or("")
        .to_string();
    let session = if sid.is_empty() {
        None
    } else {
        console.sessions.get(&sid, get)
    };
    match (inc.path.as_str(), session) {
        ("/", None) if get => sign_in_page(console, None, 200, ""),
        ("/", Some(s)) if get => redirect(&format!("/accounts/{}/webhooks", s.account)),
        ("/sign-in", _) if post => sign_in(console, inc, form).await,
        ("/sign-out", Some(s)) if post => {
            if !session::same_secret(pages::field(form, "csrf"), &s.csrf) {
                return forbidden("The form's security token does not match; reload the page.");
            }
            console.sessions.remove(&sid);
            let mut r = redirect("/");
            set_cookie(&mut r, console, COOKIE, "");
            r
        }
        (_, None) if get => redirect("/"),
        (_, None) => sign_in_page(
            console,
            Some("Your session has ended; sign in again."),
            401,
            "",
        ),
        (path, Some(session)) => {
            if post && !session::same_secret(pages::field(form, "csrf"), &session.csrf) {
                return forbidden("The form's security token does not match; reload the page.");
            }
            let ctx = Ctx {
                api: &console.api,
                sessions: &console.sessions,
                sid: sid.clone(),
                session,
                max_webhooks: console.max_webhooks,
                retry_max_age_s: console.retry_max_age_s,
            };
            let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
            let reply = match (segments.as_slice(), get, post) {
                (["accounts"], true, _) => {
                    match pages::field(&inc.query, "account_id").trim().parse::<u64>() {
                        Ok(a) => Reply::Redirect(format!("/accounts/{a}/webhooks")),
                        Err(_) => {
                            Reply::Redirect(format!("/accounts/{}/webhooks", ctx.session.account))
                        }
                    }
                }
                (["accounts", a, rest @ ..], _, _) => {
                    let Ok(account) = a.parse::<u64>() else {
                        return not_found(&ctx);
                    };
                    match (rest, get, post) {
                        (["webhooks"], true, _) => pages::list(&ctx, account).await,
                        (["event-types"], true, _) => pages::event_types(&ctx, account).await,
                        (["webhooks", "new"], true, _) => pages::new_form(&ctx, account).await,
                        (["webhooks", "new"], _, true) => pages::create(&ctx, account, form).await,
                        (["webhooks", id, more @ ..], _, _) if valid_id(id) => {
                            match (more, get, post) {
                                ([], true, _) => pages::show(&ctx, account, id, None).await,
                                (["edit"], true, _) => pages::edit_form(&ctx, account, id).await,
                                (["edit"], _, true) => pages::update(&ctx, account, id, form).await,
                                (["test"], _, true) => pages::test_saved(&ctx, account, id).await,
                                (["retire"], _, true) => {
                                    pages::toggle(&ctx, account, id, false).await
                                }
                                (["activate"], _, true) => {
                                    pages::toggle(&ctx, account, id, true).await
                                }
                                (["signature"], _, true) => {
                                    pages::download_secret(&ctx, account, id).await
                                }
                                (["rotate"], _, true) => {
                                    pages::rotate(&ctx, account, id, form).await
                                }
                                (["delete"], true, _) => {
                                    pages::delete_confirm(&ctx, account, id).await
                                }
                                (["delete"], _, true) => pages::delete(&ctx, account, id).await,
                                (["deliveries"], true, _) => {
                                    pages::deliveries(&ctx, account, id, &inc.query).await
                                }
                                (["deliveries", "redeliver"], _, true) => {
                                    pages::redeliver(&ctx, account, id, form).await
                                }
                                (["deliveries", "live"], true, _) => {
                                    return live(&ctx, account, id, shutdown).await
                                }
                                _ => return not_found(&ctx),
                            }
                        }
                        _ => return not_found(&ctx),
                    }
                }
                _ => return not_found(&ctx),
            };
            match reply {
                Reply::Html(status, body) => html_response(status, body),
                Reply::Redirect(to) => redirect(&to),
                Reply::Download { filename, body } => {
                    let mut r = hyper::Response::new(full(body));
                    let h = r.headers_mut();
                    h.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    if let Ok(v) =
                        HeaderValue::from_str(&format!("attachment; filename=\"{filename}\""))
                    {
                        h.insert(header::CONTENT_DISPOSITION, v);
                    }
                    r
                }
                Reply::SignedOut(words) => {
                    console.sessions.remove(&sid);
                    let mut r = sign_in_page(console, Some(&words), 401, "");
                    set_cookie(&mut r, console, COOKIE, "");
                    r
                }
            }
        }
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn not_found(ctx: &Ctx<'_>) -> hyper::Response<Body> {
    let chrome = html::Chrome {
        account: ctx.session.account,
        csrf: &ctx.session.csrf,
        flash: None,
    };
    html_response(
        404,
        page(
            "Not found",
            Some(&chrome),
            "<h1>Not found</h1><p>There is no such page in the console.</p>",
        ),
    )
}

fn asset(text: &'static str, kind: &'static str) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(full(text));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=300"),
    );
    r
}

/// The sign-in page; sets the cookie its form is checked against.
fn sign_in_page(
    console: &Console,
    error: Option<&str>,
    status: u16,
    account: &str,
) -> hyper::Response<Body> {
    let token = session::random_id();
    let mut body = String::from("<h1>Sign in</h1>");
    if let Some(e) = error {
        body.push_str(&alert(e));
    }
    body.push_str(&format!(
        "<p>Sign in with an admin token (from <code>[[tokens]]</code> in the router's config, or \
         <code>initial-credentials.toml</code> in its data folder after the first start). \
         The token is kept by the router for this browser session only.</p>\
         <form method=\"post\" action=\"/sign-in\"><input type=\"hidden\" name=\"signin\" value=\"{token}\">\
         <div class=\"field\"><label for=\"f-token\">Admin token</label>\
         <input id=\"f-token\" name=\"token\" type=\"password\" autocomplete=\"off\" required></div>\
         <div class=\"field\"><label for=\"f-account\">Account ID</label>\
         <input id=\"f-account\" name=\"account_id\" inputmode=\"numeric\" value=\"{}\" required></div>\
         <div class=\"actions\"><button type=\"submit\">Sign in</button></div></form>",
        esc(account)
    ));
    let mut r = html_response(status, page("Sign in", None, &body));
    set_cookie(&mut r, console, SIGNIN_COOKIE, &token);
    r
}

async fn sign_in(
    console: &Console,
    inc: &Incoming_,
    form: &[(String, String)],
) -> hyper::Response<Body> {
    let account_text = pages::field(form, "account_id").trim().to_string();
    let expected =
        session::cookie(&inc.cookies, &cookie_name(console, SIGNIN_COOKIE)).unwrap_or("");
    if expected.is_empty() || !session::same_secret(pages::field(form, "signin"), expected) {
        return sign_in_page(
            console,
            Some("The sign-in form expired; try again."),
            403,
            &account_text,
        );
    }
    let token = pages::field(form, "token").trim().to_string();
    if token.is_empty() {
        return sign_in_page(console, Some("Enter an admin token."), 400, &account_text);
    }
    let Ok(account) = account_text.parse::<u64>() else {
        return sign_in_page(
            console,
            Some("Account ID must be a number, e.g. 1."),
            400,
            &account_text,
        );
    };
    let probe = pb::ListWebhooksRequest {
        account_id: account,
        page_size: 1,
        page_token: String::new(),
    };
    let checked = console
        .api
        .call(
            &token,
            probe,
            |s, r| async move { s.list_webhooks(r).await },
        )
        .await;
    if let Err(s) = checked {
        let f = Failure::from(s);
        let words = match f.code {
            tonic::Code::Unauthenticated => {
                "That token is not known to this router. Admin tokens are in [[tokens]] of its \
                 config, or in initial-credentials.toml in its data folder after the first start."
                    .to_string()
            }
            _ => f.words,
        };
        return sign_in_page(console, Some(&words), 403, &account_text);
    }
    // The browser's earlier session (if any) ends: one browser, one token.
    if let Some(old) = session::cookie(&inc.cookies, &cookie_name(console, COOKIE)) {
        console.sessions.remove(old);
    }
    let sid = console.sessions.create(token, account);
    let mut r = redirect(&format!("/accounts/{account}/webhooks"));
    set_cookie(&mut r, console, COOKIE, &sid);
    set_cookie(&mut r, console, SIGNIN_COOKIE, "");
    r
}

/// Server-sent events of WatchDeliveries for one webhook, until the browser
/// leaves, the stream ends or the router stops.
async fn live(
    ctx: &Ctx<'_>,
    account: u64,
    id: &str,
    shutdown: watch::Receiver<bool>,
) -> hyper::Response<Body> {
    let req = pb::WatchDeliveriesRequest {
        account_id: account,
        webhook_id: id.into(),
    };
    let stream = match ctx
        .api
        .call(&ctx.session.token, req, |s, r| async move {
            s.watch_deliveries(r).await
        })
        .await
    {
        Ok(s) => s,
        Err(s) => {
            let f = Failure::from(s);
            let mut r = plain(StatusCode::FORBIDDEN, "");
            *r.body_mut() = full(format!("event: failure\ndata: {}\n\n", json_line(&f.words)));
            *r.status_mut() = StatusCode::OK;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            return r;
        }
    };
    // One message per finished attempt; a comment every LIVE_CHECK keeps
    // proxies from closing a quiet stream and checks that the session is
    // still signed in. Ends when the session ends, WatchDeliveries ends, the
    // router stops, or the browser goes away (hyper drops the body).
    let sessions = ctx.sessions_handle();
    let sid = ctx.sid.clone();
    let mut tick = tokio::time::interval(LIVE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let frames = futures::stream::unfold(
        (stream, tick, sessions, sid, shutdown),
        |(mut stream, mut tick, sessions, sid, mut shutdown)| async move {
            let text = tokio::select! {
                item = stream.next() => match item? {
                    Ok(m) => match m.delivery {
                        Some(d) => {
                            let a = d.attempts.last();
                            format!(
                                "data: {}\n\n",
                                serde_json::json!({
                                    "id": d.id,
                                    "state": pages::state_name(d.state),
                                    "status": a.map(|a| a.status_code).unwrap_or(0),
                                    "latency_ms": a.map(|a| a.latency_ms).unwrap_or(0),
                                    "error": a.map(|a| a.error.clone()).unwrap_or_default(),
                                    "time": a.and_then(|a| a.attempt_time.as_ref()).map(|t| html::utc(t.seconds)),
                                })
                            )
                        }
                        None => format!("event: missed\ndata: {}\n\n", m.missed_count),
                    },
                    Err(s) => format!(
                        "event: failure\ndata: {}\n\n",
                        json_line(&Failure::from(s).words)
                    ),
                },
                _ = tick.tick() => {
                    if !sessions.contains(&sid) {
                        return None;
                    }
                    ": keep-alive\n\n".to_string()
                }
                _ = shutdown.wait_for(|s| *s) => return None,
            };
            let frame = Ok::<_, Infallible>(Frame::data(Bytes::from(text)));
            Some((frame, (stream, tick, sessions, sid, shutdown)))
        },
    );
    let mut r = hyper::Response::new(BodyExt::boxed_unsync(StreamBody::new(frames)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r
}

fn json_line(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}
