//! `Idempotency-Key`: the first request with a key runs; a retry with the same key and body gets
//! the first one's answer instead of paying the provider again.
//!
//! One store is shared, through cheap clones of [`IdempotencyStore`], by every worker thread's
//! single-threaded runtime, so waiting for an in-flight leader uses a `tokio::sync::watch`
//! channel (it wakes a task on any runtime) and nothing here spawns.
//!
//! Locking: the completion-order index (`order`) is only ever locked while holding a map shard
//! guard or while holding nothing, and no map access happens while it is locked, so the only lock
//! order is shard, then `order`: no deadlock.

use crate::lock;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use http::{HeaderName, HeaderValue, StatusCode};
use tokio::sync::watch;
use tokio::time::Instant;

/// A finished answer kept for replay.
#[derive(Debug, Clone)]
pub struct Stored {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

/// The name of the request header that carries the client's key.
pub const HEADER: &str = "idempotency-key";
/// Set to `true` on an answer that is a replay of a stored one.
pub const REPLAYED: HeaderName = HeaderName::from_static("x-acc-idempotent-replay");

/// A request's fingerprint, so a key reused with another request is told apart: SHA-256 over
/// the endpoint path, the content type, and the body bytes (a JSON body is compared byte for
/// byte, as the SDKs resend it; multipart bodies: [`fingerprint_multipart`]).
pub fn fingerprint(path: &str, content_type: Option<&[u8]>, body: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(path.as_bytes());
    h.update([0]);
    h.update(content_type.unwrap_or(b""));
    h.update([0]);
    h.update(body);
    h.finalize().into()
}

/// The fingerprint of an edit or variation: SHA-256 over the endpoint path and each form part
/// in order (name, file name, content type, bytes), not over the body's bytes, since the SDKs
/// draw a new multipart boundary for every send, their own retries included (RFC 7578 leaves
/// the boundary to the sender). A body that does not parse as multipart is fingerprinted as
/// [`fingerprint`] does (the request fails on it anyway).
pub async fn fingerprint_multipart(path: &str, content_type: &[u8], body: &Bytes) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let Some(boundary) = std::str::from_utf8(content_type).ok().and_then(|ct| multer::parse_boundary(ct).ok()) else {
        return fingerprint(path, Some(content_type), body);
    };
    let stream = futures_util::stream::once(std::future::ready(Ok::<_, std::convert::Infallible>(body.clone())));
    let mut form = multer::Multipart::new(stream, boundary);
    let mut h = Sha256::new();
    h.update(path.as_bytes());
    h.update([0]);
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(_) => return fingerprint(path, Some(content_type), body),
        };
        for text in [field.name(), field.file_name(), field.content_type().map(|m| m.as_ref())] {
            match text {
                Some(t) => {
                    h.update([1]);
                    h.update((t.len() as u64).to_le_bytes());
                    h.update(t.as_bytes());
                }
                None => h.update([0]),
            }
        }
        let Ok(data) = field.bytes().await else { return fingerprint(path, Some(content_type), body) };
        h.update((data.len() as u64).to_le_bytes());
        h.update(&data);
    }
    h.finalize().into()
}

impl Stored {
    /// The stored answer as a response again, marked `x-acc-idempotent-replay: true`.
    pub fn replay(&self) -> axum::response::Response {
        let mut r = axum::response::Response::new(axum::body::Body::from(self.body.clone()));
        *r.status_mut() = self.status;
        let h = r.headers_mut();
        for (k, v) in &self.headers {
            h.append(k.clone(), v.clone());
        }
        h.insert(REPLAYED, HeaderValue::from_static("true"));
        r
    }
}

/// What [`IdempotencyStore::begin`] decided for one request.
#[derive(Debug)]
pub enum Begin {
    /// First with this key: run the request, then complete the lease.
    Leader(Lease),
    /// Same key and fingerprint already done (or finished while we waited): answer with this.
    /// `waited` says we waited for an in-flight leader.
    Replay { stored: Arc<Stored>, waited: bool },
    /// Same key, different fingerprint (in flight or done).
    Conflict,
}

/// The tenant scope and the client's key.
type Key = (String, String);

/// What an in-flight leader tells its waiters.
#[derive(Debug, Clone)]
enum Outcome {
    Running,
    Done(Arc<Stored>),
    /// Nothing kept: one waiter must run the request itself.
    GaveUp,
}

enum Slot {
    Running {
        fingerprint: [u8; 32],
        /// Which lease owns this slot, so a lease only ever finishes its own.
        id: u64,
        outcome: watch::Receiver<Outcome>,
    },
    Done {
        fingerprint: [u8; 32],
        /// Completion order: the key in `order`, smallest evicted first.
        seq: u64,
        stored: Arc<Stored>,
        expires: Instant,
    },
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    ttl: Duration,
    max_bytes: usize,
}

struct Inner {
    slots: DashMap<Key, Slot>,
    /// Done entries by completion sequence, for evicting the oldest first.
    order: Mutex<BTreeMap<u64, Key>>,
    /// Body bytes of done entries.
    bytes: AtomicUsize,
    next_id: AtomicU64,
    limits: Mutex<Limits>,
}

/// Requests by `Idempotency-Key`: in flight (with their waiters) and done (kept for replay until
/// their ttl, within a byte bound). Cloning gives another handle on the same store.
#[derive(Clone)]
pub struct IdempotencyStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for IdempotencyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyStore").field("len", &self.len()).field("bytes", &self.bytes()).finish()
    }
}

impl IdempotencyStore {
    /// A store keeping answers for `ttl`, holding at most `max_bytes` of bodies.
    pub fn new(ttl: Duration, max_bytes: usize) -> Self {
        IdempotencyStore {
            inner: Arc::new(Inner {
                slots: DashMap::new(),
                order: Mutex::new(BTreeMap::new()),
                bytes: AtomicUsize::new(0),
                next_id: AtomicU64::new(0),
                limits: Mutex::new(Limits { ttl, max_bytes }),
            }),
        }
    }

    /// New limits after a policy reload; existing entries keep their expiry time. A smaller byte
    /// bound evicts the oldest answers at once.
    pub fn set_limits(&self, ttl: Duration, max_bytes: usize) {
        *lock(&self.inner.limits) = Limits { ttl, max_bytes };
        self.evict(max_bytes);
    }

    /// Starts or joins the request `key` in `scope` with this body fingerprint. If a leader with the
    /// same fingerprint is in flight, waits for it: when it completes with an answer,
    /// `Replay { waited: true }`; when it gives up (completed with `None`, or dropped), one waiter
    /// becomes the new `Leader` and the others wait for that one.
    ///
    /// A leader that never finishes keeps its waiters waiting: the caller's request deadline bounds
    /// both (dropping this future is always safe).
    pub async fn begin(&self, scope: &str, key: &str, fingerprint: [u8; 32]) -> Begin {
        let key: Key = (scope.to_owned(), key.to_owned());
        let mut waited = false;
        loop {
            let (leader, mut outcome) = match self.try_begin(&key, fingerprint, waited) {
                Ok(begin) => return begin,
                Err(wait) => wait,
            };
            waited = true;
            // Checks the current value first, so a leader that finished between our look at the map
            // and here is not missed.
            let done = match outcome.wait_for(|o| !matches!(o, Outcome::Running)).await {
                Ok(o) => match &*o {
                    Outcome::Done(stored) => Some(Arc::clone(stored)),
                    _ => None,
                },
                // The sender went without a word (a lease that could not finish): its slot would
                // send us round this loop without ever yielding, so clear it.
                Err(_) => {
                    self.inner
                        .slots
                        .remove_if(&key, |_, slot| matches!(slot, Slot::Running { id, .. } if *id == leader));
                    None
                }
            };
            if let Some(stored) = done {
                return Begin::Replay { stored, waited };
            }
            // The leader gave up and has already removed its slot: look again.
        }
    }

    /// One look at the map: a decision, or the lease id and channel of the leader to wait for.
    /// Synchronous, so no shard guard is ever held across an await.
    fn try_begin(
        &self,
        key: &Key,
        fingerprint: [u8; 32],
        waited: bool,
    ) -> Result<Begin, (u64, watch::Receiver<Outcome>)> {
        let now = Instant::now();
        match self.inner.slots.entry(key.clone()) {
            Entry::Occupied(mut occupied) => match occupied.get() {
                Slot::Running { fingerprint: theirs, id, outcome } => {
                    if *theirs == fingerprint {
                        Err((*id, outcome.clone()))
                    } else {
                        Ok(Begin::Conflict)
                    }
                }
                Slot::Done { fingerprint: theirs, stored, expires, .. } if *expires > now => {
                    if *theirs == fingerprint {
                        Ok(Begin::Replay { stored: Arc::clone(stored), waited })
                    } else {
                        Ok(Begin::Conflict)
                    }
                }
                // Expired but not yet swept: as if absent.
                Slot::Done { .. } => {
                    let (slot, lease) = self.new_lease(key, fingerprint);
                    let old = occupied.insert(slot);
                    self.forget_done(&old);
                    Ok(Begin::Leader(lease))
                }
            },
            Entry::Vacant(vacant) => {
                let (slot, lease) = self.new_lease(key, fingerprint);
                vacant.insert(slot);
                Ok(Begin::Leader(lease))
            }
        }
    }

    fn new_lease(&self, key: &Key, fingerprint: [u8; 32]) -> (Slot, Lease) {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(Outcome::Running);
        let lease = Lease { store: self.clone(), key: key.clone(), id, outcome: tx, finished: false };
        (Slot::Running { fingerprint, id, outcome: rx }, lease)
    }

    /// Bookkeeping for a done slot that has just left the map (caller holds its shard guard, or
    /// held it when removing).
    fn forget_done(&self, slot: &Slot) {
        if let Slot::Done { seq, stored, .. } = slot {
            lock(&self.inner.order).remove(seq);
            self.inner.bytes.fetch_sub(stored.body.len(), Ordering::Relaxed);
        }
    }

    /// Drops done entries, oldest completion first, until the bodies fit in `max_bytes`.
    fn evict(&self, max_bytes: usize) {
        while self.bytes() > max_bytes {
            // Released before touching the map (see the module's locking note).
            let Some((seq, key)) = lock(&self.inner.order).pop_first() else { return };
            let removed =
                self.inner.slots.remove_if(&key, |_, slot| matches!(slot, Slot::Done { seq: s, .. } if *s == seq));
            if let Some((_, Slot::Done { stored, .. })) = removed {
                self.inner.bytes.fetch_sub(stored.body.len(), Ordering::Relaxed);
            }
        }
    }

    /// Drops expired entries (call periodically); returns how many went.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut gone = 0;
        self.inner.slots.retain(|_, slot| match slot {
            Slot::Done { expires, .. } if *expires <= now => {
                self.forget_done(slot);
                gone += 1;
                false
            }
            _ => true,
        });
        gone
    }

    /// Entries held, in flight and done.
    pub fn len(&self) -> usize {
        self.inner.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.slots.is_empty()
    }

    /// Body bytes held by done entries.
    pub fn bytes(&self) -> usize {
        self.inner.bytes.load(Ordering::Relaxed)
    }
}

/// The leader's hold on a key. Finish it with [`Lease::complete`]; dropping it unfinished (client
/// went away, panic) gives up, as `complete(None)` does.
#[derive(Debug)]
pub struct Lease {
    store: IdempotencyStore,
    key: Key,
    id: u64,
    outcome: watch::Sender<Outcome>,
    finished: bool,
}

impl Lease {
    /// Ends the leader's request: `Some(answer)` keeps it for replay until ttl; `None` (not
    /// replayable: 5xx, rate limited) forgets the key so the next try runs anew. Waiters are woken
    /// either way. An answer whose body alone exceeds the byte bound is not kept (as `None`).
    pub fn complete(mut self, answer: Option<Stored>) {
        self.finish(answer);
    }

    fn finish(&mut self, answer: Option<Stored>) {
        self.finished = true;
        let inner = &self.store.inner;
        let limits = *lock(&inner.limits);
        let answer = answer.filter(|a| a.body.len() <= limits.max_bytes).map(Arc::new);
        // The map changes before waiters are told, so a woken waiter never finds our Running slot.
        let outcome = match answer {
            Some(stored) => {
                if let Some(mut slot) = inner.slots.get_mut(&self.key) {
                    let ours = match &*slot {
                        Slot::Running { id, fingerprint, .. } if *id == self.id => Some(*fingerprint),
                        _ => None,
                    };
                    if let Some(fingerprint) = ours {
                        let seq = inner.next_id.fetch_add(1, Ordering::Relaxed);
                        *slot = Slot::Done {
                            fingerprint,
                            seq,
                            stored: Arc::clone(&stored),
                            expires: Instant::now() + limits.ttl,
                        };
                        inner.bytes.fetch_add(stored.body.len(), Ordering::Relaxed);
                        lock(&inner.order).insert(seq, self.key.clone());
                    }
                }
                Outcome::Done(stored)
            }
            None => {
                inner.slots.remove_if(&self.key, |_, slot| matches!(slot, Slot::Running { id, .. } if *id == self.id));
                Outcome::GaveUp
            }
        };
        // Waiters always get the answer through the channel, even if eviction drops it just below.
        self.outcome.send_replace(outcome);
        self.store.evict(limits.max_bytes);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::task::JoinHandle;

    const TTL: Duration = Duration::from_secs(60);
    const A: [u8; 32] = [1; 32];
    const B: [u8; 32] = [2; 32];

    fn answer(body: &'static str) -> Stored {
        Stored {
            status: StatusCode::OK,
            headers: vec![(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    fn leader(begin: Begin) -> Lease {
        match begin {
            Begin::Leader(lease) => lease,
            other => panic!("expected Leader, got {other:?}"),
        }
    }

    fn replay(begin: Begin) -> (Arc<Stored>, bool) {
        match begin {
            Begin::Replay { stored, waited } => (stored, waited),
            other => panic!("expected Replay, got {other:?}"),
        }
    }

    /// Lets every spawned task run until it blocks.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    /// A waiter's result; a waiter left hanging fails the test instead of hanging it (paused time
    /// jumps ahead to the timeout once everything is idle).
    async fn join<T>(task: JoinHandle<T>) -> T {
        tokio::time::timeout(Duration::from_secs(1), task).await.expect("waiter hung").unwrap()
    }

    fn spawn_begin(store: &IdempotencyStore, scope: &'static str, key: &'static str) -> JoinHandle<Begin> {
        let store = store.clone();
        tokio::spawn(async move { store.begin(scope, key, A).await })
    }

    /// Spawns a waiter that, if it becomes leader, completes with `body`; returns its verdict.
    fn spawn_racer(store: &IdempotencyStore, body: &'static str) -> JoinHandle<Result<(), (Arc<Stored>, bool)>> {
        let store = store.clone();
        tokio::spawn(async move {
            match store.begin("t", "k", A).await {
                Begin::Leader(lease) => {
                    lease.complete(Some(answer(body)));
                    Ok(())
                }
                other => Err(replay(other)),
            }
        })
    }

    #[test]
    fn store_and_begin_future_are_send() {
        fn send<T: Send + Sync>(_: &T) {}
        fn send_fut<T: Send>(_: &T) {}
        let store = IdempotencyStore::new(TTL, 1024);
        send(&store);
        send_fut(&store.begin("t", "k", A));
    }

    #[tokio::test(start_paused = true)]
    async fn leader_then_replay_of_the_same_answer() {
        let store = IdempotencyStore::new(TTL, 1024);
        leader(store.begin("t", "k", A).await).complete(Some(answer("one")));
        let (first, waited) = replay(store.begin("t", "k", A).await);
        assert!(!waited);
        assert_eq!(first.status, StatusCode::OK);
        assert_eq!(first.body, "one");
        assert_eq!(first.headers.len(), 1);
        let (second, _) = replay(store.begin("t", "k", A).await);
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!((store.len(), store.bytes()), (1, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn other_fingerprint_conflicts_in_flight_and_done() {
        let store = IdempotencyStore::new(TTL, 1024);
        let lease = leader(store.begin("t", "k", A).await);
        assert!(matches!(store.begin("t", "k", B).await, Begin::Conflict));
        lease.complete(Some(answer("one")));
        assert!(matches!(store.begin("t", "k", B).await, Begin::Conflict));
        // The conflict left the stored answer alone.
        assert_eq!(replay(store.begin("t", "k", A).await).0.body, "one");
    }

    #[tokio::test(start_paused = true)]
    async fn waiter_gets_the_leaders_answer() {
        let store = IdempotencyStore::new(TTL, 1024);
        let lease = leader(store.begin("t", "k", A).await);
        let waiter = spawn_begin(&store, "t", "k");
        settle().await;
        assert!(!waiter.is_finished(), "the waiter must wait for the leader");
        lease.complete(Some(answer("one")));
        let (stored, waited) = replay(join(waiter).await);
        assert!(waited);
        assert_eq!(stored.body, "one");
    }

    async fn leader_gives_up(give_up: impl FnOnce(Lease)) {
        let store = IdempotencyStore::new(TTL, 1024);
        let lease = leader(store.begin("t", "k", A).await);
        let racers = [spawn_racer(&store, "two"), spawn_racer(&store, "two")];
        settle().await;
        assert!(racers.iter().all(|r| !r.is_finished()));
        give_up(lease);
        let mut leaders = 0;
        for racer in racers {
            match join(racer).await {
                Ok(()) => leaders += 1,
                Err((stored, waited)) => {
                    assert!(waited);
                    assert_eq!(stored.body, "two");
                }
            }
        }
        assert_eq!(leaders, 1, "exactly one waiter takes over");
        assert_eq!(replay(store.begin("t", "k", A).await).0.body, "two");
    }

    #[tokio::test(start_paused = true)]
    async fn complete_none_lets_a_waiter_lead() {
        leader_gives_up(|lease| lease.complete(None)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_lease_lets_a_waiter_lead() {
        leader_gives_up(drop).await;
        let store = IdempotencyStore::new(TTL, 1024);
        drop(leader(store.begin("t", "k", A).await));
        assert!(store.is_empty(), "a dropped lease forgets its key at once");
    }

    #[tokio::test(start_paused = true)]
    async fn complete_none_forgets_the_key() {
        let store = IdempotencyStore::new(TTL, 1024);
        leader(store.begin("t", "k", A).await).complete(None);
        assert!(store.is_empty());
        // A retry runs anew, even with another body.
        leader(store.begin("t", "k", B).await);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_answer_is_not_replayed() {
        let store = IdempotencyStore::new(Duration::from_secs(10), 1024);
        leader(store.begin("t", "k", A).await).complete(Some(answer("one")));
        tokio::time::advance(Duration::from_millis(9_999)).await;
        replay(store.begin("t", "k", A).await);
        tokio::time::advance(Duration::from_millis(1)).await;
        // Not swept yet, still not replayed; nor does it conflict.
        assert_eq!(store.len(), 1);
        let lease = leader(store.begin("t", "k", B).await);
        assert_eq!(store.bytes(), 0);
        lease.complete(Some(answer("two")));
        assert_eq!(replay(store.begin("t", "k", B).await).0.body, "two");
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_drops_only_expired_done_entries() {
        let store = IdempotencyStore::new(Duration::from_secs(10), 1024);
        leader(store.begin("t", "old1", A).await).complete(Some(answer("1")));
        leader(store.begin("t", "old2", A).await).complete(Some(answer("22")));
        tokio::time::advance(Duration::from_secs(5)).await;
        leader(store.begin("t", "new", A).await).complete(Some(answer("333")));
        let _in_flight = leader(store.begin("t", "running", A).await);
        assert_eq!(store.sweep(), 0);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(store.sweep(), 2);
        assert_eq!((store.len(), store.bytes()), (2, 3));
        replay(store.begin("t", "new", A).await);
    }

    #[tokio::test(start_paused = true)]
    async fn new_limits_keep_existing_expiry() {
        let store = IdempotencyStore::new(Duration::from_secs(10), 1024);
        leader(store.begin("t", "before", A).await).complete(Some(answer("1")));
        store.set_limits(Duration::from_secs(1), 1024);
        leader(store.begin("t", "after", A).await).complete(Some(answer("2")));
        tokio::time::advance(Duration::from_secs(2)).await;
        replay(store.begin("t", "before", A).await);
        leader(store.begin("t", "after", A).await);
    }

    #[tokio::test(start_paused = true)]
    async fn byte_bound_evicts_oldest_completed() {
        let store = IdempotencyStore::new(TTL, 10);
        let first = leader(store.begin("t", "a", A).await);
        let second = leader(store.begin("t", "b", A).await);
        // Completion order, not arrival order, decides.
        second.complete(Some(answer("bbbb")));
        first.complete(Some(answer("aaaa")));
        assert_eq!(store.bytes(), 8);
        leader(store.begin("t", "c", A).await).complete(Some(answer("cccc")));
        assert_eq!((store.len(), store.bytes()), (2, 8));
        replay(store.begin("t", "a", A).await);
        replay(store.begin("t", "c", A).await);
        leader(store.begin("t", "b", A).await);
    }

    #[tokio::test(start_paused = true)]
    async fn smaller_bound_evicts_at_once() {
        let store = IdempotencyStore::new(TTL, 10);
        leader(store.begin("t", "a", A).await).complete(Some(answer("aaaa")));
        leader(store.begin("t", "b", A).await).complete(Some(answer("bbbb")));
        store.set_limits(TTL, 5);
        assert_eq!((store.len(), store.bytes()), (1, 4));
        replay(store.begin("t", "b", A).await);
    }

    #[tokio::test(start_paused = true)]
    async fn too_large_answer_is_not_kept() {
        let store = IdempotencyStore::new(TTL, 10);
        leader(store.begin("t", "small", A).await).complete(Some(answer("ssss")));
        let lease = leader(store.begin("t", "k", A).await);
        let waiter = spawn_begin(&store, "t", "k");
        settle().await;
        lease.complete(Some(answer("0123456789x")));
        // The waiter runs it itself, as after complete(None); other answers are untouched.
        leader(join(waiter).await);
        assert_eq!(store.bytes(), 4);
        replay(store.begin("t", "small", A).await);
    }

    #[tokio::test(start_paused = true)]
    async fn answer_of_exactly_the_bound_is_kept() {
        let store = IdempotencyStore::new(TTL, 10);
        leader(store.begin("t", "k", A).await).complete(Some(answer("0123456789")));
        replay(store.begin("t", "k", A).await);
    }

    #[tokio::test(start_paused = true)]
    async fn scopes_are_separate() {
        let store = IdempotencyStore::new(TTL, 1024);
        let one = leader(store.begin("tenant1", "k", A).await);
        let two = leader(store.begin("tenant2", "k", B).await);
        one.complete(Some(answer("one")));
        two.complete(None);
        assert_eq!(replay(store.begin("tenant1", "k", A).await).0.body, "one");
        leader(store.begin("tenant2", "k", A).await);
    }

    #[tokio::test(start_paused = true)]
    async fn many_waiters_all_get_the_replay() {
        let store = IdempotencyStore::new(TTL, 1024);
        let lease = leader(store.begin("t", "k", A).await);
        let waiters: Vec<_> = (0..50).map(|_| spawn_begin(&store, "t", "k")).collect();
        settle().await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        lease.complete(Some(answer("one")));
        let kept = replay(store.begin("t", "k", A).await).0;
        for waiter in waiters {
            let (stored, waited) = replay(join(waiter).await);
            assert!(waited);
            assert!(Arc::ptr_eq(&stored, &kept));
        }
    }

    /// As in the gateway: one single-threaded runtime per thread, one store between them.
    #[test]
    fn waiters_on_other_runtimes_are_woken() {
        let rt = || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let store = IdempotencyStore::new(TTL, 1024);
        let lease = leader(rt().block_on(store.begin("t", "k", A)));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                let (started, done) = (started_tx.clone(), done_tx.clone());
                std::thread::spawn(move || {
                    started.send(()).unwrap();
                    done.send(rt().block_on(store.begin("t", "k", A))).unwrap();
                })
            })
            .collect();
        for _ in 0..4 {
            started_rx.recv().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(done_rx.try_recv().is_err(), "the waiters must wait for the leader");
        lease.complete(Some(answer("one")));
        for _ in 0..4 {
            let (stored, waited) = replay(done_rx.recv_timeout(Duration::from_secs(5)).expect("waiter hung"));
            assert!(waited);
            assert_eq!(stored.body, "one");
        }
        threads.into_iter().for_each(|t| t.join().unwrap());
    }
}
