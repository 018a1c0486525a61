//! TLS to PostgreSQL with rustls, as libpq's `sslmode` asks (design §5, issue 32 item 1).
//!
//! tokio-postgres knows `disable`, `prefer` and `require` and leaves the certificate check to
//! the connector; libpq's `verify-ca` and `verify-full` are read here from the URL and become
//! `require` plus a verifying connector. `prefer` and `require` encrypt without checking who
//! answers, as libpq does (unless a CA file is given: then `require` checks the chain, as
//! libpq does with a root certificate). This module owns only the handshake: it never reads
//! or writes a record.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Not at all (`disable`, `prefer`, `require` without a CA file).
    Nothing,
    /// The chain, not the name (`verify-ca`, or `require` with a CA file).
    Chain,
    /// The chain and the host name (`verify-full`).
    Full,
}

/// `url` with libpq's `verify-ca`/`verify-full` rewritten to `require` (which tokio-postgres
/// parses), and the check they ask for. Both forms are read: a URL's query and a conninfo's
/// `key=value` words.
pub fn split_sslmode(url: &str, has_ca: bool) -> (String, Verify) {
    let mut verify = None;
    let mut rewrite = |word: &str| -> String {
        match word.strip_prefix("sslmode=") {
            Some("verify-full") => {
                verify = Some(Verify::Full);
                "sslmode=require".to_owned()
            }
            Some("verify-ca") => {
                verify = Some(Verify::Chain);
                "sslmode=require".to_owned()
            }
            Some("require") if has_ca => {
                verify = Some(Verify::Chain);
                word.to_owned()
            }
            _ => word.to_owned(),
        }
    };
    let rewritten = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            Some((base, query)) => {
                let words: Vec<String> = query.split('&').map(&mut rewrite).collect();
                format!("{base}?{}", words.join("&"))
            }
            None => url.to_owned(),
        }
    } else {
        let words: Vec<String> = url.split_whitespace().map(&mut rewrite).collect();
        words.join(" ")
    };
    (rewritten, verify.unwrap_or(Verify::Nothing))
}

/// Makes a rustls connector per connection, for the host being connected to.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<rustls::ClientConfig>,
}

impl MakeRustls {
    /// A connector checking as `verify` says, against `ca_pem` or the system's roots.
    pub fn new(verify: Verify, ca_pem: Option<&[u8]>) -> Result<MakeRustls, String> {
        // rustls needs one process-wide crypto provider; an error means one is set.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|error| error.to_string())?;
        let config = match verify {
            Verify::Nothing => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unchecked(provider)))
                .with_no_client_auth(),
            Verify::Chain | Verify::Full => {
                let roots = Arc::new(roots(ca_pem)?);
                let webpki =
                    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                        .build()
                        .map_err(|error| error.to_string())?;
                let verifier: Arc<dyn ServerCertVerifier> = match verify {
                    Verify::Chain => Arc::new(ChainOnly(webpki)),
                    _ => webpki,
                };
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_no_client_auth()
            }
        };
        Ok(MakeRustls {
            config: Arc::new(config),
        })
    }
}

fn roots(ca_pem: Option<&[u8]>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            use rustls::pki_types::pem::PemObject;
            for certificate in CertificateDer::pem_slice_iter(pem) {
                let certificate = certificate.map_err(|error| error.to_string())?;
                roots.add(certificate).map_err(|error| error.to_string())?;
            }
        }
        None => {
            for certificate in rustls_native_certs::load_native_certs().certs {
                // A system root rustls cannot use is one the server is not verified against.
                let _ = roots.add(certificate);
            }
        }
    }
    if roots.is_empty() {
        return Err("no CA certificate to verify PostgreSQL against".into());
    }
    Ok(roots)
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
        Ok(RustlsConnect {
            connector: tokio_rustls::TlsConnector::from(self.config.clone()),
            name,
        })
    }
}

/// One connection's handshake.
pub struct RustlsConnect {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let stream = self.connector.connect(self.name, stream).await?;
            Ok(RustlsStream(Box::new(stream)))
        })
    }
}

/// A TLS connection to PostgreSQL (boxed: a rustls connection is large).
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM works without channel binding; `-PLUS` would need the certificate's hash.
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// `sslmode=require` without a CA: encrypted, the server's certificate not checked (libpq's
/// meaning). The handshake's signatures are still checked, so the session is with the holder
/// of the certificate's key, whoever that is.
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name is not compared.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_verify_modes_become_require_with_a_check() {
        let url = "postgres://u@a,b/db?sslmode=verify-full&target_session_attrs=read-write";
        let (rewritten, verify) = split_sslmode(url, false);
        assert_eq!(
            rewritten,
            "postgres://u@a,b/db?sslmode=require&target_session_attrs=read-write"
        );
        assert_eq!(verify, Verify::Full);
        let (rewritten, verify) = split_sslmode("host=a sslmode=verify-ca dbname=x", false);
        assert_eq!(rewritten, "host=a sslmode=require dbname=x");
        assert_eq!(verify, Verify::Chain);
        assert_eq!(
            split_sslmode("host=a sslmode=require", true).1,
            Verify::Chain
        );
        assert_eq!(
            split_sslmode("host=a sslmode=require", false).1,
            Verify::Nothing
        );
        assert_eq!(split_sslmode("host=a", false).1, Verify::Nothing);
    }
}
