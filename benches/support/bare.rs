//! A bare Pingora proxy to one fixed upstream, nothing else: the floor Pipes
//! is held to. A bench re-executes itself as one when `PIPES_BENCH_BARE` is set.

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

/// `spec` is `listen,upstream,conf-file`.
pub fn run(spec: &str) -> ! {
    let parts: Vec<&str> = spec.split(',').collect();
    let conf = ServerConf::from_yaml(&std::fs::read_to_string(parts[2]).expect("conf")).expect("conf parses");
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Bare(parts[1].parse().expect("upstream")));
    proxy.add_tcp(parts[0]);
    server.add_service(proxy);
    server.run_forever()
}
