//! Redis over TLS: `rediss://` with `redis_ca_file` naming a CA made in the
//! test (rcgen). Redis listens on its TLS port only, so everything that
//! works went over TLS; a process that does not trust the CA is not ready,
//! says why, and keeps retrying.

use std::path::Path;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::json;

use integration_tests::{free_port, start_agent, which, Proc};

use crate::{wait_until, Deployed, PROPAGATION_DEADLINE};

/// Writes a CA, and a certificate for `127.0.0.1` and `localhost` it signed,
/// with its key: `ca.pem`, `server.pem`, `server.key`.
fn write_pki(dir: &Path) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "dcc test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate().expect("CA key");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca, ca_key);
    let mut server =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).expect("server params");
    server.distinguished_name.push(DnType::CommonName, "localhost");
    let server_key = KeyPair::generate().expect("server key");
    let server_cert = server.signed_by(&server_key, &issuer).expect("server certificate");
    for (name, pem) in
        [("ca.pem", ca_cert.pem()), ("server.pem", server_cert.pem()), ("server.key", server_key.serialize_pem())]
    {
        std::fs::write(dir.join(name), pem).unwrap_or_else(|e| panic!("writing {name}: {e}"));
    }
}

/// A `redis-server` that speaks TLS only, on a free port.
async fn start_tls_redis(dir: &Path) -> (Proc, u16) {
    let port = free_port();
    let file = |name: &str| dir.join(name).display().to_string();
    let args: Vec<String> = [
        "--port",
        "0",
        "--tls-port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--tls-cert-file",
        &file("server.pem"),
        "--tls-key-file",
        &file("server.key"),
        "--tls-ca-cert-file",
        &file("ca.pem"),
        "--tls-auth-clients",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let program = which("redis-server").expect("redis-server is installed (make test installs it)");
    let proc = Proc::spawn("redis-server", &program, &args, &[], dir.join(format!("redis-{port}.log"))).expect("spawn");
    // Ready once the product's own TLS store gets a PONG through the CA.
    let access = shared::store::Access { ca_file: Some(dir.join("ca.pem")), ..Default::default() };
    let store = shared::store::Store::open_with(&format!("rediss://127.0.0.1:{port}"), 1, &access).expect("store");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut conn) = store.get().await {
            let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
            if pong.is_ok() {
                return (proc, port);
            }
        }
        assert!(Instant::now() < deadline, "TLS redis-server did not start:\n{}", proc.log_tail());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_with_redis_ca_file_everything_works_and_an_untrusted_certificate_is_a_clear_reason() {
    let mut dir = tempfile::Builder::new().prefix("dcc-tls-").tempdir().expect("temp dir");
    dir.disable_cleanup(std::env::var_os("DCC_KEEP_LOGS").is_some());
    write_pki(dir.path());
    let (_redis, port) = start_tls_redis(dir.path()).await;
    let url = format!("rediss://127.0.0.1:{port}");
    let ca = format!("redis_ca_file = \"{}\"\n", dir.path().join("ca.pem").display());
    let d = Deployed::start_with(dir.path(), &url, 2, &ca, &ca).await;

    // The whole path over TLS: fills, reads from L2 and L1, an invalidation
    // that every agent acknowledges, an agent's DELETE.
    d.put(0, "acme", "k?tags=t1", "v").await;
    d.put(0, "acme", "other", "v").await;
    d.warm("acme", "k").await;
    let (status, answer) = d.post("/v1/invalidate?wait=all", json!({"tenant": "acme", "tags": ["t1"]})).await;
    assert_eq!((status, answer["nodes"]["acked"].as_u64()), (200, Some(2)), "{answer}");
    for i in 0..2 {
        assert_eq!(d.read(i, "acme", "k").await.0, 404, "agent {i} still serves k");
    }
    let delete = d.http.delete(d.agents[1].url("/v1/cache/acme/other")).send().await.expect("DELETE");
    assert_eq!(delete.status(), 204);
    let gone = wait_until(PROPAGATION_DEADLINE, || async { d.read(0, "acme", "other").await.0 == 404 }).await;
    assert!(gone, "agent 0 still serves a key deleted through agent 1");

    // Without the CA (the system's CAs alone), an agent is not ready, says
    // it is TLS, and keeps trying.
    let mut untrusting = start_agent(dir.path(), &url, free_port(), "agent-untrusting", "").expect("agent");
    crate::assert_not_ready_because(&d.http, &mut untrusting, "redis_tls_failed").await;

    // redis_ca_file is for rediss:// only: refused at start-up, exit 2.
    let mut misused = start_agent(dir.path(), "redis://127.0.0.1:1", free_port(), "agent-misused", &ca).expect("agent");
    let status = misused.proc.wait_exit(Duration::from_secs(30)).expect("exits");
    assert_eq!(status.code(), Some(2), "{}", misused.proc.log_tail());
}
