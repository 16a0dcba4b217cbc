//! The engine's events, as [`Event`]s: both backends follow the containers
//! of this instance (Swarm's are its tasks' containers).

use std::collections::HashMap;

use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptions;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;

use super::Moby;
use crate::engine::{Event, EventKind, LABEL_DEPLOYMENT, LABEL_INSTANCE, LABEL_SERVICE};
use crate::error::PipesError;
use crate::route::Deployment;

impl Moby {
    /// The events of this instance's containers from now on (or since
    /// `since_nano`), each made an [`Event`] by `of`; `None` drops one. Ends
    /// when the connection does.
    pub fn container_events(
        &self,
        since_nano: Option<i64>,
        of: impl Fn(EventMessage) -> Option<Event> + Send + 'static,
    ) -> BoxStream<'static, Result<Event, PipesError>> {
        let options = EventsOptions {
            since: since_nano.map(since_param),
            until: None,
            filters: Some(HashMap::from([
                ("type".to_owned(), vec!["container".to_owned()]),
                ("label".to_owned(), vec![format!("{LABEL_INSTANCE}={}", self.instance())]),
            ])),
        };
        self.events(options, move |message| std::future::ready(of(message)))
    }

    /// The engine's events as `options` select them, each made an [`Event`]
    /// by the future `of` returns.
    pub fn events<F>(&self, options: EventsOptions, of: impl Fn(EventMessage) -> F + Send + 'static) -> BoxStream<'static, Result<Event, PipesError>>
    where
        F: std::future::Future<Output = Option<Event>> + Send + 'static,
    {
        let this = self.clone();
        futures_util::stream::once(async move {
            let client = match this.client().await {
                Ok(client) => client.clone(),
                Err(e) => return futures_util::stream::once(std::future::ready(Err(e))).boxed(),
            };
            let fail = this.clone();
            client
                .events(Some(options))
                .then(move |item| {
                    let event = item.map(&of);
                    let fail = fail.clone();
                    async move {
                        match event {
                            Ok(event) => event.await.map(Ok),
                            Err(e) => Some(Err(fail.fail("watch events", e))),
                        }
                    }
                })
                .filter_map(std::future::ready)
                .boxed()
        })
        .flatten()
        .boxed()
    }
}

/// An event Pipes cares about, from the engine's message of a container.
pub fn event_of(message: EventMessage) -> Option<Event> {
    let action = message.action?;
    let actor = message.actor?;
    let attributes = actor.attributes.unwrap_or_default();
    let kind = match action.as_str() {
        "start" => EventKind::Started,
        "die" => EventKind::Died(attributes.get("exitCode").and_then(|c| c.parse().ok())),
        "stop" => EventKind::Stopped,
        "kill" => EventKind::Killed,
        "oom" => EventKind::OutOfMemory,
        "destroy" => EventKind::Destroyed,
        "pause" => EventKind::Paused,
        "unpause" => EventKind::Unpaused,
        other => EventKind::Health(other.strip_prefix("health_status: ")?.to_owned()),
    };
    Some(Event {
        id: actor.id?,
        deployment: attributes.get(LABEL_DEPLOYMENT).and_then(|d| Deployment::parse(d)),
        service: attributes.get(LABEL_SERVICE).cloned(),
        kind,
        time_nano: time_nano(message.time_nano, message.time),
    })
}

/// When an event happened, in nanoseconds since the epoch.
pub fn time_nano(nanos: Option<i64>, secs: Option<i64>) -> i64 {
    nanos.or(secs.map(|t| t.saturating_mul(1_000_000_000))).unwrap_or(0)
}

/// An events `since` as the engine takes it: seconds with a fractional part.
pub fn since_param(nanos: i64) -> String {
    format!("{}.{:09}", nanos.div_euclid(1_000_000_000), nanos.rem_euclid(1_000_000_000))
}
