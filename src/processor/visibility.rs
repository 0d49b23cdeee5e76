//! Visibility: the policy in force, and a business's opt-in services.

use tracing::info;

use super::{Processor, ProcessorError};
use crate::ids::BusinessId;
use crate::transport::Principal;
use crate::visibility::VisibilityPolicy;

impl Processor {
    /// The visibility policy in force (operators only).
    pub fn visibility_policy(
        &self,
        principal: &Principal,
    ) -> Result<VisibilityPolicy, ProcessorError> {
        self.authorize_operator(principal)?;
        Ok(self.gate.policy())
    }

    /// Put a visibility policy in force (operators only); one that would
    /// break a hard rule is refused. Audited ([`Change::Policy`](crate::visibility::Change)).
    pub fn set_visibility_policy(
        &self,
        principal: &Principal,
        policy: VisibilityPolicy,
    ) -> Result<(), ProcessorError> {
        self.authorize_operator(principal)?;
        self.gate.replace_policy(policy, principal.name())?;
        info!(principal = %principal, "visibility policy replaced");
        Ok(())
    }

    /// `business` enables the opt-in services (an AI assistant, say) for its
    /// data; only a principal acting for it can. Audited
    /// ([`Change::OptIn`](crate::visibility::Change)); kept in memory only,
    /// so a host replays its businesses' choices after a restart.
    pub fn opt_in(
        &self,
        principal: &Principal,
        business: BusinessId,
    ) -> Result<(), ProcessorError> {
        self.authorize(principal, business)?;
        self.gate.set_opted_in(business, true, principal.name())?;
        info!(%business, principal = %principal, "opted in to opt-in services");
        Ok(())
    }

    /// `business` disables the opt-in services again.
    pub fn opt_out(
        &self,
        principal: &Principal,
        business: BusinessId,
    ) -> Result<(), ProcessorError> {
        self.authorize(principal, business)?;
        self.gate.set_opted_in(business, false, principal.name())?;
        info!(%business, principal = %principal, "opted out of opt-in services");
        Ok(())
    }
}
