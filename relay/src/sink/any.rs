//! The configured sink: [`SinkKind`] names it, [`AnySink`] is whichever one runs,
//! passing every call of [`Sink`] to it (the runner builds it from the
//! configuration).

use std::task::{Context, Poll};

use super::kafka::KafkaSink;
use super::nats::NatsSink;
use super::rabbitmq::RabbitmqSink;
use super::redis::RedisSink;
use super::{Event, Handed, Sink, SinkError, Ticket};
use crate::routing::OutboxRecord;

/// Where records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SinkKind {
    #[default]
    Kafka,
    Nats,
    Rabbitmq,
    Redis,
}

impl SinkKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            SinkKind::Kafka => "kafka",
            SinkKind::Nats => "nats",
            SinkKind::Rabbitmq => "rabbitmq",
            SinkKind::Redis => "redis",
        }
    }
}

/// One of the sinks.
#[derive(Debug)]
pub enum AnySink {
    Kafka(KafkaSink),
    Nats(NatsSink),
    Rabbitmq(RabbitmqSink),
    Redis(RedisSink),
}

impl AnySink {
    fn inner(&mut self) -> &mut dyn Sink {
        match self {
            AnySink::Kafka(sink) => sink,
            AnySink::Nats(sink) => sink,
            AnySink::Rabbitmq(sink) => sink,
            AnySink::Redis(sink) => sink,
        }
    }

    fn inner_ref(&self) -> &dyn Sink {
        match self {
            AnySink::Kafka(sink) => sink,
            AnySink::Nats(sink) => sink,
            AnySink::Rabbitmq(sink) => sink,
            AnySink::Redis(sink) => sink,
        }
    }
}

impl Sink for AnySink {
    fn name(&self) -> &'static str {
        self.inner_ref().name()
    }

    fn check_name(&self, name: &str) -> Result<(), String> {
        self.inner_ref().check_name(name)
    }

    fn max_record_bytes(&self) -> usize {
        self.inner_ref().max_record_bytes()
    }

    fn send(&mut self, ticket: Ticket, record: &OutboxRecord) -> Result<Handed, SinkError> {
        self.inner().send(ticket, record)
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Event, SinkError>> {
        self.inner().poll_next(cx)
    }
}
