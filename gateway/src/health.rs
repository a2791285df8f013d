//! Target health and provider breakers: pure bookkeeping over plain data, no I/O, no locks.
//!
//! - [`TargetHealth`]: a rolling window of one route target's attempts (latency, errors, timeouts,
//!   evaluation failures) and the verdict drawn from it: demoted targets move to the back of the plan.
//!   Demotion has hysteresis ([`RECOVER`]) so a target hovering around a threshold does not flap.
//! - [`Breaker`]: a per-provider circuit breaker (closed, open, half-open with probes).
//! - [`retry_after`]: how long a provider's 429 asks to be left alone.
//!
//! Time is `tokio::time::Instant` throughout so tests can run on paused time. The caller owns the
//! locking and the metrics; every state change is returned so it can be counted and logged.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// One attempt's outcome as the health window sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sample {
    /// The provider answered and the artifact passed evaluation.
    Ok,
    /// The attempt failed (connect error, 5xx, bad response...).
    Error,
    /// The attempt ran past its timeout; its latency is the time it was given.
    Timeout,
    /// The provider answered but evaluation failed or the content was blocked.
    EvalFailed,
}

/// The health rules of one route, per target.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthSettings {
    /// Attempts kept per target (`health_window`).
    pub window: usize,
    /// Samples older than this are ignored (`health_window_secs`), so a target recovers from an
    /// incident even when it receives little traffic.
    pub window_age: Duration,
    /// Fewer samples than this => no judgement, never demoted (`health_min_samples`).
    pub min_samples: usize,
    /// Rolling p99 above this demotes the target (`latency_slo_ms`).
    pub latency_slo: Option<Duration>,
    /// (Error + Timeout) / samples above this demotes the target (`max_error_ratio`).
    pub max_error_ratio: Option<f64>,
    /// EvalFailed / samples above this demotes the target (`max_eval_fail_ratio`).
    pub max_eval_fail_ratio: Option<f64>,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            window: 100,
            window_age: Duration::from_secs(300),
            min_samples: 20,
            latency_slo: None,
            max_error_ratio: None,
            max_eval_fail_ratio: None,
        }
    }
}

/// Restore threshold factor (hysteresis): a demoted target comes back when every measure that
/// demoted it (or crossed its threshold while demoted) is at or below `RECOVER * threshold`.
pub const RECOVER: f64 = 0.8;

/// A target's window summarised, for `/admin/routes` and the `acc_target_*` gauges.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Stats {
    pub samples: usize,
    /// Nearest-rank percentiles over every sample's latency (timeouts count with their elapsed
    /// time); None when there are no samples.
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Share of `Sample::Error` only.
    pub error_ratio: f64,
    /// Share of `Sample::Timeout` only (demotion adds it to `error_ratio`).
    pub timeout_ratio: f64,
    pub eval_fail_ratio: f64,
}

/// A change of a target's demoted state.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    /// The new state: true when the target was just demoted, false when restored.
    pub demoted: bool,
    /// Readable, with the numbers, e.g. "p99 4200 ms > latency_slo 3000 ms over 25 samples".
    pub reason: String,
}

/// The rolling health of one route target.
#[derive(Debug, Default)]
pub struct TargetHealth {
    /// Oldest first: (when recorded, latency, outcome).
    ring: VecDeque<(Instant, Duration, Sample)>,
    /// Why the target is demoted, if it is.
    demoted: Option<String>,
    /// While demoted: which measures (indexed like [`Measure`]) crossed their threshold; each must
    /// come down to `RECOVER * threshold` before the target is restored.
    crossed: [bool; 3],
    /// Reused by `record` to sort latencies without allocating on every attempt.
    scratch: Vec<Duration>,
}

/// Outcome counts of the live part of the window.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    samples: usize,
    errors: usize,
    timeouts: usize,
    eval_failed: usize,
}

impl Counts {
    fn ratio(&self, n: usize) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            n as f64 / self.samples as f64
        }
    }
}

/// The three judged measures; the index is also the slot in `TargetHealth::crossed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Measure {
    LatencyP99 = 0,
    ErrorRatio = 1,
    EvalFailRatio = 2,
}

/// One configured measure against its threshold. Latencies are in milliseconds.
#[derive(Clone, Copy, Debug)]
struct Check {
    measure: Measure,
    value: f64,
    threshold: f64,
}

impl Check {
    fn value_text(&self) -> String {
        match self.measure {
            Measure::LatencyP99 => format!("p99 {:.0} ms", self.value),
            Measure::ErrorRatio => format!("error ratio {:.2}", self.value),
            Measure::EvalFailRatio => format!("eval-fail ratio {:.2}", self.value),
        }
    }

    fn threshold_text(&self, factor: f64) -> String {
        let t = self.threshold * factor;
        match self.measure {
            Measure::LatencyP99 => format!("latency_slo {:.0} ms", t),
            Measure::ErrorRatio => format!("max_error_ratio {:.2}", t),
            Measure::EvalFailRatio => format!("max_eval_fail_ratio {:.2}", t),
        }
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted latencies: the smallest value with at least `p`% of the
/// samples at or below it.
fn percentile(sorted: &[Duration], p: usize) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    Some(sorted[rank - 1])
}

impl TargetHealth {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one attempt and re-judges; Some when the demoted state changed.
    pub fn record(
        &mut self,
        now: Instant,
        latency: Duration,
        sample: Sample,
        s: &HealthSettings,
    ) -> Option<Transition> {
        self.ring.push_back((now, latency, sample));
        self.judge(now, s)
    }

    /// Re-judges after samples aged out (called when planning); Some when the state changed.
    pub fn refresh(&mut self, now: Instant, s: &HealthSettings) -> Option<Transition> {
        self.judge(now, s)
    }

    pub fn stats(&self, now: Instant, s: &HealthSettings) -> Stats {
        let mut latencies = Vec::new();
        let c = self.collect(now, s, &mut latencies, true);
        let ms = |p| percentile(&latencies, p).map(millis);
        Stats {
            samples: c.samples,
            p50_ms: ms(50),
            p95_ms: ms(95),
            p99_ms: ms(99),
            error_ratio: c.ratio(c.errors),
            timeout_ratio: c.ratio(c.timeouts),
            eval_fail_ratio: c.ratio(c.eval_failed),
        }
    }

    /// Why the target is demoted, if it is.
    pub fn demoted(&self) -> Option<&str> {
        self.demoted.as_deref()
    }

    /// The window's p95 latency, None below min_samples (used as a hedging delay).
    pub fn p95(&self, now: Instant, s: &HealthSettings) -> Option<Duration> {
        let mut latencies = Vec::new();
        let c = self.collect(now, s, &mut latencies, true);
        if c.samples < s.min_samples {
            return None;
        }
        percentile(&latencies, 95)
    }

    fn is_fresh(now: Instant, at: Instant, s: &HealthSettings) -> bool {
        now.saturating_duration_since(at) <= s.window_age
    }

    /// Drops what the window no longer holds, so the ring never outgrows `window`.
    fn prune(&mut self, now: Instant, s: &HealthSettings) {
        while self.ring.len() > s.window {
            self.ring.pop_front();
        }
        while self.ring.front().is_some_and(|&(at, _, _)| !Self::is_fresh(now, at, s)) {
            self.ring.pop_front();
        }
    }

    /// Counts the live samples and fills `latencies` with theirs, sorted. Works on `&self` (the
    /// ring may still hold samples that aged out since the last prune, or more than a reloaded,
    /// smaller `window`).
    fn collect(&self, now: Instant, s: &HealthSettings, latencies: &mut Vec<Duration>, sort: bool) -> Counts {
        latencies.clear();
        let mut c = Counts::default();
        for &(at, latency, sample) in self.ring.iter().rev().take(s.window) {
            if !Self::is_fresh(now, at, s) {
                continue;
            }
            latencies.push(latency);
            c.samples += 1;
            match sample {
                Sample::Ok => {}
                Sample::Error => c.errors += 1,
                Sample::Timeout => c.timeouts += 1,
                Sample::EvalFailed => c.eval_failed += 1,
            }
        }
        if sort {
            latencies.sort_unstable();
        }
        c
    }

    fn judge(&mut self, now: Instant, s: &HealthSettings) -> Option<Transition> {
        self.prune(now, s);
        if s.latency_slo.is_none() && s.max_error_ratio.is_none() && s.max_eval_fail_ratio.is_none() {
            // Nothing to judge against (the common case): no counting, no sorting per attempt.
            self.crossed = [false; 3];
            return self.demoted.take().map(|_| Transition {
                demoted: false,
                reason: "recovered: the thresholds that demoted it are no longer configured".to_string(),
            });
        }
        let mut latencies = std::mem::take(&mut self.scratch);
        let c = self.collect(now, s, &mut latencies, s.latency_slo.is_some());
        let p99 = percentile(&latencies, 99);
        self.scratch = latencies;

        if c.samples == 0 || c.samples < s.min_samples {
            self.crossed = [false; 3];
            return self
                .demoted
                .take()
                .map(|_| Transition { demoted: false, reason: "too few recent samples to judge".to_string() });
        }

        let checks = [
            s.latency_slo.zip(p99).map(|(slo, p99)| Check {
                measure: Measure::LatencyP99,
                value: millis(p99),
                threshold: millis(slo),
            }),
            s.max_error_ratio.map(|t| Check {
                measure: Measure::ErrorRatio,
                value: c.ratio(c.errors + c.timeouts),
                threshold: t,
            }),
            s.max_eval_fail_ratio.map(|t| Check {
                measure: Measure::EvalFailRatio,
                value: c.ratio(c.eval_failed),
                threshold: t,
            }),
        ];
        let checks = checks.iter().flatten();

        if self.demoted.is_none() {
            let mut reason = String::new();
            for check in checks.filter(|k| k.value > k.threshold) {
                self.crossed[check.measure as usize] = true;
                if !reason.is_empty() {
                    reason.push_str("; ");
                }
                reason.push_str(&format!("{} > {}", check.value_text(), check.threshold_text(1.0)));
            }
            if reason.is_empty() {
                return None;
            }
            reason.push_str(&format!(" over {} samples", c.samples));
            self.demoted = Some(reason.clone());
            return Some(Transition { demoted: true, reason });
        }

        // Demoted: a measure that crossed must come down to RECOVER x its threshold; one that never
        // crossed only has to stay within its threshold (else the target would be demoted again at
        // once).
        let mut restore = true;
        let mut reason = String::from("recovered: ");
        let mut first = true;
        for check in checks {
            let slot = check.measure as usize;
            if check.value > check.threshold {
                self.crossed[slot] = true;
            }
            if !self.crossed[slot] {
                continue;
            }
            if check.value > RECOVER * check.threshold {
                restore = false;
                break;
            }
            if !first {
                reason.push_str("; ");
            }
            first = false;
            let bound = match check.measure {
                Measure::LatencyP99 => format!("{:.0} ms", check.threshold * RECOVER),
                _ => format!("{:.2}", check.threshold * RECOVER),
            };
            reason.push_str(&format!("{} <= {}", check.value_text(), bound));
        }
        if !restore {
            return None;
        }
        if first {
            reason.push_str("the thresholds that demoted it are no longer configured");
        } else {
            reason.push_str(&format!(" over {} samples", c.samples));
        }
        self.demoted = None;
        self.crossed = [false; 3];
        Some(Transition { demoted: false, reason })
    }
}

/// A provider's circuit-breaker rules (`breaker = { ... }`).
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerSettings {
    /// `breaker = { enabled = false }` turns it off: every attempt is admitted.
    pub enabled: bool,
    /// Consecutive counted failures that open the breaker.
    pub consecutive_failures: u32,
    /// How long an open breaker refuses before letting probes through (`cooldown_ms`).
    pub cooldown: Duration,
    /// Probes let through at once when half-open; this many successes close it.
    pub probes: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings { enabled: true, consecutive_failures: 5, cooldown: Duration::from_secs(30), probes: 1 }
    }
}

/// The breaker's answer to "may an attempt go out now?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Closed: go.
    Yes,
    /// Half-open: go as a probe; report its result with `probe = true` (or `probe_abandoned`).
    Probe,
    /// Skip this provider; it may be tried again in `retry_in`.
    No { retry_in: Duration },
}

/// A change of breaker state, for `acc_breaker_transitions_total` and the logs.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerTransition {
    /// "closed" | "half_open" | "open"
    pub from: &'static str,
    pub to: &'static str,
    pub reason: String,
}

/// While half-open with every probe slot taken, how soon to look again.
const PROBE_BUSY_RETRY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    #[default]
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        in_flight: u32,
        succeeded: u32,
    },
}

impl State {
    fn label(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen { .. } => "half_open",
            State::Open { .. } => "open",
        }
    }
}

/// One provider's circuit breaker.
#[derive(Debug, Default)]
pub struct Breaker {
    state: State,
    failures: u32,
    last_reason: Option<String>,
}

/// "30 s" for whole seconds, "1500 ms" otherwise.
fn duration_text(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

impl Breaker {
    pub fn new() -> Self {
        Self::default()
    }

    fn go(&mut self, to: State, reason: String) -> Option<BreakerTransition> {
        let from = self.state.label();
        self.state = to;
        self.last_reason = Some(reason.clone());
        Some(BreakerTransition { from, to: to.label(), reason })
    }

    /// May an attempt go out now? Open past its cooldown turns half-open (transition returned);
    /// half-open admits up to `probes` probes in flight (successes so far count against it);
    /// while open: No { retry_in: time until cooldown ends }; half-open with all probe slots
    /// taken: No { retry_in: 1 s }. Disabled breaker: always Yes (a breaker left open by an
    /// earlier policy is closed, with a transition).
    pub fn admit(&mut self, now: Instant, s: &BreakerSettings) -> (Admit, Option<BreakerTransition>) {
        if !s.enabled {
            if self.state == State::Closed {
                return (Admit::Yes, None);
            }
            self.failures = 0;
            return (Admit::Yes, self.go(State::Closed, "breaker disabled".to_string()));
        }
        let probes = s.probes.max(1);
        match self.state {
            State::Closed => (Admit::Yes, None),
            State::Open { until } if now < until => (Admit::No { retry_in: until - now }, None),
            State::Open { .. } => {
                let reason = format!("cooldown of {} passed", duration_text(s.cooldown));
                (Admit::Probe, self.go(State::HalfOpen { in_flight: 1, succeeded: 0 }, reason))
            }
            State::HalfOpen { in_flight, succeeded } if in_flight + succeeded < probes => {
                self.state = State::HalfOpen { in_flight: in_flight + 1, succeeded };
                (Admit::Probe, None)
            }
            State::HalfOpen { .. } => (Admit::No { retry_in: PROBE_BUSY_RETRY }, None),
        }
    }

    /// An admitted attempt's result. success=false counts toward consecutive_failures; reaching it
    /// opens (closed -> open, reason with the count and last error text `why`). In half-open: a
    /// failed probe re-opens for another cooldown; `probes` successful probes close it. A success
    /// in closed resets the count.
    ///
    /// Results that no longer describe the current state are ignored: a non-probe attempt admitted
    /// while closed that ends after the breaker opened, or a probe that ends after another probe
    /// already re-opened it.
    pub fn on_result(
        &mut self,
        now: Instant,
        success: bool,
        probe: bool,
        why: &str,
        s: &BreakerSettings,
    ) -> Option<BreakerTransition> {
        if !s.enabled {
            return None;
        }
        match self.state {
            State::Closed if success => {
                self.failures = 0;
                None
            }
            State::Closed => {
                self.failures = self.failures.saturating_add(1);
                if self.failures < s.consecutive_failures.max(1) {
                    return None;
                }
                let reason = format!("{} consecutive failures, last: {}", self.failures, why);
                self.go(State::Open { until: now + s.cooldown }, reason)
            }
            State::HalfOpen { in_flight, succeeded } if probe => {
                let in_flight = in_flight.saturating_sub(1);
                if !success {
                    self.failures = self.failures.saturating_add(1);
                    let reason = format!("probe failed: {why}");
                    return self.go(State::Open { until: now + s.cooldown }, reason);
                }
                let succeeded = succeeded + 1;
                let probes = s.probes.max(1);
                if succeeded < probes {
                    self.state = State::HalfOpen { in_flight, succeeded };
                    return None;
                }
                self.failures = 0;
                let reason =
                    if probes == 1 { "1 probe succeeded".to_string() } else { format!("{probes} probes succeeded") };
                self.go(State::Closed, reason)
            }
            State::HalfOpen { .. } | State::Open { .. } => None,
        }
    }

    /// Closes the breaker by hand (`POST /admin/providers/{name}/reset`) with `reason`, and
    /// forgets the failures counted: the transition when it was open or half-open, `None` when
    /// it was closed already. A probe still in flight then reports into the closed breaker.
    pub fn reset(&mut self, reason: String) -> Option<BreakerTransition> {
        self.failures = 0;
        if self.state == State::Closed {
            self.last_reason = Some(reason);
            return None;
        }
        self.go(State::Closed, reason)
    }

    /// A probe that ended without a result (cancelled, or the result did not count): frees its slot.
    pub fn probe_abandoned(&mut self) {
        if let State::HalfOpen { in_flight, succeeded } = self.state {
            self.state = State::HalfOpen { in_flight: in_flight.saturating_sub(1), succeeded };
        }
    }

    /// "closed" | "half_open" | "open"
    pub fn state_label(&self) -> &'static str {
        self.state.label()
    }

    /// For `acc_breaker_state`: 0 closed, 1 half_open, 2 open.
    pub fn gauge(&self) -> i64 {
        match self.state {
            State::Closed => 0,
            State::HalfOpen { .. } => 1,
            State::Open { .. } => 2,
        }
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// Time until the cooldown ends while open (zero once it has passed but no attempt has asked
    /// yet); None when closed or half-open.
    pub fn open_for(&self, now: Instant) -> Option<Duration> {
        match self.state {
            State::Open { until } => Some(until.saturating_duration_since(now)),
            _ => None,
        }
    }

    /// The reason of the last transition, if there was one.
    pub fn last_reason(&self) -> Option<&str> {
        self.last_reason.as_deref()
    }
}

/// How long a provider asks to be left alone: `retry-after-ms` (ms), `Retry-After` (integer seconds
/// or an HTTP date, relative to `now`), or OpenAI's `x-ratelimit-reset-requests` /
/// `x-ratelimit-reset-images` durations like "1s", "6m0s", "250ms", "1h2m3.5s". When several are
/// present the largest wins (the provider means the strictest). None when absent or unparseable;
/// never negative (a date in the past is zero).
pub fn retry_after(headers: &http::HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let candidates = [
        text("retry-after-ms").and_then(|v| parse_decimal_nanos(v, 1_000_000)),
        text("retry-after").and_then(|v| parse_retry_after(v, now)),
        text("x-ratelimit-reset-requests").and_then(parse_go_duration),
        text("x-ratelimit-reset-images").and_then(parse_go_duration),
    ];
    candidates.into_iter().flatten().max()
}

/// The longest wait a header is read as (about 136 years): delay-seconds too large for 64 bits
/// still ask for a very long wait, which the provider's `max_pause_ms` then caps.
const LONGEST_WAIT: Duration = Duration::from_secs(u32::MAX as u64);

/// `Retry-After`: delay-seconds (digits only, RFC 9110 section 10.2.3; any number of them) or an
/// IMF-fixdate.
fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(v.parse().map_or(LONGEST_WAIT, Duration::from_secs).min(LONGEST_WAIT));
    }
    let at = parse_imf_fixdate(v)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A non-negative decimal number ("250", "3.5", ".5") times `unit_nanos`, truncated to whole
/// nanoseconds. None on anything else or on overflow.
fn parse_decimal_nanos(v: &str, unit_nanos: u64) -> Option<Duration> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let unit = u128::from(unit_nanos);
    let mut nanos = if int.is_empty() { 0 } else { int.parse::<u128>().ok()?.checked_mul(unit)? };
    // Digits past the 18th cannot matter at nanosecond precision for any unit up to an hour.
    let frac = &frac[..frac.len().min(18)];
    if !frac.is_empty() {
        let scale = 10u128.pow(frac.len() as u32);
        nanos = nanos.checked_add(frac.parse::<u128>().ok()? * unit / scale)?;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
    Some(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

/// A Go `time.Duration` string as OpenAI sends it: "1s", "6m0s", "250ms", "1h2m3.5s" (or "0").
fn parse_go_duration(v: &str) -> Option<Duration> {
    if v == "0" {
        return Some(Duration::ZERO);
    }
    if v.is_empty() {
        return None;
    }
    let is_num = |c: char| c.is_ascii_digit() || c == '.';
    let mut rest = v;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !is_num(c)).unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let unit_end = tail.find(is_num).unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let unit_nanos = match unit {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" | "μs" => 1_000,
            "ns" => 1,
            _ => return None,
        };
        total = total.checked_add(parse_decimal_nanos(num, unit_nanos)?)?;
        rest = tail;
    }
    Some(total)
}

/// An HTTP date in the IMF-fixdate form only ("Sun, 06 Nov 1994 08:49:37 GMT"); the obsolete
/// RFC 850 and asctime forms are refused.
fn parse_imf_fixdate(v: &str) -> Option<SystemTime> {
    const DAYS: [&str; 7] = ["Mon,", "Tue,", "Wed,", "Thu,", "Fri,", "Sat,", "Sun,"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let mut parts = v.split(' ');
    let mut next = || parts.next();
    let fixed_digits = |s: &str, len: usize| -> Option<u32> {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
    };
    if !DAYS.contains(&next()?) {
        return None;
    }
    let day = fixed_digits(next()?, 2)?;
    let month = next().and_then(|m| MONTHS.iter().position(|&name| name == m))? as u32 + 1;
    let year = fixed_digits(next()?, 4)?;
    let mut hms = next()?.split(':');
    let hour = fixed_digits(hms.next()?, 2)?;
    let minute = fixed_digits(hms.next()?, 2)?;
    let second = fixed_digits(hms.next()?, 2)?;
    if hms.next().is_some() || next()? != "GMT" || next().is_some() {
        return None;
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    // Second 60 is a leap second, which the grammar allows.
    if day == 0 || day > month_days || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    match u64::try_from(secs) {
        Ok(secs) => UNIX_EPOCH.checked_add(Duration::from_secs(secs)),
        Err(_) => UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs())),
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn settings() -> HealthSettings {
        HealthSettings { window: 100, window_age: Duration::from_secs(300), min_samples: 20, ..Default::default() }
    }

    /// Records `n` samples at `now`, returning every transition seen.
    fn record_n(
        h: &mut TargetHealth,
        n: usize,
        latency: Duration,
        sample: Sample,
        s: &HealthSettings,
    ) -> Vec<Transition> {
        (0..n).filter_map(|_| h.record(Instant::now(), latency, sample, s)).collect()
    }

    #[test]
    fn defaults_match_the_contract() {
        let h = HealthSettings::default();
        assert_eq!((h.window, h.window_age, h.min_samples), (100, Duration::from_secs(300), 20));
        assert_eq!((h.latency_slo, h.max_error_ratio, h.max_eval_fail_ratio), (None, None, None));
        let b = BreakerSettings::default();
        assert_eq!(b, BreakerSettings { enabled: true, consecutive_failures: 5, cooldown: ms(30_000), probes: 1 });
    }

    #[tokio::test(start_paused = true)]
    async fn stats_percentiles_and_ratios() {
        let s = settings();
        let mut h = TargetHealth::new();
        assert_eq!(h.stats(Instant::now(), &s), Stats::default());
        // Latencies 1..=100 ms, recorded out of order; by last digit: 0 Error, 1 Timeout, 2 EvalFailed.
        for i in (1..=100u64).rev() {
            let sample = match i % 10 {
                0 => Sample::Error,
                1 => Sample::Timeout,
                2 => Sample::EvalFailed,
                _ => Sample::Ok,
            };
            assert_eq!(h.record(Instant::now(), ms(i), sample, &s), None);
        }
        let st = h.stats(Instant::now(), &s);
        assert_eq!(
            st,
            Stats {
                samples: 100,
                p50_ms: Some(50.0),
                p95_ms: Some(95.0),
                p99_ms: Some(99.0),
                error_ratio: 0.1,
                timeout_ratio: 0.1,
                eval_fail_ratio: 0.1,
            }
        );
        assert_eq!(h.p95(Instant::now(), &s), Some(ms(95)));
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(json["p99_ms"], 99.0);
        assert_eq!(json["samples"], 100);
    }

    #[tokio::test(start_paused = true)]
    async fn nearest_rank_on_small_windows() {
        let s = HealthSettings { min_samples: 1, ..settings() };
        let mut h = TargetHealth::new();
        h.record(Instant::now(), ms(30), Sample::Ok, &s);
        let st = h.stats(Instant::now(), &s);
        assert_eq!((st.p50_ms, st.p95_ms, st.p99_ms), (Some(30.0), Some(30.0), Some(30.0)));
        h.record(Instant::now(), ms(10), Sample::Ok, &s);
        h.record(Instant::now(), ms(20), Sample::Timeout, &s);
        let st = h.stats(Instant::now(), &s);
        // n = 3: p50 is rank ceil(1.5) = 2, p95 and p99 rank 3.
        assert_eq!((st.p50_ms, st.p95_ms, st.p99_ms), (Some(20.0), Some(30.0), Some(30.0)));
        assert_eq!((st.error_ratio, st.timeout_ratio, st.eval_fail_ratio), (0.0, 1.0 / 3.0, 0.0));
        let mut sorted = [ms(4), ms(1), ms(3), ms(2)];
        sorted.sort();
        assert_eq!(percentile(&sorted, 25), Some(ms(1)));
        assert_eq!(percentile(&sorted, 26), Some(ms(2)));
        assert_eq!(percentile(&sorted, 100), Some(ms(4)));
        assert_eq!(percentile(&[], 50), None);
    }

    #[tokio::test(start_paused = true)]
    async fn samples_age_out_of_window_age() {
        let s = settings();
        let mut h = TargetHealth::new();
        record_n(&mut h, 20, ms(100), Sample::Error, &s);
        advance(Duration::from_secs(200)).await;
        record_n(&mut h, 5, ms(10), Sample::Ok, &s);
        assert_eq!(h.stats(Instant::now(), &s).samples, 25);
        // The first 20 are exactly window_age old: still counted.
        advance(Duration::from_secs(100)).await;
        assert_eq!(h.stats(Instant::now(), &s).samples, 25);
        advance(ms(1)).await;
        let st = h.stats(Instant::now(), &s);
        assert_eq!((st.samples, st.error_ratio, st.p99_ms), (5, 0.0, Some(10.0)));
        advance(Duration::from_secs(200)).await;
        assert_eq!(h.stats(Instant::now(), &s), Stats::default());
        assert_eq!(h.refresh(Instant::now(), &s), None);
        assert!(h.ring.is_empty(), "refresh prunes aged samples");
    }

    #[tokio::test(start_paused = true)]
    async fn window_keeps_the_latest_attempts() {
        let s = HealthSettings { window: 10, min_samples: 1, ..settings() };
        let mut h = TargetHealth::new();
        for i in 1..=15 {
            h.record(Instant::now(), ms(i), Sample::Ok, &s);
        }
        let st = h.stats(Instant::now(), &s);
        assert_eq!((st.samples, st.p50_ms, st.p99_ms), (10, Some(10.0), Some(15.0)));
        assert_eq!(h.ring.len(), 10);
        // A reload that shrinks the window takes effect in stats before the next record.
        let smaller = HealthSettings { window: 4, ..s };
        assert_eq!(h.stats(Instant::now(), &smaller).p50_ms, Some(13.0));
    }

    #[tokio::test(start_paused = true)]
    async fn min_samples_gate() {
        let s = HealthSettings { latency_slo: Some(ms(100)), ..settings() };
        let mut h = TargetHealth::new();
        assert!(record_n(&mut h, 19, ms(500), Sample::Ok, &s).is_empty());
        assert_eq!(h.demoted(), None);
        assert_eq!(h.p95(Instant::now(), &s), None);
        let t = h.record(Instant::now(), ms(500), Sample::Ok, &s).expect("demoted at min_samples");
        assert!(t.demoted);
        assert_eq!(h.p95(Instant::now(), &s), Some(ms(500)));
        // Everything ages out: too few samples to judge, so the target is restored.
        advance(Duration::from_secs(301)).await;
        assert_eq!(h.demoted(), Some(t.reason.as_str()), "nothing changes until re-judged");
        let back = h.refresh(Instant::now(), &s).expect("restored");
        assert_eq!(back, Transition { demoted: false, reason: "too few recent samples to judge".to_string() });
        assert_eq!(h.demoted(), None);
        assert_eq!(h.refresh(Instant::now(), &s), None);
    }

    #[tokio::test(start_paused = true)]
    async fn demotion_by_latency() {
        let s = HealthSettings { latency_slo: Some(ms(3000)), ..settings() };
        let mut h = TargetHealth::new();
        // Exactly at the SLO is not above it.
        assert!(record_n(&mut h, 25, ms(3000), Sample::Ok, &s).is_empty());
        let t = h.record(Instant::now(), ms(4200), Sample::Ok, &s).expect("p99 now 4200 ms");
        assert_eq!(
            t,
            Transition { demoted: true, reason: "p99 4200 ms > latency_slo 3000 ms over 26 samples".to_string() }
        );
        assert_eq!(h.demoted(), Some("p99 4200 ms > latency_slo 3000 ms over 26 samples"));
        assert_eq!(h.record(Instant::now(), ms(4200), Sample::Ok, &s), None, "no repeated transition");
    }

    #[tokio::test(start_paused = true)]
    async fn demotion_by_error_ratio_counts_timeouts() {
        let s = HealthSettings { max_error_ratio: Some(0.5), max_eval_fail_ratio: Some(0.9), ..settings() };
        let mut h = TargetHealth::new();
        record_n(&mut h, 10, ms(10), Sample::Ok, &s);
        // 10 / 20 = 0.5 is not above 0.5.
        assert!(record_n(&mut h, 10, ms(10), Sample::Error, &s).is_empty());
        let t = h.record(Instant::now(), ms(10), Sample::Timeout, &s).expect("11 / 21 > 0.5");
        assert_eq!(t.reason, "error ratio 0.52 > max_error_ratio 0.50 over 21 samples");
        let st = h.stats(Instant::now(), &s);
        assert_eq!((st.error_ratio, st.timeout_ratio), (10.0 / 21.0, 1.0 / 21.0));
    }

    #[tokio::test(start_paused = true)]
    async fn demotion_by_eval_fail_ratio() {
        let s =
            HealthSettings { window: 20, max_error_ratio: Some(0.1), max_eval_fail_ratio: Some(0.25), ..settings() };
        let mut h = TargetHealth::new();
        record_n(&mut h, 15, ms(10), Sample::Ok, &s);
        // 5 / 20 = 0.25 is not above it; eval failures do not count as errors.
        assert!(record_n(&mut h, 5, ms(10), Sample::EvalFailed, &s).is_empty());
        // The window drops an Ok: 6 / 20.
        let t = h.record(Instant::now(), ms(10), Sample::EvalFailed, &s).expect("0.3 > 0.25");
        assert_eq!(t.reason, "eval-fail ratio 0.30 > max_eval_fail_ratio 0.25 over 20 samples");
    }

    #[tokio::test(start_paused = true)]
    async fn several_measures_in_one_reason() {
        let s = HealthSettings { latency_slo: Some(ms(1000)), max_error_ratio: Some(0.5), ..settings() };
        let mut h = TargetHealth::new();
        let seen = record_n(&mut h, 20, ms(2000), Sample::Timeout, &s);
        assert_eq!(
            seen,
            vec![Transition {
                demoted: true,
                reason: "p99 2000 ms > latency_slo 1000 ms; error ratio 1.00 > max_error_ratio 0.50 over 20 samples"
                    .to_string()
            }]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hysteresis_on_error_ratio() {
        let s = HealthSettings { window: 20, max_error_ratio: Some(0.5), ..settings() };
        let mut h = TargetHealth::new();
        record_n(&mut h, 11, ms(10), Sample::Error, &s);
        let seen = record_n(&mut h, 9, ms(10), Sample::Ok, &s);
        assert_eq!(seen.len(), 1, "11 / 20 = 0.55 demotes at the 20th sample");
        // Each Ok pushes an Error out of the window: 0.50, then 0.45: still demoted.
        assert_eq!(h.record(Instant::now(), ms(10), Sample::Ok, &s), None);
        assert_eq!(h.record(Instant::now(), ms(10), Sample::Ok, &s), None);
        assert!(h.demoted().is_some());
        // 0.40 = RECOVER x 0.5: restored.
        let t = h.record(Instant::now(), ms(10), Sample::Ok, &s).expect("restored");
        assert_eq!(
            t,
            Transition { demoted: false, reason: "recovered: error ratio 0.40 <= 0.40 over 20 samples".to_string() }
        );
        assert_eq!(h.demoted(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn hovering_around_the_slo_does_not_flap() {
        // A window of one sample: p99 is the last latency.
        let s = HealthSettings { window: 1, min_samples: 1, latency_slo: Some(ms(1000)), ..settings() };
        let mut h = TargetHealth::new();
        let mut states = Vec::new();
        for latency in [900, 1000, 1001, 900, 1100, 810, 1000, 801, 800, 900, 1000, 990, 1001, 950] {
            if let Some(t) = h.record(Instant::now(), ms(latency), Sample::Ok, &s) {
                states.push((latency, t.demoted));
            }
        }
        assert_eq!(states, vec![(1001, true), (800, false), (1001, true)]);
        assert_eq!(h.demoted(), Some("p99 1001 ms > latency_slo 1000 ms over 1 samples"));
    }

    #[tokio::test(start_paused = true)]
    async fn only_crossed_measures_need_to_recover() {
        let s = HealthSettings { window: 20, latency_slo: Some(ms(1000)), max_error_ratio: Some(0.5), ..settings() };
        let mut h = TargetHealth::new();
        // Slow, and 9 errors (0.45, within its threshold): demoted by latency only.
        record_n(&mut h, 11, ms(2000), Sample::Ok, &s);
        let seen = record_n(&mut h, 9, ms(500), Sample::Error, &s);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].reason, "p99 2000 ms > latency_slo 1000 ms over 20 samples");
        // Fast Oks push the slow ones out; p99 comes back once no slow sample is left, while the error
        // ratio stays at 0.45 (above 0.8 x 0.5, but it never crossed).
        let seen = record_n(&mut h, 11, ms(700), Sample::Ok, &s);
        assert_eq!(
            seen,
            vec![Transition { demoted: false, reason: "recovered: p99 700 ms <= 800 ms over 20 samples".to_string() }]
        );

        // Demoted by latency again; then the error ratio crosses too while demoted: both must recover.
        let mut h = TargetHealth::new();
        record_n(&mut h, 20, ms(2000), Sample::Ok, &s);
        assert!(h.demoted().is_some());
        // 11 errors push out 11 slow samples (0.55 crosses), 9 fast Oks the rest: p99 is fine again.
        record_n(&mut h, 11, ms(100), Sample::Error, &s);
        record_n(&mut h, 9, ms(100), Sample::Ok, &s);
        let st = h.stats(Instant::now(), &s);
        assert_eq!((st.p99_ms, st.error_ratio), (Some(100.0), 0.55));
        assert!(h.demoted().is_some());
        // 0.45 would be enough for a measure that never crossed, not for this one.
        record_n(&mut h, 2, ms(100), Sample::Ok, &s);
        assert_eq!(h.stats(Instant::now(), &s).error_ratio, 0.45);
        assert!(h.demoted().is_some());
        let t = h.record(Instant::now(), ms(100), Sample::Ok, &s).expect("restored at 0.40");
        assert_eq!(t.reason, "recovered: p99 100 ms <= 800 ms; error ratio 0.40 <= 0.40 over 20 samples");
    }

    #[tokio::test(start_paused = true)]
    async fn thresholds_removed_by_reload_restore() {
        let s = HealthSettings { latency_slo: Some(ms(1000)), ..settings() };
        let mut h = TargetHealth::new();
        record_n(&mut h, 20, ms(2000), Sample::Ok, &s);
        assert!(h.demoted().is_some());
        let none = HealthSettings { latency_slo: None, ..s };
        let t = h.refresh(Instant::now(), &none).expect("restored");
        assert_eq!(t.reason, "recovered: the thresholds that demoted it are no longer configured");
    }

    fn failing(b: &mut Breaker, n: u32, s: &BreakerSettings) -> Vec<BreakerTransition> {
        (0..n).filter_map(|_| b.on_result(Instant::now(), false, false, "status 503", s)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_after_n_consecutive_failures() {
        let s = BreakerSettings::default();
        let mut b = Breaker::new();
        assert!(failing(&mut b, 4, &s).is_empty());
        assert_eq!((b.state_label(), b.gauge(), b.consecutive_failures()), ("closed", 0, 4));
        assert_eq!(b.admit(Instant::now(), &s), (Admit::Yes, None));
        let t = b.on_result(Instant::now(), false, false, "connect error: refused", &s).expect("opens at 5");
        assert_eq!(
            t,
            BreakerTransition {
                from: "closed",
                to: "open",
                reason: "5 consecutive failures, last: connect error: refused".to_string()
            }
        );
        assert_eq!((b.state_label(), b.gauge(), b.consecutive_failures()), ("open", 2, 5));
        assert_eq!(b.last_reason(), Some("5 consecutive failures, last: connect error: refused"));
        assert_eq!(b.open_for(Instant::now()), Some(ms(30_000)));
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_success_resets_the_count() {
        let s = BreakerSettings::default();
        let mut b = Breaker::new();
        failing(&mut b, 4, &s);
        assert_eq!(b.on_result(Instant::now(), true, false, "", &s), None);
        assert_eq!(b.consecutive_failures(), 0);
        assert!(failing(&mut b, 4, &s).is_empty());
        assert_eq!((b.state_label(), b.consecutive_failures()), ("closed", 4));
        assert_eq!(b.last_reason(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_open_then_half_open_then_closed() {
        let s = BreakerSettings::default();
        let mut b = Breaker::new();
        failing(&mut b, 5, &s);
        advance(Duration::from_secs(10)).await;
        assert_eq!(b.admit(Instant::now(), &s), (Admit::No { retry_in: ms(20_000) }, None));
        assert_eq!(b.open_for(Instant::now()), Some(ms(20_000)));
        // Results of attempts admitted before it opened change nothing.
        assert_eq!(b.on_result(Instant::now(), true, false, "", &s), None);
        assert_eq!(failing(&mut b, 3, &s), vec![]);
        assert_eq!(b.open_for(Instant::now()), Some(ms(20_000)));

        advance(ms(19_999)).await;
        assert_eq!(b.admit(Instant::now(), &s), (Admit::No { retry_in: ms(1) }, None));
        advance(ms(1)).await;
        assert_eq!(b.open_for(Instant::now()), Some(Duration::ZERO));
        let (admit, t) = b.admit(Instant::now(), &s);
        assert_eq!(admit, Admit::Probe);
        assert_eq!(
            t,
            Some(BreakerTransition { from: "open", to: "half_open", reason: "cooldown of 30 s passed".to_string() })
        );
        assert_eq!((b.state_label(), b.gauge(), b.open_for(Instant::now())), ("half_open", 1, None));
        // The one probe slot is taken.
        assert_eq!(b.admit(Instant::now(), &s), (Admit::No { retry_in: ms(1000) }, None));
        let t = b.on_result(Instant::now(), true, true, "", &s).expect("closes");
        assert_eq!(t, BreakerTransition { from: "half_open", to: "closed", reason: "1 probe succeeded".to_string() });
        assert_eq!((b.state_label(), b.consecutive_failures()), ("closed", 0));
        assert_eq!(b.admit(Instant::now(), &s), (Admit::Yes, None));
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_failed_probe_reopens_for_another_cooldown() {
        let s = BreakerSettings { consecutive_failures: 2, cooldown: ms(5000), ..Default::default() };
        let mut b = Breaker::new();
        failing(&mut b, 2, &s);
        advance(ms(5000)).await;
        assert_eq!(b.admit(Instant::now(), &s).0, Admit::Probe);
        advance(ms(700)).await;
        let t = b.on_result(Instant::now(), false, true, "timeout", &s).expect("re-opens");
        assert_eq!(t, BreakerTransition { from: "half_open", to: "open", reason: "probe failed: timeout".to_string() });
        assert_eq!(b.admit(Instant::now(), &s), (Admit::No { retry_in: ms(5000) }, None));
        assert_eq!(b.consecutive_failures(), 3);
        advance(ms(5000)).await;
        assert_eq!(b.admit(Instant::now(), &s).0, Admit::Probe);
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_probe_limit_and_successes() {
        let s = BreakerSettings { consecutive_failures: 1, cooldown: ms(1000), probes: 2, ..Default::default() };
        let mut b = Breaker::new();
        failing(&mut b, 1, &s);
        advance(ms(1000)).await;
        assert_eq!(b.admit(Instant::now(), &s).0, Admit::Probe);
        assert_eq!(b.admit(Instant::now(), &s), (Admit::Probe, None));
        assert_eq!(b.admit(Instant::now(), &s), (Admit::No { retry_in: ms(1000) }, None));
        // One success: still half-open, and its slot is not given back (it counts against probes).
        assert_eq!(b.on_result(Instant::now(), true, true, "", &s), None);
        assert_eq!(b.state_label(), "half_open");
        assert_eq!(b.admit(Instant::now(), &s).0, Admit::No { retry_in: ms(1000) });
        let t = b.on_result(Instant::now(), true, true, "", &s).expect("closes after 2");
        assert_eq!(t.reason, "2 probes succeeded");
        assert_eq!(b.state_label(), "closed");

        // A success then a failure re-opens; the other probe's late result is ignored.
        failing(&mut b, 1, &s);
        advance(ms(1000)).await;
        b.admit(Instant::now(), &s);
        b.admit(Instant::now(), &s);
        assert_eq!(b.on_result(Instant::now(), false, true, "status 500", &s).map(|t| t.to), Some("open"));
        assert_eq!(b.on_result(Instant::now(), true, true, "", &s), None);
        assert_eq!(b.state_label(), "open");
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_probe_abandoned_frees_a_slot() {
        let s = BreakerSettings { consecutive_failures: 1, ..Default::default() };
        let mut b = Breaker::new();
        failing(&mut b, 1, &s);
        advance(Duration::from_secs(30)).await;
        assert_eq!(b.admit(Instant::now(), &s).0, Admit::Probe);
        assert_eq!(b.admit(Instant::now(), &s).0, Admit::No { retry_in: ms(1000) });
        b.probe_abandoned();
        assert_eq!(b.state_label(), "half_open");
        assert_eq!(b.admit(Instant::now(), &s), (Admit::Probe, None));
        assert_eq!(b.admit(Instant::now(), &s).0, Admit::No { retry_in: ms(1000) });
        // Abandoning more than were admitted does not create extra slots.
        b.probe_abandoned();
        b.probe_abandoned();
        assert_eq!(b.admit(Instant::now(), &s).0, Admit::Probe);
        assert_eq!(b.admit(Instant::now(), &s).0, Admit::No { retry_in: ms(1000) });
        // Outside half-open it does nothing.
        let mut closed = Breaker::new();
        closed.probe_abandoned();
        assert_eq!(closed.state_label(), "closed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_by_hand_closes_from_any_state_and_forgets_the_count() {
        let s = BreakerSettings { consecutive_failures: 2, ..Default::default() };
        // Open: closed, with a transition that says why.
        let mut b = Breaker::new();
        failing(&mut b, 2, &s);
        assert_eq!(b.state_label(), "open");
        let t = b.reset("reset by hand".into()).expect("open -> closed");
        assert_eq!((t.from, t.to, t.reason.as_str()), ("open", "closed", "reset by hand"));
        assert_eq!((b.admit(Instant::now(), &s).0, b.consecutive_failures()), (Admit::Yes, 0));
        // One failure after it does not re-open (the count started over); two do.
        failing(&mut b, 1, &s);
        assert_eq!(b.state_label(), "closed");
        failing(&mut b, 1, &s);
        assert_eq!(b.state_label(), "open");
        // Half-open with a probe out: closed, and the probe's late failure counts as one.
        advance(Duration::from_secs(30)).await;
        assert_eq!(b.admit(Instant::now(), &s).0, Admit::Probe);
        assert_eq!(b.reset("again".into()).map(|t| t.from), Some("half_open"));
        assert_eq!(b.on_result(Instant::now(), false, true, "late", &s), None);
        assert_eq!((b.state_label(), b.consecutive_failures()), ("closed", 1));
        // Closed already: no transition, the count forgotten.
        assert_eq!(b.reset("third".into()), None);
        assert_eq!((b.consecutive_failures(), b.last_reason()), (0, Some("third")));
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_breaker_never_opens() {
        let s = BreakerSettings { enabled: false, consecutive_failures: 1, ..Default::default() };
        let mut b = Breaker::new();
        assert!(failing(&mut b, 100, &s).is_empty());
        assert_eq!((b.admit(Instant::now(), &s), b.state_label()), ((Admit::Yes, None), "closed"));
        assert_eq!(b.consecutive_failures(), 0);

        // Disabled by a reload while open: closed on the next admit.
        let on = BreakerSettings { enabled: true, ..s.clone() };
        failing(&mut b, 1, &on);
        assert_eq!(b.state_label(), "open");
        let (admit, t) = b.admit(Instant::now(), &s);
        assert_eq!(admit, Admit::Yes);
        assert_eq!(t.map(|t| (t.from, t.to)), Some(("open", "closed")));
        assert_eq!((b.state_label(), b.consecutive_failures()), ("closed", 0));
    }

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), http::HeaderValue::from_str(v).unwrap());
        }
        h
    }

    /// "Sun, 06 Nov 1994 08:49:37 GMT" as Unix seconds.
    const RFC_EXAMPLE: u64 = 784_111_777;

    #[test]
    fn retry_after_each_header_form() {
        let now = UNIX_EPOCH + Duration::from_secs(RFC_EXAMPLE - 30);
        // (headers, expected)
        type Case = (&'static [(&'static str, &'static str)], Option<Duration>);
        let cases: &[Case] = &[
            (&[], None),
            (&[("retry-after", "120")], Some(ms(120_000))),
            (&[("retry-after", " 7 ")], Some(ms(7000))),
            (&[("retry-after", "0")], Some(Duration::ZERO)),
            // More seconds than 64 bits hold: still a wait, the longest (capped by max_pause).
            (&[("retry-after", "99999999999999999999999")], Some(LONGEST_WAIT)),
            (&[("retry-after", "18446744073709551615")], Some(LONGEST_WAIT)),
            (&[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")], Some(ms(30_000))),
            (&[("retry-after", "Sat, 05 Nov 1994 08:49:37 GMT")], Some(Duration::ZERO)),
            (
                &[("retry-after", "Thu, 29 Feb 1996 00:00:00 GMT")],
                Some(Duration::from_secs(825_552_000 - RFC_EXAMPLE + 30)),
            ),
            (&[("retry-after-ms", "250")], Some(ms(250))),
            (&[("retry-after-ms", "1.5")], Some(Duration::from_micros(1500))),
            (&[("x-ratelimit-reset-requests", "1s")], Some(ms(1000))),
            (&[("x-ratelimit-reset-requests", "6m0s")], Some(ms(360_000))),
            (&[("x-ratelimit-reset-requests", "250ms")], Some(ms(250))),
            (&[("x-ratelimit-reset-requests", "1h2m3.5s")], Some(ms(3_723_500))),
            (&[("x-ratelimit-reset-images", "17.5ms")], Some(Duration::from_micros(17_500))),
            (&[("x-ratelimit-reset-images", "0")], Some(Duration::ZERO)),
            (&[("x-ratelimit-reset-requests", "2s"), ("x-ratelimit-reset-images", "1m")], Some(ms(60_000))),
            (&[("retry-after", "2"), ("x-ratelimit-reset-requests", "6m0s")], Some(ms(360_000))),
            (&[("retry-after", "soon"), ("x-ratelimit-reset-images", "3s")], Some(ms(3000))),
        ];
        for (pairs, want) in cases {
            assert_eq!(retry_after(&headers(pairs), now), *want, "{pairs:?}");
        }
    }

    #[test]
    fn retry_after_refuses_bad_values() {
        let now = UNIX_EPOCH + Duration::from_secs(RFC_EXAMPLE);
        for (name, value) in [
            ("retry-after", ""),
            ("retry-after", "-5"),
            ("retry-after", "1.5"),
            ("retry-after", "abc"),
            ("retry-after", "Sunday, 06-Nov-94 08:49:37 GMT"),
            ("retry-after", "Sun Nov  6 08:49:37 1994"),
            ("retry-after", "Sun, 31 Nov 1994 08:49:37 GMT"),
            ("retry-after", "Sun, 29 Feb 1994 08:49:37 GMT"),
            ("retry-after", "Sun, 06 Nov 1994 24:00:00 GMT"),
            ("retry-after", "Sun, 06 Nov 1994 08:49:37 UTC"),
            ("retry-after", "Sun, 6 Nov 1994 08:49:37 GMT"),
            ("retry-after", "Xyz, 06 Nov 1994 08:49:37 GMT"),
            ("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT extra"),
            ("retry-after-ms", "-1"),
            ("retry-after-ms", "."),
            ("retry-after-ms", "1e3"),
            ("x-ratelimit-reset-requests", ""),
            ("x-ratelimit-reset-requests", "5"),
            ("x-ratelimit-reset-requests", "s"),
            ("x-ratelimit-reset-requests", "1x"),
            ("x-ratelimit-reset-requests", "-1s"),
            ("x-ratelimit-reset-requests", "1.2.3s"),
            ("x-ratelimit-reset-images", "1s2"),
        ] {
            assert_eq!(retry_after(&headers(&[(name, value)]), now), None, "{name}: {value:?}");
        }
        // Not visible ASCII: to_str fails, treated as absent.
        let mut h = http::HeaderMap::new();
        h.insert("retry-after", http::HeaderValue::from_bytes(b"\xff").unwrap());
        assert_eq!(retry_after(&h, now), None);
    }

    #[test]
    fn imf_fixdate_round_numbers() {
        assert_eq!(parse_imf_fixdate("Thu, 01 Jan 1970 00:00:00 GMT"), Some(UNIX_EPOCH));
        assert_eq!(
            parse_imf_fixdate("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(UNIX_EPOCH + Duration::from_secs(RFC_EXAMPLE))
        );
        assert_eq!(
            parse_imf_fixdate("Sat, 01 Jan 2000 00:00:00 GMT"),
            Some(UNIX_EPOCH + Duration::from_secs(946_684_800))
        );
        assert_eq!(parse_imf_fixdate("Wed, 31 Dec 1969 23:59:59 GMT"), UNIX_EPOCH.checked_sub(Duration::from_secs(1)));
    }
}
