//! Side-by-side statistics behind the mirror report and the canary guard: pure arithmetic over
//! plain data, no I/O, no locks, no clocks.
//!
//! - [`Observation`]: one side's outcome for one request.
//! - [`Side`]: running totals of one side (errors, latencies, evaluator failures, cost), and its
//!   [`SideSummary`] as the report shows it.
//! - [`Comparison`]: a primary and a candidate, and the report object of `GET /admin/mirror/report`.
//! - [`canary_verdict`]: whether a canary must be rolled back, with the numbers that say why.
//! - The tests themselves: [`two_proportion`], [`one_sided_greater`], [`mann_whitney`], and the
//!   [`normal_cdf`] they stand on. Small enough to write here rather than pull in a statistics crate.
//!
//! The caller owns the locking, the metrics and the logging.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;
use serde_json::{json, Map, Value};

/// How many recent latencies a [`Side`] keeps for percentiles and the rank test: enough for a
/// stable p99, bounded so a long-running mirror does not grow without limit.
pub const LATENCY_KEEP: usize = 10_000;

/// The evaluator whose score is averaged into [`SideSummary::mean_adherence`].
pub const ADHERENCE: &str = "adherence";

/// Test names as the report shows them (issue 5 contract).
const TWO_PROPORTION_TEST: &str = "two-proportion z-test (two-sided)";
const MANN_WHITNEY_TEST: &str = "Mann-Whitney U (two-sided, normal approximation)";

/// One side's outcome for one request (the primary's first attempt, or the candidate's attempt).
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// The attempt failed (no image).
    pub error: bool,
    /// Attempt latency in milliseconds, evaluation included.
    pub latency_ms: f64,
    /// Per evaluator that ran: (name, failed, score in \[0, 1\]). Empty when error or no evaluators.
    pub evals: Vec<(String, bool, f32)>,
    /// What the attempt cost at the provider's price, in USD; `None` when unpriced.
    pub cost_usd: Option<f64>,
    /// Images returned.
    pub images: u32,
}

/// Running totals of one side.
///
/// Latencies are those of successful attempts only: a provider that fails fast must not look
/// quick, and failures are already counted by the error rate. The most recent [`LATENCY_KEEP`]
/// are kept.
#[derive(Debug, Clone, Default)]
pub struct Side {
    /// Observations recorded.
    samples: u64,
    /// Observations that failed.
    errors: u64,
    /// Latencies of successful attempts, in milliseconds, oldest first.
    latencies_ms: VecDeque<f64>,
    /// Per evaluator: (failures, runs).
    evaluators: BTreeMap<String, (u64, u64)>,
    /// Requests whose images failed at least one evaluator.
    any_eval_failed: u64,
    /// Requests where at least one evaluator ran.
    evaluated: u64,
    /// Sum and count of the [`ADHERENCE`] evaluator's scores.
    adherence_sum: f64,
    adherence_runs: u64,
    /// Cost of priced observations, in USD, and the images they returned.
    cost_usd: f64,
    priced_images: u64,
}

impl Side {
    /// Adds one observation. Evaluations of a failed attempt are ignored (there was no image).
    pub fn record(&mut self, o: &Observation) {
        self.samples += 1;
        if o.error {
            self.errors += 1;
        } else {
            if o.latency_ms.is_finite() {
                if self.latencies_ms.len() == LATENCY_KEEP {
                    self.latencies_ms.pop_front();
                }
                self.latencies_ms.push_back(o.latency_ms);
            }
            if !o.evals.is_empty() {
                self.evaluated += 1;
                let mut any_failed = false;
                for (name, failed, score) in &o.evals {
                    // get_mut first: the name is allocated once per evaluator, not once per request.
                    let counts = match self.evaluators.get_mut(name) {
                        Some(counts) => counts,
                        None => self.evaluators.entry(name.clone()).or_default(),
                    };
                    counts.0 += u64::from(*failed);
                    counts.1 += 1;
                    any_failed |= *failed;
                    if name == ADHERENCE && score.is_finite() {
                        self.adherence_sum += f64::from(*score);
                        self.adherence_runs += 1;
                    }
                }
                self.any_eval_failed += u64::from(any_failed);
            }
        }
        if let Some(cost) = o.cost_usd.filter(|c| c.is_finite()) {
            self.cost_usd += cost;
            self.priced_images += u64::from(o.images);
        }
    }

    /// Observations recorded.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Observations that failed.
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// Requests whose images failed any evaluator, and requests that were evaluated.
    pub fn eval_failed(&self) -> (u64, u64) {
        (self.any_eval_failed, self.evaluated)
    }

    /// Nearest-rank percentile of the kept latencies, `p` in (0,100]; `None` when there are none
    /// or `p` is out of range.
    pub fn percentile_ms(&self, p: f64) -> Option<f64> {
        nearest_rank(&self.sorted_latencies(), p)
    }

    /// The side as the report shows it.
    pub fn summary(&self) -> SideSummary {
        let sorted = self.sorted_latencies();
        SideSummary {
            samples: self.samples,
            errors: self.errors,
            error_rate: ratio(self.errors, self.samples).unwrap_or(0.0),
            p50_ms: nearest_rank(&sorted, 50.0),
            p95_ms: nearest_rank(&sorted, 95.0),
            p99_ms: nearest_rank(&sorted, 99.0),
            eval_fail_rate: self
                .evaluators
                .iter()
                .filter_map(|(name, &(fails, runs))| Some((name.clone(), ratio(fails, runs)?)))
                .collect(),
            any_eval_fail_rate: ratio(self.any_eval_failed, self.evaluated),
            mean_adherence: (self.adherence_runs > 0).then(|| self.adherence_sum / self.adherence_runs as f64),
            cost_per_image_usd: (self.priced_images > 0).then(|| self.cost_usd / self.priced_images as f64),
        }
    }

    fn sorted_latencies(&self) -> Vec<f64> {
        let mut sorted: Vec<f64> = self.latencies_ms.iter().copied().collect();
        sorted.sort_unstable_by(f64::total_cmp);
        sorted
    }
}

/// One side of the report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SideSummary {
    /// Observations recorded.
    pub samples: u64,
    /// Observations that failed.
    pub errors: u64,
    /// errors / samples; 0 when there are no samples.
    pub error_rate: f64,
    /// Latency percentiles of successful attempts, in milliseconds; `None` when there are none.
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Per evaluator: failures / runs.
    pub eval_fail_rate: BTreeMap<String, f64>,
    /// Requests that failed any evaluator / requests evaluated; `None` when none were.
    pub any_eval_fail_rate: Option<f64>,
    /// Mean score of the [`ADHERENCE`] evaluator; `None` when it never ran.
    pub mean_adherence: Option<f64>,
    /// Cost of priced observations / the images they returned, in USD; `None` when none were priced.
    pub cost_per_image_usd: Option<f64>,
}

/// Observations of a primary and one candidate: paired (mirroring), or two groups (canary: the
/// canary's requests vs the route's other requests).
#[derive(Debug, Clone, Default)]
pub struct Comparison {
    pub primary: Side,
    pub candidate: Side,
    /// Requests recorded with both sides present (mirroring); 0 for a canary.
    pub pairs: u64,
}

impl Comparison {
    /// Adds one request's outcomes; either side may be absent (a canary records one side per request).
    pub fn record(&mut self, primary: Option<&Observation>, candidate: Option<&Observation>) {
        if let Some(o) = primary {
            self.primary.record(o);
        }
        if let Some(o) = candidate {
            self.candidate.record(o);
        }
        if primary.is_some() && candidate.is_some() {
            self.pairs += 1;
        }
    }

    /// The report object of the issue 5 contract for this pair:
    /// `{"pairs", "primary", "candidate", "significance": {"error_rate", "eval_fail_rate": {name: ..},
    /// "latency"}, "alpha"}`. Each significance entry is `{"p_value", "significant", "test"}`, with
    /// `p_value` null (and `significant` false) where the test is undefined: a side without samples,
    /// both rates 0 or 1, all latencies equal. `eval_fail_rate` covers evaluators that ran on both sides.
    pub fn report(&self, alpha: f64) -> Value {
        let (p, c) = (&self.primary, &self.candidate);
        let error_rate = significance(
            two_proportion(p.errors, p.samples, c.errors, c.samples).map(|(_, pv)| pv),
            alpha,
            TWO_PROPORTION_TEST,
        );
        let mut eval_fail_rate = Map::new();
        for (name, &(pf, pn)) in &p.evaluators {
            if let Some(&(cf, cn)) = c.evaluators.get(name) {
                let pv = two_proportion(pf, pn, cf, cn).map(|(_, pv)| pv);
                eval_fail_rate.insert(name.clone(), significance(pv, alpha, TWO_PROPORTION_TEST));
            }
        }
        let latency =
            significance(mann_whitney(&p.sorted_latencies(), &c.sorted_latencies()), alpha, MANN_WHITNEY_TEST);
        json!({
            "pairs": self.pairs,
            "primary": p.summary(),
            "candidate": c.summary(),
            "significance": {"error_rate": error_rate, "eval_fail_rate": eval_fail_rate, "latency": latency},
            "alpha": alpha,
        })
    }
}

fn significance(p_value: Option<f64>, alpha: f64, test: &str) -> Value {
    json!({"p_value": p_value, "significant": p_value.is_some_and(|p| p < alpha), "test": test})
}

/// Two-proportion z-test with pooled variance: x1 of n1 against x2 of n2. Returns (z, two-sided p),
/// z positive when rate 1 is the greater. `None` when undefined: an empty group, a count above its
/// total, or a pooled rate of 0 or 1 (no variance).
pub fn two_proportion(x1: u64, n1: u64, x2: u64, n2: u64) -> Option<(f64, f64)> {
    if n1 == 0 || n2 == 0 || x1 > n1 || x2 > n2 || x1 + x2 == 0 || x1 + x2 == n1 + n2 {
        return None;
    }
    let (x1, n1, x2, n2) = (x1 as f64, n1 as f64, x2 as f64, n2 as f64);
    let pooled = (x1 + x2) / (n1 + n2);
    let se = (pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)).sqrt();
    let z = (x1 / n1 - x2 / n2) / se;
    // From the lower tail, not 1 - cdf: tiny p-values keep their digits.
    Some((z, (2.0 * normal_cdf(-z.abs())).min(1.0)))
}

/// One-sided p-value of the same test for "rate 1 is greater than rate 2".
pub fn one_sided_greater(x1: u64, n1: u64, x2: u64, n2: u64) -> Option<f64> {
    two_proportion(x1, n1, x2, n2).map(|(z, _)| normal_cdf(-z))
}

/// Mann-Whitney U test, two-sided p-value by the normal approximation with tie correction and a
/// continuity correction of 0.5 (as scipy's `mannwhitneyu(method="asymptotic")` by default).
/// NaNs are ignored. `None` when either sample is empty or all values tie.
pub fn mann_whitney(a: &[f64], b: &[f64]) -> Option<f64> {
    let mut all: Vec<(f64, bool)> =
        a.iter().map(|&v| (v, true)).chain(b.iter().map(|&v| (v, false))).filter(|(v, _)| !v.is_nan()).collect();
    let n1 = all.iter().filter(|(_, in_a)| *in_a).count() as f64;
    let n2 = all.len() as f64 - n1;
    if n1 == 0.0 || n2 == 0.0 {
        return None;
    }
    all.sort_unstable_by(|x, y| x.0.total_cmp(&y.0));
    if all[0].0 == all[all.len() - 1].0 {
        return None;
    }
    let n = all.len() as f64;
    let mut rank_sum_a = 0.0;
    let mut tie_term = 0.0;
    let mut start = 0;
    while start < all.len() {
        let end = start + all[start..].iter().take_while(|(v, _)| *v == all[start].0).count();
        // Ranks start+1 ..= end share their mean.
        let mean_rank = (start + 1 + end) as f64 / 2.0;
        rank_sum_a += mean_rank * all[start..end].iter().filter(|(_, in_a)| *in_a).count() as f64;
        let t = (end - start) as f64;
        tie_term += t * t * t - t;
        start = end;
    }
    let u = rank_sum_a - n1 * (n1 + 1.0) / 2.0;
    let variance = n1 * n2 / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0)));
    if variance <= 0.0 {
        return None;
    }
    let z = ((u - n1 * n2 / 2.0).abs() - 0.5).max(0.0) / variance.sqrt();
    Some((2.0 * normal_cdf(-z)).min(1.0))
}

/// Standard normal CDF: absolute error about 1e-16, relative error below 1e-8 in the lower tail
/// (what small p-values are made of), exactly 0.5 at 0.
///
/// Hart's double-precision rational approximation (1968) as given by G. West, "Better
/// approximations to cumulative normal functions" (Wilmott, 2005), with a continued fraction
/// beyond |z| = 5 sqrt(2).
pub fn normal_cdf(z: f64) -> f64 {
    if z.is_nan() {
        return f64::NAN;
    }
    let x = z.abs();
    // The lower tail at -|z|, computed directly so that it keeps its digits.
    let tail = if x > 37.0 {
        0.0
    } else if x < 7.071_067_811_865_47 {
        let num = horner(
            x,
            &[
                0.035_262_496_599_891_1,
                0.700_383_064_443_688,
                6.373_962_203_531_65,
                33.912_866_078_383,
                112.079_291_497_871,
                221.213_596_169_931,
                220.206_867_912_376,
            ],
        );
        let den = horner(
            x,
            &[
                0.088_388_347_648_318_4,
                1.755_667_163_182_64,
                16.064_177_579_207,
                86.780_732_202_946_1,
                296.564_248_779_674,
                637.333_633_378_831,
                793.826_512_519_948,
                440.413_735_824_752,
            ],
        );
        (-x * x / 2.0).exp() * num / den
    } else {
        let fraction = x + 1.0 / (x + 2.0 / (x + 3.0 / (x + 4.0 / (x + 0.65))));
        (-x * x / 2.0).exp() / fraction / 2.506_628_274_631
    };
    if z > 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// A polynomial with its coefficients from the highest degree down.
fn horner(x: f64, coefficients: &[f64]) -> f64 {
    coefficients.iter().fold(0.0, |acc, c| acc * x + c)
}

/// Canary guard settings (issue 5 contract, `canary = {...}` in a route) and the test level.
#[derive(Debug, Clone, PartialEq)]
pub struct Guard {
    /// Samples both sides need before any verdict.
    pub min_samples: u64,
    /// Tolerated rise of the any-evaluator-failure rate, absolute (0.05 = five points).
    pub max_eval_fail_increase: f64,
    /// Tolerated rise of the error rate, absolute.
    pub max_error_increase: f64,
    /// Tolerated canary p99 / primary p99.
    pub max_p99_ratio: f64,
    /// Significance level of the tests.
    pub alpha: f64,
}

impl Default for Guard {
    /// The contract's defaults.
    fn default() -> Self {
        Guard {
            min_samples: 50,
            max_eval_fail_increase: 0.05,
            max_error_increase: 0.05,
            max_p99_ratio: 1.5,
            alpha: 0.05,
        }
    }
}

/// `Some(reason)` when the canary must be rolled back. Nothing is decided until both sides have
/// `min_samples`; then any of these rolls back (every rule that holds is in the reason, `; `-joined):
/// - the canary's any-eval-fail rate exceeds the primary's by more than `max_eval_fail_increase`
///   and the one-sided two-proportion z-test gives p < `alpha`;
/// - the same for the error rate and `max_error_increase`;
/// - the canary's p99 exceeds the primary's times `max_p99_ratio`, its median is above the
///   primary's, and the Mann-Whitney U test gives p < `alpha`.
///
/// A margin alone is not enough: at small samples a few unlucky requests would roll a good
/// candidate back. Significance alone is not enough either: with many samples a negligible
/// difference is significant.
pub fn canary_verdict(primary: &Side, canary: &Side, guard: &Guard) -> Option<String> {
    if primary.samples < guard.min_samples || canary.samples < guard.min_samples {
        return None;
    }
    let reasons: Vec<String> = [
        rate_rule(
            "eval-fail rate",
            (canary.any_eval_failed, canary.evaluated),
            (primary.any_eval_failed, primary.evaluated),
            guard.max_eval_fail_increase,
            guard.alpha,
        ),
        rate_rule(
            "error rate",
            (canary.errors, canary.samples),
            (primary.errors, primary.samples),
            guard.max_error_increase,
            guard.alpha,
        ),
        latency_rule(primary, canary, guard),
    ]
    .into_iter()
    .flatten()
    .collect();
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

fn rate_rule(what: &str, canary: (u64, u64), primary: (u64, u64), margin: f64, alpha: f64) -> Option<String> {
    let ((cx, cn), (px, pn)) = (canary, primary);
    let (cr, pr) = (ratio(cx, cn)?, ratio(px, pn)?);
    if cr <= pr + margin {
        return None;
    }
    let p = one_sided_greater(cx, cn, px, pn)?;
    (p < alpha).then(|| {
        format!(
            "{what} {cr:.2} ({cx}/{cn}) vs primary {pr:.2} ({px}/{pn}), {:+.2} > {margin:+.2}, \
             one-sided two-proportion z-test p={}",
            cr - pr,
            format_p(p)
        )
    })
}

fn latency_rule(primary: &Side, canary: &Side, guard: &Guard) -> Option<String> {
    let (ps, cs) = (primary.sorted_latencies(), canary.sorted_latencies());
    let (pp99, cp99) = (nearest_rank(&ps, 99.0)?, nearest_rank(&cs, 99.0)?);
    if cp99 <= pp99 * guard.max_p99_ratio {
        return None;
    }
    let (pp50, cp50) = (nearest_rank(&ps, 50.0)?, nearest_rank(&cs, 50.0)?);
    if cp50 <= pp50 {
        // A slow tail on an otherwise faster candidate: the rank test would flag the wrong direction.
        return None;
    }
    let p = mann_whitney(&cs, &ps)?;
    (p < guard.alpha).then(|| {
        format!(
            "p99 latency {cp99:.0} ms vs primary {pp99:.0} ms, ratio {:.2} > {:.2} (median {cp50:.0} ms vs {pp50:.0} ms), \
             Mann-Whitney U p={}",
            cp99 / pp99,
            guard.max_p99_ratio,
            format_p(p)
        )
    })
}

/// Plain decimals where they read well, scientific notation for the tiny p-values of a clear regression.
fn format_p(p: f64) -> String {
    if p >= 1e-3 {
        format!("{p:.3}")
    } else {
        format!("{p:.1e}")
    }
}

fn ratio(x: u64, n: u64) -> Option<f64> {
    (n > 0).then(|| x as f64 / n as f64)
}

/// Nearest-rank percentile of an ascending slice: the smallest value with at least p% of the
/// values at or below it.
fn nearest_rank(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || !(p > 0.0 && p <= 100.0) {
        return None;
    }
    let n = sorted.len();
    // p * n first: exact for whole p, so 95% of 100 is rank 95, not 96 through 0.95's rounding.
    let rank = (p * n as f64 / 100.0).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: f64, expected: f64, tol: f64) {
        assert!((actual - expected).abs() <= tol, "expected {expected} ± {tol}, got {actual}");
    }

    fn ok(latency_ms: f64) -> Observation {
        Observation { latency_ms, images: 1, ..Default::default() }
    }

    fn failed() -> Observation {
        Observation { error: true, latency_ms: 5.0, ..Default::default() }
    }

    fn evaluated(name: &str, fail: bool) -> Observation {
        Observation { evals: vec![(name.to_string(), fail, if fail { 0.1 } else { 0.9 })], ..ok(100.0) }
    }

    /// A side of `n` successful requests, the first `eval_fails` failing the "sanity" evaluator.
    fn eval_side(n: u64, eval_fails: u64) -> Side {
        let mut side = Side::default();
        for i in 0..n {
            side.record(&evaluated("sanity", i < eval_fails));
        }
        side
    }

    fn error_side(n: u64, errors: u64) -> Side {
        let mut side = Side::default();
        for i in 0..n {
            side.record(&if i < errors { failed() } else { ok(100.0) });
        }
        side
    }

    fn latency_side(latencies: impl IntoIterator<Item = f64>) -> Side {
        let mut side = Side::default();
        for l in latencies {
            side.record(&ok(l));
        }
        side
    }

    // Expected values from Python's math.erfc: 0.5 * erfc(-z / sqrt(2)).
    #[test]
    fn normal_cdf_known_values() {
        assert_eq!(normal_cdf(0.0), 0.5);
        close(normal_cdf(1.96), 0.975_002_104_851_78, 1e-12);
        close(normal_cdf(-1.96), 0.024_997_895_148_22, 1e-12);
        close(normal_cdf(-3.0), 0.001_349_898_031_630_1, 1e-12);
        close(normal_cdf(6.0), 0.999_999_999_013_412, 1e-12);
        assert_eq!(normal_cdf(40.0), 1.0);
        assert_eq!(normal_cdf(-40.0), 0.0);
        assert!(normal_cdf(f64::NAN).is_nan());
        // The lower tail keeps its relative precision: what small p-values are made of.
        let tail = normal_cdf(-6.0);
        assert!((tail / 9.865_876_450_377e-10 - 1.0).abs() < 1e-8, "{tail}");
        let far = normal_cdf(-8.0);
        assert!((far / 6.220_960_574_271_8e-16 - 1.0).abs() < 1e-8, "{far}");
        for z in [-4.0, -1.0, -0.3, 0.7, 2.5] {
            close(normal_cdf(z) + normal_cdf(-z), 1.0, 1e-14);
        }
    }

    // Hand-computed: pooled p = 75/200 = 0.375, se = sqrt(0.375 * 0.625 * (1/100 + 1/100)) = 0.068465,
    // z = 0.15 / 0.068465 = 2.19089, two-sided p = 2 * (1 - Φ(2.19089)) = 0.028460.
    #[test]
    fn two_proportion_hand_computed() {
        let (z, p) = two_proportion(45, 100, 30, 100).unwrap();
        close(z, 2.190_890_230_020_665, 1e-9);
        close(p, 0.028_459_736_916_310_57, 1e-6);
        let (z_rev, p_rev) = two_proportion(30, 100, 45, 100).unwrap();
        close(z_rev, -z, 1e-12);
        close(p_rev, p, 1e-12);
        // Equal rates: z = 0, p = 1.
        let (z_eq, p_eq) = two_proportion(10, 100, 20, 200).unwrap();
        close(z_eq, 0.0, 1e-12);
        close(p_eq, 1.0, 1e-7);
    }

    #[test]
    fn two_proportion_undefined() {
        assert_eq!(two_proportion(0, 0, 1, 10), None);
        assert_eq!(two_proportion(1, 10, 0, 0), None);
        assert_eq!(two_proportion(0, 10, 0, 20), None, "both rates 0");
        assert_eq!(two_proportion(10, 10, 20, 20), None, "both rates 1");
        assert_eq!(two_proportion(11, 10, 1, 10), None, "count above total");
        assert!(two_proportion(0, 10, 10, 10).is_some(), "0 against 1 has pooled variance");
    }

    #[test]
    fn one_sided() {
        // Half the two-sided p in the direction of the difference, the rest in the other.
        close(one_sided_greater(45, 100, 30, 100).unwrap(), 0.014_229_868_458_155, 1e-6);
        close(one_sided_greater(30, 100, 45, 100).unwrap(), 1.0 - 0.014_229_868_458_155, 1e-6);
        assert_eq!(one_sided_greater(0, 10, 0, 10), None);
    }

    // a = 1..=10, b = 6..=15, by hand (scipy.stats.mannwhitneyu(a, b) semantics, asymptotic with
    // continuity correction): 6..=10 tie in pairs, mean ranks 6.5, 8.5, 10.5, 12.5, 14.5, so
    // R_a = 15 + 52.5 = 67.5 and U_a = 67.5 - 55 = 12.5 against a mean of 50; tie term 5 * (2^3 - 2) = 30,
    // sigma = sqrt(100 / 12 * (21 - 30 / 380)) = 13.203867, z = (37.5 - 0.5) / sigma = 2.802209,
    // p = 2 * (1 - Φ(z)) = 0.0050754.
    #[test]
    fn mann_whitney_known_example() {
        let a: Vec<f64> = (1..=10).map(f64::from).collect();
        let b: Vec<f64> = (6..=15).map(f64::from).collect();
        close(mann_whitney(&a, &b).unwrap(), 0.005_075_392_315_27, 1e-6);
        close(mann_whitney(&b, &a).unwrap(), 0.005_075_392_315_27, 1e-6);
    }

    #[test]
    fn mann_whitney_edges() {
        let a: Vec<f64> = (0..200).map(|i| f64::from(i % 37)).collect();
        close(mann_whitney(&a, &a).unwrap(), 1.0, 1e-12);
        let low: Vec<f64> = (0..1000).map(f64::from).collect();
        let high: Vec<f64> = (1000..2000).map(f64::from).collect();
        assert!(mann_whitney(&low, &high).unwrap() < 1e-12);
        assert_eq!(mann_whitney(&[3.0; 5], &[3.0; 7]), None, "all ties");
        assert_eq!(mann_whitney(&[], &[1.0, 2.0]), None);
        assert_eq!(mann_whitney(&[1.0, 2.0], &[]), None);
        assert_eq!(mann_whitney(&[f64::NAN], &[1.0, 2.0]), None, "NaN is ignored, leaving a empty");
        // One below the other, 1 each: U = 0, mean 0.5, sigma = sqrt(1/12 * 3) = 0.5, z = 0 after the
        // continuity correction: p = 1.
        close(mann_whitney(&[1.0], &[2.0]).unwrap(), 1.0, 1e-12);
    }

    #[test]
    fn side_percentiles() {
        let side = latency_side((1..=100).map(f64::from));
        assert_eq!(side.percentile_ms(50.0), Some(50.0));
        assert_eq!(side.percentile_ms(95.0), Some(95.0));
        assert_eq!(side.percentile_ms(99.0), Some(99.0));
        assert_eq!(side.percentile_ms(99.5), Some(100.0));
        assert_eq!(side.percentile_ms(100.0), Some(100.0));
        assert_eq!(side.percentile_ms(0.5), Some(1.0));
        assert_eq!(side.percentile_ms(0.0), None);
        assert_eq!(side.percentile_ms(100.1), None);
        assert_eq!(side.percentile_ms(f64::NAN), None);
        assert_eq!(Side::default().percentile_ms(50.0), None);
        // Insertion order does not matter.
        let shuffled = latency_side([30.0, 10.0, 20.0]);
        assert_eq!(shuffled.percentile_ms(50.0), Some(20.0));
    }

    #[test]
    fn side_keeps_the_latest_latencies() {
        let side = latency_side((1..=LATENCY_KEEP as u32 + 5).map(f64::from));
        assert_eq!(side.samples(), LATENCY_KEEP as u64 + 5);
        assert_eq!(side.latencies_ms.len(), LATENCY_KEEP);
        assert_eq!(side.percentile_ms(1e-9), Some(6.0), "the oldest five are gone");
        assert_eq!(side.percentile_ms(100.0), Some(LATENCY_KEEP as f64 + 5.0));
    }

    #[test]
    fn side_rates_adherence_cost() {
        let mut side = Side::default();
        let both = |sanity_fails: bool, adherence: f32| Observation {
            evals: vec![("sanity".into(), sanity_fails, 1.0), (ADHERENCE.into(), adherence < 0.5, adherence)],
            cost_usd: Some(0.08),
            images: 2,
            ..ok(200.0)
        };
        side.record(&both(false, 0.9)); // passes both
        side.record(&both(true, 0.7)); // fails sanity
        side.record(&both(true, 0.2)); // fails both
        side.record(&both(false, 0.4)); // fails adherence
        side.record(&ok(100.0)); // not evaluated, unpriced
        side.record(&Observation { cost_usd: Some(0.5), images: 0, ..failed() }); // charged for nothing
        side.record(&failed());

        assert_eq!(side.samples(), 7);
        assert_eq!(side.errors(), 2);
        assert_eq!(side.eval_failed(), (3, 4));
        let s = side.summary();
        close(s.error_rate, 2.0 / 7.0, 1e-12);
        close(s.eval_fail_rate["sanity"], 0.5, 1e-12);
        close(s.eval_fail_rate[ADHERENCE], 0.5, 1e-12);
        assert_eq!(s.eval_fail_rate.len(), 2);
        close(s.any_eval_fail_rate.unwrap(), 0.75, 1e-12);
        close(s.mean_adherence.unwrap(), (0.9 + 0.7 + 0.2 + 0.4) / 4.0, 1e-6);
        // 4 * 0.08 + 0.5 over 8 images: a failed but charged attempt raises the price per image.
        close(s.cost_per_image_usd.unwrap(), (4.0 * 0.08 + 0.5) / 8.0, 1e-12);
        // Failed attempts' latencies (5 ms) are not kept.
        assert_eq!(s.p50_ms, Some(200.0));
        assert_eq!(side.percentile_ms(1e-9), Some(100.0));
    }

    #[test]
    fn side_without_data() {
        let s = Side::default().summary();
        assert_eq!(
            s,
            SideSummary {
                samples: 0,
                errors: 0,
                error_rate: 0.0,
                p50_ms: None,
                p95_ms: None,
                p99_ms: None,
                eval_fail_rate: BTreeMap::new(),
                any_eval_fail_rate: None,
                mean_adherence: None,
                cost_per_image_usd: None,
            }
        );
        let mut errors_only = Side::default();
        // Evaluations reported on a failed attempt are ignored: there was no image.
        errors_only.record(&Observation { evals: vec![("sanity".into(), true, 0.0)], ..failed() });
        let s = errors_only.summary();
        assert_eq!((s.error_rate, s.any_eval_fail_rate, s.p50_ms), (1.0, None, None));
        assert!(s.eval_fail_rate.is_empty());
    }

    #[test]
    fn report_shape_and_nulls() {
        let empty = Comparison::default().report(0.05);
        assert_eq!(empty["pairs"], 0);
        assert_eq!(empty["alpha"], 0.05);
        for side in ["primary", "candidate"] {
            let s = &empty[side];
            assert_eq!(s["samples"], 0);
            assert_eq!(s["error_rate"], 0.0);
            for key in ["p50_ms", "p95_ms", "p99_ms", "any_eval_fail_rate", "mean_adherence", "cost_per_image_usd"] {
                assert!(s[key].is_null(), "{side}.{key} = {}", s[key]);
            }
            assert_eq!(s["eval_fail_rate"], json!({}));
        }
        let sig = &empty["significance"];
        assert_eq!(
            sig["error_rate"],
            json!({"p_value": null, "significant": false, "test": "two-proportion z-test (two-sided)"})
        );
        assert_eq!(
            sig["latency"],
            json!({"p_value": null, "significant": false, "test": "Mann-Whitney U (two-sided, normal approximation)"})
        );
        assert_eq!(sig["eval_fail_rate"], json!({}));
    }

    #[test]
    fn report_with_data() {
        let mut c = Comparison::default();
        for i in 0..100 {
            let primary = Observation {
                evals: vec![("sanity".into(), i < 2, 1.0), ("nsfw".into(), false, 1.0)],
                ..ok(100.0 + f64::from(i))
            };
            let candidate = if i < 30 {
                failed()
            } else {
                Observation { evals: vec![("sanity".into(), i < 45, 1.0)], ..ok(300.0 + f64::from(i)) }
            };
            c.record(Some(&primary), Some(&candidate));
        }
        c.record(Some(&ok(150.0)), None);
        c.record(None, Some(&ok(400.0)));
        let r = c.report(0.01);
        assert_eq!(r["pairs"], 100);
        assert_eq!(r["primary"]["samples"], 101);
        assert_eq!(r["candidate"]["samples"], 101);
        assert_eq!(r["candidate"]["errors"], 30);
        assert_eq!(r["alpha"], 0.01);
        let sig = &r["significance"];
        assert_eq!(sig["error_rate"]["significant"], true);
        assert!(sig["error_rate"]["p_value"].as_f64().unwrap() < 0.01);
        assert_eq!(sig["latency"]["significant"], true);
        // nsfw ran on the primary only: no test.
        let evals = sig["eval_fail_rate"].as_object().unwrap();
        assert_eq!(evals.keys().collect::<Vec<_>>(), ["sanity"]);
        // 2/100 vs 15/70.
        let expected = two_proportion(2, 100, 15, 70).unwrap().1;
        close(evals["sanity"]["p_value"].as_f64().unwrap(), expected, 1e-12);
        assert_eq!(evals["sanity"]["significant"], true);
        assert_eq!(evals["sanity"]["test"], TWO_PROPORTION_TEST);
        assert_eq!(r["primary"]["eval_fail_rate"], json!({"nsfw": 0.0, "sanity": 0.02}));
        // Same data at a stricter level than its p-value: not significant.
        let strict = c.report(expected / 2.0);
        assert_eq!(strict["significance"]["eval_fail_rate"]["sanity"]["significant"], false);
    }

    fn guard(min_samples: u64) -> Guard {
        Guard { min_samples, ..Guard::default() }
    }

    #[test]
    fn canary_waits_for_min_samples() {
        // Every canary request fails evaluation and errors are frequent, but 49 < 50 samples.
        let primary = eval_side(500, 0);
        let canary = eval_side(49, 49);
        assert_eq!(canary_verdict(&primary, &canary, &guard(50)), None);
        assert_eq!(canary_verdict(&eval_side(49, 0), &eval_side(500, 500), &guard(50)), None, "primary short");
        assert!(canary_verdict(&primary, &eval_side(50, 50), &guard(50)).is_some(), "at the minimum it decides");
    }

    #[test]
    fn canary_rolled_back_on_eval_fail_rate() {
        let primary = eval_side(150, 3);
        let canary = eval_side(50, 21);
        let reason = canary_verdict(&primary, &canary, &guard(50)).expect("clearly worse");
        assert!(
            reason.starts_with("eval-fail rate 0.42 (21/50) vs primary 0.02 (3/150), +0.40 > +0.05, one-sided two-proportion z-test p="),
            "{reason}"
        );
        assert!(!reason.contains("error rate") && !reason.contains("p99"), "{reason}");
    }

    #[test]
    fn canary_within_margin_is_kept() {
        // 0.06 vs 0.02: significant (p ≈ 0.02) but only four points worse, within the five allowed.
        let (primary, canary) = (eval_side(200, 4), eval_side(200, 12));
        assert!(one_sided_greater(12, 200, 4, 200).unwrap() < 0.05);
        assert_eq!(canary_verdict(&primary, &canary, &guard(50)), None);
        // The same margin at a stricter guard rolls it back: the margin is what kept it.
        let tight = Guard { max_eval_fail_increase: 0.03, ..guard(50) };
        assert!(canary_verdict(&primary, &canary, &tight).is_some());
    }

    #[test]
    fn canary_worse_but_not_significant_is_kept() {
        // 2/10 vs 0/10: twenty points worse, but ten samples each prove nothing (p ≈ 0.07).
        let (primary, canary) = (eval_side(10, 0), eval_side(10, 2));
        let p = one_sided_greater(2, 10, 0, 10).unwrap();
        assert!(p > 0.05 && p < 0.1, "{p}");
        assert_eq!(canary_verdict(&primary, &canary, &guard(10)), None);
        assert_eq!(canary_verdict(&error_side(10, 0), &error_side(10, 2), &guard(10)), None);
        // Ten times the samples with the same rates is significant.
        assert!(canary_verdict(&eval_side(100, 0), &eval_side(100, 20), &guard(10)).is_some());
    }

    #[test]
    fn canary_rolled_back_on_error_rate() {
        let reason = canary_verdict(&error_side(150, 2), &error_side(50, 15), &guard(50)).expect("worse errors");
        assert!(reason.starts_with("error rate 0.30 (15/50) vs primary 0.01 (2/150), +0.29 > +0.05"), "{reason}");
        assert_eq!(canary_verdict(&error_side(150, 2), &error_side(50, 2), &guard(50)), None);
    }

    #[test]
    fn canary_p99_rule() {
        let primary = latency_side((0..200).map(|i| 1000.0 + f64::from(i)));
        // Slower throughout: p99 ~2.3x, median higher, rank test decisive.
        let slow = latency_side((0..60).map(|i| 2000.0 + 5.0 * f64::from(i)));
        let reason = canary_verdict(&primary, &slow, &guard(50)).expect("slower canary");
        assert!(reason.starts_with("p99 latency 2295 ms vs primary 1197 ms, ratio 1.92 > 1.50"), "{reason}");
        assert!(reason.contains("Mann-Whitney U p="), "{reason}");
        // Within the ratio: kept.
        let bit_slower = latency_side((0..60).map(|i| 1100.0 + 5.0 * f64::from(i)));
        assert_eq!(canary_verdict(&primary, &bit_slower, &guard(50)), None);
        // A slow tail on a faster median: the p99 alone does not roll back.
        let tail = latency_side((0..60).map(|i| if i < 3 { 9000.0 } else { 500.0 }));
        assert!(tail.percentile_ms(99.0).unwrap() > 1.5 * primary.percentile_ms(99.0).unwrap());
        assert_eq!(canary_verdict(&primary, &tail, &guard(50)), None);
        // A slower median and tail that the rank test cannot tell apart: kept.
        let overlap = latency_side((0..60).map(|i| if i < 2 { 5000.0 } else { 1000.0 + 200.0 * f64::from(i % 2) }));
        assert!(overlap.percentile_ms(50.0).unwrap() > primary.percentile_ms(50.0).unwrap());
        assert!(mann_whitney(&overlap.sorted_latencies(), &primary.sorted_latencies()).unwrap() >= 0.05);
        assert_eq!(canary_verdict(&primary, &overlap, &guard(50)), None);
    }

    #[test]
    fn canary_reports_every_broken_rule() {
        let mut primary = Side::default();
        let mut canary = Side::default();
        for i in 0..100 {
            primary.record(&Observation { latency_ms: 100.0 + f64::from(i), ..evaluated("sanity", false) });
            canary.record(&if i < 40 {
                failed()
            } else {
                Observation { latency_ms: 900.0 + f64::from(i), ..evaluated("sanity", i < 70) }
            });
        }
        let reason = canary_verdict(&primary, &canary, &guard(50)).unwrap();
        let parts: Vec<&str> = reason.split("; ").collect();
        assert_eq!(parts.len(), 3, "{reason}");
        assert!(parts[0].starts_with("eval-fail rate 0.50 (30/60)"), "{reason}");
        assert!(parts[1].starts_with("error rate 0.40 (40/100)"), "{reason}");
        assert!(parts[2].starts_with("p99 latency"), "{reason}");
    }
}
