//! The node agent: an L1 cache in memory, Redis as the shared L2, kept coherent
//! by the coordinator's invalidation log. It runs as a sidecar (the
//! `node-agent` binary) or inside a Rust app (this library).
//!
//! # Layout, in the order data flows
//! - [`settings`]: configuration layers and flags.
//! - [`agent`]: reads, writes and deletes through L1 and L2; status.
//! - [`l1`]: the in-memory cache and its tag, pattern and dependency indexes.
//! - [`lease`]: miss leases: one load per missing key, the other misses wait for its fill.
//! - [`ttl`]: TTL tiers by key pattern, and the jitter of default TTLs.
//! - [`usage`]: per-tenant read figures (hits, misses, most read keys, key
//!   prefixes) that the heartbeat reports for the coordinator's `/v1/stats`.
//! - [`encryption`]: values sealed in L2 (AES-256-GCM) for `[[encrypt]]` rules.
//! - [`warm`]: warm start: the cluster's hot keys loaded into L1 before the agent reports ready.
//! - [`sync`]: the subscriber (applies invalidations to L1, in seq order,
//!   replaying gaps) and the heartbeat.
//! - [`api`]: the HTTP cache API and operational endpoints.
//! - [`resp`]: the same cache on a Redis protocol port, for any Redis client.
//! - [`server`]: binding, background tasks, graceful shutdown.
//! - [`metrics`]: Prometheus metrics.
//!
//! # Embedding
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use node_agent::{agent::{Agent, Read}, settings::Settings};
//! let agent = Agent::new(Settings::default(), "app-1".into(), String::new()).map_err(anyhow::Error::msg)?;
//! let stop = tokio_util::sync::CancellationToken::new();
//! let _tasks = node_agent::sync::spawn(&agent, stop.clone());
//! if let Read::Hit { entry, .. } = agent.get("acme", "supplier:42").await? {
//!     println!("{} bytes", entry.value_slice().len());
//! }
//! stop.cancel();
//! # Ok(()) }
//! ```

pub mod agent;
pub mod api;
pub mod encryption;
pub mod l1;
pub mod lease;
pub mod metrics;
pub mod resp;
pub mod server;
pub mod settings;
pub mod sync;
pub mod ttl;
pub mod usage;
pub mod warm;
