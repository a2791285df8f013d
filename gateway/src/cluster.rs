//! State shared by every replica through Redis (`[cluster]`): rate limits (GCRA, every limit of
//! a request in one script), daily spend (reserve, then settle), `Idempotency-Key` leases and
//! answers, and 429 pauses (with opened breakers when `share_breakers` is on).
//!
//! Redis down or slow never stops the gateway. Every call has the policy's deadline; a call that
//! fails or misses it is counted in `acc_cluster_errors_total{op}`, logged at most once per
//! [`LOG_EVERY`], and the replica then uses its own in-memory state for `recheck` before it tries
//! Redis again (or, with `on_cluster_error = "fail_closed"`, refuses with a 503). Whatever was
//! shared stays in Redis, so a replica that restarts loses none of it.
//!
//! A request's admission is one round trip: one script takes its rate limits and its spend hold
//! ([`Cluster::admit`]), and carries the spend changes this process has waiting (settles,
//! releases, charges), so a request's settle rides on a later request's call instead of costing
//! one of its own; with no later call, the changes go by themselves after [`FLUSH_AFTER`], and
//! at shutdown.
//!
//! Connections are multiplexed [`ConnectionManager`]s (they reconnect by themselves), one per
//! thread that calls, so each proxy worker's connection is driven by its own runtime.

mod idem;
mod lua;

pub use idem::{IdemBegin, SharedLease};

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus::{GaugeVec, IntCounterVec, IntGauge, Opts, Registry};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::IntoConnectionInfo;

use crate::error::ApiError;
use crate::lock;
use crate::policy::{ClusterSettings, OnClusterError};

/// At most one log line per this interval about Redis failing.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// How long a spend change (a settle, a release, a charge) waits for a request's call to
/// Redis to ride on before it is sent by itself.
pub const FLUSH_AFTER: Duration = Duration::from_millis(20);

/// At most this many spend changes wait while Redis cannot take them (about 100 bytes each);
/// older ones are dropped and counted in `acc_cluster_errors_total{op="spend"}`. An estimate
/// whose release is dropped stops counting when its hold expires (the lease time).
pub const MAX_CHANGES: usize = 100_000;

/// A Redis call that failed or missed its deadline: the caller uses its local state (or, under
/// `fail_closed`, [`Cluster::fallback`] refuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

/// The `op` label values of `acc_cluster_errors_total`: what the failed call was for.
pub const OPS: [&str; 6] = ["limits", "spend", "idempotency", "pauses", "usage", "artifacts"];

/// The cluster's metrics, registered in the process registry.
struct ClusterMetrics {
    /// `acc_cluster_errors_total{op}`: calls that failed, missed their deadline, or were not
    /// tried while the replica waits to recheck Redis; each one was answered from local state
    /// (or refused under fail_closed).
    errors: IntCounterVec,
    /// `acc_cluster_shared`: 1 while state is shared through Redis, 0 while this replica is on
    /// its local state.
    shared: IntGauge,
    /// `acc_cluster_limit_used_ratio{scope,name,limit}`: how much of a rate limit's one-minute
    /// allowance (requests, images) or of a daily spend limit (spend) is used, cluster-wide, as
    /// last seen by this replica (0 to 1).
    used: GaugeVec,
}

/// A handle on the shared state; cheap to share as `Arc<Cluster>`.
pub struct Cluster {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// One multiplexed connection per thread (each proxy worker has its own current-thread
    /// runtime): the connection's driver then runs on the thread that uses it, with no
    /// cross-thread wake-up per call.
    conns: dashmap::DashMap<std::thread::ThreadId, ConnectionManager>,
    /// The connection made at start-up, on the runtime that connected.
    fallback: ConnectionManager,
    settings: ClusterSettings,
    /// This process, in lease values (so a lease is only ever finished by its owner).
    replica: String,
    started: Instant,
    /// Milliseconds after `started` until which Redis is not tried; 0 when shared.
    local_until: AtomicU64,
    /// Set while the last call failed (local state in use); cleared by the next success.
    degraded: AtomicBool,
    last_log: AtomicU64,
    /// When the use gauges were last updated by an admitted request (ms after `started`).
    gauges_at: AtomicU64,
    last_error: Mutex<Option<String>>,
    next_id: AtomicU64,
    /// Spend changes waiting to ride on the next call to Redis.
    changes: Mutex<Vec<SpendChange>>,
    /// Per thread that admits: whether an admission call is out, and the admissions waiting
    /// for it to come back (they then go together, as one batch).
    lanes: dashmap::DashMap<std::thread::ThreadId, Arc<Mutex<Lane>>>,
    /// Set while a flush of `changes` is scheduled.
    flush_armed: AtomicBool,
    /// Images whose `SET` is on its way to Redis, and whether the store evicted them meanwhile:
    /// the `SET` and the eviction's `DEL` may go on two threads' connections, and a `DEL` that
    /// arrives first would leave the image in Redis for its whole TTL.
    sharing: Mutex<std::collections::HashMap<String, bool>>,
    /// Where settles and releases of dropped holds run (the runtime that connected).
    rt: tokio::runtime::Handle,
    metrics: ClusterMetrics,
}

/// Shared state as `/readyz` and `/admin/routes` show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// "shared" (Redis answers) or "local" (this replica is on its own state for now).
    pub mode: &'static str,
    /// What the policy says to do when Redis fails: "local" or "fail_closed".
    pub on_cluster_error: &'static str,
    /// Why the last call failed, while local.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Cluster {
    /// A client for `settings` (lazy: nothing is dialled until the first call, so a replica
    /// starts while Redis is down). Must run inside a Tokio runtime, which then drives the
    /// connection. Errors: a malformed URL, an unset `password_env` variable, a metric that
    /// cannot be registered.
    pub fn connect(settings: &ClusterSettings, registry: &Registry) -> Result<Arc<Cluster>, String> {
        let mut info =
            settings.redis_url.as_str().into_connection_info().map_err(|e| format!("cluster.redis_url: {e}"))?;
        if let Some(env) = &settings.password_env {
            let pw = std::env::var(env)
                .map_err(|_| format!("cluster.password_env: environment variable {env} is not set"))?;
            crate::secrets::register(&pw);
            let redis = info.redis_settings().clone().set_password(pw);
            info = info.set_redis_settings(redis);
        }
        let client = redis::Client::open(info).map_err(|e| format!("cluster.redis_url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        // Fails here, at start-up, on settings the client refuses; kept for a thread whose own
        // connection cannot be made.
        let fallback = client.get_connection_manager_lazy(config.clone()).map_err(|e| format!("cluster: {e}"))?;
        let metrics = ClusterMetrics {
            errors: IntCounterVec::new(
                Opts::new(
                    "acc_cluster_errors_total",
                    "Shared-state (Redis) calls that failed or missed their deadline, answered from local state or refused",
                ),
                &["op"],
            )
            .map_err(|e| e.to_string())?,
            shared: IntGauge::new("acc_cluster_shared", "1 while limits, spend, idempotency and pauses are shared through Redis; 0 while this replica uses its own")
                .map_err(|e| e.to_string())?,
            used: GaugeVec::new(
                Opts::new(
                    "acc_cluster_limit_used_ratio",
                    "Share of a limit used cluster-wide, as last seen by this replica (rate limits: of the one-minute allowance; spend: of the day's limit)",
                ),
                &["scope", "name", "limit"],
            )
            .map_err(|e| e.to_string())?,
        };
        registry.register(Box::new(metrics.errors.clone())).map_err(|e| e.to_string())?;
        registry.register(Box::new(metrics.shared.clone())).map_err(|e| e.to_string())?;
        registry.register(Box::new(metrics.used.clone())).map_err(|e| e.to_string())?;
        // Every op's series exists at 0 from the start, so `increase()` sees the first error.
        for op in OPS {
            metrics.errors.with_label_values(&[op]);
        }
        metrics.shared.set(1);
        Ok(Arc::new(Cluster {
            client,
            config,
            conns: dashmap::DashMap::new(),
            fallback,
            settings: settings.clone(),
            replica: format!("{:016x}", fastrand::u64(..)),
            started: Instant::now(),
            local_until: AtomicU64::new(0),
            degraded: AtomicBool::new(false),
            last_log: AtomicU64::new(0),
            gauges_at: AtomicU64::new(0),
            last_error: Mutex::new(None),
            next_id: AtomicU64::new(0),
            changes: Mutex::new(Vec::new()),
            lanes: dashmap::DashMap::new(),
            flush_armed: AtomicBool::new(false),
            sharing: Mutex::new(std::collections::HashMap::new()),
            rt: tokio::runtime::Handle::current(),
            metrics,
        }))
    }

    /// Tries a connection to Redis once, in the background, with a deadline of a few seconds,
    /// and logs what stops it: a wrong password (`AUTH` refused), a TLS or name problem, or no
    /// server. Requests do not wait for it; their calls keep the policy's `timeout_ms`, which a
    /// connection's set-up alone may exceed, so without this the first log line would say only
    /// "no answer within 50 ms" (a trial's finding).
    pub fn check_connection(&self) {
        let client = self.client.clone();
        self.rt.spawn(async move {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(3)))
                .set_response_timeout(Some(Duration::from_secs(3)));
            match client.get_multiplexed_async_connection_with_config(&config).await {
                Ok(mut conn) => match redis::cmd("PING").query_async::<String>(&mut conn).await {
                    Ok(_) => tracing::info!("shared state (Redis) answers"),
                    Err(e) => tracing::warn!(error = %crate::secrets::redact(&e.to_string()), "shared state (Redis) refuses this gateway; limits stay per replica until it answers"),
                },
                Err(e) => tracing::warn!(error = %crate::secrets::redact(&e.to_string()), "shared state (Redis) cannot be used (see the error: a refused password, TLS, no server); limits stay per replica until it answers"),
            }
        });
    }

    /// This thread's connection, made (lazily, on this thread's runtime) on first use.
    fn conn(&self) -> ConnectionManager {
        let id = std::thread::current().id();
        if let Some(c) = self.conns.get(&id) {
            return c.clone();
        }
        let made = self.client.get_connection_manager_lazy(self.config.clone());
        match made {
            Ok(c) => self.conns.entry(id).or_insert(c).clone(),
            Err(_) => self.fallback.clone(),
        }
    }

    /// Runs background work (settles, releases) on the current runtime, else the one that
    /// connected.
    fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn(f)),
            Err(_) => drop(self.rt.spawn(f)),
        }
    }

    /// The validated `[cluster]` settings.
    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// Whether the last call reached Redis (state is shared now).
    pub fn is_shared(&self) -> bool {
        !self.degraded.load(Ordering::Relaxed)
    }

    /// The mode, for `/readyz` and `/admin/routes`.
    pub fn status(&self) -> Status {
        let shared = self.is_shared();
        Status {
            mode: if shared { "shared" } else { "local" },
            on_cluster_error: match self.settings.on_error {
                OnClusterError::Local => "local",
                OnClusterError::FailClosed => "fail_closed",
            },
            last_error: if shared { None } else { lock(&self.last_error).clone() },
        }
    }

    /// What a request meets when a call of `op` was [`Unavailable`]: `Ok` to go on with local
    /// state, or, under `fail_closed`, an OpenAI-shaped 503 (`cluster_unavailable`, retry after
    /// 1 s) that names no server or secret.
    pub fn fallback(&self, _: Unavailable) -> Result<(), ApiError> {
        match self.settings.on_error {
            OnClusterError::Local => Ok(()),
            OnClusterError::FailClosed => {
                let mut e = ApiError::new(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "api_error",
                    "cluster_unavailable",
                    "the gateway's shared state (rate limits, spend, idempotency) is unreachable, and this gateway refuses requests rather than count them on one replica; try again shortly",
                );
                e.retry_after = Some(1);
                Err(e)
            }
        }
    }

    /// A key under the policy's prefix, its parts joined by ':'.
    fn key(&self, parts: &[&str]) -> String {
        let len = self.settings.key_prefix.len() + parts.iter().map(|p| p.len() + 1).sum::<usize>();
        let mut k = String::with_capacity(len);
        self.push_key(&mut k, parts);
        k
    }

    /// [`Self::key`], written at the end of `buf`.
    fn push_key(&self, buf: &mut String, parts: &[&str]) {
        buf.push_str(&self.settings.key_prefix);
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                buf.push(':');
            }
            buf.push_str(p);
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Runs a Redis call made by `make` on this thread's connection, within the policy's
    /// deadline. A call whose connection turns out to be dead (Redis restarted, so the socket
    /// this thread held is gone: a broken pipe or a reset, found only by using it) is made once
    /// more on the connection the manager makes anew, within the same deadline: the command
    /// never reached a Redis that still exists, and without the retry every thread's first call
    /// after a restart would fail and put the replica back on local state. Errors: the call
    /// failed or missed its deadline ([`Unavailable`], counted and logged by `failed`); while
    /// the replica waits to recheck it is not made at all. A failure switches to local state
    /// for `recheck`.
    async fn call<T, F>(&self, op: &'static str, mut make: impl FnMut(ConnectionManager) -> F) -> Result<T, Unavailable>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        if self.waiting_to_recheck() {
            self.metrics.errors.with_label_values(&[op]).inc();
            return Err(Unavailable);
        }
        let attempts = async {
            match make(self.conn()).await {
                Err(e) if e.is_connection_dropped() || (e.is_io_error() && !e.is_timeout()) => make(self.conn()).await,
                r => r,
            }
        };
        let why = match tokio::time::timeout(self.settings.timeout, attempts).await {
            Ok(Ok(v)) => {
                if self.degraded.swap(false, Ordering::Relaxed) {
                    self.local_until.store(0, Ordering::Relaxed);
                    self.metrics.shared.set(1);
                    tracing::info!(
                        "shared state (Redis) answers again: limits, spend, idempotency and pauses are shared"
                    );
                }
                return Ok(v);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} ms", self.settings.timeout.as_millis()),
        };
        self.failed(op, why);
        Err(Unavailable)
    }

    /// Whether the replica is on its local state and Redis is not to be tried yet.
    fn waiting_to_recheck(&self) -> bool {
        self.local_until.load(Ordering::Relaxed) > self.now_ms()
    }

    fn failed(&self, op: &'static str, why: String) {
        let now = self.now_ms();
        self.local_until.store(now + self.settings.recheck.as_millis() as u64, Ordering::Relaxed);
        self.metrics.errors.with_label_values(&[op]).inc();
        self.metrics.shared.set(0);
        let newly = !self.degraded.swap(true, Ordering::Relaxed);
        let last = self.last_log.load(Ordering::Relaxed);
        if newly || now.saturating_sub(last) >= LOG_EVERY.as_millis() as u64 {
            self.last_log.store(now.max(1), Ordering::Relaxed);
            let mode = match self.settings.on_error {
                OnClusterError::Local => "using this replica's own state",
                OnClusterError::FailClosed => "refusing requests (fail_closed)",
            };
            tracing::warn!(op, error = %why, "shared state (Redis) unavailable; {mode} (logged at most every {} s)", LOG_EVERY.as_secs());
        }
        *lock(&self.last_error) = Some(why);
    }

    /// Whether the use gauges of admitted requests are due an update: at most every
    /// [`GAUGE_EVERY`] per process (a label lookup per limit is a measurable part of an
    /// admission; refusals always update theirs).
    fn gauges_due(&self) -> bool {
        let now = self.now_ms();
        let last = self.gauges_at.load(Ordering::Relaxed);
        now >= last + GAUGE_EVERY.as_millis() as u64
            && self.gauges_at.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }

    fn set_used(&self, scope: &str, name: &str, limit: &str, ratio: f64) {
        self.metrics.used.with_label_values(&[scope, name, limit]).set(ratio.clamp(0.0, 1.0));
    }
}

/// One rate limit of a request: `per_minute` cells a minute (a burst of as many), of which the
/// request takes `cost`.
#[derive(Debug, Clone)]
pub struct RateCell<'a> {
    /// "key" or "tenant".
    pub scope: &'static str,
    /// The key's id or the tenant's name (from the policy).
    pub name: &'a str,
    /// "requests" or "images".
    pub limit: &'static str,
    /// The limit, per minute (at least 1).
    pub per_minute: u32,
    /// Cells this request takes (1 for requests, `n` for images).
    pub cost: u32,
}

/// A spend hold asked for together with a request's rate limits ([`Cluster::admit`]).
#[derive(Debug, Clone, Copy)]
pub struct SpendAsk<'a> {
    /// The budget's name: "tenant:NAME" or "mirror:ROUTE:CANDIDATE".
    pub budget: &'a str,
    /// The budget's daily limit, USD.
    pub limit: f64,
    /// What the work is expected to cost, USD, held until it is settled.
    pub estimate: f64,
}

/// The verdict on a request's rate limits and spend hold.
pub enum Admission {
    /// Every limit had room (and the budget, when a hold was asked for): the hold.
    Admitted(Option<SpendHold>),
    /// The rate limit at this index has no room for `wait`; nothing was taken.
    Refused { index: usize, wait: Duration },
    /// The budget has no room (its settled spend and the holds of work in flight); nothing was
    /// taken.
    OverBudget(OverBudget),
}

/// The use gauges (`acc_cluster_limit_used_ratio`) follow admitted requests at most this often.
const GAUGE_EVERY: Duration = Duration::from_millis(100);

/// At most this many admissions go in one call (a batch).
const MAX_BATCH: usize = 64;

/// At most this many spend changes ride on one call; more wait for the next.
const CHANGES_PER_CALL: usize = 256;

/// One request's admission, as the [`lua::ADMIT`] script takes it: its keys and arguments.
#[derive(Default)]
struct Ask {
    /// Its rate limits' keys, then (with a hold) its budget's hash, one after another in one
    /// buffer (the budget's expiry set is named from its hash when the call is written).
    keys: String,
    /// Per rate limit: its limit per minute, the cells it takes, and where its key ends in
    /// `keys`.
    cells: Vec<(u32, u32, usize)>,
    /// With a spend hold: the limit and the estimate (nano-USD, [`nano_usd`]), the hold's id,
    /// its lifetime (ms).
    hold: Option<(u64, u64, String, u64)>,
    /// Whether the reply should say how much of each limit and of the budget is used (for the
    /// gauges, every [`GAUGE_EVERY`]; formatting it costs Redis time on every request).
    usage: bool,
    /// Where the reply line goes (with the ask, whose strings the hold then takes), for an
    /// admission that waited in a lane.
    tx: Option<tokio::sync::oneshot::Sender<Result<(String, Ask), Unavailable>>>,
}

impl Ask {
    /// The rate limit `i`'s key.
    fn rate_key(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.cells[i - 1].2 };
        &self.keys[start..self.cells[i].2]
    }

    /// Where the budget's key starts in `keys` (it runs to the end).
    fn budget_start(&self) -> usize {
        self.cells.last().map_or(0, |c| c.2)
    }

    /// The number of keys the script gets for this admission.
    fn key_count(&self) -> usize {
        self.cells.len() + if self.hold.is_some() { 2 } else { 0 }
    }

    /// The release of the hold this admission asks for, should its answer never reach its
    /// request.
    fn unanswered(&self) -> Option<SpendChange> {
        let (_, _, id, _) = self.hold.as_ref()?;
        Some(SpendChange { key: self.keys[self.budget_start()..].to_string(), hold: id.clone(), usd: 0.0 })
    }
}

/// A thread's admissions: whether a call is out, and those waiting for it.
#[derive(Default)]
struct Lane {
    busy: bool,
    queue: Vec<Ask>,
}

/// Held by the request whose admission call is out: when that call ends (or the request is
/// dropped midway), the admissions that queued meanwhile go as one batch, from a task.
struct NextBatch {
    cluster: Arc<Cluster>,
    lane: Arc<Mutex<Lane>>,
}

impl Drop for NextBatch {
    fn drop(&mut self) {
        let mut l = lock(&self.lane);
        if l.queue.is_empty() {
            l.busy = false;
            return;
        }
        drop(l);
        let (cluster, lane) = (self.cluster.clone(), self.lane.clone());
        self.cluster.spawn(cluster.drain(lane));
    }
}

/// A call of [`Cluster::run_batch`] that failed; `may_have_run` unless Redis was not tried.
struct Failed {
    may_have_run: bool,
}

/// The admission of the request that leads a call: should its answer never come back to it
/// (the request dropped midway, or the call failed after it may have run), the hold it may
/// have been given is released with the next call.
struct Leading<'a> {
    cluster: &'a Arc<Cluster>,
    ask: Ask,
    answered: bool,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.cluster.release_unanswered(&mut self.ask);
        }
    }
}

/// A spend change that rides on the next call to Redis: a hold ended (settled or released)
/// and/or USD added to a budget's settled spend.
struct SpendChange {
    /// The budget's hash for the day.
    key: String,
    /// The hold's id, or empty for a plain charge.
    hold: String,
    usd: f64,
}

impl Cluster {
    /// Takes every cell from every rate limit and, with `spend`, holds its estimate on the
    /// budget, in one script and one round trip (GCRA on Redis's clock, so replicas agree):
    /// all of it, or nothing when one limit or the budget has no room. The spend changes
    /// waiting on this process (settles, releases, charges) go to Redis in the same call.
    pub async fn admit(
        self: &Arc<Self>,
        cells: &[RateCell<'_>],
        spend: Option<SpendAsk<'_>>,
    ) -> Result<Admission, Unavailable> {
        let mut ask = Ask { usage: self.gauges_due(), ..Ask::default() };
        let prefix = &self.settings.key_prefix;
        let mut day = itoa::Buffer::new();
        let day = day.format(utc_day());
        // Every key in one buffer: "rl" keys are prefix:rl:scope:name:limit, the budget's is
        // prefix:spend:budget:day.
        let len = cells.iter().map(|c| prefix.len() + 6 + c.scope.len() + c.name.len() + c.limit.len()).sum::<usize>()
            + spend.map_or(0, |s| prefix.len() + 8 + s.budget.len() + day.len());
        ask.keys.reserve(len);
        ask.cells.reserve(cells.len());
        for c in cells {
            self.push_key(&mut ask.keys, &["rl", c.scope, c.name, c.limit]);
            ask.cells.push((c.per_minute.max(1), c.cost, ask.keys.len()));
        }
        if let Some(s) = spend {
            self.push_key(&mut ask.keys, &["spend", s.budget, day]);
            // The replica, then a counter: unique across replicas (a hold is a field of a
            // budget every replica shares). Written without `format!`, which costs a request
            // several times as much.
            let mut id = String::with_capacity(self.replica.len() + 21);
            id.push_str(&self.replica);
            id.push('-');
            id.push_str(itoa::Buffer::new().format(self.next_id.fetch_add(1, Ordering::Relaxed)));
            ask.hold = Some((nano_usd(s.limit), nano_usd(s.estimate), id, self.settings.lease.as_millis() as u64));
        }
        let op = if cells.is_empty() { "spend" } else { "limits" };
        let ask_usage = ask.usage;
        let (line, mut ask) = self.submit(ask, op).await?;
        let reply: Vec<&str> = line.split(' ').collect();
        let int = |i: usize| reply.get(i).and_then(|v| v.parse::<i64>().ok());
        let spent = |i: usize| reply.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let spend_used = |spent: f64| {
            if let Some(s) = &spend {
                if s.limit.is_finite() && s.limit > 0.0 {
                    let (scope, rest) = s.budget.split_once(':').unwrap_or(("", s.budget));
                    self.set_used(scope, rest, "spend", spent / s.limit);
                }
            }
        };
        match (int(0), int(1)) {
            (Some(0), Some(0)) if reply.len() == if ask_usage { 4 + cells.len() } else { 3 } => {
                if ask_usage {
                    for (i, c) in cells.iter().enumerate() {
                        let used = int(4 + i).unwrap_or(0) as f64 / 60_000_000.0;
                        self.set_used(c.scope, c.name, c.limit, used);
                    }
                    spend_used(spent(3));
                }
                // The hold takes the ask's strings: the budget's key is the end of its buffer.
                let hold = ask.hold.take().map(|(_, _, id, _)| {
                    let start = ask.budget_start();
                    let mut key = std::mem::take(&mut ask.keys);
                    key.drain(..start);
                    SpendHold { cluster: self.clone(), key, id, done: false }
                });
                Ok(Admission::Admitted(hold))
            }
            (Some(-1), _) => {
                let over = OverBudget { spent: spent(2), held: spent(3) };
                spend_used(over.spent);
                Ok(Admission::OverBudget(over))
            }
            (Some(i), Some(wait)) if i >= 1 && (i as usize) <= cells.len() => {
                let index = (i - 1) as usize;
                let c = &cells[index];
                self.set_used(c.scope, c.name, c.limit, 1.0);
                Ok(Admission::Refused { index, wait: Duration::from_micros(wait.max(0) as u64) })
            }
            _ => {
                self.failed(op, format!("unexpected reply {reply:?}"));
                Err(Unavailable)
            }
        }
    }

    /// This thread's lane of admissions.
    fn lane(&self) -> Arc<Mutex<Lane>> {
        let id = std::thread::current().id();
        if let Some(l) = self.lanes.get(&id) {
            return l.clone();
        }
        self.lanes.entry(id).or_default().clone()
    }

    /// Sends one request's admission: at once when this thread has no admission call out (so a
    /// lone request never waits), else with the ones that queue behind that call, as one batch
    /// when it comes back. Returns the request's reply line, and the ask.
    async fn submit(self: &Arc<Self>, mut ask: Ask, op: &'static str) -> Result<(String, Ask), Unavailable> {
        let lane = self.lane();
        let queued = {
            let mut l = lock(&lane);
            if l.busy {
                let (tx, rx) = tokio::sync::oneshot::channel();
                ask.tx = Some(tx);
                l.queue.push(ask);
                Ok(rx)
            } else {
                l.busy = true;
                Err(ask)
            }
        };
        let ask = match queued {
            Ok(rx) => return rx.await.unwrap_or(Err(Unavailable)),
            Err(ask) => ask,
        };
        // This request leads: its call goes now; whatever queues meanwhile is sent by a task
        // when it returns (also when this request is dropped midway).
        let _next = NextBatch { cluster: self.clone(), lane };
        let mut leading = Leading { cluster: self, ask, answered: false };
        match self.run_batch(std::slice::from_mut(&mut leading.ask), op).await {
            Ok(text) => {
                leading.answered = true;
                Ok((text, std::mem::take(&mut leading.ask)))
            }
            Err(Failed { may_have_run }) => {
                leading.answered = !may_have_run;
                Err(Unavailable)
            }
        }
    }

    /// One call for `asks` (and the spend changes waiting, at most [`CHANGES_PER_CALL`]): the
    /// reply, a line per ask, in order. On failure the changes wait for the next call.
    async fn run_batch(&self, asks: &mut [Ask], op: &'static str) -> Result<String, Failed> {
        self.send(self.take_changes(), asks, op).await
    }

    /// [`Self::run_batch`] with the spend changes given, on this thread's connection.
    async fn send(&self, changes: Vec<SpendChange>, asks: &mut [Ask], op: &'static str) -> Result<String, Failed> {
        use redis::RedisWrite;
        use std::io::Write;
        // Not tried at all while the replica waits to recheck Redis ([`Self::call`]): nothing
        // can have run.
        let may_have_run = !self.waiting_to_recheck();
        // EVALSHA written straight into one command, sized once (a `ScriptInvocation` would
        // encode every key and argument twice); the script is loaded when Redis does not know
        // it. A budget's expiry set is named from its hash as the key is written.
        let nkeys = 2 * changes.len() + asks.iter().map(Ask::key_count).sum::<usize>();
        let nargs = 5 + nkeys + 2 * changes.len() + asks.iter().map(|a| 7 + 2 * a.cells.len()).sum::<usize>();
        let bytes = 80
            + changes.iter().map(|c| 2 * c.key.len() + c.hold.len() + 32).sum::<usize>()
            + asks.iter().map(|a| a.keys.len() + 80 + 20 * a.cells.len()).sum::<usize>();
        let mut cmd = redis::Cmd::with_capacity(nargs, bytes);
        let holds = |cmd: &mut redis::Cmd, budget: &str| {
            let mut w = cmd.writer_for_next_arg();
            // Writes into the command's own buffer: cannot fail.
            let _ = w.write_all(budget.as_bytes()).and_then(|()| w.write_all(HOLDS_SUFFIX.as_bytes()));
        };
        cmd.arg("EVALSHA").arg(lua::ADMIT.get_hash()).arg(nkeys);
        for c in &changes {
            cmd.arg(&c.key);
            holds(&mut cmd, &c.key);
        }
        for a in asks.iter() {
            for i in 0..a.cells.len() {
                cmd.arg(a.rate_key(i));
            }
            if a.hold.is_some() {
                let budget = &a.keys[a.budget_start()..];
                cmd.arg(budget);
                holds(&mut cmd, budget);
            }
        }
        cmd.arg(changes.len()).arg(asks.len());
        for c in &changes {
            cmd.arg(&c.hold).arg(nano_usd(c.usd));
        }
        for a in asks.iter() {
            cmd.arg(a.cells.len()).arg(u8::from(a.hold.is_some())).arg(u8::from(a.usage));
            for (per_minute, cost, _) in &a.cells {
                cmd.arg(*per_minute).arg(*cost);
            }
            if let Some((limit, estimate, id, lease_ms)) = &a.hold {
                cmd.arg(*limit).arg(*estimate).arg(id).arg(*lease_ms);
            }
        }
        let cmd = &cmd;
        let run = |mut conn: ConnectionManager| async move {
            match cmd.query_async(&mut conn).await {
                Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                    lua::ADMIT.load_async(&mut conn).await?;
                    cmd.query_async(&mut conn).await
                }
                r => r,
            }
        };
        let text: String = match self.call(op, run).await {
            Ok(r) => r,
            Err(_) => {
                self.restore_changes(changes);
                return Err(Failed { may_have_run });
            }
        };
        if asks.is_empty() {
            return Ok(text);
        }
        let lines = 1 + text.bytes().filter(|b| *b == b'\n').count();
        if lines != asks.len() {
            self.failed(op, format!("unexpected reply {text:?} for {} admissions", asks.len()));
            return Err(Failed { may_have_run: true });
        }
        Ok(text)
    }

    /// Releases, with the next call, the hold `a` asked for (if any): its request will never
    /// own it.
    fn release_unanswered(self: &Arc<Self>, a: &mut Ask) {
        if let Some(change) = a.unanswered() {
            a.hold = None;
            self.release_after(change);
        }
    }

    /// Sends the release of a hold whose admission call may still be on its way, from a task
    /// on this thread, so on this thread's connection: Redis runs it after that call (the
    /// shared queue could send it on another worker's connection, first, and the hold would
    /// then be taken after its release). When it fails, it waits in the queue.
    fn release_after(self: &Arc<Self>, change: SpendChange) {
        let c = self.clone();
        self.spawn(async move {
            let _ = c.send(vec![change], &mut [], "spend").await;
        });
    }

    /// Sends the admissions queued on `lane`, batch after batch, until none is left; then the
    /// lane is free for the next request to lead.
    async fn drain(self: Arc<Self>, lane: Arc<Mutex<Lane>>) {
        loop {
            let mut asks = {
                let mut l = lock(&lane);
                if l.queue.is_empty() {
                    l.busy = false;
                    return;
                }
                let n = l.queue.len().min(MAX_BATCH);
                l.queue.drain(..n).collect::<Vec<_>>()
            };
            let op = if asks.iter().any(|a| !a.cells.is_empty()) { "limits" } else { "spend" };
            match self.run_batch(&mut asks, op).await {
                Ok(text) => {
                    for (mut a, line) in asks.drain(..).zip(text.split('\n')) {
                        let Some(tx) = a.tx.take() else { continue };
                        if let Err(Ok((_, mut a))) = tx.send(Ok((line.to_string(), a))) {
                            // The request went away while it waited (its client left): a
                            // hold it was given is released with the next call (a refused
                            // request's hold was never taken, and releasing it does nothing).
                            self.release_unanswered(&mut a);
                        }
                    }
                }
                Err(Failed { may_have_run }) => {
                    // One call failed for every request of the batch: each is counted, and a
                    // hold it may have been given (a call that missed its deadline may still
                    // have run) is released with the next call.
                    self.metrics.errors.with_label_values(&[op]).inc_by(asks.len().saturating_sub(1) as u64);
                    for a in &mut asks {
                        if let Some(tx) = a.tx.take() {
                            let _ = tx.send(Err(Unavailable));
                        }
                        if may_have_run {
                            self.release_unanswered(a);
                        }
                    }
                }
            }
        }
    }

    /// How much of each limit is used now, cluster-wide (0 to 1), without taking anything.
    pub async fn rate_usage(&self, cells: &[RateCell<'_>]) -> Result<Vec<f64>, Unavailable> {
        let mut inv = lua::GCRA_PEEK.prepare_invoke();
        for c in cells {
            inv.key(self.key(&["rl", c.scope, c.name, c.limit]));
        }
        let inv = &inv;
        let reply: Vec<i64> = self.call("usage", |mut c| async move { inv.invoke_async(&mut c).await }).await?;
        Ok(reply.iter().map(|u| (*u as f64 / 60_000_000.0).clamp(0.0, 1.0)).collect())
    }

    /// Sends the spend changes still waiting (at shutdown), within the call deadline.
    pub async fn flush(self: &Arc<Self>) {
        while !lock(&self.changes).is_empty() {
            if self.run_batch(&mut [], "spend").await.is_err() {
                return;
            }
        }
    }

    /// Sends the spend changes still waiting, when Redis is to be tried: run every sync
    /// period, so that what waited through an outage (local spend owed, settles) reaches Redis
    /// once it answers, without waiting for a request's call to ride on.
    pub async fn flush_waiting(self: &Arc<Self>) {
        if !self.waiting_to_recheck() {
            self.flush().await;
        }
    }

    /// The spend changes waiting to go to Redis, all of them (the caller sends them).
    fn take_changes(&self) -> Vec<SpendChange> {
        let mut p = lock(&self.changes);
        if p.is_empty() {
            Vec::new()
        } else if p.len() <= CHANGES_PER_CALL {
            std::mem::take(&mut *p)
        } else {
            p.drain(..CHANGES_PER_CALL).collect()
        }
    }

    /// Puts back changes a failed call did not deliver, oldest first, keeping at most
    /// [`MAX_CHANGES`] (the newest); what is cut is counted as a failed `spend` call.
    fn restore_changes(&self, mut changes: Vec<SpendChange>) {
        if changes.is_empty() {
            return;
        }
        let mut p = lock(&self.changes);
        changes.append(&mut p);
        let over = changes.len().saturating_sub(MAX_CHANGES);
        if over > 0 {
            changes.drain(..over);
            self.metrics.errors.with_label_values(&["spend"]).inc_by(over as u64);
        }
        *p = changes;
    }

    /// Queues a spend change for the next call; a flush runs [`FLUSH_AFTER`] later when no
    /// request's call has taken it by then.
    fn queue_change(self: &Arc<Self>, change: SpendChange) {
        lock(&self.changes).push(change);
        if !self.flush_armed.swap(true, Ordering::AcqRel) {
            let c = self.clone();
            self.spawn(async move {
                tokio::time::sleep(FLUSH_AFTER).await;
                c.flush_armed.store(false, Ordering::Release);
                c.flush().await;
            });
        }
    }
}

/// What a budget's expiry set (hold id → expiry, Redis ms) adds to its hash's name.
const HOLDS_SUFFIX: &str = ":holds";

/// An amount of money as the [`lua::ADMIT`] script takes it: whole nano-USD (1e-9 USD),
/// rounded; negative and NaN amounts are 0, and amounts past `u64::MAX` nano-USD (about 1.8e10
/// USD: no limit) saturate. Integers cost a request a fraction of what writing a float does.
fn nano_usd(usd: f64) -> u64 {
    // `as` saturates: NaN and negatives go to 0, infinity and overflow to u64::MAX.
    (usd * 1e9).round() as u64
}

/// The UTC day number of now.
fn utc_day() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()) / 86_400
}

/// An estimate held on a shared daily budget while work runs. Settle it with what the work
/// cost; dropped unsettled, the estimate is released. Either goes to Redis with the next call
/// (a request's admission) or within [`FLUSH_AFTER`].
pub struct SpendHold {
    cluster: Arc<Cluster>,
    key: String,
    id: String,
    done: bool,
}

/// A refused spend hold: what filled the budget today, USD.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverBudget {
    /// Settled spend (what finished work cost).
    pub spent: f64,
    /// The estimates held by work still in flight (0 when the reply does not say: a replica
    /// of an earlier build's script).
    pub held: f64,
}

impl Cluster {
    /// Holds `estimate` USD of today's `limit` on the budget `name` ("tenant:acme",
    /// "mirror:route:candidate"), shared by every replica: `Ok(Err(what filled it))` when the
    /// day's settled spend plus the estimates held would pass the limit. A hold not settled
    /// within the idempotency lease time (a replica that died) stops counting.
    pub async fn reserve(
        self: &Arc<Self>,
        name: &str,
        limit: f64,
        estimate: f64,
    ) -> Result<Result<SpendHold, OverBudget>, Unavailable> {
        match self.admit(&[], Some(SpendAsk { budget: name, limit, estimate })).await? {
            Admission::Admitted(Some(hold)) => Ok(Ok(hold)),
            Admission::OverBudget(over) => Ok(Err(over)),
            Admission::Admitted(None) | Admission::Refused { .. } => Err(Unavailable),
        }
    }

    /// Keeps a gateway-served image in Redis for `ttl` under `{key_prefix}art:{id}` (the bytes
    /// only: the media type is read from them again), so that every replica can serve its URL.
    /// Sent off the request path; a failure is counted (`op="artifacts"`) and the URL is still
    /// served by this replica.
    pub fn share_artifact(self: &Arc<Self>, id: &str, bytes: bytes::Bytes, ttl: Duration) {
        let (c, key, id) = (self.clone(), self.key(&["art", id]), id.to_string());
        lock(&self.sharing).insert(id.clone(), false);
        self.spawn(async move {
            let mut cmd = redis::cmd("SET");
            cmd.arg(&key).arg(&bytes[..]).arg("PX").arg(ttl.as_millis().max(1) as u64);
            let cmd = &cmd;
            let _ = c.call("artifacts", |mut conn| async move { cmd.query_async::<()>(&mut conn).await }).await;
            // Evicted while the SET was out: its DEL may have run first, so it goes again now.
            if lock(&c.sharing).remove(&id) == Some(true) {
                c.forget_artifacts(vec![id]);
            }
        });
    }

    /// Takes the images `ids` out of Redis (this replica's store evicted them for room), in
    /// the background; nothing when `ids` is empty.
    pub fn forget_artifacts(self: &Arc<Self>, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        {
            let mut sharing = lock(&self.sharing);
            for id in &ids {
                if let Some(evicted) = sharing.get_mut(id) {
                    *evicted = true;
                }
            }
        }
        let c = self.clone();
        self.spawn(async move {
            let mut cmd = redis::cmd("DEL");
            for id in &ids {
                cmd.arg(c.key(&["art", id]));
            }
            let cmd = &cmd;
            let _ = c.call("artifacts", |mut conn| async move { cmd.query_async::<i64>(&mut conn).await }).await;
        });
    }

    /// An image another replica keeps for a URL ([`Self::share_artifact`]): its bytes and how
    /// long the URL has left, `None` when there is none (unknown or expired). One round trip
    /// (GET and PTTL in a pipeline). Errors: [`Unavailable`].
    pub async fn artifact(&self, id: &str) -> Result<Option<(bytes::Bytes, Duration)>, Unavailable> {
        let key = self.key(&["art", id]);
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&key).cmd("PTTL").arg(&key);
        let pipe = &pipe;
        let (value, ttl): (Option<Vec<u8>>, i64) =
            self.call("artifacts", |mut c| async move { pipe.query_async(&mut c).await }).await?;
        Ok(value.filter(|_| ttl > 0).map(|v| (bytes::Bytes::from(v), Duration::from_millis(ttl as u64))))
    }

    /// Charges `usd` to today's shared budget `name` with the next call (or within
    /// [`FLUSH_AFTER`]): spend made while Redis could not be asked (local mode), so that the
    /// budget every replica reads still holds it once Redis answers again. Waits, as every
    /// change does, while Redis is away (at most [`MAX_CHANGES`]).
    pub fn charge_budget(self: &Arc<Self>, name: &str, usd: f64) {
        if usd > 0.0 {
            let key = self.key(&["spend", name, &utc_day().to_string()]);
            self.queue_change(SpendChange { key, hold: String::new(), usd });
        }
    }

    /// Settled spend today on the budget `name`, USD, cluster-wide.
    pub async fn spent_today(&self, name: &str) -> Result<f64, Unavailable> {
        let key = self.key(&["spend", name, &utc_day().to_string()]);
        let mut cmd = redis::cmd("HGET");
        cmd.arg(&key).arg("spent");
        let cmd = &cmd;
        let v: Option<String> = self.call("usage", |mut c| async move { cmd.query_async(&mut c).await }).await?;
        Ok(v.and_then(|s| s.parse().ok()).unwrap_or(0.0))
    }
}

impl SpendHold {
    /// Charges `usd` to today's shared spend (with the next call); the estimate stays held.
    pub fn charge(&self, usd: f64) {
        if usd > 0.0 {
            self.cluster.queue_change(SpendChange { key: self.key.clone(), hold: String::new(), usd });
        }
    }

    /// Replaces the estimate by what the work cost, in one atomic step (with the next call).
    pub fn settle(mut self, actual: f64) {
        self.finish(actual);
    }

    /// Queues the hold's end (its strings go with it: the hold is done).
    fn finish(&mut self, actual: f64) {
        self.done = true;
        let change = SpendChange {
            key: std::mem::take(&mut self.key),
            hold: std::mem::take(&mut self.id),
            usd: actual.max(0.0),
        };
        self.cluster.queue_change(change);
    }
}

impl Drop for SpendHold {
    fn drop(&mut self) {
        if !self.done {
            self.finish(0.0);
        }
    }
}

/// A provider's hold-off learnt by one replica and shared with all: until when, as Unix
/// milliseconds.
pub type HoldOff = (String, u64);

/// A hold-off learnt by this replica, as published: provider, until (Unix ms), and the newest
/// reset by hand this replica had applied to that provider (Redis's Unix ms; 0 for none).
pub type Published = (String, u64, u64);

impl Cluster {
    /// Publishes this replica's new 429 pauses and opened breakers (a later end never shortens
    /// an earlier one) and reads every replica's, still running, in one script.
    ///
    /// Returns every replica's pauses and opened breakers still running, and the resets by
    /// hand of the last hour ([`Self::reset_hold_offs`]), each as (provider, Unix ms).
    ///
    /// A hold-off published with an older reset than the one Redis records for its provider
    /// was learnt before that reset reached this replica: it is dropped, not published.
    pub async fn exchange(
        &self,
        pauses: &[Published],
        breakers: &[Published],
    ) -> Result<(Vec<HoldOff>, Vec<HoldOff>, Vec<HoldOff>), Unavailable> {
        let mut inv = lua::HOLD_OFF.prepare_invoke();
        inv.key(self.key(&["pauses"])).key(self.key(&["breakers"])).key(self.key(&["resets"])).arg(pauses.len());
        for (p, until, seen) in pauses.iter().chain(breakers) {
            inv.arg(p).arg(*until).arg(*seen);
        }
        let inv = &inv;
        let (p, b, r): (Vec<String>, Vec<String>, Vec<String>) =
            self.call("pauses", |mut c| async move { inv.invoke_async(&mut c).await }).await?;
        let pairs = |v: Vec<String>| -> Vec<HoldOff> {
            v.chunks_exact(2).filter_map(|c| Some((c[0].clone(), c[1].parse().ok()?))).collect()
        };
        Ok((pairs(p), pairs(b), pairs(r)))
    }

    /// Deletes provider `name`'s shared 429 pause and opened breaker and publishes a reset by
    /// hand, which the other replicas apply at their next [`Self::exchange`]. Returns the
    /// reset's time (Redis's clock, Unix ms); `Err` when Redis did not answer (counted as
    /// `acc_cluster_errors_total{op="pauses"}`).
    pub async fn reset_hold_offs(&self, name: &str) -> Result<u64, Unavailable> {
        let mut inv = lua::RESET_HOLD_OFFS.prepare_invoke();
        inv.key(self.key(&["pauses"])).key(self.key(&["breakers"])).key(self.key(&["resets"])).arg(name);
        let inv = &inv;
        self.call("pauses", |mut c| async move { inv.invoke_async(&mut c).await }).await
    }
}

/// Unix milliseconds now.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_go_to_the_script_as_whole_nano_usd() {
        assert_eq!(nano_usd(0.04), 40_000_000);
        assert_eq!(nano_usd(1_000_000_000.0), 1_000_000_000_000_000_000);
        // Rounded to the nearest nano-USD, never below zero, "no limit" saturated.
        assert_eq!(nano_usd(0.000_000_000_6), 1);
        assert_eq!(nano_usd(-3.0), 0);
        assert_eq!(nano_usd(f64::NAN), 0);
        assert_eq!(nano_usd(f64::INFINITY), u64::MAX);
        assert_eq!(nano_usd(1e300), u64::MAX);
        // The script divides by 1e9: an estimate comes back as the same double.
        for usd in [0.04, 0.0001, 0.19, 12.5, 123.456789] {
            assert_eq!(nano_usd(usd) as f64 / 1e9, usd);
        }
    }
}
