//! The coordinator's HTTP API: events, invalidations, cluster health, rules,
//! and the operational endpoints.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use std::sync::atomic::Ordering;
use std::time::Duration;

use shared::audit::{self, Trail};
use shared::auth::{Caller, Scope};
use shared::invalidation;
use shared::protocol::{now_ms, Selector};
use shared::service::{metrics_response, read_body, ApiError};

use crate::cluster;
use crate::events::{parse_events, resolve_events, InvalidateBody};
use crate::state::{Coordinator, InvalidationAnswer};

/// Registers every route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/events", web::post().to(post_events))
        .route("/v1/invalidate", web::post().to(post_invalidate))
        .route("/v1/cluster/health", web::get().to(cluster_health))
        .route("/v1/rules", web::get().to(rules))
        .route("/v1/audit", web::get().to(audit))
        .route("/v1/keys/{tenant}", web::get().to(keys))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics));
}

/// `?wait=all&timeout_ms=N`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    /// Only `all` is defined.
    wait: Option<String>,
    /// How long to wait.
    timeout_ms: Option<u64>,
}

/// The longest `timeout_ms` accepted.
const MAX_WAIT_MS: u64 = 600_000;

impl WaitQuery {
    /// How long to wait for every live agent, if the request asks to.
    /// Without `timeout_ms` it waits `node_dead_after_ms` plus a second:
    /// long enough for a silent node to stop being awaited.
    fn wait(&self, node_dead_after_ms: u64) -> Result<Option<Duration>, ApiError> {
        match (self.wait.as_deref(), self.timeout_ms) {
            (_, Some(ms)) if ms == 0 || ms > MAX_WAIT_MS => Err(ApiError::bad_request(
                "invalid_query",
                format!("timeout_ms must be between 1 and {MAX_WAIT_MS}; got {ms}"),
            )),
            (None, Some(_)) => Err(ApiError::bad_request("invalid_query", "timeout_ms needs wait=all")),
            (None, None) => Ok(None),
            (Some("all"), ms) => Ok(Some(Duration::from_millis(ms.unwrap_or(node_dead_after_ms.saturating_add(1000))))),
            (Some(other), _) => Err(ApiError::bad_request(
                "invalid_query",
                format!("wait={other:?} is not defined; the only value is \"all\""),
            )),
        }
    }
}

/// Parses the query of `POST /v1/events` and `POST /v1/invalidate` as their
/// handlers do: the `web::Query` extractor, whose errors the servers answer
/// with `shared::service::query_config`'s 400 `invalid_query`, then
/// `WaitQuery::wait`. An entry point for the fuzz targets.
#[doc(hidden)]
pub fn parse_wait_query(query: &str, node_dead_after_ms: u64) -> Result<Option<Duration>, ApiError> {
    web::Query::<WaitQuery>::from_query(query).map_err(bad_query)?.wait(node_dead_after_ms)
}

/// The answer of `shared::service::query_config`'s error handler.
fn bad_query(err: actix_web::error::QueryPayloadError) -> ApiError {
    ApiError::bad_request("invalid_query", format!("bad query string: {err}"))
}

/// What an invalidation needs of its caller: `invalidate` on every tenant it
/// names (one forbidden tenant refuses it whole), and `admin` to wipe a
/// whole tenant.
fn allow_invalidation(caller: &Caller, items: &[Selector]) -> Result<(), ApiError> {
    if items.iter().any(Selector::wipes_tenant) {
        caller.allow(Scope::Admin, [])?;
    }
    caller.allow(Scope::Invalidate, items.iter().map(|s| s.tenant.as_str()))
}

async fn post_events(
    req: HttpRequest,
    body: web::Payload,
    query: web::Query<WaitQuery>,
    coordinator: web::Data<Coordinator>,
    caller: Caller,
    trail: web::Data<Trail>,
) -> Result<HttpResponse, ApiError> {
    let wait = query.wait(coordinator.inner().settings.node_dead_after_ms)?;
    let body = read_body(&req, body, coordinator.inner().settings.max_body_bytes).await?;
    let events = parse_events(&body)?;
    coordinator.inner().metrics.events.inc_by(events.len() as u64);
    let request = resolve_events(&events, &coordinator.inner().rules, coordinator.inner().origin.clone())?;
    allow_invalidation(&caller, &request.items)?;
    let entry = audit::Entry::invalidation("event", &caller, &request.items);
    let answer = coordinator.invalidate(request, wait).await;
    record(&trail, entry, &answer);
    Ok(HttpResponse::Ok().json(answer?))
}

/// Puts an invalidation and what it was answered in the audit trail.
fn record(trail: &Trail, entry: audit::Entry, answer: &Result<InvalidationAnswer, ApiError>) {
    trail.record(match answer {
        Ok(answer) => entry.answered(200, answer.seq, None),
        Err(e) => {
            let seq = e.extra.as_ref().and_then(|x| x.get("seq")).and_then(serde_json::Value::as_u64);
            entry.answered(e.status.as_u16(), seq, Some(e))
        }
    });
}

async fn post_invalidate(
    body: web::Json<InvalidateBody>,
    query: web::Query<WaitQuery>,
    coordinator: web::Data<Coordinator>,
    caller: Caller,
    trail: web::Data<Trail>,
) -> Result<HttpResponse, ApiError> {
    let wait = query.wait(coordinator.inner().settings.node_dead_after_ms)?;
    let selector = body.selector()?;
    allow_invalidation(&caller, std::slice::from_ref(&selector))?;
    if body.dry_run {
        let mut conn = coordinator.conn().await?;
        let preview = invalidation::preview(&mut conn, &coordinator.inner().layout, std::slice::from_ref(&selector))
            .await
            .map_err(|e| coordinator.redis_failed(e))?;
        return Ok(HttpResponse::Ok().json(serde_json::json!({
            "dry_run": true,
            "would_delete": preview.would_delete.into_iter().map(|(_, key)| key).collect::<Vec<_>>(),
            "count": preview.count,
            "invalidated": [selector],
        })));
    }
    let entry = audit::Entry::invalidation("invalidate", &caller, std::slice::from_ref(&selector));
    let request = invalidation::Request {
        items: vec![selector],
        event_ids: Vec::new(),
        origin: coordinator.inner().origin.clone(),
    };
    let answer = coordinator.invalidate(request, wait).await;
    record(&trail, entry, &answer);
    Ok(HttpResponse::Ok().json(answer?))
}

/// `?tenant=T&limit=N`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    tenant: Option<String>,
    limit: Option<usize>,
}

/// The most entries one `GET /v1/audit` answers.
const MAX_AUDIT_LIMIT: usize = 1000;

impl AuditQuery {
    /// The tenant to filter on, if any, and how many entries to answer.
    fn checked(&self) -> Result<(Option<&str>, usize), ApiError> {
        if let Some(tenant) = &self.tenant {
            shared::names::validate_tenant(tenant)?;
        }
        let limit = self.limit.unwrap_or(100);
        if limit == 0 || limit > MAX_AUDIT_LIMIT {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("limit must be between 1 and {MAX_AUDIT_LIMIT}; got {limit}"),
            ));
        }
        Ok((self.tenant.as_deref(), limit))
    }
}

/// Parses the query of `GET /v1/audit` as its handler does (after the
/// caller's scope is checked). An entry point for the fuzz targets.
#[doc(hidden)]
pub fn parse_audit_query(query: &str) -> Result<(Option<String>, usize), ApiError> {
    let query = web::Query::<AuditQuery>::from_query(query).map_err(bad_query)?;
    let (tenant, limit) = query.checked()?;
    Ok((tenant.map(str::to_string), limit))
}

/// `GET /v1/audit`: the trail, newest first (admin).
async fn audit(
    query: web::Query<AuditQuery>,
    coordinator: web::Data<Coordinator>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.allow(Scope::Admin, [])?;
    let (tenant, limit) = query.checked()?;
    let mut conn = coordinator.conn().await?;
    let entries = audit::read(&mut conn, tenant, limit).await.map_err(|e| coordinator.redis_failed(e))?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "entries": entries })))
}

/// `?pattern=P&cursor=C&limit=N` of the key explorer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysQuery {
    pattern: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

/// The most keys one page of the key explorer lists.
const MAX_KEYS_LIMIT: usize = 1000;

/// `GET /v1/keys/{tenant}`: the key explorer, a page of the tenant's keys in
/// L2 with their size, TTL and tags (`read` on the tenant).
async fn keys(
    tenant: web::Path<String>,
    query: web::Query<KeysQuery>,
    coordinator: web::Data<Coordinator>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    let tenant = tenant.into_inner();
    shared::names::validate_tenant(&tenant)?;
    caller.allow(Scope::Read, [tenant.as_str()])?;
    let pattern = query.pattern.as_deref().unwrap_or("*");
    // Listing the whole tenant is what an explorer does: no confirm needed.
    shared::names::validate_pattern(pattern, true)?;
    let cursor = match query.cursor.as_deref() {
        None => shared::l2::ListCursor::default(),
        Some(text) => shared::l2::ListCursor::decode(text).ok_or_else(|| {
            ApiError::bad_request("invalid_query", "cursor is not one this service gave: pass back a page's cursor")
        })?,
    };
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_KEYS_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be between 1 and {MAX_KEYS_LIMIT}; got {limit}"),
        ));
    }
    let partition = coordinator.inner().layout.of(&tenant);
    let mut conn = coordinator.conn().await?;
    let page = shared::l2::list_keys(&mut conn, partition, &tenant, pattern, cursor, limit)
        .await
        .map_err(|e| coordinator.redis_failed(e))?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "tenant": tenant,
        "keys": page.keys,
        "cursor": page.cursor.map(shared::l2::ListCursor::encode),
    })))
}

async fn cluster_health(coordinator: web::Data<Coordinator>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.allow(Scope::Read, [])?;
    let inner = coordinator.inner();
    let about = serde_json::json!({
        "origin": inner.origin,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_ms": inner.started.elapsed().as_millis() as u64,
        "node_dead_after_ms": inner.settings.node_dead_after_ms,
        "rules": inner.rules.rules().count(),
        "events_received": inner.metrics.events.get(),
        "invalidations_logged": inner.metrics.invalidations.get(),
    });
    let gathered = async {
        let mut conn = coordinator.conn().await?;
        let view = cluster::view(&conn.shared(), &inner.layout, &inner.acks, inner.settings.node_dead_after_ms, true)
            .await
            .map_err(|e| coordinator.redis_failed(e))?;
        let redis = cluster::redis_info(&mut conn).await.map_err(|e| coordinator.redis_failed(e))?;
        Ok::<_, ApiError>((view, redis))
    };
    Ok(match gathered.await {
        Ok((view, redis)) => {
            let all_synced = view.nodes.iter().all(|n| n.status == "synced");
            let status = if all_synced { "ok" } else { "degraded" };
            HttpResponse::Ok().json(serde_json::json!({
                "status": status,
                "epoch": view.epoch,
                "seq": view.seq,
                "partitions": view.partitions,
                "checked_at_ms": now_ms(),
                "redis": redis,
                "coordinator": about,
                "nodes": view.nodes,
            }))
        }
        Err(e) => HttpResponse::ServiceUnavailable().json(serde_json::json!({
            "status": "down",
            "error": e.code,
            "message": format!("the cluster cannot be seen: {}", e.message),
            "seq": null,
            "redis": {"reachable": false, "error": e.message},
            "coordinator": about,
            "nodes": [],
        })),
    })
}

async fn rules(coordinator: web::Data<Coordinator>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.allow(Scope::Read, [])?;
    Ok(HttpResponse::Ok().json(coordinator.inner().rules.describe()))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn readyz(coordinator: web::Data<Coordinator>) -> Result<HttpResponse, ApiError> {
    if coordinator.inner().redis_ok.load(Ordering::Acquire) {
        Ok(HttpResponse::Ok().json(serde_json::json!({"status": "ready"})))
    } else {
        let outage = shared::store::Outage::from_code(coordinator.inner().outage.load(Ordering::Acquire));
        let why = match outage {
            shared::store::Outage::Unreachable => "Redis is unreachable",
            shared::store::Outage::CredentialsRefused => "Redis refused the credentials (check redis_url)",
            shared::store::Outage::PermissionDenied => "Redis's ACL refuses a command this service needs",
            shared::store::Outage::TlsRefused => {
                "the TLS handshake with Redis failed (is its certificate signed by a CA in redis_ca_file?)"
            }
        };
        Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", format!("not ready: {why}"))
            .with("reason", outage.reason().into()))
    }
}

async fn metrics(coordinator: web::Data<Coordinator>) -> HttpResponse {
    metrics_response(&coordinator.inner().metrics.registry)
}
