//! The audit trail, shared by every process: who invalidated or wiped what,
//! and every request refused for want of a token (401) or of a right (403).
//!
//! - Each audited request is one JSON [`Entry`] in a capped Redis stream in
//!   the control slot ([`crate::schema::AUDIT`], at most [`MAX_ENTRIES`]),
//!   written by the process that answered, after it answered, and also
//!   logged as a tracing event (target `audit`), so that the trail survives
//!   in the logs when Redis cannot take it.
//! - [`Trail::record`] never delays or fails the request: the write runs on
//!   its own task.
//! - [`read`] serves `GET /v1/audit` (coordinator, admin): newest first,
//!   filtered by tenant.
//! - [`refusals`] is the middleware that records every 401 and 403 of a
//!   process, whichever layer answered it.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage};
use redis::aio::ConnectionLike;
use redis::RedisResult;
use serde::{Deserialize, Serialize};

use crate::auth::Caller;
use crate::protocol::{now_ms, Selector};
use crate::schema::AUDIT;
use crate::service::ApiError;
use crate::store::Store;

/// The trail keeps about this many entries (`XADD MAXLEN ~`).
pub const MAX_ENTRIES: u64 = 100_000;

/// One audited request, as `GET /v1/audit` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = AuditEntry)]
pub struct Entry {
    /// When it was recorded (Unix ms): Redis's clock, from the stream entry's
    /// id, once read back, so that the trail's order and its times agree.
    pub ts_ms: u64,
    /// The token's name; `null` when authentication is off, or none was given.
    pub token: Option<String>,
    /// `event`, `invalidate`, `delete`, `wipe`, `refused`, or `source` (a
    /// transaction read from a database's commit log).
    pub action: String,
    /// The tenants it named.
    pub tenants: Vec<String>,
    /// What it covered.
    pub keys: Vec<String>,
    /// See `keys`.
    pub tags: Vec<String>,
    /// See `keys`.
    pub patterns: Vec<String>,
    /// Where it was logged, when one partition was touched.
    pub seq: Option<u64>,
    /// The HTTP status answered.
    pub status: u16,
    /// The process that answered.
    pub node: String,
    /// The request, for refusals: method and path; for `source`, the
    /// transaction's event id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// Why it was refused, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Entry {
    /// An invalidation of `items` (`action`: `event`, `invalidate` or
    /// `delete`; `wipe` when one of them covers a whole tenant).
    pub fn invalidation(action: &str, caller: &Caller, items: &[Selector]) -> Entry {
        Entry::of(action, caller.name().map(str::to_string), items)
    }

    /// An invalidation of `items` by `token` (a caller's, or a process's own
    /// such as `source:{slot}`).
    pub fn of(action: &str, token: Option<String>, items: &[Selector]) -> Entry {
        let mut entry = Entry {
            ts_ms: now_ms(),
            token,
            action: if items.iter().any(Selector::wipes_tenant) { "wipe".into() } else { action.into() },
            ..Entry::default()
        };
        for item in items {
            entry.tenants.push(item.tenant.clone());
            entry.keys.extend(item.keys.iter().cloned());
            entry.tags.extend(item.tags.iter().cloned());
            entry.patterns.extend(item.patterns.iter().cloned());
        }
        entry.tenants.dedup();
        entry
    }

    /// The outcome: its status and, for a failure, why.
    pub fn answered(mut self, status: u16, seq: Option<u64>, failure: Option<&ApiError>) -> Entry {
        self.status = status;
        self.seq = seq;
        self.reason = failure.map(|e| format!("{}: {}", e.code, e.message));
        self
    }
}

/// Where a process writes its audit entries.
#[derive(Clone)]
pub struct Trail {
    queue: tokio::sync::mpsc::Sender<String>,
    node: String,
}

/// Entries waiting for the writer; beyond this (Redis away for long under
/// load) an entry is kept in the log only.
const QUEUE: usize = 10_000;

/// Most entries one write sends (one pipeline, one round trip).
const BATCH: usize = 256;

impl Trail {
    /// A trail written through `store`, signed `node`. Starts its writer
    /// task, which ends when the last clone of the trail is dropped; call it
    /// within a tokio runtime.
    pub fn new(store: Store, node: String) -> Trail {
        let (queue, entries) = tokio::sync::mpsc::channel(QUEUE);
        tokio::spawn(write_entries(store, entries));
        Trail { queue, node }
    }

    /// Records `entry` (signed by this process) without waiting for Redis.
    pub fn record(&self, mut entry: Entry) {
        entry.node = self.node.clone();
        let json = serde_json::to_string(&entry).unwrap_or_default();
        tracing::info!(target: "audit", entry = %json, "audit");
        if let Err(e) = self.queue.try_send(json) {
            tracing::warn!(entry = %e.into_inner(), "the audit writer is behind: the entry is kept in the log only");
        }
    }
}

/// The trail's writer: takes the entries waiting (up to [`BATCH`]) and adds
/// them to the stream in one pipeline, on a connection it keeps (no pool
/// checkout per entry). Entries that could not be written are in the log
/// already; they are reported and not retried.
async fn write_entries(store: Store, mut entries: tokio::sync::mpsc::Receiver<String>) {
    let mut connection: Option<(crate::store::SharedConn, u64)> = None;
    let mut batch = Vec::with_capacity(BATCH);
    while entries.recv_many(&mut batch, BATCH).await > 0 {
        // Under Sentinel, a connection to an old primary is not kept.
        if connection.as_ref().is_some_and(|(_, generation)| *generation != store.generation()) {
            connection = None;
        }
        if connection.is_none() {
            let generation = store.generation();
            connection = store.dedicated().await.ok().map(|conn| (conn, generation));
        }
        let written = match connection.as_mut() {
            Some((conn, _)) => {
                let mut pipe = redis::pipe();
                for json in &batch {
                    pipe.cmd("XADD")
                        .arg(AUDIT)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(MAX_ENTRIES)
                        .arg("*")
                        .arg("a")
                        .arg(json)
                        .ignore();
                }
                pipe.query_async::<()>(conn).await.map_err(|e| e.to_string())
            }
            None => Err("Redis is unreachable".to_string()),
        };
        if let Err(e) = written {
            connection = None;
            for json in &batch {
                tracing::warn!(error = %e, entry = %json, "the audit entry could not be written to Redis");
            }
        }
        batch.clear();
    }
}

/// Entries newest first: at most `limit`, of `tenant` if given (read in
/// chunks until enough match or the trail is exhausted).
pub async fn read(conn: &mut impl ConnectionLike, tenant: Option<&str>, limit: usize) -> RedisResult<Vec<Entry>> {
    const CHUNK: usize = 500;
    let mut out = Vec::new();
    let mut end = "+".to_string();
    loop {
        let chunk: Vec<(String, Vec<(String, String)>)> =
            redis::cmd("XREVRANGE").arg(AUDIT).arg(&end).arg("-").arg("COUNT").arg(CHUNK).query_async(conn).await?;
        let exhausted = chunk.len() < CHUNK;
        for (id, fields) in &chunk {
            end = format!("({id}");
            let Some(mut entry) =
                fields.iter().find(|(f, _)| f == "a").and_then(|(_, v)| serde_json::from_str::<Entry>(v).ok())
            else {
                continue;
            };
            if let Some(ms) = id.split('-').next().and_then(|ms| ms.parse().ok()) {
                entry.ts_ms = ms;
            }
            if tenant.is_none_or(|t| entry.tenants.iter().any(|mine| mine == t)) {
                out.push(entry);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
        if exhausted || chunk.is_empty() {
            return Ok(out);
        }
    }
}

/// Middleware: records every 401 and 403 this process answers, with the
/// caller (when one was identified), the request, and the tenant refused.
pub async fn refusals(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let Some(trail) = req.app_data::<web::Data<Trail>>().cloned() else { return next.call(req).await };
    // Nothing is taken from the request before: the answer has it (and
    // routing needs it unshared meanwhile); the hit path pays nothing here.
    let result = next.call(req).await;
    let refused = match &result {
        Ok(res) => matches!(res.status().as_u16(), 401 | 403).then(|| {
            let req = res.request();
            let error = res.response().error().and_then(|e| e.as_error::<ApiError>().cloned());
            (
                res.status().as_u16(),
                error,
                req.extensions().get::<Caller>().cloned(),
                Some((req.method().clone(), req.path().to_string())),
            )
        }),
        Err(e) => {
            let status = e.as_response_error().status_code().as_u16();
            matches!(status, 401 | 403).then(|| (status, e.as_error::<ApiError>().cloned(), None, None))
        }
    };
    if let Some((status, error, caller, request)) = refused {
        let tenant = error
            .as_ref()
            .and_then(|e| e.extra.as_ref())
            .and_then(|x| x.get("tenant"))
            .and_then(|t| t.as_str())
            .map(str::to_string);
        let path_tenant = request.as_ref().and_then(|(_, path)| {
            path.strip_prefix("/v1/cache/")
                .and_then(|rest| rest.split('/').next())
                .filter(|t| crate::names::validate_tenant(t).is_ok())
                .map(str::to_string)
        });
        let request = request.map(|(method, path)| {
            let mut line = format!("{method} {path}");
            if line.len() > 256 {
                let mut end = 256;
                while !line.is_char_boundary(end) {
                    end -= 1;
                }
                line.truncate(end);
            }
            line
        });
        trail.record(Entry {
            ts_ms: now_ms(),
            token: caller.as_ref().and_then(|c| c.name()).map(str::to_string),
            action: "refused".into(),
            tenants: tenant.or(path_tenant).map(|t| vec![t]).unwrap_or_default(),
            status,
            request,
            reason: error.map(|e| e.message),
            ..Entry::default()
        });
    }
    result
}
