//! The agent's settings: defaults, then the TOML file (`--config`), then
//! `DCC_AGENT_*` environment variables, then flags. Every setting is documented
//! in the README's configuration reference.

use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

/// Environment variable prefix: `DCC_AGENT_STALENESS_BOUND_MS=1000`.
pub const ENV_PREFIX: &str = "DCC_AGENT";

/// Command-line flags; each one overrides the file and the environment.
#[derive(Debug, Parser)]
#[command(name = "node-agent", version, about = "L1 cache sidecar kept coherent with Redis")]
pub struct Flags {
    /// TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to serve the cache API on (`127.0.0.1:0` picks a free port).
    #[arg(long)]
    pub bind: Option<String>,
    /// Redis URL, such as `redis://127.0.0.1:6379`.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// This node's id (default: hostname:port).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Log JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
}

/// The settings tree.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address of the cache API.
    pub bind: String,
    /// Redis holding L2, the log and the channel.
    pub redis_url: String,
    /// The sentinels' own password, when they need one.
    pub redis_sentinel_password: Option<shared::service::Secret>,
    /// The data nodes' password, when it is not in `redis_url`.
    pub redis_password: Option<shared::service::Secret>,
    /// PEM CAs to trust besides the system's, for a `rediss://` redis_url.
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// Node id; `None` means hostname:port once bound.
    pub node_id: Option<String>,
    /// Longest time L1 may answer without proof of being in sync.
    pub staleness_bound_ms: u64,
    /// L1 capacity in bytes, keys and values counted.
    pub l1_max_bytes: u64,
    /// Largest value accepted by PUT.
    pub max_value_bytes: usize,
    /// TTL when a PUT gives none.
    pub default_ttl_secs: u64,
    /// Largest TTL accepted.
    pub max_ttl_secs: u64,
    /// TTL tiers by key pattern (`[[ttl]]`, file only); see [`crate::ttl`].
    pub ttl: Vec<crate::ttl::TtlTier>,
    /// Default TTLs are shortened by a random part of up to this fraction of
    /// their length, so that entries written together expire apart.
    pub ttl_jitter: f64,
    /// How long the first miss of a key holds its fill lease (0: no leases).
    pub lease_ms: u64,
    /// How long a miss waits for another's fill before it loads itself.
    pub lease_wait_ms: u64,
    /// Hot keys an agent loads into L1 before it reports ready (0: none).
    pub warm_keys: usize,
    /// The longest the warm-up may take.
    pub warm_timeout_ms: u64,
    /// The part of an entry's TTL after which a hit is handed an eager
    /// refresh (`X-Cache-Refresh`); 1 turns eager refresh off.
    pub refresh_ahead: f64,
    /// How often the agent reports itself and checks the log head.
    pub heartbeat_interval_ms: u64,
    /// Length the invalidation log is trimmed to (for DELETEs this agent logs).
    pub log_max_len: u64,
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
    /// Address of the Redis protocol port; `None`: off.
    pub resp_bind: Option<String>,
    /// Tenant of a Redis protocol connection that does not `AUTH` with one.
    pub resp_default_tenant: Option<String>,
    /// Threads (event loops) serving the Redis protocol port.
    pub resp_threads: usize,
    /// Which entries are sealed in L2 (`[[encrypt]]`, file only).
    pub encrypt: Vec<crate::encryption::EncryptRule>,
    /// `ID:BASE64,…` 32-byte AES keys, the first sealing new writes
    /// (`DCC_AGENT_ENCRYPTION_KEYS`).
    pub encryption_keys: Option<shared::service::Secret>,
    /// What `/metrics` exports (`[metrics]`).
    pub metrics: MetricsSettings,
}

/// The `[metrics]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Export per-tenant hit and miss counters with a `tenant` label
    /// (`DCC_AGENT_METRICS__TENANT_LABELS`). Off by default: every tenant
    /// adds series to every scrape.
    pub tenant_labels: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bind: "127.0.0.1:7701".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_sentinel_password: None,
            redis_password: None,
            redis_ca_file: None,
            node_id: None,
            staleness_bound_ms: 2000,
            l1_max_bytes: 256 * 1024 * 1024,
            max_value_bytes: 1024 * 1024,
            default_ttl_secs: 300,
            max_ttl_secs: 365 * 24 * 3600,
            ttl: Vec::new(),
            ttl_jitter: 0.05,
            lease_ms: 2000,
            lease_wait_ms: 1000,
            refresh_ahead: 0.8,
            warm_keys: 1000,
            warm_timeout_ms: 5000,
            heartbeat_interval_ms: 500,
            log_max_len: 100_000,
            redis_pool_size: 32,
            partitions: shared::schema::DEFAULT_PARTITIONS,
            min_replicas: shared::invalidation::MinReplicas::Auto,
            replica_timeout_ms: 1000,
            http_workers: 0,
            log_json: false,
            tokens: Vec::new(),
            metrics_token_required: false,
            allow_anonymous: false,
            resp_bind: None,
            resp_default_tenant: None,
            resp_threads: 1,
            encrypt: Vec::new(),
            encryption_keys: None,
            metrics: MetricsSettings::default(),
        }
    }
}

impl Settings {
    /// Loads the layers and checks the result; every problem is reported at once.
    pub fn load(flags: &Flags) -> Result<Settings, String> {
        let overrides = [
            ("bind", flags.bind.clone()),
            ("redis_url", flags.redis_url.clone()),
            ("node_id", flags.node_id.clone()),
            ("log_json", flags.log_json.then(|| "true".to_string())),
        ];
        let settings: Settings = shared::service::load_settings(flags.config.as_deref(), ENV_PREFIX, &overrides)
            .map_err(|e| format!("configuration error: {e}"))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Who may call the API: the tokens, checked (see [`shared::auth`]).
    pub fn access(&self) -> Result<shared::auth::Access, String> {
        shared::auth::Access::from_settings(&self.bind, &self.tokens, self.metrics_token_required, self.allow_anonymous)
    }

    /// The `[[encrypt]]` rules with their keys, checked (see [`crate::encryption`]).
    pub fn encryption(&self) -> Result<crate::encryption::Encryption, String> {
        crate::encryption::Encryption::new(&self.encrypt, self.encryption_keys.as_ref().map(|k| k.expose()))
    }

    /// The `[[ttl]]` tiers with the defaults behind them, checked (see [`crate::ttl`]).
    pub fn ttl_policy(&self) -> Result<crate::ttl::TtlPolicy, Vec<String>> {
        crate::ttl::TtlPolicy::new(&self.ttl, self.default_ttl_secs, self.max_ttl_secs, self.ttl_jitter)
    }

    /// What the agent needs besides `redis_url` to reach Redis.
    pub fn redis_access(&self) -> shared::store::Access {
        shared::store::Access {
            sentinel_password: self.redis_sentinel_password.as_ref().map(|s| s.expose().to_string()),
            password: self.redis_password.as_ref().map(|s| s.expose().to_string()),
            ca_file: self.redis_ca_file.clone(),
        }
    }

    /// Checks values that would make the agent misbehave.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        let mut url_problem = None;
        if self.l1_max_bytes == 0 {
            problems.push("l1_max_bytes must be at least 1");
        }
        if self.max_value_bytes == 0 {
            problems.push("max_value_bytes must be at least 1");
        }
        if self.default_ttl_secs == 0 || self.default_ttl_secs > self.max_ttl_secs {
            problems.push("default_ttl_secs must be between 1 and max_ttl_secs");
        }
        if self.lease_ms > shared::protocol::FILL_TOKEN_TTL_MS {
            // A lease outliving its token could never be filled.
            problems.push("lease_ms must be at most 60000 (the fill token's lifetime)");
        }
        if !(self.refresh_ahead > 0.0 && self.refresh_ahead <= 1.0) {
            problems.push("refresh_ahead must be above 0 and at most 1 (1: no eager refresh)");
        }
        if self.warm_keys > shared::hot::MAX_MEMBERS {
            problems.push("warm_keys must be at most 20000 (the hot set's size)");
        }
        if self.warm_timeout_ms > 600_000 {
            problems.push("warm_timeout_ms must be at most 600000");
        }
        if self.lease_wait_ms > 60_000 {
            problems.push("lease_wait_ms must be at most 60000");
        }
        if self.staleness_bound_ms == 0 {
            problems.push("staleness_bound_ms must be at least 1");
        }
        if self.heartbeat_interval_ms == 0 || self.heartbeat_interval_ms * 2 > self.staleness_bound_ms {
            problems.push("heartbeat_interval_ms must be at least 1 and at most half of staleness_bound_ms");
        }
        if self.log_max_len < 1000 {
            // The log is shared: an agent's DELETE trims it for everyone.
            problems.push("log_max_len must be at least 1000");
        }
        if self.redis_pool_size == 0 {
            problems.push("redis_pool_size must be at least 1");
        }
        if self.partitions == 0 || self.partitions > shared::schema::MAX_PARTITIONS {
            problems.push("partitions must be between 1 and 1024");
        }
        if self.replica_timeout_ms == 0 {
            problems.push("replica_timeout_ms must be at least 1");
        }
        if self.resp_threads == 0 || self.resp_threads > 64 {
            problems.push("resp_threads must be between 1 and 64");
        }
        if let Some(id) = &self.node_id {
            if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control() || c.is_whitespace()) {
                problems.push("node_id must be 1 to 128 characters without whitespace or control characters");
            }
        }
        if let Err(e) = self.redis_access().check(&self.redis_url) {
            url_problem = Some(e);
        }
        let tenant_problem = self.resp_default_tenant.as_ref().and_then(|tenant| {
            shared::names::validate_tenant(tenant).err().map(|e| format!("resp_default_tenant: {}", e.message))
        });
        let resp_problem = self.resp_bind.as_ref().and_then(|bind| {
            // Token problems are reported once, below.
            let tokens = shared::auth::Tokens::new(&self.tokens).ok()?;
            shared::auth::check_exposure(bind, &tokens, self.allow_anonymous).err().map(|e| format!("resp_bind: {e}"))
        });
        let auth_problem = self.access().err();
        let encryption_problem = self.encryption().err();
        let ttl_problems = self.ttl_policy().err().unwrap_or_default();
        let all: Vec<String> = problems
            .into_iter()
            .map(str::to_string)
            .chain(url_problem)
            .chain(tenant_problem)
            .chain(resp_problem)
            .chain(auth_problem)
            .chain(encryption_problem)
            .chain(ttl_problems)
            .collect();
        if all.is_empty() {
            Ok(())
        } else {
            Err(format!("configuration error: {}", all.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redis_protocol_port_settings_are_checked() {
        let refused = |s: Settings| s.validate().expect_err("refused");
        assert!(refused(Settings { resp_threads: 0, ..Settings::default() }).contains("resp_threads"));
        assert!(refused(Settings { resp_threads: 65, ..Settings::default() }).contains("resp_threads"));
        let tenant = Settings { resp_default_tenant: Some("two words".into()), ..Settings::default() };
        assert!(refused(tenant).contains("resp_default_tenant"));
        Settings { resp_threads: 4, ..Settings::default() }.validate().expect("4 threads are fine");
    }
}
