//! Plumbing both HTTP services share: the JSON error type, request-body and
//! query error handlers, layered settings, tracing, Prometheus text,
//! reconnect backoff and the shutdown signal. (Redis connections: [`crate::store`].)

use std::path::Path;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{get, HttpResponse, ResponseError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::names::InvalidName;

/// An error answered as `{"error": code, "message": ...}` plus optional extra
/// fields, with a fitting status.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// snake_case code.
    pub code: &'static str,
    /// What went wrong and what to do.
    pub message: String,
    /// Extra top-level fields (such as `lagging`).
    pub extra: Option<serde_json::Map<String, serde_json::Value>>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), extra: None }
    }

    /// 400 with a code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 503 `unavailable` because Redis could not be reached.
    pub fn redis_unavailable(err: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("Redis is unreachable ({err}); retry shortly"),
        )
    }

    /// Adds a top-level field to the JSON body.
    pub fn with(mut self, field: &str, value: serde_json::Value) -> Self {
        self.extra.get_or_insert_with(Default::default).insert(field.to_string(), value);
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut body = self.extra.clone().unwrap_or_default();
        body.insert("error".into(), self.code.into());
        body.insert("message".into(), self.message.clone().into());
        let mut response = HttpResponse::build(self.status);
        if self.status == StatusCode::UNAUTHORIZED {
            response.insert_header((actix_web::http::header::WWW_AUTHENTICATE, "Bearer"));
        }
        response.json(body)
    }
}

impl From<InvalidName> for ApiError {
    fn from(e: InvalidName) -> Self {
        ApiError::bad_request(e.code, e.message)
    }
}

/// JSON body extraction: size limit and JSON errors for bad bodies.
pub fn json_config(limit: usize) -> actix_web::web::JsonConfig {
    actix_web::web::JsonConfig::default().limit(limit).error_handler(|err, _req| {
        use actix_web::error::JsonPayloadError as E;
        let api = match &err {
            E::Overflow { .. } | E::OverflowKnownLength { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", format!("{err}; split the request"))
            }
            E::ContentType => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with Content-Type: application/json",
            ),
            _ => ApiError::bad_request("invalid_json", format!("the body is not valid JSON for this endpoint: {err}")),
        };
        api.into()
    })
}

/// Query-string extraction: a JSON 400 for malformed parameters.
pub fn query_config() -> actix_web::web::QueryConfig {
    actix_web::web::QueryConfig::default()
        .error_handler(|err, _req| ApiError::bad_request("invalid_query", format!("bad query string: {err}")).into())
}

/// Path-parameter extraction (`/v1/keys/{tenant}`): a JSON 400 for a segment
/// that is not valid percent-encoded UTF-8.
pub fn path_config() -> actix_web::web::PathConfig {
    actix_web::web::PathConfig::default().error_handler(|err, _req| {
        ApiError::bad_request("invalid_tenant", format!("the path is not valid percent-encoded UTF-8: {err}")).into()
    })
}

/// The answer to any unknown route, or a known one with a method it does not
/// take (405, with `Allow`, when the process registered its
/// [`crate::openapi::Methods`]).
pub async fn not_found(req: actix_web::HttpRequest) -> HttpResponse {
    let methods = req.app_data::<actix_web::web::Data<crate::openapi::Methods>>();
    if let Some(allow) = methods.and_then(|m| m.allowed(req.path())) {
        let mut response = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} takes {allow}; see /docs for the API", req.path()),
        )
        .error_response();
        if let Ok(value) = actix_web::http::header::HeaderValue::from_str(allow) {
            response.headers_mut().insert(actix_web::http::header::ALLOW, value);
        }
        return response;
    }
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint; see /docs for the API").error_response()
}

/// Loads a settings tree in layers: defaults (the struct's serde defaults), then
/// the TOML file, then `{PREFIX}_…` environment variables, then flags.
pub fn load_settings<T: DeserializeOwned>(
    file: Option<&Path>,
    env_prefix: &str,
    flags: &[(&str, Option<String>)],
) -> Result<T, config::ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml).required(true));
    }
    builder = builder.add_source(
        config::Environment::with_prefix(env_prefix).prefix_separator("_").separator("__").try_parsing(true),
    );
    for (key, value) in flags {
        builder = builder.set_override_option(*key, value.clone())?;
    }
    builder.build()?.try_deserialize()
}

/// A setting that is a secret (a password, encryption keys): read like a
/// string, never printed (`Debug` shows `<redacted>`), so that a settings
/// dump or an error that formats the settings cannot leak it.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_string())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Sets up tracing: human-readable or JSON lines, filtered by `RUST_LOG`
/// (default `info`).
pub fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    // A second call (tests embedding a service) keeps the first subscriber.
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// `GET /healthz`, `GET /readyz`: `{"status": "ok" | "ready"}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Probe {
    /// `ok` (alive) or `ready`.
    pub status: &'static str,
}

/// `GET /healthz`: the process is alive (a liveness probe; no token needed).
#[utoipa::path(tag = "probes", security(()), responses((status = 200, description = "Alive", body = Probe)))]
#[get("/healthz")]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Probe { status: "ok" })
}

/// Renders a Prometheus registry as text exposition.
pub fn metrics_response(registry: &prometheus::Registry) -> HttpResponse {
    use prometheus::Encoder;
    let encoder = prometheus::TextEncoder::new();
    let mut buf = Vec::new();
    match encoder.encode(&registry.gather(), &mut buf) {
        Ok(()) => HttpResponse::Ok().content_type(encoder.format_type()).body(buf),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "metrics_failed", e.to_string()).error_response(),
    }
}

/// A histogram of HTTP latency by method, route template and status.
pub fn http_latency_histogram(registry: &prometheus::Registry) -> prometheus::HistogramVec {
    let hist = prometheus::HistogramVec::new(
        prometheus::HistogramOpts::new("dcc_http_request_duration_seconds", "HTTP request latency")
            .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0]),
        &["method", "route", "status"],
    )
    .unwrap_or_else(|e| panic!("static metric definition is valid: {e}"));
    register(registry, hist)
}

/// Registers a collector; metric names are static, so a clash is a programming error.
pub fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &prometheus::Registry, c: C) -> C {
    if let Err(e) = registry.register(Box::new(c.clone())) {
        panic!("metric registered twice: {e}");
    }
    c
}

/// Exponential reconnect backoff, from 50 ms up to 5 s, reset on success.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Delay before the next attempt.
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Duration::from_millis(50) }
    }
}

impl Backoff {
    /// Waits the current delay, then doubles it.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Duration::from_secs(5));
    }

    /// Starts again from the shortest delay.
    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// Resolves on SIGINT or SIGTERM, and says which one arrived.
pub async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
            (Ok(mut int), Ok(mut term)) => tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            _ => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// Serializes a value to a JSON response with status 200.
pub fn json_ok<T: Serialize>(value: &T) -> HttpResponse {
    HttpResponse::Ok().json(value)
}

/// Reads a request body up to `limit` bytes; a larger one is refused with 413
/// as soon as it is known to be larger (from `Content-Length` or while reading).
pub async fn read_body(
    req: &actix_web::HttpRequest,
    mut payload: actix_web::web::Payload,
    limit: usize,
) -> Result<actix_web::web::Bytes, ApiError> {
    use futures_util::StreamExt;
    let too_large = |size: usize| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is {size} bytes or more, over the limit of {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(len) = declared.filter(|len| *len > limit) {
        return Err(too_large(len));
    }
    let mut body = actix_web::web::BytesMut::with_capacity(declared.unwrap_or(0).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request("invalid_body", format!("could not read the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(too_large(body.len() + chunk.len()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The HTTP latency histogram, as app data for [`record_latency`], and the
/// route label of a scope that answers without a route pattern, if the
/// service has one: `(path prefix, label)`.
#[derive(Clone)]
pub struct HttpLatency(pub prometheus::HistogramVec, pub Option<(&'static str, &'static str)>);

/// Middleware (`actix_web::middleware::from_fn`): records every request's
/// latency by method, route template and status in the app's [`HttpLatency`].
pub async fn record_latency<B: actix_web::body::MessageBody>(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<B>,
) -> Result<actix_web::dev::ServiceResponse<B>, actix_web::Error> {
    let start = std::time::Instant::now();
    let resp = next.call(req).await?;
    let request = resp.request();
    if let Some(HttpLatency(histogram, scope)) = request.app_data::<HttpLatency>() {
        let pattern = request.match_pattern();
        let route = pattern.as_deref().unwrap_or_else(|| {
            let path = request.path();
            scope.filter(|(prefix, _)| path.starts_with(prefix)).map_or("unmatched", |(_, label)| label)
        });
        // The method is the client's to choose (`FOO /v1/rules` is routed
        // too): one outside the standard set is labelled `other`, so that no
        // client can add series without bound.
        let method = request.method().as_str();
        let standard = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE"];
        let method = if standard.contains(&method) { method } else { "other" };
        histogram.with_label_values(&[method, route, resp.status().as_str()]).observe(start.elapsed().as_secs_f64());
    }
    Ok(resp)
}

/// Middleware (`actix_web::middleware::from_fn`): refuses a request with
/// `Upgrade: websocket` (400 `upgrade_not_supported`). Neither service
/// speaks WebSocket, and actix-http reads the body of such a request until
/// the connection closes, whatever its `Content-Length` says: a route that
/// reads the body would wait for as long as the client keeps it open.
pub async fn refuse_websocket_upgrade<B: actix_web::body::MessageBody>(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<B>,
) -> Result<actix_web::dev::ServiceResponse<B>, actix_web::Error> {
    let upgrade = req.headers().get_all(actix_web::http::header::UPGRADE);
    if upgrade.into_iter().any(|v| v.to_str().is_ok_and(|v| v.trim().eq_ignore_ascii_case("websocket"))) {
        let message = "this service does not speak WebSocket: send the request without Upgrade: websocket";
        return Err(ApiError::bad_request("upgrade_not_supported", message).into());
    }
    next.call(req).await
}
