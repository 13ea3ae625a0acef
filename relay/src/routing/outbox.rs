//! How rows become records, as configured: the topic template, the outbox
//! columns, logical-message routing and the payload format.

use std::fmt;

use serde::Deserialize;

/// A topic template that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid topic template: {0}")]
pub struct TemplateError(pub String);

/// Topic of a record, Debezium's outbox event router default.
pub const DEFAULT_TOPIC_TEMPLATE: &str = "outbox.event.{aggregatetype}";
/// The outbox columns, named as in Debezium's outbox event router.
pub const DEFAULT_COLUMNS: Columns = Columns {
    id: Ident::Static("id"),
    aggregate_type: Ident::Static("aggregatetype"),
    aggregate_id: Ident::Static("aggregateid"),
    event_type: Ident::Static("type"),
    payload: Ident::Static("payload"),
    headers: Ident::Static("headers"),
    tracing_span_context: Ident::Static("tracingspancontext"),
};

/// How rows become records.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    pub topic_template: TopicTemplate,
    /// Logical messages routed like outbox rows; `None`: off.
    pub messages: Option<MessageRouting>,
    pub payload_format: PayloadFormat,
    /// `None`: stop on a row that cannot be delivered.
    pub dead_letter_topic: Option<String>,
    pub columns: Columns,
}

/// A column or table name, from a constant or from configuration.
#[derive(Clone, Eq)]
pub enum Ident {
    Static(&'static str),
    Owned(String),
}

impl Ident {
    pub fn as_str(&self) -> &str {
        match self {
            Ident::Static(s) => s,
            Ident::Owned(s) => s,
        }
    }
}

impl PartialEq for Ident {
    fn eq(&self, other: &Ident) -> bool {
        self.as_str() == other.as_str()
    }
}

impl fmt::Debug for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outbox columns the relay reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    pub id: Ident,
    pub aggregate_type: Ident,
    pub aggregate_id: Ident,
    pub event_type: Ident,
    pub payload: Ident,
    /// Optional: a table without it routes records without extra headers.
    pub headers: Ident,
    /// Optional: the trace context as Debezium's outbox event router keeps it
    /// (`traceparent=…` lines); it becomes the record's `traceparent`/`tracestate`
    /// unless the headers column names one.
    pub tracing_span_context: Ident,
}

impl Columns {
    /// Every column, in declaration order.
    pub fn all(&self) -> [&Ident; 7] {
        [
            &self.id,
            &self.aggregate_type,
            &self.aggregate_id,
            &self.event_type,
            &self.payload,
            &self.headers,
            &self.tracing_span_context,
        ]
    }
}

/// A topic template: literal text around `{aggregatetype}` placeholders, split
/// once into its pieces so rendering a record's topic is one allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    text: String,
    pieces: Vec<TemplatePiece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePiece {
    Literal(String),
    AggregateType,
}

impl TopicTemplate {
    const PLACEHOLDERS: [&'static str; 2] = ["{aggregatetype}", "${routedByValue}"];

    /// Parses a template; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<TopicTemplate, TemplateError> {
        let mut rest = text.to_owned();
        for p in Self::PLACEHOLDERS {
            rest = rest.replace(p, "");
        }
        if text.is_empty() {
            return Err(TemplateError("the template is empty".to_owned()));
        }
        if let Some(c) = rest
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(TemplateError(format!(
                "{text:?} contains {c:?}, which is neither a placeholder ({}) nor valid in a topic name",
                Self::PLACEHOLDERS.join(", ")
            )));
        }
        Ok(TopicTemplate {
            text: text.to_owned(),
            pieces: Self::pieces(text),
        })
    }

    /// `text` split at the placeholders, left to right.
    fn pieces(text: &str) -> Vec<TemplatePiece> {
        let mut pieces = Vec::new();
        let mut rest = text;
        loop {
            let next = Self::PLACEHOLDERS
                .iter()
                .filter_map(|p| rest.find(p).map(|at| (at, p.len())))
                .min();
            match next {
                Some((at, len)) => {
                    if at > 0 {
                        pieces.push(TemplatePiece::Literal(rest[..at].to_owned()));
                    }
                    pieces.push(TemplatePiece::AggregateType);
                    rest = &rest[at + len..];
                }
                None => {
                    if !rest.is_empty() {
                        pieces.push(TemplatePiece::Literal(rest.to_owned()));
                    }
                    return pieces;
                }
            }
        }
    }

    /// The topic for a row whose aggregate type is `aggregate_type`.
    pub fn render(&self, aggregate_type: &str) -> String {
        let length = self
            .pieces
            .iter()
            .map(|piece| match piece {
                TemplatePiece::Literal(text) => text.len(),
                TemplatePiece::AggregateType => aggregate_type.len(),
            })
            .sum();
        let mut topic = String::with_capacity(length);
        for piece in &self.pieces {
            topic.push_str(match piece {
                TemplatePiece::Literal(text) => text,
                TemplatePiece::AggregateType => aggregate_type,
            });
        }
        topic
    }
}

impl fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Which logical messages are routed, and where they may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRouting {
    pub prefix: String,
    /// The allow-list of topics.
    pub topics: Vec<String>,
}

/// How the payload column becomes the Kafka value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PayloadFormat {
    /// The jsonb (or text) value as PostgreSQL renders it.
    #[default]
    Json,
    /// A JSON string holding that text, as Debezium's outbox event router emits it
    /// by default (`"{\"total\": 10}"`).
    JsonString,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_templates_render_every_placeholder_once() {
        let cases = [
            (
                "outbox.event.{aggregatetype}",
                "order",
                "outbox.event.order",
            ),
            (
                "outbox.event.${routedByValue}",
                "order",
                "outbox.event.order",
            ),
            ("{aggregatetype}", "order", "order"),
            ("fixed.topic", "order", "fixed.topic"),
            ("{aggregatetype}.x.${routedByValue}-y", "a", "a.x.a-y"),
            ("a{aggregatetype}{aggregatetype}b", "c", "accb"),
            // The aggregate type is text, never a template itself.
            (
                "t.{aggregatetype}",
                "${routedByValue}",
                "t.${routedByValue}",
            ),
            ("t.${routedByValue}", "{aggregatetype}", "t.{aggregatetype}"),
        ];
        for (template, aggregate_type, topic) in cases {
            let parsed = TopicTemplate::parse(template).unwrap();
            assert_eq!(parsed.render(aggregate_type), topic, "{template}");
            assert_eq!(parsed.to_string(), template);
        }
    }
}
