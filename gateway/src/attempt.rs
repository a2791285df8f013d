//! One attempt on one route target, as a short sequence of calls into modules that do not call
//! back: the adapter's capabilities (`providers`), the provider's pause and breaker
//! ([`crate::live::ProviderState::admit`]), a concurrency slot, the adapter call, the answer fed
//! back to the breaker and the target's health window (`live`), provider URLs fetched (`fetch`),
//! then the route's evaluation (`evaluation`). `routing::run_plan` runs attempts in plan order.

use std::time::Duration;

use tokio::time::Instant;

use crate::app::App;
use crate::eval::Verdict;
use crate::health::Sample;
use crate::policy::{FetchPolicy, ParamAction, Policy};
use crate::providers::{AttemptRequest, Generation, Image, Provider, ProviderError};
use crate::reload::Snapshot;
use crate::request::{GenerationRequest, Param};
use crate::routing::Step;

/// Each evaluated attempt's step and verdicts, in the order they were evaluated.
pub type VerdictSink = std::sync::Mutex<Vec<(Step, Vec<Verdict>)>>;

/// Where attempts leave how many images their provider made (returned, beyond `n`, or left
/// out by its safety checker), once it answered with them: what an attempt that then failed
/// (its URLs not fetched, its images failing evaluation or not judged in time) is charged for,
/// as the provider billed them all.
pub type MadeSink = std::sync::Mutex<Vec<(Step, u32)>>;

/// What the trace records of one attempt beyond how it ended (`routing::AttemptRecord`).
#[derive(Debug, Clone)]
pub struct AttemptNote {
    pub step: Step,
    /// The attempt's span id (nonzero), sent to the provider in `traceparent`.
    pub span_id: u64,
    /// When the attempt started.
    pub started: Instant,
    /// Time waiting for the provider's concurrency slot.
    pub queue: Duration,
    /// The model asked of the provider.
    pub model: String,
    /// The model (version) the provider says generated.
    pub model_version: Option<String>,
    /// Every evaluator's verdict on the attempt's images, and the image each is about.
    pub verdicts: Vec<Verdict>,
    pub verdict_images: Vec<usize>,
    /// Calls that failed within an answer that still returned images (a provider that makes
    /// one call per image, `Generation::partial_errors`; secrets masked).
    pub partial_errors: Vec<std::sync::Arc<ProviderError>>,
    /// How the attempt ended, once it has (`None` while it runs): what the trace of a request
    /// the client left keeps of it.
    pub ended: Option<NoteEnd>,
}

/// How an attempt ended, for a note that outlives its outcome (a cancelled request's trace).
#[derive(Debug, Clone)]
pub struct NoteEnd {
    pub elapsed: Duration,
    /// The attempt's result label (`ok`, or the error's [`ProviderError::label`]).
    pub result: &'static str,
    /// The error without the provider's own words ([`ProviderError::text_without_provider_message`]).
    pub error: Option<String>,
}

/// Every attempt's note, in the order the attempts ended (a cancelled one's too).
pub type NoteSink = std::sync::Mutex<Vec<AttemptNote>>;

/// Puts its note into the sink when the attempt ends, however it ends (a lost hedge is dropped).
struct NoteGuard<'a> {
    sink: &'a NoteSink,
    note: Option<AttemptNote>,
}

impl Drop for NoteGuard<'_> {
    fn drop(&mut self) {
        if let (Some(n), Ok(mut sink)) = (self.note.take(), self.sink.lock()) {
            sink.push(n);
        }
    }
}

/// Everything one attempt needs besides its step.
pub struct AttemptEnv<'a> {
    /// The gateway's state (metrics, evaluation pool).
    pub app: &'a App,
    /// The policy snapshot the request started with.
    pub snap: &'a Snapshot,
    /// The client's request.
    pub req: &'a GenerationRequest,
    /// The model alias the client asked for (or the policy's default).
    pub alias: &'a str,
    /// The matched route's name, for metric labels.
    pub route_name: &'a str,
    /// The gateway must hold the images' bytes (to answer `b64_json` or serve the URL itself).
    pub needs_bytes: bool,
    /// A mirror's attempt: its verdicts stay out of the route's evaluation metrics.
    pub mirror: bool,
    /// Where attempts leave their verdicts (pass or fail), when mirrors or a canary compare them.
    pub verdicts: Option<&'a VerdictSink>,
    /// Where attempts leave how many images their provider made ([`MadeSink`]).
    pub made: Option<&'a MadeSink>,
    /// Where attempts leave their notes for the trace record, with the request's trace id (32
    /// hex digits) for the `traceparent` sent to providers; `None` when nothing is recorded.
    pub notes: Option<(&'a NoteSink, &'a str)>,
    /// The client's W3C `tracestate`, passed on to providers beside the attempt's
    /// `traceparent` when the request continued the client's trace.
    pub tracestate: Option<&'a http::HeaderValue>,
    /// Where streamed partial images go live (`stream: true` requests answered as they run);
    /// used only by attempts on targets whose route does not evaluate, never by mirrors.
    pub partials: Option<&'a std::sync::Arc<crate::providers::events::LiveTap>>,
}

/// One attempt on the target `s` names, until `until`: refused when the provider cannot do the
/// operation (`Unsupported`) or the request's parameters under a `reject` policy
/// (`UnsupportedParams`); skipped while the provider is paused or its breaker open (`Skipped`);
/// queued for a concurrency slot; sent; then its images fetched and evaluated when needed. Its
/// result feeds the provider's breaker and the target's health window.
pub async fn attempt(env: &AttemptEnv<'_>, s: Step, until: Instant) -> Result<Generation, ProviderError> {
    let Some((sink, trace_id)) = env.notes else { return run(env, s, until, None, None).await };
    let span_id = fastrand::u64(1..);
    let mut guard = NoteGuard {
        sink,
        note: Some(AttemptNote {
            step: s,
            span_id,
            started: Instant::now(),
            queue: Duration::ZERO,
            model: String::new(),
            model_version: None,
            verdicts: Vec::new(),
            verdict_images: Vec::new(),
            partial_errors: Vec::new(),
            ended: None,
        }),
    };
    let traceparent = Some(crate::upstream::TraceHeaders {
        traceparent: crate::telemetry::traceparent(trace_id, &crate::hex_lower(&span_id.to_be_bytes())),
        tracestate: env.tracestate.cloned(),
    });
    let result = run(env, s, until, guard.note.as_mut(), traceparent).await;
    if let Some(n) = guard.note.as_mut() {
        n.ended = Some(NoteEnd {
            elapsed: n.started.elapsed(),
            result: result.as_ref().map_or_else(ProviderError::label, |_| "ok"),
            error: result.as_ref().err().map(ProviderError::text_without_provider_message),
        });
    }
    result
}

async fn run(
    env: &AttemptEnv<'_>,
    s: Step,
    until: Instant,
    mut note: Option<&mut AttemptNote>,
    traceparent: Option<crate::upstream::TraceHeaders>,
) -> Result<Generation, ProviderError> {
    let (app, policy) = (env.app, &env.snap.policy);
    let route = &policy.routes[s.route];
    let target = &route.targets[s.target];
    let live = &env.snap.live[s.route][s.target];
    let adapter = &env.snap.target_providers[s.route][s.target];
    let spec = policy.providers.get(&target.provider);

    // 1. Can this provider do it at all?
    let dropped =
        capabilities(env.req, adapter.as_ref(), target.model.as_deref().unwrap_or(env.alias), &target.provider, spec)?;
    // 2. Will it take it now?
    let breaker = spec.map(|p| p.breaker.clone()).unwrap_or_default();
    let now = Instant::now();
    let max_pause = spec.map_or(Duration::from_secs(300), |p| p.max_pause);
    let admission = live.provider.admit(now, &breaker, max_pause, &app.metrics)?;
    let budget = until.saturating_duration_since(now);
    let slot = live.provider.acquire(spec.and_then(|p| p.concurrency.as_ref()), budget, &app.metrics).await;
    let model = target.model.as_deref().unwrap_or(env.alias);
    if let Some(n) = note.as_deref_mut() {
        n.queue = now.elapsed();
        n.model = model.to_string();
    }
    let slot = slot?;
    // 3. Send it.
    let default_fetch = FetchPolicy::default();
    let fetch = spec.map_or(&default_fetch, |p| &p.fetch);
    // Partial images go to the client live only where nothing judges the image first.
    let partials = env.partials.filter(|_| !env.mirror && route.eval.evaluators.is_empty());
    let request = AttemptRequest {
        req: env.req,
        model,
        target_model: target.model.as_deref(),
        dropped: &dropped,
        fetch,
        partials,
    };
    let sent = Instant::now();
    // Told when the provider's 2xx answer starts to arrive: past that, a deadline that passes
    // mid-answer leaves images the provider made and bills.
    let answered = adapter.bills_on_answer().then(|| std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let scope = crate::upstream::Scope {
        trace: traceparent,
        answer_memory: policy.server.max_answer_buffer_bytes,
        answered: answered.clone(),
    };
    let call = crate::upstream::scoped(scope, adapter.generate(&request));
    let result = match tokio::time::timeout_at(until, call).await {
        // A provider may echo the key it was sent, in any answer: nothing reads its error
        // before the gateway's secrets are taken out.
        Ok(r) => r.map_err(ProviderError::redacted),
        Err(_) if answered.as_ref().is_some_and(|a| a.load(std::sync::atomic::Ordering::Relaxed)) => {
            Err(ProviderError::TimeoutAfterAnswer(crate::providers::ANSWER_STILL_ARRIVING))
        }
        Err(_) => Err(ProviderError::Timeout),
    };
    drop(slot);
    let latency = sent.elapsed();
    // 4. What the answer says about the provider.
    let partial = result.as_ref().map_or(&[][..], |g| &g.partial_errors[..]);
    let evidence = admission.settle(result.as_ref().map(|_| ()), partial, &breaker, max_pause, &app.metrics);
    let record = |sample: Sample| live.record(latency, sample, &route.health, &app.metrics);
    let mut generation = match result {
        Ok(g) => g,
        Err(e) => {
            // A 2xx answer cut off mid-body: the provider made the images (charged, as `n`).
            let cut = matches!(e, ProviderError::Transport(_));
            if let (true, Some(made), Some(a)) = (cut, env.made, &answered) {
                if a.load(std::sync::atomic::Ordering::Relaxed) {
                    crate::lock(made).push((s, env.req.n));
                }
            }
            match evidence {
                Some(false) if matches!(e, ProviderError::Timeout | ProviderError::TimeoutAfterAnswer(_)) => {
                    record(Sample::Timeout)
                }
                Some(false) => record(Sample::Error),
                _ => {}
            }
            return Err(e);
        }
    };
    if let Some(n) = note.as_deref_mut() {
        n.model_version = generation.settings.model.clone();
        n.partial_errors = generation.partial_errors.clone();
    }
    used_settings(&mut generation, env.req, model, &dropped);
    // More images than asked for: the client gets `n` (and is limited and evaluated on `n`);
    // the rest were billed and are charged as discarded.
    let n = env.req.n as usize;
    if generation.images.len() > n {
        generation.surplus += (generation.images.len() - n) as u32;
        generation.images.truncate(n);
        generation.revised_prompts.truncate(n);
    }
    if let Some(made) = env.made {
        crate::lock(made).push((s, generation.images.len() as u32 + generation.surplus));
    }
    // A stream's events likewise: `n` completed events, and at most the partial images asked
    // for (`partial_images` per image; more were not asked for, and were not relayed live).
    if let Some(streamed) = generation.streamed.as_mut() {
        streamed.completed.truncate(n);
        streamed.partials.truncate(env.req.partials_allowed());
    }
    // 5. A provider URL is fetched (SSRF-guarded) when the gateway needs the bytes: to evaluate
    // them, or to answer b64_json or gateway-served URLs.
    let evaluates = !route.eval.evaluators.is_empty();
    if (env.needs_bytes || evaluates) && generation.images.iter().any(|i| matches!(i, Image::Url(_))) {
        // Past the attempt's deadline the fetch is refused as one past its own timeout: the
        // provider made (and billed) the images either way, so it is charged as such.
        let left = until.saturating_duration_since(Instant::now()).as_millis();
        let fetched = tokio::time::timeout_at(until, crate::fetch::fetch_images(&mut generation.images, fetch))
            .await
            .unwrap_or(Err(crate::fetch::FetchError::Timeout(left)));
        if let Err(e) = fetched {
            app.metrics.fetch_refused.with_label_values(&[&target.provider, e.reason()]).inc();
            tracing::warn!(provider = %target.provider, "image URL refused: {e}");
            record(Sample::Error);
            return Err(ProviderError::FetchRefused(e.to_string()));
        }
    }
    // Whatever the route evaluates, bytes that are not an image are the provider's broken
    // answer, never the client's image; the answer's `output_format` says what the bytes are,
    // not what the provider labelled them (a JPEG answered as "png").
    match crate::providers::check_images_are_images(&generation.images) {
        Ok(Some(format)) => {
            let field = generation.answer_fields.iter_mut().find(|(k, _)| *k == "output_format");
            if let Some((_, v)) = field.filter(|(_, v)| v.as_str() != Some(format)) {
                *v = serde_json::Value::from(format);
            }
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(provider = %target.provider, "{e}");
            record(Sample::Error);
            return Err(e);
        }
    }
    // 6. What the route's evaluators say about the images.
    if evaluates {
        let labels = (env.route_name, target.provider.as_str());
        let evaluated = tokio::time::timeout_at(
            until,
            crate::evaluation::evaluate_attempt(
                app,
                &mut generation,
                &route.eval,
                route.review.overflow,
                env.req,
                labels,
                env.mirror,
            ),
        )
        .await;
        if let Some(sink) = env.verdicts {
            if let Ok(mut v) = sink.lock() {
                v.push((s, generation.verdicts.clone()));
            }
        }
        if let Some(n) = note {
            n.verdicts = generation.verdicts.clone();
            n.verdict_images = generation.verdict_images.clone();
        }
        match evaluated {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                record(Sample::EvalFailed);
                return Err(e);
            }
            // The provider made the images (and billed them): charged as discarded.
            Err(_) => return Err(ProviderError::TimeoutAfterAnswer(crate::providers::EVALUATION_UNFINISHED)),
        }
    }
    record(Sample::Ok);
    Ok(generation)
}

/// The request's parameters this provider cannot honour, to drop; an error when it cannot do the
/// operation, or when its policy says to refuse such parameters rather than drop them.
fn capabilities(
    req: &GenerationRequest,
    adapter: &dyn Provider,
    model: &str,
    name: &str,
    spec: Option<&crate::policy::ProviderSpec>,
) -> Result<Vec<Param>, ProviderError> {
    let kind = spec.map_or("?", |p| p.kind.name());
    if !adapter.supports_op(req.op) {
        return Err(ProviderError::Unsupported(format!(
            "provider \"{name}\" (kind {kind}) does not do /v1/images/{}",
            req.op.path()
        )));
    }
    if req.stream.is_some()
        && !adapter.streams()
        && spec.is_some_and(|p| p.unsupported_stream == crate::policy::StreamAction::Reject)
    {
        return Err(ProviderError::UnsupportedParams(format!(
            "provider \"{name}\" (kind {kind}) cannot stream images (stream: true) and its policy says unsupported_stream = \"reject\""
        )));
    }
    let dropped: Vec<Param> =
        Param::ALL.into_iter().filter(|p| req.has(*p) && !adapter.supports_value(*p, model, req)).collect();
    if !dropped.is_empty() && spec.is_some_and(|p| p.unsupported == ParamAction::Reject) {
        let names: Vec<&str> = dropped.iter().map(|p| p.name()).collect();
        return Err(ProviderError::UnsupportedParams(format!(
            "provider \"{name}\" (kind {kind}) cannot honour {}",
            names.join(", ")
        )));
    }
    Ok(dropped)
}

/// The generation settings used, as the provider reports them, completed from what was sent.
fn used_settings(generation: &mut Generation, req: &GenerationRequest, model: &str, dropped: &[Param]) {
    let st = &mut generation.settings;
    let sent = |p: Param| !dropped.contains(&p);
    st.seed = st.seed.or(req.seed.filter(|_| sent(Param::Seed)));
    st.steps = st.steps.or(req.steps.filter(|_| sent(Param::Steps)));
    st.guidance = st.guidance.or(req.guidance_scale.filter(|_| sent(Param::Guidance)));
    if st.sampler.is_none() && sent(Param::Sampler) {
        st.sampler = req.sampler.clone();
    }
    if st.model.is_none() {
        st.model = Some(model.to_string());
    }
    generation.dropped = dropped.iter().map(|p| p.name()).collect();
}

/// An attempt's time limit: the route's, or the provider's when shorter.
pub fn attempt_timeout(policy: &Policy, s: Step) -> Duration {
    let r = &policy.routes[s.route];
    let provider_timeout = policy.providers.get(&r.targets[s.target].provider).and_then(|p| p.timeout);
    provider_timeout.map_or(r.attempt_timeout, |t| t.min(r.attempt_timeout))
}
