//! What a container is told of who asked, and who the client is for Pipes'
//! own limits.
//!
//! As the edge, Pipes sets `X-Forwarded-For` to the peer it saw, replacing
//! whatever the client wrote, unless the peer is a proxy the operator trusts
//! (`PIPES_TRUSTED_PROXIES`), whose header is then extended. `X-Real-IP`,
//! `X-Forwarded-Host` and `X-Forwarded-Proto` are set; `Forwarded` is
//! removed, so nothing a client writes passes as Pipes' word. So are the
//! rest of the `X-Forwarded-*` family and `True-Client-IP`, unless a trusted
//! proxy sent them, and header names with `_` (CGI and WSGI servers read
//! `X_Real_IP` as `X-Real-IP`), unless `PIPES_UNDERSCORE_HEADERS` keeps them,
//! as nginx does by default.

use std::net::IpAddr;

use http::HeaderValue;
use ipnet::IpNet;
use pingora::http::RequestHeader;
use pingora::{ErrorType::InvalidHTTPHeader, OrErr};

// Names as text: Pingora turns a `HeaderName` into its written form with a
// copy on every insert, a `&'static str` without one. Written as before, in
// lower case.
const X_FORWARDED_FOR: &str = "x-forwarded-for";
const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
const X_FORWARDED_HOST: &str = "x-forwarded-host";
const X_REAL_IP: &str = "x-real-ip";
const FORWARDED: &str = "forwarded";

/// The proxies in front of Pipes whose forwarding headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trusted(Vec<IpNet>);

impl Trusted {
    /// Parses a comma-separated list of addresses and networks
    /// (`10.0.0.1, 192.168.0.0/16, ::1`).
    pub fn parse(list: &str) -> Result<Trusted, String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("expected addresses or networks such as 10.0.0.1 or 10.0.0.0/8, got '{s}'"))
            })
            .collect::<Result<_, _>>()
            .map(Trusted)
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client behind `peer`: the peer itself, or — where the peer is
    /// trusted — the nearest address in `X-Forwarded-For` that is not.
    pub fn client(&self, peer: IpAddr, req: &RequestHeader) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        forwarded_for(req).rev().filter_map(|a| a.parse::<IpAddr>().ok()).find(|ip| !self.contains(*ip)).unwrap_or(peer)
    }

    /// Sets the forwarding headers of a request that goes to a container;
    /// `host` is the host the client asked for.
    /// Header names with `_` pass only with `underscores`.
    pub fn apply(&self, peer: Option<IpAddr>, host: HeaderValue, tls: bool, underscores: bool, upstream: &mut RequestHeader) -> pingora::Result<()> {
        let trusted = peer.is_some_and(|p| self.contains(p));
        strip_spoofable(upstream, trusted, underscores);
        let Some(peer) = peer else {
            for name in [X_FORWARDED_FOR, X_REAL_IP, FORWARDED] {
                upstream.remove_header(name);
            }
            return Ok(());
        };
        let (chain, client) = if trusted {
            let peer_text = peer.to_string();
            let chain = forwarded_for(upstream).chain(std::iter::once(peer_text.as_str())).collect::<Vec<_>>().join(", ");
            (HeaderValue::try_from(chain).or_err(InvalidHTTPHeader, "forwarded-for chain")?, ip_value(self.client(peer, upstream)))
        } else {
            let peer = ip_value(peer);
            (peer.clone(), peer)
        };
        upstream.insert_header(X_FORWARDED_FOR, chain)?;
        upstream.insert_header(X_REAL_IP, client)?;
        upstream.insert_header(X_FORWARDED_HOST, host)?;
        // TLS ends at a trusted proxy in front: its word on the scheme stands.
        let proto_from_proxy = trusted && upstream.headers.contains_key(X_FORWARDED_PROTO);
        if !proto_from_proxy {
            upstream.insert_header(X_FORWARDED_PROTO, HeaderValue::from_static(if tls { "https" } else { "http" }))?;
        }
        upstream.remove_header(FORWARDED);
        Ok(())
    }
}

/// Removes headers a client could write to pass as what a proxy in front
/// said: the `X-Forwarded-*` Pipes does not set and `True-Client-IP` (kept
/// from a `trusted` peer), and names with `_` (kept with `underscores`).
/// One look at the names on every request; a copy only when one goes.
fn strip_spoofable(upstream: &mut RequestHeader, trusted: bool, underscores: bool) {
    let spoofable = |name: &str| {
        let proxies_word =
            name == "true-client-ip" || (name.starts_with("x-forwarded-") && !matches!(name, X_FORWARDED_FOR | X_FORWARDED_HOST | X_FORWARDED_PROTO));
        (!underscores && name.contains('_')) || (!trusted && proxies_word)
    };
    if !upstream.headers.keys().any(|n| spoofable(n.as_str())) {
        return;
    }
    let doomed: Vec<http::HeaderName> = upstream.headers.keys().filter(|n| spoofable(n.as_str())).cloned().collect();
    for name in doomed {
        upstream.remove_header(&name);
    }
}

/// `ip` as a header value, IPv4 without the formatting machinery: this runs
/// for every proxied request.
fn ip_value(ip: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = ip else {
        return HeaderValue::try_from(ip.to_string()).expect("an address is a valid header value");
    };
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        let digits = [octet / 100, octet / 10 % 10, octet % 10];
        let skip = if octet >= 100 {
            0
        } else if octet >= 10 {
            1
        } else {
            2
        };
        for d in &digits[skip..] {
            text[len] = b'0' + d;
            len += 1;
        }
    }
    HeaderValue::from_bytes(&text[..len]).expect("digits and dots are a valid header value")
}

/// The addresses in every `X-Forwarded-For` line, in order.
fn forwarded_for(req: &RequestHeader) -> impl DoubleEndedIterator<Item = &str> {
    req.headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect::<Vec<_>>()
        .into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(xff: &[&str]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for v in xff {
            req.append_header("x-forwarded-for", *v).unwrap();
        }
        req.insert_header("forwarded", "for=6.6.6.6").unwrap();
        req.insert_header("x-real-ip", "6.6.6.6").unwrap();
        req
    }

    fn header<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
        req.headers.get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn an_untrusted_peer_replaces_what_the_client_wrote() {
        let mut req = request(&["6.6.6.6"]);
        Trusted::default().apply(Some("203.0.113.7".parse().unwrap()), HeaderValue::from_static("v1.a.b.example.com"), false, false, &mut req).unwrap();
        assert_eq!(header(&req, "x-forwarded-for"), Some("203.0.113.7"));
        assert_eq!(header(&req, "x-real-ip"), Some("203.0.113.7"));
        assert_eq!(header(&req, "x-forwarded-host"), Some("v1.a.b.example.com"));
        assert_eq!(header(&req, "x-forwarded-proto"), Some("http"));
        assert_eq!(header(&req, "forwarded"), None);
        let mut over_tls = request(&[]);
        Trusted::default().apply(Some("203.0.113.7".parse().unwrap()), HeaderValue::from_static("h"), true, false, &mut over_tls).unwrap();
        assert_eq!(header(&over_tls, "x-forwarded-proto"), Some("https"));
    }

    #[test]
    fn spellings_a_cgi_server_would_read_as_the_edges_are_dropped() {
        let spoofs = ["x_real_ip", "x_forwarded_for", "x-forwarded-port", "x-forwarded-prefix", "true-client-ip"];
        let with_spoofs = || {
            let mut req = request(&[]);
            for name in spoofs {
                req.insert_header(name, "6.6.6.6").unwrap();
            }
            req.insert_header("x-app-token", "kept").unwrap();
            req
        };
        let peer = Some("203.0.113.7".parse().unwrap());
        let mut req = with_spoofs();
        Trusted::default().apply(peer, HeaderValue::from_static("h"), false, false, &mut req).unwrap();
        for name in spoofs {
            assert_eq!(header(&req, name), None, "{name}");
        }
        assert_eq!(header(&req, "x-app-token"), Some("kept"));

        let mut req = with_spoofs();
        Trusted::default().apply(peer, HeaderValue::from_static("h"), false, true, &mut req).unwrap();
        assert_eq!(header(&req, "x_real_ip"), Some("6.6.6.6"), "PIPES_UNDERSCORE_HEADERS keeps them");
        assert_eq!(header(&req, "x-forwarded-port"), None, "the family stays Pipes' or a trusted proxy's");

        let mut req = with_spoofs();
        Trusted::parse("203.0.113.0/24").unwrap().apply(peer, HeaderValue::from_static("h"), false, false, &mut req).unwrap();
        assert_eq!(header(&req, "x-forwarded-port"), Some("6.6.6.6"), "a trusted proxy's word stands");
        assert_eq!(header(&req, "true-client-ip"), Some("6.6.6.6"));
        assert_eq!(header(&req, "x_forwarded_for"), None, "underscores go whoever sent them");
    }

    #[test]
    fn a_trusted_proxy_is_extended_and_names_the_client() {
        let trusted = Trusted::parse("10.0.0.0/8, 127.0.0.1").unwrap();
        let mut req = request(&["6.6.6.6, 198.51.100.4", "10.1.2.3"]);
        req.insert_header("x-forwarded-proto", "https").unwrap();
        let peer = "127.0.0.1".parse().unwrap();
        assert_eq!(trusted.client(peer, &req), "198.51.100.4".parse::<IpAddr>().unwrap());
        trusted.apply(Some(peer), HeaderValue::from_static("h"), false, false, &mut req).unwrap();
        assert_eq!(header(&req, "x-forwarded-for"), Some("6.6.6.6, 198.51.100.4, 10.1.2.3, 127.0.0.1"));
        assert_eq!(header(&req, "x-real-ip"), Some("198.51.100.4"));
        assert_eq!(header(&req, "x-forwarded-proto"), Some("https"));
    }

    #[test]
    fn addresses_are_written_as_their_display_form() {
        for ip in ["0.0.0.0", "9.10.99.100", "203.0.113.7", "255.255.255.255", "127.0.0.1", "::1", "2001:db8::7"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_value(ip).to_str().unwrap(), ip.to_string());
        }
    }

    proptest::proptest! {
        #[test]
        fn every_ipv4_address_is_written_as_displayed(octets: [u8; 4]) {
            let ip = IpAddr::from(octets);
            let written = ip_value(ip);
            proptest::prop_assert_eq!(written.to_str().unwrap(), ip.to_string());
        }
    }

    #[test]
    fn lists_parse_addresses_and_networks() {
        assert_eq!(Trusted::parse("").unwrap(), Trusted::default());
        assert!(Trusted::parse("10.0.0.1, ::1, 192.168.0.0/16").is_ok());
        assert!(Trusted::parse("10.0.0.1, proxy.example.com").unwrap_err().contains("proxy.example.com"));
    }
}
