//! `make chaos`: the stale-read checker for as long as you like.
//!
//! `chaos [SECONDS]` (default 300, or `$CHAOS_SECS`) starts its own Redis,
//! coordinator and agents, runs readers, writers and fault injection, prints
//! the counts, and exits 1 if any read was stale.

use std::time::Duration;

use integration_tests::checker::{run, Options};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secs = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("CHAOS_SECS").ok())
        .map(|s| s.parse::<u64>())
        .transpose()
        .map_err(|e| anyhow::anyhow!("the duration must be a whole number of seconds: {e}"))?
        .unwrap_or(300);
    println!("stale-read checker: {secs} s of readers, writers and faults (Ctrl-C to abort)");
    let report = run(Options { duration: Duration::from_secs(secs), ..Options::default() }).await?;
    println!("{report}");
    if !report.stale.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
