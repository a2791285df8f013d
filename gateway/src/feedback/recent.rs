//! What feedback needs to know of the most recent traces, in memory: a trace's record may still
//! wait in the writer's queue (it is batched every 200 ms) when the app rates it, so each
//! finished request's essentials are kept here, the newest [`CAPACITY`] of them; older traces
//! are read from the store.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::store::TraceRecord;

/// Traces kept, the newest.
pub const CAPACITY: usize = 16_384;
const SHARDS: usize = 16;

/// The fields of a trace that feedback and regeneration links need.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecentTrace {
    /// The client key's tenant.
    pub tenant: Option<String>,
    /// The matched route.
    pub route: Option<String>,
    /// `x-acc-cohort` as sent.
    pub cohort: Option<String>,
    /// `x-acc-prompt-template` as sent.
    pub prompt_template: Option<String>,
    /// `x-acc-asset-type` as sent.
    pub asset_type: Option<String>,
    /// The provider whose answer was returned (the last successful attempt's).
    pub provider: Option<String>,
    /// Images returned.
    pub images: usize,
}

impl RecentTrace {
    /// The essentials of `rec`.
    pub fn of(rec: &TraceRecord) -> RecentTrace {
        RecentTrace {
            tenant: rec.tenant.clone(),
            route: rec.route.clone(),
            cohort: rec.cohort.clone(),
            prompt_template: rec.prompt_template.clone(),
            asset_type: rec.asset_type.clone(),
            provider: rec.attempts.iter().rev().find(|a| a.result == "ok").map(|a| a.provider.clone()),
            images: images_of(rec),
        }
    }
}

/// How many images a trace's answer has: those returned, or, for an answer held for review
/// (returned later, if approved: its record lists none), those its last successful attempt's
/// evaluations name.
fn images_of(rec: &TraceRecord) -> usize {
    if !rec.images.is_empty() || rec.decision != "review" {
        return rec.images.len();
    }
    rec.attempts
        .iter()
        .rev()
        .find(|a| a.result == "ok")
        .and_then(|a| a.evaluations.iter().map(|e| e.image + 1).max())
        .unwrap_or(0)
}

#[derive(Default)]
struct Shard {
    map: HashMap<u128, Arc<RecentTrace>>,
    order: VecDeque<u128>,
}

/// The newest traces' essentials by trace id, bounded ([`CAPACITY`]).
pub struct RecentTraces {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
}

impl Default for RecentTraces {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl RecentTraces {
    /// An index of at most about `capacity` traces.
    pub fn with_capacity(capacity: usize) -> RecentTraces {
        RecentTraces {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
        }
    }

    fn shard(&self, id: u128) -> &Mutex<Shard> {
        &self.shards[(id as usize) % SHARDS]
    }

    /// Keeps `trace`'s essentials under `trace_id` (32 hex digits; anything else is ignored),
    /// forgetting the oldest of its shard when full. A trace id seen again is replaced (a
    /// client that continues one trace: its newest record).
    pub fn insert(&self, trace_id: &str, trace: RecentTrace) {
        let Ok(id) = u128::from_str_radix(trace_id, 16) else { return };
        let mut s = crate::lock(self.shard(id));
        // A client may continue any W3C trace, another tenant's too: the trace stays the first
        // tenant's, and another tenant's request carrying its id changes nothing here.
        if s.map.get(&id).is_some_and(|old| old.tenant != trace.tenant) {
            return;
        }
        if s.map.insert(id, Arc::new(trace)).is_none() {
            s.order.push_back(id);
            while s.order.len() > self.per_shard {
                if let Some(old) = s.order.pop_front() {
                    s.map.remove(&old);
                }
            }
        }
    }

    /// The essentials of `trace_id`, while it is among the newest.
    pub fn get(&self, trace_id: &str) -> Option<Arc<RecentTrace>> {
        let id = u128::from_str_radix(trace_id, 16).ok()?;
        crate::lock(self.shard(id)).map.get(&id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_and_forgets_the_oldest() {
        let r = RecentTraces::with_capacity(32);
        let id = |n: u128| format!("{:032x}", n);
        for n in 0..200u128 {
            r.insert(&id(n), RecentTrace { images: n as usize, ..RecentTrace::default() });
        }
        let kept = (0..200u128).filter(|&n| r.get(&id(n)).is_some()).count();
        assert_eq!(kept, 32, "2 per shard of 16");
        assert_eq!(r.get(&id(199)).map(|t| t.images), Some(199));
        assert_eq!(r.get(&id(0)), None);
        assert_eq!(r.get("not a trace id"), None);
        r.insert(&id(199), RecentTrace { images: 7, ..RecentTrace::default() });
        assert_eq!(r.get(&id(199)).map(|t| t.images), Some(7), "replaced");
    }
}
