//! Events as the router stores and sends them. An event's JSON object is
//! rendered once at ingest; payloads are then built by concatenation.

use super::catalog::Mode;

/// A validated event ready to be appended to its account's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Unique per account.
    pub event_id: String,
    /// Catalog name.
    pub event_name: String,
    /// Epoch milliseconds.
    pub timestamp_ms: i64,
    /// The lane it goes to, fixed at publish from the catalog in force.
    pub mode: Mode,
    /// The event object as sent to listeners:
    /// `{"eventId":…,"eventName":…,"timestamp":…,"eventInfo":…,"data":…}`.
    pub json: String,
}

/// An event read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Position in the log (increasing, global to the store).
    pub seq: u64,
    /// Unique per account.
    pub event_id: String,
    /// Catalog name.
    pub event_name: String,
    /// When the router stored it, epoch ms.
    pub ingest_time_ms: i64,
    /// Its mode as published; None for events stored before modes were
    /// recorded (schema 2).
    pub mode: Option<Mode>,
    /// The rendered event object (UTF-8 JSON), a slice of the log chunk it
    /// was read from: no copy per event.
    pub json: bytes::Bytes,
}

/// Renders the event object. `data_json` must already be a JSON object.
pub fn render_event_json(
    event_id: &str,
    event_name: &str,
    timestamp_ms: i64,
    event_info: &str,
    data_json: &str,
) -> String {
    let mut out = String::with_capacity(96 + event_id.len() + event_info.len() + data_json.len());
    out.push_str("{\"eventId\":");
    push_json_string(&mut out, event_id);
    out.push_str(",\"eventName\":");
    push_json_string(&mut out, event_name);
    out.push_str(",\"timestamp\":");
    out.push_str(&timestamp_ms.to_string());
    out.push_str(",\"eventInfo\":");
    push_json_string(&mut out, event_info);
    out.push_str(",\"data\":");
    out.push_str(data_json);
    out.push('}');
    out
}

/// The payload body: `{"accountId":N,"events":[…]}`.
pub fn render_payload<T: AsRef<[u8]>>(
    account_id: u64,
    events: impl IntoIterator<Item = T>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"accountId\":");
    out.extend_from_slice(account_id.to_string().as_bytes());
    out.extend_from_slice(b",\"events\":[");
    for (i, e) in events.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(e.as_ref());
    }
    out.extend_from_slice(b"]}");
    out
}

/// Appends `s` as a JSON string literal, escaped as serde_json escapes it
/// (`"`, `\\` and control characters; nothing else), without allocating.
pub fn push_json_string(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let short = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        // `i` is at an ASCII byte, so on a character boundary.
        out.push_str(&s[start..i]);
        if short.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
        } else {
            out.push_str(short);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_exactly_like_serde_json() {
        let samples = [
            "plain",
            "quote \" and \\ backslash",
            "\u{0}\u{1}\u{8}\u{9}\u{a}\u{c}\u{d}\u{1f}\u{7f}",
            "üñíçødé ✓ 𝄞 </script>",
            "",
        ];
        for s in samples {
            let mut out = String::new();
            push_json_string(&mut out, s);
            assert_eq!(out, serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn payload_has_the_documented_shape() {
        let e = render_event_json(
            "e1",
            "COURSE_ENROLLMENT",
            1727414643000,
            "info \"q\"",
            r#"{"userId":4279332,"loId":"course:7374992"}"#,
        );
        let body = render_payload(1010, [e.as_str()]);
        assert_eq!(
            String::from_utf8(body.clone()).unwrap(),
            r#"{"accountId":1010,"events":[{"eventId":"e1","eventName":"COURSE_ENROLLMENT","timestamp":1727414643000,"eventInfo":"info \"q\"","data":{"userId":4279332,"loId":"course:7374992"}}]}"#
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["events"][0]["data"]["userId"], 4279332);
    }
}
