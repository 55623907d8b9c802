//! HTML building blocks: escaping, the page layout, time formatting. Every
//! value that came from a request or the store goes through [`esc`].

use std::fmt::Write;

/// `s` escaped for HTML text and double-quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// What the header of a signed-in page shows.
pub struct Chrome<'a> {
    /// The account whose pages these are.
    pub account: u64,
    /// The session's CSRF token (for the sign-out form).
    pub csrf: &'a str,
    /// A one-time message from the last action.
    pub flash: Option<&'a str>,
}

/// A whole page: `title` in the tab, `body` in `<main>`.
pub fn page(title: &str, chrome: Option<&Chrome<'_>>, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 2048);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · webhook-router</title>\
         <link rel=\"stylesheet\" href=\"/static/console.css\">\
         <script src=\"/static/console.js\" defer></script></head><body>\
         <a class=\"skip\" href=\"#main\">Skip to content</a><header>\
         <span class=\"brand\">webhook-router</span>",
        esc(title)
    );
    if let Some(c) = chrome {
        let a = c.account;
        let _ = write!(
            out,
            "<nav aria-label=\"Main\"><a href=\"/accounts/{a}/webhooks\">Webhooks</a> \
             <a href=\"/accounts/{a}/event-types\">Event catalog</a></nav>\
             <span class=\"account\">Account {a}</span>\
             <form class=\"inline\" method=\"get\" action=\"/accounts\">\
             <label for=\"switch-account\">Switch account</label> \
             <input id=\"switch-account\" name=\"account_id\" inputmode=\"numeric\" \
             size=\"8\" value=\"{a}\"> <button type=\"submit\">Open</button></form>\
             <form class=\"inline\" method=\"post\" action=\"/sign-out\">{}\
             <button type=\"submit\">Sign out</button></form>",
            csrf_field(c.csrf)
        );
    }
    out.push_str("</header><main id=\"main\" tabindex=\"-1\">");
    if let Some(msg) = chrome.and_then(|c| c.flash) {
        let _ = write!(out, "<p class=\"flash\" role=\"status\">{}</p>", esc(msg));
    }
    out.push_str(body);
    out.push_str("</main></body></html>\n");
    out
}

/// The hidden input every form carries.
pub fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(csrf)
    )
}

/// An error box (`role=alert`).
pub fn alert(words: &str) -> String {
    format!("<p class=\"alert\" role=\"alert\">{}</p>", esc(words))
}

/// A small form posting to `action` with one button.
pub fn button_form(action: &str, csrf: &str, label: &str, extra: &str) -> String {
    format!(
        "<form class=\"inline\" method=\"post\" action=\"{}\">{}{extra}\
         <button type=\"submit\">{}</button></form>",
        esc(action),
        csrf_field(csrf),
        esc(label)
    )
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// A protobuf timestamp as [`utc`], or `-` when unset.
pub fn ts(t: &Option<prost_types::Timestamp>) -> String {
    match t {
        Some(t) => utc(t.seconds),
        None => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn formats_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_796_161_125), "2026-12-01 21:38:45 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
    }
}
