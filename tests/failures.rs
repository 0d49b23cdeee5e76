//! Host failures: the store or the key provider failing at each of their
//! calls in turn, under every public entry point of the processor and the
//! layers below it that keep promises of their own. A failed call returns
//! the host's error (never a panic, never another error in its place) and
//! changes nothing the promises rest on; the host then goes on as it would
//! (the transport delivers again, the business sends again, retransmission
//! and the sweep run) and every promise still holds: each inbound message
//! reaches its business once, each accepted outbound message reaches each
//! device once (no Signal counter used twice), statuses are told once and
//! never backwards, billing counts each message once, holds agree with the
//! audit trail, nothing stays locked, and no key is destroyed early or
//! kept late.
//!
//! Each test builds a fresh deployment for every failure point `n = 1, 2,
//! ...` and way of failing: the store's `n`-th call failing before it is
//! made (nothing applied), or after (a write landed, its answer lost, as a
//! networked database's reply is), or the key provider's `n`-th call
//! failing. It stops once the entry point completes in fewer calls. Some
//! tests take an outage instead: every call failing until it is lifted.
#![cfg(feature = "testing")]
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "tests assert by panicking"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use custodian::ids::{BusinessId, MessageId, PhoneNumber};
use custodian::integrity::{Direction, Status as StatsStatus};
use custodian::keys::{
    Epoch, EpochLength, KeyEntry, KeyId, KeyKind, KeyManager, KeyProvider, LocalKeyProvider,
    SecretKey,
};
use custodian::processor::{Inbound, Outbound, ProcessorError, StatusChange};
use custodian::retention::RetentionPolicy;
use custodian::signal::{Ciphertext, IdentityPolicy, SignalConfig, SignalError};
use custodian::store::{
    Batch, FailureReason, HoldScope, KeyStore, MemoryStore, Op, PeerId, Status, Storage,
};
use custodian::testing::{ConsumerDevice, Faults};
use custodian::time::{Clock, ManualClock, Timestamp};
use custodian::visibility::Change;

#[path = "common/seams.rs"]
mod seams;
use seams::*;

/// More calls than any entry point here makes: a test that gets this far
/// is looping.
const MAX_CALLS: usize = 2_000;

/// The ways a host call fails, each tried at every call in turn.
const WAYS: [(Seams, Strike); 3] = [
    (Seams::Store, Strike::Before),
    (Seams::Store, Strike::After),
    (Seams::Provider, Strike::Before),
];

/// A deployment with a small prekey pool: each test builds hundreds.
async fn deployment(network: Faults, sink: Faults) -> Deployment {
    deployment_over(Arc::new(MemoryStore::new()), network, sink).await
}

/// A [`deployment`] over `store`.
async fn deployment_over(store: Arc<dyn Storage>, network: Faults, sink: Faults) -> Deployment {
    let signal = SignalConfig {
        prekey_pool: 4,
        prekey_low_water: 2,
        ..SignalConfig::default()
    };
    Deployment::over(store, network, sink, signal).await
}

/// Where a failure was injected, for messages.
#[derive(Debug, Clone, Copy)]
struct At {
    n: usize,
    seams: Seams,
    strike: Strike,
}

/// Runs `case` for every way of failing and every call `n = 1, 2, ...`
/// until it reports that no call failed (the entry point made fewer).
async fn every_failure<F, Fut>(mut case: F)
where
    F: FnMut(At) -> Fut,
    Fut: Future<Output = bool>,
{
    for (seams, strike) in WAYS {
        let mut n = 1;
        while !case(At { n, seams, strike }).await {
            n += 1;
            assert!(n < MAX_CALLS, "the entry point never completed");
        }
    }
}

/// What an entry point returned under an injected failure: `Ok` if no call
/// failed; an error, only the host's own (never another in its place).
fn assert_outcome<T: Debug, E: Debug>(got: &Result<T, E>, failed: &[(&str, Strike)], at: At) {
    match got {
        Ok(_) => {}
        Err(e) => {
            assert!(!failed.is_empty(), "{at:?}: failed with no failure: {e:?}");
            assert!(
                format!("{e:?}").contains("injected failure"),
                "{at:?}: {failed:?} was reported as {e:?}"
            );
        }
    }
}

/// Whether the failure, at call `at.n`, struck the answer of the first
/// commit of the calls made: the write that stores a new message landed,
/// unanswered.
fn first_commit_landed(faults: &HostFaults, at: At) -> bool {
    let first = faults.calls().iter().position(|c| *c == "commit");
    faults.failed() == [("commit", Strike::After)] && first == Some(at.n - 1)
}

/// `send` of `content` under the failure `at`, checked against what
/// failed, and made again, as the business would, if it was refused.
/// Returns the first call's answer and what failed.
async fn send_under(
    d: &Deployment,
    at: At,
    content: &[u8],
) -> (
    Result<MessageId, ProcessorError>,
    Vec<(&'static str, Strike)>,
) {
    d.faults.fail_at(at.n, at.seams, at.strike);
    let sent = d.processor.send(&d.owner, d.b, d.outbound(content)).await;
    let landed = first_commit_landed(&d.faults, at);
    let failed = d.faults.lift();
    assert_outcome(&sent, &failed, at);
    // Its storing write landed unanswered: the store, asked, says so.
    assert!(!landed || sent.is_ok(), "{at:?}: {failed:?} gave {sent:?}");
    if sent.is_err() {
        d.processor
            .send(&d.owner, d.b, d.outbound(content))
            .await
            .unwrap();
    }
    (sent, failed)
}

#[test]
fn harness_fails_the_planned_call_only() {
    runtime().block_on(async {
        let d = deployment(Faults::none(), Faults::none()).await;
        d.faults.fail_at(2, Seams::Store, Strike::Before);
        let census = || d.processor.census(&d.operator);
        assert!(census().await.is_ok());
        let second = census().await;
        assert!(format!("{second:?}").contains("injected failure of census"));
        assert!(census().await.is_ok());
        assert_eq!(d.faults.lift(), [("census", Strike::Before)]);
        d.faults.outage_from(1, Seams::Store);
        assert!(census().await.is_err() && census().await.is_err());
        d.faults.lift();
        assert!(census().await.is_ok());
    });
}

#[test]
fn receive_survives_every_host_failure() {
    runtime().block_on(every_failure(|at| async move {
        let d = deployment(Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let first = d.inbound(&mut handset, b"first").await;
        d.faults.fail_at(at.n, at.seams, at.strike);
        let got = d.receive(first.clone()).await;
        let failed = d.faults.lift();

        assert_outcome(&got, &failed, at);
        // Not acknowledged: the transport delivers it again, and it is
        // not burnt (decrypted then, or stored before). A host's failure
        // is never taken for a refusal of the message.
        if let Err(e) = &got {
            assert!(!e.is_permanent(), "{at:?}: {e:?}");
            d.receive(first).await.unwrap();
        }
        // Nothing stays locked: the conversation goes on.
        let second = d.inbound(&mut handset, b"second").await;
        d.receive(second).await.unwrap();
        d.settle(3).await;
        let want = BTreeMap::from([(b"first".to_vec(), 1), (b"second".to_vec(), 1)]);
        assert_eq!(d.contents(), want, "{at:?}: {failed:?}");
        d.assert_statuses_told_once_forward(at.n);
        // Each counted received once for the integrity signals.
        assert_eq!(d.received_counted().await, 2, "{at:?}: {failed:?}");
        failed.is_empty()
    }));
}

/// A receive whose storing write lands but whose answer is lost (a
/// networked store's reply) fails, and the transport delivers the message
/// again, twice, each answered as a duplicate: the message reaches the
/// business once, and is counted received once for the integrity signals
/// (so its consumer is known, and the business's reply to it is no
/// fan-out to a new recipient). So too when the store cannot then say
/// whether it has the message (every answer lost until the receive
/// returns): the count is owed until the message is next taken up (here
/// by its redelivery). The next message, received and then delivered again, is
/// counted once too. On the in-memory store and on SQLite. (The failed
/// receive returned before counting, and a duplicate counts nothing: the
/// message was never counted received.)
#[test]
fn a_received_message_whose_storing_write_lost_its_answer_is_counted_once() {
    runtime().block_on(async {
        for every_answer in [false, true] {
            lost_storing_answer(|| (Arc::new(MemoryStore::new()), None), every_answer).await;
            #[cfg(feature = "sqlite")]
            lost_storing_answer(
                || {
                    use custodian::store::{SqliteConfig, SqliteStore};
                    let dir = tempfile::tempdir().unwrap();
                    let path = dir.path().join("store.db");
                    let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
                    (Arc::new(store), Some(dir))
                },
                every_answer,
            )
            .await;
        }
    });
}

/// The case of [`a_received_message_whose_storing_write_lost_its_answer_is_counted_once`]
/// over the stores `store` makes (with the directory to keep, if any),
/// the answers of the store's calls lost from the storing write on until
/// the receive returns if `every_answer`, else that write's alone.
async fn lost_storing_answer(
    store: impl Fn() -> (Arc<dyn Storage>, Option<tempfile::TempDir>),
    every_answer: bool,
) {
    for n in 1..MAX_CALLS {
        let (store, _dir) = store();
        let d = deployment_over(store, Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let first = d.inbound(&mut handset, b"first").await;
        d.faults.set(Plan {
            at: n,
            seams: Seams::Store,
            strike: Strike::After,
            outage: every_answer,
        });
        let got = d.receive(first.clone()).await;
        let first_commit = d.faults.calls().iter().position(|c| *c == "commit");
        let failed = d.faults.lift();
        assert!(!failed.is_empty(), "no call struck the storing write");
        if !(failed[0] == ("commit", Strike::After) && first_commit == Some(n - 1)) {
            continue;
        }
        assert!(every_answer || failed.len() == 1, "{failed:?}");
        assert!(got.is_err(), "the answer was lost: the receive fails");
        for _ in 0..2 {
            assert!(d.receive(first.clone()).await.unwrap().duplicate);
        }
        // Counted by the failed receive, if the store could say it has the
        // message; else owed, and made when the message is next taken up:
        // by the first redelivery, answered as a duplicate.
        assert_eq!(d.received_counted().await, 1, "{failed:?}");
        d.settle(3).await;
        let second = d.inbound(&mut handset, b"second").await;
        assert!(!d.receive(second.clone()).await.unwrap().duplicate);
        assert!(d.receive(second).await.unwrap().duplicate);
        d.settle(3).await;
        let want = BTreeMap::from([(b"first".to_vec(), 1), (b"second".to_vec(), 1)]);
        assert_eq!(d.contents(), want, "stored and handed over once");
        assert_eq!(d.received_counted().await, 2, "{failed:?}");
        return;
    }
    panic!("the storing write was never reached");
}

#[test]
fn send_survives_every_host_failure() {
    runtime().block_on(every_failure(|at| async move {
        let d = deployment(Faults::none(), Faults::none()).await;
        d.network.add_consumer(&consumer(2), 2).await;
        let (sent, failed) = send_under(&d, at, b"first").await;
        d.processor
            .send(&d.owner, d.b, d.outbound(b"second"))
            .await
            .unwrap();
        d.settle(3).await;
        // A send refused stored nothing.
        let stored = d.store.census().await.unwrap().messages;
        assert_eq!(stored, 2, "{at:?}: {failed:?} gave {sent:?}");
        let received = d.network.received(&consumer(2)).await;
        for device in 0..2 {
            let got = &received[&device];
            assert_eq!(got.len() as u64, stored, "{at:?}: device {device}");
            assert!(got.values().all(|&copies| copies == 1), "{at:?}: {got:?}");
            let contents = d.network.contents(&consumer(2), device).await;
            assert_eq!(contents.len() as u64, stored, "{at:?}");
        }
        d.assert_delivered_and_billed(
            received[&0].keys(),
            stored,
            format_args!("{at:?}: {failed:?}"),
        )
        .await;
        failed.is_empty()
    }));
}

/// The business retries a send named by an idempotency key after any
/// failure of the store or the key provider, one call failing or all from
/// one on (an outage; with the answers lost, every write lands unanswered,
/// the double failure a plain `send` cannot resolve): the consumer's
/// devices get the message once, and it is stored, told sent and billed
/// once. So too after a restart, with nothing of the first call in memory.
#[test]
fn an_idempotent_send_retried_after_any_host_failure_is_sent_once() {
    runtime().block_on(async {
        for outage in [false, true] {
            every_failure(|at| async move {
                let d = deployment(Faults::none(), Faults::none()).await;
                d.network.add_consumer(&consumer(2), 2).await;
                let send = || {
                    d.processor
                        .send_idempotent(&d.owner, d.b, b"order-1", d.outbound(b"first"))
                };
                d.faults.set(Plan {
                    at: at.n,
                    seams: at.seams,
                    strike: at.strike,
                    outage,
                });
                let first = send().await;
                let failed = d.faults.lift();
                assert_outcome(&first, &failed, at);
                let id = send().await.unwrap();
                if let Ok(first) = first {
                    assert_eq!(first, id, "{at:?}");
                }
                // Attempted by the time the retry answers, whatever the
                // first call stopped before: not left for retransmission.
                let stored = d.store.message(d.b, id).await.unwrap().unwrap();
                let attempts = stored.delivery.attempts;
                assert!(attempts >= 1, "{at:?}, outage {outage}: {failed:?}");
                d.settle(3).await;
                let case = format_args!("{at:?}, outage {outage}: {failed:?}");
                d.assert_sent_once(id, 2, case).await;
                failed.is_empty()
            })
            .await;
        }

        let mut d = deployment(Faults::none(), Faults::none()).await;
        d.network.add_consumer(&consumer(2), 1).await;
        let id = d
            .processor
            .send_idempotent(&d.owner, d.b, b"order-2", d.outbound(b"second"))
            .await
            .unwrap();
        d.restart();
        let again = d
            .processor
            .send_idempotent(&d.owner, d.b, b"order-2", d.outbound(b"second"))
            .await
            .unwrap();
        assert_eq!(again, id);
        d.settle(3).await;
        assert_eq!(
            d.network.received(&consumer(2)).await[&0],
            BTreeMap::from([(id, 1)])
        );
    });
}

/// A send made again under its key whose look for the stored message
/// misses it (a replica behind the write that stored it, or that write
/// still landing), so that its own write conflicts: the message stored is
/// checked and taken up as one found under the key. Another message under
/// the key is refused, and the same one is not sent again.
#[test]
fn an_idempotent_send_that_misses_its_stored_message_is_checked_against_it() {
    runtime().block_on(async {
        let d = deployment(Faults::none(), Faults::none()).await;
        d.network.add_consumer(&consumer(2), 2).await;
        let send = |content: &'static [u8]| {
            d.processor
                .send_idempotent(&d.owner, d.b, b"order-1", d.outbound(content))
        };
        let id = send(b"first").await.unwrap();
        d.faults.miss_message_reads(1);
        assert!(
            matches!(send(b"other").await, Err(ProcessorError::Invalid(_))),
            "another message under the key"
        );
        d.faults.miss_message_reads(1);
        assert_eq!(send(b"first").await.unwrap(), id);
        d.settle(3).await;
        d.assert_sent_once(id, 2, format_args!("missed reads"))
            .await;
        // One message sent, counted once for the spam-rate signals.
        d.processor.export_integrity(&d.operator).await.unwrap();
        let reports = d.network.integrity_reports().await;
        let report = reports.iter().find(|r| r.business == d.b).unwrap();
        let sent: u64 = report.history.iter().map(|w| w.sent).sum::<u64>() + report.current.sent;
        assert_eq!(sent, 1, "{reports:?}");
    });
}

/// A message made on a state the business does not have (a prekey another
/// consumer used, altered so that it fails its MAC, or more than 2,000
/// counters ahead of its chain) is asked for again over a new session;
/// received while the store fails the read that would tell a redelivery
/// of a stored message, the store's failure is the answer (the message is
/// delivered again, and asked for then): asked for when it may be stored,
/// a message would reach its business twice. (The one too far ahead was
/// refused for good, Signal's refusal the answer whatever the store said:
/// such a message was lost.)
#[test]
fn a_message_asked_for_again_is_refused_as_such_when_the_store_cannot_say_if_it_is_stored() {
    runtime().block_on(async {
        let d = deployment(Faults::none(), Faults::none()).await;
        let mut first = d.handset().await;
        let inbound = d.inbound(&mut first, b"first").await;
        assert!(d.receive(inbound).await.unwrap().delivered);
        // Another consumer's device, from the same bundle.
        let mut second = d.handset().await;
        let on_a_used_prekey = Inbound {
            from: consumer(3),
            ..d.inbound(&mut second, b"second").await
        };
        // And another's, on a fresh prekey, its MAC altered.
        let keys = d.transport.published.lock().unwrap().clone().unwrap();
        let mut third = ConsumerDevice::new(1);
        third
            .start_session(d.b, &keys.bundle(Some(1)))
            .await
            .unwrap();
        let mut altered = Inbound {
            from: consumer(4),
            ..d.inbound(&mut third, b"third").await
        };
        // The last byte of the message it embeds is its MAC's.
        let bytes = &altered.message.bytes;
        let mac = field_range(bytes, 1, bytes.len(), 4).1 - 1;
        altered.message.bytes[mac] ^= 1;
        // And the first device's, 2,002 messages on (the ones before lost).
        let mut too_far = None;
        for _ in 0..2002 {
            too_far = Some(d.inbound(&mut first, b"later").await);
        }
        let too_far = too_far.unwrap();
        let cases = [
            (too_far, "store"),
            (on_a_used_prekey, "store"),
            (altered, "store"),
        ];
        let nothing_fails = Plan {
            at: usize::MAX,
            seams: Seams::Store,
            strike: Strike::Before,
            outage: false,
        };
        for (inbound, refusal) in cases {
            // Refused as such when the store answers (asked for again, on a
            // state the business lacks); which store call is the read, once
            // a refusal dropped the device's state from memory.
            for _ in 0..2 {
                d.faults.set(nothing_fails);
                let first = d.receive(inbound.clone()).await;
                let expected = match first {
                    Err(ProcessorError::Signal(_)) => "signal",
                    Err(ProcessorError::ResendAsked) => "store",
                    other => panic!("{other:?}"),
                };
                assert_eq!(expected, refusal);
            }
            let read = d.faults.calls().iter().position(|&c| c == "message");
            d.faults.set(nothing_fails);
            d.faults
                .fail_at(read.unwrap() + 1, Seams::Store, Strike::Before);
            let refused = d.receive(inbound).await;
            assert_eq!(d.faults.lift(), [("message", Strike::Before)]);
            let answer = match refused {
                Err(ProcessorError::Signal(_)) => "signal",
                Err(ProcessorError::Store(_)) => "store",
                other => panic!("{other:?}"),
            };
            assert_eq!(answer, refusal);
        }
    });
}

/// Read a protobuf varint at `*at`, moving past it.
fn varint(bytes: &[u8], at: &mut usize) -> usize {
    let mut value = 0;
    for shift in (0..64).step_by(7) {
        let byte = bytes[*at];
        *at += 1;
        value |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
    }
    value
}

/// The byte range of field `field` of the protobuf in `bytes[from..to]`:
/// its value's bytes (a length-delimited field's, or a varint).
fn field_range(bytes: &[u8], from: usize, to: usize, field: usize) -> (usize, usize) {
    let mut at = from;
    while at < to {
        let key = varint(bytes, &mut at);
        let start = at;
        let length = match key & 7 {
            0 => {
                varint(bytes, &mut at);
                if key >> 3 == field {
                    return (start, at);
                }
                continue;
            }
            2 => varint(bytes, &mut at),
            wire => panic!("wire type {wire}"),
        };
        if key >> 3 == field {
            return (at, at + length);
        }
        at += length;
    }
    panic!("no field {field}");
}

/// `first_contact` (a first-contact message) with the header of the
/// message it embeds rewritten on the way: the ratchet key `other` (another
/// first-contact message) carries, and counter `counter`. Its MAC fails.
fn with_header_of(first_contact: &[u8], other: &[u8], counter: u8) -> Vec<u8> {
    let mut bytes = first_contact.to_vec();
    let (start, end) = field_range(&bytes, 1, bytes.len(), 4);
    let (key, key_end) = field_range(&bytes, start + 1, end - 8, 1);
    let (other_start, other_end) = field_range(other, 1, other.len(), 4);
    let (theirs, theirs_end) = field_range(other, other_start + 1, other_end - 8, 1);
    bytes[key..key_end].copy_from_slice(&other[theirs..theirs_end]);
    let (at, at_end) = field_range(&bytes, start + 1, end - 8, 2);
    assert_eq!(at_end, at + 1, "a one-byte counter");
    bytes[at] = counter;
    bytes
}

/// A message whose header was rewritten on the way (its MAC fails) to
/// name another consumer's next message, or its own device's, costs no
/// genuine message: its device is asked for it again under an id its
/// bytes give, and both reach the business once. Before, it was asked
/// for under the id its header names: sent again, it took that id, and
/// the genuine message named was answered as a duplicate, never handed
/// over.
#[tokio::test]
async fn a_header_rewritten_on_the_way_costs_no_genuine_message() {
    for other_consumer in [true, false] {
        let d = deployment(Faults::none(), Faults::none()).await;
        let keys = d.transport.published.lock().unwrap().clone().unwrap();
        let mut a = d.handset().await;
        let mut b = ConsumerDevice::new(1);
        b.start_session(d.b, &keys.bundle(Some(1))).await.unwrap();
        let from_b = |message| Inbound {
            resend_of: None,
            from: consumer(3),
            device: 1,
            message,
        };
        let a1 = d.inbound(&mut a, b"A one").await;
        let a2 = d.inbound(&mut a, b"A two").await;
        let b1 = from_b(b.encrypt(d.b, b"B one").await.unwrap());
        let b2 = from_b(b.encrypt(d.b, b"B two").await.unwrap());
        let (named, next) = if other_consumer {
            (&b1, &b2)
        } else {
            (&a1, &a2)
        };
        let mut rewritten = a1.clone();
        rewritten.message.bytes = with_header_of(&a1.message.bytes, &named.message.bytes, 1);
        let asked = d.receive(rewritten).await;
        assert!(
            matches!(asked, Err(ProcessorError::ResendAsked)),
            "{asked:?}"
        );
        let asked = *d.transport.asked.lock().unwrap().last().unwrap();
        // The device sends "A one" again, over a new session, under the id
        // asked for; the genuine next message of the chain named comes.
        a.start_session(d.b, &keys.bundle(Some(2))).await.unwrap();
        let resend = Inbound {
            resend_of: Some(asked),
            ..d.inbound(&mut a, b"A one").await
        };
        let resent = d.receive(resend).await.unwrap();
        assert!(!resent.duplicate && resent.delivered, "{resent:?}");
        if other_consumer {
            assert!(d.receive(b1).await.unwrap().delivered);
        }
        let genuine = d.receive(next.clone()).await.unwrap();
        assert!(!genuine.duplicate && genuine.delivered, "{genuine:?}");
        let contents = d.contents();
        for text in [
            b"A one".as_slice(),
            if other_consumer { b"B two" } else { b"A two" },
        ] {
            assert_eq!(
                contents.get(text),
                Some(&1),
                "{other_consumer}: {contents:?}"
            );
        }
    }
}

#[test]
fn status_update_survives_every_host_failure() {
    runtime().block_on(async {
        // The report comes after the send's bookkeeping, or before it (the
        // network down when the message was sent: it is still queued).
        for queued in [false, true] {
            every_failure(|at| async move {
                let start = Timestamp::from_millis(T0);
                let network = if queued {
                    Faults::none().with_outage(start, Duration::from_secs(60))
                } else {
                    Faults::none()
                };
                let d = deployment(network, Faults::none()).await;
                d.network.add_consumer(&consumer(2), 1).await;
                let id = d
                    .processor
                    .send(&d.owner, d.b, d.outbound(b"hi"))
                    .await
                    .unwrap();
                d.faults.fail_at(at.n, at.seams, at.strike);
                let update = d
                    .processor
                    .status_update(&d.carrier, d.b, id, Status::Delivered)
                    .await;
                let failed = d.faults.lift();
                assert_outcome(&update, &failed, at);
                // Not acknowledged: the transport reports again.
                if update.is_err() {
                    d.processor
                        .status_update(&d.carrier, d.b, id, Status::Delivered)
                        .await
                        .unwrap();
                }
                d.settle(3).await;
                let status = d.processor.message_status(&d.owner, d.b, id).await;
                assert_eq!(status.unwrap(), (Status::Delivered, None), "{at:?}");
                let told: Vec<Status> = d.business.statuses()[&id].iter().map(|s| s.0).collect();
                assert_told_sent_delivered(&told, format_args!("{at:?}"));
                d.clock.advance(Duration::from_secs(2 * 24 * 3600));
                d.processor.export_billing(&d.operator).await.unwrap();
                let billed = d.billed().await;
                assert_eq!(billed, 1, "{at:?}, queued {queued}: {failed:?}");
                failed.is_empty()
            })
            .await;
        }
    });
}

#[test]
fn retry_receipt_survives_every_host_failure() {
    runtime().block_on(every_failure(|at| async move {
        let d = deployment(Faults::none(), Faults::none()).await;
        let (first, id) = d.sent_on_a_lost_session().await;
        d.faults.fail_at(at.n, at.seams, at.strike);
        let receipt = d.processor.retry_receipt(&d.carrier, d.b, id, 0).await;
        let failed = d.faults.lift();
        assert_outcome(&receipt, &failed, at);
        // Not acknowledged: the network hands it in again.
        if receipt.is_err() {
            d.processor
                .retry_receipt(&d.carrier, d.b, id, 0)
                .await
                .unwrap();
        }
        d.assert_got_again(first, id, format_args!("{at:?}")).await;
        failed.is_empty()
    }));
}

/// A retry receipt that fails leaves the device's Signal state as it was:
/// the new session and the message's due write land together or not at
/// all. (The session was replaced in a write of its own, before the one
/// that failed.) Handed in again, it is acted on.
#[test]
fn a_failed_retry_receipt_leaves_the_session_as_it_was() {
    runtime().block_on(async {
        let mut checked = 0;
        for n in 1..MAX_CALLS {
            let d = deployment(Faults::none(), Faults::none()).await;
            let (_, id) = d.sent_on_a_lost_session().await;
            let phone = d.store.message(d.b, id).await.unwrap().unwrap().phone;
            let peer = PeerId { phone, device: 0 };
            let before = d.store.peer(d.b, peer).await.unwrap();
            assert!(before.is_some());
            d.faults.fail_at(n, Seams::Store, Strike::Before);
            let receipt = d.processor.retry_receipt(&d.carrier, d.b, id, 0).await;
            let failed = d.faults.lift();
            if failed.is_empty() {
                break;
            }
            if receipt.is_err() {
                checked += 1;
                let after = d.store.peer(d.b, peer).await.unwrap();
                assert!(
                    after == before,
                    "store call {n} failed ({failed:?}, nothing applied), the receipt \
                     returned {receipt:?}, and the device's stored state changed"
                );
                // Handed in again, it is acted on, not taken for a copy.
                assert_eq!(
                    d.processor
                        .retry_receipt(&d.carrier, d.b, id, 0)
                        .await
                        .unwrap(),
                    custodian::processor::StatusChange::Applied,
                    "store call {n}"
                );
            }
        }
        assert!(checked > 0);
    });
}

#[test]
fn retransmit_due_survives_every_host_failure() {
    runtime().block_on(every_failure(|at| async move {
        // The business and the network are down for the first minute: an
        // inbound message waits for its business, an outbound one for the
        // network.
        let start = Timestamp::from_millis(T0);
        let down = |f: Faults| f.with_outage(start, Duration::from_secs(60));
        let d = deployment(down(Faults::none()), down(Faults::none())).await;
        d.network.add_consumer(&consumer(2), 2).await;
        let mut handset = d.handset().await;
        let inbound = d.inbound(&mut handset, b"in").await;
        assert!(!d.receive(inbound).await.unwrap().delivered);
        let out = d
            .processor
            .send(&d.owner, d.b, d.outbound(b"out"))
            .await
            .unwrap();
        // To a number with no device: failed, its report due.
        let nowhere = Outbound {
            to: consumer(3),
            ..d.outbound(b"nowhere")
        };
        let nowhere = d.processor.send(&d.owner, d.b, nowhere).await.unwrap();
        d.clock.advance(Duration::from_secs(120));
        d.faults.fail_at(at.n, at.seams, at.strike);
        let report = d.processor.retransmit_due(&d.operator).await;
        let failed = d.faults.lift();
        assert_outcome(&report, &failed, at);
        d.settle(3).await;
        let want = BTreeMap::from([(b"in".to_vec(), 1)]);
        assert_eq!(d.contents(), want, "{at:?}: {failed:?}");
        d.assert_statuses_told_once_forward(at.n);
        let received = d.network.received(&consumer(2)).await;
        for device in 0..2 {
            assert_eq!(received[&device].get(&out), Some(&1), "{at:?}: {failed:?}");
        }
        let told: Vec<Status> = d.business.statuses()[&out].iter().map(|s| s.0).collect();
        assert_told_sent_delivered(&told, format_args!("{at:?}"));
        let told = &d.business.statuses()[&nowhere];
        let want = [(Status::Failed, Some(FailureReason::NoDevices))];
        assert_eq!(told, &want, "{at:?}: {failed:?}");
        d.clock.advance(Duration::from_secs(2 * 24 * 3600));
        d.processor.export_billing(&d.operator).await.unwrap();
        assert_eq!(d.billed().await, 1, "{at:?}: {failed:?}");
        failed.is_empty()
    }));
}

/// A stored message sealed for another region than its store declares
/// (rows copied, keys and all, from a store elsewhere) is failed as
/// unreadable, and nothing of it is sent. Before, the region sealed into
/// every envelope was never compared with the store's: the message went
/// out.
#[tokio::test]
async fn a_message_sealed_for_another_region_is_unreadable() {
    let start = Timestamp::from_millis(T0);
    let down = Faults::none().with_outage(start, Duration::from_secs(60));
    let d = deployment(down, Faults::none()).await;
    d.network.add_consumer(&consumer(2), 1).await;
    let id = d
        .processor
        .send(&d.owner, d.b, d.outbound(b"sealed here"))
        .await
        .unwrap();
    d.faults.declare_region("eu".parse().unwrap());
    d.clock.advance(Duration::from_secs(120));
    d.processor.retransmit_due(&d.operator).await.unwrap();
    d.settle(3).await;
    assert_eq!(
        d.processor.message_status(&d.owner, d.b, id).await.unwrap(),
        (Status::Failed, Some(FailureReason::Unreadable))
    );
    assert!(d.network.received(&consumer(2)).await.is_empty());
}

/// A consumer's peer record (its Signal session) sealed for another region
/// than its store declares is not used: after a restart, nothing is sent
/// under it. Before, the peer load checked only the record's kind, so a
/// session sealed in one region was loaded and used from a store that
/// declares another.
#[tokio::test]
async fn a_session_sealed_for_another_region_is_not_used() {
    let mut d = deployment(Faults::none(), Faults::none()).await;
    d.network.add_consumer(&consumer(2), 1).await;
    let first = d
        .processor
        .send(&d.owner, d.b, d.outbound(b"first"))
        .await
        .unwrap();
    d.settle(3).await;
    assert_eq!(
        d.processor
            .message_status(&d.owner, d.b, first)
            .await
            .unwrap(),
        (Status::Delivered, None)
    );
    // The session's record was sealed in the store's own region; the store
    // now declares another, and the restarted processor loads it afresh.
    d.faults.declare_region("eu".parse().unwrap());
    d.restart();
    let second = d
        .processor
        .send(&d.owner, d.b, d.outbound(b"second"))
        .await
        .unwrap();
    d.settle(3).await;
    let status = d
        .processor
        .message_status(&d.owner, d.b, second)
        .await
        .unwrap();
    assert!(
        !matches!(status.0, Status::Sent | Status::Delivered),
        "sent under a session sealed for another region: {status:?}"
    );
}

/// A device whose session record is over the size limit in force (the
/// limit lowered across a restart) cannot be sent to: the message fails
/// at once, and its business is told, as with a device no session can be
/// had with. Before, every encrypt error counted as "try again later", and
/// the message was retried until its retention ended.
#[tokio::test]
async fn a_session_record_over_the_limit_fails_the_message_at_once() {
    let mut d = deployment(Faults::none(), Faults::none()).await;
    let keys = d.transport.published.lock().unwrap().clone().unwrap();
    let mut handset = ConsumerDevice::new(0);
    handset
        .start_session(d.b, &keys.bundle(Some(0)))
        .await
        .unwrap();
    // 1,500 messages skipped: the business keeps their keys, and the
    // device's record grows past the smallest limit.
    let mut last = None;
    for i in 0..=1_500 {
        last = Some(
            handset
                .encrypt(d.b, format!("{i}").as_bytes())
                .await
                .unwrap(),
        );
    }
    let inbound = Inbound {
        resend_of: None,
        from: consumer(1),
        device: 0,
        message: last.unwrap(),
    };
    assert!(d.receive(inbound).await.unwrap().delivered);
    d.seams.signal.max_record_len = custodian::signal::MIN_RECORD_LEN;
    d.restart();
    d.network.add_consumer(&consumer(1), 1).await;
    let reply = Outbound {
        to: consumer(1),
        ..d.outbound(b"reply")
    };
    let id = d.processor.send(&d.owner, d.b, reply).await.unwrap();
    assert_eq!(
        d.processor.message_status(&d.owner, d.b, id).await.unwrap(),
        (Status::Failed, Some(FailureReason::NoSession))
    );
    let told: Vec<Status> = d.business.statuses()[&id].iter().map(|s| s.0).collect();
    assert_eq!(told, [Status::Failed]);
}

/// A message refused because the keys kept for the messages it skips
/// would grow its device's record past the limit is not refused for good:
/// once the skipped messages arrive, it is received. (It was permanent,
/// so a transport following `is_permanent` dropped a valid message.)
/// (Review of Signal sessions.)
#[tokio::test]
async fn a_message_refused_for_its_records_size_is_received_once_the_skipped_ones_arrive() {
    let mut d = deployment(Faults::none(), Faults::none()).await;
    d.seams.signal.max_record_len = custodian::signal::MIN_RECORD_LEN;
    d.restart();
    let mut handset = d.handset().await;
    let mut earlier = Vec::new();
    for i in 0..1_000 {
        earlier.push(d.inbound(&mut handset, format!("{i}").as_bytes()).await);
    }
    let ahead = d.inbound(&mut handset, b"ahead").await;
    let refused = d.receive(ahead.clone()).await.unwrap_err();
    assert!(
        matches!(
            refused,
            ProcessorError::Signal(SignalError::RecordTooLarge { .. })
        ) && !refused.is_permanent(),
        "{refused:?}"
    );
    for inbound in earlier {
        assert!(d.receive(inbound).await.unwrap().delivered);
    }
    assert!(d.receive(ahead).await.unwrap().delivered);
}

/// Four copies of `device`'s retry receipt for `id`, 30 s apart, each
/// served `bundle`'s: each is ignored; how many bundles they fetched.
async fn ignored_copies(
    d: &Deployment,
    id: MessageId,
    device: u32,
    mut bundle: impl FnMut() -> custodian::signal::PreKeyBundle,
) -> usize {
    let fetched = || d.transport.bundles_fetched();
    let before = fetched();
    for copy in 0..4 {
        d.transport.served.lock().unwrap().insert(device, bundle());
        let receipt = d.processor.retry_receipt(&d.carrier, d.b, id, device).await;
        assert!(
            matches!(receipt, Ok(StatusChange::Ignored)),
            "copy {copy}: {receipt:?}"
        );
        d.clock.advance(Duration::from_secs(30));
    }
    fetched() - before
}

/// A retry receipt whose new session would make its device's record
/// larger than the limit (the lost session, archived, keeps the keys of the
/// messages it skipped) is ignored, and so is every copy the network hands
/// in: one bundle fetched in all. Once the skipped messages arrive and the
/// record shrinks, the device's receipt is acted on. (Each copy failed as
/// a passing error and fetched another bundle, one of the device's
/// one-time prekeys, for as long as the message lived, until the review of
/// suspicions; then, until the second look, the receipts stayed ignored for
/// the message's life, record shrunk or not.)
#[tokio::test]
async fn a_retry_receipt_whose_session_would_be_too_large_waits_for_the_record_to_shrink() {
    let (d, mut handset, messages, id) = near_the_record_limit().await;
    let (skipped, refused) = skip_to_the_limit(&d, &messages).await;
    let fetched = ignored_copies(&d, id, 0, || handset.bundle(true)).await;
    assert_eq!(fetched, 1, "bundles fetched for the copies of one receipt");
    // The skipped messages arrive, and the one refused: the record shrinks.
    for k in skipped.into_iter().chain([refused]) {
        assert!(d.receive(messages[k].clone()).await.unwrap().delivered);
    }
    d.clock.advance(Duration::from_secs(600));
    let bundle = handset.bundle(true);
    d.transport.served.lock().unwrap().insert(0, bundle);
    let receipt = d.processor.retry_receipt(&d.carrier, d.b, id, 0).await;
    assert!(matches!(receipt, Ok(StatusChange::Applied)), "{receipt:?}");
}

/// A reinstalled device whose old session kept keys near the record limit
/// cannot write (each of its messages is refused as too large: the new
/// session beside the archived old one is over the limit), and each
/// redelivery of its message lets in none of its receipts refused for the
/// new key: nothing is fetched for a key never taken. (Each redelivery let
/// them in again, and the next receipt fetched a bundle, until the second
/// look.)
#[tokio::test]
async fn a_message_refused_before_its_write_approves_no_new_key() {
    let (d, _, messages, id) = near_the_record_limit().await;
    skip_to_the_limit(&d, &messages).await;
    let keys = d.transport.published.lock().unwrap().clone().unwrap();
    let mut new = ConsumerDevice::new(0);
    let serve = |bundle| d.transport.served.lock().unwrap().insert(0, bundle);
    serve(new.bundle(true));
    let refused = d.processor.retry_receipt(&d.carrier, d.b, id, 0).await;
    assert!(matches!(refused, Ok(StatusChange::Ignored)), "{refused:?}");
    new.start_session(d.b, &keys.bundle(Some(1))).await.unwrap();
    let inbound = Inbound {
        resend_of: None,
        from: consumer(1),
        device: 0,
        message: new.encrypt(d.b, b"new phone").await.unwrap(),
    };
    let fetched = || d.transport.bundles_fetched();
    let before = fetched();
    for cycle in 0..3 {
        let r = d.receive(inbound.clone()).await;
        assert!(
            matches!(
                r,
                Err(ProcessorError::Signal(SignalError::RecordTooLarge { .. }))
            ),
            "cycle {cycle}: {r:?}"
        );
        d.clock.advance(Duration::from_secs(600));
        serve(new.bundle(true));
        let receipt = d.processor.retry_receipt(&d.carrier, d.b, id, 0).await;
        assert!(matches!(receipt, Ok(StatusChange::Ignored)), "{receipt:?}");
    }
    assert_eq!(fetched() - before, 0);
}

/// A receive that would take a reinstalled device's new key, whose write
/// the store fails before making it, approves nothing: the device's
/// receipts refused for that key stay ignored, and no bundle is fetched.
/// (Each such receive let them in again, a bundle fetched for a key still
/// refused, until the second look.)
#[tokio::test]
async fn a_receive_whose_write_failed_approves_nothing() {
    let d = Deployment::new(Faults::none(), Faults::none()).await;
    let (id, mut new, again) = d.reinstalled_and_refused().await;
    let stored = d.store.census().await.unwrap().messages;
    let fetched = || d.transport.bundles_fetched();
    let before = fetched();
    for round in 0..3 {
        // The store fails the receive's write before making it (the calls
        // before it, failing, are skipped past).
        for n in 1..MAX_CALLS {
            d.faults.fail_at(n, Seams::Store, Strike::Before);
            let r = d.receive(again.clone()).await;
            let failed = d.faults.lift();
            assert!(r.is_err() && !failed.is_empty(), "round {round}: {r:?}");
            if failed[0].0 == "commit" {
                break;
            }
        }
        assert_eq!(d.store.census().await.unwrap().messages, stored);
        d.clock.advance(Duration::from_secs(600));
        d.serve_new_install(&mut new);
        let receipt = d.processor.retry_receipt(&d.carrier, d.b, id, 1).await;
        assert!(matches!(receipt, Ok(StatusChange::Ignored)), "{receipt:?}");
    }
    assert_eq!(
        fetched() - before,
        0,
        "bundles fetched for a key never taken"
    );
}

/// A replay the store refuses as a copy of a stored message (written
/// under another consumer's device, it carries another identity key for
/// the device it is handed in as) approves nothing: that device's receipts
/// refused for its new key stay ignored. (It let them in, a bundle fetched
/// for a key never taken: the write known not to have landed, its approval
/// was not cancelled. A review found it.)
#[tokio::test]
async fn a_replay_refused_as_a_copy_approves_nothing() {
    let d = Deployment::new(Faults::none(), Faults::none()).await;
    let (id, _new, _again) = d.reinstalled_and_refused().await;
    // Another consumer's first message, on no one-time prekey, is stored.
    let message = first_without_one_time_prekey(&d, consumer(5), 7).await;
    // Its replay, as consumer 1's device 1: a copy.
    let replay = Inbound {
        resend_of: None,
        from: consumer(1),
        device: 1,
        message,
    };
    assert!(d.receive(replay).await.unwrap().duplicate);
    let before = d.transport.bundles_fetched();
    let receipt = d.processor.retry_receipt(&d.carrier, d.b, id, 1).await;
    assert!(matches!(receipt, Ok(StatusChange::Ignored)), "{receipt:?}");
    assert_eq!(d.transport.bundles_fetched(), before);
}

/// Consumer 1's devices 1 and 2 write to the business; the two devices.
async fn two_devices_wrote(d: &Deployment) -> (ConsumerDevice, ConsumerDevice) {
    let keys = d.transport.published.lock().unwrap().clone().unwrap();
    let mut one = d.handset().await;
    let mut two = ConsumerDevice::new(2);
    two.start_session(d.b, &keys.bundle(Some(1))).await.unwrap();
    for device in [&mut one, &mut two] {
        let inbound = d.inbound(device, b"hello").await;
        assert!(d.receive(inbound).await.unwrap().delivered);
    }
    (one, two)
}

/// On SQLite, a device whose stored row is damaged (its record not a blob:
/// the store answers `StoreError::Corrupt` for the row) is given up on by a
/// send, as one whose record does not open is: a message to it alone fails
/// at once (`NoSession`).
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn a_send_gives_up_a_device_whose_stored_row_is_damaged() {
    use custodian::store::{SqliteConfig, SqliteStore};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
    let mut d = deployment_over(Arc::new(store), Faults::none(), Faults::none()).await;
    let _devices = two_devices_wrote(&d).await;
    d.network.add_consumer(&consumer(1), 3).await;
    d.transport.unlinked.lock().unwrap().extend([0, 1]);
    let damaged = rusqlite::Connection::open(&path)
        .unwrap()
        .execute("UPDATE peers SET sealed = 7 WHERE device = 2", [])
        .unwrap();
    assert_eq!(damaged, 1);
    d.restart();
    let reply = Outbound {
        to: consumer(1),
        ..d.outbound(b"reply")
    };
    let id = d.processor.send(&d.owner, d.b, reply).await.unwrap();
    d.processor.retransmit_due(&d.operator).await.unwrap();
    let told = d.business.statuses().get(&id).cloned().unwrap_or_default();
    assert_eq!(told, [(Status::Failed, Some(FailureReason::NoSession))]);
}

/// How a test damages a device's stored record.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// Another device's record copied over its row (a store that swapped
    /// rows): it opens, and names another device.
    Swapped,
    /// One bit of its sealed bytes flipped: it fails its authentication.
    Flipped,
}

/// Damage the stored record of consumer 1's device 2 (`how`), from
/// device 1's, and restart the process (nothing of it cached).
async fn damage_device_two(d: &mut Deployment, how: Damage) {
    let phone = d.phone_of(1).await;
    let stored = |device| d.store.peer(d.b, PeerId { phone, device });
    let sealed = match how {
        Damage::Swapped => stored(1).await.unwrap().unwrap(),
        Damage::Flipped => {
            let mut sealed = stored(2).await.unwrap().unwrap();
            let last = sealed.len() - 1;
            sealed[last] ^= 1;
            sealed
        }
    };
    let damage = Op::PutPeer {
        business: d.b,
        peer: PeerId { phone, device: 2 },
        sealed,
    };
    d.store.commit(Batch::from(damage)).await.unwrap();
    d.restart();
}

/// A retry receipt of a device whose stored record cannot be read
/// (another device's, or failing its authentication) is ignored, and so
/// is every copy: one bundle fetched in all. (Each copy failed as a
/// passing error and fetched another, until the second look; one failing
/// its authentication, until a send was made to give such a device up.)
#[tokio::test]
async fn a_receipt_of_a_device_whose_record_is_damaged_fetches_one_bundle() {
    for how in [Damage::Swapped, Damage::Flipped] {
        let mut d = Deployment::new(Faults::none(), Faults::none()).await;
        let (_, mut two) = two_devices_wrote(&d).await;
        d.network.add_consumer(&consumer(1), 3).await;
        let reply = Outbound {
            to: consumer(1),
            ..d.outbound(b"reply")
        };
        let id = d.processor.send(&d.owner, d.b, reply).await.unwrap();
        damage_device_two(&mut d, how).await;
        let copies = ignored_copies(&d, id, 2, || two.bundle(true)).await;
        assert_eq!(copies, 1, "{how:?}");
    }
}

/// Two outbound messages due, to two consumers, and one store or key
/// provider call of the retransmission pass failing, at each call in turn:
/// the failure strikes one message's work, and the pass goes on with the
/// other (the error counted). Only a failure to list the due messages
/// fails the pass. Afterwards each device has its message once.
#[test]
fn a_failure_on_one_due_message_holds_up_none_behind_it() {
    runtime().block_on(every_failure(|at| async move {
        // The network is down for the first minute: both messages wait.
        let start = Timestamp::from_millis(T0);
        let down = Faults::none().with_outage(start, Duration::from_secs(60));
        let d = deployment(down, Faults::none()).await;
        let mut ids = Vec::new();
        for to in [2, 3] {
            ids.push(d.send_out_to(to).await);
        }
        d.clock.advance(Duration::from_secs(120));
        d.faults.fail_at(at.n, at.seams, at.strike);
        let report = d.processor.retransmit_due(&d.operator).await;
        let failed = d.faults.lift();
        assert_outcome(&report, &failed, at);
        match &report {
            Err(_) => assert_eq!(failed.first().map(|f| f.0), Some("due_messages")),
            Ok(report) => assert!(report.errors <= 1, "{at:?}: {report:?}"),
        }
        if report.is_ok() {
            let mut sent = 0;
            for id in &ids {
                let (status, _) = d
                    .processor
                    .message_status(&d.owner, d.b, *id)
                    .await
                    .unwrap();
                sent += u32::from(status == Status::Sent);
            }
            assert!(sent >= 1, "{at:?}: {failed:?} held up both messages");
        }
        d.settle(3).await;
        for (to, id) in [2, 3].into_iter().zip(&ids) {
            let received = d.network.received(&consumer(to)).await;
            assert_eq!(received[&0].get(id), Some(&1), "{at:?}: {failed:?}");
        }
        d.assert_statuses_told_once_forward(at.n);
        failed.is_empty()
    }));
}

#[test]
fn sweep_survives_every_host_failure() {
    runtime().block_on(every_failure(|at| async move {
        // The network never takes the outbound message: it expires open.
        let d = deployment(Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let inbound = d.inbound(&mut handset, b"in").await;
        assert!(d.receive(inbound).await.unwrap().delivered);
        let out = d
            .processor
            .send(&d.owner, d.b, d.outbound(b"out"))
            .await
            .unwrap();
        d.clock.advance(Duration::from_secs(31 * 24 * 3600));
        d.faults.fail_at(at.n, at.seams, at.strike);
        let swept = d.processor.sweep(&d.operator).await;
        let failed = d.faults.lift();
        assert_outcome(&swept, &failed, at);
        let report = d.processor.sweep(&d.operator).await.unwrap();
        assert!(report.complete, "{at:?}");
        d.settle(2).await;
        let census = d.store.census().await.unwrap();
        assert_eq!((census.messages, census.peers), (0, 0), "{at:?}");
        let told = &d.business.statuses()[&out];
        let want = [(Status::Failed, Some(FailureReason::NoDevices))];
        assert_eq!(told, &want, "{at:?}: {failed:?}");
        let late = d.inbound(&mut handset, b"later").await;
        assert!(d.receive(late).await.is_err(), "{at:?}");
        failed.is_empty()
    }));
}

#[test]
fn publish_keys_survives_every_host_failure() {
    runtime().block_on(async {
        // With the signed prekey due for rotation or not.
        for days in [0, 8] {
            every_failure(|at| async move {
                let d = deployment(Faults::none(), Faults::none()).await;
                // A consumer holding the keys published before.
                let early = d.handset().await;
                d.clock.advance(Duration::from_secs(days * 24 * 3600));
                d.faults.fail_at(at.n, at.seams, at.strike);
                let published = d.processor.publish_keys(&d.owner, d.b).await;
                let failed = d.faults.lift();
                assert_outcome(&published, &failed, at);
                d.processor.publish_keys(&d.owner, d.b).await.unwrap();
                // Every key published, before and after, starts a session.
                let keys = d.transport.published.lock().unwrap().clone().unwrap();
                let mut handsets = vec![early];
                // (The early consumer took the first one-time prekey.)
                for index in [None, Some(1), Some(keys.one_time_prekeys.len() - 1)] {
                    let mut handset = ConsumerDevice::new(1);
                    handset
                        .start_session(d.b, &keys.bundle(index))
                        .await
                        .unwrap();
                    handsets.push(handset);
                }
                for (i, handset) in handsets.iter_mut().enumerate() {
                    let content = format!("hello {i}");
                    let inbound = d.inbound(handset, content.as_bytes()).await;
                    let receipt = d.receive(inbound).await;
                    assert!(
                        receipt.is_ok(),
                        "{at:?}, {days} days: {failed:?}: {receipt:?}"
                    );
                    // (Each is the same number's device reinstalled: its new
                    // identity is accepted and reported.)
                }
                failed.is_empty()
            })
            .await;
        }
    });
}

#[test]
fn trust_new_identity_survives_every_host_failure() {
    runtime().block_on(every_failure(|at| async move {
        let d = deployment(Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let inbound = d.inbound(&mut handset, b"hello").await;
        d.receive(inbound).await.unwrap();
        let from = consumer(1);
        let device = handset.device_id();
        // The consumer reinstalled, and confirmed the new key.
        d.processor.publish_keys(&d.owner, d.b).await.unwrap();
        let mut reinstalled = d.handset().await;
        let key = reinstalled.identity();
        d.faults.fail_at(at.n, at.seams, at.strike);
        let trusted = d
            .processor
            .trust_new_identity(&d.owner, d.b, &from, device, key)
            .await;
        let failed = d.faults.lift();
        assert_outcome(&trusted, &failed, at);
        // Refused: the session stands (and goes on), unless its
        // replacement landed unanswered.
        let next = d.inbound(&mut handset, b"next").await;
        let kept = d.receive(next).await.is_ok();
        if trusted.is_ok() {
            assert!(!kept, "{at:?}: the old session outlived the approval");
        } else {
            assert!(kept || failed == [("commit", Strike::After)], "{at:?}");
        }
        d.processor
            .trust_new_identity(&d.owner, d.b, &from, device, key)
            .await
            .unwrap();
        let inbound = d.inbound(&mut reinstalled, b"again").await;
        assert!(d.receive(inbound).await.unwrap().delivered, "{at:?}");
        failed.is_empty()
    }));
}

/// The holds in force are what the audit trail says, and every hold event
/// in it (an undo included) names the operator who asked.
async fn holds_agree_with_the_audit(d: &Deployment, at: At, what: &str) -> bool {
    let listed = d.processor.holds(&d.operator).await.unwrap();
    let stored = d.store.holds().await.unwrap();
    assert_eq!(listed, stored, "{at:?}: {what}");
    let events = d.audit.hold_events();
    assert!(
        events.iter().all(|e| e.principal == d.operator.name()),
        "{at:?}: {what}: {events:?}"
    );
    let audited = holds_audited(&d.audit);
    let stands = stored.iter().any(|h| h.reference == "case-1");
    assert_eq!(audited, i32::from(stands), "{at:?}: {what}");
    stands
}

#[test]
fn holds_survive_every_host_failure() {
    runtime().block_on(every_failure(|at| async move {
        let d = deployment(Faults::none(), Faults::none()).await;
        let scope = HoldScope::Business(d.b);
        d.faults.fail_at(at.n, at.seams, at.strike);
        let placed = d.processor.place_hold(&d.operator, scope, "case-1").await;
        let failed_placing = d.faults.lift();
        assert_outcome(&placed, &failed_placing, at);
        let stands = holds_agree_with_the_audit(&d, at, "placing").await;
        // A refused hold change changed nothing.
        assert_eq!(stands, placed.is_ok(), "{at:?}: {failed_placing:?}");
        d.processor
            .place_hold(&d.operator, scope, "case-1")
            .await
            .unwrap();
        holds_agree_with_the_audit(&d, at, "placed").await;
        d.faults.fail_at(at.n, at.seams, at.strike);
        let released = d.processor.release_hold(&d.operator, scope, "case-1").await;
        let failed_releasing = d.faults.lift();
        assert_outcome(&released, &failed_releasing, at);
        let stands = holds_agree_with_the_audit(&d, at, "releasing").await;
        assert_eq!(stands, released.is_err(), "{at:?}: {failed_releasing:?}");
        d.processor
            .release_hold(&d.operator, scope, "case-1")
            .await
            .unwrap();
        assert!(d.store.holds().await.unwrap().is_empty());
        holds_agree_with_the_audit(&d, at, "released").await;
        failed_placing.is_empty() && failed_releasing.is_empty()
    }));
}

/// An early shred under a failing store or key provider: refused with the
/// host's error, it destroyed the key only if its destroying write landed
/// (its answer lost), and the trail records the shred before the key goes;
/// made again, it destroys the key (or finds it gone), and the
/// consumer's next message, which would be sealed into the epoch, is
/// refused.
#[test]
fn an_early_shred_survives_every_host_failure() {
    runtime().block_on(every_failure(|at| async move {
        let d = deployment(Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let inbound = d.inbound(&mut handset, b"in").await;
        let id = d.receive(inbound).await.unwrap().id;
        let epoch = d.store.message(d.b, id).await.unwrap().unwrap().epoch;
        let keys = d.processor.keys(&d.operator).unwrap();
        let shreds = || {
            let changes = d.audit.changes();
            changes
                .iter()
                .filter(|c| matches!(c, Change::Shred { .. }))
                .count()
        };
        d.faults.fail_at(at.n, at.seams, at.strike);
        let shred = d
            .processor
            .shred_epoch(&d.operator, d.b, epoch, "case-1")
            .await;
        let failed = d.faults.lift();
        assert_outcome(&shred, &failed, at);
        let live = keys.epoch_key(d.b, epoch).await.is_ok();
        if let Ok(destroyed) = shred {
            assert!(destroyed && !live, "{at:?}");
        }
        assert!(
            live || shreds() == 1,
            "{at:?}: {failed:?}: destroyed unrecorded"
        );
        let again = d
            .processor
            .shred_epoch(&d.operator, d.b, epoch, "case-1")
            .await
            .unwrap();
        assert_eq!(again, live, "{at:?}: {failed:?}");
        assert!(keys.epoch_key(d.b, epoch).await.is_err(), "{at:?}");
        let late = d.inbound(&mut handset, b"late").await;
        assert!(d.receive(late).await.is_err(), "{at:?}: {failed:?}");
        failed.is_empty()
    }));
}

#[test]
fn reads_and_exports_survive_every_host_failure() {
    runtime().block_on(every_failure(|at| async move {
        let d = deployment(Faults::none(), Faults::none()).await;
        d.network.add_consumer(&consumer(2), 1).await;
        let id = d
            .processor
            .send(&d.owner, d.b, d.outbound(b"billable"))
            .await
            .unwrap();
        d.clock.advance(Duration::from_secs(2 * 24 * 3600));
        let p = &d.processor;
        d.faults.fail_at(at.n, at.seams, at.strike);
        let status = p.message_status(&d.owner, d.b, id).await;
        let census = p.census(&d.operator).await;
        let holds = p.holds(&d.operator).await;
        let exported = p.export_billing(&d.operator).await;
        let integrity = p.export_integrity(&d.operator).await;
        let failed = d.faults.lift();
        assert_outcome(&status, &failed, at);
        assert_outcome(&census, &failed, at);
        assert_outcome(&holds, &failed, at);
        assert_outcome(&exported, &failed, at);
        assert_outcome(&integrity, &failed, at);
        assert_eq!(
            p.message_status(&d.owner, d.b, id).await.unwrap(),
            (Status::Sent, None)
        );
        assert_eq!(p.census(&d.operator).await.unwrap().messages, 1, "{at:?}");
        p.export_billing(&d.operator).await.unwrap();
        assert_eq!(d.billed().await, 1, "{at:?}");
        failed.is_empty()
    }));
}

#[test]
fn a_store_outage_loses_no_message() {
    runtime().block_on(async {
        for from in 1..40 {
            let at = At {
                n: from,
                seams: Seams::Store,
                strike: Strike::Before,
            };
            let d = deployment(Faults::none(), Faults::none()).await;
            d.network.add_consumer(&consumer(2), 1).await;
            let mut handset = d.handset().await;
            let inbound = d.inbound(&mut handset, b"in").await;
            d.faults.outage_from(from, Seams::Store);
            let received = d.receive(inbound.clone()).await;
            let sent = d.processor.send(&d.owner, d.b, d.outbound(b"out")).await;
            let retried = d.processor.retransmit_due(&d.operator).await;
            let swept = d.processor.sweep(&d.operator).await;
            let failed = d.faults.lift();
            assert_outcome(&received, &failed, at);
            assert_outcome(&sent, &failed, at);
            assert_outcome(&retried, &failed, at);
            assert_outcome(&swept, &failed, at);
            if received.is_err() {
                d.receive(inbound).await.unwrap();
            }
            if sent.is_err() {
                d.processor
                    .send(&d.owner, d.b, d.outbound(b"out"))
                    .await
                    .unwrap();
            }
            d.settle(3).await;
            assert_eq!(
                d.contents(),
                BTreeMap::from([(b"in".to_vec(), 1)]),
                "{at:?}"
            );
            let received = d.network.received(&consumer(2)).await;
            let stored = d.store.census().await.unwrap().messages;
            assert_eq!(received[&0].len() as u64, stored - 1, "{at:?}");
            assert!(received[&0].values().all(|&c| c == 1), "{at:?}");
            d.assert_statuses_told_once_forward(from);
            if failed.is_empty() {
                return;
            }
        }
        panic!("the outage never ended before the calls did");
    });
}

#[test]
fn a_key_provider_outage_loses_no_message() {
    runtime().block_on(async {
        for from in 1..10 {
            let at = At {
                n: from,
                seams: Seams::Provider,
                strike: Strike::Before,
            };
            // The business and the network are down for the first minute:
            // a message each way waits for a retry.
            let start = Timestamp::from_millis(T0);
            let down = |f: Faults| f.with_outage(start, Duration::from_secs(60));
            let mut d = deployment(down(Faults::none()), down(Faults::none())).await;
            d.network.add_consumer(&consumer(2), 1).await;
            let mut handset = d.handset().await;
            let early = d.inbound(&mut handset, b"early").await;
            assert!(!d.receive(early).await.unwrap().delivered);
            d.processor
                .send(&d.owner, d.b, d.outbound(b"queued"))
                .await
                .unwrap();
            d.clock.advance(Duration::from_secs(120));
            // A new process, with no key unwrapped: every key needs the
            // provider, which is down.
            d.restart();
            let inbound = d.inbound(&mut handset, b"in").await;
            d.faults.outage_from(from, Seams::Provider);
            let received = d.receive(inbound.clone()).await;
            let sent = d.processor.send(&d.owner, d.b, d.outbound(b"out")).await;
            let retried = d.processor.retransmit_due(&d.operator).await;
            d.clock.advance(Duration::from_secs(60));
            let again = d.processor.retransmit_due(&d.operator).await;
            let failed = d.faults.lift();
            for outcome in [&retried, &again] {
                assert_outcome(outcome, &failed, at);
            }
            assert_outcome(&received, &failed, at);
            assert_outcome(&sent, &failed, at);
            if received.is_err() {
                d.receive(inbound).await.unwrap();
            }
            if sent.is_err() {
                d.processor
                    .send(&d.owner, d.b, d.outbound(b"out"))
                    .await
                    .unwrap();
            }
            d.settle(3).await;
            let want = BTreeMap::from([(b"early".to_vec(), 1), (b"in".to_vec(), 1)]);
            assert_eq!(d.contents(), want, "{at:?}: {failed:?}");
            let received = d.network.received(&consumer(2)).await;
            assert_eq!(received[&0].len(), 2, "{at:?}: {failed:?}");
            assert!(received[&0].values().all(|&c| c == 1), "{at:?}");
            d.assert_statuses_told_once_forward(from);
            if failed.is_empty() {
                return;
            }
        }
        panic!("the outage never ended before the calls did");
    });
}

#[test]
fn a_failed_decrypt_burns_no_message_and_reuses_no_counter() {
    runtime().block_on(every_failure(|at| async move {
        let mut s = Signal::new(3).await;
        let reply = s.handset.encrypt(s.b, b"reply").await.unwrap();
        s.faults.fail_at(at.n, at.seams, at.strike);
        let got = s.sessions.decrypt(s.b, s.peer, &reply, s.expiry()).await;
        let failed = s.faults.lift();
        assert_outcome(&got, &failed, at);
        s.send_and_read(b"after the failure").await;
        if got.is_err() {
            // Decrypted again, or, if the failed decrypt's commit landed
            // unanswered, a duplicate (the processor stores the message in
            // that commit, and a retried receive finds it).
            let again = s.sessions.decrypt(s.b, s.peer, &reply, s.expiry()).await;
            match again {
                Ok(d) => assert_eq!(*d.plaintext, b"reply", "{at:?}"),
                Err(SignalError::DuplicateMessage) => {
                    assert!(failed.contains(&("commit", Strike::After)), "{at:?}");
                }
                Err(e) => panic!("{at:?}: {failed:?}: {e}"),
            }
        }
        s.send_and_read(b"after the reply").await;
        failed.is_empty()
    }));
}

#[test]
fn a_failed_encrypt_reuses_no_counter() {
    runtime().block_on(async {
        for sends in [0, 63, 64] {
            every_failure(|at| async move {
                let mut s = Signal::new(sends).await;
                s.faults.fail_at(at.n, at.seams, at.strike);
                let got = s.encrypt(b"failed").await;
                let failed = s.faults.lift();
                assert_outcome(&got, &failed, at);
                if let Ok(out) = got {
                    let read = s.handset.decrypt(s.b, &out).await.unwrap();
                    assert_eq!(read, b"failed");
                }
                s.send_and_read(b"after the failure").await;
                s.send_and_read(b"and again").await;
                failed.is_empty()
            })
            .await;
        }
    });
}

#[test]
fn a_failed_approval_or_forget_leaves_memory_as_the_store() {
    runtime().block_on(every_failure(|at| async move {
        for forget in [false, true] {
            let s = Signal::new(3).await;
            let (b, peer) = (s.b, s.peer);
            let before = s.store.peer(b, peer).await.unwrap();
            let key = ConsumerDevice::new(1).identity();
            s.faults.fail_at(at.n, at.seams, at.strike);
            let done = if forget {
                s.sessions.forget(b, peer.phone).await.map(drop)
            } else {
                s.sessions
                    .trust_identity(b, peer, key, s.expiry())
                    .await
                    .map(drop)
            };
            let failed = s.faults.lift();
            assert_outcome(&done, &failed, at);
            let replaced = s.store.peer(b, peer).await.unwrap() != before;
            assert!(replaced || done.is_err(), "{at:?}");
            let sent = s.encrypt(b"after").await;
            assert_eq!(
                replaced,
                matches!(sent, Err(SignalError::NoSession)),
                "{at:?}: replaced {replaced}, the send gave {sent:?}"
            );
            if !failed.is_empty() {
                return false;
            }
        }
        true
    }));
}

/// A key manager over the failing store and provider, which has sealed
/// with the key of the epoch of `now`.
async fn key_manager(
    now: Timestamp,
    epoch: Epoch,
) -> (
    Arc<MemoryStore>,
    Arc<HostFaults>,
    KeyManager,
    Arc<dyn KeyProvider>,
) {
    let b = BusinessId::new(BUSINESS).unwrap();
    let store = Arc::new(MemoryStore::new());
    let faults = Arc::new(HostFaults::default());
    let root: Arc<dyn KeyProvider> = Arc::new(LocalKeyProvider::new(&SecretKey::generate()));
    let provider = Arc::new(FailingProvider {
        inner: root.clone(),
        faults: faults.clone(),
    });
    let failing = Arc::new(FailingStore::paused(store.clone(), faults.clone()));
    let keys = KeyManager::new(provider, failing);
    keys.epoch_key_for_seal(b, epoch, now).await.unwrap();
    (store, faults, keys, root)
}

#[test]
fn a_failed_epoch_destruction_keeps_memory_as_the_store() {
    runtime().block_on(async {
        let b = BusinessId::new(BUSINESS).unwrap();
        let now = Timestamp::from_millis(T0);
        let epoch = Epoch::containing(now, EpochLength::DEFAULT).unwrap();
        let id = KeyId::epoch(b, epoch);
        every_failure(|at| async move {
            let (store, faults, keys, _) = key_manager(now, epoch).await;
            faults.fail_at(at.n, at.seams, at.strike);
            let destroyed = keys.destroy_epoch_unchecked(b, epoch, now).await;
            let failed = faults.lift();
            assert_outcome(&destroyed, &failed, at);
            let live = matches!(store.key(&id).await.unwrap(), Some(KeyEntry::Wrapped(_)));
            assert_eq!(keys.epoch_key(b, epoch).await.is_ok(), live, "{at:?}");
            assert!(!live || destroyed.is_err(), "{at:?}");
            keys.destroy_epoch_unchecked(b, epoch, now).await.unwrap();
            assert!(keys.epoch_key(b, epoch).await.is_err(), "{at:?}");
            failed.is_empty()
        })
        .await;
        every_failure(|at| async move {
            let (store, faults, keys, _) = key_manager(now, epoch).await;
            // Not ended yet: nothing is destroyed early, failure or not.
            faults.fail_at(at.n, at.seams, at.strike);
            let early = keys.destroy_ended_epochs_unchecked(now).await;
            assert_outcome(&early, &faults.lift(), at);
            assert!(keys.epoch_key(b, epoch).await.is_ok(), "{at:?}");
            assert!(store.key(&id).await.unwrap().is_some(), "{at:?}");
            let ended = epoch.end();
            faults.fail_at(at.n, at.seams, at.strike);
            let destroyed = keys.destroy_ended_epochs_unchecked(ended).await;
            let failed = faults.lift();
            assert_outcome(&destroyed, &failed, at);
            let live = store.key(&id).await.unwrap().is_some();
            assert_eq!(keys.epoch_key(b, epoch).await.is_ok(), live, "{at:?}");
            // The next run destroys it: not kept past its time.
            keys.destroy_ended_epochs_unchecked(ended).await.unwrap();
            assert!(store.key(&id).await.unwrap().is_none(), "{at:?}");
            assert!(keys.epoch_key(b, epoch).await.is_err(), "{at:?}");
            failed.is_empty()
        })
        .await;
    });
}

#[test]
fn a_failed_rewrap_loses_no_key() {
    runtime().block_on(async {
        let b = BusinessId::new(BUSINESS).unwrap();
        let now = Timestamp::from_millis(T0);
        let epoch = Epoch::containing(now, EpochLength::DEFAULT).unwrap();
        every_failure(|at| async move {
            let (store, faults, keys, root) = key_manager(now, epoch).await;
            let sealed = keys.epoch_key(b, epoch).await.unwrap();
            let version = keys.add_kek_version(b, now).await.unwrap();
            keys.promote_kek_version(b, version).await.unwrap();
            faults.fail_at(at.n, at.seams, at.strike);
            let rewrapped = keys.rewrap(b).await;
            let failed = faults.lift();
            assert_outcome(&rewrapped, &failed, at);
            keys.rewrap(b).await.unwrap();
            keys.raise_decrypt_floor(b, version).await.unwrap();
            keys.retire_kek_version(b, version - 1).await.unwrap();
            // A new process opens the key rewrapped, the same key.
            let fresh = KeyManager::new(root, store);
            let reopened = fresh.epoch_key(b, epoch).await.unwrap();
            assert_eq!(reopened.epoch(), sealed.epoch(), "{at:?}");
            failed.is_empty()
        })
        .await;
    });
}

/// An inbound message's delivery mark that lands unanswered leaves the
/// message with nothing due, so nothing takes it up again to make the
/// owed write: the sweep that deletes the message forgets it, and the
/// process keeps nothing for it.
#[test]
fn what_is_owed_to_a_message_the_sweep_deleted_is_forgotten() {
    runtime().block_on(async {
        for n in 1..MAX_CALLS {
            let d = deployment(Faults::none(), Faults::none()).await;
            let mut handset = d.handset().await;
            let first = d.inbound(&mut handset, b"first").await;
            d.faults.fail_at(n, Seams::Store, Strike::After);
            let got = d.receive(first.clone()).await;
            let calls = d.faults.calls();
            let failed = d.faults.lift();
            // The second commit is the mark: the first stored the message.
            let commits = calls.iter().filter(|c| **c == "commit").count();
            if failed != [("commit", Strike::After)] || commits != 2 {
                assert!(n < 60, "the receive never marked the message delivered");
                continue;
            }
            assert!(got.is_err(), "{got:?}");
            // Not redelivered: a redelivery would take the message up, and
            // make the owed write.
            d.settle(3).await;
            assert_eq!(d.contents(), BTreeMap::from([(b"first".to_vec(), 1)]));
            let owed = |d: &Deployment| format!("{:?}", d.processor);
            assert!(owed(&d).contains("messages_owed: 1"), "{}", owed(&d));
            d.clock.advance(Duration::from_secs(31 * 24 * 3600));
            let swept = d.processor.sweep(&d.operator).await.unwrap();
            assert!(swept.messages_deleted >= 1, "{swept:?}");
            assert!(owed(&d).contains("messages_owed: 0"), "{}", owed(&d));
            return;
        }
        panic!("no call was the mark");
    });
}

#[test]
fn a_failed_sweep_leaves_no_deleted_session_in_memory() {
    runtime().block_on(every_failure(|at| async move {
        // Retention shortened to a day: the sweep deletes the consumer's
        // session, which its first message had kept for 30 days.
        let d = deployment(Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let inbound = d.inbound(&mut handset, b"in").await;
        assert!(d.receive(inbound).await.unwrap().delivered);
        d.shorten_retention_to_a_day();
        d.clock.advance(Duration::from_secs(2 * 24 * 3600));
        d.faults.fail_at(at.n, at.seams, at.strike);
        let swept = d.processor.sweep(&d.operator).await;
        let failed = d.faults.lift();
        assert_outcome(&swept, &failed, at);
        let kept = d.store.census().await.unwrap().peers == 1;
        let late = d.inbound(&mut handset, b"late").await;
        let received = d.receive(late).await;
        assert_eq!(received.is_ok(), kept, "{at:?}: {received:?}");
        assert!(d.processor.sweep(&d.operator).await.unwrap().complete);
        failed.is_empty()
    }));
}

/// A step of a KEK rotation, as a host runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rotation {
    Add,
    Promote,
    Rewrap,
    RaiseFloor,
    Retire,
}

impl Rotation {
    const ALL: [Self; 5] = [
        Self::Add,
        Self::Promote,
        Self::Rewrap,
        Self::RaiseFloor,
        Self::Retire,
    ];

    async fn run(self, keys: &KeyManager, b: BusinessId, now: Timestamp) -> Result<(), String> {
        let done = match self {
            Self::Add => keys.add_kek_version(b, now).await.map(drop),
            Self::Promote => keys.promote_kek_version(b, 2).await,
            Self::Rewrap => keys.rewrap(b).await.map(drop),
            Self::RaiseFloor => keys.raise_decrypt_floor(b, 2).await,
            Self::Retire => keys.retire_kek_version(b, 1).await,
        };
        done.map_err(|e| format!("{e:?}"))
    }
}

/// `keys` uses the ring `store` holds for `b`.
async fn assert_same_ring(keys: &KeyManager, store: &MemoryStore, b: BusinessId, why: String) {
    let stored = store.ring(b).await.unwrap().unwrap();
    let seen = keys.ring(b).await.unwrap();
    assert_eq!(
        (seen.revision(), seen.floor(), seen.primary()),
        (stored.revision(), stored.floor(), stored.primary()),
        "{why}"
    );
}

#[test]
fn a_failed_kek_rotation_step_is_retried_to_the_end() {
    runtime().block_on(async {
        let b = BusinessId::new(BUSINESS).unwrap();
        let now = Timestamp::from_millis(T0);
        let epoch = Epoch::containing(now, EpochLength::DEFAULT).unwrap();
        for failing in Rotation::ALL {
            every_failure(|at| async move {
                let (store, faults, keys, root) = key_manager(now, epoch).await;
                let mut failed = Vec::new();
                for step in Rotation::ALL {
                    if step == failing {
                        faults.fail_at(at.n, at.seams, at.strike);
                    }
                    let done = step.run(&keys, b, now).await;
                    if step == failing {
                        failed = faults.lift();
                        assert_outcome(&done, &failed, at);
                        // Before any retry, the process already uses the
                        // ring the store holds, whether the failed write
                        // landed or not: never a floor or a primary the
                        // store has moved past.
                        assert_same_ring(&keys, &store, b, format!("{at:?}: {step:?} failed"))
                            .await;
                    }
                    // The host runs a failed step again, to the end.
                    if done.is_err() {
                        let again = step.run(&keys, b, now).await;
                        assert!(
                            again.is_ok(),
                            "{at:?}: {step:?} after {failed:?}: {again:?}"
                        );
                    }
                }
                // The process sees the ring the store holds: version 1 is
                // gone from memory as from the store.
                assert_same_ring(
                    &keys,
                    &store,
                    b,
                    format!("{at:?}: {failing:?} after {failed:?}"),
                )
                .await;
                // (A version added twice, its first answer lost, stays
                // unused above the floor.)
                let stored = store.ring(b).await.unwrap().unwrap();
                let floor = stored.floor();
                assert!(
                    stored.versions().iter().all(|v| v.version >= floor),
                    "{at:?}"
                );
                // Every key opens, in this process and in a new one.
                keys.epoch_key(b, epoch).await.unwrap();
                let fresh = KeyManager::new(root, store);
                fresh.epoch_key(b, epoch).await.unwrap();
                failed.is_empty()
            })
            .await;
        }
    });
}

#[test]
fn a_new_process_survives_every_host_failure_of_its_first_receive_and_send() {
    // With nothing in memory, the first calls unwrap every key they need:
    // the key provider and the key store fail under them too.
    runtime().block_on(every_failure(|at| async move {
        let mut d = deployment(Faults::none(), Faults::none()).await;
        d.network.add_consumer(&consumer(2), 1).await;
        let mut handset = d.handset().await;
        let first = d.inbound(&mut handset, b"first").await;
        d.receive(first).await.unwrap();
        d.restart();
        let inbound = d.inbound(&mut handset, b"second").await;
        d.faults.fail_at(at.n, at.seams, at.strike);
        let received = d.receive(inbound.clone()).await;
        let failed_receiving = d.faults.lift();
        assert_outcome(&received, &failed_receiving, at);
        if received.is_err() {
            d.receive(inbound).await.unwrap();
        }
        // Whatever is owed is paid before the next restart (a crash loses
        // what a process owes, as it loses a write not yet made).
        d.settle(1).await;
        d.restart();
        let (_, failed_sending) = send_under(&d, at, b"out").await;
        d.settle(3).await;
        let want = BTreeMap::from([(b"first".to_vec(), 1), (b"second".to_vec(), 1)]);
        assert_eq!(d.contents(), want, "{at:?}: {failed_receiving:?}");
        d.assert_statuses_told_once_forward(at.n);
        let received = d.network.received(&consumer(2)).await;
        assert_eq!(received[&0].len(), 1, "{at:?}: {failed_sending:?}");
        assert!(received[&0].values().all(|&c| c == 1), "{at:?}");
        failed_receiving.is_empty() && failed_sending.is_empty()
    }));
}

#[test]
fn a_failed_first_publish_is_retried_to_a_working_business() {
    // A business's first keys: its KEK ring, identity, prekeys and phone
    // index are created under the failure.
    runtime().block_on(every_failure(|at| async move {
        let clock = ManualClock::new(Timestamp::from_millis(T0));
        let store = Arc::new(MemoryStore::new());
        let faults = Arc::new(HostFaults::default());
        let failing: Arc<dyn Storage> =
            Arc::new(FailingStore::paused(store.clone(), faults.clone()));
        let root: Arc<dyn KeyProvider> = Arc::new(LocalKeyProvider::new(&SecretKey::generate()));
        let provider: Arc<dyn KeyProvider> = Arc::new(FailingProvider {
            inner: root.clone(),
            faults: faults.clone(),
        });
        let stack = |provider| signal_stack(provider, failing.clone(), &clock);
        let (keys, sessions) = stack(provider);
        let b = BusinessId::new(BUSINESS).unwrap();
        faults.fail_at(at.n, at.seams, at.strike);
        let published = sessions.publish(b).await;
        let phone = keys.phone_hash(b, &consumer(1)).await;
        let failed = faults.lift();
        assert_outcome(&published, &failed, at);
        assert_outcome(&phone, &failed, at);
        let published = sessions.publish(b).await.unwrap();
        let phone = keys.phone_hash(b, &consumer(1)).await.unwrap();
        // What this process published and hashes is what the store holds:
        // a new process agrees.
        let (fresh_keys, fresh) = stack(root);
        assert_eq!(fresh_keys.phone_hash(b, &consumer(1)).await.unwrap(), phone);
        let again = fresh.publish(b).await.unwrap();
        assert_eq!(again.identity_key, published.identity_key, "{at:?}");
        let mut handset = ConsumerDevice::new(1);
        handset
            .start_session(b, &published.bundle(Some(0)))
            .await
            .unwrap();
        let peer = PeerId { phone, device: 1 };
        let expiry = clock.now().saturating_add(Duration::from_secs(24 * 3600));
        let hello = handset.encrypt(b, b"hello").await.unwrap();
        let read = sessions.decrypt(b, peer, &hello, expiry).await;
        assert_eq!(*read.unwrap().plaintext, b"hello", "{at:?}: {failed:?}");
        failed.is_empty()
    }));
}

/// Also counted failed once in the statistics (two consumers: a bucket
/// of fewer is suppressed).
#[test]
fn an_expired_open_message_is_reported_failed_once_whatever_fails() {
    runtime().block_on(every_failure(|at| async move {
        // The network is down past the messages' retention: they expire
        // open, and the sweep tells their business.
        let start = Timestamp::from_millis(T0);
        let down = Faults::none().with_outage(start, Duration::from_secs(40 * 24 * 3600));
        let d = deployment(down, Faults::none()).await;
        let mut sent = Vec::new();
        for i in [2, 3] {
            sent.push(d.send_out_to(i).await);
        }
        // An hour past its retention: well within the grace for its report.
        d.clock.advance(Duration::from_secs(30 * 24 * 3600 + 3600));
        d.faults.fail_at(at.n, at.seams, at.strike);
        let swept = d.processor.sweep(&d.operator).await;
        let failed = d.faults.lift();
        assert_outcome(&swept, &failed, at);
        d.processor.retransmit_due(&d.operator).await.unwrap();
        let report = d.processor.sweep(&d.operator).await.unwrap();
        assert!(report.complete, "{at:?}");
        d.processor.retransmit_due(&d.operator).await.unwrap();
        assert_eq!(d.store.census().await.unwrap().messages, 0, "{at:?}");
        let want = [(Status::Failed, Some(FailureReason::Expired))];
        for out in &sent {
            let told = &d.business.statuses()[out];
            assert_eq!(told, &want, "{at:?}: {failed:?}");
        }
        // Once the statistics' day is over, the two count once each.
        d.clock.advance(Duration::from_secs(24 * 3600));
        let statistics = d.processor.statistics(&d.operator).await.unwrap();
        let counted = counted_in(&statistics, Direction::Outbound, StatsStatus::Failed);
        assert_eq!(counted, [2], "{at:?}: {failed:?}");
        failed.is_empty()
    }));
}

/// A delivery report whose status write the store fails, before making it
/// or after (it landed, its answer lost): the transport hands it in again,
/// and it is ignored, the write owed and made first. The delivery counts
/// once in the statistics, its latency too (two consumers, one message
/// each: a bucket of fewer is suppressed). Before, the report counted
/// nothing until its write answered, so a write landed unanswered was
/// never counted.
#[test]
fn a_delivery_whose_status_write_fails_is_counted_once() {
    runtime().block_on(async {
        for strike in [Strike::Before, Strike::After] {
            let d = deployment(Faults::none(), Faults::none()).await;
            let mut sent = Vec::new();
            for i in [2, 3] {
                sent.push(d.send_out_to(i).await);
            }
            // The first report goes through; its store calls say which one
            // writes the status.
            d.faults.fail_at(usize::MAX, Seams::Store, Strike::Before);
            let report = |id| {
                d.processor
                    .status_update(&d.carrier, d.b, id, Status::Delivered)
            };
            assert_eq!(report(sent[0]).await.unwrap(), StatusChange::Applied);
            let write = 1 + d
                .faults
                .calls()
                .iter()
                .position(|c| *c == "commit")
                .unwrap();
            d.faults.fail_at(write, Seams::Store, strike);
            let failed = report(sent[1]).await;
            assert!(failed.is_err(), "{strike:?}: {failed:?}");
            assert_eq!(d.faults.lift(), [("commit", strike)]);
            // Handed in again: the owed write is made (or found made).
            let again = report(sent[1]).await.unwrap();
            assert_eq!(again, StatusChange::Ignored, "{strike:?}");
            d.settle(3).await;
            for &id in &sent {
                let status = d.processor.message_status(&d.owner, d.b, id).await;
                assert_eq!(status.unwrap(), (Status::Delivered, None), "{strike:?}");
            }
            d.clock.advance(Duration::from_secs(2 * 24 * 3600));
            let statistics = d.processor.statistics(&d.operator).await.unwrap();
            let counted = counted_in(&statistics, Direction::Outbound, StatsStatus::Delivered);
            assert_eq!(counted, [2], "{strike:?}: {statistics:?}");
            let latencies: u64 = statistics
                .iter()
                .flat_map(|r| &r.delivery_latency)
                .map(|b| b.messages)
                .sum();
            assert_eq!(latencies, 2, "{strike:?}: {statistics:?}");
        }
    });
}

/// Receive `inbound`, failing nothing; the number of its last store call
/// that commits, the write recording its hand-over: the call to fail in
/// another receive that makes the same calls.
async fn hand_over_write(d: &Deployment, inbound: Inbound) -> usize {
    d.faults.fail_at(usize::MAX, Seams::Store, Strike::Before);
    assert!(d.receive(inbound).await.unwrap().delivered);
    1 + d
        .faults
        .calls()
        .iter()
        .rposition(|c| *c == "commit")
        .unwrap()
}

/// The same for an inbound message: its hand-over's write fails, before
/// the store makes it or after (it landed, its answer lost), and the
/// network hands the message in again, answered as a duplicate the
/// business has. It reaches the business once and counts delivered once.
/// Before, the receive counted nothing until that write answered, and a
/// duplicate counts nothing: a hand-over landed unanswered was never
/// counted; and the duplicate's receipt, read before the owed write was
/// made, said the business did not have it.
#[test]
fn an_inbound_delivery_whose_write_fails_is_counted_once() {
    runtime().block_on(async {
        for strike in [Strike::Before, Strike::After] {
            // A full prekey pool: no receive here refills it, so each makes
            // the same store calls.
            let d = Deployment::new(Faults::none(), Faults::none()).await;
            let [first, second, third] = d.three_first_messages().await;
            assert!(d.receive(first).await.unwrap().delivered);
            let write = hand_over_write(&d, second).await;
            d.faults.fail_at(write, Seams::Store, strike);
            let failed = d.receive(third.clone()).await;
            assert!(failed.is_err(), "{strike:?}: {failed:?}");
            assert_eq!(d.faults.lift(), [("commit", strike)]);
            let again = d.receive(third).await.unwrap();
            assert!(again.duplicate, "{strike:?}");
            // The business has it: the redelivery makes the owed write
            // before it reads the status.
            assert!(again.delivered, "{strike:?}");
            d.settle(3).await;
            assert_eq!(
                d.business.contents().len(),
                3,
                "{strike:?}: each handed over once"
            );
            d.clock.advance(Duration::from_secs(2 * 24 * 3600));
            let statistics = d.processor.statistics(&d.operator).await.unwrap();
            let counted = counted_in(&statistics, Direction::Inbound, StatsStatus::Delivered);
            assert_eq!(counted, [3], "{strike:?}: {statistics:?}");
        }
    });
}

#[test]
fn a_failed_follow_up_receive_is_not_burnt() {
    // Follow-up messages on a session the business started: the second
    // reply's session step is written behind (only the message is stored).
    runtime().block_on(every_failure(|at| async move {
        let d = deployment(Faults::none(), Faults::none()).await;
        let phone = consumer(1);
        d.network.add_consumer(&phone, 1).await;
        d.processor
            .send(
                &d.owner,
                d.b,
                Outbound {
                    to: phone.clone(),
                    ..d.outbound(b"hello")
                },
            )
            .await
            .unwrap();
        d.settle(1).await;
        for reply in [&b"one"[..], b"two"] {
            d.network
                .consumer_sends(&phone, 0, d.b, reply)
                .await
                .unwrap();
        }
        d.network
            .consumer_sends(&phone, 0, d.b, b"three")
            .await
            .unwrap();
        // The network delivers the replies, the store failing under them;
        // one not acknowledged is delivered again.
        d.faults.fail_at(at.n, at.seams, at.strike);
        d.network.pump(&d.processor, &d.carrier).await;
        let failed = d.faults.lift();
        d.settle(3).await;
        let want = BTreeMap::from([
            (b"one".to_vec(), 1),
            (b"three".to_vec(), 1),
            (b"two".to_vec(), 1),
        ]);
        assert_eq!(d.contents(), want, "{at:?}: {failed:?}");
        d.assert_statuses_told_once_forward(at.n);
        // The conversation goes on both ways.
        d.network
            .consumer_sends(&phone, 0, d.b, b"four")
            .await
            .unwrap();
        d.processor
            .send(
                &d.owner,
                d.b,
                Outbound {
                    to: phone.clone(),
                    ..d.outbound(b"bye")
                },
            )
            .await
            .unwrap();
        d.settle(3).await;
        assert_eq!(d.contents()[&b"four".to_vec()], 1, "{at:?}");
        let got = d.network.received(&phone).await;
        assert_eq!(got[&0].len(), 2, "{at:?}: {failed:?}");
        assert!(got[&0].values().all(|&c| c == 1), "{at:?}");
        failed.is_empty()
    }));
}

#[test]
fn a_failed_sweep_never_deletes_what_a_hold_keeps() {
    runtime().block_on(every_failure(|at| async move {
        let d = deployment(Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let inbound = d.inbound(&mut handset, b"held").await;
        assert!(d.receive(inbound).await.unwrap().delivered);
        let scope = HoldScope::Business(d.b);
        d.processor
            .place_hold(&d.operator, scope, "case-1")
            .await
            .unwrap();
        d.clock.advance(Duration::from_secs(40 * 24 * 3600));
        d.faults.fail_at(at.n, at.seams, at.strike);
        let swept = d.processor.sweep(&d.operator).await;
        let failed = d.faults.lift();
        assert_outcome(&swept, &failed, at);
        assert!(d.processor.sweep(&d.operator).await.unwrap().complete);
        // The message, its session and its epoch key are kept.
        let census = d.store.census().await.unwrap();
        assert_eq!(
            (census.messages, census.peers),
            (1, 1),
            "{at:?}: {failed:?}"
        );
        let now = d.clock.now();
        let ended = d.store.ended_epoch_keys(now, 100).await.unwrap();
        assert!(!ended.is_empty(), "{at:?}");
        for id in ended {
            let entry = d.store.key(&id).await.unwrap();
            assert!(
                matches!(entry, Some(KeyEntry::Wrapped(_))),
                "{at:?}: {failed:?}"
            );
        }
        // Released, the next sweep deletes it all.
        d.processor
            .release_hold(&d.operator, scope, "case-1")
            .await
            .unwrap();
        assert!(d.processor.sweep(&d.operator).await.unwrap().complete);
        let census = d.store.census().await.unwrap();
        assert_eq!((census.messages, census.peers), (0, 0), "{at:?}");
        assert!(d.store.ended_epoch_keys(now, 100).await.unwrap().is_empty());
        failed.is_empty()
    }));
}

/// A consumer's first message that used no one-time prekey is received
/// (counted once); in the same millisecond its replay is handed in as
/// another number's, or as another device of the same consumer's, decrypts
/// in a new session (the id names no sender), and the write storing it
/// fails before landing. The failed receive counts nothing: the message
/// stored under the id is the first receive's. (It was counted received
/// again: the stored record's time matched, and its sender was not
/// compared; then, the sender compared, as from another device of the
/// same consumer, which a review found.)
#[test]
fn a_failed_replay_is_not_counted_received() {
    runtime().block_on(async {
        for (from, device) in [(consumer(3), 1), (consumer(1), 2)] {
            assert!(failed_replay_counts_nothing(from, device).await);
        }
    });
}

/// A first message from `device` of `from` on a bundle without a one-time
/// prekey (one that can be replayed), received and stored.
async fn first_without_one_time_prekey(
    d: &Deployment,
    from: PhoneNumber,
    device: u32,
) -> Ciphertext {
    let keys = d.transport.published.lock().unwrap().clone().unwrap();
    let mut phone = ConsumerDevice::new(device);
    phone.start_session(d.b, &keys.bundle(None)).await.unwrap();
    let message = phone.encrypt(d.b, b"first").await.unwrap();
    let real = Inbound {
        resend_of: None,
        from,
        device,
        message: message.clone(),
    };
    assert!(!d.receive(real).await.unwrap().duplicate);
    message
}

/// Whether the replay of a first message, handed in as from `device` of
/// `from`, counted nothing when its storing write failed.
async fn failed_replay_counts_nothing(from: PhoneNumber, device: u32) -> bool {
    for n in 1..MAX_CALLS {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let message = first_without_one_time_prekey(&d, consumer(1), 1).await;
        assert_eq!(d.received_counted().await, 1);

        d.faults.set(Plan {
            at: n,
            seams: Seams::Store,
            strike: Strike::Before,
            outage: false,
        });
        let replay = Inbound {
            resend_of: None,
            from: from.clone(),
            device,
            message,
        };
        let got = d.receive(replay).await;
        let failed = d.faults.lift();
        assert!(!failed.is_empty(), "no call struck: {got:?}");
        if failed[0] != ("commit", Strike::Before) {
            continue;
        }
        assert!(got.is_err(), "{got:?}");
        return d.received_counted().await == 1;
    }
    panic!("the replay's storing write was never reached");
}

/// A consumer's first-contact message on a one-time prekey, decrypted
/// while any store or key-provider call fails (before or after it
/// applies): its prekey is consumed exactly when its session is stored,
/// in one write, never one without the other; made again, it decrypts if
/// nothing landed and is a duplicate if it did; and another device's
/// first message on the same prekey is refused either way. (Review of the
/// Signal layer: one-time prekeys used at most once across failures.)
#[test]
fn a_failed_first_contact_consumes_its_one_time_prekey_exactly_with_its_session() {
    runtime().block_on(every_failure(|at| async move {
        let s = Signal::new(0).await;
        let published = s.sessions.publish(s.b).await.unwrap();
        let bundle = published.bundle(Some(1));
        let prekey = u64::from(bundle.one_time_prekey.unwrap().id);
        let mut device = ConsumerDevice::new(2);
        device.start_session(s.b, &bundle).await.unwrap();
        let first = device.encrypt(s.b, b"first").await.unwrap();
        let peer = PeerId {
            device: 2,
            ..s.peer
        };
        let prekey_stored = || async {
            s.store
                .keys_of_kind(s.b, custodian::keys::KeyKind::SignalPreKey, None, 100)
                .await
                .unwrap()
                .iter()
                .any(|k| k.id.id == prekey)
        };

        s.faults.fail_at(at.n, at.seams, at.strike);
        let got = s.sessions.decrypt(s.b, peer, &first, s.expiry()).await;
        let failed = s.faults.lift();
        assert_outcome(&got, &failed, at);
        let landed = s.store.peer(s.b, peer).await.unwrap().is_some();
        assert_eq!(
            landed,
            !prekey_stored().await,
            "{at:?}: session stored {landed}, prekey consumed {}",
            !prekey_stored().await
        );
        assert!(got.is_err() || landed, "{at:?}");

        let again = s.sessions.decrypt(s.b, peer, &first, s.expiry()).await;
        match (got.is_ok() || landed, again) {
            (false, Ok(d)) => assert_eq!(*d.plaintext, b"first", "{at:?}"),
            (true, Err(SignalError::DuplicateMessage)) => {}
            (landed, again) => panic!("{at:?}: landed {landed}, made again: {again:?}"),
        }
        assert!(!prekey_stored().await, "{at:?}");

        let mut other = ConsumerDevice::new(3);
        other.start_session(s.b, &bundle).await.unwrap();
        let theirs = other.encrypt(s.b, b"me too").await.unwrap();
        let other_peer = PeerId {
            device: 3,
            ..s.peer
        };
        let refused = s
            .sessions
            .decrypt(s.b, other_peer, &theirs, s.expiry())
            .await;
        assert!(refused.is_err(), "{at:?}: {refused:?}");
        failed.is_empty()
    }));
}

/// A receive that handed its message over, then failed to record the
/// hand-over (the write is owed), followed by a replay of the message that
/// Signal takes for new (a first message that used no one-time prekey,
/// handed in as another device's: a new session decrypts it) and the
/// store refuses as a copy: the replay's receipt makes the owed write and
/// says the business has the message. Before, the replay still held its
/// own claim on the message when it answered as a duplicate, so the owed
/// write was not made and the receipt said `delivered: false`.
#[tokio::test]
async fn a_replay_refused_at_the_commit_says_whether_the_business_has_it() {
    use custodian::processor::Inbound;
    use custodian::testing::ConsumerDevice;
    let d = Deployment::new(Faults::none(), Faults::none()).await;
    let keys = d.transport.published.lock().unwrap().clone().unwrap();
    let first_contact = |prekey: Option<usize>, i: u32| {
        let keys = keys.clone();
        let b = d.b;
        async move {
            let mut handset = ConsumerDevice::new(1);
            handset
                .start_session(b, &keys.bundle(prekey))
                .await
                .unwrap();
            Inbound {
                resend_of: None,
                from: consumer(i),
                device: 1,
                message: handset.encrypt(b, b"hello").await.unwrap(),
            }
        }
    };
    let first = first_contact(Some(0), 1).await;
    // Their senders' bundles had no one-time prekey.
    let second = first_contact(None, 3).await;
    let third = first_contact(None, 4).await;
    assert!(d.receive(first).await.unwrap().delivered);
    let write = hand_over_write(&d, second).await;
    d.faults.fail_at(write, Seams::Store, Strike::Before);
    assert!(d.receive(third.clone()).await.is_err());
    assert_eq!(d.faults.lift(), [("commit", Strike::Before)]);
    assert_eq!(d.business.contents().len(), 3, "the business has all three");

    // The third, replayed as another device of its sender's.
    let replay = Inbound { device: 2, ..third };
    let again = d.receive(replay).await.unwrap();
    assert!(again.duplicate, "{again:?}");
    assert!(
        again.delivered,
        "the business has the message (it will not be handed over again), but the replay's \
         receipt says it is not delivered: {again:?}"
    );
}

/// A device whose stored Signal record cannot be read (here: a store that
/// copied another device's record over its row, which the record's own
/// device check refuses) is stuck, every receive failing, until the
/// business approves its owner's new key: the approval writes over the
/// record it cannot read, needing nothing of it. (It failed on the record,
/// and left the device stuck until the damaged record expired.)
#[tokio::test]
async fn an_approval_replaces_a_record_it_cannot_read() {
    let mut d = Deployment::new(Faults::none(), Faults::none()).await;
    let (_, mut two) = two_devices_wrote(&d).await;
    let phone = d.phone_of(1).await;
    let (p1, p2) = (PeerId { phone, device: 1 }, PeerId { phone, device: 2 });
    // The store copies device 1's record over device 2's row; the process
    // restarts (nothing in memory).
    let copied = d.store.peer(d.b, p1).await.unwrap().unwrap();
    d.store
        .commit(Batch::from(Op::PutPeer {
            business: d.b,
            peer: p2,
            sealed: copied,
        }))
        .await
        .unwrap();
    d.restart();
    // Device 2 is stuck: its old session's messages fail on the record.
    let stuck = d.inbound(&mut two, b"still me").await;
    let stuck = Inbound { device: 2, ..stuck };
    assert!(d.receive(stuck).await.is_err());
    // Device 2's owner reinstalls and confirms the new key.
    let keys = d.transport.published.lock().unwrap().clone().unwrap();
    let mut reinstalled = ConsumerDevice::new(2);
    reinstalled
        .start_session(d.b, &keys.bundle(Some(2)))
        .await
        .unwrap();
    let approved = d
        .processor
        .trust_new_identity(&d.owner, d.b, &consumer(1), 2, reinstalled.identity())
        .await;
    assert!(
        matches!(approved, Ok(true)),
        "approving device 2's new key failed on its unreadable record: {approved:?}"
    );
    let inbound = Inbound {
        resend_of: None,
        from: consumer(1),
        device: 2,
        message: reinstalled.encrypt(d.b, b"new phone").await.unwrap(),
    };
    assert!(d.receive(inbound).await.unwrap().delivered);
}

/// The store calls `run` makes on `d`, by name, failing none of them.
async fn calls_of<F: std::future::Future>(
    d: &Deployment,
    run: F,
) -> (Vec<&'static str>, F::Output) {
    d.faults.set(Plan {
        at: usize::MAX,
        seams: Seams::Store,
        strike: Strike::Before,
        outage: false,
    });
    let out = run.await;
    let calls = d.faults.lift();
    assert!(calls.is_empty(), "nothing failed: {calls:?}");
    (d.faults.calls(), out)
}

/// A deployment where consumer 1's device 1 wrote once (its record holds
/// its key, sealed for the default 30 days), then the business's inbound
/// retention is cut to one day and the process restarts (nothing in
/// memory); and the device's reinstalled key.
async fn device_with_a_30_day_record() -> (Deployment, PeerId, ConsumerDevice) {
    let mut d = Deployment::with_signal(
        Faults::none(),
        Faults::none(),
        SignalConfig {
            prekey_pool: 4,
            prekey_low_water: 2,
            ..SignalConfig::default()
        },
    )
    .await;
    let mut one = d.handset().await;
    let inbound = d.inbound(&mut one, b"hello").await;
    assert!(d.receive(inbound).await.unwrap().delivered);
    let phone = d.phone_of(1).await;
    let shorter = format!("[business.{BUSINESS}]\ninbound = \"1d\"\n");
    let shorter = RetentionPolicy::from_toml(&shorter).unwrap();
    d.restart();
    d.processor
        .set_retention_policy(&d.operator, shorter)
        .unwrap();
    let reinstalled = ConsumerDevice::new(1);
    (d, PeerId { phone, device: 1 }, reinstalled)
}

/// An approval whose read of the device's record fails for a moment (the
/// key store failing as the record's epoch key is read) fails, changing
/// nothing: the host asks again. Before, it took the record for
/// unreadable and wrote over it, losing its expiry (the latest of any
/// message exchanged with the device): with inbound retention cut to a
/// day, the approved key stayed pinned one day, not 30, after which any
/// key was trusted on first use. Only a record damaged, or not this
/// device's, is written over.
#[tokio::test]
async fn an_approval_whose_key_read_fails_changes_nothing() {
    // Which store call reads the record's epoch key: the first `key` read
    // after the record's `peer` read, in a twin deployment.
    let (twin, peer, key) = device_with_a_30_day_record().await;
    let twin_before = twin
        .store
        .peer_epochs(twin.b, Some(peer.phone))
        .await
        .unwrap();
    let (calls, approved) = calls_of(
        &twin,
        twin.processor
            .trust_new_identity(&twin.owner, twin.b, &consumer(1), 1, key.identity()),
    )
    .await;
    assert!(matches!(approved, Ok(true)), "{approved:?}");
    let read = calls.iter().position(|c| *c == "peer").unwrap();
    let at = read + calls[read..].iter().position(|c| *c == "key").unwrap() + 1;
    // Read, the record keeps its 30 days.
    let twin_after = twin
        .store
        .peer_epochs(twin.b, Some(peer.phone))
        .await
        .unwrap();
    assert_eq!(twin_before, twin_after);
    drop(twin);

    let (d, peer, key) = device_with_a_30_day_record().await;
    let before = d.store.peer(d.b, peer).await.unwrap().unwrap();
    let epochs_before = d.store.peer_epochs(d.b, Some(peer.phone)).await.unwrap();
    d.faults.fail_at(at, Seams::Store, Strike::Before);
    let approved = d
        .processor
        .trust_new_identity(&d.owner, d.b, &consumer(1), 1, key.identity())
        .await;
    let failed = d.faults.lift();
    assert_eq!(
        failed,
        [("key", Strike::Before)],
        "the epoch key's read failed"
    );
    let after = d.store.peer(d.b, peer).await.unwrap().unwrap();
    let epochs_after = d.store.peer_epochs(d.b, Some(peer.phone)).await.unwrap();
    assert!(
        approved.is_err(),
        "a key store failing one read made the approval write over the device's record \
         ({approved:?}): sealed for {epochs_before:?} before, {epochs_after:?} after"
    );
    assert_eq!(before, after, "a failed approval changed the record");
}

/// Under `IdentityPolicy::Refuse`: consumer 2's one device had the
/// business's message delivered, then reinstalled (a new identity key),
/// and its retry receipt for the message was ignored, its bundle refused.
/// The deployment, the message and the device's new key.
async fn a_receipt_refused_for_a_new_key() -> (
    Deployment,
    custodian::ids::MessageId,
    custodian::signal::DeviceIdentity,
) {
    let d = Deployment::with_signal(
        Faults::none(),
        Faults::none(),
        SignalConfig {
            prekey_pool: 4,
            prekey_low_water: 2,
            identity_policy: IdentityPolicy::Refuse,
            ..SignalConfig::default()
        },
    )
    .await;
    d.network.add_consumer(&consumer(2), 1).await;
    let id = d
        .processor
        .send(&d.owner, d.b, d.outbound(b"your order shipped"))
        .await
        .unwrap();
    d.settle(5).await;
    let (status, _) = d.processor.message_status(&d.owner, d.b, id).await.unwrap();
    assert_eq!(status, custodian::store::Status::Delivered);
    d.network.add_consumer(&consumer(2), 1).await;
    let refused = d.processor.retry_receipt(&d.carrier, d.b, id, 0).await;
    assert!(matches!(refused, Ok(StatusChange::Ignored)), "{refused:?}");
    let key = d.network.identity(&consumer(2), 0).await.unwrap();
    (d, id, key)
}

/// An approval whose write landed but whose answer was lost, asked again
/// (the key is trusted already: it answers `false`), still lets the
/// device's refused retry receipts in again. Before, only a call that
/// changed the record did, so the delivered message never reached the
/// reinstalled device.
#[tokio::test]
async fn an_approval_asked_again_after_a_lost_answer_lets_receipts_in() {
    // Which store call is the approval's commit, in a twin deployment.
    let (twin, twin_id, key) = a_receipt_refused_for_a_new_key().await;
    let (calls, approved) = calls_of(
        &twin,
        twin.processor
            .trust_new_identity(&twin.owner, twin.b, &consumer(2), 0, key),
    )
    .await;
    assert!(matches!(approved, Ok(true)), "{approved:?}");
    let at = calls.iter().position(|c| *c == "commit").unwrap() + 1;
    // Answered, the approval lets the receipt in.
    twin.clock.advance(Duration::from_secs(600));
    let receipt = twin
        .processor
        .retry_receipt(&twin.carrier, twin.b, twin_id, 0)
        .await;
    assert!(matches!(receipt, Ok(StatusChange::Applied)), "{receipt:?}");
    drop(twin);

    let (d, id, key) = a_receipt_refused_for_a_new_key().await;
    d.faults.fail_at(at, Seams::Store, Strike::After);
    let lost = d
        .processor
        .trust_new_identity(&d.owner, d.b, &consumer(2), 0, key)
        .await;
    assert_eq!(d.faults.lift(), [("commit", Strike::After)]);
    assert!(lost.is_err(), "{lost:?}");
    // The host asks again: the key is trusted (the write landed).
    let again = d
        .processor
        .trust_new_identity(&d.owner, d.b, &consumer(2), 0, key)
        .await;
    assert!(again.is_ok(), "{again:?}");
    d.clock.advance(Duration::from_secs(600));
    let receipt = d.processor.retry_receipt(&d.carrier, d.b, id, 0).await;
    assert!(
        matches!(receipt, Ok(StatusChange::Applied)),
        "the device's key is approved (asked again: {again:?}), yet its retry receipt \
         is still ignored for the refused bundle: {receipt:?}"
    );
}

/// Consumer 2, with two devices, sent the business's message while device
/// 0's bundle is unavailable and device `given_up`'s, if any, is refused
/// (a bad signature): it stays queued. Its id.
async fn queued_to(d: &Deployment, given_up: Option<u32>) -> MessageId {
    d.network.add_consumer(&consumer(2), 2).await;
    d.transport.bundle_fails.lock().unwrap().insert(0, false);
    if let Some(bad) = given_up {
        let mut refused = ConsumerDevice::new(bad).bundle(true);
        refused.signed_prekey.signature[0] ^= 1;
        d.transport.served.lock().unwrap().insert(bad, refused);
    }
    let id = d
        .processor
        .send(&d.owner, d.b, d.outbound(b"your code is 123"))
        .await
        .unwrap();
    let status = d.processor.message_status(&d.owner, d.b, id).await;
    assert_eq!(status.unwrap(), (Status::Queued, None));
    id
}

/// Consumer 2 with two devices, device 1 not linked yet and device 0's
/// bundle unavailable, sent the business's message: it stays queued, no
/// device having it. Then device 1 is linked, and device 0's bundle is as
/// `device_0` says (`None`: it can be had again; `Some(true)`: refused for
/// good). Returns the message's id, after the retransmission loop has run
/// for a few minutes.
async fn queued_when_a_device_is_linked(device_0: Option<bool>) -> (Deployment, MessageId) {
    let d = deployment(Faults::none(), Faults::none()).await;
    d.transport.unlinked.lock().unwrap().insert(1);
    let id = queued_to(&d, None).await;
    d.transport.unlinked.lock().unwrap().clear();
    *d.transport.bundle_fails.lock().unwrap() =
        device_0.map(|refused| (0, refused)).into_iter().collect();
    d.settle(5).await;
    (d, id)
}

/// A device linked while a message is still queued (no device has it) gets
/// it with the device the last attempt left. Before, the attempt went to
/// the devices that attempt left alone: the first took the message and
/// reported it, and the linked one was never sent it.
#[tokio::test]
async fn a_device_linked_while_a_message_is_queued_gets_it() {
    let (d, id) = queued_when_a_device_is_linked(None).await;
    d.assert_sent_once(id, 2, format_args!("linked while queued"))
        .await;
}

/// A queued message is not failed while a device listed could take it:
/// with the device the last attempt left refused for good, the device
/// linked since is tried and gets the message (again when no report comes:
/// the network reports a message once every device has it). Before, it was
/// never tried, and the message failed as `NoSession`.
#[tokio::test]
async fn a_queued_message_is_tried_on_a_device_linked_since() {
    let (d, id) = queued_when_a_device_is_linked(Some(true)).await;
    let received = d.network.received(&consumer(2)).await;
    assert!(received[&1].contains_key(&id), "{received:?}");
    assert!(!received.contains_key(&0), "{received:?}");
    let status = d.processor.message_status(&d.owner, d.b, id).await;
    assert_eq!(status.unwrap(), (Status::Sent, None));
}

/// A device given up on for a message no device has yet (its bundle
/// refused: a bad signature) is not asked for a bundle again at its
/// retries, each of which would cost it a one-time prekey; the device the
/// network could not reach is.
#[tokio::test]
async fn a_device_given_up_on_is_not_fetched_again_at_every_retry() {
    let d = deployment(Faults::none(), Faults::none()).await;
    let id = queued_to(&d, Some(1)).await;
    assert_eq!(
        d.transport.bundles_fetched(),
        2,
        "both devices fetched once"
    );
    let mut per_attempt = Vec::new();
    for _ in 0..5 {
        d.clock.advance(Duration::from_secs(60));
        let before = d.transport.bundles_fetched();
        let report = d.processor.retransmit_due(&d.operator).await.unwrap();
        assert_eq!(report.due, 1);
        per_attempt.push(d.transport.bundles_fetched() - before);
    }
    let status = d.processor.message_status(&d.owner, d.b, id).await;
    assert_eq!(status.unwrap(), (Status::Queued, None));
    assert_eq!(per_attempt, [1; 5], "bundles fetched per retry");
}

/// A delivery report on a message still queued (an attempt reached a
/// device unrecorded) sends it again to the devices the queued message
/// left to try, not to one given up on for a bad bundle: asked for its
/// bundle again, it would be given up on again, a one-time prekey spent.
/// Before, the report made every device pending.
#[tokio::test]
async fn a_report_on_a_queued_message_does_not_fetch_a_device_given_up_on() {
    let d = deployment(Faults::none(), Faults::none()).await;
    let id = queued_to(&d, Some(1)).await;
    let report = d
        .processor
        .status_update(&d.carrier, d.b, id, Status::Delivered)
        .await;
    assert!(matches!(report, Ok(StatusChange::Applied)), "{report:?}");
    d.clock.advance(Duration::from_secs(60));
    let before = d.transport.bundles_fetched();
    let retried = d.processor.retransmit_due(&d.operator).await.unwrap();
    assert_eq!(retried.due, 1);
    assert_eq!(
        d.transport.bundles_fetched() - before,
        1,
        "only the device the network could not reach is fetched"
    );
}

/// How an expired message's business fares in
/// [`expired_is_counted_failed`]: told, or not (its endpoint down), the
/// sweep failing the message or the retransmission loop before it.
#[derive(Debug, Clone, Copy)]
enum Told {
    Yes,
    NotBySweep,
    NotByRetransmission,
}

/// Messages to consumers 3 and 4 no device of which can be reached before
/// they expire, and a sweep past the report's grace: the statistics'
/// failed counts.
async fn expired_is_counted_failed(told: Told) -> Vec<u64> {
    const DAY: u64 = 24 * 3600 * 1000;
    let down = |on: bool| Faults {
        outages: if on {
            vec![(
                Timestamp::from_millis(T0),
                Timestamp::from_millis(T0 + 40 * DAY),
            )]
        } else {
            Vec::new()
        },
        ..Faults::none()
    };
    let d = deployment(down(true), down(!matches!(told, Told::Yes))).await;
    let mut ids = Vec::new();
    for i in [3, 4] {
        ids.push(d.send_out_to(i).await);
    }
    d.clock.advance(Duration::from_secs(31 * 24 * 3600));
    if matches!(told, Told::NotByRetransmission) {
        d.processor.retransmit_due(&d.operator).await.unwrap();
        for &id in &ids {
            let status = d.processor.message_status(&d.owner, d.b, id).await;
            let failed = (Status::Failed, Some(FailureReason::Expired));
            assert_eq!(status.unwrap(), failed);
        }
    }
    d.clock.advance(Duration::from_secs(24 * 3600));
    let swept = d.processor.sweep(&d.operator).await.unwrap();
    let unreported = if matches!(told, Told::Yes) { 0 } else { 2 };
    assert_eq!(swept.failures_unreported, unreported, "{told:?}: {swept:?}");
    d.statistics_counted(Direction::Outbound, StatsStatus::Failed)
        .await
}

/// Messages to consumers 3 and 4 that no device can take, their business's
/// endpoint down as long: 32 days on, both are past the report's grace.
async fn two_expired_untellable() -> Deployment {
    two_expired_down_for(Duration::from_secs(40 * 24 * 3600)).await
}

/// Messages to consumers 3 and 4, the network and their business's
/// endpoint down for `down` from the start: 32 days on.
async fn two_expired_down_for(down: Duration) -> Deployment {
    let down = Faults {
        outages: vec![(
            Timestamp::from_millis(T0),
            Timestamp::from_millis(T0).saturating_add(down),
        )],
        ..Faults::none()
    };
    let d = deployment(down.clone(), down).await;
    for i in [3, 4] {
        d.send_out_to(i).await;
    }
    d.clock.advance(Duration::from_secs(32 * 24 * 3600));
    d
}

/// A whole sweep after whatever a test did to `d`'s two expired messages
/// (which it deletes, `case` says if not): the statistics' failed counts.
async fn swept_then_counted(d: &Deployment, case: std::fmt::Arguments<'_>) -> Vec<u64> {
    d.processor.sweep(&d.operator).await.unwrap();
    assert_eq!(d.store.census().await.unwrap().messages, 0, "{case}");
    d.statistics_counted(Direction::Outbound, StatsStatus::Failed)
        .await
}

/// A sweep that fails at any store call (the call failing, or its answer
/// lost) loses no failure from the statistics: the next sweep counts each
/// once. Before, a failure given up on was told to the statistics only
/// with the page's last write: a sweep failing before it left the message
/// failed, its report dropped, and counted nowhere.
#[tokio::test]
async fn a_failed_sweep_loses_no_failure_from_the_statistics() {
    let mut miscounted = Vec::new();
    for strike in [Strike::Before, Strike::After] {
        for n in 1..200 {
            let d = two_expired_untellable().await;
            d.faults.fail_at(n, Seams::Store, strike);
            let first = d.processor.sweep(&d.operator).await;
            let failed = d.faults.lift();
            if failed.is_empty() {
                assert!(first.is_ok(), "{first:?}");
                break;
            }
            let counted = swept_then_counted(&d, format_args!("{strike:?} {n}")).await;
            if counted != [2] {
                miscounted.push((strike, n, failed, counted));
            }
        }
    }
    assert!(miscounted.is_empty(), "{miscounted:?}");
}

/// A sweep dropped (a host's timeout) at each of its suspension points in
/// turn, then a full sweep: each failure given up on is counted in the
/// statistics once. Before, one whose failing write landed with the sweep
/// gone waiting on it was left failed with nothing pending, and counted
/// nowhere.
#[tokio::test]
async fn a_dropped_sweep_loses_no_failure_from_the_statistics() {
    let mut miscounted = Vec::new();
    for n in 1..2_000 {
        let Some(d) = after_a_sweep_cut_at(n).await else {
            break;
        };
        let counted = swept_then_counted(&d, format_args!("cut {n}")).await;
        if counted != [2] {
            miscounted.push((n, counted));
        }
    }
    assert!(
        miscounted.is_empty(),
        "(cut at poll, counted): {miscounted:?}"
    );
}

/// The two expired messages of [`two_expired_untellable`], and a sweep
/// dropped at poll `n`: the deployment, unless the sweep finished.
async fn after_a_sweep_cut_at(n: usize) -> Option<Deployment> {
    let d = two_expired_untellable().await;
    let cut = poll_at_most(d.processor.sweep(&d.operator), n).await;
    cut.is_none().then_some(d)
}

/// A sweep dropped at each of its suspension points in turn, then one
/// whose first read of a message fails, then a full sweep: each failure
/// is counted once. Before, the second sweep went on past the failed read
/// of a failure the first left unsure, deleted the message, and the
/// failure was counted nowhere.
#[tokio::test]
async fn an_unsure_failure_whose_settling_read_fails_is_not_lost() {
    let nothing_fails = Plan {
        at: usize::MAX,
        seams: Seams::Store,
        strike: Strike::Before,
        outage: false,
    };
    let mut miscounted = Vec::new();
    for n in 1..2_000 {
        // Which store call of the next sweep is its first read of a message.
        let Some(twin) = after_a_sweep_cut_at(n).await else {
            break;
        };
        twin.faults.set(nothing_fails);
        twin.processor.sweep(&twin.operator).await.unwrap();
        let Some(read) = twin.faults.calls().iter().position(|&c| c == "message") else {
            continue;
        };
        let d = after_a_sweep_cut_at(n).await.unwrap();
        d.faults.fail_at(read + 1, Seams::Store, Strike::Before);
        let _ = d.processor.sweep(&d.operator).await;
        assert_eq!(d.faults.lift(), [("message", Strike::Before)], "cut {n}");
        let counted = swept_then_counted(&d, format_args!("cut {n}")).await;
        if counted != [2] {
            miscounted.push((n, counted));
        }
    }
    assert!(
        miscounted.is_empty(),
        "(cut at poll, counted): {miscounted:?}"
    );
}

/// A sweep paused at each of its suspension points in turn, or dropped
/// there, while the retransmission loop (the business's endpoint back)
/// tells the business of the same expired messages: each failure is
/// counted once. Before, the sweep counted a failure its business had
/// been told of, and counted, meanwhile.
#[tokio::test]
async fn a_sweep_racing_the_retransmission_loop_counts_each_failure_once() {
    let mut miscounted = Vec::new();
    for dropped in [false, true] {
        for n in 1..2_000 {
            // Back half an hour after the sweep starts.
            let down = Duration::from_secs(32 * 24 * 3600 + 30 * 60);
            let d = two_expired_down_for(down).await;
            // The endpoint is back; the retransmission loop runs meanwhile.
            let meanwhile = || async {
                d.clock.advance(Duration::from_secs(3600));
                d.settle(3).await;
            };
            if dropped {
                if poll_at_most(d.processor.sweep(&d.operator), n)
                    .await
                    .is_some()
                {
                    break;
                }
                meanwhile().await;
            } else {
                let sweep = d.processor.sweep(&d.operator);
                let mut sweep = std::pin::pin!(sweep);
                if poll_at_most(sweep.as_mut(), n).await.is_some() {
                    break;
                }
                meanwhile().await;
                sweep.await.unwrap();
            }
            let case = format_args!("{dropped} {n}");
            let counted: u64 = swept_then_counted(&d, case).await.iter().sum();
            if counted != 2 {
                miscounted.push((dropped, n, counted));
            }
        }
    }
    assert!(
        miscounted.is_empty(),
        "(dropped, cut at poll, counted): {miscounted:?}"
    );
}

/// A message that expires undelivered is counted failed in the statistics
/// once, whether or not its business could be told. Before, only a
/// failure told was counted: an endpoint down past the grace took the
/// failures out of the statistics.
#[tokio::test]
async fn an_expired_message_is_counted_failed_told_or_not() {
    for told in [Told::Yes, Told::NotBySweep, Told::NotByRetransmission] {
        assert_eq!(expired_is_counted_failed(told).await, [2], "{told:?}");
    }
}

/// After a restart and the clock stepped back three days, a consumer's
/// next message is received: its session is sealed again under the stored
/// key of the epoch it was admitted in. (The retention ceiling was checked
/// before the stored key was looked for: every message of a consumer whose
/// session was not in memory failed until the clock caught up.)
#[tokio::test]
async fn a_message_after_a_restart_and_the_clock_stepped_back_is_received() {
    let mut d = deployment(Faults::none(), Faults::none()).await;
    let mut device = d.handset().await;
    let first = d.inbound(&mut device, b"one").await;
    assert!(d.receive(first).await.unwrap().delivered);
    d.restart();
    let back = d
        .clock
        .now()
        .saturating_sub(Duration::from_secs(3 * 24 * 3600));
    d.clock.set(back);
    let second = d.inbound(&mut device, b"two").await;
    let got = d.receive(second).await;
    assert!(matches!(got, Ok(ref r) if r.delivered), "{got:?}");
}

/// Run `d`'s `publish_keys` alone for `head_start` polls, then alongside
/// `other`: what `other` gave, or `None` if the publication ended alone.
async fn publish_racing<T>(
    d: &Deployment,
    head_start: usize,
    other: impl Future<Output = T>,
) -> Option<T> {
    let mut publish = std::pin::pin!(d.processor.publish_keys(&d.owner, d.b));
    let alone = std::future::poll_fn(|cx| {
        for _ in 0..head_start {
            if let Poll::Ready(out) = publish.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
        }
        Poll::Ready(None)
    })
    .await;
    if let Some(out) = alone {
        out.unwrap();
        return None;
    }
    let (published, out) = tokio::join!(publish.as_mut(), other);
    published.unwrap();
    Some(out)
}

/// A deployment whose pool holds four one-time prekeys, at most four:
/// consumers 2 to 4 wrote "from <i>", each on its own key, their messages
/// on their way. One key is left to hand out, so a publication refills
/// the pool and retires the three oldest.
async fn three_first_messages_on_their_way() -> Deployment {
    let small_pool = SignalConfig {
        prekey_pool: 4,
        prekey_low_water: 2,
        prekey_limit: 4,
        ..SignalConfig::default()
    };
    let d = Deployment::with_signal(Faults::none(), Faults::none(), small_pool).await;
    for i in 2..5 {
        d.network.add_consumer(&consumer(i), 1).await;
        let (from, text) = (consumer(i), format!("from {i}"));
        let sent = d.network.consumer_sends(&from, 0, d.b, text.as_bytes());
        sent.await.unwrap();
    }
    assert_eq!(d.network.one_time_prekeys_left(d.b).await, 1);
    d
}

/// First messages received while `publish_keys` refills the pool and
/// retires the oldest keys past the limit, at every interleaving, all
/// reach the business: a key a first message under way loaded is not
/// retired, and one gone by its commit has the device asked for the
/// message again. (The commit's conflict was refused for good, and the
/// network dropped the message.)
#[tokio::test]
async fn first_messages_received_while_publish_keys_retires_keys_all_arrive() {
    let mut raced = 0;
    for head_start in 0.. {
        let d = three_first_messages_on_their_way().await;
        let pumped = d.network.pump(&d.processor, &d.carrier);
        if publish_racing(&d, head_start, pumped).await.is_none() {
            break;
        }
        raced += 1;
        d.settle(30).await;
        let contents = d.contents();
        let missing: Vec<u32> = (2..5)
            .filter(|i| !contents.contains_key(format!("from {i}").as_bytes()))
            .collect();
        assert!(
            missing.is_empty(),
            "head start {head_start}: {missing:?} lost"
        );
    }
    assert!(raced > 0);
}

/// The same with the key handed out twice: a first message on the oldest
/// key, which the network's consumers took too, received while a
/// publication retires it, is received or asked for again, never refused
/// for good.
#[tokio::test]
async fn a_first_message_on_a_key_retired_while_it_is_received_is_asked_for_again() {
    let mut raced = 0;
    for head_start in 0.. {
        let d = three_first_messages_on_their_way().await;
        let mut handset = d.handset().await;
        let inbound = d.inbound(&mut handset, b"hello").await;
        let Some(received) = publish_racing(&d, head_start, d.receive(inbound)).await else {
            break;
        };
        raced += 1;
        match received {
            Ok(receipt) => assert!(receipt.delivered, "{receipt:?}"),
            Err(ProcessorError::ResendAsked) => {}
            Err(e) => panic!("head start {head_start}: refused as {e}"),
        }
    }
    assert!(raced > 0);
}

/// Two publications of one business's keys at once refill its pool once:
/// the second counts the keys left after the first published its own, and
/// deletes none the first published. (Both counted before either
/// published: the second refilled again from the stale count, and retired
/// keys the first had just handed the network.)
#[tokio::test]
async fn two_publications_at_once_refill_the_pool_once() {
    let d = three_first_messages_on_their_way().await;
    let one_time = || async {
        let keys = d.store.keys_of_kind(d.b, KeyKind::SignalPreKey, None, 100);
        let ids: BTreeSet<u64> = keys.await.unwrap().iter().map(|k| k.id.id).collect();
        ids
    };
    let before = one_time().await;
    let (first, second) = tokio::join!(
        d.processor.publish_keys(&d.owner, d.b),
        d.processor.publish_keys(&d.owner, d.b)
    );
    first.unwrap();
    second.unwrap();
    let after = one_time().await;
    let made = after.difference(&before).count();
    assert_eq!(made, 3, "keys made: {after:?}, from {before:?}");
    let published = d.transport.published.lock().unwrap().clone().unwrap();
    let served: BTreeSet<u64> = published
        .one_time_prekeys
        .iter()
        .map(|k| u64::from(k.id))
        .collect();
    assert_eq!(served, after);
}

/// The statistics give nothing away beside the billing statement, which
/// counts every outbound message sent, exactly, in periods as long: of
/// three consumers' messages, two delivered at once and one two hours
/// later (k is 2 here), no outbound count is released, as the billed total
/// less the fast bucket would be the one slow delivery. (The fast bucket
/// was released, and billing gave the suppressed one away.)
#[tokio::test]
async fn the_statistics_give_nothing_away_beside_the_billed_count() {
    let d = deployment(Faults::none(), Faults::none()).await;
    let fast = [d.send_out_to(2).await, d.send_out_to(3).await];
    let slow = d.send_out_to(4).await;
    for id in fast {
        let change = d
            .processor
            .status_update(&d.carrier, d.b, id, Status::Delivered)
            .await;
        assert!(matches!(change, Ok(StatusChange::Applied)), "{change:?}");
    }
    d.clock.advance(Duration::from_secs(2 * 3600));
    let change = d
        .processor
        .status_update(&d.carrier, d.b, slow, Status::Delivered)
        .await;
    assert!(matches!(change, Ok(StatusChange::Applied)), "{change:?}");
    let statement = d.processor.billing_statement(&d.owner, d.b).await.unwrap();
    let billed: u64 = statement.records.iter().map(|r| r.messages.total()).sum();
    assert_eq!(billed, 3);
    d.clock.advance(Duration::from_secs(24 * 3600));
    let reports = d.processor.statistics(&d.operator).await.unwrap();
    for r in &reports {
        let outbound = r
            .messages
            .iter()
            .filter(|m| m.direction == Direction::Outbound);
        assert!(
            r.delivery_latency.is_empty() && outbound.count() == 0,
            "{r:?}"
        );
    }
}

/// A key-provider call hung for one business holds up no other business's
/// devices. Each device's operations are serialised under a lock held
/// across the provider calls that open and seal its record; the locks were
/// stripes shared by every business, so a device of business Y whose
/// stripe a device of X held waited on X's provider (about 1 in 1,024 of
/// Y's devices per X device waiting). The stripes are now per business.
#[test]
fn a_hung_key_provider_call_of_one_business_holds_up_no_other_business() {
    runtime().block_on(async {
        let clock = ManualClock::new(Timestamp::from_millis(T0));
        let store: Arc<dyn Storage> = Arc::new(MemoryStore::new());
        let local: Arc<dyn KeyProvider> = Arc::new(LocalKeyProvider::new(&SecretKey::generate()));
        let (x, y) = (BusinessId::new(1).unwrap(), BusinessId::new(2).unwrap());
        // Business X has a session with a consumer's device, stored.
        let (keys, sessions) = signal_stack(local.clone(), store.clone(), &clock);
        let published = sessions.publish(x).await.unwrap();
        let mut handset = ConsumerDevice::new(1);
        handset
            .start_session(x, &published.bundle(Some(0)))
            .await
            .unwrap();
        let phone = keys.phone_hash(x, &consumer(1)).await.unwrap();
        let peer_x = PeerId { phone, device: 1 };
        let first = handset.encrypt(x, b"hello").await.unwrap();
        let expiry = clock.now().saturating_add(Duration::from_secs(24 * 3600));
        sessions.decrypt(x, peer_x, &first, expiry).await.unwrap();
        drop(sessions);

        // Another process over the store, whose provider hangs for X: an
        // operation on X's device holds its lock, waiting for ever.
        let hanging = Arc::new(HangsForVersion {
            inner: local,
            business: x,
            from_version: 0,
            armed: std::sync::atomic::AtomicBool::new(true),
            hung_on: std::sync::Mutex::default(),
        });
        let (_keys, sessions) = signal_stack(hanging, store, &clock);
        let mut stuck = Box::pin(sessions.has_session(x, peer_x));
        assert!(poll_at_most(stuck.as_mut(), 100).await.is_none());
        // Business Y's devices need no provider call: each completes at
        // once. (Shared stripes: the chance that none of 20,000 collided
        // with X's was below 1e-8.)
        let phone = custodian::ids::PhoneHash::from_bytes([9; 16]);
        let stalled: Vec<u32> = {
            let mut stalled = Vec::new();
            for device in 0..20_000u32 {
                let has = sessions.has_session(y, PeerId { phone, device });
                if poll_at_most(has, 100).await.is_none() {
                    stalled.push(device);
                }
            }
            stalled
        };
        assert!(stalled.is_empty(), "held up by business {x}: {stalled:?}");
        drop(stuck);
    });
}

/// An approval of a changed identity key waiting for its device, whose
/// operation hangs on a host call, holds up no other business's holds (nor
/// the sweep's deletions). The approval took the hold gate, which every
/// business shares, before it waited for the device's lock and read its
/// record (a store and key-provider call); it now reads the record first
/// and takes the gate only to write it.
#[test]
fn an_approval_waiting_on_a_hung_device_holds_up_no_other_business_hold() {
    runtime().block_on(async {
        let y = BusinessId::new(BUSINESS + 1).unwrap();
        let mut stalled = Vec::new();
        let mut reached = 0;
        for k in 1..200 {
            let d = Deployment::new(Faults::none(), Faults::none()).await;
            let mut handset = d.handset().await;
            let hello = d.inbound(&mut handset, b"hello").await;
            assert!(d.receive(hello).await.unwrap().delivered);
            // The consumer reinstalled and confirmed the new key out of band.
            d.processor.publish_keys(&d.owner, d.b).await.unwrap();
            let reinstalled = d.handset().await;
            let key = reinstalled.identity();
            // X's device's next message: its receive hangs at its k-th
            // suspension (a host call that never answers).
            let next = d.inbound(&mut handset, b"next").await;
            d.faults.fail_at(usize::MAX, Seams::Both, Strike::Before);
            let mut hung = Box::pin(d.receive(next));
            if poll_at_most(hung.as_mut(), k).await.is_some() {
                break;
            }
            let calls = d.faults.calls();
            reached = k;
            // Nothing of Y waits on that alone.
            let listed = poll_at_most(d.processor.holds(&d.operator), 10_000).await;
            assert!(listed.is_some(), "k={k}: holds() waits on X's hung receive");
            // X's operator approves the new key: it may wait for the device.
            let number = consumer(1);
            let mut trust = Box::pin(d.processor.trust_new_identity(
                &d.owner,
                d.b,
                &number,
                handset.device_id(),
                key,
            ));
            if poll_at_most(trust.as_mut(), 10_000).await.is_some() {
                continue;
            }
            // Business Y places a hold: it has nothing to do with X.
            let placed = poll_at_most(
                d.processor
                    .place_hold(&d.operator, HoldScope::Business(y), "case-y"),
                10_000,
            )
            .await;
            if placed.is_none() {
                stalled.push((k, calls));
            }
        }
        assert!(reached > 3, "the receive never hung");
        assert!(
            stalled.is_empty(),
            "a hold of business {y} waited on business X's hung device at cuts {stalled:?}"
        );
    });
}

/// A key provider (a KMS) that, once armed, hangs every unwrap of one
/// business's KEK versions at or above `from_version` (its KMS key
/// unreachable, or its newer one), and answers every other's at once.
/// Records the versions asked for.
struct HangsForVersion {
    inner: Arc<dyn KeyProvider>,
    business: BusinessId,
    from_version: u32,
    armed: std::sync::atomic::AtomicBool,
    hung_on: std::sync::Mutex<Vec<u32>>,
}

#[async_trait::async_trait]
impl KeyProvider for HangsForVersion {
    async fn wrap(
        &self,
        context: &custodian::keys::KekContext,
        key: &SecretKey,
    ) -> Result<Vec<u8>, custodian::keys::ProviderError> {
        self.inner.wrap(context, key).await
    }
    async fn unwrap(
        &self,
        context: &custodian::keys::KekContext,
        wrapped: &[u8],
    ) -> Result<SecretKey, custodian::keys::ProviderError> {
        if self.armed.load(std::sync::atomic::Ordering::SeqCst)
            && context.business == self.business
            && context.version >= self.from_version
        {
            self.hung_on.lock().unwrap().push(context.version);
            std::future::pending::<()>().await;
        }
        self.inner.unwrap(context, wrapped).await
    }
}

/// An approval's write makes no key-provider call under the hold gate,
/// which every business shares: the key it seals under is had first. Past
/// an epoch since the device's last write, after a KEK rotation and a
/// restart, the seal unwrapped the new primary KEK under the gate, and
/// with that call hung for business X, business Y's holds waited.
#[test]
fn an_approval_hung_in_its_seal_holds_up_no_other_business_hold() {
    runtime().block_on(async {
        let mut d = Deployment::new(Faults::none(), Faults::none()).await;
        let y = BusinessId::new(BUSINESS + 1).unwrap();
        // X's device writes: its record is sealed under an epoch key
        // wrapped under KEK v1.
        let mut handset = d.handset().await;
        let hello = d.inbound(&mut handset, b"hello").await;
        assert!(d.receive(hello).await.unwrap().delivered);
        // The consumer reinstalled: a new identity key, confirmed out of band.
        d.processor.publish_keys(&d.owner, d.b).await.unwrap();
        let key = d.handset().await.identity();
        // X's KEK is rotated: v2 becomes primary.
        let keys = d.processor.keys(&d.operator).unwrap();
        let v2 = keys.add_kek_version(d.b, d.clock.now()).await.unwrap();
        keys.promote_kek_version(d.b, v2).await.unwrap();
        // Restart over a provider that will hang X's v2 once armed.
        let hanging = Arc::new(HangsForVersion {
            inner: d.seams.provider.clone(),
            business: d.b,
            from_version: v2,
            armed: std::sync::atomic::AtomicBool::new(false),
            hung_on: std::sync::Mutex::new(Vec::new()),
        });
        d.seams.provider = hanging.clone();
        d.restart();
        // Two hours on (two default epochs): the approval's expiry is in an
        // epoch no key exists for yet; the record is still live.
        d.clock.advance(Duration::from_secs(2 * 3600));
        hanging
            .armed
            .store(true, std::sync::atomic::Ordering::SeqCst);

        let number = consumer(1);
        let mut trust = Box::pin(d.processor.trust_new_identity(
            &d.owner,
            d.b,
            &number,
            handset.device_id(),
            key,
        ));
        let done = poll_at_most(trust.as_mut(), 10_000).await;
        assert!(
            done.is_none(),
            "the approval did not hang (precondition): {done:?}"
        );
        assert_eq!(
            hanging.hung_on.lock().unwrap().as_slice(),
            &[v2],
            "the approval hung on X's v2 (the seal, not the read of its v1 record)"
        );
        // Business Y, nothing to do with X, places a hold.
        let placed = poll_at_most(
            d.processor
                .place_hold(&d.operator, HoldScope::Business(y), "case-y"),
            10_000,
        )
        .await;
        assert!(
            placed.is_some(),
            "business {y}'s hold waits on business X's hung approval: it holds the \
             process-wide hold gate across a key-provider call"
        );
        drop(trust);
    });
}

/// Every approval of a held consumer is refused as `ConsumerHeld`, one
/// that would change nothing included (a key trusted already, a device
/// with no state): answered `Ok(false)`, it let the device's refused retry
/// receipts count again.
#[test]
fn an_approval_of_a_held_consumer_is_refused_even_when_it_would_change_nothing() {
    runtime().block_on(async {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let hello = d.inbound(&mut handset, b"hello").await;
        assert!(d.receive(hello).await.unwrap().delivered);
        d.processor
            .place_hold(&d.operator, HoldScope::Business(d.b), "case-1")
            .await
            .unwrap();
        let number = consumer(1);
        // The key already trusted for the device.
        let trusted = d
            .processor
            .trust_new_identity(
                &d.owner,
                d.b,
                &number,
                handset.device_id(),
                handset.identity(),
            )
            .await;
        // A device of the consumer with no state.
        let stateless = d
            .processor
            .trust_new_identity(&d.owner, d.b, &number, 9, handset.identity())
            .await;
        let held = |r: &Result<bool, custodian::processor::ProcessorError>| {
            matches!(
                r,
                Err(custodian::processor::ProcessorError::Hold(
                    custodian::retention::HoldError::ConsumerHeld
                ))
            )
        };
        assert!(
            held(&trusted) && held(&stateless),
            "approvals of a held consumer answered {trusted:?} / {stateless:?}, not ConsumerHeld"
        );
    });
}

/// A message sent again on request racing a plain copy of its bytes (the
/// copy sent again looked its header's id up before the plain copy was
/// stored; a review's second look).
mod resend_races {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Waker};

    use custodian::ids::MessageId;
    use custodian::processor::{Inbound, ProcessorError, Receipt};
    use custodian::testing::Faults;

    use super::seams::{Deployment, Plan, Seams, Strike};

    type Receiving<'a> = Pin<Box<dyn Future<Output = Result<Receipt, ProcessorError>> + 'a>>;

    /// `resent`'s receive, polled until its look-up of its header's id is
    /// under way (the store's calls counted from now, none failing).
    fn header_looked_up(d: &Deployment, resent: Inbound) -> Receiving<'_> {
        d.faults.set(Plan {
            at: usize::MAX,
            seams: Seams::Store,
            strike: Strike::Before,
            outage: false,
        });
        let mut first: Receiving<'_> = Box::pin(d.processor.receive(&d.carrier, d.b, resent));
        let mut cx = Context::from_waker(Waker::noop());
        let reads = || d.faults.calls().iter().filter(|c| **c == "message").count();
        let mut polls = 0;
        while reads() == 0 {
            assert!(first.as_mut().poll(&mut cx).is_pending(), "finished early");
            polls += 1;
            assert!(polls < 10_000, "no message read");
        }
        // One more poll reads.
        assert!(first.as_mut().poll(&mut cx).is_pending());
        assert_eq!(reads(), 1);
        first
    }

    /// The plain copy, from the same device, is stored under its header's
    /// id H while the copy sent again (under A) decrypts: Signal finds the
    /// step used, and the copy sent again is answered as a duplicate the
    /// business has, under H. (It was answered under A, where nothing is
    /// stored: `delivered: false`.)
    #[tokio::test(flavor = "current_thread")]
    async fn a_resent_copy_racing_its_plain_copy_is_answered_delivered() {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let plain = d.inbound(&mut handset, b"pay 100").await;
        let asked = MessageId::from_bytes([0x47; 16]);
        let resent = Inbound {
            resend_of: Some(asked),
            ..plain.clone()
        };
        let first = header_looked_up(&d, resent);

        let second = d.processor.receive(&d.carrier, d.b, plain).await.unwrap();
        assert!(second.delivered && !second.duplicate, "{second:?}");
        let header = second.id;

        let first = first.await.unwrap();
        let contents = d.contents();
        assert_eq!(contents.values().sum::<u32>(), 1, "{contents:?}");
        assert!(
            first.duplicate && first.delivered,
            "the business has the message (stored under {header:?}, delivered), \
             yet the copy sent again is answered {first:?}"
        );
    }

    /// The same with the plain copy handed in as from another device (the
    /// message a first one, on a one-time prekey, which the plain copy
    /// used): the copy sent again fails its decrypt, and is found stored
    /// under its header's id, a duplicate: its device is not asked for it
    /// again. (It was looked for under A only, and asked for: the device's
    /// answer reached the business a second time.)
    #[tokio::test(flavor = "current_thread")]
    async fn a_resent_copy_racing_a_copy_from_another_device_is_not_asked_for_again() {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let plain = d.inbound(&mut handset, b"pay 100").await;
        let asked = MessageId::from_bytes([0x48; 16]);
        let resent = Inbound {
            resend_of: Some(asked),
            ..plain.clone()
        };
        let forged = Inbound {
            device: 7,
            ..plain.clone()
        };
        let first = header_looked_up(&d, resent);

        let second = d.processor.receive(&d.carrier, d.b, forged).await.unwrap();
        assert!(second.delivered && !second.duplicate, "{second:?}");
        let first = first.await;
        let asked_for: Vec<MessageId> = d.transport.asked.lock().unwrap().clone();

        // What the device does when asked: the message again, over a new
        // session, under the id asked for.
        if asked_for.contains(&asked) {
            let keys = d.transport.published.lock().unwrap().clone().unwrap();
            handset
                .start_session(d.b, &keys.bundle(Some(1)))
                .await
                .unwrap();
            let again = Inbound {
                resend_of: Some(asked),
                ..d.inbound(&mut handset, b"pay 100").await
            };
            let third = d.processor.receive(&d.carrier, d.b, again).await;
            assert!(third.is_ok(), "{third:?}");
        }
        let contents = d.contents();
        assert!(
            asked_for.is_empty() && contents.values().all(|&n| n == 1),
            "the copy sent again was answered {first:?}, its device asked for it again \
             ({asked_for:?}) though it is stored under {:?}; the business has {contents:?}",
            second.id
        );
    }

    /// The control, not interleaved: the plain copy first, then the copy
    /// sent again, a duplicate the business has, under the header's id.
    #[tokio::test(flavor = "current_thread")]
    async fn control_a_resent_copy_after_its_plain_copy_is_answered_delivered() {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let plain = d.inbound(&mut handset, b"pay 100").await;
        let resent = Inbound {
            resend_of: Some(MessageId::from_bytes([0x47; 16])),
            ..plain.clone()
        };
        let second = d.processor.receive(&d.carrier, d.b, plain).await.unwrap();
        let first = d.processor.receive(&d.carrier, d.b, resent).await.unwrap();
        assert!(
            first.duplicate && first.delivered && first.id == second.id,
            "{first:?}"
        );
    }
}

/// A device whose stored Signal record cannot be read is given up on by a
/// send, as one whose record is over the size limit is (no attempt can
/// read it, and a bundle fetched for each would drain its one-time
/// prekeys): its consumer's other devices having the message and a
/// delivery report in, the business is told; a consumer whose only device
/// it is has the message fail (`NoSession`). (It was taken for a passing
/// failure: the device stayed pending at every attempt until the message
/// expired, the `Delivered` report held back from the business for the
/// message's life, and a message to it alone failed as expired, 30 days on.)
#[tokio::test]
async fn a_send_gives_up_a_device_whose_record_is_damaged() {
    let mut broken = Vec::new();
    let cases = [Damage::Swapped, Damage::Flipped].map(|how| [(how, false), (how, true)]);
    for (how, alone) in cases.into_iter().flatten() {
        let mut d = Deployment::new(Faults::none(), Faults::none()).await;
        let _devices = two_devices_wrote(&d).await;
        d.network.add_consumer(&consumer(1), 3).await;
        damage_device_two(&mut d, how).await;
        if alone {
            // The consumer's only device is the damaged one.
            d.transport.unlinked.lock().unwrap().extend([0, 1]);
        }
        let reply = Outbound {
            to: consumer(1),
            ..d.outbound(b"reply")
        };
        let id = d.processor.send(&d.owner, d.b, reply).await.unwrap();
        if !alone {
            // Devices 0 and 1 took it; the network reports it delivered.
            let report = d
                .processor
                .status_update(&d.carrier, d.b, id, Status::Delivered)
                .await;
            assert!(matches!(report, Ok(StatusChange::Applied)), "{report:?}");
        }
        // A day of retransmission passes, ten minutes apart.
        for _ in 0..144 {
            d.clock.advance(Duration::from_secs(600));
            d.processor.retransmit_due(&d.operator).await.unwrap();
        }
        let told = d.business.statuses().get(&id).cloned().unwrap_or_default();
        let stored = d.store.message(d.b, id).await.unwrap().unwrap().delivery;
        let expected = if alone {
            (Status::Failed, Some(FailureReason::NoSession))
        } else {
            (Status::Delivered, None)
        };
        if !told.contains(&expected) {
            broken.push(format!(
                "{how:?}, alone {alone}: a day on, the business was told {told:?}, not \
                 {expected:?}; \
                 stored {:?}, pending devices {:#b}, {} attempts",
                stored.status, stored.pending_devices, stored.attempts
            ));
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}
