//! Config writes survive kill -9 at any moment: the file holds the old config
//! or the new one, never a torn one.

use crate::common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{api, Pipes};
use pipes::config::DeployConfig;

const TOKEN: &str = "store-token-0123456789";
const HOST: &str = "v1.app.crashtest.example.com";

/// A pseudo-random delay from the clock; enough to land kills at varied moments.
fn jitter_ms(max: u64) -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    nanos % max
}

#[tokio::test]
async fn kill_9_during_config_writes_never_tears_a_file() {
    if common::skip() {
        return;
    }
    let mut pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_ALLOW", None)]);
    let file = pipes.dir.join("configs/repos/crashtest/app/repository.json");
    // Large values make each write take long enough to be cut.
    let filler = "x".repeat(256 * 1024);
    let sent = std::sync::Arc::new(std::sync::Mutex::new(vec!["seed".to_owned()]));
    // One whole write first, so that every kill lands on an existing file.
    let seed = format!(r#"{{"env":{{"APP_N":"seed","APP_FILL":"{filler}"}}}}"#);
    let (status, body) = api(&pipes, HOST, "PUT", "/__proxyapi/repository/config", Some(&seed), Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let mut kills = 0usize;
    for round in 0..8 {
        // Writers keep PUTs in flight; the kill lands in the middle of them.
        let writers: Vec<_> = (0..3)
            .map(|w| {
                let (client, url, sent, filler) = (pipes.client(HOST), pipes.url(HOST, "/__proxyapi/repository/config"), sent.clone(), filler.clone());
                tokio::spawn(async move {
                    for i in 0..10_000 {
                        let n = format!("{round}-{w}-{i}");
                        sent.lock().unwrap().push(n.clone());
                        let body = format!(r#"{{"env":{{"APP_N":"{n}","APP_FILL":"{filler}"}}}}"#);
                        if client.put(&url).bearer_auth(TOKEN).header("content-type", "application/json").body(body).send().await.is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(30 + jitter_ms(150))).await;
        pipes.kill9();
        kills += 1;
        for w in writers {
            w.abort();
        }

        let text = std::fs::read(&file).expect("the config file exists");
        let config = DeployConfig::from_json(&text).expect("the file is a whole config, never a torn one");
        let n = config.env.get("APP_N").expect("written by this test");
        assert!(sent.lock().unwrap().contains(n), "the file holds one of the configs sent: {n}");
        assert_eq!(config.env.get("APP_FILL").map(String::len), Some(filler.len()));

        pipes.restart();
        let (status, body) = api(&pipes, HOST, "GET", "/__proxyapi/repository/config", None, Some(TOKEN)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["config"]["env"]["APP_N"].as_str(), Some(n.as_str()), "Pipes reads what is on disk");
        let leftovers: Vec<_> =
            std::fs::read_dir(file.parent().unwrap()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains(".tmp-")).collect();
        assert!(leftovers.is_empty(), "temporary files are cleaned at start: {leftovers:?}");
    }
    let writes = sent.lock().unwrap().len();
    eprintln!("{writes} config writes started, {kills} kills with SIGKILL, no torn file");
}
