//! A borrowed reader over the input: every read names the field it is for,
//! so a short input reports exactly where it ended.

use super::{EnvelopeError, Field};

pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// The next `n` bytes, or `Truncated { field }`.
    pub(super) fn take(&mut self, n: usize, field: Field) -> Result<&'a [u8], EnvelopeError> {
        let rest = &self.buf[self.pos..];
        if rest.len() < n {
            return Err(EnvelopeError::Truncated(field));
        }
        self.pos += n;
        Ok(&rest[..n])
    }

    pub(super) fn array<const N: usize>(&mut self, field: Field) -> Result<[u8; N], EnvelopeError> {
        let bytes = self.take(N, field)?;
        // `take` returned exactly N bytes.
        bytes
            .try_into()
            .map_err(|_| EnvelopeError::Truncated(field))
    }

    pub(super) fn u8(&mut self, field: Field) -> Result<u8, EnvelopeError> {
        self.array::<1>(field).map(|[b]| b)
    }

    pub(super) fn u32(&mut self, field: Field) -> Result<u32, EnvelopeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    pub(super) fn u64(&mut self, field: Field) -> Result<u64, EnvelopeError> {
        self.array(field).map(u64::from_be_bytes)
    }

    /// Bytes consumed so far.
    pub(super) fn consumed(&self) -> &'a [u8] {
        &self.buf[..self.pos]
    }

    /// Succeed only if the input is used up.
    pub(super) fn finish(self) -> Result<(), EnvelopeError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            extra => Err(EnvelopeError::TrailingBytes(extra)),
        }
    }
}
