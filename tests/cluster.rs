//! Several replicas, one set of limits (`[cluster]`): three `acc serve` processes with the same
//! policy share a real `redis-server` (Debian's package; `scripts/redis.sh`) and one real
//! PostgreSQL trace store, behind which mock providers count every generation. Each test checks
//! what clients get across the replicas, which mocks were hit how often, and what `/metrics`,
//! `/readyz` and `/admin/routes` say.
//!
//! `scripts/test.sh` starts Redis and exports `ACC_TEST_REDIS_URL` (with `ACC_REQUIRE_REDIS=1`:
//! fail rather than skip). Tests that stop Redis start one of their own with `scripts/redis.sh`.
//! Every test writes under its own key prefix, so they run in parallel on one server.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const KEY_A: &str = "sk-acc-cluster-a-5e1f";
const KEY_B: &str = "sk-acc-cluster-b-90c4";

/// A Redis server started by this test (stopped and deleted on drop).
struct OwnRedis {
    dir: tempfile::TempDir,
    url: String,
}

fn redis_script(args: &[&str]) -> String {
    let out = Command::new(repo_root().join("scripts/redis.sh")).args(args).output().expect("run scripts/redis.sh");
    assert!(out.status.success(), "scripts/redis.sh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let dir = tempfile::tempdir().unwrap();
        let url = redis_script(&["start", dir.path().to_str().unwrap()]);
        OwnRedis { dir, url }
    }
    fn stop(&self) {
        redis_script(&["stop", self.dir.path().to_str().unwrap()]);
    }
    /// Starts it again on the same port (empty: it keeps nothing on disk).
    fn restart(&self) {
        assert_eq!(redis_script(&["start", self.dir.path().to_str().unwrap()]), self.url);
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/redis.sh"))
            .args(["stop", self.dir.path().to_str().unwrap()])
            .output();
    }
}

/// The Redis of the test command, or, without one, a server of this test's own.
fn shared_redis() -> (String, Option<OwnRedis>) {
    match std::env::var("ACC_TEST_REDIS_URL").ok().filter(|u| !u.is_empty()) {
        Some(url) => (url, None),
        None => {
            assert!(std::env::var("ACC_REQUIRE_REDIS").as_deref() != Ok("1"), "ACC_TEST_REDIS_URL is unset");
            let own = OwnRedis::start();
            (own.url.clone(), Some(own))
        }
    }
}

/// `[store]` on a PostgreSQL database of this test's own (`ACC_TEST_POSTGRES_URL`), shared by
/// the replicas; SQLite per replica when there is no PostgreSQL (outside scripts/test.sh).
async fn trace_store() -> (String, Option<String>) {
    use sqlx::Connection;
    let Some(url) = std::env::var("ACC_TEST_POSTGRES_URL").ok().filter(|u| !u.is_empty()) else {
        assert!(std::env::var("ACC_REQUIRE_POSTGRES").as_deref() != Ok("1"), "ACC_TEST_POSTGRES_URL is unset");
        return (String::new(), None);
    };
    let db = format!("acc_cluster_{:016x}", fastrand::u64(..));
    let mut admin = sqlx::PgConnection::connect(&url).await.expect("connect to ACC_TEST_POSTGRES_URL");
    sqlx::query(&format!("CREATE DATABASE {db}")).execute(&mut admin).await.expect("create database");
    let db_url = format!("{}/{db}", url.rsplit_once('/').unwrap().0);
    (format!("[store]\nurl = \"{db_url}\"\n"), Some(db_url))
}

/// Three replicas of one policy, with their mocks.
struct Replicas {
    gws: Vec<Gateway>,
    primary: MockProvider,
    backup: MockProvider,
    dir: PolicyDir,
    pg: Option<String>,
    _redis: Option<OwnRedis>,
}

struct Opts<'a> {
    redis_url: &'a str,
    /// Extra `[cluster]` lines.
    cluster: &'a str,
    /// `[tenants.acme]` lines.
    tenant: &'a str,
    /// `[providers.primary]` lines.
    primary: &'a str,
    env: &'a [(&'a str, &'a str)],
    replicas: usize,
    /// Lines of route `main`.
    main: &'a str,
    /// More tables (providers).
    more: &'a str,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts { redis_url: "", cluster: "", tenant: "", primary: "", env: &[], replicas: 3, main: "", more: "" }
    }
}

/// Route `main` (model "m") -> `primary`, falling back to route `spare` -> `backup`; keys A and
/// B of tenant `acme`; `[cluster]` on `redis_url` under a key prefix of this test's own.
async fn replicas(o: Opts<'_>, own: Option<OwnRedis>) -> Replicas {
    let primary = MockProvider::start().await;
    let backup = MockProvider::start().await;
    let (store, pg) = trace_store().await;
    let policy = format!(
        r#"[[keys]]
sha256 = "{}"
tenant = "acme"

[[keys]]
sha256 = "{}"
tenant = "acme"

[tenants.acme]
{}

[cluster]
redis_url = "{}"
key_prefix = "t{:012x}:"
{}

{store}
{}
{}{}{}{}"#,
        sha256_hex(KEY_A),
        sha256_hex(KEY_B),
        o.tenant,
        o.redis_url,
        fastrand::u64(..1 << 48),
        o.cluster,
        o.more,
        openai_provider_with("primary", &primary, o.primary),
        openai_provider("backup", &backup),
        route_toml("main", "m").target("primary", "primary-model").fallback("spare").with(o.main),
        route_toml("spare", "spare-only").target("backup", "backup-model"),
    );
    // The suite runs many replicas on a busy 2-core machine: a generous deadline, so that only
    // the tests that stop Redis see the local fallback.
    let policy = if o.cluster.contains("timeout_ms") {
        policy
    } else {
        policy.replacen("[cluster]\n", "[cluster]\ntimeout_ms = 2000\n", 1)
    };
    let dir = PolicyDir::with(&policy);
    let mut gws = Vec::new();
    for _ in 0..o.replicas {
        gws.push(Gateway::start_with_env(dir.path(), o.env).await);
    }
    Replicas { gws, primary, backup, dir, pg, _redis: own }
}

impl Replicas {
    /// The Redis key prefix of this test's policy.
    fn key_prefix(&self) -> String {
        let policy = std::fs::read_to_string(self.dir.path().join("policy.toml")).unwrap();
        policy.split("key_prefix = \"").nth(1).unwrap().split('"').next().unwrap().to_string()
    }

    /// The Redis hash of tenant acme's spend today.
    fn budget_key(&self) -> String {
        let day = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 86_400;
        format!("{}spend:tenant:acme:{day}", self.key_prefix())
    }
}

/// [`replicas`] on a Redis server of the test's own (`url` and the server filled in): the
/// replicas and the server's URL.
async fn replicas_own_redis(o: Opts<'_>) -> (Replicas, String) {
    let own = OwnRedis::start();
    let url = own.url.clone();
    (replicas(Opts { redis_url: &url, ..o }, Some(own)).await, url)
}

fn req() -> Value {
    json!({"model": "m", "prompt": "a lighthouse at dusk", "n": 1, "size": "1024x1024", "response_format": "b64_json"})
}

async fn as_key(gw: &Gateway, key: &str, body: &Value, extra: &[(&str, &str)]) -> Resp {
    let auth = bearer(key);
    let mut h = vec![("authorization", auth.as_str())];
    h.extend_from_slice(extra);
    gw.generate_with(body, &h).await
}

async fn admin_json(gw: &Gateway, path: &str) -> Value {
    let r = gw.admin("GET", path).await;
    r.assert_status(200);
    r.json()
}

async fn readyz(gw: &Gateway) -> Value {
    let r = get(&gw.admin_url("/readyz"), &[]).await;
    r.assert_status(200);
    r.json()
}

/// Polls `check` every 50 ms until it holds or `within` passes.
async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_rate_limit_holds_across_three_replicas() {
    let (url, own) = shared_redis();
    const N: usize = 120;
    let r =
        replicas(Opts { redis_url: &url, tenant: &format!("requests_per_minute = {N}"), ..Default::default() }, own)
            .await;
    // Three times the limit, spread evenly over the replicas, 12 at a time.
    let started = Instant::now();
    let proxies: Vec<String> = r.gws.iter().map(|g| g.url("/v1/images/generations")).collect();
    let mut set = tokio::task::JoinSet::new();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(12));
    for i in 0..3 * N {
        let (url, sem) = (proxies[i % 3].clone(), sem.clone());
        let key = if i % 2 == 0 { KEY_A } else { KEY_B };
        set.spawn(async move {
            let _p = sem.acquire_owned().await.unwrap();
            let r = post_json(&url, &req(), &[("authorization", &bearer(key))]).await;
            (i % 3, r.status, r.header("retry-after"))
        });
    }
    let mut ok = [0usize; 3];
    let mut limited = 0;
    while let Some(res) = set.join_next().await {
        let (replica, status, retry_after) = res.unwrap();
        match status {
            200 => ok[replica] += 1,
            429 => {
                limited += 1;
                assert!(retry_after.is_some(), "a rate-limited answer says when to retry");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed: usize = ok.iter().sum();
    // GCRA refills N per minute: what the run's duration adds to the burst of N.
    let refill = N as f64 * elapsed / 60.0;
    let (low, high) = (N as f64 * 0.95, (N as f64 + refill) * 1.05);
    assert!(
        (low..=high).contains(&(allowed as f64)),
        "{allowed} of {} requests passed a limit of {N}/min across 3 replicas in {elapsed:.1} s (expected {low:.0}..={high:.0}; per replica {ok:?})",
        3 * N
    );
    assert!(ok.iter().all(|&n| n > 0), "every replica served some: {ok:?}");
    assert_eq!(allowed + limited, 3 * N);
    assert_eq!(r.primary.hits(), allowed, "a limited request reaches no provider");
    // The limit is used up cluster-wide, as every replica's admin view and metrics say.
    for gw in &r.gws {
        let c = &admin_json(gw, "/admin/routes").await["cluster"];
        assert_eq!(c["mode"], "shared", "{c}");
        assert!(c["shared"].as_array().unwrap().contains(&json!("rate_limits")), "{c}");
        let used = c["tenants"]["acme"]["requests_per_minute"]["used_ratio"].as_f64().unwrap_or_else(|| panic!("{c}"));
        assert!(used > 0.9, "cluster-wide use of the tenant's limit: {used} ({c})");
        assert_eq!(c["tenants"]["acme"]["requests_per_minute"]["limit"], json!(N), "{c}");
    }
    let used = r.gws[0]
        .metric("acc_cluster_limit_used_ratio", &[("scope", "tenant"), ("name", "acme"), ("limit", "requests")])
        .await;
    assert!(used > 0.9, "acc_cluster_limit_used_ratio {used}");
    let refused: f64 = {
        let mut t = 0.0;
        for gw in &r.gws {
            t += gw.metric("acc_rate_limited_total", &[("tenant", "acme"), ("limit", "requests")]).await;
        }
        t
    };
    assert_eq!(refused as usize, limited);
    drop_pg(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_generates_once_across_replicas() {
    let (url, own) = shared_redis();
    let r = replicas(Opts { redis_url: &url, ..Default::default() }, own).await;
    r.primary.set_latency(Duration::from_millis(1500));
    let key = format!("order-{:x}", fastrand::u64(..));
    let headers = |k: &str| vec![("idempotency-key".to_string(), k.to_string())];
    let send = |i: usize| {
        let url = r.gws[i].url("/v1/images/generations");
        let h = headers(&key);
        tokio::spawn(async move {
            let auth = bearer(KEY_A);
            let mut hv: Vec<(&str, &str)> = h.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            hv.push(("authorization", &auth));
            post_json(&url, &req(), &hv).await
        })
    };
    let a = send(0);
    // B arrives while A's generation is in flight on another replica.
    assert!(eventually(Duration::from_secs(20), || async { r.primary.hits() == 1 }).await, "A reached the provider");
    let b = send(1);
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    // C after it finished.
    let c = as_key(&r.gws[2], KEY_A, &req(), &[("idempotency-key", &key)]).await;
    for (name, resp) in [("A", &a), ("B", &b), ("C", &c)] {
        assert_eq!(resp.status, 200, "{name}: {}", resp.describe());
    }
    assert_eq!(r.primary.hits(), 1, "one upstream generation for three requests with one key");
    assert_eq!(a.body, b.body, "B (waited on A, another replica) gets A's answer");
    assert_eq!(a.body, c.body, "C (after A, another replica) gets A's answer");
    assert_eq!(a.header("x-acc-trace-id"), c.header("x-acc-trace-id"));
    assert_eq!(a.header("x-acc-idempotent-replay"), None);
    assert_eq!(b.header("x-acc-idempotent-replay").as_deref(), Some("true"));
    assert_eq!(c.header("x-acc-idempotent-replay").as_deref(), Some("true"));
    assert_eq!(r.gws[1].metric("acc_idempotency_total", &[("result", "waited")]).await, 1.0);
    assert_eq!(r.gws[2].metric("acc_idempotency_total", &[("result", "replayed")]).await, 1.0);
    // The same key with another body, on yet another replica: 409, nothing generated.
    let mut other = req();
    other["prompt"] = json!("another prompt");
    let d = as_key(&r.gws[1], KEY_A, &other, &[("idempotency-key", &key)]).await;
    d.assert_error(409, "idempotency_key_reused");
    assert_eq!(r.primary.hits(), 1);
    // One trace record in the shared store, seen from C, a replica that did not make it.
    if r.pg.is_some() {
        let trace = a.header("x-acc-trace-id").unwrap();
        let found = eventually(Duration::from_secs(10), || async {
            r.gws[2].admin("GET", &format!("/admin/traces/{trace}")).await.status == 200
        })
        .await;
        assert!(found, "the leader's trace record is in the shared PostgreSQL store");
    }
    // The stored answer outlives the replica that made it.
    let mut r = r;
    r.gws.remove(0);
    let e = as_key(&r.gws[0], KEY_A, &req(), &[("idempotency-key", &key)]).await;
    assert_eq!((e.status, &e.body), (200, &a.body));
    assert_eq!(r.primary.hits(), 1);
    drop_pg(&r).await;
}

/// An in-flight Idempotency-Key lease lives as long as its leader runs (renewed every third of
/// its lifetime), however long the generation takes; when the leader's replica dies, the key is
/// free again within that lifetime and a retry on another replica generates. A trial saw a
/// retry wait 233 s for a dead replica's lease (and one give up after a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_lease_lives_with_its_leader_and_ends_with_its_replica() {
    let (url, own) = shared_redis();
    let mut r =
        replicas(Opts { redis_url: &url, cluster: "lease_secs = 2", replicas: 2, ..Default::default() }, own).await;
    // Each generation takes longer than the lease's lifetime.
    r.primary.set_latency(Duration::from_millis(3500));
    let send = |gw: &Gateway, key: String| {
        let url = gw.url("/v1/images/generations");
        tokio::spawn(async move {
            let auth = bearer(KEY_A);
            try_send(
                "POST",
                &url,
                &[("content-type", "application/json"), ("authorization", &auth), ("idempotency-key", &key)],
                serde_json::to_vec(&req()).unwrap(),
            )
            .await
        })
    };
    let key = format!("order-{:x}", fastrand::u64(..));
    let a = send(&r.gws[0], key.clone());
    assert!(eventually(Duration::from_secs(20), || async { r.primary.hits() == 1 }).await, "A reached the provider");
    let b = send(&r.gws[1], key.clone());
    let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
    assert_eq!((a.status, b.status), (200, 200), "{} / {}", a.describe(), b.describe());
    assert_eq!(
        r.primary.hits(),
        1,
        "the lease outlived its 2 s lifetime while its leader ran: B waited for A's answer"
    );
    assert_eq!(a.body, b.body);

    // The leader's replica dies mid-generation: the retry on the other replica generates, once
    // the dead leader's lease has run out.
    let key = format!("order-{:x}", fastrand::u64(..));
    let _orphan = send(&r.gws[0], key.clone());
    assert!(eventually(Duration::from_secs(20), || async { r.primary.hits() == 2 }).await, "A reached the provider");
    drop(r.gws.remove(0)); // SIGKILL
    let t = Instant::now();
    let retry = as_key(&r.gws[0], KEY_A, &req(), &[("idempotency-key", &key)]).await;
    assert_eq!(retry.status, 200, "{}", retry.describe());
    assert_eq!(r.primary.hits(), 3, "the retry generated");
    assert!(t.elapsed() < Duration::from_secs(15), "waited {:?}: the lease's 2 s and a generation", t.elapsed());
    drop_pg(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_daily_spend_limit_holds_across_replicas() {
    let (url, own) = shared_redis();
    let mut r = replicas(
        Opts {
            redis_url: &url,
            tenant: "spend_usd_per_day = 0.1",
            primary: "price = { per_image_usd = 0.04 }",
            ..Default::default()
        },
        own,
    )
    .await;
    // 0.04 on A, 0.04 on B; a third 0.04 on C would pass 0.10.
    for i in 0..2 {
        let resp = as_key(&r.gws[i], KEY_A, &req(), &[]).await;
        resp.assert_status(200);
        assert_eq!(resp.header("x-acc-cost-usd").as_deref(), Some("0.04"), "{}", resp.describe());
    }
    let resp = as_key(&r.gws[2], KEY_B, &req(), &[]).await;
    let err = resp.assert_error(429, "spend_limit_exceeded");
    assert_eq!(err["type"], "insufficient_quota");
    assert!(err["message"].as_str().unwrap().contains("0.10 USD per day"), "{err}");
    assert_eq!(r.primary.hits(), 2);
    // Every replica refuses, and says how much was spent.
    for gw in &r.gws {
        as_key(gw, KEY_A, &req(), &[]).await.assert_error(429, "spend_limit_exceeded");
        // Settled in the background once each answer is out: cluster-wide within moments.
        let settled = eventually(Duration::from_secs(20), || async {
            let c = admin_json(gw, "/admin/routes").await;
            let spent = &c["cluster"]["tenants"]["acme"]["spend_usd_per_day"];
            spent["spent_today_usd"].as_f64().is_some_and(|s| (s - 0.08).abs() < 1e-9)
        })
        .await;
        assert!(settled, "0.08 USD spent today, cluster-wide, says {}", gw.admin);
    }
    assert_eq!(r.primary.hits(), 2);
    // A replica that restarts still knows.
    r.gws.remove(0);
    r.gws.push(Gateway::start(r.dir.path()).await);
    let err = as_key(&r.gws[2], KEY_A, &req(), &[]).await.assert_error(429, "spend_limit_exceeded");
    assert!(err["message"].as_str().unwrap().contains("0.0200 USD left"), "{err}");
    assert_eq!(r.primary.hits(), 2);
    drop_pg(&r).await;
}

/// A budget full only of the estimates of requests in flight on other replicas says so, with
/// a Retry-After of seconds (those requests end, and what they cost is settled), not the time
/// to midnight that a spent budget gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_budget_held_by_requests_in_flight_is_retried_in_seconds() {
    let (url, own) = shared_redis();
    let r = replicas(
        Opts {
            redis_url: &url,
            tenant: "spend_usd_per_day = 0.1",
            primary: "price = { per_image_usd = 0.04 }",
            ..Default::default()
        },
        own,
    )
    .await;
    r.primary.set_latency(Duration::from_millis(3000));
    let body = req();
    let third = async {
        let held = eventually(Duration::from_secs(10), || async { r.primary.in_flight() == 2 }).await;
        assert!(held, "two requests in flight");
        as_key(&r.gws[2], KEY_B, &body, &[]).await
    };
    let (a, b, resp) = tokio::join!(as_key(&r.gws[0], KEY_A, &body, &[]), as_key(&r.gws[1], KEY_A, &body, &[]), third);
    a.assert_status(200);
    b.assert_status(200);
    let err = resp.assert_error(429, "spend_limit_exceeded");
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains("0.0000 USD spent and 0.0800 USD held for requests in flight"), "{msg}");
    let retry: u64 = resp.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=5).contains(&retry), "Retry-After {retry}: seconds, not the time to midnight");
    assert_eq!(r.primary.hits(), 2);
    drop_pg(&r).await;
}

/// Calls of each Redis command since the last `CONFIG RESETSTAT` (`INFO commandstats`).
fn redis_calls(url: &str) -> std::collections::HashMap<String, u64> {
    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
    let info: String = redis::cmd("INFO").arg("commandstats").query(&mut c).unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?.parse().ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_costs_one_redis_call_and_its_settle_rides_on_the_next() {
    let (r, url) = replicas_own_redis(Opts {
        // Hold-offs exchanged rarely, so the count below is the requests'.
        cluster: "sync_ms = 10000",
        tenant: "requests_per_minute = 1000\nimages_per_minute = 1000\nspend_usd_per_day = 10",
        primary: "price = { per_image_usd = 0.01 }",
        replicas: 1,
        ..Default::default()
    })
    .await;
    let gw = &r.gws[0];
    // The first call loads the script.
    as_key(gw, KEY_A, &req(), &[]).await.assert_status(200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut c).unwrap();
    for _ in 0..20 {
        as_key(gw, KEY_A, &req(), &[]).await.assert_status(200);
    }
    // The last request's settle goes by itself shortly after (FLUSH_AFTER, 20 ms).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = redis_calls(&url);
    let scripts = calls.get("evalsha").copied().unwrap_or(0) + calls.get("eval").copied().unwrap_or(0);
    // 20 admissions, each one script (rate limits, spend hold, and the settles waiting), and
    // flushes of settles no admission took within 20 ms: at least the last one's; on a busy
    // machine a few more. Without the batching: 40 scripts and 20 transactions.
    assert!((21..=30).contains(&scripts), "{scripts} scripts for 20 requests: {calls:?}");
    // One read of the budget per call: its totals together with the holds the call ends.
    assert_eq!(calls.get("hmget"), Some(&scripts), "{calls:?}");
    // A budget's totals and new holds are written in one HSET per call, not one per hold.
    assert!(!calls.contains_key("hincrbyfloat"), "{calls:?}");
    assert!(calls.get("hset").is_some_and(|n| *n <= scripts), "{calls:?}");
    // Expiries are set where a call creates a key, not on every call: the first request made
    // the budget's keys (the limits' SET carries its own expiry), and both keep it (checked
    // below).
    assert_eq!(calls.get("pexpire"), None, "{calls:?}");
    // Each hold ended once, inside a script: no transaction of its own.
    assert_eq!((calls.get("hdel"), calls.get("zrem")), (Some(&20), Some(&20)), "{calls:?}");
    assert_eq!((calls.get("multi"), calls.get("exec")), (None, None), "{calls:?}");
    // A request's rate limits are read in one MGET per admission.
    assert_eq!((calls.get("mget"), calls.get("get")), (Some(&20), None), "{calls:?}");
    // Nothing a request left behind stays for ever: every limit and budget key expires.
    let prefix = r.key_prefix();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query(&mut c).unwrap();
    let shared: Vec<&String> = keys.iter().filter(|k| k.contains(":rl:") || k.contains(":spend:")).collect();
    assert!(shared.len() >= 3, "the tenant's two limits and its budget: {keys:?}");
    for k in shared {
        let ttl: i64 = redis::cmd("PTTL").arg(k).query(&mut c).unwrap();
        assert!(ttl > 0, "{k} has no expiry ({ttl})");
    }
    let routes = admin_json(gw, "/admin/routes").await;
    let spent = &routes["cluster"]["tenants"]["acme"]["spend_usd_per_day"]["spent_today_usd"];
    assert!(spent.as_f64().is_some_and(|s| (s - 0.21).abs() < 1e-9), "21 images at 0.01 USD: {}", routes["cluster"]);
    // A hold whose replica died (never settled) stops counting once it expires: 9.79 USD held
    // by a dead replica would leave no room for 0.01 more, but its expiry has passed.
    let budget = r.budget_key();
    let _: () = redis::pipe()
        .hset(&budget, "r:dead-1", "9.79")
        .cmd("HINCRBYFLOAT")
        .arg(&budget)
        .arg("held")
        .arg("9.79")
        .zadd(format!("{budget}:holds"), "dead-1", 1)
        .query(&mut c)
        .unwrap();
    as_key(gw, KEY_A, &req(), &[]).await.assert_status(200);
    let held: Option<String> = redis::cmd("HGET").arg(&budget).arg("r:dead-1").query(&mut c).unwrap();
    assert_eq!(held, None, "the expired hold is gone");
    // A live one (expiring in an hour) still counts.
    let far =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64 + 3_600_000;
    let _: () = redis::pipe()
        .hset(&budget, "r:live-1", "9.78")
        .cmd("HINCRBYFLOAT")
        .arg(&budget)
        .arg("held")
        .arg("9.78")
        .zadd(format!("{budget}:holds"), "live-1", far)
        .query(&mut c)
        .unwrap();
    as_key(gw, KEY_A, &req(), &[]).await.assert_error(429, "spend_limit_exceeded");
    drop_pg(&r).await;
}

/// `n` requests at once to `gw` (keys A and B in turn): how many got each status, and each
/// error code.
async fn burst(
    gw: &Gateway,
    n: usize,
) -> (std::collections::BTreeMap<u16, usize>, std::collections::BTreeMap<String, usize>) {
    let url = gw.url("/v1/images/generations");
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let (url, key) = (url.clone(), if i % 2 == 0 { KEY_A } else { KEY_B });
        set.spawn(async move { post_json(&url, &req(), &[("authorization", &bearer(key))]).await });
    }
    let (mut by_status, mut codes) = (std::collections::BTreeMap::new(), std::collections::BTreeMap::new());
    while let Some(res) = set.join_next().await {
        let resp = res.unwrap();
        *by_status.entry(resp.status).or_default() += 1;
        if resp.status != 200 {
            let code = resp.json()["error"]["code"].as_str().unwrap_or_default().to_string();
            *codes.entry(code).or_default() += 1;
        }
    }
    (by_status, codes)
}

/// Requests that arrive while a worker's admission call is out go together in its next call:
/// fewer scripts than requests, and still exactly the limit's or the budget's worth admitted,
/// each request of a batch seeing what the ones before it took.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_admissions_share_calls_and_stay_exact() {
    for (tenant, admitted, code) in [
        ("requests_per_minute = 30\nspend_usd_per_day = 100", 29, "rate_limit_exceeded"),
        // 0.25 USD a day at 0.01 USD an image, 0.01 of it spent by the first request.
        ("requests_per_minute = 1000\nspend_usd_per_day = 0.25", 24, "spend_limit_exceeded"),
    ] {
        let (r, url) = replicas_own_redis(Opts {
            cluster: "sync_ms = 10000",
            tenant,
            primary: "price = { per_image_usd = 0.01 }",
            replicas: 1,
            ..Default::default()
        })
        .await;
        let gw = &r.gws[0];
        // The first call loads the script.
        as_key(gw, KEY_A, &req(), &[]).await.assert_status(200);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut c = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
        let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut c).unwrap();
        let (by_status, codes) = burst(gw, 60).await;
        assert_eq!(by_status.get(&200), Some(&admitted), "{tenant}: {by_status:?} {codes:?}");
        assert_eq!(codes.get(code), Some(&(60 - admitted)), "{tenant}: {by_status:?} {codes:?}");
        let calls = redis_calls(&url);
        let scripts = calls.get("evalsha").copied().unwrap_or(0);
        assert!(scripts < 60, "{tenant}: 60 admissions (and their settles) in {scripts} scripts: {calls:?}");
        assert_eq!(r.primary.hits(), admitted + 1, "a refused request reaches no provider");
        drop_pg(&r).await;
    }
}

/// Clients that give up while their admission waits on Redis leave no spend held: the holds
/// their requests were given (the one whose call was out, and those queued behind it) are
/// released with the next call, not left to count against the budget until they expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_that_give_up_leave_no_spend_held() {
    let (r, url) = replicas_own_redis(Opts {
        cluster: "sync_ms = 10000",
        tenant: "spend_usd_per_day = 10",
        primary: "price = { per_image_usd = 0.01 }",
        replicas: 1,
        ..Default::default()
    })
    .await;
    let gw = &r.gws[0];
    as_key(gw, KEY_A, &req(), &[]).await.assert_status(200);
    let budget = r.budget_key();
    // Redis holds back every script for 800 ms; the clients give up after 300.
    let mut c = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(800).arg("WRITE").query(&mut c).unwrap();
    let proxy = gw.url("/v1/images/generations");
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let (proxy, key) = (proxy.clone(), if i % 2 == 0 { KEY_A } else { KEY_B });
        set.spawn(async move {
            let (body, auth) = (req(), bearer(key));
            let headers = [("authorization", auth.as_str())];
            tokio::time::timeout(Duration::from_millis(300), post_json(&proxy, &body, &headers)).await.is_err()
        });
    }
    let mut gave_up = 0;
    while let Some(r) = set.join_next().await {
        gave_up += usize::from(r.unwrap());
    }
    assert_eq!(gave_up, 20, "every client gave up");
    let cancelled = [("route", "main"), ("outcome", "client_cancelled")];
    let seen =
        eventually(Duration::from_secs(20), || async { gw.metric("acc_requests_total", &cancelled).await == 20.0 })
            .await;
    let m = gw.metrics().await;
    let lines: Vec<&str> =
        m.lines().filter(|l| l.starts_with("acc_requests_total") || l.starts_with("acc_cluster")).collect();
    assert!(seen, "the gateway saw the 20 clients leave: {lines:#?}");
    // Once Redis runs the scripts, each hold they took is released: nothing is held.
    let released = eventually(Duration::from_secs(20), || {
        let (url, budget) = (url.clone(), budget.clone());
        async move {
            let mut c = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
            let fields: std::collections::HashMap<String, String> =
                redis::cmd("HGETALL").arg(&budget).query(&mut c).unwrap();
            let held = fields.get("held").and_then(|h| h.parse::<f64>().ok()).unwrap_or(0.0);
            !fields.keys().any(|k| k.starts_with("r:")) && held < 1e-9
        }
    })
    .await;
    let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL").arg(&budget).query(&mut c).unwrap();
    assert!(released, "holds of requests whose clients left: {fields:?}");
    assert_eq!(r.primary.hits(), 1, "no abandoned request reached the provider");
    drop_pg(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mirror_daily_cap_holds_across_replicas() {
    let (url, own) = shared_redis();
    let cand = MockProvider::start().await;
    let more = openai_provider_with("cand", &cand, "price = { per_image_usd = 0.01 }");
    let r = replicas(
        Opts {
            redis_url: &url,
            main: r#"mirror = [{ provider = "cand", model = "c-model", sample = 1.0, max_in_flight = 4, spend_usd_per_day = 0.05 }]"#,
            more: &more,
            ..Default::default()
        },
        own,
    )
    .await;
    // 12 requests one by one over the three replicas, each mirror done before the next:
    // $0.05 a day at $0.01 a mirror is 5 mirrors for the cluster (each replica on its own would
    // run 4 or 5).
    for i in 0..12 {
        as_key(&r.gws[i % 3], KEY_A, &req(), &[]).await.assert_status(200);
        let done = eventually(Duration::from_secs(10), || async {
            let mut seen = 0.0;
            for gw in &r.gws {
                seen += gw.metric("acc_mirror_requests_total", &[("route", "main")]).await;
                seen += gw.metric("acc_mirror_dropped_total", &[("route", "main")]).await;
            }
            cand.in_flight() == 0 && seen == i as f64 + 1.0
        })
        .await;
        assert!(done, "mirror {i} neither ran nor was dropped");
    }
    assert!(
        (4..=5).contains(&cand.hits()),
        "$0.05/day at $0.01 each allows 5 mirrors cluster-wide, not {}",
        cand.hits()
    );
    let mut dropped = 0.0;
    for gw in &r.gws {
        dropped += gw.metric("acc_mirror_dropped_total", &[("route", "main"), ("reason", "spend")]).await;
    }
    assert_eq!(cand.hits() as f64 + dropped, 12.0);
    drop_pg(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_429_seen_by_one_replica_pauses_the_provider_on_all() {
    let (url, own) = shared_redis();
    let r = replicas(Opts { redis_url: &url, cluster: "sync_ms = 50", ..Default::default() }, own).await;
    r.primary.set_status(429);
    r.primary.set_headers(vec![("retry-after".into(), "5".into())]);
    let a = as_key(&r.gws[0], KEY_A, &req(), &[]).await;
    a.assert_status(200);
    assert_eq!(a.attempts(), ["primary:status_429", "backup:ok"]);
    r.primary.set_status(200);
    r.primary.set_headers(Vec::new());
    // Within a few exchanges the other replicas hold off too, without calling the provider.
    for gw in &r.gws[1..] {
        let paused = eventually(Duration::from_secs(20), || async {
            let c = admin_json(gw, "/admin/routes").await;
            let p = c["providers"].as_array().unwrap().iter().find(|p| p["name"] == "primary").cloned().unwrap();
            p["paused_for_ms"].as_f64().is_some_and(|ms| ms > 0.0 && ms <= 5000.0)
        })
        .await;
        assert!(paused, "the pause reached the replica at {}", gw.admin);
        let resp = as_key(gw, KEY_A, &req(), &[]).await;
        resp.assert_status(200);
        assert_eq!(resp.attempts(), ["primary:paused", "backup:ok"], "{}", resp.describe());
    }
    assert_eq!((r.primary.hits(), r.backup.hits()), (1, 3), "the paused provider was called once, by A");
    drop_pg(&r).await;
}

/// A pause lifted by hand on one replica is lifted on all: Redis forgets it, and the other
/// replicas, which hold it in memory, apply the reset at their next exchange. So is an opened
/// breaker shared with `share_breakers`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_by_hand_on_one_replica_lifts_the_hold_offs_on_all() {
    let (url, own) = shared_redis();
    let r = replicas(
        Opts {
            redis_url: &url,
            cluster: "sync_ms = 50\nshare_breakers = true",
            primary: "breaker = { consecutive_failures = 1, cooldown_ms = 600000, probes = 1 }",
            ..Default::default()
        },
        own,
    )
    .await;
    let primary =
        |v: &Value| v["providers"].as_array().unwrap().iter().find(|p| p["name"] == "primary").cloned().unwrap();
    // A pause of ten minutes, seen by A, reaches B and C.
    r.primary.set_status(429);
    r.primary.set_headers(vec![("retry-after".into(), "600".into())]);
    let a = as_key(&r.gws[0], KEY_A, &req(), &[]).await;
    assert_eq!(a.attempts(), ["primary:status_429", "backup:ok"], "{}", a.describe());
    r.primary.set_status(200);
    r.primary.set_headers(Vec::new());
    for gw in &r.gws[1..] {
        let paused = eventually(Duration::from_secs(20), || async {
            primary(&admin_json(gw, "/admin/routes").await)["paused_for_ms"].as_f64().is_some_and(|ms| ms > 0.0)
        })
        .await;
        assert!(paused, "the pause reached the replica at {}", gw.admin);
    }
    // Lifted on B: every replica calls the provider again.
    let v = r.gws[1].admin("POST", "/admin/providers/primary/reset").await;
    v.assert_status(200);
    assert_eq!(v.json()["replicas"], "all", "{}", v.describe());
    for gw in &r.gws {
        let lifted = eventually(Duration::from_secs(20), || async {
            primary(&admin_json(gw, "/admin/routes").await)["paused_for_ms"].is_null()
        })
        .await;
        assert!(lifted, "the reset reached the replica at {}", gw.admin);
        let resp = as_key(gw, KEY_A, &req(), &[]).await;
        assert_eq!(resp.attempts(), ["primary:ok"], "{}", resp.describe());
    }
    assert_eq!(r.primary.hits(), 4);
    // A shared breaker opened by C, closed by hand on A: C's own and B's copy.
    r.primary.set_status(500);
    let c = as_key(&r.gws[2], KEY_A, &req(), &[]).await;
    assert_eq!(c.attempts(), ["primary:status_5xx", "backup:ok"], "{}", c.describe());
    r.primary.set_status(200);
    let held = eventually(Duration::from_secs(20), || async {
        primary(&admin_json(&r.gws[1], "/admin/routes").await)["breaker"]["shared_open_for_ms"].as_u64().is_some()
    })
    .await;
    assert!(held, "C's breaker reached B");
    r.gws[0].admin("POST", "/admin/providers/primary/reset").await.assert_status(200);
    for gw in &r.gws {
        let closed = eventually(Duration::from_secs(20), || async {
            let p = primary(&admin_json(gw, "/admin/routes").await);
            p["breaker"]["state"] == "closed" && p["breaker"]["shared_open_for_ms"].is_null()
        })
        .await;
        assert!(closed, "the reset reached the replica at {}", gw.admin);
        let resp = as_key(gw, KEY_A, &req(), &[]).await;
        assert_eq!(resp.attempts(), ["primary:ok"], "{}", resp.describe());
    }
    drop_pg(&r).await;
}

/// A hold-off learnt on A just before a reset on B, not yet published when the reset came, is
/// lifted with it: it never reaches Redis afterwards to hold every replica off again (a helper
/// found a breaker opened 10 ms before a reset shut the provider off cluster-wide for its whole
/// cooldown, with `"replicas": "all"` in the reset's answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hold_off_learnt_just_before_a_reset_is_lifted_with_it() {
    let (url, own) = shared_redis();
    // Exchanges 1.5 s apart: the reset almost always lands between A learning and publishing.
    let r = replicas(
        Opts {
            redis_url: &url,
            cluster: "sync_ms = 1500\nshare_breakers = true",
            primary: "breaker = { consecutive_failures = 1, cooldown_ms = 600000, probes = 1 }",
            replicas: 2,
            ..Default::default()
        },
        own,
    )
    .await;
    let primary =
        |v: &Value| v["providers"].as_array().unwrap().iter().find(|p| p["name"] == "primary").cloned().unwrap();
    for (status, headers, seen) in [
        (500, vec![], "primary:status_5xx"),
        (429, vec![("retry-after".to_string(), "600".to_string())], "primary:status_429"),
    ] {
        r.primary.set_status(status);
        r.primary.set_headers(headers);
        let a = as_key(&r.gws[0], KEY_A, &req(), &[]).await;
        assert_eq!(a.attempts(), [seen, "backup:ok"], "{}", a.describe());
        r.primary.set_status(200);
        r.primary.set_headers(Vec::new());
        r.gws[1].admin("POST", "/admin/providers/primary/reset").await.assert_status(200);
        // Two exchanges later, on both replicas: nothing holds the provider off.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        for gw in &r.gws {
            let p = primary(&admin_json(gw, "/admin/routes").await);
            assert_eq!(p["breaker"]["state"], "closed", "{} {p:#}", gw.admin);
            assert_eq!(p["breaker"]["shared_open_for_ms"], Value::Null, "{} {p:#}", gw.admin);
            assert_eq!(p["paused_for_ms"], Value::Null, "{} {p:#}", gw.admin);
            let resp = as_key(gw, KEY_A, &req(), &[]).await;
            assert_eq!(resp.attempts(), ["primary:ok"], "{}", resp.describe());
        }
    }
    drop_pg(&r).await;
}

/// Breakers are per replica by default; with `share_breakers` one that opens on A holds the
/// provider off on B too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn breakers_are_per_replica_unless_shared() {
    for share in [false, true] {
        let (url, own) = shared_redis();
        let cluster = format!("sync_ms = 50\nshare_breakers = {share}");
        let r = replicas(
            Opts {
                redis_url: &url,
                cluster: &cluster,
                primary: "breaker = { consecutive_failures = 1, cooldown_ms = 10000, probes = 1 }",
                replicas: 2,
                ..Default::default()
            },
            own,
        )
        .await;
        r.primary.set_status(500);
        let a = as_key(&r.gws[0], KEY_A, &req(), &[]).await;
        assert_eq!(a.attempts(), ["primary:status_5xx", "backup:ok"], "{}", a.describe());
        r.primary.set_status(200);
        // Several exchanges later.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let b = as_key(&r.gws[1], KEY_A, &req(), &[]).await;
        b.assert_status(200);
        let routes = admin_json(&r.gws[1], "/admin/routes").await;
        let primary = routes["providers"].as_array().unwrap().iter().find(|p| p["name"] == "primary").unwrap().clone();
        if share {
            assert_eq!(b.attempts(), ["primary:breaker_open", "backup:ok"], "{}", b.describe());
            assert_eq!(r.primary.hits(), 1);
            // B's own breaker is closed; /admin/routes says another replica's holds it off.
            assert_eq!(primary["breaker"]["state"], "closed", "{primary:#}");
            assert!(primary["breaker"]["shared_open_for_ms"].as_u64().is_some_and(|ms| ms > 0), "{primary:#}");
        } else {
            assert_eq!(primary["breaker"]["shared_open_for_ms"], Value::Null, "{primary:#}");
            assert_eq!(b.attempts(), ["primary:ok"], "B's own breaker is closed: {}", b.describe());
            assert_eq!(r.primary.hits(), 2);
        }
        drop_pg(&r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_mid_run_serves_locally_then_shares_again() {
    let (r, _) = replicas_own_redis(Opts {
        cluster: "recheck_ms = 200\ntimeout_ms = 100\nsync_ms = 100",
        tenant: "requests_per_minute = 6",
        replicas: 2,
        ..Default::default()
    })
    .await;
    let redis = r._redis.as_ref().unwrap();
    assert_eq!(readyz(&r.gws[0]).await["cluster"]["state"], "shared");
    redis.stop();
    // Served from each replica's own state, and counted.
    for gw in &r.gws {
        let t0 = Instant::now();
        as_key(gw, KEY_A, &req(), &[]).await.assert_status(200);
        assert!(t0.elapsed() < Duration::from_secs(2), "Redis down costs at most a deadline: {:?}", t0.elapsed());
        assert!(gw.metric("acc_cluster_errors_total", &[("op", "limits")]).await >= 1.0);
        assert_eq!(gw.metric("acc_cluster_shared", &[]).await, 0.0);
        let ready = readyz(gw).await;
        assert_eq!(ready["cluster"]["state"], "local", "{ready}");
        assert!(ready["cluster"]["detail"].as_str().unwrap().contains("per replica"), "{ready}");
        assert!(gw.stderr().contains("shared state (Redis) unavailable"), "logged");
    }
    assert_eq!(r.primary.hits(), 2);
    redis.restart();
    for gw in &r.gws {
        let back =
            eventually(Duration::from_secs(10), || async { readyz(gw).await["cluster"]["state"] == "shared" }).await;
        assert!(back, "shared again after Redis restarted");
    }
    // Shared again: 6 a minute for both replicas together (each replica's own state would still
    // let 5 more through on each).
    let mut ok = 0;
    for i in 0..10 {
        let resp = as_key(&r.gws[i % 2], KEY_A, &req(), &[]).await;
        match resp.status {
            200 => ok += 1,
            429 => {}
            s => panic!("status {s}: {}", resp.describe()),
        }
    }
    assert!((6..=7).contains(&ok), "{ok} of 10 passed a shared limit of 6/min");
    drop_pg(&r).await;
}

/// Spend made while Redis could not be asked (each replica on its own budget) is owed to the
/// shared budget and reaches it once Redis answers again: a stall does not take its spend off
/// the day's total (a trial saw 25% of a run's spend lost after two 300 ms stalls).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spend_made_while_redis_was_away_reaches_the_shared_budget() {
    let (r, _) = replicas_own_redis(Opts {
        cluster: "recheck_ms = 200\ntimeout_ms = 100\nsync_ms = 100",
        tenant: "spend_usd_per_day = 0.1",
        primary: "price = { per_image_usd = 0.04 }",
        replicas: 2,
        ..Default::default()
    })
    .await;
    let redis = r._redis.as_ref().unwrap();
    redis.stop();
    for gw in &r.gws {
        let resp = as_key(gw, KEY_A, &req(), &[]).await;
        resp.assert_status(200);
        assert_eq!(resp.header("x-acc-cost-usd").as_deref(), Some("0.04"), "{}", resp.describe());
    }
    // Back, empty (it keeps nothing on disk): what the replicas owe is all it learns.
    redis.restart();
    for gw in &r.gws {
        let settled = eventually(Duration::from_secs(20), || async {
            let c = admin_json(gw, "/admin/routes").await;
            let spent = &c["cluster"]["tenants"]["acme"]["spend_usd_per_day"]["spent_today_usd"];
            spent.as_f64().is_some_and(|s| (s - 0.08).abs() < 1e-9)
        })
        .await;
        assert!(settled, "0.08 USD spent today, cluster-wide: {}", admin_json(gw, "/admin/routes").await["cluster"]);
    }
    // 0.08 + 0.04 would pass 0.10, on either replica.
    for gw in &r.gws {
        as_key(gw, KEY_A, &req(), &[]).await.assert_error(429, "spend_limit_exceeded");
    }
    assert_eq!(r.primary.hits(), 2);
    drop_pg(&r).await;
}

/// An image URL one replica made is served by every replica (behind a Service, the fetch
/// lands on any of them; a trial saw 404s on two of three): the image goes to Redis for the
/// URL's lifetime, with its freshness headers. An id no replica made is still a 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_url_made_on_one_replica_is_served_by_the_others() {
    let (url, own) = shared_redis();
    let r = replicas(Opts { redis_url: &url, replicas: 2, ..Default::default() }, own).await;
    let mut body = req();
    body["response_format"] = json!("url");
    let resp = as_key(&r.gws[0], KEY_A, &body, &[]).await;
    resp.assert_status(200);
    let url = resp.json()["data"][0]["url"].as_str().unwrap().to_string();
    let path = &url[url.find("/v1/images/artifacts/").expect("a gateway-served URL")..];
    let here = get(&r.gws[0].url(path), &[]).await;
    here.assert_status(200);
    let there = get(&r.gws[1].url(path), &[]).await;
    there.assert_status(200);
    assert_eq!(there.body, here.body, "the same image from the other replica");
    assert_eq!(there.header("content-type"), here.header("content-type"));
    let max_age = there.header("cache-control").unwrap_or_default();
    assert!(max_age.starts_with("private, max-age="), "{max_age}");
    let missing = get(&r.gws[1].url("/v1/images/artifacts/0123456789abcdef0123456789abcdef.png"), &[]).await;
    missing.assert_error(404, "artifact_not_found");
    drop_pg(&r).await;
}

/// Redis holds no more images than the replicas' own stores do: an image a replica's store
/// evicts for room (`--artifact-store-mib`, here 0: each new image evicts the one before) leaves
/// Redis too, so its URL is gone from every replica, while the newest is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_evicted_for_room_leaves_redis_too() {
    let (url, own) = shared_redis();
    let r = replicas(
        Opts { redis_url: &url, replicas: 2, env: &[("ACC_ARTIFACT_STORE_MIB", "0")], ..Default::default() },
        own,
    )
    .await;
    let mut body = req();
    body["response_format"] = json!("url");
    let mut paths = Vec::new();
    for _ in 0..2 {
        let resp = as_key(&r.gws[0], KEY_A, &body, &[]).await;
        resp.assert_status(200);
        let url = resp.json()["data"][0]["url"].as_str().unwrap().to_string();
        paths.push(url[url.find("/v1/images/artifacts/").unwrap()..].to_string());
    }
    let gone =
        eventually(Duration::from_secs(20), || async { get(&r.gws[1].url(&paths[0]), &[]).await.status == 404 }).await;
    assert!(gone, "the evicted image must leave Redis");
    get(&r.gws[1].url(&paths[1]), &[]).await.assert_status(200);
    drop_pg(&r).await;
}

/// Redis restarted: each proxy worker's connection is found dead only when used (a broken pipe
/// or a reset); that first call is made again on a fresh connection, so no request fails once
/// Redis answers. Under fail_closed, a trial saw 503s for `recheck_ms` after /readyz already
/// said "shared" (one worker's connection came back, the others' first calls failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_restarts_no_request_fails_on_a_dead_connection() {
    let (r, _) = replicas_own_redis(Opts {
        cluster: "on_cluster_error = \"fail_closed\"\nrecheck_ms = 300\ntimeout_ms = 1000\nsync_ms = 100",
        tenant: "requests_per_minute = 1000",
        replicas: 2,
        ..Default::default()
    })
    .await;
    let redis = r._redis.as_ref().unwrap();
    // Every proxy worker of both replicas has its connection (new client connections land on
    // the workers in turn).
    for i in 0..12 {
        as_key(&r.gws[i % 2], KEY_A, &req(), &[]).await.assert_status(200);
    }
    redis.stop();
    redis.restart();
    // Shared again as far as /readyz knows (the pauses' sync, on another connection, answers).
    // The proxy workers asked nothing of Redis meanwhile: each still holds its dead socket.
    for gw in &r.gws {
        let back =
            eventually(Duration::from_secs(10), || async { readyz(gw).await["cluster"]["state"] == "shared" }).await;
        assert!(back, "shared again after Redis restarted");
    }
    for i in 0..12 {
        let resp = as_key(&r.gws[i % 2], KEY_A, &req(), &[]).await;
        assert_eq!(resp.status, 200, "request {i} after the restart: {}", resp.describe());
    }
    for gw in &r.gws {
        assert_eq!(readyz(gw).await["cluster"]["state"], "shared");
    }
    drop_pg(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_refuses_with_a_clear_503_and_no_secret() {
    const SECRET: &str = "pw-7f3a9c-never-shown";
    let url = format!("redis://127.0.0.1:{}", closed_port());
    let r = replicas(
        Opts {
            redis_url: &url,
            cluster: "on_cluster_error = \"fail_closed\"\npassword_env = \"ACC_TEST_REDIS_PASSWORD\"\ntimeout_ms = 100",
            tenant: "requests_per_minute = 100",
            env: &[("ACC_TEST_REDIS_PASSWORD", SECRET)],
            replicas: 1,
            ..Default::default()
        },
        None,
    )
    .await;
    let gw = &r.gws[0];
    let resp = as_key(gw, KEY_A, &req(), &[]).await;
    let err = resp.assert_error(503, "cluster_unavailable");
    assert_eq!(err["type"], "api_error");
    assert!(err["message"].as_str().unwrap().contains("shared state"), "{err}");
    assert_eq!(resp.header("retry-after").as_deref(), Some("1"));
    assert_eq!(r.primary.hits(), 0, "nothing generated without shared limits");
    let ready = readyz(gw).await;
    assert_eq!(ready["cluster"]["on_cluster_error"], "fail_closed");
    assert!(ready["cluster"]["detail"].as_str().unwrap().contains("refused"), "{ready}");
    // Start-up tried Redis once with time to spare and logged why it cannot be used.
    settles("the start-up check logs why Redis cannot be used", || {
        gw.stderr().contains("shared state (Redis) cannot be used")
    })
    .await;
    let routes = gw.admin("GET", "/admin/routes").await.text();
    let metrics = gw.metrics().await;
    for (what, text) in [
        ("answer", resp.text()),
        ("readyz", ready.to_string()),
        ("routes", routes),
        ("metrics", metrics),
        ("log", gw.stderr()),
    ] {
        assert!(!text.contains(SECRET), "the Redis password shows in the {what}");
    }
}

#[tokio::test]
async fn a_password_in_the_url_is_refused() {
    let dir = PolicyDir::with(&format!(
        "[cluster]\nredis_url = \"redis://:hunter2@127.0.0.1:6379\"\n\n[providers.p]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9\"\n\n{}",
        route_toml("main", "m").target_default("p")
    ));
    let out = acc_command().args(["check", dir.path().to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("cluster.redis_url: has a password"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

async fn drop_pg(r: &Replicas) {
    if let (Some(db_url), Ok(url)) = (&r.pg, std::env::var("ACC_TEST_POSTGRES_URL")) {
        use sqlx::Connection;
        let db = db_url.rsplit_once('/').unwrap().1;
        if let Ok(mut admin) = sqlx::PgConnection::connect(&url).await {
            // Replicas still hold connections: FORCE.
            let _ = sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)")).execute(&mut admin).await;
        }
    }
}
