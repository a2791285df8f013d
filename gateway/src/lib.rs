//! Agent Command Center (ACC): a gateway in front of image-generation providers.
//!
//! # Layout
//! In the order a request meets them:
//! - [`server`]: listeners, edge layers (tracing, panic catcher, load shedding), signals, shutdown.
//! - [`proxy`]: the pipeline for one image request, read top to bottom.
//! - [`request`]: the client's JSON parsed and checked into one `GenerationRequest`.
//! - [`policy`]: policy files, parsed raw, then validated into runtime types.
//! - [`reload`]: the live policy snapshot, swapped atomically on poll, SIGHUP or admin reload.
//! - [`routing`]: route selection, the weighted attempt plan, the fallback loop with hedging.
//! - [`live`]: provider and target state learnt while running: breakers, 429 pauses, queues.
//! - [`health`]: rolling health windows with hysteresis, and the circuit breaker's state machine.
//! - [`limits`]: rate limits per key and tenant, spend per tenant per day.
//! - [`idempotency`]: `Idempotency-Key` answers kept for replay.
//! - [`mirror`]: mirrors and canaries for provider migrations; [`compare`]: their statistics.
//! - [`eval`]: inline evaluation of artifacts on a thread pool of its own (sanity, ...).
//! - [`providers`]: the adapter trait and one adapter per API family (builtin demo, OpenAI).
//! - [`upstream`]: per-thread HTTP/1.1 connections to providers, driven by the request using them.
//! - [`body`]: response bodies made of `Bytes` chunks (payloads are not copied).
//! - [`artifacts`]: images the gateway serves itself for `response_format = "url"`.
//! - [`metrics`]: the Prometheus registry.
//! - [`admin`]: the admin listener (metrics, probes, reload, policy and route views).
//! - [`error`]: the OpenAI-shaped error every failure becomes.
#![forbid(unsafe_code)]
// ApiError is returned on the cold path only (a request that is refused); boxing it would cost
// an allocation on every error for no gain on the hot path.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod artifacts;
pub mod body;
pub mod compare;
pub mod error;
pub mod eval;
pub mod fetch;
pub mod health;
pub mod idempotency;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod mirror;
pub mod policy;
pub mod providers;
pub mod proxy;
pub mod reload;
pub mod request;
pub mod routing;
pub mod server;
pub mod upstream;

/// Locks a mutex, taking over one a panicking thread poisoned: the state guarded with it
/// (counters, windows, caches) stays usable after a panic elsewhere.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
