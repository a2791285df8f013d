//! A request's part in its route's provider migration (`mirror` and `canary` in the policy;
//! the state and statistics live in `crate::mirror` and `crate::compare`): whether the canary
//! serves it first, the sampled mirror copies started for it on the mirrors' runtime (never
//! awaited by the client), and, once its plan has run, the primary's outcome handed to those
//! mirrors and to the canary's guard.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::app::App;
use crate::attempt::{attempt, attempt_timeout, AttemptEnv};
use crate::compare::Observation;
use crate::cost::cost_of;
use crate::eval::Verdict;
use crate::evaluation::per_evaluator;
use crate::mirror::{CanaryState, Skip, Ticket};
use crate::policy::{Canary, Policy};
use crate::providers::ProviderError;
use crate::reload::Snapshot;
use crate::request::GenerationRequest;
use crate::routing::{PlanOutcome, Step};

/// What a request takes part in; made by [`Migration::canary`] before the plan runs, given the
/// outcome by [`Migration::finish`] after.
pub struct Migration<'a> {
    /// The matched route.
    route: usize,
    /// The route's active canary, its state, and whether it serves this request first.
    canary: Option<(&'a Canary, &'a Arc<CanaryState>, bool)>,
    /// One sender per mirror started, for the primary's outcome.
    mirrors: Vec<oneshot::Sender<Observation>>,
}

impl<'a> Migration<'a> {
    /// Draws whether the route's active canary serves this request (its `share`, deterministic
    /// in the trace id); if so its target goes first in `steps`, the plan staying as fallback.
    pub fn canary(snap: &'a Snapshot, route_idx: usize, trace_id: &str, steps: &mut Vec<Step>) -> Migration<'a> {
        let route = &snap.policy.routes[route_idx];
        let canary = match (&route.canary, &snap.candidates[route_idx].canary) {
            (Some(c), Some(state)) if state.active() => {
                let on = crate::mirror::draw(trace_id, "canary") < c.share;
                if on {
                    steps.insert(0, Step { route: route_idx, target: c.target });
                }
                Some((c, state, on))
            }
            _ => None,
        };
        Migration { route: route_idx, canary, mirrors: Vec::new() }
    }

    /// Whether the canary serves this request first (`x-acc-canary: true`).
    pub fn served_by_canary(&self) -> bool {
        self.canary.as_ref().is_some_and(|c| c.2)
    }

    /// Whether attempts must leave their verdicts for a comparison.
    pub fn compares(&self) -> bool {
        !self.mirrors.is_empty() || self.canary.is_some()
    }

    /// Starts the route's sampled mirrors of this request on the mirrors' runtime, within each
    /// candidate's in-flight and daily spend caps (what is not mirrored is counted in
    /// `acc_mirror_dropped_total` by reason). A canary-served request is not mirrored: its first
    /// attempt is not the primary's.
    pub fn start_mirrors(
        &mut self,
        app: &Arc<App>,
        snap: &Arc<Snapshot>,
        trace_id: &str,
        primary_span: Option<&str>,
        req: &GenerationRequest,
        alias: &str,
    ) {
        if self.served_by_canary() {
            return;
        }
        let route_idx = self.route;
        let policy = &snap.policy;
        let route = &policy.routes[route_idx];
        let mut shared_req: Option<Arc<GenerationRequest>> = None;
        for (i, m) in route.mirrors.iter().enumerate() {
            if crate::mirror::draw(trace_id, &m.label) >= m.sample {
                continue;
            }
            let step = Step { route: route_idx, target: m.target };
            let dropped = |why: Skip| {
                app.metrics.mirror_dropped.with_label_values(&[&route.name, &m.label, why.label()]).inc();
            };
            if app.draining.load(Ordering::Relaxed) {
                dropped(Skip::Shutdown);
                continue;
            }
            let estimate = cost_of(policy, step, req, req.n, None).unwrap_or(0.0);
            let ticket =
                match snap.candidates[route_idx].mirrors[i].admit(m.max_in_flight, m.spend_usd_per_day, estimate) {
                    Ok(t) => t,
                    Err(why) => {
                        dropped(why);
                        continue;
                    }
                };
            let (tx, rx) = oneshot::channel();
            self.mirrors.push(tx);
            let shared = shared_req.get_or_insert_with(|| Arc::new(unstreamed(req))).clone();
            // A mirror's trace record names its primary's trace.
            let parent = primary_span.map(|s| (trace_id.to_string(), s.to_string()));
            let task =
                mirror_attempt(app.clone(), snap.clone(), shared, step, alias.to_string(), i, ticket, rx, parent);
            app.mirror_rt.spawn(app.mirror_tasks.track_future(task));
        }
    }

    /// After the plan ran: what its first target did goes to every mirror started (for the
    /// side-by-side report) and to the canary's guard, which may roll the canary back (logged and
    /// counted in `acc_canary_rollbacks_total`).
    pub fn finish(
        self,
        app: &App,
        policy: &Policy,
        req: &GenerationRequest,
        outcome: &PlanOutcome,
        first: Step,
        verdicts: &[(Step, Vec<Verdict>)],
    ) {
        let o = first_observation(policy, req, outcome, first, verdicts);
        for tx in self.mirrors {
            let _ = tx.send(o.clone());
        }
        if let Some((c, state, on)) = self.canary {
            if let Some(reason) = state.record(on, &o, &c.guard) {
                let route = &policy.routes[self.route].name;
                app.metrics.canary_rollbacks.with_label_values(&[route]).inc();
                app.metrics.canary_state.with_label_values(&[route]).set(0);
                tracing::warn!(route = %route, candidate = %c.label, %reason, "canary rolled back: all traffic to the primary until the canary settings are edited");
            }
        }
    }
}

/// What the first target of a plan did with a request, for mirror and canary comparisons.
fn first_observation(
    policy: &Policy,
    req: &GenerationRequest,
    outcome: &PlanOutcome,
    first: Step,
    verdicts: &[(Step, Vec<Verdict>)],
) -> Observation {
    let Some(rec) = outcome.attempts.iter().find(|a| a.step == first) else {
        return Observation { error: true, ..Default::default() };
    };
    // `billed`: the images the provider made, returned or not.
    let (error, images, billed) = match (&rec.result, &outcome.success) {
        (Ok(()), Some((_, g))) => (false, g.images.len() as u32, g.images.len() as u32),
        (Ok(()), None) => (false, req.n, req.n),
        (Err(ProviderError::EvalFailed(_) | ProviderError::Blocked(_)), _) => (false, req.n, req.n),
        // Failed, but the images were made (and billed): not judged in time, or not fetched.
        (Err(ProviderError::TimeoutAfterAnswer(_) | ProviderError::FetchRefused(_)), _) => (true, 0, req.n),
        (Err(_), _) => (true, 0, 0),
    };
    let evals = verdicts
        .iter()
        .rev()
        .find(|(s, _)| *s == first)
        .map(|(_, v)| per_evaluator(&policy.routes[first.route].eval, v));
    Observation {
        error,
        latency_ms: rec.elapsed.as_secs_f64() * 1000.0,
        evals: evals.unwrap_or_default(),
        cost_usd: cost_of(
            policy,
            first,
            req,
            billed,
            outcome.success.as_ref().filter(|(s, _)| *s == first).map(|(_, g)| g),
        ),
        images,
    }
}

/// A mirror: the candidate's attempt on a copy of the request, scored like the primary's, then
/// paired with the primary's outcome for the report. The client never waits for it.
#[allow(clippy::too_many_arguments)]
async fn mirror_attempt(
    app: Arc<App>,
    snap: Arc<Snapshot>,
    req: Arc<GenerationRequest>,
    step: Step,
    alias: String,
    index: usize,
    mut ticket: Ticket,
    primary: oneshot::Receiver<Observation>,
    parent_trace: Option<(String, String)>,
) {
    let policy = &snap.policy;
    let wall_start = std::time::SystemTime::now();
    let notes = crate::attempt::NoteSink::default();
    let trace_id = parent_trace.as_ref().map(|_| crate::trace::new_trace_id(wall_start));
    let route = &policy.routes[step.route];
    let m = &route.mirrors[index];
    let labels = [route.name.as_str(), m.label.as_str()];
    let sink = std::sync::Mutex::new(Vec::new());
    let made = crate::attempt::MadeSink::default();
    let env = AttemptEnv {
        notes: trace_id.as_deref().map(|t| (&notes, t)),
        app: &app,
        snap: &snap,
        req: &req,
        alias: &alias,
        route_name: &route.name,
        needs_bytes: true,
        mirror: true,
        verdicts: Some(&sink),
        made: Some(&made),
        // A mirror copy is a trace of its own (linked to the primary's), not the client's.
        tracestate: None,
        partials: None,
    };
    // With [cluster], the candidate's daily cap holds for every replica together: its hold is
    // taken here, off the request path (this replica's own budget was checked at admission and
    // is the fallback while Redis cannot answer; under fail_closed the mirror is skipped).
    if let (Some(cluster), Some(cap)) = (app.limits.cluster(), m.spend_usd_per_day) {
        let estimate = cost_of(policy, step, &req, req.n, None).unwrap_or(0.0);
        let over = match cluster.reserve(&format!("mirror:{}:{}", route.name, m.label), cap, estimate).await {
            Ok(Ok(hold)) => {
                ticket.hold_shared(hold);
                false
            }
            Ok(Err(_)) => true,
            Err(u) => cluster.fallback(u).is_err(),
        };
        if over {
            app.metrics.mirror_dropped.with_label_values(&[labels[0], labels[1], Skip::Spend.label()]).inc();
            return;
        }
    }
    let started = Instant::now();
    let until = tokio::time::Instant::now() + attempt_timeout(policy, step);
    let result = tokio::select! {
        r = tokio::time::timeout_at(until, attempt(&env, step, until)) => r.unwrap_or(Err(ProviderError::Timeout)),
        _ = app.mirror_stop.cancelled() => {
            app.metrics.mirror_dropped.with_label_values(&[labels[0], labels[1], Skip::Shutdown.label()]).inc();
            return;
        }
    };
    let latency = started.elapsed();
    let label = match &result {
        Ok(_) => "ok",
        Err(e) => e.label(),
    };
    let m_ = &app.metrics;
    m_.mirror_requests.with_label_values(&[labels[0], labels[1], label]).inc();
    m_.mirror_latency.with_label_values(&labels).observe(latency.as_secs_f64());
    // `billed`: the images the provider made, returned or not.
    let (error, images, billed) = match &result {
        Ok(g) => (false, g.images.len() as u32, g.images.len() as u32),
        Err(ProviderError::EvalFailed(_) | ProviderError::Blocked(_)) => (false, req.n, req.n),
        // Failed, but the images were made (and billed): charged to the mirror's spend.
        Err(ProviderError::TimeoutAfterAnswer(_) | ProviderError::FetchRefused(_)) => (true, 0, req.n),
        Err(_) => (true, 0, 0),
    };
    // All the provider made, when it answered with images: beyond `n` and left out too.
    let made = made.into_inner().unwrap_or_else(|p| p.into_inner());
    let cut = matches!(result, Err(ProviderError::Transport(_)));
    let billed = made.first().map(|(_, n)| *n).filter(|_| billed > 0 || cut).unwrap_or(billed);
    let cost = cost_of(policy, step, &req, billed, result.as_ref().ok());
    if let (Some(parent), Some(trace_id), Some(writer)) = (parent_trace, trace_id.as_deref(), app.traces.as_ref()) {
        let caller = crate::trace::Caller { tenant: None, key_name: None };
        let mut rec = crate::trace::draft(
            trace_id,
            None,
            wall_start,
            caller,
            &route.name,
            route.record_prompt,
            &req,
            &[None, None, None],
        );
        rec.kind = "mirror".to_string();
        // The primary's trace, and its server span (the span link OTLP exports).
        rec.parent_trace_id = Some(parent.0);
        rec.parent_span_id = Some(parent.1);
        let notes = notes.into_inner().unwrap_or_default();
        crate::trace::mirror_attempt(&mut rec, policy, step, latency, &result, notes, cost);
        writer.submit(rec);
    }
    if let Some(usd) = cost {
        ticket.charge(usd);
        m_.mirror_cost.with_label_values(&labels).inc_by(usd);
        m_.cost.with_label_values(&[labels[0], &route.targets[step.target].provider, "mirror"]).inc_by(usd);
    }
    // The slot is free once the candidate answered; pairing is bookkeeping.
    drop(ticket);
    let verdicts = sink.into_inner().unwrap_or_default();
    let evals = verdicts.iter().rev().find(|(s, _)| *s == step).map(|(_, v)| per_evaluator(&route.eval, v));
    let candidate = Observation {
        error,
        latency_ms: latency.as_secs_f64() * 1000.0,
        evals: evals.unwrap_or_default(),
        cost_usd: cost,
        images,
    };
    tracing::debug!(route = %route.name, candidate = %m.label, result = label, latency_ms = candidate.latency_ms, "mirror done");
    let wait = crate::mirror::pair_wait(route.deadline);
    let primary = tokio::select! {
        p = tokio::time::timeout(wait, primary) => p,
        _ = app.mirror_stop.cancelled() => return,
    };
    match primary {
        Ok(Ok(p)) => {
            let state = &snap.candidates[step.route].mirrors[index];
            state.comparison.lock().unwrap_or_else(|e| e.into_inner()).record(Some(&p), Some(&candidate));
        }
        // The client went away before its primary attempt ended: no pair to compare.
        _ => tracing::debug!(route = %route.name, candidate = %m.label, "mirror unpaired: the primary did not finish"),
    }
}

/// A mirror's copy of the request: never a stream (nobody reads a mirror's events; its final
/// image is what is compared, and a kind that refuses streams must not fail it for that).
fn unstreamed(req: &GenerationRequest) -> GenerationRequest {
    let mut copy = req.clone();
    if copy.stream.take().is_some() {
        copy.raw.remove("stream");
        copy.raw.remove("partial_images");
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mirror_copy_of_a_stream_request_is_a_plain_request() {
        let body = br#"{"prompt":"x","stream":true,"partial_images":2,"quality":"high"}"#;
        let req = GenerationRequest::from_json(body).unwrap();
        let copy = unstreamed(&req);
        assert_eq!(copy.stream, None);
        let keys: Vec<&str> = copy.raw.keys().map(String::as_str).collect();
        assert_eq!(keys, ["prompt", "quality"]);
        assert_eq!(req.stream, Some(2), "the primary's request is unchanged");
    }
}
