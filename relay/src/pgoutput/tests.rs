//! Tests of the decoder: hand-assembled messages in the documented layout (here),
//! bytes captured from a PostgreSQL 15 server ([`captured`]), malformed and
//! truncated input ([`malformed`]), and properties over generated messages and
//! arbitrary bytes ([`properties`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use proptest::prelude::*;

use super::*;

mod captured;
mod malformed;
mod properties;

const UUID: u32 = 2950;
const TEXT: u32 = 25;
const JSONB: u32 = 3802;
const INT4: u32 = 23;

use super::encode::{encode, encode_in_stream, Wire};

fn text(value: &str) -> Column {
    Column::Text(Bytes::copy_from_slice(value.as_bytes()))
}

/// The Relation message of the outbox table: its name and its columns' names,
/// types, key flags and modifiers.
fn assert_outbox_relation(relation: &Relation) {
    assert_eq!(relation.namespace, "public");
    assert_eq!(relation.name, "outbox");
    assert_eq!(relation.replica_identity, ReplicaIdentity::Default);
    let columns: Vec<(&str, u32, bool, i32)> = relation
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.type_oid, c.is_key(), c.type_modifier))
        .collect();
    assert_eq!(
        columns,
        [
            ("id", UUID, true, -1),
            ("aggregatetype", TEXT, false, -1),
            ("aggregateid", TEXT, false, -1),
            ("type", TEXT, false, -1),
            ("payload", JSONB, false, -1),
            ("headers", JSONB, false, -1),
        ]
    );
}

fn decode_ok(bytes: &Bytes) -> LogicalMessage {
    match decode(bytes) {
        Ok(message) => message,
        Err(e) => panic!("{bytes:02x?} did not decode: {e}"),
    }
}

fn decode_err(bytes: &[u8]) -> DecodeError {
    match decode(&Bytes::copy_from_slice(bytes)) {
        Ok(message) => panic!("{bytes:02x?} decoded to {message:?}"),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------
// Hand-assembled messages.

const OUTBOX_OID: u32 = 16_384;
const OUTBOX_ID: &str = "0b4e1c4e-8c57-4d3f-9a0e-5d4a1f0b9c11";
const OUTBOX_PAYLOAD: &str = r#"{"total": 9.5, "orderId": 42}"#;

fn outbox_relation() -> Bytes {
    Wire::tag(b'R')
        .u32(OUTBOX_OID)
        .cstr("public")
        .cstr("outbox")
        .u8(b'd')
        .i16(6)
        .u8(1)
        .cstr("id")
        .u32(UUID)
        .i32(-1)
        .u8(0)
        .cstr("aggregatetype")
        .u32(TEXT)
        .i32(-1)
        .u8(0)
        .cstr("aggregateid")
        .u32(TEXT)
        .i32(-1)
        .u8(0)
        .cstr("type")
        .u32(TEXT)
        .i32(-1)
        .u8(0)
        .cstr("payload")
        .u32(JSONB)
        .i32(-1)
        .u8(0)
        .cstr("headers")
        .u32(JSONB)
        .i32(-1)
        .build()
}

fn outbox_insert() -> Bytes {
    Wire::tag(b'I')
        .u32(OUTBOX_OID)
        .u8(b'N')
        .i16(6)
        .u8(b't')
        .counted(OUTBOX_ID.as_bytes())
        .u8(b't')
        .counted(b"order")
        .u8(b't')
        .counted(b"42")
        .u8(b't')
        .counted(b"OrderCreated")
        .u8(b't')
        .counted(OUTBOX_PAYLOAD.as_bytes())
        .u8(b'n')
        .build()
}

#[test]
fn outbox_transaction_begin_relation_insert_commit() {
    let final_lsn = Lsn::new(0x16_B374_D848);
    let end_lsn = Lsn::new(0x16_B374_D878);
    let timestamp = 790_000_000_123_456;

    let begin = Wire::tag(b'B')
        .lsn(final_lsn)
        .i64(timestamp)
        .u32(733)
        .build();
    let LogicalMessage::Begin(begin) = decode_ok(&begin) else {
        panic!("not a Begin")
    };
    assert_eq!(begin.final_lsn, final_lsn);
    assert_eq!(begin.commit_timestamp, timestamp);
    assert_eq!(begin.xid, 733);

    let LogicalMessage::Relation(relation) = decode_ok(&outbox_relation()) else {
        panic!("not a Relation")
    };
    assert_eq!(relation.id, OUTBOX_OID);
    assert_outbox_relation(&relation);

    let insert_bytes = outbox_insert();
    let LogicalMessage::Insert(insert) = decode_ok(&insert_bytes) else {
        panic!("not an Insert")
    };
    assert_eq!(insert.relation_id, OUTBOX_OID);
    assert_eq!(
        insert.tuple,
        [
            text(OUTBOX_ID),
            text("order"),
            text("42"),
            text("OrderCreated"),
            text(OUTBOX_PAYLOAD),
            Column::Null,
        ]
    );
    assert_eq!(insert.tuple[0].as_str(), Ok(Some(OUTBOX_ID)));
    assert_eq!(insert.tuple[4].as_str(), Ok(Some(OUTBOX_PAYLOAD)));
    assert_eq!(insert.tuple[5].as_str(), Ok(None));
    assert!(insert.tuple[5].is_null());
    // Values share the input buffer instead of copying it.
    let payload = insert.tuple[4].as_bytes().unwrap();
    let input = insert_bytes.as_ptr_range();
    assert!(input.contains(&payload.as_ptr()));

    let commit = Wire::tag(b'C')
        .u8(0)
        .lsn(final_lsn)
        .lsn(end_lsn)
        .i64(timestamp)
        .build();
    let LogicalMessage::Commit(commit) = decode_ok(&commit) else {
        panic!("not a Commit")
    };
    assert_eq!(commit.flags, 0);
    assert_eq!(commit.commit_lsn, begin.final_lsn);
    assert_eq!(commit.end_lsn, end_lsn);
    assert!(commit.end_lsn > commit.commit_lsn);
    assert_eq!(commit.commit_timestamp, begin.commit_timestamp);
    assert_eq!(commit.commit_time(), begin.commit_time());
}

#[test]
fn update_with_old_key_tuple() {
    let old_key = [text("1"), Column::Null, Column::Null];
    let new = [text("2"), text("order"), Column::Null];
    let bytes = Wire::tag(b'U')
        .u32(OUTBOX_OID)
        .u8(b'K')
        .tuple(&old_key)
        .u8(b'N')
        .tuple(&new)
        .build();
    let LogicalMessage::Update(update) = decode_ok(&bytes) else {
        panic!("not an Update")
    };
    assert_eq!(update.relation_id, OUTBOX_OID);
    assert_eq!(update.old, Some(OldTuple::Key(old_key.to_vec())));
    assert_eq!(
        update.old.as_ref().map(OldTuple::columns),
        Some(&old_key[..])
    );
    assert_eq!(update.new, new);
}

#[test]
fn update_with_full_old_row_and_without_old_tuple() {
    let old = [text("1"), text("x")];
    let new = [text("1"), text("y")];
    let full = Wire::tag(b'U')
        .u32(5)
        .u8(b'O')
        .tuple(&old)
        .u8(b'N')
        .tuple(&new)
        .build();
    let LogicalMessage::Update(update) = decode_ok(&full) else {
        panic!("not an Update")
    };
    assert_eq!(update.old, Some(OldTuple::Full(old.to_vec())));
    assert_eq!(update.new, new);

    let plain = Wire::tag(b'U').u32(5).u8(b'N').tuple(&new).build();
    let LogicalMessage::Update(update) = decode_ok(&plain) else {
        panic!("not an Update")
    };
    assert_eq!(update.relation_id, 5);
    assert_eq!(update.old, None);
    assert_eq!(update.new, new);
}

#[test]
fn delete_with_key_and_with_full_row() {
    let key = [text(OUTBOX_ID), Column::Null, Column::Null];
    let bytes = Wire::tag(b'D').u32(OUTBOX_OID).u8(b'K').tuple(&key).build();
    assert_eq!(
        decode_ok(&bytes),
        LogicalMessage::Delete(Delete {
            relation_id: OUTBOX_OID,
            old: OldTuple::Key(key.to_vec()),
        })
    );

    let row = [text("1"), text("y")];
    let bytes = Wire::tag(b'D').u32(9).u8(b'O').tuple(&row).build();
    let LogicalMessage::Delete(delete) = decode_ok(&bytes) else {
        panic!("not a Delete")
    };
    assert_eq!(delete.relation_id, 9);
    assert_eq!(delete.old, OldTuple::Full(row.to_vec()));
}

#[test]
fn truncate_of_two_relations() {
    let bytes = Wire::tag(b'T')
        .u32(2)
        .u8(TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY)
        .u32(16_417)
        .u32(16_424)
        .build();
    let LogicalMessage::Truncate(truncate) = decode_ok(&bytes) else {
        panic!("not a Truncate")
    };
    assert_eq!(truncate.relation_ids, [16_417, 16_424]);
    assert!(truncate.cascade());
    assert!(truncate.restart_identity());

    let plain = Wire::tag(b'T').u32(1).u8(0).u32(7).build();
    let LogicalMessage::Truncate(truncate) = decode_ok(&plain) else {
        panic!("not a Truncate")
    };
    assert_eq!(truncate.relation_ids, [7]);
    assert!(!truncate.cascade());
    assert!(!truncate.restart_identity());
}

#[test]
fn transactional_and_non_transactional_messages() {
    let bytes = Wire::tag(b'M')
        .u8(1)
        .lsn(Lsn::new(0x155_A538))
        .cstr("outbox")
        .counted(br#"{"a":1}"#)
        .build();
    let LogicalMessage::Message(message) = decode_ok(&bytes) else {
        panic!("not a Message")
    };
    assert!(message.transactional());
    assert_eq!(message.flags, MESSAGE_TRANSACTIONAL);
    assert_eq!(message.lsn, Lsn::new(0x155_A538));
    assert_eq!(message.prefix, "outbox");
    assert_eq!(message.content, Bytes::from_static(br#"{"a":1}"#));

    let bytes = Wire::tag(b'M')
        .u8(0)
        .lsn(Lsn::new(42))
        .cstr("")
        .counted(b"")
        .build();
    let LogicalMessage::Message(message) = decode_ok(&bytes) else {
        panic!("not a Message")
    };
    assert!(!message.transactional());
    assert_eq!(message.lsn, Lsn::new(42));
    assert_eq!(message.prefix, "");
    assert!(message.content.is_empty());
}

#[test]
fn unchanged_toast_and_binary_columns() {
    let bytes = Wire::tag(b'U')
        .u32(3)
        .u8(b'N')
        .tuple(&[
            text("1"),
            Column::UnchangedToast,
            Column::Binary(Bytes::from_static(&[0, 0, 0, 1])),
        ])
        .build();
    let LogicalMessage::Update(update) = decode_ok(&bytes) else {
        panic!("not an Update")
    };
    assert_eq!(update.new[1], Column::UnchangedToast);
    assert_eq!(update.new[1].as_str(), Err(ColumnTextError::UnchangedToast));
    assert_eq!(update.new[1].as_bytes(), None);
    assert_eq!(
        update.new[2],
        Column::Binary(Bytes::from_static(&[0, 0, 0, 1]))
    );
    assert_eq!(update.new[2].as_str(), Err(ColumnTextError::Binary));
    assert_eq!(
        update.new[2].as_bytes().map(|b| b.as_ref()),
        Some(&[0u8, 0, 0, 1][..])
    );
}

#[test]
fn origin_message() {
    let bytes = Wire::tag(b'O')
        .lsn(Lsn::new(0x1234_ABCD))
        .cstr("upstream")
        .build();
    assert_eq!(
        decode_ok(&bytes),
        LogicalMessage::Origin(Origin {
            commit_lsn: Lsn::new(0x1234_ABCD),
            name: "upstream".to_owned(),
        })
    );
}

#[test]
fn type_message() {
    let bytes = Wire::tag(b'Y')
        .u32(16_392)
        .cstr("public")
        .cstr("mood")
        .build();
    assert_eq!(
        decode_ok(&bytes),
        LogicalMessage::Type(Type {
            id: 16_392,
            namespace: "public".to_owned(),
            name: "mood".to_owned(),
        })
    );
}

#[test]
fn relation_with_full_identity_and_pg_catalog_namespace() {
    let bytes = Wire::tag(b'R')
        .u32(1)
        .cstr("")
        .cstr("t")
        .u8(b'f')
        .i16(1)
        .u8(1)
        .cstr("a")
        .u32(1043)
        .i32(24)
        .build();
    let LogicalMessage::Relation(relation) = decode_ok(&bytes) else {
        panic!("not a Relation")
    };
    assert_eq!(relation.namespace, "");
    assert_eq!(relation.replica_identity, ReplicaIdentity::Full);
    assert_eq!(relation.columns[0].type_modifier, 24);
    for byte in [b'd', b'n', b'f', b'i', b'x'] {
        assert_eq!(ReplicaIdentity::from_byte(byte).to_byte(), byte);
    }
    assert_eq!(
        ReplicaIdentity::from_byte(b'x'),
        ReplicaIdentity::Other(b'x')
    );
}

// ---------------------------------------------------------------------------
// Timestamps.

#[test]
fn timestamps_convert_from_the_postgres_epoch() {
    assert_eq!(
        PG_EPOCH_UNIX_MICROS,
        i128::from(PG_EPOCH_UNIX_SECS) * 1_000_000
    );
    let pg_epoch = UNIX_EPOCH + Duration::from_secs(946_684_800);
    assert_eq!(pg_timestamp_to_system_time(0), Some(pg_epoch));
    assert_eq!(
        pg_timestamp_to_system_time(1_500_000),
        Some(pg_epoch + Duration::from_micros(1_500_000))
    );
    // Before the PostgreSQL epoch, and before the Unix epoch.
    assert_eq!(
        pg_timestamp_to_system_time(-1),
        Some(pg_epoch - Duration::from_micros(1))
    );
    assert_eq!(
        pg_timestamp_to_system_time(-946_684_801_000_000),
        UNIX_EPOCH.checked_sub(Duration::from_secs(1))
    );
    // 2024-01-02T03:04:05Z.
    assert_eq!(
        pg_timestamp_to_system_time(757_479_845_000_000),
        Some(UNIX_EPOCH + Duration::from_secs(1_704_164_645))
    );
    // 'infinity' and '-infinity'.
    assert_eq!(pg_timestamp_to_system_time(i64::MAX), None);
    assert_eq!(pg_timestamp_to_system_time(i64::MIN), None);
}

/// A session with a streamed transaction between ordinary ones: the decoder
/// reads the xid after the tag only inside the block.
#[test]
fn a_decoder_knows_when_a_stream_block_is_open() {
    let insert = LogicalMessage::Insert(Insert {
        relation_id: 16_384,
        tuple: vec![text("1")],
    });
    let start = LogicalMessage::StreamStart(StreamStart {
        xid: 700,
        first_segment: true,
    });
    let abort = LogicalMessage::StreamAbort(StreamAbort {
        xid: 700,
        subxid: 701,
    });
    let mut decoder = Decoder::new();
    let mut next = |bytes: Bytes| decoder.decode(&bytes);
    assert_eq!(
        next(encode(&insert)),
        Ok(Decoded {
            xid: None,
            message: insert.clone()
        })
    );
    assert_eq!(next(encode(&start)).unwrap().message, start);
    assert_eq!(
        next(encode_in_stream(701, &insert)),
        Ok(Decoded {
            xid: Some(701),
            message: insert.clone()
        })
    );
    // A Begin cannot come inside a block; the block stays open.
    let begin = Wire::tag(b'B').lsn(Lsn::new(1)).i64(0).u32(9).build();
    assert_eq!(
        next(begin.clone()).unwrap_err().kind(),
        &DecodeErrorKind::OutOfPlace {
            tag: b'B',
            inside: true
        }
    );
    assert_eq!(
        next(encode(&LogicalMessage::StreamStop)).unwrap().message,
        LogicalMessage::StreamStop
    );
    assert_eq!(next(encode(&abort)).unwrap().message, abort);
    assert!(matches!(
        next(begin).unwrap().message,
        LogicalMessage::Begin(_)
    ));
    let e = next(encode(&LogicalMessage::StreamStop)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "malformed pgoutput message at byte 0: message 'E' cannot come outside a stream block"
    );
}

#[test]
fn stream_commit_and_abort_layouts() {
    let commit = Wire::tag(b'c')
        .u32(700)
        .u8(0)
        .lsn(Lsn::new(0x1_0000_0100))
        .lsn(Lsn::new(0x1_0000_0128))
        .i64(1_000_000)
        .build();
    let LogicalMessage::StreamCommit(commit) = decode_ok(&commit) else {
        panic!("not a Stream Commit");
    };
    assert_eq!(
        (commit.xid, commit.commit_lsn, commit.end_lsn),
        (700, Lsn::new(0x1_0000_0100), Lsn::new(0x1_0000_0128))
    );
    assert_eq!(
        commit.commit_time(),
        Some(UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS as u64 + 1))
    );
    let LogicalMessage::StreamAbort(abort) = decode_ok(&Wire::tag(b'A').u32(700).u32(700).build())
    else {
        panic!("not a Stream Abort");
    };
    assert!(abort.is_whole());
    let LogicalMessage::StreamStart(start) = decode_ok(&Wire::tag(b'S').u32(700).u8(0).build())
    else {
        panic!("not a Stream Start");
    };
    assert!(!start.first_segment);
}
