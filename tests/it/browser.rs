//! What people see, in headless Chromium over WebDriver: the waiting page
//! of a deployment that starts slowly or fails, and the event stream it
//! follows, read by curl.

use crate::common;

use std::time::Duration;

use common::browser::Browser;
use common::{Fixtures, Pipes};

const DOMAIN: &str = "example.com";

/// Where the README's screenshots are written.
fn screenshot(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots").join(name)
}

#[tokio::test]
async fn a_slow_start_shows_the_waiting_page_at_once_and_then_the_app() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.publish("app", "slow", "ENV FIXTURE_DELAY_MS=4000");
    let pipes = Pipes::start(&[]);
    let url = pipes.url(&f.host("app", "slow", DOMAIN), "/some/page?x=1");
    let browser = Browser::start().await;

    browser.goto(&url).await;
    let text = browser.text().await;
    assert!(text.contains(&format!("Starting {}/app:slow", f.user)), "the waiting page, at once: {text}");
    assert_eq!(browser.eval("return document.querySelector('main').dataset.state").await, "starting");
    browser.screenshot(&screenshot("waiting-page.png")).await;

    // No reload by the user: the page moves on to the app by itself, at the same URL.
    browser.until("the app answers in place of the page", Duration::from_secs(60), r#"return document.body.innerText.includes('"id":"slow"')"#).await;
    assert_eq!(browser.url().await, url);
    let text = browser.text().await;
    assert!(text.contains("\"id\""), "the fixture's JSON: {text}");
}

#[tokio::test]
async fn a_failed_start_is_explained_on_the_waiting_page() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.publish("app", "crash", "ENV FIXTURE_MODE=crash");
    // The page at once, so the failure arrives while it is shown; log lines
    // on it, as an operator may open them to everyone.
    let pipes = Pipes::start(&[("PIPES_WAITING_PAGE_AFTER", Some("0s")), ("PIPES_PUBLIC_LOGS", Some("true"))]);
    let browser = Browser::start().await;
    browser.goto(&pipes.url(&f.host("app", "crash", DOMAIN), "/")).await;
    browser.until("the failure is shown", Duration::from_secs(60), "return document.querySelector('main')?.dataset.state === 'failed'").await;
    let text = browser.text().await;
    assert!(text.contains("exited with code 3"), "the reason the error page gives: {text}");
    assert!(text.contains("crashing on purpose"), "its last log lines: {text}");
    browser.screenshot(&screenshot("waiting-page-failed.png")).await;
}

#[tokio::test]
async fn api_clients_and_head_wait_for_the_start_instead() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.publish("app", "slow", "ENV FIXTURE_DELAY_MS=2000");
    let pipes = Pipes::start(&[]);
    let host = f.host("app", "slow", DOMAIN);
    let api = pipes.client(&host).get(pipes.url(&host, "/")).header("accept", "application/json").send().await.unwrap();
    assert_eq!(api.status(), 200, "held until ready");
    let head = pipes.client(&host).head(pipes.url(&host, "/")).header("accept", "text/html").send().await.unwrap();
    assert_eq!(head.status(), 200);
}

#[tokio::test]
async fn the_event_stream_tells_a_start_phase_by_phase() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.publish("app", "v1", "ENV FIXTURE_DELAY_MS=500");
    let pipes = Pipes::start(&[("PIPES_API_TOKEN", Some("events-token-0123456789"))]);
    let host = f.host("app", "v1", DOMAIN);
    // curl follows the stream on the bare domain with the token, for 20 s at most.
    let curl = std::process::Command::new("curl")
        .args(["-sN", "--max-time", "20", "-H", "Authorization: Bearer events-token-0123456789"])
        .args(["--resolve", &format!("{DOMAIN}:{}:127.0.0.1", pipes.port), &pipes.url(DOMAIN, "/__proxyapi/events")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl runs");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = std::process::Command::new("kill").arg(curl.id().to_string()).status();
    let out = curl.wait_with_output().expect("curl ends");
    let stream = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = stream.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(names.first(), Some(&"deployments"), "{stream}");
    for expected in ["starting", "phase", "ready"] {
        assert!(names.contains(&expected), "no {expected} event: {stream}");
    }
    let ready = stream.lines().skip_while(|l| *l != "event: ready").nth(1).and_then(|l| l.strip_prefix("data: ")).expect("ready data");
    let ready: serde_json::Value = serde_json::from_str(ready).expect("JSON");
    assert_eq!(ready["deployment"], format!("{}/app:v1", f.user));
    assert!(ready["ms"].as_u64().is_some_and(|ms| ms >= 500), "the start took at least the fixture's delay: {ready}");
    for phase in ["pull", "create", "start", "probe"] {
        assert!(stream.contains(&format!("\"phase\":\"{phase}\"")), "phase {phase} told: {stream}");
    }

    // Without a token the bare domain tells nothing.
    let resp = pipes.get(DOMAIN, "/__proxyapi/events").await;
    assert_eq!(resp.status(), 401);
}

const ADMIN: &str = "dashboard-admin-token-0123456789";
const SCOPED: &str = "dashboard-scoped-token-0123456789";

/// Whether the dashboard shows `deployment` in `state`.
fn row_in(deployment: &str, state: &str) -> String {
    format!("return document.querySelector('tr[data-deployment=\"{deployment}\"]')?.dataset.state === '{state}'")
}

#[tokio::test]
async fn the_dashboard_signs_in_shows_rows_and_acts() {
    if common::skip() {
        return;
    }
    let (mut mine, mut theirs) = (Fixtures::new(), Fixtures::new());
    mine.serving("app", "v1");
    theirs.serving("app", "v1");
    let pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(ADMIN))]);
    let tokens = format!(r#"{{"tokens":[{{"name":"mine","users":["{}"],"token":"{SCOPED}"}}]}}"#, mine.user);
    std::fs::create_dir_all(pipes.dir.join("configs")).expect("config dir");
    std::fs::write(pipes.dir.join("configs/tokens.json"), tokens).expect("tokens.json");
    for f in [&mine, &theirs] {
        assert_eq!(pipes.get(&f.host("app", "v1", DOMAIN), "/").await.status(), 200);
    }
    let (ours, other) = (format!("{}/app:v1", mine.user), format!("{}/app:v1", theirs.user));
    let browser = Browser::start().await;
    let dashboard = pipes.url(DOMAIN, "/");

    // Without a token, nothing but the sign-in.
    browser.goto(&dashboard).await;
    assert_eq!(browser.eval("return document.querySelector('[data-fleet]').hidden").await, true);
    assert_eq!(browser.eval("return document.querySelectorAll('tr[data-deployment]').length").await, 0);

    // Signed in (Enter submits), every deployment, live.
    browser.type_into("input[type=password]", &format!("{ADMIN}\u{E007}")).await;
    browser.until("our row runs", Duration::from_secs(30), &row_in(&ours, "running")).await;
    browser.until("their row runs", Duration::from_secs(30), &row_in(&other, "running")).await;
    browser
        .until(
            "the row shows its image digest",
            Duration::from_secs(30),
            &format!("return !!document.querySelector('tr[data-deployment=\"{ours}\"] [data-cell=image] code')"),
        )
        .await;
    browser.screenshot(&screenshot("dashboard.png")).await;

    // Stop acts at once; the row follows the engine.
    browser.click(&format!("tr[data-deployment=\"{ours}\"] [data-action=stop]")).await;
    browser.until("the row says stopped", Duration::from_secs(30), &row_in(&ours, "stopped")).await;

    // A config the API refuses shows its error at the field.
    browser.click(&format!("tr[data-deployment=\"{ours}\"] [data-action=config]")).await;
    browser.until("the editor opens", Duration::from_secs(10), "return !!document.querySelector('form[data-layer=deployment] [name=memory]')").await;
    browser.type_into("form[data-layer=deployment] [name=memory]", "lots").await;
    browser.click("form[data-layer=deployment] button[type=submit]").await;
    browser
        .until(
            "the error is at the memory field",
            Duration::from_secs(10),
            "return document.querySelector('form[data-layer=deployment] [data-field=memory] .field-error').textContent.includes('memory')",
        )
        .await;

    // Delete asks with the browser's own confirm().
    browser.click(&format!("tr[data-deployment=\"{ours}\"] [data-action=delete]")).await;
    browser.accept_dialog().await;
    browser.until("the row says absent", Duration::from_secs(30), &row_in(&ours, "absent")).await;

    // A scoped token sees only its users' deployments.
    browser.click("[data-sign-out]").await;
    browser
        .until(
            "signed out",
            Duration::from_secs(10),
            "return document.querySelector('[data-sign-in]').hidden === false && document.querySelectorAll('tr[data-deployment]').length === 0",
        )
        .await;
    browser.type_into("input[type=password]", &format!("{SCOPED}\u{E007}")).await;
    browser.until("our row is shown", Duration::from_secs(30), &format!("return !!document.querySelector('tr[data-deployment=\"{ours}\"]')")).await;
    assert_eq!(
        browser.eval(&format!("return !!document.querySelector('tr[data-deployment=\"{other}\"]')")).await,
        false,
        "another user's deployment is not shown"
    );
}

#[tokio::test]
async fn a_private_deployment_is_made_and_shared_from_the_dashboard_and_opened_in_chromium() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(ADMIN))]);
    let host = f.host("app", "v1", DOMAIN);
    let deployment = format!("{}/app:v1", f.user);
    assert_eq!(pipes.get(&host, "/").await.status(), 200, "public until its config says otherwise");

    // Its repository expires what goes unused: the row will say when.
    let repository = pipes
        .client(&host)
        .put(pipes.url(&host, "/__proxyapi/repository/config"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body(r#"{"expire_after":"14d"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(repository.status(), 200);

    // The editor: a user and password become a bcrypt hash in the form (the
    // API hashes it); saving makes the deployment private.
    let dashboard = Browser::start().await;
    dashboard.goto(&pipes.url(DOMAIN, "/")).await;
    dashboard.type_into("input[type=password]", &format!("{ADMIN}\u{E007}")).await;
    dashboard.until("the row runs", Duration::from_secs(30), &row_in(&deployment, "running")).await;
    dashboard.click(&format!("tr[data-deployment=\"{deployment}\"] [data-action=config]")).await;
    let form = "form[data-layer=deployment]";
    dashboard.until("the editor opens", Duration::from_secs(10), &format!("return !!document.querySelector('{form} [name=\"access.basic\"]')")).await;
    dashboard.type_into(&format!("{form} [name=new-user]"), "alice").await;
    dashboard.type_into(&format!("{form} [name=new-password]"), "s3cret").await;
    dashboard.click(&format!("{form} [data-add-user]")).await;
    dashboard
        .until(
            "the hash is in the form",
            Duration::from_secs(10),
            &format!("return document.querySelector('{form} [name=\"access.basic\"]').value.startsWith('alice:$2b$')"),
        )
        .await;
    assert_eq!(dashboard.eval(&format!("return document.querySelector('{form} [name=\"new-password\"]').value")).await, "", "the password is not kept");
    dashboard.screenshot(&screenshot("dashboard-access.png")).await;
    dashboard.click(&format!("{form} button[type=submit]")).await;
    dashboard.until("saved", Duration::from_secs(30), &format!("return document.querySelector('{form} [data-status]').textContent === 'saved'")).await;
    assert_eq!(pipes.get(&host, "/").await.status(), 401, "private now");
    dashboard
        .until(
            "the row says when it expires",
            Duration::from_secs(10),
            &format!("return document.querySelector('tr[data-deployment=\"{deployment}\"]').dataset.expiresAt.length > 0 && document.querySelector('tr[data-deployment=\"{deployment}\"] [data-cell=last]').textContent.includes('expires')"),
        )
        .await;

    // Share: the link is shown.
    dashboard.click(&format!("tr[data-deployment=\"{deployment}\"] [data-action=share]")).await;
    dashboard.until("the link is shown", Duration::from_secs(10), "return !!document.querySelector('[data-share-url]')?.value").await;
    let link = dashboard.eval("return document.querySelector('[data-share-url]').value").await.as_str().expect("a link").to_owned();
    assert!(link.contains("pipes_share="), "{link}");

    // Another browser opens the link: the app, at the URL without the token,
    // with a cookie scripts cannot read.
    let guest = Browser::start().await;
    guest.goto(&link).await;
    guest.until("the app answers", Duration::from_secs(30), r#"return document.body.innerText.includes('"id":"v1"')"#).await;
    assert_eq!(guest.url().await, pipes.url(&host, "/"));
    assert_eq!(guest.eval("return document.cookie").await, "", "HttpOnly");
    guest.goto(&pipes.url(&host, "/again")).await;
    assert!(guest.text().await.contains(r#""path":"/again""#), "the cookie keeps it open");

    // A third opens it with credentials in the URL.
    let alice = Browser::start().await;
    alice.goto(&pipes.url(&host, "/").replacen("http://", "http://alice:s3cret@", 1)).await;
    alice.until("the app answers", Duration::from_secs(30), r#"return document.body.innerText.includes('"id":"v1"')"#).await;

    // Revoked from the dashboard: the guest's cookie no longer opens it.
    dashboard.click("[data-revoke]").await;
    dashboard.until("revoked", Duration::from_secs(10), "return document.querySelector('[data-share-status]').textContent.includes('revoked')").await;
    let resp = pipes
        .client(&host)
        .get(pipes.url(&host, "/"))
        .header("cookie", link.split_once("pipes_share=").map(|(_, t)| format!("pipes_share={t}")).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}
