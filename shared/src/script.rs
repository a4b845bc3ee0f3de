//! The Lua scripts' common ground: every script is a `.lua` file next to the
//! Rust code that calls it, loaded with `include_str!` and prefixed with
//! `lua/prelude.lua` (Redis time in milliseconds, epoch creation), so that
//! those two are written once.

use redis::Script;

/// The functions every script may call.
const PRELUDE: &str = include_str!("lua/prelude.lua");

/// A script from its body, with the prelude in front.
pub fn with_prelude(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

/// Creates a partition's (or the registry's) epoch when Redis has none.
pub static ENSURE_EPOCH: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| with_prelude(include_str!("lua/ensure_epoch.lua")));
