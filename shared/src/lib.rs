//! Everything the coordinator and the node agents must agree on.
//!
//! # Layout, in the order data flows
//! - [`names`]: validation of tenants, keys, tags and patterns.
//! - [`glob`]: the pattern dialect (Redis's `MATCH`), used against L1.
//! - [`protocol`]: the invalidation message, fill tokens, node reports.
//! - [`schema`]: the partitions and every Redis key name.
//! - [`script`]: the Lua scripts' shared prelude.
//! - [`l2`]: entries in Redis (stamped with their partition's epoch), and the
//!   head of each partition's log.
//! - [`invalidation`]: the invalidation path from selectors to L2 delete, log,
//!   broadcast and replication, with its scripts; agents apply the broadcast to L1.
//! - [`registry`]: heartbeats and acknowledgements.
//! - [`store`]: the Redis topologies (one server, Sentinel, a cluster) behind one
//!   handle: connections and subscriptions.
//! - [`service`]: what both HTTP services share: errors, telemetry, metrics,
//!   Redis pools, shutdown.
//! - [`auth`]: bearer tokens with tenant scopes, checked by both services.
//! - [`audit`]: the audit trail both services write and the coordinator serves.
//! - [`sketch`]: the space-saving sketch of the most read keys (`GET /v1/stats`).

pub mod audit;
pub mod auth;
pub mod glob;
pub mod hot;
pub mod invalidation;
pub mod l2;
pub mod names;
pub mod openapi;
pub mod protocol;
pub mod registry;
pub mod schema;
pub mod script;
pub mod service;
pub mod sketch;
pub mod store;
