//! The bytes of the replication sub-protocol, without I/O.
//!
//! PostgreSQL frames every backend message as a tag byte followed by a big-endian
//! `i32` length that counts itself but not the tag. [`split_frame`] cuts one such
//! frame off the front of a read buffer, or says the buffer holds only part of one;
//! it never waits, so the caller can keep the buffer across cancelled reads.
//!
//! Inside the copy-both mode that `START_REPLICATION` opens, the server sends
//! CopyData messages carrying either XLogData (`w`) or a primary keepalive (`k`)
//! ([`parse_copy_data`]), and the client answers with standby status updates (`r`)
//! inside CopyData ([`encode_standby_status`]). Timestamps on this level are
//! microseconds since 2000-01-01 00:00:00 UTC, PostgreSQL's epoch.
//!
//! Everything here returns [`ProtocolError`] on malformed input and never panics.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::server_error::ServerError;
use crate::Lsn;

/// The largest backend message accepted: 1 GiB, PostgreSQL's own limit for a
/// single allocation. A longer length means the stream is corrupt.
pub const MAX_MESSAGE_LEN: usize = 1 << 30;

/// Microseconds from the Unix epoch to PostgreSQL's epoch (2000-01-01 00:00:00 UTC).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Tag of a CopyData message (both directions).
pub const COPY_DATA_TAG: u8 = b'd';
/// Tag of a CopyDone message (both directions).
pub const COPY_DONE_TAG: u8 = b'c';
/// Tag of a CopyBothResponse, which `postgres-protocol` 0.6 does not parse.
pub const COPY_BOTH_RESPONSE_TAG: u8 = b'W';
/// Tag of an ErrorResponse.
pub const ERROR_RESPONSE_TAG: u8 = b'E';
/// Tag of a NoticeResponse.
pub const NOTICE_RESPONSE_TAG: u8 = b'N';
/// Tag of a ParameterStatus.
pub const PARAMETER_STATUS_TAG: u8 = b'S';
/// Tag of a ReadyForQuery.
pub const READY_FOR_QUERY_TAG: u8 = b'Z';

/// Kind byte of XLogData inside CopyData.
pub const XLOG_DATA_KIND: u8 = b'w';
/// Kind byte of a primary keepalive inside CopyData.
pub const KEEPALIVE_KIND: u8 = b'k';
/// Kind byte of a standby status update inside CopyData.
pub const STANDBY_STATUS_KIND: u8 = b'r';

/// Header of XLogData: kind, WAL start, WAL end, server clock.
const XLOG_DATA_HEADER_LEN: usize = 1 + 8 + 8 + 8;
/// A primary keepalive: kind, WAL end, server clock, reply-requested flag.
const KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;
/// A standby status update: kind, write, flush, apply, client clock, reply flag.
const STANDBY_STATUS_LEN: usize = 1 + 8 + 8 + 8 + 8 + 1;

/// The bytes were not what the protocol allows at this point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A message header's length is below 4 (it counts itself).
    #[error("message {tag:?} has the invalid length {len}")]
    InvalidLength {
        /// The message's tag.
        tag: char,
        /// The length field as sent.
        len: i32,
    },
    /// A message header announces more than [`MAX_MESSAGE_LEN`].
    #[error("message {tag:?} announces {len} bytes, more than the limit of 1 GiB")]
    TooLong {
        /// The message's tag.
        tag: char,
        /// The length field as sent.
        len: i32,
    },
    /// A message body is shorter or longer than its kind requires.
    #[error("{what} has {len} bytes, which is not a valid length for it")]
    BadBodyLength {
        /// What was being decoded.
        what: &'static str,
        /// The body length received.
        len: usize,
    },
    /// A CopyData payload of the replication stream has an unknown kind byte.
    #[error("unknown replication message kind {kind:?}")]
    UnknownCopyData {
        /// The first byte of the payload.
        kind: char,
    },
    /// A message that is not allowed in the current state of the connection.
    #[error("unexpected message {tag:?} while {during}")]
    Unexpected {
        /// The message's tag.
        tag: char,
        /// What the client was doing.
        during: &'static str,
    },
    /// A message whose body could not be decoded.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// What was wrong with it.
        reason: String,
    },
    /// A replication command returned rows of an unexpected shape.
    #[error("unexpected result of {command}: {reason}")]
    UnexpectedResult {
        /// The command.
        command: &'static str,
        /// What was wrong with it.
        reason: String,
    },
}

/// One complete backend message: its tag and its bytes, header included.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    tag: u8,
    raw: BytesMut,
}

impl Frame {
    /// Builds a frame from a tag and a body (for tests and fake servers).
    pub fn new(tag: u8, body: &[u8]) -> Frame {
        let mut raw = BytesMut::with_capacity(body.len() + 5);
        write_message(tag, body, &mut raw);
        Frame { tag, raw }
    }

    /// The message's tag byte.
    pub fn tag(&self) -> u8 {
        self.tag
    }

    /// The message body, without tag and length.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }

    /// The message body, without tag and length, without copying.
    pub fn into_body(mut self) -> Bytes {
        self.raw.split_off(5).freeze()
    }

    /// The whole message, tag and length included (what
    /// `postgres_protocol::message::backend::Message::parse` takes).
    pub fn into_raw(self) -> BytesMut {
        self.raw
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Bodies may hold row data or authentication material: show only the shape.
        f.debug_struct("Frame")
            .field("tag", &char::from(self.tag))
            .field("body_len", &(self.raw.len() - 5))
            .finish()
    }
}

/// Cuts the first complete backend message off the front of `buf`.
///
/// Returns `Ok(None)` and leaves `buf` untouched while it holds only part of a
/// message. Errors when the header's length is negative, below 4 or above
/// [`MAX_MESSAGE_LEN`]; the stream cannot be resynchronised after that.
pub fn split_frame(buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
    let Some(total) = frame_len(buf)? else {
        return Ok(None);
    };
    if buf.len() < total {
        return Ok(None);
    }
    let raw = buf.split_to(total);
    Ok(Some(Frame { tag: raw[0], raw }))
}

/// How many more bytes `buf` needs before [`split_frame`] can return a message:
/// at least 1 while the header is incomplete, 0 when a whole message is there.
pub fn missing_bytes(buf: &[u8]) -> Result<usize, ProtocolError> {
    Ok(match frame_len(buf)? {
        None => 5 - buf.len(),
        Some(total) => total.saturating_sub(buf.len()),
    })
}

/// Total length (tag included) of the message at the front of `buf`, once its
/// header is complete.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
    let Some(header) = buf.get(..5) else {
        return Ok(None);
    };
    let tag = char::from(header[0]);
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let Ok(len_usize) = usize::try_from(len) else {
        return Err(ProtocolError::InvalidLength { tag, len });
    };
    if len_usize < 4 {
        return Err(ProtocolError::InvalidLength { tag, len });
    }
    if len_usize > MAX_MESSAGE_LEN {
        return Err(ProtocolError::TooLong { tag, len });
    }
    Ok(Some(len_usize + 1))
}

/// Appends one message (tag, length, body) to `out`.
///
/// The caller keeps bodies below [`MAX_MESSAGE_LEN`], which fits an `i32`.
fn write_message(tag: u8, body: &[u8], out: &mut BytesMut) {
    let len = i32::try_from(body.len() + 4).unwrap_or(i32::MAX);
    out.reserve(body.len() + 5);
    out.put_u8(tag);
    out.put_i32(len);
    out.put_slice(body);
}

/// A message of the replication stream, decoded from a CopyData payload.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplicationMessage {
    /// A piece of WAL, for logical replication one output-plugin message.
    XLogData {
        /// WAL position this data starts at: for pgoutput the LSN of the decoded
        /// record (Begin: the first change, Commit: the commit record's end), and
        /// 0/0 for Relation messages, which belong to no record.
        wal_start: Lsn,
        /// The current end of WAL on the server.
        wal_end: Lsn,
        /// The server's clock when it sent the message, microseconds since
        /// 2000-01-01 UTC.
        server_time_micros: i64,
        /// The output plugin's message (pgoutput: tag byte `B`, `R`, `I`, `C`, ...).
        data: Bytes,
    },
    /// A primary keepalive: the server's position and whether it wants an answer.
    Keepalive {
        /// The current end of WAL on the server.
        wal_end: Lsn,
        /// The server's clock when it sent the message, microseconds since
        /// 2000-01-01 UTC.
        server_time_micros: i64,
        /// The server asks for a standby status update now, or it will drop the
        /// connection once `wal_sender_timeout` passes.
        reply_requested: bool,
    },
}

/// What the client reports to the server in a standby status update.
///
/// For a logical slot, `flush` becomes the slot's `confirmed_flush_lsn`: the server
/// may recycle WAL before it and will not send transactions that end at or before it
/// again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StandbyStatus {
    /// Last WAL position received and written by the client.
    pub write: Lsn,
    /// Last WAL position durably processed by the client (what is confirmed).
    pub flush: Lsn,
    /// Last WAL position applied by the client.
    pub apply: Lsn,
    /// Ask the server to answer at once with a keepalive.
    pub reply_requested: bool,
}

impl StandbyStatus {
    /// A status reporting `lsn` as written, flushed and applied.
    pub fn confirmed(lsn: Lsn) -> StandbyStatus {
        StandbyStatus {
            write: lsn,
            flush: lsn,
            apply: lsn,
            reply_requested: false,
        }
    }
}

/// Decodes the payload of a CopyData message of the replication stream.
pub fn parse_copy_data(payload: Bytes) -> Result<ReplicationMessage, ProtocolError> {
    let Some(&kind) = payload.first() else {
        return Err(ProtocolError::BadBodyLength {
            what: "CopyData message",
            len: 0,
        });
    };
    match kind {
        XLOG_DATA_KIND => {
            if payload.len() < XLOG_DATA_HEADER_LEN {
                return Err(ProtocolError::BadBodyLength {
                    what: "XLogData message",
                    len: payload.len(),
                });
            }
            let mut header = &payload[1..XLOG_DATA_HEADER_LEN];
            let wal_start = Lsn::new(header.get_u64());
            let wal_end = Lsn::new(header.get_u64());
            let server_time_micros = header.get_i64();
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                server_time_micros,
                data: payload.slice(XLOG_DATA_HEADER_LEN..),
            })
        }
        KEEPALIVE_KIND => {
            if payload.len() != KEEPALIVE_LEN {
                return Err(ProtocolError::BadBodyLength {
                    what: "primary keepalive message",
                    len: payload.len(),
                });
            }
            let mut body = &payload[1..];
            let wal_end = Lsn::new(body.get_u64());
            let server_time_micros = body.get_i64();
            let reply_requested = body.get_u8() != 0;
            Ok(ReplicationMessage::Keepalive {
                wal_end,
                server_time_micros,
                reply_requested,
            })
        }
        other => Err(ProtocolError::UnknownCopyData {
            kind: char::from(other),
        }),
    }
}

/// Appends a whole CopyData message carrying a standby status update to `out`.
///
/// `clock_micros` is the client's clock in microseconds since 2000-01-01 UTC (see
/// [`pg_micros_from_system_time`]).
pub fn encode_standby_status(status: &StandbyStatus, clock_micros: i64, out: &mut BytesMut) {
    let mut payload = [0u8; STANDBY_STATUS_LEN];
    let mut cursor = &mut payload[..];
    cursor.put_u8(STANDBY_STATUS_KIND);
    cursor.put_u64(status.write.get());
    cursor.put_u64(status.flush.get());
    cursor.put_u64(status.apply.get());
    cursor.put_i64(clock_micros);
    cursor.put_u8(u8::from(status.reply_requested));
    write_message(COPY_DATA_TAG, &payload, out);
}

/// Decodes the CopyData payload of a standby status update (the server's side of
/// [`encode_standby_status`]); returns the status and the client's clock.
pub fn parse_standby_status(payload: &[u8]) -> Result<(StandbyStatus, i64), ProtocolError> {
    if payload.len() != STANDBY_STATUS_LEN || payload[0] != STANDBY_STATUS_KIND {
        return Err(ProtocolError::BadBodyLength {
            what: "standby status update",
            len: payload.len(),
        });
    }
    let mut body = &payload[1..];
    let write = Lsn::new(body.get_u64());
    let flush = Lsn::new(body.get_u64());
    let apply = Lsn::new(body.get_u64());
    let clock = body.get_i64();
    let reply_requested = body.get_u8() != 0;
    Ok((
        StandbyStatus {
            write,
            flush,
            apply,
            reply_requested,
        },
        clock,
    ))
}

/// The body of a CopyBothResponse: the overall format and one format per column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyBothResponse {
    /// 0 for text, 1 for binary (replication always says 0).
    pub format: u8,
    /// Format codes of the columns (replication sends none).
    pub column_formats: Vec<i16>,
}

/// Decodes the body of a CopyBothResponse (`W`).
pub fn parse_copy_both_response(body: &[u8]) -> Result<CopyBothResponse, ProtocolError> {
    let bad = || ProtocolError::BadBodyLength {
        what: "CopyBothResponse",
        len: body.len(),
    };
    if body.len() < 3 {
        return Err(bad());
    }
    let mut rest = body;
    let format = rest.get_u8();
    let count = usize::from(rest.get_u16());
    if rest.len() != count * 2 {
        return Err(bad());
    }
    let column_formats = (0..count).map(|_| rest.get_i16()).collect();
    Ok(CopyBothResponse {
        format,
        column_formats,
    })
}

/// Decodes the fields of an ErrorResponse or NoticeResponse body.
///
/// Text that is not UTF-8 (a server message in the server's encoding, before the
/// client encoding applies) is decoded lossily rather than rejected.
pub fn parse_error_fields(body: &[u8]) -> Result<ServerError, ProtocolError> {
    let malformed = |reason: &str| ProtocolError::Malformed {
        what: "error or notice response",
        reason: reason.to_owned(),
    };
    let mut localized_severity = None;
    let mut severity = None;
    let mut code = None;
    let mut message = None;
    let mut detail = None;
    let mut hint = None;
    let mut rest = body;
    loop {
        let Some((&kind, after)) = rest.split_first() else {
            return Err(malformed("the field list is not terminated"));
        };
        if kind == 0 {
            if !after.is_empty() {
                return Err(malformed("bytes follow the end of the field list"));
            }
            break;
        }
        let Some(end) = after.iter().position(|&b| b == 0) else {
            return Err(malformed("a field is not NUL-terminated"));
        };
        let value = String::from_utf8_lossy(&after[..end]).into_owned();
        rest = &after[end + 1..];
        match kind {
            b'S' => localized_severity = Some(value),
            b'V' => severity = Some(value),
            b'C' => code = Some(value),
            b'M' => message = Some(value),
            b'D' => detail = Some(value),
            b'H' => hint = Some(value),
            _ => {}
        }
    }
    let severity = severity
        .or(localized_severity)
        .ok_or_else(|| malformed("the severity field is missing"))?;
    let code = code.ok_or_else(|| malformed("the SQLSTATE field is missing"))?;
    let message = message.ok_or_else(|| malformed("the message field is missing"))?;
    Ok(ServerError::new(severity, code, message, detail, hint))
}

/// PostgreSQL's clock value for `time`: microseconds since 2000-01-01 UTC
/// (negative before it, saturating far outside).
pub fn pg_micros_from_system_time(time: SystemTime) -> i64 {
    let since_unix = match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros())
            .map(|m| -m)
            .unwrap_or(i64::MIN),
    };
    since_unix.saturating_sub(PG_EPOCH_OFFSET_MICROS)
}

/// The instant a PostgreSQL clock value (microseconds since 2000-01-01 UTC) names.
pub fn system_time_from_pg_micros(micros: i64) -> SystemTime {
    let since_unix = i128::from(micros) + i128::from(PG_EPOCH_OFFSET_MICROS);
    let magnitude =
        Duration::from_micros(u64::try_from(since_unix.unsigned_abs()).unwrap_or(u64::MAX));
    if since_unix >= 0 {
        UNIX_EPOCH.checked_add(magnitude).unwrap_or(UNIX_EPOCH)
    } else {
        UNIX_EPOCH.checked_sub(magnitude).unwrap_or(UNIX_EPOCH)
    }
}

/// Quotes `name` as an identifier of the replication command grammar (`"..."`,
/// embedded quotes doubled).
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes `value` as a string literal of the replication command grammar (`'...'`,
/// embedded quotes doubled).
///
/// The replication grammar knows no `E'...'` strings and treats backslashes
/// literally, so `postgres_protocol::escape::escape_literal` does not fit here.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn raw_message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn splits_complete_frames_and_waits_for_partial_ones() {
        let mut stream = raw_message(b'W', &[0, 0, 0]);
        stream.extend(raw_message(b'd', b"kpayload"));
        let second_start = 8;
        // Feed the bytes one at a time: a frame appears exactly when it is complete.
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for (i, byte) in stream.iter().enumerate() {
            buf.put_u8(*byte);
            match split_frame(&mut buf).unwrap() {
                Some(frame) => frames.push((i, frame)),
                None => assert!(missing_bytes(&buf).unwrap() > 0),
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].0, second_start - 1);
        assert_eq!(frames[0].1.tag(), b'W');
        assert_eq!(frames[0].1.body(), &[0, 0, 0]);
        assert_eq!(frames[1].1.tag(), b'd');
        assert_eq!(
            frames[1].1.clone().into_body(),
            Bytes::from_static(b"kpayload")
        );
        assert_eq!(frames[1].1.clone().into_raw().len(), 5 + 8);
        assert!(buf.is_empty());
    }

    #[test]
    fn missing_bytes_counts_header_and_body() {
        assert_eq!(missing_bytes(&[]).unwrap(), 5);
        assert_eq!(missing_bytes(&[b'd', 0]).unwrap(), 3);
        assert_eq!(missing_bytes(&raw_message(b'd', b"abc")[..6]).unwrap(), 2);
        assert_eq!(missing_bytes(&raw_message(b'd', b"abc")).unwrap(), 0);
    }

    #[test]
    fn rejects_negative_short_and_absurd_lengths() {
        for (len, expect_too_long) in [
            (-1i32, false),
            (3, false),
            (i32::MIN, false),
            ((1 << 30) + 5, true),
        ] {
            let mut buf = BytesMut::new();
            buf.put_u8(b'd');
            buf.put_i32(len);
            let err = split_frame(&mut buf).unwrap_err();
            assert_eq!(
                matches!(err, ProtocolError::TooLong { .. }),
                expect_too_long,
                "{err}"
            );
            assert!(matches!(
                err,
                ProtocolError::TooLong { .. } | ProtocolError::InvalidLength { .. }
            ));
        }
        // Exactly the limit is allowed (and simply incomplete here).
        let mut buf = BytesMut::new();
        buf.put_u8(b'd');
        buf.put_i32(1 << 30);
        assert_eq!(split_frame(&mut buf).unwrap(), None);
    }

    #[test]
    fn an_empty_body_is_a_frame() {
        let mut buf = BytesMut::from(&raw_message(b'c', b"")[..]);
        let frame = split_frame(&mut buf).unwrap().unwrap();
        assert_eq!(frame.tag(), b'c');
        assert!(frame.body().is_empty());
        assert_eq!(Frame::new(b'c', b""), frame);
    }

    #[test]
    fn parses_xlog_data() {
        let mut payload = vec![b'w'];
        payload.extend(0x16_B374_D848u64.to_be_bytes());
        payload.extend(0x16_B374_D900u64.to_be_bytes());
        payload.extend(123_456_789i64.to_be_bytes());
        payload.extend(b"Cxyz");
        let msg = parse_copy_data(Bytes::from(payload)).unwrap();
        assert_eq!(
            msg,
            ReplicationMessage::XLogData {
                wal_start: Lsn::new(0x16_B374_D848),
                wal_end: Lsn::new(0x16_B374_D900),
                server_time_micros: 123_456_789,
                data: Bytes::from_static(b"Cxyz"),
            }
        );
    }

    #[test]
    fn parses_xlog_data_with_empty_data() {
        let mut payload = vec![b'w'];
        payload.extend([0u8; 24]);
        let msg = parse_copy_data(Bytes::from(payload)).unwrap();
        assert!(matches!(msg, ReplicationMessage::XLogData { ref data, .. } if data.is_empty()));
    }

    #[test]
    fn parses_keepalives_with_and_without_reply_request() {
        for flag in [0u8, 1u8] {
            let mut payload = vec![b'k'];
            payload.extend(0x1_0000_0010u64.to_be_bytes());
            payload.extend((-5i64).to_be_bytes());
            payload.push(flag);
            assert_eq!(
                parse_copy_data(Bytes::from(payload)).unwrap(),
                ReplicationMessage::Keepalive {
                    wal_end: Lsn::new(0x1_0000_0010),
                    server_time_micros: -5,
                    reply_requested: flag == 1,
                }
            );
        }
    }

    #[test]
    fn rejects_short_or_unknown_copy_data() {
        let cases: [&[u8]; 5] = [b"", b"w1234567", b"k", &[b'k'; 19], b"zabc"];
        for payload in cases {
            assert!(
                parse_copy_data(Bytes::copy_from_slice(payload)).is_err(),
                "{payload:?} parsed"
            );
        }
        assert_eq!(
            parse_copy_data(Bytes::from_static(b"q")).unwrap_err(),
            ProtocolError::UnknownCopyData { kind: 'q' }
        );
    }

    #[test]
    fn encodes_a_standby_status_update_as_copy_data() {
        let status = StandbyStatus {
            write: Lsn::new(3),
            flush: Lsn::new(2),
            apply: Lsn::new(1),
            reply_requested: true,
        };
        let mut out = BytesMut::new();
        encode_standby_status(&status, 42, &mut out);
        let mut expected = vec![b'd', 0, 0, 0, 38, b'r'];
        expected.extend(3u64.to_be_bytes());
        expected.extend(2u64.to_be_bytes());
        expected.extend(1u64.to_be_bytes());
        expected.extend(42i64.to_be_bytes());
        expected.push(1);
        assert_eq!(&out[..], &expected[..]);
    }

    #[test]
    fn parses_copy_both_response() {
        assert_eq!(
            parse_copy_both_response(&[0, 0, 0]).unwrap(),
            CopyBothResponse {
                format: 0,
                column_formats: vec![]
            }
        );
        assert_eq!(
            parse_copy_both_response(&[1, 0, 2, 0, 1, 0, 0])
                .unwrap()
                .column_formats,
            vec![1, 0]
        );
        assert!(parse_copy_both_response(&[0, 0]).is_err());
        assert!(parse_copy_both_response(&[0, 0, 1]).is_err());
    }

    #[test]
    fn parses_error_fields() {
        let body =
            b"SERREUR\0VERROR\0C55006\0Mreplication slot \"x\" is active for PID 123\0Rfunc\0\0";
        let err = parse_error_fields(body).unwrap();
        assert_eq!(err.severity(), "ERROR");
        assert_eq!(err.code(), "55006");
        assert_eq!(
            err.message(),
            "replication slot \"x\" is active for PID 123"
        );
        assert_eq!(err.detail(), None);
        assert_eq!(
            err.to_string(),
            "ERROR 55006: replication slot \"x\" is active for PID 123"
        );

        let body = b"SFATAL\0C28P01\0Mpassword authentication failed\0Dsome detail\0Hsome hint\0\0";
        let err = parse_error_fields(body).unwrap();
        assert_eq!(err.severity(), "FATAL");
        assert_eq!(err.detail(), Some("some detail"));
        assert_eq!(err.hint(), Some("some hint"));
    }

    #[test]
    fn rejects_malformed_error_fields() {
        let cases: [&[u8]; 5] = [
            b"",
            b"SERROR\0C1\0Mx\0",
            b"SERROR\0C1\0Mx",
            b"SERROR\0Mx\0\0",
            b"SERROR\0C1\0Mx\0\0junk",
        ];
        for body in cases {
            assert!(parse_error_fields(body).is_err(), "{body:?} parsed");
        }
    }

    #[test]
    fn converts_clocks_at_the_postgres_epoch() {
        let epoch = UNIX_EPOCH + Duration::from_secs(946_684_800);
        assert_eq!(pg_micros_from_system_time(epoch), 0);
        assert_eq!(
            pg_micros_from_system_time(epoch + Duration::from_micros(1_500_000)),
            1_500_000
        );
        assert_eq!(
            pg_micros_from_system_time(UNIX_EPOCH),
            -PG_EPOCH_OFFSET_MICROS
        );
        assert_eq!(system_time_from_pg_micros(0), epoch);
        assert_eq!(
            system_time_from_pg_micros(-PG_EPOCH_OFFSET_MICROS - 1),
            UNIX_EPOCH - Duration::from_micros(1)
        );
    }

    #[test]
    fn quotes_identifiers_and_literals_for_the_replication_grammar() {
        assert_eq!(quote_identifier("slot_1"), "\"slot_1\"");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("pub"), "'pub'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("back\\slash"), "'back\\slash'");
    }

    fn any_status() -> impl Strategy<Value = StandbyStatus> {
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
            |(write, flush, apply, reply_requested)| StandbyStatus {
                write: Lsn::new(write),
                flush: Lsn::new(flush),
                apply: Lsn::new(apply),
                reply_requested,
            },
        )
    }

    proptest! {
        #[test]
        fn the_framer_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut consumed = 0usize;
            loop {
                let _ = missing_bytes(&buf);
                match split_frame(&mut buf) {
                    Ok(Some(frame)) => {
                        consumed += frame.body().len() + 5;
                        let _ = parse_copy_data(frame.clone().into_body());
                        let _ = parse_error_fields(frame.body());
                        let _ = parse_copy_both_response(frame.body());
                        let _ = parse_standby_status(frame.body());
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            prop_assert_eq!(consumed + buf.len(), bytes.len());
        }

        #[test]
        fn framed_messages_split_back(
            messages in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64)), 0..16),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut stream = BytesMut::new();
            for (tag, body) in &messages {
                write_message(*tag, body, &mut stream);
            }
            // Deliver in two reads cut at an arbitrary point.
            let cut = if stream.is_empty() { 0 } else { cut.index(stream.len() + 1) };
            let rest = stream.split_off(cut);
            let mut buf = stream;
            let mut seen = Vec::new();
            while let Some(frame) = split_frame(&mut buf).unwrap() {
                seen.push((frame.tag(), frame.body().to_vec()));
            }
            buf.extend_from_slice(&rest);
            while let Some(frame) = split_frame(&mut buf).unwrap() {
                seen.push((frame.tag(), frame.body().to_vec()));
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(seen, messages);
        }

        #[test]
        fn standby_status_updates_decode_back(status in any_status(), clock in any::<i64>()) {
            let mut out = BytesMut::new();
            encode_standby_status(&status, clock, &mut out);
            let frame = split_frame(&mut out).unwrap().expect("one whole message");
            prop_assert!(out.is_empty());
            prop_assert_eq!(frame.tag(), COPY_DATA_TAG);
            prop_assert_eq!(parse_standby_status(frame.body()).unwrap(), (status, clock));
        }

        #[test]
        fn copy_data_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_copy_data(Bytes::from(bytes));
        }

        #[test]
        fn clocks_round_trip(micros in -(1i64 << 60)..(1i64 << 60)) {
            prop_assert_eq!(pg_micros_from_system_time(system_time_from_pg_micros(micros)), micros);
        }
    }
}
