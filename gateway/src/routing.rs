//! Route selection and the attempt plan: pure functions over the policy snapshot, plus the
//! fallback loop that walks the plan under per-attempt timeouts and a total deadline.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::ApiError;
use crate::policy::{Policy, Route};
use crate::providers::{Generation, ProviderError};

/// Who is asking, as far as routing cares.
#[derive(Debug, Clone, Default)]
pub struct RouteQuery<'a> {
    pub model: Option<&'a str>,
    pub cohort: Option<&'a str>,
    pub key_tags: &'a [String],
}

/// The first route whose every stated condition holds. Unknown aliases are a 404.
pub fn select_route<'p>(policy: &'p Policy, q: &RouteQuery<'_>) -> Result<(usize, &'p Route), ApiError> {
    let model = match q.model.or(policy.default_model.as_deref()) {
        Some(m) => m,
        None => return Err(ApiError::invalid("model", "missing_required_parameter", "model is required")),
    };
    if !policy.aliases.contains(model) && policy.routes.iter().all(|r| r.matcher.model.is_some()) {
        return Err(unknown_model(policy, model));
    }
    let found = policy.routes.iter().enumerate().find(|(_, r)| {
        let m = &r.matcher;
        m.model.as_deref().is_none_or(|x| x == model)
            && m.cohort.as_deref().is_none_or(|c| q.cohort == Some(c))
            && m.key_tags.iter().all(|t| q.key_tags.contains(t))
    });
    match found {
        Some(f) => Ok(f),
        None if !policy.aliases.contains(model) => Err(unknown_model(policy, model)),
        None => Err(ApiError::not_found(
            "route_not_found",
            format!("no route serves model \"{model}\" for this cohort and API key"),
        )),
    }
}

fn unknown_model(policy: &Policy, model: &str) -> ApiError {
    let known: Vec<&str> = policy.aliases.iter().map(String::as_str).collect();
    ApiError::not_found(
        "model_not_found",
        format!("the model \"{model}\" does not exist; available: {}", known.join(", ")),
    )
}

/// One step of a plan: a target of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub route: usize,
    pub target: usize,
}

/// The attempt order for a route: one target drawn by weight (`draw` in `[0, 1)`), the route's
/// other targets by weight, highest first, then each fallback route's targets by weight.
pub fn plan(policy: &Policy, route: usize, draw: f64) -> Vec<Step> {
    let r = &policy.routes[route];
    let total: u64 = r.targets.iter().map(|t| t.weight as u64).sum();
    let mut point = (draw.clamp(0.0, 1.0) * total as f64) as u64;
    let mut first = 0;
    for (i, t) in r.targets.iter().enumerate() {
        if point < t.weight as u64 {
            first = i;
            break;
        }
        point -= t.weight as u64;
    }
    let mut steps = vec![Step { route, target: first }];
    steps.extend(by_weight(r).filter(|&t| t != first).map(|target| Step { route, target }));
    for &fb in &r.fallbacks {
        steps.extend(by_weight(&policy.routes[fb]).map(|target| Step { route: fb, target }));
    }
    steps
}

fn by_weight(r: &Route) -> impl Iterator<Item = usize> + '_ {
    let mut idx: Vec<usize> = (0..r.targets.len()).filter(|&i| r.targets[i].weight > 0).collect();
    idx.sort_by_key(|&i| std::cmp::Reverse(r.targets[i].weight));
    idx.into_iter()
}

/// How one attempt ended.
#[derive(Debug)]
pub struct AttemptRecord {
    pub step: Step,
    /// Started early, alongside a slow attempt (hedging).
    pub hedge: bool,
    pub elapsed: Duration,
    pub result: Result<(), ProviderError>,
}

impl AttemptRecord {
    pub fn label(&self) -> &'static str {
        match &self.result {
            Ok(()) => "ok",
            Err(e) => e.label(),
        }
    }
}

/// What the fallback loop produced.
#[derive(Debug)]
pub struct PlanOutcome {
    /// In the order they ended; hedged attempts cancelled by a winner come last.
    pub attempts: Vec<AttemptRecord>,
    /// The winning step and its generation, or `None` when no attempt succeeded.
    pub success: Option<(Step, Generation)>,
    /// The deadline ran out before every step was tried.
    pub deadline_exceeded: bool,
    /// Attempts started early because the one before was slow.
    pub hedges_started: u32,
    /// The answer came from a hedged attempt.
    pub won_by_hedge: bool,
}

/// Opt-in hedging: when the latest attempt has not answered after `after`, the next step
/// starts alongside it, up to `max_parallel` attempts at once; the first success wins and the
/// others are cancelled (dropped).
#[derive(Debug, Clone, Copy)]
pub struct Hedging {
    pub after: Duration,
    pub max_parallel: usize,
}

/// One attempt of the plan under its own deadline, tagged with its index.
async fn bounded<Fut>(id: usize, until: Instant, fut: Fut) -> (usize, Result<Generation, ProviderError>)
where
    Fut: Future<Output = Result<Generation, ProviderError>>,
{
    match tokio::time::timeout_at(until, fut).await {
        Ok(r) => (id, r),
        Err(_) => (id, Err(ProviderError::Timeout)),
    }
}

/// Walks the plan: each attempt gets `min(its timeout, time left)` and is handed its own
/// deadline; retryable failures move on, a non-retryable one (the client's own mistake, a
/// blocked image, a provider that refuses to queue) ends the walk. With hedging, a slow attempt
/// gets company instead of a successor.
pub async fn run_plan<F, Fut>(
    steps: &[Step],
    deadline: Instant,
    timeout_of: impl Fn(Step) -> Duration,
    hedging: Option<Hedging>,
    mut attempt: F,
) -> PlanOutcome
where
    F: FnMut(Step, Instant) -> Fut,
    Fut: Future<Output = Result<Generation, ProviderError>>,
{
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let mut out = PlanOutcome {
        attempts: Vec::with_capacity(steps.len()),
        success: None,
        deadline_exceeded: false,
        hedges_started: 0,
        won_by_hedge: false,
    };
    let Some(hedging) = hedging else {
        // Without hedging one attempt runs at a time: each is awaited in place, so its future is
        // never moved into a `FuturesUnordered` task (measured: ~4k instructions per request of
        // copying and bookkeeping, bench/callgrind.sh).
        for &step in steps {
            let now = Instant::now();
            if now >= deadline {
                out.deadline_exceeded = true;
                break;
            }
            let until = now + timeout_of(step).min(deadline.saturating_duration_since(now));
            // Pinned where it is made: only a pointer moves into the timeout.
            let fut = std::pin::pin!(attempt(step, until));
            let result = tokio::time::timeout_at(until, fut).await.unwrap_or(Err(ProviderError::Timeout));
            let elapsed = now.elapsed();
            match result {
                Ok(generation) => {
                    out.attempts.push(AttemptRecord { step, hedge: false, elapsed, result: Ok(()) });
                    out.success = Some((step, generation));
                    break;
                }
                Err(e) => {
                    let stop = !e.retryable();
                    out.attempts.push(AttemptRecord { step, hedge: false, elapsed, result: Err(e) });
                    if stop {
                        break;
                    }
                }
            }
        }
        return out;
    };
    let mut running = FuturesUnordered::new();
    // Per started attempt: its step, when it started, whether it was a hedge, whether it ended.
    let mut started: Vec<(Step, Instant, bool, bool)> = Vec::with_capacity(steps.len());
    let mut next = 0;
    let mut last_start = Instant::now();
    let mut launch = |hedge: bool, next: &mut usize, running: &mut FuturesUnordered<_>, started: &mut Vec<_>| {
        let now = Instant::now();
        let step = steps[*next];
        *next += 1;
        let until = now + timeout_of(step).min(deadline.saturating_duration_since(now));
        started.push((step, now, hedge, false));
        running.push(bounded(started.len() - 1, until, attempt(step, until)));
        now
    };
    let mut stop = false;
    loop {
        if running.is_empty() {
            if stop || next >= steps.len() {
                break;
            }
            if Instant::now() >= deadline {
                out.deadline_exceeded = true;
                break;
            }
            last_start = launch(false, &mut next, &mut running, &mut started);
        }
        let hedge_at = last_start + hedging.after;
        let can_hedge = next < steps.len() && running.len() < hedging.max_parallel && hedge_at < deadline;
        tokio::select! {
            biased;
            Some((id, result)) = running.next() => {
                let (step, at, hedge, _) = started[id];
                started[id].3 = true;
                let elapsed = at.elapsed();
                match result {
                    Ok(generation) => {
                        out.attempts.push(AttemptRecord { step, hedge, elapsed, result: Ok(()) });
                        out.success = Some((step, generation));
                        out.won_by_hedge = hedge;
                        break;
                    }
                    Err(e) => {
                        stop = !e.retryable();
                        out.attempts.push(AttemptRecord { step, hedge, elapsed, result: Err(e) });
                        if stop {
                            break;
                        }
                        // With hedging, a failure frees a parallel slot for the next step now.
                        if !running.is_empty() && next < steps.len() && Instant::now() < deadline {
                            last_start = launch(false, &mut next, &mut running, &mut started);
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(hedge_at), if can_hedge => {
                last_start = launch(true, &mut next, &mut running, &mut started);
                out.hedges_started += 1;
            }
        }
    }
    // Whatever still runs lost the race (or the walk stopped): cancelled by dropping it.
    drop(running);
    for (step, at, hedge, ended) in started {
        if !ended {
            out.attempts.push(AttemptRecord {
                step,
                hedge,
                elapsed: at.elapsed(),
                result: Err(ProviderError::HedgeCancelled),
            });
        }
    }
    if out.success.is_none() && !stop && next < steps.len() && Instant::now() >= deadline {
        out.deadline_exceeded = true;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{validate, Sources, TargetRole};
    use crate::providers::Image;
    use bytes::Bytes;

    fn policy(text: &str) -> Policy {
        validate(&Sources { files: vec![("p.toml".into(), text.into())] }).unwrap()
    }

    const P: &str = r#"
default_model = "img"
[providers.a]
kind = "builtin"
[providers.b]
kind = "builtin"
[providers.c]
kind = "builtin"
[[routes]]
name = "beta"
match = { model = "img", key_tags = ["beta"] }
targets = [{ provider = "c" }]
[[routes]]
name = "mkt"
match = { model = "img", cohort = "marketing" }
targets = [{ provider = "a", weight = 1 }, { provider = "b", weight = 3 }]
fallbacks = ["safe"]
[[routes]]
name = "img"
match = { model = "img" }
targets = [{ provider = "a" }]
[[routes]]
name = "safe"
match = { model = "safe" }
targets = [{ provider = "c", weight = 1 }, { provider = "a", weight = 5 }]
"#;

    #[test]
    fn routes_by_alias_cohort_and_key_tags() {
        let p = policy(P);
        let tags = vec!["beta".to_string()];
        type Case<'a> = (Option<&'a str>, Option<&'a str>, &'a [String], &'a str);
        let cases: [Case; 5] = [
            (Some("img"), None, &[], "img"),
            (None, None, &[], "img"),
            (Some("img"), Some("marketing"), &[], "mkt"),
            (Some("img"), Some("marketing"), &tags, "beta"),
            (Some("safe"), Some("marketing"), &[], "safe"),
        ];
        for (model, cohort, key_tags, want) in cases {
            let (_, r) = select_route(&p, &RouteQuery { model, cohort, key_tags }).unwrap();
            assert_eq!(r.name, want, "{model:?} {cohort:?} {key_tags:?}");
        }
        let e = select_route(&p, &RouteQuery { model: Some("dall-e-9"), ..Default::default() }).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (404, Some("model_not_found")));
    }

    #[test]
    fn plan_draws_by_weight_then_falls_back_in_order() {
        let p = policy(P);
        let mkt = 1;
        // weights a=1, b=3: draws below 0.25 pick a, the rest b.
        let names = |steps: Vec<Step>| -> Vec<String> {
            steps
                .iter()
                .map(|s| format!("{}/{}", p.routes[s.route].name, p.routes[s.route].targets[s.target].provider))
                .collect()
        };
        assert_eq!(names(plan(&p, mkt, 0.1)), ["mkt/a", "mkt/b", "safe/a", "safe/c"]);
        assert_eq!(names(plan(&p, mkt, 0.3)), ["mkt/b", "mkt/a", "safe/a", "safe/c"]);
        assert_eq!(names(plan(&p, mkt, 0.999)), ["mkt/b", "mkt/a", "safe/a", "safe/c"]);
        let mut hits = [0u32; 2];
        for i in 0..1000 {
            hits[plan(&p, mkt, i as f64 / 1000.0)[0].target] += 1;
        }
        assert_eq!(hits, [250, 750]);
    }

    fn ok() -> Result<Generation, ProviderError> {
        Ok(Generation { images: vec![Image::Base64(Bytes::from_static(b"aGk=").into())], ..Default::default() })
    }

    fn steps(n: usize) -> Vec<Step> {
        (0..n).map(|target| Step { route: 0, target }).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn slow_attempt_times_out_and_next_one_wins() {
        let start = Instant::now();
        let out = run_plan(
            &steps(3),
            start + Duration::from_secs(100),
            |_| Duration::from_secs(10),
            None,
            |s, _| async move {
                match s.target {
                    0 => {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        ok()
                    }
                    1 => Err(ProviderError::Status {
                        status: http::StatusCode::BAD_GATEWAY,
                        message: "x".into(),
                        retry_after: None,
                    }),
                    _ => ok(),
                }
            },
        )
        .await;
        let labels: Vec<_> = out.attempts.iter().map(|a| a.label()).collect();
        assert_eq!(labels, ["timeout", "status_5xx", "ok"]);
        assert_eq!(out.success.unwrap().0.target, 2);
        assert_eq!(out.attempts[0].elapsed, Duration::from_secs(10));
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_bounds_the_whole_walk() {
        let start = Instant::now();
        let out = run_plan(
            &steps(5),
            start + Duration::from_secs(25),
            |_| Duration::from_secs(10),
            None,
            |_, _| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                ok()
            },
        )
        .await;
        assert!(out.success.is_none());
        assert!(out.deadline_exceeded);
        let elapsed: Vec<_> = out.attempts.iter().map(|a| a.elapsed.as_secs()).collect();
        assert_eq!(elapsed, [10, 10, 5]);
        assert_eq!(start.elapsed(), Duration::from_secs(25));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_error_is_not_retried() {
        let out = run_plan(
            &steps(3),
            Instant::now() + Duration::from_secs(60),
            |_| Duration::from_secs(10),
            None,
            |_, _| async { Err(ProviderError::Rejected { status: http::StatusCode::BAD_REQUEST, body: Bytes::new() }) },
        )
        .await;
        assert_eq!(out.attempts.len(), 1);
        assert!(!out.deadline_exceeded);
    }

    /// Target i answers after `delays[i]` seconds (failing when negative).
    async fn answer_after(delays: &[i64], s: Step) -> Result<Generation, ProviderError> {
        let d = delays[s.target];
        tokio::time::sleep(Duration::from_secs(d.unsigned_abs())).await;
        if d < 0 {
            Err(ProviderError::Transport("reset".into()))
        } else {
            ok()
        }
    }

    fn labels(out: &PlanOutcome) -> Vec<(usize, &'static str)> {
        out.attempts.iter().map(|a| (a.step.target, a.label())).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_first_attempt_is_hedged_and_the_loser_cancelled() {
        let start = Instant::now();
        let hedge = Some(Hedging { after: Duration::from_secs(2), max_parallel: 2 });
        let delays = [30, 5, 1];
        let out = run_plan(
            &steps(3),
            start + Duration::from_secs(100),
            |_| Duration::from_secs(60),
            hedge,
            |s, _| answer_after(&delays, s),
        )
        .await;
        // Target 1 starts at 2 s and answers at 7 s; target 0 is still running and is cancelled;
        // target 2 never starts (two in flight is the limit).
        assert_eq!(labels(&out), [(1, "ok"), (0, "hedge_cancelled")]);
        assert_eq!(out.success.unwrap().0.target, 1);
        assert!(out.won_by_hedge);
        assert_eq!(out.hedges_started, 1);
        assert_eq!(start.elapsed(), Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_first_attempt_is_not_hedged() {
        let hedge = Some(Hedging { after: Duration::from_secs(2), max_parallel: 2 });
        let delays = [1, 1];
        let out = run_plan(
            &steps(2),
            Instant::now() + Duration::from_secs(100),
            |_| Duration::from_secs(60),
            hedge,
            |s, _| answer_after(&delays, s),
        )
        .await;
        assert_eq!(labels(&out), [(0, "ok")]);
        assert_eq!(out.hedges_started, 0);
        assert!(!out.won_by_hedge);
    }

    #[tokio::test(start_paused = true)]
    async fn with_hedging_a_failure_makes_room_for_the_next_target() {
        let start = Instant::now();
        let hedge = Some(Hedging { after: Duration::from_secs(2), max_parallel: 2 });
        // 0 is slow, 1 (hedge at 2 s) fails at 3 s, so 2 starts at 3 s and answers at 4 s.
        let delays = [30, -1, 1];
        let out = run_plan(
            &steps(3),
            start + Duration::from_secs(100),
            |_| Duration::from_secs(60),
            hedge,
            |s, _| answer_after(&delays, s),
        )
        .await;
        assert_eq!(labels(&out), [(1, "transport_error"), (2, "ok"), (0, "hedge_cancelled")]);
        assert_eq!(start.elapsed(), Duration::from_secs(4));
        assert!(!out.won_by_hedge, "target 2 started as a replacement, not a hedge");
    }

    #[tokio::test(start_paused = true)]
    async fn each_attempt_is_handed_its_own_deadline() {
        let start = Instant::now();
        let seen = std::sync::Mutex::new(Vec::new());
        let out = run_plan(
            &steps(2),
            start + Duration::from_secs(15),
            |_| Duration::from_secs(10),
            None,
            |s, until| {
                seen.lock().unwrap().push(until - start);
                answer_after(&[60, 60], s)
            },
        )
        .await;
        assert_eq!(*seen.lock().unwrap(), [Duration::from_secs(10), Duration::from_secs(15)]);
        assert!(out.deadline_exceeded || out.attempts.len() == 2);
        assert!(out.success.is_none());
    }

    /// A policy from files, or every error in it (the helper of the policy module's tests).
    fn check(files: &[(&str, &str)]) -> Result<Policy, Vec<String>> {
        validate(&Sources { files: files.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect() })
    }

    #[test]
    fn mirrors_and_canaries_are_validated_and_appended_as_weightless_targets() {
        let bad = r#"
[providers.a]
kind = "builtin"
[[routes]]
name = "r"
targets = [{ provider = "a" }]
mirror = [{ provider = "nope", sample = 1.5 }, { provider = "a", model = "x", sample = 0.1, max_in_flight = 0 },
          { provider = "a", sample = 0.1 }, { provider = "a", sample = 0.2 }]
canary = { provider = "a", share = 0.0, max_p99_ratio = 0.5 }
"#;
        let errs = check(&[("p.toml", bad)]).unwrap_err();
        assert_eq!(
            errs,
            vec![
                r#"p.toml: routes[0].mirror[0].provider: unknown provider "nope""#,
                "p.toml: routes[0].mirror[0].sample: must be between 0 and 1",
                "p.toml: routes[0].mirror[1].max_in_flight: must be greater than 0",
                r#"p.toml: routes[0].mirror[3]: candidate "a" is mirrored twice"#,
                "p.toml: routes[0].canary.share: must be greater than 0 and less than 1 (the guard compares the canary's requests with the rest; to send every request to a, make it the route's target)",
                "p.toml: routes[0].canary.max_p99_ratio: must be at least 1",
            ]
        );
        // A canary with every request has nothing to be compared with: never rolled back.
        let all = bad.replace("share = 0.0, max_p99_ratio = 0.5", "share = 1.0");
        let errs = check(&[("p.toml", &all)]).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.starts_with("p.toml: routes[0].canary.share: must be greater than 0 and less than 1")),
            "{errs:?}"
        );
        let good = r#"
[providers.a]
kind = "builtin"
[providers.b]
kind = "builtin"
[[routes]]
name = "r"
match = { model = "m" }
targets = [{ provider = "a" }]
mirror = [{ provider = "b", model = "v2", sample = 0.25 }]
canary = { provider = "b", share = 0.1 }
"#;
        let p = check(&[("p.toml", good)]).unwrap();
        let r = &p.routes[0];
        let roles: Vec<_> = r.targets.iter().map(|t| (t.provider.as_str(), t.weight, t.role)).collect();
        assert_eq!(roles, [("a", 1, TargetRole::Serve), ("b", 0, TargetRole::Mirror), ("b", 0, TargetRole::Canary)]);
        assert_eq!((r.mirrors[0].label.as_str(), r.mirrors[0].target, r.mirrors[0].max_in_flight), ("b/v2", 1, 4));
        let c = r.canary.as_ref().unwrap();
        assert_eq!((c.target, c.guard.min_samples, c.guard.max_p99_ratio), (2, 50, 1.5));
        // Weightless candidates are never planned by weight.
        for i in 0..100 {
            let steps = crate::routing::plan(&p, 0, i as f64 / 100.0);
            assert_eq!(steps, [crate::routing::Step { route: 0, target: 0 }]);
        }
    }
}
