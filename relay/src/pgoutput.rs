//! Decoder for the messages of PostgreSQL's `pgoutput` logical decoding plugin,
//! protocol versions 1 and 2: Begin, Commit, Origin, Relation, Type, Insert, Update,
//! Delete, Truncate and logical decoding Message (see "Logical Replication Message
//! Formats" in the PostgreSQL documentation), and the messages of streamed
//! in-progress transactions of version 2: Stream Start, Stop, Commit and Abort
//! ([`streaming`]). The two-phase messages of version 3 are reported as
//! [`DecodeErrorKind::UnsupportedMessage`].
//!
//! The module is pure: one message's bytes (the payload of an `XLogData`) in, one
//! [`LogicalMessage`] out. Column values and message contents are [`Bytes`] slices
//! of the input, so a decoded message owns its data without copying it. Inside a
//! Stream Start..Stop block the change messages carry their transaction's id after
//! the tag, so a session's messages are decoded in order by a [`Decoder`], which
//! knows whether such a block is open; [`decode`] takes a message outside any
//! block and [`decode_in_stream`] one inside.
//!
//! Decoding never panics, whatever the input: every read is bounds-checked, lengths
//! taken from the input are validated before use and never size an allocation
//! beyond what the remaining input could hold, and malformed input is reported as a
//! [`DecodeError`] carrying the byte offset where decoding failed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::Lsn;

mod error;
mod reader;
pub mod streaming;

pub use error::{ColumnTextError, DecodeError, DecodeErrorKind};
use reader::Reader;
pub use streaming::{decode_in_stream, Decoded, Decoder, StreamAbort, StreamCommit, StreamStart};

/// Seconds from the Unix epoch to the PostgreSQL epoch (2000-01-01 00:00:00 UTC).
pub const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;
const PG_EPOCH_UNIX_MICROS: i128 = 946_684_800_000_000;

/// Bit of [`Truncate::options`] set for `TRUNCATE ... CASCADE`.
pub const TRUNCATE_CASCADE: u8 = 1;
/// Bit of [`Truncate::options`] set for `TRUNCATE ... RESTART IDENTITY`.
pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;
/// Bit of [`Message::flags`] set when the logical decoding message is transactional.
pub const MESSAGE_TRANSACTIONAL: u8 = 1;
/// Bit of [`RelationColumn::flags`] set when the column is part of the replica identity key.
pub const COLUMN_KEY: u8 = 1;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogicalMessage {
    /// `B`: a transaction starts.
    Begin(Begin),
    /// `C`: the transaction commits.
    Commit(Commit),
    /// `O`: the transaction was replicated from another node.
    Origin(Origin),
    /// `R`: the description of a relation, sent before its first change in a session
    /// (and again when it changes).
    Relation(Relation),
    /// `Y`: the description of a non-built-in data type used by a relation.
    Type(Type),
    /// `I`: a row was inserted.
    Insert(Insert),
    /// `U`: a row was updated.
    Update(Update),
    /// `D`: a row was deleted.
    Delete(Delete),
    /// `T`: relations were truncated.
    Truncate(Truncate),
    /// `M`: a logical decoding message (`pg_logical_emit_message`).
    Message(Message),
    /// `S`: a block of an in-progress transaction's changes starts (protocol 2).
    StreamStart(StreamStart),
    /// `E`: the block of changes ends (protocol 2).
    StreamStop,
    /// `c`: a streamed transaction commits (protocol 2).
    StreamCommit(StreamCommit),
    /// `A`: a streamed transaction, or one of its subtransactions, aborts
    /// (protocol 2).
    StreamAbort(StreamAbort),
}

/// Start of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit timestamp, microseconds since the PostgreSQL epoch (2000-01-01 UTC).
    pub commit_timestamp: i64,
    /// The transaction id.
    pub xid: u32,
}

impl Begin {
    /// The commit timestamp as a [`SystemTime`], `None` when not representable.
    pub fn commit_time(&self) -> Option<SystemTime> {
        pg_timestamp_to_system_time(self.commit_timestamp)
    }
}

/// End of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Flags; currently unused by the server (0).
    pub flags: u8,
    /// The LSN of the commit record (equal to the Begin's `final_lsn`).
    pub commit_lsn: Lsn,
    /// The LSN just past the commit record: the position to confirm once the
    /// transaction has been handled.
    pub end_lsn: Lsn,
    /// Commit timestamp, microseconds since the PostgreSQL epoch (2000-01-01 UTC).
    pub commit_timestamp: i64,
}

impl Commit {
    /// The commit timestamp as a [`SystemTime`], `None` when not representable.
    pub fn commit_time(&self) -> Option<SystemTime> {
        pg_timestamp_to_system_time(self.commit_timestamp)
    }
}

/// The replication origin of the current transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The LSN of the commit on the origin server.
    pub commit_lsn: Lsn,
    /// The origin's name.
    pub name: String,
}

/// A relation's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The relation's OID, used by later change messages to refer to it.
    pub id: u32,
    /// Schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// Relation name.
    pub name: String,
    /// The relation's `REPLICA IDENTITY` setting.
    pub replica_identity: ReplicaIdentity,
    /// The published columns in tuple order (generated columns are not sent).
    pub columns: Vec<RelationColumn>,
}

/// The `REPLICA IDENTITY` of a relation (`pg_class.relreplident`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `d`: the primary key, if any.
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: all columns.
    Full,
    /// `i`: the columns of a chosen unique index.
    Index,
    /// Any other byte, kept as sent.
    Other(u8),
}

impl ReplicaIdentity {
    /// The setting for a `relreplident` byte.
    pub fn from_byte(byte: u8) -> ReplicaIdentity {
        match byte {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            other => ReplicaIdentity::Other(other),
        }
    }

    /// The `relreplident` byte of this setting.
    pub fn to_byte(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
            ReplicaIdentity::Other(byte) => byte,
        }
    }
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Flags: 0, or [`COLUMN_KEY`] for a column of the replica identity key.
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// OID of the column's data type (e.g. 25 `text`, 2950 `uuid`, 3802 `jsonb`).
    pub type_oid: u32,
    /// The type modifier (`atttypmod`); -1 when none.
    pub type_modifier: i32,
}

impl RelationColumn {
    /// Whether the column is part of the replica identity key.
    pub fn is_key(&self) -> bool {
        self.flags & COLUMN_KEY != 0
    }
}

/// A data type's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type {
    /// The type's OID.
    pub id: u32,
    /// Schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// Type name.
    pub name: String,
}

/// An inserted row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// OID of the relation, as announced by a [`Relation`] message.
    pub relation_id: u32,
    /// The new row, one entry per column of the relation.
    pub tuple: Vec<Column>,
}

/// An updated row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// OID of the relation, as announced by a [`Relation`] message.
    pub relation_id: u32,
    /// The old key (sent when the update changed it) or the old row (`REPLICA
    /// IDENTITY FULL`); `None` when neither was sent.
    pub old: Option<OldTuple>,
    /// The new row.
    pub new: Vec<Column>,
}

/// A deleted row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// OID of the relation, as announced by a [`Relation`] message.
    pub relation_id: u32,
    /// The deleted row's key or, with `REPLICA IDENTITY FULL`, the whole row.
    pub old: OldTuple,
}

/// The old side of an update or delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: the replica identity key; the other columns are [`Column::Null`].
    Key(Vec<Column>),
    /// `O`: the whole old row (`REPLICA IDENTITY FULL`).
    Full(Vec<Column>),
}

impl OldTuple {
    /// The columns, whichever kind this is.
    pub fn columns(&self) -> &[Column] {
        match self {
            OldTuple::Key(columns) | OldTuple::Full(columns) => columns,
        }
    }
}

/// Truncated relations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Option bits: [`TRUNCATE_CASCADE`], [`TRUNCATE_RESTART_IDENTITY`].
    pub options: u8,
    /// OIDs of the truncated relations.
    pub relation_ids: Vec<u32>,
}

impl Truncate {
    /// Whether `CASCADE` was given.
    pub fn cascade(&self) -> bool {
        self.options & TRUNCATE_CASCADE != 0
    }

    /// Whether `RESTART IDENTITY` was given.
    pub fn restart_identity(&self) -> bool {
        self.options & TRUNCATE_RESTART_IDENTITY != 0
    }
}

/// A logical decoding message (`pg_logical_emit_message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Flags: 0, or [`MESSAGE_TRANSACTIONAL`].
    pub flags: u8,
    /// The LSN of the message.
    pub lsn: Lsn,
    /// The prefix given by the emitter.
    pub prefix: String,
    /// The content, as emitted.
    pub content: Bytes,
}

impl Message {
    /// Whether the message was emitted as part of a transaction (and is therefore
    /// sent between that transaction's Begin and Commit).
    pub fn transactional(&self) -> bool {
        self.flags & MESSAGE_TRANSACTIONAL != 0
    }
}

/// One column value of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    /// `n`: SQL NULL.
    Null,
    /// `u`: a TOASTed value the change left unchanged; the server does not send it.
    UnchangedToast,
    /// `t`: the value in text format (the type's output function), raw bytes in
    /// the connection's client encoding.
    Text(Bytes),
    /// `b`: the value in binary format (only with the `binary` option).
    Binary(Bytes),
}

impl Column {
    /// The value as text: `Ok(None)` for NULL, `Ok(Some(_))` for a text-format value.
    ///
    /// # Errors
    ///
    /// The value was not sent, is in binary format, or is not valid UTF-8.
    pub fn as_str(&self) -> Result<Option<&str>, ColumnTextError> {
        match self {
            Column::Null => Ok(None),
            Column::Text(bytes) => std::str::from_utf8(bytes)
                .map(Some)
                .map_err(ColumnTextError::InvalidUtf8),
            Column::UnchangedToast => Err(ColumnTextError::UnchangedToast),
            Column::Binary(_) => Err(ColumnTextError::Binary),
        }
    }

    /// The raw bytes of a text- or binary-format value; `None` for NULL and
    /// unchanged TOAST values.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Column::Text(bytes) | Column::Binary(bytes) => Some(bytes),
            Column::Null | Column::UnchangedToast => None,
        }
    }

    /// Whether the value is SQL NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Column::Null)
    }
}

/// Converts a PostgreSQL timestamp (microseconds since 2000-01-01 UTC) to a
/// [`SystemTime`]. `None` for `infinity`/`-infinity` (`i64::MAX`/`i64::MIN`) and
/// for instants the platform's `SystemTime` cannot represent. Never panics.
pub fn pg_timestamp_to_system_time(micros: i64) -> Option<SystemTime> {
    if micros == i64::MAX || micros == i64::MIN {
        return None;
    }
    // i128 holds any i64 plus the epoch offset without overflow.
    let unix_micros = i128::from(micros).checked_add(PG_EPOCH_UNIX_MICROS)?;
    let magnitude = Duration::from_micros(u64::try_from(unix_micros.unsigned_abs()).ok()?);
    if unix_micros >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    }
}

/// Decodes one pgoutput message (the data of one `XLogData`) sent outside a
/// Stream Start..Stop block: every message of protocol 1, and the Stream Start,
/// Commit and Abort of protocol 2 (a Stream Stop is decoded too; whether it may
/// come here is the [`Decoder`]'s business).
///
/// Column values and message content are slices of `buf`, sharing its storage.
///
/// # Errors
///
/// The message is truncated, has bytes left over, has an unknown tag or tuple kind,
/// a negative count or length, or a string that is unterminated or not UTF-8.
pub fn decode(buf: &Bytes) -> Result<LogicalMessage, DecodeError> {
    let mut r = Reader::new(buf);
    let tag = r.u8("message tag")?;
    let message = match tag {
        b'B' => LogicalMessage::Begin(begin(&mut r)?),
        b'C' => LogicalMessage::Commit(commit(&mut r)?),
        b'O' => LogicalMessage::Origin(origin(&mut r)?),
        b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' | b'M' => change(tag, &mut r)?,
        b'S' => LogicalMessage::StreamStart(streaming::start(&mut r)?),
        b'E' => LogicalMessage::StreamStop,
        b'c' => LogicalMessage::StreamCommit(streaming::commit(&mut r)?),
        b'A' => LogicalMessage::StreamAbort(streaming::abort(&mut r)?),
        // Begin Prepare, Prepare, Commit Prepared, Rollback Prepared, Stream
        // Prepare (v3).
        b'b' | b'P' | b'K' | b'r' | b'p' => {
            return Err(r.error_at(0, DecodeErrorKind::UnsupportedMessage(tag)));
        }
        other => return Err(r.error_at(0, DecodeErrorKind::UnknownMessage(other))),
    };
    r.finish()?;
    Ok(message)
}

/// The body of a change message (tag `R`, `Y`, `I`, `U`, `D`, `T` or `M`), laid
/// out alike inside a stream block and outside but for the xid before it.
fn change(tag: u8, r: &mut Reader<'_>) -> Result<LogicalMessage, DecodeError> {
    Ok(match tag {
        b'R' => LogicalMessage::Relation(relation(r)?),
        b'Y' => LogicalMessage::Type(data_type(r)?),
        b'I' => LogicalMessage::Insert(insert(r)?),
        b'U' => LogicalMessage::Update(update(r)?),
        b'D' => LogicalMessage::Delete(delete(r)?),
        b'T' => LogicalMessage::Truncate(truncate(r)?),
        b'M' => LogicalMessage::Message(message(r)?),
        other => return Err(r.error_at(0, DecodeErrorKind::UnknownMessage(other))),
    })
}

fn begin(r: &mut Reader<'_>) -> Result<Begin, DecodeError> {
    let final_lsn = r.lsn("final LSN")?;
    let commit_timestamp = r.i64("commit timestamp")?;
    let xid = r.u32("transaction id")?;
    Ok(Begin {
        final_lsn,
        commit_timestamp,
        xid,
    })
}

fn commit(r: &mut Reader<'_>) -> Result<Commit, DecodeError> {
    let flags = r.u8("commit flags")?;
    let commit_lsn = r.lsn("commit LSN")?;
    let end_lsn = r.lsn("end LSN")?;
    let commit_timestamp = r.i64("commit timestamp")?;
    Ok(Commit {
        flags,
        commit_lsn,
        end_lsn,
        commit_timestamp,
    })
}

fn origin(r: &mut Reader<'_>) -> Result<Origin, DecodeError> {
    let commit_lsn = r.lsn("origin commit LSN")?;
    let name = r.cstring("origin name")?;
    Ok(Origin { commit_lsn, name })
}

/// Smallest encoding of one relation column: flags, empty name, type OID, modifier.
const MIN_RELATION_COLUMN_LEN: usize = 1 + 1 + 4 + 4;

fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let id = r.u32("relation id")?;
    let namespace = r.cstring("relation namespace")?;
    let name = r.cstring("relation name")?;
    let replica_identity = ReplicaIdentity::from_byte(r.u8("replica identity")?);
    let count = r.count("relation column count")?;
    let mut columns = Vec::with_capacity(count.min(r.remaining() / MIN_RELATION_COLUMN_LEN));
    for _ in 0..count {
        let flags = r.u8("column flags")?;
        let name = r.cstring("column name")?;
        let type_oid = r.u32("column type OID")?;
        let type_modifier = r.i32("column type modifier")?;
        columns.push(RelationColumn {
            flags,
            name,
            type_oid,
            type_modifier,
        });
    }
    Ok(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn data_type(r: &mut Reader<'_>) -> Result<Type, DecodeError> {
    let id = r.u32("type id")?;
    let namespace = r.cstring("type namespace")?;
    let name = r.cstring("type name")?;
    Ok(Type {
        id,
        namespace,
        name,
    })
}

fn insert(r: &mut Reader<'_>) -> Result<Insert, DecodeError> {
    let relation_id = r.u32("relation id")?;
    r.marker(b'N', "'N'")?;
    let tuple = tuple(r)?;
    Ok(Insert { relation_id, tuple })
}

fn update(r: &mut Reader<'_>) -> Result<Update, DecodeError> {
    let relation_id = r.u32("relation id")?;
    let old = match r.peek() {
        Some(b'K') => {
            r.u8("tuple marker")?;
            Some(OldTuple::Key(tuple(r)?))
        }
        Some(b'O') => {
            r.u8("tuple marker")?;
            Some(OldTuple::Full(tuple(r)?))
        }
        _ => None,
    };
    let expected = if old.is_some() {
        "'N'"
    } else {
        "'K', 'O' or 'N'"
    };
    r.marker(b'N', expected)?;
    let new = tuple(r)?;
    Ok(Update {
        relation_id,
        old,
        new,
    })
}

fn delete(r: &mut Reader<'_>) -> Result<Delete, DecodeError> {
    let relation_id = r.u32("relation id")?;
    let at = r.offset();
    let old = match r.u8("tuple marker")? {
        b'K' => OldTuple::Key(tuple(r)?),
        b'O' => OldTuple::Full(tuple(r)?),
        found => {
            return Err(r.error_at(
                at,
                DecodeErrorKind::UnexpectedTupleMarker {
                    expected: "'K' or 'O'",
                    found,
                },
            ))
        }
    };
    Ok(Delete { relation_id, old })
}

fn truncate(r: &mut Reader<'_>) -> Result<Truncate, DecodeError> {
    let count = r.u32("relation count")?;
    let options = r.u8("truncate options")?;
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    let mut relation_ids = Vec::with_capacity(count.min(r.remaining() / 4));
    for _ in 0..count {
        relation_ids.push(r.u32("truncated relation id")?);
    }
    Ok(Truncate {
        options,
        relation_ids,
    })
}

fn message(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let flags = r.u8("message flags")?;
    let lsn = r.lsn("message LSN")?;
    let prefix = r.cstring("message prefix")?;
    let len = r.length("message content length")?;
    let content = r.bytes(len, "message content")?;
    Ok(Message {
        flags,
        lsn,
        prefix,
        content,
    })
}

/// TupleData: a column count, then each column's kind and value.
fn tuple(r: &mut Reader<'_>) -> Result<Vec<Column>, DecodeError> {
    let count = r.count("tuple column count")?;
    // Every column takes at least its kind byte.
    let mut columns = Vec::with_capacity(count.min(r.remaining()));
    for _ in 0..count {
        let at = r.offset();
        let column = match r.u8("column kind")? {
            b'n' => Column::Null,
            b'u' => Column::UnchangedToast,
            b't' => {
                let len = r.length("column value length")?;
                Column::Text(r.bytes(len, "column value")?)
            }
            b'b' => {
                let len = r.length("column value length")?;
                Column::Binary(r.bytes(len, "column value")?)
            }
            other => return Err(r.error_at(at, DecodeErrorKind::UnknownColumnKind(other))),
        };
        columns.push(column);
    }
    Ok(columns)
}

#[cfg(test)]
pub(crate) mod encode;
#[cfg(test)]
mod tests;
