//! A test-only encoder of pgoutput messages, the inverse of [`super::decode`]: the
//! decoder's tests build their input with it, and the stream's property tests
//! build whole replication streams.

use bytes::Bytes;

use super::*;

/// A test-only encoder of messages in the documented layout (all integers
/// big-endian, strings NUL-terminated).
#[derive(Debug, Default)]
pub(crate) struct Wire(Vec<u8>);

impl Wire {
    pub(crate) fn tag(tag: u8) -> Wire {
        Wire(vec![tag])
    }

    pub(crate) fn u8(mut self, value: u8) -> Wire {
        self.0.push(value);
        self
    }

    pub(crate) fn i16(mut self, value: i16) -> Wire {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub(crate) fn i32(mut self, value: i32) -> Wire {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub(crate) fn u32(mut self, value: u32) -> Wire {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub(crate) fn i64(mut self, value: i64) -> Wire {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub(crate) fn lsn(mut self, value: Lsn) -> Wire {
        self.0.extend_from_slice(&value.get().to_be_bytes());
        self
    }

    pub(crate) fn cstr(mut self, value: &str) -> Wire {
        self.0.extend_from_slice(value.as_bytes());
        self.0.push(0);
        self
    }

    pub(crate) fn raw(mut self, bytes: &[u8]) -> Wire {
        self.0.extend_from_slice(bytes);
        self
    }

    /// An Int32 length followed by the bytes.
    pub(crate) fn counted(self, bytes: &[u8]) -> Wire {
        self.i32(i32::try_from(bytes.len()).unwrap()).raw(bytes)
    }

    /// TupleData.
    pub(crate) fn tuple(self, columns: &[Column]) -> Wire {
        let mut wire = self.i16(i16::try_from(columns.len()).unwrap());
        for column in columns {
            wire = match column {
                Column::Null => wire.u8(b'n'),
                Column::UnchangedToast => wire.u8(b'u'),
                Column::Text(value) => wire.u8(b't').counted(value),
                Column::Binary(value) => wire.u8(b'b').counted(value),
            };
        }
        wire
    }

    pub(crate) fn old(self, old: &OldTuple) -> Wire {
        match old {
            OldTuple::Key(columns) => self.u8(b'K').tuple(columns),
            OldTuple::Full(columns) => self.u8(b'O').tuple(columns),
        }
    }

    pub(crate) fn build(self) -> Bytes {
        Bytes::from(self.0)
    }
}

/// Encodes a message the way pgoutput sends it outside a stream block.
pub(crate) fn encode(message: &LogicalMessage) -> Bytes {
    match message {
        LogicalMessage::Begin(m) => Wire::tag(b'B')
            .lsn(m.final_lsn)
            .i64(m.commit_timestamp)
            .u32(m.xid),
        LogicalMessage::Commit(m) => Wire::tag(b'C')
            .u8(m.flags)
            .lsn(m.commit_lsn)
            .lsn(m.end_lsn)
            .i64(m.commit_timestamp),
        LogicalMessage::Origin(m) => Wire::tag(b'O').lsn(m.commit_lsn).cstr(&m.name),
        LogicalMessage::Relation(m) => {
            let mut wire = Wire::tag(b'R')
                .u32(m.id)
                .cstr(&m.namespace)
                .cstr(&m.name)
                .u8(m.replica_identity.to_byte())
                .i16(i16::try_from(m.columns.len()).unwrap());
            for column in &m.columns {
                wire = wire
                    .u8(column.flags)
                    .cstr(&column.name)
                    .u32(column.type_oid)
                    .i32(column.type_modifier);
            }
            wire
        }
        LogicalMessage::Type(m) => Wire::tag(b'Y').u32(m.id).cstr(&m.namespace).cstr(&m.name),
        LogicalMessage::Insert(m) => Wire::tag(b'I').u32(m.relation_id).u8(b'N').tuple(&m.tuple),
        LogicalMessage::Update(m) => {
            let wire = Wire::tag(b'U').u32(m.relation_id);
            let wire = match &m.old {
                Some(old) => wire.old(old),
                None => wire,
            };
            wire.u8(b'N').tuple(&m.new)
        }
        LogicalMessage::Delete(m) => Wire::tag(b'D').u32(m.relation_id).old(&m.old),
        LogicalMessage::Truncate(m) => {
            let mut wire = Wire::tag(b'T')
                .u32(u32::try_from(m.relation_ids.len()).unwrap())
                .u8(m.options);
            for id in &m.relation_ids {
                wire = wire.u32(*id);
            }
            wire
        }
        LogicalMessage::Message(m) => Wire::tag(b'M')
            .u8(m.flags)
            .lsn(m.lsn)
            .cstr(&m.prefix)
            .counted(&m.content),
        LogicalMessage::StreamStart(m) => Wire::tag(b'S').u32(m.xid).u8(u8::from(m.first_segment)),
        LogicalMessage::StreamStop => Wire::tag(b'E'),
        LogicalMessage::StreamCommit(m) => Wire::tag(b'c')
            .u32(m.xid)
            .u8(m.flags)
            .lsn(m.commit_lsn)
            .lsn(m.end_lsn)
            .i64(m.commit_timestamp),
        LogicalMessage::StreamAbort(m) => Wire::tag(b'A').u32(m.xid).u32(m.subxid),
    }
    .build()
}

/// Encodes a message the way pgoutput sends it inside a stream block: a change
/// message with the (sub)transaction's `xid` after its tag.
pub(crate) fn encode_in_stream(xid: u32, message: &LogicalMessage) -> Bytes {
    let plain = encode(message);
    if carries_xid(message) {
        Wire::tag(plain[0]).u32(xid).raw(&plain[1..]).build()
    } else {
        plain
    }
}

/// Whether a message carries its transaction's id inside a stream block.
pub(crate) fn carries_xid(message: &LogicalMessage) -> bool {
    matches!(
        message,
        LogicalMessage::Relation(_)
            | LogicalMessage::Type(_)
            | LogicalMessage::Insert(_)
            | LogicalMessage::Update(_)
            | LogicalMessage::Delete(_)
            | LogicalMessage::Truncate(_)
            | LogicalMessage::Message(_)
    )
}
