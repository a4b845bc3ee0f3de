//! The cache API over HTTP: thin handlers that parse, call [`Agent`], and shape
//! the answer as the contract says. Plus the operational endpoints.

use std::borrow::Cow;

use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use percent_encoding::percent_decode_str;

use shared::audit::{self, Trail};
use shared::auth::{Caller, Scope};
use shared::names::InvalidName;
use shared::protocol::Selector;
use shared::service::{metrics_response, read_body, ApiError};

use crate::agent::{Agent, Layer, Put, Read};

/// The cache API's scope, and its route label in the latency metrics.
pub const CACHE_SCOPE: (&str, &str) = ("/v1/cache/", "/v1/cache/{tenant}/{key}");

/// The headers of a hit, named once.
const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const X_CACHE_TAGS: HeaderName = HeaderName::from_static("x-cache-tags");
const X_CACHE_TTL: HeaderName = HeaderName::from_static("x-cache-ttl");

/// Registers every route. The cache API is a scope with one handler that
/// dispatches on the method: a prefix match, where a `{rest:.*}` route would
/// run a regex on every read (about a tenth of an agent's CPU under load).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::scope("/v1/cache").default_service(web::to(cache_entry)))
        .route("/v1/status", web::get().to(status))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics));
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
        _ => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "a cache entry takes GET, PUT and DELETE",
        )),
    }
}

async fn get_entry(req: HttpRequest, agent: web::Data<Agent>, caller: Caller) -> Result<HttpResponse, ApiError> {
    let (tenant, key) = tenant_and_key(&req)?;
    caller.allow(Scope::Read, [tenant.as_ref()])?;
    match agent.get(&tenant, &key).await? {
        Read::Hit { entry, layer } => {
            let mut resp = HttpResponse::Ok();
            resp.insert_header((
                header::CONTENT_TYPE,
                HeaderValue::from_str(&entry.content_type)
                    .unwrap_or(HeaderValue::from_static("application/octet-stream")),
            ))
            .insert_header((X_CACHE, HeaderValue::from_static(if layer == Layer::L1 { "L1" } else { "L2" })))
            .insert_header((X_CACHE_TAGS, entry.tags.join(",")))
            .insert_header((X_CACHE_TTL, HeaderValue::from(entry.ttl_left().as_secs())));
            Ok(resp.body(entry.value.clone()))
        }
        Read::Miss { fill_token } => {
            let err = ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{tenant}/{key} is not cached; load it and PUT it with the fill token"),
            );
            let mut resp = actix_web::ResponseError::error_response(&err);
            if let Ok(v) = HeaderValue::from_str(&fill_token) {
                resp.headers_mut().insert(header::HeaderName::from_static("x-cache-fill-token"), v);
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

async fn status(agent: web::Data<Agent>, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.allow(Scope::Read, [])?;
    Ok(HttpResponse::Ok().json(agent.status()))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn readyz(agent: web::Data<Agent>) -> Result<HttpResponse, ApiError> {
    match agent.readiness() {
        Ok(()) => Ok(HttpResponse::Ok().json(serde_json::json!({"status": "ready"}))),
        Err(reason) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", format!("not ready: {reason}"))
            .with("reason", reason.into())),
    }
}

async fn metrics(agent: web::Data<Agent>) -> HttpResponse {
    let inner = agent.inner();
    let m = &inner.metrics;
    m.l1_bytes.set(i64::try_from(inner.l1.bytes()).unwrap_or(i64::MAX));
    m.l1_entries.set(i64::try_from(inner.l1.entries()).unwrap_or(i64::MAX));
    m.l1_evictions
        .set(i64::try_from(inner.l1.stats.evictions.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or(i64::MAX));
    metrics_response(&m.registry)
}
