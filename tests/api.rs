//! The management API at /__proxyapi against the real engine.

mod common;

use common::{json, Fixtures, Pipes};

const TOKEN: &str = "test-token-0123456789abcdef";

#[tokio::test]
async fn the_api_is_closed_without_a_token() {
    let pipes = Pipes::start(&[]);
    let (status, body) = json(pipes.get("v1.app.alice.example.com", "/__proxyapi/container").await).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "api_closed");
    assert_eq!(body["setting"], "PIPES_API_TOKEN");
}

#[tokio::test]
async fn container_state_with_a_token() {
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN))]);
    let host = f.host("app", "v1", "example.com");
    let client = pipes.client(&host);
    let api = pipes.url(&host, "/__proxyapi/container");

    let (status, body) = json(client.get(&api).send().await.unwrap()).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = json(client.get(&api).bearer_auth("wrong-token-0123456789").send().await.unwrap()).await;
    assert_eq!(status, 401);

    // Asking does not start anything.
    let (status, body) = json(client.get(&api).bearer_auth(TOKEN).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "absent");
    assert_eq!(body["deployment"], format!("{}/app:v1", f.user));
    assert_eq!(body["image"], f.reference("app", "v1"));
    assert!(pipes.containers().is_empty());

    assert_eq!(client.get(pipes.url(&host, "/")).send().await.unwrap().status(), 200);
    let (status, body) = json(client.get(&api).bearer_auth(TOKEN).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "running");
    assert_eq!(body["container"]["id"], pipes.containers()[0].as_str());
    assert_eq!(body["container"]["port"], 80);
    assert!(body["upstream"].as_str().unwrap().starts_with("127.0.0.1:"), "{body}");
    assert!(body["last_request_at"].as_str().is_some(), "{body}");
    assert!(body["image_id"].as_str().unwrap().starts_with("sha256:"), "{body}");

    // The API is answered by Pipes, never forwarded to the container.
    let (status, body) = json(client.get(pipes.url(&host, "/__proxyapi/nope")).bearer_auth(TOKEN).send().await.unwrap()).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "unknown_api_path");
    assert!(body["known"].as_array().unwrap().iter().any(|k| k == "/__proxyapi/container"));

    let resp = client.post(&api).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET, HEAD, DELETE");
}
