//! The seams where a host plugs the processor into the world: the messaging
//! network ([`Transport`]), the business ([`BusinessSink`]), and who may act
//! for whom ([`Authorizer`]).
//!
//! Every trait is `Send + Sync`; the async ones need no runtime of their own.
//! Values handed across these seams have already been released through the
//! [visibility policy](crate::visibility): a phone number reaches the
//! transport only for delivery, content reaches only the business.

use std::collections::{BTreeSet, HashMap};
use std::fmt::{self, Write as _};
use std::sync::Arc;

use async_trait::async_trait;
use zeroize::Zeroizing;

use crate::ids::{BusinessId, MessageId, PhoneNumber};
use crate::integrity::{BillingStatement, IntegrityReport};
use crate::signal::{Ciphertext, PreKeyBundle, PublishedKeys};
use crate::store::{FailureReason, Status};
use crate::time::Timestamp;

/// Who is calling: an opaque name the host's identity system gives a caller
/// (an API token's subject, a service account). Not secret; it is logged.
/// The processor refuses an empty name in every role, whatever the
/// [`Authorizer`] says: the audit trail names who asked.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Principal(Arc<str>);

impl Principal {
    /// The principal named `name`.
    pub fn new(name: &str) -> Self {
        Self(Arc::from(name))
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Principal({self})")
    }
}

/// The name in double quotes, every character but printable ASCII
/// escaped (`\"`, `\\`, `\u{a}`, `\u{2028}`, `\u{34f}`): a name cannot
/// start a log line of its own, reorder one, drive a terminal, hide a
/// character, nor pass for another name beside the fields logged with it
/// (`"ops business=7"` is one name).
impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        for c in self.0.chars() {
            match c {
                '"' | '\\' => write!(f, "\\{c}")?,
                ' '..='~' => f.write_char(c)?,
                _ => write!(f, "{}", c.escape_unicode())?,
            }
        }
        f.write_char('"')
    }
}

/// Decides which principal may act in which role: the part the business
/// manager plays. Every entry point of the processor asks it first, for one
/// of three roles: the business, the network carrying its messages, an
/// operator. A business cannot hand in messages or reports as the network
/// (a forged sender, a forged delivery), and the network cannot send as,
/// configure or read for a business.
pub trait Authorizer: Send + Sync {
    /// Whether `principal` may act as `business`: send as it, read its
    /// messages, statuses and bills, publish its keys, opt it in or out,
    /// approve its consumers' new identity keys.
    fn may_act_for(&self, principal: &Principal, business: BusinessId) -> bool;

    /// Whether `principal` may carry `business`'s messages, as the network
    /// does: hand in consumers' messages (`receive`), delivery reports
    /// (`status_update`), retry receipts (`retry_receipt`), and spam and
    /// block reports.
    fn may_carry_for(&self, principal: &Principal, business: BusinessId) -> bool;

    /// Whether `principal` may run maintenance that spans businesses
    /// (retransmission, the retention sweep, legal holds). Businesses may not.
    fn may_operate(&self, principal: &Principal) -> bool;
}

/// An [`Authorizer`] from a fixed table: which principals act for which
/// businesses, which carry their messages, and which are operators.
#[derive(Debug, Clone, Default)]
pub struct StaticAuthorizer {
    grants: HashMap<Principal, BTreeSet<BusinessId>>,
    carriers: HashMap<Principal, BTreeSet<BusinessId>>,
    operators: BTreeSet<Principal>,
}

impl StaticAuthorizer {
    /// Nobody may do anything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Let `principal` act for `business`.
    pub fn grant(mut self, principal: &Principal, business: BusinessId) -> Self {
        self.grants
            .entry(principal.clone())
            .or_default()
            .insert(business);
        self
    }

    /// Let `principal` carry `business`'s messages.
    pub fn carrier(mut self, principal: &Principal, business: BusinessId) -> Self {
        self.carriers
            .entry(principal.clone())
            .or_default()
            .insert(business);
        self
    }

    /// Let `principal` run maintenance.
    pub fn operator(mut self, principal: &Principal) -> Self {
        self.operators.insert(principal.clone());
        self
    }
}

impl Authorizer for StaticAuthorizer {
    fn may_act_for(&self, principal: &Principal, business: BusinessId) -> bool {
        self.grants
            .get(principal)
            .is_some_and(|b| b.contains(&business))
    }

    fn may_carry_for(&self, principal: &Principal, business: BusinessId) -> bool {
        self.carriers
            .get(principal)
            .is_some_and(|b| b.contains(&business))
    }

    fn may_operate(&self, principal: &Principal) -> bool {
        self.operators.contains(principal)
    }
}

/// Why the transport could not do something. Its text is logged as given:
/// keep content and phone numbers out of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The network is unreachable or timed out: try again later.
    #[error("transport unavailable: {0}")]
    Unavailable(String),
    /// The network refused for good (the consumer does not exist, the
    /// business is blocked): retrying will not help.
    #[error("transport refused: {0}")]
    Refused(String),
}

/// A Signal message for one device, as handed to the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The message it carries (so the transport can report its status).
    pub id: MessageId,
    /// The Signal ciphertext.
    pub ciphertext: Ciphertext,
}

/// The messaging network (WhatsApp, in the model this crate follows). It
/// never sees content: only ciphertext, and consumer numbers for routing.
#[async_trait]
pub trait Transport: Send + Sync {
    /// The devices `consumer` has. Empty if they have none.
    async fn devices(
        &self,
        business: BusinessId,
        consumer: &PhoneNumber,
    ) -> Result<Vec<u32>, TransportError>;

    /// The prekey bundle of one of `consumer`'s devices, to start a session.
    async fn fetch_bundle(
        &self,
        business: BusinessId,
        consumer: &PhoneNumber,
        device: u32,
    ) -> Result<PreKeyBundle, TransportError>;

    /// Send `message` to one device of `consumer`. `Ok` means the network
    /// accepted it; delivery is reported later as a status, through
    /// [`Processor::status_update`](crate::processor::Processor::status_update)
    /// under `message.id`. A `Delivered` (or `Read`) report means one
    /// device has the message (the first to have it may report it): the
    /// processor still sends to the devices it has not reached of those
    /// listed ([`devices`](Self::devices)) when it sent the message. A
    /// device linked after a device took it is sure to get it only from a
    /// resend made while no report has come (one overdue is sent again to
    /// every device listed then). A device
    /// may so be sent a message it has (after a crash, say): it drops the
    /// copy by the message id in its payload. A device that cannot decrypt
    /// a message it does not have (its session lost) asks for it again
    /// through
    /// [`Processor::retry_receipt`](crate::processor::Processor::retry_receipt).
    async fn send(
        &self,
        business: BusinessId,
        consumer: &PhoneNumber,
        device: u32,
        message: &Outgoing,
    ) -> Result<(), TransportError>;

    /// Ask one device of `consumer` to send `message` again over a new
    /// session, as a WhatsApp client is asked by a retry receipt: the
    /// business does not hold the session, or the prekeys, the device made
    /// it with ([`SignalError::needs_new_session`](crate::signal::SignalError::needs_new_session):
    /// retention ended them while the consumer was silent, say, or the
    /// device writes on a state the business never had). The device starts
    /// a session from the business's published keys
    /// ([`publish_keys`](Self::publish_keys)) and encrypts the message
    /// again; a device that no longer has it ignores the request (a client
    /// answers only for what it sent lately). `message` is the ciphertext
    /// as the transport delivered it, for the transport to tell which
    /// message is meant; `id` is the id the processor asks for it under
    /// (its bytes give it): hand the message sent again to
    /// [`Processor::receive`](crate::processor::Processor::receive) with
    /// [`Inbound::resend_of`](crate::processor::Inbound::resend_of) set to
    /// it, and the business gets it once however often it was asked for
    /// (a copy delivered twice, an answer lost). `Ok` means the network
    /// took the request;
    /// [`Processor::receive`](crate::processor::Processor::receive) then
    /// answers [`ResendAsked`](crate::processor::ProcessorError::ResendAsked):
    /// the copy is to be dropped. Unavailable, the message is to be
    /// delivered again (and the request made again); refused, the message
    /// is refused for good, as the session's loss made it.
    async fn ask_resend(
        &self,
        business: BusinessId,
        consumer: &PhoneNumber,
        device: u32,
        id: MessageId,
        message: &Ciphertext,
    ) -> Result<(), TransportError>;

    /// Publish the keys consumers fetch to reach `business`. The one-time
    /// prekeys replace those published before; they include keys handed
    /// out before whose first messages may not have come yet, oldest first.
    /// Hand them out in that order (the processor retires the oldest past
    /// its limit, and counts the newest as not handed out yet), and each
    /// once, ever: a first message on a key handed out twice, or on one
    /// retired, has its device asked to send it again over a new session.
    async fn publish_keys(
        &self,
        business: BusinessId,
        keys: &PublishedKeys,
    ) -> Result<(), TransportError>;

    /// How many of the one-time prekeys `business` last published the
    /// network has yet to hand out, if it keeps count (a WhatsApp server
    /// does). [`Processor::publish_keys`](crate::processor::Processor::publish_keys)
    /// refills the pool by it. `None`, the default, counts every one-time
    /// prekey the processor still holds as available, those handed out
    /// whose first message has not come yet included: the pool then
    /// refills late, and more sessions start without a one-time prekey.
    async fn one_time_prekey_count(
        &self,
        business: BusinessId,
    ) -> Result<Option<usize>, TransportError> {
        let _ = business;
        Ok(None)
    }

    /// Take a business's integrity signals (counts and anomalies, no
    /// content, no phone numbers), released to the transport for integrity:
    /// what its abuse detection works on.
    async fn integrity_signals(&self, report: &IntegrityReport) -> Result<(), TransportError>;

    /// Take a business's billing records for closed periods, released to
    /// the transport (billing's system of record) for billing.
    async fn billing(&self, statement: &BillingStatement) -> Result<(), TransportError>;
}

/// A message from a consumer, decrypted and released to its business.
#[derive(Clone, PartialEq, Eq)]
pub struct InboundMessage {
    /// The business it is for.
    pub business: BusinessId,
    /// Its id: derived from the Signal message's header, so a redelivery
    /// after a crash carries the same id and the business can drop it.
    pub id: MessageId,
    /// Who sent it.
    pub from: PhoneNumber,
    /// From which of their devices.
    pub device: u32,
    /// What they sent; wiped from memory when dropped.
    pub content: Zeroizing<Vec<u8>>,
    /// When the processor received it.
    pub received: Timestamp,
    /// The device presented a new identity key (a "security code changed" notice).
    pub identity_changed: bool,
}

impl fmt::Debug for InboundMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundMessage")
            .field("business", &self.business)
            .field("id", &self.id)
            .field("from", &self.from)
            .field("device", &self.device)
            .field("content_len", &self.content.len())
            .field("received", &self.received)
            .field("identity_changed", &self.identity_changed)
            .finish()
    }
}

/// A change in an outbound message's status, for its business. Inbound
/// messages that expire undelivered are reported the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusUpdate {
    /// The business.
    pub business: BusinessId,
    /// The message.
    pub id: MessageId,
    /// Its new status.
    pub status: Status,
    /// Why it failed, for `Failed`.
    pub failure: Option<FailureReason>,
    /// When the processor told the business a settled status (delivered,
    /// read or failed; each attempt to tell it has its own time), or, for
    /// `Sent`, when it recorded the send. Not when a device got or read
    /// the message.
    pub at: Timestamp,
}

/// Why the business could not take a message or status. Its text is
/// logged as given: keep content and phone numbers out of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("business endpoint unavailable: {0}")]
pub struct SinkError(pub String);

/// The business: where its inbound messages and statuses go (a webhook, a
/// queue). Deliveries are retried until they succeed or expire, so a sink
/// may see a message twice after a crash: deduplicate by message id.
#[async_trait]
pub trait BusinessSink: Send + Sync {
    /// Hand over an inbound message.
    async fn deliver(&self, message: &InboundMessage) -> Result<(), SinkError>;

    /// Report a status. A report may come more than once, and reports of
    /// one message made concurrently (a send's `sent` and a delivery
    /// report's `delivered`) may arrive out of order; the stored status
    /// never goes backwards, so keep the furthest one seen
    /// (`queued < sent < delivered < read`; `failed` is final). The final
    /// statuses of a message (delivered, read, failed) are reported until
    /// this returns `Ok`; `sent` is reported once, best effort: not again
    /// if this fails, and not at all if a later status overtook it.
    async fn status(&self, update: &StatusUpdate) -> Result<(), SinkError>;
}

#[cfg(test)]
mod tests {
    use super::Principal;

    #[test]
    fn a_principal_prints_quoted_and_escaped() {
        let name = "ops\n2026-12-06 INFO forged\u{1b}[2J\u{2028}\u{202e}\u{34f} é";
        let p = Principal::new(name);
        let shown =
            "\"ops\\u{a}2026-12-06 INFO forged\\u{1b}[2J\\u{2028}\\u{202e}\\u{34f} \\u{e9}\"";
        assert_eq!(p.to_string(), shown);
        assert_eq!(format!("{p:?}"), format!("Principal({p})"));
        assert_eq!(p.name(), name);
        // No name prints as another, nor as a name and a field.
        assert_eq!(Principal::new("ops\\n").to_string(), "\"ops\\\\n\"");
        assert_eq!(
            Principal::new("ops business=7").to_string(),
            "\"ops business=7\""
        );
        assert_eq!(Principal::new("a\"b").to_string(), "\"a\\\"b\"");
    }
}
