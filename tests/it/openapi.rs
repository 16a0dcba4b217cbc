//! docs/openapi.json against the server: the same routes, and every answer
//! matching the schema documented for its status.

use crate::common;

use std::collections::BTreeSet;

use common::{Fixtures, Pipes};
use serde_json::Value;

const TOKEN: &str = "openapi-token-0123456789";

fn spec() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn spec_operations(spec: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.insert((path.clone(), method.to_ascii_uppercase()));
        }
    }
    ops
}

#[test]
fn the_spec_lists_exactly_the_server_routes() {
    let from_server: BTreeSet<(String, String)> =
        pipes::api::Endpoint::ALL.iter().flat_map(|e| e.methods().iter().map(move |m| (e.path().to_owned(), m.to_string()))).collect();
    assert_eq!(spec_operations(&spec()), from_server);
}

/// Checks one answer against the spec: status documented, body valid.
fn check(spec: &Value, path: &str, method: &str, status: u16, body: &Value) {
    let op = &spec["paths"][path][method.to_ascii_lowercase()];
    let response = &op["responses"][status.to_string()];
    assert!(response.is_object(), "{method} {path} answered {status}, which the spec does not document: {body}");
    let mut schema = response["content"]["application/json"]["schema"].clone();
    assert!(schema.is_object(), "{method} {path} {status} has no JSON schema");
    schema["components"] = spec["components"].clone();
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let errors: Vec<String> = validator.iter_errors(body).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "{method} {path} {status}: {errors:?}\n{body}");
}

#[tokio::test]
async fn every_operation_answers_as_documented() {
    if common::skip() {
        return;
    }
    let spec = spec();
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN))]);
    let host = f.host("app", "v1", "example.com");
    let client = pipes.client(&host);
    let domain_client = pipes.client("example.com");
    let mut exercised = BTreeSet::new();

    let hook = format!(r#"{{"events":[{{"action":"push","target":{{"repository":"{}/app","tag":"v1"}}}}]}}"#, f.user);
    // (method, path + query, body, expected status)
    let calls: Vec<(&str, &str, Option<&str>, u16)> = vec![
        ("GET", "/__proxyapi/container", None, 200),
        ("GET", "/__proxyapi/repository/config", None, 200),
        ("PUT", "/__proxyapi/repository/config", Some(r#"{"env":{"APP_LAYER":"repository"}}"#), 200),
        (
            "PUT",
            "/__proxyapi/container/config",
            Some(r#"{"env":{"APP_LAYER":"tag"},"memory":"64m","watch":"off","access":{"allow_ips":["127.0.0.1/32"]},"noindex":false}"#),
            200,
        ),
        ("PUT", "/__proxyapi/container/config", Some("{\"port\": 80,"), 400),
        ("PUT", "/__proxyapi/container/config", Some(r#"{"port":"eighty"}"#), 422),
        ("GET", "/__proxyapi/container/config", None, 200),
        ("GET", "/__proxyapi/container/logs?tail=5", None, 200),
        ("GET", "/__proxyapi/container/logs?tail=none", None, 400),
        ("POST", "/__proxyapi/container/share", Some(r#"{"ttl":"1h"}"#), 200),
        ("POST", "/__proxyapi/container/share", Some(r#"{"ttl":"90d"}"#), 422),
        ("POST", "/__proxyapi/container/share/revoke", None, 200),
        ("POST", "/__proxyapi/password-hash", Some(r#"{"password":"s3cret"}"#), 200),
        ("POST", "/__proxyapi/password-hash", Some(r#"{"password":""}"#), 422),
        ("POST", "/__proxyapi/container/restart", None, 200),
        ("POST", "/__proxyapi/container/redeploy", None, 200),
        ("POST", "/__proxyapi/container/rollback", None, 409),
        ("POST", "/__proxyapi/hooks/registry", Some(&hook), 202),
        ("POST", "/__proxyapi/hooks/registry", Some("{}"), 422),
        ("GET", "/__proxyapi/container/stop", None, 200),
        ("POST", "/__proxyapi/container/stop", None, 200),
        ("GET", "/__proxyapi/container", None, 200),
        ("DELETE", "/__proxyapi/container", None, 200),
        ("GET", "/__proxyapi/deployments", None, 200),
    ];
    for (method, target, body, expected) in calls {
        let (path, _) = target.split_once('?').unwrap_or((target, ""));
        let on_domain = matches!(path, "/__proxyapi/deployments" | "/__proxyapi/hooks/registry" | "/__proxyapi/password-hash");
        let (c, h) = if on_domain { (&domain_client, "example.com") } else { (&client, host.as_str()) };
        let mut req = c.request(method.parse().unwrap(), pipes.url(h, target)).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_owned());
        }
        let (status, value) = common::json(req.send().await.unwrap()).await;
        assert_eq!(status, expected, "{method} {target}: {value}");
        check(&spec, path, method, status, &value);
        exercised.insert((path.to_owned(), method.to_owned()));
    }
    // The event stream: its errors are JSON as documented; its answer is the stream.
    let resp = domain_client.get(pipes.url("example.com", "/__proxyapi/events")).bearer_auth("wrong-token-0123456789").send().await.unwrap();
    let (status, value) = common::json(resp).await;
    assert_eq!(status, 401, "{value}");
    check(&spec, "/__proxyapi/events", "GET", status, &value);
    let resp = domain_client.get(pipes.url("example.com", "/__proxyapi/events")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    exercised.insert(("/__proxyapi/events".to_owned(), "GET".to_owned()));
    // Errors every operation documents.
    let (status, value) = common::json(client.get(pipes.url(&host, "/__proxyapi/container")).send().await.unwrap()).await;
    check(&spec, "/__proxyapi/container", "GET", status, &value);

    assert_eq!(exercised, spec_operations(&spec), "every documented operation was exercised");
}
