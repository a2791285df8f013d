//! Prometheus metrics: one struct, one registry, built at start-up (no globals, so tests do not
//! interfere). Label values come from policy names and fixed enums, never from user input.

use prometheus::{
    exponential_buckets, CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::policy::Route;

/// A route's metric handles for the common case (success), so the hot path does not hash label
/// values on every request.
pub struct RouteMetrics {
    pub requests_ok: IntCounter,
    pub duration: Histogram,
    /// Per target of the route: `acc_attempts_total{result="ok"}` and its provider latency.
    pub targets: Vec<(IntCounter, Histogram)>,
}

/// The `model` label of a target: its configured model, or `alias` when it takes the client's.
pub fn model_label(model: Option<&str>) -> &str {
    model.unwrap_or("alias")
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub attempts: IntCounterVec,
    pub provider_latency: HistogramVec,
    pub fallbacks: IntCounterVec,
    pub policy_reloads: IntCounterVec,
    pub policy_info: IntGaugeVec,
    pub artifacts: IntCounterVec,
    pub eval_total: IntCounterVec,
    pub eval_score: HistogramVec,
    pub eval_duration: HistogramVec,
    pub eval_queue: prometheus::Histogram,
    pub evaluator_available: IntGaugeVec,
    // Resilience: breakers, health windows, pauses, queues, hedging, limits, cost.
    pub breaker_state: IntGaugeVec,
    pub breaker_transitions: IntCounterVec,
    pub target_latency: GaugeVec,
    pub target_error_ratio: GaugeVec,
    pub target_timeout_ratio: GaugeVec,
    pub target_eval_fail_ratio: GaugeVec,
    pub target_samples: IntGaugeVec,
    pub target_demoted: IntGaugeVec,
    pub target_demotions: IntCounterVec,
    pub provider_paused: IntCounterVec,
    pub queue_seconds: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub queue_rejected: IntCounterVec,
    pub hedges: IntCounterVec,
    pub cost: CounterVec,
    pub idempotency: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub tasks_alive: IntGauge,
    // Mirrors and canaries.
    pub mirror_requests: IntCounterVec,
    pub mirror_dropped: IntCounterVec,
    pub mirror_latency: HistogramVec,
    pub mirror_cost: CounterVec,
    pub mirror_samples: IntGaugeVec,
    pub mirror_error_rate: GaugeVec,
    pub mirror_latency_p: GaugeVec,
    pub mirror_eval_fail_rate: GaugeVec,
    pub mirror_cost_per_image: GaugeVec,
    pub canary_rollbacks: IntCounterVec,
    pub canary_state: IntGaugeVec,
    pub fetch_refused: IntCounterVec,
    // Traces and cohorts.
    /// `acc_trace_dropped_total{reason}`: records lost (queue full, store down or failing,
    /// writer closed), and records kept without image digests.
    pub trace_dropped: IntCounterVec,
    /// `acc_trace_written_total`: records in committed batches.
    pub trace_written: IntCounter,
    /// `acc_cohort_requests_total{route,cohort,template,asset_type,outcome}`.
    pub cohort_requests: IntCounterVec,
    /// `acc_cohort_eval_total{route,cohort,template,asset_type,evaluator,verdict}`: every
    /// verdict on every evaluated attempt's images (fallbacks' too; mirrors not).
    pub cohort_eval: IntCounterVec,
    /// `acc_cohort_fallbacks_total{route,cohort,template,asset_type}`: attempts after the first.
    pub cohort_fallbacks: IntCounterVec,
    /// `acc_contract_unchecked_total{route}`: requests with a prompt contract on a route that
    /// does not run the `adherence` evaluator (the answer says `x-acc-contract-checked: false`).
    pub contract_unchecked: IntCounterVec,
    /// `acc_provenance_total{route,result}`: returned images by signing result: `signed`,
    /// `unsigned` (a signing error under `on_provenance_error = "fail_open"`), `refused` (one
    /// under `"fail_closed"`: the request failed).
    pub provenance: IntCounterVec,
    /// Feedback and regenerations ([`FeedbackMetrics`]).
    pub feedback: FeedbackMetrics,
}

/// Feedback on traces and regenerations. The cohort labels are bounded by the policy's
/// `[cohorts]` lists exactly as in `acc_cohort_requests_total` (`other` outside them, `none`
/// when not sent).
pub struct FeedbackMetrics {
    /// `acc_feedback_total{route,rating,cohort,template,asset_type}`: ratings accepted by
    /// `POST /v1/feedback` (a replacement counts again), `rating` = `up` (> 0), `down` (< 0) or
    /// `neutral` (0). A regeneration's implicit -1 is not counted here (see
    /// `acc_regenerations_total`).
    pub feedback: IntCounterVec,
    /// `acc_regenerations_total{route,cohort,how}`: requests linked to an earlier trace of the
    /// same tenant, `how` = `explicit` or `implicit`.
    pub regenerations: IntCounterVec,
    /// `acc_feedback_failed_total{source,reason}`: feedback not stored, `source` = `explicit`
    /// or `regeneration`, `reason` = `store_unavailable`, `store_error`, `store_disabled` or
    /// `queue_full` (the regeneration writer's queue).
    pub failed: IntCounterVec,
}

impl FeedbackMetrics {
    /// Registers the feedback metrics in `r`.
    pub fn new(r: &Registry) -> FeedbackMetrics {
        FeedbackMetrics {
            feedback: counter(
                r,
                "acc_feedback_total",
                "Ratings accepted by POST /v1/feedback by route, rating (up, down, neutral) and cohort labels",
                &["route", "rating", "cohort", "template", "asset_type"],
            ),
            regenerations: counter(
                r,
                "acc_regenerations_total",
                "Requests that regenerate an earlier trace of the same tenant, by route, cohort and how detected (explicit, implicit)",
                &["route", "cohort", "how"],
            ),
            failed: counter(
                r,
                "acc_feedback_failed_total",
                "Feedback entries not stored, by source (explicit, regeneration) and reason",
                &["source", "reason"],
            ),
        }
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric");
    registry.register(Box::new(c.clone())).expect("unique metric names");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("metric");
    registry.register(Box::new(g.clone())).expect("unique metric names");
    g
}

fn int_gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric");
    registry.register(Box::new(g.clone())).expect("unique metric names");
    g
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // Image generations take from tens of milliseconds (cached, self-hosted) to minutes.
        let latency = exponential_buckets(0.005, 2.0, 16).expect("static buckets");
        let requests = IntCounterVec::new(
            Opts::new("acc_requests_total", "Proxy requests by route and outcome"),
            &["route", "outcome"],
        )
        .expect("metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new("acc_request_duration_seconds", "Time from request to response, by route")
                .buckets(latency.clone()),
            &["route"],
        )
        .expect("metric");
        let attempts = IntCounterVec::new(
            Opts::new("acc_attempts_total", "Provider attempts by route, provider and result"),
            &["route", "provider", "result"],
        )
        .expect("metric");
        let provider_latency = HistogramVec::new(
            HistogramOpts::new("acc_provider_latency_seconds", "Latency of provider attempts").buckets(latency),
            &["provider", "model"],
        )
        .expect("metric");
        let fallbacks = IntCounterVec::new(
            Opts::new("acc_fallbacks_total", "Moves from one target to the next, with the reason"),
            &["route", "from", "to", "reason"],
        )
        .expect("metric");
        let policy_reloads =
            IntCounterVec::new(Opts::new("acc_policy_reloads_total", "Policy reloads by result"), &["result"])
                .expect("metric");
        let policy_info =
            IntGaugeVec::new(Opts::new("acc_policy_info", "1 for the policy version being served"), &["version"])
                .expect("metric");
        let artifacts = IntCounterVec::new(
            Opts::new("acc_artifact_store_total", "Gateway-served image URLs: stored, served, expired, evicted"),
            &["event"],
        )
        .expect("metric");
        let eval_total = IntCounterVec::new(
            Opts::new("acc_eval_total", "Evaluator verdicts on artifacts"),
            &["evaluator", "route", "provider", "verdict"],
        )
        .expect("metric");
        let eval_score = HistogramVec::new(
            HistogramOpts::new("acc_eval_score", "Evaluator scores (1 is best)")
                .buckets(vec![0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]),
            &["evaluator", "provider"],
        )
        .expect("metric");
        let eval_duration = HistogramVec::new(
            HistogramOpts::new("acc_eval_duration_seconds", "Time an evaluator took on one artifact")
                .buckets(exponential_buckets(0.0005, 2.0, 14).expect("static buckets")),
            &["evaluator"],
        )
        .expect("metric");
        let eval_queue = prometheus::Histogram::with_opts(
            HistogramOpts::new("acc_eval_queue_seconds", "Time artifacts waited for an evaluation thread")
                .buckets(exponential_buckets(0.0001, 2.0, 16).expect("static buckets")),
        )
        .expect("metric");
        let evaluator_available = IntGaugeVec::new(
            Opts::new("acc_evaluator_available", "1 when the evaluator can run (runtime and model present)"),
            &["evaluator"],
        )
        .expect("metric");
        for c in [
            Box::new(evaluator_available.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(eval_total.clone()),
            Box::new(eval_score.clone()),
            Box::new(eval_duration.clone()),
            Box::new(eval_queue.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(attempts.clone()),
            Box::new(provider_latency.clone()),
            Box::new(fallbacks.clone()),
            Box::new(policy_reloads.clone()),
            Box::new(policy_info.clone()),
            Box::new(artifacts.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        // Both results exist from the start, so alerts on rate() see a zero, not a gap.
        policy_reloads.with_label_values(&["ok"]);
        policy_reloads.with_label_values(&["error"]);
        // Requests refused before a route is chosen, at 0 from the start (see ROUTE_OUTCOMES).
        for outcome in ["client_error", "unauthorized", "overloaded", "internal_error"] {
            requests.with_label_values(&["none", outcome]);
        }
        let target = &["route", "provider", "model"];
        let r = &registry;
        let breaker_state = int_gauge(
            r,
            "acc_breaker_state",
            "Circuit breaker per provider: 0 closed, 1 half-open, 2 open",
            &["provider"],
        );
        let breaker_transitions = counter(
            r,
            "acc_breaker_transitions_total",
            "Circuit breaker moves, by the state entered",
            &["provider", "to"],
        );
        let target_latency = gauge(
            r,
            "acc_target_latency_seconds",
            "Attempt latency over a route target's health window, by percentile (p50, p95, p99)",
            &["route", "provider", "model", "percentile"],
        );
        let target_error_ratio = gauge(
            r,
            "acc_target_error_ratio",
            "Share of a target's recent attempts that failed (not timeouts)",
            target,
        );
        let target_timeout_ratio =
            gauge(r, "acc_target_timeout_ratio", "Share of a target's recent attempts that timed out", target);
        let target_eval_fail_ratio = gauge(
            r,
            "acc_target_eval_fail_ratio",
            "Share of a target's recent attempts whose images failed evaluation",
            target,
        );
        let target_samples = int_gauge(r, "acc_target_samples", "Attempts in a target's health window", target);
        let target_demoted = int_gauge(
            r,
            "acc_target_demoted",
            "1 while a target is demoted to the back of its route's plan (latency SLO, error or eval-fail ratio)",
            target,
        );
        let target_demotions = counter(
            r,
            "acc_target_demotions_total",
            "Targets demoted (to=demoted) or restored (to=restored)",
            &["route", "provider", "model", "to"],
        );
        let provider_paused =
            counter(r, "acc_provider_paused_total", "Times a provider's 429 with Retry-After paused it", &["provider"]);
        let queue_seconds = HistogramVec::new(
            HistogramOpts::new("acc_queue_seconds", "Time attempts waited for a provider concurrency slot")
                .buckets(exponential_buckets(0.001, 2.0, 16).expect("static buckets")),
            &["provider"],
        )
        .expect("metric");
        r.register(Box::new(queue_seconds.clone())).expect("unique metric names");
        let queue_depth =
            int_gauge(r, "acc_queue_depth", "Attempts waiting for a provider concurrency slot", &["provider"]);
        let queue_rejected = counter(
            r,
            "acc_queue_rejected_total",
            "Attempts refused a provider slot: queue full or waited too long",
            &["provider", "reason"],
        );
        let hedges = counter(
            r,
            "acc_hedges_total",
            "Hedged attempts: started; won (the hedge answered the request); lost (cancelled: another attempt answered first)",
            &["route", "result"],
        );
        let cost = CounterVec::new(
            Opts::new(
                "acc_cost_usd_total",
                "Spend at the providers' prices: images returned, discarded (failed evaluation) and hedges cancelled",
            ),
            &["route", "provider", "kind"],
        )
        .expect("metric");
        r.register(Box::new(cost.clone())).expect("unique metric names");
        let idempotency = counter(
            r,
            "acc_idempotency_total",
            "Requests with an Idempotency-Key: new, replayed, waited (joined one in flight), conflict",
            &["result"],
        );
        let trace_dropped = counter(
            r,
            "acc_trace_dropped_total",
            "Trace records lost (queue_full, store_unavailable, store_error, closed) or kept without image digests (images_not_digested)",
            &["reason"],
        );
        let trace_written =
            IntCounter::new("acc_trace_written_total", "Trace records written to the store").expect("metric");
        r.register(Box::new(trace_written.clone())).expect("unique metric names");
        let cohort = ["route", "cohort", "template", "asset_type"];
        let cohort_requests = counter(
            r,
            "acc_cohort_requests_total",
            "Requests that reached routing by cohort, prompt template and asset type (values outside the policy's [cohorts] lists are \"other\")",
            &[cohort[0], cohort[1], cohort[2], cohort[3], "outcome"],
        );
        let cohort_eval = counter(
            r,
            "acc_cohort_eval_total",
            "Evaluator verdicts on the images of every evaluated attempt (not mirrors) by cohort, prompt template and asset type",
            &[cohort[0], cohort[1], cohort[2], cohort[3], "evaluator", "verdict"],
        );
        let cohort_fallbacks = counter(
            r,
            "acc_cohort_fallbacks_total",
            "Attempts after a request's first, by cohort, prompt template and asset type",
            &cohort,
        );
        let contract_unchecked = counter(
            r,
            "acc_contract_unchecked_total",
            "Requests with a prompt contract on a route that does not run the adherence evaluator",
            &["route"],
        );
        let provenance = counter(
            r,
            "acc_provenance_total",
            "Returned images by C2PA signing result (signed, unsigned, refused)",
            &["route", "result"],
        );
        let rate_limited =
            counter(r, "acc_rate_limited_total", "Requests refused by a rate or spend limit", &["tenant", "limit"]);
        let tasks_alive =
            IntGauge::new("acc_tasks_alive", "Live tokio tasks across the gateway's runtimes").expect("metric");
        r.register(Box::new(tasks_alive.clone())).expect("unique metric names");
        let mirror_requests = counter(
            r,
            "acc_mirror_requests_total",
            "Mirrored attempts on candidates, by result (ok, eval_failed, or the attempt's error)",
            &["route", "candidate", "result"],
        );
        let mirror_dropped = counter(
            r,
            "acc_mirror_dropped_total",
            "Sampled requests not mirrored: in_flight limit, spend cap, shutdown",
            &["route", "candidate", "reason"],
        );
        let mirror_latency = HistogramVec::new(
            HistogramOpts::new("acc_mirror_latency_seconds", "Latency of mirrored attempts, evaluation included")
                .buckets(exponential_buckets(0.005, 2.0, 16).expect("static buckets")),
            &["route", "candidate"],
        )
        .expect("metric");
        r.register(Box::new(mirror_latency.clone())).expect("unique metric names");
        let mirror_cost = CounterVec::new(
            Opts::new("acc_mirror_cost_usd_total", "Spend on mirrored attempts at the candidates' prices"),
            &["route", "candidate"],
        )
        .expect("metric");
        r.register(Box::new(mirror_cost.clone())).expect("unique metric names");
        let side = &["route", "candidate", "side"];
        let mirror_samples =
            int_gauge(r, "acc_mirror_samples", "Compared requests per side (primary, candidate)", side);
        let mirror_error_rate =
            gauge(r, "acc_mirror_error_rate", "Share of compared requests that failed, per side", side);
        let mirror_latency_p = gauge(
            r,
            "acc_mirror_latency_p_seconds",
            "Latency percentiles of compared requests, per side",
            &["route", "candidate", "side", "percentile"],
        );
        let mirror_eval_fail_rate = gauge(
            r,
            "acc_mirror_eval_fail_rate",
            "Share of compared images failing an evaluator, per side",
            &["route", "candidate", "side", "evaluator"],
        );
        let mirror_cost_per_image =
            gauge(r, "acc_mirror_cost_per_image_usd", "Cost per image of compared requests, per side", side);
        let canary_rollbacks =
            counter(r, "acc_canary_rollbacks_total", "Canaries rolled back by their guard", &["route"]);
        let canary_state = int_gauge(
            r,
            "acc_canary_state",
            "1 while a route's canary serves its share, 0 once rolled back",
            &["route"],
        );
        let fetch_refused = counter(
            r,
            "acc_fetch_refused_total",
            "Provider image URLs not fetched: scheme, private address, redirect, size, time, status",
            &["provider", "reason"],
        );
        Metrics {
            fetch_refused,
            mirror_requests,
            mirror_dropped,
            mirror_latency,
            mirror_cost,
            mirror_samples,
            mirror_error_rate,
            mirror_latency_p,
            mirror_eval_fail_rate,
            mirror_cost_per_image,
            canary_rollbacks,
            canary_state,
            breaker_state,
            breaker_transitions,
            target_latency,
            target_error_ratio,
            target_timeout_ratio,
            target_eval_fail_ratio,
            target_samples,
            target_demoted,
            target_demotions,
            provider_paused,
            queue_seconds,
            queue_depth,
            queue_rejected,
            hedges,
            cost,
            idempotency,
            rate_limited,
            tasks_alive,
            trace_dropped,
            trace_written,
            cohort_requests,
            cohort_eval,
            cohort_fallbacks,
            contract_unchecked,
            provenance,
            feedback: FeedbackMetrics::new(&registry),
            registry,
            requests,
            request_duration,
            attempts,
            provider_latency,
            fallbacks,
            policy_reloads,
            policy_info,
            artifacts,
            eval_total,
            eval_score,
            eval_duration,
            eval_queue,
            evaluator_available,
        }
    }

    pub fn route_metrics(&self, r: &Route) -> RouteMetrics {
        // Every outcome's series exists from the route's first policy at 0: a series born at 1
        // shows Prometheus no increase, so the first failures after a start (the ones an
        // `increase(...) > 0` alert exists for) would go unseen.
        for outcome in ROUTE_OUTCOMES {
            self.requests.with_label_values(&[r.name.as_str(), outcome]);
        }
        RouteMetrics {
            requests_ok: self.requests.with_label_values(&[r.name.as_str(), "ok"]),
            duration: self.request_duration.with_label_values(&[r.name.as_str()]),
            targets: r
                .targets
                .iter()
                .map(|t| {
                    (
                        self.attempts.with_label_values(&[r.name.as_str(), t.provider.as_str(), "ok"]),
                        self.provider_latency
                            .with_label_values(&[t.provider.as_str(), model_label(t.model.as_deref())]),
                    )
                })
                .collect(),
        }
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding never fails");
        out
    }

    /// Points `acc_policy_info` at the version now served.
    pub fn set_policy_version(&self, old: Option<&str>, new: &str) {
        if let Some(old) = old {
            if old != new {
                let _ = self.policy_info.remove_label_values(&[old]);
            }
        }
        self.policy_info.with_label_values(&[new]).set(1);
    }
}

/// The `outcome` values of `acc_requests_total` a routed request can end with (README,
/// "Metrics"), each created at 0 for every route.
pub const ROUTE_OUTCOMES: [&str; 16] = [
    "ok",
    "client_cancelled",
    "client_error",
    "unauthorized",
    "upstream_rejected",
    "upstream_timeout",
    "upstream_error",
    "eval_failed",
    "blocked",
    "pending_review",
    "rate_limited",
    "no_healthy_target",
    "cluster_unavailable",
    "provider_busy",
    "idempotency_conflict",
    "internal_error",
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
