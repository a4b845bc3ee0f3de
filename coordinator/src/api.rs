//! The coordinator's HTTP API: events, invalidations, cluster health, rules,
//! and the operational endpoints.

use actix_web::http::StatusCode;
use actix_web::{get, post, web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::time::Duration;

use shared::audit::{self, Trail};
use shared::auth::{Caller, Scope};
use shared::invalidation;
use shared::openapi::ErrorBody;
use shared::protocol::{now_ms, Selector};
use shared::service::{metrics_response, read_body, ApiError};
use utoipa::{IntoParams, ToSchema};
use utoipa_actix_web::service_config::ServiceConfig;

use crate::cluster::{self, NodeView, PartitionHead};
use crate::events::{parse_events, resolve_events, Event, InvalidateBody};
use crate::state::{Coordinator, InvalidationAnswer};

/// Registers every route; each handler's `#[utoipa::path]` puts it in the
/// OpenAPI document as it is registered (see [`openapi`]).
pub fn configure(cfg: &mut ServiceConfig) {
    cfg.service(post_events)
        .service(post_invalidate)
        .service(cluster_health)
        .service(rules)
        .service(audit_trail)
        .service(keys)
        .service(stats)
        .service(crate::stream::stream)
        .service(shared::service::healthz)
        .service(readyz)
        .service(metrics);
}

/// The coordinator's OpenAPI document, collected from the routes [`configure`] registers.
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa_actix_web::AppExt;
    let (_, doc) = actix_web::App::new().into_utoipa_app().configure(configure).split_for_parts();
    shared::openapi::finish(
        doc,
        "dcc coordinator",
        "Turns write events into invalidations (by key, tag, pattern and along the dependency graph), logs them \
         and broadcasts them to every node agent; the cluster view, the rules, the audit trail and the key explorer.",
    )
}

/// `?wait=all&timeout_ms=N`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct WaitQuery {
    /// `all`: answer once every live node agent has applied the invalidation
    /// (or 504 `wait_timeout` naming the laggards). The only value.
    #[param(pattern = "^all$")]
    wait: Option<String>,
    /// How long to wait, 1 to 600000 ms (needs `wait=all`; default: the
    /// cluster's `node_dead_after_ms` plus a second).
    #[param(minimum = 1, maximum = 600000)]
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

/// The body of `POST /v1/events`: one event, or a batch of up to 1000.
#[derive(ToSchema)]
#[allow(dead_code)] // A schema: `parse_events` reads the body, one event at a time.
#[serde(untagged)]
enum EventsBody {
    /// One event.
    One(Event),
    /// A batch, logged as one invalidation.
    Batch(Vec<Event>),
}

/// `POST /v1/events`: write events, resolved by the rules into one invalidation.
#[utoipa::path(
    tag = "invalidation",
    params(WaitQuery),
    request_body(content = EventsBody, content_type = "application/json"),
    responses(
        (status = 200, description = "Logged, deleted from L2 and broadcast (or a repeat of event ids already logged: `duplicate`)", body = InvalidationAnswer),
        shared::openapi::BadInput,
        shared::openapi::Refused,
        shared::openapi::TooLarge,
        shared::openapi::Unavailable,
        shared::openapi::WaitTimedOut,
    ),
)]
#[post("/v1/events")]
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

/// What `POST /v1/invalidate` answers: the invalidation, or its dry run.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
enum InvalidateAnswer {
    /// Done: logged, deleted from L2 and broadcast.
    Done(InvalidationAnswer),
    /// `dry_run`: what would go, nothing done.
    DryRun(DryRun),
}

/// The preview of an invalidation (`dry_run: true`).
#[derive(Serialize, ToSchema)]
struct DryRun {
    /// Always true.
    dry_run: bool,
    /// The L2 keys it would delete (at most a sample when there are many; see `count`).
    would_delete: Vec<String>,
    /// How many L2 entries it would delete.
    count: u64,
    /// What it names.
    invalidated: Vec<Selector>,
}

/// `POST /v1/invalidate`: invalidate keys, tags and patterns of one tenant
/// (`dry_run` previews; a pattern covering the whole tenant needs `confirm`
/// and an admin token).
#[utoipa::path(
    tag = "invalidation",
    params(WaitQuery),
    request_body = InvalidateBody,
    responses(
        (status = 200, description = "Invalidated, or previewed (`dry_run`)", body = InvalidateAnswer),
        shared::openapi::BadInput,
        shared::openapi::NotJson,
        shared::openapi::Refused,
        shared::openapi::TooLarge,
        shared::openapi::Unavailable,
        shared::openapi::WaitTimedOut,
    ),
)]
#[post("/v1/invalidate")]
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
        return Ok(HttpResponse::Ok().json(InvalidateAnswer::DryRun(DryRun {
            dry_run: true,
            would_delete: preview.would_delete.into_iter().map(|(_, key)| key).collect(),
            count: preview.count,
            invalidated: vec![selector],
        })));
    }
    let entry = audit::Entry::invalidation("invalidate", &caller, std::slice::from_ref(&selector));
    let request = invalidation::Request {
        items: vec![selector],
        event_ids: Vec::new(),
        origin: coordinator.inner().origin.clone(),
        // Set by `invalidate` from `wait`.
        ack: false,
    };
    let answer = coordinator.invalidate(request, wait).await;
    record(&trail, entry, &answer);
    Ok(HttpResponse::Ok().json(InvalidateAnswer::Done(answer?)))
}

/// `?tenant=T&limit=N`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// Only the entries naming this tenant.
    #[param(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    tenant: Option<String>,
    /// How many entries, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
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

/// The audit trail, newest first.
#[derive(Serialize, ToSchema)]
struct AuditPage {
    /// The entries.
    entries: Vec<audit::Entry>,
}

/// `GET /v1/audit`: the trail, newest first (admin).
#[utoipa::path(
    tag = "operations",
    params(AuditQuery),
    responses(
        (status = 200, description = "The newest entries first", body = AuditPage),
        shared::openapi::BadInput,
        shared::openapi::Refused,
        shared::openapi::Unavailable,
    ),
)]
#[get("/v1/audit")]
async fn audit_trail(
    query: web::Query<AuditQuery>,
    coordinator: web::Data<Coordinator>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.allow(Scope::Admin, [])?;
    let (tenant, limit) = query.checked()?;
    let mut conn = coordinator.conn().await?;
    let entries = audit::read(&mut conn, tenant, limit).await.map_err(|e| coordinator.redis_failed(e))?;
    Ok(HttpResponse::Ok().json(AuditPage { entries }))
}

/// `?pattern=P&cursor=C&limit=N` of the key explorer.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct KeysQuery {
    /// A glob over the tenant's keys (`*`, `?`, `[a-z]`, `\\` escapes; default `*`).
    pattern: Option<String>,
    /// The `cursor` of the previous page, as it was given.
    cursor: Option<String>,
    /// Keys a page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// A page of the key explorer.
#[derive(Serialize, ToSchema)]
struct KeysPage {
    /// The tenant.
    tenant: String,
    /// At most `limit` keys.
    keys: Vec<shared::l2::Listed>,
    /// Pass it back for the next page; `null` on the last.
    cursor: Option<String>,
}

/// The most keys one page of the key explorer lists.
const MAX_KEYS_LIMIT: usize = 1000;

/// `GET /v1/keys/{tenant}`: the key explorer, a page of the tenant's keys in
/// L2 with their size, TTL and tags (`read` on the tenant).
#[utoipa::path(
    tag = "operations",
    params(("tenant" = String, Path, description = "The tenant: 1 to 64 of `[A-Za-z0-9_-]`", pattern = r"^[A-Za-z0-9_-]{1,64}$"), KeysQuery),
    responses(
        (status = 200, description = "A page of keys; following `cursor` lists every matching key once", body = KeysPage),
        shared::openapi::BadInput,
        shared::openapi::Refused,
        shared::openapi::Unavailable,
    ),
)]
#[get("/v1/keys/{tenant}")]
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
    Ok(HttpResponse::Ok().json(KeysPage {
        tenant,
        keys: page.keys,
        cursor: page.cursor.map(shared::l2::ListCursor::encode),
    }))
}

/// `?tenant=T` of `GET /v1/stats`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct StatsQuery {
    /// Only this tenant (`read` on it needed).
    #[param(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    tenant: Option<String>,
}

/// `GET /v1/stats`: per-tenant figures added up from the last report of
/// every live node agent, and recommendations (`read`; a token scoped to
/// some tenants sees only those).
#[utoipa::path(
    tag = "operations",
    params(StatsQuery),
    responses(
        (status = 200, description = "Per-tenant figures, and recommendations with the numbers behind them", body = crate::stats::Stats),
        shared::openapi::BadInput,
        shared::openapi::Refused,
        shared::openapi::Unavailable,
    ),
)]
#[get("/v1/stats")]
async fn stats(
    query: web::Query<StatsQuery>,
    coordinator: web::Data<Coordinator>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    caller.allow(Scope::Read, [])?;
    if let Some(tenant) = &query.tenant {
        shared::names::validate_tenant(tenant)?;
        caller.allow(Scope::Read, [tenant.as_str()])?;
    }
    let inner = coordinator.inner();
    let dead_after = inner.settings.node_dead_after_ms;
    let mut conn = coordinator.conn().await?;
    let forget = dead_after.saturating_mul(cluster::FORGET_AFTER_DEAD_PERIODS);
    let registry = shared::registry::nodes(&mut conn, forget, true).await.map_err(|e| coordinator.redis_failed(e))?;
    let live: Vec<shared::protocol::NodeReport> = registry
        .nodes
        .into_iter()
        .filter(|n| registry.now_ms.saturating_sub(n.last_beat_ms) <= dead_after)
        .filter_map(|n| n.report)
        .collect();
    let visible = |tenant: &str| {
        query.tenant.as_deref().is_none_or(|only| only == tenant) && caller.allow(Scope::Read, [tenant]).is_ok()
    };
    Ok(HttpResponse::Ok().json(crate::stats::aggregate(live.iter().map(|r| r.tenants.as_slice()), visible)))
}

/// What the coordinator answering says of itself.
#[derive(Serialize, ToSchema)]
struct About {
    /// This process (`coordinator@host:port`).
    origin: String,
    /// Its version.
    version: &'static str,
    /// Since it started.
    uptime_ms: u64,
    /// After how long without a heartbeat a node agent is dead (no longer awaited).
    node_dead_after_ms: u64,
    /// How many entity rules it has.
    rules: usize,
    /// Events it received.
    events_received: u64,
    /// Invalidations it logged.
    invalidations_logged: u64,
}

/// `GET /v1/cluster/health` when Redis answers.
#[derive(Serialize, ToSchema)]
struct ClusterHealth {
    /// `ok` when every node is synced, else `degraded`.
    #[schema(pattern = "^(ok|degraded)$")]
    status: &'static str,
    /// One partition's epoch, or a fingerprint of all of them.
    epoch: String,
    /// Sum over the partitions of their latest seq.
    seq: u64,
    /// Each partition's log head.
    partitions: Vec<PartitionHead>,
    /// When this view was taken (Unix ms).
    checked_at_ms: u64,
    /// What Redis says of itself (`INFO`): version, memory, clients, keyspace.
    #[schema(value_type = Object)]
    redis: serde_json::Value,
    /// The coordinator that answered.
    coordinator: About,
    /// Every node agent heard from, live or dead.
    nodes: Vec<NodeView>,
    /// Each `[[sources]]` as this coordinator sees it.
    sources: Vec<crate::source::SourceHealth>,
}

/// `GET /v1/cluster/health` when Redis cannot be reached (503).
#[derive(Serialize, ToSchema)]
struct ClusterDown {
    /// `down`.
    status: &'static str,
    /// `unavailable`.
    error: &'static str,
    /// Why, in words.
    message: String,
    /// Unknown: `null`.
    seq: Option<u64>,
    /// `{"reachable": false, "error": ...}`.
    #[schema(value_type = Object)]
    redis: serde_json::Value,
    /// The coordinator that answered.
    coordinator: About,
    /// Unknown: empty.
    nodes: Vec<NodeView>,
    /// Each `[[sources]]` as this coordinator sees it.
    sources: Vec<crate::source::SourceHealth>,
}

/// `GET /v1/cluster/health`: the cluster as Redis and the agents' heartbeats show it.
#[utoipa::path(
    tag = "operations",
    responses(
        (status = 200, description = "The cluster: partitions, nodes, Redis", body = ClusterHealth),
        shared::openapi::Refused,
        (status = 503, description = "Redis cannot be reached", body = ClusterDown),
    ),
)]
#[get("/v1/cluster/health")]
async fn cluster_health(coordinator: web::Data<Coordinator>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.allow(Scope::Read, [])?;
    let inner = coordinator.inner();
    let about = About {
        origin: inner.origin.clone(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_ms: inner.started.elapsed().as_millis() as u64,
        node_dead_after_ms: inner.settings.node_dead_after_ms,
        rules: inner.rules.rules().count(),
        events_received: inner.metrics.events.get(),
        invalidations_logged: inner.metrics.invalidations.get(),
    };
    let gathered = async {
        let mut conn = coordinator.conn().await?;
        let view = cluster::view(&conn.shared(), &inner.layout, &inner.acks, inner.settings.node_dead_after_ms, true)
            .await
            .map_err(|e| coordinator.redis_failed(e))?;
        let redis = cluster::redis_info(&mut conn).await.map_err(|e| coordinator.redis_failed(e))?;
        Ok::<_, ApiError>((view, redis))
    };
    let sources = inner.sources.iter().map(crate::source::Status::health).collect();
    Ok(match gathered.await {
        Ok((view, redis)) => {
            let all_synced = view.nodes.iter().all(|n| n.status == "synced");
            HttpResponse::Ok().json(ClusterHealth {
                status: if all_synced { "ok" } else { "degraded" },
                epoch: view.epoch,
                seq: view.seq,
                partitions: view.partitions,
                checked_at_ms: now_ms(),
                redis,
                coordinator: about,
                nodes: view.nodes,
                sources,
            })
        }
        Err(e) => {
            let redis = serde_json::json!({"reachable": false, "error": e.message});
            HttpResponse::ServiceUnavailable().json(ClusterDown {
                status: "down",
                error: e.code,
                message: format!("the cluster cannot be seen: {}", e.message),
                seq: None,
                redis,
                coordinator: about,
                nodes: Vec::new(),
                sources,
            })
        }
    })
}

/// `GET /v1/rules`: the entity rules and the dependency graph they make.
#[utoipa::path(
    tag = "operations",
    responses(
        (status = 200, description = "The rules, and the graph of entities they connect", body = Object),
        shared::openapi::Refused,
    ),
)]
#[get("/v1/rules")]
async fn rules(coordinator: web::Data<Coordinator>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.allow(Scope::Read, [])?;
    Ok(HttpResponse::Ok().json(coordinator.inner().rules.describe()))
}

/// `GET /readyz`: Redis answers and the partition layout agrees (a readiness
/// probe; no token needed).
#[utoipa::path(
    tag = "probes",
    security(()),
    responses(
        (status = 200, description = "Ready", body = shared::service::Probe),
        (status = 503, description = "Not ready: `reason` says why (`redis_unreachable`, `redis_auth_failed`, `redis_acl_denied`, `redis_tls_failed`)", body = ErrorBody),
    ),
)]
#[get("/readyz")]
async fn readyz(coordinator: web::Data<Coordinator>) -> Result<HttpResponse, ApiError> {
    if coordinator.inner().redis_ok.load(Ordering::Acquire) {
        Ok(HttpResponse::Ok().json(shared::service::Probe { status: "ready" }))
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

/// `GET /metrics`: Prometheus metrics (open unless `metrics_token_required`).
#[utoipa::path(
    tag = "probes",
    responses(
        (status = 200, description = "The Prometheus text format", body = String, content_type = "text/plain"),
        shared::openapi::Refused,
    ),
)]
#[get("/metrics")]
async fn metrics(coordinator: web::Data<Coordinator>) -> HttpResponse {
    metrics_response(&coordinator.inner().metrics.registry)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_committed_openapi_document_is_the_generated_one() {
        shared::openapi::assert_committed(
            &super::openapi(),
            concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"),
        );
    }
}
