//! `GET /dashboard`: the live page of the cluster, three static files
//! compiled into the binary (nothing is loaded from the internet, and there
//! is no JavaScript build step). The page itself is open, like `/healthz`
//! (see `shared::auth::authenticate`): it holds no data. Its script calls
//! the API with the token the operator types in (`/v1/cluster/health`
//! every second, `/v1/stats`, `/v1/invalidations/stream`, and
//! `POST /v1/invalidate` for its guarded actions).

use actix_web::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY};
use actix_web::{web, HttpResponse};

/// The page.
const INDEX: &str = include_str!("../dashboard/index.html");
/// Its style sheet.
const STYLE: &str = include_str!("../dashboard/style.css");
/// Its script.
const SCRIPT: &str = include_str!("../dashboard/app.js");

/// Only this origin: the page cannot load or send anything elsewhere.
const POLICY: &str =
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

/// Served without a token (see `shared::auth::Access::open_pages`): the
/// files hold no data.
pub const OPEN_PAGES: &[&str] = &["/dashboard"];

/// Registers `/dashboard` and its two assets.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/dashboard", web::get().to(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/dashboard/", web::get().to(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/dashboard/style.css", web::get().to(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route("/dashboard/app.js", web::get().to(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }));
}

/// One embedded file.
fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((CACHE_CONTROL, "no-cache"))
        .insert_header((CONTENT_SECURITY_POLICY, POLICY))
        .body(body)
}
