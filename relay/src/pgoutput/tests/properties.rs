//! Properties: arbitrary bytes never panic; built messages round-trip.

use super::*;
use crate::pgoutput::encode::carries_xid;

const TAGS: &[u8] = b"BCORYIUDTMSEcAbPKrp";

fn arb_lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn::new)
}

fn arb_string() -> impl Strategy<Value = String> {
    "[^\\x00]{0,12}"
}

fn arb_bytes() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn arb_column() -> impl Strategy<Value = Column> {
    prop_oneof![
        Just(Column::Null),
        Just(Column::UnchangedToast),
        arb_bytes().prop_map(Column::Text),
        arb_bytes().prop_map(Column::Binary),
    ]
}

fn arb_tuple() -> impl Strategy<Value = Vec<Column>> {
    prop::collection::vec(arb_column(), 0..8)
}

fn arb_old() -> impl Strategy<Value = OldTuple> {
    prop_oneof![
        arb_tuple().prop_map(OldTuple::Key),
        arb_tuple().prop_map(OldTuple::Full),
    ]
}

fn arb_relation_column() -> impl Strategy<Value = RelationColumn> {
    (any::<u8>(), arb_string(), any::<u32>(), any::<i32>()).prop_map(
        |(flags, name, type_oid, type_modifier)| RelationColumn {
            flags,
            name,
            type_oid,
            type_modifier,
        },
    )
}

fn arb_message() -> impl Strategy<Value = LogicalMessage> {
    prop_oneof![
        (arb_lsn(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_timestamp, xid)| {
            LogicalMessage::Begin(Begin {
                final_lsn,
                commit_timestamp,
                xid,
            })
        }),
        (any::<u8>(), arb_lsn(), arb_lsn(), any::<i64>()).prop_map(
            |(flags, commit_lsn, end_lsn, commit_timestamp)| {
                LogicalMessage::Commit(Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_timestamp,
                })
            }
        ),
        (arb_lsn(), arb_string())
            .prop_map(|(commit_lsn, name)| LogicalMessage::Origin(Origin { commit_lsn, name })),
        (
            any::<u32>(),
            arb_string(),
            arb_string(),
            any::<u8>(),
            prop::collection::vec(arb_relation_column(), 0..6),
        )
            .prop_map(|(id, namespace, name, identity, columns)| {
                LogicalMessage::Relation(Relation {
                    id,
                    namespace,
                    name,
                    replica_identity: ReplicaIdentity::from_byte(identity),
                    columns,
                })
            }),
        (any::<u32>(), arb_string(), arb_string()).prop_map(|(id, namespace, name)| {
            LogicalMessage::Type(Type {
                id,
                namespace,
                name,
            })
        }),
        (any::<u32>(), arb_tuple()).prop_map(|(relation_id, tuple)| {
            LogicalMessage::Insert(Insert { relation_id, tuple })
        }),
        (any::<u32>(), prop::option::of(arb_old()), arb_tuple()).prop_map(
            |(relation_id, old, new)| {
                LogicalMessage::Update(Update {
                    relation_id,
                    old,
                    new,
                })
            }
        ),
        (any::<u32>(), arb_old())
            .prop_map(|(relation_id, old)| LogicalMessage::Delete(Delete { relation_id, old })),
        (any::<u8>(), prop::collection::vec(any::<u32>(), 0..6)).prop_map(
            |(options, relation_ids)| {
                LogicalMessage::Truncate(Truncate {
                    options,
                    relation_ids,
                })
            }
        ),
        (any::<u8>(), arb_lsn(), arb_string(), arb_bytes()).prop_map(
            |(flags, lsn, prefix, content)| {
                LogicalMessage::Message(Message {
                    flags,
                    lsn,
                    prefix,
                    content,
                })
            }
        ),
        (any::<u32>(), any::<bool>()).prop_map(|(xid, first_segment)| {
            LogicalMessage::StreamStart(StreamStart { xid, first_segment })
        }),
        Just(LogicalMessage::StreamStop),
        (
            any::<u32>(),
            any::<u8>(),
            arb_lsn(),
            arb_lsn(),
            any::<i64>()
        )
            .prop_map(|(xid, flags, commit_lsn, end_lsn, commit_timestamp)| {
                LogicalMessage::StreamCommit(StreamCommit {
                    xid,
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_timestamp,
                })
            }),
        (any::<u32>(), any::<u32>())
            .prop_map(|(xid, subxid)| LogicalMessage::StreamAbort(StreamAbort { xid, subxid })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(&Bytes::from(data));
    }

    #[test]
    fn arbitrary_bodies_after_each_tag_never_panic(
        tag in prop::sample::select(TAGS),
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut data = vec![tag];
        data.extend_from_slice(&body);
        let _ = decode(&Bytes::from(data));
    }

    #[test]
    fn built_messages_round_trip(message in arb_message()) {
        prop_assert_eq!(decode(&encode(&message)), Ok(message));
    }

    #[test]
    fn messages_inside_a_stream_block_round_trip(message in arb_message(), xid in any::<u32>()) {
        let bytes = encode_in_stream(xid, &message);
        let decoded = decode_in_stream(&bytes);
        match &message {
            m if carries_xid(m) => prop_assert_eq!(
                decoded,
                Ok(Decoded { xid: Some(xid), message })
            ),
            LogicalMessage::Origin(_) | LogicalMessage::StreamStop => {
                prop_assert_eq!(decoded, Ok(Decoded { xid: None, message }))
            }
            _ => {
                let tag = bytes[0];
                prop_assert_eq!(
                    decoded.map_err(|e| e.kind().clone()),
                    Err(DecodeErrorKind::OutOfPlace { tag, inside: true })
                );
            }
        }
    }

    #[test]
    fn strict_prefixes_of_built_messages_fail(
        message in arb_message(),
        cut in any::<prop::sample::Index>(),
    ) {
        let bytes = encode(&message);
        let len = cut.index(bytes.len());
        let result = decode(&bytes.slice(..len));
        prop_assert!(result.is_err(), "prefix of {} bytes decoded: {:?}", len, result);
    }

    #[test]
    fn built_messages_with_trailing_bytes_fail(
        message in arb_message(),
        extra in prop::collection::vec(any::<u8>(), 1..8),
    ) {
        let mut bytes = encode(&message).to_vec();
        let len = bytes.len();
        bytes.extend_from_slice(&extra);
        let e = decode(&Bytes::from(bytes)).unwrap_err();
        prop_assert_eq!(e.kind(), &DecodeErrorKind::TrailingBytes(extra.len()));
        prop_assert_eq!(e.offset(), len);
    }

    #[test]
    fn mutated_messages_never_panic(
        message in arb_message(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = encode(&message).to_vec();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        let _ = decode(&Bytes::from(bytes.clone()));
        let _ = decode_in_stream(&Bytes::from(bytes));
    }

    #[test]
    fn arbitrary_bytes_inside_a_stream_block_never_panic(
        tag in prop::sample::select(TAGS),
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut data = vec![tag];
        data.extend_from_slice(&body);
        let _ = decode_in_stream(&Bytes::from(data));
    }

    #[test]
    fn timestamp_conversion_never_panics(micros in any::<i64>()) {
        let converted = pg_timestamp_to_system_time(micros);
        if let (Some(time), Some(later)) = (converted, micros.checked_add(1)) {
            if let Some(next) = pg_timestamp_to_system_time(later) {
                prop_assert_eq!(next.duration_since(time).ok(), Some(Duration::from_micros(1)));
            }
        }
    }
}
