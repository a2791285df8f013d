//! `acc gate`: the release gate. Reads each cohort's eval-fail rate, thumbs-down rate and
//! regeneration rate over a window, from Prometheus or from the trace store, compares them with
//! the thresholds asked for, and answers pass (exit 0), fail (exit 1) or cannot decide (exit 2).
//!
//! # Signals
//! | signal | figure | samples | cohort labels |
//! |---|---|---|---|
//! | `eval_fail_rate` | failed evaluator verdicts / all verdicts (`acc_cohort_eval_total`, `verdict="fail"` over `pass`, `fail`, `error`) | verdicts | route, cohort, template, asset_type |
//! | `thumbs_down_rate` | down ratings / all ratings (`acc_feedback_total`, `rating="down"` over `up`, `down`, `neutral`) | ratings | route, cohort, template, asset_type |
//! | `regeneration_rate` | regenerations / requests (`acc_regenerations_total` over `acc_cohort_requests_total`) | requests | route, cohort |
//!
//! The PromQL of each signal ([`Signal::ratio_promql`], [`Signal::samples_promql`]) is the
//! one text the recording rules (`deploy/prometheus/acc-recording-rules.yml`, with `[5m]`), the
//! Argo Rollouts `AnalysisTemplate` and the Flagger `MetricTemplate` (`deploy/kubernetes/`)
//! use; `tests/gate.rs` checks that those files hold it. Filters are applied to the answer's
//! labels here, so the expression sent is exactly that text with the window filled in.
//!
//! # Verdict ([`decide`])
//! A row is one signal of one cohort. A row with `samples >= min_samples` is *decided*: it
//! fails when its figure is above the threshold (`>`; equal passes). Exit 1 when any decided
//! row fails; otherwise exit 2 when some signal asked for has no decided row (too few samples,
//! no data, or no `feedback` table in the store); otherwise exit 0. Sources that cannot be
//! reached, queries Prometheus refuses and bad arguments exit 2 before any row is read.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::store::{StoreConfig, TraceDb};

/// Exit code: every decided cohort is within its thresholds.
pub const EXIT_PASS: u8 = 0;
/// Exit code: some cohort with enough samples crosses a threshold.
pub const EXIT_FAIL: u8 = 1;
/// Exit code: cannot decide (too few samples, source unreachable, bad query or arguments).
pub const EXIT_UNDECIDED: u8 = 2;

/// Label value the metrics give an absent cohort field; the store reads absent fields as it.
pub const NONE_LABEL: &str = "none";

/// Why the gate cannot run. Every variant means exit 2.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// An argument is missing, out of range or contradicts another.
    #[error("{0}")]
    Args(String),
    /// The source cannot be reached or answered with something unusable.
    #[error("{0}")]
    Source(String),
}

/// One of the gate's signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    EvalFailRate,
    ThumbsDownRate,
    RegenerationRate,
}

const COHORT_LABELS: &[&str] = &["route", "cohort", "template", "asset_type"];
const ROUTE_COHORT_LABELS: &[&str] = &["route", "cohort"];

impl Signal {
    /// All signals, in the order they are printed.
    pub const ALL: [Signal; 3] = [Signal::EvalFailRate, Signal::ThumbsDownRate, Signal::RegenerationRate];

    /// `eval_fail_rate`, `thumbs_down_rate`, `regeneration_rate`.
    pub fn name(self) -> &'static str {
        match self {
            Signal::EvalFailRate => "eval_fail_rate",
            Signal::ThumbsDownRate => "thumbs_down_rate",
            Signal::RegenerationRate => "regeneration_rate",
        }
    }

    /// The command-line flag of its threshold.
    pub fn flag(self) -> &'static str {
        match self {
            Signal::EvalFailRate => "--max-eval-fail-rate",
            Signal::ThumbsDownRate => "--max-thumbs-down-rate",
            Signal::RegenerationRate => "--max-regeneration-rate",
        }
    }

    /// The recording rule (`deploy/prometheus/acc-recording-rules.yml`) that records
    /// [`Signal::ratio_promql`] over 5 minutes.
    pub fn recording_rule(self) -> &'static str {
        match self {
            Signal::EvalFailRate => "route_cohort:acc_cohort_eval_fail:ratio_rate5m",
            Signal::ThumbsDownRate => "route_cohort:acc_feedback_down:ratio_rate5m",
            Signal::RegenerationRate => "route_cohort:acc_regenerations_per_request:ratio_rate5m",
        }
    }

    /// The labels a row of this signal is keyed by (the metrics' cohort labels;
    /// `acc_regenerations_total` has no template or asset type).
    pub fn labels(self) -> &'static [&'static str] {
        match self {
            Signal::EvalFailRate | Signal::ThumbsDownRate => COHORT_LABELS,
            Signal::RegenerationRate => ROUTE_COHORT_LABELS,
        }
    }

    /// What its samples count.
    pub fn sample_unit(self) -> &'static str {
        match self {
            Signal::EvalFailRate => "verdicts",
            Signal::ThumbsDownRate => "ratings",
            Signal::RegenerationRate => "requests",
        }
    }

    /// (numerator selector, denominator selector) of the ratio.
    fn selectors(self) -> (&'static str, &'static str) {
        match self {
            Signal::EvalFailRate => ("acc_cohort_eval_total{verdict=\"fail\"}", "acc_cohort_eval_total"),
            Signal::ThumbsDownRate => ("acc_feedback_total{rating=\"down\"}", "acc_feedback_total"),
            Signal::RegenerationRate => ("acc_regenerations_total", "acc_cohort_requests_total"),
        }
    }

    /// The signal's figure per cohort over `window` (a PromQL duration such as `5m`, or a
    /// template placeholder such as `{{args.window}}`): numerator rate over denominator rate;
    /// 0, not absent, for a cohort with a denominator and no numerator.
    pub fn ratio_promql(self, window: &str) -> String {
        let by = self.labels().join(", ");
        let (num, den) = self.selectors();
        format!(
            "(\n  sum by ({by}) (rate({num}[{window}]))\n    or\n  0 * sum by ({by}) (rate({den}[{window}]))\n)\n  /\nsum by ({by}) (rate({den}[{window}]))"
        )
    }

    /// The signal's sample count per cohort over `window`: the denominator's increase
    /// (extrapolated by Prometheus, so it may be fractional).
    pub fn samples_promql(self, window: &str) -> String {
        let by = self.labels().join(", ");
        let (_, den) = self.selectors();
        format!("sum by ({by}) (increase({den}[{window}]))")
    }
}

/// The largest whole unit PromQL accepts for `d` (`90s`, `30m`, `6h`, `1d`).
pub fn promql_duration(d: Duration) -> String {
    let s = d.as_secs();
    for (unit, n) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if s.is_multiple_of(n) {
            return format!("{}{unit}", s / n);
        }
    }
    format!("{s}s")
}

/// The longest window accepted (Prometheus keeps 15 days by default; the store may keep more).
pub const MAX_WINDOW: Duration = Duration::from_secs(90 * 86_400);

/// Parses `--since`: a duration in humantime's syntax (`30m`, `6h`, `1d`, `1h30m`), whole
/// seconds, from 1 minute to 90 days. Errors: [`GateError::Args`] naming the value.
pub fn parse_window(s: &str) -> Result<Duration, GateError> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| GateError::Args(format!("--since {s:?}: not a duration ({e}); use e.g. 30m, 6h or 1d")))?;
    if d.subsec_nanos() != 0 {
        return Err(GateError::Args(format!("--since {s:?}: use whole seconds")));
    }
    if d < Duration::from_secs(60) || d > MAX_WINDOW {
        return Err(GateError::Args(format!("--since {s:?}: the window must be from 1m to 90d")));
    }
    Ok(d)
}

/// The filters: a row is kept only when each given filter equals its label.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Filters {
    /// `--route`: the matched route's name.
    pub route: Option<String>,
    /// `--cohort`: the `cohort` label (`x-acc-cohort`; `other`/`none` in Prometheus).
    pub cohort: Option<String>,
    /// `--template`: the prompt template, `name@version`.
    pub template: Option<String>,
    /// `--asset-type`.
    pub asset_type: Option<String>,
    /// Only with `--store`: records with an attempt on this provider, ratings of images it
    /// made. No gate metric in Prometheus has a provider label.
    pub provider: Option<String>,
}

impl Filters {
    fn by_label(&self) -> [(&'static str, Option<&str>); 4] {
        [
            ("route", self.route.as_deref()),
            ("cohort", self.cohort.as_deref()),
            ("template", self.template.as_deref()),
            ("asset_type", self.asset_type.as_deref()),
        ]
    }

    /// Whether `labels` (a row's key) passes the filters on the labels it has.
    fn keeps(&self, labels: &BTreeMap<String, String>) -> bool {
        self.by_label().iter().all(|(k, want)| match (want, labels.get(*k)) {
            (Some(w), Some(v)) => w == v,
            _ => true,
        })
    }
}

/// Where the figures come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Prometheus' HTTP API base URL (`http://host:9090`, or with a path prefix).
    Prometheus(String),
    /// The trace store: a SQLite file path or a `postgres://` URL.
    Store(String),
}

/// The gate's arguments as given on the command line, before validation.
#[derive(Debug, Clone, Default)]
pub struct RawArgs {
    /// `--prometheus`: Prometheus' base URL.
    pub prometheus: Option<String>,
    /// `--store`: a SQLite file or a `postgres://` URL.
    pub store: Option<String>,
    /// `--max-eval-fail-rate`, `--max-thumbs-down-rate`, `--max-regeneration-rate`: fractions.
    pub max_eval_fail_rate: Option<f64>,
    pub max_thumbs_down_rate: Option<f64>,
    pub max_regeneration_rate: Option<f64>,
    /// `--min-samples`: per cohort, per signal.
    pub min_samples: u64,
    /// `--since`: the window, e.g. `30m`.
    pub since: String,
    pub filters: Filters,
}

/// Validated arguments.
#[derive(Debug, Clone)]
pub struct Gate {
    /// Where the figures come from.
    pub source: Source,
    /// The thresholds asked for, by signal (fractions in [0, 1]).
    pub thresholds: BTreeMap<Signal, f64>,
    /// Samples a row needs to be decided (at least 1).
    pub min_samples: u64,
    /// The window, ending now.
    pub window: Duration,
    /// Which cohorts are judged.
    pub filters: Filters,
}

impl RawArgs {
    /// Checks the arguments: exactly one source; at least one threshold, each a number in
    /// [0, 1]; `min_samples` at least 1; the window ([`parse_window`]); `--provider` only with
    /// `--store`; `--template`/`--asset-type` not with a Prometheus regeneration threshold
    /// (`acc_regenerations_total` has neither label). Errors: [`GateError::Args`].
    pub fn validate(self) -> Result<Gate, GateError> {
        let source = match (self.prometheus, self.store) {
            (Some(p), None) => {
                if !(p.starts_with("http://") || p.starts_with("https://")) {
                    let p = crate::store::mask_url(&p);
                    return Err(GateError::Args(format!("--prometheus {p:?}: expected an http:// or https:// URL")));
                }
                Source::Prometheus(p)
            }
            (None, Some(s)) if !s.trim().is_empty() => Source::Store(s),
            (None, Some(_)) => return Err(GateError::Args("--store: empty path".into())),
            (Some(_), Some(_)) => return Err(GateError::Args("give --prometheus or --store, not both".into())),
            (None, None) => return Err(GateError::Args("give a source: --prometheus URL or --store PATH|URL".into())),
        };
        let mut thresholds = BTreeMap::new();
        for (signal, v) in [
            (Signal::EvalFailRate, self.max_eval_fail_rate),
            (Signal::ThumbsDownRate, self.max_thumbs_down_rate),
            (Signal::RegenerationRate, self.max_regeneration_rate),
        ] {
            if let Some(v) = v {
                if !(0.0..=1.0).contains(&v) {
                    return Err(GateError::Args(format!("{} {v}: must be a fraction from 0 to 1", signal.flag())));
                }
                thresholds.insert(signal, v);
            }
        }
        if thresholds.is_empty() {
            return Err(GateError::Args(
                "give at least one threshold: --max-eval-fail-rate, --max-thumbs-down-rate or --max-regeneration-rate"
                    .into(),
            ));
        }
        if self.min_samples == 0 {
            return Err(GateError::Args("--min-samples must be at least 1".into()));
        }
        let window = parse_window(&self.since)?;
        if let Source::Prometheus(_) = source {
            if self.filters.provider.is_some() {
                return Err(GateError::Args(
                    "--provider works only with --store: the cohort metrics in Prometheus have no provider label"
                        .into(),
                ));
            }
            if thresholds.contains_key(&Signal::RegenerationRate)
                && (self.filters.template.is_some() || self.filters.asset_type.is_some())
            {
                return Err(GateError::Args(
                    "--template and --asset-type cannot filter --max-regeneration-rate with --prometheus: \
                     acc_regenerations_total has only route and cohort labels (use --store)"
                        .into(),
                ));
            }
        }
        Ok(Gate { source, thresholds, min_samples: self.min_samples, window, filters: self.filters })
    }
}

/// One signal of one cohort: its figure and sample count.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub signal: Signal,
    /// The cohort's labels ([`Signal::labels`]).
    pub labels: BTreeMap<String, String>,
    /// The figure, in [0, 1]; `None` when there was nothing to divide by.
    pub value: Option<f64>,
    /// Verdicts, ratings or requests ([`Signal::sample_unit`]) in the window; from Prometheus
    /// an extrapolated `increase()`, so possibly fractional.
    pub samples: f64,
}

/// A row against its threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Judged {
    #[serde(flatten)]
    pub row: Row,
    /// The threshold it was judged against.
    pub max: f64,
    /// `pass`, `fail` or `too_few_samples`.
    pub verdict: &'static str,
}

/// The gate's answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// `pass`, `fail` or `undecided`.
    pub verdict: &'static str,
    /// [`EXIT_PASS`], [`EXIT_FAIL`] or [`EXIT_UNDECIDED`].
    pub exit_code: u8,
    /// Every row of a signal asked for that the filters keep, by signal then cohort.
    pub rows: Vec<Judged>,
    /// Why: the failing cohorts, or the signals without a decided row.
    pub reasons: Vec<String>,
}

/// A cohort's labels as `route=a cohort=b ...`.
pub fn cohort_name(labels: &BTreeMap<String, String>, signal: Signal) -> String {
    signal
        .labels()
        .iter()
        .map(|k| format!("{k}={}", labels.get(*k).map_or("", String::as_str)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The verdict over `rows` (see the module's "Verdict"). `missing` lists signals whose source
/// does not exist (the store without a `feedback` table), with the reason.
pub fn decide(gate: &Gate, rows: Vec<Row>, missing: &[(Signal, String)]) -> Report {
    let mut judged = Vec::new();
    let mut failing = Vec::new();
    for row in rows {
        let Some(&max) = gate.thresholds.get(&row.signal) else { continue };
        if !gate.filters.keeps(&row.labels) {
            continue;
        }
        // A rate is a fraction: a source answering NaN, an infinity or a value outside [0, 1]
        // (or a sample count that is no count) decides nothing.
        let valid = row.samples.is_finite() && row.value.is_none_or(|v| v.is_finite() && (0.0..=1.0).contains(&v));
        let verdict = if !valid {
            "invalid_value"
        } else if row.samples < gate.min_samples as f64 {
            "too_few_samples"
        } else if row.value.is_some_and(|v| v > max) {
            "fail"
        } else {
            "pass"
        };
        if verdict == "fail" {
            failing.push(format!(
                "{} {:.4} > {} for {} ({:.0} {})",
                row.signal.name(),
                row.value.unwrap_or(f64::NAN),
                max,
                cohort_name(&row.labels, row.signal),
                row.samples,
                row.signal.sample_unit()
            ));
        }
        judged.push(Judged { row, max, verdict });
    }
    judged.sort_by(|a, b| (a.row.signal, &a.row.labels).cmp(&(b.row.signal, &b.row.labels)));
    if !failing.is_empty() {
        return Report { verdict: "fail", exit_code: EXIT_FAIL, rows: judged, reasons: failing };
    }
    let mut undecided = Vec::new();
    for &signal in gate.thresholds.keys() {
        if let Some((_, why)) = missing.iter().find(|(s, _)| *s == signal) {
            undecided.push(format!("{}: {why}", signal.name()));
        } else if !judged.iter().any(|j| j.row.signal == signal && matches!(j.verdict, "pass" | "fail")) {
            undecided.push(format!(
                "{}: no cohort has {} {} or more in the window",
                signal.name(),
                gate.min_samples,
                signal.sample_unit()
            ));
        }
    }
    if !undecided.is_empty() {
        return Report { verdict: "undecided", exit_code: EXIT_UNDECIDED, rows: judged, reasons: undecided };
    }
    Report { verdict: "pass", exit_code: EXIT_PASS, rows: judged, reasons: Vec::new() }
}

/// The report as a table, one line per row, then the verdict and its reasons.
pub fn render_table(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<18}  {:<16}  {:<12}  {:<16}  {:<12}  {:>8}  {:>9}  {:>6}  VERDICT",
        "SIGNAL", "ROUTE", "COHORT", "TEMPLATE", "ASSET_TYPE", "VALUE", "SAMPLES", "MAX"
    );
    for j in &report.rows {
        let l = |k: &str| j.row.labels.get(k).cloned().unwrap_or_else(|| "*".into());
        let value = j.row.value.map_or("-".to_string(), |v| format!("{v:.4}"));
        let _ = writeln!(
            out,
            "{:<18}  {:<16}  {:<12}  {:<16}  {:<12}  {:>8}  {:>9.0}  {:>6}  {}",
            j.row.signal.name(),
            l("route"),
            l("cohort"),
            l("template"),
            l("asset_type"),
            value,
            j.row.samples,
            j.max,
            j.verdict
        );
    }
    let head = match report.verdict {
        "pass" => "PASS",
        "fail" => "FAIL",
        _ => "UNDECIDED",
    };
    let _ = writeln!(out, "{head} (exit {})", report.exit_code);
    for r in &report.reasons {
        let _ = writeln!(out, "  {r}");
    }
    out
}

/// The report as JSON, with the arguments it was made with.
pub fn render_json(gate: &Gate, report: &Report) -> serde_json::Value {
    let thresholds: BTreeMap<&str, f64> = gate.thresholds.iter().map(|(s, v)| (s.name(), *v)).collect();
    let source = match &gate.source {
        Source::Prometheus(u) => serde_json::json!({"prometheus": crate::store::mask_url(u)}),
        Source::Store(s) => serde_json::json!({"store": crate::store::mask_url(s)}),
    };
    serde_json::json!({
        "verdict": report.verdict,
        "exit_code": report.exit_code,
        "source": source,
        "window": promql_duration(gate.window),
        "min_samples": gate.min_samples,
        "thresholds": thresholds,
        "filters": gate.filters,
        "rows": report.rows,
        "reasons": report.reasons,
    })
}

/// Reads the rows of every signal asked for from the gate's source, and decides.
/// Errors: [`GateError::Source`] when the source cannot be reached or read.
pub async fn run(gate: &Gate) -> Result<Report, GateError> {
    let (rows, missing) = match &gate.source {
        Source::Prometheus(url) => (prometheus_rows(gate, url).await?, Vec::new()),
        Source::Store(target) => store_rows(gate, target, now_unix_nano()).await?,
    };
    Ok(decide(gate, rows, &missing))
}

fn now_unix_nano() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

// ------------------------------------------------------------------------------- Prometheus

/// How long one query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Prometheus' base URL without its user info, the URL as shown (password masked), and the
/// HTTP basic `Authorization` value (RFC 7617) the user info gives, used as written (not
/// percent-decoded).
struct PromTarget {
    url: String,
    shown: String,
    authorization: Option<String>,
}

impl PromTarget {
    fn new(url: &str) -> PromTarget {
        use base64::Engine as _;
        let shown = crate::store::mask_url(url);
        if let Some(scheme_end) = url.find("://") {
            let rest = scheme_end + 3;
            let auth_end = url[rest..].find(['/', '?', '#']).map_or(url.len(), |i| rest + i);
            if let Some(at) = url[rest..auth_end].rfind('@') {
                let userinfo = &url[rest..rest + at];
                let clean = format!("{}{}", &url[..rest], &url[rest + at + 1..]);
                let token = base64::engine::general_purpose::STANDARD.encode(userinfo);
                return PromTarget { url: clean, shown, authorization: Some(format!("Basic {token}")) };
            }
        }
        PromTarget { url: url.to_string(), shown, authorization: None }
    }
}

/// One instant query (`GET /api/v1/query`) and its vector: (labels, value) per series.
async fn instant_query(target: &PromTarget, promql: &str) -> Result<Vec<(BTreeMap<String, String>, f64)>, GateError> {
    let base = target.shown.as_str();
    let query: String = form_urlencoded::Serializer::new(String::new()).append_pair("query", promql).finish();
    let url = format!("{}/api/v1/query?{query}", target.url.trim_end_matches('/'));
    let endpoint = crate::upstream::Endpoint::parse(&url)
        .map_err(|_| GateError::Args(format!("--prometheus {base}: not a valid http(s) URL")))?;
    let mut req = http::Request::get("/").header(http::header::ACCEPT, "application/json");
    if let Some(auth) = &target.authorization {
        req = req.header(http::header::AUTHORIZATION, auth);
    }
    let req = req.body(crate::body::ChunkedBody::default()).map_err(|e| GateError::Source(e.to_string()))?;
    let answer = tokio::time::timeout(QUERY_TIMEOUT, crate::upstream::send(&endpoint, req, 64 << 20))
        .await
        .map_err(|_| GateError::Source(format!("Prometheus at {base} did not answer within {QUERY_TIMEOUT:?}")))?
        .map_err(|e| GateError::Source(format!("cannot reach Prometheus at {base}: {e}")))?;
    let body: serde_json::Value = serde_json::from_slice(&answer.body.to_bytes()).map_err(|_| {
        GateError::Source(format!("Prometheus at {base} answered {} with a body that is not JSON", answer.status))
    })?;
    if body["status"] != "success" {
        return Err(GateError::Source(format!(
            "Prometheus at {base} refused the query ({} {}): {}",
            answer.status,
            body["errorType"].as_str().unwrap_or("?"),
            body["error"].as_str().unwrap_or("no error message")
        )));
    }
    if body["data"]["resultType"] != "vector" {
        return Err(GateError::Source(format!(
            "Prometheus at {base} answered a {} where a vector was expected",
            body["data"]["resultType"]
        )));
    }
    let mut out = Vec::new();
    for s in body["data"]["result"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let labels: BTreeMap<String, String> = s["metric"]
            .as_object()
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
            .unwrap_or_default();
        let value = s["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| GateError::Source(format!("Prometheus at {base} answered a sample without a value")))?;
        out.push((labels, value));
    }
    Ok(out)
}

/// A cohort's figure from Prometheus's answers: none when there was nothing to divide by (no
/// samples); otherwise the ratio as answered, NaN or an infinity included, and NaN when the
/// answer has no ratio for a cohort with samples, so that a broken source is judged
/// `invalid_value` by [`decide`], never a pass.
fn figure(ratio: Option<f64>, samples: f64) -> Option<f64> {
    if samples == 0.0 {
        None
    } else {
        Some(ratio.unwrap_or(f64::NAN))
    }
}

async fn prometheus_rows(gate: &Gate, url: &str) -> Result<Vec<Row>, GateError> {
    let base = &PromTarget::new(url);
    let window = promql_duration(gate.window);
    let mut rows = Vec::new();
    for &signal in gate.thresholds.keys() {
        let ratios: BTreeMap<_, _> = instant_query(base, &signal.ratio_promql(&window)).await?.into_iter().collect();
        for (labels, samples) in instant_query(base, &signal.samples_promql(&window)).await? {
            let value = figure(ratios.get(&labels).copied(), samples);
            rows.push(Row { signal, labels, value, samples });
        }
    }
    Ok(rows)
}

// ------------------------------------------------------------------------------------ store

/// Counts per cohort: (numerator, denominator).
type Tally = BTreeMap<BTreeMap<String, String>, (u64, u64)>;

fn key(signal: Signal, fields: [Option<&str>; 4]) -> BTreeMap<String, String> {
    signal
        .labels()
        .iter()
        .zip(fields)
        .map(|(k, v)| (k.to_string(), v.filter(|s| !s.is_empty()).unwrap_or(NONE_LABEL).to_string()))
        .collect()
}

fn tally_rows(signal: Signal, tally: Tally) -> impl Iterator<Item = Row> {
    tally.into_iter().map(move |(labels, (num, den))| Row {
        signal,
        labels,
        value: (den > 0).then(|| num as f64 / den as f64),
        samples: den as f64,
    })
}

/// The store `--store` names: a `postgres://` (or `postgresql://`) URL, else an existing SQLite
/// file (never created here). Errors: [`GateError::Source`] for a file that does not exist.
fn store_config(target: &str) -> Result<StoreConfig, GateError> {
    let mut cfg = StoreConfig::default();
    if target.starts_with("postgres://") || target.starts_with("postgresql://") {
        cfg.url = Some(target.to_string());
    } else {
        let path = std::path::Path::new(target);
        if !path.is_file() {
            return Err(GateError::Source(format!("--store {target}: no such file")));
        }
        // The header every SQLite database file starts with (sqlite.org/fileformat.html, 1.3;
        // an empty file is an empty database); another file would only fail after the pool's
        // connect timeout, saying nothing of why.
        let mut head = [0u8; 16];
        let empty = path.metadata().is_ok_and(|m| m.len() == 0);
        let read = std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head));
        if !empty && (read.is_err() || &head != b"SQLite format 3\0") {
            return Err(GateError::Source(format!("--store {target}: not a SQLite database file")));
        }
        cfg.path = path.to_path_buf();
    }
    Ok(cfg)
}

/// The rows from the trace store's records (and its `feedback` table) since `now - window`.
/// Cohort fields are grouped as recorded (an absent one as `none`; the metrics' `other` for
/// values outside the policy's `[cohorts]` lists does not apply).
async fn store_rows(
    gate: &Gate,
    target: &str,
    now_unix_nano: u64,
) -> Result<(Vec<Row>, Vec<(Signal, String)>), GateError> {
    let cfg = store_config(target)?;
    let db = TraceDb::open_read_only(&cfg).await.map_err(|e| GateError::Source(format!("--store: {e}")))?;
    let since = now_unix_nano.saturating_sub(u64::try_from(gate.window.as_nanos()).unwrap_or(u64::MAX));
    let want = |s: Signal| gate.thresholds.contains_key(&s);
    let provider = gate.filters.provider.as_deref();
    let (mut evals, mut regens) = (Tally::new(), Tally::new());
    let mut bad = 0u64;
    if want(Signal::EvalFailRate) || want(Signal::RegenerationRate) {
        db.for_each_primary_record(since, |json| {
            let Ok(r) = serde_json::from_str::<serde_json::Value>(json) else {
                bad += 1;
                return;
            };
            let attempts = r["attempts"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            if let Some(p) = provider {
                if !attempts.iter().any(|a| a["provider"] == p) {
                    return;
                }
            }
            let fields = ["route", "cohort", "prompt_template", "asset_type"].map(|k| r[k].as_str());
            if want(Signal::EvalFailRate) {
                let t = evals.entry(key(Signal::EvalFailRate, fields)).or_default();
                for e in attempts.iter().flat_map(|a| a["evaluations"].as_array().map(Vec::as_slice).unwrap_or(&[])) {
                    t.1 += 1;
                    t.0 += u64::from(e["verdict"] == "fail");
                }
            }
            if want(Signal::RegenerationRate) {
                let t = regens.entry(key(Signal::RegenerationRate, fields)).or_default();
                t.1 += 1;
                t.0 += u64::from(!r["regeneration"].is_null());
            }
        })
        .await
        .map_err(|e| GateError::Source(format!("--store: {e}")))?;
    }
    if bad > 0 {
        return Err(GateError::Source(format!("--store: {bad} trace records are not valid JSON")));
    }
    let mut rows: Vec<Row> = tally_rows(Signal::EvalFailRate, evals).collect();
    // A cohort whose requests had no evaluator has no verdicts: no eval-fail row, as in Prometheus.
    rows.retain(|r| r.samples > 0.0);
    rows.extend(tally_rows(Signal::RegenerationRate, regens));
    let mut missing = Vec::new();
    if want(Signal::ThumbsDownRate) {
        match db.ratings_since(since).await.map_err(|e| GateError::Source(format!("--store: {e}")))? {
            None => missing.push((
                Signal::ThumbsDownRate,
                "the store has no feedback table (a gateway without feedback)".to_string(),
            )),
            Some(ratings) => {
                let mut t = Tally::new();
                for r in ratings.iter().filter(|r| provider.is_none() || r.provider.as_deref() == provider) {
                    let fields = [&r.route, &r.cohort, &r.prompt_template, &r.asset_type].map(|f| f.as_deref());
                    let e = t.entry(key(Signal::ThumbsDownRate, fields)).or_default();
                    e.1 += 1;
                    e.0 += u64::from(r.rating < 0.0);
                }
                rows.extend(tally_rows(Signal::ThumbsDownRate, t));
            }
        }
    }
    db.close().await;
    Ok((rows, missing))
}

#[cfg(test)]
mod tests;
