//! Operational events: what the router reports about itself (a webhook
//! created, changed, deleted or disabled; a delivery dead; a webhook
//! delivering again after failures). They are stored in the log of the
//! reserved account [`OPERATIONAL_ACCOUNT`], delivered to the operator
//! endpoint of `[operational]` by its internal webhook, and streamed by
//! WatchOperationalEvents. Never secrets or passwords: the data holds ids,
//! names, redacted URLs, counts and reasons only.

use serde_json::{Map, Value};

use super::event::render_event_json;

/// The reserved account whose log holds the operational events. The API
/// refuses account 0 for every call (`account_id: is required`), so no
/// token can read, change or publish to it.
pub const OPERATIONAL_ACCOUNT: u64 = 0;

/// `webhook.created`
pub const WEBHOOK_CREATED: &str = "webhook.created";
/// `webhook.updated`
pub const WEBHOOK_UPDATED: &str = "webhook.updated";
/// `webhook.deleted`
pub const WEBHOOK_DELETED: &str = "webhook.deleted";
/// `webhook.disabled`
pub const WEBHOOK_DISABLED: &str = "webhook.disabled";
/// `delivery.dead`
pub const DELIVERY_DEAD: &str = "delivery.dead";
/// `delivery.recovered`
pub const DELIVERY_RECOVERED: &str = "delivery.recovered";

/// The operational event types with what they mean, in catalog order. All
/// go to the real-time lane.
pub const TYPES: &[(&str, &str)] = &[
    (WEBHOOK_CREATED, "A webhook was created."),
    (
        WEBHOOK_UPDATED,
        "A webhook was changed: updated, retired, activated or its secret rotated.",
    ),
    (WEBHOOK_DELETED, "A webhook was deleted."),
    (
        WEBHOOK_DISABLED,
        "The router disabled a webhook itself (retries exhausted, 410 Gone).",
    ),
    (DELIVERY_DEAD, "A delivery reached state DEAD."),
    (
        DELIVERY_RECOVERED,
        "A webhook delivered successfully after failed attempts or dead deliveries.",
    ),
];

/// Whether `name` is an operational event type.
pub fn is_operational(name: &str) -> bool {
    TYPES.iter().any(|(n, _)| *n == name)
}

/// One operational event.
#[derive(Debug, Clone, PartialEq)]
pub struct OperationalEvent {
    /// A UUID, unique.
    pub event_id: String,
    /// One of [`TYPES`].
    pub event_name: String,
    /// The account the event concerns (the webhook's).
    pub account_id: u64,
    /// When it happened, epoch ms.
    pub time_ms: i64,
    /// One sentence for people.
    pub event_info: String,
    /// The event's data: always `account_id` and `webhook_id`, then what
    /// its type documents (docs/operations.md).
    pub data: Map<String, Value>,
}

impl OperationalEvent {
    /// A new event of `name` about `webhook_id` of `account_id`, now;
    /// `fields` are added to its data after `account_id` and `webhook_id`.
    pub fn new(
        name: &str,
        account_id: u64,
        webhook_id: &str,
        event_info: String,
        fields: impl IntoIterator<Item = (&'static str, Value)>,
    ) -> OperationalEvent {
        let mut data = Map::new();
        data.insert("account_id".into(), Value::from(account_id));
        data.insert("webhook_id".into(), Value::from(webhook_id));
        for (k, v) in fields {
            data.insert(k.into(), v);
        }
        OperationalEvent {
            event_id: uuid::Uuid::new_v4().to_string(),
            event_name: name.into(),
            account_id,
            time_ms: super::now_ms(),
            event_info,
            data,
        }
    }

    /// The event object as delivered, like a customer event:
    /// `{"eventId","eventName","timestamp","eventInfo","data"}`.
    pub fn to_json(&self) -> String {
        let data = Value::Object(self.data.clone()).to_string();
        render_event_json(
            &self.event_id,
            &self.event_name,
            self.time_ms,
            &self.event_info,
            &data,
        )
    }
}

/// The account an operational event object (as stored) concerns: its
/// `data.account_id`. None when it has none.
pub fn concerned_account(event_json: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Data {
        account_id: u64,
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        data: Data,
    }
    serde_json::from_slice::<Probe>(event_json)
        .ok()
        .map(|p| p.data.account_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_render_like_customer_events_and_name_their_account() {
        let e = OperationalEvent::new(
            WEBHOOK_DISABLED,
            1010,
            "wh_1",
            "webhook wh_1 disabled".into(),
            [("reason", Value::from("listener answered 410 Gone"))],
        );
        let json = e.to_json();
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["eventName"], "webhook.disabled");
        assert_eq!(v["eventId"], e.event_id.as_str());
        assert_eq!(v["timestamp"], e.time_ms);
        assert_eq!(v["data"]["webhook_id"], "wh_1");
        assert_eq!(v["data"]["reason"], "listener answered 410 Gone");
        assert_eq!(concerned_account(json.as_bytes()), Some(1010));
        assert_eq!(concerned_account(br#"{"data":{}}"#), None);
        assert!(is_operational("delivery.dead"));
        assert!(!is_operational("COURSE_ENROLLMENT"));
    }
}
