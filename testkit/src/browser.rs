//! A real headless browser for tests of the project's web pages.
//!
//! [`Browser::start`] runs `chromedriver` on a free port and opens one W3C WebDriver
//! session of headless Chromium; the methods drive it over HTTP: go to a page, find
//! elements by CSS selector, read, click, type, choose, wait, answer `confirm()`,
//! run script and save screenshots under [`artifacts_dir`]. A method panics with the
//! page's URL when the browser refuses (no element matches, a wait times out).
//!
//! Chromium and its driver are Debian's packages `chromium` and `chromium-driver`,
//! which `scripts/env up` installs. Nothing downloads a browser at run time: tests
//! run without internet access, and the browser and driver of one package release
//! always match.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::Method;
use serde_json::{json, Value};

use crate::settings::ENV_UP_COMMAND;

/// How long chromedriver may take to answer and Chromium to open a session.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one WebDriver command may take (a page load included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Browser::accept_dialog`] waits for a dialog to open.
const DIALOG_TIMEOUT: Duration = Duration::from_secs(5);
/// How often waits look again.
const POLL: Duration = Duration::from_millis(50);
/// The key of an element reference in W3C WebDriver's JSON.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How the name of a browser's folder in /tmp begins (`unique_name("outbox-browser")`).
pub(crate) const DIR_PREFIX: &str = "outbox-browser_";
/// Chromium's flags; a fresh `--user-data-dir` is added per browser.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
];

/// A headless Chromium driven through its own chromedriver; both end when dropped.
#[derive(Debug)]
pub struct Browser {
    driver: Driver,
    session: String,
}

impl Browser {
    /// Starts chromedriver and a browser session (a fresh profile, no window).
    ///
    /// # Panics
    /// When `chromium` or `chromedriver` is not on PATH (the message names the
    /// Debian package and the command that installs it), or the browser does not
    /// start in time (the message names chromedriver's log).
    pub async fn start() -> Browser {
        crate::leftovers::sweep();
        let chromium = installed("chromium", "chromium");
        let chromedriver = installed("chromedriver", "chromium-driver");
        let mut driver = Driver::spawn(&chromedriver);
        driver.wait_ready().await;
        let profile = driver.dir.join("profile");
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| (*f).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            // A dialog stays open until the test answers it; other commands fail meanwhile.
            "unhandledPromptBehavior": "ignore",
            "goog:chromeOptions": { "binary": chromium, "args": args },
        }}});
        let created = driver.call(Method::POST, "/session", Some(capabilities));
        let session = created.await.map_or_else(
            |failure| {
                panic!(
                    "cannot start {} ({failure}); log: {}",
                    chromium.display(),
                    driver.log().display()
                )
            },
            |answer| string(answer["sessionId"].clone()),
        );
        for (pid, _) in crate::process::children(driver.child.id()) {
            crate::leftovers::record(pid);
        }
        Browser { driver, session }
    }

    /// Opens `url` and waits until it has loaded.
    pub async fn goto(&self, url: &str) {
        let what = format!("open {url}");
        self.post("/url", json!({ "url": url }), &what).await;
    }

    /// The page's title.
    pub async fn title(&self) -> String {
        string(self.get("/title", "read the title").await)
    }

    /// The page's document as it is now (after scripts changed it), as HTML.
    pub async fn source(&self) -> String {
        string(self.get("/source", "read the source").await)
    }

    /// The text of the first element matching `css`, as rendered (hidden text left out).
    pub async fn text(&self, css: &str) -> String {
        let element = self.element(css).await;
        string(self.get_of(&element, "text", css).await)
    }

    /// The texts of every element matching `css`, in document order.
    pub async fn texts(&self, css: &str) -> Vec<String> {
        let mut texts = Vec::new();
        for element in self.elements(css).await {
            texts.push(string(self.get_of(&element, "text", css).await));
        }
        texts
    }

    /// How many elements match `css`.
    pub async fn count(&self, css: &str) -> usize {
        self.elements(css).await.len()
    }

    /// Clicks the first element matching `css`.
    pub async fn click(&self, css: &str) {
        let element = self.element(css).await;
        self.post_to(&element, "click", json!({}), css).await;
    }

    /// Clears the first input or textarea matching `css` and types `value` into it.
    pub async fn fill(&self, css: &str, value: &str) {
        let element = self.element(css).await;
        self.post_to(&element, "clear", json!({}), css).await;
        self.post_to(&element, "value", json!({ "text": value }), css)
            .await;
    }

    /// Chooses the option with value `value` of the first `<select>` matching `css`
    /// (as a user does, so `change` fires).
    pub async fn select(&self, css: &str, value: &str) {
        let select = self.element(css).await;
        let options = self.post_to(&select, "elements", by_css("option"), css);
        for option in element_ids(options.await) {
            if self.get_of(&option, "property/value", css).await == json!(value) {
                self.post_to(&option, "click", json!({}), css).await;
                return;
            }
        }
        let url = self.url().await;
        panic!("`{css}` has no option with value `{value}` on {url}");
    }

    /// The attribute `name` of the first element matching `css` as the markup set
    /// it; `None` when it has none. What was typed or chosen since is [`Browser::value`].
    pub async fn attribute(&self, css: &str, name: &str) -> Option<String> {
        let element = self.element(css).await;
        let command = format!("attribute/{name}");
        let value = self.get_of(&element, &command, css).await;
        value.as_str().map(str::to_owned)
    }

    /// The current value of the first input, textarea or select matching `css`.
    pub async fn value(&self, css: &str) -> String {
        let element = self.element(css).await;
        string(self.get_of(&element, "property/value", css).await)
    }

    /// Waits until an element matches `css`.
    ///
    /// # Panics
    /// When none does within `timeout`; the message names the page's URL.
    pub async fn wait_for(&self, css: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.find(css).await {
                Ok(Some(_)) => return,
                Ok(None) => String::new(),
                Err(failure) => format!(" (last answer: {failure})"),
            };
            if Instant::now() >= deadline {
                let url = self.url().await;
                panic!("no element matched `{css}` within {timeout:?} on {url}{last}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the text of an element matching `css` contains `needle`.
    ///
    /// # Panics
    /// When none does within `timeout`; the message names the page's URL and the
    /// texts seen last.
    pub async fn wait_for_text(&self, css: &str, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.try_texts(css).await;
            let shown = |texts: &Vec<String>| texts.iter().any(|t| t.contains(needle));
            if seen.as_ref().is_ok_and(shown) {
                return;
            }
            if Instant::now() >= deadline {
                let url = self.url().await;
                panic!(
                    "no element matching `{css}` showed {needle:?} within {timeout:?} on {url}; \
                     last seen: {seen:?}"
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Accepts the open dialog (`confirm()`, `alert()`), waiting a few seconds for
    /// one to open.
    pub async fn accept_dialog(&self) {
        let deadline = Instant::now() + DIALOG_TIMEOUT;
        while self.dialog_text().await.is_none() {
            if Instant::now() >= deadline {
                let url = self.url().await;
                panic!("no dialog opened within {DIALOG_TIMEOUT:?} on {url}");
            }
            tokio::time::sleep(POLL).await;
        }
        self.post("/alert/accept", json!({}), "accept the dialog")
            .await;
    }

    /// The message of the open dialog; `None` when no dialog is open.
    pub async fn dialog_text(&self) -> Option<String> {
        match self.call(Method::GET, "/alert/text", None).await {
            Ok(text) => Some(string(text)),
            Err(failure) if failure.is("no such alert") => None,
            Err(failure) => panic!("cannot read the dialog: {failure}"),
        }
    }

    /// Saves a PNG of the window as `<name>.png` in [`artifacts_dir`] (characters
    /// other than letters, digits, `-`, `_` and `.` become `_`) and returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let shot = string(self.get("/screenshot", "take a screenshot").await);
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot)
            .unwrap_or_else(|e| panic!("chromedriver sent a screenshot that is not base64: {e}"));
        let keep = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        let file: String = name
            .chars()
            .map(|c| if keep(c) { c } else { '_' })
            .collect();
        let path = artifacts_dir().join(format!("{file}.png"));
        std::fs::write(&path, png)
            .unwrap_or_else(|e| panic!("cannot write the screenshot {}: {e}", path.display()));
        path
    }

    /// Runs `js` as the body of a function in the page (so `return x;` answers `x`)
    /// and returns its result.
    pub async fn run_script(&self, js: &str) -> Value {
        let body = json!({ "script": js, "args": [] });
        self.post("/execute/sync", body, &format!("run {js:?}"))
            .await
    }

    /// The page's URL, for messages.
    async fn url(&self) -> String {
        let url = self.call(Method::GET, "/url", None).await.map(string);
        url.unwrap_or_else(|_| "an unknown page".to_owned())
    }

    /// The first element matching `css`, or a panic naming the page.
    async fn element(&self, css: &str) -> String {
        match self.find(css).await {
            Ok(Some(element)) => element,
            Ok(None) => panic!("no element matches `{css}` on {}", self.url().await),
            Err(failure) => panic!("cannot look for `{css}`: {failure}"),
        }
    }

    async fn find(&self, css: &str) -> Result<Option<String>, Failure> {
        match self.call(Method::POST, "/element", Some(by_css(css))).await {
            Ok(found) => Ok(element_ids(Value::Array(vec![found])).pop()),
            Err(failure) if failure.is("no such element") => Ok(None),
            Err(failure) if failure.is("invalid selector") => {
                panic!("`{css}` is not a valid CSS selector: {failure}")
            }
            Err(failure) => Err(failure),
        }
    }

    async fn elements(&self, css: &str) -> Vec<String> {
        element_ids(
            self.post("/elements", by_css(css), &format!("look for `{css}`"))
                .await,
        )
    }

    /// The texts of the elements matching `css`; an error when the page changed
    /// between finding and reading them.
    async fn try_texts(&self, css: &str) -> Result<Vec<String>, Failure> {
        let found = self.call(Method::POST, "/elements", Some(by_css(css)));
        let mut texts = Vec::new();
        for element in element_ids(found.await?) {
            let path = format!("/element/{element}/text");
            texts.push(string(self.call(Method::GET, &path, None).await?));
        }
        Ok(texts)
    }

    /// A command of this session.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let path = format!("/session/{}{path}", self.session);
        self.driver.call(method, &path, body).await
    }

    /// A command of this session that must succeed, else a panic saying `what` it
    /// was to do and on which page.
    async fn must(&self, method: Method, path: &str, body: Option<Value>, what: &str) -> Value {
        match self.call(method, path, body).await {
            Ok(value) => value,
            Err(failure) => panic!("cannot {what} on {}: {failure}", self.url().await),
        }
    }

    async fn get(&self, path: &str, what: &str) -> Value {
        self.must(Method::GET, path, None, what).await
    }

    async fn post(&self, path: &str, body: Value, what: &str) -> Value {
        self.must(Method::POST, path, Some(body), what).await
    }

    /// Reads `command` (`text`, `attribute/<name>`, ...) of `element`, found by `css`.
    async fn get_of(&self, element: &str, command: &str, css: &str) -> Value {
        let what = format!("read {command} of `{css}`");
        self.get(&format!("/element/{element}/{command}"), &what)
            .await
    }

    /// Sends `command` (`click`, `value`, ...) to `element`, found by `css`.
    async fn post_to(&self, element: &str, command: &str, body: Value, css: &str) -> Value {
        let what = format!("{command} `{css}`");
        self.post(&format!("/element/{element}/{command}"), body, &what)
            .await
    }
}

impl Drop for Browser {
    /// Ends the session, so Chromium quits; the driver then ends chromedriver.
    /// Plain blocking HTTP: a drop cannot await.
    fn drop(&mut self) {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.driver.port)) else {
            return;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let request = format!(
            "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\
             Content-Length: 0\r\n\r\n",
            self.session, self.driver.port
        );
        if stream.write_all(request.as_bytes()).is_ok() {
            // The answer comes once Chromium has quit (chromedriver keeps the
            // connection open after it, so its first bytes are enough).
            let _ = stream.read(&mut [0; 256]);
        }
    }
}

/// The folder screenshots and other test artifacts go to, created if missing:
/// `OUTBOX_TEST_ARTIFACTS` when set, else `.local/test-artifacts` of the checkout the
/// test runs in.
pub fn artifacts_dir() -> PathBuf {
    let dir = match std::env::var_os("OUTBOX_TEST_ARTIFACTS").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
            crate::settings::checkout_root(&cwd).join(".local/test-artifacts")
        }
    };
    let created = std::fs::create_dir_all(&dir);
    created.unwrap_or_else(|e| panic!("cannot create the artifact folder {}: {e}", dir.display()));
    dir
}

/// A chromedriver process with its folder (Chromium's profile, the driver's log).
#[derive(Debug)]
struct Driver {
    child: Child,
    port: u16,
    dir: PathBuf,
    http: reqwest::Client,
}

impl Driver {
    fn spawn(chromedriver: &Path) -> Driver {
        let dir = Path::new("/tmp").join(crate::unique_name("outbox-browser"));
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        // Whose folder this is: a sweep deletes it if this process dies without
        // dropping the browser.
        let owner = dir.join(crate::leftovers::OWNER_FILE);
        std::fs::write(&owner, crate::leftovers::own_identity())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", owner.display()));
        let log = dir.join("chromedriver.log");
        let out = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let port = crate::free_port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .inspect(|child| crate::leftovers::record(child.id()))
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(COMMAND_TIMEOUT)
            .build()
            .expect("a client without TLS or proxies always builds");
        Driver {
            child,
            port,
            dir,
            http,
        }
    }

    fn log(&self) -> PathBuf {
        self.dir.join("chromedriver.log")
    }

    /// Polls `/status` until chromedriver says it is ready.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(status) = self.call(Method::GET, "/status", None).await {
                if status["ready"] == json!(true) {
                    return;
                }
            }
            if let Ok(Some(exit)) = self.child.try_wait() {
                panic!(
                    "chromedriver ended ({exit}) before it was ready; log: {}",
                    self.log().display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver was not ready on port {} within {START_TIMEOUT:?}; log: {}",
                self.port,
                self.log().display()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends a command and returns the `value` of its answer.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let mut request = self.http.request(method.clone(), &url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let transport = |e: reqwest::Error| Failure {
            code: "no answer".to_owned(),
            message: format!("{method} {url}: {e}"),
        };
        let answer = request.send().await.map_err(transport)?;
        let ok = answer.status().is_success();
        let mut reply: Value = answer.json().await.map_err(transport)?;
        let value = reply.get_mut("value").map(Value::take).unwrap_or_default();
        if ok {
            return Ok(value);
        }
        Err(Failure {
            code: string(value["error"].clone()),
            message: string(value["message"].clone()),
        })
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Chromium, if the session did not end, then chromedriver.
        for (pid, _) in crate::process::children(self.child.id()) {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A command WebDriver refused (`code` is its error code, as `no such element`) or
/// that did not reach it (`code` is `no answer`).
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
struct Failure {
    code: String,
    message: String,
}

impl Failure {
    fn is(&self, code: &str) -> bool {
        self.code == code
    }
}

/// What a WebDriver command answers.
type Reply = Result<Value, Failure>;

fn by_css(css: &str) -> Value {
    json!({ "using": "css selector", "value": css })
}

/// The element ids in a list of element references.
fn element_ids(found: Value) -> Vec<String> {
    let Value::Array(found) = found else {
        return Vec::new();
    };
    found
        .iter()
        .filter_map(|e| e[ELEMENT_KEY].as_str().map(str::to_owned))
        .collect()
}

/// A string WebDriver answered; empty when it answered something else.
fn string(value: Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

/// `program` from PATH, or a panic naming the Debian package that brings it.
fn installed(program: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut found = std::env::split_paths(&path).map(|dir| dir.join(program));
    found
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{}", missing(program, package)))
}

fn missing(program: &str, package: &str) -> String {
    format!(
        "{program} is not on PATH: the browser tests need the Debian package {package}; install \
         it with `{ENV_UP_COMMAND}` (as root) or `apt-get install chromium chromium-driver`"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_names_its_package() {
        let message = missing("chromedriver", "chromium-driver");
        assert!(message.contains("package chromium-driver"), "{message}");
        assert!(message.contains(ENV_UP_COMMAND), "{message}");
    }

    #[test]
    fn element_ids_read_w3c_references() {
        let found = json!([{ ELEMENT_KEY: "a" }, { "other": "b" }, { ELEMENT_KEY: "c" }]);
        assert_eq!(element_ids(found), ["a", "c"]);
        assert!(element_ids(Value::Null).is_empty());
    }
}
