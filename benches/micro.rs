//! The per-request work Pipes adds before proxying: Host → deployment → table
//! slot → policy, for a table of 100 deployments. `cargo bench --bench micro`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use pipes::engine::docker::{Docker, Reach};
use pipes::fleet::Fleet;
use pipes::route::{normalize_host, route, Target};
use pipes::settings::{Settings, Sources};

fn fleet_of(n: usize, runtime: &tokio::runtime::Runtime) -> (Fleet, Vec<String>) {
    let mut src = Sources::default();
    src.env.insert("PIPES_ALLOW".into(), "bench/*".into());
    // Any engine call would fail: the warm path makes none.
    src.env.insert("DOCKER_HOST".into(), "unix:///nonexistent/docker.sock".into());
    let settings = Settings::from_sources(["pipes"], &src).expect("settings");
    let backend = Arc::new(Docker::new(&settings.docker, Reach::Published));
    let fleet = Fleet::new(&settings, backend, pipes::store::Store::dir(settings.config_dir.clone()), runtime.handle().clone());
    let hosts: Vec<String> = (0..n).map(|i| format!("v1.app{i}.bench.example.com:8080")).collect();
    let domain = pipes::route::Hosts::dotted(pipes::route::Domain::Levels(2));
    for h in &hosts {
        if let Ok(Target::Deployment(d)) = route(&normalize_host(h), &domain) {
            fleet.slot(d);
        }
    }
    (fleet, hosts)
}

fn warm_request(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let (fleet, hosts) = fleet_of(100, &runtime);
    let domain = pipes::route::Hosts::dotted(pipes::route::Domain::Levels(2));
    let mut i = 0;
    c.bench_function("host → slot → policy, 100 deployments", |b| {
        b.iter(|| {
            i = (i + 1) % hosts.len();
            let host = normalize_host(black_box(&hosts[i]));
            match route(&host, &domain) {
                Ok(Target::Deployment(d)) => {
                    let slot = fleet.get(d).expect("known deployment");
                    black_box(fleet.allows(d));
                    black_box(slot.upstream())
                }
                _ => unreachable!("every host is a deployment"),
            }
        })
    });
    let upper: Vec<String> = hosts.iter().map(|h| h.to_ascii_uppercase()).collect();
    c.bench_function("same, host in capitals (lowercasing allocates)", |b| {
        b.iter(|| {
            i = (i + 1) % upper.len();
            let host = normalize_host(black_box(&upper[i]));
            if let Ok(Target::Deployment(d)) = route(&host, &domain) {
                black_box(fleet.get(d));
            }
        })
    });
}

criterion_group!(benches, warm_request);
criterion_main!(benches);
