//! The randomness handed to the Signal library.

use std::convert::Infallible;

use rand::{Rng, TryCryptoRng, TryRng};

/// The thread-local CSPRNG (`rand::rng()`: ChaCha12, reseeded from the OS),
/// reached afresh on every call. The handle itself holds nothing, so it is
/// `Send` and may live across an `.await` where `ThreadRng` may not.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ThreadCsprng;

impl TryRng for ThreadCsprng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(rand::rng().next_u32())
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(rand::rng().next_u64())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        rand::rng().fill_bytes(dst);
        Ok(())
    }
}

/// ThreadRng is a CSPRNG, and so is every handle to it.
impl TryCryptoRng for ThreadCsprng {}
