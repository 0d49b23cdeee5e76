//! Data visibility: which party may see which class of data, for which
//! purpose, decided in one place and audited every time.
//!
//! Every value of a class the policy governs that leaves the processor (to
//! the transport, to the business, to an export) is a [`Labelled`] value:
//! message content, consumer numbers, integrity signals, statistics and
//! billing. (What else leaves carries none of these: a message's id and
//! status, the business's public keys. The processor holds no business
//! information, whose system of record is the business manager: the
//! class is in the table for hosts that release it through a gate of
//! their own, and a policy denying it changes nothing the processor
//! does. Nor is the processor's own column asked: it says what the
//! processor may do with what it holds, which it does as this crate
//! documents, so a policy denying one of its cells changes nothing
//! either; only an opt-in service, which runs in the processor, would be
//! released data under it, and the processor runs none yet.)
//! A labelled value carries its
//! [`DataClass`] (and the business it belongs to, if any), and the only way
//! to take the value out is [`Gate::release`], naming the receiving [`Party`]
//! and the [`Purpose`]. The gate consults the [`VisibilityPolicy`], writes one
//! [`Decision`] to the [`AuditSink`] — allowed or denied, with a unique
//! [`DecisionId`] and the policy's [`Revision`], never the value — and only
//! then hands the value over. A value whose decision cannot be audited is not
//! released (fail closed).
//!
//! # The rule: a compiled, exhaustive table, default deny
//!
//! The policy is a table over every (party, class, purpose) cell — 4 × 6 × 7 =
//! 168 cells — held as one purpose bitmask per (party, class) and indexed by
//! the enums' discriminants, so [`VisibilityPolicy::allows`] is an array load
//! and a bit test. A cell is denied unless the table allows it.
//!
//! The published table ([`VisibilityPolicy::published`], also `Default`, at
//! [`Revision::PUBLISHED`]) implements the data-visibility matrix of the
//! published data-privacy design of the WhatsApp Business Cloud API. Each cell lists the purposes allowed; "—" is denied
//! for every purpose.
//!
//! | data class | system of record | processor | business | transport | rest of company |
//! |---|---|---|---|---|---|
//! | message content | processor | delivery, retransmission | delivery | — (hard rule) | — (hard rule) |
//! | consumer phone number | processor | delivery, retransmission | delivery | delivery, retransmission, integrity | — (hard rule) |
//! | non-identifiable statistics | processor | analytics | analytics | analytics | analytics |
//! | integrity signals (per business) | transport client | — | — | integrity | — (hard rule) |
//! | business information | business manager | delivery, retransmission, integrity, billing | delivery, billing | delivery, retransmission, integrity, billing | billing, analytics |
//! | billing (per business) | transport | billing | billing | billing | billing |
//!
//! Why each column reads as it does:
//!
//! - **Processor**: handles content and consumer numbers only to deliver and
//!   retransmit them; receives statistics (analytics) and billing records
//!   (billing); uses business information to address, attribute and bill.
//!   It computes the integrity signals but releases them to no one but the
//!   transport: they are collected for the transport, whose client system
//!   keeps them.
//! - **Business**: receives its own messages and the numbers of the consumers
//!   it talks to (delivery), its own statistics (analytics), its own business
//!   information and bill. It never sees the integrity signals about itself:
//!   they exist to detect abuse, and showing them would teach evasion.
//! - **Transport** (the messaging network): never content; consumer numbers to
//!   route (delivery, retransmission) and to fight abuse (integrity);
//!   integrity signals, of which it is the system of record's client;
//!   statistics; business information; billing, of which it is the system of
//!   record.
//! - **Rest of the company**: never content, numbers or integrity signals;
//!   non-identifiable statistics (analytics); business information and billing
//!   (billing, and analytics for business information).
//! - **Advertising**: denied everywhere. **Opt-in services** (such as an AI
//!   assistant a business enables): denied everywhere by default.
//!
//! # Hard rules
//!
//! Five [`HardRule`]s hold for every policy that can exist; no file, builder
//! or configuration can loosen them, and a policy that tries is rejected with
//! an error naming the offending cell:
//!
//! 1. message content never reaches the transport or the rest of the company,
//!    for any purpose;
//! 2. nothing is released for advertising, to any party, of any class;
//! 3. opt-in services run in the processor: only the processor party may be
//!    allowed the `opt_in_service` purpose, and even then a release for it
//!    also needs the business the value belongs to to have opted in
//!    ([`Gate::set_opted_in`]);
//! 4. consumer phone numbers never reach the rest of the company, for any
//!    purpose;
//! 5. integrity signals never reach the rest of the company, for any
//!    purpose.
//!
//! # Policy files
//!
//! A deployment may replace the published table with its own, in TOML or
//! JSON ([`VisibilityPolicy::from_toml`], [`VisibilityPolicy::from_json`],
//! [`VisibilityPolicy::load`]). A file starts from **deny-all**: it lists
//! every allowed cell, so what a file does not say is denied, and a reader of
//! the file sees the whole policy. One entry per (party, class), at least one
//! purpose each, no purpose twice; unknown fields and names are errors that
//! name the field (`allow[2].purposes[1]`). The revision is at least 1
//! (revision 0 is the published table) and at most [`Revision::MAX`].
//!
//! ```toml
//! revision = 2
//!
//! [[allow]]
//! party = "processor"
//! class = "message_content"
//! purposes = ["delivery", "retransmission"]
//! ```
//!
//! The same in JSON:
//! `{"revision": 2, "allow": [{"party": "processor", "class": "message_content",
//! "purposes": ["delivery", "retransmission"]}]}`.
//!
//! Names: parties `processor`, `business`, `transport`, `rest_of_company`;
//! classes `message_content`, `consumer_phone_number`,
//! `non_identifiable_statistics`, `integrity_signals`, `business_information`,
//! `billing`; purposes `delivery`, `retransmission`, `integrity`, `billing`,
//! `analytics`, `advertising`, `opt_in_service`.
//!
//! # Audit
//!
//! Each release writes one [`Decision`]: time, decision id, policy revision,
//! party, class, purpose, verdict, the reason for a denial, and the business
//! when the value belongs to one. [`MemoryAuditSink`] keeps them in memory
//! (tests, bounded rings); [`JsonLinesSink`] appends them to a file, one JSON
//! object per line.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use custodian::ids::BusinessId;
//! use custodian::time::{ManualClock, Timestamp};
//! use custodian::visibility::{
//!     DataClass, Gate, Labelled, MemoryAuditSink, Party, Purpose, Verdict, VisibilityPolicy,
//! };
//!
//! let audit = Arc::new(MemoryAuditSink::new());
//! let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_767_225_600_000)));
//! let gate = Gate::new(VisibilityPolicy::published(), audit.clone(), clock);
//! let business = BusinessId::new(42).unwrap();
//!
//! let text = Labelled::of_business(DataClass::MessageContent, business, "hello".to_owned());
//! assert_eq!(format!("{text:?}"), "Labelled { class: MessageContent, business: Some(BusinessId(42)), .. }");
//!
//! // Content never reaches the transport: the value comes back, still labelled.
//! let denied = gate.release(text, Party::Transport, Purpose::Delivery).unwrap_err();
//! assert_eq!(denied.decision().verdict, Verdict::Deny);
//!
//! // The business may receive its own message.
//! let released = gate
//!     .release(denied.into_labelled(), Party::Business, Purpose::Delivery)
//!     .unwrap();
//! assert_eq!(released.value(), "hello");
//!
//! // Both decisions were audited, without the text.
//! let events = audit.events();
//! assert_eq!(events.len(), 2);
//! assert_eq!(events[1].id, released.decision().id);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

mod audit;
mod file;
mod release;
mod table;

pub use audit::{
    AuditError, AuditSink, BadDecisionId, Change, Decision, DecisionId, DenyReason, FlushPolicy,
    HoldAction, HoldEvent, JsonLinesSink, MemoryAuditSink, TrailEntry, TrailError, Verdict,
    read_trail,
};
pub use file::{AllowEntry, PolicyError, PolicyFile, PolicyFormat};
pub(crate) use file::{from_json_at, from_toml_at};
pub use release::{Denied, Gate, Labelled, Released};
pub use table::{HardRule, HardRuleViolation, PolicyBuilder, Purposes, Revision, VisibilityPolicy};

/// A name in a policy file or audit event that names no variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {name:?} (expected one of: {})", expected.join(", "))]
#[non_exhaustive]
pub struct UnknownName {
    /// What was being named: `party`, `class`, `purpose` or `system`.
    pub kind: &'static str,
    /// The name given.
    pub name: String,
    /// Every valid name.
    pub expected: &'static [&'static str],
}

/// Defines a fieldless enum whose variants are the table's index, with its
/// `ALL` list, file/audit names, `Display`, `FromStr` and serde by name.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($kind:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order (which is the table's index order).
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];
            /// Every variant's name, in the order of [`Self::ALL`].
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The name used in policy files and audit events.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<Self, UnknownName> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(UnknownName {
                        kind: $kind,
                        name: s.to_owned(),
                        expected: Self::NAMES,
                    }),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

named_enum! {
    /// Who receives a released value.
    ///
    /// Deliberately not `#[non_exhaustive]`: the table is exhaustive, so a new
    /// party is a breaking change that every match (and test) must face.
    pub enum Party ("party") {
        /// The processor itself: this crate and the host gateway embedding it.
        Processor = "processor",
        /// The business the processor works for (its own data only).
        Business = "business",
        /// The messaging network (WhatsApp) that carries messages to consumers.
        Transport = "transport",
        /// Any other part of the company operating the processor.
        RestOfCompany = "rest_of_company",
    }
}

named_enum! {
    /// What kind of data a value is.
    ///
    /// Not `#[non_exhaustive]`, for the same reason as [`Party`].
    pub enum DataClass ("class") {
        /// The content of a message (text, media, anything the parties wrote).
        MessageContent = "message_content",
        /// A consumer's phone number, as source or destination of messages.
        ConsumerPhoneNumber = "consumer_phone_number",
        /// Aggregates that identify no consumer (k-suppressed).
        NonIdentifiableStatistics = "non_identifiable_statistics",
        /// Per-business messaging signals for abuse detection; no content.
        IntegritySignals = "integrity_signals",
        /// Facts about the business (its profile, ids, settings).
        BusinessInformation = "business_information",
        /// Per-business billable message counts.
        Billing = "billing",
    }
}

named_enum! {
    /// Why a value is released.
    ///
    /// Not `#[non_exhaustive]`, for the same reason as [`Party`].
    pub enum Purpose ("purpose") {
        /// Delivering a message (to the consumer through the transport, or to the business).
        Delivery = "delivery",
        /// Sending a stored message again after a failed or unacknowledged send.
        Retransmission = "retransmission",
        /// Detecting and fighting abuse of the messaging network.
        Integrity = "integrity",
        /// Charging the business for its messages.
        Billing = "billing",
        /// Understanding use of the service in aggregate.
        Analytics = "analytics",
        /// Advertising: forbidden for everything, always.
        Advertising = "advertising",
        /// An optional service a business enables explicitly (an AI assistant, say),
        /// run by the processor under its own terms.
        OptInService = "opt_in_service",
    }
}

named_enum! {
    /// A system that can be the system of record of a data class.
    pub enum System ("system") {
        /// The processor (this crate and its host).
        Processor = "processor",
        /// The transport's client-side integrity system.
        TransportClient = "transport_client",
        /// The business manager, where businesses keep their information.
        BusinessManager = "business_manager",
        /// The transport (the messaging network).
        Transport = "transport",
    }
}

impl DataClass {
    /// The system of record of this class: where the authoritative copy
    /// lives. Part of the published design, not of a policy file, so no
    /// configuration can move it.
    pub const fn system_of_record(self) -> System {
        match self {
            Self::MessageContent | Self::ConsumerPhoneNumber | Self::NonIdentifiableStatistics => {
                System::Processor
            }
            Self::IntegritySignals => System::TransportClient,
            Self::BusinessInformation => System::BusinessManager,
            Self::Billing => System::Transport,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_valid_ones() {
        for p in Party::ALL {
            assert_eq!(p.as_str().parse::<Party>(), Ok(*p));
        }
        for c in DataClass::ALL {
            assert_eq!(c.as_str().parse::<DataClass>(), Ok(*c));
        }
        for p in Purpose::ALL {
            assert_eq!(p.as_str().parse::<Purpose>(), Ok(*p));
        }
        for s in System::ALL {
            assert_eq!(s.as_str().parse::<System>(), Ok(*s));
        }
        let err = "Transport".parse::<Party>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown party \"Transport\" (expected one of: processor, business, transport, rest_of_company)"
        );
    }

    #[test]
    fn all_lists_follow_discriminant_order() {
        // The table indexes by `as usize`; ALL must agree with it.
        for (i, p) in Party::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i);
        }
        for (i, c) in DataClass::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        for (i, p) in Purpose::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i);
        }
    }

    #[test]
    fn systems_of_record_follow_the_published_matrix() {
        use DataClass::*;
        assert_eq!(MessageContent.system_of_record(), System::Processor);
        assert_eq!(ConsumerPhoneNumber.system_of_record(), System::Processor);
        assert_eq!(
            NonIdentifiableStatistics.system_of_record(),
            System::Processor
        );
        assert_eq!(IntegritySignals.system_of_record(), System::TransportClient);
        assert_eq!(
            BusinessInformation.system_of_record(),
            System::BusinessManager
        );
        assert_eq!(Billing.system_of_record(), System::Transport);
    }
}
