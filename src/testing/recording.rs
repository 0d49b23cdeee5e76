//! A transport that accepts every send and keeps it.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;

use crate::ids::{BusinessId, MessageId, PhoneNumber};
use crate::integrity::{BillingStatement, IntegrityReport};
use crate::signal::{Ciphertext, PreKeyBundle, PublishedKeys};
use crate::transport::{Outgoing, Transport, TransportError};

/// A [`Transport`] for harnesses and benchmarks that drive consumer devices
/// themselves: every consumer has one device (0), every send is accepted and
/// kept for the harness to hand to the device, the published keys are kept,
/// there is no bundle to fetch (start each device's session from
/// [`published`](Self::published) keys before the processor sends to it),
/// and no device to ask for a message again
/// ([`ask_resend`](Transport::ask_resend) is refused). Integrity reports
/// and billing statements are taken and dropped: the processor counts
/// them handed over, so a harness that checks them needs
/// [`SimNetwork`](super::SimNetwork), which keeps them.
/// No faults, no delays: for those, [`SimNetwork`](super::SimNetwork).
///
/// It serves one business: what it keeps is keyed by consumer number
/// alone, and the keys are the last published. Give each business of a
/// harness its own (or use [`SimNetwork`](super::SimNetwork)), or a
/// ciphertext cannot be told apart from another business's.
#[derive(Default)]
pub struct RecordingTransport {
    keys: Mutex<Option<PublishedKeys>>,
    sent: Mutex<HashMap<PhoneNumber, Vec<Ciphertext>>>,
}

impl std::fmt::Debug for RecordingTransport {
    /// Counts only: the map is keyed by consumers' numbers.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("RecordingTransport")
            .field("consumers", &sent.len())
            .field("ciphertexts", &sent.values().map(Vec::len).sum::<usize>())
            .finish_non_exhaustive()
    }
}

impl RecordingTransport {
    /// An empty transport.
    pub fn new() -> Self {
        Self::default()
    }

    /// The keys the processor published last.
    pub fn published(&self) -> Option<PublishedKeys> {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Take what the processor sent since the last call, per consumer, in
    /// the order sent. The consumers come in no set order (a hash map):
    /// a harness that must replay a run the same way visits them sorted.
    pub fn take_sent(&self) -> HashMap<PhoneNumber, Vec<Ciphertext>> {
        std::mem::take(&mut *self.sent.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[async_trait]
impl Transport for RecordingTransport {
    async fn devices(&self, _: BusinessId, _: &PhoneNumber) -> Result<Vec<u32>, TransportError> {
        Ok(vec![0])
    }

    async fn fetch_bundle(
        &self,
        _: BusinessId,
        _: &PhoneNumber,
        _: u32,
    ) -> Result<PreKeyBundle, TransportError> {
        Err(TransportError::Refused(
            "a recording transport has no bundles: start sessions from the published keys".into(),
        ))
    }

    async fn send(
        &self,
        _: BusinessId,
        consumer: &PhoneNumber,
        _: u32,
        message: &Outgoing,
    ) -> Result<(), TransportError> {
        let mut sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        let ciphertext = message.ciphertext.clone();
        // The consumer's key is copied only the first time.
        match sent.get_mut(consumer) {
            Some(list) => list.push(ciphertext),
            None => {
                sent.insert(consumer.clone(), vec![ciphertext]);
            }
        }
        Ok(())
    }

    async fn ask_resend(
        &self,
        _: BusinessId,
        _: &PhoneNumber,
        _: u32,
        _: MessageId,
        _: &Ciphertext,
    ) -> Result<(), TransportError> {
        Err(TransportError::Refused(
            "a recording transport asks no device for anything: the harness drives them".into(),
        ))
    }

    async fn publish_keys(
        &self,
        _: BusinessId,
        keys: &PublishedKeys,
    ) -> Result<(), TransportError> {
        *self.keys.lock().unwrap_or_else(PoisonError::into_inner) = Some(keys.clone());
        Ok(())
    }

    async fn integrity_signals(&self, _: &IntegrityReport) -> Result<(), TransportError> {
        Ok(())
    }

    async fn billing(&self, _: &BillingStatement) -> Result<(), TransportError> {
        Ok(())
    }
}
