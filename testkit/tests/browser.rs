//! The browser drives a real page: a small app served here, with a list, a link, a
//! form and a button behind `confirm()`. Every answer checked below comes from the
//! page as Chromium ran it (script-made elements, the form as the server received
//! it), so a browser that only fetched the HTML would fail.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::Html;
use axum::routing::get;
use axum::Router;
use futures::FutureExt;
use serde_json::json;
use testkit::browser::{artifacts_dir, Browser};

const WAIT: Duration = Duration::from_secs(10);

/// The page of sagas. `#late` and the cancelled entry exist only once script ran.
const HOME: &str = r#"<!doctype html>
<html><head><title>Saga console</title></head>
<body>
  <h1>Sagas</h1>
  <ul id="sagas">
    <li class="saga" data-id="order-1">order-1 running</li>
    <li class="saga" data-id="order-2">order-2 compensating</li>
    <li class="saga" data-id="order-3">order-3 done</li>
  </ul>
  <a id="retry" href="/retry?saga=order-2" data-saga="order-2">Retry order-2</a>
  <form id="filter" action="/search" method="get">
    <select id="status" name="status">
      <option value="any">Any</option>
      <option value="running">Running</option>
      <option value="failed">Failed</option>
    </select>
    <input id="q" name="q" value="initial">
    <textarea id="note" name="note"></textarea>
    <button id="search" type="submit">Search</button>
  </form>
  <button id="cancel" onclick="cancelSaga()">Cancel order-1</button>
  <p id="outcome"></p>
  <script>
    function cancelSaga() {
      if (!confirm("Cancel saga order-1?")) { return; }
      setTimeout(() => {
        document.getElementById("outcome").textContent = "order-1 cancelled";
        document.querySelector("[data-id=order-1]").classList.add("cancelled");
      }, 200);
    }
    setTimeout(() => {
      const late = document.createElement("p");
      late.id = "late";
      late.textContent = "loaded later";
      document.body.append(late);
    }, 300);
  </script>
</body></html>"#;

/// What the app received: one map of query parameters per request to `/search`
/// and `/retry`.
type Received = Arc<Mutex<Vec<(String, HashMap<String, String>)>>>;

async fn serve() -> (String, Received) {
    let received = Received::default();
    let record = |path: &'static str| {
        move |State(received): State<Received>, Query(params): Query<HashMap<String, String>>| async move {
            let mut rows = String::new();
            let mut sorted: Vec<_> = params.iter().collect();
            sorted.sort();
            for (key, value) in sorted {
                rows.push_str(&format!("<p id=\"{key}\">{}</p>", escape(value)));
            }
            received
                .lock()
                .unwrap()
                .push((path.to_owned(), params.clone()));
            Html(format!(
                "<!doctype html><title>{path}</title><h1>Received {path}</h1>{rows}"
            ))
        }
    };
    let app = Router::new()
        .route("/", get(|| async { Html(HOME) }))
        .route("/search", get(record("search")))
        .route("/retry", get(record("retry")))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{address}"), received)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Processes this test process started whose command line contains `needle`,
/// alive (not zombies).
fn own_children(needle: &str) -> Vec<u32> {
    testkit::process::children(std::process::id())
        .into_iter()
        .filter(|(pid, cmdline)| cmdline.contains(needle) && alive(*pid))
        .map(|(pid, _)| pid)
        .collect()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.get(stat.rfind(')')? + 2..)?.chars().next()?;
            Some(state != 'Z')
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn the_browser_drives_a_page() {
    let (base, received) = serve().await;
    let browser = Browser::start().await;
    let drivers = own_children("chromedriver");
    assert_eq!(drivers.len(), 1, "one chromedriver runs: {drivers:?}");
    let chromium: Vec<u32> = testkit::process::children(drivers[0])
        .into_iter()
        .map(|(pid, _)| pid)
        .collect();
    assert!(!chromium.is_empty(), "chromedriver started no browser");

    // Reading the page, after its script ran.
    browser.goto(&base).await;
    assert_eq!(browser.title().await, "Saga console");
    assert_eq!(browser.text("h1").await, "Sagas");
    assert_eq!(browser.text(".saga").await, "order-1 running");
    assert_eq!(
        browser.texts(".saga").await,
        ["order-1 running", "order-2 compensating", "order-3 done"]
    );
    assert_eq!(browser.count(".saga").await, 3);
    assert_eq!(browser.count(".missing").await, 0);
    assert!(browser.texts(".missing").await.is_empty());
    assert_eq!(
        browser.attribute("#retry", "data-saga").await.as_deref(),
        Some("order-2")
    );
    assert_eq!(browser.attribute("#retry", "title").await, None);
    browser.wait_for("#late", WAIT).await;
    browser.wait_for_text("p", "loaded later", WAIT).await;
    let source = browser.source().await;
    assert!(
        source.contains("<p id=\"late\">loaded later</p>"),
        "{source}"
    );
    assert_eq!(
        browser
            .run_script("return document.querySelectorAll('.saga').length + 40")
            .await,
        json!(43)
    );
    let user_agent = browser.run_script("return navigator.userAgent").await;
    assert!(
        user_agent.as_str().unwrap().contains("HeadlessChrome"),
        "{user_agent}"
    );
    assert_eq!(
        browser.run_script("return window.innerWidth").await,
        json!(1280)
    );

    // A wait that cannot succeed names the page.
    let timed_out =
        std::panic::AssertUnwindSafe(browser.wait_for("#never", Duration::from_millis(300)))
            .catch_unwind()
            .await
            .expect_err("waiting for a missing element must panic");
    let message = timed_out
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        message.contains("`#never`") && message.contains(&base),
        "{message}"
    );

    // The form, as the server receives it.
    browser.fill("#q", "payment failed").await;
    browser.fill("#note", "retried by hand").await;
    browser.select("#status", "failed").await;
    assert_eq!(browser.value("#q").await, "payment failed");
    assert_eq!(browser.value("#note").await, "retried by hand");
    assert_eq!(browser.value("#status").await, "failed");
    assert_eq!(
        browser.attribute("#q", "value").await.as_deref(),
        Some("initial"),
        "the attribute is the markup's"
    );
    assert_eq!(
        browser
            .run_script("return document.getElementById('status').selectedOptions[0].text")
            .await,
        json!("Failed")
    );
    browser.click("#search").await;
    browser.wait_for_text("h1", "Received search", WAIT).await;
    assert_eq!(browser.title().await, "search");
    assert_eq!(browser.text("#status").await, "failed");
    assert_eq!(browser.text("#q").await, "payment failed");
    let expected: HashMap<String, String> = [
        ("status", "failed"),
        ("q", "payment failed"),
        ("note", "retried by hand"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(
        received.lock().unwrap().last(),
        Some(&("search".to_owned(), expected))
    );

    // A link.
    browser.goto(&base).await;
    browser.click("#retry").await;
    browser.wait_for_text("h1", "Received retry", WAIT).await;
    assert_eq!(browser.text("#saga").await, "order-2");
    assert_eq!(received.lock().unwrap().len(), 2);

    // A button behind confirm().
    browser.goto(&base).await;
    assert_eq!(browser.dialog_text().await, None);
    browser.click("#cancel").await;
    assert_eq!(
        browser.dialog_text().await.as_deref(),
        Some("Cancel saga order-1?")
    );
    browser.accept_dialog().await;
    assert_eq!(browser.dialog_text().await, None);
    browser
        .wait_for_text("#outcome", "order-1 cancelled", WAIT)
        .await;
    assert_eq!(browser.count(".saga.cancelled").await, 1);
    assert_eq!(browser.text(".saga.cancelled").await, "order-1 running");

    // A screenshot, kept as an artifact.
    let shot = browser.screenshot("testkit browser/drives a page").await;
    assert_eq!(
        shot,
        artifacts_dir().join("testkit_browser_drives_a_page.png")
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is no PNG",
        shot.display()
    );
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    assert_eq!(width, 1280, "the window is 1280 pixels wide");

    // Dropping the browser ends chromedriver and Chromium.
    drop(browser);
    assert!(
        own_children("chromedriver").is_empty(),
        "chromedriver outlived the browser"
    );
    let deadline = std::time::Instant::now() + WAIT;
    while chromium.iter().any(|pid| alive(*pid)) {
        assert!(
            std::time::Instant::now() < deadline,
            "Chromium outlived the browser"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
