//! What attempts cost at the providers' prices (`[providers.X.price]`): the estimate a tenant's
//! spend reservation is made with, and the charge per attempt once the plan has run, by kind:
//! images returned, images discarded (failed evaluation or not judged in time, URLs not fetched, left out by the
//! provider's safety checker, beyond `n`), hedges cancelled (the provider most likely
//! bills them), mirrors.

use crate::app::App;
use crate::policy::{Billable, Policy};
use crate::providers::{Generation, ProviderError};
use crate::request::GenerationRequest;
use crate::routing::{PlanOutcome, Step};

/// What `images` images of a request cost on a target, at its provider's price (by model, size
/// and quality, plus steps and GPU time when the generation reports them); `None` when unpriced.
/// The quality and size are the ones the provider says it drew at (a GPT image model answers
/// `quality` and `size`, which tell what `auto` became), else the ones asked for.
pub fn cost_of(
    policy: &Policy,
    step: Step,
    req: &GenerationRequest,
    images: u32,
    used: Option<&Generation>,
) -> Option<f64> {
    let target = &policy.routes[step.route].targets[step.target];
    let price = policy.providers.get(&target.provider)?.price.as_ref()?;
    let model = target.model.as_deref().or(req.model.as_deref()).unwrap_or_default();
    let size = used.and_then(|g| reported(g, "size")).map_or_else(|| req.size_text(), str::to_owned);
    price.cost(&Billable {
        model,
        size: &size,
        quality: used.and_then(|g| reported(g, "quality")).or(req.quality.as_deref()),
        images,
        steps: used.and_then(|g| g.settings.steps).or(req.steps),
        gpu_seconds: used.and_then(|g| g.gpu_seconds),
    })
}

/// A text field of the provider's answer (`quality`, `size`), when it gave one.
fn reported<'a>(g: &'a Generation, field: &str) -> Option<&'a str> {
    g.answer_fields.iter().find(|(k, _)| *k == field).and_then(|(_, v)| v.as_str())
}

/// Charges every attempt of a plan that the provider most likely billed, counted in
/// `acc_cost_usd_total{route,provider,kind}`; returns the request's total in USD, `None` when
/// nothing it used has a price, and each attempt's charge (same order as `outcome.attempts`).
/// `made`: how many images each step's provider made, for the attempts that answered with
/// images and then failed (`crate::attempt::MadeSink`); one not listed is charged for `n`.
pub fn charge_attempts(
    app: &App,
    policy: &Policy,
    route: &str,
    req: &GenerationRequest,
    outcome: &PlanOutcome,
    made: &[(Step, u32)],
) -> (Option<f64>, Vec<Option<f64>>) {
    let mut total = None;
    let mut each = vec![None; outcome.attempts.len()];
    for (i, a) in outcome.attempts.iter().enumerate() {
        let kind = match &a.result {
            Ok(()) => "returned",
            // Made, and billed, but not returned: failed evaluation, not judged before the
            // attempt's deadline, or its URLs were not fetched (refused, too large, too slow).
            Err(
                ProviderError::EvalFailed(_)
                | ProviderError::Blocked(_)
                | ProviderError::FetchRefused(_)
                | ProviderError::TimeoutAfterAnswer(_),
            ) => "discarded",
            Err(ProviderError::HedgeCancelled) => "hedge",
            // A 2xx answer cut off mid-body: made, and billed, but not received.
            Err(ProviderError::Transport(_)) if made.iter().any(|(s, _)| *s == a.step) => "discarded",
            Err(_) => continue,
        };
        let winner = match (&a.result, &outcome.success) {
            (Ok(()), Some((_, g))) => Some(g),
            _ => None,
        };
        let made_here = || made.iter().find(|(s, _)| *s == a.step).map(|(_, n)| *n);
        let images = match winner {
            Some(g) => g.images.len() as u32,
            None if kind == "discarded" => made_here().unwrap_or(req.n),
            None => req.n,
        };
        let Some(mut usd) = cost_of(policy, a.step, req, images, winner) else { continue };
        let provider = &policy.routes[a.step.route].targets[a.step.target].provider;
        app.metrics.cost.with_label_values(&[route, provider, kind]).inc_by(usd);
        // Images beyond `n` that the winner's provider made and the client did not get.
        if let Some(g) = winner.filter(|g| g.surplus > 0) {
            let all = cost_of(policy, a.step, req, images + g.surplus, winner).unwrap_or(usd);
            let surplus = (all - usd).max(0.0);
            if surplus > 0.0 {
                app.metrics.cost.with_label_values(&[route, provider, "discarded"]).inc_by(surplus);
                usd += surplus;
            }
        }
        *total.get_or_insert(0.0) += usd;
        each[i] = Some(usd);
    }
    (total, each)
}
