use super::*;
use clap::Parser;

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

fn args(flags: &[&str]) -> Args {
    let mut argv = vec!["outbox-relay"];
    argv.extend_from_slice(flags);
    Cli::try_parse_from(argv).expect("valid flags").args
}

const REQUIRED: [&str; 4] = [
    "--postgres-url",
    "postgres://u:p@h/db",
    "--kafka-brokers",
    "k:9092",
];

#[test]
fn defaults_apply_without_a_file() {
    let config = RelayConfig::from_args(&args(&REQUIRED)).unwrap();
    assert_eq!(config.postgres.publication, DEFAULT_PUBLICATION);
    assert_eq!(config.postgres.table.to_string(), DEFAULT_TABLE);
    assert_eq!(
        config.outbox.topic_template.to_string(),
        DEFAULT_TOPIC_TEMPLATE
    );
    assert_eq!(config.outbox.columns, DEFAULT_COLUMNS);
    assert_eq!(config.kafka.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
    assert_eq!(config.slot_name("Orders-DB"), "outbox_relay_orders_db");
}

#[test]
fn flags_beat_the_file_which_beats_defaults() {
    let dir = std::env::temp_dir().join(format!("relay-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("relay.toml");
    std::fs::write(
        &file,
        r#"
[postgres]
url = "postgres://file/db"
slot = "from_file"
table = "app.events"

[outbox]
topic_template = "events.${routedByValue}"
[outbox.columns]
payload = "body"

[kafka]
brokers = "file:9092"
max_in_flight = 5
[kafka.options]
"linger.ms" = "20"
"#,
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let config = RelayConfig::from_args(&args(&[
        "--config",
        path,
        "--slot",
        "from_flag",
        "--kafka-option",
        "linger.ms=1",
        "--kafka-option",
        "compression.type=lz4",
    ]))
    .unwrap();
    assert_eq!(config.postgres.url.expose(), "postgres://file/db");
    assert_eq!(config.postgres.slot.as_deref(), Some("from_flag"));
    assert_eq!(config.postgres.table.quoted(), "\"app\".\"events\"");
    assert_eq!(config.outbox.topic_template.render("order"), "events.order");
    assert_eq!(config.outbox.columns.payload.as_str(), "body");
    assert_eq!(config.outbox.columns.id.as_str(), "id");
    assert_eq!(config.kafka.brokers, "file:9092");
    assert_eq!(config.kafka.max_in_flight, 5);
    assert_eq!(config.kafka.options["linger.ms"], "1");
    assert_eq!(config.kafka.options["compression.type"], "lz4");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_example_file_is_valid_and_states_the_defaults() {
    let path = testkit::crate_dir(env!("CARGO_MANIFEST_DIR")).join("relay.example.toml");
    let path = path.to_str().expect("a UTF-8 path");
    let config = RelayConfig::from_args(&args(&["--config", path])).unwrap();
    let defaults = RelayConfig::new("", "");
    assert_eq!(config.postgres.publication, defaults.postgres.publication);
    assert_eq!(config.postgres.table, defaults.postgres.table);
    assert_eq!(
        config.postgres.status_interval,
        defaults.postgres.status_interval
    );
    assert_eq!(
        config.postgres.standby_poll_interval,
        defaults.postgres.standby_poll_interval
    );
    assert_eq!(
        config.postgres.takeover_after,
        defaults.postgres.takeover_after
    );
    assert_eq!(config.postgres.streaming, defaults.postgres.streaming);
    assert_eq!(
        config.postgres.stream_memory_bytes,
        defaults.postgres.stream_memory_bytes
    );
    assert_eq!(config.postgres.spill_dir, defaults.postgres.spill_dir);
    assert_eq!(config.outbox.topic_template, defaults.outbox.topic_template);
    assert_eq!(config.outbox.columns, defaults.outbox.columns);
    assert_eq!(config.kafka.max_in_flight, defaults.kafka.max_in_flight);
    assert_eq!(
        config.kafka.topic_partitions,
        defaults.kafka.topic_partitions
    );
    assert_eq!(
        config.kafka.topic_replication_factor,
        defaults.kafka.topic_replication_factor
    );
    assert_eq!(config.slot_name("orders"), "outbox_relay_orders");
    assert_eq!(config.sink, defaults.sink);
    let (nats, nats_default) = (&config.nats, &defaults.nats);
    assert_eq!(nats.url.expose(), nats_default.url.expose());
    assert_eq!(
        (
            &nats.stream,
            &nats.subjects,
            nats.create_stream,
            nats.storage,
            nats.replicas
        ),
        (
            &nats_default.stream,
            &nats_default.subjects,
            nats_default.create_stream,
            nats_default.storage,
            nats_default.replicas
        )
    );
    assert_eq!(
        (nats.duplicate_window, nats.ack_timeout),
        (nats_default.duplicate_window, nats_default.ack_timeout)
    );
    let (rabbitmq, rabbitmq_default) = (&config.rabbitmq, &defaults.rabbitmq);
    assert_eq!(rabbitmq.url.expose(), rabbitmq_default.url.expose());
    assert_eq!(
        (
            &rabbitmq.exchange,
            &rabbitmq.exchange_type,
            rabbitmq.declare_exchange,
            &rabbitmq.routing_key,
            rabbitmq.max_message_bytes
        ),
        (
            &rabbitmq_default.exchange,
            &rabbitmq_default.exchange_type,
            rabbitmq_default.declare_exchange,
            &rabbitmq_default.routing_key,
            rabbitmq_default.max_message_bytes
        )
    );
    let (redis, redis_default) = (&config.redis, &defaults.redis);
    assert_eq!(redis.url.expose(), redis_default.url.expose());
    assert_eq!(
        (
            &redis.stream,
            redis.maxlen,
            redis.wait_replicas,
            redis.response_timeout,
            redis.max_record_bytes
        ),
        (
            &redis_default.stream,
            redis_default.maxlen,
            redis_default.wait_replicas,
            redis_default.response_timeout,
            redis_default.max_record_bytes
        )
    );
}

#[test]
fn unknown_file_keys_are_rejected() {
    let dir = std::env::temp_dir().join(format!("relay-config-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("relay.toml");
    std::fs::write(&file, "[postgres]\nslott = \"x\"\n").unwrap();
    let err = RelayConfig::from_args(&args(&["--config", file.to_str().unwrap()])).unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains("slott"), "{chain}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_and_invalid_values_are_named() {
    let err = RelayConfig::from_args(&args(&[])).unwrap_err().to_string();
    assert!(
        err.contains("postgres.url") && err.contains("OUTBOX_RELAY_POSTGRES_URL"),
        "{err}"
    );

    for (flags, expect) in [
        (&["--slot", "Bad-Slot"][..], "slot"),
        (
            &["--topic-template", "a/{aggregatetype}"][..],
            "topic_template",
        ),
        (&["--kafka-option", "acks=1"][..], "acks"),
        (&["--kafka-option", "novalue"][..], "KEY=VALUE"),
        (&["--column-payload", "id"][..], "configured twice"),
        (&["--max-in-flight", "0"][..], "max_in_flight"),
        (
            &["--topic-replication-factor", "0"][..],
            "topic_replication_factor",
        ),
        (&["--table", "a.b.c"][..], "table"),
        (&["--message-prefix", "outbox"][..], "allow-list"),
        (
            &[
                "--heartbeat-interval-ms",
                "40000",
                "--stall-timeout-ms",
                "60000",
            ][..],
            "twice the heartbeat",
        ),
    ] {
        let mut all = REQUIRED.to_vec();
        all.extend_from_slice(flags);
        let err = RelayConfig::from_args(&args(&all)).unwrap_err().to_string();
        assert!(err.contains(expect), "{flags:?}: {err}");
    }
}

#[test]
fn secrets_do_not_print() {
    let config = RelayConfig::new("postgres://u:hunter2@h/db", "k:1");
    assert!(!format!("{config:?}").contains("hunter2"));
}

#[test]
fn help_states_every_default() {
    use clap::CommandFactory;
    let help = Cli::command().render_long_help().to_string();
    for default in [
        DEFAULT_TOPIC_TEMPLATE.to_owned(),
        DEFAULT_TABLE.to_owned(),
        DEFAULT_PUBLICATION.to_owned(),
        format!("{DEFAULT_SLOT_PREFIX}<database>"),
        DEFAULT_STATUS_INTERVAL_MS.to_string(),
        DEFAULT_STANDBY_POLL_INTERVAL_MS.to_string(),
        DEFAULT_TAKEOVER_AFTER_MS.to_string(),
        DEFAULT_STREAM_MEMORY_BYTES.to_string(),
        DEFAULT_HEARTBEAT_INTERVAL_MS.to_string(),
        DEFAULT_MAX_IN_FLIGHT.to_string(),
        DEFAULT_TOPIC_PARTITIONS.to_string(),
        DEFAULT_TOPIC_REPLICATION_FACTOR.to_string(),
        DEFAULT_DEAD_LETTER_TOPIC.to_owned(),
        DEFAULT_HTTP_LISTEN.to_owned(),
        DEFAULT_STALL_TIMEOUT_MS.to_string(),
    ] {
        assert!(
            help.contains(&format!("[default: {default}]")),
            "--help lacks {default}"
        );
    }
    for col in DEFAULT_COLUMNS.all() {
        assert!(
            help.contains(&format!("[default: {col}]")),
            "--help lacks {col}"
        );
    }
}

#[test]
fn the_command_line_and_the_file_do_not_print_secrets() {
    let parsed = args(&[
        "--postgres-url",
        "postgres://u:hunter2@h/db",
        "--kafka-option",
        "sasl.password=hunter2",
        // Split at the comma: "hunter2" alone is not KEY=VALUE, and still hidden.
        "--kafka-option",
        "sasl.username=relay,hunter2",
    ]);
    let file: Sections = toml::from_str(
        "[postgres]\nurl = \"postgres://u:hunter2@h/db\"\n\
         [kafka.options]\n\"sasl.password\" = \"hunter2\"\n",
    )
    .unwrap();
    let layered = file.clone().or(parsed.options.clone());
    for (printed, has_options) in [
        (format!("{parsed:?}"), true),
        (format!("{:?}", parsed.options.postgres), false),
        (format!("{:?}", parsed.options.kafka), true),
        (format!("{file:?}"), true),
        (format!("{:?}", file.postgres), false),
        (format!("{layered:?}"), true),
    ] {
        assert!(!printed.contains("hunter2"), "{printed}");
        assert_eq!(printed.contains("sasl.password"), has_options, "{printed}");
    }
}

#[test]
fn empty_values_turn_options_off() {
    let mut flags = REQUIRED.to_vec();
    flags.extend([
        "--dead-letter-topic=",
        "--http-listen=",
        "--heartbeat-interval-ms",
        "0",
        "--message-prefix",
        "events",
        "--message-topics",
        "a, b,",
    ]);
    let config = RelayConfig::from_args(&args(&flags)).unwrap();
    assert_eq!(config.outbox.dead_letter_topic, None);
    assert_eq!(config.http.listen, None);
    assert_eq!(config.postgres.heartbeat_interval, None);
    let messages = config.outbox.messages.unwrap();
    assert_eq!(
        (messages.prefix.as_str(), &messages.topics[..]),
        ("events", &["a".to_owned(), "b".to_owned()][..])
    );

    let file: Sections = toml::from_str(
        "[postgres]\nurl = \"postgres://h/db\"\nheartbeat_interval_ms = 0\n\
         [outbox]\ndead_letter_topic = \"\"\nmessage_prefix = \"events\"\n\
         message_topics = [\"a\", \"b\"]\n\
         [kafka]\nbrokers = \"k:1\"\n[http]\nlisten = \"\"\n",
    )
    .unwrap();
    let config = file.resolve().unwrap();
    assert_eq!(config.outbox.dead_letter_topic, None);
    assert_eq!(config.http.listen, None);
    assert_eq!(config.postgres.heartbeat_interval, None);
    assert_eq!(config.outbox.messages.unwrap().topics, ["a", "b"]);
}

#[test]
fn every_file_key_is_read() {
    let file: Sections = toml::from_str(
        r#"
[postgres]
url = "postgres://u@h/db"
slot = "s1"
publication = "p1"
create_publication = false
table = "app.events"
status_interval_ms = 1
snapshot_mode = "never"
heartbeat_interval_ms = 2
standby_poll_interval_ms = 3
takeover_after_ms = 10
streaming = false
stream_memory_bytes = 11
spill_dir = "/var/spill"

[outbox]
topic_template = "t.{aggregatetype}"
message_prefix = "m"
message_topics = ["t.order"]
payload_format = "json-string"
dead_letter_topic = "dlq.x"

[outbox.columns]
id = "c1"
aggregate_type = "c2"
aggregate_id = "c3"
event_type = "c4"
payload = "c5"
headers = "c6"
tracing_span_context = "c7"

[kafka]
brokers = "k:1"
max_in_flight = 4
create_topics = false
topic_partitions = 5
topic_replication_factor = 6

[kafka.options]
"linger.ms" = "7"

[http]
listen = "127.0.0.1:8"
stall_timeout_ms = 9
"#,
    )
    .unwrap();
    let c = file.resolve().unwrap();
    let ms = Duration::from_millis;
    let pg = &c.postgres;
    assert_eq!(pg.url.expose(), "postgres://u@h/db");
    assert_eq!(pg.slot.as_deref(), Some("s1"));
    assert_eq!(pg.publication, "p1");
    assert!(!pg.create_publication);
    assert_eq!(pg.table.to_string(), "app.events");
    assert_eq!(
        (
            pg.status_interval,
            pg.heartbeat_interval,
            pg.standby_poll_interval,
            pg.takeover_after
        ),
        (ms(1), Some(ms(2)), ms(3), Some(ms(10)))
    );
    assert!(!pg.streaming);
    assert_eq!(pg.stream_memory_bytes, 11);
    assert_eq!(pg.spill_dir, std::path::Path::new("/var/spill"));
    assert_eq!(pg.snapshot, InitialSnapshot::Never);
    let outbox = &c.outbox;
    assert_eq!(outbox.topic_template.to_string(), "t.{aggregatetype}");
    assert_eq!(
        outbox.messages,
        Some(MessageRouting {
            prefix: "m".to_owned(),
            topics: vec!["t.order".to_owned()],
        })
    );
    assert_eq!(outbox.payload_format, PayloadFormat::JsonString);
    assert_eq!(outbox.dead_letter_topic.as_deref(), Some("dlq.x"));
    let names = outbox.columns.all();
    assert_eq!(
        names.map(Ident::as_str),
        ["c1", "c2", "c3", "c4", "c5", "c6", "c7"]
    );
    let kafka = &c.kafka;
    assert_eq!(kafka.brokers, "k:1");
    assert_eq!(kafka.options["linger.ms"], "7");
    assert!(!kafka.create_topics);
    assert_eq!(
        (
            kafka.max_in_flight,
            kafka.topic_partitions,
            kafka.topic_replication_factor
        ),
        (4, 5, 6)
    );
    assert_eq!(c.http.listen, Some("127.0.0.1:8".parse().unwrap()));
    assert_eq!(c.http.stall_timeout, ms(9));
}

/// Deployments set these; renaming one silently drops a setting.
#[test]
fn flags_and_environment_variables_keep_their_names() {
    use clap::CommandFactory;
    let command = Cli::command();
    let names: Vec<(String, String)> = command
        .get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            let env = arg.get_env()?.to_str()?;
            Some((long.to_owned(), env.to_owned()))
        })
        .collect();
    let expected = [
        ("config", "CONFIG"),
        ("postgres-url", "POSTGRES_URL"),
        ("slot", "SLOT"),
        ("publication", "PUBLICATION"),
        ("create-publication", "CREATE_PUBLICATION"),
        ("table", "TABLE"),
        ("status-interval-ms", "STATUS_INTERVAL_MS"),
        ("snapshot-mode", "SNAPSHOT_MODE"),
        ("heartbeat-interval-ms", "HEARTBEAT_INTERVAL_MS"),
        ("standby-poll-interval-ms", "STANDBY_POLL_INTERVAL_MS"),
        ("takeover-after-ms", "TAKEOVER_AFTER_MS"),
        ("streaming", "STREAMING"),
        ("stream-memory-bytes", "STREAM_MEMORY_BYTES"),
        ("spill-dir", "SPILL_DIR"),
        ("topic-template", "TOPIC_TEMPLATE"),
        ("payload-format", "PAYLOAD_FORMAT"),
        ("message-prefix", "MESSAGE_PREFIX"),
        ("message-topics", "MESSAGE_TOPICS"),
        ("column-id", "COLUMN_ID"),
        ("column-aggregate-type", "COLUMN_AGGREGATE_TYPE"),
        ("column-aggregate-id", "COLUMN_AGGREGATE_ID"),
        ("column-event-type", "COLUMN_EVENT_TYPE"),
        ("column-payload", "COLUMN_PAYLOAD"),
        ("column-headers", "COLUMN_HEADERS"),
        ("column-tracing-span-context", "COLUMN_TRACING_SPAN_CONTEXT"),
        ("dead-letter-topic", "DEAD_LETTER_TOPIC"),
        ("http-listen", "HTTP_LISTEN"),
        ("stall-timeout-ms", "STALL_TIMEOUT_MS"),
        ("sink", "SINK"),
        ("kafka-brokers", "KAFKA_BROKERS"),
        ("kafka-option", "KAFKA_OPTIONS"),
        ("max-in-flight", "MAX_IN_FLIGHT"),
        ("create-topics", "CREATE_TOPICS"),
        ("topic-partitions", "TOPIC_PARTITIONS"),
        ("topic-replication-factor", "TOPIC_REPLICATION_FACTOR"),
        ("nats-url", "NATS_URL"),
        ("nats-ca-file", "NATS_CA_FILE"),
        ("nats-credentials-file", "NATS_CREDENTIALS_FILE"),
        ("nats-stream", "NATS_STREAM"),
        ("nats-subjects", "NATS_SUBJECTS"),
        ("nats-create-stream", "NATS_CREATE_STREAM"),
        ("nats-storage", "NATS_STORAGE"),
        ("nats-replicas", "NATS_REPLICAS"),
        ("nats-duplicate-window-ms", "NATS_DUPLICATE_WINDOW_MS"),
        ("nats-ack-timeout-ms", "NATS_ACK_TIMEOUT_MS"),
        ("rabbitmq-url", "RABBITMQ_URL"),
        ("rabbitmq-ca-file", "RABBITMQ_CA_FILE"),
        ("rabbitmq-exchange", "RABBITMQ_EXCHANGE"),
        ("rabbitmq-exchange-type", "RABBITMQ_EXCHANGE_TYPE"),
        ("rabbitmq-declare-exchange", "RABBITMQ_DECLARE_EXCHANGE"),
        ("rabbitmq-routing-key", "RABBITMQ_ROUTING_KEY"),
        ("rabbitmq-max-message-bytes", "RABBITMQ_MAX_MESSAGE_BYTES"),
        ("redis-url", "REDIS_URL"),
        ("redis-ca-file", "REDIS_CA_FILE"),
        ("redis-stream", "REDIS_STREAM"),
        ("redis-maxlen", "REDIS_MAXLEN"),
        ("redis-wait-replicas", "REDIS_WAIT_REPLICAS"),
        ("redis-response-timeout-ms", "REDIS_RESPONSE_TIMEOUT_MS"),
        ("redis-max-record-bytes", "REDIS_MAX_RECORD_BYTES"),
    ]
    .map(|(long, env)| (long.to_owned(), format!("OUTBOX_RELAY_{env}")));
    assert_eq!(names, expected);
}

#[test]
fn an_unset_takeover_bound_keeps_clear_of_a_long_status_interval() {
    let long: Sections = toml::from_str(
        "[postgres]\nurl = \"postgres://u@h/db\"\nstatus_interval_ms = 600000\n[kafka]\nbrokers = \"k:1\"\n",
    )
    .unwrap();
    let config = long.resolve().unwrap();
    assert_eq!(
        config.postgres.takeover_after,
        Some(Duration::from_secs(1800))
    );
    // Set explicitly, a bound a healthy relay could exceed is refused.
    let short: Sections = toml::from_str(
        "[postgres]\nurl = \"postgres://u@h/db\"\nstatus_interval_ms = 600000\ntakeover_after_ms = 30000\n[kafka]\nbrokers = \"k:1\"\n",
    )
    .unwrap();
    let error = short.resolve().unwrap_err().to_string();
    assert!(error.contains("takeover_after_ms"), "{error}");
}

#[test]
fn another_sink_needs_no_brokers_and_reads_its_own_section() {
    let file: Sections = toml::from_str(
        "sink = \"nats\"\n[postgres]\nurl = \"postgres://u@h/db\"\n\
         [outbox]\ndead_letter_topic = \"shop.dlq\"\n\
         [nats]\nurl = \"nats://n:4222\"\nstream = \"SHOP\"\nsubjects = [\"shop.>\"]\n\
         storage = \"memory\"\nduplicate_window_ms = 60000\n",
    )
    .unwrap();
    let config = file.resolve().unwrap();
    assert_eq!(config.sink, SinkKind::Nats);
    assert_eq!(config.nats.url.expose(), "nats://n:4222");
    assert_eq!(config.nats.stream, "SHOP");
    assert_eq!(config.nats.subjects, ["shop.>"]);
    assert_eq!(config.nats.storage, NatsStorage::Memory);
    assert_eq!(config.nats.duplicate_window, Duration::from_secs(60));
    assert!(config.nats.create_stream);

    // Kafka, the default, still needs its brokers.
    let kafka: Sections = toml::from_str("[postgres]\nurl = \"postgres://u@h/db\"\n").unwrap();
    let error = kafka.resolve().unwrap_err().to_string();
    assert!(error.contains("kafka.brokers"), "{error}");

    let redis: Sections = toml::from_str(
        "sink = \"redis\"\n[postgres]\nurl = \"postgres://u@h/db\"\n[redis]\nmaxlen = 1000\nwait_replicas = 1\n",
    )
    .unwrap();
    let config = redis.resolve().unwrap();
    assert_eq!(
        (config.redis.maxlen, config.redis.wait_replicas),
        (Some(1000), 1)
    );
    assert_eq!(config.redis.stream, "{topic}");

    let rabbitmq: Sections = toml::from_str(
        "sink = \"rabbitmq\"\n[postgres]\nurl = \"postgres://u@h/db\"\n[rabbitmq]\nexchange = \"shop\"\nrouting_key = \"shop.{topic}\"\n",
    )
    .unwrap();
    let config = rabbitmq.resolve().unwrap();
    assert_eq!(config.rabbitmq.exchange, "shop");
    assert_eq!(config.rabbitmq.routing_key, "shop.{topic}");
}

#[test]
fn a_stream_that_would_not_take_the_dead_letters_is_refused() {
    // The default dead-letter topic outbox.dlq is not under shop.>.
    let file: Sections = toml::from_str(
        "sink = \"nats\"\n[postgres]\nurl = \"postgres://u@h/db\"\n[nats]\nsubjects = [\"shop.>\"]\n",
    )
    .unwrap();
    let error = file.resolve().unwrap_err().to_string();
    assert!(
        error.contains("nats.subjects") && error.contains("outbox.dlq"),
        "{error}"
    );
    let bad_type: Sections = toml::from_str(
        "sink = \"rabbitmq\"\n[postgres]\nurl = \"postgres://u@h/db\"\n[rabbitmq]\nexchange_type = \"x\"\n",
    )
    .unwrap();
    assert!(bad_type.resolve().is_err());
}
