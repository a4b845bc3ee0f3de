//! Tokens and tenant scopes on both processes (contract v2, section 2): every
//! row of the scope table, wrong tenants, a batch with one forbidden tenant,
//! open probes, malformed credentials, and the audit entries that result.

use reqwest::Method;
use serde_json::{json, Value};

use integration_tests::{bin_path, ClusterOptions};

use crate::{TestCluster, PROPAGATION_DEADLINE};

/// Secrets of the tokens the processes are configured with (by their SHA-256).
const READER: &str = "reader-secret";
const WRITER: &str = "writer-secret";
const INVALIDATOR: &str = "invalidator-secret";
const APP: &str = "app-secret";
const OPS: &str = "ops-secret";

fn tokens_toml() -> String {
    let token = crate::token_toml;
    [
        token("reader", READER, r#"["acme"]"#, r#"["read"]"#),
        token("writer", WRITER, r#"["acme"]"#, r#"["write"]"#),
        token("invalidator", INVALIDATOR, r#"["acme"]"#, r#"["invalidate"]"#),
        token("app", APP, r#"["acme", "globex"]"#, r#"["read", "write", "invalidate"]"#),
        token("ops", OPS, "[]", r#"["admin"]"#),
    ]
    .concat()
}

/// Sends a request as `secret` (none: no Authorization header); returns
/// status, the `WWW-Authenticate` header and the JSON body (null if none).
async fn call(
    t: &TestCluster,
    method: Method,
    url: &str,
    secret: Option<&str>,
    body: Option<Value>,
) -> (u16, String, Value) {
    let mut request = t.http.request(method, url);
    if let Some(secret) = secret {
        request = request.bearer_auth(secret);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let resp = request.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = resp.status().as_u16();
    let challenge = crate::header(&resp, "www-authenticate");
    let text = resp.text().await.unwrap_or_default();
    (status, challenge, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// `call` with a token and a JSON body, the URL owned.
async fn call_as(t: &TestCluster, method: Method, url: String, secret: &str, body: Value) -> (u16, String, Value) {
    call(t, method, &url, Some(secret), Some(body)).await
}

/// A PUT of `tenant/k` as `secret`: its status.
async fn put_as(t: &TestCluster, secret: &str, tenant: &str) -> u16 {
    let url = t.agent(0).url(&format!("/v1/cache/{tenant}/k"));
    t.http.put(url).bearer_auth(secret).body("v").send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

/// A GET of `tenant/k` as `secret`.
async fn get_as(t: &TestCluster, secret: &str, tenant: &str) -> (u16, String, Value) {
    call(t, Method::GET, &t.agent(0).url(&format!("/v1/cache/{tenant}/k")), Some(secret), None).await
}

/// `GET /v1/audit{query}` as the admin token: its entries.
async fn audit_as(t: &TestCluster, query: &str) -> Vec<Value> {
    let url = t.cluster.coordinator.url(&format!("/v1/audit{query}"));
    let (status, _, answer) = call(t, Method::GET, &url, Some(OPS), None).await;
    assert_eq!(status, 200, "{answer}");
    answer["entries"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scope_opens_its_endpoints_to_its_tenants_only_and_refusals_are_audited() {
    let tokens = tokens_toml();
    let t = TestCluster::with(ClusterOptions {
        agents: 1,
        coordinator_toml: tokens.clone(),
        agent_toml: format!("metrics_token_required = true\n{tokens}"),
        ..ClusterOptions::default()
    })
    .await;
    let agent = |path: &str| t.agent(0).url(path);
    let coordinator = |path: &str| t.cluster.coordinator.url(path);

    // Probes stay open; /metrics too, unless metrics_token_required (the agent's).
    for url in
        [agent("/healthz"), agent("/readyz"), coordinator("/healthz"), coordinator("/readyz"), coordinator("/metrics")]
    {
        assert_eq!(call(&t, Method::GET, &url, None, None).await.0, 200, "{url} without a token");
    }
    assert_eq!(call(&t, Method::GET, &agent("/metrics"), None, None).await.0, 401);
    assert_eq!(call(&t, Method::GET, &agent("/metrics"), Some(READER), None).await.0, 200);

    // No token, an unknown one, or a malformed header: 401 with the challenge,
    // before anything else (a bad body, an unknown route) is looked at.
    let no_body = Some(json!("not an event"));
    for (method, url, body) in [
        (Method::GET, agent("/v1/cache/acme/k"), None),
        (Method::GET, agent("/v1/status"), None),
        (Method::GET, agent("/no/such/route"), None),
        (Method::POST, coordinator("/v1/events"), no_body.clone()),
        (Method::GET, coordinator("/v1/cluster/health"), None),
        (Method::GET, coordinator("/v1/audit"), None),
    ] {
        for secret in [None, Some("wrong-secret"), Some("")] {
            let (status, challenge, answer) = call(&t, method.clone(), &url, secret, body.clone()).await;
            assert_eq!((status, challenge.as_str()), (401, "Bearer"), "{method} {url} with {secret:?}: {answer}");
            assert_eq!(answer["error"], "unauthorized", "{answer}");
        }
    }
    for header in ["Basic YWNtZTpzZWNyZXQ=", "Bearer", "Bearer  ", "bearer", "Token reader-secret"] {
        let resp = t.http.get(agent("/v1/cache/acme/k")).header("authorization", header).send().await;
        let status = resp.map(|r| r.status().as_u16()).unwrap_or(0);
        assert_eq!(status, 401, "Authorization: {header:?}");
    }

    // The agent's scope table: read GET, write PUT, invalidate DELETE, each of
    // the token's tenants only; admin everything.
    let put = |secret, tenant| put_as(&t, secret, tenant);
    assert_eq!(put(WRITER, "acme").await, 204);
    assert_eq!(put(APP, "globex").await, 204);
    assert_eq!(put(READER, "acme").await, 403);
    assert_eq!(put(INVALIDATOR, "acme").await, 403);
    assert_eq!(put(WRITER, "globex").await, 403);
    assert_eq!(put(OPS, "initech").await, 204);
    let get = |secret, tenant| get_as(&t, secret, tenant);
    assert_eq!(get(READER, "acme").await.0, 200);
    assert_eq!(get(APP, "globex").await.0, 200);
    assert_eq!(get(OPS, "initech").await.0, 200);
    let (status, _, answer) = get(READER, "globex").await;
    assert_eq!((status, answer["error"].as_str(), answer["tenant"].as_str()), (403, Some("forbidden"), Some("globex")));
    let (status, _, answer) = get(WRITER, "acme").await;
    assert_eq!((status, answer["scope"].as_str()), (403, Some("read")), "{answer}");
    assert_eq!(call(&t, Method::GET, &agent("/v1/status"), Some(READER), None).await.0, 200);
    assert_eq!(call(&t, Method::GET, &agent("/v1/status"), Some(WRITER), None).await.0, 403);
    assert_eq!(call(&t, Method::DELETE, &agent("/v1/cache/acme/k"), Some(WRITER), None).await.0, 403);
    assert_eq!(call(&t, Method::DELETE, &agent("/v1/cache/globex/k"), Some(INVALIDATOR), None).await.0, 403);
    assert_eq!(call(&t, Method::DELETE, &agent("/v1/cache/acme/k"), Some(INVALIDATOR), None).await.0, 204);
    assert_eq!(get(READER, "acme").await.0, 404, "the DELETE took effect");

    // The coordinator's: read views, invalidate of the token's tenants, admin
    // for a whole-tenant wipe and the audit trail.
    for path in ["/v1/cluster/health", "/v1/rules", "/v1/keys/acme"] {
        assert_eq!(call(&t, Method::GET, &coordinator(path), Some(READER), None).await.0, 200, "{path}");
        assert_eq!(call(&t, Method::GET, &coordinator(path), Some(WRITER), None).await.0, 403, "{path}");
    }
    let (status, _, answer) = call(&t, Method::GET, &coordinator("/v1/keys/globex"), Some(READER), None).await;
    assert_eq!((status, answer["tenant"].as_str()), (403, Some("globex")), "{answer}");
    let invalidate = |secret, body| call_as(&t, Method::POST, coordinator("/v1/invalidate"), secret, body);
    let acme_key = json!({"tenant": "acme", "keys": ["k"]});
    assert_eq!(invalidate(READER, acme_key.clone()).await.0, 403);
    assert_eq!(invalidate(WRITER, acme_key.clone()).await.0, 403);
    assert_eq!(invalidate(INVALIDATOR, acme_key.clone()).await.0, 200);
    assert_eq!(invalidate(INVALIDATOR, json!({"tenant": "globex", "keys": ["k"]})).await.0, 403);
    let wipe = json!({"tenant": "initech", "patterns": ["*"], "confirm": true});
    let (status, _, answer) = invalidate(APP, wipe.clone()).await;
    assert_eq!((status, answer["scope"].as_str()), (403, Some("admin")), "{answer}");
    assert_eq!(invalidate(OPS, wipe).await.0, 200);
    // Answered without wait=all: it reaches the agent's L1 soon after.
    let wiped = crate::wait_until(PROPAGATION_DEADLINE, || async { get(OPS, "initech").await.0 == 404 }).await;
    assert!(wiped, "the wipe never took effect on the agent");

    // A batch naming one forbidden tenant is refused whole: nothing is invalidated.
    assert_eq!(put(APP, "acme").await, 204);
    assert_eq!(get(READER, "acme").await.0, 200);
    let batch = json!([
        {"tenant": "acme", "entity": "x", "keys": ["k"]},
        {"tenant": "globex", "entity": "x", "keys": ["k"]},
    ]);
    let (status, _, answer) = call(&t, Method::POST, &coordinator("/v1/events"), Some(INVALIDATOR), Some(batch)).await;
    assert_eq!((status, answer["tenant"].as_str()), (403, Some("globex")), "{answer}");
    assert_eq!(get(READER, "acme").await.0, 200, "a refused batch invalidated acme");
    assert_eq!(get(APP, "globex").await.0, 200, "a refused batch invalidated globex");
    let batch =
        json!([{"tenant": "acme", "entity": "x", "keys": ["k"]}, {"tenant": "globex", "entity": "x", "keys": ["k"]}]);
    assert_eq!(call(&t, Method::POST, &coordinator("/v1/events"), Some(APP), Some(batch)).await.0, 200);

    // The audit trail: admin only, newest first, by tenant; the refusals and
    // the invalidations above are in it, with who did them.
    assert_eq!(call(&t, Method::GET, &coordinator("/v1/audit"), Some(APP), None).await.0, 403);
    let audit = |query| audit_as(&t, query);
    let expected = |entries: &[Value]| {
        let has = |token: Option<&str>, action: &str, tenant: Option<&str>, status: u64| {
            entries.iter().any(|e| {
                e["token"].as_str() == token
                    && e["action"] == action
                    && tenant.is_none_or(|t| e["tenants"].as_array().is_some_and(|ts| ts.iter().any(|x| x == t)))
                    && e["status"] == status
            })
        };
        has(Some("ops"), "wipe", Some("initech"), 200)
            && has(Some("invalidator"), "invalidate", Some("acme"), 200)
            && has(Some("invalidator"), "delete", Some("acme"), 204)
            && has(Some("app"), "event", Some("globex"), 200)
            && has(Some("invalidator"), "refused", Some("globex"), 403)
            && has(None, "refused", None, 401)
    };
    // The entries are written after the answers, on their own tasks.
    let complete = crate::wait_until(PROPAGATION_DEADLINE, || async { expected(&audit("?limit=1000").await) }).await;
    assert!(complete, "the audit trail lacks entries: {:#?}", audit("?limit=1000").await);
    let newest_first = audit("?limit=1000").await;
    let times: Vec<u64> = newest_first.iter().filter_map(|e| e["ts_ms"].as_u64()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "not newest first: {times:?}");
    let initech = audit("?tenant=initech").await;
    assert!(
        !initech.is_empty()
            && initech.iter().all(|e| e["tenants"].as_array().is_some_and(|ts| ts.iter().any(|x| x == "initech")))
    );
    assert_eq!(audit("?limit=1").await.len(), 1);
    let (status, _, _) = call(&t, Method::GET, &coordinator("/v1/audit?limit=0"), Some(OPS), None).await;
    assert_eq!(status, 400);
}

#[test]
fn without_tokens_a_process_refuses_an_address_other_than_loopback() {
    for (binary, flag_prefix) in [("node-agent", "DCC_AGENT"), ("coordinator", "DCC_COORDINATOR")] {
        let output = std::process::Command::new(bin_path(binary))
            .args(["--bind", "0.0.0.0:1", "--redis-url", "redis://127.0.0.1:1"])
            .env_remove(format!("{flag_prefix}_ALLOW_ANONYMOUS"))
            .output()
            .unwrap_or_else(|e| panic!("{binary}: {e}"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{binary}: {stderr}");
        assert!(stderr.contains("allow_anonymous"), "{binary} did not say why: {stderr}");
    }
}
