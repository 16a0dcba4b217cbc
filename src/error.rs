//! What can go wrong on the request path, and how each failure reads to a user.
//!
//! Every variant maps to one row of the status table in the README ("Errors")
//! and carries what the message needs. How an error is written to a client
//! (JSON or HTML, headers) is `reply`'s business.

use std::fmt;
use std::time::Duration;

/// A failure a client sees as an HTTP error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipesError {
    /// The Host is not under the domain Pipes serves.
    NotOurs { host: String, expected: String },
    /// The Host names no deployment (too few labels); `expected` shows the layout.
    NoDeployment { host: String, expected: String },
    /// A Host label cannot be part of a Docker image reference.
    BadName { label: String, reason: &'static str },
    /// An API path Pipes does not know; `known` lists the paths that exist.
    ApiNotFound { path: String, known: Vec<&'static str>, elsewhere: Option<&'static str> },
    /// The API needs a bearer token and the request has none, or a wrong one.
    Unauthorized,
    /// No API token is configured, so the API is closed.
    ApiClosed,
    /// A valid token that does not cover this user's deployments.
    OutOfScope { user: String },
    /// The request body could not be read.
    BadBody { message: String },
    /// The request body is not JSON.
    BadJson { message: String, line: usize, column: usize },
    /// The body names a field that does not exist.
    UnknownField { field: String, message: String },
    /// A field has the wrong type or an unacceptable value.
    InvalidField { field: String, message: String },
    /// A query parameter is not acceptable.
    BadQuery { parameter: &'static str, message: String },
    /// The request body exceeds the limit.
    BodyTooLarge { limit: usize },
    /// The path exists but not with this method.
    MethodNotAllowed { path: String, allow: String },
    /// A stored config file cannot be read; it is never replaced silently.
    ConfigBroken { file: String, problem: String },
    /// `PIPES_MAX_CONTAINERS` are running already.
    TooManyContainers { max: usize },
    /// The deployment may not be started here.
    Forbidden { deployment: String },
    /// The registry has no such image or tag.
    ImageNotFound { image: String },
    /// The registry refused the credentials (or asked for some).
    RegistryAuth { registry: String, user: Option<String>, detail: String },
    /// The engine could not reach the registry to pull `image`.
    RegistryUnreachable { image: String, registry: String, detail: String },
    /// The container stopped before it answered.
    Exited { deployment: String, code: i64, logs: Vec<String> },
    /// The container did not answer within the health timeout.
    NotReady { deployment: String, timeout: Duration, probed: String },
    /// A service beside the deployment exited while starting.
    ServiceExited { deployment: String, service: String, code: i64, logs: Vec<String> },
    /// A service beside the deployment was not healthy within its timeout.
    ServiceUnhealthy { deployment: String, service: String, timeout: Duration, probed: String },
    /// The Docker engine cannot be reached or refuses more work.
    EngineUnavailable { reason: String },
    /// The engine answered with an error while deploying.
    Engine { action: &'static str, detail: String },
    /// The image or its configuration cannot be deployed as it is.
    Unservable { deployment: String, reason: String },
    /// A rollback was asked for and no previous generation is kept.
    NoPreviousGeneration { deployment: String },
    /// `PIPES_MAX_CONNECTIONS` connections are open already.
    TooManyConnections { max: usize },
    /// The request head did not arrive within `PIPES_HEADER_TIMEOUT`.
    HeaderTimeout { timeout: Duration },
    /// The request head is larger than `PIPES_MAX_HEADER_SIZE`.
    HeadersTooLarge { limit: usize },
    /// An API request's body did not arrive within `PIPES_HEADER_TIMEOUT`.
    BodyTimeout { timeout: Duration },
    /// The pull took longer than `PIPES_PULL_TIMEOUT`.
    PullTimeout { image: String, timeout: Duration },
    /// This client has `PIPES_MAX_STARTS_PER_CLIENT` cold starts under way.
    TooManyStarts { max: usize },
    /// `PIPES_MAX_NOT_RUNNING` deployments that do not run are known already.
    TooManyNotRunning { max: usize },
    /// A browser says a page of another site sent a request that acts.
    CrossSite { origin: String },
    /// A request body that is not JSON.
    UnsupportedMediaType { given: String },
    /// This client has `PIPES_MAX_STREAMS_PER_CLIENT` event streams open.
    TooManyStreams { max: usize },
    /// Anonymous event streams hold their whole share of `PIPES_MAX_CONNECTIONS`.
    PublicStreamsFull { max: usize },
    /// The client broke HTTP (a bad chunk size, a forbidden header).
    BadRequest { reason: String },
    /// The client's address is outside the deployment's `access.allow_ips`.
    AccessDenied { deployment: String },
    /// The deployment needs credentials (`access.basic`) or a share link,
    /// and the request brought neither that holds; `realm` names it.
    AuthenticationRequired { realm: String, basic: bool, share_expired: bool },
    /// The deployment's auth server (`access.forward_auth`) did not answer
    /// in time or could not be reached: nobody is let through.
    ForwardAuthUnavailable { deployment: String, detail: String },
    /// The engine's disk has less free space than `PIPES_DISK_MIN_FREE`: no pulls.
    InsufficientStorage { image: String, free: u64, min_free: String },
}

/// Seconds a client is told to wait after a 503.
pub const RETRY_AFTER_SECS: u32 = 5;

impl PipesError {
    /// The HTTP status this failure is answered with.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotOurs { .. } | Self::NoDeployment { .. } | Self::ApiNotFound { .. } => 404,
            Self::ImageNotFound { .. } => 404,
            Self::BadName { .. } => 400,
            Self::Forbidden { .. } | Self::ApiClosed | Self::OutOfScope { .. } => 403,
            Self::Unauthorized => 401,
            Self::BadBody { .. } | Self::BadJson { .. } | Self::UnknownField { .. } | Self::BadQuery { .. } => 400,
            Self::InvalidField { .. } => 422,
            Self::BodyTooLarge { .. } => 413,
            Self::MethodNotAllowed { .. } => 405,
            Self::ConfigBroken { .. } => 500,
            Self::TooManyContainers { .. } => 503,
            Self::RegistryAuth { .. } | Self::RegistryUnreachable { .. } | Self::Exited { .. } | Self::Engine { .. } => 502,
            Self::Unservable { .. } => 502,
            Self::NotReady { .. } | Self::ServiceUnhealthy { .. } => 504,
            Self::ServiceExited { .. } => 502,
            Self::NoPreviousGeneration { .. } => 409,
            Self::TooManyConnections { .. } => 503,
            Self::HeaderTimeout { .. } => 408,
            Self::HeadersTooLarge { .. } => 431,
            Self::BodyTimeout { .. } => 408,
            Self::PullTimeout { .. } => 504,
            Self::TooManyStarts { .. } | Self::TooManyNotRunning { .. } | Self::PublicStreamsFull { .. } => 503,
            Self::TooManyStreams { .. } => 429,
            Self::CrossSite { .. } => 403,
            Self::UnsupportedMediaType { .. } => 415,
            Self::BadRequest { .. } => 400,
            Self::EngineUnavailable { .. } => 503,
            Self::AccessDenied { .. } => 403,
            Self::AuthenticationRequired { .. } => 401,
            Self::ForwardAuthUnavailable { .. } => 503,
            Self::InsufficientStorage { .. } => 507,
        }
    }

    /// A short machine-readable name of the failure.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotOurs { .. } => "not_our_host",
            Self::NoDeployment { .. } => "no_deployment",
            Self::BadName { .. } => "invalid_name",
            Self::ApiNotFound { .. } => "unknown_api_path",
            Self::Forbidden { .. } => "not_allowed",
            Self::Unauthorized => "unauthorized",
            Self::ApiClosed => "api_closed",
            Self::OutOfScope { .. } => "out_of_scope",
            Self::BadBody { .. } => "bad_body",
            Self::BadJson { .. } => "bad_json",
            Self::UnknownField { .. } => "unknown_field",
            Self::InvalidField { .. } => "invalid_field",
            Self::BadQuery { .. } => "bad_query",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::ConfigBroken { .. } => "config_broken",
            Self::TooManyContainers { .. } => "too_many_containers",
            Self::ImageNotFound { .. } => "image_not_found",
            Self::RegistryAuth { .. } => "registry_auth",
            Self::RegistryUnreachable { .. } => "registry_unreachable",
            Self::Exited { .. } => "container_exited",
            Self::NotReady { .. } => "not_ready",
            Self::ServiceExited { .. } => "service_exited",
            Self::ServiceUnhealthy { .. } => "service_unhealthy",
            Self::EngineUnavailable { .. } => "engine_unavailable",
            Self::Engine { .. } => "engine_error",
            Self::Unservable { .. } => "unservable",
            Self::NoPreviousGeneration { .. } => "no_previous_generation",
            Self::TooManyConnections { .. } => "too_many_connections",
            Self::HeaderTimeout { .. } => "header_timeout",
            Self::HeadersTooLarge { .. } => "headers_too_large",
            Self::BodyTimeout { .. } => "body_timeout",
            Self::PullTimeout { .. } => "pull_timeout",
            Self::TooManyStarts { .. } => "too_many_starts",
            Self::TooManyNotRunning { .. } => "too_many_not_running",
            Self::TooManyStreams { .. } => "too_many_streams",
            Self::CrossSite { .. } => "cross_site",
            Self::UnsupportedMediaType { .. } => "unsupported_media_type",
            Self::PublicStreamsFull { .. } => "public_streams_full",
            Self::BadRequest { .. } => "bad_request",
            Self::AccessDenied { .. } => "access_denied",
            Self::AuthenticationRequired { share_expired: true, .. } => "share_expired",
            Self::AuthenticationRequired { .. } => "authentication_required",
            Self::ForwardAuthUnavailable { .. } => "forward_auth_unavailable",
            Self::InsufficientStorage { .. } => "insufficient_storage",
        }
    }

    /// Seconds for a `Retry-After` header, where the failure is passing.
    pub fn retry_after(&self) -> Option<u32> {
        matches!(
            self,
            Self::EngineUnavailable { .. }
                | Self::TooManyContainers { .. }
                | Self::TooManyConnections { .. }
                | Self::TooManyStarts { .. }
                | Self::TooManyNotRunning { .. }
                | Self::TooManyStreams { .. }
                | Self::PublicStreamsFull { .. }
                | Self::ForwardAuthUnavailable { .. }
                | Self::InsufficientStorage { .. }
        )
        .then_some(RETRY_AFTER_SECS)
    }

    /// Whether a start that failed this way is remembered for
    /// `PIPES_FAILURE_TTL`: failures of the deployment itself are, passing
    /// ones of the engine or of Pipes' own limits are not — the next request
    /// tries again.
    pub fn remembered(&self) -> bool {
        matches!(
            self,
            Self::ImageNotFound { .. }
                | Self::RegistryAuth { .. }
                | Self::RegistryUnreachable { .. }
                | Self::Exited { .. }
                | Self::NotReady { .. }
                | Self::ServiceExited { .. }
                | Self::ServiceUnhealthy { .. }
                | Self::Unservable { .. }
                | Self::ConfigBroken { .. }
                | Self::PullTimeout { .. }
        )
    }
}

impl fmt::Display for PipesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotOurs { host, expected } => {
                write!(f, "host '{host}' is not served here; expected {expected}")
            }
            Self::NoDeployment { host, expected } => write!(f, "host '{host}' names no deployment; use {expected}"),
            Self::BadName { label, reason } => write!(f, "label '{label}' in the host: {reason}"),
            Self::ApiNotFound { path, known, elsewhere: Some(elsewhere) } => {
                write!(f, "{path} is served on {elsewhere}, not on this host; endpoints here: {}", known.join(", "))
            }
            Self::ApiNotFound { path, known, elsewhere: None } => write!(f, "no API endpoint at '{path}'; endpoints here: {}", known.join(", ")),
            Self::Forbidden { deployment } => write!(
                f,
                "{deployment} may not be deployed here; the operator can allow it with PIPES_ALLOW \
                 (e.g. PIPES_ALLOW='{deployment}' or a pattern such as 'user/*')"
            ),
            Self::Unauthorized => f.write_str("this API needs the header 'Authorization: Bearer <token>' with a valid token"),
            Self::ApiClosed => f.write_str("the management API is closed; the operator opens it by setting PIPES_API_TOKEN (or PIPES_API_TOKEN_FILE)"),
            Self::OutOfScope { user } => write!(f, "this token does not manage deployments of user '{user}'"),
            Self::BadBody { message } => write!(f, "the request body could not be read: {message}"),
            Self::BadJson { message, line, column } => {
                write!(f, "the body is not valid JSON at line {line}, column {column}: {message}")
            }
            Self::UnknownField { field, message } => write!(f, "unknown field '{field}': {message}"),
            Self::InvalidField { field, message } => write!(f, "field '{field}': {message}"),
            Self::BadQuery { parameter, message } => write!(f, "query parameter '{parameter}': {message}"),
            Self::BodyTooLarge { limit } => write!(f, "the body is larger than {limit} bytes"),
            Self::MethodNotAllowed { path, allow } => write!(f, "{path} accepts {allow}"),
            Self::ConfigBroken { file, problem } => write!(f, "the config file {file} cannot be used ({problem}); fix or remove it, or replace it with a PUT"),
            Self::TooManyContainers { max } => write!(f, "{max} containers run already (PIPES_MAX_CONTAINERS); retry in {RETRY_AFTER_SECS} s"),
            Self::ImageNotFound { image } => write!(f, "image {image} was not found in the registry"),
            Self::RegistryAuth { registry, user, detail } => match user {
                Some(user) => write!(f, "registry {registry} refused the credentials of user '{user}': {detail}"),
                None => write!(f, "registry {registry} requires credentials (set DOCKER_AUTH and DOCKER_AUTH_*): {detail}"),
            },
            Self::RegistryUnreachable { image, registry, detail } => write!(
                f,
                "cannot pull {image}: the engine cannot reach registry {registry} ({detail}); \
                 PIPES_REGISTRY names the registry of every image"
            ),
            Self::Exited { deployment, code, .. } => {
                write!(f, "the container of {deployment} exited with code {code} while starting")
            }
            Self::NotReady { deployment, timeout, probed } => {
                write!(f, "the container of {deployment} did not answer {probed} within {}", DisplayDuration(*timeout))
            }
            Self::ServiceExited { deployment, service, code, .. } => {
                write!(f, "service {service} of {deployment} exited with code {code} while starting")
            }
            Self::ServiceUnhealthy { deployment, service, timeout, probed } => {
                write!(f, "service {service} of {deployment} was not healthy ({probed}) within {}", DisplayDuration(*timeout))
            }
            Self::EngineUnavailable { reason } => {
                write!(f, "the Docker engine is unavailable: {reason}; retry in {RETRY_AFTER_SECS} s")
            }
            Self::Engine { action, detail } => write!(f, "the Docker engine failed to {action}: {detail}"),
            Self::Unservable { deployment, reason } => write!(f, "{deployment} cannot be served: {reason}"),
            Self::NoPreviousGeneration { deployment } => {
                write!(f, "{deployment} has no previous generation to roll back to; one is kept after a redeploy")
            }
            Self::TooManyConnections { max } => {
                write!(f, "{max} connections are open already (PIPES_MAX_CONNECTIONS); retry in {RETRY_AFTER_SECS} s")
            }
            Self::HeaderTimeout { timeout } => {
                write!(f, "the request head did not arrive within {}", DisplayDuration(*timeout))
            }
            Self::HeadersTooLarge { limit } => write!(f, "the request head is larger than {limit} bytes"),
            Self::BodyTimeout { timeout } => {
                write!(f, "the request body did not arrive within {}", DisplayDuration(*timeout))
            }
            Self::PullTimeout { image, timeout } => {
                write!(f, "pulling {image} took longer than {} (PIPES_PULL_TIMEOUT)", DisplayDuration(*timeout))
            }
            Self::TooManyStarts { max } => {
                write!(f, "{max} deployments are starting for this client already (PIPES_MAX_STARTS_PER_CLIENT); retry in {RETRY_AFTER_SECS} s")
            }
            Self::BadRequest { reason } => write!(f, "the request is not valid HTTP: {reason}"),
            Self::TooManyNotRunning { max } => {
                write!(f, "{max} deployments that do not run are known already (PIPES_MAX_NOT_RUNNING); retry in {RETRY_AFTER_SECS} s")
            }
            Self::CrossSite { origin } => {
                write!(f, "a page of another site ({origin}) may not change deployments; use the dashboard on the bare domain, or a client that is no browser")
            }
            Self::UnsupportedMediaType { given } => {
                let given = if given.is_empty() { "no Content-Type" } else { given.as_str() };
                write!(f, "request bodies are JSON (Content-Type: application/json), not {given}")
            }
            Self::TooManyStreams { max } => {
                write!(f, "{max} event streams are open for this client already (PIPES_MAX_STREAMS_PER_CLIENT); retry in {RETRY_AFTER_SECS} s")
            }
            Self::PublicStreamsFull { max } => {
                write!(f, "{max} anonymous event streams are open, the share of PIPES_MAX_CONNECTIONS they may take; retry in {RETRY_AFTER_SECS} s")
            }
            Self::AccessDenied { deployment } => write!(f, "{deployment} is not open to this client's address"),
            Self::AuthenticationRequired { realm, share_expired: true, .. } => {
                write!(f, "this link to {realm} expired or was revoked; ask for a new one")
            }
            Self::AuthenticationRequired { realm, basic: true, .. } => write!(f, "{realm} needs a user name and password"),
            Self::AuthenticationRequired { realm, .. } => write!(f, "{realm} needs a share link"),
            Self::ForwardAuthUnavailable { deployment, detail } => {
                write!(f, "the auth server of {deployment} did not answer ({detail}); retry in {RETRY_AFTER_SECS} s")
            }
            Self::InsufficientStorage { image, free, min_free } => write!(
                f,
                "{image} is not pulled: the engine's disk has {} free, less than PIPES_DISK_MIN_FREE ({min_free}); running deployments keep serving",
                crate::config::ByteSize(*free)
            ),
        }
    }
}

impl std::error::Error for PipesError {}

/// Formats a duration as a person would write it: `60 s`, `1.5 s`, `250 ms`.
pub struct DisplayDuration(pub Duration);

impl fmt::Display for DisplayDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms < 1000 {
            write!(f, "{ms} ms")
        } else if ms.is_multiple_of(1000) {
            write!(f, "{} s", ms / 1000)
        } else {
            write!(f, "{:.1} s", self.0.as_secs_f64())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_design_table() {
        let cases: Vec<(PipesError, u16)> = vec![
            (PipesError::NotOurs { host: "a".into(), expected: "b".into() }, 404),
            (PipesError::BadName { label: "A!".into(), reason: "r" }, 400),
            (PipesError::Forbidden { deployment: "a/b:c".into() }, 403),
            (PipesError::ImageNotFound { image: "a/b:c".into() }, 404),
            (PipesError::RegistryAuth { registry: "r".into(), user: Some("u".into()), detail: "d".into() }, 502),
            (PipesError::RegistryUnreachable { image: "r/a/b:c".into(), registry: "r".into(), detail: "d".into() }, 502),
            (PipesError::Exited { deployment: "a/b:c".into(), code: 3, logs: vec![] }, 502),
            (PipesError::NotReady { deployment: "a/b:c".into(), timeout: Duration::from_secs(1), probed: "GET /".into() }, 504),
            (PipesError::EngineUnavailable { reason: "down".into() }, 503),
            (PipesError::TooManyStreams { max: 8 }, 429),
            (PipesError::PublicStreamsFull { max: 25 }, 503),
        ];
        for (error, status) in cases {
            assert_eq!(error.status(), status, "{error}");
            assert_eq!(error.retry_after().is_some(), status == 503 || status == 429);
        }
    }

    #[test]
    fn forbidden_names_the_setting() {
        let e = PipesError::Forbidden { deployment: "alice/app:v1".into() };
        assert!(e.to_string().contains("PIPES_ALLOW"));
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(DisplayDuration(Duration::from_secs(60)).to_string(), "60 s");
        assert_eq!(DisplayDuration(Duration::from_millis(1500)).to_string(), "1.5 s");
        assert_eq!(DisplayDuration(Duration::from_millis(250)).to_string(), "250 ms");
    }
}
