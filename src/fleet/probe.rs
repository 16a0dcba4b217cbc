//! Is a freshly started container answering HTTP yet?
//!
//! An open port is not enough: the engine's port proxy accepts connections
//! before the program in the container listens. A container answers when it
//! sends back an HTTP status line below 500.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout_at, Instant};

/// First pause between probes: short, since most containers start in tens of ms.
const FIRST_PAUSE: Duration = Duration::from_millis(2);
/// Longest pause between probes.
const MAX_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause between connection attempts: a refused one costs a reset,
/// and a database's port is waited on by everything behind it.
const MAX_CONNECT_PAUSE: Duration = Duration::from_millis(10);
/// Longest a single probe may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Probes `GET path` at `addr` until it answers or `timeout` passes.
pub async fn until_answers(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = FIRST_PAUSE;
    loop {
        let attempt_deadline = deadline.min(Instant::now() + ATTEMPT_TIMEOUT);
        if let Ok(true) = timeout_at(attempt_deadline, answers(addr, path)).await {
            return true;
        }
        if Instant::now() + pause >= deadline {
            return false;
        }
        sleep(pause).await;
        pause = (pause * 3 / 2).min(MAX_PAUSE);
    }
}

/// Tries to connect to `addr` until it accepts or `timeout` passes.
pub async fn until_connects(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = FIRST_PAUSE;
    loop {
        let attempt_deadline = deadline.min(Instant::now() + ATTEMPT_TIMEOUT);
        if let Ok(Ok(_)) = timeout_at(attempt_deadline, TcpStream::connect(addr)).await {
            return true;
        }
        if Instant::now() + pause >= deadline {
            return false;
        }
        sleep(pause).await;
        pause = (pause * 3 / 2).min(MAX_CONNECT_PAUSE);
    }
}

/// One probe: does `GET path` get a status line below 500?
async fn answers(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: pipes-probe\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    // "HTTP/1.1 200" is 12 bytes.
    let mut head = [0u8; 12];
    let mut filled = 0;
    while filled < head.len() {
        match stream.read(&mut head[filled..]).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => filled += n,
        }
    }
    status_below_500(&head)
}

fn status_below_500(head: &[u8; 12]) -> bool {
    head.starts_with(b"HTTP/") && head[8] == b' ' && (b'1'..=b'4').contains(&head[9])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn status_lines() {
        assert!(status_below_500(b"HTTP/1.1 200"));
        assert!(status_below_500(b"HTTP/1.0 404"));
        assert!(!status_below_500(b"HTTP/1.1 503"));
        assert!(!status_below_500(b"SSH-2.0-Open"));
    }

    #[tokio::test]
    async fn waits_for_an_http_answer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            // First connection: accepted and closed, as a port proxy does before the app listens.
            let (first, _) = listener.accept().await.unwrap();
            drop(first);
            let (mut second, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 256];
            let _ = second.read(&mut buf).await;
            second.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
        });
        assert!(until_answers(addr, "/", Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn gives_up_at_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert!(!until_answers(addr, "/", Duration::from_millis(200)).await);
    }
}
