//! Redis with an ACL user: the least-privilege user the README gives
//! is enough for everything, a wrong password is a clear not-ready reason
//! (and retried), and the password shows up nowhere.

use serde_json::json;

use integration_tests::{free_port, start_agent, Redis};

use crate::Deployed;

/// The ACL of the README ("Redis credentials"), as `redis-server --user` arguments.
const ACL: &[&str] =
    &["--user", "dcc", "on", ">dcc-secret", "~dcc:*", "&dcc:*", "+@all", "-@dangerous", "+info", "+role"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_privilege_acl_user_is_enough_and_a_wrong_password_is_a_clear_reason() {
    let mut dir = tempfile::Builder::new().prefix("dcc-acl-").tempdir().expect("temp dir");
    dir.disable_cleanup(std::env::var_os("DCC_KEEP_LOGS").is_some());
    let acl: Vec<String> = ACL.iter().map(|a| a.to_string()).collect();
    let redis = Redis::start_with(dir.path(), free_port(), &acl).await.expect("redis");
    let url = format!("redis://dcc:dcc-secret@127.0.0.1:{}", redis.port);
    let d = Deployed::start(dir.path(), &url, 2, "").await;

    // The whole path works under that user: fills, reads, every kind of
    // invalidation (scripts, log, pub/sub, acks), wait=all, the views.
    d.put(0, "acme", "k", "old").await;
    d.put(0, "acme", "tagged?tags=t1", "old").await;
    d.put(0, "acme", "list:1", "old").await;
    for key in ["k", "tagged", "list:1"] {
        d.warm("acme", key).await;
    }
    let (status, answer) = d.post("/v1/invalidate?wait=all", json!({"tenant": "acme", "keys": ["k"]})).await;
    assert_eq!((status, answer["nodes"]["acked"].as_u64()), (200, Some(2)), "{answer}");
    let (status, answer) =
        d.post("/v1/invalidate?wait=all", json!({"tenant": "acme", "tags": ["t1"], "patterns": ["list:*"]})).await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) =
        d.post("/v1/events?wait=all", json!({"tenant": "acme", "entity": "supplier", "id": "1"})).await;
    assert_eq!(status, 200, "{answer}");
    for i in 0..2 {
        for key in ["k", "tagged", "list:1"] {
            assert_eq!(d.read(i, "acme", key).await.0, 404, "agent {i} still serves {key}");
        }
    }
    let delete = d.http.delete(d.agents[1].url("/v1/cache/acme/tagged")).send().await.expect("DELETE");
    assert_eq!(delete.status(), 204);
    let health = d.http.get(d.coordinator.url("/v1/cluster/health")).send().await.expect("health");
    assert_eq!(health.status(), 200);
    let health = health.text().await.unwrap_or_default();
    let audit = d.http.get(d.coordinator.url("/v1/audit")).send().await.expect("audit");
    assert_eq!(audit.status(), 200);

    // The password as a setting (`redis_password`, say from the environment),
    // the URL without it.
    let bare_url = format!("redis://dcc@127.0.0.1:{}", redis.port);
    let setting = "redis_password = \"dcc-secret\"\n";
    let from_setting = start_agent(dir.path(), &bare_url, free_port(), "agent-setting", setting).expect("agent");
    integration_tests::wait_ready(&d.http, &from_setting).await.unwrap_or_else(|e| panic!("{e:#}"));
    let put = d.http.put(from_setting.url("/v1/cache/acme/via-setting")).body("v").send().await.expect("PUT");
    assert_eq!(put.status(), 204);

    // A wrong password: not ready, saying why, and still retrying.
    let wrong_url = format!("redis://dcc:not-the-password@127.0.0.1:{}", redis.port);
    let mut wrong = start_agent(dir.path(), &wrong_url, free_port(), "agent-wrong", "").expect("agent");
    crate::assert_not_ready_because(&d.http, &mut wrong, "redis_credentials_refused").await;

    // The passwords appear in no answer and no log.
    let status = d.http.get(wrong.url("/v1/status")).send().await.expect("status").text().await.unwrap_or_default();
    let metrics = d.http.get(wrong.url("/metrics")).send().await.expect("metrics").text().await.unwrap_or_default();
    for (what, text) in [("the coordinator's health", health.as_str()), ("a status", &status), ("metrics", &metrics)] {
        assert!(!text.contains("dcc-secret") && !text.contains("not-the-password"), "{what} shows a password");
    }
    for log in std::fs::read_dir(dir.path())
        .expect("logs")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
    {
        let text = std::fs::read_to_string(log.path()).unwrap_or_default();
        let name = log.path().display().to_string();
        if name.contains("redis-") {
            continue;
        }
        assert!(!text.contains("dcc-secret") && !text.contains("not-the-password"), "{name} shows a password");
    }
}
