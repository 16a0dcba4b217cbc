//! Services and tasks as the engine reports them: the spec a deployment's
//! service is made from, its name, and what its tasks say.

use std::time::Duration;

use bollard::models::{
    EndpointSpec, EndpointSpecModeEnum, EventMessage, Limit, Mount, MountType, NetworkAttachmentConfig, Service, ServiceSpec, ServiceSpecMode,
    ServiceSpecModeReplicated, Task, TaskSpec, TaskSpecContainerSpec, TaskSpecPlacement, TaskSpecResources, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum, TaskState,
};

use super::{LABEL_IMAGE_ID, LABEL_SERVICE_ID};
use crate::config::Restart;
use crate::engine::generation_of;
use crate::engine::moby::events::event_of;
use crate::engine::moby::{dns_name, grace_secs, health_config, Moby};
use crate::engine::{Event, Spec, LABEL_CONFIG, LABEL_DEPLOYMENT, LABEL_SERVICE};
use crate::route::Deployment;

/// The spec of a new service for `spec` on `network`, with no replica yet;
/// pinned to node `pin` if given (it holds the volumes).
pub(super) fn service_spec(moby: &Moby, network: &str, spec: &Spec, pin: Option<&str>) -> ServiceSpec {
    let mut labels = moby.labels(spec);
    labels.insert(LABEL_IMAGE_ID.into(), spec.image_id.clone());
    // Pinned to the digest, so that every node runs the same image.
    let image = match &spec.digest {
        Some(digest) => format!("{}@{digest}", spec.image),
        None => spec.image.clone(),
    };
    let condition = match spec.restart {
        Restart::No => TaskSpecRestartPolicyConditionEnum::NONE,
        Restart::OnFailure => TaskSpecRestartPolicyConditionEnum::ON_FAILURE,
        Restart::Always | Restart::UnlessStopped => TaskSpecRestartPolicyConditionEnum::ANY,
    };
    // A service is on its deployment's network alone, known there by its
    // name; the app on PIPES_NETWORK, and on its deployment's when it has services.
    let own = || NetworkAttachmentConfig {
        target: Some(moby.deployment_network(&spec.deployment)),
        aliases: spec.service.clone().map(|s| vec![s]),
        ..Default::default()
    };
    let networks = match (&spec.service, spec.network) {
        (Some(_), _) => vec![own()],
        (None, joins) => std::iter::once(NetworkAttachmentConfig { target: Some(network.to_owned()), ..Default::default() }).chain(joins.then(own)).collect(),
    };
    let mounts: Vec<Mount> = spec
        .volumes
        .iter()
        .map(|(name, path)| Mount {
            target: Some(path.clone()),
            source: Some(moby.volume_name(&spec.deployment, name)),
            typ: Some(MountType::VOLUME),
            ..Default::default()
        })
        .collect();
    let name = match &spec.service {
        Some(service) => dns_name(&format!("{}-{}-{}-{}-svc-{service}", moby.instance(), spec.deployment.user, spec.deployment.repo, spec.deployment.tag)),
        None => service_name(moby.instance(), &spec.deployment, spec.digest.as_deref()),
    };
    ServiceSpec {
        name: Some(name),
        labels: Some(labels.clone()),
        task_template: Some(TaskSpec {
            container_spec: Some(TaskSpecContainerSpec {
                image: Some(image),
                // Task containers do not carry the service's labels: their events name the deployment by these.
                labels: Some(labels),
                env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
                args: spec.cmd.clone(),
                capability_drop: Some(vec!["ALL".into()]),
                capability_add: Some(spec.capabilities.clone()),
                mounts: (!mounts.is_empty()).then_some(mounts),
                health_check: spec.health_cmd.as_deref().map(health_config),
                ..Default::default()
            }),
            placement: pin.map(|node| TaskSpecPlacement { constraints: Some(vec![format!("node.id=={node}")]), ..Default::default() }),
            resources: Some(TaskSpecResources {
                limits: Some(Limit {
                    nano_cpus: Some((spec.cpus * 1e9).round() as i64),
                    memory_bytes: i64::try_from(spec.memory_bytes).ok(),
                    pids: Some(i64::from(spec.pids)),
                }),
                ..Default::default()
            }),
            restart_policy: Some(TaskSpecRestartPolicy { condition: Some(condition), ..Default::default() }),
            networks: Some(networks),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode { replicated: Some(ServiceSpecModeReplicated { replicas: Some(0) }), ..Default::default() }),
        endpoint_spec: Some(EndpointSpec { mode: Some(EndpointSpecModeEnum::DNSRR), ports: None }),
        ..Default::default()
    }
}

/// A task container's event, as its service's.
pub(super) fn task_event(message: EventMessage) -> Option<Event> {
    let service = message.actor.as_ref()?.attributes.as_ref()?.get(LABEL_SERVICE_ID)?.clone();
    event_of(message).map(|event| Event { id: service, ..event })
}

/// Sets a service to no replica, its tasks given `grace` to stop; whether it had any.
pub(super) fn scale_to_zero(spec: &mut ServiceSpec, grace: Duration) -> bool {
    let mode = spec.mode.get_or_insert_with(Default::default).replicated.get_or_insert_with(Default::default);
    if mode.replicas == Some(0) {
        return false;
    }
    mode.replicas = Some(0);
    let container = spec.task_template.get_or_insert_with(Default::default).container_spec.get_or_insert_with(Default::default);
    container.stop_grace_period = Some(i64::from(grace_secs(grace)) * 1_000_000_000);
    true
}

/// The replicas a service asks for.
pub(super) fn replicas(service: &Service) -> i64 {
    service.spec.as_ref().and_then(|s| s.mode.as_ref()?.replicated.as_ref()?.replicas).unwrap_or(0)
}

/// When a task was created. The engine's timestamps vary in length (trailing
/// zeros of the nanoseconds dropped), so they are compared as times.
pub(super) fn created(task: &Task) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339_weak(task.created_at.as_deref()?.trim_end_matches('Z')).ok()
}

/// The newest task of a service that runs and is meant to.
pub(super) fn running_task(tasks: &[Task]) -> Option<&Task> {
    tasks.iter().filter(|t| runs(t)).max_by_key(|t| created(t))
}

/// Whether a task ended (or will not run).
pub(super) fn ended(task: &Task) -> bool {
    matches!(
        task.status.as_ref().and_then(|s| s.state),
        Some(TaskState::COMPLETE | TaskState::FAILED | TaskState::SHUTDOWN | TaskState::REJECTED | TaskState::REMOVE | TaskState::ORPHANED)
    )
}

/// Whether a task runs or is on its way to, and is meant to.
pub(super) fn alive(task: &Task) -> bool {
    task.desired_state == Some(TaskState::RUNNING) && !ended(task)
}

/// Whether a task runs and is meant to.
pub(super) fn runs(task: &Task) -> bool {
    task.desired_state == Some(TaskState::RUNNING) && task.status.as_ref().and_then(|s| s.state) == Some(TaskState::RUNNING)
}

/// Whether `service` is a service beside a deployment's app.
pub(super) fn is_service(service: &Service) -> bool {
    service.spec.as_ref().and_then(|s| s.labels.as_ref()).is_some_and(|l| l.contains_key(LABEL_SERVICE))
}

pub(super) fn deployment_of(service: &Service) -> Option<Deployment> {
    Deployment::parse(service.spec.as_ref()?.labels.as_ref()?.get(LABEL_DEPLOYMENT)?)
}

/// The service name of a generation: unique per instance, deployment and
/// digest, and a valid DNS label (what Swarm asks of a service name): the
/// readable name when it is one, else its cleaned start and a hash.
pub fn service_name(instance: &str, d: &Deployment, digest: Option<&str>) -> String {
    let generation = digest.map(generation_of).unwrap_or("local");
    dns_name(&format!("{instance}-{}-{}-{}-{generation}", d.user, d.repo, d.tag))
}

/// The service beside a deployment that `service` is, if one.
pub(super) fn service_label(service: &Service) -> Option<String> {
    service.spec.as_ref()?.labels.as_ref()?.get(LABEL_SERVICE).cloned()
}

/// Whether `service`'s tasks run a health check.
pub(super) fn has_health_check(service: &Service) -> bool {
    service.spec.as_ref().and_then(health_cmd).is_some()
}

/// The health check command of a service beside an app (an app has none),
/// as the config it was made from says: the engine writes the check back
/// under another name than it takes it (`Healthcheck`, not `HealthCheck`),
/// which the client does not read. An app's spec, written back at every
/// activity report, is not parsed.
fn health_cmd(spec: &ServiceSpec) -> Option<Vec<String>> {
    let labels = spec.labels.as_ref()?;
    labels.get(LABEL_SERVICE)?;
    let config: serde_json::Value = serde_json::from_str(labels.get(LABEL_CONFIG)?).ok()?;
    config["health"]["cmd"].as_array()?.iter().map(|a| a.as_str().map(str::to_owned)).collect()
}

/// Puts a spec read back from the engine's health check in again before it
/// is written: left out, the write would remove it.
pub(super) fn restore_health_check(spec: &mut ServiceSpec) {
    let Some(cmd) = health_cmd(spec) else { return };
    let container = spec.task_template.get_or_insert_with(Default::default).container_spec.get_or_insert_with(Default::default);
    container.health_check.get_or_insert_with(|| health_config(&cmd));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_are_ordered_by_time_not_by_text() {
        let task = |at: &str| Task { created_at: Some(at.to_owned()), ..Default::default() };
        let (earlier, later) = (task("2026-11-29T21:45:05.1Z"), task("2026-11-29T21:45:05.123456789Z"));
        assert!(created(&later) > created(&earlier), "as text, .1Z sorts after .123…Z");
    }

    #[test]
    fn service_names_are_dns_labels_and_unique_per_generation() {
        let d = Deployment::parse("alice/app:v1").unwrap();
        assert_eq!(service_name("pipes", &d, Some("sha256:0123456789abcdef")), "pipes-alice-app-v1-0123456789ab");
        let dotted = Deployment::parse("alice/app:1.2.3").unwrap();
        let dashed = Deployment::parse("alice/app:1-2-3").unwrap();
        let (a, b) = (service_name("pipes", &dotted, None), service_name("pipes", &dashed, None));
        assert_ne!(a, b, "cleaning a name never makes two deployments one");
        let long = Deployment::parse(&format!("alice/{}:v1", "r".repeat(60))).unwrap();
        for name in [a, b, service_name("pipes", &long, Some("sha256:ff"))] {
            assert!(name.len() <= 63, "{name}");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'), "{name}");
        }
    }
}
