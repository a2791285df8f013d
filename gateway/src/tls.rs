//! TLS on the listeners (`[server.tls]`), with rustls: the certificate chain and private key
//! from PEM files, TLS 1.2 and 1.3 only (rustls implements nothing older), and the files read
//! again when they change (a renewed certificate is served without a restart; a broken
//! renewal is logged and the previous pair kept). The proxy listener offers HTTP/2 and
//! HTTP/1.1 by ALPN (RFC 7301); the admin listener HTTP/1.1.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// How often the files are looked at for a change.
pub const WATCH_EVERY: Duration = Duration::from_secs(5);

/// Reads and checks a certificate chain and its private key: both PEM, the key PKCS#8, PKCS#1
/// or SEC1, of a kind rustls signs with (ECDSA P-256/P-384, Ed25519, RSA), and matching the
/// first certificate. Errors name the file and what is wrong.
pub fn load(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, String> {
    let chain = crate::read_pem_file(cert_file)
        .map_err(|e| format!("{}: cannot read the certificate chain: {e}", cert_file.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: holds no certificate", cert_file.display()));
    }
    let key_pem = crate::read_pem_file(key_file)
        .map_err(|e| format!("{}: cannot read a PEM private key: {e}", key_file.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("{}: cannot read a PEM private key: {e}", key_file.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: unsupported private key: {e}", key_file.display()))?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "{}: the private key does not match the certificate in {}: {e}",
            key_file.display(),
            cert_file.display()
        )
    })?;
    Ok(certified)
}

/// The certificate the listeners serve, swapped when its files change.
#[derive(Debug)]
pub struct Certificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl Certificate {
    /// The pair in `cert_file` and `key_file`, checked as [`load`] does.
    pub fn open(cert_file: &Path, key_file: &Path) -> Result<Arc<Certificate>, String> {
        let pair = load(cert_file, key_file)?;
        Ok(Arc::new(Certificate {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: ArcSwap::from_pointee(pair),
        }))
    }

    /// A rustls server configuration serving this certificate; `alpn`: the protocols offered,
    /// in order of preference (`b"h2"`, `b"http/1.1"`).
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .expect("ring supports TLS 1.2 and 1.3")
                .with_no_client_auth()
                .with_cert_resolver(self.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// Reads the files again; the new pair is served from the next handshake on. Errors (the
    /// previous pair stays) as [`load`].
    pub fn reload(&self) -> Result<(), String> {
        let pair = load(&self.cert_file, &self.key_file)?;
        self.current.store(Arc::new(pair));
        Ok(())
    }

    /// Reloads whenever either file's modification time changes, every [`WATCH_EVERY`], until
    /// `stop`. A failed reload is logged once per change and the previous pair kept.
    pub async fn watch(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let stamp = |c: &Certificate| -> (Option<SystemTime>, Option<SystemTime>) {
            let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            (m(&c.cert_file), m(&c.key_file))
        };
        let mut seen = stamp(&self);
        let mut tick = tokio::time::interval(WATCH_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = stamp(&self);
            if now == seen {
                continue;
            }
            seen = now;
            match self.reload() {
                Ok(()) => tracing::info!(cert = %self.cert_file.display(), "TLS certificate reloaded"),
                Err(e) => tracing::error!("TLS certificate not reloaded, the previous one is served: {e}"),
            }
        }
    }
}
