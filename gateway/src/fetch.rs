//! Fetching the image URLs providers answer with, safely: only `https` (plain `http` only where
//! the provider's policy allows it or names the host), never a private, loopback, link-local or
//! otherwise internal address unless the policy allows it, checked on the addresses DNS gives
//! and on every redirect (the connection goes to the checked address, so a second lookup cannot
//! swap it), with bounded size, redirects and time. `data:` URLs are decoded in place.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::policy::FetchPolicy;
use crate::providers::Image;
use crate::upstream::Stream;

const MAX_REDIRECTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    BadUrl(String),
    #[error("{0}: only https URLs are fetched (the provider's fetch policy can allow http or name the host)")]
    Scheme(String),
    #[error("{url} resolves to {ip}, a private, loopback, link-local or reserved address")]
    Private { url: String, ip: IpAddr },
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("more than {MAX_REDIRECTS} redirects")]
    Redirects,
    #[error("{url} answered {status}")]
    Status { url: String, status: StatusCode },
    #[error("the image is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("fetching took longer than {0} ms")]
    Timeout(u128),
    #[error("{0}")]
    Transport(String),
}

impl FetchError {
    /// A bounded label for `acc_fetch_refused_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::BadUrl(_) => "bad_url",
            FetchError::Scheme(_) => "scheme",
            FetchError::Private { .. } => "private_address",
            FetchError::Resolve(_) => "resolve",
            FetchError::Redirects => "redirects",
            FetchError::Status { .. } => "status",
            FetchError::TooLarge(_) => "too_large",
            FetchError::Timeout(_) => "timeout",
            FetchError::Transport(_) => "transport",
        }
    }
}

/// Replaces every URL image with its bytes.
pub async fn fetch_images(images: &mut [Image], policy: &FetchPolicy) -> Result<(), FetchError> {
    for image in images.iter_mut() {
        if let Image::Url(url) = image {
            let (bytes, mime) = fetch(url, policy).await?;
            *image = Image::Raw { bytes, mime };
        }
    }
    Ok(())
}

/// The bytes at `url` and their media type, within the policy.
pub async fn fetch(url: &str, policy: &FetchPolicy) -> Result<(Bytes, &'static str), FetchError> {
    if url.get(..5).is_some_and(|scheme| scheme.eq_ignore_ascii_case("data:")) {
        return data_url(&url[5..], policy.max_bytes);
    }
    match tokio::time::timeout(policy.timeout, follow(url, policy)).await {
        Ok(r) => r,
        Err(_) => Err(FetchError::Timeout(policy.timeout.as_millis())),
    }
}

fn data_url(rest: &str, max: usize) -> Result<(Bytes, &'static str), FetchError> {
    let (meta, payload) = rest.split_once(',').ok_or_else(|| FetchError::BadUrl("data: URL without a comma".into()))?;
    if !meta.ends_with(";base64") {
        return Err(FetchError::BadUrl("only base64 data: URLs are accepted".into()));
    }
    if payload.len() / 4 * 3 > max {
        return Err(FetchError::TooLarge(max));
    }
    let bytes = base64_simd::STANDARD
        .decode_to_vec(payload.trim())
        .map_err(|_| FetchError::BadUrl("data: URL payload is not valid base64".into()))?;
    let mime = sniff(&bytes);
    Ok((Bytes::from(bytes), mime))
}

async fn follow(url: &str, policy: &FetchPolicy) -> Result<(Bytes, &'static str), FetchError> {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if !(lower.starts_with("https://") || lower.starts_with("http://")) {
        return Err(FetchError::Scheme(shorten(url)));
    }
    let mut uri: Uri = url.parse().map_err(|_| FetchError::BadUrl(format!("not a URL: {}", shorten(url))))?;
    for _ in 0..=MAX_REDIRECTS {
        let shown = shorten(&uri.to_string());
        let host = uri.host().ok_or_else(|| FetchError::BadUrl(format!("{shown}: no host")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let named = policy.allow_hosts.contains(&host);
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") if policy.allow_http || named => false,
            _ => return Err(FetchError::Scheme(shown)),
        };
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|_| FetchError::Resolve(host.clone()))?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(FetchError::Resolve(host));
        }
        if !(policy.allow_private || named) {
            if let Some(a) = addrs.iter().find(|a| !is_public(a.ip())) {
                return Err(FetchError::Private { url: shown, ip: a.ip() });
            }
        }
        let (status, location, body) = get(&uri, &host, &addrs, tls, policy.max_bytes).await?;
        if status.is_redirection() {
            let loc = location.ok_or_else(|| FetchError::Status { url: shown.clone(), status })?;
            uri = join(&uri, &loc).ok_or_else(|| FetchError::BadUrl(format!("bad redirect to {}", shorten(&loc))))?;
            continue;
        }
        if !status.is_success() {
            return Err(FetchError::Status { url: shown, status });
        }
        let mime = sniff(&body);
        return Ok((body, mime));
    }
    Err(FetchError::Redirects)
}

/// One GET on a fresh connection to one of the checked addresses.
async fn get(
    uri: &Uri,
    host: &str,
    addrs: &[SocketAddr],
    tls: bool,
    max: usize,
) -> Result<(StatusCode, Option<String>, Bytes), FetchError> {
    let mut last = None;
    let mut tcp = None;
    for a in addrs {
        match TcpStream::connect(a).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let tcp = tcp.ok_or_else(|| {
        FetchError::Transport(format!("cannot connect to {host}: {}", last.map_or(String::new(), |e| e.to_string())))
    })?;
    let stream = if tls {
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| FetchError::BadUrl(format!("invalid TLS server name {host}: {e}")))?;
        let connector = tokio_rustls::TlsConnector::from(crate::upstream::tls_config());
        let s =
            connector.connect(name, tcp).await.map_err(|e| FetchError::Transport(format!("TLS with {host}: {e}")))?;
        Stream::Tls(Box::new(s))
    } else {
        Stream::Plain(tcp)
    };
    let (mut send, conn) = http1::Builder::new()
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| FetchError::Transport(e.to_string()))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let authority = uri.authority().map_or(host.to_string(), |a| a.to_string());
    let req = Request::get(path)
        .header(header::HOST, authority)
        .header(header::USER_AGENT, "acc-gateway")
        .header(header::ACCEPT, "image/*")
        .header(header::ACCEPT_ENCODING, "identity")
        .body(Empty::new())
        .map_err(|e| FetchError::BadUrl(e.to_string()))?;
    let work = async {
        let resp = send.send_request(req).await.map_err(|e| FetchError::Transport(e.to_string()))?;
        let status = resp.status();
        let location = resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_string);
        if resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|n| n > max as u64)
        {
            return Err(FetchError::TooLarge(max));
        }
        if !status.is_success() {
            return Ok((status, location, Bytes::new()));
        }
        let body = Limited::new(resp.into_body(), max).collect().await.map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                FetchError::TooLarge(max)
            } else {
                FetchError::Transport(e.to_string())
            }
        })?;
        Ok((status, location, body.to_bytes()))
    };
    // The connection is driven alongside the request and closed with it.
    tokio::select! {
        r = work => r,
        e = conn => Err(FetchError::Transport(match e {
            Ok(()) => "connection closed".to_string(),
            Err(e) => e.to_string(),
        })),
    }
}

/// A redirect target, absolute or relative to `base`.
pub fn join(base: &Uri, loc: &str) -> Option<Uri> {
    if let Ok(u) = loc.parse::<Uri>() {
        if u.scheme().is_some() {
            return Some(u);
        }
    }
    let scheme = base.scheme_str()?;
    let authority = base.authority()?;
    let path = if loc.starts_with('/') {
        loc.to_string()
    } else {
        let dir = base.path().rsplit_once('/').map_or("", |(d, _)| d);
        format!("{dir}/{loc}")
    };
    format!("{scheme}://{authority}{path}").parse().ok()
}

/// Whether an address is on the public internet. Refused: every range the IANA IPv4 and IPv6
/// Special-Purpose Address Registries (RFC 6890 and its updates) mark as not globally
/// reachable, plus multicast and, for IPv6, everything outside global unicast `2000::/3`.
/// Addresses that embed an IPv4 address count as that address (IPv4-mapped `::ffff:0:0/96`,
/// NAT64 `64:ff9b::/96`, 6to4 `2002::/16`); the deprecated IPv4-compatible `::/96` and
/// Teredo, which tunnel to addresses the guard cannot see, are refused outright.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            let o = v6.octets();
            // NAT64 well-known prefix 64:ff9b::/96 (RFC 6052).
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                return is_public_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            // Only global unicast 2000::/3 is on the internet: this refuses ::/8 (loopback,
            // unspecified, IPv4-compatible ::/96), 64:ff9b:1::/48, 100::/64 discard, fc00::/7
            // unique local, fe80::/10 link-local, fec0::/10 site-local, ff00::/8 multicast and
            // 5f00::/16 SRv6 SIDs.
            if s[0] & 0xe000 != 0x2000 {
                return false;
            }
            // 6to4 (RFC 3056): the IPv4 address in bits 16..48.
            if s[0] == 0x2002 {
                return is_public_v4(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
            }
            let ietf = s[0] == 0x2001 && s[1] < 0x0200; // IETF protocol assignments 2001::/23 (Teredo, benchmarking, ORCHID)
            let documentation = (s[0] == 0x2001 && s[1] == 0x0db8) // 2001:db8::/32
                || (s[0] == 0x3fff && s[1] < 0x1000); // 3fff::/20 (RFC 9637)
            !(ietf || documentation)
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // shared address space 100.64/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments 192.0.0/24
        || (o[0] == 192 && o[1] == 88 && o[2] == 99) // deprecated 6to4 relay anycast 192.88.99/24
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18/15
        || o[0] >= 240) // reserved, broadcast
}

fn sniff(b: &[u8]) -> &'static str {
    crate::providers::sniff_image(b).map_or("application/octet-stream", |(mime, _)| mime)
}

/// A URL for messages: bounded, without its query (signed URLs carry credentials there).
fn shorten(url: &str) -> String {
    let no_query = url.split(['?', '#']).next().unwrap_or(url);
    no_query.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2001:db8::1",
            "198.18.0.1",
            "192.0.0.8",
            "192.88.99.1",
            // IPv4-compatible (deprecated), in both spellings.
            "::127.0.0.1",
            "::7f00:1",
            "::8.8.8.8",
            "::a9fe:a9fe",
            // 6to4 and Teredo embedding internal addresses; NAT64 local use.
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:2::1",
            "64:ff9b:1::a00:1",
            // Discard-only, SRv6, documentation 3fff::/20, site-local, multicast.
            "100::1",
            "5f00::1",
            "3fff::1",
            "fec0::1",
            "ff02::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} must not count as public");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "151.101.1.1",
            "::ffff:8.8.8.8",
            "2002:808:808::1",
            "64:ff9b::808:808",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip} is public");
        }
    }

    #[test]
    fn redirects_resolve_relative_locations() {
        let base: Uri = "https://cdn.example.com/a/b/img.png?sig=1".parse().unwrap();
        assert_eq!(join(&base, "/c.png").unwrap().to_string(), "https://cdn.example.com/c.png");
        assert_eq!(join(&base, "d.png").unwrap().to_string(), "https://cdn.example.com/a/b/d.png");
        assert_eq!(join(&base, "http://127.0.0.1/x").unwrap().to_string(), "http://127.0.0.1/x");
    }

    #[tokio::test]
    async fn schemes_private_addresses_and_data_urls() {
        let p = FetchPolicy::default();
        let e = fetch("http://example.com/x.png", &p).await.unwrap_err();
        assert_eq!(e.reason(), "scheme");
        let e = fetch("https://127.0.0.1/x.png", &p).await.unwrap_err();
        assert_eq!(e.reason(), "private_address", "{e}");
        let e = fetch("https://[::1]:8443/x.png", &p).await.unwrap_err();
        assert_eq!(e.reason(), "private_address", "{e}");
        let e = fetch("file:///etc/passwd", &p).await.unwrap_err();
        assert_eq!(e.reason(), "scheme");
        let png = b"\x89PNG\r\n\x1a\nrest";
        let url = format!("data:image/png;base64,{}", base64_simd::STANDARD.encode_to_string(png));
        let (bytes, mime) = fetch(&url, &p).await.unwrap();
        assert_eq!((&bytes[..], mime), (&png[..], "image/png"));
        let small = FetchPolicy { max_bytes: 4, ..FetchPolicy::default() };
        assert_eq!(fetch(&url, &small).await.unwrap_err().reason(), "too_large");
        // Messages never carry a URL's query (signed URLs hold credentials there).
        let e = fetch("http://example.com/x.png?X-Amz-Signature=secret", &p).await.unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}
