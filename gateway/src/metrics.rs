//! Prometheus metrics: one struct, one registry, built at start-up (no globals, so tests do not
//! interfere). Label values come from policy names and fixed enums, never from user input.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
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
        Metrics {
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

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
