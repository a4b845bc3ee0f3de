//! Which coordinator consumes a slot: the one holding its lease in Redis
//! (`dcc:{ctl}:source:{slot}`, see `shared::schema::source_lease`).
//!
//! The holder renews the lease every [`RENEW_EVERY`]; a coordinator that
//! stops, freezes or loses Redis stops renewing, and another takes the slot
//! once the lease ran out ([`LEASE`]). A holder that cannot renew gives the
//! slot up before its lease can have run out. PostgreSQL refuses a second
//! consumer of a slot anyway; the lease spares the others from hammering it.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use redis::Script;
use tokio_util::sync::CancellationToken;

use shared::store::Store;

/// How long a lease lasts unless renewed.
pub const LEASE: Duration = Duration::from_secs(5);
/// How often the holder renews it.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);

/// ARGV[3] says what to do with the lease for holder ARGV[1]: `take` it if it
/// is free (or ours), `renew` it only if it is still ours (a holder whose
/// lease ran out must not take it back unnoticed), `release` it if ours.
/// Answers 1 when we hold it after.
static LEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local holder = redis.call('GET', KEYS[1])
        if ARGV[3] == 'release' then
            if holder == ARGV[1] then redis.call('DEL', KEYS[1]) end
            return 0
        end
        if holder == ARGV[1] or (holder == false and ARGV[3] == 'take') then
            redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
            return 1
        end
        return 0
        ",
    )
});

async fn call(store: &Store, key: &str, holder: &str, what: &str) -> Result<bool, String> {
    let mut conn = store.get().await.map_err(|e| e.to_string())?;
    let held: i64 = LEASE_SCRIPT
        .key(key)
        .arg(holder)
        .arg(LEASE.as_millis().to_string())
        .arg(what)
        .invoke_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(held == 1)
}

/// A held lease, renewed in the background until dropped or lost.
pub struct Lease {
    /// Cancelled when the lease is lost (or may be): stop consuming.
    pub lost: CancellationToken,
    renewer: tokio::task::JoinHandle<()>,
    store: Store,
    key: String,
    holder: String,
}

impl Lease {
    /// Takes the lease of `slot` for `holder`, if no one else holds it.
    pub async fn acquire(store: &Store, slot: &str, holder: &str) -> Result<Option<Lease>, String> {
        let key = shared::schema::source_lease(slot);
        let taken_at = Instant::now();
        if !call(store, &key, holder, "take").await? {
            return Ok(None);
        }
        let lost = CancellationToken::new();
        let renewer = tokio::spawn(renew(store.clone(), key.clone(), holder.to_string(), lost.clone(), taken_at));
        Ok(Some(Lease { lost, renewer, store: store.clone(), key, holder: holder.to_string() }))
    }

    /// Gives the lease up, so that another coordinator need not wait for it
    /// to run out (if Redis does not answer within a second, it runs out).
    pub async fn release(self) {
        self.renewer.abort();
        let _ = tokio::time::timeout(RENEW_EVERY, call(&self.store, &self.key, &self.holder, "release")).await;
    }
}

/// Renews until the lease is refused, or until it was not renewed for so
/// long that it may have run out (then someone else may hold it).
async fn renew(store: Store, key: String, holder: String, lost: CancellationToken, mut renewed_at: Instant) {
    // Give up with a margin: our clock and Redis's may run at slightly
    // different speeds, and a renewal in flight may not have landed.
    let give_up_after = LEASE - 2 * RENEW_EVERY;
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        let attempt = Instant::now();
        match tokio::time::timeout(RENEW_EVERY, call(&store, &key, &holder, "renew")).await {
            Ok(Ok(true)) => renewed_at = attempt,
            Ok(Ok(false)) => {
                tracing::warn!(%key, "the source's lease is held by another coordinator; stopping");
                lost.cancel();
                return;
            }
            Ok(Err(e)) => tracing::warn!(%key, error = %e, "cannot renew the source's lease"),
            Err(_) => tracing::warn!(%key, "renewing the source's lease timed out"),
        }
        if renewed_at.elapsed() > give_up_after {
            tracing::warn!(%key, "the source's lease could not be renewed in time; stopping");
            lost.cancel();
            return;
        }
    }
}
