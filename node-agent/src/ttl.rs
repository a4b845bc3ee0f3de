//! TTL tiers: how long a written entry lives (contract v2, section 4).
//!
//! `[[ttl]]` tables give keys matching a pattern (of one tenant, or of every
//! tenant) their own default and maximum TTL; the first matching table in
//! file order wins, and keys no table matches get `default_ttl_secs` and
//! `max_ttl_secs`. A TTL the writer asks for (`ttl=`, `EX`) is checked against
//! the tier's maximum and kept exactly. A default TTL is shortened by a
//! random part of up to `ttl_jitter` of its length, so that entries written
//! together (a warm-up, a reload after a flush) do not all expire together
//! and reload together.

use std::time::Duration;

use serde::Deserialize;

/// One `[[ttl]]` table.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TtlTier {
    /// A glob over keys (the pattern dialect of invalidations).
    pub pattern: String,
    /// Only this tenant's keys; every tenant's when absent.
    #[serde(default)]
    pub tenant: Option<String>,
    /// TTL of a write that gives none, in seconds (before jitter).
    pub default_secs: u64,
    /// Largest TTL a write may ask for; `max_ttl_secs` when absent.
    #[serde(default)]
    pub max_secs: Option<u64>,
}

/// The tiers, checked, with the agent-wide defaults behind them.
#[derive(Debug, Clone)]
pub struct TtlPolicy {
    tiers: Vec<TtlTier>,
    default_secs: u64,
    max_secs: u64,
    jitter: f64,
}

/// A TTL a write asked for that its tier does not allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TtlRefused {
    /// The tier's maximum, in seconds.
    pub max_secs: u64,
    /// The pattern of the tier that applied, if one did.
    pub tier: Option<String>,
}

impl std::fmt::Display for TtlRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.tier {
            Some(pattern) => {
                write!(f, "ttl must be between 1 and {} seconds for keys matching {pattern:?}", self.max_secs)
            }
            None => write!(f, "ttl must be between 1 and {} seconds", self.max_secs),
        }
    }
}

impl TtlPolicy {
    /// Checks the tiers against the agent-wide defaults; every problem is reported.
    pub fn new(tiers: &[TtlTier], default_secs: u64, max_secs: u64, jitter: f64) -> Result<TtlPolicy, Vec<String>> {
        let mut problems = Vec::new();
        if !(0.0..=0.5).contains(&jitter) {
            problems.push("ttl_jitter must be between 0 and 0.5".to_string());
        }
        for tier in tiers {
            let name = format!("[[ttl]] {:?}", tier.pattern);
            if let Err(e) = shared::glob::check(&tier.pattern) {
                problems.push(format!("{name}: pattern is not valid: {e}"));
            }
            if let Some(tenant) = &tier.tenant {
                if let Err(e) = shared::names::validate_tenant(tenant) {
                    problems.push(format!("{name}: tenant {tenant:?}: {}", e.message));
                }
            }
            let max = tier.max_secs.unwrap_or(max_secs);
            if max == 0 || max > max_secs {
                problems.push(format!("{name}: max_secs must be between 1 and max_ttl_secs ({max_secs})"));
            }
            if tier.default_secs == 0 || tier.default_secs > max {
                problems.push(format!("{name}: default_secs must be between 1 and its max_secs ({max})"));
            }
        }
        if problems.is_empty() {
            Ok(TtlPolicy { tiers: tiers.to_vec(), default_secs, max_secs, jitter })
        } else {
            Err(problems)
        }
    }

    /// The TTL of a write of `tenant`/`key`: `asked` (seconds) if its tier
    /// allows it, else the tier's default less its jitter.
    pub fn ttl(&self, tenant: &str, key: &str, asked: Option<u64>) -> Result<Duration, TtlRefused> {
        let tier = self
            .tiers
            .iter()
            .find(|t| t.tenant.as_deref().is_none_or(|only| only == tenant) && shared::glob::matches(&t.pattern, key));
        let (default_secs, max_secs) = match tier {
            Some(t) => (t.default_secs, t.max_secs.unwrap_or(self.max_secs)),
            None => (self.default_secs, self.max_secs),
        };
        match asked {
            Some(secs) if secs == 0 || secs > max_secs => {
                Err(TtlRefused { max_secs, tier: tier.map(|t| t.pattern.clone()) })
            }
            Some(secs) => Ok(Duration::from_secs(secs)),
            None => {
                let full = default_secs.saturating_mul(1000);
                let spread = (full as f64 * self.jitter) as u64;
                // At least 1 second is left (the jitter is at most half).
                let cut = if spread == 0 { 0 } else { fastrand::u64(0..=spread) };
                Ok(Duration::from_millis((full - cut).max(1000)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(pattern: &str, tenant: Option<&str>, default_secs: u64, max_secs: Option<u64>) -> TtlTier {
        TtlTier { pattern: pattern.into(), tenant: tenant.map(str::to_string), default_secs, max_secs }
    }

    #[test]
    fn the_first_matching_tier_decides() {
        let tiers = [
            tier("session:*", Some("acme"), 60, Some(600)),
            tier("session:*", None, 120, None),
            tier("report:*", None, 3600, Some(7200)),
        ];
        let policy = TtlPolicy::new(&tiers, 300, 86_400, 0.0).expect("valid");
        assert_eq!(policy.ttl("acme", "session:1", None), Ok(Duration::from_secs(60)));
        assert_eq!(policy.ttl("globex", "session:1", None), Ok(Duration::from_secs(120)));
        assert_eq!(policy.ttl("acme", "report:q1", None), Ok(Duration::from_secs(3600)));
        assert_eq!(policy.ttl("acme", "other", None), Ok(Duration::from_secs(300)));
        // Asked TTLs are kept exactly, up to the tier's maximum.
        assert_eq!(policy.ttl("acme", "session:1", Some(600)), Ok(Duration::from_secs(600)));
        let refused = policy.ttl("acme", "session:1", Some(601)).expect_err("above the tier's max");
        assert_eq!(refused.max_secs, 600);
        assert!(refused.to_string().contains("session:*"), "{refused}");
        assert!(policy.ttl("globex", "session:1", Some(86_400)).is_ok(), "the global maximum by default");
        assert!(policy.ttl("acme", "other", Some(0)).is_err());
    }

    #[test]
    fn default_ttls_are_spread_by_the_jitter_and_asked_ones_are_not() {
        let policy = TtlPolicy::new(&[], 100, 86_400, 0.1).expect("valid");
        let ttls: Vec<Duration> = (0..500).map(|_| policy.ttl("t", "k", None).expect("ok")).collect();
        assert!(ttls.iter().all(|t| *t >= Duration::from_secs(90) && *t <= Duration::from_secs(100)));
        let distinct: std::collections::HashSet<_> = ttls.iter().collect();
        assert!(distinct.len() > 50, "spread over the 10 s window, not one value: {}", distinct.len());
        assert_eq!(policy.ttl("t", "k", Some(100)), Ok(Duration::from_secs(100)));
    }

    #[test]
    fn bad_tiers_are_refused_with_every_problem() {
        let tiers =
            [tier("[", None, 10, None), tier("a:*", Some("no spaces"), 0, Some(10)), tier("b:*", None, 20, Some(10))];
        let problems = TtlPolicy::new(&tiers, 300, 86_400, 0.9).expect_err("refused");
        let all = problems.join("; ");
        for needle in
            ["ttl_jitter", "pattern is not valid", "tenant", "default_secs must be between 1 and its max_secs (10)"]
        {
            assert!(all.contains(needle), "{needle} in {all}");
        }
        let above = TtlPolicy::new(&[tier("c:*", None, 10, Some(100_000))], 300, 86_400, 0.05).expect_err("refused");
        assert!(above.join("").contains("max_ttl_secs"));
    }
}
