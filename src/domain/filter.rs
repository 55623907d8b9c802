//! Payload filters: an optional condition on an event's `data` object that
//! a webhook's events must meet to be delivered to it.
//!
//! A filter is a tree: a [`Condition`] on one field, or `all` / `any` of
//! further filters. Paths are dot-separated keys into `data` (`course.id`);
//! `\.` stands for a dot inside a key and `\\` for a backslash; a segment
//! of digits indexes an array (`tags.0`). Semantics, fixed so delivery
//! never fails on a filter:
//! - a missing field (or a path through something that is not an object or
//!   array) matches only `exists: false`;
//! - `exists: true` matches any present value, `null` included;
//! - `equals` / `in` compare JSON values; numbers compare as doubles, so
//!   `1` equals `1.0`; objects and arrays compare deeply, strings exactly;
//! - `gt`, `gte`, `lt`, `lte` match numbers only: any other type (a string
//!   that looks like a number too) does not match.
//!
//! Evaluation decodes only the parts of `data` that some path names.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Most levels of `all` / `any` above a condition.
pub const MAX_DEPTH: usize = 4;
/// Most conditions in one filter.
pub const MAX_CONDITIONS: usize = 32;
/// Longest path, in bytes.
pub const MAX_PATH_BYTES: usize = 256;
/// Most values of one `in`.
pub const MAX_IN_VALUES: usize = 100;
/// Largest filter, as JSON.
pub const MAX_FILTER_BYTES: usize = 16 * 1024;
/// Characters of a value shown in an explanation.
const SHOWN_CHARS: usize = 64;

/// A filter on an event's `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventFilter {
    /// Every filter matches.
    All(Vec<EventFilter>),
    /// At least one filter matches.
    Any(Vec<EventFilter>),
    /// One field meets a test.
    Condition(Condition),
}

// Numbers in filters are finite (validated, and JSON has no NaN).
impl Eq for EventFilter {}

/// A test on the field at `path`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    /// Dot-separated keys (see the module doc).
    pub path: String,
    /// What the field must satisfy.
    pub test: Test,
}

/// What a field must satisfy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Test {
    /// Equal to the value.
    Equals(Value),
    /// Equal to one of the values.
    In(Vec<Value>),
    /// Present (true) or absent (false).
    Exists(bool),
    /// A number greater than this.
    Gt(f64),
    /// A number at least this.
    Gte(f64),
    /// A number less than this.
    Lt(f64),
    /// A number at most this.
    Lte(f64),
}

/// Checks a filter's limits; `field` is its path in the request (e.g.
/// `webhook.filter`) and errors name the part at fault.
pub fn validate(f: &EventFilter, field: &str) -> Result<()> {
    let mut conditions = 0;
    check_node(f, field, 0, &mut conditions)?;
    let size = serde_json::to_vec(f).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX_FILTER_BYTES {
        return Err(Error::invalid(
            field,
            format!("is {size} bytes as JSON; at most {MAX_FILTER_BYTES}"),
        ));
    }
    Ok(())
}

fn check_node(f: &EventFilter, field: &str, depth: usize, conditions: &mut usize) -> Result<()> {
    match f {
        EventFilter::All(list) | EventFilter::Any(list) => {
            let kind = if matches!(f, EventFilter::All(_)) {
                "all"
            } else {
                "any"
            };
            if depth >= MAX_DEPTH {
                return Err(Error::invalid(
                    format!("{field}.{kind}"),
                    format!("all/any nest at most {MAX_DEPTH} levels deep"),
                ));
            }
            if list.is_empty() {
                return Err(Error::invalid(
                    format!("{field}.{kind}.filters"),
                    "must list at least one filter",
                ));
            }
            for (i, child) in list.iter().enumerate() {
                check_node(
                    child,
                    &format!("{field}.{kind}.filters[{i}]"),
                    depth + 1,
                    conditions,
                )?;
            }
            Ok(())
        }
        EventFilter::Condition(c) => {
            *conditions += 1;
            let field = format!("{field}.condition");
            if *conditions > MAX_CONDITIONS {
                return Err(Error::invalid(
                    field,
                    format!("a filter has at most {MAX_CONDITIONS} conditions"),
                ));
            }
            parse_path(&c.path)
                .map_err(|reason| Error::invalid(format!("{field}.path"), reason))?;
            let finite = |name: &str, n: f64| {
                if n.is_finite() {
                    Ok(())
                } else {
                    Err(Error::invalid(
                        format!("{field}.{name}"),
                        "must be a finite number",
                    ))
                }
            };
            match &c.test {
                Test::Equals(_) | Test::Exists(_) => Ok(()),
                Test::In(values) => {
                    if values.is_empty() {
                        Err(Error::invalid(
                            format!("{field}.in"),
                            "must list at least one value",
                        ))
                    } else if values.len() > MAX_IN_VALUES {
                        Err(Error::invalid(
                            format!("{field}.in"),
                            format!("at most {MAX_IN_VALUES} values"),
                        ))
                    } else {
                        Ok(())
                    }
                }
                Test::Gt(n) => finite("gt", *n),
                Test::Gte(n) => finite("gte", *n),
                Test::Lt(n) => finite("lt", *n),
                Test::Lte(n) => finite("lte", *n),
            }
        }
    }
}

/// The keys of a path: split at unescaped dots, `\.` and `\\` unescaped.
pub fn parse_path(path: &str) -> std::result::Result<Vec<String>, String> {
    if path.is_empty() {
        return Err("is required (dot-separated keys into data, e.g. course.id)".into());
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(format!("must be at most {MAX_PATH_BYTES} bytes"));
    }
    if path.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    let mut out = Vec::new();
    let mut seg = String::new();
    let mut chars = path.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ ('.' | '\\')) => seg.push(e),
                _ => {
                    return Err(
                        "a backslash must be followed by '.' (a dot in a key) or '\\'".into(),
                    )
                }
            },
            '.' => {
                if seg.is_empty() {
                    return Err("has an empty key (two dots, or a dot at either end)".into());
                }
                out.push(std::mem::take(&mut seg));
            }
            c => seg.push(c),
        }
    }
    if seg.is_empty() {
        return Err("has an empty key (two dots, or a dot at either end)".into());
    }
    out.push(seg);
    Ok(out)
}

/// A filter ready to evaluate: paths split once, and the parts of `data`
/// to decode.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledFilter {
    root: Node,
    needed: Need,
}

impl Eq for CompiledFilter {}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    All(Vec<Node>),
    Any(Vec<Node>),
    Cond {
        path: String,
        keys: Vec<String>,
        test: Test,
    },
}

/// Which parts of a JSON value to decode: all of it, or some keys.
#[derive(Debug, Clone, PartialEq, Default)]
struct Need {
    whole: bool,
    keys: BTreeMap<String, Need>,
}

impl CompiledFilter {
    /// Compiles a validated filter (an invalid path matches nothing).
    pub fn new(f: &EventFilter) -> CompiledFilter {
        let mut needed = Need::default();
        let root = compile(f, &mut needed);
        CompiledFilter { root, needed }
    }

    /// Whether the event whose rendered JSON object is `event_json` matches.
    /// Undecodable JSON (never written by the router) counts as empty data.
    pub fn matches_event_json(&self, event_json: &[u8]) -> bool {
        let data = self.decode_data(event_json);
        self.explain(&data).is_ok()
    }

    /// `data` of a rendered event, reduced to the parts the filter reads.
    pub fn decode_data(&self, event_json: &[u8]) -> Value {
        // serde_json's recursion limit (128) bounds the work on nesting.
        let mut de = serde_json::Deserializer::from_slice(event_json);
        (&mut de)
            .deserialize_map(EventVisitor(&self.needed))
            .unwrap_or(Value::Null)
    }

    /// Ok when `data` matches; otherwise the first condition that failed,
    /// in words (`course.id: "c-7" is not "c-42"`).
    pub fn explain(&self, data: &Value) -> std::result::Result<(), String> {
        eval(&self.root, data)
    }
}

fn compile(f: &EventFilter, needed: &mut Need) -> Node {
    match f {
        EventFilter::All(list) => Node::All(list.iter().map(|c| compile(c, needed)).collect()),
        EventFilter::Any(list) => Node::Any(list.iter().map(|c| compile(c, needed)).collect()),
        EventFilter::Condition(c) => {
            let keys = parse_path(&c.path).unwrap_or_default();
            let mut at = &mut *needed;
            for k in &keys {
                at = at.keys.entry(k.clone()).or_default();
            }
            at.whole = true;
            Node::Cond {
                path: c.path.clone(),
                keys,
                test: c.test.clone(),
            }
        }
    }
}

fn eval(n: &Node, data: &Value) -> std::result::Result<(), String> {
    match n {
        Node::All(list) => list.iter().try_for_each(|c| eval(c, data)),
        Node::Any(list) => {
            let mut first = None;
            for c in list {
                match eval(c, data) {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        first.get_or_insert(e);
                    }
                }
            }
            Err(format!(
                "none of the {} filters of an any matched; the first: {}",
                list.len(),
                first.unwrap_or_default()
            ))
        }
        Node::Cond { path, keys, test } => {
            if keys.is_empty() {
                return Err(format!("{path}: not a valid path"));
            }
            check(test, lookup(data, keys)).map_err(|why| format!("{path}: {why}"))
        }
    }
}

fn lookup<'a>(data: &'a Value, keys: &[String]) -> Option<&'a Value> {
    let mut at = data;
    for k in keys {
        at = match at {
            Value::Object(m) => m.get(k)?,
            Value::Array(a) => a.get(array_index(k)?)?,
            _ => return None,
        };
    }
    Some(at)
}

/// A key as an array index: digits, no leading zero (but `0` itself).
fn array_index(k: &str) -> Option<usize> {
    let digits = !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit());
    if !digits || (k.len() > 1 && k.starts_with('0')) {
        return None;
    }
    k.parse().ok()
}

fn check(test: &Test, v: Option<&Value>) -> std::result::Result<(), String> {
    match test {
        Test::Exists(true) => v.map(drop).ok_or_else(|| "missing".to_string()),
        Test::Exists(false) => match v {
            None => Ok(()),
            Some(v) => Err(format!("is present ({}), wanted absent", show(v))),
        },
        Test::Equals(want) => match v {
            None => Err(format!("missing, wanted {}", show(want))),
            Some(v) if json_eq(v, want) => Ok(()),
            Some(v) => Err(format!("{} is not {}", show(v), show(want))),
        },
        Test::In(list) => match v {
            None => Err(format!(
                "missing, wanted one of {}",
                show(&Value::Array(list.clone()))
            )),
            Some(v) if list.iter().any(|w| json_eq(v, w)) => Ok(()),
            Some(v) => Err(format!(
                "{} is not one of {}",
                show(v),
                show(&Value::Array(list.clone()))
            )),
        },
        Test::Gt(n) => compare(v, *n, ">", |a, b| a > b),
        Test::Gte(n) => compare(v, *n, ">=", |a, b| a >= b),
        Test::Lt(n) => compare(v, *n, "<", |a, b| a < b),
        Test::Lte(n) => compare(v, *n, "<=", |a, b| a <= b),
    }
}

fn compare(
    v: Option<&Value>,
    bound: f64,
    op: &str,
    holds: impl Fn(f64, f64) -> bool,
) -> std::result::Result<(), String> {
    let bound_shown = show(&number(bound));
    match v {
        None => Err(format!("missing, wanted a number {op} {bound_shown}")),
        Some(Value::Number(x)) => match x.as_f64() {
            Some(x) if holds(x, bound) => Ok(()),
            _ => Err(format!(
                "{} is not {op} {bound_shown}",
                show(&Value::Number(x.clone()))
            )),
        },
        Some(other) => Err(format!(
            "{} is not a number, wanted a number {op} {bound_shown}",
            show(other)
        )),
    }
}

/// A finite double as a JSON number, whole ones as integers.
pub fn number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
        Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

/// JSON equality with numbers compared as doubles (`1 == 1.0`).
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// A value as compact JSON, at most [`SHOWN_CHARS`] characters.
fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > SHOWN_CHARS {
        let mut t: String = s.chars().take(SHOWN_CHARS).collect();
        t.push('…');
        t
    } else {
        s
    }
}

// ------------------------------------------------------------- decoding

/// The event object: only `data` is decoded, by its [`Need`].
struct EventVisitor<'n>(&'n Need);

impl<'de> Visitor<'de> for EventVisitor<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        let mut data = Value::Null;
        while let Some(Key(k)) = map.next_key()? {
            if k == "data" {
                data = map.next_value_seed(Pruned(self.0))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(data)
    }
}

/// A map key, borrowed from the input when it has no escapes.
struct Key<'de>(std::borrow::Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> std::result::Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Decodes a value keeping only what `Need` names (whole values where a
/// path ends; objects reduced to the named keys; arrays on a path whole).
struct Pruned<'n>(&'n Need);

impl<'de> DeserializeSeed<'de> for Pruned<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        if self.0.whole {
            Value::deserialize(d)
        } else {
            d.deserialize_any(PrunedVisitor(self.0))
        }
    }
}

struct PrunedVisitor<'n>(&'n Need);

impl<'de> Visitor<'de> for PrunedVisitor<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        // Indexed paths are rare: the array is kept whole.
        let mut out = Vec::new();
        while let Some(v) = seq.next_element::<Value>()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(Key(k)) = map.next_key()? {
            match self.0.keys.get(k.as_ref()) {
                Some(need) => {
                    let v = map.next_value_seed(Pruned(need))?;
                    out.insert(k.into_owned(), v);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cond(path: &str, test: Test) -> EventFilter {
        EventFilter::Condition(Condition {
            path: path.into(),
            test,
        })
    }

    fn event(data: Value) -> Vec<u8> {
        let e = crate::domain::event::render_event_json("e1", "T", 1, "", &data.to_string());
        e.into_bytes()
    }

    fn matches(f: &EventFilter, data: Value) -> bool {
        CompiledFilter::new(f).matches_event_json(&event(data))
    }

    fn why(f: &EventFilter, data: Value) -> String {
        let c = CompiledFilter::new(f);
        c.explain(&c.decode_data(&event(data))).unwrap_err()
    }

    fn field_of(r: Result<()>) -> String {
        match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn equals_compares_json_values_and_numbers_as_doubles() {
        let f = cond("course.id", Test::Equals(json!("c-42")));
        assert!(matches(&f, json!({"course": {"id": "c-42"}})));
        assert!(!matches(&f, json!({"course": {"id": "c-7"}})));
        assert!(!matches(&f, json!({"course": {"id": 42}})));
        assert!(!matches(&f, json!({"course": "c-42"})));
        assert!(!matches(&f, json!({})));
        assert_eq!(
            why(&f, json!({"course": {"id": "c-7"}})),
            r#"course.id: "c-7" is not "c-42""#
        );
        assert_eq!(why(&f, json!({})), r#"course.id: missing, wanted "c-42""#);
        let one = cond("n", Test::Equals(json!(1)));
        assert!(matches(&one, json!({"n": 1.0})));
        assert!(matches(
            &cond("n", Test::Equals(json!(1.0))),
            json!({"n": 1})
        ));
        assert!(!matches(&one, json!({"n": "1"})));
        assert!(!matches(&one, json!({"n": true})));
        let deep = cond("o", Test::Equals(json!({"a": [1, {"b": null}]})));
        assert!(matches(&deep, json!({"o": {"a": [1.0, {"b": null}]}})));
        assert!(!matches(&deep, json!({"o": {"a": [1, {"b": 0}]}})));
        assert!(!matches(
            &deep,
            json!({"o": {"a": [1, {"b": null}], "c": 1}})
        ));
        let null = cond("x", Test::Equals(Value::Null));
        assert!(matches(&null, json!({"x": null})));
        assert!(!matches(&null, json!({})));
    }

    #[test]
    fn in_matches_any_listed_value() {
        let f = cond("kind", Test::In(vec![json!("a"), json!(2), json!(null)]));
        assert!(matches(&f, json!({"kind": "a"})));
        assert!(matches(&f, json!({"kind": 2.0})));
        assert!(matches(&f, json!({"kind": null})));
        assert!(!matches(&f, json!({"kind": "b"})));
        assert!(!matches(&f, json!({})));
        assert_eq!(
            why(&f, json!({"kind": "b"})),
            r#"kind: "b" is not one of ["a",2,null]"#
        );
    }

    #[test]
    fn exists_sees_null_as_present() {
        let yes = cond("a.b", Test::Exists(true));
        let no = cond("a.b", Test::Exists(false));
        assert!(matches(&yes, json!({"a": {"b": null}})));
        assert!(!matches(&no, json!({"a": {"b": null}})));
        assert!(!matches(&yes, json!({"a": {}})));
        assert!(matches(&no, json!({"a": {}})));
        assert!(matches(&no, json!({"a": 5})));
        assert!(matches(&no, json!({})));
        assert_eq!(why(&yes, json!({})), "a.b: missing");
        assert_eq!(
            why(&no, json!({"a": {"b": 1}})),
            "a.b: is present (1), wanted absent"
        );
    }

    #[test]
    fn comparisons_match_numbers_only() {
        let data = |v: Value| json!({ "score": v });
        let gt = cond("score", Test::Gt(5.0));
        let gte = cond("score", Test::Gte(5.0));
        let lt = cond("score", Test::Lt(5.0));
        let lte = cond("score", Test::Lte(5.0));
        assert!(matches(&gt, data(json!(5.5))));
        assert!(!matches(&gt, data(json!(5))));
        assert!(matches(&gte, data(json!(5))));
        assert!(!matches(&gte, data(json!(4.99))));
        assert!(matches(&lt, data(json!(-1))));
        assert!(!matches(&lt, data(json!(5.0))));
        assert!(matches(&lte, data(json!(5.0))));
        assert!(!matches(&lte, data(json!(6))));
        for f in [&gt, &gte, &lt, &lte] {
            assert!(!matches(f, data(json!("10"))), "{f:?}");
            assert!(!matches(f, data(json!(null))), "{f:?}");
            assert!(!matches(f, data(json!([10]))), "{f:?}");
            assert!(!matches(f, json!({})), "{f:?}");
        }
        assert_eq!(why(&gt, data(json!(3))), "score: 3 is not > 5");
        assert_eq!(
            why(&gt, data(json!("abc"))),
            r#"score: "abc" is not a number, wanted a number > 5"#
        );
        assert_eq!(why(&lte, json!({})), "score: missing, wanted a number <= 5");
        assert_eq!(
            why(&cond("x", Test::Gt(0.5)), json!({"x": 0})),
            "x: 0 is not > 0.5"
        );
        // Large integers compare as doubles.
        let big = cond("n", Test::Gte(1e18));
        assert!(matches(&big, json!({"n": 1_000_000_000_000_000_000u64})));
    }

    #[test]
    fn all_and_any_nest() {
        let f = EventFilter::All(vec![
            cond("course.id", Test::Equals(json!("c-42"))),
            EventFilter::Any(vec![
                cond("score", Test::Gte(90.0)),
                cond("passed", Test::Equals(json!(true))),
            ]),
        ]);
        assert!(matches(&f, json!({"course": {"id": "c-42"}, "score": 95})));
        assert!(matches(
            &f,
            json!({"course": {"id": "c-42"}, "passed": true})
        ));
        assert!(!matches(&f, json!({"course": {"id": "c-42"}, "score": 50})));
        assert!(!matches(&f, json!({"course": {"id": "c-7"}, "score": 95})));
        assert_eq!(
            why(&f, json!({"course": {"id": "c-42"}, "score": 50})),
            "none of the 2 filters of an any matched; the first: score: 50 is not >= 90"
        );
        assert_eq!(
            why(&f, json!({"course": {"id": "c-7"}})),
            r#"course.id: "c-7" is not "c-42""#
        );
    }

    #[test]
    fn paths_escape_dots_and_index_arrays() {
        assert_eq!(parse_path("a.b").unwrap(), vec!["a", "b"]);
        assert_eq!(parse_path(r"a\.b.c").unwrap(), vec!["a.b", "c"]);
        assert_eq!(parse_path(r"a\\.b").unwrap(), vec![r"a\", "b"]);
        for bad in ["", ".a", "a.", "a..b", r"a\b", "a\\", "a\u{1}"] {
            assert!(parse_path(bad).is_err(), "{bad:?}");
        }
        assert!(parse_path(&"a".repeat(257)).is_err());
        assert!(parse_path(&"a".repeat(256)).is_ok());
        let dotted = cond(r"v\.1.x", Test::Equals(json!(1)));
        assert!(matches(&dotted, json!({"v.1": {"x": 1}})));
        assert!(!matches(&dotted, json!({"v": {"1": {"x": 1}}})));
        let indexed = cond("tags.1", Test::Equals(json!("b")));
        assert!(matches(&indexed, json!({"tags": ["a", "b"]})));
        assert!(!matches(&indexed, json!({"tags": ["a"]})));
        assert!(!matches(
            &cond("tags.01", Test::Exists(true)),
            json!({"tags": ["a", "b"]})
        ));
        // A digit key still addresses an object's key.
        assert!(matches(
            &cond("m.1", Test::Exists(true)),
            json!({"m": {"1": 0}})
        ));
        // Escaped keys in the event are matched unescaped.
        assert!(matches(
            &cond("q\"k", Test::Equals(json!("v"))),
            json!({"q\"k": "v"})
        ));
    }

    #[test]
    fn only_named_parts_are_decoded() {
        let f = EventFilter::All(vec![
            cond("a.b", Test::Exists(true)),
            cond("a.c.d", Test::Exists(true)),
        ]);
        let c = CompiledFilter::new(&f);
        let data = c.decode_data(&event(json!({
            "a": {"b": {"deep": [1, 2]}, "c": {"d": 1, "e": 2}, "z": "skip"},
            "other": {"big": "x"}
        })));
        assert_eq!(data, json!({"a": {"b": {"deep": [1, 2]}, "c": {"d": 1}}}));
        // Not JSON at all: empty data, so only exists:false would match.
        assert_eq!(c.decode_data(b"not json"), Value::Null);
        assert!(!c.matches_event_json(b"{\"data\":"));
    }

    #[test]
    fn limits_name_the_part_at_fault() {
        let ok = cond("a", Test::Exists(true));
        validate(&ok, "webhook.filter").unwrap();
        assert_eq!(
            field_of(validate(&EventFilter::All(vec![]), "webhook.filter")),
            "webhook.filter.all.filters"
        );
        let f = EventFilter::Any(vec![ok.clone(), ok.clone(), cond("", Test::Exists(true))]);
        assert_eq!(
            field_of(validate(&f, "webhook.filter")),
            "webhook.filter.any.filters[2].condition.path"
        );
        // Four levels of all/any are fine, a fifth is not.
        let mut deep = ok.clone();
        for _ in 0..MAX_DEPTH {
            deep = EventFilter::All(vec![deep]);
        }
        validate(&deep, "webhook.filter").unwrap();
        let deeper = EventFilter::Any(vec![deep]);
        assert_eq!(
            field_of(validate(&deeper, "webhook.filter")),
            "webhook.filter.any.filters[0].all.filters[0].all.filters[0].all.filters[0].all"
        );
        let many = EventFilter::All(vec![ok.clone(); MAX_CONDITIONS + 1]);
        assert_eq!(
            field_of(validate(&many, "webhook.filter")),
            format!("webhook.filter.all.filters[{MAX_CONDITIONS}].condition")
        );
        validate(
            &EventFilter::All(vec![ok.clone(); MAX_CONDITIONS]),
            "webhook.filter",
        )
        .unwrap();
        assert_eq!(
            field_of(validate(&cond("a", Test::Gt(f64::NAN)), "webhook.filter")),
            "webhook.filter.condition.gt"
        );
        assert_eq!(
            field_of(validate(&cond("a", Test::Lte(f64::INFINITY)), "w.filter")),
            "w.filter.condition.lte"
        );
        assert_eq!(
            field_of(validate(&cond("a", Test::In(vec![])), "webhook.filter")),
            "webhook.filter.condition.in"
        );
        let hundred = vec![json!(1); MAX_IN_VALUES];
        validate(&cond("a", Test::In(hundred.clone())), "webhook.filter").unwrap();
        let mut more = hundred;
        more.push(json!(1));
        assert_eq!(
            field_of(validate(&cond("a", Test::In(more)), "webhook.filter")),
            "webhook.filter.condition.in"
        );
        let huge = cond("a", Test::Equals(json!("x".repeat(MAX_FILTER_BYTES))));
        assert_eq!(
            field_of(validate(&huge, "webhook.filter")),
            "webhook.filter"
        );
    }

    #[test]
    fn stored_form_round_trips() {
        let f = EventFilter::All(vec![
            cond("a", Test::In(vec![json!(1), json!("x")])),
            EventFilter::Any(vec![
                cond("b", Test::Lt(2.5)),
                cond("c", Test::Exists(false)),
            ]),
        ]);
        let text = serde_json::to_string(&f).unwrap();
        assert_eq!(
            text,
            r#"{"all":[{"condition":{"path":"a","test":{"in":[1,"x"]}}},{"any":[{"condition":{"path":"b","test":{"lt":2.5}}},{"condition":{"path":"c","test":{"exists":false}}}]}]}"#
        );
        assert_eq!(serde_json::from_str::<EventFilter>(&text).unwrap(), f);
    }
}
