//! Rate limits per API key and per tenant (requests and images per minute, GCRA via `governor`)
//! and an optional spend limit per tenant per UTC day. State lives in memory per replica and
//! survives policy reloads; a limiter is rebuilt only when its quota changes. With `[cluster]`
//! the same limits are kept in Redis for every replica (`crate::cluster`), and this memory is
//! the fallback while Redis cannot answer.

use crate::lock;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::cluster::{Admission, Cluster, OverBudget, RateCell, SpendAsk, SpendHold};
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
    /// Estimates of work in flight.
    reserved: f64,
}

/// Spend per UTC day against a limit: work reserves its estimate before it starts, then is
/// charged what it cost. Used for tenants' daily limits and mirrors' daily caps.
#[derive(Default)]
pub struct DailyBudget(Mutex<Spend>);

impl DailyBudget {
    /// Holds `estimate` USD of today's `limit`; `Err(what filled it)` when it does not fit.
    /// Work whose price is unknown (estimate 0) may still not start once the budget is spent.
    pub fn reserve(self: &Arc<Self>, limit: f64, estimate: f64) -> Result<Reservation, OverBudget> {
        let (today, _) = utc_day(SystemTime::now());
        let mut s = lock(&self.0);
        if s.day != today {
            *s = Spend { day: today, ..Default::default() };
        }
        if s.spent >= limit || s.spent + s.reserved + estimate > limit + 1e-9 {
            return Err(OverBudget { spent: s.spent, held: s.reserved });
        }
        s.reserved += estimate;
        Ok(Reservation { budget: Some(self.clone()), day: today, estimate, shared: None, owed: None })
    }

    /// Settled spend today, USD.
    pub fn spent_today(&self) -> f64 {
        let s = lock(&self.0);
        if s.day == utc_day(SystemTime::now()).0 {
            s.spent
        } else {
            0.0
        }
    }
}

/// Every key's and tenant's limits: in memory, or shared through `cluster` when set.
#[derive(Default)]
pub struct Limits {
    keys: DashMap<String, Arc<Mutex<Pair>>>,
    tenants: DashMap<String, Arc<Mutex<Pair>>>,
    spend: DashMap<String, Arc<DailyBudget>>,
    cluster: Option<Arc<Cluster>>,
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

fn spend_refusal(metrics: &Metrics, tenant: &str, limit: f64, estimate: f64, over: OverBudget) -> ApiError {
    let OverBudget { spent, held } = over;
    let to_midnight = utc_day(SystemTime::now()).1;
    // Refused only because of the estimates of work in flight: room comes back as that work
    // ends (settled at its actual cost, or released when it fails), long before midnight.
    let (msg, retry) = if spent < limit && spent + estimate <= limit + 1e-9 {
        let msg = format!(
            "tenant \"{tenant}\" has no room left in its spend limit of {limit:.2} USD per day for this request's estimated {estimate:.4} USD: {spent:.4} USD spent and {held:.4} USD held for requests in flight; retry when they finish"
        );
        (msg, IN_FLIGHT_RETRY.min(to_midnight))
    } else if spent < limit {
        let msg = format!(
            "tenant \"{tenant}\" has {left:.4} USD left of its spend limit of {limit:.2} USD per day ({spent:.4} USD spent), less than this request's estimated {estimate:.4} USD; ask for fewer or cheaper images, or wait for the reset at 00:00 UTC",
            left = limit - spent
        );
        (msg, to_midnight)
    } else {
        let msg = format!(
            "tenant \"{tenant}\" has reached its spend limit of {limit:.2} USD per day ({spent:.4} USD spent); it resets at 00:00 UTC"
        );
        (msg, to_midnight)
    };
    refusal(metrics, tenant, Limit::Spend, retry, msg)
}

/// The `Retry-After` of a spend refusal that only the estimates of requests in flight cause:
/// about the time an image generation takes, after which their holds are settled or released.
pub const IN_FLIGHT_RETRY: Duration = Duration::from_secs(5);

/// A request's limit scopes, key first: (scope, its name, requests per minute, images per
/// minute); the tenant's only when the policy has a `[tenants.NAME]` table.
fn scopes<'a>(
    key: &'a ApiKey,
    tenant: Option<&TenantLimits>,
) -> impl Iterator<Item = (&'static str, &'a str, Option<u32>, Option<u32>)> {
    let tenant = tenant.map(|t| ("tenant", key.tenant.as_str(), t.requests_per_minute, t.images_per_minute));
    std::iter::once(("key", key.id.as_str(), key.requests_per_minute, key.images_per_minute)).chain(tenant)
}

/// How a refusal names a limit's owner: "API key ID" or "tenant \"NAME\"".
fn who(scope: &str, name: &str) -> String {
    if scope == "key" {
        format!("API key {name}")
    } else {
        format!("tenant \"{name}\"")
    }
}

fn requests_refusal(metrics: &Metrics, tenant: &str, who: &str, per_minute: u32, wait: Duration) -> ApiError {
    let msg = format!(
        "Rate limit reached for {who} on requests per minute: limit {per_minute}. Try again in {} s.",
        retry_secs(wait).max(1)
    );
    refusal(metrics, tenant, Limit::Requests, wait, msg)
}

/// `wait` `None`: the request asks for more images than the limit holds at all.
fn images_refusal(
    metrics: &Metrics,
    tenant: &str,
    who: &str,
    per_minute: u32,
    images: u32,
    wait: Option<Duration>,
) -> ApiError {
    let msg = match wait {
        Some(w) => format!(
            "Rate limit reached for {who} on images per minute: limit {per_minute}, requested {images}. Try again in {} s.",
            retry_secs(w).max(1)
        ),
        None => format!(
            "this request asks for {images} images, more than the {who} limit of {per_minute} images per minute; ask for at most {per_minute}"
        ),
    };
    let mut e = refusal(metrics, tenant, Limit::Images, wait.unwrap_or(Duration::from_secs(60)), msg);
    if wait.is_none() {
        // Waiting never lets it through: no Retry-After, and `x-should-retry: false` so that
        // the SDKs do not retry it.
        e.retry_after = None;
    }
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

/// An estimate held on a daily budget while work runs; the estimate is released when it is
/// dropped, and what the work cost is charged with `charge` or `settle`.
pub struct Reservation {
    budget: Option<Arc<DailyBudget>>,
    day: u64,
    estimate: f64,
    /// The hold on the shared budget, when the reservation was made in Redis.
    shared: Option<SpendHold>,
    /// A reservation made in this replica's memory because Redis could not be asked: the
    /// shared budget (cluster, budget name) its charges are also owed to, sent once Redis
    /// answers again.
    owed: Option<(Arc<Cluster>, String)>,
}

impl Reservation {
    pub fn none() -> Reservation {
        Reservation { budget: None, day: 0, estimate: 0.0, shared: None, owed: None }
    }

    /// A reservation held on a shared (Redis) budget.
    pub fn shared(hold: SpendHold) -> Reservation {
        Reservation { budget: None, day: 0, estimate: 0.0, shared: Some(hold), owed: None }
    }

    /// Charges `usd` to today's spend (the estimate stays held until the reservation ends).
    pub fn charge(&mut self, usd: f64) {
        if let Some(h) = &self.shared {
            h.charge(usd);
        }
        if let Some((cluster, budget)) = &self.owed {
            cluster.charge_budget(budget, usd);
        }
        if let Some(b) = &self.budget {
            let mut s = lock(&b.0);
            if s.day == utc_day(SystemTime::now()).0 {
                s.spent += usd;
            }
        }
    }

    /// Replaces the estimate by the work's actual cost.
    pub fn settle(mut self, actual: f64) {
        if let Some(h) = self.shared.take() {
            return h.settle(actual);
        }
        self.charge(actual);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(b) = self.budget.take() {
            let mut s = lock(&b.0);
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

    /// Limits kept in Redis through `cluster` (with this memory as the fallback).
    pub fn new(cluster: Option<Arc<Cluster>>) -> Limits {
        Limits { cluster, ..Default::default() }
    }

    /// Admits one request: its `images` against the key's and its tenant's rate limits, and
    /// `estimate` USD held on the tenant's daily spend limit (released when the returned
    /// [`Reservation`] is dropped, replaced by the actual cost when it is settled). With
    /// `[cluster]` all of it is one script in Redis, shared by every replica, taken together or
    /// not at all; without it (or while Redis cannot answer, under `on_cluster_error =
    /// "local"`) in this replica's memory. Errors: 429 with `Retry-After` naming the limit
    /// (`rate_limit_exceeded`, or `spend_limit_exceeded` until the next UTC day); 503
    /// `cluster_unavailable` under `fail_closed`.
    pub async fn admit(
        &self,
        metrics: &Metrics,
        key: &ApiKey,
        tenant: Option<&TenantLimits>,
        images: u32,
        estimate: f64,
    ) -> Result<Reservation, ApiError> {
        let Some(cluster) = &self.cluster else { return self.admit_local(metrics, key, tenant, images, estimate) };
        let mut cells = Vec::with_capacity(4);
        for (scope, name, rpm, ipm) in scopes(key, tenant) {
            if let Some(per_minute) = rpm {
                cells.push(RateCell { scope, name, limit: "requests", per_minute, cost: 1 });
            }
            if let Some(per_minute) = ipm {
                if images > per_minute {
                    let who = who(scope, name);
                    return Err(images_refusal(metrics, &key.tenant, &who, per_minute, images, None));
                }
                cells.push(RateCell { scope, name, limit: "images", per_minute, cost: images });
            }
        }
        let spend_limit = tenant.and_then(|t| t.spend_usd_per_day);
        if cells.is_empty() && spend_limit.is_none() {
            return Ok(Reservation::none());
        }
        let budget = spend_limit.map(|limit| (format!("tenant:{}", key.tenant), limit));
        let ask = budget.as_ref().map(|(budget, limit)| SpendAsk { budget, limit: *limit, estimate });
        match cluster.admit(&cells, ask).await {
            Ok(Admission::Admitted(hold)) => Ok(hold.map_or_else(Reservation::none, Reservation::shared)),
            Ok(Admission::Refused { index, wait }) => {
                let c = &cells[index];
                let who = who(c.scope, c.name);
                Err(if c.limit == "requests" {
                    requests_refusal(metrics, &key.tenant, &who, c.per_minute, wait)
                } else {
                    images_refusal(metrics, &key.tenant, &who, c.per_minute, images, Some(wait))
                })
            }
            Ok(Admission::OverBudget(over)) => {
                Err(spend_refusal(metrics, &key.tenant, spend_limit.unwrap_or_default(), estimate, over))
            }
            Err(u) => {
                cluster.fallback(u)?;
                let mut local = self.admit_local(metrics, key, tenant, images, estimate)?;
                // What it spends is owed to the shared budget too: the day's total every
                // replica reads must not lose the spend of a Redis stall.
                local.owed = budget.map(|(name, _)| (cluster.clone(), name));
                Ok(local)
            }
        }
    }

    /// [`Limits::admit`] on this replica's memory only.
    pub fn admit_local(
        &self,
        metrics: &Metrics,
        key: &ApiKey,
        tenant: Option<&TenantLimits>,
        images: u32,
        estimate: f64,
    ) -> Result<Reservation, ApiError> {
        for (scope, name, rpm, ipm) in scopes(key, tenant) {
            if rpm.is_none() && ipm.is_none() {
                continue;
            }
            let pair = Self::pair(if scope == "key" { &self.keys } else { &self.tenants }, name);
            let mut p = lock(&pair);
            p.sync(rpm, ipm);
            if let Some(l) = &p.requests {
                if let Err(wait) = take(l, 1) {
                    let wait = wait.unwrap_or(Duration::from_secs(60));
                    return Err(requests_refusal(metrics, &key.tenant, &who(scope, name), l.per_minute, wait));
                }
            }
            if let Some(l) = &p.images {
                if let Err(wait) = take(l, images) {
                    return Err(images_refusal(metrics, &key.tenant, &who(scope, name), l.per_minute, images, wait));
                }
            }
        }
        self.reserve_local(metrics, &key.tenant, tenant, estimate)
    }

    /// The spend hold of [`Limits::admit_local`]: `estimate` USD of the tenant's daily budget,
    /// or 429 `spend_limit_exceeded` when the day's settled and reserved spend would pass it.
    pub fn reserve_local(
        &self,
        metrics: &Metrics,
        tenant: &str,
        limits: Option<&TenantLimits>,
        estimate: f64,
    ) -> Result<Reservation, ApiError> {
        let Some(limit) = limits.and_then(|l| l.spend_usd_per_day) else { return Ok(Reservation::none()) };
        let budget = match self.spend.get(tenant) {
            Some(s) => s.clone(),
            None => self.spend.entry(tenant.to_string()).or_default().clone(),
        };
        budget.reserve(limit, estimate).map_err(|over| spend_refusal(metrics, tenant, limit, estimate, over))
    }

    /// The shared state, when `[cluster]` is set.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Settled spend of a tenant today, USD.
    pub fn spent_today(&self, tenant: &str) -> f64 {
        self.spend.get(tenant).map_or(0.0, |b| b.spent_today())
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
        assert!(l.admit_local(&m, &k, None, 1, 0.0).is_ok());
        assert!(l.admit_local(&m, &k, None, 1, 0.0).is_ok());
        let e = l.admit_local(&m, &k, None, 1, 0.0).err().unwrap();
        assert_eq!((e.status.as_u16(), e.kind, e.code), (429, "requests", Some("rate_limit_exceeded")));
        assert!((1..=60).contains(&e.retry_after.unwrap()), "{:?}", e.retry_after);
    }

    #[test]
    fn images_per_minute_counts_n_and_tenant_limits_are_shared() {
        let (l, m) = (Limits::default(), Metrics::new());
        let k = key(None, Some(3));
        assert!(l.admit_local(&m, &k, None, 2, 0.0).is_ok());
        let e = l.admit_local(&m, &k, None, 2, 0.0).err().unwrap();
        assert_eq!((e.kind, e.code), ("images", Some("rate_limit_exceeded")));
        let e = l.admit_local(&m, &key(None, Some(3)), None, 5, 0.0).err().unwrap();
        assert!(e.message.contains("more than"), "{}", e.message);
        // More than the limit holds at all: waiting never helps, so no retry is invited
        // (no Retry-After; the answer says x-should-retry: false).
        assert_eq!(e.retry_after, None);
        // Two keys of one tenant share its limit.
        let t = TenantLimits { requests_per_minute: Some(1), ..Default::default() };
        let mut k2 = key(None, None);
        k2.id = "other".into();
        assert!(l.admit_local(&m, &key(None, None), Some(&t), 1, 0.0).is_ok());
        assert!(l.admit_local(&m, &k2, Some(&t), 1, 0.0).is_err());
    }

    #[test]
    fn a_changed_quota_takes_effect() {
        let (l, m) = (Limits::default(), Metrics::new());
        assert!(l.admit_local(&m, &key(Some(1), None), None, 1, 0.0).is_ok());
        assert!(l.admit_local(&m, &key(Some(1), None), None, 1, 0.0).is_err());
        assert!(l.admit_local(&m, &key(Some(5), None), None, 1, 0.0).is_ok());
    }

    #[test]
    fn spend_reservations_hold_and_settle() {
        let (l, m) = (Limits::default(), Metrics::new());
        let t = TenantLimits { spend_usd_per_day: Some(0.10), ..Default::default() };
        let a = l.reserve_local(&m, "acme", Some(&t), 0.04).unwrap();
        let b = l.reserve_local(&m, "acme", Some(&t), 0.04).unwrap();
        // 0.08 reserved: a third 0.04 would pass the limit, but only while the two are in
        // flight: the client is told so, and to come back in seconds, not at midnight.
        let e = l.reserve_local(&m, "acme", Some(&t), 0.04).err().unwrap();
        assert_eq!((e.status.as_u16(), e.code), (429, Some("spend_limit_exceeded")));
        assert_eq!(e.retry_after, Some(IN_FLIGHT_RETRY.as_secs().min(retry_secs(utc_day(SystemTime::now()).1))));
        assert!(e.message.contains("0.0000 USD spent and 0.0800 USD held for requests in flight"), "{}", e.message);
        a.settle(0.04);
        drop(b); // failed request: nothing spent
        assert!((l.spent_today("acme") - 0.04).abs() < 1e-9);
        let c = l.reserve_local(&m, "acme", Some(&t), 0.04).unwrap();
        c.settle(0.04);
        // 0.08 spent, nothing in flight: 0.04 cannot fit today.
        let e = l.reserve_local(&m, "acme", Some(&t), 0.04).err().unwrap();
        assert!(e.retry_after.unwrap() > IN_FLIGHT_RETRY.as_secs() || retry_secs(utc_day(SystemTime::now()).1) <= 5);
        assert!(e.message.contains("0.0200 USD left") && e.message.contains("fewer"), "{}", e.message);
        // A request that fits what is left still passes; then the day is spent.
        l.reserve_local(&m, "acme", Some(&t), 0.02).unwrap().settle(0.02);
        let e = l.reserve_local(&m, "acme", Some(&t), 0.0).err().unwrap();
        assert!(
            e.message.contains("has reached its spend limit of 0.10 USD per day (0.1000 USD spent)"),
            "{}",
            e.message
        );
        assert!(l.reserve_local(&m, "other", Some(&t), 0.04).is_ok());
        assert!(l.reserve_local(&m, "acme", None, 1.0).is_ok(), "no limit configured");
    }
}
