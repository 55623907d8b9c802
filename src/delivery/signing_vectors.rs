//! The published conformance vectors, `tests/vectors/standard-webhooks.json`:
//! made here from fixed keys and content (so the file is what this signer
//! produces), and checked here against the signer and [`verify`].
//!
//! To write the file again after changing the list below:
//! `cargo test --lib delivery::signing::vectors::write_vectors -- --ignored`.

use base64::Engine;
use serde_json::{json, Value};

use super::*;

const FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/standard-webhooks.json"
);

/// Fixed keys. The HMAC secrets and `ED_A` are those of the Standard
/// Webhooks libraries' own tests; the other ed25519 seeds are made up.
const HMAC_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const HMAC_B: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const ED_A: &str = "whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=";

fn seed_key(byte: u8) -> String {
    let seed: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(7).wrapping_add(byte))
        .collect();
    format!("{PRIVATE_KEY_PREFIX}{}", B64.encode(seed))
}

fn key(secret: &str) -> Key {
    Key::from_secret(secret).expect("fixed key")
}

/// One vector: `keys` are what the verifier holds (HMAC secrets or ed25519
/// private keys, whose public halves are published too).
struct V {
    note: &'static str,
    keys: &'static [&'static str],
    msg_id: &'static str,
    timestamp: i64,
    now: i64,
    payload: &'static str,
    signature: String,
    valid: bool,
}

fn vector_json(v: &V) -> Value {
    let scheme = if v.keys[0].starts_with(PRIVATE_KEY_PREFIX) {
        "v1a"
    } else {
        "v1"
    };
    let mut o = json!({"scheme": scheme});
    if scheme == "v1" {
        o["secret"] = json!(v.keys[0]);
    } else {
        o["private_key"] = json!(v.keys[0]);
        o["public_key"] = json!(public_key_of(v.keys[0]).expect("fixed key"));
    }
    o["msg_id"] = json!(v.msg_id);
    o["timestamp"] = json!(v.timestamp);
    o["now"] = json!(v.now);
    o["payload"] = json!(v.payload);
    o["signature"] = json!(v.signature);
    o["valid"] = json!(v.valid);
    o["note"] = json!(v.note);
    o
}

fn vectors() -> Vec<V> {
    let ed_b = Box::leak(seed_key(1).into_boxed_str()) as &'static str;
    let ed_c = Box::leak(seed_key(99).into_boxed_str()) as &'static str;
    let ed_b_keys: &'static [&'static str] = Box::leak(Box::new([ed_b]));
    let ed_c_keys: &'static [&'static str] = Box::leak(Box::new([ed_c]));
    let id = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W";
    let ts = 1_674_087_231;
    let body = r#"{"type":"contact.created","timestamp":"2022-11-03T20:26:10.344522Z","data":{"id":"1f81eb52-5198-4599-803e-771906343485"}}"#;
    let s = |secret: &str, msg_id: &str, t: i64, p: &str| key(secret).sign(msg_id, t, p.as_bytes());
    let both = |a: &str, b: &str, t: i64, p: &str| format!("{} {}", s(a, id, t, p), s(b, id, t, p));
    let ed_sig = s(ED_A, id, ts, body);
    let hmac_sig = s(HMAC_A, id, ts, body);
    let mut out = vec![
        V {
            note: "v1 known answer of the Standard Webhooks libraries' tests",
            keys: &[HMAC_A],
            msg_id: "msg_p5jXN8AQM9LWM0D4loKWxJek",
            timestamp: 1_614_265_330,
            now: 1_614_265_330,
            payload: r#"{"test": 2432232314}"#,
            signature: "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".into(),
            valid: true,
        },
        V {
            note: "v1 second known answer of the Standard Webhooks libraries' tests",
            keys: &[HMAC_B],
            msg_id: "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            timestamp: 1_649_367_553,
            now: 1_649_367_553,
            payload: r#"{"email":"test@example.com","username":"test_user"}"#,
            signature: "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=".into(),
            valid: true,
        },
        V {
            note: "v1a known answer of the Standard Webhooks Go library's test (private key: base64 of a 32-byte seed)",
            keys: &[ED_A],
            msg_id: "msg_p5jXN8AQM9LWM0D4loKWxJek",
            timestamp: 1_614_265_330,
            now: 1_614_265_330,
            payload: r#"{"test": 2432232314}"#,
            signature: "v1a,tQ9V2XOqn7jL/DQenEFpqIugdBVtiMmER5mhSkXBNwM0mkATuDe6KYYUuxqtaiHeYGb7KaaBRdM5WqyeFiL8Ag==".into(),
            valid: true,
        },
        V {
            note: "v1a, the specification's example message, verified 299 s after it was sent",
            keys: ed_b_keys,
            msg_id: id,
            timestamp: ts,
            now: ts + 299,
            payload: body,
            signature: s(ed_b, id, ts, body),
            valid: true,
        },
        V {
            note: "v1a, verified exactly 300 s after it was sent (the edge of the tolerance)",
            keys: ed_b_keys,
            msg_id: id,
            timestamp: ts,
            now: ts + 300,
            payload: body,
            signature: s(ed_b, id, ts, body),
            valid: true,
        },
        V {
            note: "v1a, timestamp 300 s ahead of the verifier's clock (the edge of the tolerance)",
            keys: ed_b_keys,
            msg_id: id,
            timestamp: ts,
            now: ts - 300,
            payload: body,
            signature: s(ed_b, id, ts, body),
            valid: true,
        },
        V {
            note: "v1a, an empty payload",
            keys: ed_b_keys,
            msg_id: "msg_empty",
            timestamp: ts,
            now: ts,
            payload: "",
            signature: s(ed_b, "msg_empty", ts, ""),
            valid: true,
        },
        V {
            note: "v1a, a payload with non-ASCII text and an escaped newline (signed as UTF-8 bytes)",
            keys: &[ED_A],
            msg_id: "dlv_0193a1b2c3d4e5f6a7b8",
            timestamp: 1_727_414_643,
            now: 1_727_414_650,
            payload: "{\"name\":\"Zoë Ωmega ✓\",\"text\":\"line 1\\nline 2\"}",
            signature: s(
                ED_A,
                "dlv_0193a1b2c3d4e5f6a7b8",
                1_727_414_643,
                "{\"name\":\"Zoë Ωmega ✓\",\"text\":\"line 1\\nline 2\"}",
            ),
            valid: true,
        },
        V {
            note: "v1 rotation: new and old secret's signatures; the verifier holds the old secret",
            keys: &[HMAC_A],
            msg_id: id,
            timestamp: ts,
            now: ts,
            payload: body,
            signature: both(HMAC_B, HMAC_A, ts, body),
            valid: true,
        },
        V {
            note: "v1 rotation: new and old secret's signatures; the verifier holds the new secret",
            keys: &[HMAC_B],
            msg_id: id,
            timestamp: ts,
            now: ts,
            payload: body,
            signature: both(HMAC_B, HMAC_A, ts, body),
            valid: true,
        },
        V {
            note: "v1a rotation: new and old key's signatures; the verifier holds the old public key",
            keys: &[ED_A],
            msg_id: id,
            timestamp: ts,
            now: ts,
            payload: body,
            signature: both(ed_b, ED_A, ts, body),
            valid: true,
        },
        V {
            note: "v1a rotation: new and old key's signatures; the verifier holds the new public key",
            keys: ed_b_keys,
            msg_id: id,
            timestamp: ts,
            now: ts,
            payload: body,
            signature: both(ed_b, ED_A, ts, body),
            valid: true,
        },
        V {
            note: "change of algorithm (HMAC to ed25519): v1a and v1 signatures; the verifier holds the HMAC secret",
            keys: &[HMAC_A],
            msg_id: id,
            timestamp: ts,
            now: ts,
            payload: body,
            signature: format!("{ed_sig} {hmac_sig}"),
            valid: true,
        },
        V {
            note: "change of algorithm (HMAC to ed25519): v1a and v1 signatures; the verifier holds the public key",
            keys: &[ED_A],
            msg_id: id,
            timestamp: ts,
            now: ts,
            payload: body,
            signature: format!("{ed_sig} {hmac_sig}"),
            valid: true,
        },
        V {
            note: "unknown signature identifiers are skipped (v2 first, then the v1a one)",
            keys: &[ED_A],
            msg_id: id,
            timestamp: ts,
            now: ts,
            payload: body,
            signature: format!("v2,{} {ed_sig}", &ed_sig[4..]),
            valid: true,
        },
        // Negative cases.
        V {
            note: "v1a, body tampered with (one character changed after signing)",
            keys: &[ED_A],
            msg_id: id,
            timestamp: ts,
            now: ts,
            payload: r#"{"type":"contact.created","timestamp":"2022-11-03T20:26:10.344522Z","data":{"id":"1f81eb52-5198-4599-803e-771906343486"}}"#,
            signature: ed_sig.clone(),
            valid: false,
        },
        V {
            note: "v1, body tampered with (a space added after signing)",
            keys: &[HMAC_A],
            msg_id: id,
            timestamp: ts,
            now: ts,
            payload: r#"{"type": "contact.created","timestamp":"2022-11-03T20:26:10.344522Z","data":{"id":"1f81eb52-5198-4599-803e-771906343485"}}"#,
            signature: hmac_sig.clone(),
            valid: false,
        },
        V {
            note: "v1a, msg_id differs from the signed one",
            keys: &[ED_A],
            msg_id: "msg_2KWPBgLlAfxdpx2AI54pPJ85f4X",
            timestamp: ts,
            now: ts,
            payload: body,
            signature: ed_sig.clone(),
            valid: false,
        },
        V {
            note: "v1a, timestamp differs from the signed one (by one second)",
            keys: &[ED_A],
            msg_id: id,
            timestamp: ts + 1,
            now: ts,
            payload: body,
            signature: ed_sig.clone(),
            valid: false,
        },
        V {
            note: "v1a, signed with another key than the verifier's public key",
            keys: ed_c_keys,
            msg_id: id,
            timestamp: ts,
            now: ts,
            payload: body,
            signature: ed_sig.clone(),
            valid: false,
        },
        V {
            note: "v1, signed with another secret than the verifier's",
            keys: &[HMAC_B],
            msg_id: id,
            timestamp: ts,
            now: ts,
            payload: body,
            signature: hmac_sig.clone(),
            valid: false,
        },
        V {
            note: "v1a, stale: verified 301 s after it was sent",
            keys: &[ED_A],
            msg_id: id,
            timestamp: ts,
            now: ts + 301,
            payload: body,
            signature: ed_sig.clone(),
            valid: false,
        },
        V {
            note: "v1, stale: verified a day after it was sent",
            keys: &[HMAC_A],
            msg_id: id,
            timestamp: ts,
            now: ts + 86_400,
            payload: body,
            signature: hmac_sig.clone(),
            valid: false,
        },
        V {
            note: "v1a, timestamp 301 s ahead of the verifier's clock",
            keys: &[ED_A],
            msg_id: id,
            timestamp: ts,
            now: ts - 301,
            payload: body,
            signature: ed_sig.clone(),
            valid: false,
        },
        V {
            note: "v1a signature bytes labelled v1: the identifier decides the scheme",
            keys: &[ED_A],
            msg_id: id,
            timestamp: ts,
            now: ts,
            payload: body,
            signature: format!("v1,{}", &ed_sig[4..]),
            valid: false,
        },
        V {
            note: "v1 signature bytes labelled v1a, verifier holds the HMAC secret",
            keys: &[HMAC_A],
            msg_id: id,
            timestamp: ts,
            now: ts,
            payload: body,
            signature: format!("v1a,{}", &hmac_sig[3..]),
            valid: false,
        },
        V {
            note: "malformed: no comma between identifier and signature",
            keys: &[ED_A],
            msg_id: id,
            timestamp: ts,
            now: ts,
            payload: body,
            signature: ed_sig.replacen(',', "", 1),
            valid: false,
        },
        V {
            note: "malformed: signature not base64",
            keys: &[ED_A],
            msg_id: id,
            timestamp: ts,
            now: ts,
            payload: body,
            signature: "v1a,!!not-base64!!".into(),
            valid: false,
        },
        V {
            note: "malformed: ed25519 signature cut to 63 bytes",
            keys: &[ED_A],
            msg_id: id,
            timestamp: ts,
            now: ts,
            payload: body,
            signature: {
                let raw = B64.decode(&ed_sig[4..]).expect("own signature");
                format!("v1a,{}", B64.encode(&raw[..63]))
            },
            valid: false,
        },
        V {
            note: "malformed: empty identifier and signature",
            keys: &[ED_A],
            msg_id: id,
            timestamp: ts,
            now: ts,
            payload: body,
            signature: "v1a,".into(),
            valid: false,
        },
        V {
            note: "malformed: empty header",
            keys: &[HMAC_A],
            msg_id: id,
            timestamp: ts,
            now: ts,
            payload: body,
            signature: String::new(),
            valid: false,
        },
    ];
    // The Standard Webhooks known answers must be what this signer makes.
    for v in out.iter_mut().take(3) {
        assert_eq!(
            v.signature,
            key(v.keys[0]).sign(v.msg_id, v.timestamp, v.payload.as_bytes()),
            "{}",
            v.note
        );
    }
    out
}

fn document() -> String {
    let doc = json!({
        "version": 1,
        "description": "Standard Webhooks signature conformance vectors (v1: HMAC-SHA256, v1a: ed25519). \
            A vector is valid when some signature in `signature` (the webhook-signature header) verifies \
            with the vector's key (`secret`, or `public_key`) over `{msg_id}.{timestamp}.{payload}` \
            and |now - timestamp| <= 300. See README.md beside this file.",
        "vectors": vectors().iter().map(vector_json).collect::<Vec<_>>(),
    });
    let mut s = serde_json::to_string_pretty(&doc).expect("json");
    s.push('\n');
    s
}

#[test]
#[ignore = "writes tests/vectors/standard-webhooks.json"]
fn write_vectors() {
    std::fs::write(FILE, document()).expect("write the vectors file");
}

/// The committed file is what the signer makes from the fixed keys.
#[test]
fn vectors_file_is_what_the_signer_makes() {
    let on_disk = std::fs::read_to_string(FILE).expect("read the vectors file");
    assert!(
        on_disk == document(),
        "{FILE} differs from what the signer makes now (run the ignored write_vectors test, then review the diff)"
    );
}

/// Every vector, read from the file, verifies as `valid` says; every
/// signature of a valid single-signature v1a vector is the signer's own
/// answer for its private key; and the public key is that of the private key.
#[test]
fn every_vector_verifies_as_stated() {
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(FILE).expect("read")).expect("json");
    assert_eq!(doc["version"], 1);
    let list = doc["vectors"].as_array().expect("vectors");
    let (mut valid, mut invalid) = (0, 0);
    for (i, v) in list.iter().enumerate() {
        let field = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("vector {i}: {k}"));
        let int = |k: &str| v[k].as_i64().unwrap_or_else(|| panic!("vector {i}: {k}"));
        let keys = match field("scheme") {
            "v1" => vec![VerifyKey::parse(field("secret")).unwrap()],
            "v1a" => {
                assert_eq!(
                    public_key_of(field("private_key")).unwrap(),
                    field("public_key"),
                    "vector {i}"
                );
                vec![VerifyKey::parse(field("public_key")).unwrap()]
            }
            other => panic!("vector {i}: scheme {other}"),
        };
        let payload = field("payload").as_bytes();
        let got = verify(
            field("signature"),
            &keys,
            field("msg_id"),
            int("timestamp"),
            payload,
            int("now"),
        );
        let expected = v["valid"].as_bool().expect("valid");
        assert_eq!(
            got.is_ok(),
            expected,
            "vector {i} ({}): {got:?}",
            field("note")
        );
        if expected {
            valid += 1;
            // The signer's signature for this vector's own key is in the header.
            let own = match field("scheme") {
                "v1" => field("secret"),
                _ => field("private_key"),
            };
            let mine = key(own).sign(field("msg_id"), int("timestamp"), payload);
            assert!(
                field("signature").split(' ').any(|s| s == mine),
                "vector {i}: {mine} not in the header"
            );
        } else {
            invalid += 1;
        }
    }
    assert!(
        valid >= 10 && invalid >= 10,
        "{valid} valid, {invalid} invalid"
    );
}
