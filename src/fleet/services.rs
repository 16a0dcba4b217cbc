//! The services beside a deployment's app: brought up before it, in the
//! order `depends_on` gives, stopped, paused and removed with it.
//!
//! A service is one instance per deployment and service name, never a
//! generation: a redeploy of the app joins the services that run. Its
//! config changes take effect when the deployment is restarted; its
//! volumes outlive it and go only with the deployment.

use std::collections::HashMap;

use futures_util::future::try_join_all;
use tokio::time::Instant;

use super::deploy::{Deployer, NEVER_READY_GRACE, STOP_GRACE};
use super::probe;
use crate::config::{start_order, Check, Effective, Service, BASE_CAPABILITIES};
use crate::engine::{short_id, Image, Instance, Spec};
use crate::error::PipesError;
use crate::metrics::Phase;
use crate::route::Deployment;

/// How often a service's health is asked while Pipes waits for it.
const HEALTH_POLL: std::time::Duration = std::time::Duration::from_millis(250);

impl Deployer {
    /// Brings `d`'s services up and waits until each is healthy: images
    /// pulled in parallel (with `app_image`, when the app will need it),
    /// then each wave of `depends_on` started in parallel. Nothing to do,
    /// and no engine call, for a deployment without services.
    pub(super) async fn services_up(&self, d: &Deployment, config: &Effective, app_image: Option<&str>) -> Result<(), PipesError> {
        if config.services.is_empty() {
            return Ok(());
        }
        let graph: Vec<(&str, &[String])> = config.services.iter().map(|s| (s.name.as_str(), s.depends_on.as_slice())).collect();
        let waves = start_order(&graph).map_err(|e| PipesError::Unservable { deployment: d.to_string(), reason: e.message })?;
        for service in &config.services {
            if !self.policy().allows(service.image.as_ref()) {
                return Err(PipesError::Unservable {
                    deployment: d.to_string(),
                    reason: format!("service {} runs {}, which PIPES_ALLOW does not allow", service.name, service.image),
                });
            }
        }
        let existing = self.remove_unconfigured_services(d, config).await?;
        let found = |name: &str| existing.iter().find(|i| i.service.as_deref() == Some(name));
        let mut wanted: Vec<String> = config.services.iter().filter(|s| found(&s.name).is_none()).map(|s| self.image_ref(&s.image)).collect();
        wanted.extend(app_image.map(str::to_owned));
        wanted.sort();
        wanted.dedup();
        let images: HashMap<String, Image> = try_join_all(wanted.into_iter().map(|r| async move {
            let image = self.local_or_pulled(d, &r).await?;
            Ok::<_, PipesError>((r, image))
        }))
        .await?
        .into_iter()
        .collect();
        let starting = config.services.iter().filter(|s| found(&s.name).is_none_or(|i| !i.running)).count();
        let admitted = self.admit(starting).await?;
        for wave in waves {
            try_join_all(wave.iter().filter_map(|name| config.service(name)).map(|service| {
                let image = images.get(&self.image_ref(&service.image));
                self.service_up(d, config, service, found(&service.name), image)
            }))
            .await?;
        }
        drop(admitted);
        Ok(())
    }

    /// One service running and healthy, timed as phase `service:{name}`.
    async fn service_up(
        &self,
        d: &Deployment,
        config: &Effective,
        service: &Service,
        existing: Option<&Instance>,
        image: Option<&Image>,
    ) -> Result<(), PipesError> {
        let phase = Phase::Service(service.name.as_str().into());
        self.timed(d, phase, async {
            let woken = match existing {
                Some(i) if i.running => Some(Ok(i.clone())),
                Some(i) if i.paused => Some(self.thaw(&i.id).await),
                Some(i) => Some(self.start_service(d, service, &i.id).await),
                None => None,
            };
            let instance = match woken {
                Some(Ok(instance)) => instance,
                Some(Err(e @ PipesError::ServiceUnhealthy { .. })) => return Err(e),
                // Missing, or removed since it was listed: made anew from its image.
                Some(Err(_)) | None => {
                    let image = match image {
                        Some(image) => image.clone(),
                        None => self.local_or_pulled(d, &self.image_ref(&service.image)).await?,
                    };
                    self.create_service(d, config, service, &image).await?
                }
            };
            self.until_healthy(d, service, &instance).await
        })
        .await
    }

    async fn create_service(&self, d: &Deployment, config: &Effective, service: &Service, image: &Image) -> Result<Instance, PipesError> {
        let image_ref = self.image_ref(&service.image);
        let hash = config.service_hash(service, &image_ref);
        let spec = Spec {
            deployment: d.clone(),
            service: Some(service.name.clone()),
            image: image_ref,
            port: match service.check {
                Check::Tcp(port) => port,
                _ => 0,
            },
            hash: hash.clone(),
            identity: hash,
            env: service.env.clone(),
            cmd: service.cmd.clone(),
            memory_bytes: service.memory.0,
            cpus: service.cpus,
            restart: crate::config::Restart::No,
            digest: image.digest.clone(),
            image_id: image.id.clone(),
            pids: service.pids,
            capabilities: BASE_CAPABILITIES.iter().map(|c| c.to_string()).collect(),
            config: service.to_json().to_string(),
            volumes: service.volumes.clone(),
            network: true,
            health_cmd: match &service.check {
                Check::Cmd(cmd) => Some(cmd.clone()),
                _ => None,
            },
        };
        let instance = self.backend().create(&spec).await?;
        if instance.running {
            return Ok(instance);
        }
        log::info!("{d}: starting service {} ({})", service.name, short_id(&instance.id));
        self.start_service(d, service, &instance.id).await
    }

    /// Starts service `id` within its health timeout: a backend may call a
    /// task with a health check started only once it is healthy (Swarm).
    async fn start_service(&self, d: &Deployment, service: &Service, id: &str) -> Result<Instance, PipesError> {
        match tokio::time::timeout(service.timeout, self.backend().start(id)).await {
            Ok(started) => started,
            Err(_) => {
                Err(PipesError::ServiceUnhealthy { deployment: d.to_string(), service: service.name.clone(), timeout: service.timeout, probed: "start".into() })
            }
        }
    }

    /// Waits until `instance` of `service` passes its check; fails when it
    /// exits first or the check's timeout passes.
    async fn until_healthy(&self, d: &Deployment, service: &Service, instance: &Instance) -> Result<(), PipesError> {
        if !instance.running {
            return Err(self.service_exit(d, &service.name, &instance.id, instance.exit_code.unwrap_or(0)).await);
        }
        let (probed, check) = match &service.check {
            Check::Running => return Ok(()),
            Check::Tcp(port) => {
                let addr = instance.address.ok_or_else(|| PipesError::Unservable {
                    deployment: d.to_string(),
                    reason: format!("service {} runs, but Pipes cannot reach it to check port {port}", service.name),
                })?;
                (format!("connect {addr}"), futures_util::future::Either::Left(probe::until_connects(addr, service.timeout)))
            }
            Check::Cmd(cmd) => (format!("run {cmd:?}"), futures_util::future::Either::Right(self.until_reported_healthy(d, &instance.id, service))),
        };
        let mut check = std::pin::pin!(check);
        let healthy = tokio::select! {
            biased;
            exit = self.backend().exited(&instance.id) => match exit {
                Ok(code) => return Err(self.service_exit(d, &service.name, &instance.id, code).await),
                // Losing the watch is no failure of the service: the check decides.
                Err(_) => None,
            },
            healthy = &mut check => Some(healthy),
        };
        let healthy = match healthy {
            Some(healthy) => healthy,
            None => check.await,
        };
        if healthy {
            return Ok(());
        }
        // A service that never became healthy is stopped; it keeps its logs.
        if let Err(e) = self.backend().stop(&instance.id, NEVER_READY_GRACE).await {
            log::warn!("{d}: cannot stop unhealthy service {}: {e}", service.name);
        }
        Err(PipesError::ServiceUnhealthy { deployment: d.to_string(), service: service.name.clone(), timeout: service.timeout, probed })
    }

    /// Whether the backend reports `id` healthy within the service's timeout.
    async fn until_reported_healthy(&self, d: &Deployment, id: &str, service: &Service) -> bool {
        let deadline = Instant::now() + service.timeout;
        loop {
            match self.backend().services(d).await {
                Ok(services) => match services.iter().find(|i| i.id == id) {
                    Some(i) if i.health.as_deref() == Some("healthy") => return true,
                    Some(i) => log::debug!("{d}: service {} is {:?} (running: {})", service.name, i.health, i.running),
                    None => log::debug!("{d}: service {} is not listed", service.name),
                },
                Err(e) => log::debug!("{d}: cannot ask how service {} is: {e}", service.name),
            }
            if Instant::now() + HEALTH_POLL >= deadline {
                return false;
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
    }

    /// The failure of a service that exited while starting, with its last log lines.
    async fn service_exit(&self, d: &Deployment, service: &str, id: &str, code: i64) -> PipesError {
        PipesError::ServiceExited { deployment: d.to_string(), service: service.to_owned(), code, logs: self.last_logs(id).await }
    }

    /// `image_ref` as it is here, pulled first when missing.
    async fn local_or_pulled(&self, d: &Deployment, image_ref: &str) -> Result<Image, PipesError> {
        match self.backend().images().image(image_ref).await? {
            Some(image) => Ok(image),
            None => {
                log::info!("{d}: pulling {image_ref}");
                self.pull_image(d, image_ref).await
            }
        }
    }

    /// Stops `d`'s services that run or are paused, keeping them.
    pub async fn stop_services(&self, d: &Deployment) -> Result<(), PipesError> {
        for i in self.backend().services(d).await?.iter().filter(|i| i.running || i.paused) {
            self.backend().stop(&i.id, STOP_GRACE).await?;
        }
        Ok(())
    }

    /// Freezes `d`'s running services beside its paused app.
    pub async fn pause_services(&self, d: &Deployment) -> Result<(), PipesError> {
        let Some(pausing) = self.backend().pausing() else { return self.stop_services(d).await };
        for i in self.backend().services(d).await?.iter().filter(|i| i.running) {
            pausing.pause(&i.id).await?;
        }
        Ok(())
    }

    /// Removes the containers of `d`'s services whose config changed since
    /// they were made; the next start makes them anew, with their volumes.
    pub(super) async fn replace_outdated_services(&self, d: &Deployment, config: &Effective) -> Result<(), PipesError> {
        for i in self.backend().services(d).await? {
            if self.service_outdated(&i, config) {
                log::info!("{d}: service {} changed since it was made: recreating it", i.service.as_deref().unwrap_or("?"));
                self.backend().remove(&i.id).await?;
            }
        }
        Ok(())
    }

    /// Removes the containers of `d`'s services that `config` no longer
    /// names (their volumes stay with the deployment); those left.
    pub(super) async fn remove_unconfigured_services(&self, d: &Deployment, config: &Effective) -> Result<Vec<Instance>, PipesError> {
        let (mut kept, mut gone) = (Vec::new(), Vec::new());
        for i in self.backend().services(d).await? {
            match i.service.as_deref().and_then(|n| config.service(n)) {
                Some(_) => kept.push(i),
                None => gone.push(i),
            }
        }
        for old in gone {
            log::info!("{d}: service {} is no longer configured: removing its container", old.service.as_deref().unwrap_or("?"));
            self.backend().remove(&old.id).await?;
        }
        Ok(kept)
    }

    /// Whether service instance `i` was made from another config than
    /// `config`'s (or is no longer configured).
    pub fn service_outdated(&self, i: &Instance, config: &Effective) -> bool {
        let current = i.service.as_deref().and_then(|n| config.service(n));
        current.is_none_or(|s| i.spec_hash.as_deref() != Some(&config.service_hash(s, &self.image_ref(&s.image))))
    }

    /// Removes everything of `d`: every generation, its services, its
    /// network, and its volumes unless `keep_volumes`.
    pub async fn remove_all(&self, d: &Deployment, keep_volumes: bool) -> Result<(), PipesError> {
        self.remove(d).await?;
        for i in self.backend().services(d).await? {
            self.backend().remove(&i.id).await?;
        }
        self.backend().remove_shared(d, keep_volumes).await
    }

    /// The last `lines` lines of `d`'s service `name`, with its id.
    pub async fn service_logs(&self, d: &Deployment, name: &str, lines: usize) -> Result<(Option<String>, Vec<String>), PipesError> {
        match self.backend().services(d).await?.into_iter().find(|i| i.service.as_deref() == Some(name)) {
            Some(i) => Ok((Some(i.id.clone()), self.backend().logs(&i.id, lines).await)),
            None => Ok((None, Vec::new())),
        }
    }
}
