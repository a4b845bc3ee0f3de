//! What every crate's fuzz targets (`tests/fuzz.rs` of `shared`, `coordinator`
//! and `node-agent`) share: how long a target runs, and how random bytes are
//! spelled into input a parser cares about. Included with `#[path]` (a test
//! crate cannot depend on another's files).

use std::time::Duration;

/// How long each target runs: `DCC_FUZZ_SECS` seconds, or a short default.
pub fn budget() -> Duration {
    std::env::var("DCC_FUZZ_SECS")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(Duration::from_millis(500), Duration::from_secs_f64)
}

/// A target over `T`, run for [`budget`].
#[macro_export]
macro_rules! fuzz {
    ($t:ty) => {
        bolero::check!().with_type::<$t>().with_test_time($crate::fuzz_support::budget())
    };
}

/// Bytes read through an alphabet, so that random input hits the characters
/// a parser cares about.
pub fn spell(bytes: &[u8], alphabet: &[&str]) -> String {
    bytes.iter().map(|&b| alphabet[usize::from(b) % alphabet.len()]).collect()
}
