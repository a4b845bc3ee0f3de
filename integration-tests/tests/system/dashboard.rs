//! The invalidation stream (`GET /v1/invalidations/stream`, server-sent
//! events) and the dashboard (`GET /dashboard`) against a real cluster with
//! tokens: the stream resumes with `Last-Event-ID`, filters by tenant and
//! shows a token only its tenants; the page, driven in headless Chromium
//! through chromedriver (`make chromium` installs both), asks for a token,
//! shows every node and the seq, an invalidation as it happens, and a frozen
//! node as `lagging` or `dead` in words. It leaves a screenshot in
//! `$CARGO_TARGET_DIR/dashboard.png` (the README's is `docs/dashboard.png`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use integration_tests::free_port;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::{token_toml, wait_until, TestCluster};

const ADMIN: &str = "dashboard-admin-secret";
const READER: &str = "dashboard-acme-reader";

/// How long any one thing the page or the stream shows may take to appear.
const SHOWN_WITHIN: Duration = Duration::from_secs(45);

fn tokens() -> String {
    [token_toml("ops", ADMIN, "[]", r#"["admin"]"#), token_toml("acme-reader", READER, r#"["acme"]"#, r#"["read"]"#)]
        .concat()
}

async fn start(agents: usize, extra: &str) -> TestCluster {
    TestCluster::with(integration_tests::ClusterOptions {
        agents,
        coordinator_toml: format!("{extra}\n{}", tokens()),
        agent_toml: tokens(),
        ..integration_tests::ClusterOptions::default()
    })
    .await
}

/// `POST /v1/invalidate` as the admin; returns the answer.
async fn invalidate(t: &TestCluster, body: Value) -> Value {
    let resp = t
        .http
        .post(t.cluster.coordinator.url("/v1/invalidate"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST /v1/invalidate: {e}"));
    let status = resp.status().as_u16();
    let answer: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 200, "{answer}");
    answer
}

/// An open event stream, read event by event.
struct Events {
    resp: reqwest::Response,
    buffer: String,
}

impl Events {
    /// Opens the stream with `query` as `token`, resuming after `last_id`;
    /// answers the status and, for a 200, the stream.
    async fn open(t: &TestCluster, token: Option<&str>, query: &str, last_id: Option<&str>) -> (u16, Option<Events>) {
        let mut request = t.http.get(t.cluster.coordinator.url(&format!("/v1/invalidations/stream{query}")));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(id) = last_id {
            request = request.header("Last-Event-ID", id);
        }
        let resp = request.send().await.unwrap_or_else(|e| panic!("GET the stream: {e}"));
        let status = resp.status().as_u16();
        if status != 200 {
            return (status, None);
        }
        let kind = crate::header(&resp, "content-type");
        assert!(kind.starts_with("text/event-stream"), "content type {kind}");
        (status, Some(Events { resp, buffer: String::new() }))
    }

    /// The next `invalidation` event: its id and data; `None` if none came in time.
    async fn next(&mut self, within: Duration) -> Option<(String, Value)> {
        let deadline = Instant::now() + within;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let field =
                    |name: &str| frame.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim_start().to_string()));
                if field("event:").as_deref() == Some("invalidation") {
                    let id = field("id:").expect("an event has an id");
                    let data = field("data:").expect("an event has data");
                    let data: Value = serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data}"));
                    assert_eq!(data["id"].as_str(), Some(id.as_str()), "{data}");
                    return Some((id, data));
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.resp.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(other) => panic!("the stream ended: {other:?}"),
                Err(_) => return None,
            }
        }
    }

    /// Reads events until one names `key`; panics if it does not come.
    async fn until_key(&mut self, key: &str) -> (String, Value, Vec<Value>) {
        let mut seen = Vec::new();
        let deadline = Instant::now() + SHOWN_WITHIN;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some((id, data)) = self.next(left).await else { break };
            if keys_of(&data).iter().any(|k| k == key) {
                return (id, data, seen);
            }
            seen.push(data);
        }
        panic!("no event for {key} within {SHOWN_WITHIN:?}; saw {seen:?}");
    }
}

/// The keys an event names, over its selectors.
fn keys_of(event: &Value) -> Vec<String> {
    let selectors = event["invalidations"].as_array().cloned().unwrap_or_default();
    selectors
        .iter()
        .flat_map(|s| s["keys"].as_array().cloned().unwrap_or_default())
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect()
}

/// The tenants an event names.
fn tenants_of(event: &Value) -> Vec<String> {
    let selectors = event["invalidations"].as_array().cloned().unwrap_or_default();
    selectors.iter().filter_map(|s| s["tenant"].as_str().map(str::to_string)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_resumes_after_its_last_event_filters_by_tenant_and_shows_a_token_only_its_tenants() {
    let t = start(1, "").await;

    // Refusals come before the stream: no token, another tenant, a bad id, a bad query.
    assert_eq!(Events::open(&t, None, "", None).await.0, 401);
    assert_eq!(Events::open(&t, Some(READER), "?tenant=globex", None).await.0, 403);
    assert_eq!(Events::open(&t, Some(ADMIN), "", Some("not-a-cursor")).await.0, 400);
    assert_eq!(Events::open(&t, Some(ADMIN), "?tenant=no%20such", None).await.0, 400);
    assert_eq!(Events::open(&t, Some(ADMIN), "?since=1", None).await.0, 400);

    let (_, admin) = Events::open(&t, Some(ADMIN), "", None).await;
    let (_, reader) = Events::open(&t, Some(READER), "", None).await;
    let (_, only_acme) = Events::open(&t, Some(ADMIN), "?tenant=acme", None).await;
    let (mut admin, mut reader, mut only_acme) =
        (admin.expect("admin"), reader.expect("reader"), only_acme.expect("acme"));

    invalidate(&t, json!({"tenant": "acme", "keys": ["s:1"]})).await;
    invalidate(&t, json!({"tenant": "globex", "keys": ["s:2"]})).await;
    invalidate(&t, json!({"tenant": "acme", "keys": ["s:3"]})).await;

    // The admin sees all three (across partitions, in the order accepted to
    // the millisecond: two accepted within one may come either way).
    let (first_id, first, before) = admin.until_key("s:1").await;
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(tenants_of(&first), ["acme"], "{first}");
    assert!(first["seq"].as_u64().is_some_and(|s| s > 0) && first["ts_ms"].is_u64(), "{first}");
    let (_, last, before) = admin.until_key("s:3").await;
    let globex = match before.as_slice() {
        [globex] => globex.clone(),
        // s:3 came first: s:2 is next.
        [] => admin.until_key("s:2").await.1,
        more => panic!("more events than invalidations: {more:?}"),
    };
    assert_eq!(tenants_of(&globex), ["globex"], "{globex}");
    assert_eq!(keys_of(&globex), ["s:2"], "{globex}");
    assert_eq!(tenants_of(&last), ["acme"], "{last}");

    // A token scoped to acme sees acme's invalidations and nothing of globex's.
    let (_, _, before) = reader.until_key("s:3").await;
    assert_eq!(before.iter().flat_map(keys_of).collect::<Vec<_>>(), ["s:1"], "{before:?}");
    // ?tenant=acme: the same.
    let (_, _, before) = only_acme.until_key("s:3").await;
    assert_eq!(before.iter().flat_map(keys_of).collect::<Vec<_>>(), ["s:1"], "{before:?}");

    // Resumed after the first event: the second and third, and not the first
    // again; and the stream goes on with a later invalidation.
    let (_, resumed) = Events::open(&t, Some(ADMIN), "", Some(&first_id)).await;
    let mut resumed = resumed.expect("resumed");
    invalidate(&t, json!({"tenant": "acme", "keys": ["s:4"]})).await;
    let (_, _, before) = resumed.until_key("s:4").await;
    let mut keys: Vec<String> = before.iter().flat_map(keys_of).collect();
    keys.sort();
    assert_eq!(keys, ["s:2", "s:3"], "{before:?}");
}

/// A chromedriver process on a free port, killed on drop.
struct Chromedriver {
    child: Child,
    port: u16,
}

impl Chromedriver {
    /// Starts `chromedriver` (installed by `make chromium`) and waits until it listens.
    async fn start() -> Chromedriver {
        let program = integration_tests::which("chromedriver")
            .or_else(|| Some(PathBuf::from("/usr/bin/chromedriver")).filter(|p| p.exists()))
            .expect("chromedriver is not installed: run `make chromium` (make test does)");
        let port = free_port();
        let child = Command::new(program)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("chromedriver does not start: {e}"));
        let driver = Chromedriver { child, port };
        let listening = wait_until(SHOWN_WITHIN, || async {
            tokio::net::TcpStream::connect(("127.0.0.1", driver.port)).await.is_ok()
        })
        .await;
        assert!(listening, "chromedriver did not listen on {port}");
        driver
    }

    /// A headless Chromium session.
    async fn session(&self) -> Client {
        let mut caps = serde_json::Map::new();
        let mut options = json!({
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1500", "--hide-scrollbars", "--force-color-profile=srgb"]
        });
        if std::path::Path::new("/usr/bin/chromium").exists() {
            options["binary"] = json!("/usr/bin/chromium");
        }
        caps.insert("goog:chromeOptions".into(), options);
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .unwrap_or_else(|e| panic!("no Chromium session: {e}"))
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text of the first element matching `css` (empty when there is none).
async fn text_of(browser: &Client, css: &str) -> String {
    match browser.find(Locator::Css(css)).await {
        Ok(element) => element.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Waits until the text of `css` satisfies `check`; panics with what it was.
async fn wait_for_text(browser: &Client, css: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + SHOWN_WITHIN;
    loop {
        let text = text_of(browser, css).await;
        if check(&text) {
            return text;
        }
        if Instant::now() > deadline {
            panic!("the dashboard did not show {what} within {SHOWN_WITHIN:?}: {css} says {text:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The cluster's seq as the API says it.
async fn api_seq(t: &TestCluster) -> u64 {
    let resp = t
        .http
        .get(t.cluster.coordinator.url("/v1/cluster/health"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("health: {e}"));
    let health: Value = resp.json().await.unwrap_or(Value::Null);
    health["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {health}"))
}

/// Where the screenshot goes: `$CARGO_TARGET_DIR`, or `target/` of the workspace.
fn screenshot_path() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    let _ = std::fs::create_dir_all(&dir);
    dir.join("dashboard.png")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_nodes_seq_live_invalidations_and_a_frozen_node_in_words() {
    let t = start(3, "node_dead_after_ms = 4000\n").await;
    // Some entries in every agent's L1, and a few invalidations in the log.
    for (i, key) in ["user:1", "user:2", "user:3"].iter().enumerate() {
        t.put_authorized(i, key).await;
    }
    invalidate(&t, json!({"tenant": "acme", "keys": ["user:0"]})).await;

    // The page is open; the data is not.
    let page = t.http.get(t.cluster.coordinator.url("/dashboard")).send().await.expect("GET /dashboard");
    assert_eq!(page.status().as_u16(), 200);
    let html = page.text().await.unwrap_or_default();
    assert!(!html.contains("://"), "the page loads nothing from elsewhere");
    for asset in ["/dashboard/app.js", "/dashboard/style.css"] {
        let resp = t.http.get(t.cluster.coordinator.url(asset)).send().await.expect(asset);
        assert_eq!(resp.status().as_u16(), 200, "{asset}");
    }
    // Only the coordinator opens it: an agent asks for a token first, as for any path.
    let resp = t.http.get(t.agent(0).url("/dashboard")).send().await.expect("GET an agent's /dashboard");
    assert_eq!(resp.status().as_u16(), 401);

    let driver = Chromedriver::start().await;
    let browser = driver.session().await;
    let result = drive(&t, &browser).await;
    let _ = browser.close().await;
    // Thawed whatever happened.
    let _ = t.agent(2).proc.signal(Signal::SIGCONT);
    result.unwrap_or_else(|e| panic!("{e}"));
}

impl TestCluster {
    /// PUTs `acme/key` on agent `i` with the admin token (it is then in that agent's L1).
    async fn put_authorized(&self, i: usize, key: &str) {
        let resp = self
            .http
            .put(self.agent(i).url(&format!("/v1/cache/acme/{key}?tags=users")))
            .bearer_auth(ADMIN)
            .header("content-type", "text/plain")
            .body(format!("value of {key}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT: {e}"));
        assert_eq!(resp.status().as_u16(), 204);
    }

    /// GETs `acme/key` on agent `i` with the admin token (a hit or a miss in its stats).
    async fn get_authorized(&self, i: usize, key: &str) {
        let resp = self
            .http
            .get(self.agent(i).url(&format!("/v1/cache/acme/{key}")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET: {e}"));
        assert!(matches!(resp.status().as_u16(), 200 | 404), "GET acme/{key}: {}", resp.status());
    }
}

/// The browser part of the dashboard test.
async fn drive(t: &TestCluster, browser: &Client) -> Result<(), String> {
    let fail = |what: &str, e: fantoccini::error::CmdError| format!("{what}: {e}");
    browser.goto(&t.cluster.coordinator.url("/dashboard")).await.map_err(|e| fail("goto", e))?;

    // With tokens configured, it asks for one.
    let deadline = Instant::now() + SHOWN_WITHIN;
    loop {
        let panel = browser.find(Locator::Id("token-panel")).await.map_err(|e| fail("token panel", e))?;
        if panel.is_displayed().await.unwrap_or(false) {
            break;
        }
        if Instant::now() > deadline {
            return Err("the dashboard did not ask for a token".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let input = browser.find(Locator::Id("token-input")).await.map_err(|e| fail("token input", e))?;
    input.send_keys(ADMIN).await.map_err(|e| fail("typing the token", e))?;
    let submit = browser.find(Locator::Css("#token-form button")).await.map_err(|e| fail("submit", e))?;
    submit.click().await.map_err(|e| fail("submitting the token", e))?;

    // Every node, and the seq the API gives.
    for node in ["agent-1", "agent-2", "agent-3"] {
        wait_for_text(browser, "#nodes tbody", node, |text| text.contains(node)).await;
    }
    wait_for_text(browser, "#nodes tbody", "three synced nodes", |text| {
        text.split_whitespace().filter(|w| *w == "synced").count() == 3
    })
    .await;
    let seq = api_seq(t).await;
    wait_for_text(browser, "#seq", "the seq", |text| text.trim().parse::<u64>().is_ok_and(|s| s >= seq)).await;

    // An invalidation posted to the API appears without a reload, and the seq follows.
    let answer = invalidate(t, json!({"tenant": "acme", "keys": ["dash:live"]})).await;
    wait_for_text(browser, "#feed", "the new invalidation", |text| text.contains("dash:live")).await;
    let seq = api_seq(t).await;
    wait_for_text(browser, "#seq", "the new seq", |text| text.trim().parse::<u64>().is_ok_and(|s| s >= seq)).await;
    assert!(answer["seq"].is_u64(), "{answer}");
    for key in ["orders:17", "orders:18"] {
        invalidate(t, json!({"tenant": "globex", "keys": [key]})).await;
    }
    invalidate(t, json!({"tenant": "acme", "tags": ["users"]})).await;
    // Entries and hits in every L1, for the page (and the screenshot) to show.
    for i in 0..3 {
        for j in 0..=i + 2 {
            let key = format!("product:{i}{j}");
            t.put_authorized(i, &key).await;
            for _ in 0..=j {
                t.get_authorized(i, &key).await;
            }
        }
    }

    for node in ["agent-1", "agent-2", "agent-3"] {
        let ratio = format!("#nodes tr[data-node='{node}'] td:nth-child(6)");
        wait_for_text(browser, &ratio, "a hit ratio", |text| !text.is_empty() && text != "0.0 %").await;
    }

    // A frozen node: lagging (an invalidation it does not apply), then dead.
    t.agent(2).proc.signal(Signal::SIGSTOP).map_err(|e| format!("SIGSTOP: {e}"))?;
    invalidate(t, json!({"tenant": "acme", "keys": ["dash:while-frozen"]})).await;
    let row = "#nodes tr[data-node='agent-3']";
    let shown = wait_for_text(browser, row, "agent-3 lagging or dead", |text| {
        text.contains("lagging") || text.contains("dead")
    })
    .await;
    assert!(shown.contains("agent-3"), "{shown}");
    wait_for_text(browser, "#summary", "the frozen node in the summary", |text| text.contains("agent-3")).await;
    wait_for_text(browser, "#feed", "the invalidation while frozen", |text| text.contains("dash:while-frozen")).await;

    // The screenshot, from the top of the page.
    browser.execute("window.scrollTo(0, 0); return 0;", vec![]).await.map_err(|e| fail("scroll", e))?;
    let png = browser.screenshot().await.map_err(|e| fail("screenshot", e))?;
    let path = screenshot_path();
    std::fs::write(&path, &png).map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!("dashboard screenshot: {}", path.display());

    // The admin's guarded invalidation: a dry run first, nothing done until confirmed.
    let actions = browser.find(Locator::Id("actions")).await.map_err(|e| fail("actions", e))?;
    let shown = wait_until(SHOWN_WITHIN, || async { actions.is_displayed().await.unwrap_or(false) }).await;
    if !shown {
        return Err("the admin's actions are not shown".into());
    }
    t.put_authorized(0, "guarded:1").await;
    let fill = |id: &'static str, text: &'static str| async move {
        let field = browser.find(Locator::Id(id)).await.map_err(|e| fail(id, e))?;
        field.clear().await.map_err(|e| fail(id, e))?;
        field.send_keys(text).await.map_err(|e| fail(id, e))
    };
    fill("inv-tenant", "acme").await?;
    fill("inv-value", "guarded:1").await?;
    let before = api_seq(t).await;
    let preview = browser.find(Locator::Css("#invalidate-form button")).await.map_err(|e| fail("preview", e))?;
    preview.click().await.map_err(|e| fail("preview", e))?;
    wait_for_text(browser, "#preview-text", "the dry run", |text| text.contains("Would delete 1 L2 entry")).await;
    if api_seq(t).await != before {
        return Err("the dry run invalidated something".into());
    }
    let confirm = browser.find(Locator::Id("confirm")).await.map_err(|e| fail("confirm", e))?;
    confirm.click().await.map_err(|e| fail("confirm", e))?;
    wait_for_text(browser, "#action-result", "the invalidation done", |text| text.starts_with("Invalidated")).await;
    wait_for_text(browser, "#feed", "the confirmed invalidation", |text| text.contains("guarded:1")).await;

    // Thawed, it is synced again.
    t.agent(2).proc.signal(Signal::SIGCONT).map_err(|e| format!("SIGCONT: {e}"))?;
    let pill = "#nodes tr[data-node='agent-3'] .pill";
    wait_for_text(browser, pill, "agent-3 synced again", |text| text.trim() == "synced").await;
    Ok(())
}
