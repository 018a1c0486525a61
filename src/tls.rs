//! TLS for idemproxy's listeners (rustls with ring): the proxy listener when it terminates
//! TLS itself (`--tls-cert`, `--tls-key`, `--client-ca`), and the injector's webhook.
//!
//! Certificates are re-read when their files change (polled), so a rotated certificate is
//! taken by the next handshake without a restart and without touching open connections; a
//! change that does not load is logged and the last good configuration stays. A verified
//! client certificate names its caller by its one URI SAN (the X.509-SVID rule).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// How often the certificate files are looked at for a change.
pub const RELOAD_POLL: Duration = Duration::from_secs(1);

/// A TLS file that does not load: the setting, its file, and why.
#[derive(Debug, thiserror::Error)]
#[error("--{setting} {}: {reason}", path.display())]
pub struct TlsError {
    /// The flag naming the file.
    pub setting: &'static str,
    /// The file.
    pub path: PathBuf,
    /// Why it does not load.
    pub reason: String,
}

/// The files of one TLS listener.
#[derive(Debug, Clone)]
pub struct Files {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle that client certificates must chain to; `None`: none is asked for.
    pub client_ca: Option<PathBuf>,
    /// ALPN protocols offered, most preferred first.
    pub alpn: Vec<Vec<u8>>,
    /// The settings that named these files, so an error names the one to fix.
    pub settings: FileSettings,
}

/// The settings (flags without their dashes) that name one listener's TLS files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSettings {
    /// The certificate chain's.
    pub cert: &'static str,
    /// The private key's.
    pub key: &'static str,
    /// The client CA bundle's.
    pub client_ca: &'static str,
}

impl FileSettings {
    /// The proxy listener's (and the injector's) files.
    pub const PROXY: FileSettings = FileSettings {
        cert: "tls-cert",
        key: "tls-key",
        client_ca: "client-ca",
    };

    /// The admin API's files (it asks for no client certificate).
    pub const ADMIN: FileSettings = FileSettings {
        cert: "admin-tls-cert",
        key: "admin-tls-key",
        client_ca: "admin-tls-cert",
    };
}

fn error(setting: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError {
        setting,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn certificates(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = crate::files::read(path, crate::files::TEXT_BYTES_MAX)
        .map_err(|e| error(setting, path, e))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(setting, path, e))?;
    if chain.is_empty() {
        return Err(error(setting, path, "holds no certificate"));
    }
    Ok(chain)
}

/// Reads the files into a server configuration.
pub fn server_config(files: &Files) -> Result<ServerConfig, TlsError> {
    let names = files.settings;
    let chain = certificates(names.cert, &files.cert)?;
    let key = crate::files::read(&files.key, crate::files::TEXT_BYTES_MAX)
        .map_err(|e| error(names.key, &files.key, e))?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| error(names.key, &files.key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| error(names.cert, &files.cert, e))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(names.client_ca, ca)? {
                roots.add(cert).map_err(|e| error(names.client_ca, ca, e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| error(names.client_ca, ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| error(names.key, &files.key, e))?;
    config.alpn_protocols = files.alpn.clone();
    Ok(config)
}

/// A server configuration that follows its files.
pub struct Reloading {
    files: Files,
    current: RwLock<Arc<ServerConfig>>,
}

impl Reloading {
    /// Loads the files now (an error stops the start) and re-reads them in the background
    /// whenever one of them changes, every `poll`.
    pub fn start(files: Files, poll: Duration) -> Result<Arc<Reloading>, TlsError> {
        let config = server_config(&files)?;
        let reloading = Arc::new(Reloading {
            files,
            current: RwLock::new(Arc::new(config)),
        });
        let weak = Arc::downgrade(&reloading);
        tokio::spawn(async move {
            let mut seen = None;
            loop {
                let Some(reloading) = weak.upgrade() else {
                    return;
                };
                let stamp = reloading.stamp();
                if seen.is_some() && seen != Some(stamp.clone()) {
                    reloading.reload();
                }
                seen = Some(stamp);
                drop(reloading);
                tokio::time::sleep(poll).await;
            }
        });
        Ok(reloading)
    }

    /// The configuration for the next handshake.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self.current.read().expect("never poisoned").clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        let files = [
            Some(&self.files.cert),
            Some(&self.files.key),
            self.files.client_ca.as_ref(),
        ];
        files
            .into_iter()
            .flatten()
            .map(|path| {
                let meta = std::fs::metadata(path).ok()?;
                Some((meta.modified().ok()?, meta.len()))
            })
            .collect()
    }

    fn reload(&self) {
        match server_config(&self.files) {
            Ok(config) => {
                *self.current.write().expect("never poisoned") = Arc::new(config);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificates reloaded");
            }
            Err(error) => {
                tracing::warn!(%error, "TLS files changed but do not load; keeping the last good ones");
            }
        }
    }
}

/// The caller a verified client certificate names: its one URI SAN, or with
/// `subject_fallback` and no URI SAN, its subject CN. More than one URI SAN is refused, as
/// the X.509-SVID rule says.
pub fn caller_of_certificate(der: &[u8], subject_fallback: bool) -> Result<Arc<str>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the client certificate does not parse: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("the client certificate's SAN extension is invalid: {e}"))?;
    let uris: Vec<&str> = san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [uri] if !uri.is_empty() => Ok(Arc::from(*uri)),
        [_] => Err("the client certificate's URI SAN is empty".into()),
        [] if subject_fallback => {
            let cn = cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .filter(|cn| !cn.is_empty())
                .ok_or("the client certificate has neither a URI SAN nor a subject CN")?;
            Ok(Arc::from(cn))
        }
        [] => Err("the client certificate has no URI SAN (a SPIFFE ID) to name its caller".into()),
        more => Err(format!(
            "the client certificate has {} URI SANs; a caller identity needs exactly one",
            more.len()
        )),
    }
}
