//! The legal holds as one process sees them: the gate that serialises hold
//! changes with the sweep's deleting steps, and the write of a hold change
//! whose call was dropped unanswered.
//!
//! A hold change is audited before it is written. If its call is dropped
//! while the store writes it, the write may land or not (a SQLite commit
//! lands with no one waiting), and the audit trail already says it was
//! made. So the write is owed: made again (placing and releasing are
//! idempotent) before anything next reads the holds under the gate, and
//! the audit trail stays true. A write the store fails may have landed too
//! (a networked store's answer lost): its caller audits the change undone
//! and writes the undo at once, owed until it lands.

use std::sync::{Mutex, PoisonError};

use crate::store::{Batch, HoldScope, Op, Storage, StoreError};

pub(super) struct HoldGate {
    gate: async_lock::Mutex<()>,
    /// A hold change audited and dropped before the store answered.
    owed: Mutex<Option<Op>>,
}

impl HoldGate {
    pub(super) fn new() -> Self {
        Self {
            gate: async_lock::Mutex::new(()),
            owed: Mutex::new(None),
        }
    }

    /// Take the gate, once any owed hold change is written: the holds read
    /// under it are the ones the audit trail says stand. Fails if the owed
    /// write fails; it stays owed.
    pub(super) async fn lock(
        &self,
        storage: &dyn Storage,
    ) -> Result<async_lock::MutexGuard<'_, ()>, StoreError> {
        let guard = self.gate.lock().await;
        let owed = self
            .owed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(op) = owed {
            self.pay(storage, op).await?;
        }
        Ok(guard)
    }

    /// Write `op`, owed meanwhile: a read of the holds while it is written
    /// waits for the gate, as for any owed write, and does not read the
    /// store before it agrees. No longer owed once written; owed still if
    /// the store fails it. The caller holds the gate.
    pub(super) async fn pay(&self, storage: &dyn Storage, op: Op) -> Result<(), StoreError> {
        self.owe(op.clone());
        self.write(storage, op).await?;
        *self.owed.lock().unwrap_or_else(PoisonError::into_inner) = None;
        Ok(())
    }

    /// Write `op`, a hold change already audited, under the gate. An error
    /// is the caller's to put straight (see [`owe`](Self::owe)); a drop
    /// before the store answers leaves the write owed.
    pub(super) async fn write(&self, storage: &dyn Storage, op: Op) -> Result<(), StoreError> {
        let mut owing = Owing {
            gate: self,
            op: Some(op.clone()),
        };
        let mut batch = Batch::new();
        batch.push(op);
        let written = storage.commit(batch).await;
        owing.op = None;
        written
    }

    /// Owe `op`, made before anything next reads the holds under the gate:
    /// how a caller whose write failed (and may have landed, its answer
    /// lost) makes the store agree with what the audit trail says. The
    /// caller holds the gate.
    pub(super) fn owe(&self, op: Op) {
        *self.owed.lock().unwrap_or_else(PoisonError::into_inner) = Some(op);
    }

    /// The scopes of the holds in force, read from the store once an owed
    /// hold change is written.
    pub(super) async fn scopes(&self, storage: &dyn Storage) -> Result<Vec<HoldScope>, StoreError> {
        let owes = self
            .owed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        let _gate = if owes {
            Some(self.lock(storage).await?)
        } else {
            None
        };
        storage.held_scopes().await
    }
}

/// A hold change under way, until the store answers; dropped before, it
/// leaves the write owed.
struct Owing<'a> {
    gate: &'a HoldGate,
    op: Option<Op>,
}

impl Drop for Owing<'_> {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            *self
                .gate
                .owed
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(op);
        }
    }
}
