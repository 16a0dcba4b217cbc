//! Tasks anywhere in the swarm: which one a service runs, and at what address.
//!
//! This node's engine reports the containers of its own tasks only; a task
//! that dies on another node, or is rescheduled off a lost one, sends it no
//! event. So the instance's tasks are listed every [`TASK_POLL`], and a
//! service whose running task changed is told as a death (the old task) and
//! a start (the new one), as a container event would.
//!
//! A task's address comes from the engine's DNS (`tasks.<service>`), which
//! names a task on another node until it has exited — also while it is
//! stopping. An answer is taken only if the network's own view gives that
//! IP to the task the swarm wants running.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::PoisonError;
use std::time::Duration;

use bollard::models::Task;
use bollard::query_parameters::{InspectNetworkOptions, ListTasksOptions};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use hickory_resolver::TokioResolver;

use super::service::{created, deployment_of, runs, service_label};
use super::{Known, Swarm, LABEL_INSTANCE};
use crate::engine::{Event, EventKind};
use crate::error::PipesError;

/// How often the instance's tasks are listed: a task dying on another node
/// is noticed within this (and the swarm's own report of it).
pub(super) const TASK_POLL: Duration = Duration::from_secs(1);

/// The running task of each service, as last listed: service id → task id.
type Running = HashMap<String, String>;

impl Swarm {
    /// Events for the services whose running task changed between two
    /// listings of the instance's tasks, one listing every [`TASK_POLL`].
    /// The first listing only sets what the next is compared with (the
    /// reconcile that follows every (re)connection covers the state then);
    /// a listing that fails is skipped.
    pub(super) fn task_changes(&self) -> BoxStream<'static, Result<Event, PipesError>> {
        let this = self.clone();
        futures_util::stream::unfold(None::<Running>, move |last| {
            let this = this.clone();
            async move {
                let mut last = last;
                loop {
                    if last.is_some() {
                        tokio::time::sleep(TASK_POLL).await;
                    }
                    let now = match this.running_tasks().await {
                        Ok(now) => now,
                        Err(e) => {
                            log::debug!("cannot list the swarm's tasks: {e}");
                            if last.is_none() {
                                last = Some(Running::new());
                            }
                            continue;
                        }
                    };
                    let events = match &last {
                        Some(before) => this.changed(before, &now).await,
                        None => Vec::new(),
                    };
                    last = Some(now);
                    if !events.is_empty() {
                        return Some((futures_util::stream::iter(events.into_iter().map(Ok)), last));
                    }
                }
            }
        })
        .flatten()
        .boxed()
    }

    /// The running task of each service of this instance that has one.
    async fn running_tasks(&self) -> Result<Running, PipesError> {
        let filters = HashMap::from([
            ("label".to_owned(), vec![format!("{LABEL_INSTANCE}={}", self.moby.instance())]),
            ("desired-state".to_owned(), vec!["running".to_owned()]),
        ]);
        let tasks = self.client().await?.list_tasks(Some(ListTasksOptions { filters: Some(filters) })).await.map_err(|e| self.moby.fail("list tasks", e))?;
        Ok(running_by_service(&tasks))
    }

    /// A death for each service whose running task is gone or another, and a
    /// start for each that runs a task it did not.
    async fn changed(&self, before: &Running, now: &Running) -> Vec<Event> {
        let time_nano = i64::try_from(crate::clock::unix_ms()).unwrap_or(i64::MAX).saturating_mul(1_000_000);
        let mut events = Vec::new();
        for (service, task) in before {
            if now.get(service) != Some(task) {
                events.extend(self.task_event(service, EventKind::Died(None), time_nano).await);
            }
        }
        for (service, task) in now {
            if before.get(service) != Some(task) {
                events.extend(self.task_event(service, EventKind::Started, time_nano).await);
            }
        }
        events
    }

    async fn task_event(&self, service: &str, kind: EventKind, time_nano: i64) -> Option<Event> {
        let (deployment, label): Known = self.known_service(service).await?;
        Some(Event { id: service.to_owned(), deployment: Some(deployment), service: label, kind, time_nano })
    }

    /// The IP at which task `task` of service `name` answers, once this
    /// node's engine resolves it: an answer of the DNS that the view of one
    /// of `networks` gives to that very task, never one of another task (one
    /// stopping, say). The DNS answers on one of the networks this replica
    /// shares with the task (an app with services is on two), so each is
    /// looked at until one gives the answer.
    pub(super) async fn task_address(&self, name: &str, networks: &[String], task: &str) -> Option<IpAddr> {
        let answers = self.resolve(name).await;
        if answers.is_empty() {
            return None;
        }
        let client = self.client().await.ok()?;
        for network in networks {
            let options = InspectNetworkOptions { verbose: true, scope: Some("swarm".to_owned()) };
            let Ok(view) = client.inspect_network(network, Some(options)).await else { continue };
            let ip = view.services.as_ref().and_then(|s| s.get(name)).and_then(|s| endpoint_of(s, task));
            if let Some(ip) = ip.filter(|ip| answers.contains(ip)) {
                return Some(ip);
            }
        }
        None
    }

    /// The IPs of service `name`'s tasks in the engine's DNS. Answers are not
    /// cached: a task's IP is gone when the task is.
    pub(super) async fn resolve(&self, name: &str) -> Vec<std::net::IpAddr> {
        let Some(resolver) = self.resolver() else { return Vec::new() };
        match resolver.lookup_ip(format!("tasks.{name}.")).await {
            Ok(answer) => answer.iter().collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The engine's DNS (the container's `/etc/resolv.conf`), made once.
    fn resolver(&self) -> Option<TokioResolver> {
        let resolver = {
            let mut slot = self.resolver.lock().unwrap_or_else(PoisonError::into_inner);
            match &*slot {
                Some(r) => r.clone(),
                None => {
                    let mut builder = TokioResolver::builder_tokio().ok()?;
                    builder.options_mut().cache_size = 0;
                    let built = builder.build();
                    *slot = Some(built.clone());
                    built
                }
            }
        };
        Some(resolver)
    }

    /// What service `id` is, if it is one of this instance: as seen before,
    /// else asked of the engine (a service another replica made). A removed
    /// service cannot be asked about any more; the reconcile covers it.
    pub(super) async fn known_service(&self, id: &str) -> Option<Known> {
        if let Some(known) = self.known.lock().unwrap_or_else(PoisonError::into_inner).get(id) {
            return Some(known.clone());
        }
        let service = self.service(id).await.ok()??;
        let labels = service.spec.as_ref()?.labels.as_ref()?;
        (labels.get(LABEL_INSTANCE).map(String::as_str) == Some(self.moby.instance())).then_some(())?;
        let known = (deployment_of(&service)?, service_label(&service));
        self.known.lock().unwrap_or_else(PoisonError::into_inner).insert(id.to_owned(), known.clone());
        Some(known)
    }
}

/// The running task (the newest, if several) of each service in `tasks`.
fn running_by_service(tasks: &[Task]) -> Running {
    let mut newest: HashMap<&str, &Task> = HashMap::new();
    for task in tasks.iter().filter(|t| runs(t)) {
        let Some(service) = task.service_id.as_deref() else { continue };
        let kept = newest.entry(service).or_insert(task);
        if created(task) > created(kept) {
            *kept = task;
        }
    }
    newest.into_iter().filter_map(|(service, task)| Some((service.to_owned(), task.id.clone()?))).collect()
}

/// The IP a service's entry in a network's verbose view gives task `task`:
/// its tasks are named `<service>.<slot>.<task id>`.
fn endpoint_of(service: &serde_json::Value, task: &str) -> Option<IpAddr> {
    let tasks = service.get("Tasks")?.as_array()?;
    let entry = tasks.iter().find(|t| t.get("Name").and_then(|n| n.as_str()).is_some_and(|n| n.rsplit('.').next() == Some(task)))?;
    entry.get("EndpointIP")?.as_str()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{TaskState, TaskStatus};

    fn task(id: &str, service: &str, state: TaskState, desired: TaskState, created: &str) -> Task {
        Task {
            id: Some(id.into()),
            service_id: Some(service.into()),
            desired_state: Some(desired),
            status: Some(TaskStatus { state: Some(state), ..Default::default() }),
            created_at: Some(created.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_service_runs_its_newest_running_task_and_none_that_is_starting_or_told_to_stop() {
        let tasks = [
            task("old", "s1", TaskState::RUNNING, TaskState::SHUTDOWN, "2026-01-01T00:00:00Z"),
            task("new", "s1", TaskState::RUNNING, TaskState::RUNNING, "2026-01-01T00:00:05Z"),
            task("older", "s1", TaskState::RUNNING, TaskState::RUNNING, "2026-01-01T00:00:01Z"),
            task("coming", "s2", TaskState::STARTING, TaskState::RUNNING, "2026-01-01T00:00:05Z"),
        ];
        let running = running_by_service(&tasks);
        assert_eq!(running.get("s1").map(String::as_str), Some("new"));
        assert!(!running.contains_key("s2"));
    }

    #[test]
    fn the_view_names_the_ip_of_the_task_asked_for_only() {
        let view = serde_json::json!({"VIP": "", "Tasks": [
            {"Name": "app-v1.1.stopping1", "EndpointIP": "10.0.1.5", "Info": {}},
            {"Name": "app-v1.1.running22", "EndpointIP": "10.0.1.9", "Info": {}},
        ]});
        assert_eq!(endpoint_of(&view, "running22"), Some("10.0.1.9".parse().unwrap()));
        assert_eq!(endpoint_of(&view, "stopping1"), Some("10.0.1.5".parse().unwrap()));
        assert_eq!(endpoint_of(&view, "gone"), None);
        assert_eq!(endpoint_of(&serde_json::json!({}), "running22"), None);
    }
}
