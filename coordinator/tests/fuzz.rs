//! Fuzz targets for what the coordinator parses from a request: event bodies
//! (one event or a batch) and their resolution through the rules, the
//! `/v1/invalidate` body, the query strings, and the ids that rules put into
//! patterns.
//!
//! bolero targets, run as ordinary tests: a short pass by default,
//! `DCC_FUZZ_SECS=N` for N seconds per target (`make fuzz`).

use serde_json::{json, Map, Value};

use coordinator::api::{parse_audit_query, parse_wait_query};
use coordinator::events::{parse_events, resolve_events, validate_selector, Event, InvalidateBody, MAX_BATCH};
use coordinator::rules::{escape_glob, Rule, RuleSet};
use shared::{glob, names};

#[path = "../../shared/tests/fuzz_support/mod.rs"]
mod fuzz_support;
use fuzz_support::spell;

/// Error codes of an event body (README, "Error codes").
const EVENT_PARSE_CODES: &[&str] = &["invalid_json", "invalid_event", "batch_too_large"];
/// Error codes of resolving valid events into an invalidation.
const EVENT_RESOLVE_CODES: &[&str] = &[
    "invalid_tenant",
    "invalid_entity",
    "invalid_id",
    "invalid_event_id",
    "invalid_tag",
    "invalid_key",
    "invalid_pattern",
    "confirm_required",
];
/// Error codes of a `/v1/invalidate` body that is JSON of the right shape.
const INVALIDATE_CODES: &[&str] =
    &["invalid_tenant", "invalid_key", "invalid_tag", "invalid_pattern", "confirm_required", "nothing_to_invalidate"];

fn rules() -> RuleSet {
    let rule = |entity: &str, tags: &[&str], patterns: &[&str], dependents: &[&str]| Rule {
        entity: entity.into(),
        tags: tags.iter().map(|s| s.to_string()).collect(),
        patterns: patterns.iter().map(|s| s.to_string()).collect(),
        dependents: dependents.iter().map(|s| s.to_string()).collect(),
    };
    RuleSet::new(vec![
        rule("supplier", &["supplier:{id}", "suppliers"], &["supplier:{id}:*", "suppliers:list:*"], &["invoice"]),
        rule("invoice", &["invoice:{id}"], &["invoices:*", "invoice:[{id}]"], &[]),
    ])
    .expect("valid rules")
}

// ---- Event bodies ---------------------------------------------------------------

const BODY_ALPHABET: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    " ",
    "\"tenant\"",
    "\"entity\"",
    "\"id\"",
    "\"op\"",
    "\"tags\"",
    "\"keys\"",
    "\"patterns\"",
    "\"event_id\"",
    "\"confirm\"",
    "\"acme\"",
    "\"supplier\"",
    "\"*\"",
    "42",
    "-1",
    "1e999",
    "true",
    "null",
    "\"\\u0000\"",
    "\"a b\"",
    "\"é\"",
];
const NAME_ALPHABET: &[&str] =
    &["a", "b", "1", "-", "_", ":", "*", "?", "[", "]", "\\", "^", ",", " ", "é", "\n", "\u{85}", "{", "}"];
/// Names that are mostly valid, so that whole batches resolve.
const SAFE_ALPHABET: &[&str] = &["a", "b", "1", "-", "_", "A", "z", "0", "a", "b", "a-b", "_1"];
const SAFE_PATTERN_ALPHABET: &[&str] = &["a", "b", ":", "*", "?", "é", "\\*", "[ab]", "[^a]", "[a-c]", "-"];

#[test]
fn fuzz_event_body() {
    let rules = rules();
    let seeds: [&[u8]; 10] = [
        b"",
        b"[]",
        b" [ ] ",
        b"\x0c[]",
        b"{",
        br#"{"tenant":"a","entity":"x"}"#,
        br#"[{"tenant":"a","entity":"x"},1]"#,
        br#"{"tenant":"a","entity":"x","id":1e999}"#,
        br#"{"tenant":"a","entity":"supplier","id":"a-]","patterns":["*"],"confirm":true}"#,
        &[b'['; 5000],
    ];
    for seed in seeds {
        check_event_body(seed, &rules);
    }
    let batch: Vec<Value> = (0..=MAX_BATCH).map(|_| json!({"tenant": "a", "entity": "x"})).collect();
    assert_eq!(parse_events(&serde_json::to_vec(&batch).expect("json")).unwrap_err().code, "batch_too_large");
    fuzz!((Vec<u8>, Vec<EventFields>, bool, u8)).for_each(|(raw, events, as_batch, mode)| {
        check_event_body(raw, &rules);
        check_event_body(spell(raw, BODY_ALPHABET).as_bytes(), &rules);
        // Events of the right shape parse, whatever their names; then they
        // resolve into valid selectors or are refused with a documented code.
        // Mostly names from the mostly valid alphabets, so that whole batches resolve.
        let safe = mode % 4 != 0;
        let events: Vec<Value> = events.iter().take(8).map(|e| event_json(e, safe)).collect();
        let unknown_field = events.iter().any(|e| e.get("typo").is_some());
        let body = match (events.as_slice(), as_batch) {
            ([one], false) => one.clone(),
            _ => Value::Array(events.clone()),
        };
        let bytes = serde_json::to_vec(&body).expect("json");
        match parse_events(&bytes) {
            Ok(parsed) => {
                assert!(!unknown_field && !events.is_empty());
                assert_eq!(parsed.len(), events.len());
                check_resolution(&parsed, &rules);
            }
            Err(e) => {
                let code = if events.is_empty() || unknown_field { "invalid_event" } else { "none" };
                assert_eq!(e.code, code, "{body}: {e:?}");
            }
        }
    });
}

/// Tenant, entity, id (a number or text), lists (tags, keys, patterns),
/// event id, and flags that pick known names and optional fields.
type EventFields = (Vec<u8>, Vec<u8>, Option<(bool, u64)>, Vec<Vec<u8>>, Option<Vec<u8>>, u8);

/// An event of the right shape, with names spelled from the fuzz input.
fn event_json((tenant, entity, id, lists, event_id, flags): &EventFields, safe: bool) -> Value {
    let (names, patterns) = if safe { (SAFE_ALPHABET, SAFE_PATTERN_ALPHABET) } else { (NAME_ALPHABET, NAME_ALPHABET) };
    let tenant = if flags & 1 == 1 || tenant.is_empty() { "acme".to_string() } else { spell(tenant, names) };
    let entity = match flags >> 1 & 3 {
        0 => "supplier".to_string(),
        1 => "invoice".to_string(),
        2 => "other".to_string(),
        _ => spell(entity, names),
    };
    let mut event = Map::new();
    event.insert("tenant".into(), tenant.into());
    event.insert("entity".into(), entity.into());
    match id {
        Some((true, n)) => event.insert("id".into(), (*n).into()),
        Some((false, n)) if n % 3 == 0 => event.insert("id".into(), json!(*n as f64 / 7.0)),
        Some((false, n)) => {
            let text = spell(&n.to_le_bytes()[..usize::from(*flags >> 5 & 3) + 1], names);
            event.insert("id".into(), text.into())
        }
        None => None,
    };
    for (i, list) in lists.iter().enumerate().take(3) {
        let alphabet = if i == 2 { patterns } else { names };
        let items: Vec<String> = list.chunks(3).map(|c| spell(c, alphabet)).filter(|s| !s.is_empty()).collect();
        event.insert(["tags", "keys", "patterns"][i].into(), items.into());
    }
    if let Some(event_id) = event_id {
        event.insert("event_id".into(), spell(event_id, names).into());
    }
    if flags & 8 == 8 {
        event.insert("confirm".into(), true.into());
    }
    if flags & 16 == 16 {
        event.insert("op".into(), "update".into());
    }
    if *flags == 0xff {
        event.insert("typo".into(), 1.into());
    }
    Value::Object(event)
}

/// Any bytes: events, or a documented refusal; events resolve or are refused.
fn check_event_body(body: &[u8], rules: &RuleSet) {
    match parse_events(body) {
        Ok(events) => {
            assert!((1..=MAX_BATCH).contains(&events.len()));
            check_resolution(&events, rules);
        }
        Err(e) => assert!(EVENT_PARSE_CODES.contains(&e.code), "{:?}: {e:?}", String::from_utf8_lossy(body)),
    }
}

fn check_resolution(events: &[Event], rules: &RuleSet) {
    match resolve_events(events, rules, "fuzz".into()) {
        Ok(request) => {
            let mut tenants: Vec<&str> = events.iter().map(|e| e.tenant.as_str()).collect();
            tenants.sort_unstable();
            tenants.dedup();
            assert_eq!(request.items.iter().map(|s| s.tenant.as_str()).collect::<Vec<_>>(), tenants);
            for item in &request.items {
                assert!(validate_selector(item, true).is_ok(), "{item:?}");
                assert!(item.cascade);
                for event in events.iter().filter(|e| e.tenant == item.tenant) {
                    assert!(event.tags.iter().all(|t| item.tags.contains(t)));
                    assert!(event.keys.iter().all(|k| item.keys.contains(k)));
                    assert!(event.patterns.iter().all(|p| item.patterns.contains(p)));
                }
            }
            let ids: Vec<(String, String)> =
                events.iter().filter_map(|e| e.event_id.as_ref().map(|id| (e.tenant.clone(), id.clone()))).collect();
            assert_eq!(request.event_ids, ids);
            for (_, id) in &request.event_ids {
                assert!((1..=256).contains(&id.len()) && !id.chars().any(char::is_control), "{id:?}");
            }
        }
        Err(e) => assert!(EVENT_RESOLVE_CODES.contains(&e.code), "{events:?}: {e:?}"),
    }
}

// ---- /v1/invalidate bodies --------------------------------------------------------

#[test]
fn fuzz_invalidate_body() {
    type Fields = (Vec<u8>, Vec<Vec<u8>>, (bool, bool, bool), Vec<u8>);
    fuzz!(Fields).for_each(|(tenant, lists, (cascade, dry_run, confirm), raw)| {
        check_invalidate_body(raw);
        check_invalidate_body(spell(raw, BODY_ALPHABET).as_bytes());
        let mut body = Map::new();
        body.insert("tenant".into(), spell(tenant, NAME_ALPHABET).into());
        for (i, list) in lists.iter().enumerate() {
            let items: Vec<String> = list.chunks(2).map(|c| spell(c, NAME_ALPHABET)).collect();
            body.insert(["keys", "tags", "patterns"][i % 3].into(), items.into());
        }
        body.insert("cascade".into(), (*cascade).into());
        body.insert("dry_run".into(), (*dry_run).into());
        body.insert("confirm".into(), (*confirm).into());
        let bytes = serde_json::to_vec(&Value::Object(body)).expect("json");
        assert!(check_invalidate_body(&bytes), "a body of the right shape parses");
    });
}

/// Whether it parsed; and if it did, it is a valid selector or refused with
/// a documented code.
fn check_invalidate_body(bytes: &[u8]) -> bool {
    let Ok(body) = serde_json::from_slice::<InvalidateBody>(bytes) else {
        return false;
    };
    match body.selector() {
        Ok(selector) => {
            assert!(validate_selector(&selector, body.confirm).is_ok());
            assert!(!selector.is_empty());
            assert_eq!(
                (&selector.tenant, &selector.keys, &selector.tags, &selector.patterns, selector.cascade),
                (&body.tenant, &body.keys, &body.tags, &body.patterns, body.cascade)
            );
        }
        Err(e) => assert!(INVALIDATE_CODES.contains(&e.code), "{body:?}: {e:?}"),
    }
    true
}

// ---- Query strings ----------------------------------------------------------------

const QUERY_ALPHABET: &[&str] = &[
    "wait",
    "timeout_ms",
    "tenant",
    "limit",
    "=",
    "&",
    "all",
    "ALL",
    "al%6C",
    "%61ll",
    "1",
    "0",
    "999",
    "600000",
    "600001",
    "18446744073709551616",
    "-1",
    "+1",
    "%FF",
    "%C3",
    "%A9",
    "+",
    "%20",
    "%",
    "a",
    "é",
    ";",
];

#[test]
fn fuzz_query_strings() {
    for seed in
        ["", "&", "wait", "wait=", "wait=all", "wait=all&wait=all", "timeout_ms=5", "wait=%FF", "%FF=all", "limit=0"]
    {
        check_wait(seed, 5000);
        check_audit(seed);
    }
    fuzz!((Vec<u8>, String, u64)).for_each(|(spelled, raw, dead_after)| {
        let spelled = spell(spelled, QUERY_ALPHABET);
        for query in [spelled.as_str(), raw.as_str()] {
            check_wait(query, 1000 + dead_after % 100_000);
            check_wait(query, *dead_after);
            check_audit(query);
        }
    });
}

/// Does some `name=value` of the query hold bytes that are not UTF-8 once
/// percent-decoded?
fn has_invalid_utf8(query: &str) -> bool {
    query.split('&').any(|pair| String::from_utf8(percent_decoded(pair)).is_err())
}

/// `%XX` as the byte XX; anything else as itself.
fn percent_decoded(raw: &str) -> Vec<u8> {
    let (bytes, mut out, mut i) = (raw.as_bytes(), Vec::new(), 0);
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).filter(|h| bytes[i] == b'%' && h.iter().all(u8::is_ascii_hexdigit));
        match hex.and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()) {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

fn check_wait(query: &str, dead_after: u64) {
    match parse_wait_query(query, dead_after) {
        Ok(None) => assert!(!query.split('&').any(|p| !p.is_empty()), "{query:?} asked for nothing"),
        Ok(Some(wait)) => {
            let ms = u64::try_from(wait.as_millis()).expect("bounded");
            assert!((1..=600_000).contains(&ms) || ms == dead_after.saturating_add(1000), "{query:?}: {wait:?}");
            assert!(!has_invalid_utf8(query), "{query:?}: bytes that are not UTF-8 were taken");
        }
        Err(e) => assert_eq!(e.code, "invalid_query", "{query:?}: {e:?}"),
    }
}

fn check_audit(query: &str) {
    match parse_audit_query(query) {
        Ok((tenant, limit)) => {
            assert!((1..=1000).contains(&limit), "{query:?}: {limit}");
            assert!(tenant.as_deref().is_none_or(|t| names::validate_tenant(t).is_ok()), "{query:?}: {tenant:?}");
            assert!(!has_invalid_utf8(query), "{query:?}: bytes that are not UTF-8 were taken");
        }
        Err(e) => assert!(e.code == "invalid_query" || e.code == "invalid_tenant", "{query:?}: {e:?}"),
    }
}

// ---- Ids in patterns ----------------------------------------------------------------

#[test]
fn fuzz_rule_ids() {
    fuzz!((String, Vec<u8>, String)).for_each(|(raw, spelled, other)| {
        let spelled = spell(spelled, NAME_ALPHABET);
        for id in [raw.as_str(), spelled.as_str()] {
            // An escaped id is a well-formed pattern that matches itself and
            // nothing else.
            let escaped = escape_glob(id);
            assert!(glob::check(&escaped).is_ok(), "{id:?} escaped to {escaped:?}");
            let pattern = format!("supplier:{escaped}");
            assert!(glob::matches(&pattern, &format!("supplier:{id}")), "{pattern:?}");
            assert_eq!(
                glob::matches(&pattern, &format!("supplier:{other}")),
                other == id,
                "{pattern:?} against {other:?}"
            );
            assert!(glob::matches(&format!("{pattern}:*"), &format!("supplier:{id}:{other}")));
        }
    });
}
