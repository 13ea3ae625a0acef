//! What a handler sees of a Kafka record, what it may answer, and how a record that
//! cannot be a message (a poison message) is recognised.

use std::collections::BTreeMap;
use std::error::Error;

use futures::future::BoxFuture;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// Header: the event id, the journal's deduplication key.
pub const HEADER_ID: &str = "id";
/// Header: the event or command type.
pub const HEADER_TYPE: &str = "type";

/// A message handed to a [`MessageHandler`].
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The Kafka key (the aggregate or saga id).
    pub key: Option<String>,
    /// Header `id`: the event id, unique per message; redeliveries carry the same.
    pub id: Uuid,
    /// Header `type`.
    pub message_type: Option<String>,
    /// All headers with a value, by name; for a name given more than once, the last
    /// value. Values that are not UTF-8 are converted lossily.
    pub headers: BTreeMap<String, String>,
    /// The value as JSON; `None` for a record without a value (a tombstone).
    pub payload: Option<serde_json::Value>,
}

impl IncomingMessage {
    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The payload as `T` (a missing payload reads as JSON `null`). A payload of
    /// another shape is a [`HandlerError::Definite`] error: trying again cannot help.
    ///
    /// The error names the kind of mismatch and its position, never the payload's
    /// contents, so it may be logged.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        let null = serde_json::Value::Null;
        T::deserialize(self.payload.as_ref().unwrap_or(&null)).map_err(|err| {
            HandlerError::Definite(format!(
                "payload does not have the shape of {} ({:?} error)",
                std::any::type_name::<T>(),
                err.classify()
            ))
        })
    }
}

/// Why a handler did not apply a message.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Trying again may succeed (a lock timeout, a lost connection, a participant
    /// that is down): the transaction is retried with backoff, then dead-lettered.
    #[error("transient handler failure")]
    Transient(#[source] Box<dyn Error + Send + Sync>),
    /// This message can never be applied (invalid content, a broken invariant): it
    /// is dead-lettered at once with this reason.
    #[error("definite handler failure: {0}")]
    Definite(String),
}

impl HandlerError {
    /// A [`HandlerError::Transient`] error caused by `error`.
    pub fn transient(error: impl Into<Box<dyn Error + Send + Sync>>) -> HandlerError {
        HandlerError::Transient(error.into())
    }

    /// A [`HandlerError::Definite`] error with the reason `reason`.
    pub fn definite(reason: impl Into<String>) -> HandlerError {
        HandlerError::Definite(reason.into())
    }
}

/// Database errors from a handler: those a retry can cure (serialization failures,
/// deadlocks, lost connections, an exhausted pool) are transient, the others
/// (constraint violations, bad data, missing tables or columns) definite.
impl From<sqlx::Error> for HandlerError {
    fn from(error: sqlx::Error) -> HandlerError {
        if is_transient_database_error(&error) {
            HandlerError::Transient(Box::new(error))
        } else {
            HandlerError::Definite(format!("database error: {error}"))
        }
    }
}

/// Whether running the transaction again may succeed.
pub(crate) fn is_transient_database_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 40: transaction rollback (serialization failure, deadlock);
            // 08: connection exception; 53: insufficient resources;
            // 57: operator intervention (shutdown, query cancelled);
            // 58: system error (I/O); 55P03: lock not available.
            ["40", "08", "53", "57", "58"]
                .iter()
                .any(|class| code.starts_with(class))
                || code == "55P03"
        }),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// Applies messages. The consumer calls it at most once at a time per key.
///
/// Delivery contract: `handle` may be called more than once for a message (after a
/// transient failure, a crash or a rebalance), but its writes through `tx` commit at
/// most once per message id and consumer, together with the journal row; a failed
/// call's writes are rolled back. Effects outside `tx` (HTTP calls, files) get no
/// such promise: write an outbox row through `tx` instead.
pub trait MessageHandler: Send + Sync + 'static {
    /// Runs inside the consumer's transaction: everything written through `tx`
    /// (effects, outbox rows) commits together with the journal row. Must not commit
    /// or roll back `tx` itself.
    fn handle<'a>(
        &'a self,
        tx: &'a mut sqlx::PgConnection,
        message: &'a IncomingMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

/// A record as received, kept byte for byte so it can be dead-lettered unchanged.
#[derive(Debug)]
pub(crate) struct RawMessage {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) headers: Vec<(String, Option<Vec<u8>>)>,
}

impl RawMessage {
    pub(crate) fn of(message: &BorrowedMessage<'_>) -> RawMessage {
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        RawMessage {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    pub(crate) fn position(&self) -> super::MessagePosition {
        super::MessagePosition {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
        }
    }

    /// The message a handler gets, or why this record is a poison message.
    pub(crate) fn parse(&self) -> Result<IncomingMessage, String> {
        let key = match &self.key {
            None => None,
            Some(bytes) => Some(
                String::from_utf8(bytes.clone()).map_err(|_| "the key is not UTF-8".to_owned())?,
            ),
        };
        let id_header = self
            .headers
            .iter()
            .rev()
            .find(|(name, _)| name == HEADER_ID)
            .and_then(|(_, value)| value.as_deref());
        let id = match id_header {
            None => return Err(format!("header \"{HEADER_ID}\" is missing")),
            Some(bytes) => std::str::from_utf8(bytes)
                .ok()
                .and_then(|text| Uuid::parse_str(text.trim()).ok())
                .ok_or_else(|| format!("header \"{HEADER_ID}\" is not a UUID"))?,
        };
        let headers: BTreeMap<String, String> = self
            .headers
            .iter()
            .filter_map(|(name, value)| {
                let value = value.as_deref()?;
                Some((name.clone(), String::from_utf8_lossy(value).into_owned()))
            })
            .collect();
        let payload = match &self.payload {
            None => None,
            Some(bytes) => Some(
                serde_json::from_slice(bytes)
                    .map_err(|err| format!("the payload is not JSON: {err}"))?,
            ),
        };
        Ok(IncomingMessage {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            key,
            id,
            message_type: headers.get(HEADER_TYPE).cloned(),
            headers,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(headers: &[(&str, &[u8])], payload: Option<&[u8]>) -> RawMessage {
        RawMessage {
            topic: "t".to_owned(),
            partition: 2,
            offset: 7,
            key: Some(b"k".to_vec()),
            payload: payload.map(<[u8]>::to_vec),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Some(v.to_vec())))
                .collect(),
        }
    }

    const ID: &str = "0191c0de-0000-7000-8000-000000000001";

    #[test]
    fn a_well_formed_record_parses() {
        let message = raw(
            &[
                ("id", ID.as_bytes()),
                ("type", b"Reserve"),
                ("saga-id", b"s"),
            ],
            Some(br#"{"amount": 3}"#),
        )
        .parse()
        .unwrap();
        assert_eq!(message.id, Uuid::parse_str(ID).unwrap());
        assert_eq!(message.message_type.as_deref(), Some("Reserve"));
        assert_eq!(message.header("saga-id"), Some("s"));
        assert_eq!(message.key.as_deref(), Some("k"));
        assert_eq!((message.partition, message.offset), (2, 7));
        #[derive(serde::Deserialize)]
        struct Amount {
            amount: u32,
        }
        assert_eq!(message.payload_as::<Amount>().unwrap().amount, 3);
        let err = message.payload_as::<Vec<String>>().unwrap_err();
        assert!(matches!(err, HandlerError::Definite(_)), "{err:?}");
    }

    #[test]
    fn a_tombstone_has_no_payload() {
        let message = raw(&[("id", ID.as_bytes())], None).parse().unwrap();
        assert_eq!(message.payload, None);
        assert_eq!(message.payload_as::<Option<u32>>().unwrap(), None);
    }

    #[test]
    fn poison_records_are_recognised() {
        let no_id = raw(&[("type", b"x")], Some(b"{}")).parse().unwrap_err();
        assert!(no_id.contains("missing"), "{no_id}");
        let bad_id = raw(&[("id", b"42")], Some(b"{}")).parse().unwrap_err();
        assert!(bad_id.contains("not a UUID"), "{bad_id}");
        let not_json = raw(&[("id", ID.as_bytes())], Some(b"hello"))
            .parse()
            .unwrap_err();
        assert!(not_json.contains("not JSON"), "{not_json}");
        let mut bad_key = raw(&[("id", ID.as_bytes())], Some(b"{}"));
        bad_key.key = Some(vec![0xff, 0xfe]);
        assert!(bad_key.parse().is_err());
    }

    #[test]
    fn database_errors_are_sorted() {
        assert!(is_transient_database_error(&sqlx::Error::PoolTimedOut));
        assert!(!is_transient_database_error(&sqlx::Error::RowNotFound));
        let err: HandlerError = sqlx::Error::RowNotFound.into();
        assert!(matches!(err, HandlerError::Definite(_)));
    }
}
