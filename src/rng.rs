//! Where the crate's randomness comes from: the operating system's
//! generator, asked on every draw.
//!
//! Keys, nonces, message ids, the cache's incarnation and every key the
//! Signal library makes come from it. A generator kept in the process
//! (rand's `ThreadRng`) is copied by a fork, or by a snapshot of its
//! virtual machine restored more than once: workers forked from a parent
//! that had drawn from it, or a worker respawned after one that crashed,
//! would draw the same bytes. That is the same keys for different
//! businesses, the same nonce under one epoch key (with AES-GCM, the
//! plaintexts' XOR, and forgeries), the same message ids. The operating
//! system's generator is not copied (Linux reseeds it when its virtual
//! machine is cloned, if the hypervisor says so). Each draw is a system
//! call: one per sealed record, per outbound message's id, per key the
//! Signal library makes (a ratchet turn makes one).
//!
//! What is drawn before a fork is copied all the same: build a processor
//! in the process that uses it, never before a fork.

use std::convert::Infallible;

use rand::rand_core::UnwrapErr;
use rand::rngs::SysRng;
use rand::{Rng, TryCryptoRng, TryRng};

/// The operating system's generator (`getrandom`), asked on every draw. A
/// system that cannot give randomness panics the draw, as rand's own
/// generators do.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct OsRng;

impl TryRng for OsRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(UnwrapErr(SysRng).next_u32())
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(UnwrapErr(SysRng).next_u64())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        UnwrapErr(SysRng).fill_bytes(dst);
        Ok(())
    }
}

/// The operating system's generator is a CSPRNG.
impl TryCryptoRng for OsRng {}

#[cfg(test)]
mod tests {
    use super::OsRng;
    use rand::Rng;

    #[test]
    fn draws_differ() {
        let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
        OsRng.fill_bytes(&mut a);
        OsRng.fill_bytes(&mut b);
        assert_ne!(a, b);
        assert_ne!(OsRng.next_u64(), OsRng.next_u64());
    }
}
