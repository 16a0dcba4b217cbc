//! HTTPS: the handshake under Pipes' deadlines, and which certificate a name
//! gets — the operator's (`PIPES_TLS_CERT`, usually a wildcard) when it covers
//! the name, else one obtained on demand ([`acme`]).
//!
//! The gate ([`crate::connection`]) calls [`Tls::accept`] once a connection
//! has its place, so a client that never finishes its handshake is held to
//! `PIPES_HEADER_TIMEOUT` like one that never finishes its request head. The
//! wait for a certificate being issued is not part of that deadline: it has
//! its own.

pub mod acme;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::server::{prepare_tls_stream, ResumableAccept};
use pingora::protocols::Stream;
use pingora::tls::ext;
use pingora::tls::pkey::{PKey, Private};
use pingora::tls::ssl::{self, AlpnError, NameType, SslAcceptor, SslMethod, SslRef};
use pingora::tls::x509::X509;

pub use acme::Acme;

use crate::settings::TlsSettings;

/// ALPN protocols offered, in order of preference (wire format).
const ALPN: &[u8] = b"\x02h2\x08http/1.1";

/// The HTTPS side of the gate.
pub struct Tls {
    acceptor: SslAcceptor,
    fixed: Option<Arc<Certified>>,
    acme: Option<Arc<Acme>>,
}

impl Tls {
    /// HTTPS with the operator's certificate (read now) and, if given,
    /// certificates on demand from `acme`.
    pub fn new(settings: &TlsSettings, acme: Option<Arc<Acme>>) -> Result<Tls, String> {
        let fixed = match &settings.static_cert {
            Some((cert, key)) => {
                let chain = std::fs::read(cert).map_err(|e| format!("PIPES_TLS_CERT: cannot read {}: {e}", cert.display()))?;
                let key_pem = std::fs::read(key).map_err(|e| format!("PIPES_TLS_KEY: cannot read {}: {e}", key.display()))?;
                let certified = Certified::from_pem(&chain, &key_pem).map_err(|e| format!("PIPES_TLS_CERT: {}: {e}", cert.display()))?;
                log::info!("HTTPS certificate for {} from {}", certified.names.join(", "), cert.display());
                Some(Arc::new(certified))
            }
            None => None,
        };
        let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).map_err(|e| format!("cannot set up TLS: {e}"))?;
        builder.set_alpn_select_callback(|_, offered| ssl::select_next_proto(ALPN, offered).ok_or(AlpnError::NOACK));
        Ok(Tls { acceptor: builder.build(), fixed, acme })
    }

    /// Completes the TLS handshake of `stream`, each half within `deadline`;
    /// `None` if the client failed to, or no certificate fits its name.
    pub async fn accept(&self, stream: Stream, deadline: Duration) -> Option<Stream> {
        // Listeners hand the gate plain TCP (or Unix) streams.
        let l4 = *stream.into_any().downcast::<L4Stream>().ok()?;
        let mut tls = prepare_tls_stream(&self.acceptor, l4).ok()?;
        let done = match tokio::time::timeout(deadline, Pin::new(&mut tls).start_accept()).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                log::debug!("TLS handshake failed: {e}");
                return None;
            }
            Err(_) => return None,
        };
        if !done {
            let name = tls.ssl().servername(NameType::HOST_NAME).map(str::to_ascii_lowercase);
            let certified = self.certificate(name.as_deref()).await?;
            // SAFETY: `tls` is held mutably here; nothing else refers to its SSL.
            let ssl = unsafe { ext::ssl_mut(tls.ssl()) };
            if let Err(e) = certified.apply(ssl) {
                log::warn!("cannot use the certificate for {}: {e}", name.as_deref().unwrap_or("(no name)"));
                return None;
            }
            match tokio::time::timeout(deadline, Pin::new(&mut tls).resume_accept()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    log::debug!("TLS handshake failed: {e}");
                    return None;
                }
                Err(_) => return None,
            }
        }
        Some(Box::new(tls))
    }

    /// The certificate for a handshake naming `name` (SNI): the operator's if
    /// it covers the name, else one issued for it (obtained now if it may be).
    /// Without a fitting one, the operator's anyway: the client then says
    /// plainly that the name does not match.
    async fn certificate(&self, name: Option<&str>) -> Option<Arc<Certified>> {
        if let Some(name) = name {
            if let Some(fixed) = self.fixed.as_ref().filter(|c| c.covers(name)) {
                return Some(fixed.clone());
            }
            if let Some(acme) = &self.acme {
                match acme.certificate(name).await {
                    Ok(certified) => return Some(certified),
                    Err(why) => log::info!("no certificate for {name}: {why}"),
                }
            }
        }
        self.fixed.clone()
    }
}

/// A certificate chain with its key, and what it covers.
pub struct Certified {
    leaf: X509,
    intermediates: Vec<X509>,
    key: PKey<Private>,
    /// The DNS names it is valid for (possibly `*.` wildcards), lowercase.
    names: Vec<String>,
    /// Validity, in seconds since the Unix epoch.
    not_before: i64,
    not_after: i64,
}

impl Certified {
    /// Parses a PEM chain (leaf first) and its PEM private key.
    pub fn from_pem(chain: &[u8], key: &[u8]) -> Result<Certified, String> {
        let mut intermediates = X509::stack_from_pem(chain).map_err(|e| format!("not a PEM certificate chain: {e}"))?;
        if intermediates.is_empty() {
            return Err("no certificate in the file".into());
        }
        let leaf = intermediates.remove(0);
        let key = PKey::private_key_from_pem(key).map_err(|e| format!("not a PEM private key: {e}"))?;
        let public = leaf.public_key().map_err(|e| e.to_string())?;
        if !key.public_eq(&public) {
            return Err("the private key does not belong to the certificate".into());
        }
        let mut names: Vec<String> =
            leaf.subject_alt_names().map(|sans| sans.iter().filter_map(|n| n.dnsname().map(str::to_ascii_lowercase)).collect()).unwrap_or_default();
        if names.is_empty() {
            let cn = leaf.subject_name().entries_by_nid(pingora::tls::nid::Nid::COMMONNAME).next();
            names.extend(cn.and_then(|e| e.data().to_string().ok()).map(|s| s.to_ascii_lowercase()));
        }
        if names.is_empty() {
            return Err("the certificate names no host".into());
        }
        Ok(Certified { not_before: unix_time(leaf.not_before())?, not_after: unix_time(leaf.not_after())?, leaf, intermediates, key, names })
    }

    /// Whether the certificate is valid for host `name` (exactly, or by a
    /// wildcard for its first label).
    pub fn covers(&self, name: &str) -> bool {
        self.names.iter().any(|n| match n.strip_prefix("*.") {
            Some(parent) => name.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
            None => n == name,
        })
    }

    /// Whether two thirds of its lifetime have passed at `now` (Unix seconds).
    pub fn due_for_renewal(&self, now: i64) -> bool {
        now >= self.not_before + (self.not_after - self.not_before) * 2 / 3
    }

    /// Whether it is still valid at `now` (Unix seconds).
    pub fn valid_at(&self, now: i64) -> bool {
        (self.not_before..self.not_after).contains(&now)
    }

    /// When it expires, in seconds since the Unix epoch.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    fn apply(&self, ssl: &mut SslRef) -> Result<(), pingora::tls::error::ErrorStack> {
        ext::ssl_use_certificate(ssl, &self.leaf)?;
        ext::ssl_use_private_key(ssl, &self.key)?;
        for cert in &self.intermediates {
            ext::ssl_add_chain_cert(ssl, cert)?;
        }
        Ok(())
    }
}

/// Seconds since the Unix epoch of an ASN.1 time.
fn unix_time(t: &openssl::asn1::Asn1TimeRef) -> Result<i64, String> {
    let epoch = openssl::asn1::Asn1Time::from_unix(0).map_err(|e| e.to_string())?;
    let diff = epoch.diff(t).map_err(|e| e.to_string())?;
    Ok(i64::from(diff.days) * 86_400 + i64::from(diff.secs))
}

/// Now, in seconds since the Unix epoch, by the wall clock certificates are dated by.
pub fn now_unix() -> i64 {
    i64::try_from(crate::clock::wall().as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use openssl::asn1::Asn1Time;
    use openssl::bn::BigNum;
    use openssl::ec::{EcGroup, EcKey};
    use pingora::tls::hash::MessageDigest;
    use pingora::tls::x509::extension::SubjectAlternativeName;
    use pingora::tls::x509::X509NameBuilder;

    /// A self-signed certificate for `names`, valid from `from` to `to`
    /// (Unix seconds), as PEM chain and PEM key.
    pub(crate) fn self_signed(names: &[&str], from: i64, to: i64) -> (Vec<u8>, Vec<u8>) {
        let group = EcGroup::from_curve_name(pingora::tls::nid::Nid::X9_62_PRIME256V1).unwrap();
        let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", names[0]).unwrap();
        let name = name.build();
        let mut cert = X509::builder().unwrap();
        cert.set_version(2).unwrap();
        cert.set_serial_number(&BigNum::from_u32(1).unwrap().to_asn1_integer().unwrap()).unwrap();
        cert.set_subject_name(&name).unwrap();
        cert.set_issuer_name(&name).unwrap();
        cert.set_pubkey(&key).unwrap();
        cert.set_not_before(&Asn1Time::from_unix(from).unwrap()).unwrap();
        cert.set_not_after(&Asn1Time::from_unix(to).unwrap()).unwrap();
        let mut san = SubjectAlternativeName::new();
        for n in names {
            san.dns(n);
        }
        let san = san.build(&cert.x509v3_context(None, None)).unwrap();
        cert.append_extension(san).unwrap();
        cert.sign(&key, MessageDigest::sha256()).unwrap();
        (cert.build().to_pem().unwrap(), key.private_key_to_pem_pkcs8().unwrap())
    }

    #[test]
    fn wildcards_cover_one_label() {
        let (chain, key) = self_signed(&["*.example.com", "example.com"], 0, 4_000_000_000);
        let c = Certified::from_pem(&chain, &key).unwrap();
        assert!(c.covers("example.com"));
        assert!(c.covers("v1--app--alice.example.com"));
        assert!(!c.covers("v1.app.alice.example.com"), "a wildcard covers one label only");
        assert!(!c.covers(".example.com"));
        assert!(!c.covers("example.org"));
    }

    #[test]
    fn renewal_is_due_after_two_thirds_of_the_lifetime() {
        let (chain, key) = self_signed(&["a.example.com"], 1_000_000, 1_000_900);
        let c = Certified::from_pem(&chain, &key).unwrap();
        assert!(!c.due_for_renewal(1_000_599));
        assert!(c.due_for_renewal(1_000_600));
        assert!(c.valid_at(1_000_899) && !c.valid_at(1_000_900));
        assert_eq!(c.not_after(), 1_000_900);
    }

    #[test]
    fn a_stored_file_holds_the_key_then_the_chain() {
        let (chain, key) = self_signed(&["a.example.com"], 0, 4_000_000_000);
        let both = [key, chain].concat();
        let c = Certified::from_pem(&both, &both).unwrap();
        assert!(c.covers("a.example.com"));
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let (chain, _) = self_signed(&["a.example.com"], 0, 4_000_000_000);
        let (_, other_key) = self_signed(&["a.example.com"], 0, 4_000_000_000);
        let e = Certified::from_pem(&chain, &other_key).err().unwrap();
        assert!(e.contains("does not belong"), "{e}");
        assert!(Certified::from_pem(b"nonsense", &other_key).is_err());
    }
}
