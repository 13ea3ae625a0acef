//! Malformed and truncated input: errors, never panics.

use super::*;

/// Every strict prefix of a valid message fails with a "too short" error.
fn assert_strict_prefixes_fail(message: &Bytes) {
    for len in 0..message.len() {
        match decode(&message.slice(..len)) {
            Ok(decoded) => panic!("prefix of {len} bytes of {message:02x?} decoded: {decoded:?}"),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    DecodeErrorKind::UnexpectedEnd { .. } | DecodeErrorKind::MissingNul { .. }
                ),
                "prefix of {len} bytes: unexpected error {e}"
            ),
        }
    }
}

/// Hand-assembled samples of every message kind, for the prefix test.
fn hand_built_samples() -> Vec<Bytes> {
    vec![
        Wire::tag(b'B')
            .lsn(Lsn::new(0x1_0000_0028))
            .i64(0)
            .u32(7)
            .build(),
        Wire::tag(b'C')
            .u8(0)
            .lsn(Lsn::new(1))
            .lsn(Lsn::new(2))
            .i64(3)
            .build(),
        Wire::tag(b'O').lsn(Lsn::new(9)).cstr("up").build(),
        outbox_relation(),
        Wire::tag(b'Y').u32(1).cstr("public").cstr("mood").build(),
        outbox_insert(),
        Wire::tag(b'U')
            .u32(1)
            .u8(b'K')
            .tuple(&[text("1"), Column::Null])
            .u8(b'N')
            .tuple(&[text("2"), Column::UnchangedToast])
            .build(),
        Wire::tag(b'U').u32(1).u8(b'N').tuple(&[text("2")]).build(),
        Wire::tag(b'D').u32(1).u8(b'O').tuple(&[text("1")]).build(),
        Wire::tag(b'T').u32(2).u8(0).u32(1).u32(2).build(),
        Wire::tag(b'M')
            .u8(1)
            .lsn(Lsn::new(5))
            .cstr("p")
            .counted(b"xy")
            .build(),
        Wire::tag(b'I')
            .u32(1)
            .u8(b'N')
            .tuple(&[Column::Binary(Bytes::from_static(&[0, 0, 0, 1]))])
            .build(),
        Wire::tag(b'S').u32(7).u8(1).build(),
        Wire::tag(b'c')
            .u32(7)
            .u8(0)
            .lsn(Lsn::new(1))
            .lsn(Lsn::new(2))
            .i64(3)
            .build(),
        Wire::tag(b'A').u32(7).u32(8).build(),
    ]
}

#[test]
fn every_strict_prefix_is_an_error() {
    for sample in hand_built_samples().iter().chain(captured::all().iter()) {
        decode_ok(sample);
        assert_strict_prefixes_fail(sample);
    }
}

#[test]
fn empty_input_is_an_unexpected_end() {
    let e = decode_err(b"");
    assert_eq!(e.offset(), 0);
    assert_eq!(
        e.kind(),
        &DecodeErrorKind::UnexpectedEnd {
            field: "message tag"
        }
    );
}

#[test]
fn unknown_and_unsupported_tags() {
    let e = decode_err(b"Z\x00\x00");
    assert_eq!(e.kind(), &DecodeErrorKind::UnknownMessage(b'Z'));
    assert_eq!(e.offset(), 0);
    assert_eq!(
        e.to_string(),
        "malformed pgoutput message at byte 0: unknown message tag 'Z' (0x5a)"
    );
    for tag in *b"bPKrp" {
        let e = decode_err(&[tag, 0, 0, 0, 0]);
        assert_eq!(e.kind(), &DecodeErrorKind::UnsupportedMessage(tag));
    }
}

#[test]
fn unknown_column_kind() {
    let bytes = Wire::tag(b'I')
        .u32(1)
        .u8(b'N')
        .i16(2)
        .u8(b'n')
        .u8(b'x')
        .build();
    let e = decode_err(&bytes);
    assert_eq!(e.kind(), &DecodeErrorKind::UnknownColumnKind(b'x'));
    assert_eq!(e.offset(), 9);
}

#[test]
fn wrong_tuple_markers() {
    let insert = Wire::tag(b'I').u32(1).u8(b'K').i16(0).build();
    assert_eq!(
        decode_err(&insert).kind(),
        &DecodeErrorKind::UnexpectedTupleMarker {
            expected: "'N'",
            found: b'K'
        }
    );
    let update = Wire::tag(b'U').u32(1).u8(b'X').i16(0).build();
    assert_eq!(
        decode_err(&update).kind(),
        &DecodeErrorKind::UnexpectedTupleMarker {
            expected: "'K', 'O' or 'N'",
            found: b'X'
        }
    );
    let update = Wire::tag(b'U')
        .u32(1)
        .u8(b'K')
        .i16(0)
        .u8(b'O')
        .i16(0)
        .build();
    let e = decode_err(&update);
    assert_eq!(
        e.kind(),
        &DecodeErrorKind::UnexpectedTupleMarker {
            expected: "'N'",
            found: b'O'
        }
    );
    assert_eq!(e.offset(), 8);
    let delete = Wire::tag(b'D').u32(1).u8(b'N').i16(0).build();
    assert_eq!(
        decode_err(&delete).kind(),
        &DecodeErrorKind::UnexpectedTupleMarker {
            expected: "'K' or 'O'",
            found: b'N'
        }
    );
}

#[test]
fn negative_counts_and_lengths() {
    let tuple = Wire::tag(b'I').u32(1).u8(b'N').i16(-1).build();
    assert_eq!(
        decode_err(&tuple).kind(),
        &DecodeErrorKind::NegativeLength {
            field: "tuple column count",
            value: -1
        }
    );
    let value = Wire::tag(b'I')
        .u32(1)
        .u8(b'N')
        .i16(1)
        .u8(b't')
        .i32(-5)
        .build();
    let e = decode_err(&value);
    assert_eq!(
        e.kind(),
        &DecodeErrorKind::NegativeLength {
            field: "column value length",
            value: -5
        }
    );
    assert_eq!(e.offset(), 9);
    let relation = Wire::tag(b'R')
        .u32(1)
        .cstr("s")
        .cstr("t")
        .u8(b'd')
        .i16(i16::MIN)
        .build();
    assert!(matches!(
        decode_err(&relation).kind(),
        DecodeErrorKind::NegativeLength { value: -32768, .. }
    ));
    let message = Wire::tag(b'M')
        .u8(0)
        .lsn(Lsn::ZERO)
        .cstr("p")
        .i32(i32::MIN)
        .build();
    assert!(matches!(
        decode_err(&message).kind(),
        DecodeErrorKind::NegativeLength { .. }
    ));
}

#[test]
fn huge_lengths_fail_without_allocating() {
    let value = Wire::tag(b'I')
        .u32(1)
        .u8(b'N')
        .i16(1)
        .u8(b'b')
        .i32(i32::MAX)
        .raw(b"abc")
        .build();
    assert_eq!(
        decode_err(&value).kind(),
        &DecodeErrorKind::UnexpectedEnd {
            field: "column value"
        }
    );
    let truncate = Wire::tag(b'T').u32(u32::MAX).u8(0).u32(1).build();
    assert_eq!(
        decode_err(&truncate).kind(),
        &DecodeErrorKind::UnexpectedEnd {
            field: "truncated relation id"
        }
    );
    let columns = Wire::tag(b'I').u32(1).u8(b'N').i16(i16::MAX).build();
    assert!(matches!(
        decode_err(&columns).kind(),
        DecodeErrorKind::UnexpectedEnd { .. }
    ));
}

#[test]
fn bad_strings() {
    let unterminated = Wire::tag(b'O').lsn(Lsn::ZERO).raw(b"abc").build();
    let e = decode_err(&unterminated);
    assert_eq!(
        e.kind(),
        &DecodeErrorKind::MissingNul {
            field: "origin name"
        }
    );
    assert_eq!(e.offset(), 9);
    let not_utf8 = Wire::tag(b'Y').u32(1).raw(b"p\xffq\0").cstr("t").build();
    let e = decode_err(&not_utf8);
    assert_eq!(
        e.kind(),
        &DecodeErrorKind::InvalidUtf8 {
            field: "type namespace"
        }
    );
    assert_eq!(e.offset(), 5);
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut bytes = outbox_insert().to_vec();
    let len = bytes.len();
    bytes.extend_from_slice(b"\0\0");
    let e = decode_err(&bytes);
    assert_eq!(e.kind(), &DecodeErrorKind::TrailingBytes(2));
    assert_eq!(e.offset(), len);
}

#[test]
fn column_text_must_be_utf8() {
    let column = Column::Text(Bytes::from_static(b"\xc3("));
    assert!(matches!(
        column.as_str(),
        Err(ColumnTextError::InvalidUtf8(_))
    ));
}
