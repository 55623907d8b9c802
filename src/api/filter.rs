//! Payload filters on the wire (EventFilter and its parts, to and from the
//! domain's [`EventFilter`]) and the ExplainRouting call.

use prost_types::{value::Kind, ListValue, Struct, Value};

use super::convert::struct_to_json;
use super::AppState;
use crate::domain::filter::{self, CompiledFilter, Condition, EventFilter, Test};
use crate::domain::webhook::Webhook;
use crate::error::{Error, Result};
use crate::proto::v1 as pb;
use crate::store::ConfigStore;

/// A webhook's filter as clients see it.
pub fn filter_to_proto(f: &EventFilter) -> pb::EventFilter {
    use pb::event_filter::Kind as K;
    use pb::field_condition::Test as T;
    let list = |l: &[EventFilter]| pb::EventFilterList {
        filters: l.iter().map(filter_to_proto).collect(),
    };
    let kind = match f {
        EventFilter::All(l) => K::All(list(l)),
        EventFilter::Any(l) => K::Any(list(l)),
        EventFilter::Condition(c) => K::Condition(pb::FieldCondition {
            path: c.path.clone(),
            test: Some(match &c.test {
                Test::Equals(v) => T::Equals(json_to_value(v)),
                Test::In(vs) => T::In(ListValue {
                    values: vs.iter().map(json_to_value).collect(),
                }),
                Test::Exists(b) => T::Exists(*b),
                Test::Gt(n) => T::Gt(*n),
                Test::Gte(n) => T::Gte(*n),
                Test::Lt(n) => T::Lt(*n),
                Test::Lte(n) => T::Lte(*n),
            }),
        }),
    };
    pb::EventFilter { kind: Some(kind) }
}

/// The filter of an incoming webhook, checked: `field` is its path in the
/// request (`webhook.filter`); errors name the part at fault.
pub fn filter_from_proto(f: Option<&pb::EventFilter>, field: &str) -> Result<Option<EventFilter>> {
    let Some(f) = f else {
        return Ok(None);
    };
    let mut conditions = 0;
    let out = node_from_proto(f, field, 0, &mut conditions)?;
    filter::validate(&out, field)?;
    Ok(Some(out))
}

/// Converts one node; depth and count are bounded here already, so a
/// deeply nested message costs no more than the limits allow.
fn node_from_proto(
    f: &pb::EventFilter,
    field: &str,
    depth: usize,
    conditions: &mut usize,
) -> Result<EventFilter> {
    use pb::event_filter::Kind as K;
    use pb::field_condition::Test as T;
    let list = |l: &pb::EventFilterList, kind: &str, conditions: &mut usize| {
        if depth >= filter::MAX_DEPTH {
            return Err(Error::invalid(
                format!("{field}.{kind}"),
                format!("all/any nest at most {} levels deep", filter::MAX_DEPTH),
            ));
        }
        l.filters
            .iter()
            .enumerate()
            .map(|(i, c)| {
                node_from_proto(
                    c,
                    &format!("{field}.{kind}.filters[{i}]"),
                    depth + 1,
                    conditions,
                )
            })
            .collect::<Result<Vec<_>>>()
    };
    match &f.kind {
        None => Err(Error::invalid(
            field,
            "needs one of all, any, condition (leave the filter unset to take every event)",
        )),
        Some(K::All(l)) => Ok(EventFilter::All(list(l, "all", conditions)?)),
        Some(K::Any(l)) => Ok(EventFilter::Any(list(l, "any", conditions)?)),
        Some(K::Condition(c)) => {
            let field = format!("{field}.condition");
            *conditions += 1;
            if *conditions > filter::MAX_CONDITIONS {
                return Err(Error::invalid(
                    field,
                    format!("a filter has at most {} conditions", filter::MAX_CONDITIONS),
                ));
            }
            let test = match &c.test {
                None => {
                    return Err(Error::invalid(
                        field,
                        "needs one test: equals, in, exists, gt, gte, lt or lte",
                    ))
                }
                Some(T::Equals(v)) => Test::Equals(value_to_json(v, &format!("{field}.equals"))?),
                Some(T::In(l)) => {
                    if l.values.len() > filter::MAX_IN_VALUES {
                        return Err(Error::invalid(
                            format!("{field}.in"),
                            format!("at most {} values", filter::MAX_IN_VALUES),
                        ));
                    }
                    Test::In(
                        l.values
                            .iter()
                            .enumerate()
                            .map(|(i, v)| value_to_json(v, &format!("{field}.in[{i}]")))
                            .collect::<Result<_>>()?,
                    )
                }
                Some(T::Exists(b)) => Test::Exists(*b),
                Some(T::Gt(n)) => Test::Gt(*n),
                Some(T::Gte(n)) => Test::Gte(*n),
                Some(T::Lt(n)) => Test::Lt(*n),
                Some(T::Lte(n)) => Test::Lte(*n),
            };
            Ok(EventFilter::Condition(Condition {
                path: c.path.clone(),
                test,
            }))
        }
    }
}

/// A protobuf Value as JSON; NaN and infinities refused (named by `field`).
fn value_to_json(v: &Value, field: &str) -> Result<serde_json::Value> {
    let s = Struct {
        fields: [("v".to_string(), v.clone())].into_iter().collect(),
    };
    // The same rendering as event data, so equal values compare equal.
    let text = struct_to_json(Some(&s), 64, || field.to_string()).map_err(|e| match e {
        Error::InvalidArgument { field: f, reason } => Error::invalid(
            // `<field>.v…` → `<field>…`: the wrapper key is ours.
            format!(
                "{field}{}",
                f.get(field.len()..)
                    .and_then(|r| r.strip_prefix(".v"))
                    .unwrap_or("")
            ),
            reason,
        ),
        other => other,
    })?;
    let mut parsed: serde_json::Value = serde_json::from_str(&text)?;
    Ok(parsed["v"].take())
}

fn json_to_value(v: &serde_json::Value) -> Value {
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(m) => Kind::StructValue(Struct {
            fields: m
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        }),
    };
    Value { kind: Some(kind) }
}

// ------------------------------------------------------------ ExplainRouting

/// Page size used to walk an account's webhooks.
const PAGE: usize = 200;

/// The decisions of ExplainRouting for `event` in `account_id`.
pub async fn explain_routing(
    state: &AppState,
    account_id: u64,
    event: Option<&pb::Event>,
) -> Result<Vec<pb::RoutingDecision>> {
    let event = event.ok_or_else(|| Error::invalid("event", "is required"))?;
    // Validated exactly like a publish of this one event.
    let request = pb::PublishEventsRequest {
        account_id,
        events: vec![event.clone()],
    };
    let mut rendered = super::ingest::validate_request(state, &request).map_err(|e| match e {
        Error::InvalidArgument { field, reason } => {
            let rest = field.strip_prefix("events[0]").unwrap_or(&field);
            Error::invalid(format!("event{rest}"), reason)
        }
        other => other,
    })?;
    let new = rendered.pop().expect("one event validated");
    let json = new.json.into_bytes();
    let limit = state.config.limits.max_webhooks_per_account as usize;
    let mut decisions = Vec::new();
    let mut after = None;
    loop {
        let (page, more) = state
            .store
            .list_webhooks(account_id, after.clone(), PAGE)
            .await?;
        for w in &page {
            decisions.push(decide(w, &new.event_name, &json));
        }
        // Bounded by the per-account webhook limit.
        if !more || decisions.len() >= limit {
            break;
        }
        after = page.last().map(|w| w.id.clone());
    }
    Ok(decisions)
}

fn decide(w: &Webhook, event_name: &str, json: &[u8]) -> pb::RoutingDecision {
    use pb::RoutingReason as R;
    let (reason, detail) = if !w.event_types.iter().any(|t| t == event_name) {
        (
            R::TypeNotSubscribed,
            format!(
                "subscribes to {}",
                crate::domain::webhook::truncate(&w.event_types.join(", "), 256)
            ),
        )
    } else if let Some(Err(why)) = w.filter.as_ref().map(|f| {
        let c = CompiledFilter::new(f);
        c.explain(&c.decode_data(json))
    }) {
        (R::FilterNotMatched, why)
    } else if !w.active && w.disabled_reason.is_empty() {
        (
            R::Inactive,
            "retired; matching events wait until it is activated again".to_string(),
        )
    } else if !w.active {
        (R::Disabled, w.disabled_reason.clone())
    } else {
        (R::Matched, String::new())
    };
    pb::RoutingDecision {
        webhook_id: w.id.clone(),
        webhook_name: w.name.clone(),
        delivers: reason == R::Matched,
        reason: reason as i32,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::event_filter::Kind as K;
    use pb::field_condition::Test as T;

    fn cond(path: &str, test: T) -> pb::EventFilter {
        pb::EventFilter {
            kind: Some(K::Condition(pb::FieldCondition {
                path: path.into(),
                test: Some(test),
            })),
        }
    }

    fn field_of(r: Result<Option<EventFilter>>) -> String {
        match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn round_trips_through_the_domain() {
        let f = pb::EventFilter {
            kind: Some(K::All(pb::EventFilterList {
                filters: vec![
                    cond(
                        "course.id",
                        T::Equals(Value {
                            kind: Some(Kind::StringValue("c-42".into())),
                        }),
                    ),
                    cond(
                        "n",
                        T::In(ListValue {
                            values: vec![Value {
                                kind: Some(Kind::NumberValue(3.0)),
                            }],
                        }),
                    ),
                    cond("x", T::Exists(false)),
                    cond("s", T::Gte(1.5)),
                ],
            })),
        };
        let d = filter_from_proto(Some(&f), "webhook.filter")
            .unwrap()
            .unwrap();
        assert_eq!(filter_to_proto(&d), f);
        assert_eq!(filter_from_proto(None, "webhook.filter").unwrap(), None);
    }

    #[test]
    fn bad_filters_name_the_part() {
        let nan = cond(
            "a",
            T::Equals(Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            }),
        );
        assert_eq!(
            field_of(filter_from_proto(Some(&nan), "webhook.filter")),
            "webhook.filter.condition.equals"
        );
        let nested_nan = cond(
            "a",
            T::In(ListValue {
                values: vec![
                    Value {
                        kind: Some(Kind::NumberValue(1.0)),
                    },
                    Value {
                        kind: Some(Kind::ListValue(ListValue {
                            values: vec![Value {
                                kind: Some(Kind::NumberValue(f64::INFINITY)),
                            }],
                        })),
                    },
                ],
            }),
        );
        assert_eq!(
            field_of(filter_from_proto(Some(&nested_nan), "webhook.filter")),
            "webhook.filter.condition.in[1][0]"
        );
        let empty = pb::EventFilter { kind: None };
        assert_eq!(
            field_of(filter_from_proto(Some(&empty), "webhook.filter")),
            "webhook.filter"
        );
        let no_test = pb::EventFilter {
            kind: Some(K::Any(pb::EventFilterList {
                filters: vec![
                    cond("a", T::Exists(true)),
                    pb::EventFilter {
                        kind: Some(K::Condition(pb::FieldCondition {
                            path: "b".into(),
                            test: None,
                        })),
                    },
                ],
            })),
        };
        assert_eq!(
            field_of(filter_from_proto(Some(&no_test), "webhook.filter")),
            "webhook.filter.any.filters[1].condition"
        );
        // Thousands of levels are refused at the fifth, without recursing further.
        let mut deep = cond("a", T::Exists(true));
        for _ in 0..2000 {
            deep = pb::EventFilter {
                kind: Some(K::All(pb::EventFilterList {
                    filters: vec![deep],
                })),
            };
        }
        let field = field_of(filter_from_proto(Some(&deep), "webhook.filter"));
        assert_eq!(
            field,
            format!("webhook.filter{}.all", ".all.filters[0]".repeat(4))
        );
    }
}
