//! The SSRF guard (DESIGN §10): a webhook URL chosen by whoever edits the policy must not make
//! the proxy call into its own network — loopback, private ranges, link-local (cloud metadata
//! at 169.254.169.254), carrier-grade NAT, multicast — unless the endpoint says
//! `allow_private: true`.
//!
//! IP literals are checked when the policy compiles ([`is_public`]); host names when they are
//! resolved, by [`GuardedResolver`], which hands the connector only the addresses it checked:
//! the address connected to is the address checked, so a DNS answer that changes between a
//! check and the connect (rebinding) cannot slip through.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;

/// Whether `ip` is a public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
                || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64 64:ff9b::/96: an IPv4 behind it
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || v6.to_ipv4().is_some_and(|v4| !is_public_v4(v4)))
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // carrier-grade NAT 100.64/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18/15
        || o[0] >= 240) // reserved
}

/// Why a host name was refused.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot resolve {0}: {1}")]
    Lookup(String, std::io::Error),
    #[error(
        "{0} resolves only to private or loopback addresses (set allow_private: true to allow them)"
    )]
    Private(String),
}

/// A resolver for hyper-util's connector that drops non-public addresses (unless allowed).
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    pub allow_private: bool,
}

type Addrs = std::vec::IntoIter<SocketAddr>;

impl tower_service::Service<Name> for GuardedResolver {
    type Response = Addrs;
    type Error = ResolveError;
    type Future = Pin<Box<dyn Future<Output = Result<Addrs, ResolveError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| ResolveError::Lookup(host.clone(), e))?;
            let addrs: Vec<SocketAddr> = found
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(ResolveError::Private(host));
            }
            Ok(addrs.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn classifies_addresses() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(IpAddr::from_str(private).unwrap()), "{private}");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(IpAddr::from_str(public).unwrap()), "{public}");
        }
    }

    #[tokio::test]
    async fn refuses_names_that_resolve_to_loopback() {
        use tower_service::Service;
        let name = Name::from_str("localhost").unwrap();
        let mut guarded = GuardedResolver {
            allow_private: false,
        };
        assert!(matches!(
            guarded.call(name.clone()).await,
            Err(ResolveError::Private(_))
        ));
        let mut open = GuardedResolver {
            allow_private: true,
        };
        let addrs: Vec<_> = open.call(name).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }
}
