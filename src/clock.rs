//! The one clock of Pipes' own logic.
//!
//! Idle timeouts, remembered failures, pause timeouts, tag checks and drains
//! measure time with tokio's clock ([`tokio::time::Instant`]), so that tests
//! pause and advance it and run in milliseconds. Unix times that such logic
//! records or reports (last request, idle at) are read here: the wall clock
//! at the first read plus tokio's time since, so they move with tokio's
//! clock in a paused test, and never backwards in production when the wall
//! clock is stepped.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Unix time in milliseconds, on tokio's clock.
pub fn unix_ms() -> u64 {
    static BASE: OnceLock<(Instant, u64)> = OnceLock::new();
    let (at, unix) = *BASE.get_or_init(|| (Instant::now(), millis(wall())));
    // Signed: a paused test clock may stand before the base another test set.
    let now = Instant::now();
    match now.checked_duration_since(at) {
        Some(after) => unix.saturating_add(millis(after)),
        None => unix.saturating_sub(millis(at.duration_since(now))),
    }
}

/// Unix time by the system's wall clock, for what other processes and
/// machines compare with: claims, certificates, events.
pub fn wall() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn unix_time_moves_with_a_paused_clock() {
        let before = unix_ms();
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(unix_ms() - before, 90_000);
        let wall_ms = millis(wall());
        assert!(before.abs_diff(wall_ms) < 60_000, "near the wall clock: {before} against {wall_ms}");
    }
}
