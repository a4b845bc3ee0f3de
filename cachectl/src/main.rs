//! `cachectl`: the operator's command line for the coordinator and the node
//! agents, over their HTTP APIs (see the README's API section).
//!
//! - Flags, or `DCC_COORDINATOR_URL`, `DCC_AGENT_URL` and `DCC_TOKEN`, say
//!   where to go and as whom.
//! - `-o json` prints the server's JSON; `-o table` a table. The default is a
//!   table on a terminal and JSON otherwise, so scripts get JSON.
//! - `watch` follows the coordinator's invalidation stream (server-sent
//!   events) until Ctrl-C, resuming after the last event when it breaks.
//! - Exit status: 0 done, 1 the server refused or failed (its error code and
//!   message on stderr), 2 a usage error, 3 not authorized (401, 403), 4 a
//!   `--wait` that timed out (504), 5 not found (`get` of a key that is not
//!   cached).

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::Table;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Value};

/// Command-line flags.
#[derive(Debug, Parser)]
#[command(name = "cachectl", version, about = "Operate the distributed cache: health, keys, invalidations")]
struct Cli {
    /// The coordinator's base URL.
    #[arg(long, env = "DCC_COORDINATOR_URL", default_value = "http://127.0.0.1:7700", global = true)]
    coordinator: String,
    /// A node agent's base URL (for get, put, del).
    #[arg(long, env = "DCC_AGENT_URL", default_value = "http://127.0.0.1:7701", global = true)]
    agent: String,
    /// The bearer token's secret.
    #[arg(long, env = "DCC_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Output: a table, or the server's JSON (default: a table on a terminal).
    #[arg(short = 'o', long, value_enum, global = true)]
    output: Option<Output>,
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// How answers are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Columns for people.
    Table,
    /// The server's JSON, for scripts.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
enum Command {
    /// The cluster's health: status, log position, Redis, nodes.
    Health,
    /// Every node the coordinator sees, with its state and lag.
    Nodes,
    /// The loaded rules and the entity graph.
    Rules,
    /// Per-tenant figures from every live agent, the most read keys, and recommendations.
    Stats {
        /// Only this tenant.
        tenant: Option<String>,
    },
    /// The audit trail, newest first (admin).
    Audit {
        /// Only entries that name this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// How many entries.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Reads a key through the agent (the value goes to stdout).
    Get { tenant: String, key: String },
    /// Stores a value (from --file, or stdin) through the agent.
    Put {
        tenant: String,
        key: String,
        /// Time to live in seconds.
        #[arg(long)]
        ttl: Option<u64>,
        /// Tags, comma separated.
        #[arg(long)]
        tags: Option<String>,
        /// Keys of the same tenant it depends on, comma separated.
        #[arg(long)]
        depends_on: Option<String>,
        /// Read the value from this file instead of stdin.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
    },
    /// Invalidates a key everywhere, through the agent.
    Del { tenant: String, key: String },
    /// Invalidates keys, tags and patterns of a tenant.
    Invalidate {
        tenant: String,
        /// A key (repeatable).
        #[arg(long = "key")]
        keys: Vec<String>,
        /// A tag (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// A glob over the tenant's keys (repeatable).
        #[arg(long = "pattern")]
        patterns: Vec<String>,
        /// Do not follow depends_on to dependent entries.
        #[arg(long)]
        no_cascade: bool,
        /// Show what would go, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Needed for a pattern that covers the whole tenant.
        #[arg(long)]
        confirm: bool,
        /// Answer once every live agent has applied it.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, requires = "wait")]
        timeout_ms: Option<u64>,
    },
    /// Sends a write event ("ENTITY ID changed in TENANT"); the rules turn it into invalidations.
    Event {
        tenant: String,
        entity: String,
        id: Option<String>,
        /// Makes retries of the same event idempotent.
        #[arg(long)]
        event_id: Option<String>,
        /// Answer once every live agent has applied it.
        #[arg(long)]
        wait: bool,
    },
    /// Lists a tenant's keys in L2, with size, TTL and tags.
    Keys {
        tenant: String,
        /// A glob over the keys (default: all).
        pattern: Option<String>,
        /// At most this many keys.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Follows the invalidations as they are logged, one line each, until Ctrl-C.
    Watch {
        /// Only this tenant's invalidations.
        #[arg(long)]
        tenant: Option<String>,
    },
}

/// Why a command did not succeed, and its exit status.
#[derive(Debug)]
enum Failure {
    /// The server answered with an error.
    Server { status: u16, code: String, message: String },
    /// The server could not be reached, or answered something unreadable.
    Transport(String),
    /// The command line or its input is wrong.
    Usage(String),
}

impl Failure {
    /// The exit status of the contract.
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Server { status: 401 | 403, .. } => 3,
            Failure::Server { status: 504, .. } => 4,
            Failure::Server { status: 404, code, .. } if code == "not_found" => 5,
            Failure::Server { .. } | Failure::Transport(_) => 1,
            Failure::Usage(_) => 2,
        }
    }
}

/// The server's error answer (`{"error", "message"}`) as a failure; a body
/// that is not one keeps its text as the message.
fn refusal(status: u16, body: &[u8]) -> Failure {
    let error: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let text = |f: &str| error[f].as_str().map(str::to_string);
    Failure::Server {
        status,
        code: text("error").unwrap_or_else(|| format!("http_{status}")),
        message: text("message").unwrap_or_else(|| String::from_utf8_lossy(body).into_owned()),
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Server { status, code, message } => write!(f, "{code} ({status}): {message}"),
            Failure::Transport(m) => write!(f, "{m}"),
            Failure::Usage(m) => write!(f, "{m}"),
        }
    }
}

/// Path segments: everything but unreserved characters is escaped.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

fn segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// The HTTP side: base URLs, the token, one client.
struct Api {
    http: reqwest::Client,
    coordinator: String,
    agent: String,
    token: Option<String>,
}

/// A successful answer: status, headers, body.
struct Answer {
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Result<Value, Failure> {
        serde_json::from_slice(&self.body).map_err(|e| Failure::Transport(format!("the answer is not JSON: {e}")))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Api {
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer, Failure> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let resp = request.send().await.map_err(|e| Failure::Transport(format!("cannot reach the service: {e}")))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(|e| Failure::Transport(format!("reading the answer: {e}")))?.to_vec();
        if status >= 400 {
            return Err(refusal(status, &body));
        }
        Ok(Answer { headers, body })
    }

    fn coordinator(&self, path: &str) -> String {
        format!("{}{path}", self.coordinator.trim_end_matches('/'))
    }

    fn agent(&self, path: &str) -> String {
        format!("{}{path}", self.agent.trim_end_matches('/'))
    }

    async fn get_json(&self, url: String) -> Result<Value, Failure> {
        self.send(self.http.get(url)).await?.json()
    }

    async fn post_json(&self, url: String, body: &Value) -> Result<Value, Failure> {
        self.send(self.http.post(url).json(body)).await?.json()
    }
}

/// How long `watch` waits before reconnecting to a stream that ended.
const RECONNECT: std::time::Duration = std::time::Duration::from_secs(2);

/// `watch`: reads `GET /v1/invalidations/stream` (server-sent events) and
/// prints each invalidation as it comes: a line of columns, or its JSON on
/// one line. A stream that breaks is resumed where it stopped
/// (`Last-Event-ID`); a refusal (401, 403, 400) or a coordinator that cannot
/// be reached at first ends it with the contract's exit status. Ctrl-C ends it (0).
async fn watch(
    api: &Api,
    tenant: Option<String>,
    output: Output,
    print: &mut impl FnMut(String),
) -> Result<(), Failure> {
    let url = match &tenant {
        Some(t) => api.coordinator(&format!("/v1/invalidations/stream?tenant={}", segment(t))),
        None => api.coordinator("/v1/invalidations/stream"),
    };
    if output == Output::Table {
        print(format!("{:<12} {:>8} {:<16} {:<40} {}", "TIME", "SEQ", "TENANT", "INVALIDATED", "ORIGIN"));
    }
    let mut last_id: Option<String> = None;
    let mut connected_once = false;
    loop {
        let mut request = api.http.get(&url).header("Accept", "text/event-stream");
        if let Some(id) = &last_id {
            request = request.header("Last-Event-ID", id.as_str());
        }
        if let Some(token) = &api.token {
            request = request.bearer_auth(token);
        }
        let resp = match request.send().await {
            Ok(resp) => resp,
            Err(e) if !connected_once => return Err(Failure::Transport(format!("cannot reach the service: {e}"))),
            Err(_) => {
                tokio::time::sleep(RECONNECT).await;
                continue;
            }
        };
        let status = resp.status().as_u16();
        if status >= 400 {
            let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            return Err(refusal(status, &body));
        }
        connected_once = true;
        let mut resp = resp;
        let mut buffer = String::new();
        // Until the stream ends or breaks; then reconnect.
        while let Ok(Some(chunk)) = resp.chunk().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk).replace("\r\n", "\n"));
            while let Some(end) = buffer.find("\n\n") {
                let frame: String = buffer.drain(..end + 2).collect();
                let (id, data) = parse_frame(&frame);
                if let Some(id) = id {
                    last_id = Some(id);
                }
                if let Some(event) = data.and_then(|d| serde_json::from_str::<Value>(&d).ok()) {
                    match output {
                        Output::Json => print(serde_json::to_string(&event).unwrap_or_default()),
                        Output::Table => watch_lines(&event).into_iter().for_each(&mut *print),
                    }
                }
            }
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

/// The `id:` and the `data:` of an `invalidation` event (comments and other
/// events have no data here).
fn parse_frame(frame: &str) -> (Option<String>, Option<String>) {
    let (mut id, mut event, mut data) = (None, "message", Vec::new());
    for line in frame.lines() {
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.to_string()),
            "event" => event = value,
            "data" => data.push(value),
            _ => {}
        }
    }
    let data = (event == "invalidation" && !data.is_empty()).then(|| data.join("\n"));
    (id, data)
}

/// One line per tenant an invalidation names.
fn watch_lines(event: &Value) -> Vec<String> {
    let ts = event["ts_ms"].as_u64().unwrap_or(0);
    let time = format!("{:02}:{:02}:{:02}.{:03}", ts / 3_600_000 % 24, ts / 60_000 % 60, ts / 1000 % 60, ts % 1000);
    let seq = event["seq"].as_u64().unwrap_or(0);
    let origin = event["origin"].as_str().unwrap_or("");
    let empty = Vec::new();
    event["invalidations"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|selector| {
            let mut what = Vec::new();
            for (field, word) in [("keys", "key"), ("tags", "tag"), ("patterns", "pattern")] {
                for item in selector[field].as_array().unwrap_or(&empty) {
                    what.push(format!("{word} {}", cell(item)));
                }
            }
            format!("{time:<12} {seq:>8} {:<16} {:<40} {origin}", cell(&selector["tenant"]), what.join(", "))
        })
        .collect()
}

/// A table with a header row.
fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    t.set_header(header.to_vec());
    for row in rows {
        t.add_row(row);
    }
    t.to_string()
}

/// A JSON value as a cell: strings bare, lists joined, null as "-".
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn nodes_table(health: &Value) -> String {
    let nodes = health["nodes"].as_array().cloned().unwrap_or_default();
    table(
        &["node", "status", "applied seq", "lag", "last seen ms", "L1 entries", "L1 bytes", "hit ratio", "addr"],
        nodes.iter().map(|n| {
            ["node_id", "status", "applied_seq", "lag", "last_seen_ms", "l1_entries", "l1_bytes", "hit_ratio", "addr"]
                .iter()
                .map(|f| cell(&n[*f]))
                .collect()
        }),
    )
}

/// The `[[sources]]` as the answering coordinator sees them; nothing without any.
fn sources_table(health: &Value) -> String {
    let sources = health["sources"].as_array().cloned().unwrap_or_default();
    if sources.is_empty() {
        return String::new();
    }
    let fields = ["kind", "slot", "connected", "active", "confirmed_lsn", "lag_bytes", "lag_ms", "error"];
    let rows = sources.iter().map(|s| fields.iter().map(|f| cell(&s[*f])).collect());
    format!("\n\nsources\n{}", table(&fields, rows))
}

/// `stats`: a row per tenant, its most read keys, then the recommendations.
fn stats_table(stats: &Value) -> String {
    let tenants = stats["tenants"].as_array().cloned().unwrap_or_default();
    let fields =
        ["tenant", "l1_hits", "l2_hits", "misses", "hit_ratio", "entries", "bytes", "invalidations", "fills_refused"];
    let mut out = table(
        &["tenant", "L1 hits", "L2 hits", "misses", "hit ratio", "entries", "bytes", "invalidations", "fills refused"],
        tenants.iter().map(|t| {
            fields
                .iter()
                .map(|f| match (f, t[*f].as_f64()) {
                    (&"hit_ratio", Some(r)) => format!("{:.1}%", 100.0 * r),
                    _ => cell(&t[*f]),
                })
                .collect()
        }),
    );
    let top: Vec<Vec<String>> = tenants
        .iter()
        .flat_map(|t| {
            let tenant = cell(&t["tenant"]);
            t["top_keys"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |k| vec![tenant.clone(), cell(&k["key"]), cell(&k["reads"]), cell(&k["error"])])
        })
        .collect();
    if !top.is_empty() {
        out.push_str("\n\nmost read keys\n");
        out.push_str(&table(&["tenant", "key", "reads", "error"], top));
    }
    let recommendations = stats["recommendations"].as_array().cloned().unwrap_or_default();
    if recommendations.is_empty() {
        out.push_str("\n\nno recommendations\n");
    } else {
        out.push_str("\n\nrecommendations\n");
        out.push_str(&table(
            &["tenant", "kind", "message"],
            recommendations.iter().map(|r| vec![cell(&r["tenant"]), cell(&r["kind"]), cell(&r["message"])]),
        ));
    }
    out
}

fn invalidation_table(answer: &Value) -> String {
    let mut out = String::new();
    if answer["dry_run"] == true {
        out.push_str(&format!("dry run: {} keys would go\n", cell(&answer["count"])));
        for key in answer["would_delete"].as_array().cloned().unwrap_or_default() {
            out.push_str(&format!("  {}\n", cell(&key)));
        }
        return out;
    }
    let positions = answer["positions"].as_array().cloned().unwrap_or_default();
    out.push_str(&table(
        &["partition", "epoch", "seq"],
        positions.iter().map(|p| vec![cell(&p["partition"]), cell(&p["epoch"]), cell(&p["seq"])]),
    ));
    out.push_str(&format!(
        "\nL2 deleted: {}; nodes live {}, acknowledged {}{}\n",
        cell(&answer["l2_deleted"]),
        cell(&answer["nodes"]["live"]),
        cell(&answer["nodes"]["acked"]),
        if answer["duplicate"] == true { " (a duplicate of an earlier event)" } else { "" }
    ));
    out
}

/// Runs a command; what it prints goes to stdout.
async fn run(cli: Cli, output: Output) -> Result<(), Failure> {
    let api = Api { http: reqwest::Client::new(), coordinator: cli.coordinator, agent: cli.agent, token: cli.token };
    let mut stdout = std::io::stdout().lock();
    let mut print = |text: String| {
        let _ = writeln!(stdout, "{}", text.trim_end());
    };
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    match cli.command {
        Command::Health => {
            let h = api.get_json(api.coordinator("/v1/cluster/health")).await?;
            print(match output {
                Output::Json => pretty(&h),
                Output::Table => format!(
                    "status {}  seq {}  epoch {}\nredis {}\n{}{}",
                    cell(&h["status"]),
                    cell(&h["seq"]),
                    cell(&h["epoch"]),
                    cell(&h["redis"]["version"]),
                    nodes_table(&h),
                    sources_table(&h)
                ),
            });
        }
        Command::Nodes => {
            let h = api.get_json(api.coordinator("/v1/cluster/health")).await?;
            print(match output {
                Output::Json => pretty(&h["nodes"]),
                Output::Table => nodes_table(&h),
            });
        }
        Command::Rules => {
            let r = api.get_json(api.coordinator("/v1/rules")).await?;
            print(match output {
                Output::Json => pretty(&r),
                Output::Table => table(
                    &["entity", "tags", "patterns", "dependents"],
                    r["rules"].as_array().cloned().unwrap_or_default().iter().map(|rule| {
                        ["entity", "tags", "patterns", "dependents"].iter().map(|f| cell(&rule[*f])).collect()
                    }),
                ),
            });
        }
        Command::Stats { tenant } => {
            let path = match tenant {
                Some(t) => format!("/v1/stats?tenant={}", segment(&t)),
                None => "/v1/stats".to_string(),
            };
            let stats = api.get_json(api.coordinator(&path)).await?;
            print(match output {
                Output::Json => pretty(&stats),
                Output::Table => stats_table(&stats),
            });
        }
        Command::Audit { tenant, limit } => {
            let mut path = format!("/v1/audit?limit={limit}");
            if let Some(t) = tenant {
                path.push_str(&format!("&tenant={}", segment(&t)));
            }
            let a = api.get_json(api.coordinator(&path)).await?;
            print(match output {
                Output::Json => pretty(&a),
                Output::Table => table(
                    &["ts_ms", "token", "action", "tenants", "keys", "tags", "patterns", "seq", "status", "node"],
                    a["entries"].as_array().cloned().unwrap_or_default().iter().map(|e| {
                        ["ts_ms", "token", "action", "tenants", "keys", "tags", "patterns", "seq", "status", "node"]
                            .iter()
                            .map(|f| cell(&e[*f]))
                            .collect()
                    }),
                ),
            });
        }
        Command::Get { tenant, key } => {
            let answer =
                api.send(api.http.get(api.agent(&format!("/v1/cache/{}/{}", segment(&tenant), segment(&key))))).await?;
            match output {
                Output::Table => {
                    let _ = std::io::stdout().write_all(&answer.body);
                }
                Output::Json => {
                    let value = match std::str::from_utf8(&answer.body) {
                        Ok(text) => json!(text),
                        Err(_) => json!(answer.body),
                    };
                    let ttl = answer.header("x-cache-ttl").and_then(|t| t.parse::<u64>().ok());
                    let tags: Vec<&str> = answer
                        .header("x-cache-tags")
                        .unwrap_or_default()
                        .split(',')
                        .filter(|t| !t.is_empty())
                        .collect();
                    print(pretty(&json!({
                        "tenant": tenant,
                        "key": key,
                        "value": value,
                        "content_type": answer.header("content-type"),
                        "layer": answer.header("x-cache"),
                        "ttl_secs": ttl,
                        "tags": tags,
                    })));
                }
            }
        }
        Command::Put { tenant, key, ttl, tags, depends_on, file } => {
            let value = match file {
                Some(path) => {
                    std::fs::read(&path).map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?
                }
                None => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .map_err(|e| Failure::Usage(format!("reading stdin: {e}")))?;
                    buf
                }
            };
            let mut query = Vec::new();
            if let Some(ttl) = ttl {
                query.push(format!("ttl={ttl}"));
            }
            if let Some(tags) = tags {
                query.push(format!("tags={}", segment(&tags).replace("%2C", ",")));
            }
            if let Some(deps) = depends_on {
                query.push(format!("depends_on={}", segment(&deps).replace("%2C", ",")));
            }
            let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
            let url = api.agent(&format!("/v1/cache/{}/{}{query}", segment(&tenant), segment(&key)));
            api.send(api.http.put(url).body(value)).await?;
            print(match output {
                Output::Json => pretty(&json!({"stored": true, "tenant": tenant, "key": key})),
                Output::Table => format!("stored {tenant}/{key}"),
            });
        }
        Command::Del { tenant, key } => {
            let url = api.agent(&format!("/v1/cache/{}/{}", segment(&tenant), segment(&key)));
            let answer = api.send(api.http.delete(url)).await?;
            let position = json!({
                "tenant": tenant,
                "key": key,
                "partition": answer.header("x-invalidation-partition").and_then(|v| v.parse::<u64>().ok()),
                "seq": answer.header("x-invalidation-seq").and_then(|v| v.parse::<u64>().ok()),
                "epoch": answer.header("x-invalidation-epoch"),
            });
            print(match output {
                Output::Json => pretty(&position),
                Output::Table => format!(
                    "invalidated {tenant}/{key}: partition {} seq {}",
                    cell(&position["partition"]),
                    cell(&position["seq"])
                ),
            });
        }
        Command::Invalidate { tenant, keys, tags, patterns, no_cascade, dry_run, confirm, wait, timeout_ms } => {
            let body = json!({
                "tenant": tenant, "keys": keys, "tags": tags, "patterns": patterns,
                "cascade": !no_cascade, "dry_run": dry_run, "confirm": confirm,
            });
            let mut path = "/v1/invalidate".to_string();
            if wait {
                path.push_str("?wait=all");
                if let Some(ms) = timeout_ms {
                    path.push_str(&format!("&timeout_ms={ms}"));
                }
            }
            let answer = api.post_json(api.coordinator(&path), &body).await?;
            print(match output {
                Output::Json => pretty(&answer),
                Output::Table => invalidation_table(&answer),
            });
        }
        Command::Event { tenant, entity, id, event_id, wait } => {
            let mut body = json!({"tenant": tenant, "entity": entity});
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            if let Some(e) = event_id {
                body["event_id"] = json!(e);
            }
            let path = if wait { "/v1/events?wait=all" } else { "/v1/events" };
            let answer = api.post_json(api.coordinator(path), &body).await?;
            print(match output {
                Output::Json => pretty(&answer),
                Output::Table => invalidation_table(&answer),
            });
        }
        Command::Watch { tenant } => {
            tokio::select! {
                result = watch(&api, tenant, output, &mut print) => result?,
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Command::Keys { tenant, pattern, limit } => {
            if limit == 0 {
                return Err(Failure::Usage("--limit must be at least 1".into()));
            }
            let mut keys: Vec<Value> = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let mut path = format!("/v1/keys/{}?limit={}", segment(&tenant), (limit - keys.len()).min(1000));
                if let Some(p) = &pattern {
                    path.push_str(&format!("&pattern={}", segment(p)));
                }
                if let Some(c) = &cursor {
                    path.push_str(&format!("&cursor={}", segment(c)));
                }
                let page = api.get_json(api.coordinator(&path)).await?;
                keys.extend(page["keys"].as_array().cloned().unwrap_or_default());
                cursor = page["cursor"].as_str().map(str::to_string);
                if cursor.is_none() || keys.len() >= limit {
                    break;
                }
            }
            keys.truncate(limit);
            print(match output {
                Output::Json => pretty(&json!({"tenant": tenant, "keys": keys})),
                Output::Table => table(
                    &["key", "bytes", "ttl_secs", "tags"],
                    keys.iter().map(|k| ["key", "bytes", "ttl_secs", "tags"].iter().map(|f| cell(&k[*f])).collect()),
                ),
            });
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let output = cli.output.unwrap_or(if std::io::stdout().is_terminal() { Output::Table } else { Output::Json });
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cachectl: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli, output)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("cachectl: {failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}
