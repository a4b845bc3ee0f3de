//! The stale-read checker (`integration_tests::checker`) as a test: readers,
//! writers with `wait=all` and every fault for 50 s, or longer on a starved
//! machine until it has done enough to mean something (`DCC_CHECKER_SECS` to
//! change it; `make chaos` for long runs). Its own test
//! binary, so that cargo runs it alone rather than beside other clusters.

use std::io::Write;
use std::time::Duration;

use integration_tests::checker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stale_read_checker_counts_zero_under_every_fault() {
    let secs = std::env::var("DCC_CHECKER_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(50);
    let options = checker::Options { duration: Duration::from_secs(secs), ..checker::Options::default() };
    let report = checker::run(options).await.unwrap_or_else(|e| panic!("checker: {e:#}"));
    // Written past the test harness's capture, so the counts show in every run.
    let _ = writeln!(std::io::stderr(), "{report}");
    assert!(report.stale.is_empty(), "{report}");
    // The run goes on past its duration until it has done this much (see
    // `checker::Options`): fewer means even 300 s were too starved to show anything.
    let options = checker::Options::default();
    assert!(report.hits >= options.min_reads, "too few reads to mean anything: {report}");
    assert!(report.writes_acked >= options.min_writes, "too few acknowledged writes to mean anything: {report}");
    for kind in checker::faults() {
        assert!(report.faults.get(kind).is_some_and(|n| *n >= 1), "{kind} was never injected: {report}");
    }
}
