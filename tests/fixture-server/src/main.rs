//! A tiny HTTP/1.1 server for Pipes' test images.
//!
//! It answers every request with JSON naming itself (`FIXTURE_ID`), the Host
//! it was asked for, the request and its `FIXTURE_*`/`APP_*` environment, so
//! tests can tell deployments apart. `GET /bytes/N` answers N bytes instead.
//! `FIXTURE_MODE` makes it misbehave on purpose: `crash` exits at once with a
//! log line, `hang` never listens. `FIXTURE_DELAY_MS` delays listening.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

fn main() {
    let id = std::env::var("FIXTURE_ID").unwrap_or_else(|_| "fixture".into());
    let port: u16 = std::env::var("FIXTURE_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(80);
    match std::env::var("FIXTURE_MODE").as_deref() {
        Ok("crash") => {
            eprintln!("fixture {id}: crashing on purpose with exit code 3");
            std::process::exit(3);
        }
        Ok("hang") => {
            eprintln!("fixture {id}: never listening");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        _ => {}
    }
    if let Some(ms) = std::env::var("FIXTURE_DELAY_MS").ok().and_then(|d| d.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    eprintln!("fixture {id}: listening on port {port}");
    for stream in listener.incoming().flatten() {
        let id = id.clone();
        std::thread::spawn(move || serve(stream, &id));
    }
}

/// Serves requests on one connection until the client closes it.
fn serve(stream: TcpStream, id: &str) {
    let _ = stream.set_nodelay(true);
    let Ok(write_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut out = write_half;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let path = parts.next().unwrap_or("").to_owned();
        let version = parts.next().unwrap_or("HTTP/1.0").to_owned();
        let mut host = String::new();
        let mut length = 0usize;
        let mut close = version == "HTTP/1.0";
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_owned());
                match name.as_str() {
                    "host" => host = value.clone(),
                    "content-length" => length = value.parse().unwrap_or(0),
                    "connection" => close = value.eq_ignore_ascii_case("close"),
                    _ => {}
                }
                headers.push((name, value));
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let (content_type, payload) = match path.strip_prefix("/bytes/").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => ("application/octet-stream", vec![b'x'; n.min(16 << 20)]),
            None => ("application/json", describe(id, &method, &path, &host, &headers, &body).into_bytes()),
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n{}\r\n",
            payload.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        if out.write_all(head.as_bytes()).is_err() || out.write_all(&payload).is_err() || close {
            return;
        }
    }
}

fn describe(id: &str, method: &str, path: &str, host: &str, headers: &[(String, String)], body: &[u8]) -> String {
    let env: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("FIXTURE_") || k.starts_with("APP_"))
        .map(|(k, v)| format!("{}:{}", json(&k), json(&v)))
        .collect();
    let headers: Vec<String> = headers.iter().map(|(k, v)| format!("{}:{}", json(k), json(v))).collect();
    format!(
        "{{\"id\":{},\"method\":{},\"path\":{},\"host\":{},\"body\":{},\"headers\":{{{}}},\"env\":{{{}}}}}\n",
        json(id),
        json(method),
        json(path),
        json(host),
        json(&String::from_utf8_lossy(body)),
        headers.join(","),
        env.join(",")
    )
}

fn json(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
