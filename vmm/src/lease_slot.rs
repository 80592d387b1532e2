//! The write lease `vm.lease` renews, shared between the control loop and the API
//! thread.
//!
//! A renewal is a deadline moved forward in an atomic (`WriteLease::renew`): it needs
//! nothing the control loop owns. Taking it on the API thread means a control loop busy
//! with something long (a migration's stop-and-copy, a pause waiting for vCPUs, building
//! an arriving VM) never makes a clustered VM miss its renewal and fence itself while
//! its host still holds the cluster lease. The control loop keeps the slot pointing at
//! the lease in force: the VM's own, or while a clustered VM arrives, the incoming one.

use std::sync::{Arc, Mutex};

use api::{ApiError, ApiRequest, VmAction};
use devices::block::WriteLease;
use vireo_util::sync::lock;

/// The lease in force and what ran under it.
#[derive(Clone)]
pub struct InForce {
    pub lease: Arc<WriteLease>,
    /// Nothing ran or wrote under it yet (an arriving VM, not built): an expired
    /// deadline may still be renewed ([`WriteLease::renew_unused`]).
    pub unused: bool,
}

impl InForce {
    /// Renews the lease to `deadline_ns` as its use allows.
    pub fn renew(&self, deadline_ns: u64) -> api::ApiResponse {
        let renewed = if self.unused {
            self.lease.renew_unused(deadline_ns)
        } else {
            self.lease.renew(deadline_ns)
        };
        renewed
            .map(|()| None)
            .map_err(|e| ApiError::conflict(e.to_string()))
    }
}

#[derive(Clone, Default)]
pub struct LeaseSlot(Arc<Mutex<Option<InForce>>>);

impl LeaseSlot {
    /// Points the slot at the lease in force (None: this VMM has no lease to renew
    /// now).
    pub fn set(&self, in_force: Option<InForce>) {
        let mut slot = lock(&self.0);
        let same = match (slot.as_ref(), in_force.as_ref()) {
            (Some(a), Some(b)) => Arc::ptr_eq(&a.lease, &b.lease) && a.unused == b.unused,
            (None, None) => true,
            _ => false,
        };
        if !same {
            *slot = in_force;
        }
    }

    /// Answers `req` here if it renews a lease the slot holds; gives it back otherwise
    /// (no lease yet: the control loop answers, with the reason).
    pub fn try_renew(&self, req: ApiRequest) -> Result<(), ApiRequest> {
        let VmAction::Lease(l) = &req.action else {
            return Err(req);
        };
        let Some(in_force) = lock(&self.0).clone() else {
            return Err(req);
        };
        let result = in_force.renew(l.deadline_monotonic_ns);
        // The client may have gone; the renewal stands either way.
        req.respond(result);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn renew_to(deadline_ns: u64) -> VmAction {
        VmAction::Lease(api::WriteLease {
            deadline_monotonic_ns: deadline_ns,
        })
    }

    fn now_ns() -> u64 {
        devices::block::monotonic_ns()
    }

    #[test]
    fn an_empty_slot_leaves_the_renewal_to_the_control_loop() {
        let slot = LeaseSlot::default();
        let (req, _rx) = ApiRequest::new(renew_to(now_ns() + 1_000_000_000));
        assert!(slot.try_renew(req).is_err());
    }

    #[test]
    fn a_renewal_moves_the_deadline_without_the_control_loop() {
        let lease = Arc::new(WriteLease::new(now_ns() + 1_000_000_000));
        let slot = LeaseSlot::default();
        slot.set(Some(InForce {
            lease: lease.clone(),
            unused: false,
        }));
        let later = now_ns() + 5_000_000_000;
        let (req, mut rx) = ApiRequest::new(renew_to(later));
        assert!(slot.try_renew(req).is_ok());
        assert!(matches!(rx.try_recv(), Ok(Ok(None))));
        assert_eq!(lease.deadline_ns(), later);
    }

    #[test]
    fn an_expired_lease_is_not_renewed() {
        let lease = Arc::new(WriteLease::new(now_ns().saturating_sub(1)));
        let slot = LeaseSlot::default();
        slot.set(Some(InForce {
            lease: lease.clone(),
            unused: false,
        }));
        let (req, mut rx) = ApiRequest::new(renew_to(now_ns() + 5_000_000_000));
        assert!(slot.try_renew(req).is_ok());
        assert!(matches!(rx.try_recv(), Ok(Err(_))));
        assert!(lease.expired());
    }

    #[test]
    fn an_unused_lease_past_its_deadline_takes_a_new_one_still_ahead() {
        let lease = Arc::new(WriteLease::new(now_ns().saturating_sub(1)));
        assert!(lease.expired());
        let slot = LeaseSlot::default();
        slot.set(Some(InForce {
            lease: lease.clone(),
            unused: true,
        }));
        // A deadline already past revives nothing.
        let (req, mut rx) = ApiRequest::new(renew_to(now_ns().saturating_sub(1)));
        assert!(slot.try_renew(req).is_ok());
        assert!(matches!(rx.try_recv(), Ok(Err(_))));
        assert!(lease.expired());
        let later = now_ns() + 5_000_000_000;
        let (req, mut rx) = ApiRequest::new(renew_to(later));
        assert!(slot.try_renew(req).is_ok());
        assert!(matches!(rx.try_recv(), Ok(Ok(None))));
        assert!(!lease.expired());
        assert_eq!(lease.deadline_ns(), later);
    }

    #[test]
    fn other_requests_go_to_the_control_loop() {
        let lease = Arc::new(WriteLease::new(now_ns() + 1_000_000_000));
        let slot = LeaseSlot::default();
        slot.set(Some(InForce {
            lease: lease.clone(),
            unused: false,
        }));
        let (req, _rx) = ApiRequest::new(VmAction::Pause);
        assert!(slot.try_renew(req).is_err());
    }
}
