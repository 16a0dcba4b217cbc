//! Settings as the operator writes them, and the one line a bad one prints.

use super::*;
use crate::route::{Domain, HostStyle};

fn sources(vars: &[(&str, &str)]) -> Sources {
    Sources { env: vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), ..Sources::default() }
}

fn load_with(args: &[&str], vars: &[(&str, &str)]) -> Result<Settings, SettingError> {
    let args = std::iter::once("pipes").chain(args.iter().copied());
    match Settings::from_sources(args, &sources(vars)) {
        Ok(s) => Ok(s),
        Err(LoadError::Setting(e)) => Err(e),
        Err(LoadError::Info(text)) => panic!("unexpected help: {text}"),
    }
}

#[test]
fn https_needs_certificates_and_acme_a_domain() {
    let e = load(&[("PIPES_TLS_LISTEN", "127.0.0.1:8443")]).unwrap_err();
    assert_eq!(e.name, "PIPES_TLS_LISTEN");
    let e = load(&[("PIPES_TLS_LISTEN", "127.0.0.1:8443"), ("PIPES_TLS_CERT", "/c.pem")]).unwrap_err();
    assert_eq!(e.name, "PIPES_TLS_KEY");
    let e = load(&[("PIPES_TLS_CERT", "/c.pem"), ("PIPES_TLS_KEY", "/k.pem")]).unwrap_err();
    assert_eq!(e.name, "PIPES_TLS_CERT");
    let acme = [("PIPES_TLS_LISTEN", "127.0.0.1:8443"), ("PIPES_ACME_DIRECTORY", "https://127.0.0.1:14000/dir")];
    assert_eq!(load(&acme).unwrap_err().name, "PIPES_ACME_DIRECTORY");
    let s = load(&[acme[0], acme[1], ("PIPES_DOMAIN", "example.com"), ("PIPES_HTTPS_REDIRECT", "true")]).unwrap();
    let tls = s.tls.unwrap();
    assert_eq!(tls.acme.unwrap().max_per_hour, 20);
    assert_eq!(s.https_redirect, Some(8443), "redirects go to the HTTPS listener's port");
    let e = load(&[("PIPES_ACME_DIRECTORY", "http://ca.example/dir")]).unwrap_err();
    assert_eq!(e.name, "PIPES_ACME_DIRECTORY");
    assert_eq!(load(&[("PIPES_HTTPS_REDIRECT", "true")]).unwrap().https_redirect, Some(443));
    assert_eq!(load(&[("PIPES_HOST_STYLE", "flat")]).unwrap().hosts.style, HostStyle::Flat);
    assert_eq!(load(&[("PIPES_HOST_STYLE", "wide")]).unwrap_err().name, "PIPES_HOST_STYLE");
    assert_eq!(load(&[("PIPES_ACCESS_LOG", "json")]).unwrap().access_log, AccessLog::Json);
    assert_eq!(load(&[("PIPES_ACCESS_LOG", "yes")]).unwrap_err().name, "PIPES_ACCESS_LOG");
    let metrics = load(&[("PIPES_METRICS_LISTEN", "127.0.0.1:9100")]).unwrap().metrics.unwrap();
    assert_eq!((metrics.listen.len(), metrics.max_deployments), (1, 500));
}

fn load(vars: &[(&str, &str)]) -> Result<Settings, SettingError> {
    load_with(&[], vars)
}

#[test]
fn defaults_are_safe() {
    let s = load(&[]).unwrap();
    assert_eq!(s.listen, vec!["0.0.0.0:8080".parse().unwrap()]);
    assert_eq!(s.hosts, Hosts::dotted(Domain::Levels(2)));
    assert_eq!(s.docker.network, None);
    assert!(s.policy.patterns().is_empty(), "nothing may be deployed by default");
    assert!(matches!(s.api_auth, ApiAuth::Tokens { admin: None }));
    assert!(s.docker.auth.is_none());
    assert_eq!(s.defaults.health_timeout, Duration::from_secs(60));
    assert_eq!(s.defaults.memory, ByteSize(512 << 20));
    assert_eq!(s.docker.registry_host, "docker.io");
    assert_eq!(s.defaults.watch, None, "no registry polling unless asked");
    assert_eq!(s.drain_timeout, Duration::from_secs(30));
    assert_eq!(load(&[("PIPES_WATCH", "5m")]).unwrap().defaults.watch, Some(Duration::from_secs(300)));
    assert_eq!(s.connections.header_timeout, Duration::from_secs(10));
    assert_eq!(s.connections.max_header_size, 64 << 10);
}

#[test]
fn ceilings_default_to_the_host_and_bound_the_defaults() {
    let s = load(&[]).unwrap();
    assert_eq!((s.ceilings.memory, s.ceilings.cpus, s.ceilings.pids), (ByteSize(8 << 30), 2.0, 4096));
    assert!(s.ceilings.capabilities.is_empty(), "no capability beyond the base set unless allowed");
    let s = load(&[
        ("PIPES_MAX_MEMORY", "1g"),
        ("PIPES_MAX_CPUS", "0.5"),
        ("PIPES_DEFAULT_CPUS", "0.25"),
        ("PIPES_ALLOWED_CAPABILITIES", "net_raw, CAP_SYS_PTRACE"),
    ])
    .unwrap();
    assert_eq!((s.ceilings.memory, s.ceilings.cpus), (ByteSize(1 << 30), 0.5));
    assert_eq!(s.ceilings.capabilities, ["NET_RAW", "SYS_PTRACE"]);
    assert_eq!(load(&[("PIPES_MAX_PIDS", "100")]).unwrap_err().name, "PIPES_MAX_PIDS");
    assert_eq!(load(&[("PIPES_MAX_MEMORY", "256m")]).unwrap_err().name, "PIPES_DEFAULT_MEMORY");
    assert_eq!(load(&[("PIPES_MAX_CPUS", "0.5")]).unwrap_err().name, "PIPES_DEFAULT_CPUS");
}

#[test]
fn the_connection_cap_follows_the_open_files_limit() {
    let with_files = |n| Sources { open_files: Some(n), ..Sources::default() };
    let cap = |src: &Sources| match Settings::from_sources(["pipes"], src) {
        Ok(s) => s.connections.max_connections,
        Err(e) => panic!("{e:?}"),
    };
    assert_eq!(cap(&with_files(256)), 48, "a quarter of what is left after a reserve");
    assert_eq!(cap(&with_files(1 << 20)), 100_000);
    let mut set = with_files(256);
    set.env.insert("PIPES_MAX_CONNECTIONS".into(), "500".into());
    assert_eq!(cap(&set), 500, "the setting wins");
}

#[test]
fn published_ports_are_asked_for_without_a_network() {
    assert!(!load(&[]).expect("valid").docker.publish_ports, "off by default");
    assert!(load(&[("PIPES_PUBLISH_PORTS", "true")]).expect("valid").docker.publish_ports);
    let e = load(&[("PIPES_PUBLISH_PORTS", "true"), ("PIPES_NETWORK", "pipes")]).unwrap_err();
    assert_eq!(e.name, "PIPES_PUBLISH_PORTS", "{e}");
}

#[test]
fn swarm_needs_the_network_its_services_and_pipes_share() {
    let e = load(&[("PIPES_BACKEND", "swarm")]).unwrap_err();
    assert_eq!(e.name, "PIPES_NETWORK", "{e}");
    let settings = load(&[("PIPES_BACKEND", "swarm"), ("PIPES_NETWORK", "pipes")]).expect("valid");
    assert_eq!((settings.backend, settings.docker.network.as_deref()), (BackendKind::Swarm, Some("pipes")));
    assert_eq!(load(&[]).expect("valid").backend, BackendKind::Docker, "docker by default");
}

#[test]
fn bad_values_name_the_variable_in_one_line() {
    let cases = [
        ("PIPES_LISTEN", "nope"),
        ("DOMAINLEVELS", "zero"),
        ("DOMAINLEVELS", "0"),
        ("PIPES_DOMAIN", "a..b"),
        ("PIPES_REGISTRY", "https://r.example.com"),
        ("PIPES_ALLOW", "alice"),
        ("PIPES_ALLOW", "al.ice/*"),
        ("DOCKER_HOST", "ssh://x"),
        ("DOCKER_AUTH", "maybe"),
        ("PIPES_START_TIMEOUT", "soon"),
        ("PIPES_FAILURE_TTL", "3d"),
        ("PIPES_INSTANCE", "Has Space"),
        ("PIPES_LABELS", "pipes.managed=x"),
        ("PIPES_API_TOKEN", "short"),
        ("PIPES_API_AUTH", "maybe"),
        ("PIPES_MAX_CONTAINERS", "0"),
        ("PIPES_MAX_PULLS", "many"),
        ("PIPES_DEFAULT_MEMORY", "1k"),
        ("PIPES_DEFAULT_CPUS", "-1"),
        ("PIPES_NETWORK", "a b"),
        ("PIPES_WATCH", "often"),
        ("PIPES_WATCH", "100ms"),
        ("PIPES_DRAIN_TIMEOUT", "forever"),
        ("PIPES_HEADER_TIMEOUT", "0"),
        ("PIPES_MAX_HEADER_SIZE", "10"),
        ("PIPES_MAX_CONNECTIONS", "none"),
        ("PIPES_KEEPALIVE_TIMEOUT", "later"),
        ("PIPES_PULL_TIMEOUT", "never"),
        ("PIPES_MAX_STARTS_PER_CLIENT", "0"),
        ("PIPES_MAX_STREAMS_PER_CLIENT", "none"),
        ("PIPES_MAX_NOT_RUNNING", "-3"),
        ("PIPES_MAX_MEMORY", "1k"),
        ("PIPES_MAX_CPUS", "0"),
        ("PIPES_TRUSTED_PROXIES", "lb.example.com"),
        ("PIPES_ALLOWED_CAPABILITIES", "net raw"),
        ("PIPES_MAX_PIDS", "lots"),
        ("PIPES_BACKEND", "kubernetes"),
    ];
    for (name, value) in cases {
        let e = load(&[(name, value)]).unwrap_err();
        assert_eq!(e.name, name, "{name}={value}: {e}");
        assert!(!e.to_string().contains('\n'), "{e}");
        assert!(!e.message.is_empty(), "{e}");
    }
    // A bad flag names the variable it stands for.
    let e = load_with(&["--listen", "nope"], &[]).unwrap_err();
    assert_eq!(e.name, "PIPES_LISTEN", "{e}");
    assert!(e.message.contains("nope"), "{e}");
    let e = load_with(&["--no-such-flag"], &[]).unwrap_err();
    assert!(!e.to_string().contains('\n'), "{e}");
}

#[test]
fn flags_win_over_environment_and_empty_is_unset() {
    let s = load_with(&["--listen", "127.0.0.1:9000"], &[("PIPES_LISTEN", "0.0.0.0:1")]).unwrap();
    assert_eq!(s.listen, vec!["127.0.0.1:9000".parse().unwrap()]);
    let s = load(&[("PIPES_LISTEN", "127.0.0.1:9001")]).unwrap();
    assert_eq!(s.listen, vec!["127.0.0.1:9001".parse().unwrap()]);
    let s = load(&[("PIPES_ALLOW", " "), ("PIPES_LISTEN", "")]).unwrap();
    assert!(s.policy.patterns().is_empty());
    assert_eq!(s.listen, vec!["0.0.0.0:8080".parse().unwrap()]);
}

#[test]
fn values_can_come_from_files() {
    let dir = std::env::temp_dir().join(format!("pipes-settings-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("password");
    std::fs::write(&file, "s3cret\n").unwrap();
    let path = file.to_str().unwrap();
    let s = load(&[("DOCKER_AUTH", "true"), ("DOCKER_AUTH_USERNAME", "alice"), ("DOCKER_AUTH_PASSWORD_FILE", path)]).unwrap();
    let auth = s.docker.auth.unwrap();
    assert_eq!(auth.password.expose(), "s3cret");
    assert!(!format!("{auth:?}").contains("s3cret"));
    let both = load(&[("DOCKER_AUTH_PASSWORD", "x"), ("DOCKER_AUTH_PASSWORD_FILE", path)]).unwrap_err();
    assert_eq!(both.name, "DOCKER_AUTH_PASSWORD");
    let missing = load(&[("PIPES_API_TOKEN_FILE", "/nonexistent/token")]).unwrap_err();
    assert_eq!(missing.name, "PIPES_API_TOKEN");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn help_names_the_variables_and_hides_their_values() {
    let args = ["pipes", "--help"];
    let text = match Settings::from_sources(args, &sources(&[("PIPES_API_TOKEN", "top-secret-token-123")])) {
        Err(LoadError::Info(text)) => text,
        other => panic!("{other:?}"),
    };
    assert!(text.contains("[env: PIPES_API_TOKEN]"), "{text}");
    assert!(text.contains("[env: DOMAINLEVELS]"), "{text}");
    assert!(!text.contains("top-secret-token-123"), "{text}");
}

#[test]
fn auth_needs_user_and_password() {
    assert_eq!(load(&[("DOCKER_AUTH", "true")]).unwrap_err().name, "DOCKER_AUTH_USERNAME");
    assert!(load(&[("DOCKER_AUTH", "false"), ("DOCKER_AUTH_USERNAME", "a")]).unwrap().docker.auth.is_none());
}

#[test]
fn domain_settings() {
    assert_eq!(load(&[("DOMAINLEVELS", "3")]).unwrap().hosts.domain, Domain::Levels(3));
    assert_eq!(load(&[("PIPES_DOMAIN", "Pipe.Example.com")]).unwrap().hosts.domain, Domain::Suffix("pipe.example.com".into()));
    assert_eq!(load(&[("PIPES_DOMAIN", "pipe.example.com"), ("DOMAINLEVELS", "2")]).unwrap_err().name, "DOMAINLEVELS");
}

#[test]
fn the_registry_names_the_credentials_host() {
    let s = load(&[("PIPES_REGISTRY", "127.0.0.1:5000/")]).unwrap();
    assert_eq!(s.registry.as_deref(), Some("127.0.0.1:5000"));
    assert_eq!(s.docker.registry_host, "127.0.0.1:5000");
    let s = load(&[("PIPES_REGISTRY", "registry.example.com/team")]).unwrap();
    assert_eq!(s.docker.registry_host, "registry.example.com");
}

#[test]
fn access_defaults_are_checked_as_configs_are() {
    let s = load(&[]).unwrap();
    assert!(s.defaults.access.is_open() && s.defaults.noindex, "open, not indexed");
    assert_eq!(s.access.forward_auth_timeout, std::time::Duration::from_secs(5));
    assert!(s.access.forward_auth_urls.is_empty(), "no config may name an auth server unless the operator says");
    let s = load(&[("PIPES_ACCESS", r#"{"allow_ips":["10.0.0.0/8"]}"#), ("PIPES_NOINDEX", "false")]).unwrap();
    assert_eq!((s.defaults.access.allow_ips.len(), s.defaults.noindex), (1, false));
    let e = load(&[("PIPES_ACCESS", r#"{"basic":{"alice":"s3cret"}}"#)]).unwrap_err();
    assert_eq!(e.name, "PIPES_ACCESS");
    assert!(e.message.contains("access.basic.alice"), "{e}");
    assert_eq!(load(&[("PIPES_ACCESS", "{")]).unwrap_err().name, "PIPES_ACCESS");
    assert_eq!(load(&[("PIPES_FORWARD_AUTH_URLS", "http://auth")]).unwrap_err().name, "PIPES_FORWARD_AUTH_URLS", "a prefix ends its host");
    let urls = load(&[("PIPES_FORWARD_AUTH_URLS", "http://127.0.0.1:4180/oauth2/, https://auth.example.com/")]).unwrap().access.forward_auth_urls;
    assert_eq!(urls.len(), 2);

    let dir = std::env::temp_dir().join(format!("pipes-settings-access-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("access.json");
    std::fs::write(&file, "{\"allow_ips\": [\"127.0.0.1\"]}\n").unwrap();
    let s = load(&[("PIPES_ACCESS_FILE", file.to_str().unwrap())]).unwrap();
    assert_eq!(s.defaults.access.allow_ips, ["127.0.0.1"]);
    std::fs::remove_dir_all(dir).unwrap();
}
