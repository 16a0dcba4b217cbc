//! What access rules are made from: every stored config layer's `access`
//! and `noindex`, kept in memory so that no request reads the store, and
//! the share key with its revocations.
//!
//! Loaded before Pipes serves; until then every deployment is closed (503).
//! A config change through this Pipes updates it at once; the janitor
//! reloads it every few seconds, so a change made through another replica
//! (Swarm) or by hand applies here soon after.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

use super::forward::Client;
use super::share::{Shares, DOCUMENT};
use super::Rules;
use crate::clock::unix_ms;
use crate::config::{AccessConfig, DeployConfig};
use crate::error::PipesError;
use crate::route::Deployment;
use crate::settings::Settings;
use crate::store::{Layer, Store};

/// One layer's say on access, or why it cannot be read.
#[derive(Debug, Clone, PartialEq)]
enum Said {
    Config { access: Option<AccessConfig>, noindex: Option<bool> },
    Broken(PipesError),
}

impl Said {
    fn of(config: Result<DeployConfig, PipesError>) -> Said {
        match config {
            Ok(c) => Said::Config { access: c.access, noindex: c.noindex },
            Err(e) => Said::Broken(e),
        }
    }
}

/// Every layer that says anything, by deployment (`user/repo:tag`) and by
/// repository (`user/repo`).
#[derive(Debug, Default)]
struct Layers {
    tags: HashMap<String, Said>,
    repositories: HashMap<String, Said>,
}

/// Access rules and share links of every deployment.
pub struct Guard {
    store: Store,
    layers: ArcSwap<Layers>,
    /// Held while the layers are replaced; `changes` counts each change made
    /// through this Pipes, so that a load that read the store before one
    /// cannot put the older rules back.
    writing: Mutex<()>,
    changes: AtomicU64,
    shares: ArcSwap<Shares>,
    loaded: AtomicBool,
    /// `PIPES_ACCESS` and `PIPES_NOINDEX`.
    default_access: AccessConfig,
    default_noindex: bool,
    forward_auth: Client,
    /// `PIPES_FORWARD_AUTH_URLS`.
    forward_auth_urls: Vec<String>,
}

impl Guard {
    /// A guard over `store`, closed until [`Guard::load`] succeeds.
    pub fn new(settings: &Settings, store: Store) -> Self {
        Guard {
            store,
            layers: ArcSwap::from_pointee(Layers::default()),
            writing: Mutex::new(()),
            changes: AtomicU64::new(0),
            shares: ArcSwap::from_pointee(Shares::default()),
            loaded: AtomicBool::new(false),
            default_access: settings.defaults.access.clone(),
            default_noindex: settings.defaults.noindex,
            forward_auth: Client::new(settings.access.forward_auth_timeout),
            forward_auth_urls: settings.access.forward_auth_urls.clone(),
        }
    }

    /// (Re)reads every layer and the share key from the store, making the
    /// key on first use. Whether any rule changed.
    pub async fn load(&self) -> Result<bool, PipesError> {
        let changes = self.changes.load(Ordering::Acquire);
        let mut layers = Layers::default();
        for (layer, config) in self.store.layers().await? {
            match layer {
                Layer::Tag(d) => layers.tags.insert(d.to_string(), Said::of(config)),
                Layer::Repository(user, repo) => layers.repositories.insert(format!("{user}/{repo}"), Said::of(config)),
            };
        }
        let shares = match self.store.document::<Shares>(DOCUMENT).await? {
            Some(shares) => shares,
            None => {
                let fresh = Shares::generate().map_err(|e| PipesError::Engine { action: "make the share key", detail: e })?;
                self.store.put_document(DOCUMENT, &fresh).await?;
                // Replicas starting together each make one: the stored one wins.
                self.store.document::<Shares>(DOCUMENT).await?.unwrap_or(fresh)
            }
        };
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        if self.changes.load(Ordering::Acquire) != changes {
            // A change came through meanwhile; what was read may be older.
            return Ok(false);
        }
        let old = self.layers.load();
        let changed = old.tags != layers.tags || old.repositories != layers.repositories || **self.shares.load() != shares;
        self.layers.store(Arc::new(layers));
        self.shares.store(Arc::new(shares));
        self.loaded.store(true, Ordering::Release);
        Ok(changed)
    }

    /// The rules of `d`, from its layers over `PIPES_ACCESS`.
    pub fn rules(&self, d: &Deployment) -> Arc<Rules> {
        if !self.loaded.load(Ordering::Acquire) {
            return Arc::new(Rules::closed(d, PipesError::EngineUnavailable { reason: "access rules are not loaded yet".into() }));
        }
        let layers = self.layers.load();
        let tag = layers.tags.get(&d.to_string());
        let repository = layers.repositories.get(&d.repository());
        let (mut access, mut noindex) = (None, None);
        for said in [tag, repository].into_iter().flatten() {
            match said {
                Said::Broken(e) => return Arc::new(Rules::closed(d, e.clone())),
                Said::Config { access: a, noindex: n } => {
                    access = access.or(a.as_ref());
                    noindex = noindex.or(*n);
                }
            }
        }
        let access = access.unwrap_or(&self.default_access);
        Arc::new(Rules::new(d, access, noindex.unwrap_or(self.default_noindex)))
    }

    /// Records a tag's new config, saved in the store.
    pub fn put_tag(&self, d: &Deployment, config: &DeployConfig) {
        self.put(|layers| layers.tags.insert(d.to_string(), Said::of(Ok(config.clone()))));
    }

    /// Forgets a tag's own config, removed from the store.
    pub fn forget_tag(&self, d: &Deployment) {
        self.put(|layers| layers.tags.remove(&d.to_string()));
    }

    /// Records a repository's new default config, saved in the store.
    pub fn put_repository(&self, d: &Deployment, config: &DeployConfig) {
        self.put(|layers| layers.repositories.insert(d.repository(), Said::of(Ok(config.clone()))));
    }

    fn put(&self, change: impl FnOnce(&mut Layers) -> Option<Said>) {
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let layers = self.layers.load();
        let mut next = Layers { tags: layers.tags.clone(), repositories: layers.repositories.clone() };
        change(&mut next);
        self.layers.store(Arc::new(next));
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// 422 if `config` names an auth server the operator did not allow
    /// (`PIPES_FORWARD_AUTH_URLS`): a config must not have Pipes send its
    /// clients' cookies, or requests at all, where the operator did not say.
    pub fn check_config(&self, config: &DeployConfig) -> Result<(), PipesError> {
        let Some(url) = config.access.as_ref().and_then(|a| a.forward_auth.as_ref()).map(|f| &f.url) else { return Ok(()) };
        if self.forward_auth_urls.iter().any(|prefix| url.starts_with(prefix.as_str())) {
            return Ok(());
        }
        let allowed = if self.forward_auth_urls.is_empty() { "none is allowed".to_owned() } else { self.forward_auth_urls.join(", ") };
        Err(PipesError::InvalidField {
            field: "access.forward_auth.url".into(),
            message: format!("{url} is not under a URL the operator allows in PIPES_FORWARD_AUTH_URLS ({allowed})"),
        })
    }

    /// The share key and revocations now.
    pub(super) fn shares(&self) -> arc_swap::Guard<Arc<Shares>> {
        self.shares.load()
    }

    pub(super) fn forward_auth(&self) -> &Client {
        &self.forward_auth
    }

    /// A share link's token for `d`, valid for `ttl`; and when it expires (Unix ms).
    pub fn share(&self, d: &Deployment, ttl: std::time::Duration) -> (String, u64) {
        let now = unix_ms();
        let expires = now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        (self.shares.load().sign(&d.to_string(), now, expires), expires)
    }

    /// Revokes every share link of `d` issued until now; when (Unix ms).
    pub async fn revoke(&self, d: &Deployment) -> Result<u64, PipesError> {
        // The stored document is the truth: another replica may have revoked too.
        let mut shares = self.store.document::<Shares>(DOCUMENT).await?.unwrap_or_else(|| Shares::clone(&self.shares.load()));
        let now = unix_ms() + 1;
        let max_ttl = u64::try_from(super::share::MAX_TTL.as_millis()).unwrap_or(u64::MAX);
        shares.revoked.retain(|_, at| now.saturating_sub(*at) < max_ttl);
        shares.revoked.insert(d.to_string(), now);
        self.store.put_document(DOCUMENT, &shares).await?;
        self.shares.store(Arc::new(shares));
        Ok(now)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::settings::Sources;

    fn guard(dir: &std::path::Path) -> (Guard, Store) {
        let env = HashMap::from([("PIPES_ACCESS".to_owned(), r#"{"allow_ips":["10.0.0.0/8"]}"#.to_owned()), ("PIPES_NOINDEX".to_owned(), "false".to_owned())]);
        let settings = Settings::from_sources(["pipes"], &Sources { env, ..Sources::default() }).unwrap();
        let store = Store::dir(dir);
        (Guard::new(&settings, store.clone()), store)
    }

    fn config(json: &str) -> DeployConfig {
        DeployConfig::from_json(json.as_bytes()).unwrap()
    }

    #[tokio::test]
    async fn rules_follow_the_store_layer_over_layer() {
        let dir = std::env::temp_dir().join(format!("pipes-access-book-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (guard, store) = guard(&dir);
        let (v1, v2) = (Deployment::parse("alice/app:v1").unwrap(), Deployment::parse("alice/app:v2").unwrap());
        assert!(guard.rules(&v1).broken.is_some(), "closed until loaded");

        assert!(guard.load().await.unwrap());
        let rules = guard.rules(&v1);
        assert_eq!((rules.open(), rules.noindex, rules.allow.len()), (false, false, 1), "PIPES_ACCESS and PIPES_NOINDEX");
        assert!(!guard.load().await.unwrap(), "nothing changed");

        // Written elsewhere (another replica, by hand): seen at the next load.
        let hash = bcrypt::hash("x", 4).unwrap();
        store.put_repository("alice", "app", config(&format!(r#"{{"access":{{"basic":{{"alice":"{hash}"}}}},"noindex":true}}"#))).await.unwrap();
        assert!(guard.rules(&v1).basic.is_none());
        assert!(guard.load().await.unwrap());
        for d in [&v1, &v2] {
            let rules = guard.rules(d);
            assert!(rules.basic.is_some() && rules.allow.is_empty() && rules.noindex, "the repository's access replaces the default whole");
        }
        // A tag's `access: {}` opens it alone; its repository's noindex stays.
        store.put_tag(&v1, config(r#"{"access":{}}"#)).await.unwrap();
        guard.load().await.unwrap();
        assert!(guard.rules(&v1).open() && guard.rules(&v1).noindex);
        assert!(guard.rules(&v2).basic.is_some());

        // A config that cannot be read closes its deployment.
        std::fs::write(dir.join("repos/alice/app/tags/v1.json"), b"{").unwrap();
        guard.load().await.unwrap();
        assert!(matches!(guard.rules(&v1).broken, Some(PipesError::ConfigBroken { .. })));
        assert!(guard.rules(&v2).broken.is_none());

        // The share key is kept: another Pipes on the same store accepts the links.
        let (token, _) = guard.share(&v2, std::time::Duration::from_secs(60));
        let (other, _) = self::guard(&dir);
        other.load().await.unwrap();
        assert!(other.shares().opens("alice/app:v2", &token, unix_ms()));
        other.revoke(&v2).await.unwrap();
        guard.load().await.unwrap();
        assert!(!guard.shares().opens("alice/app:v2", &token, unix_ms()), "revoked through the other");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn configs_may_name_only_the_auth_servers_the_operator_allows() {
        let dir = std::env::temp_dir();
        let (mut guard, _) = guard(&dir);
        let asks = |url: &str| config(&format!(r#"{{"access":{{"forward_auth":{{"url":"{url}"}}}}}}"#));
        assert_eq!(guard.check_config(&asks("http://127.0.0.1:4180/oauth2/auth")).unwrap_err().status(), 422);
        guard.forward_auth_urls = vec!["http://127.0.0.1:4180/oauth2/".into()];
        assert!(guard.check_config(&asks("http://127.0.0.1:4180/oauth2/auth")).is_ok());
        assert!(guard.check_config(&asks("http://127.0.0.1:4181/oauth2/auth")).is_err());
        assert!(guard.check_config(&config("{}")).is_ok());
    }
}
