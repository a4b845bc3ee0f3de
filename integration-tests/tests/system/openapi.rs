//! The OpenAPI documents against the live servers: each process serves the
//! committed document (`docs/openapi.json`, `docs/openapi.node-agent.json`)
//! and a Swagger UI that loads nothing from the internet; and schemathesis, a
//! property-based client, finds no 5xx other than the documented 503 and 504
//! and no answer outside the document (status, content type, headers, body),
//! with tokens configured, as an admin.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::TestCluster;

const ADMIN: &str = "openapi-admin-secret";

/// The schemathesis of the virtualenv `make test` makes (`make venv`), or `$DCC_SCHEMATHESIS`.
fn schemathesis() -> PathBuf {
    if let Some(path) = std::env::var_os("DCC_SCHEMATHESIS") {
        return PathBuf::from(path);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/st");
    assert!(
        path.exists(),
        "schemathesis is not installed at {}: run `make venv` (make test does), or set DCC_SCHEMATHESIS",
        path.display()
    );
    path
}

/// The committed document `name` under `docs/`.
fn committed(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// GETs `url` without a token: the documents are open, like the probes.
async fn get(t: &TestCluster, url: &str) -> (u16, String) {
    let resp = t.http.get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// Checks one process's documents: the committed one is served, and `/docs`
/// is a Swagger UI whose assets are served by the process itself.
async fn check_served_documents(t: &TestCluster, base: &str, committed_name: &str) {
    let (status, text) = get(t, &format!("{base}/openapi.json")).await;
    assert_eq!(status, 200, "{base}/openapi.json: {text}");
    let served: Value = serde_json::from_str(&text).expect("the served document is JSON");
    assert!(
        served == committed(committed_name),
        "{base}/openapi.json differs from docs/{committed_name}: run `make openapi` and commit the file"
    );
    let (status, page) = get(t, &format!("{base}/docs/")).await;
    assert_eq!(status, 200, "{base}/docs/");
    assert!(page.contains("swagger-ui"), "{base}/docs/ is not Swagger UI: {page}");
    for line in page.lines().filter(|l| l.contains("src=") || l.contains("href=")) {
        assert!(!line.contains("://"), "{base}/docs/ loads something from elsewhere: {line}");
    }
    for asset in ["swagger-ui-bundle.js", "swagger-ui.css", "swagger-initializer.js"] {
        let (status, _) = get(t, &format!("{base}/docs/{asset}")).await;
        assert_eq!(status, 200, "{base}/docs/{asset}");
    }
    let (_, initializer) = get(t, &format!("{base}/docs/swagger-initializer.js")).await;
    assert!(initializer.contains("/openapi.json"), "Swagger UI does not read /openapi.json: {initializer}");
}

/// Runs schemathesis against `base`'s document; panics with its report unless it passes.
async fn run_schemathesis(base: &str) {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemathesis.toml");
    let seed = std::env::var("DCC_SCHEMATHESIS_SEED").unwrap_or_else(|_| "20261206".into());
    // Its working folder, where it keeps a cache: not the source tree.
    let scratch = std::env::temp_dir().join(format!("dcc-schemathesis-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap_or_else(|e| panic!("{}: {e}", scratch.display()));
    let out = tokio::process::Command::new(schemathesis())
        .current_dir(&scratch)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{base}/openapi.json"))
        .args(["--checks", CHECKS, "--max-examples", "60", "--workers", "1", "--seed", &seed])
        .args(["--generation-database", "none", "--request-timeout", "30", "--max-failures", "20"])
        .args(["--header", &format!("Authorization: Bearer {ADMIN}")])
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("schemathesis does not run: {e}"));
    let _ = std::fs::remove_dir_all(&scratch);
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("schemathesis against {base} (seed {seed}):\n{report}");
    assert!(out.status.success(), "schemathesis found answers outside the document of {base}:\n{report}");
    assert!(report.contains("passed"), "schemathesis ran no test case against {base}:\n{report}");
}

/// The checks the contract names: no undocumented 5xx (the config allows only
/// 503 and 504, and then only where documented), every status, content type,
/// header and body as documented, and a 405 for a method a path does not take.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance,unsupported_method";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_processes_serve_their_committed_document_and_answer_only_what_it_says() {
    let admin = crate::token_toml("admin", ADMIN, "[]", r#"["admin"]"#);
    let t = TestCluster::with(integration_tests::ClusterOptions {
        agents: 1,
        coordinator_toml: format!("{}\n{admin}", integration_tests::deploy_coordinator_toml()),
        agent_toml: admin.clone(),
        ..integration_tests::ClusterOptions::default()
    })
    .await;
    let coordinator = t.cluster.coordinator.url("");
    let agent = t.agent(0).url("");
    check_served_documents(&t, &coordinator, "openapi.json").await;
    check_served_documents(&t, &agent, "openapi.node-agent.json").await;
    run_schemathesis(&coordinator).await;
    run_schemathesis(&agent).await;
}
