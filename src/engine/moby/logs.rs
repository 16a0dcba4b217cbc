//! The last lines an instance wrote, with the registry password scrubbed.

use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::query_parameters::LogsOptions;
use futures_util::{Stream, StreamExt};

use super::Moby;

impl Moby {
    /// The last `lines` lines of a log stream, passwords scrubbed.
    pub async fn last_lines(&self, mut stream: impl Stream<Item = Result<LogOutput, DockerError>> + Unpin, lines: usize) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(Ok(chunk)) = stream.next().await {
            let text = String::from_utf8_lossy(&chunk.into_bytes()).into_owned();
            out.extend(text.lines().map(|l| self.scrub(l)));
        }
        let keep = out.len().saturating_sub(lines);
        out.drain(..keep);
        out
    }
}

/// What a log request asks for: both streams, the last `lines` lines.
pub fn log_options(lines: usize) -> LogsOptions {
    LogsOptions { stdout: true, stderr: true, tail: lines.to_string(), ..Default::default() }
}
