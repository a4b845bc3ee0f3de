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
/// dangling at the end; and that Redis reads it as [`matches`] does. Two
/// class forms are refused because Redis's `stringmatchlen` reads them
/// otherwise: a range that ends at the `]` closing its class (`[a-]`: Redis
/// takes it as the range `a`..`]` and reads on past the `]`), and a range with
/// a non-ASCII end (Redis compares such bytes as C `char`s, signed on some
/// platforms and unsigned on others).
pub fn check(pattern: &str) -> Result<(), &'static str> {
    let p = pattern.as_bytes();
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'\\' if i + 1 >= p.len() => return Err("it ends with a lone '\\'"),
            b'\\' => i += 2,
            b'[' => i += class(&p[i..])?.len,
            _ => i += 1,
        }
    }
    Ok(())
}

/// One member of a `[...]` class: a byte, or an inclusive range of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Member {
    Byte(u8),
    Range(u8, u8),
}

/// A `[...]` class, as [`match_one`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Class {
    negate: bool,
    members: Vec<Member>,
    /// Pattern bytes from the `[` through the `]`.
    len: usize,
}

/// Reads the class that starts (with its `[`) at `p[0]`, member by member
/// exactly as [`match_one`] does; refuses what [`check`] refuses.
fn class(p: &[u8]) -> Result<Class, &'static str> {
    const UNCLOSED: &str = "a '[' is never closed";
    let negate = p.get(1) == Some(&b'^');
    let mut i = if negate { 2 } else { 1 };
    let mut members = Vec::new();
    loop {
        let b = *p.get(i).ok_or(UNCLOSED)?;
        if b == b']' {
            return Ok(Class { negate, members, len: i + 1 });
        }
        if b == b'\\' {
            members.push(Member::Byte(*p.get(i + 1).ok_or(UNCLOSED)?));
            i += 2;
        } else if let (Some(b'-'), Some(&e)) = (p.get(i + 1), p.get(i + 2)) {
            if e == b']' {
                return Err("a range ends at the ']' of its class, as in '[a-]' (Redis reads a range up to ']'); \
                            write the '-' as '\\-'");
            }
            if !b.is_ascii() || !e.is_ascii() {
                return Err("a range in '[...]' has a non-ASCII end (Redis compares such bytes differently)");
            }
            members.push(Member::Range(b.min(e), b.max(e)));
            i += 3;
        } else {
            members.push(Member::Byte(b));
            i += 1;
        }
    }
}

/// One element of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Element {
    /// A run of `*`.
    Star,
    /// `?`.
    Any,
    /// A byte, plain or escaped.
    Byte(u8),
    /// `[...]`.
    Class(Class),
}

/// A well-formed (see [`check`]) pattern as its elements; `None` otherwise.
fn elements(p: &[u8]) -> Option<Vec<Element>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < p.len() {
        let (element, used) = match p[i] {
            b'*' if out.last() == Some(&Element::Star) => {
                i += 1;
                continue;
            }
            b'*' => (Element::Star, 1),
            b'?' => (Element::Any, 1),
            b'\\' => (Element::Byte(*p.get(i + 1)?), 2),
            b'[' => {
                let class = class(&p[i..]).ok()?;
                let len = class.len;
                (Element::Class(class), len)
            }
            b => (Element::Byte(b), 1),
        };
        out.push(element);
        i += used;
    }
    Some(out)
}

/// Translates a (well-formed, see [`check`]) glob into an anchored Lua
/// pattern, so that a Redis script can match keys against recently
/// invalidated patterns with `string.find`: a fill is refused when its key
/// matches. Lua matches `.*` by backtracking, which takes time of the order of
/// the key's length to the power of the number of `.*` followed by something
/// (minutes for four on a 1 KiB key, with Redis blocked meanwhile). So the
/// translation is exact for globs with at most one `*` followed by something
/// (`a*b`, `*:x:*`); for a glob with more (`a*b*c`) it keeps what comes before
/// the first `*` and after the last one (`^a.*c$`): a superset of the glob's
/// keys, whose only cost is refusing a fill the glob would have let through.
/// An ill-formed pattern gives a Lua pattern that matches every key.
pub fn to_lua_pattern(pattern: &str) -> String {
    let Some(mut elements) = elements(pattern.as_bytes()) else {
        return "^.*$".to_string();
    };
    let inner_stars = elements.windows(2).filter(|w| w[0] == Element::Star).count();
    let first = elements.iter().position(|e| *e == Element::Star);
    let last = elements.iter().rposition(|e| *e == Element::Star);
    if let (true, Some(first), Some(last)) = (inner_stars > 1, first, last) {
        let suffix = elements.split_off(last + 1);
        elements.truncate(first);
        elements.push(Element::Star);
        elements.extend(suffix);
    }
    let mut out = vec![b'^'];
    for element in &elements {
        match element {
            Element::Star => out.extend_from_slice(b".*"),
            Element::Any => out.push(b'.'),
            Element::Byte(b) => lua_literal(&mut out, *b),
            Element::Class(c) => lua_set(&mut out, c),
        }
    }
    out.push(b'$');
    String::from_utf8_lossy(&out).into_owned()
}

/// A byte that stands for itself in a Lua pattern.
fn lua_literal(out: &mut Vec<u8>, b: u8) {
    match b {
        // Lua 5.1 ends a pattern at NUL; `%z` stands for it.
        0 => out.extend_from_slice(b"%z"),
        b if b"^$()%.[]*+-?".contains(&b) => out.extend_from_slice(&[b'%', b]),
        b => out.push(b),
    }
}

/// A class as a Lua set. In a set, Lua reads `%` as an escape, `]` as its
/// end, `^` first as negation and `a-b` as a range whose ends must be plain
/// bytes: those bytes are always written escaped, one by one, and a range
/// that covers them is split around them. An empty class matches nothing,
/// and Lua has no empty set (`[]` does not parse): it becomes `[^%z%Z]`.
fn lua_set(out: &mut Vec<u8>, class: &Class) {
    const SPECIAL: &[u8] = b"%]^-";
    let single = |out: &mut Vec<u8>, b: u8| match b {
        0 => out.extend_from_slice(b"%z"),
        b if SPECIAL.contains(&b) => out.extend_from_slice(&[b'%', b]),
        b => out.push(b),
    };
    if class.members.is_empty() {
        out.extend_from_slice(if class.negate { b"." } else { b"[^%z%Z]" });
        return;
    }
    out.push(b'[');
    if class.negate {
        out.push(b'^');
    }
    for member in &class.members {
        match *member {
            Member::Byte(b) => single(out, b),
            Member::Range(lo, hi) => {
                // Maximal runs of plain bytes as ranges, special bytes alone.
                let flush = |out: &mut Vec<u8>, run: Option<(u8, u8)>| match run {
                    Some((a, b)) if a == b => single(out, a),
                    Some((a, b)) => out.extend_from_slice(&[a, b'-', b]),
                    None => {}
                };
                let mut run = None;
                for b in lo..=hi {
                    if b == 0 || SPECIAL.contains(&b) {
                        flush(out, run.take());
                        single(out, b);
                    } else {
                        run = Some((run.map_or(b, |(a, _)| a), b));
                    }
                }
                flush(out, run);
            }
        }
    }
    out.push(b']');
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

    // Found by the fuzz target `fuzz_glob` (shared/tests/fuzz.rs): Redis reads
    // `[a-]` as the range `a`..`]` and goes on reading the class past the `]`
    // (`KEYS k[a-]` matches `k]` and `k^`, not `k-`), so an agent's L1 and
    // Redis's L2 disagreed on which keys such a pattern covers.
    #[test]
    fn a_range_ending_at_the_closing_bracket_is_refused() {
        assert!(check("k[a-]").is_err());
        assert!(check("k[a-]x]").is_err());
        assert!(check("k[--]").is_err());
        // What to write instead, and the dashes that are not ranges.
        assert!(check("k[a\\-]").is_ok());
        assert!(matches("k[a\\-]", "k-"));
        assert!(check("k[-a]").is_ok());
        assert!(check("k[a--]").is_ok());
        assert!(check("k[-]").is_ok());
    }

    // Found by `fuzz_glob`: Redis compares range ends as C `char`s, signed on
    // x86-64, so `[\xa9-z]` covers bytes 0x00-0x7a and 0xa9-0xff there, and
    // 0x7a-0xa9 here.
    #[test]
    fn a_range_with_a_non_ascii_end_is_refused() {
        assert!(check("k[é-z]").is_err());
        assert!(check("k[a-é]").is_err());
        assert!(check("k[é]").is_ok());
        assert!(check("k[\\é-z]").is_err());
    }

    // Found while writing the Redis reference of `fuzz_glob` (now one of
    // its seeds): `check` read an escape where the matcher reads the end of a
    // range (`[a-\\]`: the range `a`..`\`, then an escaped `]`, then no `]`),
    // so it let through a class that the matcher never closes and Redis
    // closes at the end of the pattern.
    #[test]
    fn check_reads_classes_as_the_matcher_does() {
        assert!(check("[a-\\\\]").is_err());
        assert!(check("[a-\\]]").is_ok());
        assert!(matches("[a-\\]]", "^]"));
        assert!(check("[a-\\]").is_ok());
        assert!(matches("[a-\\]", "\\"));
    }

    // Found by `fuzz_glob`: Lua has no empty set, so `[]` (matches nothing)
    // and `[^]` (any byte) made `string.find` raise "malformed pattern" in
    // the PUT script, failing every fill of the tenant while the marker lived.
    #[test]
    fn empty_classes_translate_to_lua() {
        assert_eq!(to_lua_pattern("k[]"), "^k[^%z%Z]$");
        assert_eq!(to_lua_pattern("k[^]"), "^k.$");
        assert_eq!(to_lua_pattern("k[]]"), "^k[^%z%Z]%]$");
    }

    // Found while writing the Lua reference of `fuzz_glob` (now among its
    // seeds): a range with an end that Lua reads as magic was written with
    // that end escaped (`[$-&]` became `[%$-&]`), and Lua never reads an
    // escaped byte as the end of a range: the set was `$`, `-` and `&`
    // instead of `$`, `%` and `&`.
    #[test]
    fn ranges_over_lua_magic_bytes_are_split() {
        assert_eq!(to_lua_pattern("[$-&]"), "^[$%%&]$");
        assert_eq!(to_lua_pattern("[!-~]"), "^[!-$%%&-,%-.-\\%]%^_-~]$");
        assert_eq!(to_lua_pattern("[\\]x]"), "^[%]x]$");
        assert_eq!(to_lua_pattern("[\\^]"), "^[%^]$");
    }

    // Found by `fuzz_glob` (its Lua reference counts steps): Lua matches
    // `.*` by backtracking, in time of the order of len^k for k `.*` followed
    // by something. Against a 1 KiB key of `a`s, in Redis 7.0's Lua,
    // `*a*a*b` took 0.6 s and `*a*a*a*b` 173 s, with Redis blocked. Past one
    // such star, the translation keeps only what is before the first star and
    // after the last one: a superset, so at worst a fill is refused.
    #[test]
    fn many_stars_translate_to_a_linear_superset() {
        assert_eq!(to_lua_pattern("*a*a*a*b"), "^.*b$");
        assert_eq!(to_lua_pattern("x:*:y:*"), "^x:.*:y:.*$");
        assert_eq!(to_lua_pattern("x*y*z"), "^x.*z$");
        assert_eq!(to_lua_pattern("x*y*"), "^x.*y.*$");
        assert_eq!(to_lua_pattern("x*y**z*"), "^x.*$");
    }
}
