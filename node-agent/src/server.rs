//! Binds the cache API, starts the background sync tasks, and runs until a
//! shutdown signal (a future, so tests and embedders can drive it).

use std::future::Future;
use std::net::SocketAddr;
use utoipa_actix_web::AppExt;

use actix_web::middleware::{from_fn, Condition};
use actix_web::{web, App, HttpServer};
use actix_web_httpauth::middleware::HttpAuthentication;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::agent::Agent;
use crate::settings::Settings;
use crate::{api, resp, sync};

/// A bound, not yet running agent server.
pub struct Application {
    /// The agent it serves.
    pub agent: Agent,
    /// The HTTP server.
    server: actix_web::dev::Server,
    /// The address actually bound (useful with port 0).
    addr: SocketAddr,
    /// The Redis protocol port, when `resp_bind` is set: its listener, bound.
    resp: Option<(std::net::TcpListener, resp::Port)>,
}

impl Application {
    /// Binds the listener and builds the agent. Redis is not contacted yet.
    pub fn build(settings: Settings) -> anyhow::Result<Application> {
        let listener = std::net::TcpListener::bind(&settings.bind)
            .map_err(|e| anyhow::anyhow!("cannot bind {}: {e}", settings.bind))?;
        let addr = listener.local_addr()?;
        let node_id = settings
            .node_id
            .clone()
            .unwrap_or_else(|| format!("{}:{}", gethostname::gethostname().to_string_lossy(), addr.port()));
        let workers = match settings.http_workers {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            n => n,
        };
        let body_limit = settings.max_value_bytes;
        let access = web::Data::new(settings.access().map_err(|e| anyhow::anyhow!(e))?);
        let secured = access.tokens.enabled();
        let resp_listener = match &settings.resp_bind {
            Some(bind) => {
                let listener = std::net::TcpListener::bind(bind)
                    .map_err(|e| anyhow::anyhow!("cannot bind the Redis protocol port {bind}: {e}"))?;
                listener.set_nonblocking(true)?;
                Some(listener)
            }
            None => None,
        };
        let resp_default_tenant = settings.resp_default_tenant.clone();
        let agent = Agent::new(settings, node_id, addr.to_string()).map_err(|e| anyhow::anyhow!(e))?;
        let data = web::Data::new(agent.clone());
        let audit_trail = shared::audit::Trail::new(agent.inner().store.clone(), agent.node_id().to_string());
        let resp = resp_listener.map(|listener| {
            let port = resp::Port::new(agent.clone(), access.tokens.clone(), resp_default_tenant, audit_trail.clone());
            (listener, port)
        });
        let trail = web::Data::new(audit_trail);
        let latency = shared::service::HttpLatency(agent.inner().metrics.http.clone(), Some(api::CACHE_SCOPE));
        let doc = api::openapi();
        let methods = web::Data::new(shared::openapi::Methods::of(&doc));
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(shared::service::json_config(body_limit))
                .app_data(shared::service::query_config())
                .app_data(latency.clone())
                .app_data(methods.clone())
                .app_data(access.clone())
                .app_data(trail.clone())
                // Innermost, so that a wrong token is refused (401) first.
                .wrap(from_fn(shared::service::refuse_websocket_upgrade))
                // Without tokens nothing is refused: neither layer runs.
                .wrap(Condition::new(secured, HttpAuthentication::with_fn(shared::auth::authenticate)))
                .wrap(Condition::new(secured, from_fn(shared::audit::refusals)))
                .wrap(from_fn(shared::service::record_latency))
                .into_utoipa_app()
                .configure(api::configure)
                .into_app()
                .configure(shared::openapi::serve_docs(doc.clone()))
                .default_service(web::to(shared::service::not_found))
        })
        .workers(workers)
        // Answers leave at once: a cache answer is one small write, and
        // Nagle would hold it back behind any unacknowledged one.
        .tcp_nodelay(true)
        .disable_signals()
        .shutdown_timeout(10)
        .listen(listener)?
        .run();
        Ok(Application { agent, server, addr, resp })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The Redis protocol port's bound address, when it is on.
    pub fn resp_addr(&self) -> Option<SocketAddr> {
        self.resp.as_ref().and_then(|(listener, _)| listener.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then stops gracefully: in-flight
    /// requests finish, background tasks stop, the node deregisters.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = &'static str>) -> anyhow::Result<()> {
        let Application { agent, server, addr, resp } = self;
        let stop = CancellationToken::new();
        let mut tasks = sync::spawn(&agent, stop.clone());
        if let Some((listener, port)) = resp {
            let threads = agent.settings().resp_threads;
            info!(addr = %listener.local_addr()?, threads, "Redis protocol port listening");
            for thread in port.serve_on_threads(listener, threads, stop.clone())? {
                tasks.push(tokio::task::spawn_blocking(move || {
                    if thread.join().is_err() {
                        tracing::error!("a Redis protocol port thread panicked");
                    }
                }));
            }
        }
        info!(%addr, node_id = agent.node_id(), "node agent listening");
        let handle = server.handle();
        let mut server = std::pin::pin!(server);
        tokio::select! {
            result = &mut server => result?,
            signal = shutdown => {
                info!(signal, "shutting down gracefully");
                // The server future must keep running for the stop to complete.
                let (_, result) = tokio::join!(handle.stop(true), &mut server);
                result?;
            }
        }
        stop.cancel();
        for task in tasks {
            let _ = task.await;
        }
        info!("node agent stopped");
        Ok(())
    }
}
