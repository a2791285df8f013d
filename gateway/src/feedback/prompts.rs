//! Implicit regeneration detection: prompts normalised into fingerprints, compared by Jaccard
//! similarity, and remembered in a bounded memory per tenant and end user.
//!
//! Normalisation: lowercase (Unicode), words split on Unicode whitespace, characters that are
//! neither letters nor digits trimmed from each word's ends (`"Fox!"` and `"fox"` are one
//! word), empty words dropped. Two prompts are the same when their normalised word sequences
//! are; nearly the same when the Jaccard similarity of their word sets (|A ∩ B| / |A ∪ B|, the
//! first [`MAX_WORDS`] words of each) reaches the route's `regeneration_similarity` (default
//! 0.8). Word order is not compared.
//!
//! Nothing of a prompt's text is kept: a fingerprint holds keyed 64-bit hashes (SipHash with a
//! key drawn at start-up) of the normalised prompt and, only on routes with
//! `record_prompt = "full"`, of its words. On a route with `"sha256"` or `"none"` only the hash
//! of the whole normalised prompt is kept, so only exactly the same prompt is detected there.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Words of a prompt compared, at most (the first ones).
pub const MAX_WORDS: usize = 64;
/// Prompts remembered per tenant and end user (the newest).
pub const RING: usize = 4;
/// End users remembered per tenant; the one remembered first is forgotten beyond it.
pub const PER_TENANT: usize = 4096;
/// End users remembered across all tenants; beyond it a tenant's oldest end user makes room,
/// or a tenant that has none is not remembered.
pub const MAX_USERS: usize = 32_768;
const SHARDS: usize = 16;

/// `prompt` normalised as described in the module documentation: lowercase words joined by
/// single spaces.
pub fn normalise(prompt: &str) -> String {
    let mut out = String::with_capacity(prompt.len());
    for w in words(prompt) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(w.chars().flat_map(char::to_lowercase));
    }
    out
}

/// The words of `prompt`, trimmed of what is neither letter nor digit at their ends (not yet
/// lowercased).
fn words(prompt: &str) -> impl Iterator<Item = &str> {
    prompt.split_whitespace().map(|w| w.trim_matches(|c: char| !c.is_alphanumeric())).filter(|w| !w.is_empty())
}

/// Jaccard similarity of two sorted, deduplicated sets: |A ∩ B| / |A ∪ B| (1 for two empty
/// sets).
pub fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    let (mut i, mut j, mut both) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                both += 1;
                i += 1;
                j += 1;
            }
        }
    }
    let union = a.len() + b.len() - both;
    if union == 0 {
        1.0
    } else {
        both as f64 / union as f64
    }
}

/// What is remembered of a prompt: hashes only.
#[derive(Debug, Clone, PartialEq)]
pub struct Fingerprint {
    /// Hash of the whole normalised prompt.
    exact: u64,
    /// Sorted, distinct hashes of its first [`MAX_WORDS`] normalised words; `None` where only
    /// exact matches may be detected.
    words: Option<Box<[u64]>>,
}

impl Fingerprint {
    /// How similar two prompts are, in [0, 1]: 1 when their normalised forms are the same,
    /// else the Jaccard similarity of their word sets (0 when either kept none).
    pub fn similarity(&self, other: &Fingerprint) -> f64 {
        if self.exact == other.exact {
            return 1.0;
        }
        match (&self.words, &other.words) {
            (Some(a), Some(b)) => jaccard(a, b),
            _ => 0.0,
        }
    }
}

/// One remembered request.
struct Remembered {
    route: u64,
    at: Instant,
    trace_id: u128,
    prompt: Fingerprint,
}

#[derive(Default)]
struct TenantUsers {
    rings: HashMap<u64, VecDeque<Remembered>>,
    /// End users in the order first remembered (the eviction order).
    order: VecDeque<u64>,
}

/// One request seen by [`PromptMemory::observe`].
pub struct Seen<'a> {
    /// The key's tenant (`""` without keys).
    pub tenant: &'a str,
    /// The OpenAI `user` field, else the key's name.
    pub end_user: &'a str,
    /// The matched route's name.
    pub route: &'a str,
    /// What an edit or variation was made from (a hash of its input images and mask; 0 for a
    /// generation): the same prompt on other images is another request, not a regeneration.
    pub inputs: u64,
    /// The prompt as sent (normalised here, never kept).
    pub prompt: &'a str,
    /// Only exact matches, and no word hashes kept (`record_prompt` is not `"full"`).
    pub exact_only: bool,
    /// The route's `regeneration_window_secs`; zero: neither detected nor remembered.
    pub window: Duration,
    /// The route's `regeneration_similarity`.
    pub threshold: f64,
    /// This request's trace id (32 hex digits).
    pub trace_id: &'a str,
    /// When the request arrived.
    pub now: Instant,
}

/// The recent prompts of every tenant and end user, bounded ([`RING`], [`PER_TENANT`],
/// [`MAX_USERS`]); never backed by the store.
pub struct PromptMemory {
    keys: RandomState,
    shards: Box<[Mutex<HashMap<u64, TenantUsers>>]>,
    users: AtomicUsize,
    per_tenant: usize,
    max_users: usize,
}

impl Default for PromptMemory {
    fn default() -> Self {
        Self::with_limits(PER_TENANT, MAX_USERS)
    }
}

impl PromptMemory {
    /// A memory holding at most `per_tenant` end users per tenant and `max_users` in all.
    pub fn with_limits(per_tenant: usize, max_users: usize) -> PromptMemory {
        PromptMemory {
            keys: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            users: AtomicUsize::new(0),
            per_tenant: per_tenant.max(1),
            max_users: max_users.max(1),
        }
    }

    /// End users remembered now, across tenants.
    pub fn users(&self) -> usize {
        self.users.load(Ordering::Relaxed)
    }

    /// The fingerprint of `prompt`; `None` when it has no words.
    pub fn fingerprint(&self, prompt: &str, exact_only: bool) -> Option<Fingerprint> {
        let mut exact = self.keys.build_hasher();
        let mut set = Vec::new();
        let mut n = 0usize;
        for w in words(prompt) {
            let mut h = self.keys.build_hasher();
            for c in w.chars().flat_map(char::to_lowercase) {
                h.write_u32(c as u32);
            }
            let word = h.finish();
            exact.write_u64(word);
            n += 1;
            if !exact_only && set.len() < MAX_WORDS {
                set.push(word);
            }
        }
        if n == 0 {
            return None;
        }
        let words = (!exact_only).then(|| {
            set.sort_unstable();
            set.dedup();
            set.into_boxed_slice()
        });
        Some(Fingerprint { exact: exact.finish(), words })
    }

    /// Remembers `seen` and returns the earlier request it regenerates, if any: the most
    /// similar (the newest among equals) of the same tenant, end user and route within the
    /// window whose similarity reaches the threshold, as (trace id, similarity).
    pub fn observe(&self, seen: &Seen<'_>) -> Option<(String, f64)> {
        if seen.window.is_zero() {
            return None;
        }
        let trace_id = u128::from_str_radix(seen.trace_id, 16).ok()?;
        let prompt = self.fingerprint(seen.prompt, seen.exact_only)?;
        let tenant = self.keys.hash_one(seen.tenant);
        let user = self.keys.hash_one(seen.end_user);
        let route = self.keys.hash_one((seen.route, seen.inputs));
        let mut shard = crate::lock(&self.shards[tenant as usize % SHARDS]);
        let users = shard.entry(tenant).or_default();
        let mut found: Option<(u128, f64)> = None;
        if let Some(ring) = users.rings.get(&user) {
            for r in ring.iter().rev() {
                let fresh = seen.now.saturating_duration_since(r.at) <= seen.window;
                if r.route != route || !fresh || r.trace_id == trace_id {
                    continue;
                }
                let s = r.prompt.similarity(&prompt);
                if s >= seen.threshold && found.is_none_or(|(_, best)| s > best) {
                    found = Some((r.trace_id, s));
                }
            }
        }
        let entry = Remembered { route, at: seen.now, trace_id, prompt };
        if let Some(ring) = users.rings.get_mut(&user) {
            if ring.len() >= RING {
                ring.pop_front();
            }
            ring.push_back(entry);
        } else {
            let full_tenant = users.rings.len() >= self.per_tenant;
            let full = self.users.load(Ordering::Relaxed) >= self.max_users;
            if full_tenant || full {
                // Room is made by forgetting this tenant's oldest end user; a tenant with none
                // is not remembered while the memory is full.
                if let Some(old) = users.order.pop_front() {
                    users.rings.remove(&old);
                    self.users.fetch_sub(1, Ordering::Relaxed);
                }
            }
            if users.rings.len() < self.per_tenant && self.users.load(Ordering::Relaxed) < self.max_users {
                users.rings.insert(user, VecDeque::from([entry]));
                users.order.push_back(user);
                self.users.fetch_add(1, Ordering::Relaxed);
            }
        }
        if users.rings.is_empty() {
            shard.remove(&tenant);
        }
        found.map(|(id, s)| (crate::hex_lower(&id.to_be_bytes()), s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0000000000000000000000000000000a";
    const B: &str = "0000000000000000000000000000000b";
    const C: &str = "0000000000000000000000000000000c";

    fn seen<'a>(
        tenant: &'a str,
        user: &'a str,
        route: &'a str,
        prompt: &'a str,
        id: &'a str,
        now: Instant,
    ) -> Seen<'a> {
        Seen {
            tenant,
            end_user: user,
            route,
            inputs: 0,
            prompt,
            exact_only: false,
            window: Duration::from_secs(600),
            threshold: 0.8,
            trace_id: id,
            now,
        }
    }

    #[test]
    fn normalisation_lowercases_collapses_whitespace_and_trims_punctuation() {
        assert_eq!(normalise("  A Red\u{3000}FOX,\tin the  \"snow\"!! "), "a red fox in the snow");
        assert_eq!(normalise("Ärger über ÉCOLE"), "ärger über école");
        assert_eq!(normalise("don't stop -- state-of-the-art"), "don't stop state-of-the-art");
        assert_eq!(normalise(" ... !!! "), "");
    }

    #[test]
    fn similarity_is_jaccard_of_word_sets() {
        let m = PromptMemory::default();
        let fp = |p: &str| m.fingerprint(p, false).unwrap();
        let fox = fp("a red fox in the snow");
        assert_eq!(fox.similarity(&fp("A red FOX in the snow!")), 1.0);
        // 6 shared words of 7 distinct.
        assert_eq!(fox.similarity(&fp("a red fox in the snow please")), 6.0 / 7.0);
        // {a, fox} shared of {a, red, blue, fox}.
        assert_eq!(fp("a red fox").similarity(&fp("a blue fox")), 2.0 / 4.0);
        assert_eq!(fp("a red fox").similarity(&fp("an old car")), 0.0);
        assert_eq!(fp("fox fox red").similarity(&fp("red fox")), 1.0, "sets: repeats do not count");
        assert_eq!(m.fingerprint("?!", false), None);
        // Exact-only fingerprints keep no words: only the same normalised prompt matches.
        let exact = |p: &str| m.fingerprint(p, true).unwrap();
        assert_eq!(exact("a red fox").similarity(&exact("A red fox.")), 1.0);
        assert_eq!(exact("a red fox in the snow").similarity(&exact("a red fox in the snow please")), 0.0);
        assert_eq!(exact("a red fox").words, None);
        assert_eq!(jaccard(&[], &[]), 1.0);
        assert_eq!(jaccard(&[1, 2, 3], &[2, 3, 4]), 0.5);
    }

    #[test]
    fn a_near_identical_prompt_within_the_window_is_a_regeneration() {
        let m = PromptMemory::default();
        let t0 = Instant::now();
        assert_eq!(m.observe(&seen("acme", "u1", "main", "a red fox in the snow", A, t0)), None);
        let t1 = t0 + Duration::from_secs(30);
        let found = m.observe(&seen("acme", "u1", "main", "A red fox in the snow, please!", B, t1));
        assert_eq!(found, Some((A.to_string(), 6.0 / 7.0)));
        // The newest of equally similar earlier requests.
        let found = m.observe(&seen("acme", "u1", "main", "a red fox in the snow please", C, t1));
        assert_eq!(found, Some((B.to_string(), 1.0)));
    }

    #[test]
    fn not_across_tenants_users_routes_or_outside_the_window() {
        let m = PromptMemory::default();
        let t0 = Instant::now();
        let p = "a red fox in the snow";
        assert_eq!(m.observe(&seen("acme", "u1", "main", p, A, t0)), None);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(m.observe(&seen("globex", "u1", "main", p, B, t1)), None, "another tenant");
        assert_eq!(m.observe(&seen("acme", "u2", "main", p, B, t1)), None, "another end user");
        assert_eq!(m.observe(&seen("acme", "u1", "other", p, B, t1)), None, "another route");
        assert_eq!(m.observe(&seen("acme", "u1", "main", "a blue car at night", B, t1)), None, "dissimilar");
        let late = t0 + Duration::from_secs(601);
        // Only the request at t0 had this prompt on route main (B's similar ones were elsewhere).
        let m2 = PromptMemory::default();
        assert_eq!(m2.observe(&seen("acme", "u1", "main", p, A, t0)), None);
        assert_eq!(m2.observe(&seen("acme", "u1", "main", p, B, late)), None, "outside the window");
        // A zero window neither detects nor remembers.
        let off = Seen { window: Duration::ZERO, ..seen("acme", "u9", "main", p, A, t0) };
        assert_eq!(m2.observe(&off), None);
        assert_eq!(m2.users(), 1);
    }

    #[test]
    fn exact_only_routes_detect_only_the_same_prompt() {
        let m = PromptMemory::default();
        let t0 = Instant::now();
        let s = |p: &'static str, id: &'static str| Seen { exact_only: true, ..seen("acme", "u1", "main", p, id, t0) };
        assert_eq!(m.observe(&s("a red fox in the snow", A)), None);
        assert_eq!(m.observe(&s("a red fox in the snow please", B)), None);
        assert_eq!(m.observe(&s("A red fox in the SNOW.", C)), Some((A.to_string(), 1.0)));
    }

    #[test]
    fn memory_is_bounded_per_tenant_and_in_all() {
        let m = PromptMemory::with_limits(3, 5);
        let t0 = Instant::now();
        let id = |n: u32| format!("{n:032x}");
        for u in 0..10u32 {
            m.observe(&seen("acme", &format!("u{u}"), "main", "a red fox", &id(u + 1), t0));
        }
        assert_eq!(m.users(), 3, "at most 3 end users of one tenant");
        // The oldest were forgotten: u0 is new again, u9 is remembered.
        assert_eq!(m.observe(&seen("acme", "u0", "main", "a red fox", &id(100), t0)), None);
        assert_eq!(m.observe(&seen("acme", "u9", "main", "a red fox", &id(101), t0)), Some((id(10), 1.0)));
        for u in 0..3u32 {
            m.observe(&seen("globex", &format!("u{u}"), "main", "a red fox", &id(200 + u), t0));
        }
        assert_eq!(m.users(), 5, "at most 5 in all");
        // Each end user keeps only its RING newest prompts.
        let m = PromptMemory::default();
        for n in 0..(RING as u32 + 2) {
            m.observe(&seen("acme", "u1", "main", &format!("prompt number {n}"), &id(n + 1), t0));
        }
        assert_eq!(m.observe(&seen("acme", "u1", "main", "prompt number 0", &id(50), t0)), None, "forgotten");
        let newest = format!("prompt number {}", RING + 1);
        assert_eq!(m.observe(&seen("acme", "u1", "main", &newest, &id(51), t0)), Some((id(RING as u32 + 2), 1.0)));
    }
}
