//! Small pieces every page uses: escaping, the layout, durations and times.

use chrono::{DateTime, Duration, Utc};

/// `text` safe inside HTML text and attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A query-string value.
pub(crate) fn url_value(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A duration as people say it: `850 ms`, `12 s`, `3 min 5 s`, `2 h 10 min`, `3 d 4 h`.
pub(crate) fn duration(d: Duration) -> String {
    let ms = d.num_milliseconds().max(0);
    let s = ms / 1000;
    match s {
        _ if ms < 1000 => format!("{ms} ms"),
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        3600..=86_399 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        _ => format!("{} d {} h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// A time stamp to the millisecond, UTC.
pub(crate) fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

/// The CSS class of a saga status.
pub(crate) fn status_class(status: &str) -> &'static str {
    match status {
        "COMPLETED" => "ok",
        "ABORTED" => "aborted",
        "STARTED" => "running",
        "ABORTING" => "aborting",
        "SUSPENDED" => "suspended",
        _ => "failed",
    }
}

/// A status as a coloured badge.
pub(crate) fn badge(status: &str) -> String {
    format!(
        "<span class=\"badge {}\">{}</span>",
        status_class(status),
        escape(status)
    )
}

/// A whole page: `body` under the console's header.
pub(crate) fn page(service: &str, title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · {service} saga console</title><style>{STYLE}</style></head>\
         <body><header><a class=\"home\" href=\"{base}\">Sagas</a>\
         <a class=\"nav\" href=\"{base}/dead-letters\">Dead letters</a>\
         <a class=\"nav\" href=\"{base}/relays\">Relays</a>\
         <span class=\"service\">{service}</span></header><main>{body}</main></body></html>\n",
        title = escape(title),
        service = escape(service),
        base = crate::BASE,
    )
}

const STYLE: &str = "
:root { --ok: #1a7f37; --aborted: #8250df; --running: #0969da; --aborting: #bf8700;
  --failed: #cf222e; --muted: #57606a; --line: #d0d7de; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; color: #1f2328; }
header { display: flex; gap: 1.5rem; align-items: baseline; padding: .7rem 1.5rem;
  background: #24292f; color: #fff; }
header a.home { color: #fff; font-weight: 600; font-size: 1.1rem; text-decoration: none; }
header .service { color: #afb8c1; margin-left: auto; }
header a.nav { color: #d0d7de; text-decoration: none; }
main { padding: 1rem 1.5rem 3rem; max-width: 1400px; }
h1 { font-size: 1.35rem; margin: .3rem 0 1rem; }
h2 { font-size: 1.05rem; margin: 1.6rem 0 .6rem; }
a { color: var(--running); }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre, .id { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12.5px; }
pre { background: var(--bg); padding: .6rem; overflow-x: auto; margin: .3rem 0; }
.badge { display: inline-block; padding: .05rem .5rem; border-radius: 1rem; color: #fff;
  font-size: 12px; font-weight: 600; }
.badge.ok { background: var(--ok); } .badge.aborted { background: var(--aborted); }
.badge.running { background: var(--running); } .badge.aborting { background: var(--aborting); }
.badge.failed { background: var(--failed); }
.badge.suspended { background: #fff; color: var(--failed); box-shadow: inset 0 0 0 2px var(--failed); }
.cards { display: flex; gap: .8rem; flex-wrap: wrap; margin-bottom: 1rem; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: .5rem .9rem; min-width: 9rem;
  text-decoration: none; color: inherit; }
.card .n { font-size: 1.5rem; font-weight: 600; }
.card.selected { outline: 2px solid var(--running); }
form.filters { display: flex; gap: .8rem; flex-wrap: wrap; align-items: end; margin: .5rem 0 1rem;
  padding: .6rem .8rem; background: var(--bg); border-radius: 6px; }
form.filters label { display: flex; flex-direction: column; font-size: 12px; color: var(--muted); }
input, select, button, textarea { font: inherit; padding: .25rem .45rem; }
button { cursor: pointer; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
button.danger { background: var(--failed); color: #fff; border-color: var(--failed); }
button.primary { background: var(--running); color: #fff; border-color: var(--running); }
.muted { color: var(--muted); }
.stuck { color: var(--failed); font-weight: 600; }
.notice { padding: .6rem .9rem; border-radius: 6px; margin: .6rem 0; }
.notice.done { background: #dafbe1; } .notice.error { background: #ffebe9; }
.actions { display: flex; gap: 1rem; flex-wrap: wrap; margin: .5rem 0; }
.actions form { border: 1px solid var(--line); border-radius: 6px; padding: .6rem .8rem;
  display: flex; gap: .5rem; align-items: center; flex-wrap: wrap; }
.summary td:first-child { color: var(--muted); width: 11rem; }
details summary { cursor: pointer; }
svg.timeline { width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px;
  background: #fff; }
svg.timeline text { font: 12px system-ui, sans-serif; fill: #1f2328; }
svg.timeline .lane-name { font-weight: 600; }
svg.timeline .axis { fill: var(--muted); font-size: 11px; }
svg.timeline a:hover > * { stroke: #000; stroke-width: 2; }
.legend { display: flex; gap: 1rem; flex-wrap: wrap; font-size: 12px; color: var(--muted);
  margin: .4rem 0; }
.legend i { display: inline-block; width: .8rem; height: .8rem; border-radius: 50%;
  vertical-align: -1px; margin-right: .3rem; }
tr.event:target { background: #fff8c5; }
form.sign-in { max-width: 22rem; display: flex; flex-direction: column; gap: .7rem; margin-top: 1rem; }
form.sign-in label { display: flex; flex-direction: column; gap: .2rem; font-size: 12px; color: var(--muted); }
";
