//! `access.basic`: users and bcrypt hashes, checked without letting a
//! client time which users exist, and without redoing bcrypt for every
//! request of a session.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use base64::Engine;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

/// Credentials verified lately, per deployment's rules, at most this many:
/// a full cache is emptied, which costs the next requests one bcrypt each.
const MAX_VERIFIED: usize = 1024;

/// bcrypt runs on blocking threads, at most this many at once: a flood of
/// wrong passwords queues rather than taking every thread.
static VERIFYING: Semaphore = Semaphore::const_new(4);

/// The users of one deployment's rules.
#[derive(Debug)]
pub struct Basic {
    users: Arc<BTreeMap<String, String>>,
    /// SHA-256 of `Authorization` values that verified: the header is never kept.
    verified: Mutex<HashSet<[u8; 32]>>,
    /// Verified against when the user is unknown, made at the cost of the
    /// users' hashes, so that an unknown user costs what a known one with a
    /// wrong password does.
    decoy: Arc<OnceLock<String>>,
}

impl Basic {
    /// Users as `access.basic` names them.
    pub fn new(users: BTreeMap<String, String>) -> Self {
        Basic { users: Arc::new(users), verified: Mutex::new(HashSet::new()), decoy: Arc::new(OnceLock::new()) }
    }

    /// Whether `authorization` (a whole `Authorization` value) carries a
    /// user and password that verify.
    pub async fn verify(&self, authorization: &[u8]) -> bool {
        let key: [u8; 32] = Sha256::digest(authorization).into();
        if self.verified.lock().unwrap_or_else(PoisonError::into_inner).contains(&key) {
            return true;
        }
        let Some((user, password)) = credentials(authorization) else { return false };
        let (users, decoy) = (self.users.clone(), self.decoy.clone());
        let Ok(_turn) = VERIFYING.acquire().await else { return false };
        let checked = tokio::task::spawn_blocking(move || {
            let (hash, known) = match users.get(&user) {
                Some(hash) => (hash.as_str(), true),
                None => (decoy.get_or_init(|| decoy_like(&users)).as_str(), false),
            };
            // bcrypt compares its result in constant time.
            bcrypt::verify(password.as_bytes(), hash).unwrap_or(false) && known
        })
        .await
        .unwrap_or(false);
        if checked {
            let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
            verified.insert(key);
        }
        checked
    }
}

/// A hash of nobody's password at the cost of the first user's hash.
fn decoy_like(users: &BTreeMap<String, String>) -> String {
    let cost = users.values().next().and_then(|h| h.get(4..6)).and_then(|c| c.parse().ok()).unwrap_or(bcrypt::DEFAULT_COST);
    bcrypt::hash(b"\0", cost).unwrap_or_default()
}

/// The user and password of `Basic <base64(user:password)>`.
fn credentials(authorization: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(authorization).ok()?.trim();
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, password: &str) -> Vec<u8> {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))).into_bytes()
    }

    #[tokio::test]
    async fn right_credentials_pass_and_are_remembered() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let basic = Basic::new(BTreeMap::from([("alice".to_owned(), hash)]));
        assert!(basic.verify(&header("alice", "s3cret")).await);
        assert!(basic.verified.lock().unwrap().len() == 1);
        assert!(basic.verify(&header("alice", "s3cret")).await, "from the cache");
        assert!(!basic.verify(&header("alice", "wrong")).await);
        assert!(!basic.verify(&header("bob", "s3cret")).await);
        assert!(!basic.verify(b"Bearer abc").await);
        assert!(!basic.verify(b"Basic !!!").await);
        assert_eq!(basic.verified.lock().unwrap().len(), 1, "failures are not remembered");
    }

    #[test]
    fn the_decoy_costs_what_the_users_hashes_do() {
        let users = BTreeMap::from([("alice".to_owned(), bcrypt::hash("x", 5).unwrap())]);
        assert!(decoy_like(&users).starts_with("$2b$05$"));
        assert_eq!(credentials(b"basic YTpiOmM="), Some(("a".into(), "b:c".into())), "a password may hold ':'");
    }
}
