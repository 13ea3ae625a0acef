//! The messages of streamed in-progress transactions (protocol version 2, with the
//! `streaming` option on, PostgreSQL 14 and later).
//!
//! Once a transaction outgrows the server's `logical_decoding_work_mem`, the server
//! sends its changes so far in a block:
//!
//! ```text
//!   Stream Start (xid, first segment?)
//!     Relation / Type / Insert / Update / Delete / Truncate / Message   each with the
//!     (sub)transaction's xid right after the tag; Origin without
//!   Stream Stop
//! ```
//!
//! Blocks of several transactions, and whole ordinary transactions (Begin..Commit),
//! follow each other in any order; a block is never interrupted. The transaction
//! ends outside any block with a Stream Commit (in commit order among all
//! commits) or a Stream Abort, which may also name one of its subtransactions
//! only (a `ROLLBACK TO SAVEPOINT` after some of its changes were streamed).
//!
//! Whether a change message carries an xid depends on whether a block is open, so
//! a session's messages are decoded in order by a [`Decoder`].

use bytes::Bytes;

use super::{change, origin, DecodeError, DecodeErrorKind, LogicalMessage, Reader};
use crate::Lsn;

/// Start of a block of a streamed transaction's changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    /// The top-level transaction's id.
    pub xid: u32,
    /// Whether this is the transaction's first block (in this replication session).
    pub first_segment: bool,
}

/// A streamed transaction commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    /// The top-level transaction's id.
    pub xid: u32,
    /// Flags; currently unused by the server (0).
    pub flags: u8,
    /// The LSN of the commit record.
    pub commit_lsn: Lsn,
    /// The LSN just past the commit record: the position to confirm once the
    /// transaction has been handled.
    pub end_lsn: Lsn,
    /// Commit timestamp, microseconds since the PostgreSQL epoch (2000-01-01 UTC).
    pub commit_timestamp: i64,
}

impl StreamCommit {
    /// The commit timestamp as a [`std::time::SystemTime`], `None` when not
    /// representable.
    pub fn commit_time(&self) -> Option<std::time::SystemTime> {
        super::pg_timestamp_to_system_time(self.commit_timestamp)
    }
}

/// A streamed transaction, or one of its subtransactions, aborts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    /// The top-level transaction's id.
    pub xid: u32,
    /// The aborted subtransaction's id; equal to `xid` when the whole transaction
    /// aborts.
    pub subxid: u32,
}

impl StreamAbort {
    /// Whether the whole transaction aborts (not only a subtransaction).
    pub fn is_whole(&self) -> bool {
        self.xid == self.subxid
    }
}

/// One decoded message of a session, with the transaction id a change inside a
/// stream block carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Inside a stream block: the id of the (sub)transaction the change belongs
    /// to (the top-level id for Relation and Type). `None` outside a block, and for
    /// Origin and Stream Stop.
    pub xid: Option<u32>,
    pub message: LogicalMessage,
}

/// Decodes a session's messages in order, knowing whether a Stream Start..Stop
/// block is open. A new replication session needs a new decoder.
#[derive(Debug, Default, Clone)]
pub struct Decoder {
    /// The top-level xid of the open stream block.
    block: Option<u32>,
}

impl Decoder {
    /// A decoder outside any stream block.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// The top-level transaction whose stream block is open, if one is.
    pub fn open_block(&self) -> Option<u32> {
        self.block
    }

    /// Decodes the next message of the session.
    ///
    /// # Errors
    ///
    /// As [`decode`](super::decode), and [`DecodeErrorKind::OutOfPlace`] for a
    /// message that cannot come where it came (a Begin inside a stream block, a
    /// Stream Stop outside one); the block's state is unchanged by a failed message.
    pub fn decode(&mut self, buf: &Bytes) -> Result<Decoded, DecodeError> {
        match self.block {
            Some(_) => {
                let decoded = decode_in_stream(buf)?;
                if decoded.message == LogicalMessage::StreamStop {
                    self.block = None;
                }
                Ok(decoded)
            }
            None => {
                let message = super::decode(buf)?;
                match &message {
                    LogicalMessage::StreamStart(start) => self.block = Some(start.xid),
                    LogicalMessage::StreamStop => {
                        return Err(DecodeError::new(
                            DecodeErrorKind::OutOfPlace {
                                tag: b'E',
                                inside: false,
                            },
                            0,
                        ))
                    }
                    _ => {}
                }
                Ok(Decoded { xid: None, message })
            }
        }
    }
}

/// Decodes one message sent inside a Stream Start..Stop block: a change message
/// with its (sub)transaction's xid after the tag, an Origin, or the Stream Stop.
///
/// # Errors
///
/// As [`decode`](super::decode), and [`DecodeErrorKind::OutOfPlace`] for a message
/// that never comes inside a block (Begin, Commit, the stream messages but Stop).
pub fn decode_in_stream(buf: &Bytes) -> Result<Decoded, DecodeError> {
    let mut r = Reader::new(buf);
    let tag = r.u8("message tag")?;
    let mut xid = None;
    let message = match tag {
        b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' | b'M' => {
            xid = Some(r.u32("transaction id")?);
            change(tag, &mut r)?
        }
        b'O' => LogicalMessage::Origin(origin(&mut r)?),
        b'E' => LogicalMessage::StreamStop,
        b'B' | b'C' | b'S' | b'c' | b'A' => {
            return Err(r.error_at(0, DecodeErrorKind::OutOfPlace { tag, inside: true }));
        }
        b'b' | b'P' | b'K' | b'r' | b'p' => {
            return Err(r.error_at(0, DecodeErrorKind::UnsupportedMessage(tag)));
        }
        other => return Err(r.error_at(0, DecodeErrorKind::UnknownMessage(other))),
    };
    r.finish()?;
    Ok(Decoded { xid, message })
}

pub(super) fn start(r: &mut Reader<'_>) -> Result<StreamStart, DecodeError> {
    let xid = r.u32("transaction id")?;
    let first_segment = r.u8("first segment flag")? != 0;
    Ok(StreamStart { xid, first_segment })
}

pub(super) fn commit(r: &mut Reader<'_>) -> Result<StreamCommit, DecodeError> {
    let xid = r.u32("transaction id")?;
    let flags = r.u8("commit flags")?;
    let commit_lsn = r.lsn("commit LSN")?;
    let end_lsn = r.lsn("end LSN")?;
    let commit_timestamp = r.i64("commit timestamp")?;
    Ok(StreamCommit {
        xid,
        flags,
        commit_lsn,
        end_lsn,
        commit_timestamp,
    })
}

pub(super) fn abort(r: &mut Reader<'_>) -> Result<StreamAbort, DecodeError> {
    let xid = r.u32("transaction id")?;
    let subxid = r.u32("subtransaction id")?;
    Ok(StreamAbort { xid, subxid })
}
