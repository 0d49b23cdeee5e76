//! Cancellation safety: the future of every public entry point of the
//! processor, dropped after each of its suspensions in turn (as a host's
//! `timeout` or `select!` drops it), leaves nothing half-done. Afterwards
//! nothing stays locked or claimed, no inbound message is lost or handed to
//! its business twice, no outbound message is lost, no status is told twice
//! or goes backwards, and the audit trail matches what the store holds.
//!
//! Every host seam here suspends once around each call (the store both
//! before and after, as a SQLite commit lands even when its caller stopped
//! waiting; the network and the business before, so a dropped call never
//! reached them), which makes every `.await` a real suspension point. Each
//! test builds a fresh deployment for every cut `n = 1, 2, ...`, polls the
//! entry point `n` times and drops it, then goes on as a host would (retry,
//! `retransmit_due`, sweep) and checks the promises; it stops at the first
//! `n` at which the entry point completes.
#![cfg(feature = "testing")]
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "tests assert by panicking"
)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use custodian::ids::{BusinessId, MessageId, PhoneHash};
use custodian::keys::{
    Epoch, EpochLength, KeyEntry, KeyId, KeyKind, KeyManager, LocalKeyProvider, SecretKey,
};
use custodian::processor::StatusChange;
use custodian::retention::{Decision, Retention, RetentionPolicy};
use custodian::signal::{Sessions, SignalConfig, SignalError};
use custodian::store::{
    Delivery, Direction, FailureReason, HoldScope, KeyStore, MemoryStore, MessageRecord, PeerId,
    Status, Storage,
};
use custodian::testing::{ConsumerDevice, Faults};
use custodian::time::{Clock, ManualClock, Timestamp};
use custodian::vault::Vault;
use custodian::visibility::{Change, MemoryAuditSink};

#[path = "common/seams.rs"]
mod seams;
use seams::*;

/// More cuts than any entry point here has suspensions: a test that gets
/// this far is looping.
const MAX_CUTS: usize = 5_000;

/// Runs `case(n)` for every cut `n = 1, 2, ...` until it reports that the
/// entry point completed within `n` polls.
async fn every_cut<F, Fut>(mut case: F)
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = bool>,
{
    for n in 1..MAX_CUTS {
        if case(n).await {
            return;
        }
    }
    panic!("the entry point never completed");
}

#[test]
fn harness_suspends_at_every_host_call() {
    // The harness itself: a receive does not finish in one poll, and does
    // in enough.
    runtime().block_on(async {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let inbound = d.inbound(&mut handset, b"hello").await;
        assert!(poll_at_most(d.receive(inbound.clone()), 1).await.is_none());
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let inbound = d.inbound(&mut handset, b"hello").await;
        assert!(poll_at_most(d.receive(inbound), 10_000).await.is_some());
    });
}

#[test]
fn send_is_cancellation_safe() {
    runtime().block_on(every_cut(|n| async move {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        d.network.add_consumer(&consumer(2), 2).await;
        let sent = poll_at_most(d.processor.send(&d.owner, d.b, d.outbound(b"first")), n).await;
        let second = d
            .processor
            .send(&d.owner, d.b, d.outbound(b"second"))
            .await
            .unwrap();
        d.settle(5).await;
        // Either never accepted, or stored and delivered to every device,
        // once: a device the dropped attempt reached is not sent it again.
        let received = d.network.received(&consumer(2)).await;
        let stored = d.store.census().await.unwrap().messages;
        assert!(stored == 1 || stored == 2, "cut {n}");
        for device in 0..2 {
            let got = &received[&device];
            assert_eq!(got.len() as u64, stored, "cut {n}: device {device}");
            assert!(got.values().all(|&copies| copies == 1), "cut {n}: {got:?}");
            assert!(got.contains_key(&second));
            if let Some(Ok(first)) = sent {
                assert!(got.contains_key(&first), "cut {n}");
            }
        }
        d.assert_delivered_and_billed(received[&0].keys(), stored, format_args!("cut {n}"))
            .await;
        // Counted for the integrity signals once per message stored, the
        // dropped call's included (a business cannot dodge the fan-out
        // detector by hanging up).
        d.processor.export_integrity(&d.operator).await.unwrap();
        let reports = d.network.integrity_reports().await;
        let report = reports.iter().find(|r| r.business == d.b).unwrap();
        let counted = report.history.iter().map(|w| w.sent).sum::<u64>() + report.current.sent;
        assert_eq!(counted, stored, "cut {n}");
        sent.is_some()
    }));
}

/// A send named by an idempotency key, dropped at any suspension (the
/// business's request timed out), then made again with the key: whether
/// or not the dropped call had stored the message, it is stored and sent
/// once, under the key's id.
#[test]
fn an_idempotent_send_dropped_anywhere_and_made_again_is_sent_once() {
    runtime().block_on(every_cut(|n| async move {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        d.network.add_consumer(&consumer(2), 2).await;
        let send = || {
            d.processor
                .send_idempotent(&d.owner, d.b, b"order-1", d.outbound(b"first"))
        };
        let dropped = poll_at_most(send(), n).await;
        let id = send().await.unwrap();
        if let Some(first) = &dropped {
            assert_eq!(first.as_ref().unwrap(), &id, "cut {n}");
        }
        d.settle(5).await;
        d.assert_sent_once(id, 2, format_args!("cut {n}")).await;
        dropped.is_some()
    }));
}

/// A send named by a key, dropped once its message is stored and before
/// its first attempt; retention is then shortened to a day, and two days
/// on the business makes the send again: the message is past its
/// retention, so it is neither sent nor told delivered, and fails as
/// expired.
#[test]
fn an_idempotent_send_made_again_past_a_shortened_retention_sends_nothing() {
    runtime().block_on(every_cut(|n| async move {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        d.network.add_consumer(&consumer(2), 1).await;
        let send = || {
            d.processor
                .send_idempotent(&d.owner, d.b, b"order-1", d.outbound(b"first"))
        };
        // The first cut at which the dropped call has stored the message.
        assert!(poll_at_most(send(), n).await.is_none(), "cut {n}: finished");
        if d.store.census().await.unwrap().messages == 0 {
            return false;
        }
        d.shorten_retention_to_a_day();
        d.clock.advance(Duration::from_secs(2 * 24 * 3600));
        let id = send().await.unwrap();
        let report = d
            .processor
            .status_update(&d.carrier, d.b, id, Status::Delivered)
            .await
            .unwrap();
        assert_eq!(report, StatusChange::Ignored, "cut {n}");
        d.settle(2).await;
        assert_eq!(d.network.received(&consumer(2)).await.get(&0), None);
        assert_eq!(
            d.processor.message_status(&d.owner, d.b, id).await.unwrap(),
            (Status::Failed, Some(FailureReason::Expired)),
            "cut {n}"
        );
        true
    }));
}

/// A send dropped after it reached one of two devices, once that device's
/// delivery report has moved the message on (the report wrote while the
/// send held the message): what the send reached is recorded on the state
/// the report left, so the other device still gets the message, and the
/// first does not get it again.
#[test]
fn a_send_dropped_after_a_report_from_a_device_it_reached_still_reaches_the_rest() {
    runtime().block_on(send_dropped_after_a_report(None));
}

/// The same, with the report's write landing unanswered (the store failed
/// it after applying it): both the report's write and the send's record
/// are owed at once, and both are made, in order. The message is billed
/// once, by the report that moved it on from queued.
#[test]
fn a_report_and_a_send_owed_at_once_are_both_made() {
    runtime().block_on(async {
        // The report's commit is its n-th store call: found by trying each.
        for n in 1..20 {
            if send_dropped_after_a_report(Some(n)).await {
                return;
            }
        }
        panic!("the report never committed");
    });
}

/// A send stopped (the process restarting) once it reached device 0 of
/// two, before its bookkeeping was written: the store has the message
/// queued, no attempt recorded. Device 0's delivery report (the transport
/// reports per device) reaches the new process before any retransmission:
/// the message takes the status, device 1 is still sent it, and the
/// business is told delivered once, and billed once.
#[test]
fn a_report_on_a_send_stopped_before_its_bookkeeping_still_reaches_every_device() {
    runtime().block_on(async {
        let mut d = Deployment::new(Faults::none(), Faults::none()).await;
        d.network.add_consumer(&consumer(2), 2).await;
        let mut send = Box::pin(d.processor.send(&d.owner, d.b, d.outbound(b"first")));
        let mut polls = 0;
        while d.network.in_flight().await == 0 {
            let polled = poll_at_most(send.as_mut(), 1).await;
            assert!(polled.is_none(), "the send finished");
            polls += 1;
            assert!(polls < 10_000, "device 0 was never sent to");
        }
        drop(send);
        d.restart();
        let later = Timestamp::from_millis(T0 + 3_600_000);
        let stored = d.store.due_messages(later, 10).await.unwrap();
        let [stored] = stored.as_slice() else {
            panic!("{} messages stored", stored.len());
        };
        let id = stored.id;
        assert_eq!(
            stored.delivery,
            Delivery::queued(stored.created),
            "nothing recorded"
        );
        // Device 0 gets it and reports it.
        d.network.pump(&d.processor, &d.carrier).await;
        let received = d.network.received(&consumer(2)).await;
        assert_eq!(received[&0].get(&id), Some(&1));
        let reported = d
            .processor
            .status_update(&d.carrier, d.b, id, Status::Delivered)
            .await
            .unwrap();
        assert_eq!(reported, StatusChange::Applied);
        assert_eq!(d.business.statuses().get(&id), None, "not told yet");

        d.settle(5).await;
        let received = d.network.received(&consumer(2)).await;
        assert_eq!(received[&1].get(&id), Some(&1), "device 1 gets it");
        // Device 0 may be sent it again: it drops the copy by its id.
        assert!(received[&0].contains_key(&id));
        assert_eq!(
            d.business.statuses()[&id],
            [(Status::Delivered, None)],
            "told delivered once"
        );
        d.assert_delivered_and_billed([id].iter(), 1, format_args!("restarted"))
            .await;
    });
}

/// The one message stored, and its status, if any.
async fn the_message(d: &Deployment) -> Option<(MessageId, Status)> {
    let later = Timestamp::from_millis(T0 + 24 * 3_600_000);
    let due = d.store.due_messages(later, 10).await.unwrap();
    due.first().map(|m| (m.id, m.delivery.status))
}

/// Messages `d`'s business was billed for so far (its open period included).
async fn billed_now(d: &Deployment) -> u64 {
    let statement = d.processor.billing_statement(&d.owner, d.b).await.unwrap();
    statement.records.iter().map(|r| r.messages.total()).sum()
}

/// A send's bookkeeping (queued to sent) lands, and the send is dropped
/// there, its answer unseen: the write is owed. A delivery report that
/// started while the send held the message (nothing owed yet to pay)
/// writes delivered over it. The owed write, paid afterwards, finds the
/// state it wrote gone, but its token kept: the message is billed once.
#[test]
fn an_owed_send_bookkeeping_written_over_by_a_report_is_billed_once() {
    runtime().block_on(async {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        d.network.add_consumer(&consumer(2), 1).await;
        let mut send = Box::pin(d.processor.send(&d.owner, d.b, d.outbound(b"first")));
        let mut polls = 0;
        let id = loop {
            let polled = poll_at_most(send.as_mut(), 1).await;
            assert!(polled.is_none(), "the send finished");
            polls += 1;
            assert!(polls < 10_000, "never stored");
            if let Some((id, _)) = the_message(&d).await {
                break id;
            }
        };
        // The report starts: the send holds the claim; it waits at its
        // read of the message.
        let mut report =
            Box::pin(
                d.processor
                    .status_update(&d.carrier, d.b, id, Status::Delivered),
            );
        assert!(poll_at_most(report.as_mut(), 1).await.is_none());
        // The send's bookkeeping lands; the send is dropped there.
        while the_message(&d).await.map(|m| m.1) == Some(Status::Queued) {
            let polled = poll_at_most(send.as_mut(), 1).await;
            assert!(polled.is_none(), "the send finished");
        }
        drop(send);
        assert_eq!(the_message(&d).await.map(|m| m.1), Some(Status::Sent));
        assert_eq!(report.await.unwrap(), StatusChange::Applied);
        d.settle(5).await;
        let told: Vec<Status> = d.business.statuses()[&id].iter().map(|s| s.0).collect();
        assert_eq!(
            told,
            [Status::Delivered],
            "sent is not told after delivered"
        );
        assert_eq!(billed_now(&d).await, 1, "billed once");
    });
}

/// A delivery report that moves the message on from queued (counting it)
/// while the send holds it is dropped once its write landed: the write is
/// owed. A second report (read) writes over it. The send then pays the
/// owed write, which finds its token kept: billed once.
#[test]
fn an_owed_report_written_over_by_the_next_report_is_billed_once() {
    runtime().block_on(async {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        d.network.add_consumer(&consumer(2), 1).await;
        let mut send = Box::pin(d.processor.send(&d.owner, d.b, d.outbound(b"first")));
        let id = loop {
            let polled = poll_at_most(send.as_mut(), 1).await;
            assert!(polled.is_none(), "the send finished");
            if let Some((id, _)) = the_message(&d).await {
                break id;
            }
        };
        let mut first = Box::pin(
            d.processor
                .status_update(&d.carrier, d.b, id, Status::Delivered),
        );
        while the_message(&d).await.map(|m| m.1) != Some(Status::Delivered) {
            let polled = poll_at_most(first.as_mut(), 1).await;
            assert!(polled.is_none(), "the report finished");
        }
        drop(first);
        let read = d
            .processor
            .status_update(&d.carrier, d.b, id, Status::Read)
            .await
            .unwrap();
        assert_eq!(read, StatusChange::Applied);
        assert_eq!(send.await.unwrap(), id);
        d.settle(5).await;
        assert_eq!(billed_now(&d).await, 1, "billed once");
        assert_eq!(
            d.processor.message_status(&d.owner, d.b, id).await.unwrap(),
            (Status::Read, None)
        );
    });
}

/// Drops a send to a consumer with two devices once it reached device 0
/// and device 0 reported it delivered; if `fail_report` is `Some(n)`, the
/// report's n-th store call fails after it applied. Returns whether that
/// call was the report's commit (always, without one).
async fn send_dropped_after_a_report(fail_report: Option<usize>) -> bool {
    let d = Deployment::new(Faults::none(), Faults::none()).await;
    d.network.add_consumer(&consumer(2), 2).await;
    let mut send = Box::pin(d.processor.send(&d.owner, d.b, d.outbound(b"first")));
    let mut polls = 0;
    loop {
        let polled = poll_at_most(send.as_mut(), 1).await;
        assert!(polled.is_none(), "the send finished before a report came");
        polls += 1;
        assert!(polls < 10_000, "device 0 was never sent to");
        d.network.pump(&d.processor, &d.carrier).await;
        let received = d.network.received(&consumer(2)).await;
        if received.get(&0).is_some_and(|r| !r.is_empty()) {
            assert!(received.get(&1).is_none_or(|r| r.is_empty()));
            break;
        }
    }
    // Device 0's transport reports it delivered while the send holds the
    // message (the simulated network reports once every device has it; a
    // transport may report per device).
    let received = d.network.received(&consumer(2)).await;
    let id = *received[&0].keys().next().unwrap();
    if let Some(n) = fail_report {
        d.faults.fail_at(n, Seams::Store, Strike::After);
    }
    let reported = d
        .processor
        .status_update(&d.carrier, d.b, id, Status::Delivered)
        .await;
    let failed = d.faults.lift();
    match fail_report {
        None => assert!(reported.is_ok(), "{reported:?}"),
        Some(_) if failed != [("commit", Strike::After)] => return false,
        Some(_) => assert!(reported.is_err()),
    }
    let status = d
        .store
        .message(d.b, id)
        .await
        .unwrap()
        .unwrap()
        .delivery
        .status;
    assert_eq!(status, Status::Delivered);
    drop(send);

    d.settle(5).await;
    let received = d.network.received(&consumer(2)).await;
    for device in 0..2 {
        assert_eq!(
            received[&device],
            BTreeMap::from([(id, 1)]),
            "device {device}"
        );
    }
    let case = format_args!("report failing at {fail_report:?}");
    d.assert_delivered_and_billed([id].iter(), 1, case).await;
    true
}

/// A sweep cut at the same point every time (a host's timeout), in the
/// middle of applying a shortened policy, still finishes the pass over the
/// sweeps: each goes on where the last was cut. (A pass cut before its end
/// started again at its first page the next time.)
#[test]
fn a_policy_pass_cut_every_time_at_the_same_point_finishes() {
    runtime().block_on(async {
        // Messages both ways, past the one-day retention a policy puts in
        // force: the pass caps two pages (one per direction).
        let world = || async {
            let d = Deployment::new(Faults::none(), Faults::none()).await;
            let mut handset = d.handset().await;
            let inbound = d.inbound(&mut handset, b"in").await;
            assert!(d.receive(inbound).await.unwrap().delivered);
            d.processor
                .send(&d.owner, d.b, d.outbound(b"out"))
                .await
                .unwrap();
            d.settle(2).await;
            d.shorten_retention_to_a_day();
            d.clock.advance(Duration::from_secs(3 * 24 * 3600));
            d
        };
        let caps = |d: &Deployment| {
            let calls = d.faults.calls();
            calls.iter().filter(|c| **c == "cap_expiry").count()
        };
        // The poll at which a sweep is inside the pass's second page.
        let mut cut = None;
        for polls in 1..MAX_CUTS {
            let d = world().await;
            d.faults.fail_at(usize::MAX, Seams::Store, Strike::Before);
            if poll_at_most(d.processor.sweep(&d.operator), polls)
                .await
                .is_some()
            {
                break;
            }
            if caps(&d) == 2 {
                cut = Some(polls);
                break;
            }
        }
        let cut = cut.expect("a sweep never reached the pass's second page");
        let d = world().await;
        for _ in 0..8 {
            poll_at_most(d.processor.sweep(&d.operator), cut).await;
        }
        let census = d.store.census().await.unwrap();
        assert_eq!(census.messages, 0, "the pass never finished: {census:?}");
    });
}

#[test]
fn sweep_is_cancellation_safe() {
    runtime().block_on(every_cut(|n| async move {
        // The network never takes the outbound message: it expires open.
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let inbound = d.inbound(&mut handset, b"in").await;
        assert!(d.receive(inbound).await.unwrap().delivered);
        let out = d
            .processor
            .send(&d.owner, d.b, d.outbound(b"out"))
            .await
            .unwrap();
        d.clock.advance(Duration::from_secs(31 * 24 * 3600));
        let done = poll_at_most(d.processor.sweep(&d.operator), n)
            .await
            .is_some();
        let report = d.processor.sweep(&d.operator).await.unwrap();
        assert!(report.complete, "cut {n}");
        d.settle(2).await;
        let census = d.store.census().await.unwrap();
        assert_eq!((census.messages, census.peers), (0, 0), "cut {n}");
        let told = &d.business.statuses()[&out];
        assert_eq!(
            told,
            &[(Status::Failed, Some(FailureReason::NoDevices))],
            "cut {n}"
        );
        // The consumer is forgotten, in memory too: its session is gone.
        let late = d.inbound(&mut handset, b"late").await;
        assert!(d.receive(late).await.is_err(), "cut {n}");
        done
    }));
}

/// An early shred dropped anywhere, then made again, destroys the epoch's
/// key (nothing sealed under it opens, and the consumer's next message,
/// which would be sealed into the epoch, is refused), and the trail
/// records the shred before the key went (once for each call that
/// reached the trail).
#[test]
fn shred_epoch_is_cancellation_safe() {
    runtime().block_on(every_cut(|n| async move {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let inbound = d.inbound(&mut handset, b"in").await;
        let id = d.receive(inbound).await.unwrap().id;
        let epoch = d.store.message(d.b, id).await.unwrap().unwrap().epoch;
        let shred = || d.processor.shred_epoch(&d.operator, d.b, epoch, "case-1");
        let done = poll_at_most(shred(), n).await;
        let shreds = |d: &Deployment| {
            let changes = d.audit.changes();
            changes
                .iter()
                .filter(|c| matches!(c, Change::Shred { .. }))
                .count()
        };
        let keys = d.processor.keys(&d.operator).unwrap();
        if shreds(&d) == 0 {
            assert!(keys.epoch_key(d.b, epoch).await.is_ok(), "cut {n}");
        }
        let again = shred().await.unwrap();
        // A first call that answered destroyed it; one dropped may have
        // (its write lands), and the second destroyed it otherwise.
        if let Some(first) = &done {
            assert!(matches!(first, Ok(true)) && !again, "cut {n}: {first:?}");
        }
        assert!(keys.epoch_key(d.b, epoch).await.is_err(), "cut {n}");
        assert!((1..=2).contains(&shreds(&d)), "cut {n}");
        let late = d.inbound(&mut handset, b"late").await;
        assert!(d.receive(late).await.is_err(), "cut {n}");
        done.is_some()
    }));
}

#[test]
fn publish_keys_is_cancellation_safe() {
    runtime().block_on(every_cut(|n| async move {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let done = poll_at_most(d.processor.publish_keys(&d.owner, d.b), n)
            .await
            .is_some();
        d.processor.publish_keys(&d.owner, d.b).await.unwrap();
        let mut handset = d.handset().await;
        let inbound = d.inbound(&mut handset, b"hello").await;
        assert!(d.receive(inbound).await.unwrap().delivered, "cut {n}");
        done
    }));
}

#[test]
fn trust_new_identity_is_cancellation_safe() {
    runtime().block_on(every_cut(|n| async move {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let inbound = d.inbound(&mut handset, b"hello").await;
        d.receive(inbound).await.unwrap();
        let from = consumer(1);
        // The consumer reinstalled, and confirmed the new key.
        d.processor.publish_keys(&d.owner, d.b).await.unwrap();
        let mut reinstalled = d.handset().await;
        let key = reinstalled.identity();
        let trust = d
            .processor
            .trust_new_identity(&d.owner, d.b, &from, handset.device_id(), key);
        let done = poll_at_most(trust, n).await.is_some();
        d.processor
            .trust_new_identity(&d.owner, d.b, &from, handset.device_id(), key)
            .await
            .unwrap();
        // The new key is trusted: its session starts.
        let inbound = d.inbound(&mut reinstalled, b"again").await;
        assert!(d.receive(inbound).await.unwrap().delivered, "cut {n}");
        done
    }));
}

/// Under `AcceptAndReport`, a reinstalled device whose retry receipt was
/// refused (its bundle's key not trusted) writes with its new key, and the
/// receive that takes the key is cut at every await, the transport handing
/// the message in again: once the key is taken, the device's next receipt
/// is acted on. (Cut after its write landed, the receive never let the
/// device's receipts in again, and the redelivery, a duplicate, did not
/// either: the device never got the message, until the review of
/// suspicions.)
#[test]
fn a_receive_taking_a_new_key_lets_the_devices_receipts_in_however_it_is_cut() {
    runtime().block_on(every_cut(|n| async move {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        // Its new key taken by a receive cut after `n` polls; the
        // transport hands the message in again.
        let (id, mut new, again) = d.reinstalled_and_refused().await;
        let done = poll_at_most(d.receive(again.clone()), n).await.is_some();
        d.receive(again).await.unwrap();
        d.clock.advance(Duration::from_secs(600));
        d.serve_new_install(&mut new);
        let receipt = d.processor.retry_receipt(&d.carrier, d.b, id, 1).await;
        assert!(
            matches!(receipt, Ok(StatusChange::Applied)),
            "cut {n}: the new key is trusted, yet its device's receipt is {receipt:?}"
        );
        done
    }));
}

#[test]
fn reads_and_exports_are_cancellation_safe() {
    runtime().block_on(every_cut(|n| async move {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        d.network.add_consumer(&consumer(2), 1).await;
        let id = d
            .processor
            .send(&d.owner, d.b, d.outbound(b"hi"))
            .await
            .unwrap();
        d.clock.advance(Duration::from_secs(2 * 24 * 3600));
        let p = &d.processor;
        let mut done = true;
        done &= poll_at_most(p.message_status(&d.owner, d.b, id), n)
            .await
            .is_some();
        done &= poll_at_most(p.export_integrity(&d.operator), n)
            .await
            .is_some();
        done &= poll_at_most(p.billing_statement(&d.owner, d.b), n)
            .await
            .is_some();
        done &= poll_at_most(p.statistics(&d.operator), n).await.is_some();
        done &= poll_at_most(p.census(&d.operator), n).await.is_some();
        // Each again, to the end.
        p.message_status(&d.owner, d.b, id).await.unwrap();
        assert_eq!(p.export_integrity(&d.operator).await.unwrap(), 1, "cut {n}");
        p.billing_statement(&d.owner, d.b).await.unwrap();
        p.statistics(&d.operator).await.unwrap();
        assert_eq!(p.census(&d.operator).await.unwrap().messages, 1, "cut {n}");
        done
    }));
}

#[test]
fn export_billing_is_cancellation_safe() {
    runtime().block_on(every_cut(|n| async move {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        d.network.add_consumer(&consumer(2), 1).await;
        d.processor
            .send(&d.owner, d.b, d.outbound(b"billable"))
            .await
            .unwrap();
        d.clock.advance(Duration::from_secs(2 * 24 * 3600));
        let done = poll_at_most(d.processor.export_billing(&d.operator), n)
            .await
            .is_some();
        d.processor.export_billing(&d.operator).await.unwrap();
        assert_eq!(d.billed().await, 1, "cut {n}");
        done
    }));
}

#[test]
fn receive_is_cancellation_safe() {
    runtime().block_on(every_cut(|n| async move {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let first = d.inbound(&mut handset, b"first").await;
        let done = poll_at_most(d.receive(first.clone()), n).await.is_some();
        // The transport was not acknowledged: it delivers again, in the
        // same millisecond, and then once more.
        d.receive(first.clone()).await.unwrap();
        assert!(d.receive(first).await.unwrap().duplicate, "cut {n}");
        // Nothing stays locked: the conversation goes on.
        let second = d.inbound(&mut handset, b"second").await;
        d.receive(second).await.unwrap();
        d.settle(5).await;
        let want = BTreeMap::from([(b"first".to_vec(), 1), (b"second".to_vec(), 1)]);
        assert_eq!(d.contents(), want, "cut {n}");
        d.assert_statuses_told_once_forward(n);
        // Each counted once, the dropped call's too, whether its write
        // landed before the drop (its redelivery, a duplicate, counts
        // nothing) or not.
        assert_eq!(d.received_counted().await, 2, "cut {n}");
        done
    }));
}

/// Report `id` delivered, the call dropped after `n` polls, then in full
/// (not acknowledged, the transport reports again); whether the first call
/// completed.
async fn delivered_cut_at(d: &Deployment, id: MessageId, n: usize) -> bool {
    let report = || {
        d.processor
            .status_update(&d.carrier, d.b, id, Status::Delivered)
    };
    let done = poll_at_most(report(), n).await.is_some();
    report().await.unwrap();
    done
}

/// The statuses `id`'s business was told, in order.
fn told(d: &Deployment, id: MessageId) -> Vec<Status> {
    d.business.statuses()[&id].iter().map(|s| s.0).collect()
}

#[test]
fn status_update_is_cancellation_safe() {
    runtime().block_on(every_cut(|n| async move {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        d.network.add_consumer(&consumer(2), 1).await;
        let id = d
            .processor
            .send(&d.owner, d.b, d.outbound(b"hi"))
            .await
            .unwrap();
        let done = delivered_cut_at(&d, id, n).await;
        d.settle(5).await;
        assert_told_sent_delivered(&told(&d, id), format_args!("cut {n}"));
        done
    }));
}

/// A delivery report told ahead of a device failing for now (its bundle
/// unavailable), dropped at any await, the record that its business was
/// told included (owed then, and made before the message is next taken
/// up): the business is told delivered once, and the device gets the
/// message once its bundle is served.
#[test]
fn a_report_told_ahead_of_a_failing_device_is_told_once_however_it_is_cut() {
    runtime().block_on(every_cut(|n| async move {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        d.network.add_consumer(&consumer(2), 2).await;
        d.transport.bundle_fails.lock().unwrap().insert(1, false);
        let id = d
            .processor
            .send(&d.owner, d.b, d.outbound(b"hi"))
            .await
            .unwrap();
        let pending = d.store.message(d.b, id).await.unwrap().unwrap().delivery;
        assert_eq!(pending.pending_devices, 0b10, "device 1 waits");
        let done = delivered_cut_at(&d, id, n).await;
        // Passes a minute apart: a call cut in the business's endpoint
        // left it hung, and the next probe finds it answering.
        d.settle(3).await;
        assert_told_sent_delivered(&told(&d, id), format_args!("cut {n}, device 1 failing"));
        d.transport.bundle_fails.lock().unwrap().clear();
        d.settle(5).await;
        assert_told_sent_delivered(&told(&d, id), format_args!("cut {n}"));
        let received = d.network.received(&consumer(2)).await;
        assert_eq!(received[&1].get(&id), Some(&1), "cut {n}");
        done
    }));
}

/// A receive dropped at any await, the write recording its hand-over
/// included (owed then, and made when the message is next taken up): the
/// hand-over is counted delivered once in the statistics. Before, a call
/// dropped at that write never counted it. Three consumers, a message
/// each: a bucket of fewer than two is suppressed.
#[test]
fn a_receive_dropped_anywhere_is_counted_delivered_once() {
    use custodian::integrity::{Direction, Status as Stats};
    runtime().block_on(every_cut(|n| async move {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let [first, second, third] = d.three_first_messages().await;
        for message in [first, second] {
            assert!(d.receive(message).await.unwrap().delivered);
        }
        let done = poll_at_most(d.receive(third.clone()), n).await.is_some();
        // Not acknowledged: the network hands it in again.
        d.receive(third).await.unwrap();
        d.settle(3).await;
        assert_eq!(d.business.contents().len(), 3, "cut {n}");
        let counted = d.statistics_counted(Direction::Inbound, Stats::Delivered);
        assert_eq!(counted.await, [3], "cut {n}");
        done
    }));
}

/// A delivery report dropped at any await, its status write included
/// (owed then, and made when the report is handed in again): the delivery
/// is counted once in the statistics, and its latency with it.
#[test]
fn a_delivery_report_dropped_anywhere_is_counted_once() {
    use custodian::integrity::{Direction, Status as Stats};
    runtime().block_on(every_cut(|n| async move {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let mut sent = Vec::new();
        for i in [2, 3] {
            sent.push(d.send_out_to(i).await);
        }
        let report = |id| {
            d.processor
                .status_update(&d.carrier, d.b, id, Status::Delivered)
        };
        report(sent[0]).await.unwrap();
        let done = poll_at_most(report(sent[1]), n).await.is_some();
        // Not acknowledged: the transport hands it in again.
        report(sent[1]).await.unwrap();
        d.settle(3).await;
        let counted = d.statistics_counted(Direction::Outbound, Stats::Delivered);
        assert_eq!(counted.await, [2], "cut {n}");
        done
    }));
}

#[test]
fn retry_receipt_is_cancellation_safe() {
    runtime().block_on(every_cut(|n| async move {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let (first, id) = d.sent_on_a_lost_session().await;
        let receipt = d.processor.retry_receipt(&d.carrier, d.b, id, 0);
        let done = poll_at_most(receipt, n).await.is_some();
        // Not acknowledged: the network hands it in again.
        d.processor
            .retry_receipt(&d.carrier, d.b, id, 0)
            .await
            .unwrap();
        d.assert_got_again(first, id, format_args!("cut {n}")).await;
        done
    }));
}

#[test]
fn retransmit_due_is_cancellation_safe() {
    runtime().block_on(every_cut(|n| async move {
        // The business and the network are down for the first minute: an
        // inbound message waits for its business, an outbound one for the
        // network.
        let start = Timestamp::from_millis(T0);
        let down = |f: Faults| f.with_outage(start, Duration::from_secs(60));
        let d = Deployment::new(down(Faults::none()), down(Faults::none())).await;
        d.network.add_consumer(&consumer(2), 2).await;
        let mut handset = d.handset().await;
        let inbound = d.inbound(&mut handset, b"in").await;
        assert!(!d.receive(inbound).await.unwrap().delivered);
        let out = d
            .processor
            .send(&d.owner, d.b, d.outbound(b"out"))
            .await
            .unwrap();
        d.clock.advance(Duration::from_secs(120));
        let done = poll_at_most(d.processor.retransmit_due(&d.operator), n)
            .await
            .is_some();
        d.settle(5).await;
        assert_eq!(
            d.contents(),
            BTreeMap::from([(b"in".to_vec(), 1)]),
            "cut {n}"
        );
        let received = d.network.received(&consumer(2)).await;
        // Once: a device the dropped attempt reached is not sent it again.
        for device in 0..2 {
            assert_eq!(received[&device], BTreeMap::from([(out, 1)]), "cut {n}");
        }
        let told: Vec<Status> = d.business.statuses()[&out].iter().map(|s| s.0).collect();
        assert_told_sent_delivered(&told, format_args!("cut {n}"));
        // Billed once, however the attempt that got it sent ended.
        d.clock.advance(Duration::from_secs(2 * 24 * 3600));
        d.processor.export_billing(&d.operator).await.unwrap();
        assert_eq!(d.billed().await, 1, "cut {n}");
        done
    }));
}

/// The holds in force are what the audit trail says, from the processor
/// and from then on in the store, whatever the store made of a dropped
/// call's write.
async fn holds_agree_with_the_audit(d: &Deployment, n: usize, what: &str) {
    let listed = d.processor.holds(&d.operator).await.unwrap();
    let stored = d.store.holds().await.unwrap();
    assert_eq!(listed, stored, "cut {n}: {what}");
    let audited = holds_audited(&d.audit);
    let stands = stored.iter().any(|h| h.reference == "case-1");
    assert_eq!(audited, i32::from(stands), "cut {n}: {what}");
}

#[test]
fn holds_are_cancellation_safe() {
    runtime().block_on(every_cut(|n| async move {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let scope = HoldScope::Business(d.b);
        let placed = poll_at_most(d.processor.place_hold(&d.operator, scope, "case-1"), n).await;
        holds_agree_with_the_audit(&d, n, "placing").await;
        d.processor
            .place_hold(&d.operator, scope, "case-1")
            .await
            .unwrap();
        holds_agree_with_the_audit(&d, n, "placed").await;
        let released =
            poll_at_most(d.processor.release_hold(&d.operator, scope, "case-1"), n).await;
        holds_agree_with_the_audit(&d, n, "releasing").await;
        d.processor
            .release_hold(&d.operator, scope, "case-1")
            .await
            .unwrap();
        assert!(d.store.holds().await.unwrap().is_empty());
        holds_agree_with_the_audit(&d, n, "released").await;
        placed.is_some() && released.is_some()
    }));
}

#[test]
fn a_message_claimed_by_a_send_in_flight_is_skipped_by_retransmission() {
    // Not a cancellation: a send still under way when the retransmission
    // loop finds its message due (it is stored due at once). The loop must
    // skip it, not wait for it, nor take its claim away.
    runtime().block_on(async {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        d.network.add_consumer(&consumer(2), 1).await;
        let send = d.processor.send(&d.owner, d.b, d.outbound(b"hi"));
        let mut send = std::pin::pin!(send);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        while d.store.census().await.unwrap().messages == 0 {
            assert!(send.as_mut().poll(&mut cx).is_pending());
        }
        let report = d.processor.retransmit_due(&d.operator).await.unwrap();
        assert_eq!((report.due, report.sent), (1, 0));
        let id = send.await.unwrap();
        d.settle(3).await;
        let received = d.network.received(&consumer(2)).await;
        assert_eq!(received[&0][&id], 1, "sent once");
    });
}

#[test]
fn a_dropped_decrypt_never_makes_a_send_reuse_a_counter() {
    runtime().block_on(every_cut(|n| async move {
        // The reply turns the ratchet, so its decrypt persists the session
        // while the business's three sends live only in memory.
        let mut s = Signal::new(3).await;
        let reply = s.handset.encrypt(s.b, b"reply").await.unwrap();
        let decrypt = s.sessions.decrypt(s.b, s.peer, &reply, s.expiry());
        let done = poll_at_most(decrypt, n).await.is_some();
        s.send_and_read(b"after the cut").await;
        if !done {
            // Decrypted again, or a duplicate if the cut decrypt's commit
            // landed (its plaintext is lost: the processor stores the
            // message in that commit, and a retried receive finds it).
            let again = s.sessions.decrypt(s.b, s.peer, &reply, s.expiry());
            match again.await {
                Ok(d) => assert_eq!(*d.plaintext, b"reply", "cut {n}"),
                Err(e) => assert!(matches!(e, SignalError::DuplicateMessage), "cut {n}: {e}"),
            }
        }
        s.send_and_read(b"after the reply").await;
        done
    }));
}

#[test]
fn a_dropped_encrypt_never_makes_a_send_reuse_a_counter() {
    // Sends that run past the persisted counter lease persist the session:
    // cut one of those (or any other) at each suspension.
    runtime().block_on(async {
        for sends in [0, 62, 63, 64, 65, 126, 127, 128] {
            every_cut(|n| async move {
                let mut s = Signal::new(sends).await;
                let done = poll_at_most(s.encrypt(b"cut"), n).await.is_some();
                s.send_and_read(b"after the cut").await;
                s.send_and_read(b"and again").await;
                done
            })
            .await;
        }
    });
}

#[test]
fn a_dropped_approval_never_leaves_the_replaced_session_in_memory() {
    runtime().block_on(every_cut(|n| async move {
        let s = Signal::new(3).await;
        let (b, peer) = (s.b, s.peer);
        let before = s.store.peer(b, peer).await.unwrap();
        let key = ConsumerDevice::new(1).identity();
        let done = poll_at_most(s.sessions.trust_identity(b, peer, key, s.expiry()), n)
            .await
            .is_some();
        let replaced = s.store.peer(b, peer).await.unwrap() != before;
        let sent = s.encrypt(b"after").await;
        assert_eq!(
            replaced,
            matches!(sent, Err(SignalError::NoSession)),
            "cut {n}: replaced {replaced}, the send gave {sent:?}"
        );
        done
    }));
}

#[test]
fn a_dropped_forget_never_leaves_a_deleted_session_in_memory() {
    runtime().block_on(every_cut(|n| async move {
        let s = Signal::new(3).await;
        let (b, peer) = (s.b, s.peer);
        let done = poll_at_most(s.sessions.forget(b, peer.phone), n)
            .await
            .is_some();
        let deleted = s.store.peer(b, peer).await.unwrap().is_none();
        let sent = s.encrypt(b"after").await;
        assert_eq!(
            deleted,
            matches!(sent, Err(SignalError::NoSession)),
            "cut {n}: deleted {deleted}, the send gave {sent:?}"
        );
        done
    }));
}

/// A receive admitted under one retention policy, while a shorter one is
/// put in force and a sweep applies it before the message is stored, then
/// dropped at any suspension (at its commit among them, landed but not
/// answered): the next sweep applies the shorter policy to the message
/// too, so it is deleted when that policy says, not when the old one did.
#[test]
fn a_receive_dropped_at_its_commit_still_gets_a_policy_changed_meanwhile() {
    runtime().block_on(every_cut(|n| async move {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let inbound = d.inbound(&mut handset, b"in").await;
        let mut receive = Box::pin(d.receive(inbound));
        let mut cx = Context::from_waker(Waker::noop());
        // The first poll admits it under the 30-day default.
        let mut done = receive.as_mut().poll(&mut cx).is_ready();
        d.shorten_retention_to_a_day();
        d.processor.sweep(&d.operator).await.unwrap();
        for _ in 1..n {
            if done {
                break;
            }
            done = receive.as_mut().poll(&mut cx).is_ready();
        }
        drop(receive);
        d.clock.advance(Duration::from_secs(2 * 24 * 3600));
        for _ in 0..2 {
            d.processor.sweep(&d.operator).await.unwrap();
        }
        let census = d.store.census().await.unwrap();
        assert_eq!(census.messages, 0, "cut {n}: kept past the shorter policy");
        done
    }));
}

#[test]
fn a_dropped_sweep_never_leaves_a_deleted_session_in_memory() {
    runtime().block_on(every_cut(|n| async move {
        // Retention shortened to a day: the sweep deletes the consumer's
        // session, which its first message had kept for 30 days.
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let mut handset = d.handset().await;
        let inbound = d.inbound(&mut handset, b"in").await;
        assert!(d.receive(inbound).await.unwrap().delivered);
        d.shorten_retention_to_a_day();
        d.clock.advance(Duration::from_secs(2 * 24 * 3600));
        let done = poll_at_most(d.processor.sweep(&d.operator), n)
            .await
            .is_some();
        // Deleted or not yet, the processor holds what the store holds.
        let kept = d.store.census().await.unwrap().peers == 1;
        let late = d.inbound(&mut handset, b"late").await;
        let received = d.receive(late).await;
        assert_eq!(received.is_ok(), kept, "cut {n}: {received:?}");
        done
    }));
}

#[test]
fn a_dropped_epoch_destruction_never_leaves_the_key_in_memory() {
    runtime().block_on(async {
        let b = BusinessId::new(BUSINESS).unwrap();
        let now = Timestamp::from_millis(T0);
        let epoch = Epoch::containing(now, EpochLength::DEFAULT).unwrap();
        let id = KeyId::epoch(b, epoch);
        // A key the manager has cached, destroyed early or at its end.
        let keys = || async {
            let store = Arc::new(MemoryStore::new());
            let provider = Arc::new(LocalKeyProvider::new(&SecretKey::generate()));
            let keys = KeyManager::new(
                provider,
                Arc::new(FailingStore::paused(store.clone(), Arc::default())),
            );
            keys.epoch_key_for_seal(b, epoch, now).await.unwrap();
            (store, keys)
        };
        every_cut(|n| async move {
            let (store, keys) = keys().await;
            let done = poll_at_most(keys.destroy_epoch_unchecked(b, epoch, now), n)
                .await
                .is_some();
            let live = matches!(store.key(&id).await.unwrap(), Some(KeyEntry::Wrapped(_)));
            assert_eq!(keys.epoch_key(b, epoch).await.is_ok(), live, "cut {n}");
            done
        })
        .await;
        every_cut(|n| async move {
            let (store, keys) = keys().await;
            let ended = epoch.end();
            let done = poll_at_most(keys.destroy_ended_epochs_unchecked(ended), n)
                .await
                .is_some();
            let live = store.key(&id).await.unwrap().is_some();
            assert_eq!(keys.epoch_key(b, epoch).await.is_ok(), live, "cut {n}");
            done
        })
        .await;
    });
}

/// A maintenance dropped at any await leaves a signed prekey past its
/// grace unusable, whether it was deleted or is still stored: the grace is
/// enforced when the key is looked up, not only by its deletion.
#[test]
fn a_dropped_maintenance_never_leaves_a_retired_signed_prekey_usable() {
    runtime().block_on(every_cut(|n| async move {
        let s = Signal::new(0).await;
        let config = SignalConfig::default();
        // A new device of the consumer fetched the bundle, with no one-time
        // prekey left for it: its first message rests on the first signed
        // prekey alone.
        let first = s.sessions.publish(s.b).await.unwrap();
        s.clock.advance(config.signed_prekey_rotation);
        s.sessions.maintain(s.b, None).await.unwrap();
        // The first signed prekey's grace is over: maintenance retires it.
        s.clock.advance(config.signed_prekey_grace);
        let done = poll_at_most(s.sessions.maintain(s.b, None), n)
            .await
            .is_some();
        let stored = || async {
            s.store
                .keys_of_kind(s.b, KeyKind::SignalSignedPreKey, None, 16)
                .await
                .unwrap()
                .iter()
                .any(|k| k.id.id == u64::from(first.signed_prekey.id))
        };
        let first_kept = stored().await;
        let mut handset = ConsumerDevice::new(2);
        handset
            .start_session(s.b, &first.bundle(None))
            .await
            .unwrap();
        let hello = handset.encrypt(s.b, b"hello").await.unwrap();
        let peer = PeerId {
            device: 2,
            ..s.peer
        };
        let decrypted = s.sessions.decrypt(s.b, peer, &hello, s.expiry()).await;
        assert!(
            matches!(decrypted, Err(SignalError::UnknownPreKey("signed prekey"))),
            "cut {n} (kept: {first_kept}): {decrypted:?}"
        );
        // Once maintenance ran to the end, it is gone from the store too.
        s.sessions.maintain(s.b, None).await.unwrap();
        assert!(!stored().await, "cut {n}");
        done
    }));
}

/// Key maintenance holds up none of its business's consumers: while it
/// waits on the store (parked at each of its calls in turn, refilling the
/// one-time prekeys), a consumer with a session is sent a message and
/// heard from. (Maintenance took the business's account out of memory
/// first, so that every operation of the business waited for it to end,
/// until the review of concurrency.)
#[test]
fn maintenance_holds_up_no_consumer_of_its_business() {
    runtime().block_on(every_cut(|n| async move {
        let mut s = Signal::new(0).await;
        let mut maintain = Box::pin(s.sessions.maintain(s.b, Some(0)));
        let mut cx = Context::from_waker(Waker::noop());
        let mut done = false;
        for _ in 0..n {
            if let Poll::Ready(report) = maintain.as_mut().poll(&mut cx) {
                assert!(report.unwrap().prekeys_added > 0);
                done = true;
                break;
            }
        }
        let (b, peer, expiry) = (s.b, s.peer, s.expiry());
        let sent = poll_at_most(s.sessions.encrypt(b, peer, b"reply", expiry), 1_000).await;
        let sent = sent.unwrap_or_else(|| panic!("cut {n}: a send waited for maintenance"));
        let heard = s.handset.decrypt(b, &sent.unwrap()).await.unwrap();
        assert_eq!(heard, b"reply");
        let hello = s.handset.encrypt(b, b"hi").await.unwrap();
        let received = poll_at_most(s.sessions.decrypt(b, peer, &hello, expiry), 1_000).await;
        let received = received.unwrap_or_else(|| panic!("cut {n}: a receive waited"));
        assert_eq!(&received.unwrap().plaintext[..], b"hi");
        if !done {
            maintain.await.unwrap();
        }
        done
    }));
}

/// With no grace (a setting allowed), a maintenance that rotates the
/// signed prekey deletes the one it replaced in the same run: from that
/// moment no first message on it decrypts (one waits for maintenance to
/// end), while maintenance still runs (its account in memory held the
/// deleted key as current, with no newer one beside it to retire it by,
/// until the second look at the review of concurrency) nor after.
#[test]
fn a_signed_prekey_deleted_with_no_grace_is_refused_while_maintenance_runs() {
    runtime().block_on(every_cut(|n| async move {
        let clock = ManualClock::new(Timestamp::from_millis(T0));
        let store = Arc::new(MemoryStore::new());
        let paused: Arc<dyn Storage> = Arc::new(FailingStore::paused(
            store.clone(),
            Arc::new(HostFaults::default()),
        ));
        let keys = Arc::new(KeyManager::new(
            Arc::new(LocalKeyProvider::new(&SecretKey::generate())),
            paused.clone(),
        ));
        let vault = Vault::new(keys.clone(), Arc::new(clock.clone()), EpochLength::DEFAULT);
        let config = SignalConfig {
            prekey_pool: 8,
            prekey_low_water: 2,
            signed_prekey_grace: Duration::ZERO,
            ..SignalConfig::default()
        };
        let rotation = config.signed_prekey_rotation;
        let sessions = Sessions::new(Arc::new(vault), paused, config).unwrap();
        let b = BusinessId::new(BUSINESS).unwrap();
        let first = sessions.publish(b).await.unwrap();
        let mut handset = ConsumerDevice::new(2);
        handset.start_session(b, &first.bundle(None)).await.unwrap();
        let hello = handset.encrypt(b, b"hello").await.unwrap();
        let phone = keys.phone_hash(b, &consumer(1)).await.unwrap();
        let peer = PeerId { phone, device: 2 };
        clock.advance(rotation);
        let mut maintain = Box::pin(sessions.maintain(b, Some(0)));
        let mut cx = Context::from_waker(Waker::noop());
        let mut done = false;
        for _ in 0..n {
            if let Poll::Ready(report) = maintain.as_mut().poll(&mut cx) {
                assert!(report.unwrap().rotated);
                done = true;
                break;
            }
        }
        let deleted = !store
            .keys_of_kind(b, KeyKind::SignalSignedPreKey, None, 16)
            .await
            .unwrap()
            .iter()
            .any(|k| k.id.id == u64::from(first.signed_prekey.id));
        if deleted {
            let expiry = clock.now().saturating_add(Duration::from_secs(30 * 86_400));
            let decrypt = sessions.decrypt(b, peer, &hello, expiry);
            // Refused, or waiting for maintenance to end.
            let decrypted = poll_at_most(decrypt, 1_000).await;
            assert!(
                !matches!(decrypted, Some(Ok(_))),
                "cut {n} (maintenance done: {done})"
            );
        }
        if !done {
            maintain.await.unwrap();
        }
        let expiry = clock.now().saturating_add(Duration::from_secs(30 * 86_400));
        let after = sessions.decrypt(b, peer, &hello, expiry).await;
        assert!(after.is_err(), "cut {n}: {after:?}");
        done
    }));
}

/// Retention alone over the paused store, and a message of its business
/// past its retention: `decide` says `Held` while a hold stands, `Purge`
/// once none does.
struct Holding {
    retention: Retention,
    audit: Arc<MemoryAuditSink>,
    expired: MessageRecord,
    scope: HoldScope,
    now: Timestamp,
}

impl Holding {
    fn new() -> Self {
        let store: Arc<dyn Storage> = Arc::new(FailingStore::paused(
            Arc::new(MemoryStore::new()),
            Arc::default(),
        ));
        let provider = Arc::new(LocalKeyProvider::new(&SecretKey::generate()));
        let keys = Arc::new(KeyManager::new(provider, store.clone()));
        let audit = Arc::new(MemoryAuditSink::new());
        let retention = Retention::new(store, keys, RetentionPolicy::default(), audit.clone());
        let b = BusinessId::new(BUSINESS).unwrap();
        let created = Timestamp::from_millis(T0);
        let expired = MessageRecord {
            business: b,
            id: MessageId::from_bytes([7; 16]),
            direction: Direction::Inbound,
            phone: PhoneHash::from_bytes([9; 16]),
            created,
            expiry: created.saturating_add(Duration::from_secs(60)),
            epoch: Epoch::containing(created, EpochLength::DEFAULT).unwrap(),
            delivery: Delivery::queued(created),
            sealed: Vec::new(),
        };
        Self {
            retention,
            audit,
            expired,
            scope: HoldScope::Business(b),
            now: created.saturating_add(Duration::from_secs(3600)),
        }
    }

    /// Whether `decide` says a hold keeps the expired message.
    async fn held(&self) -> bool {
        let decision = self.retention.decide(&self.expired, self.now).await;
        matches!(decision.unwrap(), Decision::Held { .. })
    }

    /// Whether the audit trail says a hold stands.
    fn audited(&self) -> bool {
        holds_audited(&self.audit) > 0
    }
}

#[test]
fn a_hold_change_dropped_unanswered_is_seen_by_the_next_decision() {
    runtime().block_on(every_cut(|n| async move {
        let h = Holding::new();
        let placed = poll_at_most(
            h.retention.place_hold("operator", h.scope, "case-1", h.now),
            n,
        )
        .await;
        assert_eq!(h.held().await, h.audited(), "cut {n}: placing");
        h.retention
            .place_hold("operator", h.scope, "case-1", h.now)
            .await
            .unwrap();
        assert!(h.held().await, "cut {n}");
        let released = poll_at_most(
            h.retention
                .release_hold("operator", h.scope, "case-1", h.now),
            n,
        )
        .await;
        assert_eq!(h.held().await, h.audited(), "cut {n}: releasing");
        placed.is_some() && released.is_some()
    }));
}

#[test]
fn a_decision_overtaken_by_a_hold_release_keeps_no_stale_hold() {
    runtime().block_on(every_cut(|n| async move {
        let h = Holding::new();
        h.retention
            .place_hold("operator", h.scope, "case-1", h.now)
            .await
            .unwrap();
        // A decision reads the holds; the release lands while it waits.
        let mut decision = std::pin::pin!(h.held());
        let mut first = None;
        std::future::poll_fn(|cx| {
            for _ in 0..n {
                if let Poll::Ready(held) = decision.as_mut().poll(cx) {
                    first = Some(held);
                    break;
                }
            }
            Poll::Ready(())
        })
        .await;
        let released = h
            .retention
            .release_hold("operator", h.scope, "case-1", h.now)
            .await;
        assert!(released.unwrap());
        let done = first.is_some();
        if first.is_none() {
            decision.await;
        }
        assert!(!h.held().await, "cut {n}: the released hold is still seen");
        done
    }));
}

/// `Sessions::forget` deletes a device whose first message was decrypted
/// after it read the consumer's devices and before it took their locks: it
/// reads them again under the locks. (It deleted only the devices it had
/// read, and the new device's session outlived the forgetting.) (Review
/// of the storage layer.)
#[test]
fn forgetting_a_consumer_deletes_a_device_added_while_it_took_its_locks() {
    runtime().block_on(async {
        let s = Signal::new(0).await;
        let published = s.sessions.publish(s.b).await.unwrap();
        let mut second = ConsumerDevice::new(2);
        second
            .start_session(s.b, &published.bundle(Some(1)))
            .await
            .unwrap();
        let hello = second.encrypt(s.b, b"hello").await.unwrap();
        let peer = PeerId {
            device: 2,
            ..s.peer
        };
        let forget = s.sessions.forget(s.b, s.peer.phone);
        let mut forget = std::pin::pin!(forget);
        // Through its read of the devices (paused before and after it).
        for _ in 0..2 {
            let polled = std::future::poll_fn(|cx| Poll::Ready(forget.as_mut().poll(cx))).await;
            assert!(polled.is_pending());
        }
        s.sessions
            .decrypt(s.b, peer, &hello, s.expiry())
            .await
            .unwrap();
        assert_eq!(forget.await.unwrap(), 2);
        assert!(!s.sessions.has_session(s.b, peer).await.unwrap());
        assert!(!s.sessions.has_session(s.b, s.peer).await.unwrap());
    });
}

/// A retransmission pass dropped anywhere on a settled message past its
/// expiry, whose report its business has not taken, leaves the report due
/// a backoff later, never at once: the attempt's lease brought an expired
/// message's next attempt forward to the present whatever its status, so
/// every pass cut after the lease found the report due again at once, with
/// no backoff between them.
#[test]
fn a_pass_dropped_on_an_expired_settled_message_leaves_its_report_a_backoff_away() {
    runtime().block_on(async {
        let start = Timestamp::from_millis(T0 + 60_000);
        let down = Faults::none().with_outage(start, Duration::from_secs(3 * 86_400));
        let d = Deployment::new(Faults::none(), down).await;
        d.shorten_retention_to_a_day();
        let id = d.send_out_to(1).await;
        d.clock.set(start);
        let reported = d
            .processor
            .status_update(&d.carrier, d.b, id, Status::Delivered);
        assert_eq!(reported.await.unwrap(), StatusChange::Applied);
        // Past its expiry, its report still owed to the business.
        d.clock.advance(Duration::from_secs(86_400 + 3_600));
        let d = &d;
        let stored = || async { d.store.message(d.b, id).await.unwrap().unwrap().delivery };
        assert_eq!(stored().await.status, Status::Delivered);
        every_cut(|n| async move {
            let due = stored().await.next_attempt.unwrap();
            d.clock.set(due.max(d.clock.now()));
            let now = d.clock.now();
            let pass = poll_at_most(d.processor.retransmit_due(&d.operator), n).await;
            let next = stored().await.next_attempt.unwrap();
            assert!(
                next > now || next == due,
                "cut at {n}: due again at once ({next:?}, now {now:?})"
            );
            pass.is_some()
        })
        .await;
    });
}

/// Poll `call` until `landed` says its write landed, then drop it: a
/// host's timeout just after the store answered. It must not have
/// answered by then.
async fn cut_once_landed<F>(call: F, landed: impl AsyncFn() -> bool)
where
    F: Future,
    F::Output: std::fmt::Debug,
{
    let mut call = Box::pin(call);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..10_000 {
        if let Poll::Ready(r) = call.as_mut().poll(&mut cx) {
            panic!("the call answered {r:?} before the host timed it out");
        }
        if landed().await {
            return;
        }
    }
    panic!("the write never landed");
}

/// Consumer 2, two devices, answered the business's first message on each
/// (their sessions acknowledged), then lost its sessions.
async fn answered_then_lost(d: &Deployment) {
    d.network.add_consumer(&consumer(2), 2).await;
    d.processor
        .send(&d.owner, d.b, d.outbound(b"hi"))
        .await
        .unwrap();
    for device in 0..2 {
        d.network
            .consumer_sends(&consumer(2), device, d.b, b"thanks")
            .await
            .unwrap();
    }
    d.settle(3).await;
    d.network.lose_sessions(&consumer(2)).await;
}

/// Consumer 2 (two devices, sessions acknowledged) lost its sessions; the
/// business's next message went out and was reported delivered (device
/// 0's report, say). Its id.
async fn delivered_on_lost_sessions(d: &Deployment) -> MessageId {
    answered_then_lost(d).await;
    let id = d
        .processor
        .send(&d.owner, d.b, d.outbound(b"again"))
        .await
        .unwrap();
    let applied = d
        .processor
        .status_update(&d.carrier, d.b, id, Status::Delivered)
        .await
        .unwrap();
    assert_eq!(applied, StatusChange::Applied);
    id
}

/// A retry receipt for a settled message, timed out by the host while its
/// send to the device waits (the phone is off), once its new session is
/// written, and handed in again after the receipt timeout, five times:
/// every copy goes over the session the first started, as when the send
/// fails. (The session was held for the message only on a failed send: a
/// dropped one left it counted as new for the window alone, and each copy
/// after it fetched a bundle, a one-time prekey, and replaced the session;
/// a review's test.)
#[test]
fn a_retry_receipt_timed_out_in_its_send_fetches_one_bundle() {
    runtime().block_on(async {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let id = delivered_on_lost_sessions(&d).await;
        let peer = PeerId {
            phone: d.phone_of(2).await,
            device: 1,
        };
        let before = d.transport.bundles_fetched();
        for _ in 0..5 {
            let stored = d.store.peer(d.b, peer).await.unwrap();
            let receipt = d.processor.retry_receipt(&d.carrier, d.b, id, 1);
            cut_once_landed(receipt, async || {
                d.store.peer(d.b, peer).await.unwrap() != stored
            })
            .await;
            d.clock.advance(Duration::from_secs(121));
        }
        assert_eq!(d.transport.bundles_fetched() - before, 1);
    });
}

/// Two messages sent on a session the device lost bring two retry
/// receipts; the first, timed out by the host once its new session is
/// written, still counts as having started it: the second, within the
/// receipt timeout, goes over it and fetches no bundle. (The new session
/// was noted only once its write answered: the second receipt fetched
/// another bundle and replaced it; a review's test.)
#[test]
fn a_receipt_cut_after_its_session_write_still_counts_the_session_started() {
    runtime().block_on(async {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        let (_, again) = d.sent_on_a_lost_session().await;
        let more = d
            .processor
            .send(&d.owner, d.b, d.outbound(b"more"))
            .await
            .unwrap();
        let peer = PeerId {
            phone: d.phone_of(2).await,
            device: 0,
        };
        let before = d.transport.bundles_fetched();
        let stored = d.store.peer(d.b, peer).await.unwrap();
        let receipt = d.processor.retry_receipt(&d.carrier, d.b, again, 0);
        cut_once_landed(receipt, async || {
            d.store.peer(d.b, peer).await.unwrap() != stored
        })
        .await;
        d.clock.advance(Duration::from_secs(5));
        let other = d.processor.retry_receipt(&d.carrier, d.b, more, 0).await;
        assert!(matches!(other, Ok(StatusChange::Applied)), "{other:?}");
        assert_eq!(d.transport.bundles_fetched() - before, 1);
    });
}

/// A device whose retry receipts are ignored because a new session would
/// make its record too large gets them acted on once messages from it are
/// received, here each receive timed out by the host just after its write
/// landed (and handed in again, a duplicate). (Only a receive that
/// answered let them in: they stayed ignored for the message's life, and
/// the device never got the business's reply; a review's test.)
#[test]
fn a_receive_cut_after_its_write_lets_the_devices_oversized_receipts_in() {
    runtime().block_on(async {
        let (d, mut handset, messages, id) = near_the_record_limit().await;
        let (skipped, refused) = skip_to_the_limit(&d, &messages).await;
        // The device lost its session and asks for the reply: ignored.
        d.transport
            .served
            .lock()
            .unwrap()
            .insert(0, handset.bundle(true));
        let receipt = d.processor.retry_receipt(&d.carrier, d.b, id, 0).await;
        assert!(matches!(receipt, Ok(StatusChange::Ignored)), "{receipt:?}");
        // The skipped messages arrive, and the one refused: the record
        // shrinks.
        for k in skipped.into_iter().chain([refused]) {
            let census = async || d.store.census().await.unwrap().messages;
            let stored = census().await;
            cut_once_landed(d.receive(messages[k].clone()), async || {
                census().await > stored
            })
            .await;
            let again = d.receive(messages[k].clone()).await.unwrap();
            assert!(again.duplicate, "{again:?}");
        }
        d.clock.advance(Duration::from_secs(600));
        d.transport
            .served
            .lock()
            .unwrap()
            .insert(0, handset.bundle(true));
        let receipt = d.processor.retry_receipt(&d.carrier, d.b, id, 0).await;
        assert!(matches!(receipt, Ok(StatusChange::Applied)), "{receipt:?}");
    });
}

/// A retry receipt for a settled message, timed out by the host once the
/// network took its copy (in the write recording the device answered),
/// lets go of the session it held for the message: the device's later
/// receipt for it, past the receipt timeout, fetches a bundle. (The hold
/// was let go after that write: cut there, it stood until the message's
/// expiry, and the later receipt's copy went over a session the device had
/// lost; a review's second look.)
#[test]
fn a_receipt_cut_after_its_copy_went_out_lets_its_session_go() {
    runtime().block_on(receipt_after_copy_went_out(true));
}

/// The control of the test above: the first receipt answered.
#[test]
fn a_receipt_answered_after_its_copy_went_out_lets_its_session_go() {
    runtime().block_on(receipt_after_copy_went_out(false));
}

async fn receipt_after_copy_went_out(cut: bool) {
    {
        let d = Deployment::new(Faults::none(), Faults::none()).await;
        answered_then_lost(&d).await;
        // The business's next message: its send timed out once stored,
        // before any attempt (queued, no device recorded).
        let stored = d.store.census().await.unwrap().messages;
        cut_once_landed(
            d.processor.send(&d.owner, d.b, d.outbound(b"again")),
            async || d.store.census().await.unwrap().messages > stored,
        )
        .await;
        let later = d.clock.now().saturating_add(Duration::from_secs(3600));
        let due = d.store.due_messages(later, 100).await.unwrap();
        let queued: Vec<_> = due
            .iter()
            .filter(|m| m.delivery.status == Status::Queued)
            .collect();
        assert_eq!(queued.len(), 1, "{due:?}");
        let id = queued[0].id;
        // Device 0 reports it: device 1 is still to be sent it.
        let applied = d
            .processor
            .status_update(&d.carrier, d.b, id, Status::Delivered)
            .await
            .unwrap();
        assert_eq!(applied, StatusChange::Applied);
        let record = d.store.message(d.b, id).await.unwrap().unwrap();
        assert_ne!(
            record.delivery.pending_devices & 0b10,
            0,
            "{:?}",
            record.delivery
        );
        // Device 1 asks for it: a new session, and the copy goes out; the
        // host times the call out in the write that follows the send.
        let before = d.transport.bundles_fetched();
        let flying = d.network.in_flight().await;
        let receipt = d.processor.retry_receipt(&d.carrier, d.b, id, 1);
        if cut {
            cut_once_landed(receipt, async || d.network.in_flight().await > flying).await;
        } else {
            assert!(matches!(receipt.await, Ok(StatusChange::Applied)));
        }
        assert_eq!(d.transport.bundles_fetched() - before, 1);
        d.network.pump(&d.processor, &d.carrier).await;
        let got = d.network.received(&consumer(2)).await;
        assert_eq!(got[&1].get(&id), Some(&1), "device 1 got the copy: {got:?}");
        // Past the receipt timeout, device 1 loses that session too and
        // asks again: no session was started for it lately (the message
        // went over the last one), so a bundle is fetched and the copy
        // reaches it.
        d.clock.advance(Duration::from_secs(121));
        d.network.lose_sessions(&consumer(2)).await;
        let again = d.processor.retry_receipt(&d.carrier, d.b, id, 1).await;
        assert!(matches!(again, Ok(StatusChange::Applied)), "{again:?}");
        d.network.pump(&d.processor, &d.carrier).await;
        let got = d.network.received(&consumer(2)).await;
        assert_eq!(
            d.transport.bundles_fetched() - before,
            2,
            "the second receipt fetched no bundle: the session is still held for a message that went out"
        );
        assert_eq!(
            got[&1].get(&id),
            Some(&2),
            "device 1 did not get the copy: {got:?}"
        );
    }
}

/// A retry receipt that failed, or was timed out by the host, before its
/// session's write began (while it read the device's record) notes no
/// session started, nor holds one: handed in again, it fetches a bundle,
/// and the device gets the message. (Every error but a conflict and the
/// refusals, and every drop, noted it, and held it for the message: the
/// copy went over the session the device had lost; a review's second
/// look.)
#[test]
fn a_receipt_ended_before_its_session_write_notes_no_session() {
    runtime().block_on(async {
        for cut in [false, true] {
            let mut d = Deployment::new(Faults::none(), Faults::none()).await;
            let id = delivered_on_lost_sessions(&d).await;
            let peer = PeerId {
                phone: d.phone_of(2).await,
                device: 1,
            };
            // A restart: the device's record is read from the store.
            d.restart();
            let stored = d.store.peer(d.b, peer).await.unwrap();
            let before = d.transport.bundles_fetched();
            if cut {
                // Counts the calls; fails none.
                d.faults.fail_at(usize::MAX, Seams::Store, Strike::Before);
                let receipt = d.processor.retry_receipt(&d.carrier, d.b, id, 1);
                cut_once_landed(receipt, async || d.faults.calls().contains(&"peer")).await;
                let calls = d.faults.calls();
                assert_eq!(
                    calls.last(),
                    Some(&"peer"),
                    "no write after the read: {calls:?}"
                );
                d.faults.lift();
            } else {
                // The read of the device's record, in `start_session_with`
                // (the tenth store call of the receipt), fails before the
                // store is asked.
                d.faults.fail_at(10, Seams::Store, Strike::Before);
                let failed = d.processor.retry_receipt(&d.carrier, d.b, id, 1).await;
                assert!(failed.is_err(), "{failed:?}");
                assert_eq!(d.faults.lift(), [("peer", Strike::Before)]);
            }
            let now = d.store.peer(d.b, peer).await.unwrap();
            assert_eq!(now, stored, "cut {cut}: the record changed");
            assert_eq!(d.transport.bundles_fetched() - before, 1);
            let fetched = handed_in_again_reaches_device_1(&d, id).await;
            assert_eq!(fetched - before, 2, "cut {cut}: noted started");
        }
    });
}

/// The network hands device 1's receipt for `id` in again: it is acted
/// on, and the device gets the message. The bundles fetched by then.
async fn handed_in_again_reaches_device_1(d: &Deployment, id: MessageId) -> usize {
    let again = d.processor.retry_receipt(&d.carrier, d.b, id, 1).await;
    assert!(matches!(again, Ok(StatusChange::Applied)), "{again:?}");
    let fetched = d.transport.bundles_fetched();
    d.network.pump(&d.processor, &d.carrier).await;
    let got = d.network.received(&consumer(2)).await;
    assert!(
        got.get(&1).is_some_and(|g| g.contains_key(&id)),
        "device 1 never got the message: {got:?}"
    );
    fetched
}

/// The control of the test above: failed at its first read, before any
/// bundle.
#[test]
fn a_receipt_failed_before_its_bundle_is_acted_on_when_handed_in_again() {
    runtime().block_on(async {
        let mut d = Deployment::new(Faults::none(), Faults::none()).await;
        let id = delivered_on_lost_sessions(&d).await;
        d.restart();
        let before = d.transport.bundles_fetched();
        d.faults.fail_at(1, Seams::Store, Strike::Before);
        let failed = d.processor.retry_receipt(&d.carrier, d.b, id, 1).await;
        assert!(failed.is_err(), "{failed:?}");
        assert_eq!(d.faults.lift(), [("message", Strike::Before)]);
        let fetched = handed_in_again_reaches_device_1(&d, id).await;
        assert_eq!(fetched - before, 1);
    });
}
