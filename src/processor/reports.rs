//! Reports: integrity signals, billing and statistics, each released to
//! the one party the visibility policy names for it; and the store's census.

use super::{Processor, ProcessorError};
use crate::ids::BusinessId;
use crate::integrity::{BillingStatement, StatisticsReport};
use crate::store::Census;
use crate::transport::Principal;
use crate::visibility::{Party, Purpose};

impl Processor {
    /// A consumer reported `business` for spam (the transport tells the
    /// processor, acting for the business's number): an integrity signal.
    pub fn report_spam(
        &self,
        principal: &Principal,
        business: BusinessId,
    ) -> Result<(), ProcessorError> {
        self.authorize_carrier(principal, business)?;
        self.integrity
            .record_spam_report(business, self.clock.now());
        Ok(())
    }

    /// A consumer blocked `business`: an integrity signal.
    pub fn report_block(
        &self,
        principal: &Principal,
        business: BusinessId,
    ) -> Result<(), ProcessorError> {
        self.authorize_carrier(principal, business)?;
        self.integrity.record_block(business, self.clock.now());
        Ok(())
    }

    /// Hand every business's integrity signals to the transport, released
    /// for integrity (the only party and purpose the published table
    /// allows). Operators only; businesses never see them. Returns how many
    /// reports were handed over.
    pub async fn export_integrity(&self, principal: &Principal) -> Result<usize, ProcessorError> {
        self.authorize_operator(principal)?;
        let mut exported = 0;
        for report in self.integrity.export_all(self.clock.now()) {
            let report = self
                .gate
                .release(report, Party::Transport, Purpose::Integrity)
                .map_err(|_| ProcessorError::Denied)?;
            self.transport.integrity_signals(report.value()).await?;
            exported += 1;
        }
        Ok(exported)
    }

    /// `business`'s billing statement (every period kept, the open one
    /// included), released to the business.
    pub async fn billing_statement(
        &self,
        principal: &Principal,
        business: BusinessId,
    ) -> Result<BillingStatement, ProcessorError> {
        self.authorize(principal, business)?;
        let statement = self.billing.statement(business, self.clock.now());
        self.gate
            .release(statement, Party::Business, Purpose::Billing)
            .map(|r| r.into_value())
            .map_err(|_| ProcessorError::Denied)
    }

    /// Hand the closed billing periods of every business to the transport,
    /// billing's system of record, released for billing (operators only).
    /// A statement that cannot be handed over (or whose answer is lost) is
    /// handed over again by the next export, as it was and under the same
    /// [`id`](BillingStatement::id), before anything newer of its business:
    /// the system of record counts each id once. Returns how many statements
    /// were handed over.
    pub async fn export_billing(&self, principal: &Principal) -> Result<usize, ProcessorError> {
        self.authorize_operator(principal)?;
        let now = self.clock.now();
        let mut exported = 0;
        for business in self.billing.businesses() {
            // Kept aside unless handed over, however this call ends
            // (refused, the audit trail or the transport failing, or
            // dropped halfway), to be handed over again as it is.
            let Some((statement, undo)) = self.billing.take_closed_undoably(business, now) else {
                continue;
            };
            let released = self
                .gate
                .release(statement, Party::Transport, Purpose::Billing)
                .map_err(|_| ProcessorError::Denied)?
                .into_value();
            self.transport.billing(&released).await?;
            undo.keep();
            exported += 1;
        }
        Ok(exported)
    }

    /// Closed periods of non-identifiable statistics, small buckets
    /// suppressed, released to the rest of the company for analytics
    /// (operators only). They are removed only once every one was released.
    pub async fn statistics(
        &self,
        principal: &Principal,
    ) -> Result<Vec<StatisticsReport>, ProcessorError> {
        self.authorize_operator(principal)?;
        let now = self.clock.now();
        let mut released = Vec::new();
        for business in self.statistics.businesses() {
            for report in self.statistics.closed_reports(business, now) {
                let report = self
                    .gate
                    .release(report, Party::RestOfCompany, Purpose::Analytics)
                    .map_err(|_| ProcessorError::Denied)?;
                released.push(report.into_value());
            }
        }
        // Sealed by `closed_reports`: what it takes is what was released.
        drop(self.statistics.take_closed(now));
        Ok(released)
    }

    /// How much the store holds (operators only).
    pub async fn census(&self, principal: &Principal) -> Result<Census, ProcessorError> {
        self.authorize_operator(principal)?;
        Ok(self.storage.census().await?)
    }
}
