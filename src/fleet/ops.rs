//! What operators do to a deployment (stop, remove, restart, logs), and the
//! one flow that owns a config change.

use std::future::Future;
use std::sync::Arc;

use super::{Deployer, Fleet, HappeningKind, StartResult, State};
use crate::config::{check_order, DeployConfig};
use crate::error::PipesError;
use crate::route::Deployment;

/// Why a deployment an operator deleted left, as its followers hear it.
pub const DELETED: &str = "deleted";
/// Why a deployment unused for its `expire_after` left.
pub const EXPIRED: &str = "expired";

/// Which config layer a change replaces.
#[derive(Debug, Clone, Copy)]
pub enum ConfigScope<'a> {
    /// The deployment's own (per-tag) config.
    Tag(&'a Deployment),
    /// The default of the deployment's repository.
    Repository(&'a Deployment),
}

/// What a config change did to what runs.
#[derive(Debug)]
pub enum Applied {
    /// The deployment was made anew from the new config; how its start went.
    Recreated(StartResult),
    /// Nothing was restarted: running deployments report `config_pending`.
    Pending,
    /// Only `access`, `noindex` or `notify` changed: applied at once, nothing restarted.
    AccessOnly,
}

impl Fleet {
    /// Runs `op` on the deployer for `d` on the control runtime, after any
    /// other operation on `d` (a start among them) ended and with the table no
    /// longer sending it requests.
    pub(super) async fn operate<F, Fut>(&self, d: &Deployment, op: F) -> Result<(), PipesError>
    where
        F: FnOnce(Arc<Deployer>, Deployment) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), PipesError>> + Send + 'static,
    {
        let slot = self.slot(d.as_ref());
        let (deployer, d) = (self.deployer.clone(), d.clone());
        self.on_control(async move {
            let _op = slot.ops.lock().await;
            slot.forget();
            op(deployer, d).await
        })
        .await
    }

    /// Stops the deployment's instance and keeps it; the next request starts it again.
    pub async fn stop(&self, d: &Deployment) -> Result<(), PipesError> {
        self.operate(d, |deployer, d| async move { deployer.stop(&d).await }).await?;
        self.feed.tell(d, HappeningKind::Left { state: State::Stopped, why: "stopped by an operator" });
        Ok(())
    }

    /// Removes everything of the deployment: every generation, its
    /// services, its network, and its volumes unless `keep_volumes`. Its
    /// config stays.
    pub async fn remove(&self, d: &Deployment, keep_volumes: bool) -> Result<(), PipesError> {
        self.operate(d, move |deployer, d| async move { deployer.remove_all(&d, keep_volumes).await }).await?;
        self.feed.tell(d, HappeningKind::Left { state: State::Removed, why: DELETED });
        Ok(())
    }

    /// Restarts the deployment's instance (or starts one) and waits until it answers.
    pub async fn restart(self: &Arc<Self>, d: &Deployment) -> StartResult {
        self.operate(d, |deployer, d| async move { deployer.restart(&d).await }).await?;
        self.ready(&self.slot(d.as_ref())).await
    }

    /// The last `lines` lines of `d`'s instance (or of its service
    /// `service`), with its id.
    pub async fn logs(&self, d: &Deployment, lines: usize, service: Option<String>) -> Result<(Option<String>, Vec<String>), PipesError> {
        let (deployer, d) = (self.deployer.clone(), d.clone());
        self.on_control(async move {
            match service {
                Some(name) => deployer.service_logs(&d, &name, lines).await,
                None => deployer.logs(&d, lines).await,
            }
        })
        .await
    }

    /// 422 naming the service when a service's image is not allowed by
    /// `PIPES_ALLOW`: a config cannot run what a host name could not.
    fn check_services(&self, config: &DeployConfig) -> Result<(), PipesError> {
        for (name, service) in &config.services {
            let allowed = Deployment::parse(&service.image).is_some_and(|image| self.allows(image.as_ref()));
            if !allowed {
                return Err(PipesError::InvalidField {
                    field: format!("services.{name}.image"),
                    message: format!("{} is not allowed here (PIPES_ALLOW)", service.image),
                });
            }
        }
        Ok(())
    }

    /// A config changed: the one flow for both layers. The config is checked
    /// against the operator's ceilings (422 above them) and saved; the
    /// deployments it covers forget a remembered failure, so the next
    /// request tries again.
    ///
    /// - A tag's own config is applied at once: its instances are removed,
    ///   the generation kept for a rollback among them, and a new one is made
    ///   and started. A rollback must never bring back the config just
    ///   replaced, and a kept generation made from it could do nothing else.
    /// - A repository's default is not applied to what runs: each running
    ///   deployment reports `config_pending` until it is restarted,
    ///   redeployed or recreated, so one request cannot restart a whole
    ///   repository's previews.
    /// - Access rules (`access`, `noindex`) of either layer apply at once
    ///   to every deployment they cover; a change of nothing else restarts
    ///   nothing.
    pub async fn change_config(self: &Arc<Self>, scope: ConfigScope<'_>, config: DeployConfig) -> Result<Applied, PipesError> {
        self.deployer.check_ceilings(&config)?;
        self.check_services(&config)?;
        self.access.check_config(&config)?;
        let store = self.deployer.store();
        match scope {
            ConfigScope::Tag(d) => {
                self.check_allowed(d)?;
                // Services may depend on those the repository's config names.
                let repository = store.repository(&d.user, &d.repo).await?.unwrap_or_default();
                check_order(&config.over(&repository).services).map_err(|e| PipesError::InvalidField { field: e.field, message: e.message })?;
                // A broken old config counts as changed: the instance is made anew.
                let access_only = store.tag(d).await.ok().map(Option::unwrap_or_default).is_some_and(|old| old.instance_fields() == config.instance_fields());
                store.put_tag(d, config.clone()).await?;
                self.access.put_tag(d, &config);
                self.reapply_access(|x| x == d);
                if access_only {
                    log::info!("{d}: access rules replaced");
                    return Ok(Applied::AccessOnly);
                }
                log::info!("{d}: config replaced, recreating its instance");
                // Removing forgets the remembered failure with the instances.
                // Services and volumes stay (a service's change waits for a
                // restart), but for services the config no longer names.
                self.operate(d, |deployer, d| async move {
                    deployer.remove(&d).await?;
                    let config = deployer.effective(&d).await?;
                    deployer.remove_unconfigured_services(&d, &config).await.map(drop)
                })
                .await?;
                Ok(Applied::Recreated(self.ready(&self.slot(d.as_ref())).await))
            }
            ConfigScope::Repository(d) => {
                check_order(&config.services).map_err(|e| PipesError::InvalidField { field: e.field, message: e.message })?;
                store.put_repository(&d.user, &d.repo, config.clone()).await?;
                self.access.put_repository(d, &config);
                self.reapply_access(|x| x.user == d.user && x.repo == d.repo);
                for slot in self.table.load().values() {
                    if slot.deployment.user == d.user && slot.deployment.repo == d.repo {
                        slot.lock_cold().failed = None;
                    }
                }
                log::info!("{}: repository config replaced; running deployments apply it at their next restart", d.repository());
                Ok(Applied::Pending)
            }
        }
    }
}
