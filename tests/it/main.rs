//! Pipes' integration tests, one binary: the real `pipes` program and real
//! clients against it, the engine, a registry and browsers where
//! `scripts/test` prepared them (`common` is the harness). One binary
//! compiles the harness once and links once.

#[path = "../common/mod.rs"]
mod common;

mod access;
mod api;
mod api_fuzz;
mod browser;
mod cli;
mod cluster;
mod contract;
mod deploy;
mod disk;
mod event_streams;
mod expiry;
mod front_door;
mod hardening;
mod https;
mod image;
mod lifecycle;
mod observability;
mod openapi;
mod pause;
mod services;
mod store;
mod swarm;
mod webhooks;
