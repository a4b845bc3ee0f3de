//! Fuzz targets for what the cache API parses from a request: the path
//! (`/v1/cache/{tenant}/{key}`, percent-encoded) and the PUT query string.
//!
//! bolero targets, run as ordinary tests: a short pass by default,
//! `DCC_FUZZ_SECS=N` for N seconds per target (`make fuzz`).

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use node_agent::api::{parse_put_query, split_cache_path};

#[path = "../../shared/tests/fuzz_support/mod.rs"]
mod fuzz_support;
use fuzz_support::spell;

/// Strict percent-decoding: `None` when the bytes are not UTF-8.
fn decoded(raw: &str) -> Option<String> {
    percent_decode_str(raw).decode_utf8().ok().map(|s| s.into_owned())
}

// ---- Path -----------------------------------------------------------------------

const PATH_ALPHABET: &[&str] = &[
    "/", "/", "a", "Z", "0", "-", "_", ":", "%", "%2F", "%2f", "%25", "%20", "%FF", "%C3", "%A9", "%C3%A9", "é", "?",
    "+",
];

#[test]
fn fuzz_cache_path() {
    for seed in
        ["", "/", "/v1/cache/", "/v1/cache/a", "/v1/cache/a/", "/v1/cache//k", "/v1/cache/%FF/k", "/v1/cache/a/%"]
    {
        check_path(seed);
    }
    fuzz!((Vec<u8>, String, String, String)).for_each(|(spelled, raw, tenant, key)| {
        check_path(&format!("/v1/cache/{}", spell(spelled, PATH_ALPHABET)));
        check_path(raw);
        // What a client encodes decodes to what it meant; a key may keep its
        // slashes, a tenant may not.
        const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_');
        const KEY: &AsciiSet = &SEGMENT.remove(b'/').remove(b':');
        let path = format!("/v1/cache/{}/{}", utf8_percent_encode(tenant, SEGMENT), utf8_percent_encode(key, KEY));
        let (t, k) = split_cache_path(&path).unwrap_or_else(|e| panic!("{path:?}: {e:?}"));
        assert_eq!((t.as_ref(), k.as_ref()), (tenant.as_str(), key.as_str()), "{path:?}");
    });
}

fn check_path(path: &str) {
    match split_cache_path(path) {
        Ok((tenant, key)) => {
            let rest = path.strip_prefix("/v1/cache/").expect("only cache paths split");
            let (raw_tenant, raw_key) = rest.split_once('/').expect("a tenant and a key");
            assert_eq!(Some(tenant.into_owned()), decoded(raw_tenant), "{path:?}");
            assert_eq!(Some(key.into_owned()), decoded(raw_key), "{path:?}");
        }
        Err(e) => {
            assert!(e.code == "invalid_key" || e.code == "invalid_tenant", "{path:?}: {e:?}");
            if let Some((raw_tenant, raw_key)) = path.strip_prefix("/v1/cache/").and_then(|r| r.split_once('/')) {
                let expected = if decoded(raw_tenant).is_none() { "invalid_tenant" } else { "invalid_key" };
                assert!(decoded(raw_tenant).is_none() || decoded(raw_key).is_none(), "{path:?} refused: {e:?}");
                assert_eq!(e.code, expected, "{path:?}");
            }
        }
    }
}

// ---- PUT query ------------------------------------------------------------------

const QUERY_ALPHABET: &[&str] = &[
    "ttl",
    "tags",
    "depends_on",
    "fill_token",
    "ttl=",
    "tags=",
    "depends_on=",
    "fill_token=",
    "=",
    "&",
    "&",
    ",",
    "+",
    "%",
    "%2",
    "%2B",
    "%2C",
    "%26",
    "%3D",
    "%20",
    "%FF",
    "%C3",
    "%A9",
    "%C3%A9",
    "0",
    "1",
    "9",
    "-1",
    "a",
    "é",
    " ",
    "18446744073709551616",
];

#[test]
fn fuzz_put_query() {
    for seed in ["", "&", "ttl", "ttl=0", "ttl=1", "ttl=%31", "tags=a,,b", "tags=%FF", "%FF=1", "x=1", "fill_token=%"] {
        check_query(seed);
    }
    type Input = (Vec<u8>, String, Option<u64>, Vec<String>, Vec<String>, Option<String>, u8);
    fuzz!(Input).for_each(|(spelled, raw, ttl, tags, deps, token, layout)| {
        check_query(&spell(spelled, QUERY_ALPHABET));
        check_query(raw);
        // A query that a client encodes reads back as it meant it: lists
        // split over repeated parameters, `+` or `%20` for a space.
        let item = |s: &String| Some(s.replace(',', ";")).filter(|s| !s.is_empty());
        let tags: Vec<String> = tags.iter().filter_map(item).collect();
        let deps: Vec<String> = deps.iter().filter_map(item).collect();
        let encode = |s: &str| {
            let encoded = utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
            if layout & 1 == 1 {
                encoded.replace("%20", "+")
            } else {
                encoded
            }
        };
        let mut pairs = Vec::new();
        if let Some(ttl) = ttl {
            pairs.push(format!("ttl={}", ttl.max(&1)));
        }
        let split = usize::from(*layout >> 1) % (tags.len() + 1);
        for part in [&tags[..split], &tags[split..]] {
            if !part.is_empty() || layout & 2 == 2 {
                pairs.push(format!("tags={}", part.iter().map(|t| encode(t)).collect::<Vec<_>>().join(",")));
            }
        }
        for dep in &deps {
            pairs.push(format!("depends_on={}", encode(dep)));
        }
        if let Some(token) = token {
            pairs.push(format!("fill_token={}", encode(token)));
        }
        if layout & 4 == 4 {
            pairs.reverse();
        }
        let query = pairs.join(if layout & 8 == 8 { "&&" } else { "&" });
        let put = parse_put_query(&query).unwrap_or_else(|e| panic!("{query:?}: {e:?}"));
        assert_eq!(put.ttl_secs, ttl.map(|t| t.max(1)), "{query:?}");
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        assert_eq!(sorted(put.tags), sorted(tags), "{query:?}");
        assert_eq!(sorted(put.depends_on), sorted(deps), "{query:?}");
        assert_eq!(&put.fill_token, token, "{query:?}");
    });
}

/// Never a panic; an answer only from what the query says; UTF-8 or refused.
fn check_query(query: &str) {
    let components: Vec<(&str, &str)> =
        query.split('&').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, ""))).collect();
    let text = |raw: &str| decoded(&raw.replace('+', " "));
    let all_utf8 = components.iter().all(|(n, v)| text(n).is_some() && text(v).is_some());
    match parse_put_query(query) {
        Ok(put) => {
            assert!(all_utf8, "{query:?}: a component that is not UTF-8 was taken");
            assert!(put.ttl_secs.is_none_or(|t| t >= 1), "{query:?}: {put:?}");
            assert!(put.value.is_empty() && put.content_type.is_empty());
            let values = |name: &str| -> Vec<String> {
                components
                    .iter()
                    .filter(|(n, _)| text(n).as_deref() == Some(name))
                    .filter_map(|(_, v)| text(v))
                    .filter(|v| !v.is_empty())
                    .flat_map(|v| v.split(',').map(str::to_string).collect::<Vec<_>>())
                    .collect()
            };
            assert_eq!(put.tags, values("tags"), "{query:?}");
            assert_eq!(put.depends_on, values("depends_on"), "{query:?}");
            let names: Vec<String> = components.iter().filter_map(|(n, _)| text(n)).collect();
            assert!(names.iter().all(|n| ["ttl", "tags", "depends_on", "fill_token"].contains(&n.as_str())));
            assert_eq!(put.fill_token.is_some(), names.iter().any(|n| n == "fill_token"), "{query:?}");
        }
        Err(e) => {
            assert!(e.code == "invalid_query" || e.code == "invalid_ttl", "{query:?}: {e:?}");
        }
    }
}
