//! The buffer of streamed transactions: order, the memory budget, spill files,
//! aborts and layouts.

use std::path::{Path, PathBuf};

use super::*;
use crate::config::RelayConfig;

/// A directory of its own for one test, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        TempDir(std::env::temp_dir().join(testkit::unique_name("txbuffer")))
    }

    fn files(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(&self.0) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn layout(columns: &[&str]) -> Layout {
    let config = RelayConfig::new("postgres://h/db", "k:1");
    OutboxLayout::resolve(&config.outbox.columns, "public.outbox", columns).map(Arc::new)
}

fn full() -> Layout {
    layout(&[
        "id",
        "aggregatetype",
        "aggregateid",
        "type",
        "payload",
        "headers",
    ])
}

fn change(n: usize) -> Vec<u8> {
    format!("change number {n:06}").into_bytes()
}

/// Every change of a replay, as text, with whether it has a layout.
fn drain(mut replay: Replay) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    while let Some(c) = replay.next_change().unwrap() {
        out.push((
            String::from_utf8(c.bytes.to_vec()).unwrap(),
            c.layout.is_some(),
        ));
    }
    out
}

fn texts(range: impl Iterator<Item = usize>) -> Vec<(String, bool)> {
    range
        .map(|n| (String::from_utf8(change(n)).unwrap(), true))
        .collect()
}

#[test]
fn changes_under_the_budget_stay_in_memory_and_replay_in_order() {
    let dir = TempDir::new();
    let mut buffers = Buffers::new(dir.0.clone(), 1 << 20);
    buffers.start(7, true).unwrap();
    buffers.relation(7, 100, full()).unwrap();
    for n in 0..100 {
        assert_eq!(
            buffers.push(7, 7, Some((100, None)), &change(n)).unwrap(),
            0
        );
    }
    assert!(buffers.in_memory() > 0);
    assert!(dir.files().is_empty(), "nothing spilled: {:?}", dir.files());
    let replay = buffers.commit(7).unwrap().unwrap();
    assert_eq!(buffers.in_memory(), 0);
    assert!(buffers.is_empty());
    assert_eq!(drain(replay), texts(0..100));
}

#[test]
fn changes_beyond_a_tiny_budget_spill_to_a_file_that_goes_with_the_replay() {
    let dir = TempDir::new();
    let budget = 200;
    let mut buffers = Buffers::new(dir.0.join("slot"), budget);
    buffers.start(7, true).unwrap();
    buffers.start(8, true).unwrap();
    buffers.relation(7, 100, full()).unwrap();
    buffers.relation(8, 100, full()).unwrap();
    let mut spilled = 0;
    for n in 0..50 {
        spilled += buffers.push(7, 7, Some((100, None)), &change(n)).unwrap();
        spilled += buffers
            .push(8, 8, Some((100, None)), &change(1000 + n))
            .unwrap();
        assert!(
            buffers.in_memory() <= budget,
            "{} in memory",
            buffers.in_memory()
        );
    }
    assert!(spilled > 0);
    let files = std::fs::read_dir(dir.0.join("slot")).unwrap().count();
    assert_eq!(files, 2, "one file per spilled transaction");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.0.join("slot"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "the spill directory is private");
    }
    let replay = buffers.commit(8).unwrap().unwrap();
    assert_eq!(drain(replay), texts(1000..1050));
    let files = std::fs::read_dir(dir.0.join("slot")).unwrap().count();
    assert_eq!(files, 1, "the replayed transaction's file is deleted");
    buffers.abort(7, 7);
    assert!(buffers.is_empty());
    assert_eq!(std::fs::read_dir(dir.0.join("slot")).unwrap().count(), 0);
}

#[test]
fn changes_of_an_aborted_subtransaction_are_skipped_in_memory_and_in_the_file() {
    let dir = TempDir::new();
    let mut buffers = Buffers::new(dir.0.clone(), 120);
    buffers.start(7, true).unwrap();
    buffers.relation(7, 100, full()).unwrap();
    for n in 0..30 {
        let subxid = if n % 3 == 1 { 9 } else { 7 };
        buffers
            .push(7, subxid, Some((100, None)), &change(n))
            .unwrap();
    }
    // Another subtransaction aborts; an abort of an unknown one changes nothing.
    buffers.abort(7, 9);
    buffers.abort(5, 5);
    assert!(!dir.files().is_empty(), "the test wants a spilled part");
    let replay = buffers.commit(7).unwrap().unwrap();
    assert_eq!(drain(replay), texts((0..30).filter(|n| n % 3 != 1)));
}

#[test]
fn segments_must_start_with_the_first() {
    let dir = TempDir::new();
    let mut buffers = Buffers::new(dir.0.clone(), 1024);
    assert_eq!(buffers.start(7, false), Err(OrderError::NotStarted(7)));
    buffers.start(7, true).unwrap();
    buffers.start(7, false).unwrap();
    assert_eq!(buffers.start(7, true), Err(OrderError::StartedTwice(7)));
    assert!(matches!(
        buffers.push(8, 8, None, b"x"),
        Err(PushError::Order(OrderError::NotStarted(8)))
    ));
    assert!(buffers.commit(8).is_none());
}

#[test]
fn each_change_keeps_the_layout_announced_before_it() {
    let dir = TempDir::new();
    let mut buffers = Buffers::new(dir.0.clone(), 1024);
    buffers.start(7, true).unwrap();
    // Not announced in the stream and not the session's outbox: not kept.
    assert_eq!(
        buffers
            .push(7, 7, Some((100, None)), b"other table")
            .unwrap(),
        0
    );
    // Announced by the session only: kept with the session's layout.
    buffers.push(7, 7, Some((100, Some(full()))), b"a").unwrap();
    buffers.push(7, 7, None, b"message").unwrap();
    // The transaction drops a column the relay needs.
    buffers
        .relation(7, 100, layout(&["id", "aggregatetype", "type", "payload"]))
        .unwrap();
    buffers.push(7, 7, Some((100, Some(full()))), b"b").unwrap();
    let mut replay = buffers.commit(7).unwrap().unwrap();
    let mut next = || replay.next_change().unwrap().unwrap();
    let a = next();
    assert_eq!(&a.bytes[..], b"a");
    assert!(a.layout.unwrap().is_ok());
    let message = next();
    assert!(message.layout.is_none());
    let b = next();
    assert_eq!(&b.bytes[..], b"b");
    assert!(
        b.layout.unwrap().is_err(),
        "the layout announced in the stream wins"
    );
    assert!(replay.next_change().unwrap().is_none());
}

#[test]
fn a_dropped_transaction_leaves_no_file_and_leftovers_are_cleared() {
    let dir = TempDir::new();
    {
        let mut buffers = Buffers::new(dir.0.clone(), 16);
        buffers.start(7, true).unwrap();
        buffers.push(7, 7, None, &change(1)).unwrap();
        assert_eq!(dir.files().len(), 1);
    }
    assert!(dir.files().is_empty(), "a session's end deletes its files");

    std::fs::write(dir.0.join("123-7-0.spill"), b"left by a killed relay").unwrap();
    std::fs::write(dir.0.join("notes.txt"), b"not ours").unwrap();
    assert_eq!(clear_leftovers(&dir.0).unwrap(), 1);
    let names: Vec<String> = dir
        .files()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["notes.txt"]);
    assert_eq!(
        clear_leftovers(Path::new("/nonexistent/outbox-relay")).unwrap(),
        0
    );
}
