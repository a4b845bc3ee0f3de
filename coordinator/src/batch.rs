//! Group commit: invalidations that arrive while others are running share
//! one trip through the invalidation path.
//!
//! Two *lanes* take requests from one queue (see [`LANES`]). A lane that
//! finds the queue empty runs the first request at once (no added latency
//! when idle); a lane that finds several waiting takes them all (up to
//! [`MAX_REQUESTS`]), merges them ([`invalidation::merge`]) and runs the
//! union once: one set of Redis calls, one seq, one broadcast for all of
//! them. That is how a stream of single events shares the Redis work and the
//! fan-out that batches share (each request still costs its own HTTP
//! exchange).
//!
//! A merged request answers every caller with the same seq; `invalidated` and
//! `l2_deleted` then describe the merged invalidation (for the caller's
//! tenants only). Retries of event ids already logged are answered on their
//! own, as duplicates, before merging.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use deadpool_redis::{Connection, Pool};
use shared::invalidation::{self, Outcome, Request};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Most requests merged into one invalidation.
pub const MAX_REQUESTS: usize = 256;
/// Merged invalidations that may run at once: two, so that a long one (a tag
/// of 100k keys takes most of a second) does not hold up every other; not
/// more, because fewer lanes merge more requests per seq, and every seq costs
/// a broadcast and an acknowledgement from every agent.
pub const LANES: usize = 2;

/// One request waiting for its outcome.
struct Job {
    request: Request,
    reply: oneshot::Sender<Result<Outcome, String>>,
}

/// The queue and its lanes.
pub struct Batcher {
    queue: mpsc::Sender<Job>,
    /// Taken by [`Batcher::start`]; until then requests run one by one.
    waiting: Mutex<Option<mpsc::Receiver<Job>>>,
    /// The lanes run.
    started: AtomicBool,
    pool: Pool,
    log_max_len: u64,
}

impl Batcher {
    /// A batcher over `pool`; it batches once [`Batcher::start`] runs its lanes.
    pub fn new(pool: Pool, log_max_len: u64) -> Batcher {
        let (queue, waiting) = mpsc::channel(4 * MAX_REQUESTS);
        Batcher { queue, waiting: Mutex::new(Some(waiting)), started: AtomicBool::new(false), pool, log_max_len }
    }

    /// Starts the lanes on the current runtime; they stop with `stop`.
    pub fn start(&self, stop: CancellationToken) {
        let Some(receiver) = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        self.started.store(true, Ordering::Release);
        let receiver = std::sync::Arc::new(tokio::sync::Mutex::new(receiver));
        for _ in 0..LANES {
            let (receiver, pool, stop) = (receiver.clone(), self.pool.clone(), stop.clone());
            let log_max_len = self.log_max_len;
            tokio::spawn(async move {
                // The lane keeps its connection between runs: a pooled checkout
                // costs a round trip (the pool pings a connection it hands out).
                // It is dropped after an error, and a fresh one taken.
                let mut conn: Option<Kept> = None;
                loop {
                    let jobs = tokio::select! {
                        jobs = take(&receiver) => jobs,
                        _ = stop.cancelled() => return,
                    };
                    match jobs {
                        Some(jobs) => run(&pool, &mut conn, log_max_len, jobs).await,
                        None => return,
                    }
                }
            });
        }
    }

    /// Runs a request through the invalidation path, possibly merged with others.
    pub async fn execute(&self, request: Request) -> Result<Outcome, String> {
        if !self.started.load(Ordering::Acquire) {
            let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
            return invalidation::execute(&mut conn, request, self.log_max_len).await.map_err(|e| e.to_string());
        }
        let (reply, outcome) = oneshot::channel();
        self.queue.send(Job { request, reply }).await.map_err(|_| "the coordinator is shutting down".to_string())?;
        outcome.await.map_err(|_| "the invalidation was abandoned (shutting down)".to_string())?
    }
}

/// The next request, and every other one already waiting (up to [`MAX_REQUESTS`]).
async fn take(receiver: &tokio::sync::Mutex<mpsc::Receiver<Job>>) -> Option<Vec<Job>> {
    let mut receiver = receiver.lock().await;
    let first = receiver.recv().await?;
    let mut jobs = vec![first];
    while jobs.len() < MAX_REQUESTS {
        match receiver.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
    Some(jobs)
}

/// A lane's connection and when it last served a run.
type Kept = (Connection, Instant);

/// A kept connection idle for longer than this goes back to the pool, and the
/// next run takes one through the pool's check: a connection Redis closed
/// meanwhile (a restart, an idle timeout) is then noticed before a run
/// depends on it. Under load a lane never idles that long.
const KEEP_IDLE: Duration = Duration::from_secs(1);

/// Runs one request as it is, or several merged, and answers each caller.
async fn run(pool: &Pool, lane_conn: &mut Option<Kept>, log_max_len: u64, jobs: Vec<Job>) {
    let kept = lane_conn.take().filter(|(_, used)| used.elapsed() < KEEP_IDLE);
    let mut conn = match kept {
        Some((conn, _)) => conn,
        None => match pool.get().await {
            Ok(conn) => conn,
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.to_string()));
                }
                return;
            }
        },
    };
    if run_on(&mut conn, log_max_len, jobs).await {
        *lane_conn = Some((conn, Instant::now()));
    }
}

/// [`run`] on a connection; false when Redis failed (the connection is then dropped).
async fn run_on(conn: &mut Connection, log_max_len: u64, mut jobs: Vec<Job>) -> bool {
    if jobs.len() == 1 {
        let job = jobs.remove(0);
        let outcome = invalidation::execute(conn, job.request, log_max_len).await;
        let ok = outcome.is_ok();
        let _ = job.reply.send(outcome.map_err(|e| e.to_string()));
        return ok;
    }

    // Retries of logged event ids: answered as duplicates, not merged.
    let ids: Vec<&[(String, String)]> = jobs.iter().map(|job| job.request.event_ids.as_slice()).collect();
    let logged = match invalidation::already_logged_each(conn, &ids).await {
        Ok(logged) => logged,
        Err(e) => {
            for job in jobs {
                let _ = job.reply.send(Err(e.to_string()));
            }
            return false;
        }
    };
    let (duplicates, fresh): (Vec<_>, Vec<_>) = jobs.into_iter().zip(logged).partition(|(_, seq)| seq.is_some());
    let mut healthy = true;
    if !duplicates.is_empty() {
        let head = shared::l2::head(conn).await.map_err(|e| e.to_string());
        healthy = head.is_ok();
        for (job, seq) in duplicates {
            let outcome = head.clone().map(|(epoch, _)| Outcome {
                epoch,
                seq: seq.unwrap_or_default(),
                duplicate: true,
                ..Outcome::default()
            });
            let _ = job.reply.send(outcome);
        }
    }
    let fresh: Vec<Job> = fresh.into_iter().map(|(job, _)| job).collect();
    if fresh.is_empty() {
        return healthy;
    }

    let tenants: Vec<HashSet<String>> =
        fresh.iter().map(|job| job.request.items.iter().map(|s| s.tenant.clone()).collect()).collect();
    let (requests, replies): (Vec<Request>, Vec<_>) = fresh.into_iter().map(|job| (job.request, job.reply)).unzip();
    let merged = invalidation::merge(requests);
    match invalidation::execute(conn, merged, log_max_len).await {
        Ok(outcome) => {
            for (reply, tenants) in replies.into_iter().zip(tenants) {
                let invalidated = outcome.invalidated.iter().filter(|s| tenants.contains(&s.tenant)).cloned().collect();
                let _ = reply.send(Ok(Outcome { invalidated, ..outcome.clone() }));
            }
            healthy
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.to_string()));
            }
            false
        }
    }
}
