//! Binds the API, watches Redis, and runs until a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::middleware::{from_fn, Condition};
use actix_web::{web, App, HttpServer};
use actix_web_httpauth::middleware::HttpAuthentication;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use utoipa_actix_web::AppExt;

use shared::service::Backoff;

use crate::api;
use crate::settings::Settings;
use crate::state::Coordinator;

/// A bound, not yet running coordinator.
pub struct Application {
    /// Its state.
    pub coordinator: Coordinator,
    /// The HTTP server.
    server: actix_web::dev::Server,
    /// The address actually bound.
    addr: SocketAddr,
    /// The audit trail, which the sources write to as well.
    trail: shared::audit::Trail,
}

impl Application {
    /// Checks the rules, binds the listener, builds the state. Redis is not contacted yet.
    pub fn build(settings: Settings) -> anyhow::Result<Application> {
        let listener = std::net::TcpListener::bind(&settings.bind)
            .map_err(|e| anyhow::anyhow!("cannot bind {}: {e}", settings.bind))?;
        let addr = listener.local_addr()?;
        let origin = format!("coordinator@{}:{}", gethostname::gethostname().to_string_lossy(), addr.port());
        let workers = match settings.http_workers {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            n => n,
        };
        let body_limit = settings.max_body_bytes;
        let access = web::Data::new(settings.access().map_err(|e| anyhow::anyhow!(e))?);
        let secured = access.tokens.enabled();
        let coordinator = Coordinator::new(settings, origin).map_err(|e| anyhow::anyhow!(e))?;
        let data = web::Data::new(coordinator.clone());
        let trail = web::Data::new(shared::audit::Trail::new(
            coordinator.inner().store.clone(),
            coordinator.inner().origin.clone(),
        ));
        let source_trail = trail.get_ref().clone();
        let latency = shared::service::HttpLatency(coordinator.inner().metrics.http.clone(), None);
        let doc = api::openapi();
        let methods = web::Data::new(shared::openapi::Methods::of(&doc));
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(shared::service::json_config(body_limit))
                .app_data(shared::service::query_config())
                .app_data(shared::service::path_config())
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
                .configure(crate::dashboard::configure)
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
        Ok(Application { coordinator, server, addr, trail: source_trail })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` resolves, then stops gracefully.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = &'static str>) -> anyhow::Result<()> {
        let Application { coordinator, server, addr, trail } = self;
        let stop = CancellationToken::new();
        let lanes = coordinator.inner().batcher.start(stop.clone());
        let watch = tokio::spawn(watch_redis(coordinator.clone(), stop.clone()));
        let acks = {
            let (coordinator, stop) = (coordinator.clone(), stop.clone());
            tokio::spawn(async move {
                let inner = coordinator.inner();
                let (store, layout) = (inner.store.clone(), inner.layout.clone());
                crate::barrier::listen(store, layout, &inner.acks, stop).await;
            })
        };
        let sources: Vec<_> = (0..coordinator.inner().settings.sources.len())
            .map(|i| tokio::spawn(crate::source::postgres::run(coordinator.clone(), i, trail.clone(), stop.clone())))
            .collect();
        info!(%addr, rules = coordinator.inner().rules.rules().count(), "coordinator listening");
        let handle = server.handle();
        let mut server = std::pin::pin!(server);
        tokio::select! {
            result = &mut server => result?,
            signal = shutdown => {
                info!(signal, "shutting down gracefully");
                coordinator.inner().closing.cancel();
                let (_, result) = tokio::join!(handle.stop(true), &mut server);
                result?;
            }
        }
        stop.cancel();
        let _ = tokio::join!(watch, acks, futures_util::future::join_all(sources));
        for lane in lanes {
            let _ = lane.await;
        }
        info!("coordinator stopped");
        Ok(())
    }
}

/// Checks Redis every second (with backoff while it is down): the partition
/// layout agrees with this process's, every partition has an epoch, the logs
/// this coordinator appended to did not fork; announces `node_dead_after_ms`
/// to the agents, and keeps readiness and the `dcc_redis_up` gauge current.
async fn watch_redis(coordinator: Coordinator, stop: CancellationToken) {
    let inner = coordinator.inner();
    let mut backoff = Backoff::default();
    // Log each outage once, not on every retry.
    let mut outage_logged = false;
    loop {
        let check = async {
            // Under Sentinel: follow a new primary within a second.
            inner.store.check_primary().await.map_err(|e| e.to_string())?;
            let mut conn = inner.store.get().await.map_err(|e| e.to_string())?;
            check_layout(&mut conn, &inner.layout).await?;
            for partition in inner.layout.all() {
                shared::l2::ensure_epoch(&mut conn, partition).await.map_err(|e| e.to_string())?;
            }
            check_forks(&coordinator, &mut conn).await.map_err(|e| e.to_string())?;
            // Agents keep their staleness bound below the smallest announced
            // value, so a node this coordinator stops awaiting has stopped
            // trusting its L1 first. Repeated every check: Redis may restart empty.
            shared::registry::announce_dead_after(&mut conn, &inner.origin, inner.settings.node_dead_after_ms)
                .await
                .map_err(|e| e.to_string())?;
            if !inner.redis_ok.load(Ordering::Acquire) {
                // Newly (re)connected: Redis may have restarted without our scripts.
                shared::invalidation::load_scripts(&mut conn).await.map_err(|e| e.to_string())?;
                warn_about_eviction(&mut conn).await;
            }
            Ok::<(), String>(())
        };
        let wait = match tokio::time::timeout(Duration::from_secs(2), check).await {
            Ok(Ok(())) => {
                if !inner.redis_ok.swap(true, Ordering::AcqRel) {
                    info!("Redis is reachable");
                }
                inner.metrics.redis_up.set(1);
                backoff.reset();
                outage_logged = false;
                None
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e,
                    _ => "timed out".to_string(),
                };
                inner.redis_ok.store(false, Ordering::Release);
                let outage = shared::store::Outage::of(&why);
                inner.outage.store(outage.code(), Ordering::Release);
                if !outage_logged {
                    warn!(error = %why, reason = outage.reason(), "Redis did not answer; retrying with backoff");
                    outage_logged = true;
                }
                inner.metrics.redis_up.set(0);
                Some(())
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = async {
                match wait {
                    Some(()) => backoff.wait().await,
                    None => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            } => {}
        }
    }
}

/// Records this process's partition layout in Redis if none is there, and
/// refuses to work on data partitioned otherwise: every process of a
/// deployment must use the same `partitions`.
async fn check_layout(conn: &mut shared::store::Conn, layout: &shared::schema::Layout) -> Result<(), String> {
    let ours = layout.describe();
    let (_, theirs): ((), Option<String>) = redis::pipe()
        .cmd("SET")
        .arg(shared::schema::LAYOUT)
        .arg(&ours)
        .arg("NX")
        .ignore()
        .get(shared::schema::LAYOUT)
        .query_async(conn)
        .await
        .map(|(theirs,): (Option<String>,)| ((), theirs))
        .map_err(|e| e.to_string())?;
    match theirs {
        Some(theirs) if theirs != ours => Err(format!(
            "the data in Redis is partitioned as {theirs:?}, this coordinator as {ours:?}: set `partitions` to \
             the same value in every process"
        )),
        _ => Ok(()),
    }
}

/// The coordinator's own fork check: the last message it appended to each
/// partition must still be in that partition's log (a failover to a replica
/// that lacked it rewinds the log). A partition whose log forked is moved to
/// a new epoch, so that agents flush its tenants and its old entries are not served.
async fn check_forks(coordinator: &Coordinator, conn: &mut shared::store::Conn) -> redis::RedisResult<()> {
    let inner = coordinator.inner();
    for position in coordinator.take_appended() {
        let partition = inner.layout.get(position.partition);
        let head = shared::l2::head(conn, partition).await?;
        if head.epoch != position.epoch {
            continue;
        }
        let held = if head.seq < position.seq {
            false
        } else if head.seq == position.seq && !head.nonce.is_empty() {
            head.nonce == position.nonce
        } else {
            shared::invalidation::nonce_at(conn, partition, position.seq).await?.is_none_or(|n| n == position.nonce)
        };
        if !held {
            inner.metrics.forks.inc();
            warn!(
                partition = position.partition,
                seq = position.seq,
                "a message this coordinator logged is no longer in the partition's log (a failover lost it): \
                 moving the partition to a new epoch"
            );
            shared::invalidation::rotate(conn, partition, &position.epoch).await?;
        }
    }
    Ok(())
}

/// Warns when Redis may evict keys under memory pressure: evicting a
/// partition's seq or epoch would reuse sequence numbers, and evicting fill-token
/// markers would let a stale fill through. `noeviction` (the default) is
/// safe; a managed Redis that forbids `CONFIG` is skipped silently.
async fn warn_about_eviction(conn: &mut shared::store::Conn) {
    let config: redis::RedisResult<Vec<String>> =
        redis::cmd("CONFIG").arg("GET").arg("maxmemory*").query_async(conn).await;
    let Ok(config) = config else {
        return;
    };
    let pairs: Vec<(&str, &str)> =
        config.chunks(2).filter_map(|p| Some((p.first()?.as_str(), p.get(1)?.as_str()))).collect();
    let get = |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let limited = get("maxmemory").is_some_and(|m| m != "0");
    let policy = get("maxmemory-policy").unwrap_or("noeviction");
    if limited && policy != "noeviction" {
        warn!(
            maxmemory_policy = policy,
            "Redis may evict keys (maxmemory is set and the policy is not noeviction): an evicted dcc:seq or \
             fill-token marker can break the guarantees; use a Redis with maxmemory-policy noeviction"
        );
    }
}
