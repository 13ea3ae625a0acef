//! The pages: the list of sagas, one saga, a message.

use std::fmt::Write as _;

use crate::html::{badge, duration, escape, page, status_class, time, url_value};
use crate::query::{Filter, Overview, SagaDetail, STATUSES, THROUGHPUT_MINUTES};
use crate::{timeline, BASE};

/// The list: counts per status, throughput, filters, the sagas.
pub(crate) fn list(service: &str, filter: &Filter, o: &Overview) -> String {
    let mut body = String::from("<h1>Sagas</h1>");

    // Counts per status; each card filters by its status.
    body.push_str("<div class=\"cards\" id=\"counts\">");
    let total: i64 = o.counts.iter().map(|(_, n)| n).sum();
    let _ = write!(
        body,
        "<a class=\"card{}\" href=\"{BASE}\" data-status=\"\"><div class=\"muted\">all</div>\
         <div class=\"n\">{total}</div></a>",
        if filter.status.is_empty() {
            " selected"
        } else {
            ""
        }
    );
    for (status, n) in &o.counts {
        let _ = write!(
            body,
            "<a class=\"card{}\" href=\"{BASE}?status={}\" data-status=\"{}\">{}<div class=\"n\">{n}</div></a>",
            if &filter.status == status { " selected" } else { "" },
            url_value(status),
            escape(status),
            badge(status)
        );
    }
    body.push_str("</div>");
    body.push_str(&throughput(o));

    // Filters.
    body.push_str("<form class=\"filters\" method=\"get\" action=\"");
    body.push_str(BASE);
    body.push_str("\"><label>status<select name=\"status\"><option value=\"\">all</option>");
    for status in STATUSES {
        let _ = write!(
            body,
            "<option value=\"{status}\"{}>{status}</option>",
            selected(filter.status == status)
        );
    }
    body.push_str(
        "</select></label><label>type<select name=\"type\"><option value=\"\">all</option>",
    );
    for t in &o.types {
        let _ = write!(
            body,
            "<option value=\"{}\"{}>{}</option>",
            escape(t),
            selected(&filter.saga_type == t),
            escape(t)
        );
    }
    let _ = write!(
        body,
        "</select></label><label>started at least … minutes ago\
         <input type=\"number\" min=\"0\" name=\"older_than\" value=\"{}\" size=\"6\"></label>\
         <label>stuck only<input type=\"checkbox\" name=\"stuck\" value=\"on\"{}></label>\
         <button class=\"primary\" type=\"submit\">Filter</button>\
         <a href=\"{BASE}\">clear</a></form>",
        escape(&filter.older_than),
        if filter.stuck_only() { " checked" } else { "" }
    );

    // The sagas.
    if o.sagas.is_empty() {
        body.push_str("<p class=\"muted\" id=\"no-sagas\">No saga matches.</p>");
    } else {
        body.push_str(
            "<table id=\"sagas\"><thead><tr><th>saga</th><th>type</th><th>status</th>\
             <th>step</th><th>started</th><th>last change</th><th>attention</th></tr></thead><tbody>",
        );
        for s in &o.sagas {
            let stuck = o.stuck.get(&s.id);
            let _ = write!(
                body,
                "<tr class=\"saga\" data-status=\"{status}\"><td><a class=\"id\" href=\"{BASE}/sagas/{id}\">{id}</a></td>\
                 <td>{ty}</td><td>{badge}</td><td>{step}</td><td>{created}</td><td>{ago} ago</td><td>{stuck}</td></tr>",
                status = escape(&s.status),
                id = s.id,
                ty = escape(&s.saga_type),
                badge = badge(&s.status),
                step = escape(s.current_step.as_deref().unwrap_or("–")),
                created = time(s.created_at),
                ago = duration(o.now - s.updated_at),
                stuck = stuck.map_or(String::new(), |why| format!(
                    "<span class=\"stuck\">stuck: {}</span>",
                    escape(why)
                )),
            );
        }
        body.push_str("</tbody></table>");
        if o.more {
            let _ = write!(
                body,
                "<p class=\"muted\">Showing the {} most recently changed; narrow the filter to see others.</p>",
                o.sagas.len()
            );
        }
    }
    page(service, "Sagas", &body)
}

fn selected(yes: bool) -> &'static str {
    if yes {
        " selected"
    } else {
        ""
    }
}

/// Sagas that ended per minute, as a small bar chart.
fn throughput(o: &Overview) -> String {
    let max = o
        .throughput
        .iter()
        .map(|m| m.completed + m.aborted + m.failed)
        .max()
        .unwrap_or(0)
        .max(1);
    let (w, h, bw) = (480.0, 60.0, 30.0);
    let mut svg = format!(
        "<svg id=\"throughput\" viewBox=\"0 0 {w} {}\" width=\"{w}\" height=\"{}\" \
         xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" aria-label=\"sagas ended per minute\">",
        h + 16.0,
        h + 16.0
    );
    let total: i64 = o
        .throughput
        .iter()
        .map(|m| m.completed + m.aborted + m.failed)
        .sum();
    for (i, m) in o.throughput.iter().enumerate() {
        let x = i as f64 * (bw + 2.0);
        let mut top = h;
        for (n, colour) in [
            (m.completed, "#1a7f37"),
            (m.aborted, "#8250df"),
            (m.failed, "#cf222e"),
        ] {
            let bar = n as f64 / max as f64 * h;
            top -= bar;
            if n > 0 {
                let _ = write!(
                    svg,
                    "<rect x=\"{x}\" y=\"{top:.1}\" width=\"{bw}\" height=\"{bar:.1}\" fill=\"{colour}\"/>"
                );
            }
        }
        let _ = write!(
            svg,
            "<rect x=\"{x}\" y=\"0\" width=\"{bw}\" height=\"{h}\" fill=\"transparent\"><title>{}: {} completed, {} aborted, {} failed</title></rect>",
            m.start.format("%H:%M"),
            m.completed,
            m.aborted,
            m.failed
        );
    }
    let label = |m: Option<&crate::query::Minute>| {
        m.map(|m| m.start.format("%H:%M").to_string())
            .unwrap_or_default()
    };
    let _ = write!(
        svg,
        "<text x=\"0\" y=\"{y}\" font-size=\"11\" fill=\"#57606a\">{}</text>\
         <text x=\"{w}\" y=\"{y}\" font-size=\"11\" fill=\"#57606a\" text-anchor=\"end\">{}</text></svg>",
        label(o.throughput.first()),
        label(o.throughput.last()),
        y = h + 13.0,
    );
    format!(
        "<h2>Ended per minute, last {THROUGHPUT_MINUTES} minutes <span class=\"muted\" id=\"ended\">({total} in all: \
         <span style=\"color:#1a7f37\">completed</span>, <span style=\"color:#8250df\">aborted</span>, \
         <span style=\"color:#cf222e\">compensation failed</span>)</span></h2>{svg}"
    )
}

/// One saga: summary, actions, timeline, events, data.
pub(crate) fn saga(
    service: &str,
    saga: &SagaDetail,
    can_act: bool,
    done: Option<&str>,
    error: Option<&str>,
) -> String {
    let s = &saga.row;
    let mut body = format!(
        "<h1>Saga <span class=\"id\">{}</span> {}</h1>",
        s.id,
        badge(&s.status)
    );
    let done = done.map(|d| format!("Done: the saga was {d}. The action is in its trail below."));
    body.push_str(&notices(done.as_deref(), error));
    let running = matches!(s.status.as_str(), "STARTED" | "SUSPENDED" | "ABORTING");
    body.push_str("<h2>Timeline</h2><div class=\"legend\">");
    for (name, colour) in timeline::LEGEND {
        let _ = write!(
            body,
            "<span><i style=\"background:{colour}\"></i>{name}</span>"
        );
    }
    body.push_str(
        "<span>bars: a step's action (blue) and compensation (amber) while they run</span></div>",
    );
    body.push_str(&timeline::svg(&saga.events, running));

    let stuck = saga.stuck.as_ref();
    let _ = write!(
        body,
        "<h2>Saga</h2><table class=\"summary\"><tbody>\
         <tr><td>type</td><td>{}</td></tr>\
         <tr><td>status</td><td><span class=\"{}\" id=\"status\">{}</span></td></tr>\
         <tr><td>current step</td><td>{}</td></tr>\
         <tr><td>started</td><td>{} ({} ago)</td></tr>\
         <tr><td>last change</td><td>{} (version {})</td></tr>\
         <tr><td>{}</td><td>{}</td></tr>{}</tbody></table>",
        escape(&s.saga_type),
        status_class(&s.status),
        escape(&s.status),
        escape(s.current_step.as_deref().unwrap_or("–")),
        time(s.created_at),
        duration(saga.now - s.created_at),
        time(s.updated_at),
        s.version,
        // A suspended saga's deadline is when it compensates unless restarted.
        if s.status == "SUSPENDED" {
            "compensates at"
        } else {
            "deadline"
        },
        s.deadline.map_or("none".to_owned(), |d| {
            let when = if d > saga.now {
                format!("in {}", duration(d - saga.now))
            } else {
                format!("{} ago", duration(saga.now - d))
            };
            format!("{} ({when})", time(d))
        }),
        stuck.map_or(String::new(), |why| format!(
            "<tr><td>attention</td><td class=\"stuck\">stuck: {}</td></tr>",
            escape(why)
        ))
    );
    body.push_str(&actions(s.id, &s.status, can_act));

    body.push_str(
        "<h2>Events</h2><table id=\"events\"><thead><tr><th>time</th><th class=\"num\">v</th>\
         <th>event</th><th>step</th><th>what</th></tr></thead><tbody>",
    );
    for e in &saga.events {
        let detail = serde_json::to_string_pretty(&e.detail).unwrap_or_default();
        let changes = e
            .changes
            .as_ref()
            .map(|c| serde_json::to_string_pretty(c).unwrap_or_default());
        let _ = write!(
            body,
            "<tr class=\"event\" id=\"e{}\" data-kind=\"{}\"><td>{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td>\
             <td>{}<details><summary>ids and headers</summary><pre>{}</pre>{}</details></td></tr>",
            e.id,
            escape(&e.kind),
            time(e.at),
            e.version,
            escape(&e.kind.replace('_', " ")),
            escape(e.step.as_deref().unwrap_or("–")),
            escape(&summary(&e.detail)),
            escape(&detail),
            changes.map_or(String::new(), |c| format!(
                "<div class=\"muted\">changed the saga:</div><pre>{}</pre>",
                escape(&c)
            )),
        );
    }
    body.push_str("</tbody></table>");

    let _ = write!(
        body,
        "<h2>Data</h2><pre id=\"payload\">{}</pre><h2>Steps</h2><pre id=\"steps\">{}</pre>",
        escape(&serde_json::to_string_pretty(&saga.payload).unwrap_or_default()),
        escape(&serde_json::to_string_pretty(&saga.steps).unwrap_or_default())
    );
    page(service, &format!("Saga {}", s.id), &body)
}

/// What an action did (`#done`) or why it was refused (`#error`).
fn notices(done: Option<&str>, error: Option<&str>) -> String {
    let mut html = String::new();
    for (text, class) in [(done, "done"), (error, "error")] {
        if let Some(text) = text {
            let _ = write!(
                html,
                "<div class=\"notice {class}\" id=\"{class}\">{}</div>",
                escape(text)
            );
        }
    }
    html
}

/// One line of what an event says.
fn summary(detail: &serde_json::Value) -> String {
    let get = |k: &str| {
        detail
            .get(k)
            .filter(|v| !v.is_null())
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
    };
    let mut parts = Vec::new();
    if let Some(t) = get("type") {
        parts.push(t);
    }
    if let Some(o) = get("outcome") {
        parts.push(o);
    }
    if detail.get("applied").and_then(serde_json::Value::as_bool) == Some(false) {
        parts.push("stale: no step waited for it".to_owned());
    }
    for (key, label) in [
        ("attempt", "attempt"),
        ("reason", "reason:"),
        ("waited_for", "waited for"),
        ("action", "action:"),
        ("actor", "by"),
        ("from", "from"),
        ("to", "to"),
    ] {
        if let Some(v) = get(key) {
            parts.push(format!("{label} {v}"));
        }
    }
    if detail.get("gave_up").and_then(serde_json::Value::as_bool) == Some(true) {
        parts.push("gave up".to_owned());
    }
    if let Some(at) = get("retry_at") {
        parts.push(format!("retry at {at}"));
    }
    parts.join(" · ")
}

/// The actions that fit the saga's status, each asking for a confirmation.
fn actions(id: uuid::Uuid, status: &str, can_act: bool) -> String {
    if !can_act {
        return "<p class=\"muted\">This service does not run sagas of this type: no actions.</p>"
            .to_owned();
    }
    let operator = "<label>your name <input name=\"operator\" required size=\"12\"></label>";
    let mut html = String::from("<h2>Actions</h2><div class=\"actions\">");
    match status {
        "STARTED" => {
            let _ = write!(
                html,
                "<form id=\"abort\" method=\"post\" action=\"{BASE}/sagas/{id}/abort\" \
                 onsubmit=\"return confirm('Abort saga {id}? Its current step fails and every completed step is compensated.')\">\
                 {operator}<label>reason <input name=\"reason\" size=\"28\" placeholder=\"why\"></label>\
                 <button class=\"danger\" type=\"submit\">Abort and compensate</button></form>\
                 <form id=\"resend\" method=\"post\" action=\"{BASE}/sagas/{id}/resend\" \
                 onsubmit=\"return confirm('Send the command of the step saga {id} waits on again? It goes out as a new attempt; a participant that already ran it answers with its first answer.')\">\
                 {operator}<button class=\"primary\" type=\"submit\">Send the step's command again</button></form>"
            );
        }
        "SUSPENDED" => {
            let _ = write!(
                html,
                "<p>A step failed and this saga waits for an operator: restart the failed step once \
                 its cause is mended, or abort it. It compensates by itself when the suspension \
                 ends (its deadline).</p>\
                 <form id=\"restart\" method=\"post\" action=\"{BASE}/sagas/{id}/restart\" \
                 onsubmit=\"return confirm('Restart the failed step of saga {id}? Its command goes out as a new attempt and the saga runs on from there; a participant that already ran it answers with its first answer.')\">\
                 {operator}<button class=\"primary\" type=\"submit\">Restart from the failed step</button></form>\
                 <form id=\"abort\" method=\"post\" action=\"{BASE}/sagas/{id}/abort\" \
                 onsubmit=\"return confirm('Abort saga {id}? Every completed step is compensated now.')\">\
                 {operator}<label>reason <input name=\"reason\" size=\"28\" placeholder=\"why\"></label>\
                 <button class=\"danger\" type=\"submit\">Abort and compensate</button></form>"
            );
        }
        "COMPENSATION_FAILED" => {
            let _ = write!(
                html,
                "<form id=\"retry\" method=\"post\" action=\"{BASE}/sagas/{id}/retry\" \
                 onsubmit=\"return confirm('Retry the failed compensation of saga {id}? It is sent again as a new attempt.')\">\
                 {operator}<button class=\"primary\" type=\"submit\">Retry the compensation</button></form>"
            );
        }
        "ABORTING" => html.push_str(
            "<p class=\"muted\">Compensating: failed compensations are retried until they succeed or give up.</p>",
        ),
        _ => html.push_str("<p class=\"muted\">Finished: nothing to do.</p>"),
    }
    html.push_str("</div>");
    html
}

/// A page that only says something.
pub(crate) fn message(service: &str, title: &str, text: &str) -> String {
    page(
        service,
        title,
        &format!(
            "<h1>{}</h1><p>{}</p><p><a href=\"{BASE}\">All sagas</a></p>",
            escape(title),
            escape(text)
        ),
    )
}

/// The dead letters of every topic the console reads, with a replay for each.
pub(crate) fn dead_letters(
    service: &str,
    topics: &[String],
    letters: &Result<Vec<crate::dead_letters::Letter>, String>,
    done: Option<&str>,
    error: Option<&str>,
) -> String {
    let mut body = String::from("<h1>Dead letters</h1>");
    body.push_str(&notices(done, error));
    if topics.is_empty() {
        body.push_str(
            "<p class=\"muted\">No dead-letter topics configured (<code>CONSOLE_DEAD_LETTER_TOPICS</code>).</p>",
        );
        return page(service, "Dead letters", &body);
    }
    let _ = write!(
        body,
        "<p class=\"muted\">Read from {}; the newest {} of each. A replay produces the original \
         record again to the topic it came from; its consumers apply a message id once, so a \
         replay twice is harmless.</p>",
        topics
            .iter()
            .map(|t| format!("<code>{}</code>", escape(t)))
            .collect::<Vec<_>>()
            .join(", "),
        crate::dead_letters::SHOWN_PER_TOPIC
    );
    let letters = match letters {
        Ok(letters) => letters,
        Err(e) => {
            let _ = write!(
                body,
                "<div class=\"notice error\" id=\"read-error\">Cannot read the dead letters: {}</div>",
                escape(e)
            );
            return page(service, "Dead letters", &body);
        }
    };
    if letters.is_empty() {
        body.push_str("<p id=\"no-letters\">No dead letters. Nothing was given up on.</p>");
        return page(service, "Dead letters", &body);
    }
    body.push_str(
        "<table id=\"letters\"><thead><tr><th>topic</th><th>where</th><th>time</th><th>key</th>\
         <th>type</th><th>reason</th><th>from</th><th>replay</th></tr></thead><tbody>",
    );
    for l in letters {
        let key = l.key.as_deref().unwrap_or("–");
        let key_html = match key.parse::<uuid::Uuid>() {
            Ok(id) => format!("<a class=\"id\" href=\"{BASE}/sagas/{id}\">{id}</a>"),
            Err(_) => format!("<span class=\"id\">{}</span>", escape(key)),
        };
        let time = l
            .timestamp
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map_or("–".to_owned(), time);
        let reason = format!(
            "{}{}",
            l.header("dlq-reason-code")
                .map_or(String::new(), |c| format!("<b>{}</b> ", escape(c))),
            escape(l.header("dlq-reason").unwrap_or(""))
        );
        let headers: String = l
            .headers
            .iter()
            .map(|(k, v)| format!("{}: {}\n", escape(k), escape(v)))
            .collect();
        let replay = match l.source() {
            Some(source) => format!(
                "<form class=\"replay\" method=\"post\" action=\"{BASE}/dead-letters/replay\" \
                 onsubmit=\"return confirm('Replay this letter to {}?')\">\
                 <input type=\"hidden\" name=\"topic\" value=\"{}\">\
                 <input type=\"hidden\" name=\"partition\" value=\"{}\">\
                 <input type=\"hidden\" name=\"offset\" value=\"{}\">\
                 <input name=\"operator\" required size=\"8\" placeholder=\"your name\">\
                 <button type=\"submit\">Replay</button></form>",
                escape(source),
                escape(&l.topic),
                l.partition,
                l.offset
            ),
            None => "<span class=\"muted\">source unknown</span>".to_owned(),
        };
        let _ = write!(
            body,
            "<tr class=\"letter\" data-topic=\"{topic}\"><td>{topic}</td><td>{p}/{o}</td><td>{time}</td>\
             <td>{key_html}</td><td>{ty}</td><td>{reason}<details><summary>headers and value</summary>\
             <pre>{headers}</pre><pre>{payload}</pre></details></td><td>{from}</td><td>{replay}</td></tr>",
            topic = escape(&l.topic),
            p = l.partition,
            o = l.offset,
            ty = escape(l.header("type").unwrap_or("–")),
            payload = escape(&l.payload),
            from = escape(l.source().unwrap_or("–")),
        );
    }
    body.push_str("</tbody></table>");
    page(service, "Dead letters", &body)
}

/// The sign-in form of a console behind authentication: an operator's email and
/// password, posted to `{BASE}/sign-in`; `message` says why the form is shown again.
pub(crate) fn sign_in(service: &str, message: Option<&str>, email: &str) -> String {
    let notice = message
        .map(|m| format!("<p class=\"notice error\">{}</p>", escape(m)))
        .unwrap_or_default();
    let body = format!(
        "<h1>Sign in</h1><p class=\"muted\">The saga console is for operators: sign in \
         with an account that has the operator role.</p>{notice}\
         <form class=\"sign-in\" method=\"post\" action=\"{base}/sign-in\">\
         <label>Email<input name=\"email\" type=\"email\" autocomplete=\"username\" \
         required value=\"{email}\"></label>\
         <label>Password<input name=\"password\" type=\"password\" \
         autocomplete=\"current-password\" required></label>\
         <button class=\"primary\" type=\"submit\">Sign in</button></form>",
        base = crate::BASE,
        email = escape(email),
    );
    page(service, "Sign in", &body)
}
