//! The legal holds as one process sees them: the gate that serialises hold
//! changes with the sweep's deleting steps, the holds last read, and the
//! write of a hold change whose call was dropped unanswered.
//!
//! A hold change is audited before it is written. If its call is dropped
//! while the store writes it, the write may land or not (a SQLite commit
//! lands with no one waiting), and the audit trail already says it was
//! made. So the write is owed: made again (placing and releasing are
//! idempotent) before anything next reads the holds under the gate, and
//! the audit trail stays true. A write the store fails may have landed too
//! (a networked store's answer lost): its caller audits the change undone
//! and owes the write that undoes it.

use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::store::{Batch, HoldScope, Op, Storage, StoreError};

pub(super) struct HoldGate {
    gate: async_lock::Mutex<()>,
    /// A hold change audited and dropped before the store answered.
    owed: Mutex<Option<Op>>,
    /// The holds in force, as last read by this instance.
    scopes: RwLock<Scopes>,
}

/// The holds last read, and how many hold changes this instance has seen:
/// a read that a change overtook is not kept.
#[derive(Default)]
struct Scopes {
    changes: u64,
    read: Option<Arc<[HoldScope]>>,
}

impl HoldGate {
    pub(super) fn new() -> Self {
        Self {
            gate: async_lock::Mutex::new(()),
            owed: Mutex::new(None),
            scopes: RwLock::default(),
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
            .take();
        if let Some(op) = owed
            && let Err(e) = self.write(storage, op.clone()).await
        {
            *self.owed.lock().unwrap_or_else(PoisonError::into_inner) = Some(op);
            return Err(e);
        }
        Ok(guard)
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
        self.forget_scopes();
        written
    }

    /// Owe `op`, made before anything next reads the holds under the gate:
    /// how a caller whose write failed (and may have landed, its answer
    /// lost) makes the store agree with what the audit trail says. The
    /// caller holds the gate.
    pub(super) fn owe(&self, op: Op) {
        *self.owed.lock().unwrap_or_else(PoisonError::into_inner) = Some(op);
        self.forget_scopes();
    }

    /// The scopes of the holds in force, read once and then kept until a
    /// hold changes. An owed hold change is written first.
    pub(super) async fn scopes(
        &self,
        storage: &dyn Storage,
    ) -> Result<Arc<[HoldScope]>, StoreError> {
        let mut changes = match self.kept() {
            Ok(scopes) => return Ok(scopes),
            Err(changes) => changes,
        };
        let owes = self
            .owed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        let _gate = if owes {
            let gate = self.lock(storage).await?;
            match self.kept() {
                Ok(scopes) => return Ok(scopes),
                Err(now) => changes = now,
            }
            Some(gate)
        } else {
            None
        };
        let scopes: Arc<[HoldScope]> = storage.held_scopes().await?.into();
        let mut kept = self.scopes.write().unwrap_or_else(PoisonError::into_inner);
        // A change written while the store was read may be missing from it.
        if kept.changes == changes {
            kept.read = Some(scopes.clone());
        }
        Ok(scopes)
    }

    /// The holds kept from the last read, or how many changes were seen.
    fn kept(&self) -> Result<Arc<[HoldScope]>, u64> {
        let kept = self.scopes.read().unwrap_or_else(PoisonError::into_inner);
        kept.read.clone().ok_or(kept.changes)
    }

    fn forget_scopes(&self) {
        let mut kept = self.scopes.write().unwrap_or_else(PoisonError::into_inner);
        kept.changes += 1;
        kept.read = None;
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
            self.gate.forget_scopes();
        }
    }
}
