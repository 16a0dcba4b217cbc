//! Step 2 of the request path, after the policy: may this client open this
//! deployment? Judged before the table leads to any engine call, so a
//! request that is refused never pulls, creates, starts or wakes anything.
//!
//! A deployment's [`Rules`] come from its config (`access`, `noindex`) over
//! its repository's over `PIPES_ACCESS`; each slot keeps its own, resolved,
//! so the warm path of an open deployment pays one atomic load and a
//! branch. Every check present must pass, in this order:
//!
//! 1. `allow_ips`: the client's address (as `PIPES_TRUSTED_PROXIES` tell
//!    it) inside one of the networks, else 403.
//! 2. A share link or its cookie (`share.rs`) stands in for the next two.
//! 3. `basic` (`basic.rs`): else 401 with a `Basic` challenge.
//! 4. `forward_auth` (`forward.rs`): the auth server's 2xx, else its answer.
//!
//! `book.rs` holds what the rules are made from: every stored layer, and
//! the share key.

mod basic;
mod book;
mod forward;
pub mod share;

use std::net::IpAddr;

use http::{HeaderName, HeaderValue};
use ipnet::IpNet;
use pingora::http::RequestHeader;
use pingora::prelude::*;

use crate::clock::unix_ms;
use crate::config::AccessConfig;
use crate::error::PipesError;
use crate::route::Deployment;

use basic::Basic;
pub use book::Guard;
pub use forward::Relayed;
use forward::{ForwardAuth, Outcome};

/// One deployment's access rules, resolved.
#[derive(Debug)]
pub struct Rules {
    /// The deployment's name, the realm of its `Basic` challenge.
    pub realm: String,
    /// Whether its answers carry `X-Robots-Tag: noindex, nofollow`.
    pub noindex: bool,
    /// Nothing to check: the warm path's one branch.
    open: bool,
    /// What they were made from, to tell whether a new config changed them.
    source: AccessConfig,
    allow: Vec<IpNet>,
    basic: Option<Basic>,
    forward: Option<ForwardAuth>,
    /// Why nobody may open the deployment now (its config cannot be read).
    broken: Option<PipesError>,
}

impl Rules {
    /// The rules `access` and `noindex` make for `d`.
    pub fn new(d: &Deployment, access: &AccessConfig, noindex: bool) -> Rules {
        Rules {
            realm: d.to_string(),
            noindex,
            open: access.is_open(),
            source: access.clone(),
            allow: access.networks(),
            basic: (!access.basic.is_empty()).then(|| Basic::new(access.basic.clone())),
            forward: access.forward_auth.as_ref().and_then(ForwardAuth::new),
            broken: None,
        }
    }

    /// Rules that let nobody in, for `why`.
    pub fn closed(d: &Deployment, why: PipesError) -> Rules {
        Rules { open: false, broken: Some(why), ..Rules::new(d, &AccessConfig::default(), true) }
    }

    /// Whether nothing is checked.
    #[inline]
    pub fn open(&self) -> bool {
        self.open
    }

    /// Whether `other` checks the same (so caches of these may stay).
    pub fn same_as(&self, other: &Rules) -> bool {
        self.source == other.source && self.noindex == other.noindex && self.broken == other.broken
    }
}

/// The check that decided, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Ip,
    Share,
    Basic,
    ForwardAuth,
}

impl Check {
    /// Its name in the access log.
    pub fn as_str(self) -> &'static str {
        match self {
            Check::Ip => "ip",
            Check::Share => "share",
            Check::Basic => "basic",
            Check::ForwardAuth => "forward_auth",
        }
    }
}

/// Why a request was refused: `pipes_access_denied_total`'s `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Ip,
    Basic,
    ForwardAuth,
    ForwardAuthError,
    ShareExpired,
    /// The rules cannot be known (a broken config).
    Broken,
}

impl Reason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ip => "ip",
            Reason::Basic => "basic",
            Reason::ForwardAuth => "forward_auth",
            Reason::ForwardAuthError => "forward_auth_error",
            Reason::ShareExpired => "share_expired",
            Reason::Broken => "config_broken",
        }
    }
}

/// What a request that passed carries on to the deployment.
#[derive(Default)]
pub struct Passed {
    /// The last check that let it through, if any was made.
    pub by: Option<Check>,
    /// Cookies the auth server set, for the client's answer.
    pub set_cookies: Vec<HeaderValue>,
    strip_authorization: bool,
    strip_share: bool,
    copy: Vec<(HeaderName, Option<HeaderValue>)>,
}

impl Passed {
    /// The request as the deployment gets it: without the credentials Pipes
    /// checked (`Authorization` for `basic`, the share cookie), with the auth
    /// server's headers over any the client wrote of the same names.
    pub fn apply(&self, req: &mut RequestHeader) -> Result<()> {
        if self.strip_authorization {
            req.remove_header(&http::header::AUTHORIZATION);
        }
        if self.strip_share {
            share::strip_cookie(req);
        }
        for (name, value) in &self.copy {
            req.remove_header(name);
            if let Some(value) = value {
                req.insert_header(name.clone(), value.clone())?;
            }
        }
        Ok(())
    }
}

/// What the rules say of one request.
pub enum Verdict {
    /// Let through.
    Pass(Passed),
    /// A share link was opened: set its cookie and send the client to the
    /// same URL without it.
    ShareOpened { location: String, cookie: String },
    /// Refused, and answered with `answer`.
    Refused { reason: Reason, answer: Refusal },
}

/// How a refusal is answered.
pub enum Refusal {
    Error(PipesError),
    /// The auth server's own answer.
    Relay(Relayed),
}

/// Judges `req` from `client` (over TLS if `tls`) by `rules`.
pub async fn judge(guard: &Guard, rules: &Rules, req: &RequestHeader, client: Option<IpAddr>, tls: bool) -> Verdict {
    let refused = |reason, e| Verdict::Refused { reason, answer: Refusal::Error(e) };
    if let Some(why) = &rules.broken {
        return refused(Reason::Broken, why.clone());
    }
    if !rules.allow.is_empty() && !client.is_some_and(|ip| rules.allow.iter().any(|net| net.contains(&ip))) {
        return refused(Reason::Ip, PipesError::AccessDenied { deployment: rules.realm.clone() });
    }
    let mut passed = Passed { by: (!rules.allow.is_empty()).then_some(Check::Ip), ..Passed::default() };
    if rules.basic.is_none() && rules.forward.is_none() {
        return Verdict::Pass(passed);
    }
    let now = unix_ms();
    let shares = guard.shares();
    let expired = |realm: &str| PipesError::AuthenticationRequired { realm: realm.to_owned(), basic: rules.basic.is_some(), share_expired: true };
    if let Some((token, location)) = share::in_query(req) {
        if !shares.opens(&rules.realm, &token, now) {
            return refused(Reason::ShareExpired, expired(&rules.realm));
        }
        return Verdict::ShareOpened { cookie: share::set_cookie(&token, now, tls), location };
    }
    let presented = share::cookie(req);
    passed.strip_share = presented.is_some();
    if presented.is_some_and(|token| shares.opens(&rules.realm, token, now)) {
        passed.by = Some(Check::Share);
        return Verdict::Pass(passed);
    }
    // A share that no longer holds is why, whichever check then refused.
    let reason_or_expired = |reason| if presented.is_some() { Reason::ShareExpired } else { reason };
    if let Some(basic) = &rules.basic {
        let verified = match req.headers.get(http::header::AUTHORIZATION) {
            Some(value) => basic.verify(value.as_bytes()).await,
            None => false,
        };
        if !verified {
            let e = PipesError::AuthenticationRequired { realm: rules.realm.clone(), basic: true, share_expired: presented.is_some() };
            return refused(reason_or_expired(Reason::Basic), e);
        }
        passed.strip_authorization = true;
        passed.by = Some(Check::Basic);
    }
    if let Some(forward) = &rules.forward {
        match guard.forward_auth().ask(forward, req, client, tls).await {
            Outcome::Allowed { copy, set_cookies } => {
                passed.copy = copy;
                passed.set_cookies = set_cookies;
                passed.by = Some(Check::ForwardAuth);
            }
            Outcome::Refused(answer) => return Verdict::Refused { reason: reason_or_expired(Reason::ForwardAuth), answer: Refusal::Relay(answer) },
            Outcome::Unavailable(detail) => {
                log::warn!("{}: the auth server did not answer: {detail}", rules.realm);
                return refused(Reason::ForwardAuthError, PipesError::ForwardAuthUnavailable { deployment: rules.realm.clone(), detail });
            }
        }
    }
    Verdict::Pass(passed)
}
