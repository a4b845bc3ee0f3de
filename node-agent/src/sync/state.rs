//! Where this agent stands with each partition's log, and when L1 may answer.
//!
//! L1 may answer for a tenant only while the agent holds a recent *proof* of
//! being in sync with the tenant's partition: a moment at which it was
//! subscribed and had applied everything that partition's log held. Proofs
//! come from the heartbeat ([`SyncState::offer_proof`]): at once when L1 has
//! applied the head the heartbeat read, or as soon as it has; a proof older
//! than the staleness bound makes the partition's L1 entries untrusted. One
//! partition failing (its shard down, its messages lost) therefore disables
//! L1 for its tenants only.
//!
//! Every transition is one method here; the fields are private. Whether a
//! message is applied, ignored, replayed for, or ends the partition's
//! history is decided by the pure [`next_step`], tested below.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shared::protocol::Position;

/// The moment proofs of sync are counted from (the first use in this process).
static CLOCK_ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

/// How many recent messages' nonces each partition remembers, to recognise a
/// message of another history (a fork) among those it has applied.
const RECENT: usize = 256;

/// What the agent applied of one partition's log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The epoch it follows (empty until it first read the partition's head).
    pub epoch: String,
    /// The highest seq applied (or covered by a flush).
    pub applied: u64,
    /// `(seq, nonce)` of recent messages applied, oldest first; its last item
    /// is `applied` when that nonce is known.
    recent: VecDeque<(u64, String)>,
}

impl Cursor {
    /// The nonce of message `seq`, if remembered (empty if unknown).
    pub fn nonce_of(&self, seq: u64) -> Option<&str> {
        self.recent.iter().rev().find(|(s, _)| *s == seq).map(|(_, n)| n.as_str())
    }

    /// Where the cursor stands, as a position of `partition`.
    pub fn position(&self, partition: u16) -> Position {
        let nonce = self.nonce_of(self.applied).unwrap_or_default().to_string();
        Position { partition, epoch: self.epoch.clone(), seq: self.applied, nonce }
    }

    /// Where it stands, without the recent nonces: what an L2 read checks.
    pub fn tip(&self) -> Tip {
        Tip {
            epoch: self.epoch.clone(),
            applied: self.applied,
            nonce: self.nonce_of(self.applied).filter(|n| !n.is_empty()).map(str::to_string),
        }
    }

    fn remember(&mut self, seq: u64, nonce: &str) {
        self.recent.retain(|(s, _)| *s < seq);
        self.recent.push_back((seq, nonce.to_string()));
        while self.recent.len() > RECENT {
            self.recent.pop_front();
        }
    }
}

/// The end of a [`Cursor`]: its epoch, the highest seq applied and that
/// message's nonce, if known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tip {
    /// See [`Cursor::epoch`].
    pub epoch: String,
    /// See [`Cursor::applied`].
    pub applied: u64,
    /// The nonce of message `applied`.
    pub nonce: Option<String>,
}

/// What to do with a message, given the cursor of its partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The next one: apply it.
    Apply,
    /// Applied already: nothing to do.
    Ignore,
    /// Messages `from..=to` were missed: replay them first, then apply it.
    Replay {
        /// First missed seq.
        from: u64,
        /// Last missed seq (the message's seq minus one).
        to: u64,
    },
    /// Another epoch: the partition's data was lost or its log forked; flush
    /// the partition, follow the new epoch, and apply it.
    NewEpoch,
    /// The same epoch, but not the history applied (a failover to a replica
    /// that lacked the last messages): the partition must move to a new epoch.
    Fork,
}

/// Decides what a message means for a cursor: the log-matching rule of Raft,
/// with the message's `nonce` and `prev` (the nonce before it).
pub fn next_step(cursor: &Cursor, epoch: &str, seq: u64, nonce: &str, prev: &str) -> Step {
    let differs =
        |known: Option<&str>, seen: &str| known.is_some_and(|k| !k.is_empty() && !seen.is_empty() && k != seen);
    if cursor.epoch.is_empty() || epoch != cursor.epoch {
        Step::NewEpoch
    } else if seq <= cursor.applied {
        if differs(cursor.nonce_of(seq), nonce) {
            Step::Fork
        } else {
            Step::Ignore
        }
    } else if seq == cursor.applied + 1 {
        if differs(cursor.nonce_of(cursor.applied), prev) {
            Step::Fork
        } else {
            Step::Apply
        }
    } else {
        Step::Replay { from: cursor.applied + 1, to: seq - 1 }
    }
}

/// Whether a log's head continues what a cursor applied: `None` when it
/// does, else why not.
pub fn head_disagrees(cursor: &Cursor, epoch: &str, seq: u64, nonce: &str) -> Option<&'static str> {
    if epoch != cursor.epoch {
        Some("a new epoch")
    } else if seq < cursor.applied {
        Some("the log is behind what was applied")
    } else if seq == cursor.applied
        && cursor.nonce_of(seq).is_some_and(|k| !k.is_empty() && !nonce.is_empty() && k != nonce)
    {
        Some("the log's last message is not the one applied")
    } else {
        None
    }
}

/// Whether the node an L2 read went to carries the history this agent
/// applied: `None` when it does (or cannot tell: another epoch, whose entries
/// are stamped as such, or a message its log no longer holds), else why not.
/// A node behind what was applied, or with another message at the applied
/// seq, is a replica promoted without the last invalidations (a failover, or
/// the old primary still answering): an entry read there may be one that an
/// answered invalidation deleted, so it is not served until the partition
/// has caught up with that node (and found the fork).
pub fn node_disagrees(tip: &Tip, epoch: &str, seq: u64, nonce_at_applied: Option<&str>) -> Option<&'static str> {
    if tip.epoch.is_empty() || epoch != tip.epoch {
        None
    } else if seq < tip.applied {
        Some("the node's log is behind what this agent applied")
    } else if nonce_at_applied.zip(tip.nonce.as_deref()).is_some_and(|(n, k)| !n.is_empty() && k != n) {
        Some("the node's log holds another message where this agent applied one")
    } else {
        None
    }
}

/// A heartbeat that found the head ahead of L1 by messages still on their
/// way: applying up to `head` proves sync as of `sent_at`.
#[derive(Debug, Clone, Copy)]
struct PendingProof {
    sent_at: Instant,
    head: u64,
    generation: u64,
}

/// One partition's state.
#[derive(Debug, Default)]
struct PartitionSync {
    /// When the agent last proved it was in sync: nanoseconds after
    /// [`CLOCK_ORIGIN`], 0 for never. An atomic, because every read checks it.
    proven_at: AtomicU64,
    /// What it applied.
    cursor: Mutex<Cursor>,
    /// See [`PendingProof`].
    pending: Mutex<Option<PendingProof>>,
    /// The subscriber should catch up with this partition's head.
    catch_up: AtomicBool,
}

/// The agent's sync state: one [`PartitionSync`] per partition, and the
/// subscription they all depend on.
#[derive(Debug)]
pub struct SyncState {
    partitions: Box<[PartitionSync]>,
    /// The subscription is live.
    subscribed: AtomicBool,
    /// Counts subscriptions made and lost, so a proof can tell that the
    /// subscription it relied on lasted throughout.
    generation: AtomicU64,
    /// The last heartbeat reached Redis.
    redis_ok: AtomicBool,
    /// Why it did not, when it did not ([`shared::store::Outage::code`]).
    outage: std::sync::atomic::AtomicU8,
    /// The staleness bound in force: the configured one, lowered below the
    /// coordinators' `node_dead_after_ms` when needed.
    bound_ms: AtomicU64,
    /// Wakes the acknowledger when a cursor moves.
    pub(crate) applied: tokio::sync::Notify,
    /// A message someone waits for (`wait=all`) was applied, or a cursor
    /// jumped: the acknowledger's next write publishes (see [`Self::want_ack`]).
    ack_wanted: AtomicBool,
    /// Asks the heartbeat to report now.
    pub(crate) report_now: tokio::sync::Notify,
    /// Asks the subscriber to catch up with the partitions marked.
    pub(crate) catch_up_now: tokio::sync::Notify,
}

/// Locks a std mutex, recovering from poisoning (the data is a plain value).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SyncState {
    /// A state for `partitions` partitions, nothing proven, with a staleness bound.
    pub fn new(partitions: u16, bound_ms: u64) -> SyncState {
        LazyLock::force(&CLOCK_ORIGIN);
        SyncState {
            partitions: (0..partitions).map(|_| PartitionSync::default()).collect(),
            subscribed: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            redis_ok: AtomicBool::new(false),
            outage: std::sync::atomic::AtomicU8::new(0),
            bound_ms: AtomicU64::new(bound_ms),
            applied: tokio::sync::Notify::new(),
            ack_wanted: AtomicBool::new(false),
            report_now: tokio::sync::Notify::new(),
            catch_up_now: tokio::sync::Notify::new(),
        }
    }

    fn partition(&self, p: u16) -> &PartitionSync {
        &self.partitions[usize::from(p).min(self.partitions.len() - 1)]
    }

    /// How many partitions.
    pub fn count(&self) -> u16 {
        self.partitions.len() as u16
    }

    /// Whether L1 may answer for partition `p`: a proof of sync younger than
    /// the bound, on a subscription still alive. Once the subscription is
    /// known lost, messages may be missed from that moment on, so no earlier
    /// proof counts any more (a new one needs the new subscription).
    pub fn in_sync(&self, p: u16) -> bool {
        self.in_sync_at(p, Instant::now())
    }

    /// [`in_sync`](Self::in_sync) as of `now`, a clock reading the caller made.
    pub fn in_sync_at(&self, p: u16, now: Instant) -> bool {
        if !self.subscribed.load(Ordering::Acquire) {
            return false;
        }
        let proven = self.partition(p).proven_at.load(Ordering::Acquire);
        if proven == 0 {
            return false;
        }
        let age = now.saturating_duration_since(*CLOCK_ORIGIN).saturating_sub(Duration::from_nanos(proven - 1));
        age < Duration::from_millis(self.bound_ms.load(Ordering::Acquire))
    }

    /// How long ago partition `p` was last proven in sync, as of `now`
    /// (whether or not the proof still counts); `None` if it never was.
    pub fn proof_age(&self, p: u16, now: Instant) -> Option<Duration> {
        let proven = self.partition(p).proven_at.load(Ordering::Acquire);
        if proven == 0 {
            return None;
        }
        Some(now.saturating_duration_since(*CLOCK_ORIGIN).saturating_sub(Duration::from_nanos(proven - 1)))
    }

    /// Partitions L1 cannot answer for now.
    pub fn unsynced(&self) -> Vec<u16> {
        (0..self.count()).filter(|p| !self.in_sync(*p)).collect()
    }

    /// Records a proof of sync of partition `p` made at `at` (keeps the newest).
    fn prove(&self, p: u16, at: Instant) {
        let Some(since) = at.checked_duration_since(*CLOCK_ORIGIN) else {
            // Older than the origin (forced when the state is built): no proof.
            return;
        };
        // +1 keeps 0 for "never"; u64 nanoseconds last 584 years.
        let nanos = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX - 1) + 1;
        self.partition(p).proven_at.fetch_max(nanos, Ordering::AcqRel);
    }

    /// What partition `p` has applied.
    pub fn cursor(&self, p: u16) -> Cursor {
        lock(&self.partition(p).cursor).clone()
    }

    /// Partition `p`'s tip (see [`Cursor::tip`]): cheap, for every L2 read.
    pub fn tip(&self, p: u16) -> Tip {
        lock(&self.partition(p).cursor).tip()
    }

    /// Every partition's cursor.
    pub fn cursors(&self) -> Vec<Cursor> {
        (0..self.count()).map(|p| self.cursor(p)).collect()
    }

    /// Every partition's applied position (see [`Cursor::position`]), without
    /// copying the recent nonces: what the acknowledger sends after each apply.
    pub fn positions(&self) -> Vec<Position> {
        (0..self.count()).map(|p| lock(&self.partition(p).cursor).position(p)).collect()
    }

    /// Decides what a message of partition `p` means (see [`next_step`]).
    pub fn next_step(&self, p: u16, epoch: &str, seq: u64, nonce: &str, prev: &str) -> Step {
        next_step(&lock(&self.partition(p).cursor), epoch, seq, nonce, prev)
    }

    /// L1 holds nothing of partition `p` from before this moment (first
    /// contact, or a flush): it is in sync with `epoch` up to `seq`.
    pub fn adopt(&self, p: u16, epoch: &str, seq: u64, nonce: &str) {
        let part = self.partition(p);
        {
            let mut cursor = lock(&part.cursor);
            *cursor = Cursor { epoch: epoch.to_string(), applied: seq, recent: VecDeque::new() };
            cursor.remember(seq, nonce);
        }
        // Rare (first contact, a flush): a barrier may be waiting on it.
        self.want_ack();
        self.moved(p, seq);
    }

    /// Message `seq` (with `nonce`) of partition `p` was applied to L1.
    pub fn applied(&self, p: u16, seq: u64, nonce: &str) {
        let part = self.partition(p);
        {
            let mut cursor = lock(&part.cursor);
            if seq <= cursor.applied {
                return;
            }
            cursor.applied = seq;
            cursor.remember(seq, nonce);
        }
        self.moved(p, seq);
    }

    /// Asks the acknowledger to publish its next acknowledgement, not only
    /// record it: a coordinator holding a `wait=all` request then hears of it
    /// within a round trip instead of at its next read of the stored ones.
    pub fn want_ack(&self) {
        self.ack_wanted.store(true, Ordering::Release);
    }

    /// Whether someone waits for the next acknowledgement (it is to be published).
    pub fn ack_wanted(&self) -> bool {
        self.ack_wanted.load(Ordering::Acquire)
    }

    /// Whether the next acknowledgement is to be published (and clears it).
    pub fn take_ack_wanted(&self) -> bool {
        self.ack_wanted.swap(false, Ordering::AcqRel)
    }

    /// A cursor moved: wake the acknowledger, complete a pending proof.
    fn moved(&self, p: u16, applied: u64) {
        self.applied.notify_one();
        let mut pending = lock(&self.partition(p).pending);
        if let Some(proof) = *pending {
            if proof.generation != self.generation.load(Ordering::Acquire) {
                *pending = None;
            } else if applied >= proof.head {
                *pending = None;
                self.prove(p, proof.sent_at);
            }
        }
    }

    /// A heartbeat sent at `sent_at`, on subscription `generation`, read head
    /// `head` of partition `p` (and found it continues what was applied):
    /// proves sync at once when L1 has applied it, or once it has.
    pub fn offer_proof(&self, p: u16, sent_at: Instant, head: u64, generation: u64) {
        if !self.subscribed_since(generation) {
            return;
        }
        let applied = lock(&self.partition(p).cursor).applied;
        if applied >= head {
            self.prove(p, sent_at);
        } else {
            *lock(&self.partition(p).pending) = Some(PendingProof { sent_at, head, generation });
            // It may have been applied meanwhile.
            let applied = lock(&self.partition(p).cursor).applied;
            self.moved(p, applied);
        }
    }

    /// A new subscription is live; returns its generation.
    pub fn on_subscribed(&self) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.subscribed.store(true, Ordering::Release);
        generation
    }

    /// The subscription was lost: no proof can rely on it any more.
    pub fn on_lost(&self) {
        self.subscribed.store(false, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The current subscription generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Subscribed, on the same subscription as at `generation`.
    pub fn subscribed_since(&self, generation: u64) -> bool {
        self.subscribed.load(Ordering::Acquire) && self.generation.load(Ordering::Acquire) == generation
    }

    /// Whether the subscription is live.
    pub fn subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    /// Whether the last heartbeat reached Redis; returns the previous value.
    pub fn set_redis_ok(&self, ok: bool) -> bool {
        self.redis_ok.swap(ok, Ordering::AcqRel)
    }

    /// Why the last heartbeat failed.
    pub fn set_outage(&self, outage: shared::store::Outage) {
        self.outage.store(outage.code(), Ordering::Release);
    }

    /// Why the last failed heartbeat failed.
    pub fn outage(&self) -> shared::store::Outage {
        shared::store::Outage::from_code(self.outage.load(Ordering::Acquire))
    }

    /// Whether the last heartbeat reached Redis.
    pub fn redis_ok(&self) -> bool {
        self.redis_ok.load(Ordering::Acquire)
    }

    /// The staleness bound in force.
    pub fn bound_ms(&self) -> u64 {
        self.bound_ms.load(Ordering::Acquire)
    }

    /// Sets the staleness bound in force; returns the previous one.
    pub fn set_bound_ms(&self, ms: u64) -> u64 {
        self.bound_ms.swap(ms, Ordering::AcqRel)
    }

    /// Asks the subscriber to catch up with partition `p`.
    pub fn request_catch_up(&self, p: u16) {
        self.partition(p).catch_up.store(true, Ordering::Release);
        self.catch_up_now.notify_one();
    }

    /// The partitions whose catch-up was asked for (and clears the requests).
    pub fn take_catch_ups(&self) -> Vec<u16> {
        (0..self.count()).filter(|p| self.partition(*p).catch_up.swap(false, Ordering::AcqRel)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(epoch: &str, applied: u64, recent: &[(u64, &str)]) -> Cursor {
        let mut c = Cursor { epoch: epoch.into(), applied, recent: VecDeque::new() };
        for (s, n) in recent {
            c.remember(*s, n);
        }
        c
    }

    #[test]
    fn the_next_message_is_applied_and_old_ones_ignored() {
        let c = at("e", 5, &[(4, "n4"), (5, "n5")]);
        assert_eq!(next_step(&c, "e", 6, "n6", "n5"), Step::Apply);
        assert_eq!(next_step(&c, "e", 5, "n5", "n4"), Step::Ignore);
        assert_eq!(next_step(&c, "e", 3, "n3", "n2"), Step::Ignore, "too old to check: ignored");
    }

    #[test]
    fn a_gap_is_replayed() {
        let c = at("e", 5, &[(5, "n5")]);
        assert_eq!(next_step(&c, "e", 9, "n9", "n8"), Step::Replay { from: 6, to: 8 });
    }

    #[test]
    fn another_epoch_or_first_contact_starts_over() {
        assert_eq!(next_step(&at("e", 5, &[]), "f", 1, "n1", ""), Step::NewEpoch);
        assert_eq!(next_step(&Cursor::default(), "e", 3, "n3", "n2"), Step::NewEpoch);
    }

    #[test]
    fn a_message_of_another_history_is_a_fork() {
        let c = at("e", 5, &[(4, "n4"), (5, "n5")]);
        // Seq 5 again, but not the message applied: the log was rewound.
        assert_eq!(next_step(&c, "e", 5, "other", "n4"), Step::Fork);
        // The next seq, but it follows another message 5.
        assert_eq!(next_step(&c, "e", 6, "n6", "other"), Step::Fork);
        // Unknown nonces cannot prove a fork.
        let unknown = at("e", 5, &[(5, "")]);
        assert_eq!(next_step(&unknown, "e", 6, "n6", "x"), Step::Apply);
    }

    #[test]
    fn a_head_behind_or_unlike_what_was_applied_disagrees() {
        let c = at("e", 5, &[(5, "n5")]);
        assert_eq!(head_disagrees(&c, "e", 5, "n5"), None);
        assert_eq!(head_disagrees(&c, "e", 7, "n7"), None, "ahead: messages on their way");
        assert!(head_disagrees(&c, "e", 4, "n4").is_some());
        assert!(head_disagrees(&c, "e", 5, "n5'").is_some());
        assert!(head_disagrees(&c, "f", 5, "n5").is_some());
    }

    #[test]
    fn a_node_behind_or_unlike_what_was_applied_is_not_read() {
        let cursor = at("e1", 10, &[(9, "n9"), (10, "n10")]);
        assert_eq!(node_disagrees(&cursor.tip(), "e1", 10, Some("n10")), None);
        assert_eq!(node_disagrees(&cursor.tip(), "e1", 12, Some("n10")), None);
        // The log no longer holds it, or the node is in another epoch: nothing to compare.
        assert_eq!(node_disagrees(&cursor.tip(), "e1", 12, None), None);
        assert_eq!(node_disagrees(&cursor.tip(), "e2", 3, None), None);
        assert!(node_disagrees(&cursor.tip(), "e1", 9, Some("n9")).is_some());
        assert!(node_disagrees(&cursor.tip(), "e1", 12, Some("other")).is_some());
        // Nothing applied yet: nothing to disagree with.
        assert_eq!(node_disagrees(&Cursor::default().tip(), "e1", 0, None), None);
    }

    #[test]
    fn l1_is_trusted_only_with_a_proof_younger_than_the_bound_per_partition() {
        let sync = SyncState::new(2, 60_000);
        assert!(!sync.in_sync(0), "no proof yet");
        let generation = sync.on_subscribed();
        sync.adopt(0, "e", 3, "n3");
        sync.offer_proof(0, Instant::now(), 3, generation);
        assert!(sync.in_sync(0));
        assert!(!sync.in_sync(1), "one partition's proof says nothing of another");
        assert_eq!(sync.unsynced(), [1]);

        // Past the bound, the same proof no longer counts.
        sync.set_bound_ms(1);
        std::thread::sleep(Duration::from_millis(5));
        assert!(!sync.in_sync(0));
    }

    #[test]
    fn a_pending_proof_completes_when_the_head_is_applied_on_the_same_subscription() {
        let sync = SyncState::new(1, 60_000);
        let generation = sync.on_subscribed();
        sync.adopt(0, "e", 3, "n3");
        sync.offer_proof(0, Instant::now(), 5, generation);
        assert!(!sync.in_sync(0), "behind the head read");
        sync.applied(0, 4, "n4");
        assert!(!sync.in_sync(0));
        sync.applied(0, 5, "n5");
        assert!(sync.in_sync(0), "the head read is applied");

        // A proof offered on a lost subscription never completes.
        let sync = SyncState::new(1, 60_000);
        let generation = sync.on_subscribed();
        sync.adopt(0, "e", 3, "n3");
        sync.offer_proof(0, Instant::now(), 4, generation);
        sync.on_lost();
        sync.applied(0, 4, "n4");
        assert!(!sync.in_sync(0));
    }

    #[test]
    fn a_proof_from_before_the_clock_origin_is_ignored() {
        let sync = SyncState::new(1, u64::MAX / 2);
        let generation = sync.on_subscribed();
        let before = CLOCK_ORIGIN.checked_sub(Duration::from_secs(1)).expect("the monotonic clock is over 1 s old");
        sync.offer_proof(0, before, 0, generation);
        assert!(!sync.in_sync(0));
    }

    #[test]
    fn cursors_remember_recent_nonces_only() {
        let mut c = at("e", 0, &[]);
        for s in 1..=(RECENT as u64 + 10) {
            c.remember(s, &format!("n{s}"));
        }
        assert_eq!(c.recent.len(), RECENT);
        assert_eq!(c.nonce_of(RECENT as u64 + 10), Some(format!("n{}", RECENT + 10).as_str()));
        assert_eq!(c.nonce_of(1), None);
    }
}
