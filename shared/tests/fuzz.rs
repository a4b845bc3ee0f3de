//! Fuzz targets for what `shared` decodes from the network and from Redis: the
//! fill token, the invalidation log message, the glob dialect (as matched in
//! Rust, by Redis's `MATCH` and by the Lua pattern of the PUT script), and
//! name validation; plus the ack payload the coordinators read.
//!
//! They are bolero targets, run as ordinary tests on stable Rust with bolero's
//! random engine: a short pass by default, `DCC_FUZZ_SECS=N` for N seconds per
//! target (`make fuzz`). A failure prints the input and the seed to replay it
//! (`BOLERO_RANDOM_SEED=...`).

use std::time::Duration;

use shared::glob;
use shared::names::{self, MAX_KEY_BYTES, MAX_PATTERN_BYTES, MAX_PATTERN_STARS, MAX_TAG_BYTES, MAX_TENANT_CHARS};
use shared::protocol::{FillToken, InvalidationMessage, MessageBody, Position, Selector, MESSAGE_VERSION};
use shared::registry::Ack;

#[path = "fuzz_support/mod.rs"]
mod fuzz_support;
use fuzz_support::spell;

// ---- Fill token ---------------------------------------------------------------

const TOKEN_ALPHABET: &[&str] = &[
    "0",
    "1",
    "9",
    "a",
    "f",
    "A",
    "F",
    "g",
    ".",
    ".",
    "+",
    "-",
    " ",
    "é",
    "18446744073709551615",
    "18446744073709551616",
];

#[test]
fn fuzz_fill_token() {
    let seeds =
        ["", ".", "..", "a.1.2", "A.0.0", "ab.+1.2", "ab.01.2", "ab.1.2.", "é.1.2", "ab.1.18446744073709551616"];
    for seed in seeds {
        check_fill_token(seed);
    }
    fuzz!((Vec<u8>, Vec<u8>, u64, u64, bool)).for_each(|(raw, spelled, seq, issued, upper)| {
        // Anything a client may send back: decoding is canonical.
        check_fill_token(&String::from_utf8_lossy(raw));
        check_fill_token(&spell(spelled, TOKEN_ALPHABET));
        // Everything this build issues decodes to itself.
        let hex: String = spelled.iter().map(|b| char::from(b"0123456789abcdefABCDEF"[usize::from(*b) % 22])).collect();
        let epoch = if hex.is_empty() { "0".to_string() } else { hex };
        let epoch = if *upper { epoch.to_ascii_uppercase() } else { epoch };
        let token = FillToken { epoch, seq: *seq, issued_ms: *issued };
        assert_eq!(FillToken::decode(&token.encode()), Some(token.clone()));
        // And nothing else: a token with another epoch is refused.
        let other = FillToken { epoch: format!("{}{}", token.epoch, spell(raw, &["g", ".", " ", "é", "-"])), ..token };
        if !raw.is_empty() {
            assert_eq!(FillToken::decode(&other.encode()), None, "{other:?}");
        }
    });
}

fn check_fill_token(text: &str) {
    if let Some(token) = FillToken::decode(text) {
        assert!(!token.epoch.is_empty() && token.epoch.bytes().all(|b| b.is_ascii_hexdigit()), "{token:?}");
        assert_eq!(token.encode(), text, "a token that decodes encodes back to itself");
    }
}

// ---- Invalidation message -----------------------------------------------------

const JSON_ALPHABET: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\\",
    "\\u0000",
    "\\ud800",
    "0",
    "2",
    "-1",
    "1e999",
    "18446744073709551616",
    "true",
    "null",
    "\"v\"",
    "\"p\"",
    "\"epoch\"",
    "\"seq\"",
    "\"nonce\"",
    "\"prev\"",
    "\"ts_ms\"",
    "\"origin\"",
    "\"invalidations\"",
    "\"tenant\"",
    "\"keys\"",
    "\"cascade\"",
    " ",
    "é",
    "\"x\"",
];

#[test]
fn fuzz_invalidation_message() {
    let seeds: [&[u8]; 6] = [
        b"",
        b"{}",
        br#"{"v":2}"#,
        br#"{"v":2,"p":0,"epoch":"e","seq":1,"nonce":"n","prev":"","ts_ms":0,"origin":"x","invalidations":[]}"#,
        br#"{"v":2,"p":65536,"epoch":"e","seq":1,"nonce":"n","prev":"","ts_ms":0,"origin":"x","invalidations":[]}"#,
        &[b'['; 10_000],
    ];
    for seed in seeds {
        check_message_bytes(seed);
    }
    type Input = (Vec<u8>, (u16, u64, u64), Vec<String>, Vec<(String, Vec<String>, bool)>, (u16, u8));
    fuzz!(Input).for_each(|(raw, (p, seq, ts), strings, items, (at, flip))| {
        check_message_bytes(raw);
        check_message_bytes(spell(raw, JSON_ALPHABET).as_bytes());
        // A message as the log-append script writes it decodes to what was written.
        let text = |i: usize| strings.get(i).cloned().unwrap_or_default();
        let invalidations: Vec<Selector> = items
            .iter()
            .map(|(tenant, names, cascade)| Selector {
                tenant: tenant.clone(),
                keys: names.iter().step_by(3).cloned().collect(),
                tags: names.iter().skip(1).step_by(3).cloned().collect(),
                patterns: names.iter().skip(2).step_by(3).cloned().collect(),
                cascade: *cascade,
            })
            .collect();
        let origin = text(3);
        let ack = *seq % 2 == 0;
        let body = MessageBody { ts_ms: *ts, origin: &origin, invalidations: &invalidations, ack };
        let position = Position { partition: *p, epoch: text(0), seq: *seq, nonce: text(1) };
        let wire = InvalidationMessage::assemble(&position, &text(2), &body).expect("a message always encodes");
        let msg = InvalidationMessage::decode(wire.as_bytes()).expect("an assembled message decodes");
        assert_eq!(msg.position(), position);
        assert_eq!((msg.prev.as_str(), msg.ts_ms, msg.origin.as_str()), (text(2).as_str(), *ts, origin.as_str()));
        assert_eq!((msg.invalidations.as_slice(), msg.ack), (invalidations.as_slice(), ack));
        // The same bytes, damaged in one place: refused or read, never a panic.
        let mut damaged = wire.into_bytes();
        let i = usize::from(*at) % damaged.len();
        damaged[i] ^= flip | 1;
        check_message_bytes(&damaged);
        damaged.truncate(i);
        check_message_bytes(&damaged);
    });
}

fn check_message_bytes(bytes: &[u8]) {
    if let Ok(msg) = InvalidationMessage::decode(bytes) {
        assert_eq!(msg.v, MESSAGE_VERSION);
        let again = serde_json::to_vec(&msg).expect("a decoded message encodes");
        let back = InvalidationMessage::decode(&again).expect("a re-encoded message decodes");
        assert_eq!(back, msg);
    }
}

// ---- Ack payloads ---------------------------------------------------------------

#[test]
fn fuzz_ack() {
    fuzz!((u16, Vec<u8>, (String, u64, String, String))).for_each(|(p, raw, (epoch, seq, nonce, node))| {
        let payload = spell(raw, &["e", "1", "0", " ", "-", "é", "+", "18446744073709551616"]);
        for payload in [payload.as_str(), &String::from_utf8_lossy(raw)] {
            if let Some(ack) = Ack::decode(*p, payload) {
                assert_eq!(ack.position.partition, *p);
                let nonce = if ack.position.nonce.is_empty() { "-" } else { &ack.position.nonce };
                let again = format!("{} {} {} {}", ack.position.epoch, ack.position.seq, nonce, ack.node_id);
                assert_eq!(Ack::decode(*p, &again), Some(ack.clone()));
            }
            if let Some(ack) = Ack::decode_stored(*p, "node", payload) {
                assert_eq!((ack.position.partition, ack.node_id.as_str()), (*p, "node"));
            }
        }
        // What an agent publishes reads back (epoch and nonce are space-free ids).
        let id = |s: &str| s.replace(' ', "_");
        let (epoch, nonce) = (id(epoch), id(nonce));
        let wire = format!("{epoch} {seq} {} {node}", if nonce.is_empty() { "-" } else { nonce.as_str() });
        let ack = Ack::decode(*p, &wire).expect("a published ack decodes");
        let nonce = if nonce == "-" { String::new() } else { nonce };
        assert_eq!(
            (ack.position.epoch, ack.position.seq, ack.position.nonce, ack.node_id),
            (epoch, *seq, nonce, node.clone())
        );
    });
}

// ---- Glob dialect -------------------------------------------------------------

/// Pattern material: the dialect's metacharacters, bytes Lua or Redis read
/// specially, and a two-byte character.
const PATTERN_ALPHABET: &[&str] =
    &["a", "b", "c", "*", "*", "?", "[", "]", "^", "-", "\\", "%", "$", ".", "(", "é", "z", "a-c", "[^", "]]", "-\\"];
/// Key material: what the patterns name, and bytes around them.
const TEXT_ALPHABET: &[&str] =
    &["a", "b", "c", "-", "]", "[", "^", "\\", "*", "?", "%", "$", ".", "(", "`", "z", "é", "~"];

#[test]
fn fuzz_glob() {
    // Patterns that dialects tend to disagree on, and worst cases.
    let seeds = [
        ("k[a-]", "k]"),
        ("k[a-]x]", "kx"),
        ("[a-\\\\]", "\\"),
        ("[]", "a"),
        ("[^]", "a"),
        ("[]]", "]"),
        ("[!-~]", "%"),
        ("[$-&]", "%"),
        ("[\\]-a]", "^"),
        ("*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
        ("a*b*c", "abxbc"),
        ("*", "x"),
        ("\\*", "*"),
    ];
    for (pattern, text) in seeds {
        check_glob(pattern, text);
    }
    fuzz!((Vec<u8>, Vec<u8>, String, String)).for_each(|(p, t, raw_p, raw_t)| {
        let (pattern, text) = (spell(p, PATTERN_ALPHABET), spell(t, TEXT_ALPHABET));
        check_glob(&pattern, &text);
        check_glob(raw_p, raw_t);
        check_glob(&pattern, raw_t);
    });
}

#[test]
fn glob_worst_cases_stay_fast() {
    let long = "a".repeat(MAX_KEY_BYTES);
    let started = std::time::Instant::now();
    for stars in 1..=MAX_PATTERN_STARS {
        let pattern = format!("{}b", "*a".repeat(stars));
        assert!(!glob::matches(&pattern, &long));
        assert!(!glob::matches(&pattern, &"a".repeat(64 * 1024)));
        let lua = glob::to_lua_pattern(&pattern);
        let (found, steps) = lua_find(lua.as_bytes(), long.as_bytes(), 1 << 22).expect("parses, and fast");
        assert!(!found && steps <= lua_budget(lua.len(), long.len()), "{lua}: {steps} steps");
        assert!(!redis_match(pattern.as_bytes(), long.as_bytes()));
    }
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
}

/// The properties of one pattern against one key.
fn check_glob(pattern: &str, text: &str) {
    // Any pattern, well formed or not, matches without panicking.
    let ours = glob::matches(pattern, text);
    let lua = glob::to_lua_pattern(pattern);
    let Ok(()) = glob::check(pattern) else {
        return;
    };
    // Keys are never empty, and Redis's matcher does not match the empty string.
    if text.is_empty() {
        return;
    }
    assert_eq!(ours, redis_match(pattern.as_bytes(), text.as_bytes()), "{pattern:?} against {text:?}: Redis disagrees");
    // The PUT script's `string.find(key, lua)`: it parses, it takes linear
    // time, and it covers at least the keys the glob covers (exactly those
    // when at most one star is followed by something).
    let (found, steps) = match lua_find(lua.as_bytes(), text.as_bytes(), 1 << 22) {
        Ok(answer) => answer,
        Err(e) => panic!("{pattern:?} became {lua:?}, which Lua refuses: {e}"),
    };
    if ours {
        assert!(found, "{pattern:?} matches {text:?} and {lua:?} does not");
    } else if inner_stars(pattern) <= 1 {
        assert!(!found, "{pattern:?} does not match {text:?} but {lua:?} does");
    }
    assert!(steps <= lua_budget(lua.len(), text.len()), "{lua:?} against {text:?}: {steps} steps");
    // The same against a long key made of the short one (the worst cases of
    // backtracking are long keys of few distinct bytes).
    let long = text.repeat(512 / text.len() + 1);
    let (_, steps) = lua_find(lua.as_bytes(), long.as_bytes(), 1 << 22).expect("parses");
    assert!(steps <= lua_budget(lua.len(), long.len()), "{lua:?} against a {}-byte key: {steps} steps", long.len());
}

/// Linear time: a few passes of the pattern per byte of the key.
fn lua_budget(pattern: usize, text: usize) -> u64 {
    4 * (pattern as u64 + 1) * (text as u64 + 1)
}

/// Runs of `*` followed by something, reading classes and escapes as
/// [`glob::matches`] does (for well-formed patterns).
fn inner_stars(pattern: &str) -> usize {
    let p = pattern.as_bytes();
    let (mut i, mut inner, mut star) = (0, 0, false);
    while i < p.len() {
        let len = match p[i] {
            b'*' => {
                star = true;
                i += 1;
                continue;
            }
            b'\\' => 2,
            b'[' => {
                let mut j = if p.get(i + 1) == Some(&b'^') { i + 2 } else { i + 1 };
                while j < p.len() && p[j] != b']' {
                    j += match (p[j], p.get(j + 1), p.get(j + 2)) {
                        (b'\\', _, _) => 2,
                        (_, Some(b'-'), Some(e)) if *e != b']' => 3,
                        _ => 1,
                    };
                }
                j + 1 - i
            }
            _ => 1,
        };
        inner += usize::from(star);
        star = false;
        i += len;
    }
    inner
}

/// Redis's `stringmatchlen` (src/util.c, Redis 7), statement for statement:
/// indexes where the C code keeps pointers, a read past the end yields the
/// NUL that ends every sds, and `char` is signed (x86-64).
fn redis_match(pattern: &[u8], text: &[u8]) -> bool {
    let mut skip_longer = false;
    redis_match_impl(pattern, 0, text, 0, &mut skip_longer, 0)
}

fn redis_match_impl(pat: &[u8], mut p: usize, s: &[u8], mut t: usize, skip_longer: &mut bool, nesting: u32) -> bool {
    if nesting > 1000 {
        return false;
    }
    let at = |i: usize| pat.get(i).copied().unwrap_or(0);
    let signed = |b: u8| i32::from(b as i8);
    while p < pat.len() && t < s.len() {
        match at(p) {
            b'*' => {
                while p < pat.len() && at(p + 1) == b'*' {
                    p += 1;
                }
                if pat.len() - p == 1 {
                    return true;
                }
                while t < s.len() {
                    if redis_match_impl(pat, p + 1, s, t, skip_longer, nesting + 1) {
                        return true;
                    }
                    if *skip_longer {
                        return false;
                    }
                    t += 1;
                }
                *skip_longer = true;
                return false;
            }
            b'?' => t += 1,
            b'[' => {
                p += 1;
                let not = at(p) == b'^';
                if not {
                    p += 1;
                }
                let mut hit = false;
                loop {
                    let left = pat.len() - p;
                    if at(p) == b'\\' && left >= 2 {
                        p += 1;
                        hit |= at(p) == s[t];
                    } else if at(p) == b']' {
                        break;
                    } else if left == 0 {
                        p -= 1;
                        break;
                    } else if left >= 3 && at(p + 1) == b'-' {
                        let (mut start, mut end) = (signed(at(p)), signed(at(p + 2)));
                        if start > end {
                            std::mem::swap(&mut start, &mut end);
                        }
                        p += 2;
                        hit |= (start..=end).contains(&signed(s[t]));
                    } else {
                        hit |= at(p) == s[t];
                    }
                    p += 1;
                }
                if not {
                    hit = !hit;
                }
                if !hit {
                    return false;
                }
                t += 1;
            }
            _ => {
                if at(p) == b'\\' && pat.len() - p >= 2 {
                    p += 1;
                }
                if at(p) != s[t] {
                    return false;
                }
                t += 1;
            }
        }
        p += 1;
        if t == s.len() {
            while at(p) == b'*' {
                p += 1;
            }
            break;
        }
    }
    p >= pat.len() && t == s.len()
}

/// `string.find(text, pattern)` of Lua 5.1 (lstrlib.c, as in Redis), for
/// whether it finds a match: the matcher ported statement for statement
/// (without captures, `%b`, `%f` and back references, which the translation
/// never writes and which are reported as errors here), counting the
/// single-byte matches it tries and giving up past `limit` of them. A read
/// past the end of the pattern yields the NUL that ends a C string.
fn lua_find(pattern: &[u8], text: &[u8], limit: u64) -> Result<(bool, u64), String> {
    let mut lua = Lua { pat: pattern, src: text, steps: 0, limit };
    let (anchor, start) = if pattern.first() == Some(&b'^') { (true, 1) } else { (false, 0) };
    let mut s = 0;
    loop {
        if lua.do_match(s, start)?.is_some() {
            return Ok((true, lua.steps));
        }
        s += 1;
        if anchor || s > text.len() {
            return Ok((false, lua.steps));
        }
    }
}

struct Lua<'a> {
    pat: &'a [u8],
    src: &'a [u8],
    steps: u64,
    limit: u64,
}

impl Lua<'_> {
    fn at(&self, i: usize) -> u8 {
        self.pat.get(i).copied().unwrap_or(0)
    }

    fn do_match(&mut self, mut s: usize, mut p: usize) -> Result<Option<usize>, String> {
        loop {
            match self.at(p) {
                b'(' | b')' => return Err("captures are not modelled".into()),
                b'%' if matches!(self.at(p + 1), b'b' | b'f') || self.at(p + 1).is_ascii_digit() => {
                    return Err(format!("%{} is not modelled", char::from(self.at(p + 1))))
                }
                0 => return Ok(Some(s)),
                b'$' if self.at(p + 1) == 0 => return Ok((s == self.src.len()).then_some(s)),
                _ => {
                    let ep = self.class_end(p)?;
                    let m = s < self.src.len() && self.single_match(self.src[s], p, ep)?;
                    match self.at(ep) {
                        b'?' => {
                            if m {
                                if let Some(res) = self.do_match(s + 1, ep + 1)? {
                                    return Ok(Some(res));
                                }
                            }
                            p = ep + 1;
                        }
                        b'*' => return self.max_expand(s, p, ep),
                        b'+' => return if m { self.max_expand(s + 1, p, ep) } else { Ok(None) },
                        b'-' => return self.min_expand(s, p, ep),
                        _ => {
                            if !m {
                                return Ok(None);
                            }
                            s += 1;
                            p = ep;
                        }
                    }
                }
            }
        }
    }

    fn class_end(&self, mut p: usize) -> Result<usize, String> {
        let c = self.at(p);
        p += 1;
        match c {
            b'%' => {
                if self.at(p) == 0 {
                    return Err("malformed pattern (ends with '%')".into());
                }
                Ok(p + 1)
            }
            b'[' => {
                if self.at(p) == b'^' {
                    p += 1;
                }
                loop {
                    if self.at(p) == 0 {
                        return Err("malformed pattern (missing ']')".into());
                    }
                    let c = self.at(p);
                    p += 1;
                    if c == b'%' && self.at(p) != 0 {
                        p += 1;
                    }
                    if self.at(p) == b']' {
                        return Ok(p + 1);
                    }
                }
            }
            _ => Ok(p),
        }
    }

    fn single_match(&mut self, c: u8, p: usize, ep: usize) -> Result<bool, String> {
        self.steps += 1;
        if self.steps > self.limit {
            return Err(format!("more than {} steps", self.limit));
        }
        Ok(match self.at(p) {
            b'.' => true,
            b'%' => match_class(c, self.at(p + 1)),
            b'[' => self.match_bracket_class(c, p, ep - 1),
            b => b == c,
        })
    }

    fn match_bracket_class(&self, c: u8, mut p: usize, ec: usize) -> bool {
        let mut sig = true;
        if self.at(p + 1) == b'^' {
            sig = false;
            p += 1;
        }
        loop {
            p += 1;
            if p >= ec {
                return !sig;
            }
            if self.at(p) == b'%' {
                p += 1;
                if match_class(c, self.at(p)) {
                    return sig;
                }
            } else if self.at(p + 1) == b'-' && p + 2 < ec {
                p += 2;
                if self.at(p - 2) <= c && c <= self.at(p) {
                    return sig;
                }
            } else if self.at(p) == c {
                return sig;
            }
        }
    }

    fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> Result<Option<usize>, String> {
        let mut i = 0;
        while s + i < self.src.len() && self.single_match(self.src[s + i], p, ep)? {
            i += 1;
        }
        loop {
            if let Some(res) = self.do_match(s + i, ep + 1)? {
                return Ok(Some(res));
            }
            if i == 0 {
                return Ok(None);
            }
            i -= 1;
        }
    }

    fn min_expand(&mut self, mut s: usize, p: usize, ep: usize) -> Result<Option<usize>, String> {
        loop {
            if let Some(res) = self.do_match(s, ep + 1)? {
                return Ok(Some(res));
            }
            if s < self.src.len() && self.single_match(self.src[s], p, ep)? {
                s += 1;
            } else {
                return Ok(None);
            }
        }
    }
}

/// `match_class` of Lua 5.1 in the C locale.
fn match_class(c: u8, class: u8) -> bool {
    let res = match class.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        b's' => matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r'),
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        b'z' => c == 0,
        _ => return class == c,
    };
    if class.is_ascii_lowercase() {
        res
    } else {
        !res
    }
}

// ---- Names --------------------------------------------------------------------

const NAME_ALPHABET: &[&str] = &[
    "a", "Z", "0", "_", "-", ":", "/", ",", " ", "\t", "\n", "\u{7f}", "\u{85}", "\u{a0}", "\u{2028}", "é", "𝄞", "*",
    "[", "]", "\\", "?", "^", "\u{0}",
];

#[test]
fn fuzz_names() {
    for seed in ["", "a", "*", "**", "\\", "[", "[]", "é", &"a".repeat(65), &"k".repeat(1025), &"*a".repeat(1001)] {
        check_names(seed, false);
        check_names(seed, true);
    }
    fuzz!((Vec<u8>, String, u8, bool)).for_each(|(spelled, raw, repeat, confirm)| {
        let spelled = spell(spelled, NAME_ALPHABET);
        check_names(&spelled, *confirm);
        check_names(raw, *confirm);
        // Long names, around the limits.
        if !spelled.is_empty() {
            let times = (MAX_PATTERN_BYTES + 64) / spelled.len() * usize::from(*repeat) / 255 + 1;
            check_names(&spelled.repeat(times), *confirm);
        }
    });
}

fn check_names(name: &str, confirm: bool) {
    let tenant_ok = (1..=MAX_TENANT_CHARS).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match names::validate_tenant(name) {
        Ok(()) => assert!(tenant_ok, "tenant {name:?} was accepted"),
        Err(e) => assert!(!tenant_ok && e.code == "invalid_tenant", "tenant {name:?}: {e:?}"),
    }
    let key_ok = (1..=MAX_KEY_BYTES).contains(&name.len()) && !name.chars().any(char::is_control);
    match names::validate_key(name) {
        Ok(()) => assert!(key_ok, "key {name:?} was accepted"),
        Err(e) => assert!(!key_ok && e.code == "invalid_key", "key {name:?}: {e:?}"),
    }
    let tag_ok = (1..=MAX_TAG_BYTES).contains(&name.len())
        && !name.chars().any(|c| c == ',' || c.is_whitespace() || c.is_control());
    match names::validate_tag(name) {
        Ok(()) => assert!(tag_ok, "tag {name:?} was accepted"),
        Err(e) => assert!(!tag_ok && e.code == "invalid_tag", "tag {name:?}: {e:?}"),
    }
    match names::validate_pattern(name, confirm) {
        Ok(()) => {
            assert!((1..=MAX_PATTERN_BYTES).contains(&name.len()), "pattern {name:?}: length");
            assert!(!name.chars().any(char::is_control), "pattern {name:?}: control character");
            assert!(glob::check(name).is_ok(), "pattern {name:?}: not well formed");
            assert!(confirm || !glob::matches_everything(name), "pattern {name:?}: needed confirm");
            let runs = name.as_bytes().windows(2).filter(|w| w[1] == b'*' && w[0] != b'*').count()
                + usize::from(name.starts_with('*'));
            assert!(runs <= MAX_PATTERN_STARS || name.contains('\\'), "pattern {name:?}: {runs} runs of stars");
        }
        Err(e) if e.code == "confirm_required" => assert!(!confirm && glob::matches_everything(name), "{name:?}"),
        Err(e) => assert_eq!(e.code, "invalid_pattern", "pattern {name:?}: {e:?}"),
    }
}
