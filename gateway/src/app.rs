//! The running gateway's request-independent state, shared by both listeners: the live policy,
//! metrics, stores (artifacts, idempotency), limits, the evaluation pool and the mirrors'
//! runtime. Built once at start-up by [`App::new`]; the listeners ([`crate::server`]) and the
//! endpoints ([`crate::proxy`], [`crate::admin`]) take it as `Arc<App>`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::artifacts::ArtifactStore;
use crate::cluster::Cluster;
use crate::eval::pool::EvalPool;
use crate::eval::Evaluator;
use crate::feedback::Feedback;
use crate::idempotency::IdempotencyStore;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::reload::PolicyStore;
use crate::review::ReviewQueue;
use crate::store::TraceWriter;

/// Shared state of the running gateway.
pub struct App {
    /// The live policy and the provider state learnt while running.
    pub policy: Arc<PolicyStore>,
    /// Every metric of the process (one registry, served at `/admin/metrics`).
    pub metrics: Arc<Metrics>,
    /// Images served at `/v1/images/artifacts/` for `response_format = "url"`.
    pub artifacts: Arc<ArtifactStore>,
    /// SHA-256 of `ACC_ADMIN_TOKEN`; `None` disables the protected admin endpoints.
    pub admin_token_digest: Option<[u8; 32]>,
    /// Proxy requests being answered now (see [`App::admit`]).
    pub in_flight: AtomicUsize,
    /// Set on SIGTERM: `/readyz` answers 503 and no new mirrors start.
    pub draining: AtomicBool,
    /// Threads for decoding and evaluating artifacts.
    pub eval_pool: EvalPool,
    /// The evaluators this process can run, by policy name.
    pub evaluators: std::collections::HashMap<&'static str, Arc<dyn Evaluator>>,
    /// Whether each evaluator could run at start-up, and why not.
    pub evaluator_status: Vec<(&'static str, Result<(), String>)>,
    /// Rate and daily spend limits per key and tenant.
    pub limits: Limits,
    /// `Idempotency-Key` leases and answers kept for replay.
    pub idempotency: Arc<IdempotencyStore>,
    /// Memory held by request bodies being received, all requests together.
    pub bodies: crate::intake::BodyBudget,
    /// Requests in flight per tenant (tenants with `max_in_flight`).
    pub tenant_slots: crate::intake::TenantSlots,
    /// Every runtime of the process, for `acc_tasks_alive`.
    pub runtimes: std::sync::Mutex<Vec<tokio::runtime::Handle>>,
    /// Mirrors in flight, waited for on shutdown.
    pub mirror_tasks: TaskTracker,
    /// The runtime mirrors run on: a thread of its own at idle CPU priority, so shadow traffic
    /// never delays live requests on the proxy workers (it gets the CPU they leave).
    pub mirror_rt: tokio::runtime::Handle,
    /// Cancels mirrors still running when the drain deadline passes.
    pub mirror_stop: CancellationToken,
    /// Evaluation threads mirrors may use at once (half the pool), so live requests keep theirs.
    pub mirror_eval: tokio::sync::Semaphore,
    /// Where trace records go (`None`: `[store] enabled = false`).
    pub traces: Option<TraceWriter>,
    /// Feedback on traces and regeneration detection.
    pub feedback: Feedback,
    /// Answers withheld for human review, in the trace store.
    pub reviews: Arc<ReviewQueue>,
}

impl App {
    /// Live tasks across the process's runtimes.
    pub fn tasks_alive(&self) -> usize {
        self.runtimes.lock().map(|r| r.iter().map(|h| h.metrics().num_alive_tasks()).sum()).unwrap_or(0)
    }
}

/// What [`App::new`] is built from; the rest starts empty.
pub struct AppParts<'a> {
    /// The policy store, opened (its first snapshot validated).
    pub policy: Arc<PolicyStore>,
    /// The registry the policy store already reports into.
    pub metrics: Arc<Metrics>,
    /// Memory budget of gateway-served images, bytes.
    pub artifact_store_bytes: usize,
    /// The admin bearer token (`ACC_ADMIN_TOKEN`); only its SHA-256 is kept. Empty or `None`
    /// disables the protected admin endpoints.
    pub admin_token: Option<&'a str>,
    /// Evaluation threads (image decoding, inference).
    pub eval_threads: usize,
    /// Whether each evaluator could run at start-up, and why not (`eval::readiness`).
    pub evaluator_status: Vec<(&'static str, Result<(), String>)>,
    /// The mirrors' runtime (one thread at idle CPU priority).
    pub mirror_rt: tokio::runtime::Handle,
    /// The trace writer, started on the current runtime.
    pub traces: Option<TraceWriter>,
    /// State shared with the other replicas through Redis (`[cluster]`); `None`: in memory.
    pub cluster: Option<Arc<Cluster>>,
}

impl App {
    /// The gateway's state at start-up: empty stores sized from the policy's `[server]`
    /// settings, the evaluation pool started with `eval_threads` threads.
    pub fn new(p: AppParts<'_>) -> App {
        let idempotency = {
            let s = &p.policy.snapshot().policy.server;
            Arc::new(IdempotencyStore::new(s.idempotency_ttl, s.idempotency_max_bytes))
        };
        let feedback = Feedback::new(p.traces.clone(), &p.metrics.feedback);
        let reviews = Arc::new(ReviewQueue::new(p.traces.clone(), &p.metrics.registry));
        App {
            reviews,
            artifacts: Arc::new(ArtifactStore::new(p.artifact_store_bytes, p.metrics.clone())),
            policy: p.policy,
            metrics: p.metrics,
            admin_token_digest: p.admin_token.filter(|t| !t.is_empty()).map(|t| {
                use sha2::Digest;
                sha2::Sha256::digest(t.as_bytes()).into()
            }),
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            eval_pool: EvalPool::new(p.eval_threads),
            evaluators: crate::eval::available(),
            evaluator_status: p.evaluator_status,
            limits: Limits::new(p.cluster),
            idempotency,
            bodies: Default::default(),
            tenant_slots: Default::default(),
            runtimes: std::sync::Mutex::new(vec![tokio::runtime::Handle::current(), p.mirror_rt.clone()]),
            mirror_tasks: TaskTracker::new(),
            mirror_rt: p.mirror_rt,
            mirror_stop: CancellationToken::new(),
            mirror_eval: tokio::sync::Semaphore::new((p.eval_threads / 2).max(1)),
            feedback,
            traces: p.traces,
        }
    }
}

/// Counts a request in flight for as long as it lives; `None` when the policy's `max_in_flight`
/// is reached, and the request is shed with a 503 rather than queued.
pub struct InFlight<'a>(&'a AtomicUsize);

impl App {
    /// Counts a request in flight; `None` (shed it with a 503) when `limit` are already.
    pub fn admit(&self, limit: usize) -> Option<InFlight<'_>> {
        let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        let guard = InFlight(&self.in_flight);
        (now <= limit).then_some(guard)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
