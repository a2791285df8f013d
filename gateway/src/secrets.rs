//! Every secret the gateway holds, so that none leaves it in what it writes: provider keys and
//! tokens (also those a `token_command` prints), the admin token, webhook and signing secrets,
//! store and cluster passwords. Each is registered where the gateway reads it; text that may
//! carry one (a provider's error body, a helper command's output, a driver's message) goes
//! through [`redact`] before it reaches a client, a log line, a metric, a trace record or a span.
//!
//! Matching is exact (the secret's bytes anywhere in the text, case-sensitive) with one
//! automaton over all secrets ([`aho_corasick`], leftmost-longest, so a secret that contains
//! another is replaced whole). Secrets shorter than [`MIN_LEN`] bytes are not registered: they
//! would match ordinary words, and a key that short is no secret.

use std::borrow::Cow;
use std::sync::{Arc, RwLock};

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

/// What a secret is replaced with.
pub const REPLACEMENT: &str = "[REDACTED]";

/// The shortest secret registered, in bytes.
pub const MIN_LEN: usize = 8;

#[derive(Default)]
struct Registry {
    secrets: Vec<String>,
    automaton: Option<Arc<AhoCorasick>>,
}

static REGISTRY: RwLock<Registry> = RwLock::new(Registry { secrets: Vec::new(), automaton: None });

/// Registers `secret` (surrounding whitespace trimmed) so that [`redact`] removes it from now
/// on. Registering one twice, or one shorter than [`MIN_LEN`], does nothing. Secrets stay
/// registered for the life of the process (a rotated key's old value is still a secret).
pub fn register(secret: &str) {
    let secret = secret.trim();
    if secret.len() < MIN_LEN {
        return;
    }
    let mut r = REGISTRY.write().unwrap_or_else(std::sync::PoisonError::into_inner);
    if r.secrets.iter().any(|s| s == secret) {
        return;
    }
    r.secrets.push(secret.to_string());
    // Building cannot fail for a few literal patterns; if it did, keep the previous automaton
    // rather than lose every secret.
    if let Ok(a) = AhoCorasickBuilder::new().match_kind(MatchKind::LeftmostLongest).build(&r.secrets) {
        r.automaton = Some(Arc::new(a));
    }
}

fn automaton() -> Option<Arc<AhoCorasick>> {
    REGISTRY.read().unwrap_or_else(std::sync::PoisonError::into_inner).automaton.clone()
}

/// `text` with every registered secret replaced by [`REPLACEMENT`]; borrowed when it holds none.
pub fn redact(text: &str) -> Cow<'_, str> {
    match automaton() {
        Some(a) if a.is_match(text) => {
            let mut out = String::with_capacity(text.len());
            a.replace_all_with(text, &mut out, |_, _, dst| {
                dst.push_str(REPLACEMENT);
                true
            });
            Cow::Owned(out)
        }
        _ => Cow::Borrowed(text),
    }
}

/// [`redact`] for bytes (a provider's body, not always UTF-8).
pub fn redact_bytes(bytes: &[u8]) -> Cow<'_, [u8]> {
    match automaton() {
        Some(a) if a.is_match(bytes) => {
            let mut out = Vec::with_capacity(bytes.len());
            a.replace_all_with_bytes(bytes, &mut out, |_, _, dst| {
                dst.extend_from_slice(REPLACEMENT.as_bytes());
                true
            });
            Cow::Owned(out)
        }
        _ => Cow::Borrowed(bytes),
    }
}

/// [`redact`] in place, for an owned message.
pub fn redact_string(text: &mut String) {
    if let Cow::Owned(clean) = redact(text) {
        *text = clean;
    }
}

/// What a request's `Authorization` header holds, as both listeners read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credentials<'a> {
    /// No `Authorization` header.
    Missing,
    /// A header with another scheme (`Basic ...`), an empty token, or bytes that are not text.
    NotBearer,
    /// A bearer token, surrounding whitespace removed.
    Bearer(&'a str),
    /// More than one `Authorization` header: the field is a singleton (RFC 9110 section 5.3),
    /// and taking either one would let a proxy's header and a client's disagree silently.
    Several,
}

/// The bearer token of `Authorization: Bearer TOKEN`. The scheme is matched case-insensitively
/// and may be followed by one or more spaces (RFC 9110 section 11.1, RFC 6750 section 2.1).
pub fn credentials(headers: &http::HeaderMap) -> Credentials<'_> {
    let mut all = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = all.next() else { return Credentials::Missing };
    if all.next().is_some() {
        return Credentials::Several;
    }
    let Ok(text) = value.to_str() else { return Credentials::NotBearer };
    let text = text.trim_start();
    match text.get(..6) {
        Some(scheme) if scheme.eq_ignore_ascii_case("bearer") && text[6..].starts_with([' ', '\t']) => {
            match text[6..].trim() {
                "" => Credentials::NotBearer,
                token => Credentials::Bearer(token),
            }
        }
        _ => Credentials::NotBearer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_secrets_are_replaced_wherever_they_appear() {
        register("  sk-test-registry-0123456789\n");
        register("sk-test-registry-0123456789-longer");
        register("short");
        let text = "Authorization: Bearer sk-test-registry-0123456789-longer; key=sk-test-registry-0123456789.";
        assert_eq!(redact(text), "Authorization: Bearer [REDACTED]; key=[REDACTED].");
        assert!(matches!(redact("nothing secret, short"), Cow::Borrowed(_)));
        assert_eq!(&redact_bytes(b"\xff sk-test-registry-0123456789")[..], b"\xff [REDACTED]");
        let mut s = "x sk-test-registry-0123456789".to_string();
        redact_string(&mut s);
        assert_eq!(s, "x [REDACTED]");
    }

    #[test]
    fn bearer_tokens_are_read_whatever_the_scheme_case() {
        let with = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::AUTHORIZATION, http::HeaderValue::from_str(v).unwrap());
            h
        };
        let mut two = with("Bearer abc");
        two.append(http::header::AUTHORIZATION, http::HeaderValue::from_static("Bearer abc"));
        assert_eq!(credentials(&two), Credentials::Several);
        for v in ["Bearer abc", "bearer abc", "BEARER   abc ", "BeArEr\tabc"] {
            assert_eq!(credentials(&with(v)), Credentials::Bearer("abc"), "{v:?}");
        }
        for v in ["Basic abc", "Bearer", "Bearer   ", "Bearerabc", "Token abc"] {
            assert_eq!(credentials(&with(v)), Credentials::NotBearer, "{v:?}");
        }
        assert_eq!(credentials(&http::HeaderMap::new()), Credentials::Missing);
    }
}
