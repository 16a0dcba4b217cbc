//! WebSocket connections, relayed by Pipes itself rather than by Pingora's
//! proxy loop, so that they can be ended properly: when Pipes stops (or a
//! drained generation is stopped), each gets a close frame with status 1001
//! ("going away") before its connection ends, as RFC 6455 §7.4.1 asks of a
//! server that goes down.
//!
//! The handshake goes to the instance as it came (plus forwarding headers);
//! a `101` turns the connection into a byte relay in both directions. Frame
//! boundaries are tracked from the instance to the client, so the close
//! frame is never put in the middle of another frame.

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::error::PipesError;
use crate::fleet::Upstream;

/// How long the instance may take to answer the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest handshake answer head, and body of a refused handshake.
const MAX_HEAD: usize = 64 * 1024;
const MAX_REFUSAL_BODY: usize = 1 << 20;
/// How long a closing connection waits for a frame boundary.
const BOUNDARY_WAIT: Duration = Duration::from_secs(1);
/// The close frame a server sends: FIN + close, 2 bytes, status 1001.
const GOING_AWAY: [u8; 4] = [0x88, 0x02, 0x03, 0xE9];

/// Set when Pipes is about to end every relayed connection.
static GOING: LazyLock<watch::Sender<bool>> = LazyLock::new(|| watch::channel(false).0);

/// Ends every relayed WebSocket with a 1001 close, as Pipes stops.
pub fn going_away() {
    GOING.send_replace(true);
}

/// Whether a request asks for a WebSocket (HTTP/1.1 `Upgrade: websocket`).
pub fn wanted(req: &RequestHeader) -> bool {
    req.headers.get(http::header::UPGRADE).and_then(|u| u.to_str().ok()).is_some_and(|u| u.trim().eq_ignore_ascii_case("websocket"))
}

/// Why a relay could not begin.
pub enum Failure {
    /// Nothing answered at the upstream's address (it may have stopped).
    Refused,
    /// Anything else, answered as this error.
    Error(PipesError),
}

/// Relays the WebSocket `session` asks for to `upstream` (of `deployment`),
/// until either side closes or Pipes says it is going away. `request` is the
/// handshake as it goes upstream (forwarding headers set).
pub async fn relay(session: &mut Session, deployment: &str, upstream: &Upstream, request: &RequestHeader) -> Result<(), Failure> {
    let mut stream = match TcpStream::connect(upstream.addr).await {
        Ok(stream) => stream,
        Err(_) => return Err(Failure::Refused),
    };
    let _ = stream.set_nodelay(true);
    let unreachable = |why: String| Failure::Error(PipesError::Unservable { deployment: deployment.to_owned(), reason: why });
    stream.write_all(&head_bytes(request)).await.map_err(|e| unreachable(format!("the handshake was not sent: {e}")))?;
    let (head, rest) = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| unreachable("its container did not answer the WebSocket handshake in time".into()))?
        .map_err(unreachable)?;
    let ended = if head.status.as_u16() == 101 {
        session.write_response_header(Box::new(head), false).await.map_err(|e| unreachable(e.to_string()))?;
        pump(session, stream, rest, upstream.closing()).await
    } else {
        refused(session, stream, head, rest).await
    };
    if let Err(e) = ended {
        log::debug!("WebSocket relay ended: {e}");
    }
    Ok(())
}

/// The handshake request as bytes.
fn head_bytes(req: &RequestHeader) -> Vec<u8> {
    let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = format!("{} {target} HTTP/1.1\r\n", req.method).into_bytes();
    for (name, value) in req.headers.iter() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Reads the answer's head; returns it and the bytes read past it.
async fn read_head(stream: &mut TcpStream) -> Result<(ResponseHeader, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| format!("reading the handshake answer: {e}"))?;
        if n == 0 {
            return Err("its container closed the connection during the WebSocket handshake".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let code = parsed.code.unwrap_or(502);
                let mut head = ResponseHeader::build(code, Some(parsed.headers.len())).map_err(|e| e.to_string())?;
                for h in parsed.headers.iter() {
                    head.append_header(h.name.to_owned(), h.value).map_err(|e| e.to_string())?;
                }
                return Ok((head, buf[len..].to_vec()));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => return Err("the handshake answer's head is too large".into()),
            Err(e) => return Err(format!("the handshake answer is not HTTP: {e}")),
        }
    }
}

/// Passes on an answer other than `101` (the app refused the upgrade): its
/// body is small, so it is read whole and sent with its length.
async fn refused(session: &mut Session, mut stream: TcpStream, mut head: ResponseHeader, mut body: Vec<u8>) -> Result<()> {
    let length = head.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse::<usize>().ok());
    let chunked = head.headers.get(http::header::TRANSFER_ENCODING).and_then(|v| v.to_str().ok()).is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let mut chunk = [0u8; 8192];
    loop {
        let complete = match (length, chunked) {
            (Some(n), _) => body.len() >= n,
            (None, true) => dechunk(&body).is_some(),
            (None, false) => false,
        };
        if complete || body.len() > MAX_REFUSAL_BODY {
            break;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let body = match (length, chunked) {
        (Some(n), _) => body.get(..n).map(<[u8]>::to_vec).unwrap_or(body),
        (None, true) => dechunk(&body).unwrap_or_default(),
        (None, false) => body,
    };
    head.remove_header(&http::header::TRANSFER_ENCODING);
    head.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    head.insert_header(http::header::CONNECTION, "close")?;
    session.write_response_header(Box::new(head), false).await?;
    session.write_response_body(Some(Bytes::from(body)), true).await
}

/// A whole chunked body, decoded; `None` until it is complete.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

/// Relays bytes both ways until a side closes, or until Pipes (or the
/// drain of this generation) says it is going away.
async fn pump(session: &mut Session, stream: TcpStream, early: Vec<u8>, mut drained: watch::Receiver<bool>) -> Result<()> {
    let (mut from_app, mut to_app) = stream.into_split();
    let mut going = GOING.subscribe();
    let mut frames = Frames::default();
    if !early.is_empty() {
        frames.feed(&early);
        session.write_response_body(Some(Bytes::from(early)), false).await?;
    }
    let mut buf = vec![0u8; 16 * 1024];
    let mut client_done = false;
    let mut closing_since: Option<tokio::time::Instant> = None;
    loop {
        if closing_since.is_some() && frames.at_boundary() {
            session.write_response_body(Some(Bytes::from_static(&GOING_AWAY)), false).await?;
            return session.write_response_body(None, true).await;
        }
        if closing_since.is_some_and(|since| since.elapsed() > BOUNDARY_WAIT) {
            return Ok(());
        }
        tokio::select! {
            _ = set(&mut going), if closing_since.is_none() => closing_since = Some(tokio::time::Instant::now()),
            _ = set(&mut drained), if closing_since.is_none() => closing_since = Some(tokio::time::Instant::now()),
            _ = tokio::time::sleep(BOUNDARY_WAIT), if closing_since.is_some() => {}
            read = session.read_request_body(), if !client_done && closing_since.is_none() => match read? {
                Some(data) => {
                    if to_app.write_all(&data).await.is_err() {
                        return Ok(());
                    }
                }
                None => {
                    client_done = true;
                    let _ = to_app.shutdown().await;
                }
            },
            n = from_app.read(&mut buf) => match n {
                Ok(0) | Err(_) => return session.write_response_body(None, true).await,
                Ok(n) => {
                    frames.feed(&buf[..n]);
                    session.write_response_body(Some(Bytes::copy_from_slice(&buf[..n])), false).await?;
                }
            },
        }
    }
}

/// Resolves once `flag` is true (never, if its sender is gone).
async fn set(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|f| *f).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Where the byte stream from the app stands among WebSocket frames.
#[derive(Debug, Default)]
struct Frames {
    /// Bytes of a frame head read so far.
    head: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
}

impl Frames {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let take = usize::try_from(self.payload_left).unwrap_or(usize::MAX).min(bytes.len());
                self.payload_left -= take as u64;
                bytes = &bytes[take..];
                continue;
            }
            self.head.push(bytes[0]);
            bytes = &bytes[1..];
            if let Some(payload) = head_payload(&self.head) {
                self.payload_left = payload;
                self.head.clear();
            }
        }
    }

    fn at_boundary(&self) -> bool {
        self.head.is_empty() && self.payload_left == 0
    }
}

/// The payload length of a complete frame head, `None` while incomplete.
fn head_payload(head: &[u8]) -> Option<u64> {
    let (first, masked) = (*head.get(1)?, head[1] & 0x80 != 0);
    let (len, at) = match first & 0x7F {
        126 => (u64::from(u16::from_be_bytes([*head.get(2)?, *head.get(3)?])), 4),
        127 => (u64::from_be_bytes(head.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let full = at + if masked { 4 } else { 0 };
    (head.len() >= full).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_boundaries_are_tracked_across_reads() {
        let mut f = Frames::default();
        // A 3-byte text frame, split over reads.
        f.feed(&[0x81]);
        assert!(!f.at_boundary());
        f.feed(&[0x03, b'a']);
        assert!(!f.at_boundary());
        f.feed(b"bc");
        assert!(f.at_boundary());
        // A 300-byte binary frame with a 16-bit length, then a ping.
        let mut frame = vec![0x82, 126, 0x01, 0x2C];
        frame.extend(std::iter::repeat_n(0u8, 300));
        frame.extend([0x89, 0x00]);
        f.feed(&frame[..200]);
        assert!(!f.at_boundary());
        f.feed(&frame[200..]);
        assert!(f.at_boundary());
        // A masked frame (client to server) counts its mask key.
        f.feed(&[0x81, 0x82, 1, 2, 3, 4, b'h']);
        assert!(!f.at_boundary());
        f.feed(b"i");
        assert!(f.at_boundary());
    }

    #[test]
    fn chunked_refusals_are_decoded_once_complete() {
        assert_eq!(dechunk(b"5\r\nhello\r\n0\r\n\r\n").as_deref(), Some(&b"hello"[..]));
        assert_eq!(dechunk(b"5\r\nhel"), None);
        assert_eq!(dechunk(b"3;x=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").as_deref(), Some(&b"abcde"[..]));
    }

    #[test]
    fn only_websocket_upgrades_are_relayed() {
        let mut req = RequestHeader::build("GET", b"/ws", None).unwrap();
        assert!(!wanted(&req));
        req.insert_header("upgrade", "WebSocket").unwrap();
        assert!(wanted(&req));
        req.insert_header("upgrade", "h2c").unwrap();
        assert!(!wanted(&req));
    }
}
