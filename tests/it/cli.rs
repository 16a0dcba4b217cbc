//! The `pipes` command line: help, checks and refusals, without an engine.

use crate::common;

use std::process::Command;

fn pipes(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pipes")).args(args).env_clear().envs(env.iter().copied()).output().expect("pipes runs")
}

#[test]
fn help_documents_every_variable() {
    let out = pipes(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "PIPES_LISTEN",
        "PIPES_DOMAIN",
        "DOMAINLEVELS",
        "PIPES_REGISTRY",
        "PIPES_NETWORK",
        "PIPES_CONFIG_DIR",
        "PIPES_ALLOW",
        "PIPES_API_TOKEN",
        "DOCKER_HOST",
        "DOCKER_AUTH",
        "DOCKER_AUTH_USERNAME",
        "DOCKER_AUTH_EMAIL",
        "DOCKER_AUTH_PASSWORD",
        "NAME_FILE",
    ] {
        assert!(help.contains(var), "--help does not mention {var}:\n{help}");
    }
}

#[test]
fn a_bad_value_stops_start_up_with_one_line() {
    let out = pipes(&[], &[("DOMAINLEVELS", "two")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("pipes: DOMAINLEVELS: expected a number"), "{err}");

    let out = pipes(&["--listen", "nowhere"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PIPES_LISTEN"));
}

#[test]
fn the_check_flag_validates_and_exits() {
    let out = pipes(&["-t", "--conf", concat!(env!("CARGO_MANIFEST_DIR"), "/conf/pipes.yaml")], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = pipes(&["-t", "--conf", "/nonexistent.yaml"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PIPES_SERVER_CONF"));
}

#[test]
fn an_address_that_cannot_be_bound_ends_the_process() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let addr = taken.local_addr().expect("bound").to_string();
    let config_dir = std::env::temp_dir().join(format!("pipes-cli-bind-{}", std::process::id()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipes"));
    cmd.env_clear().envs([("PIPES_LISTEN", addr.as_str()), ("DOCKER_HOST", "unix:///nonexistent.sock")]).env("PIPES_CONFIG_DIR", &config_dir);
    let (code, err) = common::exit_of(cmd, std::time::Duration::from_secs(20));
    let _ = std::fs::remove_dir_all(&config_dir);
    assert_eq!(code, Some(1), "Pipes did not exit with 1: {err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with(&format!("pipes: cannot listen on {addr} (PIPES_LISTEN)")), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    drop(taken);
}
