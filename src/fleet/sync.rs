//! Following the engine: its events and a periodic reconcile keep the table
//! true to what runs; adoption takes over what a previous Pipes left.

use std::collections::HashSet;
use std::sync::Arc;

use super::{Fleet, HappeningKind, State};

/// How long a service that died while its app serves is left before it
/// is started again.
const SERVICE_RESTART_DELAY: std::time::Duration = std::time::Duration::from_secs(1);
use crate::engine::{short_id, Event, EventKind};
use crate::error::PipesError;
use crate::route::Deployment;

impl Fleet {
    /// Keeps the table true to what the backend did: an instance that stopped
    /// leaves the table at once; one that started (by hand, by its restart
    /// policy) and is not served yet is probed and adopted.
    pub(crate) fn on_event(self: &Arc<Self>, event: &Event) {
        let Some(d) = &event.deployment else { return };
        if let Some(service) = &event.service {
            return self.on_service_event(d, service, event);
        }
        if !matches!(event.kind, EventKind::Paused | EventKind::Health(_)) {
            self.unpaused(&event.id);
        }
        match &event.kind {
            kind if kind.ends_it() => {
                if let Some(slot) = self.get(d.as_ref()) {
                    if slot.retract(&event.id) {
                        log::info!("{d}: instance {} {kind:?}: no more requests go to it", short_id(&event.id));
                        let (state, why) = match kind {
                            EventKind::Paused => (State::Paused, "paused"),
                            EventKind::Destroyed => (State::Removed, "removed"),
                            EventKind::OutOfMemory => (State::Stopped, "out of memory"),
                            EventKind::Killed => (State::Stopped, "killed"),
                            EventKind::Died(_) => (State::Stopped, "exited"),
                            _ => (State::Stopped, "stopped"),
                        };
                        self.feed.tell(d, HappeningKind::Left { state, why });
                    }
                }
            }
            EventKind::Started | EventKind::Unpaused => self.adopt_running(d, &event.id),
            EventKind::Health(status) => log::debug!("{d}: instance {} is {status}", short_id(&event.id)),
            _ => {}
        }
    }

    /// Level-triggered repair: drops upstreams whose instance no longer runs,
    /// adopts running instances the table does not serve, and starts again
    /// the stopped services of deployments that serve.
    pub(crate) async fn reconcile(self: &Arc<Self>) -> Result<(), PipesError> {
        let deployer = self.deployer.clone();
        let instances = self.on_control(async move { deployer.backend().list().await }).await?;
        let running: HashSet<&str> = instances.iter().filter(|i| i.running).map(|i| i.id.as_str()).collect();
        for slot in self.table.load().values() {
            if let Some(up) = slot.upstream() {
                if !running.contains(up.instance_id.as_str()) && slot.retract(&up.instance_id) {
                    log::info!("{}: instance {} no longer runs: no more requests go to it", slot.deployment, short_id(&up.instance_id));
                }
            }
        }
        for instance in instances.iter().filter(|i| i.running && i.service.is_none()) {
            self.adopt_running(&instance.deployment, &instance.id);
        }
        // A service that died unseen (while Pipes was down, or an event lost).
        for i in instances.iter().filter(|i| !i.running && !i.paused) {
            if let Some(service) = &i.service {
                self.restart_service_later(&i.deployment, &i.id, service);
            }
        }
        self.note_paused(&instances);
        Ok(())
    }

    /// A service that died while its app serves is started again (after a
    /// moment, so a crashing one cannot spin); one stopped with its app, or
    /// by Pipes, is left stopped.
    fn on_service_event(self: &Arc<Self>, d: &Deployment, service: &str, event: &Event) {
        if !matches!(event.kind, EventKind::Died(_) | EventKind::Killed | EventKind::OutOfMemory) || self.retired() {
            return;
        }
        log::warn!("{d}: service {service} stopped ({:?})", event.kind);
        self.restart_service_later(d, &event.id, service);
    }

    /// Starts service instance `id` of `d` again after a moment, if `d`
    /// serves then and the service is still stopped.
    fn restart_service_later(self: &Arc<Self>, d: &Deployment, id: &str, service: &str) {
        let Some(slot) = self.get(d.as_ref()) else { return };
        if slot.upstream().is_none() {
            return;
        }
        log::info!("{d}: service {service} does not run while the deployment serves: starting it again");
        let (fleet, id, service) = (self.clone(), id.to_owned(), service.to_owned());
        self.control.spawn(async move {
            tokio::time::sleep(SERVICE_RESTART_DELAY).await;
            // Stopped on purpose meanwhile (idle, an operator): left so.
            if slot.upstream().is_none() {
                return;
            }
            let backend = fleet.deployer.backend();
            let stopped = backend.services(&slot.deployment).await.is_ok_and(|all| all.iter().any(|i| i.id == id && !i.running && !i.paused));
            if stopped {
                if let Err(e) = backend.start(&id).await {
                    log::warn!("{}: cannot start service {service} again: {e}", slot.deployment);
                }
            }
        });
    }

    /// Starts serving `d` through the usual start (which finds its running
    /// instance and probes it), unless it is served or starting already;
    /// when another instance than `id` is served, follows the newer
    /// generation if `id` made one.
    fn adopt_running(self: &Arc<Self>, d: &Deployment, id: &str) {
        if self.retired() || !self.allows(d.as_ref()) {
            return;
        }
        let slot = self.slot(d.as_ref());
        if slot.starting() {
            return;
        }
        let fleet = self.clone();
        match slot.upstream() {
            None => {
                self.control.spawn(async move {
                    if let Err(e) = fleet.ready(&slot).await {
                        log::debug!("{}: not adopted: {e}", slot.deployment);
                    }
                });
            }
            Some(up) if up.instance_id != id => {
                let started = id.to_owned();
                self.control.spawn(async move { fleet.follow_generation(&slot, up, &started).await });
            }
            Some(_) => {}
        }
    }

    /// Takes over the instances this Pipes left running or stopped: the
    /// current generation of each deployment serves again at once.
    pub async fn adopt(&self) -> Result<usize, PipesError> {
        let deployer = self.deployer.clone();
        let listed = self.on_control(async move { deployer.backend().list().await }).await?;
        self.note_paused(&listed);
        let mut deployments: Vec<&Deployment> = listed.iter().map(|i| &i.deployment).collect();
        deployments.sort();
        deployments.dedup();
        for d in deployments {
            let (deployer, key) = (self.deployer.clone(), d.clone());
            let running = self.on_control(async move { deployer.running(&key).await }).await?;
            let slot = self.slot(d.as_ref());
            match running {
                Some(up) => {
                    log::info!("adopted {d}: instance {} serves at {}", short_id(&up.instance_id), up.addr);
                    slot.set_upstream(Some(Arc::new(up)));
                }
                None => log::info!("adopted {d}: stopped"),
            }
        }
        Ok(listed.len())
    }
}
