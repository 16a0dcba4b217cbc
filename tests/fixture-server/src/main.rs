//! A tiny HTTP/1.1 server for Pipes' test images.
//!
//! It answers every request with JSON naming itself (`FIXTURE_ID`, and the
//! `HOSTNAME` the engine gave its container), the Host
//! it was asked for, the request and its `FIXTURE_*`/`APP_*` environment, so
//! tests can tell deployments apart. Other paths:
//!
//! - `GET /bytes/N`: N bytes.
//! - `GET /slow?ms=N`: the JSON answer after N ms.
//! - `GET /stream?lines=N&interval_ms=M`: a chunked answer, one line every M ms.
//! - `GET /sse?events=N&interval_ms=M`: the same as server-sent events.
//! - `GET /ws`: a WebSocket that echoes every message, prefixed with its id.
//! - `POST /upload`: reads the body as it comes (any length, chunked or not)
//!   and answers `{"id", "bytes"}`, never holding it in memory.
//! - `GET /connect?to=IP:PORT`: whether this container can open a TCP
//!   connection there (within 2 s): `{"id", "connected"}`.
//!
//! `FIXTURE_MODE` makes it misbehave on purpose: `crash` exits at once with a
//! log line, `hang` never listens. `FIXTURE_DELAY_MS` delays listening.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use tungstenite::protocol::{Role, WebSocket};
use tungstenite::Message;

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
        let (route, query) = path.split_once('?').unwrap_or((path.as_str(), ""));
        let param = |name: &str| -> u64 { query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok()).unwrap_or(0) };
        let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        match route {
            "/ws" if header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")) => {
                let Some(key) = header("sec-websocket-key") else { return };
                let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
                let head = format!("HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n");
                if out.write_all(head.as_bytes()).is_err() {
                    return;
                }
                echo(reader.buffer().to_vec(), out, id);
                return;
            }
            "/stream" | "/sse" => {
                let sse = route == "/sse";
                let count = param(if sse { "events" } else { "lines" });
                let content_type = if sse { "text/event-stream" } else { "text/plain" };
                let head = format!("HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\n");
                if out.write_all(head.as_bytes()).is_err() {
                    return;
                }
                for i in 1..=count {
                    std::thread::sleep(Duration::from_millis(param("interval_ms")));
                    let item = if sse { format!("data: {i}\n\n") } else { format!("line {i}\n") };
                    if out.write_all(format!("{:x}\r\n{item}\r\n", item.len()).as_bytes()).is_err() {
                        return;
                    }
                }
                if out.write_all(b"0\r\n\r\n").is_err() || close {
                    return;
                }
                continue;
            }
            _ => {}
        }
        let chunked = header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
        let (content_type, payload) = if route == "/upload" {
            let Some(bytes) = discard_body(&mut reader, length, chunked) else { return };
            ("application/json", format!("{{\"id\":{},\"bytes\":{bytes}}}\n", json(id)).into_bytes())
        } else {
            let mut body = Vec::new();
            if chunked {
                let Some(_) = discard_body(&mut reader, 0, true) else { return };
            } else {
                body.resize(length, 0);
                if reader.read_exact(&mut body).is_err() {
                    return;
                }
            }
            if route == "/slow" {
                std::thread::sleep(Duration::from_millis(param("ms")));
            }
            if route == "/connect" {
                let to = query.split('&').find_map(|kv| kv.strip_prefix("to=")).and_then(|a| a.parse().ok());
                let connected = to.is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
                body = format!("{{\"id\":{},\"connected\":{connected}}}\n", json(id)).into_bytes();
            }
            match route.strip_prefix("/bytes/").and_then(|n| n.parse::<usize>().ok()) {
                Some(n) => ("application/octet-stream", vec![b'x'; n.min(16 << 20)]),
                None if route == "/connect" => ("application/json", body),
                None => ("application/json", describe(id, &method, &path, &host, &headers, &body).into_bytes()),
            }
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

/// Reads and drops a request body, `length` bytes or chunked; its size, or
/// `None` if the connection broke.
fn discard_body(reader: &mut BufReader<TcpStream>, length: usize, chunked: bool) -> Option<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut take = |reader: &mut BufReader<TcpStream>, mut n: u64| -> Option<u64> {
        let total = n;
        while n > 0 {
            let want = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
            let got = reader.read(&mut buf[..want]).ok().filter(|g| *g > 0)?;
            n -= got as u64;
        }
        Some(total)
    };
    if !chunked {
        return take(reader, length as u64);
    }
    let mut total = 0;
    loop {
        let mut size = String::new();
        reader.read_line(&mut size).ok().filter(|n| *n > 0)?;
        let size = u64::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).ok().filter(|n| *n > 0)?;
                if line.trim().is_empty() {
                    return Some(total);
                }
            }
        }
        total += take(reader, size)?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf).ok()?;
    }
}

/// Echoes every WebSocket message as `{id}: {message}` until the client closes.
fn echo(already_read: Vec<u8>, stream: TcpStream, id: &str) {
    let mut ws = WebSocket::from_partially_read(stream, already_read, Role::Server, None);
    loop {
        match ws.read() {
            Ok(Message::Text(text)) => {
                if ws.send(Message::text(format!("{id}: {text}"))).is_err() {
                    return;
                }
            }
            Ok(Message::Binary(data)) => {
                if ws.send(Message::Binary(data)).is_err() {
                    return;
                }
            }
            Ok(Message::Close(_)) | Err(_) => {
                let _ = ws.flush();
                return;
            }
            Ok(_) => {}
        }
    }
}

fn describe(id: &str, method: &str, path: &str, host: &str, headers: &[(String, String)], body: &[u8]) -> String {
    let env: Vec<String> =
        std::env::vars().filter(|(k, _)| k.starts_with("FIXTURE_") || k.starts_with("APP_")).map(|(k, v)| format!("{}:{}", json(&k), json(&v))).collect();
    let headers: Vec<String> = headers.iter().map(|(k, v)| format!("{}:{}", json(k), json(v))).collect();
    format!(
        "{{\"id\":{},\"hostname\":{},\"method\":{},\"path\":{},\"host\":{},\"body\":{},\"headers\":{{{}}},\"env\":{{{}}}}}\n",
        json(id),
        json(&std::env::var("HOSTNAME").unwrap_or_default()),
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
