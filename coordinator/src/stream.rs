//! `GET /v1/invalidations/stream`: the invalidation log, tailed as
//! server-sent events (the dashboard's live list and `cachectl watch`).
//!
//! Each partition keeps its own log (a Redis stream whose entry ids are the
//! seqs), so a place in "the log" is one seq per partition: the **cursor**.
//! Every event's `id:` is the cursor just after it, written as the seqs of
//! the partitions in order, comma separated; with one partition it is the
//! event's seq itself. A client that reconnects with `Last-Event-ID: <id>`
//! gets every invalidation after it that the logs still hold (a trimmed log
//! resumes at its oldest entry); without it the stream starts at the heads,
//! with what is logged from now on.
//!
//! The handler checks the caller and the query, reads the heads, then hands
//! a channel's receiving end to actix-web as the body; [`tail`] polls the
//! logs every [`POLL`] and writes events into the channel until the client
//! goes away (the send fails) or the coordinator shuts down. A token sees the
//! selectors of the tenants it may `read`, and nothing of the others.

use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use actix_web::{get, web, HttpRequest, HttpResponse};
use redis::RedisResult;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use utoipa::{IntoParams, ToSchema};

use shared::auth::{Caller, Scope};
use shared::protocol::{InvalidationMessage, Selector};
use shared::schema::{Layout, Partition};
use shared::service::ApiError;
use shared::store::SharedConn;

use crate::state::Coordinator;

/// How often the logs are read: the dashboard's list is at most this late.
const POLL: Duration = Duration::from_millis(250);
/// A comment line after this long without an event, so that proxies and
/// clients see the connection alive.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// The most entries read from one partition's log in one poll.
const CHUNK: usize = 200;
/// What a client waits before reconnecting (the `retry:` field), in ms.
const RETRY_MS: u64 = 2000;

/// `?tenant=T`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct StreamQuery {
    /// Only the invalidations of this tenant (the token needs `read` on it).
    #[param(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    tenant: Option<String>,
}

/// One event of the stream: its `data:` line (the event is named `invalidation`).
#[derive(Debug, Serialize, ToSchema)]
pub struct StreamedInvalidation {
    /// The partition whose log it is in.
    pub partition: u16,
    /// That partition's epoch.
    pub epoch: String,
    /// Its seq in the partition's log.
    pub seq: u64,
    /// When it was accepted (Unix ms).
    pub ts_ms: u64,
    /// The process that logged it.
    pub origin: String,
    /// What it invalidated, in the tenants the caller may read.
    pub invalidations: Vec<Selector>,
    /// The event's `id:`: the cursor to send back as `Last-Event-ID`.
    pub id: String,
}

/// `GET /v1/invalidations/stream`: the invalidation log as server-sent events
/// (`text/event-stream`, never ending: one `invalidation` event per logged
/// invalidation, keep-alive comments in between).
#[utoipa::path(
    tag = "invalidation",
    params(
        StreamQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event: the `id` of the last event received (a seq per partition, comma separated; with one partition the seq)"),
    ),
    responses(
        (status = 200, description = "An endless `text/event-stream`: events `invalidation` whose `data` is a `StreamedInvalidation` and whose `id` is its cursor; `: keep-alive` comments every 10 s", body = StreamedInvalidation, content_type = "text/event-stream"),
        shared::openapi::BadInput,
        shared::openapi::Refused,
        shared::openapi::Unavailable,
    ),
)]
#[get("/v1/invalidations/stream")]
pub async fn stream(
    req: HttpRequest,
    query: web::Query<StreamQuery>,
    coordinator: web::Data<Coordinator>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    let tenant = query.into_inner().tenant;
    match &tenant {
        Some(tenant) => {
            shared::names::validate_tenant(tenant)?;
            caller.allow(Scope::Read, [tenant.as_str()])?;
        }
        None => caller.allow(Scope::Read, [])?,
    }
    let layout = &coordinator.inner().layout;
    let resume = match req.headers().get("last-event-id") {
        None => None,
        Some(value) => {
            let text =
                value.to_str().map_err(|_| ApiError::bad_request("invalid_header", "Last-Event-ID is not text"))?;
            Some(parse_cursor(text, layout.count())?)
        }
    };
    let cursor = match resume {
        Some(cursor) => cursor,
        None => {
            let conn = coordinator.conn().await?.shared();
            heads(&conn, layout).await.map_err(|e| coordinator.redis_failed(e))?
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    actix_web::rt::spawn(tail(coordinator.get_ref().clone(), caller, tenant, cursor, tx));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (Ok::<_, actix_web::Error>(chunk), rx))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        // Tells nginx-like proxies not to buffer the events.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

/// Reads a `Last-Event-ID`: one seq per partition, comma separated.
pub fn parse_cursor(text: &str, partitions: u16) -> Result<Vec<u64>, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "invalid_header",
            format!(
                "Last-Event-ID must be an event's id: {partitions} seq(s), comma separated; got {:?}",
                text.chars().take(100).collect::<String>()
            ),
        )
    };
    let seqs = text.trim().split(',').map(|s| s.trim().parse::<u64>()).collect::<Result<Vec<_>, _>>();
    match seqs {
        Ok(seqs) if seqs.len() == usize::from(partitions) => Ok(seqs),
        _ => Err(bad()),
    }
}

/// Writes a cursor as an event id.
fn format_cursor(cursor: &[u64]) -> String {
    cursor.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// Every partition's last seq.
async fn heads(conn: &SharedConn, layout: &Layout) -> RedisResult<Vec<u64>> {
    let reads = layout.all().iter().map(|partition| {
        let mut conn = conn.clone();
        async move { shared::l2::head(&mut conn, partition).await.map(|h| h.seq) }
    });
    futures_util::future::join_all(reads).await.into_iter().collect()
}

/// A stream entry as `XRANGE` returns it: id and field/value pairs.
type LogEntry = (String, Vec<(String, Vec<u8>)>);

/// What one poll of a partition found: its messages after the cursor, and
/// its last seq (lower than the cursor when a new epoch began).
struct Polled {
    /// The partition.
    partition: u16,
    /// Messages after the cursor, in order.
    messages: Vec<InvalidationMessage>,
    /// The partition's last seq.
    head: u64,
}

/// Reads one partition's log after `after` (one round trip).
async fn poll_partition(mut conn: SharedConn, partition: &Partition, after: u64) -> RedisResult<Polled> {
    let (entries, head): (Vec<LogEntry>, Option<u64>) = redis::pipe()
        .cmd("XRANGE")
        .arg(partition.log())
        .arg(format!("{}-0", after.saturating_add(1)))
        .arg("+")
        .arg("COUNT")
        .arg(CHUNK)
        .cmd("GET")
        .arg(partition.seq())
        .query_async(&mut conn)
        .await?;
    let messages = entries
        .into_iter()
        .filter_map(|(_, fields)| fields.into_iter().find(|(f, _)| f == "m"))
        .filter_map(|(_, payload)| InvalidationMessage::decode(&payload).ok())
        .collect();
    Ok(Polled { partition: partition.index, messages, head: head.unwrap_or(0) })
}

/// Tails the logs into `tx` until the client leaves or the coordinator stops.
async fn tail(
    coordinator: Coordinator,
    caller: Caller,
    tenant: Option<String>,
    mut cursor: Vec<u64>,
    tx: mpsc::Sender<Bytes>,
) {
    let inner = coordinator.inner();
    let opening = format!("retry: {RETRY_MS}\n: tailing the invalidation log\n\n");
    if tx.send(Bytes::from(opening)).await.is_err() {
        return;
    }
    // With a tenant, one partition holds everything there is to see.
    let partitions: Vec<Partition> = match &tenant {
        Some(tenant) => vec![inner.layout.of(tenant).clone()],
        None => inner.layout.all().to_vec(),
    };
    let visible = |selector: &Selector| {
        tenant.as_deref().is_none_or(|t| t == selector.tenant)
            && caller.allow(Scope::Read, [selector.tenant.as_str()]).is_ok()
    };
    let mut last_sent = Instant::now();
    let mut redis_down = false;
    loop {
        tokio::select! {
            _ = inner.closing.cancelled() => return,
            _ = tx.closed() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        let polled = async {
            let conn = inner.store.get().await.map_err(|e| e.to_string())?.shared();
            let polls = partitions.iter().map(|p| poll_partition(conn.clone(), p, cursor[usize::from(p.index)]));
            futures_util::future::join_all(polls)
                .await
                .into_iter()
                .collect::<RedisResult<Vec<_>>>()
                .map_err(|e| e.to_string())
        }
        .await;
        let polled = match polled {
            Ok(polled) => {
                redis_down = false;
                polled
            }
            Err(e) => {
                if !redis_down {
                    tracing::debug!(error = %e, "the invalidation stream cannot read the log; retrying");
                    redis_down = true;
                    let note = Bytes::from_static(b": Redis does not answer; retrying\n\n");
                    if tx.send(note).await.is_err() {
                        return;
                    }
                    last_sent = Instant::now();
                }
                continue;
            }
        };
        let mut found: Vec<InvalidationMessage> = Vec::new();
        for Polled { partition, messages, head } in polled {
            let at = usize::from(partition);
            if messages.is_empty() && head < cursor[at] {
                // A new epoch: its seqs start again.
                cursor[at] = 0;
            }
            found.extend(messages);
        }
        found.sort_by_key(|m| (m.ts_ms, m.p, m.seq));
        for message in found {
            let at = usize::from(message.p);
            if at >= cursor.len() || message.seq <= cursor[at] {
                continue;
            }
            cursor[at] = message.seq;
            let invalidations: Vec<Selector> = message.invalidations.into_iter().filter(&visible).collect();
            if invalidations.is_empty() {
                continue;
            }
            let id = format_cursor(&cursor);
            let event = StreamedInvalidation {
                partition: message.p,
                epoch: message.epoch,
                seq: message.seq,
                ts_ms: message.ts_ms,
                origin: message.origin,
                invalidations,
                id: id.clone(),
            };
            let Ok(data) = serde_json::to_string(&event) else { continue };
            let frame = format!("id: {id}\nevent: invalidation\ndata: {data}\n\n");
            if tx.send(Bytes::from(frame)).await.is_err() {
                return;
            }
            last_sent = Instant::now();
        }
        if last_sent.elapsed() >= KEEP_ALIVE {
            if tx.send(Bytes::from_static(b": keep-alive\n\n")).await.is_err() {
                return;
            }
            last_sent = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_has_one_seq_per_partition() {
        assert_eq!(parse_cursor("7", 1).ok(), Some(vec![7]));
        assert_eq!(parse_cursor("1,0,3", 3).ok(), Some(vec![1, 0, 3]));
        assert_eq!(format_cursor(&[1, 0, 3]), "1,0,3");
        for bad in ["", "1,2", "x", "1,,3", "-1,0,0", "1,2,3,4"] {
            let err = parse_cursor(bad, 3).err().map(|e| e.code);
            assert_eq!(err, Some("invalid_header"), "{bad:?}");
        }
    }
}
