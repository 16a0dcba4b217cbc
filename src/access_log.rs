//! The access log (`PIPES_ACCESS_LOG=json`): one JSON object per request, a
//! line each, on standard output.
//!
//! Proxy threads never write to stdout themselves: a line goes into a
//! bounded queue that one writer thread empties through a buffer. Woken by a
//! line, the writer lets more gather for [`LINGER`] before it writes them
//! all: a busy proxy then wakes it and writes to stdout some hundred times a
//! second, not once per request (which cost more CPU than the request
//! itself, `benches/RESULTS.md`). If the reader of stdout cannot keep up, lines
//! are dropped and counted rather than slowing requests down. Off, nothing
//! is formatted and nothing queued.

use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// Lines waiting for the writer at most.
const QUEUE: usize = 65_536;

/// How long a line may wait for others before it is written.
const LINGER: Duration = Duration::from_millis(10);

/// One request, as logged.
#[derive(Serialize)]
pub struct Entry<'a> {
    /// When the request arrived (RFC 3339, milliseconds, UTC).
    pub time: String,
    pub client: Option<IpAddr>,
    /// The Host as sent, without its port.
    pub host: &'a str,
    /// `user/repo:tag`, if the host named one.
    pub deployment: Option<String>,
    pub method: &'a str,
    /// The path, without the query (which may carry a token).
    pub path: &'a str,
    /// The status sent; 499 if the client left before an answer.
    pub status: u16,
    /// Body bytes sent to the client.
    pub bytes: usize,
    /// Seconds from the request's head to the end of its answer.
    pub duration: f64,
    /// The container's address, if the request reached one.
    pub upstream: Option<String>,
    /// Whether it waited for a cold start.
    pub cold_start: bool,
    /// The access check that decided (`ip`, `share`, `basic`,
    /// `forward_auth`; for a refusal the reason), if the deployment has any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access: Option<&'static str>,
    /// Whether that check let the request in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_allowed: Option<bool>,
}

/// The queue to the writer thread.
pub struct AccessLog {
    lines: SyncSender<String>,
    dropped: AtomicU64,
}

impl AccessLog {
    /// Starts the writer thread.
    pub fn start() -> std::io::Result<AccessLog> {
        let (lines, queue) = sync_channel(QUEUE);
        std::thread::Builder::new().name("pipes-access-log".into()).spawn(move || write_lines(queue, std::io::stdout()))?;
        Ok(AccessLog { lines, dropped: AtomicU64::new(0) })
    }

    /// Queues `entry`, or counts it as dropped if the writer is behind.
    pub fn log(&self, entry: &Entry<'_>) {
        let Ok(mut line) = serde_json::to_string(entry) else { return };
        line.push('\n');
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.lines.try_send(line) {
            if self.dropped.fetch_add(1, Ordering::Relaxed).is_multiple_of(10_000) {
                log::warn!("access log: standard output is not read fast enough; lines are dropped");
            }
        }
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Writes queued lines through a buffer, flushing when the queue is empty.
fn write_lines(queue: Receiver<String>, out: impl Write) {
    let mut out = std::io::BufWriter::with_capacity(64 << 10, out);
    // A broken stdout loses lines, never blocks: the queue keeps draining.
    while let Ok(line) = queue.recv() {
        let _ = out.write_all(line.as_bytes());
        // Senders wake no one while the writer sleeps here.
        std::thread::sleep(LINGER);
        while let Ok(line) = queue.try_recv() {
            let _ = out.write_all(line.as_bytes());
        }
        let _ = out.flush();
    }
}

/// `at` as RFC 3339 with milliseconds.
pub fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// Seconds, for `duration`.
pub fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn entries_are_one_json_object_per_line() {
        let (tx, rx) = sync_channel(4);
        let sink = Sink::default();
        let writer = {
            let sink = sink.clone();
            std::thread::spawn(move || write_lines(rx, sink))
        };
        let log = AccessLog { lines: tx, dropped: AtomicU64::new(0) };
        let entry = Entry {
            time: timestamp(SystemTime::UNIX_EPOCH),
            client: Some("203.0.113.7".parse().unwrap()),
            host: "v1.app.alice.example.com",
            deployment: Some("alice/app:v1".into()),
            method: "GET",
            path: "/a\"b",
            status: 200,
            bytes: 3,
            duration: seconds(Duration::from_micros(1500)),
            upstream: Some("127.0.0.1:32768".into()),
            cold_start: true,
            access: Some("basic"),
            access_allowed: Some(true),
        };
        log.log(&entry);
        log.log(&entry);
        drop(log);
        writer.join().unwrap();
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["path"], "/a\"b");
        assert_eq!(v["duration"], 0.0015);
        assert_eq!(v["cold_start"], true);
    }
}
