//! The trace writer: requests hand their records to a bounded queue ([`TraceWriter::submit`]
//! never waits) and one background task batches them into the store.
//!
//! Nothing the store does reaches a request: a full queue, a store that cannot be opened or an
//! insert that fails drops the records and counts them in the `dropped` counter handed to
//! [`TraceWriter::spawn`] (`acc_trace_dropped_total{reason}`), with one `warn!` per reason at
//! most every 10 s giving the count since the last. The task reopens the store with backoff
//! and writing resumes by itself. A second task applies retention while the store is open.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::{IntCounter, IntCounterVec};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;

use super::db::{StoreConfig, StoreError, TraceDb};
use super::record::TraceRecord;
use crate::sched::Background;

/// Called by the writer task with each record it takes from the queue, before the insert
/// (the OTLP exporter's feed). Runs on the writer task: it must be quick and never block.
pub type RecordHook = Arc<dyn Fn(&TraceRecord) + Send + Sync>;

/// Why records were dropped: the `reason` label of the dropped counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The queue was full when the request submitted its record.
    QueueFull,
    /// The store could not be opened (or its connection was lost) when the batch was due.
    StoreUnavailable,
    /// The insert failed twice (disk full, a statement error).
    StoreError,
    /// The writer had been shut down.
    Closed,
    /// Not a lost record: one kept without its images' digests, because queued records held
    /// [`PENDING_IMAGE_BUDGET`] bytes of images already.
    ImagesNotDigested,
}

impl DropReason {
    const ALL: [DropReason; 5] = [
        DropReason::QueueFull,
        DropReason::StoreUnavailable,
        DropReason::StoreError,
        DropReason::Closed,
        DropReason::ImagesNotDigested,
    ];

    /// The label value: `queue_full`, `store_unavailable`, `store_error`, `closed`,
    /// `images_not_digested`.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::StoreUnavailable => "store_unavailable",
            DropReason::StoreError => "store_error",
            DropReason::Closed => "closed",
            DropReason::ImagesNotDigested => "images_not_digested",
        }
    }
}

/// At most one warning per reason in this interval.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// The longest wait between two attempts to open the store.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often an idle writer checks that its store still answers.
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Before the one retry of a failed insert.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Drops of one reason: the counter, and what is still to be logged.
struct DropSlot {
    counter: IntCounter,
    /// Dropped since the last warning.
    pending: AtomicU64,
    /// When the last warning was logged, ms since `Drops::base` plus one; 0: never.
    last_log: AtomicU64,
    /// The last error behind these drops, for the warning.
    last_error: Mutex<Option<String>>,
}

/// Counts and logs dropped records; shared by the handles (queue full) and the task.
struct Drops {
    slots: [DropSlot; 5],
    base: Instant,
    target: String,
}

impl Drops {
    fn new(dropped: &IntCounterVec, target: String) -> Drops {
        let slot = |r: DropReason| DropSlot {
            counter: dropped.with_label_values(&[r.label()]),
            pending: AtomicU64::new(0),
            last_log: AtomicU64::new(0),
            last_error: Mutex::new(None),
        };
        Drops { slots: DropReason::ALL.map(slot), base: Instant::now(), target }
    }

    fn slot(&self, reason: DropReason) -> &DropSlot {
        &self.slots[DropReason::ALL.iter().position(|r| *r == reason).unwrap_or(0)]
    }

    fn add(&self, reason: DropReason, n: u64, error: Option<&StoreError>) {
        if n == 0 {
            return;
        }
        let slot = self.slot(reason);
        slot.counter.inc_by(n);
        slot.pending.fetch_add(n, Ordering::Relaxed);
        if let Some(e) = error {
            *lock(&slot.last_error) = Some(e.to_string());
        }
        self.maybe_log(reason);
    }

    /// Logs the drops of `reason` since the last warning, unless one was logged less than
    /// [`LOG_INTERVAL`] ago.
    fn maybe_log(&self, reason: DropReason) {
        let slot = self.slot(reason);
        if slot.pending.load(Ordering::Relaxed) == 0 {
            return;
        }
        let now = self.base.elapsed().as_millis() as u64 + 1;
        let last = slot.last_log.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < LOG_INTERVAL.as_millis() as u64 {
            return;
        }
        if slot.last_log.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return;
        }
        let n = slot.pending.swap(0, Ordering::Relaxed);
        let error = lock(&slot.last_error).take();
        tracing::warn!(
            reason = reason.label(),
            dropped = n,
            store = %self.target,
            error = error.as_deref().unwrap_or(""),
            "trace records dropped since the last report"
        );
    }

    fn log_all(&self) {
        for r in DropReason::ALL {
            self.maybe_log(r);
        }
    }
}

/// Locks a mutex, taking over one a panicking thread poisoned (as `crate::lock`, which this
/// module may not import).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Msg {
    Record(Box<TraceRecord>),
    /// Answered once every message before it has been written or dropped.
    Flush(oneshot::Sender<()>),
}

struct Shared {
    tx: mpsc::Sender<Msg>,
    drops: Arc<Drops>,
    db: watch::Receiver<Option<TraceDb>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    pending: Arc<AtomicUsize>,
    /// Wakes the writer from its batch sleep (flush requests).
    wake: Arc<Notify>,
    /// The runtime the writer task runs on.
    runtime: tokio::runtime::Handle,
}

/// The handle requests submit records through. Cheap to clone; the writer task ends once the
/// last handle is gone and the queue is drained (or at [`TraceWriter::shutdown`]).
#[derive(Clone)]
pub struct TraceWriter {
    shared: Arc<Shared>,
}

impl TraceWriter {
    /// Starts the writer task (and the retention task when `cfg.retention_days` or
    /// `cfg.max_rows` is set) on the current tokio runtime; panics outside one. Returns at once:
    /// the store is opened by the task, retried with backoff from `cfg.reopen_backoff` up to
    /// 30 s while it fails.
    ///
    /// `dropped` is `acc_trace_dropped_total` with the one label `reason` ([`DropReason`]);
    /// `written` counts records in committed batches (a duplicate trace id counts, though it was
    /// ignored); `on_record` sees every record the task dequeues, written or not.
    pub fn spawn(
        cfg: StoreConfig,
        dropped: IntCounterVec,
        written: IntCounter,
        on_record: Option<RecordHook>,
    ) -> TraceWriter {
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        let (db_tx, db_rx) = watch::channel(None);
        let drops = Arc::new(Drops::new(&dropped, cfg.target()));
        let pending = Arc::new(AtomicUsize::new(0));
        let wake = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            tx,
            drops: drops.clone(),
            db: db_rx.clone(),
            tasks: Mutex::new(Vec::new()),
            pending: pending.clone(),
            wake: wake.clone(),
            runtime: tokio::runtime::Handle::current(),
        });
        let writer = TraceWriter { shared: shared.clone() };
        // The task holds no sender: dropping the last handle closes the queue, and the task ends
        // once it has written what was queued.
        let task = Task { cfg: cfg.clone(), rx, written, on_record, db_tx, drops, pending, wake };
        let mut tasks = vec![tokio::spawn(task.run())];
        if cfg.retention_days.is_some() || cfg.max_rows.is_some() {
            tasks.push(tokio::spawn(retention(cfg, db_rx)));
        }
        *lock(&shared.tasks) = tasks;
        writer
    }

    /// Queues `record` for the store without waiting: when the queue is full (or the writer
    /// has shut down) the record is dropped and counted.
    pub fn submit(&self, mut record: TraceRecord) {
        let held = record.pending_bytes();
        if held > 0 {
            let before = self.shared.pending.fetch_add(held, Ordering::Relaxed);
            if before + held > PENDING_IMAGE_BUDGET {
                self.shared.pending.fetch_sub(held, Ordering::Relaxed);
                record.pending_images.clear();
                self.shared.drops.add(DropReason::ImagesNotDigested, 1, None);
            }
        }
        let held = record.pending_bytes();
        match self.shared.tx.try_send(Msg::Record(Box::new(record))) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.pending.fetch_sub(held, Ordering::Relaxed);
                self.shared.drops.add(DropReason::QueueFull, 1, None)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.shared.pending.fetch_sub(held, Ordering::Relaxed);
                self.shared.drops.add(DropReason::Closed, 1, None)
            }
        }
    }

    /// Waits until every record submitted before the call has been written or dropped. Returns
    /// false when the writer has stopped.
    pub async fn flush(&self) -> bool {
        let (done, wait) = oneshot::channel();
        if self.shared.tx.send(Msg::Flush(done)).await.is_err() {
            return false;
        }
        self.shared.wake.notify_one();
        wait.await.is_ok()
    }

    /// For shutdown: flushes within `deadline`, then stops the writer and retention tasks.
    /// Records submitted afterwards are dropped (`reason="closed"`). Returns whether the flush
    /// finished in time (false: records still queued were lost, uncounted).
    pub async fn shutdown(&self, deadline: Duration) -> bool {
        let flushed = tokio::time::timeout(deadline, self.flush()).await.unwrap_or(false);
        let tasks = std::mem::take(&mut *lock(&self.shared.tasks));
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        flushed
    }

    /// The open store, for reads (admin API, CLI); `None` while it is unavailable.
    pub fn db(&self) -> Option<TraceDb> {
        self.shared.db.borrow().clone()
    }

    /// Whether the store is open (for `/readyz` and the admin views).
    pub fn is_available(&self) -> bool {
        self.shared.db.borrow().is_some()
    }

    /// The runtime the writer runs on (the trace thread's, in `acc serve`), for other tasks
    /// that write to the store in batches: with SQLite a batch runs on the calling thread.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.shared.runtime
    }

    /// Records waiting in the queue.
    pub fn queued(&self) -> usize {
        self.shared.tx.max_capacity() - self.shared.tx.capacity()
    }
}

/// The writer task's state.
struct Task {
    cfg: StoreConfig,
    rx: mpsc::Receiver<Msg>,
    written: IntCounter,
    on_record: Option<RecordHook>,
    db_tx: watch::Sender<Option<TraceDb>>,
    drops: Arc<Drops>,
    /// Image bytes held by queued records (see [`PENDING_IMAGE_BUDGET`]).
    pending: Arc<AtomicUsize>,
    wake: Arc<Notify>,
}

/// Image bytes queued records may hold for their digests; a record submitted beyond it is
/// kept without its images' SHA-256 and size (the loss counted as `images_not_digested`), so
/// a slow store cannot pile up answers' images in memory.
pub const PENDING_IMAGE_BUDGET: usize = 256 << 20;

impl Task {
    async fn run(mut self) {
        let mut db: Option<TraceDb> = None;
        let mut backoff = self.cfg.reopen_backoff;
        let mut next_open = Instant::now();
        let mut open_logged: Option<Instant> = None;
        let mut last_checked = Instant::now();
        let batch_max = self.cfg.batch_max.max(1);
        let mut batch: Vec<TraceRecord> = Vec::with_capacity(batch_max);
        let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
        let mut priority: Option<Background> = None;
        loop {
            if self.cfg.adaptive_priority {
                self.adapt_priority(&mut priority);
            }
            if db.is_none() && Instant::now() >= next_open {
                match TraceDb::open(&self.cfg).await {
                    Ok(opened) => {
                        tracing::info!(store = %opened.target(), backend = ?opened.backend(), "trace store open");
                        self.db_tx.send_replace(Some(opened.clone()));
                        db = Some(opened);
                        backoff = self.cfg.reopen_backoff;
                        open_logged = None;
                    }
                    Err(e) => {
                        if open_logged.is_none_or(|t| t.elapsed() >= LOG_INTERVAL) {
                            tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "trace store cannot be opened; records are dropped until it can");
                            open_logged = Some(Instant::now());
                        }
                        next_open = Instant::now() + backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            // Wait for the first message no longer than until the next open attempt (or a
            // second, to report drops), then fill the batch for up to flush_interval.
            let idle = if db.is_none() {
                next_open.saturating_duration_since(Instant::now()).max(Duration::from_millis(10))
            } else {
                Duration::from_secs(1)
            };
            let open = self.collect(&mut batch, &mut flushes, batch_max, idle).await;
            if !batch.is_empty() {
                // Image digests, off the request path.
                let held: usize = batch.iter().map(|r| r.pending_bytes()).sum();
                if held > 0 {
                    for r in batch.iter_mut() {
                        r.settle_images();
                    }
                    self.pending.fetch_sub(held, Ordering::Relaxed);
                }
                if let Some(hook) = &self.on_record {
                    batch.iter().for_each(|r| hook(r));
                }
                self.write(&mut db, &batch).await;
                if db.is_none() && next_open <= Instant::now() {
                    next_open = Instant::now();
                }
                batch.clear();
                last_checked = Instant::now();
            } else if db.is_some() && last_checked.elapsed() >= HEALTH_CHECK_INTERVAL {
                // Idle: check the store is still there, so readiness and admin reads learn of an
                // outage before the next record does.
                last_checked = Instant::now();
                if let Some(store) = db.clone() {
                    if let Err(e) = store.ping().await {
                        if e.is_unavailable() {
                            tracing::warn!(error = %e, "trace store went away while idle; reopening");
                            db = None;
                            self.db_tx.send_replace(None);
                            next_open = Instant::now();
                        }
                    }
                }
            }
            for f in flushes.drain(..) {
                let _ = f.send(());
            }
            self.drops.log_all();
            if !open {
                break;
            }
        }
        self.db_tx.send_replace(None);
    }

    /// Moves the writer's thread to idle priority while the queue is at most an eighth full,
    /// and to nice ~10 while it is more than half full (see [`StoreConfig::adaptive_priority`]);
    /// in between it stays where it is. `at` is where it is now (`None`: not set yet).
    fn adapt_priority(&self, at: &mut Option<Background>) {
        let Some(want) = wanted_priority(self.rx.len(), self.rx.max_capacity()) else { return };
        if *at != Some(want) {
            if let Err(e) = crate::sched::set_current(want) {
                // Once per change of state: leaving SCHED_IDLE needs CAP_SYS_NICE or RLIMIT_NICE.
                tracing::warn!(
                    wanted = ?want,
                    "the trace writer cannot change its CPU priority ({e}); on a saturated machine more records may be dropped (counted)"
                );
            }
            *at = Some(want);
        }
    }

    /// Fills `batch` with up to `batch_max` records: waits up to `idle` for the first message,
    /// then up to `flush_interval` for more. A flush request ends the batch early. Returns
    /// false once the queue is closed and empty.
    async fn collect(
        &mut self,
        batch: &mut Vec<TraceRecord>,
        flushes: &mut Vec<oneshot::Sender<()>>,
        batch_max: usize,
        idle: Duration,
    ) -> bool {
        let first = match tokio::time::timeout(idle, self.rx.recv()).await {
            Err(_) => return true,
            Ok(None) => return false,
            Ok(Some(m)) => m,
        };
        match first {
            Msg::Record(r) => batch.push(*r),
            Msg::Flush(f) => {
                flushes.push(f);
                return true;
            }
        }
        if self.drain(batch, flushes, batch_max) {
            return true;
        }
        // Sleep rather than wait on the queue: a waiting receiver is woken by every record sent
        // (a futex wake on the request's thread and a wake-up of this one, per request), while
        // a sleeping one is not. A flush request wakes it early.
        let deadline = tokio::time::Instant::now() + self.cfg.flush_interval;
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = self.wake.notified() => {}
        }
        self.drain(batch, flushes, batch_max);
        true
    }

    /// Moves what the queue holds now into `batch`, up to `batch_max` records, without
    /// waiting. Returns true when the batch is due: full, or a flush request was reached.
    fn drain(
        &mut self,
        batch: &mut Vec<TraceRecord>,
        flushes: &mut Vec<oneshot::Sender<()>>,
        batch_max: usize,
    ) -> bool {
        while batch.len() < batch_max {
            match self.rx.try_recv() {
                Ok(Msg::Record(r)) => batch.push(*r),
                Ok(Msg::Flush(f)) => {
                    flushes.push(f);
                    return true;
                }
                // Empty, or closed: the next `collect` sees the closed queue.
                Err(_) => return false,
            }
        }
        true
    }

    /// Inserts the batch (one retry), or drops and counts it. Forgets the store when its
    /// connection is gone, so that the loop reopens it.
    async fn write(&self, db: &mut Option<TraceDb>, batch: &[TraceRecord]) {
        let n = batch.len() as u64;
        let drops = &self.drops;
        let Some(store) = db.clone() else {
            drops.add(DropReason::StoreUnavailable, n, None);
            return;
        };
        let mut result = store.insert_batch(batch).await;
        if matches!(&result, Err(e) if !e.is_unavailable()) {
            tokio::time::sleep(RETRY_PAUSE).await;
            result = store.insert_batch(batch).await;
        }
        match result {
            Ok(_) => self.written.inc_by(n),
            Err(e) if e.is_unavailable() => {
                drops.add(DropReason::StoreUnavailable, n, Some(&e));
                *db = None;
                self.db_tx.send_replace(None);
            }
            Err(e) => drops.add(DropReason::StoreError, n, Some(&e)),
        }
    }
}

/// The writer thread's priority for a queue holding `queued` of `capacity` records: idle up to
/// an eighth full, nice ~10 above half full, `None` (stay) in between.
fn wanted_priority(queued: usize, capacity: usize) -> Option<Background> {
    if queued * 2 > capacity {
        Some(Background::Nice)
    } else if queued * 8 <= capacity {
        Some(Background::Idle)
    } else {
        None
    }
}

/// Applies `[store] retention_days` and `max_rows` every `retention_interval`, and whenever
/// the store (re)opens; ends with the writer task.
async fn retention(cfg: StoreConfig, mut db: watch::Receiver<Option<TraceDb>>) {
    let mut tick = tokio::time::interval(cfg.retention_interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = db.changed() => if changed.is_err() { return },
        }
        let Some(store) = db.borrow_and_update().clone() else { continue };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        match store.prune(now, cfg.retention_days, cfg.max_rows).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, store = %store.target(), "trace retention applied"),
            Err(e) => tracing::warn!(error = %e, "trace retention failed"),
        }
    }
}

#[cfg(test)]
mod priority_tests {
    use super::*;

    #[test]
    fn the_writer_is_idle_while_it_keeps_up_and_takes_a_share_once_half_full() {
        let cap = 10_000;
        assert_eq!(wanted_priority(0, cap), Some(Background::Idle));
        assert_eq!(wanted_priority(1_250, cap), Some(Background::Idle));
        // Between an eighth and a half: stays where it is (no flapping around one threshold).
        assert_eq!(wanted_priority(1_251, cap), None);
        assert_eq!(wanted_priority(5_000, cap), None);
        assert_eq!(wanted_priority(5_001, cap), Some(Background::Nice));
        assert_eq!(wanted_priority(cap, cap), Some(Background::Nice));
        // A queue of one record: idle while empty, a share once it holds its record.
        assert_eq!((wanted_priority(0, 1), wanted_priority(1, 1)), (Some(Background::Idle), Some(Background::Nice)));
    }
}
