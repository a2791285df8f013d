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
}
