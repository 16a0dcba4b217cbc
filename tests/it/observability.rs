//! What operators watch: the metrics endpoint, checked by `promtool` and
//! scraped by a real Prometheus server, and the JSON access log.

use crate::common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, json, sample, unique, Fixtures, Pipes};

const DOMAIN: &str = "example.com";

fn scrape(port: u16) -> String {
    let out = Command::new("curl").args(["-sSf", &format!("http://127.0.0.1:{port}/metrics")]).output().expect("curl runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn metrics_pass_promtool_and_a_prometheus_server_scrapes_them() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let metrics_port = free_port();
    let pipes = Pipes::start(&[("PIPES_METRICS_LISTEN", Some(&format!("127.0.0.1:{metrics_port}"))), ("PIPES_METRICS_MAX_DEPLOYMENTS", Some("1"))]);
    let host = f.host("app", "v1", DOMAIN);
    let deployment = format!("{}/app:v1", f.user);
    for _ in 0..3 {
        assert_eq!(pipes.get(&host, "/").await.status(), 200);
    }
    assert_eq!(pipes.get(&f.host("app", "missing", DOMAIN), "/").await.status(), 404);
    assert_eq!(pipes.get("localhost", "/").await.status(), 404);

    let text = scrape(metrics_port);
    let mut check = Command::new("promtool").args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    check.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(checked.status.success(), "promtool: {}{}\n{text}", String::from_utf8_lossy(&checked.stdout), String::from_utf8_lossy(&checked.stderr));

    let requests = format!("pipes_requests_total{{deployment=\"{deployment}\",code=\"200\"}}");
    assert_eq!(sample(&text, &requests), Some(3.0), "{text}");
    assert_eq!(sample(&text, &format!("pipes_cold_starts_total{{deployment=\"{deployment}\",outcome=\"ready\"}}")), Some(1.0), "{text}");
    // The missing image took no label of its own: the one label went to app:v1.
    assert_eq!(sample(&text, "pipes_requests_total{deployment=\"other\",code=\"404\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "pipes_requests_total{deployment=\"none\",code=\"404\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "pipes_deployments{state=\"running\"}"), Some(1.0), "{text}");
    for phase in ["pull", "create", "start", "probe"] {
        let count = sample(&text, &format!("pipes_cold_start_phase_seconds_count{{phase=\"{phase}\"}}")).unwrap_or(0.0);
        assert!(count >= 1.0, "phase {phase} timed: {text}");
    }
    assert!(sample(&text, "process_resident_memory_bytes").is_some_and(|b| b > 1e6), "{text}");
    assert!(sample(&text, &format!("pipes_request_duration_seconds_count{{deployment=\"{deployment}\"}}")) == Some(3.0), "{text}");

    // A real Prometheus server scrapes it.
    let dir = std::env::temp_dir().join(unique("pipes-prometheus-"));
    std::fs::create_dir_all(&dir).unwrap();
    let config =
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: pipes\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n");
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let web = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("prometheus runs");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let query = format!("http://127.0.0.1:{web}/api/v1/query?query=sum(pipes_requests_total{{code=\"200\"}})");
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen = loop {
        // Prometheus answers 503 in plain text until it is ready.
        if let Ok(resp) = client.get(&query).send().await.and_then(|r| r.error_for_status()) {
            let (_, body) = json(resp).await;
            if let Some(v) = body["data"]["result"][0]["value"][1].as_str() {
                break v.to_owned();
            }
        }
        if Instant::now() > deadline {
            let _ = prometheus.kill();
            panic!("prometheus never scraped Pipes:\n{}", std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(seen, "3", "Prometheus read the requests Pipes counted");
}

#[tokio::test]
async fn the_access_log_has_a_json_line_per_request() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let pipes = Pipes::start(&[("PIPES_ACCESS_LOG", Some("json"))]);
    let host = f.host("app", "v1", DOMAIN);
    assert_eq!(pipes.get(&host, "/first?token=secret-in-query").await.status(), 200);
    assert_eq!(pipes.get(&host, "/second").await.status(), 200);
    assert_eq!(pipes.get("localhost", "/nowhere").await.status(), 404);

    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines: Vec<serde_json::Value> = pipes.log().lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
        if lines.len() >= 3 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(lines.len(), 3, "{}", pipes.log());
    // A line is written when its request has ended, which the client may see
    // after it sent the next one: find each by its path.
    let by_path = |path: &str| lines.iter().find(|l| l["path"] == path).unwrap_or_else(|| panic!("no line for {path}: {lines:?}"));
    let (first, second, third) = (by_path("/first"), by_path("/second"), by_path("/nowhere"));
    assert_eq!(first["path"], "/first", "the query is never logged");
    assert_eq!(first["status"], 200);
    assert_eq!(first["cold_start"], true);
    assert_eq!(first["deployment"], format!("{}/app:v1", f.user));
    assert_eq!(first["host"], host);
    assert_eq!(first["method"], "GET");
    assert_eq!(first["client"], "127.0.0.1");
    assert_eq!(first["upstream"], format!("{}:80", pipes.container_ip(&pipes.containers()[0])), "{first}");
    assert!(first["duration"].as_f64().is_some_and(|d| d > 0.0));
    assert!(first["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(second["cold_start"], false);
    assert!(second["bytes"].as_u64().is_some_and(|b| b > 0));
    assert_eq!(third["status"], 404);
    assert_eq!(third["deployment"], serde_json::Value::Null);
    assert!(!pipes.log().contains("secret-in-query"));
}
