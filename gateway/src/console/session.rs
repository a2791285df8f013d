//! Console sessions: signed in with the admin token, kept server-side in memory with an
//! expiry, named by a random id in a cookie (`HttpOnly`, `SameSite=Strict`, `Path=/console`,
//! `Max-Age`, `Secure` when the admin listener serves TLS). Each session has its own CSRF
//! token, which every state-changing form carries.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The session cookie's name.
pub const COOKIE: &str = "acc_console";

/// How long a session lasts after sign-in (no sliding renewal: sign in again after).
pub const TTL: Duration = Duration::from_secs(8 * 3600);

/// Sessions kept at most; signing in beyond it drops the expired ones, then the oldest.
const MAX_SESSIONS: usize = 1024;

/// One signed-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// The token every POST form of this session carries (64 hex digits).
    pub csrf: String,
    /// Who decides reviews from this session (given at sign-in; "console" when left empty).
    pub reviewer: String,
    /// When it was made and when it ends.
    pub created: Instant,
    pub expires: Instant,
}

/// The sessions of one admin listener.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    /// Held through each sign-in attempt, and through a pause after a wrong token: guesses are
    /// serialized, at most about one per [`FAILED_SIGN_IN_DELAY`] on this listener.
    pub sign_in: tokio::sync::Mutex<()>,
    /// Sign-in attempts in the line (waiting or being checked), at most [`SIGN_IN_LINE`].
    waiting: std::sync::atomic::AtomicUsize,
}

/// Sign-in attempts that may wait in line at once; more are refused at once (429).
pub const SIGN_IN_LINE: usize = 8;

/// A place in the sign-in line, given back when dropped.
pub struct Place<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The pause after a wrong token, sign-in attempts waiting behind it.
pub const FAILED_SIGN_IN_DELAY: Duration = Duration::from_secs(1);

/// 64 hex digits from the operating system's random generator (two v4 UUIDs: 244 random bits).
pub fn random_token() -> String {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    format!("{}{}", a.simple(), b.simple())
}

/// Compares two secrets through their SHA-256 digests, so the time taken does not depend on
/// where they first differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    Sha256::digest(a.as_bytes()) == Sha256::digest(b.as_bytes())
}

impl Sessions {
    /// Starts a session for `reviewer`; returns its id (the cookie's value) and the session.
    pub fn create(&self, reviewer: &str) -> (String, Session) {
        let now = Instant::now();
        let id = random_token();
        let session =
            Session { csrf: random_token(), reviewer: reviewer.to_string(), created: now, expires: now + TTL };
        let mut map = crate::lock(&self.map);
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| s.expires > now);
            while map.len() >= MAX_SESSIONS {
                let oldest = map.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| k.clone());
                match oldest {
                    Some(k) => map.remove(&k),
                    None => break,
                };
            }
        }
        map.insert(id.clone(), session.clone());
        (id, session)
    }

    /// The live session named `id`; an expired one is removed and `None` answered.
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut map = crate::lock(&self.map);
        match map.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    /// A place in the sign-in line, or `None` when [`SIGN_IN_LINE`] attempts already wait.
    pub fn join_sign_in_line(&self) -> Option<Place<'_>> {
        use std::sync::atomic::Ordering;
        let before = self.waiting.fetch_add(1, Ordering::SeqCst);
        let place = Place(&self.waiting);
        (before < SIGN_IN_LINE).then_some(place)
    }

    /// Ends the session named `id` (sign-out).
    pub fn remove(&self, id: &str) {
        crate::lock(&self.map).remove(id);
    }
}

/// The session id in a request's `Cookie` headers, if any.
pub fn cookie_value(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == COOKIE)
        .map(|c| c.value().to_string())
}

/// The `Set-Cookie` value that stores `id` for [`TTL`] (`id` = None: the one that clears it).
pub fn set_cookie(id: Option<&str>, secure: bool) -> String {
    let mut c = cookie::Cookie::build((COOKIE, id.unwrap_or("").to_string()))
        .path("/console")
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .secure(secure);
    c = match id {
        Some(_) => c.max_age(cookie::time::Duration::seconds(TTL.as_secs() as i64)),
        None => c.max_age(cookie::time::Duration::ZERO),
    };
    c.build().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_attributes() {
        let c = set_cookie(Some("abc"), false);
        assert!(c.starts_with("acc_console=abc"), "{c}");
        for attr in ["HttpOnly", "SameSite=Strict", "Path=/console", "Max-Age=28800"] {
            assert!(c.contains(attr), "{c} lacks {attr}");
        }
        assert!(!c.contains("Secure"), "{c}");
        assert!(set_cookie(Some("abc"), true).contains("Secure"));
        assert!(set_cookie(None, false).contains("Max-Age=0"));
    }

    #[test]
    fn sessions_expire_and_end() {
        let s = Sessions::default();
        let (id, sess) = s.create("ana");
        assert_eq!(id.len(), 64);
        assert_ne!(id, sess.csrf);
        assert_eq!(s.get(&id).map(|x| x.csrf), Some(sess.csrf));
        assert!(s.get("nope").is_none());
        s.remove(&id);
        assert!(s.get(&id).is_none());
    }

    #[test]
    fn an_expired_session_is_refused_and_dropped() {
        let s = Sessions::default();
        let (id, _) = s.create("ana");
        crate::lock(&s.map).get_mut(&id).unwrap().expires = Instant::now() - Duration::from_secs(1);
        assert!(s.get(&id).is_none(), "expired");
        assert!(crate::lock(&s.map).is_empty(), "and dropped");
    }

    #[test]
    fn sessions_are_capped_the_oldest_dropped() {
        let s = Sessions::default();
        let (first, _) = s.create("first");
        let ids: Vec<String> = (0..MAX_SESSIONS + 10).map(|i| s.create(&format!("r{i}")).0).collect();
        assert_eq!(crate::lock(&s.map).len(), MAX_SESSIONS);
        assert!(s.get(&first).is_none(), "the oldest went first");
        assert!(s.get(ids.last().unwrap()).is_some(), "the newest stays");
    }

    #[test]
    fn the_sign_in_line_is_bounded() {
        let s = Sessions::default();
        let places: Vec<_> = (0..SIGN_IN_LINE).map(|_| s.join_sign_in_line().expect("a place")).collect();
        assert!(s.join_sign_in_line().is_none(), "the line is full");
        drop(places);
        assert!(s.join_sign_in_line().is_some(), "places are given back");
    }

    #[test]
    fn cookie_is_found_among_others() {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::COOKIE, "a=1; acc_console=xyz; b=2".parse().unwrap());
        assert_eq!(cookie_value(&h).as_deref(), Some("xyz"));
    }
}
