//! What requests may hold while they are received and handled, beyond the gateway-wide
//! in-flight limit: memory for request bodies, all requests together ([`BodyBudget`]), and each
//! tenant's share of requests in flight ([`TenantSlots`]). Both are counters released by guards
//! when the request ends, however it ends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

/// Bytes of request bodies held in memory now, all requests together.
#[derive(Debug, Default)]
pub struct BodyBudget {
    held: AtomicUsize,
}

/// Part of the [`BodyBudget`] held by one request's body; released when dropped.
#[derive(Debug)]
pub struct BodyHold<'a> {
    budget: &'a BodyBudget,
    bytes: usize,
}

impl BodyBudget {
    /// An empty hold, to grow as the body arrives.
    pub fn hold(&self) -> BodyHold<'_> {
        BodyHold { budget: self, bytes: 0 }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

impl BodyHold<'_> {
    /// Takes `n` more bytes; `false` (and nothing taken) when that would put all bodies together
    /// over `max` bytes.
    pub fn grow(&mut self, n: usize, max: usize) -> bool {
        let taken = self.budget.held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
            held.checked_add(n).filter(|&total| total <= max)
        });
        if taken.is_ok() {
            self.bytes += n;
        }
        taken.is_ok()
    }
}

impl Drop for BodyHold<'_> {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Requests in flight per tenant (only for tenants whose policy bounds them).
#[derive(Debug, Default)]
pub struct TenantSlots {
    in_flight: DashMap<String, Arc<AtomicUsize>>,
}

/// One request's slot of its tenant; released when dropped.
#[derive(Debug)]
pub struct TenantSlot(Arc<AtomicUsize>);

impl TenantSlots {
    /// A slot for one more request of `tenant`; `None` when `max` are already in flight.
    pub fn enter(&self, tenant: &str, max: u32) -> Option<TenantSlot> {
        let counter = match self.in_flight.get(tenant) {
            Some(c) => c.clone(),
            None => self.in_flight.entry(tenant.to_string()).or_default().clone(),
        };
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max as usize).then_some(n + 1))
            .ok()
            .map(|_| TenantSlot(counter))
    }

    /// Requests of `tenant` in flight now.
    pub fn in_flight(&self, tenant: &str) -> usize {
        self.in_flight.get(tenant).map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_share_one_budget_and_give_it_back() {
        let budget = BodyBudget::default();
        let mut a = budget.hold();
        assert!(a.grow(60, 100));
        let mut b = budget.hold();
        assert!(!b.grow(50, 100), "60 + 50 is over 100");
        assert!(b.grow(40, 100));
        assert_eq!(budget.held(), 100);
        drop(a);
        assert_eq!(budget.held(), 40);
        drop(b);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_tenant_gets_at_most_its_share() {
        let slots = TenantSlots::default();
        let first = slots.enter("acme", 2).unwrap();
        let _second = slots.enter("acme", 2).unwrap();
        assert!(slots.enter("acme", 2).is_none());
        assert!(slots.enter("other", 2).is_some(), "tenants are counted apart");
        drop(first);
        assert_eq!(slots.in_flight("acme"), 1);
        assert!(slots.enter("acme", 2).is_some());
    }
}
