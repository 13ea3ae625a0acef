//! From decoded changes to records handed to the delivery loop: the outbox
//! relation's layout, positions inside the open transaction (skipping what a
//! stored resume point covers), routing and dead letters.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use super::{OpenTxn, OutboxRelation, Session, StreamError, WalStream};
use crate::ack::AckError;
use crate::deadletter::{self, Reason};
use crate::pgoutput;
use crate::routing::{self, ColumnValue, OutboxLayout, OutboxRecord, Position, SchemaError};
use crate::sink::Sink;
use crate::Lsn;

impl<W: WalStream, S: Sink> Session<'_, W, S> {
    /// The outbox layout of `relation`; `None` when it is another table.
    pub(super) fn outbox_layout(
        &self,
        relation: &pgoutput::Relation,
    ) -> Option<Result<OutboxLayout, SchemaError>> {
        let table = &self.config.postgres.table;
        if relation.namespace != table.schema || relation.name != table.name {
            return None;
        }
        let names: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
        Some(OutboxLayout::resolve(
            &self.config.outbox.columns,
            &table.to_string(),
            &names,
        ))
    }

    pub(super) fn relation(&mut self, relation: pgoutput::Relation) -> Result<(), StreamError> {
        if let Some(layout) = self.outbox_layout(&relation) {
            let layout = layout?;
            if !layout.has_headers() {
                tracing::debug!(table = %self.config.postgres.table, "the outbox table has no headers column");
            }
            self.outbox = Some(OutboxRelation {
                oid: relation.id,
                layout: Arc::new(layout),
            });
        } else {
            self.others.insert(
                relation.id,
                format!("{}.{}", relation.namespace, relation.name),
            );
        }
        Ok(())
    }

    /// A transaction committing at `commit_lsn` opens (a Begin, or a streamed
    /// transaction's replay); its records below the stored resume point, if that
    /// is about it, are skipped.
    pub(super) fn open_txn(
        &mut self,
        commit_lsn: Lsn,
        commit_time: Option<SystemTime>,
    ) -> Result<(), StreamError> {
        let skip = self
            .resume_start
            .filter(|p| p.commit_lsn == commit_lsn)
            .map_or(0, |p| p.index);
        if skip > 0 {
            tracing::info!(commit_lsn = %commit_lsn, records = skip, "resuming inside a transaction: skipping the records acknowledged before");
        }
        let id = self.tracker.begin(commit_lsn, skip)?;
        self.open = Some(OpenTxn {
            id,
            commit_lsn,
            commit_time,
            next_index: 0,
            skip,
        });
        Ok(())
    }

    /// The next position in the open transaction; `None` when its record was
    /// acknowledged in an earlier session.
    pub(super) fn next_position(
        &mut self,
    ) -> Result<Option<(Position, Option<SystemTime>)>, StreamError> {
        let open = self.open.as_mut().ok_or(AckError::NoneOpen)?;
        let position = Position {
            commit_lsn: open.commit_lsn,
            index: open.next_index,
        };
        open.next_index += 1;
        Ok((position.index >= open.skip).then_some((position, open.commit_time)))
    }

    pub(super) fn route(
        &mut self,
        layout: &OutboxLayout,
        tuple: &[pgoutput::Column],
    ) -> Result<(), StreamError> {
        let Some((position, commit_time)) = self.next_position()? else {
            return Ok(());
        };
        let values: Vec<ColumnValue<'_>> = tuple.iter().map(column_value).collect();
        let routed = layout.route(&self.config.outbox, &values, position);
        let (record, letter) = deadletter::or_letter(
            routed,
            self.config.outbox.dead_letter_topic.as_deref(),
            layout.column_names(),
            &values,
            layout.aggregate_id(&values),
            position,
            self.delivery.letter_budget(),
        )
        .map_err(|source| StreamError::BadRow { position, source })?;
        self.push(record, letter, commit_time)
    }

    /// Whether logical messages with `prefix` are outbox events (a table-less
    /// outbox).
    pub(super) fn routes_messages_of(&self, prefix: &str) -> bool {
        self.config
            .outbox
            .messages
            .as_ref()
            .is_some_and(|m| m.prefix == prefix)
    }

    /// Routes a transactional logical message of the table-less outbox.
    pub(super) fn route_message(
        &mut self,
        prefix: &str,
        content: &Bytes,
    ) -> Result<(), StreamError> {
        let Some((position, commit_time)) = self.next_position()? else {
            return Ok(());
        };
        let messages = self
            .config
            .outbox
            .messages
            .as_ref()
            .ok_or(AckError::NoneOpen)?;
        let routed =
            routing::route_message(&self.config.outbox, &messages.topics, content, position);
        let columns = ["prefix".to_owned(), "content".to_owned()];
        let values = [
            ColumnValue::Text(prefix.as_bytes()),
            ColumnValue::Text(content.as_ref()),
        ];
        let (record, letter) = deadletter::or_letter(
            routed,
            self.config.outbox.dead_letter_topic.as_deref(),
            &columns,
            &values,
            None,
            position,
            self.delivery.letter_budget(),
        )
        .map_err(|source| StreamError::BadRow { position, source })?;
        self.push(record, letter, commit_time)
    }

    pub(super) fn push(
        &mut self,
        record: OutboxRecord,
        letter: Option<Reason>,
        commit_time: Option<SystemTime>,
    ) -> Result<(), StreamError> {
        let tag = self.tracker.record_sent()?;
        debug_assert_eq!(Some(tag.txn), self.open.as_ref().map(|o| o.id));
        debug_assert_eq!(tag.index, record.position.index);
        self.delivery.push(tag, record, letter, commit_time)?;
        Ok(())
    }
}

fn column_value(column: &pgoutput::Column) -> ColumnValue<'_> {
    match column {
        pgoutput::Column::Null => ColumnValue::Null,
        pgoutput::Column::UnchangedToast => ColumnValue::Unchanged,
        pgoutput::Column::Text(bytes) | pgoutput::Column::Binary(bytes) => {
            ColumnValue::Text(bytes.as_ref())
        }
    }
}
