//! `outbox-relay init` and `outbox-relay check`: the setup a deployment runs before
//! the service writes its first row, and a diagnosis that says what is wrong.

use std::fmt;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::RelayConfig;
use crate::replication::{ConnectConfig, ReplicationClient};
use crate::runner::{error_chain, RelayError};
use crate::setup::{self, PublicationState, SlotInspection};
use crate::sink::kafka::client_config;

/// How long `check` waits for the brokers' metadata.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates the publication and the slot when missing, so that every row the service
/// writes from now on is streamed. Returns a summary for the operator.
pub async fn init(config: &RelayConfig) -> Result<String, RelayError> {
    let connect = ConnectConfig::from_url(config.postgres.url.expose()).map_err(RelayError::Url)?;
    let mut client = ReplicationClient::connect(&connect)
        .await
        .map_err(RelayError::Connect)?;
    let prepared = setup::prepare(&mut client, config, connect.dbname()).await?;
    // `client` created the slot and stays idle meanwhile: its exported snapshot
    // stays valid for the check.
    let nothing_to_publish = match &prepared.slot.snapshot {
        Some(snapshot) if prepared.slot.created => {
            crate::snapshot::complete_if_empty(config, &connect, &prepared.slot.name, snapshot)
                .await?
        }
        _ => false,
    };
    client.close().await;
    let publication = if prepared.created_publication {
        "created"
    } else {
        "exists"
    };
    let slot = if prepared.slot.created {
        "created"
    } else {
        "exists"
    };
    let mut summary = format!(
        "publication {} {publication} (table {})\nslot {} {slot}, confirmed position {}",
        config.postgres.publication,
        config.postgres.table,
        prepared.slot.name,
        prepared.slot.confirmed
    );
    if nothing_to_publish {
        summary.push_str(
            "\ninitial snapshot complete: the outbox table was empty when the slot was \
             created; the first start streams",
        );
    } else if prepared.slot.snapshot.is_some() {
        summary.push_str(
            "\ninitial snapshot pending: the first start publishes the rows already in the \
             outbox table, then streams",
        );
    }
    Ok(summary)
}

/// One line of a check report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub subject: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// Everything `check` looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub checks: Vec<Check>,
}

impl CheckReport {
    /// Whether every check passed.
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    fn pass(&mut self, subject: &'static str, detail: impl Into<String>) {
        self.checks.push(Check {
            subject,
            ok: true,
            detail: detail.into(),
        });
    }

    fn fail(&mut self, subject: &'static str, detail: impl Into<String>) {
        self.checks.push(Check {
            subject,
            ok: false,
            detail: detail.into(),
        });
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for check in &self.checks {
            let mark = if check.ok { "ok  " } else { "FAIL" };
            writeln!(f, "{mark} {:<12} {}", check.subject, check.detail)?;
        }
        Ok(())
    }
}

/// Checks configuration, PostgreSQL (connection, privileges, `wal_level`, table,
/// publication, slot) and the brokers without changing anything.
pub async fn check(config: &RelayConfig) -> CheckReport {
    let mut report = CheckReport::default();
    match config.validate() {
        Ok(()) => report.pass("config", "valid"),
        Err(e) => report.fail("config", error_chain(&e)),
    }
    check_postgres(config, &mut report).await;
    check_brokers(config, &mut report).await;
    report
}

async fn check_postgres(config: &RelayConfig, report: &mut CheckReport) {
    let connect = match ConnectConfig::from_url(config.postgres.url.expose()) {
        Ok(c) => c,
        Err(e) => return report.fail("postgres", error_chain(&e)),
    };
    let mut client = match ReplicationClient::connect(&connect).await {
        Ok(c) => c,
        Err(e) => return report.fail("postgres", error_chain(&e)),
    };
    report.pass(
        "postgres",
        format!(
            "connected to {}:{} database {} as {} (PostgreSQL {})",
            connect.host(),
            connect.port(),
            connect.dbname(),
            connect.user(),
            client.server_version().unwrap_or("of unknown version")
        ),
    );
    let database = connect.dbname().to_owned();

    match setup::check_wal_level(&mut client).await {
        Ok(()) => report.pass("wal_level", "logical"),
        Err(e) => report.fail("wal_level", error_chain(&e)),
    }
    match role_may(&mut client, "rolreplication OR rolsuper").await {
        Ok(true) => report.pass("role", format!("{} may replicate", connect.user())),
        Ok(false) => report.fail(
            "role",
            format!(
                "{} lacks the REPLICATION attribute: ALTER ROLE {} REPLICATION",
                connect.user(),
                connect.user()
            ),
        ),
        Err(e) => report.fail("role", error_chain(&e)),
    }
    if config.postgres.takeover_after.is_some() {
        let sees = "rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')";
        match role_may(&mut client, sees).await {
            Ok(true) => report.pass(
                "takeover",
                "a standby can see when the slot's holder last reported, and ends a hung one",
            ),
            // Not a failure: one relay works without it, and the server's
            // wal_sender_timeout still ends a hung holder.
            Ok(false) => report.pass(
                "takeover",
                format!(
                    "note: {user} cannot see pg_stat_replication.reply_time, so a standby \
                     cannot tell a hung slot holder; wal_sender_timeout ends it instead \
                     (GRANT pg_read_all_stats TO {user} for takeover after takeover_after_ms)",
                    user = connect.user()
                ),
            ),
            Err(e) => report.fail("takeover", error_chain(&e)),
        }
    }
    let table = match setup::check_table(&mut client, config, &database).await {
        Ok(table) => {
            let kind = if table.partitioned {
                "partitioned, "
            } else {
                ""
            };
            report.pass(
                "table",
                format!(
                    "{} ({kind}{})",
                    config.postgres.table,
                    table.columns.join(", ")
                ),
            );
            table
        }
        Err(e) => {
            report.fail("table", error_chain(&e));
            // Inspect the rest as for a plain table.
            setup::OutboxTable {
                columns: Vec::new(),
                partitioned: false,
            }
        }
    };
    let publication = &config.postgres.publication;
    match setup::inspect_publication(&mut client, config, &table).await {
        Ok(PublicationState::Covers) => report.pass(
            "publication",
            format!("{publication} publishes {}", config.postgres.table),
        ),
        Ok(PublicationState::NotViaRoot) => report.fail(
            "publication",
            error_chain(&setup::SetupError::PublicationNotViaRoot {
                publication: publication.clone(),
                table: config.postgres.table.to_string(),
            }),
        ),
        Ok(PublicationState::LacksTable) => report.fail(
            "publication",
            format!(
                "{publication} does not publish {}: ALTER PUBLICATION {publication} ADD TABLE {}",
                config.postgres.table, config.postgres.table
            ),
        ),
        Ok(PublicationState::Missing) if config.postgres.create_publication => report.pass(
            "publication",
            format!("{publication} is missing; `outbox-relay init` or the first start creates it"),
        ),
        Ok(PublicationState::Missing) => report.fail(
            "publication",
            format!(
                "{publication} is missing and create_publication is off: CREATE PUBLICATION \
                 {publication} FOR TABLE {}",
                config.postgres.table
            ),
        ),
        Err(e) => report.fail("publication", error_chain(&e)),
    }
    let slot = config.slot_name(&database);
    match setup::inspect_slot(&mut client, &slot, &database).await {
        Ok(SlotInspection::Ready {
            confirmed,
            active_pid,
            wal_status,
        }) => {
            let active = match active_pid {
                None => "free (no relay streams from it)".to_owned(),
                Some(pid) => match crate::standby::holder(&mut client, &slot).await {
                    Ok(Some(holder)) => format!("held by {holder}"),
                    _ => format!("held by server process {pid}"),
                },
            };
            report.pass(
                "slot",
                format!("{slot} confirmed {confirmed}, {active}, wal_status {wal_status}"),
            );
        }
        Ok(SlotInspection::Missing) => report.fail(
            "slot",
            format!(
                "{slot} does not exist: rows written before it exists are not streamed; run \
                 `outbox-relay init` before the service writes"
            ),
        ),
        Ok(SlotInspection::Invalidated) => report.fail(
            "slot",
            error_chain(&setup::SetupError::SlotInvalidated(slot.clone())),
        ),
        Ok(SlotInspection::Mismatch { found }) => {
            report.fail("slot", format!("{slot} exists but is {found}"));
        }
        Ok(SlotInspection::Creating { active_pid }) => report.pass(
            "slot",
            format!(
                "{slot} is being created by server process {}",
                active_pid.map_or_else(|| "?".to_owned(), |p| p.to_string())
            ),
        ),
        Err(e) => report.fail("slot", error_chain(&e)),
    }
    client.close().await;
}

/// Whether `condition` (SQL over `pg_roles`) holds for the connected role.
async fn role_may(
    client: &mut ReplicationClient,
    condition: &str,
) -> Result<bool, crate::replication::ReplicationError> {
    let rows = client
        .simple_query(&format!(
            "SELECT {condition} FROM pg_roles WHERE rolname = current_user"
        ))
        .await?;
    Ok(rows
        .first()
        .and_then(|r| r.first())
        .cloned()
        .flatten()
        .as_deref()
        == Some("t"))
}

async fn check_brokers(config: &RelayConfig, report: &mut CheckReport) {
    use crate::sink::{any::SinkKind, nats, rabbitmq, redis};
    if config.sink == SinkKind::Kafka {
        return check_kafka(config, report).await;
    }
    let probe = async {
        match config.sink {
            SinkKind::Nats => nats::probe(&config.nats).await,
            SinkKind::Rabbitmq => rabbitmq::probe(&config.rabbitmq).await,
            SinkKind::Redis | SinkKind::Kafka => redis::probe(&config.redis).await,
        }
    };
    let name = config.sink.as_str();
    match tokio::time::timeout(BROKER_TIMEOUT, probe).await {
        Ok(Ok(detail)) => report.pass(name, detail),
        Ok(Err(detail)) => report.fail(name, detail),
        Err(_) => report.fail(name, "the check did not finish"),
    }
}

async fn check_kafka(config: &RelayConfig, report: &mut CheckReport) {
    let client_config = client_config(&config.kafka);
    let brokers = config.kafka.brokers.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client_config.create()?;
        let metadata = consumer.fetch_metadata(None, BROKER_TIMEOUT)?;
        Ok::<_, rdkafka::error::KafkaError>((metadata.brokers().len(), metadata.topics().len()))
    })
    .await;
    match outcome {
        Ok(Ok((brokers_seen, topics))) => report.pass(
            "kafka",
            format!("{brokers}: {brokers_seen} broker(s), {topics} topic(s) visible"),
        ),
        Ok(Err(e)) => report.fail("kafka", format!("{brokers}: {}", error_chain(&e))),
        Err(e) => report.fail("kafka", format!("{brokers}: the check did not finish: {e}")),
    }
}
