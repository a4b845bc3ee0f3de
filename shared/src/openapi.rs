//! What the two services' OpenAPI documents share: the error body, the
//! bearer-token scheme, the common error answers, and `GET /openapi.json` with
//! `GET /docs` (Swagger UI, its files built into the binary: nothing is
//! fetched from the internet at build or run time).
//!
//! Each service collects its own paths from its handlers' `#[utoipa::path]`
//! annotations (utoipa-actix-web, as the routes are registered), so the
//! document cannot list a route the server does not have, nor miss one.

use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{InfoBuilder, LicenseBuilder, OpenApi};
use utoipa::ToSchema;

/// Every error answer: `{"error": code, "message": text}`, plus fields some
/// errors add (`reason` of a 503 `not_ready`, `lagging` of a 504, ...).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": "invalid_tenant", "message": "invalid_tenant: a tenant is 1 to 64 characters of [A-Za-z0-9_.-]"}))]
pub struct ErrorBody {
    /// A stable snake_case code, such as `invalid_key` or `forbidden`.
    pub error: String,
    /// What went wrong and what to do, in words.
    pub message: String,
}

/// The name of the bearer-token security scheme in both documents.
pub const BEARER: &str = "bearer";

/// Fills in what every document of this project has: its title, version,
/// description and license, the bearer-token scheme (required on every
/// operation when tokens are configured; probes and the documents themselves
/// stay open), and the error schema.
pub fn finish(mut doc: OpenApi, title: &str, description: &str) -> OpenApi {
    doc.info = InfoBuilder::new()
        .title(title)
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(description))
        .license(Some(LicenseBuilder::new().name("Apache-2.0").identifier(Some("Apache-2.0")).build()))
        .build();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(BEARER, SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    // A token, or none when the service runs without tokens (loopback only).
    doc.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new()), SecurityRequirement::default()]);
    doc
}

/// `GET /openapi.json` and the Swagger UI at `GET /docs/` (and `/docs`, which
/// redirects there), to register on an actix `App`.
pub fn serve_docs(doc: OpenApi) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.route("/docs", web::get().to(redirect_to_docs))
            .service(utoipa_swagger_ui::SwaggerUi::new("/docs/{_:.*}").url("/openapi.json", doc));
    }
}

async fn redirect_to_docs() -> HttpResponse {
    HttpResponse::PermanentRedirect().insert_header(("Location", "/docs/")).finish()
}

/// Whether a path is one of the documents' (served without a token: they
/// describe the API, they hold no data).
pub fn is_docs_path(path: &str) -> bool {
    path == "/openapi.json" || path == "/docs" || path.starts_with("/docs/")
}

/// The errors of bad input, answered before anything is done.
#[derive(utoipa::IntoResponses)]
pub enum BadInput {
    /// Bad input: the body, a name, a query parameter (`invalid_*`), or a
    /// pattern covering the whole tenant without `confirm`.
    #[response(status = 400)]
    BadRequest(#[to_schema] ErrorBody),
}

/// The refusals of the bearer-token check.
#[derive(utoipa::IntoResponses)]
pub enum Refused {
    /// No token, an unknown one, or two `Authorization` headers (with
    /// `WWW-Authenticate: Bearer`). Only when tokens are configured.
    #[response(status = 401)]
    Unauthorized(#[to_schema] ErrorBody),
    /// The token lacks the scope, or a tenant, the request needs.
    #[response(status = 403)]
    Forbidden(#[to_schema] ErrorBody),
}

/// A body over the configured limit.
#[derive(utoipa::IntoResponses)]
pub enum TooLarge {
    /// The body is larger than `max_body_bytes` (`max_value_bytes` for a cache value).
    #[response(status = 413)]
    PayloadTooLarge(#[to_schema] ErrorBody),
}

/// Redis could not be reached, or cannot be trusted yet.
#[derive(utoipa::IntoResponses)]
pub enum Unavailable {
    /// `unavailable`: Redis did not answer (or refused); retry shortly.
    #[response(status = 503)]
    ServiceUnavailable(#[to_schema] ErrorBody),
}

/// `wait=all` ran out of time.
#[derive(utoipa::IntoResponses)]
pub enum WaitTimedOut {
    /// `wait_timeout`: the invalidation is logged and broadcast, but the
    /// node agents in `lagging` had not applied it in time.
    #[response(status = 504)]
    GatewayTimeout(#[to_schema] ErrorBody),
}

/// A JSON body sent with another content type.
#[derive(utoipa::IntoResponses)]
pub enum NotJson {
    /// The body must be `application/json`.
    #[response(status = 415)]
    UnsupportedMediaType(#[to_schema] ErrorBody),
}

/// A document as it is committed under `docs/`: pretty JSON, one final newline.
pub fn to_committed_text(doc: &OpenApi) -> String {
    let mut text = doc.to_pretty_json().unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

/// Fails unless the committed document at `path` is `doc`, so that a change
/// of the API shows up in review as a change of the committed file. With
/// `DCC_UPDATE_OPENAPI=1` it writes `doc` there instead (`make openapi`).
pub fn assert_committed(doc: &OpenApi, path: &str) {
    let generated = to_committed_text(doc);
    if std::env::var_os("DCC_UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &generated).unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
        return;
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "{path} is not the document the code generates: the API changed; run `make openapi` and commit the file"
    );
}

/// The methods each documented path takes, read off the document: the
/// default service answers a known path with an undocumented method 405
/// `method_not_allowed` with an `Allow` header, not 404 (see
/// [`crate::service::not_found`]).
#[derive(Clone, Default)]
pub struct Methods(std::sync::Arc<Vec<(actix_web::dev::ResourceDef, String)>>);

impl Methods {
    /// The paths and methods of `doc`.
    pub fn of(doc: &OpenApi) -> Methods {
        let table = doc
            .paths
            .paths
            .iter()
            .map(|(path, item)| {
                let methods = [
                    ("GET", item.get.is_some()),
                    ("PUT", item.put.is_some()),
                    ("POST", item.post.is_some()),
                    ("DELETE", item.delete.is_some()),
                    ("PATCH", item.patch.is_some()),
                ];
                let allow: Vec<&str> = methods.iter().filter(|(_, has)| *has).map(|(m, _)| *m).collect();
                (actix_web::dev::ResourceDef::new(path.as_str()), allow.join(", "))
            })
            .collect();
        Methods(std::sync::Arc::new(table))
    }

    /// The `Allow` value of the documented path `path` matches, if any.
    pub fn allowed(&self, path: &str) -> Option<&str> {
        self.0.iter().find(|(def, _)| def.is_match(path)).map(|(_, allow)| allow.as_str())
    }
}
