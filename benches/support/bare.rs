//! A bare Pingora proxy to one fixed upstream, nothing else: the floor Pipes
//! is held to. A bench re-executes itself as one ([`command`]); its `main`
//! calls [`run_if_asked`] first.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::http_proxy_service;
use pingora::server::configuration::ServerConf;

struct Bare(std::net::SocketAddr);

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.0, false, String::new())))
    }
}

/// The command that runs this bench binary as a bare proxy on
/// 127.0.0.1:`port` to `upstream` with Pingora's YAML `conf`, run by
/// `wrapper` (such as valgrind) if one is given.
pub fn command(wrapper: &[&str], port: u16, upstream: SocketAddr, conf: &Path) -> Command {
    let mut command = crate::common::wrapped(wrapper, std::env::current_exe().expect("bench binary"));
    command.env("PIPES_BENCH_BARE", format!("127.0.0.1:{port},{upstream},{}", conf.display())).stderr(Stdio::null());
    command
}

/// Becomes the bare proxy, never returning, when this process was started
/// by [`command`].
pub fn run_if_asked() {
    if let Ok(spec) = std::env::var("PIPES_BENCH_BARE") {
        run(&spec);
    }
}

/// `spec` is `listen,upstream,conf-file`.
fn run(spec: &str) -> ! {
    let parts: Vec<&str> = spec.split(',').collect();
    let conf = ServerConf::from_yaml(&std::fs::read_to_string(parts[2]).expect("conf")).expect("conf parses");
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Bare(parts[1].parse().expect("upstream")));
    proxy.add_tcp(parts[0]);
    server.add_service(proxy);
    server.run_forever()
}
