//! Pipes: a Docker auto-deployment edge proxy on Pingora.
//!
//! A request for `{tag}.{repo}.{user}.example.com` goes through
//! [`route`] → `policy` → [`access`] → [`fleet`] (admission, table, cold
//! start) → `proxy`.
//! [`engine`] is the seam to whatever runs deployments (Docker's engine, a
//! swarm), [`api`] answers `/__proxyapi`, `reply` writes Pipes' own answers, and
//! [`settings`] holds everything the operator configured. `docs/architecture.md`
//! walks through it all.

// What a user or the engine decides is handled, never unwrapped (tests may).
#![deny(clippy::unwrap_used)]

// Public where the binary, the tests or the benchmarks use them; the rest is
// private so that the compiler reports what nothing uses.
pub mod access;
mod access_log;
pub mod alloc;
pub mod api;
mod auth;
mod clock;
pub mod config;
mod connection;
pub mod engine;
pub mod error;
mod events;
pub mod fleet;
mod forwarded;
pub mod host;
mod metrics;
mod outbound;
mod policy;
mod proxy;
mod reply;
pub mod route;
mod scrape;
pub mod secret;
pub mod server;
pub mod settings;
pub mod store;
mod tls;
mod ui;
mod waiting;
mod webhooks;
mod websocket;
