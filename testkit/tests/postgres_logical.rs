//! The environment's PostgreSQL decodes WAL with pgoutput, and a test database is
//! dropped together with its slots.

use testkit::TestDatabase;

/// One decoded pgoutput message, as much of it as this smoke test looks at.
#[derive(Debug, PartialEq)]
enum Change {
    Begin,
    Commit,
    Relation(String),
    Insert(Vec<Option<String>>),
    Update,
    Other(u8),
}

/// Reads a pgoutput (protocol 1) message far enough to check what the server sent.
fn decode(data: &[u8]) -> Change {
    fn tuple(mut rest: &[u8]) -> Vec<Option<String>> {
        let take = |rest: &mut &[u8], n: usize| {
            let (head, tail) = rest.split_at(n);
            *rest = tail;
            head.to_vec()
        };
        let ncols = u16::from_be_bytes(take(&mut rest, 2).try_into().unwrap());
        (0..ncols)
            .map(|_| match take(&mut rest, 1)[0] {
                b'n' => None,
                b't' => {
                    let len = u32::from_be_bytes(take(&mut rest, 4).try_into().unwrap());
                    Some(String::from_utf8(take(&mut rest, len as usize)).unwrap())
                }
                kind => panic!("unexpected column kind {}", kind as char),
            })
            .collect()
    }
    match data[0] {
        b'B' => Change::Begin,
        b'C' => Change::Commit,
        b'R' => {
            // oid(4), namespace cstring, relation cstring, ...
            let rest = &data[5..];
            let ns_end = rest.iter().position(|&b| b == 0).unwrap();
            let rel = &rest[ns_end + 1..];
            let rel_end = rel.iter().position(|&b| b == 0).unwrap();
            Change::Relation(String::from_utf8(rel[..rel_end].to_vec()).unwrap())
        }
        // 'I', relation oid(4), 'N', tuple
        b'I' => {
            assert_eq!(data[5], b'N');
            Change::Insert(tuple(&data[6..]))
        }
        b'U' => Change::Update,
        other => Change::Other(other),
    }
}

#[tokio::test]
async fn pgoutput_changes_can_be_read_from_a_logical_slot() {
    let db = TestDatabase::create().await;
    let pool = db.pool();
    let slot = db.name().to_owned();
    sqlx::query("CREATE TABLE items (id int PRIMARY KEY, name text)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE other (id int PRIMARY KEY)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("CREATE PUBLICATION smoke FOR TABLE items")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&slot)
        .execute(pool)
        .await
        .unwrap();

    let mut tx = pool.begin().await.unwrap();
    for (id, name) in [(1, "alpha"), (2, "beta"), (3, "gamma")] {
        sqlx::query("INSERT INTO items VALUES ($1, $2)")
            .bind(id)
            .bind(name)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    // A table outside the publication: its transaction decodes to nothing.
    sqlx::query("INSERT INTO other VALUES (1)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO items VALUES (4, NULL)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("UPDATE items SET name = 'delta' WHERE id = 4")
        .execute(pool)
        .await
        .unwrap();

    let rows: Vec<(Vec<u8>,)> = sqlx::query_as(
        "SELECT data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL, \
         'proto_version', '1', 'publication_names', 'smoke')",
    )
    .bind(&slot)
    .fetch_all(pool)
    .await
    .unwrap();
    let changes: Vec<Change> = rows.iter().map(|(data,)| decode(data)).collect();

    let inserts: Vec<&Vec<Option<String>>> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Insert(cols) => Some(cols),
            _ => None,
        })
        .collect();
    let some = |s: &str| Some(s.to_owned());
    assert_eq!(
        inserts,
        vec![
            &vec![some("1"), some("alpha")],
            &vec![some("2"), some("beta")],
            &vec![some("3"), some("gamma")],
            &vec![some("4"), None],
        ],
        "all changes: {changes:?}"
    );
    // Three transactions touch `items`; the one on `other` is filtered out, though
    // pgoutput still sends its (empty) Begin/Commit pair in protocol version 1.
    let begins = changes.iter().filter(|c| **c == Change::Begin).count();
    let commits = changes.iter().filter(|c| **c == Change::Commit).count();
    assert_eq!(begins, commits, "all changes: {changes:?}");
    assert!((3..=4).contains(&begins), "all changes: {changes:?}");
    assert_eq!(changes.iter().filter(|c| **c == Change::Update).count(), 1);
    assert_eq!(
        changes.iter().find(|c| matches!(c, Change::Relation(_))),
        Some(&Change::Relation("items".to_owned())),
        "a Relation message precedes the first change of the table"
    );
    assert!(
        !changes.iter().any(|c| matches!(c, Change::Other(_))),
        "unexpected message kinds: {changes:?}"
    );

    // The slot's changes were consumed: reading again yields nothing new.
    let again: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_logical_slot_get_binary_changes($1, NULL, NULL, \
         'proto_version', '1', 'publication_names', 'smoke')",
    )
    .bind(&slot)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(again, 0);
}

#[tokio::test]
async fn dropping_a_test_database_drops_its_slots() {
    let db = TestDatabase::create().await;
    let name = db.name().to_owned();
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&name)
        .execute(db.pool())
        .await
        .unwrap();
    let other = TestDatabase::create().await;
    let mut observer = other.connect().await;
    db.drop_database().await.unwrap();

    let slots: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1")
            .bind(&name)
            .fetch_one(&mut observer)
            .await
            .unwrap();
    let databases: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_one(&mut observer)
        .await
        .unwrap();
    assert_eq!((slots, databases), (0, 0));
}
