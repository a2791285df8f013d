//! What the gateway learns about its providers while it runs, kept across policy reloads (by
//! name): each route target's health window, each provider's circuit breaker, its 429 pause and
//! its concurrency slots with their bounded wait queue. Snapshots resolve their handles once, so
//! a request only locks the small per-target and per-provider state it touches.

use crate::lock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use crossbeam_queue::ArrayQueue;
use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::cluster::{unix_ms, Cluster, Published};
use crate::health::{
    Admit, Breaker, BreakerSettings, BreakerTransition, HealthSettings, Sample, TargetHealth, Transition,
};
use crate::metrics::Metrics;
use crate::policy::{Concurrency, Policy};
use crate::providers::ProviderError;
use crate::routing::Step;

/// One provider's shared state.
pub struct ProviderState {
    pub name: String,
    breaker: Mutex<Breaker>,
    /// Set while the breaker is closed with no failure counted: requests then skip its lock
    /// (the proxy workers would otherwise contend for it on every attempt).
    breaker_quiet: AtomicBool,
    /// End of a 429 pause, as nanoseconds after `base()`; 0 for none.
    paused_until: AtomicU64,
    /// A 429 pause and an opened breaker learnt here and not yet published to the other
    /// replicas (`[cluster]`): until when, as Unix ms; 0 for none.
    unpublished: [AtomicU64; 2],
    /// Until when another replica's opened breaker holds this provider off, Unix ms; 0 for
    /// none (only with `share_breakers`).
    shared_open_until: AtomicU64,
    /// The newest reset by hand (`POST /admin/providers/{name}/reset`) this replica applied,
    /// as Redis's Unix ms (`[cluster]`); 0 for none.
    reset_seen: AtomicU64,
    /// The configured limit and its semaphore; replaced when a reload changes the limit
    /// (attempts holding a permit of the old one finish on it).
    slots: ArcSwapOption<(u32, Arc<Semaphore>)>,
    /// Attempts waiting for a slot.
    pub queued: AtomicUsize,
    /// Attempts holding a slot (or in flight, with no limit).
    pub in_flight: AtomicUsize,
}

/// What [`ProviderState::reset`] lifted.
#[derive(Debug, Clone, Copy)]
pub struct Lifted {
    /// What was left of a 429 pause.
    pub paused_for: Option<Duration>,
    /// What was left of another replica's opened breaker, held here (`share_breakers`).
    pub shared_open_for: Option<Duration>,
    /// The breaker's state before: `closed`, `half_open` or `open`.
    pub breaker: &'static str,
}

/// A slot on a provider, held while its request is in flight.
pub struct Slot {
    _permit: Option<OwnedSemaphorePermit>,
    provider: Arc<ProviderState>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.provider.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ProviderState {
    fn new(name: &str) -> ProviderState {
        ProviderState {
            name: name.to_string(),
            breaker: Mutex::new(Breaker::new()),
            breaker_quiet: AtomicBool::new(true),
            paused_until: AtomicU64::new(0),
            unpublished: [AtomicU64::new(0), AtomicU64::new(0)],
            shared_open_until: AtomicU64::new(0),
            reset_seen: AtomicU64::new(0),
            slots: ArcSwapOption::empty(),
            queued: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn configure(&self, c: Option<&Concurrency>) {
        let current = self.slots.load();
        match (c, current.as_deref()) {
            (None, _) => self.slots.store(None),
            (Some(c), Some((max, _))) if *max == c.max => {}
            (Some(c), _) => self.slots.store(Some(Arc::new((c.max, Arc::new(Semaphore::new(c.max as usize)))))),
        }
    }

    /// How long the provider stays paused after a 429, if it is.
    pub fn paused_for(&self, now: Instant) -> Option<Duration> {
        let until = self.paused_until.load(Ordering::Relaxed);
        let now = now.saturating_duration_since(base()).as_nanos() as u64;
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// How long a breaker another replica opened (shared with `share_breakers`) still holds
    /// this provider off, when it does.
    pub fn shared_open_for(&self) -> Option<Duration> {
        let held = self.shared_open_until.load(Ordering::Relaxed);
        let now = unix_ms();
        (held > now).then(|| Duration::from_millis(held - now))
    }

    /// Pauses the provider for `d` (a later pause never shortens an earlier one).
    pub fn pause(&self, now: Instant, d: Duration) {
        let until = (now + d).saturating_duration_since(base()).as_nanos() as u64;
        self.paused_until.fetch_max(until.max(1), Ordering::Relaxed);
    }

    /// Lifts every hold-off by hand: the 429 pause (also one not yet published to the other
    /// replicas, and another replica's opened breaker held here), and closes the breaker with
    /// its failures forgotten. Counted and logged as a breaker transition when the breaker was
    /// not closed. Returns what was lifted.
    pub fn reset(&self, reason: &str, metrics: &Metrics) -> Lifted {
        let now = Instant::now();
        let lifted = Lifted {
            paused_for: self.paused_for(now),
            shared_open_for: self.shared_open_for(),
            breaker: self.breaker().state_label(),
        };
        self.paused_until.store(0, Ordering::Relaxed);
        for u in &self.unpublished {
            u.store(0, Ordering::Relaxed);
        }
        self.shared_open_until.store(0, Ordering::Relaxed);
        // A closed breaker with nothing counted keeps its last reason (a reset applied twice,
        // or one from another replica, says nothing new here).
        let mut b = self.breaker();
        if b.state_label() != "closed" || b.consecutive_failures() > 0 {
            if let Some(t) = b.reset(reason.to_string()) {
                breaker_moved(metrics, &self.name, &t, b.gauge());
            }
            self.breaker_settled(&b);
        }
        lifted
    }

    pub fn breaker(&self) -> MutexGuard<'_, Breaker> {
        lock(&self.breaker)
    }

    /// Whether the breaker is closed with nothing counted, so an attempt needs no lock.
    pub fn breaker_quiet(&self) -> bool {
        self.breaker_quiet.load(Ordering::Relaxed)
    }

    /// To call with the breaker's lock held, after it changed.
    pub fn breaker_settled(&self, b: &Breaker) {
        let quiet = b.state_label() == "closed" && b.consecutive_failures() == 0;
        self.breaker_quiet.store(quiet, Ordering::Relaxed);
    }

    /// Waits for a slot under the provider's limit: at most `max_queue` attempts wait, each for
    /// at most its queue timeout (or `budget`). The wait is measured in `acc_queue_seconds`.
    pub async fn acquire(
        self: &Arc<Self>,
        limit: Option<&Concurrency>,
        budget: Duration,
        metrics: &Metrics,
    ) -> Result<Slot, ProviderError> {
        let slots = self.slots.load();
        let (Some(limit), Some((_, sem))) = (limit, slots.as_deref()) else {
            self.in_flight.fetch_add(1, Ordering::AcqRel);
            return Ok(Slot { _permit: None, provider: self.clone() });
        };
        let permit = match sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let waiting = self.queued.fetch_add(1, Ordering::AcqRel) + 1;
                let _queued = Queued(&self.queued);
                if waiting > limit.max_queue as usize {
                    metrics.queue_rejected.with_label_values(&[&self.name, "full"]).inc();
                    return Err(if limit.reject_when_full {
                        ProviderError::Busy { timed_out: false }
                    } else {
                        ProviderError::QueueFull
                    });
                }
                let started = Instant::now();
                let wait = limit.queue_timeout.map_or(budget, |t| t.min(budget));
                let got = tokio::time::timeout(wait, sem.clone().acquire_owned()).await;
                metrics.queue_seconds.with_label_values(&[&self.name]).observe(started.elapsed().as_secs_f64());
                match got {
                    Ok(Ok(p)) => p,
                    _ => {
                        metrics.queue_rejected.with_label_values(&[&self.name, "timeout"]).inc();
                        return Err(if limit.reject_when_full {
                            ProviderError::Busy { timed_out: true }
                        } else {
                            ProviderError::QueueTimeout
                        });
                    }
                }
            }
        };
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Ok(Slot { _permit: Some(permit), provider: self.clone() })
    }
}

/// A provider's admission of one attempt, past its 429 pause and its breaker. When it holds a
/// half-open breaker's probe slot and is dropped without [`Admission::settle`] (the attempt was
/// cancelled or queued out), the slot is freed.
pub struct Admission<'a> {
    provider: &'a ProviderState,
    probe: bool,
}

impl ProviderState {
    /// Whether an attempt may go to this provider now: not while a 429 pause lasts
    /// (`Skipped { label: "paused" }`; a pause longer than `max_pause`, the policy's
    /// `max_pause_ms` now, is cut to it), not while its breaker is open
    /// (`Skipped { label: "breaker_open" }`), each with how long is left; a half-open breaker
    /// admits it as a probe. Breaker moves are logged and counted.
    pub fn admit(
        &self,
        now: Instant,
        cfg: &BreakerSettings,
        max_pause: Duration,
        metrics: &Metrics,
    ) -> Result<Admission<'_>, ProviderError> {
        if let Some(mut left) = self.paused_for(now) {
            // A pause taken under a longer `max_pause_ms` than the policy's now (a reload
            // shortened it) ends when the current one says.
            if left > max_pause {
                let until = (now + max_pause).saturating_duration_since(base()).as_nanos() as u64;
                self.paused_until.fetch_min(until.max(1), Ordering::Relaxed);
                left = max_pause;
            }
            if !left.is_zero() {
                return Err(ProviderError::Skipped { label: "paused", retry_in: left });
            }
        }
        let held = self.shared_open_until.load(Ordering::Relaxed);
        if held != 0 {
            let now_ms = unix_ms();
            if held > now_ms {
                return Err(ProviderError::Skipped {
                    label: "breaker_open",
                    retry_in: Duration::from_millis(held - now_ms),
                });
            }
        }
        // The common case, a closed breaker with nothing counted, needs no lock.
        if self.breaker_quiet() {
            return Ok(Admission { provider: self, probe: false });
        }
        let mut b = self.breaker();
        let (admit, moved) = b.admit(now, cfg);
        self.breaker_settled(&b);
        if let Some(t) = moved {
            breaker_moved(metrics, &self.name, &t, b.gauge());
        }
        match admit {
            Admit::No { retry_in } => Err(ProviderError::Skipped { label: "breaker_open", retry_in }),
            Admit::Probe => Ok(Admission { provider: self, probe: true }),
            Admit::Yes => Ok(Admission { provider: self, probe: false }),
        }
    }
}

impl Admission<'_> {
    /// Feeds the provider's answer to its breaker (what counts: [`breaker_evidence`]) and, for
    /// a 429 with a retry hint, pauses the provider for that long, at most `max_pause`; so does a
    /// 429 among `partial`, the failed calls of an answer that still made images (an adapter
    /// that makes one call per image). Returns the evidence: `Some(true)` the provider answered,
    /// `Some(false)` it failed, `None` neither.
    pub fn settle(
        mut self,
        result: Result<(), &ProviderError>,
        partial: &[std::sync::Arc<ProviderError>],
        cfg: &BreakerSettings,
        max_pause: Duration,
        metrics: &Metrics,
    ) -> Option<bool> {
        let ps = self.provider;
        let evidence = breaker_evidence(&result);
        match evidence {
            // A closed breaker with nothing counted stays so, without its lock.
            Some(true) if !self.probe && ps.breaker_quiet() => {}
            Some(ok) => {
                let probe = std::mem::take(&mut self.probe);
                let why = result.err().map(|e| e.to_string()).unwrap_or_default();
                let mut b = ps.breaker();
                let now = Instant::now();
                if let Some(t) = b.on_result(now, ok, probe, &why, cfg) {
                    breaker_moved(metrics, &ps.name, &t, b.gauge());
                    if let Some(d) = b.open_for(now) {
                        ps.unpublished[1].fetch_max(unix_ms() + d.as_millis() as u64, Ordering::Relaxed);
                    }
                }
                ps.breaker_settled(&b);
            }
            None => {}
        }
        // The longest wait any 429 asked for: the attempt's own, or one of its calls'.
        let wait = result.err().into_iter().chain(partial.iter().map(|e| &**e)).filter_map(|e| match e {
            ProviderError::Status { status, retry_after: Some(d), .. }
                if *status == http::StatusCode::TOO_MANY_REQUESTS =>
            {
                Some(*d)
            }
            _ => None,
        });
        // A zero wait (`Retry-After: 0`, a date already past) asks for no pause.
        if let Some(d) = wait.max().filter(|d| !d.is_zero()) {
            let d = d.min(max_pause);
            ps.pause(Instant::now(), d);
            ps.unpublished[0].fetch_max(unix_ms() + d.as_millis() as u64, Ordering::Relaxed);
            metrics.provider_paused.with_label_values(&[&ps.name]).inc();
            tracing::warn!(provider = %ps.name, pause_ms = d.as_millis() as u64, "provider answered 429; paused");
        }
        evidence
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.provider.breaker().probe_abandoned();
        }
    }
}

/// The instant paused-until times count from.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// A route target's health window, shared by the proxy workers. Attempts push their samples on
/// a lock-free queue; the window takes them in under its lock when it is judged (only routes
/// with thresholds judge on every attempt, and skip it when another worker is at it) or read.
pub struct HealthCell {
    pending: ArrayQueue<(Instant, Duration, Sample)>,
    window: Mutex<TargetHealth>,
    demoted: AtomicBool,
}

impl Default for HealthCell {
    fn default() -> Self {
        HealthCell {
            pending: ArrayQueue::new(1024),
            window: Mutex::new(TargetHealth::new()),
            demoted: AtomicBool::new(false),
        }
    }
}

impl HealthCell {
    /// Takes in the pending samples; returns the demotion changes they caused.
    fn drain(&self, h: &mut TargetHealth, s: &HealthSettings, moved: &mut Vec<Transition>) {
        while let Some((at, latency, sample)) = self.pending.pop() {
            if let Some(t) = h.record(at, latency, sample, s) {
                moved.push(t);
            }
        }
        self.demoted.store(h.demoted().is_some(), Ordering::Relaxed);
    }

    /// Records one attempt; with thresholds set, judges the window (unless another worker is).
    pub fn record(&self, now: Instant, latency: Duration, sample: Sample, s: &HealthSettings) -> Vec<Transition> {
        self.pending.force_push((now, latency, sample));
        let mut moved = Vec::new();
        let judged = s.latency_slo.is_some() || s.max_error_ratio.is_some() || s.max_eval_fail_ratio.is_some();
        if judged || self.demoted.load(Ordering::Relaxed) {
            if let Ok(mut h) = self.window.try_lock() {
                self.drain(&mut h, s, &mut moved);
            }
        }
        moved
    }

    /// Whether the target is demoted, re-judged first when it is (samples age out).
    pub fn demoted(&self, now: Instant, s: &HealthSettings) -> (bool, Vec<Transition>) {
        let mut moved = Vec::new();
        if !self.demoted.load(Ordering::Relaxed) {
            return (false, moved);
        }
        if let Ok(mut h) = self.window.try_lock() {
            self.drain(&mut h, s, &mut moved);
            if let Some(t) = h.refresh(now, s) {
                moved.push(t);
            }
            self.demoted.store(h.demoted().is_some(), Ordering::Relaxed);
        }
        (self.demoted.load(Ordering::Relaxed), moved)
    }

    /// The window with every pending sample taken in, for reading (admin, metrics, hedging).
    pub fn window(&self, s: &HealthSettings) -> MutexGuard<'_, TargetHealth> {
        let mut h = lock(&self.window);
        let mut moved = Vec::new();
        self.drain(&mut h, s, &mut moved);
        h
    }
}

/// The state a snapshot's route target uses.
#[derive(Clone)]
pub struct TargetLive {
    /// The state of the target's provider (shared by every target naming it).
    pub provider: Arc<ProviderState>,
    /// The target's own health window.
    pub health: Arc<HealthCell>,
    /// (route, provider, model label): the target's metric labels.
    labels: Arc<(String, String, String)>,
}

impl TargetLive {
    /// Records one attempt in the target's health window (`latency` as the provider took it);
    /// demotions and restorations it causes are logged and counted.
    pub fn record(&self, latency: Duration, sample: Sample, s: &HealthSettings, metrics: &Metrics) {
        for t in self.health.record(Instant::now(), latency, sample, s) {
            self.health_moved(metrics, &t);
        }
    }

    /// Whether the target is demoted now (re-judged first when it is); changes are logged and
    /// counted.
    pub fn demoted(&self, now: Instant, s: &HealthSettings, metrics: &Metrics) -> bool {
        let (demoted, moved) = self.health.demoted(now, s);
        for t in moved {
            self.health_moved(metrics, &t);
        }
        demoted
    }

    fn health_moved(&self, metrics: &Metrics, t: &Transition) {
        let (route, provider, model) = (&self.labels.0, &self.labels.1, &self.labels.2);
        let to = if t.demoted { "demoted" } else { "restored" };
        metrics.target_demotions.with_label_values(&[route, provider, model, to]).inc();
        metrics.target_demoted.with_label_values(&[route, provider, model]).set(i64::from(t.demoted));
        tracing::warn!(route, provider, model, to, reason = %t.reason, "route target health changed");
    }
}

/// The registry, by name.
#[derive(Default)]
pub struct Live {
    providers: DashMap<String, Arc<ProviderState>>,
    /// Keyed by (route, provider, model label).
    targets: DashMap<(String, String, String), Arc<HealthCell>>,
}

impl Live {
    /// The state of provider `name`, made on first use.
    pub fn provider(&self, name: &str) -> Arc<ProviderState> {
        if let Some(p) = self.providers.get(name) {
            return p.clone();
        }
        self.providers.entry(name.to_string()).or_insert_with(|| Arc::new(ProviderState::new(name))).clone()
    }

    /// The handles of every route target of `policy`, indexed like `policy.routes[r].targets[t]`;
    /// applies the policy's concurrency limits.
    pub fn resolve(&self, policy: &Policy) -> Vec<Vec<TargetLive>> {
        for (name, spec) in &policy.providers {
            self.provider(name).configure(spec.concurrency.as_ref());
        }
        policy
            .routes
            .iter()
            .map(|r| {
                r.targets
                    .iter()
                    .map(|t| {
                        let key = (
                            r.name.clone(),
                            t.provider.clone(),
                            crate::metrics::model_label(t.model.as_deref()).to_string(),
                        );
                        let health = self.targets.entry(key.clone()).or_default().clone();
                        TargetLive { provider: self.provider(&t.provider), health, labels: Arc::new(key) }
                    })
                    .collect()
            })
            .collect()
    }

    /// One exchange of hold-offs with the other replicas (`[cluster]`): publishes the 429
    /// pauses (and, with `share_breakers`, opened breakers) learnt here since the last one, and
    /// applies everyone's still running. When Redis cannot answer, what was learnt here is kept
    /// for the next exchange.
    ///
    /// A reset by hand applies to what was learnt before this replica applied it: each hold-off
    /// goes out with the newest reset this replica has applied, and Redis keeps it only when no
    /// later reset is recorded (else it is dropped, and the reset is applied here below).
    pub async fn exchange_hold_offs(&self, cluster: &Cluster, metrics: &Metrics) {
        let share_breakers = cluster.settings().share_breakers;
        let mut mine: [Vec<Published>; 2] = [Vec::new(), Vec::new()];
        for p in self.providers.iter() {
            for (i, out) in mine.iter_mut().enumerate() {
                let until = p.unpublished[i].swap(0, Ordering::Relaxed);
                if until != 0 && (i == 0 || share_breakers) {
                    out.push((p.name.clone(), until, p.reset_seen.load(Ordering::Relaxed)));
                }
            }
        }
        match cluster.exchange(&mine[0], &mine[1]).await {
            Ok((pauses, breakers, resets)) => {
                // Resets by hand on any replica first: the hold-offs read with them were all
                // published after them.
                for (name, at) in &resets {
                    if let Some(p) = self.providers.get(name) {
                        if p.reset_seen.fetch_max(*at, Ordering::Relaxed) < *at {
                            p.reset("reset by hand on another replica", metrics);
                        }
                    }
                }
                let now_ms = unix_ms();
                let now = Instant::now();
                for (name, until) in pauses.iter().filter(|(_, u)| *u > now_ms) {
                    if let Some(p) = self.providers.get(name) {
                        p.pause(now, Duration::from_millis(until - now_ms));
                    }
                }
                for (name, until) in breakers.iter().filter(|_| share_breakers) {
                    if let Some(p) = self.providers.get(name) {
                        p.shared_open_until.fetch_max(*until, Ordering::Relaxed);
                    }
                }
            }
            Err(_) => {
                for (i, list) in mine.iter().enumerate() {
                    for (name, until, _) in list {
                        if let Some(p) = self.providers.get(name) {
                            p.unpublished[i].fetch_max(*until, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }

    /// Lifts provider `name`'s hold-offs by hand ([`ProviderState::reset`]) on this replica
    /// and, with `[cluster]`, on every replica: its shared pause and opened breaker are deleted
    /// from Redis and the reset published, so the others apply it at their next exchange
    /// (`sync_ms`). Returns what was lifted here, and `Err` (after the local reset) when Redis
    /// did not answer: the other replicas keep their hold-offs until they end.
    pub async fn reset(
        &self,
        name: &str,
        cluster: Option<&Cluster>,
        metrics: &Metrics,
    ) -> (Lifted, Result<(), crate::cluster::Unavailable>) {
        // Redis first, then here: an exchange running meanwhile may have read the pause just
        // deleted and apply it after the local reset; this replica then applies its own reset
        // again at its next exchange, as the others do (a pause learnt here in between is
        // lifted with it).
        let shared = match cluster {
            Some(c) => c.reset_hold_offs(name).await.map(|_| ()),
            None => Ok(()),
        };
        let lifted = self.provider(name).reset("reset by hand", metrics);
        (lifted, shared)
    }

    /// Every provider's state, by name.
    pub fn providers(&self) -> Vec<Arc<ProviderState>> {
        let mut v: Vec<_> = self.providers.iter().map(|e| e.value().clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// Reorders a plan so that targets demoted by their health window go
/// to the back, each group keeping plan order. `targets` is a snapshot's state, indexed like
/// `policy.routes[r].targets[t]`.
pub fn healthy_first(
    policy: &Policy,
    targets: &[Vec<TargetLive>],
    steps: &mut Vec<Step>,
    now: Instant,
    metrics: &Metrics,
) {
    let mut demoted = Vec::new();
    steps.retain(|s| {
        let is_demoted = targets[s.route][s.target].demoted(now, &policy.routes[s.route].health, metrics);
        if is_demoted {
            demoted.push(*s);
        }
        !is_demoted
    });
    steps.extend(demoted);
}

/// Logs and counts a breaker transition.
pub fn breaker_moved(metrics: &Metrics, provider: &str, t: &BreakerTransition, state: i64) {
    metrics.breaker_state.with_label_values(&[provider]).set(state);
    metrics.breaker_transitions.with_label_values(&[provider, t.to]).inc();
    tracing::warn!(provider, from = t.from, to = t.to, reason = %t.reason, "circuit breaker moved");
}

/// Whether an attempt's result is evidence about the provider's health, for the breaker:
/// `Some(true)` it answered, `Some(false)` it failed, `None` says nothing (the client's own
/// fault, a rate limit, a skipped attempt).
pub fn breaker_evidence(result: &Result<(), &ProviderError>) -> Option<bool> {
    match result {
        Ok(()) => Some(true),
        Err(e) => match e {
            ProviderError::Connect(_)
            | ProviderError::Timeout
            // A 2xx answer still arriving at the deadline: the provider is slow. (Evaluation
            // running out of time never reaches the breaker: its evidence was the answer.)
            | ProviderError::TimeoutAfterAnswer(_)
            | ProviderError::Transport(_)
            | ProviderError::BadResponse(_) => Some(false),
            ProviderError::Status { status, .. } if status.is_server_error() => Some(false),
            // Billing, credits, a revoked key: every request fails until someone acts.
            ProviderError::Account { provider_wide: true, .. } => Some(false),
            ProviderError::EvalFailed(_) | ProviderError::Blocked(_) => Some(true),
            _ => None,
        },
    }
}
