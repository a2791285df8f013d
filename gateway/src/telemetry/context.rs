//! W3C trace context: the client's `traceparent` read with OpenTelemetry's own propagator, and
//! the `traceparent` the gateway sends to providers.

use http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The client's trace id (32 lowercase hex digits) and parent span id (16) from its
/// `traceparent` header, or `None` when there is none or it is not valid W3C trace context
/// (unknown shape for version 00, version `ff`, all-zero ids, upper-case hex, wrong lengths):
/// an invalid header is ignored and the request starts a trace of its own.
///
/// OpenTelemetry's `TraceContextPropagator` does the parsing; it accepts shorter ids (it parses
/// them as numbers), so the lengths the W3C format fixes are checked here first.
pub fn parse_traceparent(headers: &HeaderMap) -> Option<(String, String)> {
    let raw = headers.get("traceparent")?.to_str().ok()?.trim();
    let mut fields = raw.split('-');
    let version = fields.next();
    let lengths_ok = version.is_some_and(|v| v.len() == 2)
        && fields.next().is_some_and(|t| t.len() == 32)
        && fields.next().is_some_and(|s| s.len() == 16)
        && fields.next().is_some_and(|f| f.len() == 2);
    // Version 00 has exactly these four fields; only a later version may append more.
    if !lengths_ok || (version == Some("00") && fields.next().is_some()) {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let span = cx.span();
    let sc = span.span_context();
    // The propagator hands back an invalid (all-zero) context when it refused the header.
    sc.is_valid().then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// Longest `tracestate` passed on, characters (W3C Trace Context, 3.3.1.5: a participant
/// propagates at least 512; longer ones may be cut at list members).
pub const MAX_TRACESTATE: usize = 512;

/// The client's `tracestate` to pass on with the attempts' `traceparent`: its header lines
/// joined by commas (a list may be split over several), empty members dropped, members past
/// the 32nd or past [`MAX_TRACESTATE`] characters left off from the right (the newest vendors
/// are on the left); `None` when there is none or it is not printable ASCII. The gateway adds
/// no member of its own. Call it only when the `traceparent` was valid: otherwise a
/// `tracestate` is to be ignored.
pub fn tracestate(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut out = String::new();
    let mut members = 0;
    for line in headers.get_all("tracestate") {
        let text = line.to_str().ok()?;
        for member in text.split(',').map(str::trim).filter(|m| !m.is_empty()) {
            if !member.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                return None;
            }
            let extra = member.len() + usize::from(!out.is_empty());
            if members == 32 || out.len() + extra > MAX_TRACESTATE {
                return HeaderValue::from_str(&out).ok().filter(|_| !out.is_empty());
            }
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(member);
            members += 1;
        }
    }
    HeaderValue::from_str(&out).ok().filter(|_| !out.is_empty())
}

/// The `traceparent` value sent to a provider for an attempt: version 00, the request's trace id,
/// the attempt's span id, sampled (`00-<trace>-<span>-01`).
///
/// The ids are the gateway's own (hex, as in the trace record) and are written back in canonical
/// form (lowercase, zero-padded); an id that does not parse becomes all zeros, which a receiver
/// ignores as invalid rather than joining the wrong trace.
pub fn traceparent(trace_id: &str, span_id: &str) -> HeaderValue {
    let trace = TraceId::from_hex(trace_id).unwrap_or(TraceId::INVALID);
    let span = SpanId::from_hex(span_id).unwrap_or(SpanId::INVALID);
    // `00-<32 hex>-<16 hex>-01`, written in place (`format!` costs a request several times as
    // much).
    let mut value = [0u8; 55];
    value[..3].copy_from_slice(b"00-");
    hex::encode_to_slice(trace.to_bytes(), &mut value[3..35]).expect("16 bytes are 32 digits");
    value[35] = b'-';
    hex::encode_to_slice(span.to_bytes(), &mut value[36..52]).expect("8 bytes are 16 digits");
    value[52..].copy_from_slice(b"-01");
    // Hex digits and dashes only: always a valid header value.
    HeaderValue::from_bytes(&value)
        .unwrap_or(HeaderValue::from_static("00-00000000000000000000000000000000-0000000000000000-01"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn parse(value: &str) -> Option<(String, String)> {
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_str(value).unwrap());
        parse_traceparent(&h)
    }

    #[test]
    fn valid_traceparent_is_read() {
        let want = Some((TRACE.to_string(), SPAN.to_string()));
        assert_eq!(parse(&format!("00-{TRACE}-{SPAN}-01")), want);
        // Not sampled: still the caller's trace (the gateway records every request).
        assert_eq!(parse(&format!("00-{TRACE}-{SPAN}-00")), want);
        // A later version may append fields; the first four are read as version 00's.
        assert_eq!(parse(&format!("01-{TRACE}-{SPAN}-01-whatever")), want);
        // Surrounding whitespace is tolerated.
        assert_eq!(parse(&format!("  00-{TRACE}-{SPAN}-01 ")), want);
    }

    #[test]
    fn no_header_or_all_zero_ids_are_ignored() {
        assert_eq!(parse_traceparent(&HeaderMap::new()), None);
        assert_eq!(parse(&format!("00-{}-{SPAN}-01", "0".repeat(32))), None);
        assert_eq!(parse(&format!("00-{TRACE}-{}-01", "0".repeat(16))), None);
    }

    #[test]
    fn tracestate_is_joined_and_cut_at_members() {
        let state = |lines: &[&str]| {
            let mut h = HeaderMap::new();
            for l in lines {
                h.append("tracestate", HeaderValue::from_str(l).unwrap());
            }
            tracestate(&h).map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(state(&[]), None);
        assert_eq!(state(&["rojo=00f067aa0ba902b7"]).as_deref(), Some("rojo=00f067aa0ba902b7"));
        // Several lines are one list; empty members and spaces around them go.
        assert_eq!(state(&["rojo=1, ,congo=t61rcWkgMzE", "x@y=2"]).as_deref(), Some("rojo=1,congo=t61rcWkgMzE,x@y=2"));
        assert_eq!(state(&[" , "]), None);
        // At most 32 members and 512 characters: the ones on the right are left off.
        let many: Vec<String> = (0..40).map(|i| format!("k{i}=v")).collect();
        let kept = state(&[&many.join(",")]).unwrap();
        assert_eq!(kept, many[..32].join(","));
        let long: Vec<String> = (0..5).map(|i| format!("k{i}={}", "v".repeat(150))).collect();
        let kept = state(&[&long.join(",")]).unwrap();
        assert_eq!(kept, long[..3].join(","));
        assert!(kept.len() <= MAX_TRACESTATE);
    }

    #[test]
    fn bad_versions_are_ignored() {
        // Version 00 has exactly four fields.
        assert_eq!(parse(&format!("00-{TRACE}-{SPAN}-01-")), None);
        assert_eq!(parse(&format!("00-{TRACE}-{SPAN}-01-extra")), None);
        assert_eq!(parse(&format!("ff-{TRACE}-{SPAN}-01")), None, "version ff is forbidden");
        assert_eq!(parse(&format!("0g-{TRACE}-{SPAN}-01")), None, "not hex");
        assert_eq!(parse(&format!("000-{TRACE}-{SPAN}-01")), None, "three digits");
        assert_eq!(parse(&format!("00-{TRACE}-{SPAN}-01-extra")), None, "version 00 has exactly four fields");
    }

    #[test]
    fn garbage_is_ignored() {
        for bad in [
            "",
            "garbage",
            "00",
            "00-abc-def-01",
            &format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            &format!("00-{TRACE}-{}-01", SPAN.to_uppercase()),
            &format!("00-{TRACE}-{SPAN}"),
            &format!("00-{TRACE}-{SPAN}-1"),
            &format!("00-{TRACE}-{SPAN}-zz"),
            &format!("00-{}x-{SPAN}-01", &TRACE[..31]),
            &format!("00_{TRACE}_{SPAN}_01"),
            &format!("00-{TRACE}0-{SPAN}-01"),
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        // Not visible ASCII: not a string header value at all.
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_bytes(b"00-\xff").unwrap());
        assert_eq!(parse_traceparent(&h), None);
    }

    #[test]
    fn traceparent_is_formatted_for_providers() {
        assert_eq!(traceparent(TRACE, SPAN), format!("00-{TRACE}-{SPAN}-01"));
        // Canonical form: lowercase, zero-padded.
        assert_eq!(traceparent(&TRACE.to_uppercase(), "f067aa0ba902b7"), format!("00-{TRACE}-{SPAN}-01"));
        // What the gateway sends, it reads back.
        assert_eq!(parse(traceparent(TRACE, SPAN).to_str().unwrap()), Some((TRACE.to_string(), SPAN.to_string())));
        // An id that does not parse is sent as zeros (invalid, so never joined).
        let bad = traceparent("not-hex", SPAN);
        assert_eq!(bad, format!("00-{}-{SPAN}-01", "0".repeat(32)));
        assert_eq!(parse(bad.to_str().unwrap()), None);
    }
}
