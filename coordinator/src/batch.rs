//! Group commit, per partition: invalidations of one partition that arrive
//! while another of that partition is running share one trip through the
//! invalidation path.
//!
//! Each partition has a queue and a *lane* ([`lane`]), a task that takes the
//! queue's requests. A lane that finds its queue empty runs the first request
//! at once (no added latency when idle); a lane that finds several waiting
//! takes them all (up to [`MAX_REQUESTS`]), merges them ([`merge`]) and runs
//! the union once: one set of Redis calls, one seq, one broadcast for all of
//! them. Lanes of different partitions run side by side, so on a Redis
//! Cluster the throughput grows with the masters; a long invalidation (a tag
//! of 100k keys) holds up its own partition only.
//!
//! A merged request answers every caller with the same position;
//! `invalidated` and `l2_deleted` then describe the merged invalidation (for
//! the caller's tenants only). Retries of event ids already logged are
//! answered on their own, as duplicates, before merging.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::RedisError;
use shared::invalidation::{self, InvalidationError, LogSettings, NotReplicated, Outcome, Request};
use shared::schema::{Layout, Partition};
use shared::store::{Conn, Store};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Most requests merged into one invalidation.
pub const MAX_REQUESTS: usize = 256;

/// Why a request through the batcher failed; every caller of a merged run
/// gets the same error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    /// Redis failed or is unreachable: it may be partly done.
    #[error("{0}")]
    Redis(Arc<RedisError>),
    /// Logged, but not held by enough replicas in time.
    #[error(transparent)]
    NotReplicated(NotReplicated),
    /// The coordinator is stopping.
    #[error("the coordinator is shutting down")]
    ShuttingDown,
}

impl From<InvalidationError> for BatchError {
    fn from(e: InvalidationError) -> Self {
        match e {
            InvalidationError::Redis(e) => BatchError::Redis(Arc::new(e)),
            InvalidationError::NotReplicated(e) => BatchError::NotReplicated(e),
        }
    }
}

impl From<RedisError> for BatchError {
    fn from(e: RedisError) -> Self {
        BatchError::Redis(Arc::new(e))
    }
}

/// One request waiting for its outcome.
struct Job {
    request: Request,
    reply: oneshot::Sender<Result<Outcome, BatchError>>,
}

/// The queues, one per partition, and their lanes once started.
pub struct Batcher {
    queues: Vec<mpsc::Sender<Job>>,
    /// Taken by [`Batcher::start`].
    waiting: Mutex<Option<Vec<mpsc::Receiver<Job>>>>,
    store: Store,
    layout: Layout,
    log: LogSettings,
}

impl Batcher {
    /// A batcher over `store`; requests wait in their queue until
    /// [`Batcher::start`] runs the lanes.
    pub fn new(store: Store, layout: Layout, log: LogSettings) -> Batcher {
        let (queues, waiting) = (0..layout.count()).map(|_| mpsc::channel(4 * MAX_REQUESTS)).unzip();
        Batcher { queues, waiting: Mutex::new(Some(waiting)), store, layout, log }
    }

    /// Starts one lane per partition on the current runtime; they stop with `stop`.
    pub fn start(&self, stop: CancellationToken) -> Vec<JoinHandle<()>> {
        let Some(receivers) = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Vec::new();
        };
        receivers
            .into_iter()
            .enumerate()
            .map(|(p, receiver)| {
                let partition = self.layout.get(p as u16).clone();
                tokio::spawn(lane(receiver, self.store.clone(), partition, self.log.clone(), stop.clone()))
            })
            .collect()
    }

    /// Runs one partition's part of a request through the invalidation path,
    /// possibly merged with others of that partition.
    pub async fn execute(&self, partition: u16, request: Request) -> Result<Outcome, BatchError> {
        let queue = self.queues.get(usize::from(partition)).ok_or(BatchError::ShuttingDown)?;
        let (reply, outcome) = oneshot::channel();
        queue.send(Job { request, reply }).await.map_err(|_| BatchError::ShuttingDown)?;
        outcome.await.map_err(|_| BatchError::ShuttingDown)?
    }
}

/// A lane: takes its partition's requests, runs them (merged when several
/// wait), and answers each caller, until `stop`.
///
/// The lane keeps its connection between runs: a pooled checkout costs a
/// round trip (the pool pings a connection it hands out). It is dropped after
/// an error, or after [`KEEP_IDLE`] unused, and a fresh one taken.
async fn lane(
    mut receiver: mpsc::Receiver<Job>,
    store: Store,
    partition: Partition,
    log: LogSettings,
    stop: CancellationToken,
) {
    let mut kept: Option<(Conn, Instant)> = None;
    loop {
        let first = tokio::select! {
            job = receiver.recv() => job,
            _ = stop.cancelled() => return,
        };
        let Some(first) = first else { return };
        let mut jobs = vec![first];
        while jobs.len() < MAX_REQUESTS {
            match receiver.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        // Under Sentinel, a connection to a primary that is no longer one is not kept.
        let conn = match kept.take().filter(|(conn, used)| used.elapsed() < KEEP_IDLE && store.is_current(conn)) {
            Some((conn, _)) => Ok(conn),
            None => store.writer().await.map_err(|e| BatchError::Redis(Arc::new(e.into()))),
        };
        match conn {
            Ok(mut conn) => {
                if run_jobs(&store, &mut conn, &partition, &log, jobs).await {
                    kept = Some((conn, Instant::now()));
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// A kept connection idle for longer than this goes back to the pool, and the
/// next run takes one through the pool's check: a connection Redis closed
/// meanwhile (a restart, an idle timeout) is then noticed before a run
/// depends on it. Under load a lane never idles that long.
const KEEP_IDLE: Duration = Duration::from_secs(1);

/// Runs one request as it is, or several merged, and answers each caller.
/// Returns false when Redis failed (the connection is then dropped).
async fn run_jobs(
    store: &Store,
    conn: &mut Conn,
    partition: &Partition,
    log: &LogSettings,
    mut jobs: Vec<Job>,
) -> bool {
    if jobs.len() == 1 {
        let job = jobs.remove(0);
        let outcome = invalidation::execute(conn, partition, job.request, log).await.map_err(BatchError::from);
        let outcome = confirm_primary(store, conn, outcome).await;
        let healthy = !matches!(outcome, Err(BatchError::Redis(_)));
        let _ = job.reply.send(outcome);
        return healthy;
    }

    // Retries of logged event ids: answered as duplicates, not merged
    // (step 1 of the path, for every request at once).
    let ids: Vec<&[(String, String)]> = jobs.iter().map(|job| job.request.event_ids.as_slice()).collect();
    let logged = match invalidation::already_logged_each(conn, partition, &ids).await {
        Ok(logged) => logged,
        Err(e) => {
            let e = BatchError::from(e);
            for job in jobs {
                let _ = job.reply.send(Err(e.clone()));
            }
            return false;
        }
    };
    let mut healthy = true;
    let mut fresh = Vec::with_capacity(jobs.len());
    for (job, seq) in jobs.into_iter().zip(logged) {
        match seq {
            Some(seq) => {
                let outcome = invalidation::answer_duplicate(conn, partition, seq, log).await.map_err(BatchError::from);
                healthy &= !matches!(outcome, Err(BatchError::Redis(_)));
                let _ = job.reply.send(outcome);
            }
            None => fresh.push(job),
        }
    }
    if fresh.is_empty() {
        return healthy;
    }

    let tenants: Vec<HashSet<String>> =
        fresh.iter().map(|job| job.request.items.iter().map(|s| s.tenant.clone()).collect()).collect();
    let (requests, replies): (Vec<Request>, Vec<_>) = fresh.into_iter().map(|job| (job.request, job.reply)).unzip();
    let outcome = invalidation::execute(conn, partition, merge(requests), log).await.map_err(BatchError::from);
    match confirm_primary(store, conn, outcome).await {
        Ok(outcome) => {
            for (reply, tenants) in replies.into_iter().zip(tenants) {
                let invalidated = outcome.invalidated.iter().filter(|s| tenants.contains(&s.tenant)).cloned().collect();
                let _ = reply.send(Ok(Outcome {
                    position: outcome.position.clone(),
                    invalidated,
                    l2_deleted: outcome.l2_deleted,
                    duplicate: false,
                }));
            }
            healthy
        }
        Err(e) => {
            let redis_failed = matches!(e, BatchError::Redis(_));
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
            healthy && !redis_failed
        }
    }
}

/// Under Sentinel, an outcome counts only if the node it was written to is
/// still the primary (see [`Store::still_primary`]); otherwise it is a Redis
/// failure for the caller to retry.
async fn confirm_primary(
    store: &Store,
    conn: &Conn,
    outcome: Result<Outcome, BatchError>,
) -> Result<Outcome, BatchError> {
    let outcome = outcome?;
    match store.still_primary(conn).await {
        Ok(true) => Ok(outcome),
        Ok(false) => Err(BatchError::Redis(Arc::new(RedisError::from((
            redis::ErrorKind::Io,
            "the primary changed during the invalidation (a failover): it may be lost; retry it",
        ))))),
        Err(e) => Err(e.into()),
    }
}

/// Merges requests into one, for group commit: per tenant and `cascade`, the
/// union of their keys, tags and patterns (first occurrence order; cascading
/// selectors before the others), and all their event ids. Invalidating the
/// union invalidates everything each one covers. The origin is the first request's.
pub fn merge(requests: Vec<Request>) -> Request {
    let mut merged = Request::default();
    for (i, request) in requests.into_iter().enumerate() {
        if i == 0 {
            merged.origin = request.origin;
        }
        merged.event_ids.extend(request.event_ids);
        // One waiting caller is enough for the merged message to ask for acknowledgements.
        merged.ack |= request.ack;
        for item in request.items {
            match merged.items.iter_mut().find(|m| m.tenant == item.tenant && m.cascade == item.cascade) {
                Some(m) => {
                    m.keys.extend(item.keys);
                    m.tags.extend(item.tags);
                    m.patterns.extend(item.patterns);
                }
                None => merged.items.push(item),
            }
        }
    }
    for item in &mut merged.items {
        for list in [&mut item.keys, &mut item.tags, &mut item.patterns] {
            let mut seen = HashSet::new();
            list.retain(|x| seen.insert(x.clone()));
        }
    }
    // Cascading selectors run first: a tenant's tag or pattern drained without
    // cascade first would leave the cascading one nothing to follow, and the
    // dependents in L2.
    merged.items.sort_by_key(|item| !item.cascade);
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::protocol::Selector;

    fn selector(tenant: &str, keys: &[&str], tags: &[&str], cascade: bool) -> Selector {
        Selector {
            tenant: tenant.into(),
            keys: keys.iter().map(|s| s.to_string()).collect(),
            tags: tags.iter().map(|s| s.to_string()).collect(),
            patterns: Vec::new(),
            cascade,
        }
    }

    #[test]
    fn merging_unites_selectors_per_tenant_and_cascade() {
        let a = Request {
            items: vec![selector("acme", &["k1", "k2"], &["t1"], true), selector("globex", &["g"], &[], true)],
            event_ids: vec![("acme".into(), "e1".into())],
            origin: "c1".into(),
            ack: false,
        };
        let b = Request {
            items: vec![selector("acme", &["k2", "k3"], &["t1", "t2"], true), selector("acme", &["x"], &[], false)],
            event_ids: vec![("acme".into(), "e2".into())],
            origin: "c2".into(),
            ack: true,
        };
        let merged = merge(vec![a, b]);
        assert_eq!(merged.origin, "c1");
        assert!(merged.ack, "one waiting caller makes the merged message ask for acknowledgements");
        assert_eq!(merged.event_ids.len(), 2);
        assert_eq!(merged.items.len(), 3);
        assert_eq!(merged.items[0].keys, ["k1", "k2", "k3"]);
        assert_eq!(merged.items[0].tags, ["t1", "t2"]);
        assert_eq!(merged.items[1].tenant, "globex");
        assert_eq!((merged.items[2].keys.clone(), merged.items[2].cascade), (vec!["x".to_string()], false));
    }

    #[test]
    fn merging_puts_cascading_selectors_first() {
        // Drained without cascade first, a tag would leave the cascading
        // selector of the same tag no members to follow to their dependents.
        let plain = Request { items: vec![selector("acme", &[], &["t"], false)], ..Request::default() };
        let cascading = Request { items: vec![selector("acme", &[], &["t"], true)], ..Request::default() };
        let merged = merge(vec![plain, cascading]);
        assert_eq!(merged.items.iter().map(|s| s.cascade).collect::<Vec<_>>(), [true, false]);
    }
}
