//! Message records: a message's body sealed into a new record, and opened
//! again only if the envelope is the one sealed for that very record.

use tracing::debug;
use zeroize::Zeroizing;

use super::payload::StoredBody;
use super::{Processor, ProcessorError};
use crate::envelope::{Kind, Label, SealError};
use crate::ids::{BusinessId, MessageId, PhoneHash};
use crate::store::{Delivery, Direction, MessageRecord};
use crate::time::Timestamp;
use crate::vault::OpenError;

/// The envelope kind of a message record in `direction`.
fn message_kind(direction: Direction) -> Kind {
    match direction {
        Direction::Inbound => Kind::InboundMessage,
        Direction::Outbound => Kind::OutboundMessage,
    }
}

/// What a stored message's record holds, as far as it can be handed on.
pub(super) enum Stored<T> {
    /// Its content.
    Content(T),
    /// It expired since it was found readable.
    Expired,
    /// Nothing, ever: damaged, its key gone, or another record's envelope.
    Unreadable,
}

/// What tells the write storing a record from any other write of its id:
/// its envelope's last 16 bytes (the AEAD tag), which no two seals repeat.
#[derive(Clone, Copy)]
pub(super) struct SealTag([u8; 16]);

impl SealTag {
    /// The tag of `record`, about to be written.
    pub(super) fn of(record: &MessageRecord) -> Self {
        Self(record.sealed.last_chunk().copied().unwrap_or_default())
    }

    /// Whether `stored` is the record that write stored.
    pub(super) fn wrote(self, stored: &MessageRecord) -> bool {
        stored.sealed.ends_with(&self.0)
    }
}

impl Processor {
    pub(super) fn open_label(&self, record: &MessageRecord) -> Label {
        Label {
            kind: message_kind(record.direction),
            business: record.business,
            id: record.id,
            expiry: record.expiry,
            region: self.storage.region(),
        }
    }

    /// Seal `body` as a new message record of `business`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn seal_record(
        &self,
        business: BusinessId,
        id: MessageId,
        direction: Direction,
        phone: PhoneHash,
        now: Timestamp,
        expiry: Timestamp,
        body: &[u8],
    ) -> Result<MessageRecord, ProcessorError> {
        let mut record = MessageRecord {
            business,
            id,
            direction,
            phone,
            created: now,
            expiry,
            epoch: self
                .vault
                .epoch_of(expiry)
                .ok_or(SealError::ExpiryOutOfRange(expiry))?,
            // Due at once: if the first attempt never happens (a crash), the
            // retransmission loop makes it.
            delivery: Delivery::queued(now),
            sealed: Vec::new(),
        };
        let label = self.open_label(&record);
        record.sealed = self.vault.seal(&label, body).await?;
        Ok(record)
    }

    /// The content sealed for the stored message `record`, if its envelope
    /// opens and is the one sealed for this very record (its business, id
    /// and direction) in this store's region, so that no damaged or
    /// misplaced row is handed on under another message's id, nor a record
    /// sealed for another region read here. A failure that may pass (the
    /// key hierarchy unavailable) is an error.
    pub(super) async fn open_message(
        &self,
        record: &MessageRecord,
    ) -> Result<Stored<Zeroizing<Vec<u8>>>, ProcessorError> {
        match self.vault.open(&record.sealed, record.business).await {
            Ok(opened) => {
                let label = opened.label();
                Ok(
                    if label.id != record.id || label.kind != message_kind(record.direction) {
                        debug!(business = %record.business, id = %record.id, "a stored message holds another record's envelope");
                        Stored::Unreadable
                    } else if label.region != self.storage.region() {
                        debug!(business = %record.business, id = %record.id, "a stored message was sealed for another region");
                        Stored::Unreadable
                    } else {
                        Stored::Content(opened.plaintext)
                    },
                )
            }
            Err(OpenError::Expired { .. }) => Ok(Stored::Expired),
            Err(OpenError::Key(e)) => Err(e.into()),
            Err(e) => {
                debug!(business = %record.business, id = %record.id, error = %e, "a stored message cannot be opened");
                Ok(Stored::Unreadable)
            }
        }
    }

    /// The body of due `record`: opened, decoded, and naming the consumer
    /// whose phone hash the row holds (the row's hash is what that
    /// consumer's Signal state is found by, so a row edited to another
    /// consumer's hash is unreadable, not sent under the other's session).
    pub(super) async fn due_body(
        &self,
        record: &MessageRecord,
    ) -> Result<Stored<StoredBody>, ProcessorError> {
        let plaintext = match self.open_message(record).await? {
            Stored::Content(plaintext) => plaintext,
            Stored::Expired => return Ok(Stored::Expired),
            Stored::Unreadable => return Ok(Stored::Unreadable),
        };
        let Ok(body) = StoredBody::decode(record.direction, &plaintext) else {
            debug!(business = %record.business, id = %record.id, "a stored message's body does not decode");
            return Ok(Stored::Unreadable);
        };
        if self
            .keys
            .phone_hash(record.business, body.consumer())
            .await?
            != record.phone
        {
            debug!(business = %record.business, id = %record.id, "a stored message's row names another consumer");
            return Ok(Stored::Unreadable);
        }
        Ok(Stored::Content(body))
    }
}
