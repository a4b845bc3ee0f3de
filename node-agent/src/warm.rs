//! Warm start (contract v2, section 4): an agent that starts, or that dropped
//! a partition's tenants from L1 (a gap it could not replay, a new epoch, a
//! fork), loads the cluster's hottest keys from L2 into L1 before it reports
//! ready, so that its first reads are hits instead of a burst of misses.
//!
//! - The hot set is learned from the agents' hits in either layer: each
//!   agent adds its counts every two seconds (`shared::hot::report`, called
//!   by the heartbeat), and Redis halves every score once a minute.
//! - A warm-up waits until the partitions it fills are proven in sync (L1
//!   takes nothing it could not serve), then reads the `warm_keys` hottest
//!   keys of those partitions through the ordinary L2 read (epoch stamp,
//!   fork check, fill guard), [`IN_FLIGHT`] at a time on the agent's pool:
//!   pipelined, and no herd on L2 when ten agents start at once.
//! - It is bounded by `warm_timeout_ms`: a slow or absent Redis delays
//!   readiness by that much at most. Until it ends, `/readyz` says `warming`.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::agent::Agent;

/// L2 reads a warm-up keeps in flight.
pub const IN_FLIGHT: usize = 32;

/// Runs the warm-ups: one at start, then one for the partitions of each
/// flush, until `shutdown`.
pub async fn warm_loop(agent: Agent, shutdown: CancellationToken) {
    let inner = agent.inner();
    loop {
        let partitions: BTreeSet<u16> = inner.warm.take();
        if !partitions.is_empty() {
            tokio::select! {
                loaded = warm(&agent, &partitions) => {
                    if let Some((loaded, took)) = loaded {
                        info!(loaded, partitions = partitions.len(), ms = took.as_millis() as u64, "L1 warmed with the cluster's hot keys");
                    }
                }
                _ = shutdown.cancelled() => return,
            }
            inner.warm.done();
            continue;
        }
        tokio::select! {
            _ = inner.warm.requested.notified() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// One warm-up of `partitions`: the entries loaded and the time it took, or
/// `None` when it was cut short (the deadline, Redis away).
async fn warm(agent: &Agent, partitions: &BTreeSet<u16>) -> Option<(usize, Duration)> {
    let inner = agent.inner();
    let s = agent.settings();
    let started = Instant::now();
    let deadline = started + Duration::from_millis(s.warm_timeout_ms);
    if s.warm_keys == 0 {
        return Some((0, Duration::ZERO));
    }
    // L1 takes entries only for partitions proven in sync.
    while !partitions.iter().all(|p| inner.sync.in_sync(*p)) {
        if Instant::now() >= deadline {
            warn!("warm-up skipped: the partitions were not in sync within warm_timeout_ms");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hottest = async {
        let mut conn = inner.store.get().await.ok()?;
        shared::hot::hottest(&mut conn, s.warm_keys).await.ok()
    };
    let Ok(Some(hottest)) = tokio::time::timeout_at(deadline, hottest).await else {
        warn!("warm-up skipped: the hot set could not be read");
        return None;
    };
    let keys: Vec<(String, String)> =
        hottest.into_iter().filter(|(tenant, _)| partitions.contains(&inner.layout.of(tenant).index)).collect();
    let loads =
        futures_util::stream::iter(keys).map(|(tenant, key)| async move { agent.warm_one(&tenant, &key).await });
    let mut loads = loads.buffer_unordered(IN_FLIGHT);
    let mut loaded = 0;
    loop {
        match tokio::time::timeout_at(deadline, loads.next()).await {
            Ok(Some(true)) => loaded += 1,
            Ok(Some(false)) => {}
            Ok(None) => break,
            Err(_) => {
                warn!(loaded, "warm-up cut short by warm_timeout_ms");
                inner.metrics.warm_loaded.inc_by(loaded as u64);
                return None;
            }
        }
    }
    inner.metrics.warm_loaded.inc_by(loaded as u64);
    let took = started.elapsed();
    inner.metrics.warm_seconds.set(took.as_secs_f64());
    Some((loaded, took))
}
