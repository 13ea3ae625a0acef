//! Messages captured from a real PostgreSQL 15 server.
//!
//! A throwaway cluster with `wal_level=logical`, a publication `pub` FOR ALL TABLES
//! and a slot `cap` (plugin `pgoutput`); after the statements below, each message
//! was read with
//!
//! ```sql
//! SELECT encode(data, 'hex') FROM pg_logical_slot_peek_binary_changes('cap', NULL, NULL,
//!     'proto_version', '1', 'publication_names', 'pub', 'messages', 'true');
//! ```
//!
//! The tables:
//!
//! ```sql
//! CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL,
//!     aggregateid text NOT NULL, type text NOT NULL, payload jsonb, headers jsonb);
//! CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
//! CREATE TABLE moods (id int PRIMARY KEY, m mood);
//! CREATE TABLE docs (id int PRIMARY KEY, body text, n int);
//! CREATE TABLE full_t (a int, b text);
//! ALTER TABLE full_t REPLICA IDENTITY FULL;
//! CREATE TABLE t1 (id serial PRIMARY KEY);
//! CREATE TABLE t2 (id serial PRIMARY KEY);
//! ```

use super::*;

fn hex(text: &str) -> Bytes {
    assert!(text.len() % 2 == 0, "odd hex length");
    let bytes = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect::<Vec<u8>>();
    Bytes::from(bytes)
}

fn captured(text: &str) -> LogicalMessage {
    decode_ok(&hex(text))
}

/// Every captured message.
pub(super) fn all() -> Vec<Bytes> {
    [
        OUTBOX_BEGIN,
        OUTBOX_RELATION,
        OUTBOX_INSERT,
        OUTBOX_COMMIT,
        OUTBOX_UPDATE_KEY,
        OUTBOX_DELETE,
        MOOD_TYPE,
        MOODS_RELATION,
        MOODS_INSERT,
        DOCS_UPDATE_TOAST,
        FULL_RELATION,
        FULL_UPDATE,
        FULL_DELETE,
        TRUNCATE_BEGIN,
        TRUNCATE,
        TRUNCATE_COMMIT,
        MESSAGE_BEGIN,
        MESSAGE_TRANSACTIONAL,
        MESSAGE_COMMIT,
        MESSAGE_NON_TRANSACTIONAL,
        ORIGIN_BEGIN,
        ORIGIN,
        ORIGIN_COMMIT,
    ]
    .into_iter()
    .map(hex)
    .collect()
}

// INSERT INTO outbox VALUES ('7f1b6c2e-4d3a-4b5e-9c8d-0123456789ab', 'order', '42',
//     'OrderCreated', '{"orderId": 42, "total": 9.5}', NULL);
const OUTBOX_BEGIN: &str = "420000000001556d380003040f25c55c7e000002dd";
const OUTBOX_RELATION: &str = concat!(
    "52000040007075626c6963006f7574626f78006400060169640000000b86ffffffff006167677265",
    "67617465747970650000000019ffffffff0061676772656761746569640000000019ffffffff0074",
    "7970650000000019ffffffff007061796c6f61640000000edaffffffff0068656164657273000000",
    "0edaffffffff",
);
const OUTBOX_INSERT: &str = concat!(
    "49000040004e0006740000002437663162366332652d346433612d346235652d396338642d303132",
    "33343536373839616274000000056f7264657274000000023432740000000c4f7264657243726561",
    "746564740000001d7b22746f74616c223a20392e352c20226f726465724964223a2034327d6e",
);
const OUTBOX_COMMIT: &str = "43000000000001556d380000000001556d680003040f25c55c7e";

// UPDATE outbox SET id = '00000000-0000-0000-0000-000000000001' WHERE aggregateid = '42';
const OUTBOX_UPDATE_KEY: &str = concat!(
    "55000040004b0006740000002437663162366332652d346433612d346235652d396338642d303132",
    "3334353637383961626e6e6e6e6e4e0006740000002430303030303030302d303030302d30303030",
    "2d303030302d30303030303030303030303174000000056f7264657274000000023432740000000c",
    "4f7264657243726561746564740000001d7b22746f74616c223a20392e352c20226f726465724964",
    "223a2034327d6e",
);

// DELETE FROM outbox WHERE aggregateid = '42';
const OUTBOX_DELETE: &str = concat!(
    "44000040004b0006740000002430303030303030302d303030302d303030302d303030302d303030",
    "3030303030303030316e6e6e6e6e",
);

// INSERT INTO moods VALUES (1, 'happy');
const MOOD_TYPE: &str = "59000040087075626c6963006d6f6f6400";
const MOODS_RELATION: &str = concat!(
    "520000400f7075626c6963006d6f6f6473006400020169640000000017ffffffff006d0000004008",
    "ffffffff",
);
const MOODS_INSERT: &str = "490000400f4e000274000000013174000000056861707079";

// INSERT INTO docs SELECT 1, string_agg(md5(i::text), ''), 0 FROM generate_series(1, 200) i;
// UPDATE docs SET n = 1 WHERE id = 1;  -- body is stored out of line and not sent
const DOCS_UPDATE_TOAST: &str = "55000040144e000374000000013175740000000131";

// INSERT INTO full_t VALUES (1, 'x'); UPDATE full_t SET b = 'y'; DELETE FROM full_t;
const FULL_RELATION: &str = concat!(
    "520000401b7075626c69630066756c6c5f740066000201610000000017ffffffff01620000000019",
    "ffffffff",
);
const FULL_UPDATE: &str = "550000401b4f00027400000001317400000001784e0002740000000131740000000179";
const FULL_DELETE: &str = "440000401b4f0002740000000131740000000179";

// TRUNCATE t1, t2 RESTART IDENTITY;  (the Relation messages of t1 and t2 omitted)
const TRUNCATE_BEGIN: &str = "42000000000155a3100003040f25c573e5000002e8";
const TRUNCATE: &str = "5400000002020000402100004028";
const TRUNCATE_COMMIT: &str = "4300000000000155a310000000000155a4f80003040f25c573e5";

// BEGIN; SELECT pg_logical_emit_message(true, 'outbox', '{"a":1}'); COMMIT;
const MESSAGE_BEGIN: &str = "42000000000155a5380003040f25c57786000002e9";
const MESSAGE_TRANSACTIONAL: &str = "4d01000000000155a5386f7574626f7800000000077b2261223a317d";
const MESSAGE_COMMIT: &str = "4300000000000155a538000000000155a5680003040f25c57786";

// SELECT pg_logical_emit_message(false, 'outbox', 'hello');
const MESSAGE_NON_TRANSACTIONAL: &str = "4d00000000000155a5a86f7574626f78000000000568656c6c6f";

// SELECT pg_replication_origin_create('upstream');
// SELECT pg_replication_origin_session_setup('upstream');
// BEGIN;
// SELECT pg_replication_origin_xact_setup('0/1234ABCD', '2024-01-02 03:04:05+00');
// INSERT INTO t1 DEFAULT VALUES;
// COMMIT;  (the Relation and Insert messages omitted)
const ORIGIN_BEGIN: &str = "42000000000155a9580002b0ec8515f340000002eb";
const ORIGIN: &str = "4f000000001234abcd757073747265616d00";
const ORIGIN_COMMIT: &str = "4300000000000155a958000000000155a9a00002b0ec8515f340";

const OLD_ID: &str = "7f1b6c2e-4d3a-4b5e-9c8d-0123456789ab";
const NEW_ID: &str = "00000000-0000-0000-0000-000000000001";
/// jsonb renders keys shortest first.
const PAYLOAD: &str = r#"{"total": 9.5, "orderId": 42}"#;

fn after_2020(time: Option<SystemTime>) -> bool {
    time.is_some_and(|t| t > UNIX_EPOCH + Duration::from_secs(1_577_836_800))
}

#[test]
fn captured_outbox_insert_transaction_pg15() {
    let LogicalMessage::Begin(begin) = captured(OUTBOX_BEGIN) else {
        panic!("not a Begin")
    };
    assert_eq!(begin.final_lsn, "0/1556D38".parse().unwrap());
    assert_eq!(begin.xid, 733);
    assert!(after_2020(begin.commit_time()));

    let LogicalMessage::Relation(relation) = captured(OUTBOX_RELATION) else {
        panic!("not a Relation")
    };
    assert_eq!(relation.id, 16_384);
    assert_outbox_relation(&relation);

    let LogicalMessage::Insert(insert) = captured(OUTBOX_INSERT) else {
        panic!("not an Insert")
    };
    assert_eq!(insert.relation_id, relation.id);
    let values: Vec<Option<&str>> = insert.tuple.iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(
        values,
        [
            Some(OLD_ID),
            Some("order"),
            Some("42"),
            Some("OrderCreated"),
            Some(PAYLOAD),
            None,
        ]
    );

    let LogicalMessage::Commit(commit) = captured(OUTBOX_COMMIT) else {
        panic!("not a Commit")
    };
    assert_eq!(commit.flags, 0);
    assert_eq!(commit.commit_lsn, begin.final_lsn);
    assert_eq!(commit.end_lsn, "0/1556D68".parse().unwrap());
    assert!(commit.end_lsn > commit.commit_lsn);
    assert_eq!(commit.commit_timestamp, begin.commit_timestamp);
}

#[test]
fn captured_update_with_old_key_and_delete_pg15() {
    let LogicalMessage::Update(update) = captured(OUTBOX_UPDATE_KEY) else {
        panic!("not an Update")
    };
    assert_eq!(update.relation_id, 16_384);
    let mut old_key = vec![text(OLD_ID)];
    old_key.resize(6, Column::Null);
    assert_eq!(update.old, Some(OldTuple::Key(old_key)));
    assert_eq!(
        update.new,
        [
            text(NEW_ID),
            text("order"),
            text("42"),
            text("OrderCreated"),
            text(PAYLOAD),
            Column::Null,
        ]
    );

    let LogicalMessage::Delete(delete) = captured(OUTBOX_DELETE) else {
        panic!("not a Delete")
    };
    assert_eq!(delete.relation_id, 16_384);
    let mut key = vec![text(NEW_ID)];
    key.resize(6, Column::Null);
    assert_eq!(delete.old, OldTuple::Key(key));
}

#[test]
fn captured_type_relation_insert_pg15() {
    let LogicalMessage::Type(mood) = captured(MOOD_TYPE) else {
        panic!("not a Type")
    };
    assert_eq!(mood.namespace, "public");
    assert_eq!(mood.name, "mood");

    let LogicalMessage::Relation(relation) = captured(MOODS_RELATION) else {
        panic!("not a Relation")
    };
    assert_eq!(relation.name, "moods");
    let columns: Vec<(&str, u32, bool)> = relation
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.type_oid, c.is_key()))
        .collect();
    assert_eq!(columns, [("id", INT4, true), ("m", mood.id, false)]);

    let LogicalMessage::Insert(insert) = captured(MOODS_INSERT) else {
        panic!("not an Insert")
    };
    assert_eq!(insert.relation_id, relation.id);
    assert_eq!(insert.tuple, [text("1"), text("happy")]);
}

#[test]
fn captured_unchanged_toast_pg15() {
    let LogicalMessage::Update(update) = captured(DOCS_UPDATE_TOAST) else {
        panic!("not an Update")
    };
    assert_eq!(update.old, None);
    assert_eq!(update.new, [text("1"), Column::UnchangedToast, text("1")]);
}

#[test]
fn captured_replica_identity_full_pg15() {
    let LogicalMessage::Relation(relation) = captured(FULL_RELATION) else {
        panic!("not a Relation")
    };
    assert_eq!(relation.name, "full_t");
    assert_eq!(relation.replica_identity, ReplicaIdentity::Full);
    assert!(relation.columns.iter().all(RelationColumn::is_key));
    assert_eq!(relation.columns[0].type_oid, INT4);
    assert_eq!(relation.columns[1].type_oid, TEXT);

    assert_eq!(
        captured(FULL_UPDATE),
        LogicalMessage::Update(Update {
            relation_id: relation.id,
            old: Some(OldTuple::Full(vec![text("1"), text("x")])),
            new: vec![text("1"), text("y")],
        })
    );
    assert_eq!(
        captured(FULL_DELETE),
        LogicalMessage::Delete(Delete {
            relation_id: relation.id,
            old: OldTuple::Full(vec![text("1"), text("y")]),
        })
    );
}

#[test]
fn captured_truncate_of_two_relations_pg15() {
    let LogicalMessage::Begin(begin) = captured(TRUNCATE_BEGIN) else {
        panic!("not a Begin")
    };
    let LogicalMessage::Truncate(truncate) = captured(TRUNCATE) else {
        panic!("not a Truncate")
    };
    assert_eq!(truncate.relation_ids, [16_417, 16_424]);
    assert!(truncate.restart_identity());
    assert!(!truncate.cascade());
    let LogicalMessage::Commit(commit) = captured(TRUNCATE_COMMIT) else {
        panic!("not a Commit")
    };
    assert_eq!(commit.commit_lsn, begin.final_lsn);
    assert!(commit.end_lsn > commit.commit_lsn);
}

#[test]
fn captured_logical_messages_pg15() {
    let LogicalMessage::Begin(begin) = captured(MESSAGE_BEGIN) else {
        panic!("not a Begin")
    };
    let LogicalMessage::Message(message) = captured(MESSAGE_TRANSACTIONAL) else {
        panic!("not a Message")
    };
    assert!(message.transactional());
    assert_eq!(message.prefix, "outbox");
    assert_eq!(message.content, Bytes::from_static(br#"{"a":1}"#));
    assert_eq!(message.lsn, "0/155A538".parse().unwrap());
    let LogicalMessage::Commit(commit) = captured(MESSAGE_COMMIT) else {
        panic!("not a Commit")
    };
    assert_eq!(commit.commit_lsn, begin.final_lsn);
    assert!(commit.end_lsn > message.lsn);

    let LogicalMessage::Message(message) = captured(MESSAGE_NON_TRANSACTIONAL) else {
        panic!("not a Message")
    };
    assert!(!message.transactional());
    assert_eq!(message.prefix, "outbox");
    assert_eq!(message.content, Bytes::from_static(b"hello"));
    assert!(message.lsn > commit.end_lsn);
}

#[test]
fn captured_origin_pg15() {
    let LogicalMessage::Begin(begin) = captured(ORIGIN_BEGIN) else {
        panic!("not a Begin")
    };
    // pg_replication_origin_xact_setup set the commit timestamp: 2024-01-02T03:04:05Z.
    assert_eq!(begin.commit_timestamp, 757_479_845_000_000);
    assert_eq!(
        begin.commit_time(),
        Some(UNIX_EPOCH + Duration::from_secs(1_704_164_645))
    );
    assert_eq!(
        captured(ORIGIN),
        LogicalMessage::Origin(Origin {
            commit_lsn: "0/1234ABCD".parse().unwrap(),
            name: "upstream".to_owned(),
        })
    );
    let LogicalMessage::Commit(commit) = captured(ORIGIN_COMMIT) else {
        panic!("not a Commit")
    };
    assert_eq!(commit.commit_lsn, begin.final_lsn);
    assert_eq!(commit.commit_time(), begin.commit_time());
}
