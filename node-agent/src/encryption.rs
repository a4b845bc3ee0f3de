//! Encryption at rest of sensitive entries: values of the tenants and keys
//! that `[[encrypt]]` rules name are stored in Redis (L2) sealed with
//! AES-256-GCM, and opened again when an agent reads them. L1 holds plaintext.
//!
//! - Keys come from `encryption_keys` (in practice `DCC_AGENT_ENCRYPTION_KEYS`):
//!   `ID:BASE64,ID:BASE64…`, 32-byte keys. The first seals new writes; every
//!   one of them opens what it sealed, so a key can be rotated by putting a
//!   new one first and dropping the old one once its entries have expired.
//! - A sealed value is `nonce (12 random bytes) ‖ ciphertext ‖ tag`, stored in
//!   the entry's `v` field; the key id goes in the entry's `x` field. The
//!   tenant and key are the associated data, so a sealed value moved to another
//!   entry does not open.
//! - Whether a stored value is sealed is the entry's `x` field, not a rule: a
//!   value written before a rule existed is still read as it was written, and
//!   a sealed one is opened even after its rule is gone.
//! - A value that does not open (unknown key id, wrong key, tampered bytes)
//!   is a miss, counted in `dcc_decrypt_errors_total`: never garbage, never an error.
//!
//! What this protects, and what it does not, is in `docs/guarantees.md`.

use std::collections::HashMap;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use serde::Deserialize;

/// One `[[encrypt]]` table: which entries are sealed in L2.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EncryptRule {
    /// The tenant, or `"*"` for every tenant.
    pub tenant: String,
    /// A glob over the tenant's keys (the pattern dialect); every key when absent.
    #[serde(default)]
    pub keys: Option<String>,
}

/// Bytes of an AES-GCM nonce.
const NONCE_BYTES: usize = 12;

/// Why a sealed value did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// It was sealed with a key id this agent does not have.
    #[error("sealed with a key this agent does not have")]
    UnknownKey,
    /// The key did not authenticate it: another key under the same id, or
    /// bytes changed in Redis.
    #[error("the value does not authenticate under its key")]
    Corrupt,
}

/// The rules and keys, checked; cheap to share behind the agent's `Arc`.
pub struct Encryption {
    /// `(tenant or "*", key glob)`, in file order.
    rules: Vec<(String, Option<String>)>,
    /// The id of the key that seals new writes, if any key is configured.
    current: Option<String>,
    /// Every configured key, by id.
    ciphers: HashMap<String, Aes256Gcm>,
}

impl std::fmt::Debug for Encryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key ids only: the keys never print.
        let mut ids: Vec<&String> = self.ciphers.keys().collect();
        ids.sort();
        f.debug_struct("Encryption")
            .field("rules", &self.rules)
            .field("current", &self.current)
            .field("ids", &ids)
            .finish()
    }
}

impl Encryption {
    /// No rules, no keys: nothing is sealed.
    pub fn off() -> Encryption {
        Encryption { rules: Vec::new(), current: None, ciphers: HashMap::new() }
    }

    /// Checks `[[encrypt]]` rules and `encryption_keys` together. Errors name
    /// the problem and the key id, never key material.
    pub fn new(rules: &[EncryptRule], keys: Option<&str>) -> Result<Encryption, String> {
        let mut problems = Vec::new();
        let mut checked = Vec::new();
        for rule in rules {
            if rule.tenant != "*" {
                if let Err(e) = shared::names::validate_tenant(&rule.tenant) {
                    problems.push(format!("[[encrypt]] tenant {:?}: {}", rule.tenant, e.message));
                }
            }
            if let Some(glob) = &rule.keys {
                if glob.is_empty() {
                    problems
                        .push(format!("[[encrypt]] for {:?}: keys is empty (leave it out for every key)", rule.tenant));
                } else if let Err(e) = shared::glob::check(glob) {
                    problems
                        .push(format!("[[encrypt]] for {:?}: keys {glob:?} is not a valid pattern: {e}", rule.tenant));
                }
            }
            checked.push((rule.tenant.clone(), rule.keys.clone()));
        }
        let mut current = None;
        let mut ciphers = HashMap::new();
        for (i, item) in keys.unwrap_or_default().split(',').map(str::trim).filter(|s| !s.is_empty()).enumerate() {
            match parse_key(item) {
                Ok((id, cipher)) => {
                    if ciphers.contains_key(&id) {
                        problems.push(format!("encryption_keys: key id {id:?} appears twice"));
                    }
                    if current.is_none() {
                        current = Some(id.clone());
                    }
                    ciphers.insert(id, cipher);
                }
                Err(e) => problems.push(format!("encryption_keys: item {}: {e}", i + 1)),
            }
        }
        if !checked.is_empty() && current.is_none() {
            problems.push(
                "[[encrypt]] rules need encryption_keys (DCC_AGENT_ENCRYPTION_KEYS=ID:BASE64 of 32 bytes, …)".into(),
            );
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(Encryption { rules: checked, current, ciphers })
    }

    /// Whether any rule is configured.
    pub fn is_on(&self) -> bool {
        !self.rules.is_empty()
    }

    /// Whether a rule says this entry is sealed in L2.
    pub fn applies(&self, tenant: &str, key: &str) -> bool {
        self.rules
            .iter()
            .any(|(t, glob)| (t == "*" || t == tenant) && glob.as_deref().is_none_or(|g| shared::glob::matches(g, key)))
    }

    /// Seals `value` for `(tenant, key)` when a rule names it: the bytes to
    /// store and the key id to store with them; `None` when no rule applies.
    pub fn seal(&self, tenant: &str, key: &str, value: &[u8]) -> Option<(Vec<u8>, String)> {
        if !self.applies(tenant, key) {
            return None;
        }
        // `new` refuses rules without keys, so a rule implies a current key.
        let id = self.current.as_ref()?;
        let cipher = self.ciphers.get(id)?;
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = associated_data(tenant, key);
        // Encryption fails only for inputs over GCM's limit (64 GiB), far over max_value_bytes.
        let sealed = cipher.encrypt(&nonce, Payload { msg: value, aad: &aad }).ok()?;
        let mut out = Vec::with_capacity(NONCE_BYTES + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Some((out, id.clone()))
    }

    /// Opens a value sealed under key `id` for `(tenant, key)`.
    pub fn open(&self, tenant: &str, key: &str, id: &str, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        let cipher = self.ciphers.get(id).ok_or(OpenError::UnknownKey)?;
        if sealed.len() < NONCE_BYTES {
            return Err(OpenError::Corrupt);
        }
        let (nonce, body) = sealed.split_at(NONCE_BYTES);
        let aad = associated_data(tenant, key);
        cipher.decrypt(Nonce::from_slice(nonce), Payload { msg: body, aad: &aad }).map_err(|_| OpenError::Corrupt)
    }
}

/// What binds a sealed value to its entry: a version, the tenant and the key
/// (NUL cannot occur in either).
fn associated_data(tenant: &str, key: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(8 + tenant.len() + key.len());
    aad.extend_from_slice(b"dcc1\0");
    aad.extend_from_slice(tenant.as_bytes());
    aad.push(0);
    aad.extend_from_slice(key.as_bytes());
    aad
}

/// `ID:BASE64` (32 bytes) into its id and cipher.
fn parse_key(item: &str) -> Result<(String, Aes256Gcm), String> {
    let (id, encoded) = item.split_once(':').ok_or("expected ID:BASE64")?;
    let id_ok = !id.is_empty()
        && id.len() <= 32
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if !id_ok {
        return Err("the key id must be 1 to 32 characters of A-Z, a-z, 0-9, '_', '-' or '.'".into());
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| format!("key {id:?} is not valid base64"))?;
    if bytes.len() != 32 {
        return Err(format!("key {id:?} is {} bytes; AES-256 needs 32 (`openssl rand -base64 32`)", bytes.len()));
    }
    let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| format!("key {id:?} is not an AES-256 key"))?;
    Ok((id.to_string(), cipher))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, byte: u8) -> String {
        format!("{id}:{}", base64::engine::general_purpose::STANDARD.encode([byte; 32]))
    }

    fn rule(tenant: &str, keys: Option<&str>) -> EncryptRule {
        EncryptRule { tenant: tenant.into(), keys: keys.map(str::to_string) }
    }

    #[test]
    fn rules_pick_tenants_and_keys() {
        let e = Encryption::new(&[rule("clinic", Some("patient:*")), rule("bank", None)], Some(&key("k1", 1))).unwrap();
        assert!(e.applies("clinic", "patient:7"));
        assert!(!e.applies("clinic", "room:7"));
        assert!(e.applies("bank", "anything"));
        assert!(!e.applies("acme", "patient:7"));
        assert!(e.seal("acme", "patient:7", b"x").is_none());
    }

    #[test]
    fn a_sealed_value_opens_only_for_its_own_entry_and_key() {
        let e = Encryption::new(&[rule("*", None)], Some(&key("k1", 1))).unwrap();
        let (sealed, id) = e.seal("clinic", "patient:7", b"Jane Doe, allergies: none").unwrap();
        assert_eq!(id, "k1");
        assert!(!sealed.windows(8).any(|w| w == b"Jane Doe"), "the plaintext shows through");
        assert_eq!(e.open("clinic", "patient:7", "k1", &sealed).unwrap(), b"Jane Doe, allergies: none");
        // Moved to another entry, tampered, cut short, or under an unknown id: refused.
        assert_eq!(e.open("clinic", "patient:8", "k1", &sealed), Err(OpenError::Corrupt));
        assert_eq!(e.open("other", "patient:7", "k1", &sealed), Err(OpenError::Corrupt));
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(e.open("clinic", "patient:7", "k1", &tampered), Err(OpenError::Corrupt));
        assert_eq!(e.open("clinic", "patient:7", "k1", &sealed[..5]), Err(OpenError::Corrupt));
        assert_eq!(e.open("clinic", "patient:7", "k9", &sealed), Err(OpenError::UnknownKey));
        // Two seals of one value differ (a random nonce each).
        assert_ne!(e.seal("clinic", "patient:7", b"v").unwrap().0, e.seal("clinic", "patient:7", b"v").unwrap().0);
    }

    #[test]
    fn rotation_seals_with_the_first_key_and_opens_with_any() {
        let old = Encryption::new(&[rule("clinic", None)], Some(&key("old", 1))).unwrap();
        let (sealed, _) = old.seal("clinic", "k", b"v").unwrap();
        let rotated =
            Encryption::new(&[rule("clinic", None)], Some(&format!("{},{}", key("new", 2), key("old", 1)))).unwrap();
        assert_eq!(rotated.open("clinic", "k", "old", &sealed).unwrap(), b"v");
        assert_eq!(rotated.seal("clinic", "k", b"v").unwrap().1, "new");
        // The same id with another key does not open it.
        let wrong = Encryption::new(&[rule("clinic", None)], Some(&key("old", 3))).unwrap();
        assert_eq!(wrong.open("clinic", "k", "old", &sealed), Err(OpenError::Corrupt));
    }

    #[test]
    fn bad_settings_are_refused_without_printing_keys() {
        let short = format!("k1:{}", base64::engine::general_purpose::STANDARD.encode([7u8; 16]));
        for (rules, keys, expect) in [
            (vec![rule("clinic", None)], None, "need encryption_keys"),
            (vec![], Some(short.as_str()), "16 bytes"),
            (vec![], Some("k1"), "ID:BASE64"),
            (vec![], Some("k1:not base64!"), "not valid base64"),
            (vec![], Some(":AAAA"), "key id"),
            (vec![rule("a b", None)], Some(&key("k1", 1) as &str), "tenant"),
            (vec![rule("clinic", Some("a[b"))], Some(&key("k1", 1) as &str), "not a valid pattern"),
        ] {
            let err = Encryption::new(&rules, keys).unwrap_err();
            assert!(err.contains(expect), "{err:?} should say {expect:?}");
            assert!(!err.contains(&base64::engine::general_purpose::STANDARD.encode([1u8; 32])), "{err}");
        }
        let twice = format!("{},{}", key("k1", 1), key("k1", 2));
        assert!(Encryption::new(&[], Some(&twice)).unwrap_err().contains("twice"));
        let debug = format!("{:?}", Encryption::new(&[], Some(&key("k1", 1))).unwrap());
        assert!(!debug.contains(&base64::engine::general_purpose::STANDARD.encode([1u8; 32])), "{debug}");
    }
}
