//! The cache API over HTTP: thin handlers that parse, call [`Agent`], and shape
//! the answer as the contract says. Plus the operational endpoints.

use std::borrow::Cow;
use std::time::Duration;

use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{get, web, HttpRequest, HttpResponse};
use percent_encoding::percent_decode_str;
use utoipa::{IntoParams, OpenApi};
use utoipa_actix_web::service_config::ServiceConfig;

use shared::audit::{self, Trail};
use shared::auth::{Caller, Scope};
use shared::names::InvalidName;
use shared::openapi::ErrorBody;
use shared::protocol::Selector;
use shared::service::{metrics_response, read_body, ApiError};

use crate::agent::{Agent, AgentError, Layer, Put, Read};

/// The cache API's scope, and its route label in the latency metrics.
pub const CACHE_SCOPE: (&str, &str) = ("/v1/cache/", "/v1/cache/{tenant}/{key}");

/// The headers of a hit, named once.
const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const X_CACHE_TAGS: HeaderName = HeaderName::from_static("x-cache-tags");
const X_CACHE_TTL: HeaderName = HeaderName::from_static("x-cache-ttl");
const X_CACHE_REFRESH: HeaderName = HeaderName::from_static("x-cache-refresh");
const X_CACHE_FILL_TOKEN: HeaderName = HeaderName::from_static("x-cache-fill-token");

/// Registers every route. The cache API is a scope with one handler that
/// dispatches on the method: a prefix match, where a `{rest:.*}` route would
/// run a regex on every read (about a tenth of an agent's CPU under load).
///
/// Each handler's `#[utoipa::path]` puts it in the OpenAPI document as it is
/// registered; the cache API's three methods, dispatched by one handler, are
/// documented from their own functions (see [`openapi`]).
pub fn configure(cfg: &mut ServiceConfig) {
    cfg.map(|cfg| cfg.service(web::scope("/v1/cache").default_service(web::to(cache_entry))))
        .service(status)
        .service(shared::service::healthz)
        .service(readyz)
        .service(metrics);
}

/// The cache API's methods, which [`configure`] registers as one scope.
#[derive(OpenApi)]
#[openapi(paths(get_entry, put_entry, delete_entry))]
struct CacheApi;

/// The node agent's OpenAPI document: the routes [`configure`] registers.
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa_actix_web::AppExt;
    let (_, mut doc) = actix_web::App::new().into_utoipa_app().configure(configure).split_for_parts();
    doc.merge(CacheApi::openapi());
    shared::openapi::finish(
        doc,
        "dcc node agent",
        "The cache API beside an app instance: reads from L1 (in memory) then L2 (Redis), writes to L2, and \
         invalidations that every agent applies; its status and probes.",
    )
}

/// Splits `/v1/cache/{tenant}/{key}` from the raw (still percent-encoded)
/// path; borrowed from it unless something had to be decoded.
fn tenant_and_key(req: &HttpRequest) -> Result<(Cow<'_, str>, Cow<'_, str>), ApiError> {
    split_cache_path(req.path())
}

/// `tenant_and_key` of a raw path. An entry point for the fuzz targets.
#[doc(hidden)]
pub fn split_cache_path(path: &str) -> Result<(Cow<'_, str>, Cow<'_, str>), ApiError> {
    let rest = path.strip_prefix("/v1/cache/").unwrap_or_default();
    let Some((tenant, key)) = rest.split_once('/') else {
        return Err(ApiError::bad_request("invalid_key", "use /v1/cache/{tenant}/{key}: the key is missing"));
    };
    Ok((decode_segment(tenant, "invalid_tenant")?, decode_segment(key, "invalid_key")?))
}

/// One percent-decoded path segment, or the error `code` if it is not UTF-8.
fn decode_segment<'a>(segment: &'a str, code: &'static str) -> Result<Cow<'a, str>, ApiError> {
    percent_decode_str(segment).decode_utf8().map_err(|_| {
        ApiError::from(InvalidName { code, message: format!("{code}: the path is not valid percent-encoded UTF-8") })
    })
}

/// `/v1/cache/{tenant}/{key}`, by method; each checks the caller's scope on
/// the tenant before anything else (see [`shared::auth`]).
async fn cache_entry(
    req: HttpRequest,
    body: web::Payload,
    agent: web::Data<Agent>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    match *req.method() {
        Method::GET => get_entry(req, agent, caller).await,
        Method::PUT => put_entry(req, body, agent, caller).await,
        Method::DELETE => delete_entry(req, agent, caller).await,
        _ => {
            let refusal = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "a cache entry takes GET, PUT and DELETE",
            );
            let mut response = actix_web::ResponseError::error_response(&refusal);
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, PUT, DELETE"));
            Ok(response)
        }
    }
}

/// The path of a cache entry: its tenant and its key.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Documentation: `split_cache_path` reads the raw path.
struct EntryPath {
    /// The tenant: 1 to 64 of `[A-Za-z0-9_-]`.
    #[param(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    tenant: String,
    /// The key: the rest of the path, percent-encoded. It may contain `/`
    /// (`/v1/cache/acme/user/42/profile` is key `user/42/profile`); 1 to 1024
    /// bytes once decoded, no control characters.
    key: String,
}

/// A 200 for `entry`, answered from `layer` (`L1`, `L2` or `STALE`): its
/// content type, `X-Cache`, tags and seconds left, the body still to add.
fn hit_response(entry: &crate::l1::Entry, layer: &'static str) -> actix_web::HttpResponseBuilder {
    let content_type =
        HeaderValue::from_str(entry.content_type()).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let mut resp = HttpResponse::Ok();
    resp.insert_header((header::CONTENT_TYPE, content_type))
        .insert_header((X_CACHE, HeaderValue::from_static(layer)))
        .insert_header((X_CACHE_TAGS, entry.tags().collect::<Vec<_>>().join(",")))
        .insert_header((X_CACHE_TTL, HeaderValue::from(entry.ttl_left().as_secs())));
    resp
}

/// The `stale-if-error=S` directive of a request's `Cache-Control`, if any
/// (RFC 5861); a malformed one counts as absent.
fn stale_if_error(req: &HttpRequest) -> Option<Duration> {
    req.headers()
        .get_all(header::CACHE_CONTROL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|directive| directive.trim().split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("stale-if-error"))
        .and_then(|(_, secs)| secs.trim().trim_matches('"').parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// `GET /v1/cache/{tenant}/{key}`: the value, from L1 or L2.
#[utoipa::path(
    get,
    path = "/v1/cache/{tenant}/{key}",
    tag = "cache",
    params(EntryPath),
    responses(
        (status = 200, description = "A hit: the value's bytes, with the content type it was stored with",
         content_type = "*/*", body = Vec<u8>,
         headers(
             ("X-Cache" = String, description = "`L1` or `L2`: where the value came from; `STALE` for a \
               stale-if-error answer from L1 while Redis is unreachable"),
             ("Age" = u64, description = "With `X-Cache: STALE` only: whole seconds since the entry was last \
               known fresh"),
             ("X-Cache-Tags" = String, description = "Its tags, comma-separated"),
             ("X-Cache-TTL" = u64, description = "Whole seconds it has left to live"),
             ("X-Cache-Refresh" = String, description = "`1` on the first hit (on this agent) past \
               `refresh_ahead` of the entry's TTL: reload the value and PUT it with the fill token before it \
               expires"),
             ("X-Cache-Fill-Token" = String, description = "With `X-Cache-Refresh` only: the token of that PUT"),
         )),
        (status = 404, description = "Not cached (`not_found`): load it and PUT it with the fill token",
         body = ErrorBody,
         headers(("X-Cache-Fill-Token" = String, description = "Pass it to the PUT that fills this key"))),
        shared::openapi::BadInput,
        shared::openapi::Refused,
        shared::openapi::Unavailable,
    ),
)]
async fn get_entry(req: HttpRequest, agent: web::Data<Agent>, caller: Caller) -> Result<HttpResponse, ApiError> {
    let (tenant, key) = tenant_and_key(&req)?;
    caller.allow(Scope::Read, [tenant.as_ref()])?;
    let read = match agent.get(&tenant, &key).await {
        Ok(read) => read,
        // Redis is unreachable and L1 cannot be proven fresh: with
        // `Cache-Control: stale-if-error=S`, L1 may answer up to S seconds
        // past its bound (see `Agent::stale`).
        Err(e @ AgentError::Unavailable(_)) => {
            let stale = stale_if_error(&req).and_then(|within| agent.stale(&tenant, &key, within));
            let Some((entry, age)) = stale else { return Err(e.into()) };
            let mut resp = hit_response(&entry, "STALE");
            resp.insert_header((header::AGE, HeaderValue::from(age.as_secs())));
            return Ok(resp.body(entry.value()));
        }
        Err(e) => return Err(e.into()),
    };
    match read {
        Read::Hit { entry, layer } => {
            let mut resp = hit_response(&entry, if layer == Layer::L1 { "L1" } else { "L2" });
            // Past `refresh_ahead` of its TTL, one caller is asked to reload it.
            if let Some(token) = agent.refresh_hint(&entry).await {
                if let Ok(token) = HeaderValue::from_str(&token) {
                    resp.insert_header((X_CACHE_REFRESH, HeaderValue::from_static("1")))
                        .insert_header((X_CACHE_FILL_TOKEN, token));
                }
            }
            Ok(resp.body(entry.value()))
        }
        Read::Miss { fill_token } => {
            let err = ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{tenant}/{key} is not cached; load it and PUT it with the fill token"),
            );
            let mut resp = actix_web::ResponseError::error_response(&err);
            if let Ok(v) = HeaderValue::from_str(&fill_token) {
                resp.headers_mut().insert(X_CACHE_FILL_TOKEN, v);
            }
            Ok(resp)
        }
    }
}

/// Decodes one `application/x-www-form-urlencoded` component strictly: bytes
/// that are not UTF-8 are refused, not replaced, so that a tag or a dependency
/// is never stored under a name the client did not send.
fn decode_query_component(raw: &str) -> Result<String, ApiError> {
    let plus_as_space = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&plus_as_space).decode_utf8().map(|s| s.into_owned()).map_err(|_| {
        ApiError::bad_request("invalid_query", format!("query component {raw:?} is not UTF-8 once percent-decoded"))
    })
}

/// The query of a PUT, as the document gives it; [`parse_put_query`] reads it.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Documentation: `parse_put_query` reads the query.
struct PutParams {
    /// Seconds to live, at least 1 and at most the key's maximum (its `[[ttl]]`
    /// tier's `max_secs`, else `max_ttl_secs`). Default: the tier's default
    /// (else `default_ttl_secs`), shortened by up to `ttl_jitter` of its length.
    #[param(minimum = 1)]
    ttl: Option<u64>,
    /// Tags, comma-separated (or the parameter repeated).
    tags: Option<String>,
    /// Keys of the same tenant this entry depends on: invalidating one of them
    /// invalidates it too. Comma-separated (or repeated).
    depends_on: Option<String>,
    /// The `X-Cache-Fill-Token` of the miss this value fills: an invalidation
    /// since that read makes the PUT a 409 `stale_fill` instead of storing a stale value.
    fill_token: Option<String>,
}

/// The PUT query: `ttl`, `tags`, `depends_on` (comma lists, or repeated),
/// `fill_token`. Public for the fuzz targets.
#[doc(hidden)]
pub fn parse_put_query(query: &str) -> Result<Put, ApiError> {
    let mut put = Put::default();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode_query_component(raw_name)?;
        let value = decode_query_component(raw_value)?;
        match name.as_str() {
            "ttl" => {
                let ttl = value.parse::<u64>().ok().filter(|t| *t >= 1).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_ttl",
                        format!("ttl must be a whole number of seconds, at least 1; got {value:?}"),
                    )
                })?;
                put.ttl_secs = Some(ttl);
            }
            // An empty list (`tags=`) means none; an empty item (`a,,b`) is an error.
            "tags" if value.is_empty() => {}
            "tags" => put.tags.extend(value.split(',').map(str::to_string)),
            "depends_on" if value.is_empty() => {}
            "depends_on" => put.depends_on.extend(value.split(',').map(str::to_string)),
            "fill_token" => put.fill_token = Some(value),
            other => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("unknown parameter {other:?}; PUT takes ttl, tags, depends_on and fill_token"),
                ))
            }
        }
    }
    Ok(put)
}

/// `PUT /v1/cache/{tenant}/{key}`: store a value in L2 (and this agent's L1).
#[utoipa::path(
    put,
    path = "/v1/cache/{tenant}/{key}",
    tag = "cache",
    params(EntryPath, PutParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
                 description = "The value: any bytes, stored with the request's content type"),
    responses(
        (status = 204, description = "Stored"),
        shared::openapi::BadInput,
        shared::openapi::Refused,
        (status = 409, description = "`stale_fill`: an invalidation came after the read this fill token is from; nothing was stored", body = ErrorBody),
        shared::openapi::TooLarge,
        (status = 503, description = "`unavailable` (Redis did not answer) or `not_replicated` (fewer replicas than `min_replicas` took the write)", body = ErrorBody),
    ),
)]
async fn put_entry(
    req: HttpRequest,
    body: web::Payload,
    agent: web::Data<Agent>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    let (tenant, key) = tenant_and_key(&req)?;
    caller.allow(Scope::Write, [tenant.as_ref()])?;
    let mut put = parse_put_query(req.query_string())?;
    put.value = read_body(&req, body, agent.inner().settings.max_value_bytes).await?;
    put.content_type =
        req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    agent.put(&tenant, &key, put).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `DELETE /v1/cache/{tenant}/{key}`: invalidate one key everywhere (and
/// what depends on it).
#[utoipa::path(
    delete,
    path = "/v1/cache/{tenant}/{key}",
    tag = "cache",
    params(EntryPath),
    responses(
        (status = 204, description = "Invalidated: logged, deleted from L2, broadcast to every agent",
         headers(
             ("X-Invalidation-Seq" = u64, description = "Where it was logged"),
             ("X-Invalidation-Partition" = u16, description = "In which partition"),
             ("X-Invalidation-Epoch" = String, description = "That partition's epoch"),
         )),
        shared::openapi::BadInput,
        shared::openapi::Refused,
        (status = 503, description = "`unavailable` (Redis did not answer) or `not_replicated`", body = ErrorBody),
    ),
)]
async fn delete_entry(req: HttpRequest, agent: web::Data<Agent>, caller: Caller) -> Result<HttpResponse, ApiError> {
    let (tenant, key) = tenant_and_key(&req)?;
    caller.allow(Scope::Invalidate, [tenant.as_ref()])?;
    let deleted = agent.delete(&tenant, &key).await.map_err(ApiError::from);
    if let Some(trail) = req.app_data::<web::Data<Trail>>() {
        let selector = Selector { tenant: tenant.to_string(), keys: vec![key.to_string()], ..Selector::default() };
        let entry = audit::Entry::invalidation("delete", &caller, &[selector]);
        trail.record(match &deleted {
            Ok(outcome) => entry.answered(204, Some(outcome.position.seq), None),
            Err(e) => entry.answered(e.status.as_u16(), None, Some(e)),
        });
    }
    let outcome = deleted?;
    let at = &outcome.position;
    Ok(HttpResponse::NoContent()
        .insert_header(("X-Invalidation-Seq", at.seq.to_string()))
        .insert_header(("X-Invalidation-Partition", at.partition.to_string()))
        .insert_header(("X-Invalidation-Epoch", at.epoch.as_str()))
        .finish())
}

/// `GET /v1/status`: this agent: readiness, partitions, L1, L2 and invalidation counters.
#[utoipa::path(
    tag = "operations",
    responses((status = 200, description = "This agent's status", body = crate::agent::Status), shared::openapi::Refused),
)]
#[get("/v1/status")]
async fn status(agent: web::Data<Agent>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.allow(Scope::Read, [])?;
    Ok(HttpResponse::Ok().json(agent.status()))
}

/// `GET /readyz`: connected, subscribed and proven in sync (a readiness probe; no token needed).
#[utoipa::path(
    tag = "probes",
    security(()),
    responses(
        (status = 200, description = "Ready", body = shared::service::Probe),
        (status = 503, description = "Not ready: `reason` says why", body = ErrorBody),
    ),
)]
#[get("/readyz")]
async fn readyz(agent: web::Data<Agent>) -> Result<HttpResponse, ApiError> {
    match agent.readiness() {
        Ok(()) => Ok(HttpResponse::Ok().json(shared::service::Probe { status: "ready" })),
        Err(reason) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", format!("not ready: {reason}"))
            .with("reason", reason.into())),
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
async fn metrics(agent: web::Data<Agent>) -> HttpResponse {
    let inner = agent.inner();
    let m = &inner.metrics;
    crate::metrics::raise(&m.hits.l1, inner.usage.l1_hits());
    m.l1_bytes.set(i64::try_from(inner.l1.bytes()).unwrap_or(i64::MAX));
    m.l1_entries.set(i64::try_from(inner.l1.entries()).unwrap_or(i64::MAX));
    m.l1_evictions
        .set(i64::try_from(inner.l1.stats.evictions.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or(i64::MAX));
    if let Some(tenants) = &m.tenants {
        tenants.update(&inner.usage.totals());
    }
    metrics_response(&m.registry)
}

#[cfg(test)]
mod openapi_tests {
    #[test]
    fn the_committed_openapi_document_is_the_generated_one() {
        shared::openapi::assert_committed(
            &super::openapi(),
            concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.node-agent.json"),
        );
    }
}
