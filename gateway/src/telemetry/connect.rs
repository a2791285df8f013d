//! Connections to the OTLP/HTTP endpoint for `opentelemetry_http`'s hyper client: plain TCP for
//! `http://`, TLS for `https://` with the provider connections' own streams and rustls settings
//! (`upstream`: ring, webpki roots, HTTP/1.1).
//!
//! Written here because the ready-made choices cost more than these lines: hyper's
//! `HttpConnector` has no TLS, and reqwest's rustls feature brings a second crypto provider
//! (aws-lc) and the platform verifier into the build.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::upstream::{tls_config, Stream};

/// A `tower::Service<Uri>` making one connection per call (the client pools them).
#[derive(Clone, Debug)]
pub(super) struct Connector {
    /// Bounds the TCP connect and the TLS handshake together.
    pub(super) timeout: Duration,
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<Stream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.timeout;
        Box::pin(async move {
            tokio::time::timeout(timeout, connect(uri))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting to the OTLP endpoint timed out"))?
                .map(TokioIo::new)
        })
    }
}

async fn connect(uri: Uri) -> io::Result<Stream> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("OTLP endpoint {uri}: {what}"));
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(invalid("the scheme is not http or https")),
    };
    // `[::1]` in a URI, `::1` to connect to and to name the server.
    let host = uri.host().ok_or_else(|| invalid("no host"))?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp = TcpStream::connect((host, port)).await?;
    let _ = tcp.set_nodelay(true);
    if !tls {
        return Ok(Stream::Plain(tcp));
    }
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| invalid(&e.to_string()))?;
    let tls = tokio_rustls::TlsConnector::from(tls_config()).connect(name, tcp).await?;
    Ok(Stream::Tls(Box::new(tls)))
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}
