//! Errors of the pgoutput decoder.

/// Why [`Column::as_str`](super::Column::as_str) has no text to give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ColumnTextError {
    /// The value is an unchanged TOAST value, which the server does not send.
    #[error("the value is an unchanged TOASTed value, which the server does not send")]
    UnchangedToast,
    /// The value is in binary format.
    #[error("the value is in binary format, not text")]
    Binary,
    /// The text value is not valid UTF-8.
    #[error("the text value is not valid UTF-8")]
    InvalidUtf8(#[source] std::str::Utf8Error),
}

/// A message that could not be decoded, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message at byte {offset}: {kind}")]
pub struct DecodeError {
    kind: DecodeErrorKind,
    offset: usize,
}

impl DecodeError {
    pub(super) fn new(kind: DecodeErrorKind, offset: usize) -> DecodeError {
        DecodeError { kind, offset }
    }

    /// What is wrong.
    pub fn kind(&self) -> &DecodeErrorKind {
        &self.kind
    }

    /// Byte offset in the message where the offending field starts.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

/// What is wrong with a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeErrorKind {
    /// The message ends before a field.
    #[error("the message ends before its {field}")]
    UnexpectedEnd {
        /// The field that did not fit.
        field: &'static str,
    },
    /// The first byte is not a known message tag.
    #[error("unknown message tag {:?} ({:#04x})", char::from(*.0), .0)]
    UnknownMessage(u8),
    /// A message of a two-phase transaction, which protocol versions 1 and 2 do
    /// not send.
    #[error(
        "message {:?} belongs to a two-phase transaction, \
         which protocol versions 1 and 2 do not send",
        char::from(*.0)
    )]
    UnsupportedMessage(u8),
    /// A message that cannot come where it came: inside a Stream Start..Stop block
    /// (`inside`) or outside one.
    #[error(
        "message {:?} cannot come {} a stream block",
        char::from(*.tag),
        if *.inside { "inside" } else { "outside" }
    )]
    OutOfPlace {
        /// The message's tag.
        tag: u8,
        /// Whether a stream block was open.
        inside: bool,
    },
    /// A tuple column's kind byte is not `n`, `u`, `t` or `b`.
    #[error("unknown tuple column kind {:?} ({:#04x})", char::from(*.0), .0)]
    UnknownColumnKind(u8),
    /// A tuple marker (`N`, `K`, `O`) is not what the message allows there.
    #[error("expected {expected} tuple marker, found {:?} ({found:#04x})", char::from(*.found))]
    UnexpectedTupleMarker {
        /// What was allowed.
        expected: &'static str,
        /// The byte found.
        found: u8,
    },
    /// A string field has no NUL terminator.
    #[error("the {field} has no NUL terminator")]
    MissingNul {
        /// The string field.
        field: &'static str,
    },
    /// A string field is not valid UTF-8.
    #[error("the {field} is not valid UTF-8")]
    InvalidUtf8 {
        /// The string field.
        field: &'static str,
    },
    /// A count or length field is negative.
    #[error("the {field} is negative ({value})")]
    NegativeLength {
        /// The count or length field.
        field: &'static str,
        /// Its value.
        value: i32,
    },
    /// Bytes follow the end of the message.
    #[error("{0} unexpected bytes after the end of the message")]
    TrailingBytes(usize),
}
