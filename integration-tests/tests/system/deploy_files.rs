//! The deploy files are real: the Kubernetes manifests and alert rules parse,
//! the configs the manifests ship start the real processes, every metric the
//! Grafana dashboard and the alert rules name exists in a real scrape of both
//! processes, `promtool check rules` passes, and the systemd units start the
//! workspace's binaries with flags they take.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use integration_tests::{bin_path, free_port, which, Proc, Service};
use yaml_rust2::{Yaml, YamlLoader};

use crate::TestCluster;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

/// The `dcc_*` names in a text, without the `_bucket`, `_count` and `_sum`
/// of a histogram's series.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("dcc_") {
        let start = i + at;
        let end = start + text[start..].bytes().take_while(|b| b.is_ascii_alphanumeric() || *b == b'_').count();
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if boundary {
            let name = &text[start..end];
            let base = ["_bucket", "_count", "_sum"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            names.insert(base.to_string());
        }
        i = end.max(start + 4);
    }
    names
}

/// The config a ConfigMap of `file` ships under `key`.
fn config_map(file: &str, key: &str) -> String {
    yaml(file)
        .iter()
        .find_map(|doc| doc["data"][key].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("{file} has no ConfigMap with {key}"))
}

/// Starts `binary` with a shipped `config`, on the test's Redis and a
/// loopback port (flags beat the file), and waits until it is ready.
async fn start_shipped(t: &TestCluster, binary: &str, config: &str, env: &[(&str, String)]) -> Service {
    let path = t.cluster.dir.path().join(format!("shipped-{binary}.toml"));
    std::fs::write(&path, config).expect("write config");
    let addr = format!("127.0.0.1:{}", free_port());
    let args: Vec<String> =
        ["--config", &path.display().to_string(), "--bind", &addr, "--redis-url", &t.cluster.redis_url()]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let log = t.cluster.dir.path().join(format!("shipped-{binary}.log"));
    let proc = Proc::spawn(binary, &bin_path(binary), &args, env, log).expect("spawn");
    let service = Service { proc, addr, config: path };
    integration_tests::wait_ready(&t.http, &service).await.unwrap_or_else(|e| panic!("{binary} with {config}: {e:#}"));
    service
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_files_parse_start_the_processes_and_name_only_real_metrics() {
    let t = TestCluster::start(1, "").await;

    // Kubernetes: every document has a kind; the Deployments probe /healthz and
    // /readyz and have requests, and a PodDisruptionBudget selects their pods.
    for file in ["k8s/coordinator.yaml", "k8s/app-with-agent.yaml"] {
        let docs = yaml(file);
        assert!(docs.len() >= 3, "{file}: {} documents", docs.len());
        for doc in &docs {
            assert!(doc["kind"].as_str().is_some() && doc["metadata"]["name"].as_str().is_some(), "{file}: {doc:?}");
        }
        let of_kind = |kind: &str| docs.iter().find(|doc| doc["kind"].as_str() == Some(kind));
        let deployment = of_kind("Deployment").unwrap_or_else(|| panic!("{file}: no Deployment"));
        let budget = of_kind("PodDisruptionBudget").unwrap_or_else(|| panic!("{file}: no PodDisruptionBudget"));
        assert!(budget["spec"]["selector"]["matchLabels"].as_hash().is_some(), "{file}: the budget selects nothing");
        assert_eq!(
            budget["spec"]["selector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"],
            "{file}: the PodDisruptionBudget must select the Deployment's pods"
        );
        for container in deployment["spec"]["template"]["spec"]["containers"].as_vec().into_iter().flatten() {
            let name = container["name"].as_str().unwrap_or("?");
            if name != "app" {
                assert!(
                    container["resources"]["requests"]["memory"].as_str().is_some(),
                    "{file}: {name} has no memory request"
                );
            }
        }
        let text = read(file);
        assert!(text.contains("path: /healthz") && text.contains("path: /readyz"), "{file} lacks the probes");
    }
    // The configs they ship start the real processes (the agent's [[encrypt]]
    // rule with a key, as the Secret would give it).
    let key = format!("k1:{}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]));
    let coordinator =
        start_shipped(&t, "coordinator", &config_map("k8s/coordinator.yaml", "coordinator.toml"), &[]).await;
    let agent = start_shipped(
        &t,
        "node-agent",
        &config_map("k8s/app-with-agent.yaml", "agent.toml"),
        &[("DCC_AGENT_ENCRYPTION_KEYS", key), ("DCC_AGENT_NODE_ID", "shipped-agent".into())],
    )
    .await;

    // Traffic, so that every labelled series exists, then one scrape of each.
    let app = "app-secret-change-me";
    let put = t.http.put(agent.url("/v1/cache/acme/k")).bearer_auth(app).body("v").send().await.expect("PUT");
    assert_eq!(put.status(), 204);
    let get = t.http.get(agent.url("/v1/cache/acme/k")).bearer_auth(app).send().await.expect("GET");
    assert_eq!(get.status(), 200);
    let event = serde_json::json!({"tenant": "acme", "entity": "supplier", "id": "1"});
    let url = coordinator.url("/v1/events?wait=all");
    let answer = t.http.post(url).bearer_auth(app).json(&event).send().await.expect("POST");
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap_or_default());
    let mut scraped = BTreeSet::new();
    for service in [&coordinator, &agent] {
        let text = t.http.get(service.url("/metrics")).send().await.expect("scrape").text().await.unwrap_or_default();
        scraped.extend(metric_names(&text));
    }
    assert!(scraped.contains("dcc_ready") && scraped.contains("dcc_redis_up"), "{scraped:?}");

    // Every metric the dashboard and the alerts name is one a process exports.
    let dashboard: serde_json::Value = serde_json::from_str(&read("grafana/dashboard.json")).expect("dashboard JSON");
    let mut exprs = String::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push_str(target["expr"].as_str().unwrap_or_default());
            exprs.push('\n');
        }
    }
    let rules = yaml("prometheus/alerts.yml");
    for group in rules[0]["groups"].as_vec().into_iter().flatten() {
        for rule in group["rules"].as_vec().into_iter().flatten() {
            exprs.push_str(rule["expr"].as_str().unwrap_or_else(|| panic!("a rule without expr: {rule:?}")));
            exprs.push('\n');
        }
    }
    let named = metric_names(&exprs);
    assert!(named.len() >= 15, "the dashboard and alerts name only {named:?}");
    let unknown: Vec<&String> = named.difference(&scraped).collect();
    assert!(unknown.is_empty(), "named but not exported: {unknown:?} (exported: {scraped:?})");

    // promtool, from Debian's prometheus package (make test installs it).
    let promtool = which("promtool").expect("promtool is not installed: run make test (it installs prometheus)");
    let out = std::process::Command::new(promtool)
        .arg("check")
        .arg("rules")
        .arg(deploy("prometheus/alerts.yml"))
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // systemd: each unit starts a binary of the workspace with --config.
    for (unit, binary) in
        [("systemd/dcc-coordinator.service", "coordinator"), ("systemd/dcc-node-agent.service", "node-agent")]
    {
        let text = read(unit);
        let exec =
            text.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap_or_else(|| panic!("{unit}: no ExecStart"));
        assert!(exec.starts_with(&format!("/usr/local/bin/{binary} --config ")), "{unit}: {exec}");
        assert!(bin_path(binary).exists(), "{binary} is not a binary of the workspace");
        assert!(text.contains("KillSignal=SIGTERM") && text.contains("RestartPreventExitStatus=2"), "{unit}");
    }
}
