//! Reports: integrity signals, billing and statistics, each released to
//! the one party the visibility policy names for it; and the store's census.

use rand::RngExt;
use tracing::warn;

use super::{Processor, ProcessorError};
use crate::ids::{BusinessId, PhoneNumber};
use crate::integrity::{BillingStatement, IntegrityReport, StatisticsReport, billing_statement};
use crate::rng::OsRng;
use crate::store::{Census, Op, TakeId};
use crate::time::Timestamp;
use crate::transport::Principal;
use crate::visibility::{DataClass, Labelled, Party, Purpose};

impl Processor {
    /// `consumer` reported `business` for spam (the transport tells the
    /// processor, acting for the business's number): an integrity signal.
    /// A consumer counts once a window, however often it reports (see
    /// [`IntegrityMonitor`](crate::integrity::IntegrityMonitor)); it is
    /// known there only by its keyed phone hash. A report creates no key:
    /// one about a business that has neither published its keys nor sent
    /// (so has messaged no one through this processor) counts nothing.
    pub async fn report_spam(
        &self,
        principal: &Principal,
        business: BusinessId,
        consumer: &PhoneNumber,
    ) -> Result<(), ProcessorError> {
        self.authorize_carrier(principal, business)?;
        if let Some(reporter) = self.keys.known_phone_hash(business, consumer).await? {
            self.integrity
                .record_spam_report(business, reporter, self.clock.now());
        }
        Ok(())
    }

    /// `consumer` blocked `business`: an integrity signal, counted once a
    /// window per consumer (and creating no key), as
    /// [`report_spam`](Self::report_spam).
    pub async fn report_block(
        &self,
        principal: &Principal,
        business: BusinessId,
        consumer: &PhoneNumber,
    ) -> Result<(), ProcessorError> {
        self.authorize_carrier(principal, business)?;
        if let Some(blocker) = self.keys.known_phone_hash(business, consumer).await? {
            self.integrity
                .record_block(business, blocker, self.clock.now());
        }
        Ok(())
    }

    /// Hand every business's integrity signals to the transport, released
    /// for integrity (the only party and purpose the published table
    /// allows). Operators only; businesses never see them. Every business
    /// is tried, whatever became of the others (a report the transport
    /// refuses holds up that business alone); returns how many reports
    /// were handed over, or, if any business's failed, the first failure,
    /// once every other was tried.
    pub async fn export_integrity(&self, principal: &Principal) -> Result<usize, ProcessorError> {
        self.authorize_operator(principal)?;
        let (mut exported, mut failed) = (0, None);
        for report in self.integrity.export_all(self.clock.now()) {
            let business = report.business();
            match self.export_integrity_of(report).await {
                Ok(()) => exported += 1,
                Err(e) => {
                    warn!(?business, error = %e, "integrity signals not exported");
                    failed.get_or_insert(e);
                }
            }
        }
        failed.map_or(Ok(exported), Err)
    }

    /// Release one business's integrity report to the transport and hand
    /// it over.
    async fn export_integrity_of(
        &self,
        report: Labelled<IntegrityReport>,
    ) -> Result<(), ProcessorError> {
        let report = self
            .gate
            .release(report, Party::Transport, Purpose::Integrity)
            .map_err(ProcessorError::from)?;
        Ok(self.transport.integrity_signals(report.value()).await?)
    }

    /// `business`'s billing statement (every period counted and not yet
    /// in billing's system of record, the open one included), released to
    /// the business.
    pub async fn billing_statement(
        &self,
        principal: &Principal,
        business: BusinessId,
    ) -> Result<BillingStatement, ProcessorError> {
        self.authorize(principal, business)?;
        let stored = self.storage.billing(business).await?;
        let statement = billing_statement(business, self.clock.now(), &stored, None);
        self.gate
            .release(
                Labelled::of_business(DataClass::Billing, business, statement),
                Party::Business,
                Purpose::Billing,
            )
            .map(|r| r.into_value())
            .map_err(ProcessorError::from)
    }

    /// Hand the closed billing periods of every business to the transport,
    /// billing's system of record, released for billing (operators only):
    /// one statement per business, a take of its closed periods, which the
    /// store keeps until the transport has it. A take that could not be
    /// handed over (refused, failed, its answer lost, or cut short by a
    /// stop) is handed over again by the next export, as it was and under
    /// the same [`id`](BillingStatement::id), before anything newer of its
    /// business: the system of record counts each id once. Every business
    /// is tried, whatever became of the others (one business's damaged
    /// ledger, or a take the transport refuses, holds up that business
    /// alone); returns how many statements were handed over, or, if any
    /// business's failed, the first failure, once every other was tried.
    pub async fn export_billing(&self, principal: &Principal) -> Result<usize, ProcessorError> {
        self.authorize_operator(principal)?;
        let now = self.clock.now();
        let (mut exported, mut failed) = (0, None);
        for business in self.storage.billing_businesses().await? {
            match self.export_billing_of(business, now).await {
                Ok(handed) => exported += usize::from(handed),
                Err(e) => {
                    warn!(%business, error = %e, "billing not exported");
                    failed.get_or_insert(e);
                }
            }
        }
        failed.map_or(Ok(exported), Err)
    }

    /// Hand `business`'s oldest take to the transport (a new one of its
    /// periods closed by `now`, if it has none), and forget it once handed
    /// over; whether there was one.
    async fn export_billing_of(
        &self,
        business: BusinessId,
        now: Timestamp,
    ) -> Result<bool, ProcessorError> {
        let Some((id, statement)) = self.billing_take(business, now).await? else {
            return Ok(false);
        };
        let released = self
            .gate
            .release(
                Labelled::of_business(DataClass::Billing, business, statement),
                Party::Transport,
                Purpose::Billing,
            )
            .map_err(ProcessorError::from)?
            .into_value();
        self.transport.billing(&released).await?;
        self.commit_op(Op::SettleBilling { business, id }).await?;
        Ok(true)
    }

    /// The oldest take of `business`'s billing not yet settled; if there
    /// is none, a new take of the periods closed by `now`. `None` if there
    /// is nothing to take.
    async fn billing_take(
        &self,
        business: BusinessId,
        now: Timestamp,
    ) -> Result<Option<(TakeId, BillingStatement)>, ProcessorError> {
        let mut stored = self.storage.billing(business).await?;
        if stored.takes.is_empty() {
            if !stored.counts.iter().any(|c| c.end <= now) {
                return Ok(None);
            }
            let id = TakeId::new(OsRng.random()).unwrap_or(TakeId::MIN);
            self.commit_op(Op::TakeBilling {
                business,
                id,
                closed_by: now,
                at: now,
            })
            .await?;
            stored = self.storage.billing(business).await?;
        } else {
            // Handed over with no write of its own first: a processor
            // superseded on its store hands over none.
            self.still_the_writer().await?;
        }
        Ok(stored.takes.first().map(|take| {
            let statement = billing_statement(business, take.at, &stored, Some(take.id));
            (take.id, statement)
        }))
    }

    /// Closed periods of non-identifiable statistics, small buckets
    /// suppressed, released to the rest of the company for analytics
    /// (operators only). They are removed only once every one was released;
    /// each is released once, however many calls overlap. A period whose
    /// every bucket is suppressed is removed unreleased.
    pub async fn statistics(
        &self,
        principal: &Principal,
    ) -> Result<Vec<StatisticsReport>, ProcessorError> {
        self.authorize_operator(principal)?;
        let _releasing = self.releasing_statistics.lock().await;
        let now = self.clock.now();
        let businesses = self.statistics.businesses();
        let mut released = Vec::new();
        for &business in &businesses {
            for report in self.statistics.closed_reports(business, now) {
                let report = self
                    .gate
                    .release(report, Party::RestOfCompany, Purpose::Analytics)
                    .map_err(ProcessorError::from)?;
                released.push(report.into_value());
            }
        }
        // Every one released: taken from the businesses listed only (one
        // first recorded since keeps its reports for the next call), whose
        // closed periods `closed_reports` sealed, so what is taken is
        // exactly what was released.
        for business in businesses {
            drop(self.statistics.take_closed_of(business, now));
        }
        Ok(released)
    }

    /// How much the store holds (operators only).
    pub async fn census(&self, principal: &Principal) -> Result<Census, ProcessorError> {
        self.authorize_operator(principal)?;
        Ok(self.storage.census().await?)
    }
}
