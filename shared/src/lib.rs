//! Everything the coordinator and the node agents must agree on.
//!
//! # Layout, in the order data flows
//! - [`names`]: validation of tenants, keys, tags and patterns.
//! - [`glob`]: the pattern dialect (Redis's `MATCH`), used against L1.
//! - [`protocol`]: the invalidation message, fill tokens, node reports.
//! - [`schema`]: every Redis key name.
//! - [`l2`]: entries and indexes in Redis, and the Lua scripts that keep them.
//! - [`registry`]: heartbeats, acknowledgements, the nodes' view.
//! - [`invalidation`]: the invalidation path from selectors to L2 delete, log
//!   and broadcast; agents apply the broadcast to L1.
//! - [`service`]: what both HTTP services share: errors, telemetry, metrics,
//!   Redis pools, shutdown.

pub mod glob;
pub mod invalidation;
pub mod l2;
pub mod names;
pub mod protocol;
pub mod registry;
pub mod schema;
pub mod service;
