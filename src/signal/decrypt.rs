//! Inbound: a message decrypted against a device's state, its changes
//! staged and committed (with whatever the caller stores beside them) only
//! if the caller goes on.

use std::sync::Mutex;
use std::time::Duration;

use wacore_libsignal::protocol::consts::MAX_FORWARD_JUMPS;
use wacore_libsignal::protocol::{
    CiphertextMessage, PublicKey, SessionState, UsePQRatchet, message_decrypt,
};
use zeroize::Zeroizing;

use super::cache::Taken;
use super::peer::{Peer, RECEIVE_WINDOW};
use super::stores::{PreKeyHold, PreKeyOverlay, SignedPreKeyOverlay};
use super::{
    Ciphertext, Decrypted, Parsed, Sessions, SignalError, StorageFailure, TOO_FAR, corrupt_session,
    message_id, protocol_error, same_key,
};
use crate::ids::{BusinessId, MessageId};
use crate::keys::{KeyId, KeyKind};
use crate::rng::OsRng;
use crate::store::{Batch, Op, PeerId, StoreError};
use crate::time::Timestamp;

/// How much later than its stored copy's a session's expiry may be while
/// receives are written behind: a stored copy outdated by a crash expires
/// at most this much sooner than the one lost.
const RECEIVE_LAG: Duration = Duration::from_secs(3600);

/// A decrypted message whose state changes are staged but not committed
/// (see [`Sessions::decrypt_staged`]). It holds the device's address lock.
pub(crate) struct StagedDecrypt<'a> {
    sessions: &'a Sessions,
    business: BusinessId,
    peer: PeerId,
    /// The committed state, out of the cache until the commit puts the new
    /// state back; dropped uncommitted, it is forgotten.
    state: (Box<Peer>, Taken<'a>),
    consumed: Option<u32>,
    /// The one-time prekey loaded, held until the commit: no refill makes
    /// its id again meanwhile (see `PreKeysInUse`).
    prekey: Option<PreKeyHold<'a>>,
    /// The message's [`Parsed::id`].
    id: MessageId,
    /// Its [`Parsed::header_id`]: sent again on request, it is known by
    /// that id too.
    header: Option<MessageId>,
    /// The library wrote the device's identity.
    identity_written: bool,
    /// The message's receiving chain and the index it left it at, if it is
    /// a chain of the current session.
    chain: Option<(PublicKey, u32)>,
    /// The message was the next on its chain of the session in use: the
    /// decrypt derived nothing but the next keys, as a decrypt from the
    /// stored copy would again.
    in_order: bool,
    expiry: Timestamp,
    decrypted: Decrypted,
    /// The device's address lock, held until the commit.
    guard: crate::lock::KeyedGuard<'a, (BusinessId, PeerId)>,
}

impl StagedDecrypt<'_> {
    /// The decrypted message.
    pub(crate) fn decrypted(&self) -> &Decrypted {
        &self.decrypted
    }

    /// Commit the staged session change, the consumed prekey's deletion and
    /// `extra`, atomically; return the decrypted message. The device's
    /// address lock is released before the one-time prekey pool is
    /// refilled, which is best effort: the message is committed whatever
    /// the refill does.
    pub(crate) async fn commit(self, extra: Batch) -> Result<Decrypted, SignalError> {
        self.commit_as(extra, false).await
    }

    /// Commit as [`commit`](Self::commit) does, `extra` storing the message
    /// under its [`Parsed::id`] (and, sent again on request, known by its
    /// [`Parsed::header_id`] too: the id a replay of its bytes gives). A
    /// stored id is never stored again, so the store refuses a replay
    /// whatever the session's state: a plain step along a receiving chain
    /// may then be written behind (see the cache module). A replay fails
    /// with [`StoreError::Conflict`].
    pub(crate) async fn commit_stored(self, extra: Batch) -> Result<Decrypted, SignalError> {
        self.commit_as(extra, true).await
    }

    async fn commit_as(self, mut extra: Batch, stored: bool) -> Result<Decrypted, SignalError> {
        // `guard` first: bindings drop in reverse order, so if this future is
        // dropped, the device's state is forgotten (`taken`) before its
        // address lock lets the next operation load it.
        let StagedDecrypt {
            guard,
            sessions: s,
            business,
            peer,
            state: (mut state, taken),
            consumed,
            prekey,
            id,
            header,
            identity_written,
            chain,
            in_order,
            expiry,
            decrypted,
        } = self;
        if let Some(id) = consumed {
            extra.push(Op::ConsumeKey(KeyId {
                business,
                kind: KeyKind::SignalPreKey,
                id: u64::from(id),
            }));
        }
        let committed = if stored
            && in_order
            && consumed.is_none()
            && !identity_written
            && s.may_write_behind(&state, chain.as_ref(), expiry)
        {
            state.expiry = state.expiry.max(expiry);
            s.commit(extra)
                .await
                .map(|()| taken.put(state))
                .map_err(Into::into)
        } else {
            // Persisted up to the chain's index: the receives that follow
            // on it may be written behind, one window's worth.
            state.behind =
                chain.map(|(chain, index)| (chain, index.saturating_add(RECEIVE_WINDOW)));
            s.commit_peer(business, peer, (state, taken), expiry, extra)
                .await
        };
        match committed {
            Ok(()) => {}
            // The message is stored already (a replay), or its one-time
            // prekey is gone since it was loaded: another first message (the
            // network handed the key out twice) consumed it, or a refill
            // retired it, while this one decrypted. Then it is refused as
            // one on a key already gone is, its device to be asked for it
            // again over a new session, not refused for good.
            Err(SignalError::Storage(StorageFailure::Store(e)))
                if matches!(*e, StoreError::Conflict) =>
            {
                if stored {
                    for id in std::iter::once(id).chain(header) {
                        if s.store.message(business, id).await?.is_some() {
                            return Err(SignalError::DuplicateMessage);
                        }
                    }
                }
                return Err(if consumed.is_some() {
                    SignalError::UnknownPreKey("one-time prekey")
                } else {
                    SignalError::InvalidMessage("the store refused the session's change")
                });
            }
            Err(e) => return Err(e),
        }
        drop(prekey);
        drop(guard);
        // Boxed: only first-contact messages refill.
        if consumed.is_some()
            && let Err(e) = Box::pin(s.replenish_if_low(business)).await
        {
            tracing::warn!(%business, error = %e, "could not refill the one-time prekey pool");
        }
        Ok(decrypted)
    }
}

impl Sessions {
    /// Decrypt `message` from `peer` on behalf of `business`. On success the
    /// session advances, a consumed one-time prekey is deleted and the peer's
    /// state is kept until at least `expiry` (the message's own expiry), all
    /// in one commit; on any failure nothing changes.
    pub async fn decrypt(
        &self,
        business: BusinessId,
        peer: PeerId,
        message: &Ciphertext,
        expiry: Timestamp,
    ) -> Result<Decrypted, SignalError> {
        self.decrypt_staged(business, peer, &Parsed::new(message, business)?, expiry)
            .await?
            .commit(Batch::new())
            .await
    }

    /// Whether a receive that stores its message, by `expiry`, may leave
    /// `state`'s advance to `chain` (its receiving chain and new index)
    /// unpersisted. It must stay within the window persisted last on that
    /// chain, so a stored copy outdated by a crash is only ever unsure of
    /// one window's counters ([`Peer::unsure`]); the copy must expire no
    /// later than the message (and at most [`RECEIVE_LAG`] sooner), so no
    /// copy outlives a stored message that it would take for new; and no
    /// send may be waiting on a persisted lease, nor the record's epoch move.
    fn may_write_behind(
        &self,
        state: &Peer,
        chain: Option<&(PublicKey, u32)>,
        expiry: Timestamp,
    ) -> bool {
        let (Some((chain, index)), Some((window, end))) = (chain, state.behind.as_ref()) else {
            return false;
        };
        same_key(chain, window)
            && index <= end
            && !state
                .session
                .as_ref()
                .is_some_and(|s| s.has_pending_reservation())
            && state.sealed_expiry <= expiry
            && expiry <= state.sealed_expiry.saturating_add(RECEIVE_LAG)
            && state.key.as_ref().map(|k| k.epoch())
                == self.vault.epoch_of(state.expiry.max(expiry))
    }

    /// Before `state` is persisted: settle every counter it is still unsure
    /// of (see [`settle_unsure`](Self::settle_unsure)), on every receiving
    /// chain. The new snapshot may outlive the stored messages that now
    /// tell which counters a receive written behind had consumed (its
    /// expiry is raised by the operation persisting it), so each chain is
    /// moved past the last counter with a stored message, keeping the keys
    /// of the counters skipped without one. The messages are still stored:
    /// they expire no sooner than the snapshot loaded.
    ///
    /// The session those chains are on was current when loaded, but the
    /// operation may have archived it (a first-contact message or a bundle
    /// starting another session, a message of an older one): it is settled
    /// where it is, as an archived session decrypts a replay all the same.
    pub(super) async fn settle_left_unsure(
        &self,
        business: BusinessId,
        state: &mut Peer,
    ) -> Result<(), SignalError> {
        for unsure in std::mem::take(&mut state.unsure) {
            let stored = self
                .stored_counters(business, &unsure.chain, unsure.next..unsure.end)
                .await?;
            if stored.is_empty() {
                continue;
            }
            let Some(record) = state.session.as_mut() else {
                continue;
            };
            if let Some(session) = record.session_state_mut()
                && settle_chain(session, &unsure.chain, &stored)?
            {
                continue;
            }
            for index in 0..record.previous_session_count() {
                let Some(mut archived) = record.take_previous_session(index) else {
                    break;
                };
                let settled = settle_chain(&mut archived, &unsure.chain, &stored);
                record.restore_previous_session(index, archived);
                if settled? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// The counters in `counters` of receiving chain `chain` whose message
    /// is stored, ascending.
    async fn stored_counters(
        &self,
        business: BusinessId,
        chain: &PublicKey,
        counters: std::ops::Range<u32>,
    ) -> Result<Vec<u32>, SignalError> {
        let mut stored = Vec::new();
        for counter in counters {
            let id = message_id(business, chain, counter);
            if self.store.message(business, id).await?.is_some() {
                stored.push(counter);
            }
        }
        Ok(stored)
    }

    /// Which of `state`'s unsure counters on `chain` below `counter` a
    /// receive written behind had consumed, now that a message at `counter`
    /// was decrypted: their keys, just kept for messages still to come, are
    /// dropped, so a replay of one does not decrypt once its stored copy is
    /// gone. Every counter below `counter` is then sure.
    async fn settle_unsure(
        &self,
        business: BusinessId,
        state: &mut Peer,
        chain: &PublicKey,
        counter: u32,
    ) -> Result<(), SignalError> {
        let Some(at) = state.unsure.iter().position(|u| same_key(&u.chain, chain)) else {
            return Ok(());
        };
        let unsure = state.unsure[at];
        if counter < unsure.next {
            return Ok(());
        }
        let stored = self
            .stored_counters(business, chain, unsure.next..counter.min(unsure.end))
            .await?;
        if let Some(session) = state.session.as_mut().and_then(|s| s.session_state_mut()) {
            for earlier in stored {
                session
                    .get_message_keys(chain, earlier)
                    .map_err(corrupt_session)?;
            }
        }
        if counter.saturating_add(1) < unsure.end {
            state.unsure[at].next = counter + 1;
        } else {
            state.unsure.swap_remove(at);
        }
        Ok(())
    }

    /// Decrypt `message` but commit nothing yet: the result holds the
    /// device's address lock and the staged writes, and its
    /// [`commit`](StagedDecrypt::commit) adds the caller's own writes (the
    /// message itself) to the same atomic batch. Dropping it changes nothing.
    pub(crate) async fn decrypt_staged(
        &self,
        business: BusinessId,
        peer: PeerId,
        message: &Parsed,
        expiry: Timestamp,
    ) -> Result<StagedDecrypt<'_>, SignalError> {
        let first = matches!(message.message, CiphertextMessage::PreKeySignalMessage(_));
        let account = self.existing_account(business).await?;
        let guard = self.address_locks.lock((business, peer)).await;
        let (mut state, taken) = self.load_peer(business, peer).await?;
        // A first-contact message on an existing session resends its setup;
        // one that changes the session's base key starts a new session.
        type Record = wacore_libsignal::protocol::SessionRecord;
        // The index of the message's receiving chain in the session in use.
        let chain_index = |session: Option<&Record>| {
            let chain = session?
                .session_state()?
                .get_receiver_chain_key(&message.chain);
            chain.ok()?.map(|k| k.index())
        };
        let index = chain_index(state.session.as_ref());
        // Whether it could be the next message on that chain.
        let next = !first && index == Some(message.counter);
        // The base key naming the session in use (a key of another length
        // names none, so no session counts as kept), where the decrypt may
        // change that session and it matters: a first-contact message may
        // start a new one, and the next message must not have used another.
        let base_key = |session: Option<&Record>| -> Option<[u8; PublicKey::SERIALIZED_KEY_LEN]> {
            session?.session_state()?.alice_base_key().try_into().ok()
        };
        let base_before = (first || next).then(|| base_key(state.session.as_ref()));
        let (mut sessions, mut identities) = self.overlays(account.clone(), &mut state);
        let mut prekeys = PreKeyOverlay {
            keys: self.vault.keys(),
            business,
            consumed: None,
            failure: Mutex::new(None),
            in_use: &self.prekeys_in_use,
            held: Mutex::new(None),
        };
        let signed = SignedPreKeyOverlay {
            account,
            now: self.now(),
            grace: self.config.signed_prekey_grace,
        };
        // Not boxed on its own, though the library's future is large (about
        // 2 KiB): a heap block that size takes glibc's slow path, which
        // first consolidates its free lists, on every message. It rides in
        // the one box `Processor::receive` makes; carried inline, an
        // inbound burst ran about 3% faster.
        let result = message_decrypt(
            &message.message,
            &state.address,
            &mut sessions,
            &mut identities,
            &mut prekeys,
            &signed,
            &mut OsRng,
            UsePQRatchet::No,
        )
        .await;
        let decrypted = match result {
            Ok(decrypted) => decrypted,
            Err(e) => {
                Self::restore((state, taken), sessions, &identities);
                // The library tries every session it keeps, and answers
                // "decryption failed" whatever stopped each: a counter too
                // far ahead is told as such (a chain the session does not
                // have yet starts at 0), and is undecryptable all the same:
                // past the keys the library derives, or on a session the
                // business no longer holds (which it cannot tell apart:
                // both are a chain the session does not have), the device
                // is asked for it again over a new session, as a client
                // asks for any message it cannot decrypt. A precise refusal
                // (no session, an unknown prekey, an untrusted identity, a
                // store's failure) stands.
                let error = protocol_error(e, prekeys.take_failure(), identities.refused());
                let jump = usize::try_from(message.counter.saturating_sub(index.unwrap_or(0)));
                if matches!(error, SignalError::Undecryptable("decryption failed"))
                    && jump.is_ok_and(|jump| jump > MAX_FORWARD_JUMPS)
                {
                    return Err(SignalError::Undecryptable(TOO_FAR));
                }
                return Err(error);
            }
        };
        let consumed = decrypted
            .consumed_prekey_id
            .map(u32::from)
            .or(prekeys.consumed);
        // Wiped however this ends: a refusal below, a store error or the
        // future dropped at the await.
        let plaintext = Zeroizing::new(decrypted.plaintext);
        state.session = sessions.into_record();
        state.identity = identities.peer;
        // A first-contact message that repeats the setup of a session it
        // matches is decrypted under that session, not with the identity
        // key it carries, which the library then trusts: anyone could swap
        // their own in. It must be the key the session was set up with.
        if let CiphertextMessage::PreKeySignalMessage(m) = &message.message {
            let session_identity = state
                .session
                .as_ref()
                .and_then(|s| s.session_state())
                .and_then(|s| s.remote_identity_key().ok().flatten());
            if !session_identity
                .is_some_and(|k| same_key(k.public_key(), m.identity_key().public_key()))
            {
                return Err(SignalError::InvalidMessage(
                    "identity key other than the session's",
                ));
            }
        }
        let same_session = matches!(base_before, Some(Some(before))
            if base_key(state.session.as_ref()) == Some(before));
        let first_contact = first && !same_session;
        let index_after = chain_index(state.session.as_ref());
        let in_order =
            next && same_session && index_after == Some(message.counter.saturating_add(1));
        self.settle_unsure(business, &mut state, &message.chain, message.counter)
            .await?;
        Ok(StagedDecrypt {
            sessions: self,
            business,
            peer,
            state: (state, taken),
            consumed,
            prekey: prekeys.take_hold(),
            id: message.id(),
            header: message.header_id(),
            identity_written: identities.written,
            chain: index_after.map(|index| (message.chain, index)),
            in_order,
            expiry,
            decrypted: Decrypted {
                plaintext,
                // What the trusted identity did, not what the library
                // reports: a message under an archived session brings back
                // its older identity, which the library calls no change.
                identity_changed: identities.replaced,
                first_contact,
            },
            guard,
        })
    }
}

/// Settle `chain`'s counters of `session`, if it has that receiving chain
/// (whether it did is returned): its keys for the counters in `stored`
/// (ascending, not empty), whose messages a receive written behind
/// consumed, are dropped, and the chain moves past the last of them,
/// keeping the keys of the counters it skips without a stored message.
fn settle_chain(
    session: &mut SessionState,
    chain: &PublicKey,
    stored: &[u32],
) -> Result<bool, SignalError> {
    let Some(mut key) = session
        .get_receiver_chain_key(chain)
        .map_err(corrupt_session)?
    else {
        return Ok(false);
    };
    let Some(&last) = stored.last() else {
        return Ok(true);
    };
    for &counter in stored.iter().filter(|&&c| c < key.index()) {
        session
            .get_message_keys(chain, counter)
            .map_err(corrupt_session)?;
    }
    while key.index() <= last {
        let (keys, next) = key.step_with_message_keys().map_err(corrupt_session)?;
        if !stored.contains(&key.index()) {
            session
                .set_message_keys(chain, keys)
                .map_err(corrupt_session)?;
        }
        key = next;
    }
    session
        .set_receiver_chain_key(chain, &key)
        .map_err(corrupt_session)?;
    Ok(true)
}
