//! Where the crate's randomness comes from: the operating system's
//! generator, asked on every draw.
//!
//! Keys, nonces, message ids, the cache's incarnation, every key the
//! Signal library makes, and what a processor draws to tell itself apart
//! (its store writer id, its gate's decision-id instance, its billing take
//! ids and acceptance tokens) come from it; nothing in the crate draws
//! from rand's `ThreadRng`. A generator kept in the process
//! (rand's `ThreadRng`) is copied by a fork, or by a snapshot of its
//! virtual machine restored more than once: workers forked from a parent
//! that had drawn from it, or a worker respawned after one that crashed,
//! would draw the same bytes. That is the same keys for different
//! businesses, the same nonce under one epoch key (with AES-GCM, the
//! plaintexts' XOR, and forgeries), the same message ids. The operating
//! system's generator is not copied (Linux reseeds it when its virtual
//! machine is cloned, if the hypervisor says so).
//!
//! On x86_64 Linux 6.11 and later (aarch64 from 6.12) a draw is a call
//! into the kernel's vDSO (the `vdso-rng` crate), whose per-thread state
//! the kernel wipes on a fork and keys from its own generator, reseeding
//! it as it reseeds that one: randomness as fresh as the system call's, at
//! about 45 ns for a nonce's 12 bytes (120 ns for a key's 32) against the
//! system call's 0.75–1 µs on the reference machine (one draw per sealed
//! record, per outbound message's id, per key the Signal library makes, a
//! ratchet turn making one). Elsewhere, and wherever the vDSO does not
//! offer it, each draw is the system call.
//!
//! What is drawn before a fork is copied all the same: build a processor
//! in the process that uses it, never before a fork. Fork a process that
//! runs other threads only as POSIX allows (the child calls only what is
//! safe after a fork, then `exec`): a fork while another thread takes a
//! vDSO state from the shared pool (its first draw), or hands its state
//! back as it exits, could leave a thread of the child waiting for good at
//! its own first draw.

use std::convert::Infallible;

use rand::rand_core::UnwrapErr;
use rand::rngs::SysRng;
use rand::{Rng, TryCryptoRng, TryRng};

/// The operating system's generator (`getrandom`), asked on every draw. A
/// system that cannot give randomness panics the draw, as rand's own
/// generators do.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct OsRng;

impl OsRng {
    fn fill(dst: &mut [u8]) {
        if !vdso::fill(dst) {
            UnwrapErr(SysRng).fill_bytes(dst);
        }
    }
}

impl TryRng for OsRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut bytes = [0; 4];
        Self::fill(&mut bytes);
        Ok(u32::from_le_bytes(bytes))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut bytes = [0; 8];
        Self::fill(&mut bytes);
        Ok(u64::from_le_bytes(bytes))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        Self::fill(dst);
        Ok(())
    }
}

/// The operating system's generator is a CSPRNG.
impl TryCryptoRng for OsRng {}

/// The kernel's generator through its vDSO, one state per thread.
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod vdso {
    use std::cell::RefCell;
    use std::sync::LazyLock;

    use vdso_rng::{LocalState, Pool};

    /// The states' pages, mapped as the kernel asks (dropped on a fork);
    /// `None` where the vDSO has no generator.
    static POOL: LazyLock<Option<Pool>> = LazyLock::new(|| Pool::new().ok());

    thread_local! {
        static STATE: RefCell<Option<LocalState<'static>>> =
            RefCell::new(POOL.as_ref().and_then(|pool| LocalState::new(pool).ok()));
    }

    /// Fill `dst` from the vDSO; false (`dst` to be filled another way)
    /// where it cannot: no generator there, the thread's state gone (a
    /// draw in a thread-local destructor) or in use (a draw within a
    /// draw), or an error from the kernel.
    pub(super) fn fill(dst: &mut [u8]) -> bool {
        STATE
            .try_with(|state| {
                state.try_borrow_mut().is_ok_and(|mut state| {
                    state
                        .as_mut()
                        .is_some_and(|state| state.fill(dst, 0).is_ok())
                })
            })
            .unwrap_or(false)
    }
}

/// No vDSO generator the crate looks for: every draw is the system call.
#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
mod vdso {
    pub(super) fn fill(_: &mut [u8]) -> bool {
        false
    }
}

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
        assert_ne!(OsRng.next_u32(), OsRng.next_u32());
    }

    /// On a kernel whose vDSO has the generator (x86_64 Linux 6.11 and
    /// later, as the reference machine's), draws come from it, not the
    /// system call.
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    #[test]
    fn draws_come_from_the_vdso_where_it_has_a_generator() {
        if vdso_rng::Pool::new().is_err() {
            return;
        }
        let mut a = [0u8; 32];
        assert!(super::vdso::fill(&mut a));
        assert_ne!(a, [0; 32]);
    }
}
