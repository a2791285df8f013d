//! A route's `[eval]` policy applied to one attempt: its images go through the route's evaluators
//! on the evaluation pool (`crate::eval`) within the route's budget, and the verdicts decide
//! what happens to the attempt: pass, flag, fall back to the next target, block the request, or
//! hold the answer for human review (`generation.review`; the route's `review_overflow` action
//! instead when the review queue has no room).

use std::sync::Arc;

use bytes::Bytes;

use crate::app::App;
use crate::eval::{Outcome, Verdict};
use crate::policy::{EvalAction, EvalPolicy, ReviewOverflow};
use crate::providers::{Generation, Image, ProviderError};
use crate::request::{GenerationRequest, Param};

/// Most characters of one verdict's reason kept (in `x-acc-reasons`, error messages, traces and
/// logs); a longer one is cut and says how much was left out.
pub const MAX_REASON_CHARS: usize = 500;

/// Evaluates one attempt's artifacts on the evaluation pool under the route's budget and
/// applies the route's actions: `Ok` to return them (possibly flagged, or marked for review in
/// `generation.review`), `EvalFailed` to try the next target, `Blocked` to refuse the request.
/// `overflow` is the route's `review_overflow`, applied in place of "review" when the review
/// queue cannot take the images now (counted as `acc_reviews_total{outcome="overflow"}`).
pub async fn evaluate_attempt(
    app: &App,
    generation: &mut Generation,
    cfg: &EvalPolicy,
    overflow: ReviewOverflow,
    req: &GenerationRequest,
    (route, provider): (&str, &str),
    mirror: bool,
) -> Result<(), ProviderError> {
    let expected_size = req.size_given.then_some(req.size);
    // A format the provider was not asked for (dropped) is not expected of it.
    let expected_format = req.output_format.filter(|_| !generation.dropped.contains(&Param::OutputFormat.name()));
    let n = req.n;
    let evaluators: Vec<_> = cfg.evaluators.iter().filter_map(|e| app.evaluators.get(e.as_str()).cloned()).collect();
    let images = generation.images.clone();
    let settings = cfg.settings.clone();
    let contract = req.contract.clone();
    let prompt = req.prompt.clone();
    // Set when this future is dropped (client gone, hedge lost, timeout): the job stops before
    // its next image.
    let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _cancel = CancelOnDrop(cancelled.clone());
    // Mirrors use at most half the evaluation threads, so they cannot starve live requests.
    let _mirror_permit = if mirror { app.mirror_eval.acquire().await.ok() } else { None };
    let job = app.eval_pool.run(move || {
        images
            .iter()
            .take_while(|_| !cancelled.load(std::sync::atomic::Ordering::Relaxed))
            .map(|image| {
                let bytes = match image {
                    Image::Base64(b64) => Bytes::from(b64.decode_base64().unwrap_or_default()),
                    Image::Raw { bytes, .. } => bytes.clone(),
                    Image::Url(_) => Bytes::new(),
                };
                crate::eval::evaluate_as(
                    &bytes,
                    expected_size,
                    expected_format,
                    &settings,
                    contract.as_deref(),
                    &prompt,
                    &evaluators,
                )
            })
            .collect::<Vec<_>>()
    });
    let mut verdict_images = Vec::new();
    let mut verdicts: Vec<Verdict> = match tokio::time::timeout(cfg.budget, job).await {
        Ok(Some((waited, reports))) => {
            app.metrics.eval_queue.observe(waited);
            for r in &reports {
                for (v, secs) in r.verdicts.iter().zip(&r.durations) {
                    app.metrics.eval_duration.with_label_values(&[v.evaluator]).observe(*secs);
                }
            }
            for (i, r) in reports.iter().enumerate() {
                verdict_images.extend(std::iter::repeat_n(i, r.verdicts.len()));
            }
            reports.into_iter().flat_map(|r| r.verdicts).collect()
        }
        outcome => {
            let why = match outcome {
                Err(_) => format!("evaluation did not finish within its budget of {} ms", cfg.budget.as_millis()),
                _ => "the evaluation pool is not running".to_string(),
            };
            // No image was judged: each gets an error verdict of each evaluator, so that
            // every verdict names its image (`x-acc-eval`, the trace).
            let mut out = Vec::new();
            for i in 0..generation.images.len().max(1) {
                for e in cfg.evaluators.iter().filter_map(|e| app.evaluators.get(e.as_str())) {
                    out.push(Verdict { evaluator: e.name(), score: 0.0, verdict: Outcome::Error, reason: why.clone() });
                    verdict_images.push(i);
                }
            }
            out
        }
    };
    // A reason may quote what the request brought (a contract's text clauses, text OCR read):
    // each is cut, so that a contract of megabytes makes no megabyte error message or record.
    // (A reason of at most MAX_REASON_CHARS bytes has no more characters: not counted.)
    for v in verdicts.iter_mut().filter(|v| v.reason.len() > MAX_REASON_CHARS) {
        let more = v.reason.chars().count().saturating_sub(MAX_REASON_CHARS);
        if more > 0 {
            v.reason = format!("{}… ({more} more characters)", crate::cut(&v.reason, MAX_REASON_CHARS));
        }
    }
    if cfg.evaluators.iter().any(|e| e == "sanity") && (generation.images.len() as u32) < n {
        verdicts.push(Verdict {
            evaluator: "sanity",
            score: 0.0,
            verdict: Outcome::Fail,
            reason: match generation.partial_errors.first() {
                Some(e) => format!(
                    "the request asked for {n} images, the provider returned {} ({} of its calls failed, the first: {})",
                    generation.images.len(),
                    generation.partial_errors.len(),
                    e.text_without_provider_message()
                ),
                None => format!("the request asked for {n} images, the provider returned {}", generation.images.len()),
            },
        });
    }
    let mut failures = Vec::new();
    // The strictest action among the failed evaluators' actions applies.
    let mut action: Option<EvalAction> = None;
    for v in &verdicts {
        // A mirror's verdicts go to its comparison, not to the route's evaluation metrics.
        if !mirror {
            app.metrics.eval_total.with_label_values(&[v.evaluator, route, provider, v.verdict.label()]).inc();
            if v.verdict != Outcome::Error {
                app.metrics.eval_score.with_label_values(&[v.evaluator, provider]).observe(v.score as f64);
            }
        }
        let failed = v.verdict == Outcome::Fail || (v.verdict == Outcome::Error && !cfg.fail_open);
        if failed {
            failures.push(format!("{}: {}", v.evaluator, v.reason));
            let a = cfg.action(v.evaluator);
            action = Some(match (action, a) {
                (Some(EvalAction::Block), _) | (_, EvalAction::Block) => EvalAction::Block,
                // A person must see what any failed check sends to review.
                (Some(EvalAction::Review), _) | (_, EvalAction::Review) => EvalAction::Review,
                (Some(EvalAction::Fallback), _) | (_, EvalAction::Fallback) => EvalAction::Fallback,
                _ => EvalAction::Flag,
            });
        }
    }
    let last = generation.images.len().saturating_sub(1);
    verdict_images.resize(verdicts.len(), last);
    generation.verdicts = verdicts;
    generation.verdict_images = verdict_images;
    if failures.is_empty() {
        return Ok(());
    }
    let mut action = action.unwrap_or(EvalAction::Fallback);
    if action == EvalAction::Review {
        if mirror {
            // Nobody reviews a mirror's images: for its comparison they failed.
            action = EvalAction::Fallback;
        } else if !app.reviews.has_room(bytes_to_hold(app, generation, req).await, &app.policy.snapshot().policy.review)
        {
            app.reviews.count_overflow(route);
            tracing::warn!(route, "review queue full or unavailable: review_overflow applies");
            failures.push("review: the review queue cannot take the image now (review_overflow applies)".into());
            action = overflow.action();
        }
    }
    let reasons = failures.join("; ");
    match action {
        EvalAction::Review => {
            generation.review = failures;
            Ok(())
        }
        EvalAction::Fallback => Err(ProviderError::EvalFailed(reasons)),
        EvalAction::Block => Err(ProviderError::Blocked(reasons)),
        EvalAction::Flag => {
            generation.flags = failures;
            Ok(())
        }
    }
}

/// What holding an attempt's images for review will take of the budget, bytes: their decoded
/// size and, where images are signed before they are held (`[provenance]`), what signing adds
/// to each (the images held are the signed ones, so a budget checked on the provider's bytes
/// alone let `review_overflow = "fallback"` find the queue full only after the attempts were
/// over, and block).
///
/// Finding a provider's own manifest in an image means decoding it: that runs on a blocking
/// thread, not on the request's worker.
async fn bytes_to_hold(app: &App, generation: &Generation, req: &GenerationRequest) -> u64 {
    let mut bytes = held_bytes(generation);
    let snapshot = app.policy.snapshot();
    if let Some(p) = &snapshot.policy.provenance {
        let prompt = if p.include_prompt { req.prompt.len() } else { 0 };
        let images = generation.images.clone();
        let inputs: Vec<Bytes> = req.images.iter().chain(req.mask.iter()).map(|p| p.bytes.clone()).collect();
        let manifests = tokio::task::spawn_blocking(move || {
            // An edit's inputs are named in each image's manifest, with their own manifests.
            let of_inputs: usize = inputs.iter().map(|i| 1024 + crate::provenance::embedded_manifest_len(i)).sum();
            images
                .iter()
                .map(|image| match image {
                    Image::Base64(b) => {
                        crate::provenance::embedded_manifest_len(&b.decode_base64().unwrap_or_default())
                    }
                    Image::Raw { bytes, .. } => crate::provenance::embedded_manifest_len(bytes),
                    Image::Url(_) => 0,
                } + of_inputs)
                .collect::<Vec<usize>>()
        })
        .await
        .unwrap_or_else(|_| vec![0; generation.images.len()]);
        for existing in manifests {
            bytes += p.credentials.growth_estimate(prompt, existing);
        }
    }
    bytes
}

/// The decoded size of an attempt's images, bytes (base64 counted at 3/4 of its length).
pub fn held_bytes(generation: &Generation) -> u64 {
    generation
        .images
        .iter()
        .map(|i| match i {
            Image::Base64(b) => (b.len() as u64) / 4 * 3,
            Image::Raw { bytes, .. } => bytes.len() as u64,
            Image::Url(_) => 0,
        })
        .sum()
}

struct CancelOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Per evaluator, whether any image failed it and the lowest score, from one attempt's verdicts.
pub fn per_evaluator(cfg: &EvalPolicy, verdicts: &[Verdict]) -> Vec<(String, bool, f32)> {
    let fail_open = cfg.fail_open;
    let mut out: Vec<(String, bool, f32)> = Vec::new();
    for v in verdicts {
        let failed = v.verdict == Outcome::Fail || (v.verdict == Outcome::Error && !fail_open);
        match out.iter_mut().find(|(name, ..)| name == v.evaluator) {
            Some(e) => {
                e.1 |= failed;
                e.2 = e.2.min(v.score);
            }
            None => out.push((v.evaluator.to_string(), failed, v.score)),
        }
    }
    out
}
