//! Certificates on demand, from an ACME certificate authority (Let's
//! Encrypt, or any RFC 8555 server at `PIPES_ACME_DIRECTORY`).
//!
//! A handshake for a name no certificate covers waits while one is obtained
//! — but only for a name that routes to a deployment the policy allows and
//! whose image exists (it runs, or one registry request finds it), or for the
//! bare domain. That check is local, so a scanner enumerating made-up
//! subdomains never reaches the authority; on top of it, orders are capped at
//! `PIPES_ACME_MAX_PER_HOUR`, and handshakes for one name share one order.
//!
//! The authority validates by HTTP-01: it fetches
//! `/.well-known/acme-challenge/{token}` from the name over plain HTTP, which
//! the proxy answers from [`Acme::key_authorization`].
//!
//! The account key and certificates live under `{config dir}/certs/`
//! (`account.json`, `{name}.pem` holding key then chain), written atomically
//! and readable by their owner only; they are reused after a restart and
//! renewed once two thirds of their lifetime have passed.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use instant_acme::{Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::{now_unix, Certified};
use crate::fleet::Fleet;
use crate::route::{self, Hosts, Target};
use crate::settings::AcmeSettings;
use crate::store::write_atomic;

/// Where ACME challenges are fetched from.
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";
/// How long one order may take, from asking to the certificate in hand.
const ORDER_TIMEOUT: Duration = Duration::from_secs(90);
/// How often stored certificates are checked for renewal.
const RENEW_CHECK: Duration = Duration::from_secs(3600);
/// The account's credentials, in the certificate directory.
const ACCOUNT_FILE: &str = "account.json";

/// An order under way, shared by every handshake waiting for its name.
type Pending = Shared<BoxFuture<'static, Result<Arc<Certified>, String>>>;

/// Obtains, stores and renews certificates.
pub struct Acme {
    settings: AcmeSettings,
    /// `{config dir}/certs`.
    dir: PathBuf,
    fleet: Arc<Fleet>,
    hosts: Hosts,
    /// The runtime orders run on, so that a client giving up cancels none.
    control: tokio::runtime::Handle,
    account: tokio::sync::OnceCell<Account>,
    /// Certificates by the name they were issued for: read on every handshake
    /// without a lock.
    issued: ArcSwap<HashMap<String, Arc<Certified>>>,
    /// Orders under way, by name.
    orders: Mutex<HashMap<String, Pending>>,
    /// HTTP-01 tokens and their key authorizations, while orders wait on them.
    challenges: Mutex<HashMap<String, String>>,
    /// `PIPES_ACME_MAX_PER_HOUR`.
    rate: OrderRate,
}

/// Orders placed in the last hour, capped.
struct OrderRate {
    max_per_hour: usize,
    placed: Mutex<VecDeque<Instant>>,
}

impl OrderRate {
    /// Counts an order, or says the hour's are spent.
    fn take(&self, now: Instant) -> Result<(), String> {
        let mut placed = self.placed.lock().unwrap_or_else(PoisonError::into_inner);
        let hour = Duration::from_secs(3600);
        while placed.front().is_some_and(|at| now.saturating_duration_since(*at) >= hour) {
            placed.pop_front();
        }
        if placed.len() >= self.max_per_hour {
            return Err(format!("{} certificates were ordered in the last hour (PIPES_ACME_MAX_PER_HOUR)", placed.len()));
        }
        placed.push_back(now);
        Ok(())
    }
}

impl Acme {
    /// Certificates for `hosts` under `config_dir/certs`, loading what is stored there.
    pub fn new(settings: &AcmeSettings, config_dir: &Path, fleet: Arc<Fleet>, hosts: Hosts, control: tokio::runtime::Handle) -> Result<Arc<Acme>, String> {
        if let Some(ca) = &settings.ca {
            ca_roots(Some(ca)).map_err(|e| format!("PIPES_ACME_CA: {e}"))?;
        }
        let dir = config_dir.join("certs");
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let acme = Acme {
            settings: settings.clone(),
            dir,
            fleet,
            hosts,
            control,
            account: tokio::sync::OnceCell::new(),
            issued: ArcSwap::from_pointee(HashMap::new()),
            orders: Mutex::new(HashMap::new()),
            challenges: Mutex::new(HashMap::new()),
            rate: OrderRate { max_per_hour: settings.max_per_hour, placed: Mutex::new(VecDeque::new()) },
        };
        acme.load();
        Ok(Arc::new(acme))
    }

    /// Reads the stored certificates; broken or expired ones are skipped.
    fn load(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let now = now_unix();
        let mut issued = HashMap::new();
        for path in entries.flatten().map(|e| e.path()) {
            let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".pem")) else { continue };
            match std::fs::read(&path).map_err(|e| e.to_string()).and_then(|pem| Certified::from_pem(&pem, &pem)) {
                Ok(c) if c.valid_at(now) && c.covers(name) => {
                    issued.insert(name.to_owned(), Arc::new(c));
                }
                Ok(_) => log::info!("stored certificate {} has expired or does not cover its name; a new one is obtained when asked for", path.display()),
                Err(e) => log::warn!("stored certificate {} is unusable and ignored: {e}", path.display()),
            }
        }
        if !issued.is_empty() {
            log::info!("loaded {} stored certificate(s)", issued.len());
        }
        self.issued.store(Arc::new(issued));
    }

    /// The certificate for `name`: stored, or obtained now if `name` may have one.
    pub async fn certificate(self: &Arc<Self>, name: &str) -> Result<Arc<Certified>, String> {
        // One that expired (its renewal failed) is never served: order anew.
        if let Some(c) = self.issued.load().get(name).filter(|c| c.valid_at(now_unix())) {
            return Ok(c.clone());
        }
        self.obtain(name).await
    }

    /// The key authorization the authority expects at `/.well-known/acme-challenge/{token}`.
    pub fn key_authorization(&self, token: &str) -> Option<String> {
        self.challenges.lock().unwrap_or_else(PoisonError::into_inner).get(token).cloned()
    }

    /// Names with a certificate and when each expires (Unix seconds).
    pub fn expiries(&self) -> Vec<(String, i64)> {
        self.issued.load().iter().map(|(name, c)| (name.clone(), c.not_after())).collect()
    }

    /// Joins the order for `name` under way, or places one.
    fn obtain(self: &Arc<Self>, name: &str) -> Pending {
        let mut orders = self.orders.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pending) = orders.get(name) {
            return pending.clone();
        }
        let (acme, owned) = (self.clone(), name.to_owned());
        let task = self.control.spawn(async move {
            let result = acme.issue(&owned).await;
            acme.orders.lock().unwrap_or_else(PoisonError::into_inner).remove(&owned);
            result
        });
        let pending = async move { task.await.unwrap_or_else(|e| Err(format!("the order stopped: {e}"))) }.boxed().shared();
        orders.insert(name.to_owned(), pending.clone());
        pending
    }

    /// Checks that `name` may have a certificate, then orders, stores and
    /// serves one.
    async fn issue(&self, name: &str) -> Result<Arc<Certified>, String> {
        self.check_name(name).await?;
        self.rate.take(Instant::now())?;
        log::info!("obtaining a certificate for {name} from {}", self.settings.directory);
        let ordered = match tokio::time::timeout(ORDER_TIMEOUT, self.order(name)).await {
            Ok(Ok(pems)) => Ok(pems),
            Ok(Err(e)) => Err(format!("the certificate authority refused: {e}")),
            Err(_) => Err(format!("the order took longer than {} s", ORDER_TIMEOUT.as_secs())),
        };
        if let Some(m) = self.fleet.metrics() {
            m.acme_order(if ordered.is_ok() { "issued" } else { "failed" });
        }
        let (key_pem, chain_pem) = ordered?;
        let pem = format!("{key_pem}{chain_pem}");
        let certified = Arc::new(Certified::from_pem(pem.as_bytes(), pem.as_bytes()).map_err(|e| format!("the issued certificate is unusable: {e}"))?);
        let path = self.dir.join(format!("{name}.pem"));
        let stored = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || write_atomic(&path, pem.as_bytes())).await
        };
        match stored {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::error!("cannot store the certificate for {name} in {}: {e}; it is served until Pipes stops", path.display()),
            Err(e) => log::error!("cannot store the certificate for {name}: {e}"),
        }
        let mut issued = HashMap::clone(&self.issued.load());
        issued.insert(name.to_owned(), certified.clone());
        self.issued.store(Arc::new(issued));
        log::info!("certificate for {name} obtained, valid until {}", humantime::format_rfc3339_seconds(unix_to_system(certified.not_after())));
        Ok(certified)
    }

    /// `Ok` for the bare domain and for hosts of deployments that may run
    /// here and whose image exists.
    async fn check_name(&self, name: &str) -> Result<(), String> {
        match route::route(name, &self.hosts) {
            Ok(Target::Bare) => Ok(()),
            Ok(Target::Deployment(d)) => self.fleet.check_exists(&d.to_owned()).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The account: stored, or registered now and stored.
    async fn account(&self) -> Result<&Account, String> {
        self.account
            .get_or_try_init(|| async {
                let path = self.dir.join(ACCOUNT_FILE);
                let http = http_client(self.settings.ca.as_deref())?;
                if let Ok(text) = tokio::fs::read(&path).await {
                    let credentials: AccountCredentials =
                        serde_json::from_slice(&text).map_err(|e| format!("{} is not an ACME account: {e}", path.display()))?;
                    return Account::builder_with_http(http).from_credentials(credentials).await.map_err(|e| e.to_string());
                }
                let contact = self.settings.email.as_ref().map(|e| format!("mailto:{e}"));
                let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
                let new = NewAccount { contact: &contacts, terms_of_service_agreed: true, only_return_existing: false };
                let (account, credentials) =
                    Account::builder_with_http(http).create(&new, self.settings.directory.clone(), None).await.map_err(|e| e.to_string())?;
                let json = serde_json::to_vec(&credentials).map_err(|e| e.to_string())?;
                tokio::task::spawn_blocking(move || write_atomic(&path, &json))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("cannot store the ACME account: {e}"))?;
                log::info!("registered an ACME account at {}", self.settings.directory);
                Ok(account)
            })
            .await
    }

    /// One order for `name`, validated by HTTP-01: the key and chain, as PEM.
    async fn order(&self, name: &str) -> Result<(String, String), String> {
        let account = self.account().await?;
        let identifiers = [Identifier::Dns(name.to_owned())];
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await.map_err(|e| e.to_string())?;
        let mut tokens = Vec::new();
        let mut authorizations = order.authorizations();
        let prepared = async {
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz.map_err(|e| e.to_string())?;
                if authz.status != AuthorizationStatus::Pending {
                    continue;
                }
                let mut challenge = authz.challenge(ChallengeType::Http01).ok_or("the authority offers no HTTP-01 challenge")?;
                let token = challenge.token.clone();
                let answer = challenge.key_authorization().as_str().to_owned();
                self.challenges.lock().unwrap_or_else(PoisonError::into_inner).insert(token.clone(), answer);
                tokens.push(token);
                challenge.set_ready().await.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        }
        .await;
        let result = match prepared {
            Ok(()) => self.finish(&mut order).await,
            Err(e) => Err(e),
        };
        let mut challenges = self.challenges.lock().unwrap_or_else(PoisonError::into_inner);
        for token in tokens {
            challenges.remove(&token);
        }
        result
    }

    async fn finish(&self, order: &mut instant_acme::Order) -> Result<(String, String), String> {
        let retries = RetryPolicy::new().timeout(ORDER_TIMEOUT);
        match order.poll_ready(&retries).await.map_err(|e| e.to_string())? {
            OrderStatus::Ready => {}
            status => return Err(format!("the order ended {status:?}")),
        }
        let key = order.finalize().await.map_err(|e| e.to_string())?;
        let chain = order.poll_certificate(&retries).await.map_err(|e| e.to_string())?;
        Ok((key, chain))
    }

    /// Orders again each certificate two thirds through its lifetime, if
    /// its name still may have one.
    fn renew_due(self: &Arc<Self>) {
        let now = now_unix();
        for (name, c) in self.issued.load().iter() {
            if c.due_for_renewal(now) {
                let pending = self.obtain(name);
                let name = name.clone();
                self.control.spawn(async move {
                    if let Err(e) = pending.await {
                        log::warn!("renewing the certificate for {name} failed: {e}; tried again within the hour");
                    }
                });
            }
        }
    }
}

/// Renewals, as a Pingora service that stops with the server.
pub struct Renewals(pub Arc<Acme>);

#[async_trait]
impl BackgroundService for Renewals {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut every = tokio::time::interval(RENEW_CHECK);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = every.tick() => self.0.renew_due(),
            }
        }
    }
}

/// Mozilla's roots (compiled in: the image has no system store), plus every
/// certificate of the PEM bundle `ca`.
fn ca_roots(ca: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = ca {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(ca).and_then(|certs| certs.collect()).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
        if certs.is_empty() {
            return Err(format!("{} holds no PEM certificate", ca.display()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| format!("{}: {e}", ca.display()))?;
        }
    }
    Ok(roots)
}

/// The HTTPS client ACME requests go through.
fn http_client(ca: Option<&Path>) -> Result<Box<dyn instant_acme::HttpClient>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(ca_roots(ca)?)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_only().enable_http1().build();
    let client: hyper_util::client::legacy::Client<_, instant_acme::BodyWrapper<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
    Ok(Box::new(client))
}

fn unix_to_system(secs: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_are_capped_per_hour() {
        let rate = OrderRate { max_per_hour: 2, placed: Mutex::new(VecDeque::new()) };
        let start = Instant::now();
        assert!(rate.take(start).is_ok());
        assert!(rate.take(start + Duration::from_secs(60)).is_ok());
        let refused = rate.take(start + Duration::from_secs(120)).unwrap_err();
        assert!(refused.contains("PIPES_ACME_MAX_PER_HOUR"), "{refused}");
        assert!(rate.take(start + Duration::from_secs(3600)).is_ok(), "the first order left the window");
    }

    #[test]
    fn the_ca_bundle_is_read_whole() {
        let dir = std::env::temp_dir().join(format!("pipes-acme-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (one, _) = crate::tls::tests::self_signed(&["ca-one.test"], 0, 4_000_000_000);
        let (two, _) = crate::tls::tests::self_signed(&["ca-two.test"], 0, 4_000_000_000);
        let bundle = dir.join("bundle.pem");
        std::fs::write(&bundle, [one, two].concat()).unwrap();
        let public = ca_roots(None).unwrap().len();
        assert_eq!(ca_roots(Some(&bundle)).unwrap().len(), public + 2);
        std::fs::write(&bundle, "not a certificate").unwrap();
        assert!(ca_roots(Some(&bundle)).unwrap_err().contains("no PEM certificate"));
        assert!(ca_roots(Some(&dir.join("missing.pem"))).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
