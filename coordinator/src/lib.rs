//! The coordinator: receives write events, resolves them through rules and the
//! entity graph into selectors, and runs the invalidation path (L2 delete, log,
//! broadcast) that every node agent applies to its L1.
//!
//! # Layout, in the order data flows
//! - [`settings`]: configuration layers, flags, `[[rules]]`.
//! - [`events`]: events and invalidation requests, validated and grouped.
//! - [`rules`]: rule templates, dependents, cycle detection.
//! - [`state`]: runs the invalidation path ([`state::Coordinator::invalidate`]).
//! - [`batch`]: group commit: concurrent invalidations merged into one.
//! - [`barrier`]: agents' acknowledgements and the `wait=all` barrier.
//! - [`cluster`]: the nodes' reports and Redis's health.
//! - [`stats`]: per-tenant figures from the nodes' reports, and recommendations.
//! - [`api`]: the HTTP endpoints.
//! - [`source`]: PostgreSQL's commit log as a source of write events.
//! - [`stream`]: the invalidation log tailed as server-sent events.
//! - [`dashboard`]: the live page (`/dashboard`), embedded in the binary.
//! - [`server`]: binding, Redis watch, graceful shutdown.

pub mod api;
pub mod barrier;
pub mod batch;
pub mod cluster;
pub mod dashboard;
pub mod events;
pub mod rules;
pub mod server;
pub mod settings;
pub mod source;
pub mod state;
pub mod stats;
pub mod stream;
