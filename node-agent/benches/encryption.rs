//! Micro-benchmarks of encryption at rest (see `node_agent::encryption`): what
//! sealing a value costs a PUT (`encryption/seal_1k`), and what opening it
//! costs an L2 hit (`encryption/open_1k`), for 1 KiB values; `encryption/
//! plain_1k` is the rule lookup of an entry that no rule names, the cost every
//! other PUT pays. L1 holds plaintext, so an L1 hit pays nothing.
//!
//! Run with `make bench`, or `cargo bench -p node-agent --bench encryption`.

use std::hint::black_box;

use base64::Engine;
use criterion::{criterion_group, criterion_main, Criterion};
use node_agent::encryption::{EncryptRule, Encryption};

fn bench_encryption(c: &mut Criterion) {
    let key = format!("k1:{}", base64::engine::general_purpose::STANDARD.encode([7u8; 32]));
    let rule = EncryptRule { tenant: "clinic".into(), keys: Some("patient:*".into()) };
    let encryption = Encryption::new(&[rule], Some(&key)).unwrap_or_else(|e| panic!("{e}"));
    let value = vec![b'x'; 1024];
    let (sealed, id) = encryption.seal("clinic", "patient:42", &value).unwrap_or_else(|| panic!("sealed"));
    let mut group = c.benchmark_group("encryption");
    group.bench_function("seal_1k", |b| {
        b.iter(|| encryption.seal(black_box("clinic"), "patient:42", black_box(&value)))
    });
    group.bench_function("open_1k", |b| {
        b.iter(|| encryption.open(black_box("clinic"), "patient:42", &id, black_box(&sealed)))
    });
    group
        .bench_function("plain_1k", |b| b.iter(|| encryption.seal(black_box("acme"), "patient:42", black_box(&value))));
    group.finish();
}

criterion_group!(benches, bench_encryption);
criterion_main!(benches);
