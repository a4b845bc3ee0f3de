//! Malformed input in bulk (issue 10): random bytes in paths, query strings,
//! headers and bodies; oversize headers; invalid UTF-8; broken framing; and
//! `Authorization` headers of every wrong shape, against a coordinator and an
//! agent, in a cluster without tokens and in one with `[[tokens]]`.
//!
//! The requests are written byte by byte over TCP (an HTTP client would
//! normalise or refuse them). What must hold: no answer is a 5xx; a request
//! that reaches the API is answered, and a 4xx answer is JSON with an `error`;
//! with tokens, a wrong or missing token is a 401 with `WWW-Authenticate:
//! Bearer` before anything else is looked at; garbage that the HTTP parser
//! refuses gets its bare 400/431 or a closed connection (counted); and
//! afterwards both processes are up, ready, and still do their job.
//!
//! The random cases come from a seed printed at the start (set
//! `DCC_MALFORMED_SEED` to replay one).

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use fastrand::Rng;
use integration_tests::{ClusterOptions, Service};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{TestCluster, PROPAGATION_DEADLINE};

/// Random cases per process and cluster (on top of the fixed ones).
const RANDOM_CASES: usize = 300;

/// How long one request may take to be answered before it counts as a hang.
const ANSWER_DEADLINE: Duration = Duration::from_secs(20);

/// The secret of the one token of the cluster with tokens.
const SECRET: &str = "malformed-app-secret";

/// The statuses actix-http's parser answers (without a body) before any
/// handler runs: a bad request, a head too large, a request too slow.
const PARSER_REFUSALS: [u16; 4] = [400, 408, 413, 431];

/// The longest request target the parser takes (the `http` crate's limit
/// for a URI); a longer one is its bare 400.
const URI_MAX: usize = 65_534;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_in_bulk_without_tokens_never_gets_a_5xx() {
    let seed = seed();
    let mut t = TestCluster::start(1, "").await;
    let started = Instant::now();
    let mut report = Report::new("without tokens", Some(seed));
    for target in [Target::Agent, Target::Coordinator] {
        let ctx = Ctx { target, addr: service(&t, target).addr.clone(), tokens: false };
        let cases = all_cases(&ctx, seed);
        bombard(service_mut(&mut t, target), &ctx, cases, &mut report).await;
    }
    report.finish(&t, started);
    assert_bounded_method_labels(&t).await;
    assert_up_and_working(&mut t, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_in_bulk_with_tokens_is_refused_401_first_and_never_gets_a_5xx() {
    let seed = seed();
    let mut t = TestCluster::with(with_tokens()).await;
    let started = Instant::now();
    let mut report = Report::new("with tokens", Some(seed));
    for target in [Target::Agent, Target::Coordinator] {
        let ctx = Ctx { target, addr: service(&t, target).addr.clone(), tokens: true };
        let cases = all_cases(&ctx, seed);
        bombard(service_mut(&mut t, target), &ctx, cases, &mut report).await;
    }
    report.finish(&t, started);
    assert_bounded_method_labels(&t).await;
    assert_up_and_working(&mut t, Some(SECRET)).await;
}

/// Two `Authorization` headers are a malformed request (the field is not a
/// list: RFC 9110, section 11.6.2) and a wrong shape like the others: 401
/// whichever comes first. (The bulk test sends the wrong one first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorization_headers_are_refused_even_with_the_right_one_first() {
    let mut t = TestCluster::with(with_tokens()).await;
    let started = Instant::now();
    let mut report = Report::new("two Authorization headers", None);
    let credential = Credential {
        label: "two headers, the right one first",
        values: vec![cat(&[b"Bearer ", SECRET.as_bytes()]), b"Bearer wrong".to_vec()],
        right: false,
        parser_may_refuse: false,
    };
    for target in [Target::Agent, Target::Coordinator] {
        let ctx = Ctx { target, addr: service(&t, target).addr.clone(), tokens: true };
        let mut cases = Vec::new();
        for (method, path, body) in target.credential_routes() {
            let mut raw = Raw::new(method, path);
            if let Some((content_type, body)) = body {
                raw = raw.header("Content-Type", content_type).body(body);
            }
            cases.push(ctx.case("credentials", Kind::Api, false, raw, &credential));
        }
        bombard(service_mut(&mut t, target), &ctx, cases, &mut report).await;
    }
    report.finish(&t, started);
    assert_up_and_working(&mut t, Some(SECRET)).await;
}

/// A cluster whose processes know one token, [`SECRET`], for tenant `acme`.
fn with_tokens() -> ClusterOptions {
    let tokens = format!(
        "[[tokens]]\nname = \"app\"\nsha256 = \"{}\"\ntenants = [\"acme\"]\nscopes = [\"read\", \"write\", \"invalidate\"]\n",
        shared::auth::sha256_hex(SECRET)
    );
    ClusterOptions { agents: 1, coordinator_toml: tokens.clone(), agent_toml: tokens, ..ClusterOptions::default() }
}

// ---------------------------------------------------------------------------
// The processes and what is expected of their answers.

/// A process under test.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Target {
    Agent,
    Coordinator,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Agent => "agent",
            Target::Coordinator => "coordinator",
        }
    }

    /// Where a random path starts: its routes, prefixes of them, and nothing.
    fn prefixes(self) -> &'static [&'static str] {
        match self {
            Target::Agent => &[
                "/v1/cache/",
                "/v1/cache/acme/",
                "/v1/cache/acme/k/",
                "/v1/cache",
                "/v1/status",
                "/v1/",
                "/healthz",
                "/readyz",
                "/metrics",
                "/",
                "//",
            ],
            Target::Coordinator => &[
                "/v1/events",
                "/v1/events/",
                "/v1/invalidate",
                "/v1/cluster/health",
                "/v1/rules",
                "/v1/audit",
                "/v1/",
                "/healthz",
                "/readyz",
                "/metrics",
                "/",
                "//",
            ],
        }
    }

    /// Its routes that read a body: (method, path).
    fn body_routes(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Target::Agent => &[("PUT", "/v1/cache/acme/malformed-body")],
            Target::Coordinator => &[("POST", "/v1/events"), ("POST", "/v1/invalidate")],
        }
    }

    /// Its routes that take no body: (method, path).
    fn other_routes(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Target::Agent => &[("GET", "/v1/cache/acme/k"), ("GET", "/v1/status"), ("DELETE", "/v1/cache/acme/k")],
            Target::Coordinator => &[("GET", "/v1/rules"), ("GET", "/v1/cluster/health"), ("GET", "/v1/audit")],
        }
    }

    /// Requests for the credential cases: a route of each kind, a bad body,
    /// a bad name, an unknown route, and an open probe.
    fn credential_routes(self) -> Vec<CredentialRoute> {
        match self {
            Target::Agent => vec![
                ("GET", "/v1/cache/acme/k", None),
                ("PUT", "/v1/cache/acme/k", Some(("text/plain", b"v"))),
                ("DELETE", "/v1/cache/%FF/k", None),
                ("GET", "/v1/status", None),
                ("GET", "/no/such/route", None),
                ("GET", "/healthz", None),
            ],
            Target::Coordinator => vec![
                ("POST", "/v1/events", Some(("application/json", b"not json"))),
                ("POST", "/v1/invalidate", Some(("application/json", br#"{"tenant":"acme","keys":["k"]}"#))),
                ("GET", "/v1/audit", None),
                ("GET", "/v1/cluster/health", None),
                ("GET", "/nope", None),
                ("GET", "/readyz", None),
            ],
        }
    }
}

/// A request of the credential cases: method, path, and (content type, body).
type CredentialRoute = (&'static str, &'static str, Option<(&'static str, &'static [u8])>);

/// How strictly an answer is judged.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// Well-formed HTTP: it reaches the API, must be answered, and a 4xx
    /// answer is JSON with an `error`.
    Api,
    /// Garbage at the protocol level (the request line, header syntax,
    /// framing): the parser's bare 400/431, or a closed connection, will do;
    /// an answer from the API is judged as for [`Kind::Api`].
    Protocol,
}

/// The `Authorization` a request carries.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Auth {
    /// The process has no tokens: whatever the request carries is ignored.
    Off,
    /// A wrong, missing or malformed token: 401 before anything else.
    Wrong,
    /// The right token: judged on its other merits.
    Right,
}

/// What the random and fixed cases are built for.
struct Ctx {
    target: Target,
    /// `127.0.0.1:port`, for the Host header.
    addr: String,
    /// Whether the process has tokens.
    tokens: bool,
}

/// One request, as bytes, and how to judge its answer.
struct Case {
    /// What kind of malformation, for the counts.
    group: &'static str,
    kind: Kind,
    auth: Auth,
    /// The path is an open probe (answered without a token).
    open: bool,
    /// A HEAD request (its answer has no body).
    head: bool,
    /// Shut the write side once sent: the body or chunks are cut short, and
    /// the server would otherwise wait for the rest.
    half_close: bool,
    /// A label for the credential, when it matters.
    credential: &'static str,
    bytes: Vec<u8>,
}

impl Case {
    /// How the request reads in a failure message.
    fn describe(&self) -> String {
        format!(
            "[{}{}{}] {}",
            self.group,
            if self.credential.is_empty() { "" } else { ", credential: " },
            self.credential,
            escape(&self.bytes, 600)
        )
    }
}

/// The answer to one request.
enum Outcome {
    /// A status line and what followed.
    Answer(Answer),
    /// The connection closed (or was reset) before any answer.
    Closed(String),
    /// Bytes came back that are not an HTTP answer.
    Garbled(Vec<u8>),
    /// Nothing within [`ANSWER_DEADLINE`].
    Hung,
    /// The process could not be reached at all.
    Unreachable(String),
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The `error` code of a JSON answer, if it is one.
    fn error_code(&self) -> Option<String> {
        let json = self.header("content-type").is_some_and(|c| c.starts_with("application/json"));
        let body: Value = serde_json::from_slice(&self.body).ok().filter(|_| json)?;
        body["error"].as_str().filter(|c| !c.is_empty()).map(str::to_string)
    }

    /// A bare refusal of actix-http's parser (no handler ran).
    fn parser_refusal(&self) -> bool {
        PARSER_REFUSALS.contains(&self.status) && self.header("content-type").is_none()
    }
}

/// Whether `case`'s outcome is acceptable; `Err` says why not.
fn judge(case: &Case, outcome: &Outcome) -> Result<(), String> {
    let answer = match outcome {
        Outcome::Answer(answer) => answer,
        // Counted in the report: the parser may just hang up on garbage.
        Outcome::Closed(_) if case.kind == Kind::Protocol => return Ok(()),
        Outcome::Closed(why) => return Err(format!("closed without an answer ({why})")),
        Outcome::Garbled(bytes) => return Err(format!("not an HTTP answer: {}", escape(bytes, 300))),
        Outcome::Hung => return Err(format!("no answer within {ANSWER_DEADLINE:?} (a hang)")),
        Outcome::Unreachable(why) => return Err(format!("the process cannot be reached: {why}")),
    };
    let status = answer.status;
    let body = || escape(&answer.body, 300);
    if status >= 500 {
        return Err(format!("answered {status}: {}", body()));
    }
    if case.kind == Kind::Protocol && answer.parser_refusal() {
        return Ok(());
    }
    if case.auth == Auth::Wrong && !case.open {
        let challenge = answer.header("www-authenticate");
        if status != 401 || challenge != Some("Bearer") {
            return Err(format!(
                "a wrong, missing or malformed credential was answered {status} (WWW-Authenticate {challenge:?}): {}",
                body()
            ));
        }
        if !case.head && answer.error_code().as_deref() != Some("unauthorized") {
            return Err(format!("a 401 without a JSON `unauthorized` error: {}", body()));
        }
        return Ok(());
    }
    if (case.auth == Auth::Right || case.open) && status == 401 {
        return Err(format!("the right token (or an open probe) was answered 401: {}", body()));
    }
    if case.auth == Auth::Off && (status == 401 || status == 403) {
        return Err(format!("answered {status} by a process without tokens: {}", body()));
    }
    if (400..500).contains(&status) && !case.head && answer.error_code().is_none() {
        return Err(format!("a {status} that is not JSON with an `error`: {:?} {}", answer.headers, body()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Sending bytes and reading the answer.

/// Sends `case` on a fresh connection and reads the answer: until the server
/// closes, or until a whole answer (by its Content-Length) is in.
async fn send(addr: &str, case: &Case) -> Outcome {
    let mut stream = match TcpStream::connect(addr).await {
        Ok(stream) => stream,
        Err(e) => return Outcome::Unreachable(e.to_string()),
    };
    let exchange = async {
        let (mut reader, mut writer) = stream.split();
        // Written while reading: a server may answer (and close) before it
        // has read a large body.
        let write = async {
            let result = writer.write_all(&case.bytes).await;
            if result.is_ok() && case.half_close {
                let _ = writer.shutdown().await;
            }
            result
        };
        let read = read_answer(&mut reader, case.head);
        tokio::pin!(write, read);
        let mut written = false;
        loop {
            tokio::select! {
                _ = &mut write, if !written => written = true,
                read = &mut read => return read,
            }
        }
    };
    let (buf, error) = match tokio::time::timeout(ANSWER_DEADLINE, exchange).await {
        Ok(read) => read,
        Err(_) => return Outcome::Hung,
    };
    if buf.is_empty() {
        return Outcome::Closed(error.map_or_else(|| "end of stream".to_string(), |e| e.to_string()));
    }
    match parse_answer(&buf, case.head) {
        Some((answer, _)) => Outcome::Answer(answer),
        None => Outcome::Garbled(buf),
    }
}

/// Reads until the end of the stream, an error, or a complete answer.
async fn read_answer(reader: &mut tokio::net::tcp::ReadHalf<'_>, head: bool) -> (Vec<u8>, Option<std::io::Error>) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) => return (buf, None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return (buf, Some(e)),
        }
        if parse_answer(&buf, head).is_some_and(|(_, complete)| complete) {
            return (buf, None);
        }
    }
}

/// The final answer in `buf` (interim 1xx answers skipped), and whether all
/// of its body is in.
fn parse_answer(buf: &[u8], head: bool) -> Option<(Answer, bool)> {
    let mut rest = buf;
    loop {
        let end = rest.windows(4).position(|w| w == b"\r\n\r\n")?;
        let text = String::from_utf8_lossy(&rest[..end]);
        let mut lines = text.split("\r\n");
        let status_line = lines.next()?;
        let mut parts = status_line.splitn(3, ' ');
        if !parts.next()?.starts_with("HTTP/1.") {
            return None;
        }
        let status: u16 = parts.next()?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        rest = &rest[end + 4..];
        if (100..200).contains(&status) {
            continue;
        }
        let length = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok());
        let (body, complete) = match length {
            _ if head => (Vec::new(), true),
            Some(len) => (rest[..len.min(rest.len())].to_vec(), rest.len() >= len),
            None => (rest.to_vec(), false),
        };
        return Some((Answer { status, headers, body }, complete));
    }
}

/// Bytes as printable ASCII, cut at `max`.
fn escape(bytes: &[u8], max: usize) -> String {
    let mut out: String = bytes.iter().take(max).flat_map(|b| std::ascii::escape_default(*b)).map(char::from).collect();
    if bytes.len() > max {
        out.push_str(&format!("... ({} bytes in all)", bytes.len()));
    }
    out
}

// ---------------------------------------------------------------------------
// Running the cases and reporting.

fn service(t: &TestCluster, target: Target) -> &Service {
    match target {
        Target::Agent => t.agent(0),
        Target::Coordinator => &t.cluster.coordinator,
    }
}

fn service_mut(t: &mut TestCluster, target: Target) -> &mut Service {
    match target {
        Target::Agent => &mut t.cluster.agents[0],
        Target::Coordinator => &mut t.cluster.coordinator,
    }
}

/// The seed of the random cases: `DCC_MALFORMED_SEED`, else the clock.
fn seed() -> u64 {
    let seed = std::env::var("DCC_MALFORMED_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        now.as_nanos() as u64
    });
    eprintln!("malformed: seed {seed} (DCC_MALFORMED_SEED={seed} replays it)");
    seed
}

/// Counts of what was sent and answered, by process and kind of case.
#[derive(Default)]
struct Tally {
    sent: usize,
    statuses: BTreeMap<u16, usize>,
    closed: usize,
}

struct Report {
    label: &'static str,
    /// How to replay the random cases, for messages.
    replay: String,
    tally: BTreeMap<(Target, &'static str), Tally>,
    failures: Vec<String>,
    /// Failures per process, for the log tails.
    failed: BTreeMap<Target, usize>,
    hangs: usize,
}

impl Report {
    fn new(label: &'static str, seed: Option<u64>) -> Report {
        let replay = seed.map_or("no random cases".into(), |s| format!("seed {s}; DCC_MALFORMED_SEED={s} replays it"));
        Report { label, replay, tally: BTreeMap::new(), failures: Vec::new(), failed: BTreeMap::new(), hangs: 0 }
    }

    fn record(&mut self, target: Target, case: &Case, outcome: &Outcome) {
        let tally = self.tally.entry((target, case.group)).or_default();
        tally.sent += 1;
        match outcome {
            Outcome::Answer(answer) => *tally.statuses.entry(answer.status).or_default() += 1,
            Outcome::Closed(_) => tally.closed += 1,
            Outcome::Hung => self.hangs += 1,
            _ => {}
        }
        if let Err(why) = judge(case, outcome) {
            *self.failed.entry(target).or_default() += 1;
            if self.failures.len() < 40 {
                self.failures.push(format!(
                    "{} {}: {why}\n    request: {}",
                    target.name(),
                    self.label,
                    case.describe()
                ));
            }
        }
    }

    /// Prints the counts and fails with every failure and the logs of the
    /// processes that failed.
    fn finish(&self, t: &TestCluster, started: Instant) {
        let mut lines = vec![format!(
            "malformed ({}, {}): {} requests in {:.1?}",
            self.label,
            self.replay,
            self.tally.values().map(|t| t.sent).sum::<usize>(),
            started.elapsed()
        )];
        for ((target, group), tally) in &self.tally {
            let statuses: Vec<String> = tally.statuses.iter().map(|(s, n)| format!("{s}x{n}")).collect();
            lines.push(format!(
                "  {:<11} {:<26} {:>4} sent; answered {}; closed without an answer {}",
                target.name(),
                group,
                tally.sent,
                statuses.join(" "),
                tally.closed
            ));
        }
        eprintln!("{}", lines.join("\n"));
        if self.failures.is_empty() {
            return;
        }
        let mut message = format!(
            "{} failures ({} shown; {}):\n{}",
            self.failed.values().sum::<usize>(),
            self.failures.len(),
            self.replay,
            self.failures.join("\n")
        );
        for target in self.failed.keys() {
            let proc = &service(t, *target).proc;
            message.push_str(&format!("\n--- {} log tail:\n{}", proc.name, proc.log_tail()));
        }
        panic!("{message}");
    }
}

/// Sends every case to `service`, checking after each that it is still up.
async fn bombard(service: &mut Service, ctx: &Ctx, cases: Vec<Case>, report: &mut Report) {
    for case in &cases {
        let outcome = send(&service.addr, case).await;
        report.record(ctx.target, case, &outcome);
        if let Some(status) = service.proc.try_status() {
            panic!(
                "{} exited ({status}) after (or during) this request ({}):\n{}\n--- log tail:\n{}",
                service.proc.name,
                report.replay,
                case.describe(),
                service.proc.log_tail()
            );
        }
        assert!(report.hangs < 3, "{} hangs; stopping: {:#?}", report.hangs, report.failures);
    }
}

/// The `method` label of the latency histogram takes a bounded set of
/// values: the methods the cases made up did not each add series (a client
/// could otherwise grow `/metrics` and the process's memory without bound).
async fn assert_bounded_method_labels(t: &TestCluster) {
    const KNOWN: [&str; 10] = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE", "other"];
    for target in [Target::Agent, Target::Coordinator] {
        let url = service(t, target).url("/metrics");
        let resp = t.http.get(&url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let text = resp.text().await.unwrap_or_default();
        let labels: std::collections::BTreeSet<&str> =
            text.split("method=\"").skip(1).filter_map(|rest| rest.split('"').next()).collect();
        assert!(labels.contains("GET"), "{} /metrics has no latency series: {text}", target.name());
        let made_up: Vec<&&str> = labels.iter().filter(|m| !KNOWN.contains(m)).collect();
        assert!(made_up.is_empty(), "{} /metrics has series for made-up methods: {made_up:?}", target.name());
    }
}

/// Both processes are still running, ready, and do their job: a PUT+GET
/// round trip, and an event that invalidates what was put.
async fn assert_up_and_working(t: &mut TestCluster, secret: Option<&str>) {
    for target in [Target::Agent, Target::Coordinator] {
        let service = service_mut(t, target);
        assert!(service.proc.try_status().is_none(), "{} exited:\n{}", service.proc.name, service.proc.log_tail());
    }
    for target in [Target::Agent, Target::Coordinator] {
        integration_tests::wait_ready(&t.http, service(t, target)).await.unwrap_or_else(|e| panic!("{e:#}"));
    }
    let with = |request: reqwest::RequestBuilder| match secret {
        Some(secret) => request.bearer_auth(secret),
        None => request,
    };
    let url = t.agent(0).url("/v1/cache/acme/after-malformed");
    let put = with(t.http.put(format!("{url}?tags=still-works"))).header("content-type", "text/plain").body("fine");
    let resp = put.send().await.expect("PUT after malformed input");
    assert_eq!(resp.status().as_u16(), 204, "PUT after malformed input: {}", resp.text().await.unwrap_or_default());
    let resp = with(t.http.get(&url)).send().await.expect("GET after malformed input");
    let status = resp.status().as_u16();
    assert_eq!((status, resp.text().await.unwrap_or_default()), (200, "fine".to_string()), "GET after malformed input");
    let event = with(t.http.post(t.cluster.coordinator.url("/v1/events")))
        .json(&json!({"tenant": "acme", "entity": "still-works"}))
        .send()
        .await
        .expect("event after malformed input");
    let status = event.status().as_u16();
    assert_eq!(status, 200, "event after malformed input: {}", event.text().await.unwrap_or_default());
    let gone = crate::wait_until(PROPAGATION_DEADLINE, || async {
        with(t.http.get(&url)).send().await.is_ok_and(|r| r.status().as_u16() == 404)
    })
    .await;
    assert!(gone, "the event after malformed input did not invalidate acme/after-malformed");
}

// ---------------------------------------------------------------------------
// Building requests.

/// A request, field by field, written as HTTP/1.1 bytes.
struct Raw {
    method: Vec<u8>,
    target: Vec<u8>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
    /// Write `Content-Length` for the body (off when a case frames it itself).
    length: bool,
}

impl Raw {
    fn new(method: impl Into<Vec<u8>>, target: impl Into<Vec<u8>>) -> Raw {
        Raw { method: method.into(), target: target.into(), headers: Vec::new(), body: Vec::new(), length: true }
    }

    fn header(mut self, name: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Raw {
        self.headers.push((name.into(), value.into()));
        self
    }

    fn body(mut self, body: impl Into<Vec<u8>>) -> Raw {
        self.body = body.into();
        self
    }

    /// The body is framed by the case's own headers.
    fn framed(mut self, body: impl Into<Vec<u8>>) -> Raw {
        self.body = body.into();
        self.length = false;
        self
    }

    fn bytes(&self, host: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.target.len() + self.body.len() + 256);
        out.extend_from_slice(&self.method);
        out.push(b' ');
        out.extend_from_slice(&self.target);
        out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\nConnection: close\r\n");
        for (name, value) in &self.headers {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        if self.length {
            out.extend_from_slice(format!("Content-Length: {}\r\n", self.body.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

/// An `Authorization` to send: its header values, in order (none: no header).
#[derive(Clone)]
struct Credential {
    label: &'static str,
    values: Vec<Vec<u8>>,
    /// It carries the right secret, as the process reads it.
    right: bool,
    /// The HTTP parser may refuse it (a control character in the value).
    parser_may_refuse: bool,
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// `Authorization` headers of every wrong shape.
fn wrong_credentials() -> Vec<Credential> {
    let s = SECRET.as_bytes();
    let wrong = |label, values: Vec<Vec<u8>>| Credential { label, values, right: false, parser_may_refuse: false };
    let refusable = |label, values: Vec<Vec<u8>>| Credential { label, values, right: false, parser_may_refuse: true };
    let long: Vec<u8> = (0..10 * 1024).map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789-_"[i % 38]).collect();
    vec![
        wrong("no header", vec![]),
        wrong("empty", vec![b"".to_vec()]),
        wrong("Bearer and nothing", vec![b"Bearer".to_vec()]),
        wrong("Bearer and spaces", vec![b"Bearer  ".to_vec()]),
        wrong("Bearer, two spaces, the secret", vec![cat(&[b"Bearer  ", s])]),
        wrong("lowercase bearer x", vec![b"bearer x".to_vec()]),
        wrong("Basic", vec![b"Basic YWNtZTpzZWNyZXQ=".to_vec()]),
        wrong("Basic with the secret", vec![cat(&[b"Basic ", s])]),
        wrong("Token scheme", vec![cat(&[b"Token ", s])]),
        wrong("the secret alone", vec![s.to_vec()]),
        wrong("Bearer=secret", vec![cat(&[b"Bearer=", s])]),
        wrong("tab after Bearer", vec![cat(&[b"Bearer\t", s])]),
        wrong("unknown secret", vec![b"Bearer wrong-secret".to_vec()]),
        wrong("secret in upper case", vec![cat(&[b"Bearer ", SECRET.to_uppercase().as_bytes()])]),
        wrong("secret cut short", vec![cat(&[b"Bearer ", &s[..s.len() - 1]])]),
        wrong("secret and more", vec![cat(&[b"Bearer ", s, b" x"])]),
        wrong("secret in a list", vec![cat(&[b"Bearer wrong, Bearer ", s])]),
        wrong("secret percent-encoded", vec![b"Bearer malformed%2Dapp%2Dsecret".to_vec()]),
        wrong("10 KB token", vec![cat(&[b"Bearer ", &long])]),
        wrong("non-ASCII token", vec![b"Bearer \xff\xfe\xfd\x80".to_vec()]),
        wrong("secret and invalid UTF-8", vec![cat(&[b"Bearer ", s, b"\xc3\x28"])]),
        wrong("secret and a Latin-1 byte", vec![cat(&[b"Bearer ", s, b"\xe9"])]),
        wrong("two headers, both wrong", vec![b"Bearer one".to_vec(), b"Bearer two".to_vec()]),
        wrong("two headers, the wrong one first", vec![b"Bearer wrong".to_vec(), cat(&[b"Bearer ", s])]),
        refusable("a NUL in the secret", vec![cat(&[b"Bearer ", &s[..4], b"\0", &s[4..]])]),
        refusable("secret and a NUL", vec![cat(&[b"Bearer ", s, b"\0"])]),
        refusable("secret and a control byte", vec![cat(&[b"Bearer ", s, b"\x01"])]),
        refusable("secret and DEL", vec![cat(&[b"Bearer ", s, b"\x7f"])]),
        refusable("secret on a folded line", vec![cat(&[b"Bearer\r\n ", s])]),
    ]
}

fn right_credential() -> Credential {
    let values = vec![cat(&[b"Bearer ", SECRET.as_bytes()])];
    Credential { label: "right", values, right: true, parser_may_refuse: false }
}

/// The right secret followed by whitespace: HTTP strips whitespace around a
/// field value (RFC 9110, section 5.5), so the process reads the right secret.
fn right_with_trailing_whitespace() -> Vec<Credential> {
    let s = SECRET.as_bytes();
    vec![
        Credential {
            label: "right, trailing space",
            values: vec![cat(&[b"Bearer ", s, b" "])],
            right: true,
            parser_may_refuse: false,
        },
        Credential {
            label: "right, trailing tab",
            values: vec![cat(&[b"Bearer ", s, b"\t"])],
            right: true,
            parser_may_refuse: false,
        },
    ]
}

fn none() -> Credential {
    Credential { label: "", values: Vec::new(), right: false, parser_may_refuse: false }
}

impl Ctx {
    /// The case for `raw` with `credential`.
    fn case(&self, group: &'static str, kind: Kind, half_close: bool, mut raw: Raw, credential: &Credential) -> Case {
        let auth = match (self.tokens, credential.right) {
            (false, _) => Auth::Off,
            (true, true) => Auth::Right,
            (true, false) => Auth::Wrong,
        };
        for (i, value) in credential.values.iter().enumerate() {
            raw.headers.insert(i, (b"Authorization".to_vec(), value.clone()));
        }
        let path = raw.target.split(|b| *b == b'?').next().unwrap_or_default();
        let open = matches!(path, b"/healthz" | b"/readyz" | b"/metrics");
        // The parser refuses a request target longer than the `http` crate's
        // limit for a URI, before any handler runs.
        let kind = if credential.parser_may_refuse || raw.target.len() > URI_MAX { Kind::Protocol } else { kind };
        Case {
            group,
            kind,
            auth,
            open,
            head: raw.method == b"HEAD",
            half_close,
            credential: credential.label,
            bytes: raw.bytes(&self.addr),
        }
    }

    /// The credential of a random case: without tokens none, or now and then
    /// a wrong one (which must be ignored); with tokens mostly a wrong one.
    fn random_credential(&self, rng: &mut Rng, wrong: &[Credential]) -> Credential {
        match (self.tokens, rng.usize(..3)) {
            (false, 0) | (true, 1..) => wrong[rng.usize(..wrong.len())].clone(),
            (false, _) => none(),
            (true, _) => right_credential(),
        }
    }
}

/// Every case for one process: the credentials, the fixed ones, the random ones.
fn all_cases(ctx: &Ctx, seed: u64) -> Vec<Case> {
    let wrong = wrong_credentials();
    let mut cases = Vec::new();
    // Every wrong shape of Authorization (and the right secret with trailing
    // whitespace), on every kind of route.
    for credential in wrong.iter().chain(&right_with_trailing_whitespace()) {
        for (method, path, body) in ctx.target.credential_routes() {
            let mut raw = Raw::new(method, path);
            if let Some((content_type, body)) = body {
                raw = raw.header("Content-Type", content_type).body(body);
            }
            cases.push(ctx.case("credentials", Kind::Api, false, raw, credential));
        }
    }
    // The fixed cases: without tokens once; with tokens with a wrong and with the right one.
    let credentials = match wrong.iter().find(|c| c.label == "unknown secret") {
        Some(unknown) if ctx.tokens => vec![unknown.clone(), right_credential()],
        _ => vec![none()],
    };
    for credential in &credentials {
        for (group, kind, half_close, raw) in fixed(ctx.target) {
            cases.push(ctx.case(group, kind, half_close, raw, credential));
        }
    }
    // The random ones.
    let salt = match (ctx.target, ctx.tokens) {
        (Target::Agent, false) => 1,
        (Target::Coordinator, false) => 2,
        (Target::Agent, true) => 3,
        (Target::Coordinator, true) => 4,
    };
    let mut rng = Rng::with_seed(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(salt));
    for _ in 0..RANDOM_CASES {
        let credential = ctx.random_credential(&mut rng, &wrong);
        let (group, kind, half_close, raw) = random(&mut rng, ctx.target);
        cases.push(ctx.case(group, kind, half_close, raw, &credential));
    }
    cases
}

/// A case before its credential: (group, kind, half-close, request).
type Draft = (&'static str, Kind, bool, Raw);

/// Fixed cases: named malformed paths, oversize headers, deep JSON, huge
/// bodies, invalid UTF-8 in JSON.
fn fixed(target: Target) -> Vec<Draft> {
    let mut out: Vec<Draft> = Vec::new();
    let (first_method, first_path) = target.other_routes()[0];
    // Named paths.
    let paths: &[&str] = match target {
        Target::Agent => &[
            "/v1/cache/%C3%28/k",
            "/v1/cache/acme/%C3%28",
            "/v1/cache/%FF/k",
            "/v1/cache/acme/%FF",
            "/v1/cache/acme/a%00b",
            "/v1/cache/%00/k",
            "/v1/cache/../../etc/passwd",
            "/v1/cache/acme/../../../etc/passwd",
            "/v1/cache/%2E%2E/%2E%2E",
            "/v1/cache/acme/..%2F..%2Fx",
            "/v1/cache/acme/%",
            "/v1/cache/acme/%zz",
            "/v1/cache/acme%2Fk",
            "/v1/%63ache/acme/k",
            "/v1/cache/acme/k?ttl=%FF&tags=%C3%28&depends_on=%00",
            "/v1/status?%FF=%00",
            "/../v1/status",
        ],
        Target::Coordinator => &[
            "/v1/events/%C3%28",
            "/v1/%FF",
            "/v1/%00",
            "/v1/../v1/rules",
            "/v1/rules/..",
            "/v1/audit?tenant=%FF",
            "/v1/audit?tenant=%C3%28&limit=%00",
            "/v1/audit?limit=99999999999999999999999",
            "/v1/audit?limit=-1",
            "/v1/cluster/health?%C3%28",
            "/%2E%2E/v1/rules",
        ],
    };
    for path in paths {
        out.push(("named paths", Kind::Api, false, Raw::new("GET", *path)));
        out.push(("named paths", Kind::Api, false, Raw::new("DELETE", *path)));
    }
    // `Upgrade: websocket`, which actix-http takes to mean "the body runs to
    // the end of the connection", whatever the Content-Length says.
    for (method, path) in target.body_routes().iter().chain(target.other_routes()) {
        for upgrade in ["websocket", "WebSocket "] {
            let raw = Raw::new(*method, *path).header("Upgrade", upgrade).header("Content-Type", "application/json");
            out.push(("Upgrade: websocket", Kind::Api, false, raw.body("{}")));
        }
        let raw = Raw::new(*method, *path).header("Upgrade", "websocket").header("Transfer-Encoding", "chunked");
        out.push(("Upgrade: websocket", Kind::Api, false, raw.framed("2\r\n{}\r\n0\r\n\r\n")));
    }
    // Methods no route takes, which clients may still make up.
    for method in ["FOO", "PROPFIND", "M-SEARCH", "get", "BREW", "X"] {
        out.push(("extension methods", Kind::Api, false, Raw::new(method, first_path)));
    }
    for (method, path) in target.body_routes() {
        for query in ["?wait=%FF", "?wait=all&timeout_ms=%C3%28", "?%00", "?ttl=%FF", "?tags=%C3%28"] {
            out.push(("named paths", Kind::Api, false, Raw::new(*method, format!("{path}{query}")).body("{}")));
        }
    }
    // Very long paths and queries: up to the parser's limit for a URI, and
    // over it (under actix-http's 128 KB limit for the head).
    for kb in [60, 100] {
        let a = "a".repeat(kb * 1024);
        out.push(("long path", Kind::Api, false, Raw::new("GET", format!("/v1/cache/acme/{a}"))));
        out.push(("long path", Kind::Api, false, Raw::new("PUT", format!("/v1/cache/{a}/k")).body("v")));
        let ff = "%FF".repeat(kb * 1024 / 3);
        out.push(("long path", Kind::Api, false, Raw::new("GET", format!("/v1/cache/acme/{ff}"))));
        out.push((
            "long path",
            Kind::Api,
            false,
            Raw::new("GET", format!("{first_path}?{}", "x=%C3%28&".repeat(kb * 1024 / 9))),
        ));
    }
    // Oversize headers.
    let big = || (0..64 * 1024).map(|i| b"abcdefghij"[i % 10]).collect::<Vec<u8>>();
    out.push(("oversize headers", Kind::Api, false, Raw::new(first_method, first_path).header("X-Big", big())));
    let non_utf8: Vec<u8> = (0..64 * 1024).map(|i| 0x80 + (i % 0x80) as u8).collect();
    out.push(("oversize headers", Kind::Api, false, Raw::new(first_method, first_path).header("X-Big", non_utf8)));
    let mut many = Raw::new(first_method, first_path);
    for i in 0..200 {
        many = many.header(format!("X-Header-{i}"), format!("value-{i}"));
    }
    out.push(("oversize headers", Kind::Protocol, false, many));
    let mut huge = Raw::new(first_method, first_path);
    for i in 0..3 {
        huge = huge.header(format!("X-Huge-{i}"), big());
    }
    out.push(("oversize headers", Kind::Protocol, false, huge));
    for (method, path) in target.body_routes() {
        let route = || Raw::new(*method, *path).header("Content-Type", "application/json");
        // JSON nested 100000 levels deep, closed and not.
        let depth = 100_000;
        out.push(("deep JSON", Kind::Api, false, route().body(cat(&[&b"[".repeat(depth), &b"]".repeat(depth)]))));
        out.push(("deep JSON", Kind::Api, false, route().body(b"[".repeat(depth))));
        let objects = cat(&[&br#"{"a":"#.repeat(depth), b"1", &b"}".repeat(depth)]);
        out.push(("deep JSON", Kind::Api, false, route().body(objects)));
        let in_event =
            cat(&[br#"{"tenant":"acme","entity":"x","id":"#, &b"[".repeat(depth), &b"]".repeat(depth), b"}"]);
        out.push(("deep JSON", Kind::Api, false, route().body(in_event)));
        let in_batch = cat(&[b"[", &br#"{"keys":"#.repeat(depth), b"1", &b"}".repeat(depth), b"]"]);
        out.push(("deep JSON", Kind::Api, false, route().body(in_batch)));
        // A 10 MB body, with a length and chunked.
        let ten_mb = vec![b'x'; 10 * 1024 * 1024];
        out.push(("10 MB body", Kind::Api, false, route().body(ten_mb.clone())));
        let chunked = cat(&[format!("{:x}\r\n", ten_mb.len()).as_bytes(), &ten_mb, b"\r\n0\r\n\r\n"]);
        out.push(("10 MB body", Kind::Api, false, route().header("Transfer-Encoding", "chunked").framed(chunked)));
        // Invalid UTF-8 inside JSON strings.
        for bad in [
            &b"\xff"[..],
            b"\xc3\x28",
            b"\xed\xa0\x80",
            b"\xc0\xaf",
            b"\xf4\x90\x80\x80",
            b"\\ud800",
            b"\\udc00\\ud800",
            b"\\u0000",
            b"\x00",
        ] {
            let event =
                cat(&[br#"{"tenant":"ac"#, bad, br#"me","entity":"sup"#, bad, br#"plier","keys":["k"#, bad, br#""]}"#]);
            out.push(("invalid UTF-8 in JSON", Kind::Api, false, route().body(event)));
        }
    }
    // A 10 MB body to a route that does not read one.
    let ten_mb = vec![b'y'; 10 * 1024 * 1024];
    out.push(("10 MB body", Kind::Api, false, Raw::new(first_method, first_path).body(ten_mb)));
    out
}

// ---------------------------------------------------------------------------
// Random cases.

fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[rng.usize(..items.len())]
}

/// Pieces of percent-encoded paths that have broken servers before.
const PIECES: &[&str] = &[
    "%C3%28",
    "%FF",
    "%00",
    "..",
    "%2E%2E",
    "%2e",
    "%2F",
    "/",
    "//",
    "%",
    "%%",
    "%zz",
    "%C3",
    "%E2%82",
    "%ED%A0%80",
    "%F4%90%80%80",
    "%C0%AF",
    "%EF%BF%BD",
    "%F0%9F%92%A9",
    "+",
    ";",
    "=",
    "@",
    ":",
    "~",
    "!",
    "$",
    "&",
    "'",
    "(",
    ")",
    "*",
    ",",
    "%20",
    "%09",
    "%0A",
    "%0D%0A",
    "%7F",
    "%3F",
    "%23",
    "%25",
    "acme",
    "k",
    "%5C",
    "\\",
];

/// A random, percent-encoded piece of a path or query: every byte in it is
/// one a request target may carry.
fn pct_text(rng: &mut Rng, pieces: Range<usize>) -> String {
    let mut out = String::new();
    for _ in 0..rng.usize(pieces) {
        match rng.u8(..4) {
            0 | 1 => out.push_str(&format!("%{:02X}", rng.u8(..))),
            2 => out.push(rng.alphanumeric()),
            _ => out.push_str(pick(rng, PIECES)),
        }
    }
    out
}

fn raw_bytes(rng: &mut Rng, len: Range<usize>) -> Vec<u8> {
    (0..rng.usize(len)).map(|_| rng.u8(..)).collect()
}

/// Characters of a token (a method or a header name).
const TCHARS: &[u8] = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// The token characters the `http` crate takes in a method (it refuses
/// `#$%&'`, which RFC 9110 allows).
const METHOD_CHARS: &[u8] = b"!*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

fn method_chars(rng: &mut Rng, len: Range<usize>) -> Vec<u8> {
    (0..rng.usize(len)).map(|_| pick(rng, METHOD_CHARS)).collect()
}

fn tchars(rng: &mut Rng, len: Range<usize>) -> Vec<u8> {
    (0..rng.usize(len)).map(|_| pick(rng, TCHARS)).collect()
}

/// Bytes a header value may carry: visible ASCII, spaces and tabs, and
/// obs-text (0x80-0xFF, which is not UTF-8 on its own).
fn field_value(rng: &mut Rng, len: Range<usize>) -> Vec<u8> {
    (0..rng.usize(len))
        .map(|_| match rng.u8(..8) {
            0..=3 => rng.u8(0x21..=0x7e),
            4 | 5 => rng.u8(0x80..),
            6 => b' ',
            _ => b'\t',
        })
        .collect()
}

/// A random query string (without the `?`), percent-encoded.
fn query(rng: &mut Rng) -> String {
    const NAMES: &[&str] =
        &["ttl", "tags", "depends_on", "fill_token", "wait", "timeout_ms", "tenant", "limit", "dry_run", "confirm"];
    const VALUES: &[&str] = &[
        "",
        "0",
        "1",
        "-1",
        "1.5",
        "1e3",
        "99999999999999999999999",
        "18446744073709551616",
        "all",
        "%FF",
        "%C3%28",
        "%00",
        "a,,b",
        ",",
        "a+b",
        "true",
        "null",
        "[]",
        "%E2%80%AE",
        "abc.1.2",
        "zz.x.1",
    ];
    let pairs = rng.usize(1..6);
    let mut out = Vec::new();
    for _ in 0..pairs {
        let name = if rng.bool() { pick(rng, NAMES).to_string() } else { pct_text(rng, 0..6) };
        let value = match rng.u8(..3) {
            0 => pick(rng, VALUES).to_string(),
            1 => pct_text(rng, 0..24),
            _ => "9".repeat(rng.usize(1..40)),
        };
        out.push(match rng.u8(..6) {
            0 => name,
            1 => format!("{name}=={value}"),
            _ => format!("{name}={value}"),
        });
    }
    out.join(if rng.u8(..5) == 0 { "&&" } else { "&" })
}

/// A body route or another route, with a random body of up to `max` bytes.
fn route_with_body(rng: &mut Rng, target: Target, body: Vec<u8>) -> Raw {
    let (method, path) =
        if rng.u8(..4) == 0 { pick(rng, target.other_routes()) } else { pick(rng, target.body_routes()) };
    let mut raw = Raw::new(method, path);
    const TYPES: &[&[u8]] = &[
        b"application/json",
        b"application/json; charset=utf-8",
        b"application/json; charset=\xff",
        b"text/plain",
        b"application/octet-stream",
        b"",
        b"*/*",
        b"application/x-www-form-urlencoded",
        b"multipart/form-data; boundary=",
        b"text/plain; charset=utf-16",
    ];
    match rng.u8(..4) {
        0 => {}
        1 => raw = raw.header("Content-Type", field_value(rng, 0..40)),
        _ => raw = raw.header("Content-Type", pick(rng, TYPES)),
    }
    raw.body(body)
}

/// A valid event (or batch, or invalidation) with random bytes changed.
fn broken_json(rng: &mut Rng) -> Vec<u8> {
    const BASES: &[&str] = &[
        r#"{"tenant":"acme","entity":"supplier","id":"7","keys":["k1"],"tags":["t"],"patterns":["p*"]}"#,
        r#"[{"tenant":"acme","entity":"a"},{"tenant":"acme","entity":"b","id":7}]"#,
        r#"{"tenant":"acme","keys":["k"],"tags":["x"],"dry_run":true}"#,
        r#"{"tenant":"acme","entity":"x","id":1.5e308,"keys":[],"tags":null}"#,
    ];
    const INSERTS: &[&[u8]] = &[
        b"\xff",
        b"\xc3\x28",
        b"\xed\xa0\x80",
        b"\xc0\xaf",
        b"\\ud800",
        b"\\u0000",
        b"\\uZZZZ",
        b"\x00",
        b"\"",
        b"\\",
        b"{",
        b"[",
        b"]",
        b"}",
        b",",
        b":",
        b"1e99999",
        b"-",
        b"NaN",
        b"\xef\xbb\xbf",
    ];
    let mut doc = pick(rng, BASES).as_bytes().to_vec();
    for _ in 0..rng.usize(1..6) {
        let at = rng.usize(..=doc.len());
        match rng.u8(..5) {
            0 if !doc.is_empty() => {
                let i = rng.usize(..doc.len());
                doc[i] = rng.u8(..);
            }
            1 => {
                let bytes = raw_bytes(rng, 1..8);
                doc.splice(at..at, bytes);
            }
            2 => {
                let end = (at + rng.usize(1..8)).min(doc.len());
                doc.drain(at..end);
            }
            3 => {
                let insert = pick(rng, INSERTS).to_vec();
                doc.splice(at..at, insert);
            }
            _ => doc.truncate(at),
        }
    }
    doc
}

/// A chunked body with garbage in its framing.
fn garbage_chunks(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.usize(1..6) {
        let data = raw_bytes(rng, 0..64);
        match rng.u8(..7) {
            0 => out.extend(cat(&[format!("{:x}\r\n", data.len()).as_bytes(), &data, b"\r\n"])),
            1 => out.extend(cat(&[format!("{:x}\r\n", data.len() + rng.usize(1..100)).as_bytes(), &data, b"\r\n"])),
            2 => out.extend_from_slice(pick(rng, &[&b"zz\r\n"[..], b"-1\r\n", b"0x10\r\n", b" 5\r\n", b"5 5\r\n"])),
            3 => out.extend_from_slice(b"FFFFFFFFFFFFFFFFFFFF\r\n"),
            4 => out.extend(cat(&[b"5;", &raw_bytes(rng, 8..9), b"\r\nhello\r\n"])),
            5 => out.extend_from_slice(b"5\r\nhelloXX"),
            _ => out.extend(data),
        }
    }
    match rng.u8(..4) {
        0 | 1 => out.extend_from_slice(b"0\r\n\r\n"),
        2 => out.extend(cat(&[b"0\r\n", &raw_bytes(rng, 16..17), b"\r\n\r\n"])),
        _ => {}
    }
    out
}

/// A well-framed chunked body of random bytes.
fn chunked(rng: &mut Rng, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = content;
    while !rest.is_empty() {
        let n = rng.usize(1..=rest.len().min(4096));
        out.extend(cat(&[format!("{n:x}\r\n").as_bytes(), &rest[..n], b"\r\n"]));
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Headers of the protocol and of the API, with values that are wrong for them.
fn known_headers(rng: &mut Rng, mut raw: Raw) -> Raw {
    const NAMES: &[&str] = &[
        "Content-Type",
        "Content-Encoding",
        "Accept",
        "Accept-Encoding",
        "Accept-Language",
        "Cookie",
        "Origin",
        "Referer",
        "User-Agent",
        "Range",
        "If-None-Match",
        "If-Modified-Since",
        "Cache-Control",
        "X-Forwarded-For",
        "Forwarded",
        "X-Request-Id",
        "Traceparent",
        "Expect",
        "TE",
        "Upgrade",
        "Trailer",
        "X-Cache-Fill-Token",
    ];
    const VALUES: &[&[u8]] = &[
        b"gzip",
        b"br",
        b"deflate",
        b"zstd",
        b"gzip, gzip, br",
        b"identity",
        b"*",
        b"100-continue",
        b"bytes=0-",
        b"bytes=-1,-2,0-99999999999999999999",
        b"h2c",
        b"websocket",
        b"trailers",
        b"application/json; charset=\xff",
        b"\xc3\x28",
        b"",
        b"1.2.3.4, unknown, \xff",
        b"00-zzzz-zzzz-01",
    ];
    for _ in 0..rng.usize(1..6) {
        let name = pick(rng, NAMES).to_string();
        let value = if rng.bool() { pick(rng, VALUES).to_vec() } else { field_value(rng, 0..200) };
        raw = raw.header(name, value);
    }
    raw
}

/// One random malformed request.
fn random(rng: &mut Rng, target: Target) -> Draft {
    const METHODS: &[&str] = &["GET", "PUT", "POST", "DELETE", "HEAD", "OPTIONS", "PATCH"];
    let method = pick(rng, METHODS);
    let prefix = pick(rng, target.prefixes());
    match rng.u8(..17) {
        0 | 1 => {
            let mut path = format!("{prefix}{}", pct_text(rng, 1..24));
            if rng.u8(..3) == 0 {
                path = format!("{path}?{}", query(rng));
            }
            ("percent-encoded path", Kind::Api, false, Raw::new(method, path).body(raw_bytes(rng, 0..64)))
        }
        2 => {
            let path = cat(&[prefix.as_bytes(), &raw_bytes(rng, 1..48)]);
            ("raw bytes in the path", Kind::Protocol, true, Raw::new(method, path))
        }
        3 => {
            let len = rng.usize(10 * 1024..=100 * 1024);
            let mut path = prefix.to_string();
            let unit = match rng.u8(..3) {
                0 => "a".to_string(),
                1 => "../".to_string(),
                _ => pct_text(rng, 8..9),
            };
            while path.len() + unit.len() <= len {
                path.push_str(&unit);
            }
            ("long path", Kind::Api, false, Raw::new(method, path))
        }
        4 | 5 => {
            let (method, path) = pick(rng, target.body_routes());
            let path = format!("{path}?{}", query(rng));
            ("random query", Kind::Api, false, Raw::new(method, path).body("{}"))
        }
        6 => {
            let path = cat(&[prefix.as_bytes(), b"?", &raw_bytes(rng, 1..48)]);
            ("raw bytes in the query", Kind::Protocol, true, Raw::new(method, path))
        }
        7 => {
            let mut raw = Raw::new(method, prefix);
            for _ in 0..rng.usize(1..24) {
                let name = cat(&[b"X-", &tchars(rng, 1..30)]);
                raw = raw.header(name, field_value(rng, 0..300));
            }
            ("random headers", Kind::Api, false, raw)
        }
        8 => {
            let body = raw_bytes(rng, 0..2048);
            let raw = route_with_body(rng, target, body);
            ("known headers, bad values", Kind::Api, false, known_headers(rng, raw))
        }
        9 => {
            let mut raw = Raw::new(method, prefix);
            let name = if rng.bool() { cat(&[b"X-", &raw_bytes(rng, 1..16)]) } else { tchars(rng, 1..16) };
            let value = if rng.bool() {
                raw_bytes(rng, 0..64)
            } else {
                cat(&[b"v", pick(rng, &[&b"\0"[..], b"\x01", b"\x7f", b"\r", b"\n", b"\r\n", b"\r\n\r\n"]), b"v"])
            };
            raw = raw.header(name, value);
            ("raw bytes in headers", Kind::Protocol, true, raw)
        }
        10 => {
            let body = raw_bytes(rng, 0..16 * 1024);
            let raw = route_with_body(rng, target, body);
            ("random body", Kind::Api, false, raw)
        }
        11 => {
            let (method, path) = pick(rng, target.body_routes());
            let raw = Raw::new(method, path).header("Content-Type", "application/json").body(broken_json(rng));
            ("broken JSON", Kind::Api, false, raw)
        }
        12 => {
            let (method, path) = pick(rng, target.body_routes());
            let body = if rng.bool() { raw_bytes(rng, 0..2048) } else { broken_json(rng) };
            let declared = body.len() + rng.usize(1..100_000);
            let raw = Raw::new(method, path)
                .header("Content-Type", "application/json")
                .header("Content-Length", declared.to_string())
                .framed(body);
            ("body cut short", Kind::Protocol, true, raw)
        }
        13 => {
            let (method, path) = pick(rng, target.body_routes());
            let raw = Raw::new(method, path).header("Transfer-Encoding", "chunked").framed(garbage_chunks(rng));
            ("garbage chunks", Kind::Protocol, true, raw)
        }
        14 => {
            let (method, path) = pick(rng, target.body_routes());
            let content = if rng.bool() { raw_bytes(rng, 1..8192) } else { broken_json(rng) };
            let body = chunked(rng, &content);
            let raw = Raw::new(method, path).header("Content-Type", "application/json");
            ("chunked body", Kind::Api, false, raw.header("Transfer-Encoding", "chunked").framed(body))
        }
        15 => {
            let (method, path) = pick(rng, target.body_routes());
            let raw = Raw::new(method, path);
            let raw = match rng.u8(..4) {
                0 => {
                    let length: &[u8] = pick(
                        rng,
                        &[
                            &b"abc"[..],
                            b"-1",
                            b"1, 2",
                            b"+5",
                            b"5 5",
                            b"18446744073709551616",
                            b"0x10",
                            b"",
                            b"1e3",
                            b"\xff",
                        ],
                    );
                    raw.header("Content-Length", length).framed("hello")
                }
                1 => raw.header("Content-Length", "5").header("Content-Length", "6").framed("hello!"),
                2 => raw
                    .header("Content-Length", "3")
                    .header("Transfer-Encoding", "chunked")
                    .framed("5\r\nhello\r\n0\r\n\r\n"),
                _ => {
                    let coding: &[u8] = pick(
                        rng,
                        &[
                            &b"gzip, chunked"[..],
                            b"chunked, gzip",
                            b"xchunked",
                            b"identity",
                            b"chunked, chunked",
                            b"CHUNKED",
                            b"chunked\xff",
                        ],
                    );
                    raw.header("Transfer-Encoding", coding).framed("5\r\nhello\r\n0\r\n\r\n")
                }
            };
            ("bad framing", Kind::Protocol, true, raw)
        }
        _ => {
            // The request line: a method of the token characters the `http`
            // crate takes reaches the API; anything else is for the parser.
            let (kind, method, path): (Kind, Vec<u8>, Vec<u8>) = match rng.u8(..5) {
                0 | 1 => (Kind::Api, method_chars(rng, 1..16), prefix.as_bytes().to_vec()),
                2 => (Kind::Protocol, tchars(rng, 1..16), prefix.as_bytes().to_vec()),
                3 => (Kind::Protocol, raw_bytes(rng, 1..12), prefix.as_bytes().to_vec()),
                _ => {
                    let target: &[u8] = pick(
                        rng,
                        &[
                            &b"*"[..],
                            b"http://example.com/v1/status",
                            b"example.com:80",
                            b"",
                            b"?",
                            b"#",
                            b"/v1/status#frag",
                            b"\\v1\\status",
                            b"http://[::1/",
                            b"/v1/status HTTP/1.0",
                            b" /v1/status",
                        ],
                    );
                    (Kind::Protocol, method.as_bytes().to_vec(), target.to_vec())
                }
            };
            ("request line", kind, kind == Kind::Protocol, Raw::new(method, path))
        }
    }
}
