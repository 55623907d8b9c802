//! Conversions between protobuf messages and domain types, and the opaque
//! page tokens. Outgoing webhooks never carry secrets or passwords.

use base64::Engine;
use prost_types::{value::Kind, Struct, Timestamp, Value};

use crate::delivery::signing;
use crate::domain::catalog::{EventType, Mode};
use crate::domain::delivery::{Attempt, DeliveryRecord, DeliveryState};
use crate::domain::event::push_json_string;
use crate::domain::webhook::{Auth, SecretRecord, SignatureAlgorithm, Webhook};
use crate::error::{Error, Result};
use crate::proto::v1 as pb;

/// Milliseconds to a protobuf Timestamp.
pub fn timestamp(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A webhook as clients see it: no password, no secret.
pub fn webhook_to_proto(w: &Webhook) -> pb::Webhook {
    pb::Webhook {
        id: w.id.clone(),
        account_id: w.account_id,
        name: w.name.clone(),
        description: w.description.clone(),
        target_url: w.target_url.clone(),
        auth: Some(auth_to_proto(&w.auth)),
        event_types: w.event_types.clone(),
        active: w.active,
        create_time: Some(timestamp(w.create_time_ms)),
        update_time: Some(timestamp(w.update_time_ms)),
        disabled_reason: w.disabled_reason.clone(),
        max_in_flight: w.max_in_flight,
        filter: w.filter.as_ref().map(super::filter::filter_to_proto),
    }
}

fn auth_to_proto(a: &Auth) -> pb::WebhookAuth {
    use pb::webhook_auth::Method;
    let method = match a {
        Auth::None => Method::None(pb::NoAuth {}),
        Auth::Basic { username, .. } => Method::Basic(pb::BasicAuth {
            username: username.clone(),
            password: String::new(),
        }),
        Auth::Signature { algorithm } => Method::Signature(pb::SignatureAuth {
            algorithm: match algorithm {
                SignatureAlgorithm::HmacSha256 => pb::SignatureAlgorithm::HmacSha256,
                SignatureAlgorithm::Ed25519 => pb::SignatureAlgorithm::Ed25519,
            } as i32,
        }),
    };
    pb::WebhookAuth {
        method: Some(method),
    }
}

/// Checks what [`auth_from_proto`] cannot represent: an unknown signature
/// algorithm. `field` is the auth's request path (e.g. `webhook.auth`).
pub fn check_auth(a: Option<&pb::WebhookAuth>, field: &str) -> Result<()> {
    use pb::webhook_auth::Method;
    if let Some(Method::Signature(s)) = a.and_then(|a| a.method.as_ref()) {
        if pb::SignatureAlgorithm::try_from(s.algorithm).is_err() {
            return Err(Error::invalid(
                format!("{field}.signature.algorithm"),
                format!(
                    "unknown value {}: use SIGNATURE_ALGORITHM_HMAC_SHA256 or SIGNATURE_ALGORITHM_ED25519",
                    s.algorithm
                ),
            ));
        }
    }
    Ok(())
}

/// The auth of an incoming webhook (checked with [`check_auth`]).
pub fn auth_from_proto(a: Option<&pb::WebhookAuth>) -> Auth {
    use pb::webhook_auth::Method;
    match a.and_then(|a| a.method.as_ref()) {
        None | Some(Method::None(_)) => Auth::None,
        Some(Method::Basic(b)) => Auth::Basic {
            username: b.username.clone(),
            password: b.password.clone(),
        },
        Some(Method::Signature(s)) => Auth::Signature {
            algorithm: match pb::SignatureAlgorithm::try_from(s.algorithm) {
                Ok(pb::SignatureAlgorithm::Ed25519) => SignatureAlgorithm::Ed25519,
                _ => SignatureAlgorithm::HmacSha256,
            },
        },
    }
}

/// The user-settable fields of an incoming webhook, for `account_id`; the
/// filter is left out (see [`super::filter::filter_from_proto`]).
pub fn webhook_from_proto(account_id: u64, w: &pb::Webhook, now_ms: i64) -> Webhook {
    Webhook {
        id: String::new(),
        account_id,
        name: w.name.clone(),
        description: w.description.clone(),
        target_url: w.target_url.trim().to_string(),
        auth: auth_from_proto(w.auth.as_ref()),
        event_types: w.event_types.iter().map(|t| t.trim().to_string()).collect(),
        active: true,
        create_time_ms: now_ms,
        update_time_ms: now_ms,
        disabled_reason: String::new(),
        max_in_flight: w.max_in_flight,
        filter: None,
    }
}

/// The secret message of GetWebhookSecret / RotateWebhookSecret: for
/// ed25519 the public key, never the private one.
pub fn secret_to_proto(
    webhook_id: &str,
    s: &SecretRecord,
    now_ms: i64,
) -> Result<pb::WebhookSecret> {
    let (secret, algorithm) = match s.algorithm() {
        SignatureAlgorithm::HmacSha256 => (s.current.clone(), "HMAC-SHA256"),
        SignatureAlgorithm::Ed25519 => (
            signing::public_key_of(&s.current)
                .map_err(|e| Error::Internal(format!("webhook {webhook_id}: {e}")))?,
            "ED25519",
        ),
    };
    Ok(pb::WebhookSecret {
        webhook_id: webhook_id.to_string(),
        secret,
        algorithm: algorithm.into(),
        signature_header: "webhook-signature".into(),
        id_header: "webhook-id".into(),
        timestamp_header: "webhook-timestamp".into(),
        create_time: Some(timestamp(s.create_time_ms)),
        previous_secret_expire_time: (s.previous.is_some() && s.previous_expire_ms > now_ms)
            .then(|| timestamp(s.previous_expire_ms)),
    })
}

/// A catalog entry.
pub fn event_type_to_proto(e: &EventType) -> pb::EventType {
    pb::EventType {
        name: e.name.clone(),
        delivery_mode: match e.mode {
            Mode::Realtime => pb::DeliveryMode::Realtime,
            Mode::Batch => pb::DeliveryMode::Batch,
        } as i32,
        description: e.description.clone(),
    }
}

/// A delivery record.
pub fn delivery_to_proto(d: &DeliveryRecord) -> pb::Delivery {
    pb::Delivery {
        id: d.id.clone(),
        webhook_id: d.webhook_id.clone(),
        event_ids: d.event_ids.clone(),
        state: state_to_proto(d.state) as i32,
        attempts: d.attempts.iter().map(attempt_to_proto).collect(),
        next_attempt_time: (d.state == DeliveryState::Retrying && d.next_attempt_ms > 0)
            .then(|| timestamp(d.next_attempt_ms)),
        create_time: Some(timestamp(d.create_time_ms)),
        account_id: d.account_id,
        finish_time: (d.state.is_final() && d.finish_time_ms > 0)
            .then(|| timestamp(d.finish_time_ms)),
    }
}

fn attempt_to_proto(a: &Attempt) -> pb::DeliveryAttempt {
    pb::DeliveryAttempt {
        attempt_time: Some(timestamp(a.time_ms)),
        status_code: u32::from(a.status_code),
        latency_ms: a.latency_ms,
        error: a.error.clone(),
    }
}

fn state_to_proto(s: DeliveryState) -> pb::DeliveryState {
    match s {
        DeliveryState::Pending => pb::DeliveryState::Pending,
        DeliveryState::Retrying => pb::DeliveryState::Retrying,
        DeliveryState::Delivered => pb::DeliveryState::Delivered,
        DeliveryState::Dead => pb::DeliveryState::Dead,
        DeliveryState::Expired => pb::DeliveryState::Expired,
    }
}

/// A state filter from a request (None: every state).
pub fn state_filter(raw: i32) -> Result<Option<DeliveryState>> {
    match pb::DeliveryState::try_from(raw) {
        Ok(pb::DeliveryState::Unspecified) => Ok(None),
        Ok(pb::DeliveryState::Pending) => Ok(Some(DeliveryState::Pending)),
        Ok(pb::DeliveryState::Retrying) => Ok(Some(DeliveryState::Retrying)),
        Ok(pb::DeliveryState::Delivered) => Ok(Some(DeliveryState::Delivered)),
        Ok(pb::DeliveryState::Dead) => Ok(Some(DeliveryState::Dead)),
        Ok(pb::DeliveryState::Expired) => Ok(Some(DeliveryState::Expired)),
        Err(_) => Err(Error::invalid(
            "state",
            format!("unknown delivery state {raw}"),
        )),
    }
}

/// Encodes a page position as an opaque token.
pub fn page_token(kind: &str, after: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{kind}:{after}"))
}

/// Decodes a page token made by [`page_token`] with the same `kind`.
pub fn parse_page_token(kind: &str, token: &str) -> Result<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Error::invalid("page_token", "not a token returned by this call");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let after = text
        .strip_prefix(kind)
        .and_then(|r| r.strip_prefix(':'))
        .ok_or_else(bad)?;
    if after.is_empty() || after.len() > 128 {
        return Err(bad());
    }
    Ok(Some(after.to_string()))
}

/// Page size from a request: 0 means `default`, capped at `max`.
pub fn page_size(raw: i32, default: usize, max: usize) -> Result<usize> {
    match raw {
        n if n < 0 => Err(Error::invalid("page_size", "must not be negative")),
        0 => Ok(default),
        n => Ok((n as usize).min(max)),
    }
}

/// 2^63. Whole numbers below it in magnitude convert to i64 exactly and are
/// written as integers (above 2^53 that is the double's exact value, never
/// `….0` nor `1.2e+18`); larger ones are written in exponent form (`1e+20`).
const I64_LIMIT: f64 = 9_223_372_036_854_775_808.0;

/// Renders a Struct as a JSON object. Whole numbers are written as integers
/// (4279332, never 4279332.0); NaN and infinities are refused. `field`
/// names the Struct in errors; it, and the path inside the Struct, are only
/// built when something is wrong, so rendering costs time linear in the
/// event's size and no allocation per field. Keys come out sorted (the
/// Struct's map is ordered), so the same event always renders to the same bytes.
pub fn struct_to_json(
    s: Option<&Struct>,
    capacity: usize,
    field: impl FnOnce() -> String,
) -> Result<String> {
    let mut out = String::with_capacity(capacity);
    match s {
        None => out.push_str("{}"),
        Some(s) => write_struct(&mut out, s).map_err(|e| e.into_error(field()))?,
    }
    Ok(out)
}

/// Characters of a key shown in the path of a bad value.
const MAX_ECHOED_KEY_CHARS: usize = 64;

/// One step of the path to a bad value.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// A bad value and the path to it, innermost step first (collected while
/// the error travels up).
struct BadValue<'a> {
    reason: &'static str,
    path: Vec<Step<'a>>,
}

impl BadValue<'_> {
    fn into_error(self, field: String) -> Error {
        let mut path = field;
        for step in self.path.iter().rev() {
            match step {
                Step::Key(k) => {
                    path.push('.');
                    // Keys are the client's: echo a bounded part of each.
                    if k.chars().count() > MAX_ECHOED_KEY_CHARS {
                        path.extend(k.chars().take(MAX_ECHOED_KEY_CHARS));
                        path.push('…');
                    } else {
                        path.push_str(k);
                    }
                }
                Step::Index(i) => path.push_str(&format!("[{i}]")),
            }
        }
        Error::invalid(path, self.reason)
    }
}

fn write_struct<'a>(out: &mut String, s: &'a Struct) -> std::result::Result<(), BadValue<'a>> {
    out.push('{');
    for (i, (k, v)) in s.fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_string(out, k);
        out.push(':');
        write_value(out, v).map_err(|mut e| {
            e.path.push(Step::Key(k));
            e
        })?;
    }
    out.push('}');
    Ok(())
}

fn write_value<'a>(out: &mut String, v: &'a Value) -> std::result::Result<(), BadValue<'a>> {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => out.push_str("null"),
        Some(Kind::BoolValue(b)) => out.push_str(if *b { "true" } else { "false" }),
        Some(Kind::StringValue(s)) => push_json_string(out, s),
        Some(Kind::NumberValue(n)) => {
            if !n.is_finite() {
                return Err(BadValue {
                    reason: "NaN and infinity are not valid JSON numbers",
                    path: Vec::new(),
                });
            }
            push_number(out, *n);
        }
        Some(Kind::StructValue(s)) => write_struct(out, s)?,
        Some(Kind::ListValue(l)) => {
            out.push('[');
            for (i, item) in l.values.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item).map_err(|mut e| {
                    e.path.push(Step::Index(i));
                    e
                })?;
            }
            out.push(']');
        }
    }
    Ok(())
}

/// Writes a finite number the way serde_json does, integers as integers,
/// through a stack buffer (no allocation).
fn push_number(out: &mut String, n: f64) {
    use serde_json::ser::{CompactFormatter, Formatter};
    let mut buf = [0u8; 40];
    let mut w = std::io::Cursor::new(&mut buf[..]);
    let written = if n.fract() == 0.0 && n.abs() < I64_LIMIT {
        CompactFormatter.write_i64(&mut w, n as i64)
    } else {
        // The shortest form that reads back as the same double.
        CompactFormatter.write_f64(&mut w, n)
    };
    let len = w.position() as usize;
    match (written, std::str::from_utf8(&buf[..len])) {
        (Ok(()), Ok(text)) => out.push_str(text),
        _ => out.push('0'),
    }
}

/// An operational event as WatchOperationalEvents sends it.
pub fn operational_event_to_proto(
    e: &crate::domain::operational::OperationalEvent,
) -> pb::OperationalEvent {
    pb::OperationalEvent {
        event_id: e.event_id.clone(),
        event_name: e.event_name.clone(),
        account_id: e.account_id,
        time: Some(timestamp(e.time_ms)),
        data: Some(json_object_to_struct(&e.data)),
    }
}

fn json_object_to_struct(m: &serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: m
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        J::Object(m) => Kind::StructValue(json_object_to_struct(m)),
    };
    Value { kind: Some(kind) }
}

/// A breaker state as the API names it (None: no lane runs in this router).
pub fn circuit_to_proto(c: Option<crate::domain::health::CircuitState>) -> pb::CircuitState {
    use crate::domain::health::CircuitState as C;
    match c {
        None => pb::CircuitState::Unspecified,
        Some(C::Closed) => pb::CircuitState::Closed,
        Some(C::Open) => pb::CircuitState::Open,
        Some(C::HalfOpen) => pb::CircuitState::HalfOpen,
    }
}

/// GetWebhookHealth's answer.
pub fn health_to_proto(h: &crate::domain::health::WebhookHealth) -> pb::WebhookHealth {
    use crate::domain::health::HealthState as H;
    let state = match h.state {
        H::Healthy => pb::WebhookHealthState::Healthy,
        H::Degraded => pb::WebhookHealthState::Degraded,
        H::Failing => pb::WebhookHealthState::Failing,
        H::Disabled => pb::WebhookHealthState::Disabled,
    };
    pb::WebhookHealth {
        webhook_id: h.webhook_id.clone(),
        state: state as i32,
        success_rate: h.success_rate,
        attempts: h.attempts,
        latency_p50_ms: h.latency_p50_ms,
        latency_p90_ms: h.latency_p90_ms,
        latency_p99_ms: h.latency_p99_ms,
        consecutive_failures: h.consecutive_failures,
        last_error: h
            .last_error
            .as_ref()
            .map(|(_, e)| e.clone())
            .unwrap_or_default(),
        last_error_time: h.last_error.as_ref().map(|(t, _)| timestamp(*t)),
        next_attempt_time: h.next_attempt_ms.map(timestamp),
        circuit_state: circuit_to_proto(h.circuit.map(|c| c.state)) as i32,
        truncated: h.truncated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn num(n: f64) -> Value {
        Value {
            kind: Some(Kind::NumberValue(n)),
        }
    }

    #[test]
    fn whole_numbers_are_integers() {
        let mut fields = BTreeMap::new();
        fields.insert("userId".to_string(), num(4279332.0));
        fields.insert("ratio".to_string(), num(0.5));
        fields.insert("neg".to_string(), num(-3.0));
        fields.insert("big".to_string(), num(9_007_199_254_740_994.0));
        fields.insert("huge".to_string(), num(1e20));
        fields.insert(
            "loId".to_string(),
            Value {
                kind: Some(Kind::StringValue("course:7374992".into())),
            },
        );
        let s = Struct {
            fields: fields.into_iter().collect(),
        };
        assert_eq!(
            struct_to_json(Some(&s), 0, || "data".into()).unwrap(),
            r#"{"big":9007199254740994,"huge":1e+20,"loId":"course:7374992","neg":-3,"ratio":0.5,"userId":4279332}"#
        );
    }

    #[test]
    fn non_finite_numbers_name_their_path() {
        let s = Struct {
            fields: [("x".to_string(), num(f64::NAN))].into_iter().collect(),
        };
        match struct_to_json(Some(&s), 0, || "events[2].data".into()) {
            Err(Error::InvalidArgument { field, .. }) => assert_eq!(field, "events[2].data.x"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn long_keys_are_shortened_in_error_paths() {
        let long = "k".repeat(10_000);
        let s = Struct {
            fields: [(long, num(f64::INFINITY))].into_iter().collect(),
        };
        match struct_to_json(Some(&s), 0, || "events[0].data".into()) {
            Err(Error::InvalidArgument { field, .. }) => {
                assert_eq!(field, format!("events[0].data.{}…", "k".repeat(64)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let t = page_token("wh", "wh_1");
        assert_eq!(parse_page_token("wh", &t).unwrap().as_deref(), Some("wh_1"));
        assert!(parse_page_token("msg", &t).is_err());
        assert!(parse_page_token("wh", "!!!").is_err());
        assert_eq!(parse_page_token("wh", "").unwrap(), None);
    }
}
