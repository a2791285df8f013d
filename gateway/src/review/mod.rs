//! The human review queue: answers a route's policy withheld (an evaluator failed and its
//! action is `"review"`), held durably in the trace store with their images until a reviewer
//! approves or rejects them, or they expire.
//!
//! - [`ReviewQueue::hold`]: on the request path, within the `[review] max_bytes` budget of held
//!   images; what cannot be held gets the route's `review_overflow` action (counted
//!   `outcome="overflow"`).
//! - [`ReviewQueue::decide`]: a reviewer's approval or rejection (once: a second is refused),
//!   and the background [`ReviewQueue::run`] that expires items after `review_ttl_secs` and
//!   deletes approved images once collected.
//! - Every decision goes to the route's webhook when it has one ([`webhook`]).
//!
//! Metrics: `acc_reviews_total{route,outcome}` (held, approved, rejected, expired, overflow),
//! `acc_review_queue_depth{route}` (pending items, read back from the store at start-up, so
//! right after a restart), `acc_review_wait_seconds{route}` (held to decided), and
//! `acc_review_webhooks_total{route,result}`.

pub mod webhook;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::policy::{Policy, ReviewBudget, ReviewSettings};
use crate::reload::PolicyStore;
use crate::store::{HeldImage, ReviewItem, ReviewState, StoreError, TraceDb, TraceWriter};

/// The review metrics, registered in the process's registry.
pub struct ReviewMetrics {
    /// `acc_reviews_total{route,outcome}`: outcome is held, approved, rejected, expired or
    /// overflow.
    pub reviews: IntCounterVec,
    /// `acc_review_queue_depth{route}`: items pending now.
    pub depth: IntGaugeVec,
    /// `acc_review_wait_seconds{route}`: from held to decided (approved, rejected, expired).
    pub wait: HistogramVec,
    /// `acc_review_webhooks_total{route,result}`: result is delivered, error (one failed
    /// delivery, retried or not), failed (gave up after every attempt) or no_secret (the secret's
    /// variable is unset: nothing sent).
    pub webhooks: IntCounterVec,
    /// `acc_review_held_bytes`: bytes of held images in the store (the budget's use).
    pub held_bytes: prometheus::IntGauge,
}

impl ReviewMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> ReviewMetrics {
        let reviews = IntCounterVec::new(
            Opts::new(
                "acc_reviews_total",
                "Human review transitions by route: held, approved, rejected, expired, overflow",
            ),
            &["route", "outcome"],
        )
        .expect("valid metric");
        let depth =
            IntGaugeVec::new(Opts::new("acc_review_queue_depth", "Items waiting for a reviewer, by route"), &["route"])
                .expect("valid metric");
        // From seconds to days: reviewers take minutes to hours.
        let buckets =
            vec![1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4.0 * 3600.0, 12.0 * 3600.0, 86_400.0, 7.0 * 86_400.0];
        let wait = HistogramVec::new(
            HistogramOpts::new("acc_review_wait_seconds", "Time from held to decided, by route").buckets(buckets),
            &["route"],
        )
        .expect("valid metric");
        let webhooks = IntCounterVec::new(
            Opts::new("acc_review_webhooks_total", "Review decision webhook deliveries by route and result"),
            &["route", "result"],
        )
        .expect("valid metric");
        let held_bytes = prometheus::IntGauge::new("acc_review_held_bytes", "Bytes of held review images in the store")
            .expect("valid metric");
        for c in [
            Box::new(reviews.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(depth.clone()),
            Box::new(wait.clone()),
            Box::new(webhooks.clone()),
            Box::new(held_bytes.clone()),
        ] {
            if let Err(e) = registry.register(c) {
                tracing::warn!("cannot register a review metric: {e}");
            }
        }
        ReviewMetrics { reviews, depth, wait, webhooks, held_bytes }
    }
}

/// Why an answer could not be held.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    /// The images do not fit in `[review] max_bytes` beside those already held.
    #[error("the review queue's byte budget is full ({used} of {max} bytes held, {wanted} more needed)")]
    Full { used: u64, max: u64, wanted: u64 },
    /// The store is not open (yet, or any more).
    #[error("the review store is unavailable")]
    Unavailable,
    /// The store already has a review of this trace id (a client reused it).
    #[error("a review of this trace id already exists")]
    Duplicate,
    /// The write failed.
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Why a decision was refused.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// No review of that trace id.
    #[error("no review with this trace id")]
    NotFound,
    /// Already approved, rejected or expired.
    #[error("this review is already {}", .0.name())]
    Decided(ReviewState),
    /// The store is not open.
    #[error("the review store is unavailable")]
    Unavailable,
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// The review queue's state in this process: the store handle, the budget's use, metrics, and
/// webhook deliveries in flight.
pub struct ReviewQueue {
    traces: Option<TraceWriter>,
    /// The review metrics.
    pub metrics: ReviewMetrics,
    /// Bytes of held images in the store, as far as this process knows (read from the store
    /// once it opens, then kept up to date by holds and decisions).
    used: AtomicU64,
    /// Set once the totals were read from the store: holds wait for it (at most
    /// [`LOAD_WAIT`]), so the budget and the depth gauge start right.
    loaded: AtomicBool,
    /// Signals `loaded`.
    loaded_tx: tokio::sync::watch::Sender<bool>,
    /// Webhook deliveries in flight, waited for (briefly) on shutdown.
    deliveries: TaskTracker,
    /// Routes the depth gauge has a value for (set to 0 when a refresh finds none pending).
    routes: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// The gateway-served files (`{id}.{ext}`) an approved `url` answer was last given, by trace
    /// id: a poll while they are served answers the same URLs instead of storing the images
    /// again (each copy would push other answers' images out of the artifact store).
    served: dashmap::DashMap<String, Vec<String>>,
}

/// The most approved answers whose served files are remembered ([`ReviewQueue::served_files`]);
/// past it the memory starts over (a poll then stores its images once more).
const SERVED_MAX: usize = 10_000;

/// Now, Unix nanoseconds.
pub fn now_unix_nano() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// How long a hold waits for the queue's totals to be read from a store that is just opening
/// (at start-up) before it counts as unavailable.
pub const LOAD_WAIT: Duration = Duration::from_secs(5);

/// How often pending items are checked for expiry.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How often the queue's totals are read again from the store.
pub const REFRESH_EVERY: Duration = Duration::from_secs(30);

/// Why an item expired, as its record and the client's 410 say.
const EXPIRED_REASON: &str = "no reviewer decided within the route's review_ttl_secs";

impl ReviewQueue {
    /// A queue over the trace store `traces` writes to (`None`: no store, nothing can be held),
    /// its metrics registered in `registry`.
    pub fn new(traces: Option<TraceWriter>, registry: &Registry) -> ReviewQueue {
        ReviewQueue {
            traces,
            metrics: ReviewMetrics::new(registry),
            used: AtomicU64::new(0),
            loaded: AtomicBool::new(false),
            loaded_tx: tokio::sync::watch::channel(false).0,
            deliveries: TaskTracker::new(),
            routes: std::sync::Mutex::default(),
            served: dashmap::DashMap::new(),
        }
    }

    /// The files (`{id}.{ext}` under [`crate::artifacts::PATH`]) the approved answer of
    /// `trace_id` was last served as, if remembered.
    pub fn served_files(&self, trace_id: &str) -> Option<Vec<String>> {
        self.served.get(trace_id).map(|f| f.clone())
    }

    /// Remembers the files the approved answer of `trace_id` is served as.
    pub fn remember_served(&self, trace_id: &str, files: Vec<String>) {
        if self.served.len() >= SERVED_MAX {
            self.served.clear();
        }
        self.served.insert(trace_id.to_string(), files);
    }

    /// The open store, when there is one.
    pub fn db(&self) -> Option<TraceDb> {
        self.traces.as_ref().and_then(|t| t.db())
    }

    /// Whether the store is kept at all (`[store] enabled`).
    pub fn enabled(&self) -> bool {
        self.traces.is_some()
    }

    /// Whether `bytes` more of held images would fit now (store open, budget not exceeded).
    /// Checked while an attempt is evaluated, so `review_overflow = "fallback"` can still try
    /// the next target; [`ReviewQueue::hold`] reserves for real. While the store is still
    /// opening (start-up) the answer is yes when the images fit the budget at all: the hold
    /// then waits for it.
    pub fn has_room(&self, bytes: u64, budget: &ReviewBudget) -> bool {
        if !self.enabled() {
            return false;
        }
        if !self.loaded.load(Ordering::Acquire) {
            return bytes <= budget.max_bytes;
        }
        self.db().is_some() && self.used.load(Ordering::Relaxed).saturating_add(bytes) <= budget.max_bytes
    }

    /// Waits (at most [`LOAD_WAIT`]) for the totals to be read from the store.
    async fn wait_loaded(&self) -> bool {
        if self.loaded.load(Ordering::Acquire) {
            return true;
        }
        let mut rx = self.loaded_tx.subscribe();
        let loaded = tokio::time::timeout(LOAD_WAIT, rx.wait_for(|l| *l)).await.is_ok_and(|r| r.is_ok());
        loaded
    }

    /// Holds `item` (pending) with its `images` in the store, within the byte budget. Counted as
    /// `outcome="held"`; the caller counts an error as overflow ([`ReviewQueue::count_overflow`]).
    pub async fn hold(&self, item: &ReviewItem, images: &[HeldImage], budget: &ReviewBudget) -> Result<(), HoldError> {
        if !self.enabled() || !self.wait_loaded().await {
            return Err(HoldError::Unavailable);
        }
        let db = self.db().ok_or(HoldError::Unavailable)?;
        let wanted = item.bytes_held;
        let before = self.used.fetch_add(wanted, Ordering::AcqRel);
        if before.saturating_add(wanted) > budget.max_bytes {
            self.release(wanted);
            return Err(HoldError::Full { used: before, max: budget.max_bytes, wanted });
        }
        let result = match db.insert_review(item, images).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(HoldError::Duplicate),
            Err(e) => Err(HoldError::Store(e)),
        };
        match &result {
            Ok(()) => {
                self.metrics.reviews.with_label_values(&[&item.route, "held"]).inc();
                self.metrics.depth.with_label_values(&[&item.route]).inc();
                crate::lock(&self.routes).insert(item.route.clone());
                self.metrics.held_bytes.set(self.used.load(Ordering::Relaxed) as i64);
            }
            Err(_) => self.release(wanted),
        }
        result
    }

    /// Counts an answer of `route` that review could not hold (`outcome="overflow"`).
    pub fn count_overflow(&self, route: &str) {
        self.metrics.reviews.with_label_values(&[route, "overflow"]).inc();
    }

    /// Decides the pending review `trace_id`: `state` is approved, rejected or expired. Counts
    /// it, observes the wait, frees the budget of deleted images and sends the route's webhook.
    /// A reviewer's approval or rejection that comes after the item's `expires_unix_nano`
    /// expires it instead and fails with [`DecideError::Decided`]`(Expired)`.
    pub async fn decide(
        &self,
        policy: &Policy,
        trace_id: &str,
        state: ReviewState,
        reviewer: &str,
        reason: Option<&str>,
    ) -> Result<ReviewItem, DecideError> {
        let db = self.db().ok_or(DecideError::Unavailable)?;
        let now = now_unix_nano();
        // Approved images are kept as long again as the route lets items wait, for the client
        // to collect them.
        let route_of = |name: &str| policy.routes.iter().find(|r| r.name == name).map(|r| r.review.clone());
        let before = db.review(trace_id).await?.ok_or(DecideError::NotFound)?;
        // A reviewer's decision after the item's time ran out (the sweep runs once a second)
        // is too late: the item expires now instead, and the reviewer is told so.
        let late =
            state != ReviewState::Expired && before.state == ReviewState::Pending && before.expires_unix_nano <= now;
        let (state, reviewer, reason) =
            if late { (ReviewState::Expired, "acc", Some(EXPIRED_REASON)) } else { (state, reviewer, reason) };
        let settings = route_of(&before.route).unwrap_or_default();
        let keep_until = now.saturating_add(settings.ttl.as_nanos() as u64);
        let Some(item) = db.decide_review(trace_id, state, reviewer, reason, now, keep_until).await? else {
            let current = db.review(trace_id).await?.ok_or(DecideError::NotFound)?;
            return Err(DecideError::Decided(current.state));
        };
        let m = &self.metrics;
        m.reviews.with_label_values(&[&item.route, state.name()]).inc();
        m.depth.with_label_values(&[&item.route]).dec();
        let waited = now.saturating_sub(item.held_unix_nano) as f64 / 1e9;
        m.wait.with_label_values(&[&item.route]).observe(waited);
        if state != ReviewState::Approved {
            self.release(before.bytes_held);
        }
        self.notify(&settings, &policy.review, &item);
        if late {
            return Err(DecideError::Decided(ReviewState::Expired));
        }
        Ok(item)
    }

    fn release(&self, bytes: u64) {
        let _ = self.used.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| Some(u.saturating_sub(bytes)));
        self.metrics.held_bytes.set(self.used.load(Ordering::Relaxed) as i64);
    }

    /// Sends `item`'s decision to the route's webhook, when it has one, in the background.
    fn notify(&self, settings: &ReviewSettings, budget: &ReviewBudget, item: &ReviewItem) {
        let (Some(url), Some(env)) = (&settings.webhook_url, &settings.webhook_secret_env) else { return };
        let delivery = webhook::Delivery::new(url.clone(), env, budget, item);
        let counter = self.metrics.webhooks.clone();
        let route = item.route.clone();
        self.deliveries.spawn(async move { delivery.send(&route, &counter).await });
    }

    /// Reads the queue's totals from the store: the depth gauge per route and the bytes held.
    /// Run at start-up and then every [`REFRESH_EVERY`], so the gauge also follows decisions
    /// taken by other replicas on a shared store.
    async fn load(&self, db: &TraceDb) -> Result<(), StoreError> {
        let (pending, bytes) = db.review_totals().await?;
        let mut known = crate::lock(&self.routes);
        for route in known.iter() {
            if !pending.iter().any(|(r, _)| r == route) {
                self.metrics.depth.with_label_values(&[route]).set(0);
            }
        }
        for (route, n) in pending {
            self.metrics.depth.with_label_values(&[&route]).set(n as i64);
            known.insert(route);
        }
        drop(known);
        self.used.store(bytes, Ordering::Release);
        self.metrics.held_bytes.set(bytes as i64);
        self.loaded.store(true, Ordering::Release);
        self.loaded_tx.send_replace(true);
        Ok(())
    }

    /// Expires the pending items whose time has come and deletes approved images kept long
    /// enough. Returns how many items expired.
    pub async fn sweep(&self, policy: &Policy) -> Result<usize, StoreError> {
        let Some(db) = self.db() else { return Ok(0) };
        let now = now_unix_nano();
        let mut expired = 0;
        for id in db.due_reviews(now, 100).await? {
            match self.decide(policy, &id, ReviewState::Expired, "acc", Some(EXPIRED_REASON)).await {
                Ok(_) => expired += 1,
                // Decided meanwhile (by a reviewer or another replica).
                Err(DecideError::Decided(_) | DecideError::NotFound) => {}
                Err(DecideError::Store(e)) => return Err(e),
                Err(DecideError::Unavailable) => break,
            }
        }
        let freed = db.drop_collected_reviews(now).await?;
        if freed > 0 {
            self.release(freed);
        }
        Ok(expired)
    }

    /// The queue's background task: reads the totals once the store opens, then expires items
    /// every second until `shutdown`.
    pub async fn run(self: Arc<Self>, policy: Arc<PolicyStore>, shutdown: CancellationToken) {
        if !self.enabled() {
            return;
        }
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut wait = tokio::time::interval(Duration::from_millis(50));
        let mut last_refresh = tokio::time::Instant::now();
        loop {
            let pause = if self.loaded.load(Ordering::Acquire) { tick.tick() } else { wait.tick() };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = pause => {}
            }
            if !self.loaded.load(Ordering::Acquire) {
                if let Some(db) = self.db() {
                    if let Err(e) = self.load(&db).await {
                        tracing::warn!("review queue: cannot read its totals from the store: {e}");
                    }
                    last_refresh = tokio::time::Instant::now();
                }
                continue;
            }
            if let Err(e) = self.sweep(&policy.snapshot().policy).await {
                tracing::warn!("review queue: expiry sweep failed: {e}");
            }
            if last_refresh.elapsed() >= REFRESH_EVERY {
                last_refresh = tokio::time::Instant::now();
                if let Some(db) = self.db() {
                    if let Err(e) = self.load(&db).await {
                        tracing::warn!("review queue: cannot read its totals from the store: {e}");
                    }
                }
            }
        }
        self.deliveries.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.deliveries.wait()).await;
    }
}
