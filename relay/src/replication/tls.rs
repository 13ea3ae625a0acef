//! TLS settings for a replication connection: the rustls client configuration that
//! [`SslMode`] and the certificate files of a [`ConnectConfig`] call for.
//!
//! The `ring` provider is passed to every configuration explicitly, so no
//! process-wide default provider needs to be installed. Certificates are checked
//! by one of three verifiers:
//!
//! - **verify-full**: rustls' WebPKI verifier: the chain must lead to a certificate
//!   of `sslrootcert`, the dates must hold, and the certificate must name the host
//!   (a DNS name, or an IP address in an IP subject alternative name).
//! - **chain only** (`verify-ca`, and `prefer`/`require` when `sslrootcert` is
//!   given, as libpq does): the same chain and date checks, without the name.
//! - **any certificate** (`prefer`/`require` without `sslrootcert`): the
//!   certificate is not judged, but the handshake signatures are still verified
//!   with it, so the server must hold its private key. This encrypts without
//!   authenticating the server, like libpq's `require`.
//!
//! Files are read for every connection, so a replaced certificate takes effect on
//! the next reconnect.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, WebPkiServerVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use super::config::{ConnectConfig, SslMode};

/// The ALPN protocol name PostgreSQL 17 and later register; older servers ignore it.
const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// The TLS settings of a connection cannot be turned into a TLS client
/// configuration (a missing or unreadable file, an unusable certificate or key).
///
/// Fixing this needs a change of configuration or files: retrying cannot help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    /// `verify-ca` or `verify-full` without a root certificate file.
    #[error(
        "sslmode={sslmode} checks the server's certificate and needs the certificate of the \
         CA that signed it: set sslrootcert to its PEM file"
    )]
    MissingRootCert {
        /// The configured mode.
        sslmode: SslMode,
    },
    /// A PEM file could not be read or parsed.
    #[error("cannot read the {what} file {path}", path = .path.display())]
    ReadPem {
        /// Which file (`root certificate (sslrootcert)`, ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A PEM file holds no certificate rustls can use.
    #[error("the {what} file {path} holds no usable certificate", path = .path.display())]
    NoCertificate {
        /// Which file.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The client certificate and key do not go together or are not supported.
    #[error(
        "the client certificate {cert} and key {key} cannot be used",
        cert = .cert.display(),
        key = .key.display()
    )]
    ClientCert {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The host cannot be named in TLS (it is neither a DNS name nor an IP address).
    #[error("the host {host:?} is neither a DNS name nor an IP address, as TLS needs")]
    InvalidHostName {
        /// The host as configured.
        host: String,
        /// Why.
        #[source]
        source: rustls_pki_types::InvalidDnsNameError,
    },
    /// rustls refused the configuration (no protocol version or verifier fits).
    #[error("the TLS client configuration is invalid")]
    Rustls {
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The certificate verifier could not be built.
    #[error("cannot build the TLS certificate verifier")]
    Verifier {
        /// Why.
        #[source]
        source: rustls::client::VerifierBuilderError,
    },
}

/// The rustls configuration for `config`, whose mode must use TLS (not
/// [`SslMode::Disable`]).
pub(crate) fn client_config(config: &ConnectConfig) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let mode = config.ssl_mode();
    let roots = match config.ssl_root_cert() {
        Some(path) => Some(Arc::new(load_roots(path)?)),
        None if mode.verifies_certificate() => {
            return Err(TlsSetupError::MissingRootCert { sslmode: mode })
        }
        None => None,
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsSetupError::Rustls { source })?;
    let builder = match (mode, roots) {
        (SslMode::VerifyFull, Some(roots)) => {
            let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|source| TlsSetupError::Verifier { source })?;
            builder.with_webpki_verifier(verifier)
        }
        (_, Some(roots)) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly { roots, algorithms })),
        (_, None) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate { algorithms })),
    };
    let mut tls = match config.ssl_client_cert() {
        Some((cert, key)) => {
            let chain = load_certificates(cert, "client certificate (sslcert)")?;
            let private_key =
                PrivateKeyDer::from_pem_file(key).map_err(|source| TlsSetupError::ReadPem {
                    what: "client key (sslkey)",
                    path: key.to_owned(),
                    source,
                })?;
            builder
                .with_client_auth_cert(chain, private_key)
                .map_err(|source| TlsSetupError::ClientCert {
                    cert: cert.to_owned(),
                    key: key.to_owned(),
                    source,
                })?
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(tls))
}

/// The name the server's certificate is checked against, and sent as SNI when it
/// is a DNS name (rustls sends no SNI for an IP address).
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, TlsSetupError> {
    ServerName::try_from(host.to_owned()).map_err(|source| TlsSetupError::InvalidHostName {
        host: host.to_owned(),
        source,
    })
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsSetupError> {
    const WHAT: &str = "root certificate (sslrootcert)";
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(load_certificates(path, WHAT)?);
    if ignored > 0 {
        tracing::warn!(
            path = %path.display(),
            added,
            ignored,
            "some root certificates cannot be used and are ignored"
        );
    }
    if added == 0 {
        return Err(TlsSetupError::NoCertificate {
            what: WHAT,
            path: path.to_owned(),
        });
    }
    Ok(roots)
}

fn load_certificates(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let read_error = |source| TlsSetupError::ReadPem {
        what,
        path: path.to_owned(),
        source,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(read_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error)?;
    if certificates.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certificates)
}

/// Checks that the certificate chains to a root and is within its dates; the name
/// is not checked (`verify-ca`).
struct ChainOnly {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for ChainOnly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainOnly")
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let certificate = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &certificate,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Accepts whatever certificate the server presents, but still verifies the
/// handshake signatures made with its key (`prefer`/`require` without a root
/// certificate).
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
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
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("outbox-relay-tls-{}-{}", std::process::id(), name));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn verifying_modes_without_root_certificate_are_refused() {
        let config = ConnectConfig::new("h", "u", "d").with_ssl_mode(SslMode::VerifyCa);
        let err = client_config(&config).unwrap_err();
        assert!(
            matches!(
                err,
                TlsSetupError::MissingRootCert {
                    sslmode: SslMode::VerifyCa
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("sslrootcert"), "{err}");
    }

    #[test]
    fn modes_without_verification_need_no_files() {
        for mode in [SslMode::Allow, SslMode::Prefer, SslMode::Require] {
            let config = ConnectConfig::new("h", "u", "d").with_ssl_mode(mode);
            let tls = client_config(&config).unwrap();
            assert_eq!(tls.alpn_protocols, vec![b"postgresql".to_vec()]);
        }
    }

    #[test]
    fn a_missing_root_certificate_file_names_the_file() {
        let config = ConnectConfig::new("h", "u", "d")
            .with_ssl_mode(SslMode::VerifyFull)
            .with_ssl_root_cert("/nonexistent/ca.crt");
        let err = client_config(&config).unwrap_err();
        assert!(matches!(err, TlsSetupError::ReadPem { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "cannot read the root certificate (sslrootcert) file /nonexistent/ca.crt"
        );
    }

    #[test]
    fn a_root_file_without_certificates_is_refused() {
        let path = temp_file("empty-ca.crt", "not a certificate\n");
        let config = ConnectConfig::new("h", "u", "d")
            .with_ssl_mode(SslMode::VerifyCa)
            .with_ssl_root_cert(&path);
        let err = client_config(&config).unwrap_err();
        assert!(
            matches!(err, TlsSetupError::NoCertificate { .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("holds no usable certificate"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn server_names_are_dns_names_or_ip_addresses() {
        assert!(matches!(
            server_name("localhost").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(matches!(
            server_name("127.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("::1").unwrap(),
            ServerName::IpAddress(_)
        ));
        let err = server_name("bad host!").unwrap_err();
        assert!(err.to_string().contains("\"bad host!\""), "{err}");
    }
}
