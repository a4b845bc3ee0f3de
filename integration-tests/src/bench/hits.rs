//! L1 hits vs direct Redis GETs: through an agent's HTTP API (hyper, one
//! connection per task) and through the agent embedded as a library, against
//! redis-rs GETs (one connection per task) of a value of the same size.

use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use node_agent::agent::{Agent, Layer, Put, Read};
use redis::AsyncCommands;
use shared::store::Store;
use tokio_util::sync::CancellationToken;

use super::{http_connection, median, per_second, ratios, spread, Options, Row};

const TENANT: &str = "bench";
const KEY: &str = "hit:100b";
const REDIS_KEY: &str = "bench:direct:100b";
/// Concurrent tasks of the throughput runs, each with its own connection.
pub const TASKS: usize = 50;

/// The value every run reads: 100 bytes.
fn value() -> Bytes {
    Bytes::from(vec![b'v'; 100])
}

/// One GET that must be an L1 hit of the 100-byte value.
async fn http_get(sender: &mut SendRequest<Empty<Bytes>>, addr: &str, path: &str) -> anyhow::Result<()> {
    http_get_as(sender, addr, path, None).await
}

/// [`http_get`], with an `Authorization` header when given.
async fn http_get_as(
    sender: &mut SendRequest<Empty<Bytes>>,
    addr: &str,
    path: &str,
    authorization: Option<&hyper::header::HeaderValue>,
) -> anyhow::Result<()> {
    sender.ready().await?;
    let mut request = hyper::Request::get(path).header(hyper::header::HOST, addr);
    if let Some(value) = authorization {
        request = request.header(hyper::header::AUTHORIZATION, value.clone());
    }
    let request = request.body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let layer = response.headers().get("x-cache").cloned();
    let body = response.into_body().collect().await?.to_bytes();
    if status != 200 || layer.as_ref().is_none_or(|l| l != "L1") || body.len() != 100 {
        bail!("expected an L1 hit of 100 bytes, got {status} from {layer:?} with {} bytes", body.len());
    }
    Ok(())
}

/// Requests per second of `TASKS` connections, each looping for `run`.
pub async fn agent_throughput(addr: &str, run: Duration) -> anyhow::Result<f64> {
    agent_throughput_as(addr, run, None).await
}

/// [`agent_throughput`], each request with the token `secret` when given.
async fn agent_throughput_as(addr: &str, run: Duration, secret: Option<&str>) -> anyhow::Result<f64> {
    let path = format!("/v1/cache/{TENANT}/{KEY}");
    let mut senders = Vec::new();
    for _ in 0..TASKS {
        senders.push(http_connection(addr).await?);
    }
    let started = Instant::now();
    let deadline = started + run;
    let mut tasks = Vec::new();
    for mut sender in senders {
        let (addr, path) = (addr.to_string(), path.clone());
        // Made once: the client's cost should not count against the agent's.
        let authorization = secret.map(|s| hyper::header::HeaderValue::try_from(format!("Bearer {s}"))).transpose()?;
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                http_get_as(&mut sender, &addr, &path, authorization.as_ref()).await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    per_second(tasks, started).await
}

/// GETs per second of `TASKS` redis-rs connections, each looping for `run`
/// (on a cluster, the tasks share redis-rs's cluster connection).
async fn redis_throughput(store: &Store, run: Duration) -> anyhow::Result<f64> {
    let mut connections = Vec::new();
    for _ in 0..TASKS {
        connections.push(store.dedicated().await?);
    }
    let started = Instant::now();
    let deadline = started + run;
    let mut tasks = Vec::new();
    for mut conn in connections {
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let v: Vec<u8> = conn.get(REDIS_KEY).await?;
                if v.len() != 100 {
                    bail!("direct GET returned {} bytes", v.len());
                }
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    per_second(tasks, started).await
}

/// Median latency in µs of one client sending requests one after another.
async fn agent_p50(addr: &str, run: Duration) -> anyhow::Result<f64> {
    let path = format!("/v1/cache/{TENANT}/{KEY}");
    let mut sender = http_connection(addr).await?;
    let mut samples = Vec::new();
    let deadline = Instant::now() + run;
    while Instant::now() < deadline {
        let t = Instant::now();
        http_get(&mut sender, addr, &path).await?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(median(&samples))
}

/// Median latency in µs of one redis-rs client sending GETs one after another.
async fn redis_p50(store: &Store, run: Duration) -> anyhow::Result<f64> {
    let mut conn = store.dedicated().await?;
    let mut samples = Vec::new();
    let deadline = Instant::now() + run;
    while Instant::now() < deadline {
        let t = Instant::now();
        let _: Vec<u8> = conn.get(REDIS_KEY).await?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(median(&samples))
}

/// Reads per second of `TASKS` tasks calling an embedded agent's `get`.
async fn embedded_throughput(agent: &Agent, run: Duration) -> anyhow::Result<f64> {
    let started = Instant::now();
    let deadline = started + run;
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let agent = agent.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                // A batch between clock reads: the hit itself costs about as much as Instant::now().
                for _ in 0..64 {
                    match agent.get(TENANT, KEY).await? {
                        Read::Hit { layer: Layer::L1, .. } => n += 1,
                        _ => bail!("the embedded agent missed its L1"),
                    }
                }
                // Let the other tasks run, as a real app's requests would.
                tokio::task::yield_now().await;
            }
            anyhow::Ok(n)
        }));
    }
    per_second(tasks, started).await
}

/// Stores the value in the agent (L2 and its L1) and in Redis under a plain key,
/// and waits until the agent answers from L1.
pub async fn prepare_agent(addr: &str, store: &Store) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/v1/cache/{TENANT}/{KEY}?ttl=3600");
    let status = http.put(&url).body(value().to_vec()).send().await?.status();
    if status != 204 {
        bail!("PUT {url} answered {status}");
    }
    let mut conn = store.dedicated().await?;
    let _: () = conn.set(REDIS_KEY, value().to_vec()).await?;
    let mut sender = http_connection(addr).await?;
    let path = format!("/v1/cache/{TENANT}/{KEY}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(&mut sender, addr, &path).await.is_err() {
        if Instant::now() > deadline {
            bail!("the agent never served {KEY} from L1");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Measures 1 and 2: throughput and single-client p50 through the agent's
/// HTTP API, each against direct GETs to the Redis at `redis_url` (any topology).
pub async fn run(options: &Options, agent_addr: &str, redis_url: &str) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let redis = Store::open(redis_url, 4).map_err(anyhow::Error::msg)?;
    prepare_agent(agent_addr, &redis).await?;

    let (mut ours_tp, mut redis_tp, mut ours_p50, mut redis_p50s) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..options.rounds {
        ours_tp.push(agent_throughput(agent_addr, options.run).await?);
        redis_tp.push(redis_throughput(&redis, options.run).await?);
        ours_p50.push(agent_p50(agent_addr, options.run).await?);
        redis_p50s.push(redis_p50(&redis, options.run).await?);
        eprintln!(
            "  hits round {}: agent {:.0}/s vs Redis {:.0}/s; p50 {:.0} µs vs {:.0} µs",
            round + 1,
            ours_tp[round],
            redis_tp[round],
            ours_p50[round],
            redis_p50s[round]
        );
    }

    let tp_ratio = median(&ratios(&ours_tp, &redis_tp));
    let p50_ratio = median(&ratios(&ours_p50, &redis_p50s));
    let rows = vec![
        Row {
            measure: format!("L1-hit GET through the agent, {TASKS} connections: throughput"),
            ours: spread(&ours_tp, "req/s", 0),
            baseline: spread(&redis_tp, "GET/s", 0),
            result: format!("{tp_ratio:.2}x"),
            target: "≥ 1.0x".into(),
            met: tp_ratio >= 1.0,
        },
        Row {
            measure: "L1-hit GET through the agent, 1 client: p50 latency".into(),
            ours: spread(&ours_p50, "µs", 0),
            baseline: spread(&redis_p50s, "µs", 0),
            result: format!("{p50_ratio:.2}x"),
            target: "≤ 1.5x".into(),
            met: p50_ratio <= 1.5,
        },
    ];
    // The agent runs with its default `http_workers = 0`: one worker per CPU.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let notes = vec![format!(
        "Hits: a 100-byte value. Ours: hyper HTTP/1.1 clients, one connection per task, `GET \
         /v1/cache/{TENANT}/{KEY}`, every answer checked to be an L1 hit; Redis: redis-rs, one \
         multiplexed connection per task (on a cluster, redis-rs's cluster connection, shared), `GET` \
         of a 100-byte string. {TASKS} tasks loop for the run; the p50 is one client sending one \
         request after another. The agent has {workers} HTTP workers (one per CPU, its default)."
    )];
    Ok((rows, notes))
}

/// The agent as a library, in this process, against direct GETs to the
/// Redis at `redis_url`, which the agent at `agent_addr` also uses.
pub async fn embedded(options: &Options, agent_addr: &str, redis_url: &str) -> anyhow::Result<(Row, String)> {
    let redis = Store::open(redis_url, 4).map_err(anyhow::Error::msg)?;
    prepare_agent(agent_addr, &redis).await?;
    let settings = node_agent::settings::Settings { redis_url: redis_url.to_string(), ..Default::default() };
    let agent = Agent::new(settings, "bench-embedded".into(), String::new()).map_err(anyhow::Error::msg)?;
    let stop = CancellationToken::new();
    let background = node_agent::sync::spawn(&agent, stop.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.readiness().is_err() {
        if Instant::now() > deadline {
            bail!("the embedded agent never became ready: {:?}", agent.readiness());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let put = Put { value: value(), ttl_secs: Some(3600), ..Put::default() };
    agent.put(TENANT, KEY, put).await?;
    let (mut embedded_tp, mut redis_tp2) = (Vec::new(), Vec::new());
    for round in 0..options.rounds {
        embedded_tp.push(embedded_throughput(&agent, options.run).await?);
        redis_tp2.push(redis_throughput(&redis, options.run).await?);
        eprintln!("  embedded round {}: {:.0}/s vs Redis {:.0}/s", round + 1, embedded_tp[round], redis_tp2[round]);
    }
    stop.cancel();
    for task in background {
        let _ = task.await;
    }

    let embedded_ratio = median(&ratios(&embedded_tp, &redis_tp2));
    let row = Row {
        measure: format!("embedded agent (library) L1 hit, {TASKS} tasks: throughput"),
        ours: spread(&embedded_tp, "reads/s", 0),
        baseline: spread(&redis_tp2, "GET/s", 0),
        result: format!("{embedded_ratio:.1}x"),
        target: "≥ 50x".into(),
        met: embedded_ratio >= 50.0,
    };
    let note = format!(
        "Embedded: `node_agent::agent::Agent` in the bench process (its subscriber and heartbeat \
         running), `agent.get()` from {TASKS} tasks, against the same direct GETs."
    );
    Ok((row, note))
}

/// The cost of authentication on the hit path: L1-hit throughput of an
/// agent that requires a token (`secured`, every request sending `secret`)
/// against one without tokens (`open`), on the same Redis, alternating.
pub async fn with_token(
    options: &Options,
    open: &str,
    secured: &str,
    secret: &str,
    redis_url: &str,
) -> anyhow::Result<(Row, String)> {
    let redis = Store::open(redis_url, 4).map_err(anyhow::Error::msg)?;
    prepare_agent(open, &redis).await?;
    // The secured agent: store and warm the value with the token.
    let http = reqwest::Client::new();
    let url = format!("http://{secured}/v1/cache/{TENANT}/{KEY}?ttl=3600");
    let status = http.put(&url).bearer_auth(secret).body(value().to_vec()).send().await?.status();
    if status != 204 {
        bail!("PUT {url} with a token answered {status}");
    }
    let mut sender = http_connection(secured).await?;
    let path = format!("/v1/cache/{TENANT}/{KEY}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let authorization = hyper::header::HeaderValue::try_from(format!("Bearer {secret}"))?;
    while http_get_as(&mut sender, secured, &path, Some(&authorization)).await.is_err() {
        if Instant::now() > deadline {
            bail!("the secured agent never served {KEY} from L1");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..options.rounds {
        // Each side goes first in every other round.
        if round % 2 == 0 {
            with.push(agent_throughput_as(secured, options.run, Some(secret)).await?);
            without.push(agent_throughput(open, options.run).await?);
        } else {
            without.push(agent_throughput(open, options.run).await?);
            with.push(agent_throughput_as(secured, options.run, Some(secret)).await?);
        }
        eprintln!("  token round {}: {:.0}/s with a token, {:.0}/s without", round + 1, with[round], without[round]);
    }
    let ratio = median(&ratios(&with, &without));
    let row = Row {
        measure: format!(
            "L1-hit GET with a bearer token, {TASKS} connections: throughput (Redis column: the same without tokens)"
        ),
        ours: spread(&with, "req/s", 0),
        baseline: spread(&without, "req/s", 0),
        result: format!("{ratio:.3}x"),
        target: "≥ 0.95x".into(),
        met: ratio >= 0.95,
    };
    let note = "Token: two agents on the same Redis, one with `[[tokens]]` (5 tokens; every request sends one, \
                which is hashed with SHA-256 and compared with each digest, then checked for the read scope on \
                the tenant) and one without; the same L1-hit load, alternating rounds."
        .to_string();
    Ok((row, note))
}
