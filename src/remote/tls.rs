//! TLS for the guard service's client: the platform's certificate verifier, built at the first
//! handshake that needs it.
//!
//! Building the verifier loads the system's root certificates (3.5–5 ms on the development VM,
//! against some 20 µs for the rest of the HTTP client). A guard service reached over plain
//! HTTP, such as one on the same host, never needs them, so the client is built at once and the
//! roots only when a certificate is first checked; for an `https` service [`Roots::preload`]
//! loads them on the blocking pool as the proxy starts. Verification itself is the platform
//! verifier's (`rustls-platform-verifier`, as reqwest uses by default), unchanged.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_platform_verifier::Verifier;

/// The platform's verifier, made on first use; a failure to make it (no roots on the system) is
/// kept and fails every handshake with the same error.
#[derive(Debug)]
pub struct Roots {
    provider: Arc<CryptoProvider>,
    verifier: OnceLock<Result<Verifier, rustls::Error>>,
}

impl Roots {
    pub fn new(provider: Arc<CryptoProvider>) -> Arc<Roots> {
        Arc::new(Roots {
            provider,
            verifier: OnceLock::new(),
        })
    }

    /// Loads the roots now, if they are not loaded yet. Blocks for as long as that takes: call
    /// it off the runtime's threads. A handshake that comes while they load waits for them.
    pub fn preload(&self) {
        let _ = self.verifier();
    }

    /// Whether the roots have been loaded (or failed to load).
    #[cfg(test)]
    fn is_loaded(&self) -> bool {
        self.verifier.get().is_some()
    }

    fn verifier(&self) -> Result<&Verifier, rustls::Error> {
        self.verifier
            .get_or_init(|| Verifier::new(self.provider.clone()))
            .as_ref()
            .map_err(Clone::clone)
    }

    fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }
}

impl ServerCertVerifier for Roots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verifier()?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    // The handshake's signatures are checked by the crypto provider alone, as the platform
    // verifier does on Linux: no roots needed.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}

/// The client's TLS settings, as reqwest makes them by default for HTTP/1.1 (TLS 1.2 and 1.3,
/// SNI on), with `roots` as the verifier.
pub fn client_config(roots: Arc<Roots>) -> ClientConfig {
    let mut config = ClientConfig::builder_with_provider(roots.provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    #[test]
    fn the_roots_wait_for_the_first_certificate_or_a_preload() {
        let roots = Roots::new(ring());
        let config = client_config(roots.clone());
        assert!(!roots.is_loaded(), "making the client config loads nothing");
        assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
        assert!(
            !roots.supported_verify_schemes().is_empty(),
            "the schemes come from the provider"
        );
        assert!(!roots.is_loaded(), "nor does listing the signature schemes");
        roots.preload();
        assert!(roots.is_loaded());
    }

    #[test]
    fn a_certificate_the_platform_does_not_trust_is_refused() {
        let roots = Roots::new(ring());
        let name = ServerName::try_from("guard.example").unwrap();
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        let verdict = roots.verify_server_cert(&garbage, &[], &name, &[], UnixTime::now());
        assert!(verdict.is_err(), "{verdict:?}");
        assert!(roots.is_loaded(), "checking a certificate loads the roots");
    }
}
