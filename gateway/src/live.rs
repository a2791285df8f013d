//! What the gateway learns about its providers while it runs, kept across policy reloads (by
//! name): each route target's health window, each provider's circuit breaker, its 429 pause and
//! its concurrency slots with their bounded wait queue. Snapshots resolve their handles once, so
//! a request only locks the small per-target and per-provider state it touches.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::health::{Breaker, BreakerTransition, TargetHealth};
use crate::metrics::Metrics;
use crate::policy::{Concurrency, Policy};
use crate::providers::ProviderError;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One provider's shared state.
pub struct ProviderState {
    pub name: String,
    breaker: Mutex<Breaker>,
    paused_until: Mutex<Option<Instant>>,
    /// The configured limit and its semaphore; replaced when a reload changes the limit
    /// (attempts holding a permit of the old one finish on it).
    slots: Mutex<Option<(u32, Arc<Semaphore>)>>,
    /// Attempts waiting for a slot.
    pub queued: AtomicUsize,
    /// Attempts holding a slot (or in flight, with no limit).
    pub in_flight: AtomicUsize,
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
            paused_until: Mutex::new(None),
            slots: Mutex::new(None),
            queued: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn configure(&self, c: Option<&Concurrency>) {
        let mut slots = lock(&self.slots);
        match (c, &*slots) {
            (None, _) => *slots = None,
            (Some(c), Some((max, _))) if *max == c.max => {}
            (Some(c), _) => *slots = Some((c.max, Arc::new(Semaphore::new(c.max as usize)))),
        }
    }

    /// How long the provider stays paused after a 429, if it is.
    pub fn paused_for(&self, now: Instant) -> Option<Duration> {
        let until = (*lock(&self.paused_until))?;
        (until > now).then(|| until - now)
    }

    /// Pauses the provider for `d` (a later pause never shortens an earlier one).
    pub fn pause(&self, now: Instant, d: Duration) {
        let mut p = lock(&self.paused_until);
        let until = now + d;
        if p.is_none_or(|old| old < until) {
            *p = Some(until);
        }
    }

    pub fn breaker(&self) -> MutexGuard<'_, Breaker> {
        lock(&self.breaker)
    }

    /// Waits for a slot under the provider's limit: at most `max_queue` attempts wait, each for
    /// at most its queue timeout (or `budget`). The wait is measured in `acc_queue_seconds`.
    pub async fn acquire(
        self: &Arc<Self>,
        limit: Option<&Concurrency>,
        budget: Duration,
        metrics: &Metrics,
    ) -> Result<Slot, ProviderError> {
        let sem = lock(&self.slots).as_ref().map(|(_, s)| s.clone());
        let (Some(limit), Some(sem)) = (limit, sem) else {
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
                    return Err(if limit.reject_when_full { ProviderError::Busy } else { ProviderError::QueueFull });
                }
                let started = Instant::now();
                let wait = limit.queue_timeout.map_or(budget, |t| t.min(budget));
                let got = tokio::time::timeout(wait, sem.acquire_owned()).await;
                metrics.queue_seconds.with_label_values(&[&self.name]).observe(started.elapsed().as_secs_f64());
                match got {
                    Ok(Ok(p)) => p,
                    _ => {
                        metrics.queue_rejected.with_label_values(&[&self.name, "timeout"]).inc();
                        return Err(ProviderError::QueueTimeout);
                    }
                }
            }
        };
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Ok(Slot { _permit: Some(permit), provider: self.clone() })
    }
}

/// The state a snapshot's route target uses.
#[derive(Clone)]
pub struct TargetLive {
    pub provider: Arc<ProviderState>,
    pub health: Arc<Mutex<TargetHealth>>,
}

impl TargetLive {
    pub fn health(&self) -> MutexGuard<'_, TargetHealth> {
        lock(&self.health)
    }
}

/// The registry, by name.
#[derive(Default)]
pub struct Live {
    providers: DashMap<String, Arc<ProviderState>>,
    /// Keyed by (route, provider, model label).
    targets: DashMap<(String, String, String), Arc<Mutex<TargetHealth>>>,
}

impl Live {
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
                        let health = self.targets.entry(key).or_default().clone();
                        TargetLive { provider: self.provider(&t.provider), health }
                    })
                    .collect()
            })
            .collect()
    }

    pub fn providers(&self) -> Vec<Arc<ProviderState>> {
        let mut v: Vec<_> = self.providers.iter().map(|e| e.value().clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
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
            | ProviderError::Transport(_)
            | ProviderError::BadResponse(_) => Some(false),
            ProviderError::Status { status, .. } if status.is_server_error() => Some(false),
            ProviderError::EvalFailed(_) | ProviderError::Blocked(_) => Some(true),
            _ => None,
        },
    }
}
