//! One saga's timeline as an SVG picture: a lane per step (and one for the saga),
//! time from left to right; bars for a step's action and its compensation while
//! they run, marks for commands, replies, timeouts, failures and operator actions.
//!
//! Events of one transaction share a time stamp, and a saga's minutes can hold
//! a burst of them: each event is placed by its time but at least a few pixels
//! after the one before, so none hides another. Every mark links to its row in
//! the event table, where its ids and headers are.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use saga_core::saga::audit::SagaEvent;

use crate::html::{duration, escape};

const WIDTH: f64 = 1200.0;
const LEFT: f64 = 160.0;
const RIGHT: f64 = 40.0;
const TOP: f64 = 24.0;
const LANE: f64 = 44.0;
const MIN_GAP: f64 = 14.0;

/// The name of the lane of events that belong to no step.
const SAGA_LANE: &str = "saga";

/// Kinds of marks, and their colours (also the legend's).
pub(crate) const LEGEND: [(&str, &str); 9] = [
    ("command sent", "#0969da"),
    ("compensation sent", "#bf8700"),
    ("reply: success", "#1a7f37"),
    ("reply: failure", "#cf222e"),
    ("reply: stale", "#8c959f"),
    ("timeout", "#cf222e"),
    ("operator action", "#8250df"),
    ("suspended", "#d1242f"),
    ("status", "#24292f"),
];

fn colour(name: &str) -> &'static str {
    LEGEND
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("#24292f", |(_, c)| c)
}

/// The timeline of `events` (in the trail's order); bars still open reach past the
/// last event when the saga is `running`.
pub(crate) fn svg(events: &[SagaEvent], running: bool) -> String {
    if events.is_empty() {
        return "<p class=\"muted\">No events recorded for this saga.</p>".to_owned();
    }
    // Lanes: the saga's first, then steps as they appear.
    let mut lanes: Vec<String> = vec![SAGA_LANE.to_owned()];
    for e in events {
        if let Some(step) = &e.step {
            if !lanes.contains(step) {
                lanes.push(step.clone());
            }
        }
    }
    let lane_of = |e: &SagaEvent| {
        let name = e.step.as_deref().unwrap_or(SAGA_LANE);
        lanes.iter().position(|l| l == name).unwrap_or(0)
    };
    let xs = positions(events);
    let end_x = if running {
        (xs.last().copied().unwrap_or(LEFT) + 30.0).min(WIDTH - RIGHT / 2.0)
    } else {
        xs.last().copied().unwrap_or(LEFT)
    };
    let height = TOP + LANE * lanes.len() as f64 + 30.0;
    let y = |lane: usize| TOP + LANE * lane as f64 + LANE / 2.0;

    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg class=\"timeline\" viewBox=\"0 0 {WIDTH} {height}\" xmlns=\"http://www.w3.org/2000/svg\" \
         role=\"img\" aria-label=\"timeline\">"
    );
    for (i, name) in lanes.iter().enumerate() {
        let fill = if i % 2 == 0 { "#f6f8fa" } else { "#ffffff" };
        let top = TOP + LANE * i as f64;
        let _ = write!(
            svg,
            "<rect x=\"0\" y=\"{top}\" width=\"{WIDTH}\" height=\"{LANE}\" fill=\"{fill}\"/>\
             <text class=\"lane-name\" x=\"10\" y=\"{}\" data-lane=\"{}\">{}</text>",
            y(i) + 4.0,
            escape(name),
            escape(name)
        );
    }

    // Bars: a step's action from its start to its end, its compensation likewise.
    let mut open: BTreeMap<(usize, bool), f64> = BTreeMap::new();
    let mut bars = String::new();
    for (e, x) in events.iter().zip(&xs) {
        let lane = lane_of(e);
        let (key, ends) = match e.kind.as_str() {
            "step_started" => ((lane, false), false),
            "compensation_started" => ((lane, true), false),
            "step_succeeded" | "step_failed" => ((lane, false), true),
            "compensation_done" | "compensation_failed" => ((lane, true), true),
            _ => continue,
        };
        if ends {
            let from = open.remove(&key).unwrap_or(*x);
            bar(&mut bars, from, *x, y(lane), key.1, e.kind.as_str());
        } else {
            // A retry closes the attempt before it.
            if let Some(from) = open.insert(key, *x) {
                bar(&mut bars, from, *x, y(lane), key.1, "retried");
            }
        }
    }
    for ((lane, compensation), from) in open {
        bar(&mut bars, from, end_x, y(lane), compensation, "open");
    }
    svg.push_str(&bars);

    // Marks, and the time axis.
    let start = events[0].at;
    let mut last_label = f64::MIN;
    for (e, x) in events.iter().zip(&xs) {
        let cy = y(lane_of(e));
        mark(&mut svg, e, *x, cy);
        if *x - last_label > 70.0 {
            last_label = *x;
            let since = e.at - start;
            let label = match since.num_milliseconds() {
                0 => "0".to_owned(),
                ms @ 1..=59_999 => format!("+{:.1} s", ms as f64 / 1000.0),
                _ => format!("+{}", duration(since)),
            };
            let _ = write!(
                svg,
                "<text class=\"axis\" x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                height - 10.0,
                escape(&label)
            );
        }
    }
    let _ = write!(
        svg,
        "<text class=\"axis\" x=\"{:.1}\" y=\"14\" text-anchor=\"end\">{}</text></svg>",
        WIDTH - 8.0,
        escape(&format!(
            "{} events over {}",
            events.len(),
            duration(events[events.len() - 1].at - start)
        ))
    );
    svg
}

/// Each event's x: by its time, but at least a small gap after the one before.
fn positions(events: &[SagaEvent]) -> Vec<f64> {
    let n = events.len();
    let room = WIDTH - LEFT - RIGHT;
    let gap = MIN_GAP.min(room / n.max(1) as f64);
    let start = events[0].at;
    let span = (events[n - 1].at - start).num_milliseconds().max(1) as f64;
    let scale = (room - gap * (n - 1) as f64).max(0.0) / span;
    let mut xs = Vec::with_capacity(n);
    let mut previous = f64::MIN;
    for (i, e) in events.iter().enumerate() {
        let by_time = LEFT + (e.at - start).num_milliseconds() as f64 * scale + gap * i as f64;
        let x = by_time.max(previous + gap).min(WIDTH - RIGHT);
        xs.push(x);
        previous = x;
    }
    xs
}

fn bar(svg: &mut String, from: f64, to: f64, cy: f64, compensation: bool, how: &str) {
    let (fill, dy) = if compensation {
        ("#f5d58a", 2.0)
    } else {
        ("#b6d4fe", -10.0)
    };
    let stroke = match how {
        "step_failed" | "compensation_failed" => "#cf222e",
        "open" => "#57606a",
        _ => "none",
    };
    let dash = if how == "open" {
        " stroke-dasharray=\"4 3\""
    } else {
        ""
    };
    let _ = write!(
        svg,
        "<rect class=\"bar\" x=\"{from:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"8\" rx=\"3\" \
         fill=\"{fill}\" stroke=\"{stroke}\"{dash}/>",
        cy + dy,
        (to - from).max(3.0)
    );
}

/// The mark of one event, linked to its row.
fn mark(svg: &mut String, e: &SagaEvent, x: f64, cy: f64) {
    let detail = &e.detail;
    let flag = |name: &str| detail.get(name).and_then(serde_json::Value::as_bool) == Some(true);
    let tip = tooltip(e);
    let shape = match e.kind.as_str() {
        "command_sent" => {
            let c = if flag("compensation") {
                colour("compensation sent")
            } else {
                colour("command sent")
            };
            format!("<circle cx=\"{x:.1}\" cy=\"{cy:.1}\" r=\"6\" fill=\"{c}\"/>")
        }
        "reply_received" => {
            let c = if !flag("applied") {
                colour("reply: stale")
            } else if detail.get("outcome").and_then(|o| o.as_str()) == Some("success") {
                colour("reply: success")
            } else {
                colour("reply: failure")
            };
            let fill = if flag("applied") { c } else { "#ffffff" };
            format!(
                "<path d=\"M{x:.1} {:.1} l7 7 l-7 7 l-7 -7 z\" fill=\"{fill}\" stroke=\"{c}\" stroke-width=\"2\"/>",
                cy - 7.0
            )
        }
        "deadline_passed" => format!(
            "<path d=\"M{x:.1} {:.1} l7 12 l-14 0 z\" fill=\"{}\"/>",
            cy - 7.0,
            colour("timeout")
        ),
        "step_failed" | "compensation_failed" => format!(
            "<path d=\"M{:.1} {:.1} l10 10 m0 -10 l-10 10\" stroke=\"#cf222e\" stroke-width=\"3\"/>",
            x - 5.0,
            cy - 5.0
        ),
        // A pause sign: the saga waits for an operator from here.
        "saga_suspended" => format!(
            "<path d=\"M{:.1} {:.1} v12 m6 -12 v12\" stroke=\"{}\" stroke-width=\"3\"/>",
            x - 3.0,
            cy - 6.0,
            colour("suspended")
        ),
        "operator_action" => format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/>",
            x - 6.0,
            cy - 6.0,
            colour("operator action")
        ),
        "status_changed" | "saga_started" => {
            let to = detail
                .get("to")
                .and_then(|t| t.as_str())
                .unwrap_or("STARTED");
            let label = if e.kind == "saga_started" {
                "started"
            } else {
                to
            };
            // Near the right edge the label goes to the left of its mark.
            let (tx, anchor) = if x > WIDTH - 160.0 {
                (x - 8.0, "end")
            } else {
                (x + 8.0, "start")
            };
            format!(
                "<circle cx=\"{x:.1}\" cy=\"{cy:.1}\" r=\"5\" fill=\"{}\"/>\
                 <text x=\"{tx:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\">{}</text>",
                colour("status"),
                cy - 8.0,
                escape(&label.to_lowercase())
            )
        }
        "step_succeeded" | "compensation_done" => format!(
            "<path d=\"M{:.1} {cy:.1} l3 4 l6 -8\" stroke=\"#1a7f37\" stroke-width=\"2.5\" fill=\"none\"/>",
            x - 4.0
        ),
        _ => format!("<circle cx=\"{x:.1}\" cy=\"{cy:.1}\" r=\"2.5\" fill=\"#57606a\"/>"),
    };
    let _ = write!(
        svg,
        "<a href=\"#e{}\" class=\"mark\" data-kind=\"{}\"><title>{}</title>{shape}</a>",
        e.id,
        escape(&e.kind),
        escape(&tip)
    );
}

fn tooltip(e: &SagaEvent) -> String {
    let mut tip = format!(
        "{} · {} · {}",
        e.kind.replace('_', " "),
        e.step.as_deref().unwrap_or(SAGA_LANE),
        e.at.format("%H:%M:%S%.3f")
    );
    for key in [
        "type", "outcome", "reason", "attempt", "actor", "action", "to",
    ] {
        if let Some(v) = e.detail.get(key).filter(|v| !v.is_null()) {
            let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            let _ = write!(tip, "\n{key}: {v}");
        }
    }
    tip
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;
    use serde_json::json;
    use uuid::Uuid;

    fn event(
        id: i64,
        ms: i64,
        kind: &str,
        step: Option<&str>,
        detail: serde_json::Value,
    ) -> SagaEvent {
        SagaEvent {
            id,
            saga_id: Uuid::nil(),
            saga_type: "order".into(),
            version: 1,
            at: DateTime::UNIX_EPOCH + chrono::Duration::milliseconds(ms),
            kind: kind.into(),
            step: step.map(str::to_owned),
            detail,
            changes: None,
        }
    }

    #[test]
    fn events_of_one_instant_do_not_overlap_and_time_moves_right() {
        let events = vec![
            event(1, 0, "saga_started", None, json!({})),
            event(2, 0, "step_started", Some("a"), json!({})),
            event(3, 0, "command_sent", Some("a"), json!({})),
            event(
                4,
                5_000,
                "reply_received",
                Some("a"),
                json!({"applied": true}),
            ),
        ];
        let xs = positions(&events);
        assert!(
            xs.windows(2).all(|w| w[1] - w[0] >= MIN_GAP - 1e-9),
            "{xs:?}"
        );
        assert!(xs[3] - xs[2] > 100.0, "five seconds take room: {xs:?}");
        assert!(xs[3] <= WIDTH - RIGHT);
    }

    #[test]
    fn lanes_marks_and_bars_are_drawn_and_text_is_escaped() {
        let events = vec![
            event(1, 0, "saga_started", None, json!({})),
            event(
                2,
                0,
                "step_started",
                Some("<reserve>"),
                json!({"attempt": 1}),
            ),
            event(
                3,
                0,
                "command_sent",
                Some("<reserve>"),
                json!({"compensation": false}),
            ),
            event(4, 900, "deadline_passed", Some("<reserve>"), json!({})),
            event(
                5,
                900,
                "step_failed",
                Some("<reserve>"),
                json!({"reason": "timed out"}),
            ),
            event(6, 900, "compensation_started", Some("<reserve>"), json!({})),
            event(
                7,
                900,
                "command_sent",
                Some("<reserve>"),
                json!({"compensation": true}),
            ),
        ];
        let svg = svg(&events, true);
        assert!(svg.contains("data-lane=\"&lt;reserve&gt;\""), "{svg}");
        assert!(!svg.contains("<reserve>"));
        assert_eq!(svg.matches("class=\"mark\"").count(), 7);
        assert!(svg.contains("href=\"#e4\""));
        assert!(svg.contains(colour("compensation sent")));
        assert!(svg.contains(colour("timeout")));
        // The action's bar ended failed; the compensation's is still open.
        assert!(svg.contains("stroke=\"#cf222e\""));
        assert!(svg.contains("stroke-dasharray"));
    }
}
