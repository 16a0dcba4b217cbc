//! Pipes: a Docker auto-deployment edge proxy on Pingora.
//!
//! A request for `{tag}.{repo}.{user}.example.com` goes through
//! [`route`] → [`security`] → [`fleet`] (table, cold start) → [`proxy`].
//! [`engine`] speaks to Docker, [`api`] answers `/__proxyapi`, and
//! [`settings`] holds everything the operator configured.

pub mod api;
pub mod config;
pub mod engine;
pub mod error;
pub mod fleet;
pub mod proxy;
pub mod route;
pub mod security;
pub mod server;
pub mod settings;
pub mod store;
