//! Hooks for fuzz targets and fixture-driven tests, built only with
//! `--cfg fuzzing` (which `cargo fuzz` sets) or in the crate's own tests.
//!
//! They reach the pure envelope layer with known epoch keys, so a fuzzer can
//! drive parsing and opening without a key store. Nothing here exists in a
//! normal build.

use sha2::{Digest, Sha256};

use crate::envelope::{self, Envelope, Label, SealError};
use crate::ids::BusinessId;
use crate::keys::{Epoch, EpochKey, SecretKey};

/// The fixture key of `business`'s `epoch`: SHA-256 over a label, the
/// business id and the epoch's end. The named corpus is sealed under these.
pub fn fixture_epoch_key(business: BusinessId, epoch: Epoch) -> EpochKey {
    EpochKey::new(business, epoch, &fixture_epoch_secret(business, epoch))
}

/// The bytes of [`fixture_epoch_key`], for installing into a key store.
pub fn fixture_epoch_secret(business: BusinessId, epoch: Epoch) -> SecretKey {
    let mut h = Sha256::new();
    h.update(b"custodian/fixture/epoch-key");
    h.update(business.get().to_be_bytes());
    h.update(epoch.end().as_millis().to_be_bytes());
    let mut bytes: [u8; 32] = h.finalize().into();
    SecretKey::from_bytes(&mut bytes)
}

/// Seal with a caller-chosen nonce (never do this outside fixtures).
pub fn seal_with_nonce(
    key: &EpochKey,
    label: &Label,
    nonce: &[u8; 12],
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    envelope::seal_with_nonce(key, label, nonce, plaintext)
}

/// Open a parsed envelope with `key`; `None` on any authentication failure.
pub fn open_with_key(envelope: &Envelope<'_>, key: &EpochKey) -> Option<Vec<u8>> {
    envelope.open(key).ok()
}
