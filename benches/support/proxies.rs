//! The proxies Pipes is raced against, as Debian ships them: nginx, HAProxy
//! and Caddy. Each proxies the bench host to one upstream with keep-alive
//! connections to it, adds `X-Forwarded-For` and `X-Forwarded-Proto` as Pipes
//! does, runs as many workers or threads as it is given, writes no access
//! log, and is stopped on drop.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::wrapped;
use crate::load::{free_port, wait_listening_within, Process, HOST};

/// A certificate and key file, for a proxy serving HTTPS.
pub type Tls<'a> = Option<(&'a Path, &'a Path)>;

/// A reference proxy listening on 127.0.0.1:`port`.
pub struct Proxy {
    process: Process,
    pub port: u16,
    dir: PathBuf,
}

impl Proxy {
    /// nginx with `workers` workers, proxying the bench host to `upstream` and,
    /// when `spread` is given, each of those hosts to its own upstream. Under
    /// a `wrapper` (such as valgrind) it runs without a master process, so the
    /// wrapped process is the one that serves.
    pub fn nginx(wrapper: &[&str], upstream: SocketAddr, workers: usize, spread: &[(String, SocketAddr)], tls: Tls<'_>) -> Proxy {
        let (port, dir) = Self::place("nginx");
        let d = dir.display();
        let location = "proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      \
                        proxy_set_header Host $host;\n      \
                        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      \
                        proxy_set_header X-Forwarded-Proto $scheme;";
        let ssl = match tls {
            // The protocols Pipes offers (nginx 1.22 leaves TLS 1.3 out by default).
            Some((cert, key)) => {
                format!(" ssl;\n    ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_certificate {};\n    ssl_certificate_key {}", cert.display(), key.display())
            }
            None => String::new(),
        };
        let master = if wrapper.is_empty() { "" } else { "master_process off;\n" };
        let mut upstreams = format!("  upstream fixture {{ server {upstream}; keepalive 128; }}\n");
        for (host, p) in spread {
            upstreams.push_str(&format!("  upstream {host} {{ server {p}; keepalive 8; }}\n"));
        }
        let conf = format!(
            "worker_processes {workers};\ndaemon off;\n{master}pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             {upstreams}\
               server {{\n    listen 127.0.0.1:{port} default_server{ssl};\n    server_name {HOST};\n\
                 location / {{\n      proxy_pass http://fixture;\n      {location}\n    }}\n  }}\n\
               server {{\n    listen 127.0.0.1:{port}{ssl};\n    server_name *.warm.bench.example.com;\n\
                 location / {{\n      proxy_pass http://$host;\n      {location}\n    }}\n  }}\n}}\n"
        );
        let file = dir.join("nginx.conf");
        std::fs::write(&file, conf).unwrap();
        let mut command = wrapped(wrapper, "nginx");
        command.args(["-p", &dir.display().to_string(), "-c", &file.display().to_string()]);
        Self::run(command, port, dir, wrapper, "nginx")
    }

    /// HAProxy with `threads` threads. `http-reuse always` shares idle
    /// upstream connections between client connections, as the others' pools
    /// do (the default, `safe`, opens one for each new client connection).
    pub fn haproxy(wrapper: &[&str], upstream: SocketAddr, threads: usize, tls: Tls<'_>) -> Proxy {
        let (port, dir) = Self::place("haproxy");
        let (bind, scheme) = match tls {
            Some((cert, key)) => {
                // HAProxy reads the certificate and its key from one file.
                let pem = dir.join("site.pem");
                let both = [std::fs::read(cert).expect("certificate"), std::fs::read(key).expect("key")].concat();
                std::fs::write(&pem, both).unwrap();
                (format!(" ssl crt {}", pem.display()), "https")
            }
            None => (String::new(), "http"),
        };
        let conf = format!(
            "global\n  nbthread {threads}\n  maxconn 8192\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
               option forwardfor\n  http-reuse always\n\
             frontend bench\n  bind 127.0.0.1:{port}{bind}\n  http-request set-header X-Forwarded-Proto {scheme}\n  default_backend fixture\n\
             backend fixture\n  server fixture {upstream} maxconn 1024\n"
        );
        let file = dir.join("haproxy.cfg");
        std::fs::write(&file, conf).unwrap();
        let mut command = wrapped(wrapper, "haproxy");
        // -db: in the foreground, one process.
        command.args(["-db", "-f", &file.display().to_string()]);
        Self::run(command, port, dir, wrapper, "haproxy")
    }

    /// Caddy with `GOMAXPROCS` = `threads`. Its reverse proxy adds the
    /// forwarding headers by itself; the admin endpoint, automatic HTTPS and
    /// HTTP/3 are off.
    pub fn caddy(wrapper: &[&str], upstream: SocketAddr, threads: usize, tls: Tls<'_>) -> Proxy {
        let (port, dir) = Self::place("caddy");
        let (site, certificate) = match tls {
            Some((cert, key)) => (format!("https://:{port}"), format!("\n  tls {} {}", cert.display(), key.display())),
            None => (format!("http://:{port}"), String::new()),
        };
        let conf = format!(
            "{{\n  admin off\n  auto_https off\n  servers {{\n    protocols h1 h2\n  }}\n}}\n\
             {site} {{\n  bind 127.0.0.1{certificate}\n  reverse_proxy {upstream} {{\n    transport http {{\n      \
             keepalive 90s\n      keepalive_idle_conns 1024\n      keepalive_idle_conns_per_host 128\n    }}\n  }}\n}}\n"
        );
        let file = dir.join("Caddyfile");
        std::fs::write(&file, conf).unwrap();
        let mut command = wrapped(wrapper, "caddy");
        command
            .args(["run", "--adapter", "caddyfile", "--config", &file.display().to_string()])
            .env("GOMAXPROCS", threads.to_string())
            // Caddy's storage, never the user's.
            .env("XDG_DATA_HOME", &dir)
            .env("XDG_CONFIG_HOME", &dir);
        if !wrapper.is_empty() {
            // Go preempts goroutines with signals, which callgrind's signal
            // handling asserts on; the scheduler yields at calls instead.
            command.env("GODEBUG", "asyncpreemptoff=1");
        }
        Self::run(command, port, dir, wrapper, "caddy")
    }

    /// The serving process (nginx's master, whose workers are its children).
    pub fn pid(&self) -> u32 {
        self.process.0.id()
    }

    fn place(name: &str) -> (u16, PathBuf) {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("pipes-bench-{name}-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        (port, dir)
    }

    fn run(mut command: Command, port: u16, dir: PathBuf, wrapper: &[&str], name: &str) -> Proxy {
        let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| panic!("{name} starts: {e}"));
        let process = Process(child);
        // A wrapper such as valgrind slows the start.
        wait_listening_within(port, name, Duration::from_secs(if wrapper.is_empty() { 10 } else { 90 }));
        Proxy { process, port, dir }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
