//! The disk guard against the engine: below `PIPES_DISK_MIN_FREE` a cold
//! start that needs a pull is a 507, while what runs keeps answering and
//! what is stopped with its image here still starts.

use crate::common;

use common::{api, free_port, sample, Fixtures, Pipes};

const TOKEN: &str = "disk-token-0123456789";
const DOMAIN: &str = "example.com";

#[tokio::test]
async fn a_nearly_full_disk_refuses_pulls_and_nothing_else() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    f.serving("app", "v2");
    let metrics = free_port();
    let metrics_listen = format!("127.0.0.1:{metrics}");
    let mut pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_METRICS_LISTEN", Some(&metrics_listen))]);
    let (v1, v2) = (f.host("app", "v1", DOMAIN), f.host("app", "v2", DOMAIN));
    assert_eq!(pipes.get(&v1, "/").await.status(), 200, "pulled with the default 5 %");

    // No disk here has 99 % free.
    pipes.set_env("PIPES_DISK_MIN_FREE", "99%");
    pipes.restart();
    assert_eq!(pipes.get(&v1, "/").await.status(), 200, "what runs keeps answering");
    let (status, body) = common::json(pipes.client(&v2).get(pipes.url(&v2, "/")).header("accept", "application/json").send().await.unwrap()).await;
    assert_eq!((status, body["error"].as_str()), (507, Some("insufficient_storage")), "{body}");
    assert!(body["retry_after"].is_u64(), "{body}");
    let resp = pipes.get(&v2, "/").await;
    assert!(resp.headers().contains_key("retry-after"));
    assert!(pipes.log().contains("less than PIPES_DISK_MIN_FREE (99%)"), "the operator is told why: {}", pipes.log());

    // Stopped, with its image here: it starts, nothing is pulled.
    let (status, _) = api(&pipes, &v1, "POST", "/__proxyapi/container/stop", None, Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(pipes.get(&v1, "/again").await.status(), 200);

    let text = reqwest::get(format!("http://{metrics_listen}/metrics")).await.unwrap().text().await.unwrap();
    assert!(sample(&text, "pipes_disk_free_bytes").is_some_and(|b| b > 0.0), "{text}");
}
