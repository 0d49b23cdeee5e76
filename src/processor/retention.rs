//! Retention: the sweep, legal holds and the retention policy, for
//! operators.

use std::sync::Arc;

use tracing::{Instrument, debug_span, info, warn};

use super::{Processor, ProcessorError};
use crate::ids::BusinessId;
use crate::keys::Epoch;
use crate::retention::{ExpiryNotifier, Notice, RetentionPolicy, SweepError, SweepReport};
use crate::signal::Sessions;
use crate::store::{ExpiredMessage, Hold, HoldScope, MessageRecord, Status};
use crate::transport::Principal;

/// Drops every peer's Signal state cached in memory when dropped, unless
/// disarmed: after a sweep that deleted stored state or destroyed an epoch
/// key (a device's state, and the key its record is sealed under, may be
/// of an epoch that ended while its consumer keeps other records), or may
/// have.
struct ClearSessions<'a>(Option<&'a Sessions>);

impl Drop for ClearSessions<'_> {
    fn drop(&mut self) {
        if let Some(sessions) = self.0 {
            sessions.clear_cache();
        }
    }
}

/// Reports expired undelivered messages to their businesses for the sweep.
/// A message marked failed whose business could not be told is no longer
/// open: the retransmission loop tells it, as any other failure.
struct FailureNotifier<'a> {
    processor: &'a Processor,
}

#[async_trait::async_trait]
impl ExpiryNotifier for FailureNotifier<'_> {
    async fn expired_undelivered(&self, message: &MessageRecord) -> Notice {
        let p = self.processor;
        let (business, id) = (message.business, message.id);
        // An attempt under way settles it, or the next sweep asks again.
        let _claim = match p.take_up(business, id).await {
            Ok(Some(claim)) => claim,
            Ok(None) => return Notice::Busy,
            Err(e) => {
                warn!(%business, %id, error = %e, "could not fail an expired message");
                return Notice::Untold;
            }
        };
        let failed = match p.storage.message(business, id).await {
            Ok(Some(record)) if record.delivery.status.is_open() => p.fail_expired(&record).await,
            Ok(_) => return Notice::Settled,
            Err(e) => Err(e.into()),
        };
        match failed {
            Ok(true) => Notice::Told,
            Ok(false) => Notice::Untold,
            Err(e) => {
                warn!(%business, %id, error = %e, "could not fail an expired message");
                Notice::Untold
            }
        }
    }

    /// A failure its business was never told is counted in the statistics
    /// now (they count one when it is told, `report_status`).
    fn gave_up(&self, message: &ExpiredMessage) {
        if message.status == Status::Failed {
            let p = self.processor;
            p.statistics.record_message(
                message.business,
                message.phone,
                message.direction,
                crate::integrity::Status::Failed,
                p.clock.now(),
            );
        }
    }
}

impl Processor {
    /// The retention policy in force (operators only: it names every
    /// business with its own periods or region).
    pub fn retention_policy(
        &self,
        principal: &Principal,
    ) -> Result<Arc<RetentionPolicy>, ProcessorError> {
        self.authorize_operator(principal)?;
        Ok(self.retention.policy())
    }

    /// Put a retention policy in force (operators only). Shorter periods
    /// apply to reads at once, and to stored messages from the next sweep.
    /// A policy that lengthens a period is refused
    /// ([`PolicyChangeError::Unapplied`](crate::retention::PolicyChangeError))
    /// until a sweep has applied the one in force to the stored messages:
    /// what a shortening ended stays ended (see
    /// [`Retention::set_policy`](crate::retention::Retention::set_policy)).
    /// The epoch length is the processor's from when it was built: a policy
    /// with another is refused as [`ProcessorError::Config`]. Audited
    /// ([`Change::Retention`](crate::visibility::Change)).
    pub fn set_retention_policy(
        &self,
        principal: &Principal,
        policy: RetentionPolicy,
    ) -> Result<(), ProcessorError> {
        self.authorize_operator(principal)?;
        if policy.epoch_length() != self.retention.policy().epoch_length() {
            return Err(ProcessorError::Config(
                "retention: the epoch length is set when the processor is built".into(),
            ));
        }
        self.retention
            .set_policy(policy, principal.name(), self.clock.now())?;
        info!(principal = %principal, "retention policy replaced");
        Ok(())
    }

    /// Run the retention sweep (operators only): expired undelivered
    /// messages are reported failed to their businesses, then everything
    /// retention no longer allows is deleted or shredded, no Signal state
    /// the sweep deleted stays in memory, and the integrity monitor and the
    /// statistics forget the consumers out of contact for their business's
    /// retention (its longest period, at most the ceiling). One at a
    /// time: a sweep while another is under way (from inside the business
    /// it tells, say) is refused as [`SweepError::InProgress`].
    pub async fn sweep(&self, principal: &Principal) -> Result<SweepReport, ProcessorError> {
        self.authorize_operator(principal)?;
        async {
            let notifier = FailureNotifier { processor: self };
            let now = self.clock.now();
            // No consumer outlives its business's retention in the
            // integrity monitor or the statistics, whether or not its
            // business is still active or its statistics are ever taken.
            let policy = self.retention.policy();
            self.integrity.expire(now, &policy);
            self.statistics.expire(now, &policy);
            self.receipts.expire(now);
            // A sweep that failed, or whose future is dropped at an await,
            // may have deleted Signal state all the same: the cache is
            // dropped then too.
            let mut clear = ClearSessions(Some(&self.sessions));
            let swept = self.retention.sweep(now, &notifier).await;
            if matches!(&swept, Ok(report) if report.peers_deleted == 0 && report.epoch_keys_destroyed == 0)
                || matches!(swept, Err(SweepError::InProgress))
            {
                clear.0 = None;
            }
            drop(clear);
            self.forget_owed_of_deleted().await;
            self.forget_receipts_of_deleted(now).await;
            Ok(swept?)
        }
        .instrument(debug_span!("sweep"))
        .await
    }

    /// Place a legal hold on `scope` for the case `reference` (operators
    /// only). Audited; a second case may hold the same scope. A hold on one
    /// consumer writes the consumer's keyed phone hash to the audit trail,
    /// where it stays after the hold is released and the consumer's data is
    /// deleted (see [`HoldEvent`](crate::visibility::HoldEvent)).
    pub async fn place_hold(
        &self,
        principal: &Principal,
        scope: HoldScope,
        reference: &str,
    ) -> Result<(), ProcessorError> {
        self.authorize_operator(principal)?;
        Ok(self
            .retention
            .place_hold(principal.name(), scope, reference, self.clock.now())
            .await?)
    }

    /// Destroy `business`'s key of `epoch` now, before the epoch ends, for
    /// the case or request `reference` (operators only): every message and
    /// Signal record sealed under it becomes unreadable. Refused while a
    /// legal hold covers a record of that epoch (a message, or a Signal
    /// record); audited before the key goes. Nothing more can be sealed
    /// into the epoch: shredding the one new messages expire in stops the
    /// business for up to one epoch length. See
    /// [`Retention::shred_epoch`](crate::retention::Retention::shred_epoch).
    pub async fn shred_epoch(
        &self,
        principal: &Principal,
        business: BusinessId,
        epoch: Epoch,
        reference: &str,
    ) -> Result<bool, ProcessorError> {
        self.authorize_operator(principal)?;
        let destroyed = self
            .retention
            .shred_epoch(
                principal.name(),
                business,
                epoch,
                reference,
                self.clock.now(),
            )
            .await?;
        info!(principal = %principal, %business, "an epoch key was shredded early");
        Ok(destroyed)
    }

    /// Release the legal hold on `scope` for the case `reference`
    /// (operators only). Audited. Returns whether it was in force.
    pub async fn release_hold(
        &self,
        principal: &Principal,
        scope: HoldScope,
        reference: &str,
    ) -> Result<bool, ProcessorError> {
        self.authorize_operator(principal)?;
        Ok(self
            .retention
            .release_hold(principal.name(), scope, reference, self.clock.now())
            .await?)
    }

    /// The legal holds in force (operators only): the holds the audit
    /// trail says stand, a hold change whose call was dropped included.
    pub async fn holds(&self, principal: &Principal) -> Result<Vec<Hold>, ProcessorError> {
        self.authorize_operator(principal)?;
        Ok(self.retention.holds().await?)
    }
}
