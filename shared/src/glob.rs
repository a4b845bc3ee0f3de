//! Glob matching over keys, with the same dialect as Redis's own `MATCH`
//! (`stringmatchlen`): `*`, `?`, `[abc]`, `[a-z]`, `[^a]` and `\` escapes.
//!
//! The coordinator lets Redis match patterns (`ZSCAN ... MATCH`) against L2, and
//! every agent matches the same patterns against its L1 with this module, so the
//! two must agree on every pattern; the tests pin the cases where dialects differ.
//! Matching works on bytes, as Redis does, so it never panics on UTF-8 boundaries.

/// Does `pattern` match all of `text`?
pub fn matches(pattern: &str, text: &str) -> bool {
    match_bytes(pattern.as_bytes(), text.as_bytes())
}

fn match_bytes(mut p: &[u8], mut t: &[u8]) -> bool {
    // Backtracking point for the last `*`: (pattern after the star, text position).
    let mut star: Option<(&[u8], &[u8])> = None;
    loop {
        if let Some((&pc, prest)) = p.split_first() {
            match pc {
                b'*' => {
                    // Collapse runs of stars; a trailing star matches the rest.
                    let mut rest = prest;
                    while let Some((b'*', r)) = rest.split_first() {
                        rest = r;
                    }
                    if rest.is_empty() {
                        return true;
                    }
                    star = Some((rest, t));
                    p = rest;
                    continue;
                }
                _ if !t.is_empty() => {
                    if let Some((consumed, ok)) = match_one(p, t[0]) {
                        if ok {
                            p = &p[consumed..];
                            t = &t[1..];
                            continue;
                        }
                    }
                }
                _ => {}
            }
        } else if t.is_empty() {
            return true;
        }
        // Mismatch: let the last star swallow one more byte, or fail.
        match star {
            Some((sp, st)) if !st.is_empty() => {
                let st = &st[1..];
                star = Some((sp, st));
                p = sp;
                t = st;
            }
            _ => return false,
        }
    }
}

/// Matches one non-star pattern element at the start of `p` against byte `c`.
/// Returns how many pattern bytes the element used and whether it matched.
fn match_one(p: &[u8], c: u8) -> Option<(usize, bool)> {
    match p[0] {
        b'?' => Some((1, true)),
        b'\\' => p.get(1).map(|&e| (2, e == c)),
        b'[' => {
            let mut i = 1;
            let negate = p.get(1) == Some(&b'^');
            if negate {
                i += 1;
            }
            let mut hit = false;
            loop {
                let b = *p.get(i)?;
                if b == b']' {
                    break;
                }
                if b == b'\\' {
                    let e = *p.get(i + 1)?;
                    hit |= e == c;
                    i += 2;
                } else if p.get(i + 1) == Some(&b'-') && p.get(i + 2).is_some_and(|&e| e != b']') {
                    let (lo, hi) = (b.min(p[i + 2]), b.max(p[i + 2]));
                    hit |= (lo..=hi).contains(&c);
                    i += 3;
                } else {
                    hit |= b == c;
                    i += 1;
                }
            }
            Some((i + 1, hit != negate))
        }
        b => Some((1, b == c)),
    }
}

/// Checks that a pattern is well formed: every `[` is closed and no `\` is left
/// dangling at the end.
pub fn check(pattern: &str) -> Result<(), &'static str> {
    let p = pattern.as_bytes();
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'\\' if i + 1 >= p.len() => return Err("it ends with a lone '\\'"),
            b'\\' => i += 2,
            b'[' => {
                let mut j = i + 1;
                if p.get(j) == Some(&b'^') {
                    j += 1;
                }
                loop {
                    match p.get(j) {
                        None => return Err("a '[' is never closed"),
                        Some(b']') => break,
                        Some(b'\\') => j += 2,
                        Some(_) => j += 1,
                    }
                }
                i = j + 1;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// Translates a (well-formed, see [`check`]) glob into an anchored Lua
/// pattern with the same meaning, so that a Redis script can match keys
/// against recently invalidated patterns with `string.find`.
pub fn to_lua_pattern(pattern: &str) -> String {
    // Lua's magic characters; any other byte stands for itself.
    fn literal(out: &mut Vec<u8>, b: u8) {
        if b"^$()%.[]*+-?".contains(&b) {
            out.push(b'%');
        }
        out.push(b);
    }
    let p = pattern.as_bytes();
    let mut out = vec![b'^'];
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'*' => out.extend_from_slice(b".*"),
            b'?' => out.push(b'.'),
            b'\\' if i + 1 < p.len() => {
                i += 1;
                literal(&mut out, p[i]);
            }
            b'[' => {
                out.push(b'[');
                i += 1;
                if p.get(i) == Some(&b'^') {
                    out.push(b'^');
                    i += 1;
                }
                while i < p.len() && p[i] != b']' {
                    if p[i] == b'\\' && i + 1 < p.len() {
                        literal(&mut out, p[i + 1]);
                        i += 2;
                    } else if p.get(i + 1) == Some(&b'-') && p.get(i + 2).is_some_and(|&e| e != b']') {
                        let (lo, hi) = (p[i].min(p[i + 2]), p[i].max(p[i + 2]));
                        literal(&mut out, lo);
                        out.push(b'-');
                        literal(&mut out, hi);
                        i += 3;
                    } else {
                        literal(&mut out, p[i]);
                        i += 1;
                    }
                }
                out.push(b']');
            }
            b => literal(&mut out, b),
        }
        i += 1;
    }
    out.push(b'$');
    String::from_utf8_lossy(&out).into_owned()
}

/// Is this pattern only stars, so that it covers a whole tenant?
pub fn matches_everything(pattern: &str) -> bool {
    !pattern.is_empty() && pattern.bytes().all(|b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stars_and_questions() {
        assert!(matches("*", ""));
        assert!(matches("*", "anything/at:all"));
        assert!(matches("suppliers:list:*", "suppliers:list:page=1"));
        assert!(!matches("suppliers:list:*", "suppliers:lis"));
        assert!(matches("supplier:*:orders", "supplier:42:orders"));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(!matches("a*b*c", "aXXbYY"));
        assert!(matches("a?c", "abc"));
        assert!(!matches("a?c", "ac"));
        assert!(matches("**a", "bba"));
        assert!(!matches("", "a"));
        assert!(matches("", ""));
        // `/` is an ordinary character, unlike in path globs.
        assert!(matches("a*z", "a/b/z"));
    }

    #[test]
    fn classes() {
        assert!(matches("k[abc]", "kb"));
        assert!(!matches("k[abc]", "kd"));
        assert!(matches("k[a-c]x", "kbx"));
        assert!(matches("k[c-a]x", "kbx"));
        assert!(!matches("k[a-c]x", "kdx"));
        assert!(matches("k[^a]", "kb"));
        assert!(!matches("k[^a]", "ka"));
        assert!(matches("k[\\]]", "k]"));
        assert!(matches("k[a-]", "k-"));
    }

    #[test]
    fn escapes() {
        assert!(matches("a\\*", "a*"));
        assert!(!matches("a\\*", "ab"));
        assert!(matches("a\\?b", "a?b"));
        assert!(matches("\\[x]", "[x]"));
    }

    #[test]
    fn multibyte_text() {
        assert!(matches("caf?", "cafe"));
        assert!(matches("caf*", "café"));
        assert!(matches("*é", "café"));
    }

    #[test]
    fn lua_translation() {
        assert_eq!(to_lua_pattern("suppliers:list:*"), "^suppliers:list:.*$");
        assert_eq!(to_lua_pattern("a?c"), "^a.c$");
        assert_eq!(to_lua_pattern("k[a-c]x"), "^k[a-c]x$");
        assert_eq!(to_lua_pattern("k[^a]"), "^k[^a]$");
        assert_eq!(to_lua_pattern("a\\*b"), "^a%*b$");
        assert_eq!(to_lua_pattern("100%.x(y)"), "^100%%%.x%(y%)$");
        assert_eq!(to_lua_pattern("k[c-a]"), "^k[a-c]$");
    }

    #[test]
    fn validity() {
        assert!(check("a[bc]").is_ok());
        assert!(check("a\\[").is_ok());
        assert!(check("a[bc").is_err());
        assert!(check("a\\").is_err());
        assert!(check("[^]").is_ok());
        assert!(matches_everything("***"));
        assert!(!matches_everything("a*"));
    }
}
