//! Rate limits per API key and per tenant (requests and images per minute, GCRA via `governor`)
//! and an optional spend limit per tenant per UTC day. State lives in memory per replica and
//! survives policy reloads; a limiter is rebuilt only when its quota changes.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::policy::{ApiKey, TenantLimits};

/// A limiter with the per-minute quota it was built for.
struct PerMinute {
    per_minute: u32,
    limiter: DefaultDirectRateLimiter,
}

fn per_minute(n: u32) -> PerMinute {
    let q = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    PerMinute { per_minute: n, limiter: RateLimiter::direct(Quota::per_minute(q)) }
}

#[derive(Default)]
struct Pair {
    requests: Option<PerMinute>,
    images: Option<PerMinute>,
}

impl Pair {
    /// Brings the limiters in line with the policy's quotas (kept when unchanged).
    fn sync(&mut self, requests: Option<u32>, images: Option<u32>) {
        for (slot, want) in [(&mut self.requests, requests), (&mut self.images, images)] {
            match want {
                None => *slot = None,
                Some(n) if slot.as_ref().is_some_and(|l| l.per_minute == n) => {}
                Some(n) => *slot = Some(per_minute(n)),
            }
        }
    }
}

#[derive(Default)]
struct Spend {
    day: u64,
    /// Settled spend of the day.
    spent: f64,
    /// Estimates of requests in flight.
    reserved: f64,
}

#[derive(Default)]
pub struct Limits {
    keys: DashMap<String, Arc<Mutex<Pair>>>,
    tenants: DashMap<String, Arc<Mutex<Pair>>>,
    spend: DashMap<String, Arc<Mutex<Spend>>>,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Images,
    Spend,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Limit::Requests => "requests",
            Limit::Images => "images",
            Limit::Spend => "spend",
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn retry_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.is_zero()))
}

fn refusal(metrics: &Metrics, tenant: &str, limit: Limit, retry: Duration, message: String) -> ApiError {
    metrics.rate_limited.with_label_values(&[tenant, limit.label()]).inc();
    let (kind, code) = match limit {
        Limit::Requests => ("requests", "rate_limit_exceeded"),
        Limit::Images => ("images", "rate_limit_exceeded"),
        Limit::Spend => ("insufficient_quota", "spend_limit_exceeded"),
    };
    let mut e = ApiError::new(http::StatusCode::TOO_MANY_REQUESTS, kind, code, message);
    e.retry_after = Some(retry_secs(retry).max(1));
    e
}

/// Takes `n` cells from a limiter, or says how long until they are there.
fn take(l: &PerMinute, n: u32) -> Result<(), Option<Duration>> {
    let Some(n) = NonZeroU32::new(n) else { return Ok(()) };
    match l.limiter.check_n(n) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(not_until)) => Err(Some(not_until.wait_time_from(DefaultClock::default().now()))),
        // More than the quota holds at all: waiting does not help.
        Err(_) => Err(None),
    }
}

/// The start of the next UTC day, as seconds from now, and today's day number.
fn utc_day(now: SystemTime) -> (u64, Duration) {
    let secs = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    (secs / 86_400, Duration::from_secs(86_400 - secs % 86_400))
}

/// An estimated spend held while a request runs; settled with what it really cost.
pub struct Reservation {
    state: Option<Arc<Mutex<Spend>>>,
    day: u64,
    estimate: f64,
}

impl Reservation {
    pub fn none() -> Reservation {
        Reservation { state: None, day: 0, estimate: 0.0 }
    }

    /// Replaces the estimate by the request's actual cost.
    pub fn settle(mut self, actual: f64) {
        if let Some(state) = self.state.take() {
            let mut s = lock(&state);
            if s.day == self.day {
                s.reserved = (s.reserved - self.estimate).max(0.0);
            }
            let (today, _) = utc_day(SystemTime::now());
            if s.day == today {
                s.spent += actual;
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            let mut s = lock(&state);
            if s.day == self.day {
                s.reserved = (s.reserved - self.estimate).max(0.0);
            }
        }
    }
}

impl Limits {
    fn pair(map: &DashMap<String, Arc<Mutex<Pair>>>, name: &str) -> Arc<Mutex<Pair>> {
        if let Some(p) = map.get(name) {
            return p.clone();
        }
        map.entry(name.to_string()).or_default().clone()
    }

    /// Counts one request and its `n` images against the key's and its tenant's limits.
    pub fn admit(
        &self,
        metrics: &Metrics,
        key: &ApiKey,
        tenant: Option<&TenantLimits>,
        images: u32,
    ) -> Result<(), ApiError> {
        let scopes = [(
            format!("API key {}", key.id),
            Self::pair(&self.keys, &key.id),
            key.requests_per_minute,
            key.images_per_minute,
        )];
        let tenant_scope = tenant.map(|t| {
            (
                format!("tenant \"{}\"", key.tenant),
                Self::pair(&self.tenants, &key.tenant),
                t.requests_per_minute,
                t.images_per_minute,
            )
        });
        for (who, pair, rpm, ipm) in scopes.into_iter().chain(tenant_scope) {
            if rpm.is_none() && ipm.is_none() {
                continue;
            }
            let mut p = lock(&pair);
            p.sync(rpm, ipm);
            if let Some(l) = &p.requests {
                if let Err(wait) = take(l, 1) {
                    let wait = wait.unwrap_or(Duration::from_secs(60));
                    let msg = format!(
                        "Rate limit reached for {who} on requests per minute: limit {}. Try again in {} s.",
                        l.per_minute,
                        retry_secs(wait).max(1)
                    );
                    return Err(refusal(metrics, &key.tenant, Limit::Requests, wait, msg));
                }
            }
            if let Some(l) = &p.images {
                if let Err(wait) = take(l, images) {
                    let msg = match wait {
                        Some(w) => format!(
                            "Rate limit reached for {who} on images per minute: limit {}, requested {images}. Try again in {} s.",
                            l.per_minute,
                            retry_secs(w).max(1)
                        ),
                        None => format!(
                            "this request asks for {images} images, more than the {who} limit of {} images per minute",
                            l.per_minute
                        ),
                    };
                    return Err(refusal(
                        metrics,
                        &key.tenant,
                        Limit::Images,
                        wait.unwrap_or(Duration::from_secs(60)),
                        msg,
                    ));
                }
            }
        }
        Ok(())
    }

    /// Holds `estimate` USD of the tenant's daily budget for a request, or refuses it when the
    /// day's settled and reserved spend would pass the limit.
    pub fn reserve(
        &self,
        metrics: &Metrics,
        tenant: &str,
        limits: Option<&TenantLimits>,
        estimate: f64,
    ) -> Result<Reservation, ApiError> {
        let Some(limit) = limits.and_then(|l| l.spend_usd_per_day) else { return Ok(Reservation::none()) };
        let state = match self.spend.get(tenant) {
            Some(s) => s.clone(),
            None => self.spend.entry(tenant.to_string()).or_default().clone(),
        };
        let (today, until_midnight) = utc_day(SystemTime::now());
        let mut s = lock(&state);
        if s.day != today {
            *s = Spend { day: today, spent: 0.0, reserved: 0.0 };
        }
        // A request whose price is unknown (estimate 0) may still not start once the budget is spent.
        if s.spent >= limit || s.spent + s.reserved + estimate > limit + 1e-9 {
            let msg = format!(
                "tenant \"{tenant}\" has reached its spend limit of {limit:.2} USD per day ({:.4} USD spent); it resets at 00:00 UTC",
                s.spent
            );
            drop(s);
            return Err(refusal(metrics, tenant, Limit::Spend, until_midnight, msg));
        }
        s.reserved += estimate;
        drop(s);
        Ok(Reservation { state: Some(state), day: today, estimate })
    }

    /// Settled spend of a tenant today, USD.
    pub fn spent_today(&self, tenant: &str) -> f64 {
        let (today, _) = utc_day(SystemTime::now());
        self.spend.get(tenant).map_or(0.0, |s| {
            let s = lock(&s);
            if s.day == today {
                s.spent
            } else {
                0.0
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(rpm: Option<u32>, ipm: Option<u32>) -> ApiKey {
        ApiKey {
            tenant: "acme".into(),
            tags: vec![],
            id: "abc".into(),
            requests_per_minute: rpm,
            images_per_minute: ipm,
        }
    }

    #[test]
    fn requests_per_minute_refuses_with_retry_after() {
        let (l, m) = (Limits::default(), Metrics::new());
        let k = key(Some(2), None);
        assert!(l.admit(&m, &k, None, 1).is_ok());
        assert!(l.admit(&m, &k, None, 1).is_ok());
        let e = l.admit(&m, &k, None, 1).unwrap_err();
        assert_eq!((e.status.as_u16(), e.kind, e.code), (429, "requests", Some("rate_limit_exceeded")));
        assert!((1..=60).contains(&e.retry_after.unwrap()), "{:?}", e.retry_after);
    }

    #[test]
    fn images_per_minute_counts_n_and_tenant_limits_are_shared() {
        let (l, m) = (Limits::default(), Metrics::new());
        let k = key(None, Some(3));
        assert!(l.admit(&m, &k, None, 2).is_ok());
        let e = l.admit(&m, &k, None, 2).unwrap_err();
        assert_eq!((e.kind, e.code), ("images", Some("rate_limit_exceeded")));
        let e = l.admit(&m, &key(None, Some(3)), None, 5).unwrap_err();
        assert!(e.message.contains("more than"), "{}", e.message);
        // Two keys of one tenant share its limit.
        let t = TenantLimits { requests_per_minute: Some(1), ..Default::default() };
        let mut k2 = key(None, None);
        k2.id = "other".into();
        assert!(l.admit(&m, &key(None, None), Some(&t), 1).is_ok());
        assert!(l.admit(&m, &k2, Some(&t), 1).is_err());
    }

    #[test]
    fn a_changed_quota_takes_effect() {
        let (l, m) = (Limits::default(), Metrics::new());
        assert!(l.admit(&m, &key(Some(1), None), None, 1).is_ok());
        assert!(l.admit(&m, &key(Some(1), None), None, 1).is_err());
        assert!(l.admit(&m, &key(Some(5), None), None, 1).is_ok());
    }

    #[test]
    fn spend_reservations_hold_and_settle() {
        let (l, m) = (Limits::default(), Metrics::new());
        let t = TenantLimits { spend_usd_per_day: Some(0.10), ..Default::default() };
        let a = l.reserve(&m, "acme", Some(&t), 0.04).unwrap();
        let b = l.reserve(&m, "acme", Some(&t), 0.04).unwrap();
        // 0.08 reserved: a third 0.04 would pass the limit.
        let e = l.reserve(&m, "acme", Some(&t), 0.04).err().unwrap();
        assert_eq!((e.status.as_u16(), e.code), (429, Some("spend_limit_exceeded")));
        assert!(e.retry_after.unwrap() <= 86_400);
        a.settle(0.04);
        drop(b); // failed request: nothing spent
        assert!((l.spent_today("acme") - 0.04).abs() < 1e-9);
        let c = l.reserve(&m, "acme", Some(&t), 0.04).unwrap();
        c.settle(0.04);
        assert!(l.reserve(&m, "acme", Some(&t), 0.04).is_err());
        assert!(l.reserve(&m, "other", Some(&t), 0.04).is_ok());
        assert!(l.reserve(&m, "acme", None, 1.0).is_ok(), "no limit configured");
    }
}
