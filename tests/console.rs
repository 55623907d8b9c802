//! The web console's security properties against the real binary, over
//! plain HTTP and TLS: headers, cookies, CSRF and origin checks, sign-in
//! errors, account scope, escaping, and secrets only through the download.
//! (tests/console/test_console.py drives the pages in a real browser.)

use std::time::Duration;

use reqwest::header::{HeaderMap, CONTENT_TYPE, COOKIE, LOCATION, ORIGIN, SET_COOKIE};
use reqwest::{redirect, Client, StatusCode};
use webhook_router::console::CSP;
use webhook_router::proto::v1::{GetWebhookRequest, GetWebhookSecretRequest};

use crate::common::process::{write_router_config, RouterProcess};
use crate::common::{create, no_auth, signature_auth, webhook, ADMIN, ADMIN_1011, INGEST};

fn client(ca: Option<&str>) -> Client {
    let mut b = Client::builder()
        .redirect(redirect::Policy::none())
        .timeout(Duration::from_secs(10));
    if let Some(pem) = ca {
        b = b
            .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
            .use_rustls_tls();
    }
    b.build().unwrap()
}

fn start(dir: &std::path::Path, extra: &str) -> (RouterProcess, String) {
    let config = write_router_config(dir, 2_000, "");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[[tokens]]\ntoken = \"{ADMIN_1011}\"\nrole = \"admin\"\naccount_ids = [1011]\n\
         \n[console]\nlisten = \"127.0.0.1:0\"\n{extra}"
    ));
    std::fs::write(&config, text).unwrap();
    let router = RouterProcess::start(&config);
    let addr = router.console_addr();
    (router, addr.to_string())
}

/// The `name=value` of cookie `name` in the answer's Set-Cookie headers,
/// with its attributes.
fn set_cookie(h: &HeaderMap, name: &str) -> Option<String> {
    h.get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_string)
}

fn cookie_value(set_cookie: &str) -> String {
    set_cookie
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_string()
}

/// The value of the first hidden input `name` in `html`.
fn hidden(html: &str, name: &str) -> String {
    let needle = format!("name=\"{name}\" value=\"");
    let i = html
        .find(&needle)
        .unwrap_or_else(|| panic!("no {name} in {html}"))
        + needle.len();
    html[i..].split('"').next().unwrap().to_string()
}

/// Signs in with `token` for `account`: the answer (not followed).
async fn sign_in(c: &Client, base: &str, token: &str, account: &str) -> reqwest::Response {
    let page = c.get(format!("{base}/")).send().await.unwrap();
    let signin = cookie_value(&set_cookie(page.headers(), "wr_console_signin").unwrap());
    let html = page.text().await.unwrap();
    let form = hidden(&html, "signin");
    c.post(format!("{base}/sign-in"))
        .header(COOKIE, format!("wr_console_signin={signin}"))
        .form(&[
            ("signin", form.as_str()),
            ("token", token),
            ("account_id", account),
        ])
        .send()
        .await
        .unwrap()
}

/// A signed-in session: (cookie header value, CSRF token).
async fn session(c: &Client, base: &str, token: &str, account: &str) -> (String, String) {
    let r = sign_in(c, base, token, account).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "{:?}", r.text().await);
    let sid = cookie_value(&set_cookie(r.headers(), "wr_console").unwrap());
    let cookie = format!("wr_console={sid}");
    let html = c
        .get(format!("{base}/accounts/{account}/webhooks"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    (cookie.clone(), hidden(&html, "csrf"))
}

#[tokio::test]
async fn console_pages_are_locked_down_and_act_only_as_the_token_may() {
    let dir = tempfile::tempdir().unwrap();
    let (router, addr) = start(dir.path(), "");
    let base = format!("http://{addr}");
    let c = client(None);

    // Every answer carries the strict policy; the sign-in page sets only its
    // form cookie, HttpOnly and SameSite=Strict, without Secure on plain HTTP.
    let r = c.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let h = r.headers().clone();
    assert_eq!(h["content-security-policy"], CSP);
    assert!(CSP.starts_with("default-src 'none'"));
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["cache-control"], "no-store");
    let signin = set_cookie(&h, "wr_console_signin").expect("sign-in form cookie");
    assert!(
        signin.contains("HttpOnly") && signin.contains("SameSite=Strict"),
        "{signin}"
    );
    assert!(!signin.contains("Secure"), "{signin}");
    assert!(set_cookie(&h, "wr_console").is_none());
    let css = c
        .get(format!("{base}/static/console.css"))
        .send()
        .await
        .unwrap();
    assert_eq!(css.headers()["content-security-policy"], CSP);
    assert!(css.headers()[CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/css"));

    // Sign-in: a forged form, an unknown token, an ingest token, another
    // account's token are refused, each in words.
    let forged = c
        .post(format!("{base}/sign-in"))
        .form(&[("signin", "x"), ("token", ADMIN), ("account_id", "1010")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    assert!(set_cookie(forged.headers(), "wr_console").is_none());
    let unknown = sign_in(&c, &base, "no-such-token-at-all-000", "1010").await;
    assert_eq!(unknown.status(), StatusCode::FORBIDDEN);
    assert!(unknown
        .text()
        .await
        .unwrap()
        .contains("initial-credentials.toml"));
    let ingest = sign_in(&c, &base, INGEST, "1010").await;
    assert_eq!(ingest.status(), StatusCode::FORBIDDEN);
    assert!(set_cookie(ingest.headers(), "wr_console").is_none());
    assert!(ingest.text().await.unwrap().contains("Not allowed:"));
    let scoped = sign_in(&c, &base, ADMIN_1011, "1010").await;
    assert_eq!(scoped.status(), StatusCode::FORBIDDEN);
    assert!(scoped.text().await.unwrap().contains("Not allowed:"));

    // A good sign-in: session cookie, redirect without the token in it.
    let ok = sign_in(&c, &base, ADMIN, "1010").await;
    assert_eq!(ok.status(), StatusCode::SEE_OTHER);
    let location = ok.headers()[LOCATION].to_str().unwrap().to_string();
    assert_eq!(location, "/accounts/1010/webhooks");
    let sid = set_cookie(ok.headers(), "wr_console").unwrap();
    assert!(
        sid.contains("HttpOnly") && sid.contains("SameSite=Strict"),
        "{sid}"
    );
    assert!(
        !sid.contains("Max-Age") && !sid.contains("Expires"),
        "a browser-session cookie: {sid}"
    );
    assert!(!sid.contains(ADMIN));
    let (cookie, csrf) = session(&c, &base, ADMIN, "1010").await;

    // A signature webhook with markup in its name: escaped on every page, and
    // its secret on none of them, only in the download.
    let mut admin = router.admin().await;
    let hook = create(
        &mut admin,
        1010,
        webhook(
            "<script>alert(1)</script>",
            "http://127.0.0.1:9/hooks",
            &["COURSE_ENROLLMENT"],
            signature_auth(),
        ),
    )
    .await;
    let secret = admin
        .get_webhook_secret(GetWebhookSecretRequest {
            account_id: 1010,
            webhook_id: hook.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .secret
        .unwrap()
        .secret;
    let here = format!("{base}/accounts/1010/webhooks/{}", hook.id);
    for url in [
        format!("{base}/accounts/1010/webhooks"),
        here.clone(),
        format!("{here}/edit"),
        format!("{here}/deliveries"),
        format!("{here}/delete"),
    ] {
        let r = c.get(&url).header(COOKIE, &cookie).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{url}");
        let html = r.text().await.unwrap();
        assert!(
            !html.contains("<script>alert(1)"),
            "{url} does not escape the name"
        );
        if !url.ends_with("/deliveries") {
            assert!(
                html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
                "{url} shows the name, escaped"
            );
        }
        assert!(!html.contains(&secret), "{url} shows the secret");
        assert!(!html.contains(ADMIN), "{url} shows the token");
    }
    let download = c
        .post(format!("{here}/signature"))
        .header(COOKIE, &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), StatusCode::OK);
    assert!(download.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("attachment;"));
    let json: serde_json::Value = serde_json::from_slice(&download.bytes().await.unwrap()).unwrap();
    assert_eq!(json["secret"], secret.as_str());
    assert_eq!(json["webhook_id"], hook.id.as_str());

    // Changes need the session's CSRF token and a same-origin request.
    let is_active = |admin: &mut crate::common::Admin| {
        let mut admin = admin.clone();
        let id = hook.id.clone();
        async move {
            admin
                .get_webhook(GetWebhookRequest {
                    account_id: 1010,
                    webhook_id: id,
                })
                .await
                .unwrap()
                .into_inner()
                .webhook
                .unwrap()
                .active
        }
    };
    let no_csrf = c
        .post(format!("{here}/retire"))
        .header(COOKIE, &cookie)
        .form(&[("csrf", "wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(no_csrf.status(), StatusCode::FORBIDDEN);
    let cross_site = c
        .post(format!("{here}/retire"))
        .header(COOKIE, &cookie)
        .header(ORIGIN, "http://evil.example")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site.status(), StatusCode::FORBIDDEN);
    assert!(is_active(&mut admin).await, "refused posts changed nothing");
    let retire = c
        .post(format!("{here}/retire"))
        .header(COOKIE, &cookie)
        .header(ORIGIN, &base)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(retire.status(), StatusCode::SEE_OTHER);
    assert!(!is_active(&mut admin).await, "the console retired it");

    // An account the token does not cover: the page says so, lists nothing.
    let other = create(
        &mut admin,
        1011,
        webhook(
            "Account 1011 only",
            "http://127.0.0.1:9/h",
            &["COURSE_ENROLLMENT"],
            no_auth(),
        ),
    )
    .await;
    let (cookie_1011, _) = session(&c, &base, ADMIN_1011, "1011").await;
    let denied = c
        .get(format!("{base}/accounts/1010/webhooks"))
        .header(COOKIE, &cookie_1011)
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    let html = denied.text().await.unwrap();
    assert!(
        html.contains("Not allowed:") && !html.contains(&hook.id),
        "{html}"
    );
    let own = c
        .get(format!("{base}/accounts/1011/webhooks"))
        .header(COOKIE, &cookie_1011)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(own.contains(&other.id) && !own.contains(&hook.id));

    // The live view streams while signed in and ends once the session does.
    let streaming = Client::builder()
        .redirect(redirect::Policy::none())
        .build()
        .unwrap();
    let mut live = streaming
        .get(format!("{here}/deliveries/live"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), StatusCode::OK);
    assert_eq!(live.headers()[CONTENT_TYPE], "text/event-stream");

    // Sign-out ends the session: the old cookie is sent back to sign-in.
    let out = c
        .post(format!("{base}/sign-out"))
        .header(COOKIE, &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    let after = c
        .get(format!("{base}/accounts/1010/webhooks"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), StatusCode::SEE_OTHER);
    assert_eq!(after.headers()[LOCATION], "/");
    let post_after = c
        .post(format!("{here}/activate"))
        .header(COOKIE, &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(post_after.status(), StatusCode::UNAUTHORIZED);
    assert!(!is_active(&mut admin).await);
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        while live.chunk().await.unwrap().is_some() {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the live view kept streaming 15 s after sign-out"
    );

    // Oversized and non-form bodies are refused before any work.
    let big = c
        .post(format!("{base}/sign-in"))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        // Just past the 64 KiB limit: small enough that the client finishes
        // writing before the refusal closes the connection.
        .body(vec![b'a'; 64 * 1024 + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let json_body = c
        .post(format!("{base}/sign-in"))
        .header(CONTENT_TYPE, "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(json_body.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    drop(router);
}

#[tokio::test]
async fn the_console_uses_the_tls_certificate_and_secure_cookies() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("generate a certificate");
    let cert = ck.cert.pem();
    std::fs::write(dir.path().join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let tls = format!(
        "\n[tls]\ncert_path = \"{}\"\nkey_path = \"{}\"\n",
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display()
    );
    let (_router, addr) = start(dir.path(), &tls);
    let c = client(Some(&cert));
    let base = format!("https://{addr}");
    let r = c.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().contains_key("strict-transport-security"));
    // Over TLS the cookies are `__Host-` cookies, which browsers take only
    // over HTTPS from this host.
    let signin = set_cookie(r.headers(), "__Host-wr_console_signin").unwrap();
    assert!(signin.contains("Secure"), "{signin}");
    let signin_value = cookie_value(&signin);
    let html = r.text().await.unwrap();
    let ok = c
        .post(format!("{base}/sign-in"))
        .header(COOKIE, format!("__Host-wr_console_signin={signin_value}"))
        .form(&[
            ("signin", hidden(&html, "signin").as_str()),
            ("token", ADMIN),
            ("account_id", "1010"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::SEE_OTHER);
    let sid = set_cookie(ok.headers(), "__Host-wr_console").unwrap();
    assert!(sid.contains("Secure") && sid.contains("HttpOnly"), "{sid}");
    // Plain HTTP to the TLS listener gets no page.
    let plain = client(None).get(format!("http://{addr}/")).send().await;
    assert!(
        plain.map(|r| r.status() != StatusCode::OK).unwrap_or(true),
        "plain HTTP must not be served by the TLS console"
    );
}
