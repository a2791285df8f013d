//! `Idempotency-Key` across replicas: one Redis entry per (tenant, key), first a lease (the
//! leader's, with a lifetime, so a replica that dies frees it), then the finished answer, kept
//! for the retention window when it fits the size cap. A replica that finds a lease waits,
//! polling, for the answer; when the leader gives up, the next to look leads.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};

use super::{lua, Cluster, Unavailable};
use crate::idempotency::Stored;

/// How often a replica looks again while another one's request with the same key runs.
const POLL: Duration = Duration::from_millis(25);

/// The longest an in-flight lease lives without a renewal: its leader renews it every third of
/// this while it runs, so a lease whose replica died frees its key within this (the policy's
/// `lease_secs` when shorter), and the requests waiting on it go on. A trial saw a retry wait
/// 233 s for a dead replica's 300 s lease.
const IDEM_LEASE: Duration = Duration::from_secs(15);

/// What [`Cluster::idem_begin`] decided for one request.
#[derive(Debug)]
pub enum IdemBegin {
    /// First with this key: run the request, then complete the lease.
    Leader(SharedLease),
    /// Done (possibly by another replica, possibly while we waited): answer with this.
    Replay { stored: Arc<Stored>, waited: bool },
    /// Same key, another request body.
    Conflict,
}

/// The leader's hold on a shared key. Finish it with [`SharedLease::complete`]; dropped
/// unfinished, it is given up in the background so another request may run.
#[derive(Debug)]
pub struct SharedLease {
    cluster: Arc<Cluster>,
    key: String,
    lease: Vec<u8>,
    fingerprint: [u8; 32],
    done: bool,
    /// The task that renews the lease every third of its lifetime while the leader runs, so a
    /// lease outlives its leader by at most `lease_secs` (a replica that dies stops renewing).
    renew: tokio::task::AbortHandle,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("mode", &self.status().mode).finish()
    }
}

impl Cluster {
    /// Starts or joins the request `key` of tenant `scope` with this body fingerprint,
    /// cluster-wide; waits while another replica's request with the key and fingerprint runs.
    /// `Err(Unavailable)` when Redis fails, also while waiting (the caller then uses its local
    /// store). The caller's request deadline bounds the wait.
    pub async fn idem_begin(
        self: &Arc<Self>,
        scope: &str,
        key: &str,
        fingerprint: [u8; 32],
    ) -> Result<IdemBegin, Unavailable> {
        let entry = self.key(&["idem", &hex::encode(scope), key]);
        let mut lease = Vec::with_capacity(64);
        lease.push(b'L');
        lease.extend_from_slice(&fingerprint);
        lease.extend_from_slice(self.replica.as_bytes());
        lease.extend_from_slice(
            format!("-{}", self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed)).as_bytes(),
        );
        let mut waited = false;
        loop {
            let mut inv = lua::IDEM_BEGIN.prepare_invoke();
            inv.key(&entry).arg(&lease[..]).arg(self.idem_lease().as_millis() as u64);
            let inv = &inv;
            let found: Option<Vec<u8>> =
                self.call("idempotency", |mut c| async move { inv.invoke_async(&mut c).await }).await?;
            let Some(v) = found else {
                let renew = self.renew_lease(entry.clone(), lease.clone());
                return Ok(IdemBegin::Leader(SharedLease {
                    cluster: self.clone(),
                    key: entry,
                    lease,
                    fingerprint,
                    done: false,
                    renew,
                }));
            };
            if v.len() < 33 {
                self.failed("idempotency", "an idempotency entry that is not the gateway's".into());
                return Err(Unavailable);
            }
            if v[1..33] != fingerprint {
                return Ok(IdemBegin::Conflict);
            }
            match v[0] {
                b'D' => match decode(&v[33..]) {
                    Some(stored) => return Ok(IdemBegin::Replay { stored: Arc::new(stored), waited }),
                    None => {
                        self.failed("idempotency", "a stored answer that cannot be read".into());
                        return Err(Unavailable);
                    }
                },
                _ => {
                    waited = true;
                    tokio::time::sleep(POLL).await;
                }
            }
        }
    }
}

impl Cluster {
    /// An in-flight lease's lifetime without renewal: [`IDEM_LEASE`], or `lease_secs` when
    /// shorter.
    fn idem_lease(&self) -> Duration {
        self.settings.lease.min(IDEM_LEASE)
    }

    /// Starts renewing the lease `lease` on `key` every third of its lifetime, until aborted or
    /// the lease is no longer this one (a renewal that fails is tried again at the next turn).
    fn renew_lease(self: &Arc<Self>, key: String, lease: Vec<u8>) -> tokio::task::AbortHandle {
        let c = self.clone();
        let every = (self.idem_lease() / 3).max(Duration::from_millis(100));
        let handle = match tokio::runtime::Handle::try_current() {
            Ok(h) => h,
            Err(_) => self.rt.clone(),
        };
        handle
            .spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let mut inv = lua::IDEM_RENEW.prepare_invoke();
                    inv.key(&key).arg(&lease[..]).arg(c.idem_lease().as_millis() as u64);
                    let inv = &inv;
                    let renewed =
                        c.call("idempotency", |mut conn| async move { inv.invoke_async::<i64>(&mut conn).await });
                    if renewed.await == Ok(0) {
                        return; // another replica's now, or finished: nothing left to renew
                    }
                }
            })
            .abort_handle()
    }
}

impl SharedLease {
    /// Ends the leader's request: `Some(answer)` keeps it for `ttl` when its body is at most
    /// `max_bytes` (else as `None`); `None` forgets the key so the next try runs anew.
    pub async fn complete(mut self, answer: Option<&Stored>, ttl: Duration, max_bytes: usize) {
        self.done = true;
        self.renew.abort();
        let value = match answer.filter(|a| a.body.len() <= max_bytes) {
            Some(a) => encode(self.fingerprint, a),
            None => Vec::new(),
        };
        finish(&self.cluster, &self.key, &self.lease, &value, ttl).await;
    }
}

impl Drop for SharedLease {
    fn drop(&mut self) {
        self.renew.abort();
        if !self.done {
            let (c, key, lease) =
                (self.cluster.clone(), std::mem::take(&mut self.key), std::mem::take(&mut self.lease));
            self.cluster.spawn(async move { finish(&c, &key, &lease, &[], Duration::ZERO).await });
        }
    }
}

async fn finish(c: &Cluster, key: &str, lease: &[u8], value: &[u8], ttl: Duration) {
    let mut inv = lua::IDEM_FINISH.prepare_invoke();
    inv.key(key).arg(lease).arg(value).arg(ttl.as_millis().max(1) as u64);
    // A failure leaves the lease to expire; waiters then run the request themselves.
    let inv = &inv;
    let _ = c.call("idempotency", |mut conn| async move { inv.invoke_async::<i64>(&mut conn).await }).await;
}

/// `D`, the fingerprint, the status (u16), the header count (u16), each header as name length
/// (u16), name, value length (u32), value; then the body.
fn encode(fingerprint: [u8; 32], a: &Stored) -> Vec<u8> {
    let mut v = Vec::with_capacity(a.body.len() + 64 + a.headers.len() * 48);
    v.push(b'D');
    v.extend_from_slice(&fingerprint);
    v.extend_from_slice(&a.status.as_u16().to_be_bytes());
    v.extend_from_slice(&(a.headers.len().min(u16::MAX as usize) as u16).to_be_bytes());
    for (k, val) in a.headers.iter().take(u16::MAX as usize) {
        v.extend_from_slice(&(k.as_str().len() as u16).to_be_bytes());
        v.extend_from_slice(k.as_str().as_bytes());
        v.extend_from_slice(&(val.len() as u32).to_be_bytes());
        v.extend_from_slice(val.as_bytes());
    }
    v.extend_from_slice(&a.body);
    v
}

/// The answer [`encode`] wrote (after its tag and fingerprint); `None` when malformed.
fn decode(mut b: &[u8]) -> Option<Stored> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Some(head)
    }
    let status = StatusCode::from_u16(u16::from_be_bytes(take(&mut b, 2)?.try_into().ok()?)).ok()?;
    let n = u16::from_be_bytes(take(&mut b, 2)?.try_into().ok()?);
    let mut headers = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let kl = u16::from_be_bytes(take(&mut b, 2)?.try_into().ok()?) as usize;
        let k = HeaderName::from_bytes(take(&mut b, kl)?).ok()?;
        let vl = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
        let v = HeaderValue::from_bytes(take(&mut b, vl)?).ok()?;
        headers.push((k, v));
    }
    Some(Stored { status, headers, body: Bytes::copy_from_slice(b) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_survives_encoding() {
        let a = Stored {
            status: StatusCode::OK,
            headers: vec![
                (http::header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
                (HeaderName::from_static("x-acc-trace-id"), HeaderValue::from_static("0123")),
            ],
            body: Bytes::from_static(b"{\"data\":[]}"),
        };
        let v = encode([7; 32], &a);
        assert_eq!((v[0], &v[1..33]), (b'D', &[7u8; 32][..]));
        let b = decode(&v[33..]).unwrap();
        assert_eq!((b.status, b.headers, b.body), (a.status, a.headers, a.body));
        assert!(decode(&v[33..40]).is_none(), "a truncated entry is refused");
    }
}
