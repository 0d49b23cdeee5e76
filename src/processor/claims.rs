//! Claims and what is owed: one attempt at a time per message, and the
//! writes (and attempts' bookkeeping) that calls dropped halfway, or failed
//! by the store, leave for whoever next takes the message up.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use foldhash::fast::RandomState;
use rand::RngExt;

use super::outbound::DeviceOutcome;
use super::records::SealTag;
use super::{Processor, ProcessorError};
use crate::ids::{BusinessId, MessageId, PhoneHash};
use crate::integrity::Category;
use crate::rng::OsRng;
use crate::store::{Batch, Delivery};
use crate::time::Timestamp;

/// Messages an attempt is under way for. Not a lock: nobody waits for a
/// claim. The retransmission loop and the sweep's expiry reports skip a
/// claimed message (its attempt is running, and will leave it due again if
/// it must be), so one attempt at a time is made per message without
/// holding anything while the host is called.
///
/// With them, what calls dropped (or failed by the store) before the store
/// answered owe each message (see [`Owing`]): the writes that record what a
/// business was told (a message handed over, a status reported), and the
/// bookkeeping of attempts that reached devices. Whoever next takes the
/// message up makes them first, so a cancelled call never has the business
/// told twice, nor a device sent a message it has.
#[derive(Default)]
pub(super) struct Claims {
    /// Each message claimed, with whether a delivery report was applied to
    /// it since (see [`note_report`](Self::note_report)).
    claimed: Mutex<HashMap<(BusinessId, MessageId), bool, RandomState>>,
    /// In the order they were left owed.
    owed: Mutex<HashMap<(BusinessId, MessageId), VecDeque<Owed>, RandomState>>,
}

/// A claim on one message, given up when dropped.
pub(super) struct Claim<'a> {
    claims: &'a Claims,
    key: (BusinessId, MessageId),
}

impl Claims {
    /// Claim `id`, unless an attempt is under way for it.
    pub(super) fn claim(&self, business: BusinessId, id: MessageId) -> Option<Claim<'_>> {
        let key = (business, id);
        let mut claimed = self.claimed.lock().unwrap_or_else(PoisonError::into_inner);
        if claimed.contains_key(&key) {
            return None;
        }
        claimed.insert(key, false);
        Some(Claim { claims: self, key })
    }

    /// Note that a delivery report was applied to `id`, for the attempt
    /// under way on it, if any: an attempt sending the message again to
    /// every device (its receipt overdue) sends it to no more of them.
    pub(super) fn note_report(&self, business: BusinessId, id: MessageId) {
        let mut claimed = self.claimed.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(reported) = claimed.get_mut(&(business, id)) {
            *reported = true;
        }
    }

    /// Whether a delivery report was applied to `id` while it was claimed.
    pub(super) fn reported(&self, business: BusinessId, id: MessageId) -> bool {
        self.claimed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(business, id))
            .copied()
            .unwrap_or(false)
    }

    /// Leave `owed` owed to `key`, after (or, if `first`, before) what is
    /// owed it already.
    pub(super) fn owe(&self, key: (BusinessId, MessageId), owed: Owed, first: bool) {
        let mut all = self.owed.lock().unwrap_or_else(PoisonError::into_inner);
        let list = all.entry(key).or_default();
        if first {
            list.push_front(owed);
        } else {
            list.push_back(owed);
        }
    }

    /// Forget the received-count owed to `key`: a receive has just stored
    /// the message (and counts it), so the write an earlier receive left
    /// it owed for never landed (had it, this one would be a duplicate).
    pub(super) fn forgive_count_received(&self, key: (BusinessId, MessageId)) {
        let mut all = self.owed.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(list) = all.get_mut(&key) {
            list.retain(|owed| !matches!(owed, Owed::CountReceived { .. }));
            if list.is_empty() {
                all.remove(&key);
            }
        }
    }

    /// How many messages are owed something.
    pub(super) fn messages_owed(&self) -> usize {
        self.owed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The first of what is owed to `key`, taken.
    pub(super) fn take_owed(&self, key: (BusinessId, MessageId)) -> Option<Owed> {
        let mut all = self.owed.lock().unwrap_or_else(PoisonError::into_inner);
        let list = all.get_mut(&key)?;
        let first = list.pop_front();
        if list.is_empty() {
            all.remove(&key);
        }
        first
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.claims
            .claimed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// What a call dropped halfway, or failed by the store, owes a message.
#[derive(Clone)]
pub(super) enum Owed {
    /// A write recording what a business or the transport was told about
    /// the message, and what follows it.
    Write {
        batch: Batch,
        accepted: Option<Accepted>,
    },
    /// An attempt's bookkeeping: what it reached, recorded on the stored
    /// state whatever a delivery report wrote meanwhile, as the attempt
    /// would have recorded it.
    Attempt(AttemptMade),
    /// A send's count for the integrity signals, made if the write storing
    /// its message landed (the send stopped before its answer): a business
    /// hanging up at once is counted all the same.
    CountSent { phone: PhoneHash, at: Timestamp },
    /// A receive's count for the integrity signals and the statistics, made
    /// if the write storing its message at `at` landed (the store failed it
    /// and could not then say; `tag` tells the record it stored): its
    /// redelivery is answered as a duplicate, and counts nothing.
    CountReceived {
        phone: PhoneHash,
        at: Timestamp,
        tag: SealTag,
    },
}

/// What an attempt on an outbound message reached, to be recorded on its
/// stored delivery state (see [`Processor::record_attempt`]).
#[derive(Clone, Copy)]
pub(super) struct AttemptMade {
    /// The stored state the record is made on: the one the attempt was
    /// decided on, then whatever a write made meanwhile left.
    pub(super) on: Delivery,
    pub(super) phone: PhoneHash,
    pub(super) category: Category,
    pub(super) outcome: DeviceOutcome,
    pub(super) at: Timestamp,
    /// When the message was stored: its age sets how long it waits for
    /// its delivery report.
    pub(super) created: Timestamp,
    /// When its retention ends: no attempt is due after it.
    pub(super) expiry: Timestamp,
    /// The [`Delivery::accepted_by`] its record stores if it bills the
    /// message: chosen once, so that a record owed, and made again, is
    /// known by it.
    pub(super) token: u64,
    /// Whether the attempt was decided on a queued message: only such an
    /// attempt bills (a message sent before may carry no token, as one
    /// stored before tokens existed does, and is billed already).
    pub(super) from_queued: bool,
    /// Whether the attempt sent a sent message to every device, its
    /// report overdue (not to its pending devices alone): its record sets
    /// when the next such resend is due.
    pub(super) overdue: bool,
}

/// A fresh [`Delivery::accepted_by`] for a write that bills a message:
/// random, never zero (the value of a message not billed).
pub(super) fn acceptance_token() -> u64 {
    OsRng.random::<u64>().max(1)
}

/// An outbound message moved on from queued by a send's bookkeeping, or by
/// a delivery report that came first: what follows that write once it is
/// known to have landed.
#[derive(Clone, Copy)]
pub(super) struct Accepted {
    pub(super) phone: PhoneHash,
    pub(super) at: Timestamp,
    /// The delivery state the write stores: sent after a send's
    /// bookkeeping, delivered or read after a report (told that instead).
    /// Its [`Delivery::accepted_by`] names the write.
    pub(super) next: Delivery,
}

impl Accepted {
    /// Whether `stored`, the message's state now, was made by this write
    /// or built on it: its token is the write's, and every later write
    /// keeps it.
    pub(super) fn landed_in(&self, stored: &Delivery) -> bool {
        stored.accepted_by == self.next.accepted_by
    }
}

/// A write under way (see [`Owed`]), until the store answers it. Dropped
/// before that (its caller's future dropped at the commit, or the store
/// failing it), it leaves the write owed: the store may or may not have it
/// (a SQLite commit lands even if no one waits for it; a networked store's
/// answer may be lost), and a conditional write made twice changes nothing
/// the second time.
pub(super) struct Owing<'a> {
    pub(super) claims: &'a Claims,
    pub(super) key: (BusinessId, MessageId),
    pub(super) owed: Option<Owed>,
    /// Owed before whatever else is: a payment that did not finish keeps
    /// its place.
    pub(super) first: bool,
}

impl<'a> Owing<'a> {
    pub(super) fn new(
        claims: &'a Claims,
        key: (BusinessId, MessageId),
        owed: Owed,
        first: bool,
    ) -> Self {
        Self {
            claims,
            key,
            owed: Some(owed),
            first,
        }
    }
}

impl Drop for Owing<'_> {
    fn drop(&mut self) {
        if let Some(owed) = self.owed.take() {
            self.claims.owe(self.key, owed, self.first);
        }
    }
}

/// Runs its closure when dropped, unless disarmed: what a call does
/// whether it ends or is dropped at an await.
struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

impl Processor {
    /// Commit `batch`, which records what the business or the transport
    /// was just told about message `id` (and, if `accepted`, moves an
    /// outbound message on from queued and bills it); `false` if its
    /// condition failed (the message changed, or is gone). Should the
    /// store fail, or this future be dropped before it answers, the write
    /// is owed, and made, with what follows it, before the message is next
    /// taken up ([`pay_owed`](Self::pay_owed)): a failed write may have
    /// landed (a networked store's answer lost), or not, and either way
    /// what was told must not be told again, nor a message billed twice.
    /// `count` (the statistics of what was told) runs unless the write
    /// lost a race (what won it counts): when it lands, fails or is
    /// dropped, as the write is then owed. Should that owed write lose a
    /// race when it is made (another report moved the message on first),
    /// both count: a statistic made twice, never a status told twice.
    pub(super) async fn commit_told(
        &self,
        business: BusinessId,
        id: MessageId,
        batch: Batch,
        accepted: Option<Accepted>,
        count: impl FnOnce(),
    ) -> Result<bool, ProcessorError> {
        let owed = Owed::Write {
            batch: batch.clone(),
            accepted,
        };
        let mut owing = Owing::new(&self.claims, (business, id), owed, false);
        let mut count = OnDrop(Some(count));
        let written = self.commit_batch(batch).await;
        if let Ok(landed) = written {
            owing.owed = None;
            if !landed {
                count.0 = None;
            }
        }
        written
    }

    /// Make what calls dropped halfway (or failed by the store) owe
    /// message `id`, in the order they left it: the writes, and the
    /// attempts' bookkeeping ([`record_attempt`](Self::record_attempt)). A
    /// write that moved an outbound message on from queued, and landed now
    /// or before (unseen: the stored state still carries its
    /// [`Delivery::accepted_by`], whatever was written over it since), has
    /// the message counted taken and, if a send's bookkeeping moved it and
    /// it is still sent, its business told it is sent.
    pub(super) async fn pay_owed(
        &self,
        business: BusinessId,
        id: MessageId,
    ) -> Result<(), ProcessorError> {
        while let Some(owed) = self.claims.take_owed((business, id)) {
            match owed {
                Owed::Write { batch, accepted } => {
                    let again = Owed::Write {
                        batch: batch.clone(),
                        accepted,
                    };
                    let mut owing = Owing::new(&self.claims, (business, id), again, true);
                    let written = self.commit_batch(batch).await?;
                    // What follows it, on the state it left: told sent only
                    // if nothing moved the message on since.
                    let mut follows = accepted.filter(|_| written);
                    if let Some(accepted) = accepted
                        && !written
                        && let Some(stored) = self.storage.message(business, id).await?
                        && accepted.landed_in(&stored.delivery)
                    {
                        follows = Some(Accepted {
                            next: stored.delivery,
                            ..accepted
                        });
                    }
                    owing.owed = None;
                    if let Some(accepted) = follows {
                        self.on_accepted(business, id, accepted).await;
                    }
                }
                // Owed again, first, by `record_attempt` itself if it stops.
                // Boxed: it pays what is owed in turn when it loses a race.
                Owed::Attempt(made) => {
                    Box::pin(self.record_attempt(business, id, made, true)).await?;
                }
                Owed::CountSent { phone, at } => {
                    let again = Owed::CountSent { phone, at };
                    let mut owing = Owing::new(&self.claims, (business, id), again, true);
                    let stored = self.storage.message(business, id).await?;
                    owing.owed = None;
                    if stored.is_some() {
                        self.integrity.record_sent(business, phone, at);
                    }
                }
                Owed::CountReceived { phone, at, tag } => {
                    let again = Owed::CountReceived { phone, at, tag };
                    let mut owing = Owing::new(&self.claims, (business, id), again, true);
                    let stored = self.storage.message(business, id).await?;
                    owing.owed = None;
                    // Stored by the failed write, not by an earlier receive
                    // (counted by it) whose replay's write was refused.
                    if stored.is_some_and(|stored| tag.wrote(&stored)) {
                        self.count_received(business, phone, at);
                    }
                }
            }
        }
        Ok(())
    }

    /// Claim message `id` of `business` for an attempt, unless one is under
    /// way; first make the write an attempt dropped halfway owes it.
    pub(super) async fn take_up(
        &self,
        business: BusinessId,
        id: MessageId,
    ) -> Result<Option<Claim<'_>>, ProcessorError> {
        let Some(claim) = self.claims.claim(business, id) else {
            return Ok(None);
        };
        self.pay_owed(business, id).await?;
        Ok(Some(claim))
    }

    /// Forget what is owed to messages the store no longer has: the sweep
    /// deleted them, and nothing will take them up again (a write that
    /// landed unanswered may have left a message with nothing due). Each is
    /// looked at under its claim, so no call is working on it meanwhile.
    pub(super) async fn forget_owed_of_deleted(&self) {
        let keys: Vec<(BusinessId, MessageId)> = self
            .claims
            .owed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect();
        for (business, id) in keys {
            let Some(_claim) = self.claims.claim(business, id) else {
                continue;
            };
            if let Ok(None) = self.storage.message(business, id).await {
                self.claims
                    .owed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&(business, id));
            }
        }
    }
}
