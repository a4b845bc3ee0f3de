//! Who may do what: bearer tokens with tenant scopes, the same on both
//! processes (contract v2, section 2).
//!
//! - A process's `[[tokens]]` ([`TokenSpec`]) name each token, give the
//!   SHA-256 of its secret (the secret itself is never configured), its
//!   tenants and its scopes.
//! - [`authenticate`], run by actix-web-httpauth's middleware in front of
//!   every route, comes before anything else: a request without a known token
//!   is answered 401 `unauthorized` (with `WWW-Authenticate: Bearer`) whatever
//!   else is wrong with it; a known one travels with the request as a
//!   [`Caller`]. The probes (and `/metrics`, unless
//!   `metrics_token_required`), the API documents and a process's
//!   [`Access::open_pages`] stay open.
//! - Each handler then asks [`Caller::allow`] for the scope it needs on the
//!   tenants it touches, before it touches anything: 403 `forbidden`, naming
//!   the missing scope or tenant. A request that names several tenants is
//!   refused whole.
//!
//! Without tokens authentication is off (every caller is
//! [`Caller::Anonymous`]); [`check_exposure`] then refuses an address other
//! than loopback unless `allow_anonymous = true`.

use std::net::IpAddr;
use std::sync::Arc;

use actix_web::dev::ServiceRequest;
use actix_web::http::StatusCode;
use actix_web::{web, FromRequest, HttpMessage, HttpRequest};
use actix_web_httpauth::extractors::bearer::BearerAuth;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::service::ApiError;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read entries (agent `GET`), and the coordinator's views.
    Read,
    /// Store entries (agent `PUT`).
    Write,
    /// Invalidate the token's tenants (agent `DELETE`, events, invalidations).
    Invalidate,
    /// Everything, on every tenant: whole-tenant wipes, the audit trail.
    Admin,
}

impl Scope {
    /// Its name in the config and in errors.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Invalidate => "invalidate",
            Scope::Admin => "admin",
        }
    }
}

/// One `[[tokens]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSpec {
    /// Shown in the audit trail and in errors.
    pub name: String,
    /// Hex SHA-256 of the secret.
    pub sha256: String,
    /// The tenants it may touch, or `["*"]` for every tenant.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// What it may do.
    pub scopes: Vec<Scope>,
}

/// A configured token, its secret's digest decoded.
#[derive(Debug)]
pub struct Token {
    /// Its name.
    pub name: String,
    /// The secret's SHA-256, as four words (compared word by word).
    digest: [u64; 4],
    every_tenant: bool,
    tenants: Vec<String>,
    scopes: Vec<Scope>,
}

impl Token {
    /// Whether it may use `scope` on every one of `tenants`; else the 403.
    fn allow<'a>(&self, scope: Scope, tenants: impl IntoIterator<Item = &'a str>) -> Result<(), ApiError> {
        if self.scopes.contains(&Scope::Admin) {
            return Ok(());
        }
        if !self.scopes.contains(&scope) {
            return Err(forbidden(format!("token {:?} does not have the {} scope", self.name, scope.name()))
                .with("scope", scope.name().into()));
        }
        if !self.every_tenant {
            if let Some(tenant) = tenants.into_iter().find(|t| !self.tenants.iter().any(|mine| mine == t)) {
                return Err(forbidden(format!("token {:?} may not touch tenant {tenant:?}", self.name))
                    .with("tenant", tenant.into()));
            }
        }
        Ok(())
    }
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

/// The 401 of a missing or unknown token.
pub fn unauthorized() -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "send a known token as Authorization: Bearer <secret>")
}

/// A process's tokens; none means authentication is off.
#[derive(Debug, Clone, Default)]
pub struct Tokens(Arc<[Arc<Token>]>);

impl Tokens {
    /// Checks and decodes `[[tokens]]`: every problem at once.
    pub fn new(specs: &[TokenSpec]) -> Result<Tokens, String> {
        let mut problems = Vec::new();
        let mut tokens = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let what = format!("tokens[{i}] ({:?})", spec.name);
            if spec.name.is_empty() || spec.name.len() > 128 || spec.name.chars().any(char::is_control) {
                problems.push(format!("{what}: name must be 1 to 128 characters without control characters"));
            }
            if specs[..i].iter().any(|other| other.name == spec.name) {
                problems.push(format!("{what}: another token has this name"));
            }
            let digest = decode_digest(&spec.sha256);
            if digest.is_none() {
                problems.push(format!("{what}: sha256 must be 64 hex digits (the SHA-256 of the secret)"));
            }
            if spec.scopes.is_empty() {
                problems.push(format!("{what}: scopes is empty"));
            }
            let every_tenant = spec.tenants.iter().any(|t| t == "*");
            if spec.tenants.is_empty() && !spec.scopes.contains(&Scope::Admin) {
                problems.push(format!("{what}: tenants is empty (use [\"*\"] for every tenant)"));
            }
            for tenant in spec.tenants.iter().filter(|t| *t != "*") {
                if let Err(e) = crate::names::validate_tenant(tenant) {
                    problems.push(format!("{what}: {}", e.message));
                }
            }
            if let Some(digest) = digest {
                tokens.push(Arc::new(Token {
                    name: spec.name.clone(),
                    digest,
                    every_tenant,
                    tenants: spec.tenants.clone(),
                    scopes: spec.scopes.clone(),
                }));
            }
        }
        if problems.is_empty() {
            Ok(Tokens(tokens.into()))
        } else {
            Err(problems.join("; "))
        }
    }

    /// Whether any token is configured (authentication is on).
    pub fn enabled(&self) -> bool {
        !self.0.is_empty()
    }

    /// The token whose secret this is. The digests are compared in constant
    /// time, and every one of them is compared.
    pub fn identify(&self, secret: &str) -> Option<Arc<Token>> {
        let digest = words(Sha256::digest(secret.as_bytes()).into());
        let mut found = None;
        for token in self.0.iter() {
            if bool::from(token.digest.ct_eq(&digest)) {
                found = Some(token.clone());
            }
        }
        found
    }
}

/// The hex SHA-256 of a secret, as `[[tokens]]` wants it.
pub fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A digest as four words.
fn words(digest: [u8; 32]) -> [u64; 4] {
    let word = |i: usize| u64::from_le_bytes(digest[8 * i..8 * i + 8].try_into().unwrap_or_default());
    [word(0), word(1), word(2), word(3)]
}

fn decode_digest(hex: &str) -> Option<[u64; 4]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(words(out))
}

/// Who sent a request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Authentication is off.
    Anonymous,
    /// A known token.
    Token(Arc<Token>),
}

impl Caller {
    /// The token's name (`None` when anonymous), for the audit trail.
    pub fn name(&self) -> Option<&str> {
        match self {
            Caller::Anonymous => None,
            Caller::Token(token) => Some(&token.name),
        }
    }

    /// Whether it may use `scope` on every one of `tenants` (no tenants: the
    /// scope alone); else the 403 to answer.
    pub fn allow<'a>(&self, scope: Scope, tenants: impl IntoIterator<Item = &'a str>) -> Result<(), ApiError> {
        match self {
            Caller::Anonymous => Ok(()),
            Caller::Token(token) => token.allow(scope, tenants),
        }
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Caller, ApiError>>;

    /// The caller [`authenticate`] found. A route it did not run for is
    /// anonymous only while authentication is off.
    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let caller = req.extensions().get::<Caller>().cloned();
        let enabled = req.app_data::<web::Data<Access>>().is_some_and(|a| a.tokens.enabled());
        std::future::ready(match caller {
            Some(caller) => Ok(caller),
            None if !enabled => Ok(Caller::Anonymous),
            None => Err(unauthorized()),
        })
    }
}

/// What [`authenticate`] needs, as app data of the process.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The tokens.
    pub tokens: Tokens,
    /// Whether `/metrics` needs a token too.
    pub metrics_token_required: bool,
    /// Pages served without a token, each with everything under it (the
    /// coordinator's `/dashboard`: static files that hold no data; its
    /// script sends the token with every call it makes).
    pub open_pages: &'static [&'static str],
}

impl Access {
    /// A process's access settings, checked together (every problem at
    /// once): the `[[tokens]]`, and whether it may serve on `bind` without
    /// them (see [`check_exposure`]).
    pub fn from_settings(
        bind: &str,
        tokens: &[TokenSpec],
        metrics_token_required: bool,
        allow_anonymous: bool,
    ) -> Result<Access, String> {
        let tokens = Tokens::new(tokens)?;
        check_exposure(bind, &tokens, allow_anonymous)?;
        Ok(Access { tokens, metrics_token_required, open_pages: &[] })
    }
}

/// The validator of actix-web-httpauth's middleware (see the module docs).
pub async fn authenticate(
    req: ServiceRequest,
    credentials: Option<BearerAuth>,
) -> Result<ServiceRequest, (actix_web::Error, ServiceRequest)> {
    let Some(access) = req.app_data::<web::Data<Access>>().cloned() else {
        return Ok(req);
    };
    let open = match req.path() {
        "/healthz" | "/readyz" => true,
        path if crate::openapi::is_docs_path(path) => true,
        path if access.open_pages.iter().any(|page| under(path, page)) => true,
        "/metrics" => !access.metrics_token_required,
        _ => false,
    };
    if !access.tokens.enabled() || open {
        req.extensions_mut().insert(Caller::Anonymous);
        return Ok(req);
    }
    // Two Authorization headers are ambiguous (a proxy may check one and the
    // service read the other): refused, whatever they hold.
    let single = req.headers().get_all(actix_web::http::header::AUTHORIZATION).count() <= 1;
    match credentials.filter(|_| single).and_then(|c| access.tokens.identify(c.token())) {
        Some(token) => {
            req.extensions_mut().insert(Caller::Token(token));
            Ok(req)
        }
        None => Err((unauthorized().into(), req)),
    }
}

/// Whether `path` is `page` or below it.
fn under(path: &str, page: &str) -> bool {
    path.strip_prefix(page).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Refuses to serve without tokens on an address other than loopback, unless
/// `allow_anonymous`: anyone who can reach it could read or wipe every tenant.
pub fn check_exposure(bind: &str, tokens: &Tokens, allow_anonymous: bool) -> Result<(), String> {
    if tokens.enabled() || allow_anonymous {
        return Ok(());
    }
    let host = bind.rsplit_once(':').map_or(bind, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(format!(
            "bind {bind:?} is not a loopback address and no [[tokens]] are configured: anyone who can reach \
             it could read and invalidate every tenant; add [[tokens]], or set allow_anonymous = true"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, secret: &str, tenants: &[&str], scopes: &[Scope]) -> TokenSpec {
        TokenSpec {
            name: name.into(),
            sha256: sha256_hex(secret),
            tenants: tenants.iter().map(|t| t.to_string()).collect(),
            scopes: scopes.to_vec(),
        }
    }

    #[test]
    fn an_open_page_covers_what_is_below_it_and_nothing_else() {
        assert!(under("/dashboard", "/dashboard"));
        assert!(under("/dashboard/app.js", "/dashboard"));
        assert!(!under("/dashboards", "/dashboard"));
        assert!(!under("/v1/dashboard", "/dashboard"));
    }

    #[test]
    fn a_secret_names_its_token_and_the_token_its_rights() {
        let tokens = Tokens::new(&[
            spec("orders", "s1", &["acme", "globex"], &[Scope::Read, Scope::Invalidate]),
            spec("ops", "s2", &[], &[Scope::Admin]),
            spec("reader", "s3", &["*"], &[Scope::Read]),
        ])
        .expect("valid tokens");
        assert!(tokens.identify("nope").is_none());
        let orders = Caller::Token(tokens.identify("s1").expect("s1"));
        assert_eq!(orders.name(), Some("orders"));
        assert!(orders.allow(Scope::Read, ["acme"]).is_ok());
        assert!(orders.allow(Scope::Invalidate, ["acme", "globex"]).is_ok());
        let wrong_tenant = orders.allow(Scope::Invalidate, ["acme", "initech"]).expect_err("initech");
        assert_eq!((wrong_tenant.status, wrong_tenant.code), (StatusCode::FORBIDDEN, "forbidden"));
        assert!(wrong_tenant.message.contains("initech"), "{wrong_tenant}");
        let wrong_scope = orders.allow(Scope::Write, ["acme"]).expect_err("write");
        assert!(wrong_scope.message.contains("write"), "{wrong_scope}");
        assert!(orders.allow(Scope::Admin, []).is_err());
        let ops = Caller::Token(tokens.identify("s2").expect("s2"));
        assert!(ops.allow(Scope::Write, ["anyone"]).is_ok());
        assert!(ops.allow(Scope::Admin, []).is_ok());
        let reader = Caller::Token(tokens.identify("s3").expect("s3"));
        assert!(reader.allow(Scope::Read, ["anyone"]).is_ok());
        assert!(reader.allow(Scope::Invalidate, ["anyone"]).is_err());
        assert!(Caller::Anonymous.allow(Scope::Admin, []).is_ok());
    }

    #[test]
    fn bad_token_tables_are_refused_with_every_problem() {
        let mut bad = spec("x", "s", &["acme"], &[Scope::Read]);
        bad.sha256 = "abc".into();
        let dup = spec("x", "t", &["acme"], &[]);
        let err = Tokens::new(&[bad, dup]).expect_err("invalid");
        assert!(
            err.contains("64 hex digits") && err.contains("another token") && err.contains("scopes is empty"),
            "{err}"
        );
        assert!(Tokens::new(&[spec("y", "s", &[], &[Scope::Read])]).is_err());
        assert!(Tokens::new(&[spec("y", "s", &["bad tenant"], &[Scope::Read])]).is_err());
        assert!(!Tokens::new(&[]).expect("none").enabled());
    }

    #[test]
    fn only_loopback_may_serve_without_tokens() {
        let none = Tokens::default();
        assert!(check_exposure("127.0.0.1:7700", &none, false).is_ok());
        assert!(check_exposure("[::1]:7700", &none, false).is_ok());
        assert!(check_exposure("localhost:7700", &none, false).is_ok());
        assert!(check_exposure("0.0.0.0:7700", &none, false).is_err());
        assert!(check_exposure("10.1.2.3:7700", &none, false).is_err());
        assert!(check_exposure("0.0.0.0:7700", &none, true).is_ok());
        let some = Tokens::new(&[spec("a", "s", &["*"], &[Scope::Read])]).expect("valid");
        assert!(check_exposure("0.0.0.0:7700", &some, false).is_ok());
    }
}
