//! One order, one trace: the shop's eight processes (four services, four relays)
//! export their spans over OTLP/HTTP to a receiver inside this test, and the
//! spans of the order form one tree from `POST /orders` to the saga's end.
//!
//! The services export protobuf (the default), the relays `http/json`, so both
//! encodings are read here. The binaries are built by `cargo build` before the
//! shop starts and run from a copy (or taken from `OUTBOX_BIN_DIR`).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::post;
use customer_service::ADA;
use inventory_service::WIDGET;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use shop::{Card, Mode, OrderRequest, ShopConfig};

const SERVICES: [&str; 4] = ["order", "customer", "inventory", "payment"];

/// One span as received.
#[derive(Debug, Clone)]
struct Seen {
    service: String,
    trace: String,
    id: String,
    /// Empty for a root.
    parent: String,
    name: String,
    kind: SpanKind,
    events: Vec<String>,
}

#[derive(Debug, Default)]
struct Received {
    spans: Vec<Seen>,
    /// Requests by content type.
    requests: BTreeMap<String, usize>,
}

type Receiver = Arc<Mutex<Received>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

/// `POST /v1/traces`: an OTLP/HTTP receiver, protobuf or JSON.
async fn receive(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let request = if content_type.starts_with("application/json") {
        serde_json::from_slice::<ExportTraceServiceRequest>(&body).map_err(|e| e.to_string())
    } else {
        ExportTraceServiceRequest::decode(body).map_err(|e| e.to_string())
    };
    let request = match request {
        Ok(request) => request,
        Err(error) => {
            eprintln!("receiver: cannot decode a {content_type} export: {error}");
            return StatusCode::BAD_REQUEST;
        }
    };
    let mut received = receiver.lock().unwrap();
    *received.requests.entry(content_type).or_default() += 1;
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .as_ref()
            .and_then(|r| text(&r.attributes, "service.name"))
            .unwrap_or_default();
        for span in resource_spans
            .scope_spans
            .into_iter()
            .flat_map(|scope| scope.spans)
        {
            received.spans.push(Seen {
                service: service.clone(),
                trace: hex(&span.trace_id),
                id: hex(&span.span_id),
                parent: hex(&span.parent_span_id),
                kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
                name: span.name,
                events: span.events.into_iter().map(|e| e.name).collect(),
            });
        }
    }
    StatusCode::OK
}

async fn start_receiver() -> (SocketAddr, Receiver) {
    let receiver = Receiver::default();
    let app = axum::Router::new()
        .route("/v1/traces", post(receive))
        .with_state(Arc::clone(&receiver));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the receiver");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, receiver)
}

/// A folder with the services' and the relay's binaries: `OUTBOX_BIN_DIR`, or a
/// copy (in `into`) of what `cargo build` just made in this test's target folder,
/// so that another build in that folder cannot swap them while the shop runs.
fn binaries(into: &std::path::Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("OUTBOX_BIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<this test> -> target/<profile>
    let exe = std::env::current_exe().expect("the test's path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the profile folder")
        .to_path_buf();
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(other) => other.to_owned(),
    };
    let workspace = testkit::crate_dir(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = std::process::Command::new(cargo);
    command
        .current_dir(&workspace)
        .args(["build", "--quiet", "--profile", &profile]);
    let programs: Vec<String> = std::iter::once("outbox-relay".to_owned())
        .chain(SERVICES.iter().map(|s| format!("{s}-service")))
        .collect();
    for program in &programs {
        command.args(["-p", program, "--bin", program]);
    }
    // The build's own target folder must be this test's.
    if let Some(target) = dir.parent() {
        command.env("CARGO_TARGET_DIR", target);
    }
    let status = command.status().expect("cargo runs");
    assert!(status.success(), "building the binaries failed: {status}");
    let bin = into.join("bin");
    std::fs::create_dir_all(&bin).expect("a folder for the binaries");
    for program in &programs {
        std::fs::copy(dir.join(program), bin.join(program))
            .unwrap_or_else(|e| panic!("cannot copy {program}: {e}"));
    }
    bin
}

/// The spans of `trace` received so far.
fn of_trace(receiver: &Receiver, trace: &str) -> Vec<Seen> {
    receiver
        .lock()
        .unwrap()
        .spans
        .iter()
        .filter(|s| s.trace == trace)
        .cloned()
        .collect()
}

/// The spans of the order's trace once every parent has arrived and `done`
/// holds for them; what was there when the deadline passed otherwise.
async fn whole_trace(
    receiver: &Receiver,
    deadline: Instant,
    done: impl Fn(&[Seen]) -> bool,
) -> (String, Vec<Seen>) {
    loop {
        let root = receiver
            .lock()
            .unwrap()
            .spans
            .iter()
            .find(|s| s.name == "POST /orders")
            .map(|s| s.trace.clone());
        if let Some(trace) = root {
            let spans = of_trace(receiver, &trace);
            let ids: BTreeSet<&str> = spans.iter().map(|s| s.id.as_str()).collect();
            let complete = spans
                .iter()
                .all(|s| s.parent.is_empty() || ids.contains(s.parent.as_str()));
            if (complete && done(&spans)) || Instant::now() > deadline {
                return (trace, spans);
            }
        } else if Instant::now() > deadline {
            return (String::new(), Vec::new());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether every process (the four services and their relays) sent spans.
fn every_process(spans: &[Seen]) -> bool {
    let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    SERVICES.iter().all(|s| {
        services.contains(format!("{s}-service").as_str())
            && services.contains(format!("{s}-relay").as_str())
    })
}

/// The replies the order service handled: one per participant's step.
fn replies_handled(spans: &[Seen]) -> usize {
    spans
        .iter()
        .filter(|s| s.service == "order-service" && s.kind == SpanKind::Consumer)
        .count()
}

/// The shop as processes exporting to a receiver of this test, configured
/// further by `configure`.
async fn traced_shop(
    configure: impl FnOnce(&mut ShopConfig),
) -> (support::TestShop, Receiver, Cleanup) {
    let (receiver_addr, receiver) = start_receiver().await;
    let log_dir = tempdir();
    let bin_dir = binaries(&log_dir);
    let copies = RemoveOnDrop(log_dir.join("bin"));
    eprintln!("process logs in {}", log_dir.display());
    let endpoint = format!("http://{receiver_addr}");
    let shop = support::start(
        |config| {
            config.mode = Mode::Processes {
                bin_dir: bin_dir.clone(),
                log_dir: log_dir.clone(),
            };
            for service in SERVICES {
                for (process, protocol) in [
                    (format!("{service}-service"), "http/protobuf"),
                    (format!("relay-{service}"), "http/json"),
                ] {
                    let env = config.env.entry(process).or_default();
                    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.clone()));
                    env.push(("OTEL_EXPORTER_OTLP_PROTOCOL".into(), protocol.into()));
                    // Export within a tenth of a second rather than every 5 s.
                    env.push(("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()));
                }
            }
            configure(config);
        },
        "",
        "",
    )
    .await;
    (shop, receiver, copies)
}

/// What a traced shop leaves to remove when the test ends.
type Cleanup = RemoveOnDrop;

/// The spans of `spans` as lines, for a failure's message.
fn listing(spans: &[Seen]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "\n  {} {} {:?} {} <- {}",
                s.service,
                s.name,
                s.kind,
                s.id,
                if s.parent.is_empty() { "-" } else { &s.parent }
            )
        })
        .collect()
}

/// Fails the test when no order's trace arrived, listing what did.
fn require_trace(trace: &str, receiver: &Receiver) {
    if trace.is_empty() {
        let received = receiver.lock().unwrap();
        let names: Vec<String> = received
            .spans
            .iter()
            .map(|s| {
                format!(
                    "\n  {} {} {:?} {} {} <- {}",
                    s.service, s.name, s.kind, s.trace, s.id, s.parent
                )
            })
            .collect();
        panic!(
            "no POST /orders span arrived; exports {:?}, spans {}",
            received.requests,
            names.concat()
        );
    }
}

/// One tree: a single root, the order request, and every other parent in it.
fn assert_one_tree(spans: &[Seen], listing: &str) {
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.id.as_str()).collect();
    let roots: Vec<&Seen> = spans.iter().filter(|s| s.parent.is_empty()).collect();
    assert_eq!(roots.len(), 1, "roots {roots:?}:{listing}");
    assert_eq!(roots[0].name, "POST /orders");
    assert_eq!(roots[0].service, "order-service");
    assert_eq!(roots[0].kind, SpanKind::Server);
    for span in spans {
        assert!(
            span.parent.is_empty() || ids.contains(span.parent.as_str()),
            "the parent of {span:?} is missing:{listing}"
        );
    }
}

fn order() -> OrderRequest {
    OrderRequest {
        customer_id: ADA,
        goods_id: WIDGET,
        quantity: 1,
        amount: 12.5,
        card: Card::number("4111 1111 1111 1111"),
    }
}

/// Places one order and waits for its final state.
async fn place_one(shop: &support::TestShop) -> serde_json::Value {
    let id = shop
        .client
        .place_accepted(&order())
        .await
        .expect("the order is accepted");
    shop.client
        .wait_final(id, Duration::from_secs(60))
        .await
        .expect("the saga ends")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_across_the_services_and_relays() {
    let (shop, receiver, _cleanup) = traced_shop(|_| {}).await;
    let done = place_one(&shop).await;
    assert_eq!(done["status"], "APPROVED", "{done}");

    // The saga's last span is the order service's handling of the payment's
    // reply: it ends after the order is APPROVED, so it may come last.
    let (trace, spans) = whole_trace(&receiver, Instant::now() + Duration::from_secs(60), |s| {
        every_process(s) && replies_handled(s) >= 3
    })
    .await;
    let requests = receiver.lock().unwrap().requests.clone();
    shop.stop().await;
    require_trace(&trace, &receiver);
    let listing = listing(&spans);
    eprintln!("trace {trace}: {} spans{listing}", spans.len());
    eprintln!("exports received by content type: {requests:?}");
    assert!(
        requests.keys().any(|t| t.starts_with("application/json"))
            && requests
                .keys()
                .any(|t| t.starts_with("application/x-protobuf")),
        "both encodings: {requests:?}"
    );

    // Every process took part.
    let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    for service in SERVICES {
        for name in [format!("{service}-service"), format!("{service}-relay")] {
            assert!(
                services.contains(name.as_str()),
                "no span of {name}:{listing}"
            );
        }
    }

    assert_one_tree(&spans, &listing);
    let by_id: BTreeMap<&str, &Seen> = spans.iter().map(|s| (s.id.as_str(), s)).collect();

    // The order service's questions to the customer and inventory services are
    // part of the order's trace.
    for (service, route) in [
        ("customer-service", "GET /customers/{id}"),
        ("inventory-service", "GET /goods/{id}"),
    ] {
        let call = spans
            .iter()
            .find(|s| s.service == service && s.kind == SpanKind::Server)
            .unwrap_or_else(|| panic!("no request to {service} in the trace:{listing}"));
        assert_eq!(call.name, route, "{call:?}");
        assert_eq!(by_id[call.parent.as_str()].name, "POST /orders", "{call:?}");
    }

    // Each relay publishes rows its own service wrote: its span's parent is that
    // service's outbox write.
    let publishes: Vec<&Seen> = spans
        .iter()
        .filter(|s| s.service.ends_with("-relay"))
        .collect();
    for publish in &publishes {
        assert_eq!(publish.kind, SpanKind::Producer, "{publish:?}");
        assert!(publish.name.starts_with("publish "), "{publish:?}");
        let parent = by_id[publish.parent.as_str()];
        let writer = publish.service.replace("-relay", "-service");
        assert_eq!(parent.name, "outbox write", "{publish:?} <- {parent:?}");
        assert_eq!(parent.service, writer, "{publish:?} <- {parent:?}");
    }

    // Each handled message continues the relay's span that published it.
    let handled: Vec<&Seen> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Consumer)
        .collect();
    for consumer in &handled {
        let parent = by_id[consumer.parent.as_str()];
        assert!(
            parent.service.ends_with("-relay") && parent.kind == SpanKind::Producer,
            "{consumer:?} <- {parent:?}"
        );
    }
    // Commands to the three participants, their three replies to the order service.
    for service in ["inventory", "customer", "payment"] {
        let name = format!("{service}-service");
        assert!(
            handled.iter().any(|s| s.service == name),
            "{name} handled nothing:{listing}"
        );
        assert!(
            spans
                .iter()
                .any(|s| s.service == name && s.name.starts_with("effect ")),
            "no effect span in {name}:{listing}"
        );
    }
    let replies = replies_handled(&spans);
    assert!(replies >= 3, "the order service handled {replies} replies");

    // The orchestrator's transitions are events named after the steps.
    let events: BTreeSet<&str> = spans
        .iter()
        .filter(|s| s.service == "order-service")
        .flat_map(|s| s.events.iter().map(String::as_str))
        .collect();
    for step in ["reserve-goods", "reserve-credit", "payment"] {
        for kind in ["command_sent", "step_succeeded"] {
            let event = format!("{step} {kind}");
            assert!(events.contains(event.as_str()), "no {event}: {events:?}");
        }
    }
}

/// An order whose payment step times out: the orchestrator's sweeper, not a
/// message, starts the compensation, and it is still the order's trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_order_is_compensated_in_its_own_trace() {
    let (shop, receiver, _cleanup) = traced_shop(|config| {
        // The payment service holds its first command past the step's timeout.
        config.step_timeout = Duration::from_secs(3);
        let env = config.env.entry("payment-service".to_owned()).or_default();
        env.push((
            failpoints::ENV.to_owned(),
            "consumer.before-handler=sleep(8000)*1".to_owned(),
        ));
    })
    .await;
    let done = place_one(&shop).await;
    assert_eq!(done["status"], "REJECTED", "{done}");
    // The step that timed out (the payment, or an earlier one when its first
    // reply was slower than the timeout) and those before it are compensated.
    let compensated = |spans: &[Seen]| {
        spans
            .iter()
            .any(|s| s.name.starts_with("effect Release") || s.name.starts_with("effect Refund"))
    };
    let (trace, spans) = whole_trace(
        &receiver,
        Instant::now() + Duration::from_secs(60),
        compensated,
    )
    .await;
    shop.stop().await;
    require_trace(&trace, &receiver);
    let listing = listing(&spans);
    eprintln!("trace {trace}: {} spans{listing}", spans.len());
    assert_one_tree(&spans, &listing);
    let by_id: BTreeMap<&str, &Seen> = spans.iter().map(|s| (s.id.as_str(), s)).collect();
    let deadline = spans
        .iter()
        .find(|s| s.name == "saga deadline")
        .unwrap_or_else(|| panic!("no span of the passed deadline in the order's trace:{listing}"));
    assert_eq!(deadline.service, "order-service", "{deadline:?}");
    assert_eq!(
        by_id[deadline.parent.as_str()].name,
        "POST /orders",
        "{deadline:?}"
    );
    assert!(
        compensated(&spans),
        "the compensations are not in the order's trace:{listing}"
    );
    // The first compensation command was written under the deadline's span.
    assert!(
        spans
            .iter()
            .any(|s| s.name == "outbox write" && s.parent == deadline.id),
        "the sweeper wrote no command in the order's trace:{listing}"
    );
}

/// A new folder for the processes' logs.
fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(testkit::unique_name("tracing-e2e"));
    std::fs::create_dir_all(&dir).expect("a log folder");
    dir
}

/// Removes the copied binaries when the test ends, however it ends (the logs stay).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
