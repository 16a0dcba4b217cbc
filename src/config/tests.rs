//! Configs as users write them: accepted, refused with the field named, merged.

use super::*;

fn defaults() -> Defaults {
    Defaults {
        memory: ByteSize(512 << 20),
        cpus: 1.0,
        health_timeout: Duration::from_secs(60),
        watch: None,
        idle_action: IdleAction::Stop,
        pause_timeout: Duration::from_secs(3600),
        access: AccessConfig::default(),
        noindex: true,
        expire_after: None,
    }
}

/// The status and the field named (if any) of the answer to `body`.
fn status(body: &str) -> (u16, String) {
    match DeployConfig::from_json(body.as_bytes()) {
        Ok(_) => (200, String::new()),
        Err(e @ (PipesError::UnknownField { .. } | PipesError::InvalidField { .. })) => {
            let field = match &e {
                PipesError::UnknownField { field, .. } | PipesError::InvalidField { field, .. } => field.clone(),
                _ => unreachable!(),
            };
            (e.status(), field)
        }
        Err(e) => (e.status(), e.to_string()),
    }
}

#[test]
fn a_full_config_round_trips() {
    let body = r#"{"port":8080,"env":{"A":"1"},"cmd":["serve","--fast"],"memory":"256m","cpus":0.5,
        "health":{"path":"/healthz","timeout":"30s"},"idle_timeout":"15m","restart":"on-failure","pull":"always",
        "watch":"30s"}"#;
    let c = DeployConfig::from_json(body.as_bytes()).unwrap();
    assert_eq!(c.memory, Some(ByteSize(256 << 20)));
    assert_eq!(c.idle_timeout, Some(Span(Duration::from_secs(900))));
    let again = DeployConfig::from_json(&serde_json::to_vec(&c).unwrap()).unwrap();
    assert_eq!(again, c);
    assert_eq!(DeployConfig::from_json(b"{}").unwrap(), DeployConfig::default());
}

#[test]
fn bad_json_is_400_with_its_position() {
    let e = DeployConfig::from_json(b"{\n  \"port\": 80,\n  oops\n}").unwrap_err();
    assert_eq!(e.status(), 400);
    match e {
        PipesError::BadJson { line, column, .. } => assert_eq!((line, column), (3, 3)),
        other => panic!("{other}"),
    }
    assert_eq!(status("").0, 400);
    assert_eq!(status("{} x").0, 400, "trailing input");
    assert_eq!(status("{}{}").0, 400, "two objects");
    assert_eq!(status("{} \n").0, 200, "trailing white space is fine");
    assert_eq!(status("[1,2]").0, 422, "a JSON array is valid JSON of the wrong type");
}

#[test]
fn unknown_fields_are_400_and_named() {
    let (code, body) = status(r#"{"port":80,"colour":"red"}"#);
    assert_eq!(code, 400);
    assert_eq!(body, "colour");
    let (code, body) = status(r#"{"health":{"path":"/","interval":"1s"}}"#);
    assert_eq!(code, 400);
    assert!(body.contains("interval"), "{body}");
    let message = DeployConfig::from_json(br#"{"colour":"red"}"#).unwrap_err().to_string();
    assert!(message.starts_with("unknown field 'colour': expected one of `port`"), "{message}");
    assert_eq!(message.matches("colour").count(), 1, "{message}");
}

#[test]
fn wrong_types_and_values_are_422_and_named() {
    for (body, field) in [
        (r#"{"port":"eighty"}"#, "port"),
        (r#"{"port":70000}"#, "port"),
        (r#"{"port":0}"#, "port"),
        (r#"{"memory":-5}"#, "memory"),
        (r#"{"memory":"lots"}"#, "memory"),
        (r#"{"memory":"1k"}"#, "memory"),
        (r#"{"cpus":0}"#, "cpus"),
        (r#"{"cpus":-1}"#, "cpus"),
        (r#"{"cpus":1e-300}"#, "cpus"),
        (r#"{"cpus":2000}"#, "cpus"),
        (r#"{"memory":"9000000t"}"#, "memory"),
        (r#"{"memory":"18446744073709551615"}"#, "memory"),
        (r#"{"idle_timeout":"soon"}"#, "idle_timeout"),
        (r#"{"health":{"timeout":"1ms"}}"#, "health.timeout"),
        (r#"{"health":{"path":"healthz"}}"#, "health.path"),
        (r#"{"restart":"sometimes"}"#, "restart"),
        (r#"{"env":{"A":1}}"#, "env.A"),
        (r#"{"env":{"A=B":"1"}}"#, "env.A=B"),
        (r#"{"cmd":[]}"#, "cmd"),
        (r#"{"watch":"sometimes"}"#, "watch"),
        (r#"{"watch":"10ms"}"#, "watch"),
        (r#"{"pids":3}"#, "pids"),
        (r#"{"pids":-1}"#, "pids"),
        (r#"{"capabilities":["net raw"]}"#, "capabilities"),
    ] {
        let (code, json) = status(body);
        assert_eq!(code, 422, "{body}: {json}");
        assert_eq!(json, field, "{body}");
    }
}

#[test]
fn layers_merge_field_by_field() {
    let repo = DeployConfig::from_json(br#"{"env":{"A":"repo","B":"repo"},"memory":"1g","health":{"path":"/up"}}"#).unwrap();
    let tag = DeployConfig::from_json(br#"{"env":{"B":"tag"},"cpus":2,"health":{"timeout":"5s"}}"#).unwrap();
    let e = Effective::merge(Some(&tag), Some(&repo), &defaults());
    assert_eq!(e.env.get("A").unwrap(), "repo");
    assert_eq!(e.env.get("B").unwrap(), "tag");
    assert_eq!(e.memory, ByteSize(1 << 30));
    assert_eq!(e.cpus, 2.0);
    assert_eq!(e.health_path, "/up");
    assert_eq!(e.health_timeout, Duration::from_secs(5));
    let none = Effective::merge(None, None, &defaults());
    assert_eq!(none.memory, ByteSize(512 << 20));
    assert_eq!(none.health_path, "/");
    assert_eq!(none.pull, Pull::Missing);
    assert_eq!(none.watch, None);
    let watched = Defaults { watch: Some(Duration::from_secs(60)), ..defaults() };
    assert_eq!(Effective::merge(None, None, &watched).watch, Some(Duration::from_secs(60)));
    let off = DeployConfig::from_json(br#"{"watch":"off"}"#).unwrap();
    assert_eq!(Effective::merge(Some(&off), None, &watched).watch, None, "off wins over PIPES_WATCH");
}

#[test]
fn spec_hash_follows_what_makes_the_container() {
    let base = Effective::merge(None, None, &defaults());
    let h = base.spec_hash("a/b:c", 80);
    assert_eq!(h.len(), 16);
    assert_eq!(h, base.spec_hash("a/b:c", 80));
    assert_ne!(h, base.spec_hash("a/b:c", 81));
    let mut env = base.clone();
    env.env.insert("X".into(), "1".into());
    assert_ne!(h, env.spec_hash("a/b:c", 80));
    let mut idle = base.clone();
    idle.idle_timeout = Some(Duration::from_secs(5));
    assert_eq!(h, idle.spec_hash("a/b:c", 80), "idle time does not change the container");
}

#[test]
fn the_identity_follows_every_field_a_restart_applies() {
    let base = Effective::merge(None, None, &defaults());
    let id = base.identity("a/b:c", 80);
    assert_eq!(id, Effective::merge(None, None, &defaults()).identity("a/b:c", 80), "stable");
    assert_ne!(id, base.identity("a/b:c", 81));
    type Change = (&'static str, fn(&mut Effective));
    let changes: [Change; 8] = [
        ("env", |e| drop(e.env.insert("X".into(), "1".into()))),
        ("health path", |e| e.health_path = "/up".into()),
        ("health timeout", |e| e.health_timeout += Duration::from_secs(1)),
        ("idle timeout", |e| e.idle_timeout = Some(Duration::from_secs(5))),
        ("idle action", |e| e.idle_action = IdleAction::Pause),
        ("pause timeout", |e| e.pause_timeout += Duration::from_secs(1)),
        ("pull", |e| e.pull = Pull::Always),
        ("watch", |e| e.watch = Some(Duration::from_secs(60))),
    ];
    for (field, change) in changes {
        let mut changed = base.clone();
        change(&mut changed);
        assert_ne!(id, changed.identity("a/b:c", 80), "{field} changes the identity");
    }
}

#[test]
fn sizes_read_and_print() {
    assert_eq!(ByteSize::parse("512m").unwrap(), ByteSize(512 << 20));
    assert_eq!(ByteSize::parse("1.5g").unwrap(), ByteSize(3 << 29));
    assert_eq!(ByteSize::parse("256MiB").unwrap(), ByteSize(256 << 20));
    assert_eq!(ByteSize::parse("1000").unwrap(), ByteSize(1000));
    assert!(ByteSize::parse("-1m").is_err());
    assert_eq!(ByteSize(512 << 20).to_string(), "512m");
    assert_eq!(ByteSize(1 << 30).to_string(), "1g");
}
