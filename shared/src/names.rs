//! Names and their validation: tenants, keys, tags and patterns, exactly as the
//! contract defines them. Every value that reaches Redis or L1 passes through here
//! first, so both services reject the same input with the same error code.

use crate::glob;

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest tag, in bytes.
pub const MAX_TAG_BYTES: usize = 256;
/// Longest tenant name, in characters (all ASCII).
pub const MAX_TENANT_CHARS: usize = 64;
/// Longest pattern, in bytes.
pub const MAX_PATTERN_BYTES: usize = 2 * MAX_KEY_BYTES;
/// Most runs of `*` in one pattern. Redis's `MATCH` gives up (no match) past
/// 1000 nested stars, where [`glob::matches`] would match: the key would stay
/// in L2 while every L1 dropped it.
pub const MAX_PATTERN_STARS: usize = 32;

/// A name that failed validation: `code` is the JSON error code, `message` says
/// what was wrong and what to send instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidName {
    /// snake_case error code, such as `invalid_key`.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
}

fn invalid(code: &'static str, message: String) -> InvalidName {
    InvalidName { code, message }
}

/// `[A-Za-z0-9_-]{1,64}`.
pub fn validate_tenant(tenant: &str) -> Result<(), InvalidName> {
    let ok = !tenant.is_empty()
        && tenant.len() <= MAX_TENANT_CHARS
        && tenant.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "invalid_tenant",
            format!(
                "tenant {:?} must be 1 to {MAX_TENANT_CHARS} characters of A-Z, a-z, 0-9, '_' or '-'",
                truncate(tenant)
            ),
        ))
    }
}

/// 1 to 1024 bytes of UTF-8 without control characters.
pub fn validate_key(key: &str) -> Result<(), InvalidName> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(invalid(
            "invalid_key",
            format!("a key must be 1 to {MAX_KEY_BYTES} bytes long, got {} bytes", key.len()),
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(invalid("invalid_key", format!("key {:?} contains a control character", truncate(key))));
    }
    Ok(())
}

/// 1 to 256 bytes, no commas, no whitespace, no control characters.
pub fn validate_tag(tag: &str) -> Result<(), InvalidName> {
    if tag.is_empty() || tag.len() > MAX_TAG_BYTES {
        return Err(invalid(
            "invalid_tag",
            format!("a tag must be 1 to {MAX_TAG_BYTES} bytes long, got {} bytes", tag.len()),
        ));
    }
    if tag.chars().any(|c| c == ',' || c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            "invalid_tag",
            format!("tag {:?} must not contain commas, whitespace or control characters", truncate(tag)),
        ));
    }
    Ok(())
}

/// A glob over the keys of one tenant. A pattern that matches every key (a bare
/// `*`, or only stars) is allowed only with `confirm`.
pub fn validate_pattern(pattern: &str, confirm: bool) -> Result<(), InvalidName> {
    if pattern.is_empty() {
        return Err(invalid(
            "invalid_pattern",
            "a pattern must not be empty; use \"*\" with \"confirm\": true to invalidate a whole tenant".into(),
        ));
    }
    if pattern.len() > MAX_PATTERN_BYTES || pattern.chars().any(char::is_control) {
        return Err(invalid(
            "invalid_pattern",
            format!("pattern {:?} is too long or contains a control character", truncate(pattern)),
        ));
    }
    if star_runs(pattern) > MAX_PATTERN_STARS {
        return Err(invalid(
            "invalid_pattern",
            format!("pattern {:?} has more than {MAX_PATTERN_STARS} runs of '*'", truncate(pattern)),
        ));
    }
    if let Err(why) = glob::check(pattern) {
        return Err(invalid("invalid_pattern", format!("pattern {:?} is not a valid glob: {why}", truncate(pattern))));
    }
    if glob::matches_everything(pattern) && !confirm {
        return Err(invalid(
            "confirm_required",
            format!("pattern {pattern:?} covers every key of the tenant; send \"confirm\": true to do that"),
        ));
    }
    Ok(())
}

/// Runs of unescaped `*` (inside a class, a `*` is a plain byte, but
/// counting it too only refuses sooner).
fn star_runs(pattern: &str) -> usize {
    let (mut runs, mut escaped, mut previous_star) = (0, false, false);
    for b in pattern.bytes() {
        let star = b == b'*' && !escaped;
        if star && !previous_star {
            runs += 1;
        }
        escaped = b == b'\\' && !escaped;
        previous_star = star;
    }
    runs
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants() {
        assert!(validate_tenant("acme").is_ok());
        assert!(validate_tenant("A-b_9").is_ok());
        assert!(validate_tenant(&"a".repeat(64)).is_ok());
        assert!(validate_tenant(&"a".repeat(65)).is_err());
        assert!(validate_tenant("").is_err());
        assert!(validate_tenant("ac me").is_err());
        assert!(validate_tenant("acme:x").is_err());
        assert!(validate_tenant("é").is_err());
    }

    #[test]
    fn keys() {
        assert!(validate_key("supplier:42/detail").is_ok());
        assert!(validate_key("ünïcode key").is_ok());
        assert!(validate_key(&"k".repeat(1024)).is_ok());
        assert_eq!(validate_key(&"k".repeat(1025)).unwrap_err().code, "invalid_key");
        assert!(validate_key("").is_err());
        assert!(validate_key("a\nb").is_err());
        assert!(validate_key("a\u{7f}b").is_err());
    }

    #[test]
    fn tags() {
        assert!(validate_tag("supplier:42").is_ok());
        assert!(validate_tag(&"t".repeat(256)).is_ok());
        assert!(validate_tag(&"t".repeat(257)).is_err());
        assert!(validate_tag("a,b").is_err());
        assert!(validate_tag("a b").is_err());
        assert!(validate_tag("a\tb").is_err());
        assert!(validate_tag("").is_err());
    }

    #[test]
    fn patterns() {
        assert!(validate_pattern("suppliers:list:*", false).is_ok());
        assert!(validate_pattern("a[bc]?", false).is_ok());
        assert_eq!(validate_pattern("", false).unwrap_err().code, "invalid_pattern");
        assert_eq!(validate_pattern("*", false).unwrap_err().code, "confirm_required");
        assert_eq!(validate_pattern("**", false).unwrap_err().code, "confirm_required");
        assert!(validate_pattern("*", true).is_ok());
        assert_eq!(validate_pattern("a[bc", false).unwrap_err().code, "invalid_pattern");
        assert_eq!(validate_pattern("a\\", false).unwrap_err().code, "invalid_pattern");
    }

    // Found while porting Redis's matcher for the fuzz target `fuzz_glob`
    // (shared/tests/fuzz.rs): Redis's `stringmatchlen` answers "no match"
    // past 1000 nested stars, so a pattern of 1001 `*a` (2002 bytes, within
    // the length limit) left `aaa...` in L2 while the agents dropped it from L1.
    #[test]
    fn patterns_have_a_bounded_number_of_stars() {
        let most = "*a".repeat(MAX_PATTERN_STARS);
        assert!(validate_pattern(&most, false).is_ok());
        assert_eq!(validate_pattern(&format!("{most}*b"), false).unwrap_err().code, "invalid_pattern");
        assert_eq!(validate_pattern(&"*a".repeat(1001), false).unwrap_err().code, "invalid_pattern");
        // A run counts once, and escaped stars do not count.
        assert!(validate_pattern(&"**a".repeat(MAX_PATTERN_STARS), false).is_ok());
        assert!(validate_pattern(&format!("{most}\\*x\\*"), false).is_ok());
        assert!(validate_pattern(&format!("{most}\\\\*"), false).is_err());
    }
}
