//! What every downstream connection must do before Pingora's HTTP machinery
//! sees it: find a place under `PIPES_MAX_CONNECTIONS`, and send its first
//! request head — or HTTP/2's connection preface — complete within
//! `PIPES_HEADER_TIMEOUT` and `PIPES_MAX_HEADER_SIZE`.
//!
//! Pingora 0.9 reads the 24-byte HTTP/2 preface with no deadline when h2c is
//! on, and bounds header reads only per read call: an empty connection, a
//! short request (`GET / HTTP/1.0\r\n\r\n` is 18 bytes) or a trickled head is
//! held forever. So the gate reads the first head itself, under one deadline,
//! decides between HTTP/1 and HTTP/2, and hands the bytes it read to the
//! matching Pingora app in front of the stream. Later requests on a kept-alive
//! connection wait at most `PIPES_KEEPALIVE_TIMEOUT` between reads. On an
//! HTTPS listener the TLS handshake comes first, under the same deadline.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream, TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Semaphore;

use crate::error::PipesError;
use crate::reply;
use crate::settings::ConnectionLimits as Limits;
use crate::tls::Tls;

/// What opens an HTTP/2 connection without TLS.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The gate in front of the two HTTP apps: one speaking HTTP/1 only, one
/// HTTP/2 without TLS (prior knowledge). Over TLS, Pingora picks HTTP/2 by
/// ALPN in either.
pub struct Gate<A> {
    http1: Arc<A>,
    h2c: Arc<A>,
    /// Shared by every listener, plain and TLS: one cap on connections.
    places: Arc<Semaphore>,
    limits: Limits,
    tls: Option<Arc<Tls>>,
}

impl<A> Gate<A> {
    /// A gate handing HTTP/1 connections to `http1` and HTTP/2 ones to `h2c`.
    pub fn new(http1: A, h2c: A, limits: Limits) -> Self {
        Gate { http1: Arc::new(http1), h2c: Arc::new(h2c), places: Arc::new(Semaphore::new(limits.max_connections)), limits, tls: None }
    }

    /// The places for connections, and how many there are.
    pub fn places(&self) -> (Arc<Semaphore>, usize) {
        (self.places.clone(), self.limits.max_connections)
    }

    /// The same gate for an HTTPS listener, sharing this one's places.
    pub fn with_tls(&self, http1: A, h2c: A, tls: Arc<Tls>) -> Self {
        Gate { http1: Arc::new(http1), h2c: Arc::new(h2c), places: self.places.clone(), limits: self.limits, tls: Some(tls) }
    }
}

/// How a connection's first bytes read.
enum Opening {
    /// An HTTP/1 request head, complete.
    Http1,
    /// The HTTP/2 preface and the client's first frame.
    H2c,
    /// The peer closed (or broke) the connection first.
    Closed,
    /// The head grew past the limit.
    TooLarge,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Gate<A> {
    async fn process_new(self: &Arc<Self>, mut stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let Ok(_place) = self.places.clone().try_acquire_owned() else {
            let full = PipesError::TooManyConnections { max: self.limits.max_connections };
            refuse(&mut stream, &full).await;
            return None;
        };
        if let Some(tls) = &self.tls {
            stream = tls.accept(stream, self.limits.header_timeout).await?;
        }
        let mut read = BytesMut::with_capacity(1024);
        let limit = self.limits.max_header_size;
        let opening = tokio::time::timeout(self.limits.header_timeout, opening(&mut stream, &mut read, limit)).await;
        let app = match opening {
            Ok(Opening::Http1) => &self.http1,
            Ok(Opening::H2c) => &self.h2c,
            Ok(Opening::Closed) => return None,
            Ok(Opening::TooLarge) => {
                refuse(&mut stream, &PipesError::HeadersTooLarge { limit: self.limits.max_header_size }).await;
                return None;
            }
            // A connection that sent nothing is closed without a word, as
            // browsers open some speculatively; so is an HTTP/2 one.
            Err(_) if read.is_empty() || read.starts_with(b"PRI ") => return None,
            Err(_) => {
                refuse(&mut stream, &PipesError::HeaderTimeout { timeout: self.limits.header_timeout }).await;
                return None;
            }
        };
        app.process_new(Box::new(Replayed { read: read.freeze(), inner: stream }), shutdown).await
    }

    async fn cleanup(&self) {
        self.http1.cleanup().await;
        self.h2c.cleanup().await;
    }
}

/// Reads into `read` until the first request head is complete (HTTP/1) or
/// the preface and first frame have arrived (HTTP/2).
async fn opening(stream: &mut Stream, read: &mut BytesMut, max: usize) -> Opening {
    loop {
        match stream.read_buf(read).await {
            Ok(0) | Err(_) => return Opening::Closed,
            Ok(_) => {}
        }
        if read.starts_with(H2_PREFACE) {
            // The client's SETTINGS frame follows the preface: Pingora's
            // handshake waits for it with no deadline, so the gate does.
            if first_frame_complete(&read[H2_PREFACE.len()..]) {
                return Opening::H2c;
            }
            if read.len() > max {
                return Opening::TooLarge;
            }
            continue;
        }
        let could_be_h2 = H2_PREFACE.starts_with(&read[..read.len().min(H2_PREFACE.len())]);
        if !could_be_h2 {
            match head_length(read) {
                Some(length) if length > max => return Opening::TooLarge,
                Some(_) => return Opening::Http1,
                None => {}
            }
        }
        if read.len() > max {
            return Opening::TooLarge;
        }
    }
}

/// Whether `bytes` begin with a whole HTTP/2 frame (9-byte header, then its
/// 24-bit length of payload).
fn first_frame_complete(bytes: &[u8]) -> bool {
    match bytes.get(..3) {
        Some(len) => {
            let len = (usize::from(len[0]) << 16) | (usize::from(len[1]) << 8) | usize::from(len[2]);
            bytes.len() >= 9 + len
        }
        None => false,
    }
}

/// The length of the whole HTTP/1 head at the start of `bytes`, once it is
/// there. Clients may precede the request line with empty lines (RFC 9112 §2.2).
fn head_length(bytes: &[u8]) -> Option<usize> {
    let start = bytes.iter().position(|b| *b != b'\r' && *b != b'\n')?;
    let rest = &bytes[start..];
    let crlf = rest.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = rest.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let end = match (crlf, lf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    Some(start + end)
}

/// Answers `e` with a bare HTTP/1.1 response and closes: there is no
/// Pingora session yet.
async fn refuse(stream: &mut Stream, e: &PipesError) {
    let _ = stream.write_all(&reply::raw(e)).await;
    let _ = stream.flush().await;
    Shutdown::shutdown(stream.as_mut()).await;
}

/// A stream whose first bytes were already read by the gate: they are read
/// again first, then the rest of the connection.
struct Replayed {
    read: Bytes,
    inner: Stream,
}

impl fmt::Debug for Replayed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replayed").field("read", &self.read.len()).field("inner", &self.inner).finish()
    }
}

impl AsyncRead for Replayed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replayed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Replayed {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(self.inner.as_mut()).await;
    }
}

impl UniqueID for Replayed {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Replayed {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Replayed {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Replayed {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Replayed {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for Replayed {
    /// Peeks at what the gate read; it read the whole preface or head.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        match self.read.get(..buf.len()) {
            Some(read) => {
                buf.copy_from_slice(read);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_end_at_the_empty_line() {
        assert_eq!(head_length(b"GET / HTTP/1.0\r\n\r\n"), Some(18));
        assert_eq!(head_length(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"), Some(27), "the body is not the head");
        assert_eq!(head_length(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"), Some(29), "leading empty lines are allowed");
        assert_eq!(head_length(b"GET / HTTP/1.1\nHost: a\n\n"), Some(24), "bare LF line ends");
        assert_eq!(head_length(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_length(b"\r\n\r\n"), None);
        assert_eq!(head_length(b""), None);
    }
}
