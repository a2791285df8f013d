//! Provider migrations: mirrors (a sample of a route's requests copied to a candidate, never
//! awaited by the client, scored by the same evaluators and compared side by side with the
//! primary) and canaries (a share of live traffic served by a candidate, rolled back when its
//! guard says it is worse).

use crate::lock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use serde_json::json;

use crate::cluster::SpendHold;
use crate::compare::{Comparison, Observation};
use crate::limits::{DailyBudget, Reservation};
use crate::policy::Policy;

/// A deterministic draw in `[0, 1)` from a request's trace id and a salt (the candidate), so a
/// rerun of the same request (same trace id) is sampled the same way.
pub fn draw(trace_id: &str, salt: &str) -> f64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update([0]);
    h.update(trace_id.as_bytes());
    let d = h.finalize();
    let x = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// One mirror candidate of one route: its in-flight count, daily spend and comparison.
#[derive(Default)]
pub struct MirrorState {
    in_flight: AtomicUsize,
    budget: Arc<DailyBudget>,
    pub comparison: Mutex<Comparison>,
}

/// Why a sampled request was not mirrored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    InFlight,
    Spend,
    Shutdown,
}

impl Skip {
    pub fn label(self) -> &'static str {
        match self {
            Skip::InFlight => "in_flight",
            Skip::Spend => "spend",
            Skip::Shutdown => "shutdown",
        }
    }
}

/// A mirror's claim on its candidate's in-flight slots and daily budget, released on drop.
pub struct Ticket {
    state: Arc<MirrorState>,
    spend: Reservation,
    /// The hold on the candidate's budget shared by every replica (`[cluster]`), when taken.
    shared: Option<SpendHold>,
}

impl MirrorState {
    /// Takes an in-flight slot and reserves `estimate` USD of the day's budget, or says why not.
    pub fn admit(self: &Arc<Self>, max_in_flight: usize, budget: Option<f64>, estimate: f64) -> Result<Ticket, Skip> {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(Skip::InFlight);
        }
        // Without a cap the spend is still tracked (the report shows it).
        let spend = match self.budget.reserve(budget.unwrap_or(f64::INFINITY), estimate) {
            Ok(r) => r,
            Err(_) => {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                return Err(Skip::Spend);
            }
        };
        Ok(Ticket { state: self.clone(), spend, shared: None })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn spent_today(&self) -> f64 {
        self.budget.spent_today()
    }
}

impl Ticket {
    /// Charges what the mirror actually cost (its reservation is released either way).
    pub fn charge(&mut self, usd: f64) {
        self.spend.charge(usd);
        if let Some(h) = &self.shared {
            h.charge(usd);
        }
    }

    /// Adds the hold taken on the candidate's shared daily budget (released with the ticket).
    pub fn hold_shared(&mut self, hold: SpendHold) {
        self.shared = Some(hold);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A route's canary: the comparison of canary-served requests with the rest, and whether the
/// guard rolled it back. Keyed by the canary's settings: an edit starts a fresh one.
pub struct CanaryState {
    pub fingerprint: String,
    pub comparison: Mutex<Comparison>,
    rolled_back: Mutex<Option<String>>,
    active: AtomicBool,
}

impl CanaryState {
    pub fn new(fingerprint: &str) -> CanaryState {
        CanaryState {
            fingerprint: fingerprint.to_string(),
            comparison: Mutex::new(Comparison::default()),
            rolled_back: Mutex::new(None),
            active: AtomicBool::new(true),
        }
    }

    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    pub fn rolled_back(&self) -> Option<String> {
        lock(&self.rolled_back).clone()
    }

    /// Records one request of the route (`canary`: served by the candidate first) and applies
    /// the guard; returns the reason when this outcome rolled the canary back.
    pub fn record(&self, canary: bool, o: &Observation, guard: &crate::compare::Guard) -> Option<String> {
        let mut c = lock(&self.comparison);
        if canary {
            c.record(None, Some(o));
        } else {
            c.record(Some(o), None);
        }
        if !self.active() {
            return None;
        }
        let reason = crate::compare::canary_verdict(&c.primary, &c.candidate, guard)?;
        let mut rb = lock(&self.rolled_back);
        if rb.is_some() {
            return None;
        }
        *rb = Some(reason.clone());
        self.active.store(false, Ordering::Relaxed);
        Some(reason)
    }
}

/// Mirror and canary state by name, kept across policy reloads like the provider state in
/// [`crate::live`]: a candidate keeps its comparison while its route and label stay.
#[derive(Default)]
pub struct Registry {
    /// Keyed by (route, candidate label).
    mirrors: DashMap<(String, String), Arc<MirrorState>>,
    /// Keyed by route; replaced when the canary's settings change.
    canaries: DashMap<String, Arc<CanaryState>>,
}

/// A snapshot's mirror and canary state, per route.
#[derive(Default)]
pub struct RouteCandidates {
    /// Indexed like the route's `mirrors`.
    pub mirrors: Vec<Arc<MirrorState>>,
    /// The route's canary, when it has one.
    pub canary: Option<Arc<CanaryState>>,
}

impl Registry {
    /// The state of mirror candidate `label` of `route`, made on first use.
    pub fn mirror(&self, route: &str, label: &str) -> Arc<MirrorState> {
        self.mirrors.entry((route.to_string(), label.to_string())).or_default().clone()
    }

    /// The canary state of a route for these settings: kept while they stay the same (a rolled
    /// back canary stays rolled back), fresh after an edit.
    pub fn canary(&self, route: &str, fingerprint: &str) -> Arc<CanaryState> {
        let mut e = self.canaries.entry(route.to_string()).or_insert_with(|| Arc::new(CanaryState::new(fingerprint)));
        if e.fingerprint != fingerprint {
            *e = Arc::new(CanaryState::new(fingerprint));
        }
        e.clone()
    }

    /// The mirror and canary state of each route of `policy`.
    pub fn candidates(&self, policy: &Policy) -> Vec<RouteCandidates> {
        policy
            .routes
            .iter()
            .map(|r| RouteCandidates {
                mirrors: r.mirrors.iter().map(|m| self.mirror(&r.name, &m.label)).collect(),
                canary: r.canary.as_ref().map(|c| self.canary(&r.name, &c.fingerprint)),
            })
            .collect()
    }
}

/// `GET /admin/mirror/report` (and `acc report`): per route and mirror candidate, the primary
/// and the candidate side by side, with significance tests; canaries likewise.
/// `candidates` is the snapshot's state of `policy`, indexed like its routes.
pub fn report(policy: &Policy, candidates: &[RouteCandidates], route: Option<&str>) -> serde_json::Value {
    const ALPHA: f64 = 0.05;
    debug_assert_eq!(policy.routes.len(), candidates.len(), "the candidates of another policy");
    let routes: Vec<_> = policy
        .routes
        .iter()
        .zip(candidates)
        .filter(|(r, _)| route.is_none_or(|n| n == r.name))
        .filter(|(r, _)| !r.mirrors.is_empty() || r.canary.is_some())
        .map(|(r, states)| {
            let candidates: Vec<_> = r
                .mirrors
                .iter()
                .zip(&states.mirrors)
                .map(|(m, state)| {
                    let c = lock(&state.comparison);
                    let mut v = c.report(ALPHA);
                    v["name"] = json!(m.label);
                    v["sample"] = json!(m.sample);
                    v["in_flight"] = json!(state.in_flight());
                    v["spent_today_usd"] = json!(state.spent_today());
                    v
                })
                .collect();
            let canary = r.canary.as_ref().zip(states.canary.as_ref()).map(|(c, state)| {
                let cmp = lock(&state.comparison);
                let mut v = cmp.report(ALPHA);
                v["name"] = json!(c.label);
                v["share"] = json!(c.share);
                v["state"] = json!(if state.active() { "active" } else { "rolled_back" });
                v["reason"] = json!(state.rolled_back());
                v
            });
            json!({"route": r.name, "candidates": candidates, "canary": canary})
        })
        .collect();
    json!({
        "routes": routes,
        "alpha": ALPHA,
        "tests": {
            "rates": "two-proportion z-test (two-sided)",
            "latency": "Mann-Whitney U (two-sided, normal approximation)",
        },
    })
}

/// How long a mirror waits for its primary's outcome before giving up on the pair.
pub fn pair_wait(route_deadline: Duration) -> Duration {
    route_deadline + Duration::from_secs(5)
}

/// The report as a table a person reads: one block per route and candidate, a row per measure,
/// the primary and the candidate side by side with the test's p-value.
pub fn render_table(report: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let routes = report["routes"].as_array().cloned().unwrap_or_default();
    if routes.is_empty() {
        out.push_str("no route has mirrors or a canary\n");
        return out;
    }
    let num = |v: &serde_json::Value, digits: usize| match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "-".to_string(),
    };
    let pval = |v: &serde_json::Value| match v["p_value"].as_f64() {
        Some(p) => format!("p={p:.3}{}", if v["significant"].as_bool() == Some(true) { " *" } else { "" }),
        None => String::new(),
    };
    for r in &routes {
        let mut blocks: Vec<(String, &serde_json::Value)> = Vec::new();
        for c in r["candidates"].as_array().into_iter().flatten() {
            blocks.push((format!("mirror {}", c["name"].as_str().unwrap_or("?")), c));
        }
        if !r["canary"].is_null() {
            let c = &r["canary"];
            let state = c["state"].as_str().unwrap_or("?");
            blocks.push((format!("canary {} ({state})", c["name"].as_str().unwrap_or("?")), c));
        }
        for (title, c) in blocks {
            let _ = writeln!(out, "route {}: {title}", r["route"].as_str().unwrap_or("?"));
            if let Some(reason) = c["reason"].as_str() {
                let _ = writeln!(out, "  rolled back: {reason}");
            }
            let (p, k, sig) = (&c["primary"], &c["candidate"], &c["significance"]);
            let _ = writeln!(out, "  {:<28} {:>12} {:>12}  test", "", "primary", "candidate");
            let mut row = |name: &str, a: String, b: String, t: String| {
                let _ = writeln!(out, "  {name:<28} {a:>12} {b:>12}  {t}");
            };
            row("samples", num(&p["samples"], 0), num(&k["samples"], 0), String::new());
            row("error rate", num(&p["error_rate"], 3), num(&k["error_rate"], 3), pval(&sig["error_rate"]));
            row("latency p50 ms", num(&p["p50_ms"], 1), num(&k["p50_ms"], 1), pval(&sig["latency"]));
            row("latency p95 ms", num(&p["p95_ms"], 1), num(&k["p95_ms"], 1), String::new());
            row("latency p99 ms", num(&p["p99_ms"], 1), num(&k["p99_ms"], 1), String::new());
            let mut evaluators: Vec<&String> =
                p["eval_fail_rate"].as_object().into_iter().flatten().map(|(e, _)| e).collect();
            for e in k["eval_fail_rate"].as_object().into_iter().flatten().map(|(e, _)| e) {
                if !evaluators.contains(&e) {
                    evaluators.push(e);
                }
            }
            for e in evaluators {
                row(
                    &format!("eval fail rate ({e})"),
                    num(&p["eval_fail_rate"][e], 3),
                    num(&k["eval_fail_rate"][e], 3),
                    pval(&sig["eval_fail_rate"][e]),
                );
            }
            row("mean adherence", num(&p["mean_adherence"], 3), num(&k["mean_adherence"], 3), String::new());
            row(
                "cost per image USD",
                num(&p["cost_per_image_usd"], 4),
                num(&k["cost_per_image_usd"], 4),
                String::new(),
            );
            out.push('\n');
        }
    }
    let _ = writeln!(
        out,
        "tests: rates by two-proportion z-test, latency by Mann-Whitney U (both two-sided); * = p < {}",
        report["alpha"].as_f64().unwrap_or(0.05)
    );
    out
}
