//! The relays' health and lag, read from their `/health` and `/metrics` when the
//! page is asked for (a relay that does not answer in time is shown so).

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

use crate::html::{escape, page};

/// How long a relay may take to answer.
const TIMEOUT: Duration = Duration::from_secs(2);

/// A relay the console shows: its name and the origin of its HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    pub name: String,
    /// `http://host:port`, where `/health` and `/metrics` are served.
    pub url: String,
}

impl Relay {
    /// Reads `name=url`.
    pub fn parse(text: &str) -> Result<Relay, String> {
        let (name, url) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not NAME=URL"))?;
        let (name, url) = (name.trim(), url.trim().trim_end_matches('/'));
        if name.is_empty() || !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "{text:?} is not NAME=URL with an http:// or https:// URL"
            ));
        }
        Ok(Relay {
            name: name.to_owned(),
            url: url.to_owned(),
        })
    }
}

/// What one relay said.
#[derive(Debug, Default)]
struct Seen {
    health: Option<Value>,
    error: Option<String>,
    metrics: Vec<(String, f64)>,
}

/// The metrics the page shows, with their labels there.
const SHOWN: [(&str, &str); 6] = [
    ("outbox_relay_slot_lag_bytes", "slot lag (bytes)"),
    (
        "outbox_relay_milliseconds_behind_source",
        "behind source (ms)",
    ),
    ("outbox_relay_records_in_flight", "in flight"),
    ("outbox_relay_events_routed_total", "events routed"),
    ("outbox_relay_events_dead_lettered_total", "dead-lettered"),
    ("outbox_relay_reconnects_total", "reconnects"),
];

async fn look(http: &reqwest::Client, relay: &Relay) -> Seen {
    let mut seen = Seen::default();
    // /health answers 503 with a JSON body when unhealthy: read it either way.
    match http.get(format!("{}/health", relay.url)).send().await {
        Ok(response) => match response.json::<Value>().await {
            Ok(body) => seen.health = Some(body),
            Err(e) => seen.error = Some(format!("/health: {e}")),
        },
        Err(e) => seen.error = Some(format!("not answering: {e}")),
    }
    if seen.error.is_none() {
        match http.get(format!("{}/metrics", relay.url)).send().await {
            Ok(response) => match response.text().await {
                Ok(text) => seen.metrics = sums(&text),
                Err(e) => seen.error = Some(format!("/metrics: {e}")),
            },
            Err(e) => seen.error = Some(format!("/metrics: {e}")),
        }
    }
    seen
}

/// Each shown metric's value, summed over its label sets.
fn sums(text: &str) -> Vec<(String, f64)> {
    SHOWN
        .iter()
        .filter_map(|(name, _)| {
            let values: Vec<f64> = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .collect();
            (!values.is_empty()).then(|| ((*name).to_owned(), values.iter().sum()))
        })
        .collect()
}

pub(crate) async fn page_of(service: &str, relays: &[Relay]) -> String {
    let mut body = String::from("<h1>Relays</h1>");
    if relays.is_empty() {
        body.push_str(
            "<p class=\"muted\" id=\"no-relays\">No relays configured: give the service their \
             addresses (<code>CONSOLE_RELAYS=name=http://host:port,…</code>).</p>",
        );
        return page(service, "Relays", &body);
    }
    let http = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .build()
        .unwrap_or_default();
    let seen = futures::future::join_all(relays.iter().map(|r| look(&http, r))).await;
    body.push_str(
        "<table id=\"relays\"><thead><tr><th>relay</th><th>status</th><th>role</th><th>reason</th>",
    );
    for (_, label) in SHOWN {
        let _ = write!(body, "<th class=\"num\">{label}</th>");
    }
    body.push_str("</tr></thead><tbody>");
    for (relay, seen) in relays.iter().zip(seen) {
        let field = |k: &str| {
            seen.health
                .as_ref()
                .and_then(|h| h.get(k))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let healthy = seen
            .health
            .as_ref()
            .and_then(|h| h.get("healthy"))
            .and_then(Value::as_bool)
            == Some(true);
        let status = match &seen.error {
            Some(_) => "<span class=\"badge failed\">unreachable</span>".to_owned(),
            None if healthy => format!(
                "<span class=\"badge ok\">{}</span>",
                escape(&field("status"))
            ),
            None => format!(
                "<span class=\"badge failed\">{}</span>",
                escape(&field("status"))
            ),
        };
        let reason = seen.error.clone().unwrap_or_else(|| field("reason"));
        let _ = write!(
            body,
            "<tr class=\"relay\" data-healthy=\"{healthy}\"><td><a href=\"{url}/metrics\">{name}</a></td>\
             <td>{status}</td><td>{role}</td><td>{reason}</td>",
            url = escape(&relay.url),
            name = escape(&relay.name),
            role = escape(&field("role")),
            reason = escape(&reason),
        );
        for (name, _) in SHOWN {
            let value = seen
                .metrics
                .iter()
                .find(|(n, _)| n == name)
                .map_or("–".to_owned(), |(_, v)| format!("{v}"));
            let _ = write!(body, "<td class=\"num\">{value}</td>");
        }
        body.push_str("</tr>");
    }
    body.push_str("</tbody></table>");
    page(service, "Relays", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relays_are_name_equals_url() {
        assert_eq!(
            Relay::parse(" order = http://127.0.0.1:9102/ ").unwrap(),
            Relay {
                name: "order".into(),
                url: "http://127.0.0.1:9102".into()
            }
        );
        assert!(Relay::parse("order").is_err());
        assert!(Relay::parse("=http://x").is_err());
        assert!(Relay::parse("order=127.0.0.1:9102").is_err());
    }

    #[test]
    fn metrics_are_summed_over_their_labels_and_others_ignored() {
        let text = "# HELP outbox_relay_slot_lag_bytes x\n\
                    outbox_relay_slot_lag_bytes{slot=\"a\"} 10\n\
                    outbox_relay_slot_lag_bytes{slot=\"b\"} 5\n\
                    outbox_relay_slot_lag_bytes_other 99\n\
                    outbox_relay_events_routed_total 42\n";
        let sums = sums(text);
        assert_eq!(
            sums,
            [
                ("outbox_relay_slot_lag_bytes".to_owned(), 15.0),
                ("outbox_relay_events_routed_total".to_owned(), 42.0)
            ]
        );
    }
}
