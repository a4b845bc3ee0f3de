//! Miss leases against herds (contract v2, section 4), on the agent's side.
//!
//! When a key is missing from L2, the first miss takes the key's lease in
//! Redis with its fill token ([`shared::l2::take_lease`]) and its caller gets
//! the 404 and loads the value. Every other miss of the key, on any agent,
//! waits here instead of loading too: until the lease ends, at most
//! `lease_wait_ms`. It then reads L2 again, and is answered with the value
//! the holder stored, or with a 404 and a token of its own.
//!
//! A lease ends, and its waiters are woken, by:
//! - the key being written: the `PUT` script publishes a fill notice on the
//!   partition's fills channel when some agent waits, which the subscriber
//!   hands to [`Waiters::wake_key`]; a write through this agent wakes its own
//!   waiters directly;
//! - the holder's fill being refused (an invalidation overtook its token):
//!   the same notice;
//! - an invalidation of the key's tenant applied here: every waiter of the
//!   tenant reads again ([`Waiters::wake_tenant`]), and a lease whose token an
//!   invalidation of the key or a pattern overtook is taken over;
//! - `lease_ms` passing without a fill (the holder died): the next miss takes it.
//!
//! Nothing here weakens the staleness bound: a waiter is answered only from
//! an L2 read made after it woke, under the same rules as any other read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The waiters of this agent, by `(tenant, key)`.
#[derive(Default)]
pub struct Waiters {
    keys: Mutex<HashMap<(String, String), Arc<Notify>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Waiters {
    /// The signal of `tenant`/`key`, registered until [`Waiters::release`].
    pub fn register(&self, tenant: &str, key: &str) -> Arc<Notify> {
        lock(&self.keys).entry((tenant.to_string(), key.to_string())).or_default().clone()
    }

    /// Done waiting on `signal`: forgets the key once nobody else holds it.
    pub fn release(&self, tenant: &str, key: &str, signal: Arc<Notify>) {
        let mut keys = lock(&self.keys);
        let id = (tenant.to_string(), key.to_string());
        drop(signal);
        if keys.get(&id).is_some_and(|s| Arc::strong_count(s) == 1) {
            keys.remove(&id);
        }
    }

    /// The key was written, or its lease ended: its waiters read again.
    pub fn wake_key(&self, tenant: &str, key: &str) {
        let keys = lock(&self.keys);
        if keys.is_empty() {
            return;
        }
        if let Some(signal) = keys.get(&(tenant.to_string(), key.to_string())) {
            signal.notify_waiters();
        }
    }

    /// An invalidation of `tenant` was applied: every waiter of the tenant
    /// reads again (the lease it waits on may be over).
    pub fn wake_tenant(&self, tenant: &str) {
        let keys = lock(&self.keys);
        for ((t, _), signal) in keys.iter() {
            if t == tenant {
                signal.notify_waiters();
            }
        }
    }

    /// Fill notices may have been missed (the subscription was renewed):
    /// every waiter reads again.
    pub fn wake_all(&self) {
        for signal in lock(&self.keys).values() {
            signal.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_waiter_wakes_for_its_key_or_its_tenant_and_is_forgotten_after() {
        let waiters = Waiters::default();
        let signal = waiters.register("acme", "k");
        let woken = async |signal: &Arc<Notify>, wake: &dyn Fn()| {
            let notified = signal.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            wake();
            tokio::time::timeout(Duration::from_secs(5), notified).await.is_ok()
        };
        assert!(woken(&signal, &|| waiters.wake_key("acme", "k")).await);
        assert!(woken(&signal, &|| waiters.wake_tenant("acme")).await);
        assert!(woken(&signal, &|| waiters.wake_all()).await);
        let other = async {
            let notified = signal.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            waiters.wake_key("acme", "other");
            waiters.wake_tenant("globex");
            tokio::time::timeout(Duration::from_millis(50), notified).await.is_ok()
        };
        assert!(!other.await, "another key or tenant does not wake it");
        let second = waiters.register("acme", "k");
        assert!(Arc::ptr_eq(&signal, &second), "one signal per key");
        waiters.release("acme", "k", second);
        assert_eq!(lock(&waiters.keys).len(), 1, "still held by the first waiter");
        waiters.release("acme", "k", signal);
        assert!(lock(&waiters.keys).is_empty());
    }
}
