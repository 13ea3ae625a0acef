//! The server's side of the scripted world: the messages of transactions in
//! commit order, streamed ones in blocks interleaved with those before them.

use super::*;

pub(super) fn aggregate_type(row: &Row) -> String {
    match row.flaw {
        Flaw::BadTopic => "bad type".to_owned(),
        _ => format!("agg{}", row.key % 2),
    }
}

pub(super) fn topic(row: &Row) -> String {
    format!("outbox.event.{}", aggregate_type(row))
}

pub(super) fn text(value: &str) -> Column {
    Column::Text(Bytes::copy_from_slice(value.as_bytes()))
}

pub(super) fn xlog(wal_start: Lsn, wal_end: Lsn, message: &LogicalMessage) -> ReplicationMessage {
    ReplicationMessage::XLogData {
        wal_start,
        wal_end,
        server_time_micros: 0,
        data: encode(message),
    }
}

pub(super) fn relation_message() -> LogicalMessage {
    let column = |name: &str, type_oid: u32| RelationColumn {
        flags: u8::from(name == "id"),
        name: name.to_owned(),
        type_oid,
        type_modifier: -1,
    };
    LogicalMessage::Relation(pgoutput::Relation {
        id: OUTBOX_OID,
        namespace: "public".to_owned(),
        name: "outbox".to_owned(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            column("id", 2950),
            column("aggregatetype", 25),
            column("aggregateid", 25),
            column("type", 25),
            column("payload", 3802),
            column("headers", 3802),
        ],
    })
}

pub(super) fn insert(row: &Row) -> LogicalMessage {
    let key = match row.flaw {
        Flaw::NullKey => Column::Null,
        _ => text(&format!("key-{}", row.key)),
    };
    LogicalMessage::Insert(Insert {
        relation_id: OUTBOX_OID,
        tuple: vec![
            text(&row.id),
            text(&aggregate_type(row)),
            key,
            text("Changed"),
            text(&format!("{{\"seq\": {}}}", row.seq)),
            Column::Null,
        ],
    })
}

/// One stream block of transaction `xid`: its changes, each with the id of the
/// (sub)transaction that made it.
pub(super) fn block(
    xid: u32,
    first_segment: bool,
    relation: bool,
    changes: &[(u32, &Row)],
    at: Lsn,
) -> Vec<ReplicationMessage> {
    let start = LogicalMessage::StreamStart(StreamStart { xid, first_segment });
    let mut block = vec![xlog(at, at, &start)];
    if relation {
        block.push(raw(at, encode_in_stream(xid, &relation_message())));
    }
    for (subxid, row) in changes {
        block.push(raw(at, encode_in_stream(*subxid, &insert(row))));
    }
    block.push(xlog(at, at, &LogicalMessage::StreamStop));
    block
}

pub(super) fn raw(at: Lsn, data: Bytes) -> ReplicationMessage {
    ReplicationMessage::XLogData {
        wal_start: at,
        wal_end: at,
        server_time_micros: 0,
        data,
    }
}

/// The messages the server sends a session starting after `confirmed`: the
/// transactions committing after it in commit order, the streamed ones' blocks
/// interleaved with the transactions before them.
pub(super) fn script(world: &World, confirmed: Lsn, rng: &mut Rng) -> VecDeque<ReplicationMessage> {
    let txns = &world.txns;
    let first = txns
        .iter()
        .position(|t| t.end_lsn > confirmed)
        .unwrap_or(txns.len());
    // What goes before the transaction at each index (the last: after them all).
    let mut before: Vec<Vec<ReplicationMessage>> = vec![Vec::new(); txns.len() + 1];
    for (i, txn) in txns.iter().enumerate().skip(first) {
        let Some(plan) = txn.streamed else {
            continue;
        };
        let at = txn.commit_lsn;
        // Committed changes by the transaction or a committed subtransaction,
        // with the aborted subtransaction's after some of them.
        let mut changes: Vec<(u32, &Row)> = txn
            .rows
            .iter()
            .map(|row| {
                (
                    if row.seq % 2 == 0 {
                        plan.xid
                    } else {
                        plan.xid + 1
                    },
                    row,
                )
            })
            .collect();
        let dead_at = rng.below(changes.len() as u64 + 1) as usize;
        let dead: Vec<(u32, &Row)> = txn.dead.iter().map(|row| (plan.xid + 2, row)).collect();
        let dead_len = dead.len();
        changes.splice(dead_at..dead_at, dead);
        let from = i.saturating_sub(plan.back).max(first);
        let mut slots: Vec<usize> = (0..plan.segments)
            .map(|_| from + rng.below((i - from + 1) as u64) as usize)
            .collect();
        slots.sort_unstable();
        let per = changes.len().div_ceil(plan.segments).max(1);
        let mut dead_sent = false;
        for (n, slot) in slots.iter().enumerate() {
            let part: Vec<(u32, &Row)> = changes.iter().skip(n * per).take(per).copied().collect();
            let relation = n == 0 && plan.announces;
            before[*slot].extend(block(plan.xid, n == 0, relation, &part, at));
            let end = (n + 1) * per;
            if dead_len > 0 && !dead_sent && end >= dead_at + dead_len {
                // ROLLBACK TO SAVEPOINT, decoded after the block that held them.
                let abort = LogicalMessage::StreamAbort(StreamAbort {
                    xid: plan.xid,
                    subxid: plan.xid + 2,
                });
                before[*slot].push(xlog(at, at, &abort));
                dead_sent = true;
            }
        }
        if dead_len > 0 && !dead_sent {
            let abort = LogicalMessage::StreamAbort(StreamAbort {
                xid: plan.xid,
                subxid: plan.xid + 2,
            });
            before[i].push(xlog(at, at, &abort));
        }
    }
    for aborted in world.aborted.iter().filter(|a| a.slot >= first) {
        let at = txns.get(aborted.slot).map_or(Lsn::ZERO, |t| t.commit_lsn);
        let changes: Vec<(u32, &Row)> = aborted.rows.iter().map(|r| (aborted.xid, r)).collect();
        let slot = &mut before[aborted.slot];
        slot.extend(block(aborted.xid, true, true, &changes, at));
        let abort = LogicalMessage::StreamAbort(StreamAbort {
            xid: aborted.xid,
            subxid: aborted.xid,
        });
        slot.push(xlog(at, at, &abort));
    }

    let mut messages = VecDeque::new();
    messages.push_back(xlog(Lsn::ZERO, confirmed, &relation_message()));
    for (i, txn) in txns.iter().enumerate().skip(first) {
        messages.extend(std::mem::take(&mut before[i]));
        if let Some(plan) = txn.streamed {
            let commit = LogicalMessage::StreamCommit(StreamCommit {
                xid: plan.xid,
                flags: 0,
                commit_lsn: txn.commit_lsn,
                end_lsn: txn.end_lsn,
                commit_timestamp: 0,
            });
            messages.push_back(xlog(txn.end_lsn, txn.end_lsn, &commit));
        } else {
            messages.push_back(xlog(
                txn.commit_lsn,
                txn.end_lsn,
                &LogicalMessage::Begin(Begin {
                    final_lsn: txn.commit_lsn,
                    commit_timestamp: 0,
                    xid: 1,
                }),
            ));
            for row in &txn.rows {
                messages.push_back(xlog(txn.commit_lsn, txn.end_lsn, &insert(row)));
            }
            messages.push_back(xlog(
                txn.end_lsn,
                txn.end_lsn,
                &LogicalMessage::Commit(Commit {
                    flags: 0,
                    commit_lsn: txn.commit_lsn,
                    end_lsn: txn.end_lsn,
                    commit_timestamp: 0,
                }),
            ));
        }
        if rng.below(4) == 0 {
            messages.push_back(ReplicationMessage::Keepalive {
                wal_end: txn.end_lsn,
                server_time_micros: 0,
                reply_requested: rng.below(2) == 0,
            });
        }
    }
    messages.extend(before.pop().unwrap_or_default());
    messages
}
