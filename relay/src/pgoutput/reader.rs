//! A bounds-checked cursor over one message.

use bytes::Bytes;

use super::{DecodeError, DecodeErrorKind};
use crate::Lsn;

/// A bounds-checked cursor over one message.
#[derive(Debug)]
pub(super) struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a Bytes) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    pub(super) fn offset(&self) -> usize {
        self.pos
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn rest(&self) -> &'a [u8] {
        let buf: &'a [u8] = self.buf;
        buf.get(self.pos..).unwrap_or_default()
    }

    pub(super) fn error_at(&self, offset: usize, kind: DecodeErrorKind) -> DecodeError {
        DecodeError::new(kind, offset)
    }

    fn end(&self, field: &'static str) -> DecodeError {
        self.error_at(self.pos, DecodeErrorKind::UnexpectedEnd { field })
    }

    /// The next `n` bytes, consumed.
    pub(super) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let taken = self.rest().get(..n).ok_or_else(|| self.end(field))?;
        // `n` bytes lie within the buffer after `pos`: the sum cannot overflow.
        self.pos = self.pos.checked_add(n).ok_or_else(|| self.end(field))?;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let at = self.pos;
        let taken = self.take(N, field)?;
        <[u8; N]>::try_from(taken)
            .map_err(|_| self.error_at(at, DecodeErrorKind::UnexpectedEnd { field }))
    }

    pub(super) fn peek(&self) -> Option<u8> {
        self.rest().first().copied()
    }

    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(u8::from_be_bytes)
    }

    pub(super) fn i16(&mut self, field: &'static str) -> Result<i16, DecodeError> {
        self.array(field).map(i16::from_be_bytes)
    }

    pub(super) fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    pub(super) fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    pub(super) fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        self.array(field).map(|b| Lsn::new(u64::from_be_bytes(b)))
    }

    /// An Int16 count that must not be negative.
    pub(super) fn count(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let value = self.i16(field)?;
        usize::try_from(value).map_err(|_| {
            self.error_at(
                at,
                DecodeErrorKind::NegativeLength {
                    field,
                    value: value.into(),
                },
            )
        })
    }

    /// An Int32 length that must not be negative.
    pub(super) fn length(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let value = self.i32(field)?;
        usize::try_from(value)
            .map_err(|_| self.error_at(at, DecodeErrorKind::NegativeLength { field, value }))
    }

    /// The next `n` bytes as a slice of the input, sharing its storage.
    pub(super) fn bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n, field)?;
        // `take` checked that `start..self.pos` lies within the buffer.
        Ok(self.buf.slice(start..self.pos))
    }

    /// A NUL-terminated UTF-8 string.
    pub(super) fn cstring(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let at = self.pos;
        let len = self
            .rest()
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.error_at(at, DecodeErrorKind::MissingNul { field }))?;
        let text = self.take(len, field)?;
        self.take(1, field)?;
        std::str::from_utf8(text)
            .map(str::to_owned)
            .map_err(|_| self.error_at(at, DecodeErrorKind::InvalidUtf8 { field }))
    }

    /// A tuple marker byte that must be `want`.
    pub(super) fn marker(&mut self, want: u8, expected: &'static str) -> Result<(), DecodeError> {
        let at = self.pos;
        let found = self.u8("tuple marker")?;
        if found == want {
            Ok(())
        } else {
            Err(self.error_at(
                at,
                DecodeErrorKind::UnexpectedTupleMarker { expected, found },
            ))
        }
    }

    /// Succeeds when the whole message has been read.
    pub(super) fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(self.error_at(self.pos, DecodeErrorKind::TrailingBytes(extra))),
        }
    }
}
