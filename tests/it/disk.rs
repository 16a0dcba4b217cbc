//! The engine's disk: below `PIPES_DISK_MIN_FREE` a cold start that needs
//! a pull is a 507, while what runs keeps answering and what is stopped
//! with its image here still starts; images Pipes pulled and nothing uses
//! are collected after `PIPES_IMAGE_KEEP`, or at once above `PIPES_DISK_HIGH`.

use crate::common;

use std::time::Duration;

use common::{api, eventually, free_port, image_present, sample, Fixtures, Pipes};

const TOKEN: &str = "disk-token-0123456789";
const DOMAIN: &str = "example.com";

/// `app:v1` and `app:v2` published, and Pipes with metrics and `extra` settings.
fn two_apps(extra: &[(&str, Option<&str>)]) -> (Fixtures, String, Pipes) {
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    f.serving("app", "v2");
    let metrics_listen = format!("127.0.0.1:{}", free_port());
    let mut settings = vec![("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_METRICS_LISTEN", Some(metrics_listen.as_str()))];
    settings.extend_from_slice(extra);
    let pipes = Pipes::start(&settings);
    (f, metrics_listen, pipes)
}

#[tokio::test]
async fn a_nearly_full_disk_refuses_pulls_and_nothing_else() {
    if common::skip() {
        return;
    }
    let (f, metrics_listen, mut pipes) = two_apps(&[]);
    let (v1, v2) = (f.host("app", "v1", DOMAIN), f.host("app", "v2", DOMAIN));
    assert_eq!(pipes.get(&v1, "/").await.status(), 200);

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

#[tokio::test]
async fn images_nothing_uses_are_collected_and_a_stopped_containers_stays() {
    if common::skip() {
        return;
    }
    let (f, metrics_listen, pipes) = two_apps(&[("PIPES_IMAGE_KEEP", Some("1s"))]);
    let (v1, v2) = (f.host("app", "v1", DOMAIN), f.host("app", "v2", DOMAIN));
    for host in [&v1, &v2] {
        assert_eq!(pipes.get(host, "/").await.status(), 200);
    }
    // v2 stopped keeps its container, and so its image; v1 deleted leaves its image unused.
    assert_eq!(api(&pipes, &v2, "POST", "/__proxyapi/container/stop", None, Some(TOKEN)).await.0, 200);
    assert_eq!(api(&pipes, &v1, "DELETE", "/__proxyapi/container", None, Some(TOKEN)).await.0, 200);
    eventually("v1's image is collected", Duration::from_secs(30), || async { !image_present(&f.reference("app", "v1")) }).await;
    // Two more passes at least (every 3 s): the stopped container's image stays.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(image_present(&f.reference("app", "v2")), "an image a stopped container uses stays");
    let text = reqwest::get(format!("http://{metrics_listen}/metrics")).await.unwrap().text().await.unwrap();
    assert_eq!(sample(&text, r#"pipes_images_removed_total{reason="unused"}"#), Some(1.0), "{text}");
    assert_eq!(sample(&text, r#"pipes_images{state="used"}"#), Some(1.0), "{text}");
    assert!(sample(&text, "pipes_image_bytes").is_some_and(|b| b > 0.0), "{text}");
    // The next request pulls it again.
    assert_eq!(pipes.get(&v1, "/").await.status(), 200);
}

#[tokio::test]
async fn a_disk_above_its_high_mark_is_cleared_of_unused_images_at_once() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    f.serving("app", "v2");
    // No disk here is under 1 % used; images would otherwise stay a day.
    let pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_DISK_HIGH", Some("1%"))]);
    let (v1, v2) = (f.host("app", "v1", DOMAIN), f.host("app", "v2", DOMAIN));
    for host in [&v1, &v2] {
        assert_eq!(pipes.get(host, "/").await.status(), 200);
    }
    assert!(image_present(&f.reference("app", "v1")), "used: kept whatever the disk");
    for host in [&v1, &v2] {
        assert_eq!(api(&pipes, host, "DELETE", "/__proxyapi/container", None, Some(TOKEN)).await.0, 200);
    }
    eventually("both images are collected", Duration::from_secs(30), || async {
        !image_present(&f.reference("app", "v1")) && !image_present(&f.reference("app", "v2"))
    })
    .await;
    let log = pipes.log();
    let at = |tag: &str| log.find(&format!("removed image {}", f.reference("app", tag)));
    assert!(at("v1").is_some() && at("v2").is_some(), "{log}");
    assert!(log.contains("disk"), "{log}");
}
