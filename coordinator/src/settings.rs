//! The coordinator's settings: defaults, then the TOML file (`--config`), then
//! `DCC_COORDINATOR_*` environment variables, then flags.

use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

use crate::rules::Rule;

/// Environment variable prefix: `DCC_COORDINATOR_NODE_DEAD_AFTER_MS=5000`.
pub const ENV_PREFIX: &str = "DCC_COORDINATOR";

/// Command-line flags; each one overrides the file and the environment.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version, about = "Turns write events into invalidations for every node agent")]
pub struct Flags {
    /// TOML configuration file (settings and `[[rules]]`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to serve on (`127.0.0.1:0` picks a free port).
    #[arg(long)]
    pub bind: Option<String>,
    /// Redis URL, such as `redis://127.0.0.1:6379`.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Log JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
}

/// The settings tree.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address of the API.
    pub bind: String,
    /// Redis holding L2, the log and the channel.
    pub redis_url: String,
    /// The sentinels' own password, when they need one.
    pub redis_sentinel_password: Option<shared::service::Secret>,
    /// The data nodes' password, when it is not in `redis_url`.
    pub redis_password: Option<shared::service::Secret>,
    /// PEM CAs to trust besides the system's, for a `rediss://` redis_url.
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// A node silent this long is dead and no longer awaited.
    pub node_dead_after_ms: u64,
    /// Length the invalidation log is trimmed to (approximately).
    pub log_max_len: u64,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Redis connections in the pool.
    pub redis_pool_size: usize,
    /// Partitions of the data: the same in every process of a deployment.
    pub partitions: u16,
    /// Replicas that must hold an invalidation before it is answered.
    pub min_replicas: shared::invalidation::MinReplicas,
    /// How long to wait for them.
    pub replica_timeout_ms: u64,
    /// HTTP worker threads (0: one per core).
    pub http_workers: usize,
    /// Log JSON lines.
    pub log_json: bool,
    /// Bearer tokens (`[[tokens]]`, file only); none: authentication is off.
    pub tokens: Vec<shared::auth::TokenSpec>,
    /// Whether `/metrics` needs a token too.
    pub metrics_token_required: bool,
    /// Serve without tokens on an address other than loopback.
    pub allow_anonymous: bool,
    /// Entity rules.
    pub rules: Vec<Rule>,
    /// Databases followed through their commit log (`[[sources]]`, file only).
    pub sources: Vec<crate::source::SourceSettings>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bind: "127.0.0.1:7700".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_sentinel_password: None,
            redis_password: None,
            redis_ca_file: None,
            node_dead_after_ms: 5000,
            log_max_len: 100_000,
            max_body_bytes: 4 * 1024 * 1024,
            redis_pool_size: 32,
            partitions: shared::schema::DEFAULT_PARTITIONS,
            min_replicas: shared::invalidation::MinReplicas::Auto,
            replica_timeout_ms: 1000,
            http_workers: 0,
            log_json: false,
            tokens: Vec::new(),
            metrics_token_required: false,
            allow_anonymous: false,
            rules: Vec::new(),
            sources: Vec::new(),
        }
    }
}

impl Settings {
    /// Loads the layers and checks the result.
    pub fn load(flags: &Flags) -> Result<Settings, String> {
        let overrides = [
            ("bind", flags.bind.clone()),
            ("redis_url", flags.redis_url.clone()),
            ("log_json", flags.log_json.then(|| "true".to_string())),
        ];
        let settings: Settings = shared::service::load_settings(flags.config.as_deref(), ENV_PREFIX, &overrides)
            .map_err(|e| format!("configuration error: {e}"))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Who may call the API: the tokens, checked (see [`shared::auth`]).
    pub fn access(&self) -> Result<shared::auth::Access, String> {
        let access = shared::auth::Access::from_settings(
            &self.bind,
            &self.tokens,
            self.metrics_token_required,
            self.allow_anonymous,
        )?;
        Ok(shared::auth::Access { open_pages: crate::dashboard::OPEN_PAGES, ..access })
    }

    /// What the coordinator needs besides `redis_url` to reach Redis.
    pub fn redis_access(&self) -> shared::store::Access {
        shared::store::Access {
            sentinel_password: self.redis_sentinel_password.as_ref().map(|s| s.expose().to_string()),
            password: self.redis_password.as_ref().map(|s| s.expose().to_string()),
            ca_file: self.redis_ca_file.clone(),
        }
    }

    /// Checks values that would make the coordinator misbehave.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.node_dead_after_ms < 1000 {
            // Agents keep their staleness bound under 0.9 x this, and need a
            // couple of heartbeats (500 ms apart by default) within the bound.
            problems.push("node_dead_after_ms must be at least 1000".to_string());
        }
        if self.log_max_len < 1000 {
            problems.push("log_max_len must be at least 1000".to_string());
        }
        if self.partitions == 0 || self.partitions > shared::schema::MAX_PARTITIONS {
            problems.push("partitions must be between 1 and 1024".to_string());
        }
        if self.replica_timeout_ms == 0 {
            problems.push("replica_timeout_ms must be at least 1".to_string());
        }
        if self.redis_pool_size < 2 {
            problems.push("redis_pool_size must be at least 2".to_string());
        }
        if let Err(e) = self.redis_access().check(&self.redis_url) {
            problems.push(e);
        }
        if let Err(e) = crate::rules::RuleSet::new(self.rules.clone()) {
            problems.push(e);
        }
        if let Err(e) = self.access() {
            problems.push(e);
        }
        let mut slots = std::collections::BTreeSet::new();
        for source in &self.sources {
            problems.extend(source.problems());
            if !slots.insert(&source.slot) {
                problems.push(format!("two sources use slot {:?}", source.slot));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("configuration error: {}", problems.join("; ")))
        }
    }
}
