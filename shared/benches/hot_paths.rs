//! Micro-benchmarks of the shared hot paths every agent runs per invalidation:
//! glob matching of L1 keys (`glob/*`) and the invalidation message codec
//! (`message/*`).
//!
//! Run with `make bench`, or `cargo bench -p shared` (add `-- --quick` for a
//! fast, rougher pass). `cargo test --all-targets` runs each benchmark once.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use shared::glob;
use shared::protocol::{InvalidationMessage, MessageBody, Selector};

/// `(bench name, pattern, key, expected result)`.
const GLOB_CASES: &[(&str, &str, &str, bool)] = &[
    ("match_prefix", "suppliers:list:*", "suppliers:list:page=3&sort=name", true),
    ("nomatch_prefix", "suppliers:list:*", "supplier:42:detail", false),
    ("match_infix", "supplier:*:detail", "supplier:1234567:detail", true),
    // The star has to backtrack over the whole rest of the key before failing.
    ("nomatch_infix", "supplier:*:detail", "supplier:1234567:orders:page=2", false),
    ("match_question", "a?c*", "abc:some:longer:key", true),
    ("nomatch_question", "a?c*", "abd:some:longer:key", false),
];

fn bench_glob(c: &mut Criterion) {
    let mut group = c.benchmark_group("glob");
    for &(name, pattern, key, expected) in GLOB_CASES {
        assert_eq!(glob::matches(pattern, key), expected, "{pattern} against {key}");
        group.bench_function(name, |b| b.iter(|| glob::matches(black_box(pattern), black_box(key))));
    }
    group.finish();
}

/// A realistic invalidation: one selector with a few keys, tags and patterns.
fn sample_selectors() -> Vec<Selector> {
    vec![Selector {
        tenant: "acme".into(),
        keys: vec!["supplier:42:detail".into(), "supplier:42:orders".into(), "supplier:42:contacts".into()],
        tags: vec!["suppliers".into(), "supplier:42".into()],
        patterns: vec!["suppliers:list:*".into(), "supplier:42:orders:page=*".into()],
        cascade: true,
    }]
}

fn bench_message(c: &mut Criterion) {
    let selectors = sample_selectors();
    let body = MessageBody {
        ts_ms: 1_732_300_000_000,
        origin: "coordinator@cache-coord-0:8080",
        invalidations: &selectors,
        ack: false,
    };
    // The exact bytes an agent receives: the body plus the header the log-append script adds.
    let at = shared::protocol::Position {
        partition: 3,
        epoch: "8c1f5e0a9b7d4c3e2f1a0b9c8d7e6f5a".into(),
        seq: 17,
        nonce: "5be0c1d2e3f4a5b6".into(),
    };
    let wire = InvalidationMessage::assemble(&at, "a41c0d1e2f3a4b5c", &body).expect("the sample message encodes");
    let decoded = InvalidationMessage::decode(wire.as_bytes()).expect("the sample message decodes");
    assert_eq!(decoded.invalidations, selectors);

    let mut group = c.benchmark_group("message");
    group.bench_function("decode", |b| {
        b.iter(|| InvalidationMessage::decode(black_box(wire.as_bytes())).expect("the sample message decodes"))
    });
    // What an issuer serialises before the log-append script adds the header.
    group.bench_function("encode", |b| b.iter(|| black_box(&body).encode_tail()));
    group.finish();
}

criterion_group!(benches, bench_glob, bench_message);
criterion_main!(benches);
