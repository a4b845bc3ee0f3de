//! The stale-read checker (`integration_tests::checker`) as a test: readers,
//! writers with `wait=all` and every fault for about 50 s
//! (`DCC_CHECKER_SECS` to change it; `make chaos` for long runs). Its own test
//! binary, so that cargo runs it alone rather than beside other clusters.

use std::time::Duration;

use integration_tests::checker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stale_read_checker_counts_zero_under_every_fault() {
    let secs = std::env::var("DCC_CHECKER_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(50);
    let options = checker::Options { duration: Duration::from_secs(secs), ..checker::Options::default() };
    let report = checker::run(options).await.unwrap_or_else(|e| panic!("checker: {e:#}"));
    println!("{report}");
    assert!(report.stale.is_empty(), "{report}");
    // A busy 2-core machine manages about 1000 judged reads in 50 s; fewer
    // than 500 would mean the run was too starved to show anything.
    assert!(report.hits >= 500, "too few reads to mean anything: {report}");
    assert!(report.writes_acked >= 50, "too few acknowledged writes to mean anything: {report}");
    for kind in ["client_kill_pubsub", "output_buffer_overflow", "freeze_agent", "redis_restart", "coordinator_kill"] {
        assert!(report.faults.get(kind).is_some_and(|n| *n >= 1), "{kind} was never injected: {report}");
    }
}
