//! Inbound: a consumer's message decrypted, sealed and stored with its
//! session's advance, then handed to its business.

use tracing::{Instrument, debug, debug_span, warn};
use zeroize::Zeroizing;

use super::claims::{Owed, Owing};
use super::payload::InboundBody;
use super::records::SealTag;
use super::{Processor, ProcessorError, due_by};
use crate::ids::{BusinessId, MessageId, PhoneHash, PhoneNumber};
use crate::retention::RecordFacts;
use crate::signal::{Ciphertext, Parsed, SignalError, resend_id};
use crate::store::{
    Batch, Delivery, Direction, FailureReason, MessageRecord, Op, PeerId, Status, StoreError,
};
use crate::time::Timestamp;
use crate::transport::{InboundMessage, Principal, TransportError};
use crate::visibility::{DataClass, DenyReason, Labelled, Party, Purpose};

/// A consumer's message as the transport delivers it.
#[derive(Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The sender.
    pub from: PhoneNumber,
    /// The sender's device.
    pub device: u32,
    /// The Signal message.
    pub message: Ciphertext,
    /// The id of the message this one sends again, when it answers a
    /// request to ([`Transport::ask_resend`](crate::transport::Transport::ask_resend)):
    /// it is received under that id, so the business gets the message once
    /// however often it was asked for. `None` for every other message.
    /// Name it on every redelivery of such a message too: a copy without
    /// it is a duplicate once the message is stored (known by the id its
    /// header gives, [`Receipt::id`]), but one that comes first is stored
    /// under that id, where a request for the message made again does not
    /// look.
    pub resend_of: Option<MessageId>,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("from", &self.from)
            .field("device", &self.device)
            .field("message", &self.message)
            .field("resend_of", &self.resend_of)
            .finish()
    }
}

/// What [`Processor::receive`] did; return it only after acknowledging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// The message's id, derived from its Signal header: the same for every
    /// redelivery or replay of it, whatever the transport calls it. (A
    /// message sent again on request is stored under the id it was asked
    /// for, [`Inbound::resend_of`], and known by its header's too: a copy
    /// of it handed in without the request named, as from any consumer or
    /// device, is answered as a duplicate under the id asked for.)
    pub id: MessageId,
    /// It was a duplicate of a message already received: nothing was done.
    pub duplicate: bool,
    /// The business has it: it was handed over (on a duplicate: the
    /// stored message was, by this receive or an earlier one). `false`:
    /// it is queued for retry, or failed (its retention ended first), or,
    /// on a duplicate of a message no longer stored (past its retention),
    /// whether it was handed over is unknown.
    pub delivered: bool,
}

impl Receipt {
    /// The receipt of a duplicate of message `id`, stored as `stored`
    /// (`None`: no longer stored).
    fn duplicate(id: MessageId, stored: Option<&MessageRecord>) -> Self {
        Self {
            id,
            duplicate: true,
            delivered: stored.is_some_and(|m| m.delivery.status == Status::Delivered),
        }
    }
}

/// The outcome of one attempt to hand an inbound message to its business.
#[derive(Debug, Clone, Copy)]
pub(super) enum Attempt {
    Done,
    Retry,
    Fail(FailureReason),
}

/// An inbound message's parts before they are released to its business.
pub(super) struct InboundParts {
    pub(super) id: MessageId,
    pub(super) from: PhoneNumber,
    pub(super) device: u32,
    pub(super) content: Zeroizing<Vec<u8>>,
    pub(super) identity_changed: bool,
    /// What retention looks at: it is asked again just before the
    /// hand-over (a commit held up, or a policy shortened, may have ended
    /// the message meanwhile).
    pub(super) facts: RecordFacts,
}

impl Processor {
    /// Receive a consumer's message for `business` from the transport.
    /// Returns once the message is durably stored (and, if the business
    /// took it, handed over): acknowledge the transport then. On an error,
    /// do not acknowledge: the transport's redelivery is handled; unless
    /// the error [`is_permanent`](ProcessorError::is_permanent) (the
    /// message can never be received), when the transport can drop it. A
    /// message from a device whose new identity key the policy refuses
    /// ([`SignalError::UntrustedIdentity`]) is received once
    /// [`trust_new_identity`](Self::trust_new_identity) approves it. A
    /// redelivery or a replay of a stored message, however it arrives, is
    /// answered as a duplicate and reaches the business no second time;
    /// its receipt says whether the business has it, from the stored
    /// message (a store that cannot say fails the receive).
    /// A receive creates no key: a message for a business that has not
    /// published its keys ([`publish_keys`](Self::publish_keys)) is
    /// refused as [`SignalError::InvalidMessage`].
    pub async fn receive(
        &self,
        principal: &Principal,
        business: BusinessId,
        inbound: Inbound,
    ) -> Result<Receipt, ProcessorError> {
        let span = debug_span!("receive", %business, device = inbound.device);
        // Boxed: the caller's future (a host's task, or one of its many
        // lanes) carries a pointer instead of about 4 KiB of state, and
        // the block glibc hands back is the one the last message used,
        // still in the cache. Inline, a 256-lane burst ran about 3% slower
        // (a send measured the same either way, so it is not boxed).
        Box::pin(
            self.receive_in(principal, business, inbound)
                .instrument(span),
        )
        .await
    }

    async fn receive_in(
        &self,
        principal: &Principal,
        business: BusinessId,
        inbound: Inbound,
    ) -> Result<Receipt, ProcessorError> {
        self.authorize_carrier(principal, business)?;
        let now = self.clock.now();
        let (expiry, admitted) = self.admit(business, Direction::Inbound, now)?;
        // Parsed first, and a receive creates no key: the business's keys
        // come with its first `publish_keys`, before which no consumer
        // could have written to it.
        let parsed = Parsed::new(&inbound.message, business)?;
        // A message sent again on request is the one asked for.
        let parsed = match inbound.resend_of {
            Some(id) => parsed.resent_as(id),
            None => parsed,
        };
        let phone = self
            .keys
            .known_phone_hash(business, &inbound.from)
            .await?
            .ok_or(SignalError::InvalidMessage(
                "the business has published no keys",
            ))?;
        let peer = PeerId {
            phone,
            device: inbound.device,
        };
        let (id, header) = (parsed.id(), parsed.header_id());
        // A message sent again whose bytes came before, without the request
        // named (stored under its header's id) or with it (known by that
        // id), is stored: that copy is the message, whatever the session
        // remembers of it (a restart, or a sweep that cleared the cache,
        // may have lost its step). Boxed: rare.
        if let Some(header) = header
            && let Some(stored) = Box::pin(self.storage.message(business, header)).await?
        {
            debug!(%id, "a message sent again came before");
            return Box::pin(self.duplicate(business, stored.id, None)).await;
        }
        let staged = match self
            .sessions
            .decrypt_staged(business, peer, &parsed, expiry)
            .await
        {
            Ok(staged) => staged,
            Err(SignalError::DuplicateMessage) => {
                debug!(%id, "duplicate inbound message");
                return self.duplicate(business, id, header).await;
            }
            Err(e) => return self.refused(business, (id, header), &inbound, e).await,
        };
        // A message more counters into its chain than Signal derives keys
        // for at once may have come before, too far ahead, and been asked
        // for again under the id its bytes give (see `refused`): the
        // message sent again, stored first, is this one; stored after, it
        // finds this one under that id (and is a duplicate). Boxed: rare.
        let asked_as = match header {
            None if parsed.far_into_its_chain() => Some(resend_id(business, &inbound.message)),
            _ => None,
        };
        if let Some(again) = asked_as
            && Box::pin(self.storage.message(business, again))
                .await?
                .is_some()
        {
            drop(staged);
            debug!(%id, "a message sent again on request came before");
            return Box::pin(self.duplicate(business, again, None)).await;
        }
        let header = header.or(asked_as);
        let decrypted = staged.decrypted();
        let identity_changed = decrypted.identity_changed;
        let body = Zeroizing::new(InboundBody::encode_fields(
            &inbound.from,
            inbound.device,
            identity_changed,
            &decrypted.plaintext,
        ));
        let record = self
            .seal_record(business, id, Direction::Inbound, phone, now, expiry, &body)
            .await?;
        // A fresh record: nothing else can be attempting it.
        let claim = self.claims.claim(business, id);
        let tag = SealTag::of(&record);
        let mut batch = Batch::new();
        // A message sent again is known by its header's id too: a copy of
        // its bytes handed in plain, as from any consumer or device, is one.
        // (So is one far into its chain by the id it would have been asked
        // for again under.)
        batch.push(match header {
            Some(header) => Op::PutResentMessage {
                record: Box::new(record),
                header,
            },
            None => Op::PutMessage(Box::new(record)),
        });
        // Dropped before it answers, the write may land all the same (a
        // SQLite commit does): the count is owed then, and made when the
        // message is next taken up, as its redelivery is answered as a
        // duplicate, which counts nothing.
        let mut uncounted = Owing::new(
            &self.claims,
            (business, id),
            Owed::CountReceived {
                phone,
                at: now,
                tag,
            },
            false,
        );
        // Heard from once the write lands: the device's receipts ignored
        // while its record was too large count again (the message may have
        // used up keys it kept), and, its new key taken from its own
        // message (under `AcceptAndReport`), so do those ignored for a
        // bundle, as if approved. Let in however the write ends, unless it
        // is known not to have landed: dropped or failed, it may have, and
        // a redelivery answered as a duplicate lets nothing in (should it
        // not have, a receipt fetches one bundle more, or is ignored again).
        let heard = self.receipts.hear_on_drop(business, peer, identity_changed);
        let committed = staged.commit_stored(batch).await;
        drop(admitted);
        uncounted.owed = None;
        let decrypted = match committed {
            Ok(decrypted) => decrypted,
            // A replay that a session outdated by a crash took for new:
            // refused by the store, the write did not land.
            Err(SignalError::DuplicateMessage) => {
                debug!(%id, "replay of a stored message");
                heard.cancel();
                // Let go first: the duplicate's receipt takes up what an
                // earlier receive left owed.
                drop(claim);
                return self.duplicate(business, id, header).await;
            }
            // Its one-time prekey went while it decrypted (see
            // `StagedDecrypt::commit_stored`): refused by the store, the
            // write did not land, and the device is asked for the message
            // again, as for a key gone before. Boxed: rare, and its future
            // would grow every receive's.
            Err(e) if e.needs_new_session() => {
                drop(claim);
                heard.cancel();
                return Box::pin(self.refused(business, (id, header), &inbound, e)).await;
            }
            Err(e) => {
                // The write may have landed, its answer lost (a networked
                // store): the message is then stored, its redelivery
                // answered as a duplicate (counting nothing), and the
                // retransmission loop hands it over. So it is counted now.
                // Boxed: rare, and its future would grow every receive's.
                let landed = Box::pin(self.count_if_landed(business, id, phone, now, tag)).await;
                if landed == Some(false) {
                    heard.cancel();
                }
                return Err(e.into());
            }
        };
        drop(heard);
        // Stored by this call: what an earlier one, dropped at its own
        // write, left owed is for a write that never landed.
        self.claims.forgive_count_received((business, id));
        self.count_received(business, phone, now);
        debug!(%id, "inbound message stored");
        let delivered = match claim {
            Some(_claim) => {
                let facts = RecordFacts {
                    business,
                    phone,
                    direction: Direction::Inbound,
                    created: now,
                    expiry,
                };
                let parts = InboundParts {
                    id,
                    from: inbound.from,
                    device: inbound.device,
                    content: decrypted.plaintext,
                    identity_changed,
                    facts,
                };
                let attempt = self
                    .hand_to_business(business, parts, Purpose::Delivery)
                    .await;
                self.settle_inbound(&facts, id, Delivery::queued(now), attempt)
                    .await?
            }
            None => false,
        };
        Ok(Receipt {
            id,
            duplicate: false,
            delivered,
        })
    }

    /// The message stored under (or known by) `id`, else under (or known
    /// by) `header`: the id its own header gives a message sent again on
    /// request, under which a plain copy of it is stored.
    async fn stored_as(
        &self,
        business: BusinessId,
        id: MessageId,
        header: Option<MessageId>,
    ) -> Result<Option<MessageRecord>, StoreError> {
        match (self.storage.message(business, id).await?, header) {
            (None, Some(header)) => self.storage.message(business, header).await,
            (stored, _) => Ok(stored),
        }
    }

    /// The receipt of a duplicate of message `id` (or of the message
    /// [`stored_as`](Self::stored_as) `id` and `header`, answered under
    /// the id it is stored under): whether the business has it, from the
    /// stored message, once what an earlier call left owed to it is made
    /// (a hand-over whose delivered mark failed, say).
    async fn duplicate(
        &self,
        business: BusinessId,
        id: MessageId,
        header: Option<MessageId>,
    ) -> Result<Receipt, ProcessorError> {
        // Found by another id than it is stored under (sent again on
        // request): a copy of that message, answered under its id.
        let id = match self.stored_as(business, id, header).await? {
            Some(stored) => stored.id,
            None => id,
        };
        drop(self.take_up(business, id).await?);
        let stored = self.storage.message(business, id).await?;
        Ok(Receipt::duplicate(id, stored.as_ref()))
    }

    /// Answer `inbound`, which Signal refused (`cause`), its id `id` (and,
    /// sent again on request, `header` the id its header gives). A
    /// redelivery that Signal no longer recognises as one (the session
    /// moved on, or was reset), or a message sent again whose plain copy
    /// took its one-time prekey meanwhile, is stored: it is answered as a
    /// duplicate.
    /// Should the store not say, Signal's answer stands: a message it
    /// refuses is refused whether stored or not. One made on a state the
    /// business does not hold is asked for again, under the id it was
    /// asked for under before, or one its bytes give (never its header
    /// alone: see [`resend_id`]), unless the message sent again is stored
    /// already; should the store not say, its failure is the answer (the
    /// message is delivered again, and asked for then: asked for when it
    /// may be stored, it would reach the business twice).
    async fn refused(
        &self,
        business: BusinessId,
        (id, header): (MessageId, Option<MessageId>),
        inbound: &Inbound,
        cause: SignalError,
    ) -> Result<Receipt, ProcessorError> {
        let ask = cause.needs_new_session();
        match self.stored_as(business, id, header).await {
            Ok(Some(_)) => {
                debug!(%id, "redelivery of a stored message");
                return self.duplicate(business, id, header).await;
            }
            Ok(None) => {}
            Err(store) if ask => return Err(store.into()),
            Err(store) => {
                debug!(%id, error = %store, "whether a refused message is a redelivery is unknown");
            }
        }
        if !ask {
            return Err(cause.into());
        }
        let again = inbound
            .resend_of
            .unwrap_or_else(|| resend_id(business, &inbound.message));
        if again != id && self.storage.message(business, again).await?.is_some() {
            debug!(id = %again, "sent again and stored already");
            return self.duplicate(business, again, None).await;
        }
        Err(self.ask_resend(business, again, inbound, cause).await)
    }

    /// Ask `inbound`'s device to send it again over a new session, under
    /// `id`: it was made on a state the business does not hold (`cause`).
    /// The error to answer: [`ProcessorError::ResendAsked`] once the
    /// transport took the request; the transport's error if it could not
    /// now (the message is delivered again, and asked for again), `cause`
    /// if it refused for good; a policy refusing the number to the
    /// transport, as any release refused.
    async fn ask_resend(
        &self,
        business: BusinessId,
        id: MessageId,
        inbound: &Inbound,
        cause: SignalError,
    ) -> ProcessorError {
        // Nothing written before it: a processor superseded on its store
        // asks for nothing more. (Looked at first: the number is released
        // just before the call that uses it, under the policy in force then.)
        if let Err(e) = self.still_the_writer().await {
            return e;
        }
        let released = self.gate.release(
            Labelled::of_business(
                DataClass::ConsumerPhoneNumber,
                business,
                inbound.from.clone(),
            ),
            Party::Transport,
            Purpose::Delivery,
        );
        let number = match released {
            Ok(number) => number.into_value(),
            Err(denied) => return denied.into(),
        };
        let asked = self
            .transport
            .ask_resend(business, &number, inbound.device, id, &inbound.message)
            .await;
        match asked {
            Ok(()) => {
                debug!(device = inbound.device, error = %cause, "the message's session is gone; its device was asked to send it again");
                ProcessorError::ResendAsked
            }
            Err(TransportError::Refused(_)) => cause.into(),
            Err(e) => e.into(),
        }
    }

    /// Count a message received from `phone` at `at`, for the integrity
    /// signals and the statistics.
    pub(super) fn count_received(&self, business: BusinessId, phone: PhoneHash, at: Timestamp) {
        self.integrity.record_received(business, phone, at);
        self.statistics.record_message(
            business,
            phone,
            Direction::Inbound,
            crate::integrity::Status::Sent,
            at,
        );
    }

    /// Count message `id`, received from `phone` at `at`, whose storing
    /// write failed, if the write landed all the same (its answer lost):
    /// the store then has the record that write stored, which `tag` tells
    /// (a message stored by an earlier receive, whose replay's write the
    /// store refused, was counted by it, even one from the same consumer in
    /// the same millisecond). Should the store not
    /// say, the count is owed ([`Owed::CountReceived`]), and made when the
    /// message is next taken up: by its redelivery, answered as a
    /// duplicate, or by the retransmission loop, which takes up a message
    /// stored unanswered to hand it over. Returns whether it landed, if
    /// the store says.
    async fn count_if_landed(
        &self,
        business: BusinessId,
        id: MessageId,
        phone: PhoneHash,
        at: Timestamp,
        tag: SealTag,
    ) -> Option<bool> {
        let owed = Owed::CountReceived { phone, at, tag };
        let mut owing = Owing::new(&self.claims, (business, id), owed, false);
        match self.storage.message(business, id).await {
            Ok(stored) => {
                owing.owed = None;
                let landed = stored.is_some_and(|stored| tag.wrote(&stored));
                if landed {
                    warn!(%business, %id, "the store failed the write storing a received message, but has it: counted");
                    self.count_received(business, phone, at);
                }
                Some(landed)
            }
            Err(e) => {
                debug!(%business, %id, error = %e, "whether a failed write stored a received message is unknown: its count is owed");
                None
            }
        }
    }

    /// Release an inbound message's content and sender to its business for
    /// `purpose`, and hand it over.
    pub(super) async fn hand_to_business(
        &self,
        business: BusinessId,
        parts: InboundParts,
        purpose: Purpose,
    ) -> Attempt {
        // Tried again later, whatever the reason: the audit trail may work
        // again, and the policy may change (the message is decrypted, its
        // session moved on: the consumer will not send it again). Under a
        // policy that never allows it, its retention ends it.
        let refused = |reason: DenyReason| {
            warn!(%business, id = %parts.id, ?reason, "visibility policy refused delivery to the business; will retry");
            Attempt::Retry
        };
        // Its retention may have ended since it was last looked at (its
        // storing commit held up, a policy shortened): then it is never
        // handed over, and the retransmission loop fails it as expired.
        if !self
            .retention
            .readable_facts(&parts.facts, self.clock.now())
        {
            debug!(%business, id = %parts.id, "retention ended before the hand-over");
            return Attempt::Retry;
        }
        // Asked first: nothing is released for a call not made.
        let Some(calling) = self.call_business(business, parts.id) else {
            debug!(%business, id = %parts.id, "business endpoint hung; will retry");
            return Attempt::Retry;
        };
        // Both or neither: a hand-over the policy refuses for one records
        // no release of the other.
        let (content, from) = match self.gate.release_both(
            Labelled::of_business(DataClass::MessageContent, business, parts.content),
            Labelled::of_business(DataClass::ConsumerPhoneNumber, business, parts.from),
            Party::Business,
            purpose,
        ) {
            Ok((content, from)) => (content.into_value(), from.into_value()),
            Err(reason) => {
                calling.not_made();
                return refused(reason);
            }
        };
        let message = InboundMessage {
            business,
            id: parts.id,
            from,
            device: parts.device,
            content,
            received: parts.facts.created,
            identity_changed: parts.identity_changed,
        };
        let delivered = self.sink.deliver(&message).await;
        calling.answered();
        match delivered {
            Ok(()) => Attempt::Done,
            Err(e) => {
                debug!(%business, id = %message.id, error = %e, "business unavailable; will retry");
                Attempt::Retry
            }
        }
    }

    /// Record the outcome of an attempt to hand over an inbound message
    /// whose delivery state was `current`; whether it was delivered. A
    /// message failed meanwhile (its retention ended) stays failed.
    pub(super) async fn settle_inbound(
        &self,
        facts: &RecordFacts,
        id: MessageId,
        current: Delivery,
        attempt: Attempt,
    ) -> Result<bool, ProcessorError> {
        let (business, phone) = (facts.business, facts.phone);
        let now = self.clock.now();
        let next = due_by(
            self.after_attempt(&current, attempt, now),
            facts.expiry,
            now,
        );
        let written = if let Attempt::Done = attempt {
            let delivered = Op::UpdateDelivery {
                business,
                id,
                expected: current,
                delivery: next,
            };
            // Counted unless the write lost a race: a write the store
            // failed, or a call dropped, is owed, and lands before the
            // message is taken up again (its redelivery, answered as a
            // duplicate, counts nothing).
            let count = || {
                self.statistics.record_message(
                    business,
                    phone,
                    Direction::Inbound,
                    crate::integrity::Status::Delivered,
                    now,
                );
            };
            self.commit_told(business, id, delivered.into(), None, count)
                .await?
        } else {
            self.write_delivery(business, id, current, next).await?
        };
        if !written {
            return Ok(false);
        }
        match attempt {
            Attempt::Done => Ok(true),
            Attempt::Fail(_) => {
                // Boxed: rare, and its future would grow every receive's.
                Box::pin(self.report_status(business, id, phone, Direction::Inbound, next)).await?;
                Ok(false)
            }
            Attempt::Retry => Ok(false),
        }
    }

    /// The bookkeeping after an attempt made on a message in `current` state
    /// (which write moved it on from queued kept).
    pub(super) fn after_attempt(
        &self,
        current: &Delivery,
        attempt: Attempt,
        now: Timestamp,
    ) -> Delivery {
        let attempts = current.attempts.saturating_add(1);
        match attempt {
            Attempt::Done => Delivery {
                status: Status::Delivered,
                failure: None,
                attempts,
                next_attempt: None,
                pending_devices: 0,
                ..*current
            },
            Attempt::Retry => Delivery {
                status: current.status,
                failure: None,
                attempts,
                next_attempt: Some(now.saturating_add(self.delivery.backoff(current.attempts))),
                pending_devices: current.pending_devices,
                ..*current
            },
            // Failed, and due at once: the failure is reported to the business.
            Attempt::Fail(reason) => Delivery {
                status: Status::Failed,
                failure: Some(reason),
                attempts,
                next_attempt: Some(now),
                pending_devices: 0,
                ..*current
            },
        }
    }
}
