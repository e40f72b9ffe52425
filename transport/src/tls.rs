//! The encrypted, mutually authenticated replication link: TLS 1.3 (rustls, ring) with
//! pinned peer certificates.
//!
//! There is no certificate authority. Each node has a key and a self-signed certificate
//! (`blkrep keygen`); the resource configuration names every node's certificate
//! fingerprint (SHA-256 of the DER, the value `openssl x509 -fingerprint -sha256` prints),
//! and a node accepts exactly the certificate its peer's fingerprint names, in both
//! directions (the listener asks the dialer for a certificate too). Validity dates and
//! names are not consulted: the pin is the trust decision, and a key is replaced by
//! generating a new one and changing the fingerprint in the configuration.
//!
//! The TLS handshake runs on the blocking socket in the link threads, before the link
//! handshake (which then travels inside TLS). The established [`rustls::Connection`] moves
//! to the event loop with the socket; from then on the loop feeds received ciphertext in
//! and takes ciphertext out (see `blkrepd`'s link code). TLS records carry their own
//! sequence numbers and AEAD tags, so a replayed, reordered, truncated or altered record
//! fails decryption and the connection is dropped before any of it reaches the engine.

use crate::handshake::LINK_MAGIC;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, DistinguishedName,
    OtherError, ServerConfig, ServerConnection, SignatureScheme,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

/// The name the dialer asks for; the listener's certificate is checked by its pin only.
const SERVER_NAME: &str = "blkrep-peer";

/// A TLS problem, for a person.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A key or certificate file could not be read or parsed.
    #[error("{path}: {problem}")]
    File { path: String, problem: String },
    /// This node's certificate does not match the fingerprint the configuration gives it.
    #[error(
        "certificate {path} has fingerprint {actual}, but the configuration says {configured} \
         for this node (wrong file, or the fingerprint was not updated after keygen)"
    )]
    OwnPin {
        path: String,
        actual: String,
        configured: String,
    },
    /// A fingerprint in the configuration is malformed.
    #[error("{0}")]
    BadFingerprint(String),
    /// The handshake failed (wrong key, plaintext peer, corrupt data, timeout...).
    #[error("{0}")]
    Handshake(String),
    /// A rustls configuration error.
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// A SHA-256 certificate fingerprint.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(der: &[u8]) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, der);
        let mut f = [0u8; 32];
        f.copy_from_slice(d.as_ref());
        Fingerprint(f)
    }

    /// Parse `sha256:<64 hex>`, or the colon-separated form openssl prints (either case).
    pub fn parse(s: &str) -> Result<Fingerprint, TlsError> {
        let t = s.trim();
        let t = t
            .strip_prefix("sha256:")
            .or_else(|| t.strip_prefix("SHA256:"))
            .unwrap_or(t);
        let hex: String = t.chars().filter(|c| *c != ':').collect();
        let bad = || {
            TlsError::BadFingerprint(format!(
                "{s:?} is not a SHA-256 fingerprint (\"sha256:\" and 64 hex digits, as \
                 `blkrep keygen` prints)"
            ))
        };
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut f = [0u8; 32];
        for (i, b) in f.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(f))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// A new key pair and self-signed certificate for `node`, PEM encoded.
pub struct GeneratedKey {
    /// The certificate (public; both sites may hold it).
    pub cert_pem: String,
    /// The private key (this node only; file mode 0600).
    pub key_pem: String,
    /// The certificate's fingerprint, for the configuration.
    pub fingerprint: Fingerprint,
}

/// Generate an ECDSA P-256 key and a self-signed certificate naming `node`.
pub fn keygen(node: &str) -> Result<GeneratedKey, TlsError> {
    let ck = rcgen::generate_simple_self_signed(vec![format!("blkrep-{node}")])
        .map_err(|e| TlsError::Setup(format!("key generation failed: {e}")))?;
    Ok(GeneratedKey {
        cert_pem: ck.cert.pem(),
        key_pem: ck.key_pair.serialize_pem(),
        fingerprint: Fingerprint::of(ck.cert.der()),
    })
}

/// Read the first certificate of a PEM file.
pub fn load_cert(path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.display().to_string(),
        problem: format!("not a PEM certificate ({e})"),
    })
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.display().to_string(),
        problem: format!("not a PEM private key ({e})"),
    })
}

/// Accepts exactly one certificate, by fingerprint, and checks the handshake signature
/// with it. Used in both directions.
#[derive(Debug)]
struct Pinned {
    pin: Fingerprint,
    algs: WebPkiSupportedAlgorithms,
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let got = Fingerprint::of(cert);
        if got == self.pin {
            return Ok(());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(PinMismatch {
                got,
                want: self.pin,
            })),
        )))
    }
}

#[derive(Debug)]
struct PinMismatch {
    got: Fingerprint,
    want: Fingerprint,
}

impl std::fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the peer presented certificate {}, but the configuration pins {} (wrong key, \
             or a stranger)",
            self.got, self.want
        )
    }
}

impl std::error::Error for PinMismatch {}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is enabled.
        Err(rustls::Error::General("TLS 1.2 is not enabled".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Where a node's TLS material is and whom it trusts.
#[derive(Clone, Debug)]
pub struct TlsFiles<'a> {
    /// This node's certificate (PEM).
    pub cert: &'a Path,
    /// This node's private key (PEM).
    pub key: &'a Path,
    /// This node's fingerprint from the configuration (checked against `cert`).
    pub own: Fingerprint,
    /// The peer's fingerprint from the configuration (the pin).
    pub peer: Fingerprint,
}

/// Both halves of a node's TLS setup: it listens (server) and dials (client) with the same
/// key and the same pin.
#[derive(Clone)]
pub struct TlsSetup {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// The pinned peer fingerprint (for messages).
    pub peer: Fingerprint,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsSetup(peer {})", self.peer)
    }
}

impl TlsSetup {
    /// Load the files, check this node's certificate against its own fingerprint, and build
    /// the TLS 1.3 configurations.
    pub fn load(files: &TlsFiles<'_>) -> Result<TlsSetup, TlsError> {
        let cert = load_cert(files.cert)?;
        let key = load_key(files.key)?;
        let actual = Fingerprint::of(&cert);
        if actual != files.own {
            return Err(TlsError::OwnPin {
                path: files.cert.display().to_string(),
                actual: actual.to_string(),
                configured: files.own.to_string(),
            });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pinned = Arc::new(Pinned {
            pin: files.peer,
            algs: provider.signature_verification_algorithms,
        });
        let setup = |e: rustls::Error| TlsError::Setup(e.to_string());
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(setup)?
            .with_client_cert_verifier(pinned.clone())
            .with_single_cert(vec![cert.clone()], key.clone_key())
            .map_err(|e| TlsError::File {
                path: files.key.display().to_string(),
                problem: format!("does not go with {}: {e}", files.cert.display()),
            })?;
        // No resumption: every connection proves possession of the key again.
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(setup)?
            .dangerous()
            .with_custom_certificate_verifier(pinned)
            .with_client_auth_cert(vec![cert], key)
            .map_err(setup)?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(TlsSetup {
            server: Arc::new(server),
            client: Arc::new(client),
            peer: files.peer,
        })
    }

    /// Run the server side of the TLS handshake on a blocking socket (timeouts set by the
    /// caller). A peer that speaks plaintext blkrep is named as such.
    pub fn accept(&self, sock: &mut TcpStream) -> Result<rustls::Connection, TlsError> {
        let mut first = [0u8; 8];
        if let Ok(n) = sock.peek(&mut first) {
            if n == first.len() && first == LINK_MAGIC {
                return Err(TlsError::Handshake(
                    "the peer speaks plaintext (its configuration has insecure = true); this \
                     node requires TLS"
                        .into(),
                ));
            }
        }
        let conn = ServerConnection::new(self.server.clone())
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        handshake(conn.into(), sock)
    }

    /// Run the client side of the TLS handshake on a blocking socket.
    pub fn connect(&self, sock: &mut TcpStream) -> Result<rustls::Connection, TlsError> {
        let name = ServerName::try_from(SERVER_NAME).expect("static name");
        let conn = ClientConnection::new(self.client.clone(), name)
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        handshake(conn.into(), sock)
    }
}

fn handshake(
    mut conn: rustls::Connection,
    sock: &mut TcpStream,
) -> Result<rustls::Connection, TlsError> {
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(sock) {
            // Tell the peer why, when we can (an alert is already queued).
            let _ = conn.write_tls(sock);
            return Err(TlsError::Handshake(describe(&e)));
        }
    }
    // Let the last flight out (the client's Finished).
    while conn.wants_write() {
        conn.write_tls(sock)
            .map_err(|e| TlsError::Handshake(describe(&e)))?;
    }
    // Unlimited buffers: the event loop drains them after every message.
    conn.set_buffer_limit(None);
    Ok(conn)
}

fn describe(e: &std::io::Error) -> String {
    if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(o))) =
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
    {
        return format!("TLS handshake failed: {}", o.0);
    }
    let s = e.to_string();
    if s.contains("InvalidContentType") || s.contains("corrupt message") {
        return format!("TLS handshake failed: {s} (the peer does not speak TLS)");
    }
    format!("TLS handshake failed: {s}")
}

/// A blocking stream through an established TLS connection (for the link handshake).
pub struct TlsStream<'a> {
    /// The TLS state.
    pub conn: &'a mut rustls::Connection,
    /// The socket.
    pub sock: &'a mut TcpStream,
}

impl Read for TlsStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                r => return r,
            }
            while self.conn.wants_write() {
                self.conn.write_tls(self.sock)?;
            }
            if self.conn.read_tls(self.sock)? == 0 {
                return Ok(0);
            }
            self.conn
                .process_new_packets()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        }
    }
}

impl Write for TlsStream<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.conn.writer().write(buf)?;
        self.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(self.sock)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn write_key(dir: &Path, node: &str) -> Fingerprint {
        let k = keygen(node).unwrap();
        std::fs::write(dir.join(format!("{node}.crt")), &k.cert_pem).unwrap();
        std::fs::write(dir.join(format!("{node}.key")), &k.key_pem).unwrap();
        k.fingerprint
    }

    fn setup(dir: &Path, node: &str, own: Fingerprint, peer: Fingerprint) -> TlsSetup {
        TlsSetup::load(&TlsFiles {
            cert: &dir.join(format!("{node}.crt")),
            key: &dir.join(format!("{node}.key")),
            own,
            peer,
        })
        .unwrap()
    }

    fn tmp(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("blkrep-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Handshake a listener with `server` against a dialer with `client`; both results.
    fn pair(server: TlsSetup, client: TlsSetup) -> (Result<(), String>, Result<(), String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let r = server.accept(&mut s).map_err(|e| e.to_string());
            r.and_then(|mut c| {
                let mut st = TlsStream {
                    conn: &mut c,
                    sock: &mut s,
                };
                let mut b = [0u8; 5];
                st.read_exact(&mut b).map_err(|e| e.to_string())?;
                assert_eq!(&b, b"hello");
                Ok(())
            })
        });
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let rc = client.connect(&mut s).map_err(|e| e.to_string());
        let rc = rc.and_then(|mut c| {
            let mut st = TlsStream {
                conn: &mut c,
                sock: &mut s,
            };
            st.write_all(b"hello").map_err(|e| e.to_string())
        });
        (t.join().unwrap(), rc)
    }

    #[test]
    fn pinned_peers_connect_and_strangers_do_not() {
        let d = tmp("pin");
        let a = write_key(&d, "a");
        let b = write_key(&d, "b");
        let c = write_key(&d, "c");
        let (s, cl) = pair(setup(&d, "a", a, b), setup(&d, "b", b, a));
        assert_eq!(s, Ok(()));
        assert_eq!(cl, Ok(()));
        // A dialer with another key: the listener refuses it by its pin.
        let (s, _) = pair(setup(&d, "a", a, b), setup(&d, "c", c, a));
        let e = s.unwrap_err();
        assert!(e.contains("pins"), "{e}");
        // A listener with another key: the dialer refuses it by its pin.
        let (_, cl) = pair(setup(&d, "c", c, b), setup(&d, "b", b, a));
        let e = cl.unwrap_err();
        assert!(e.contains("pins"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn own_certificate_must_match_its_fingerprint() {
        let d = tmp("own");
        let a = write_key(&d, "a");
        let b = write_key(&d, "b");
        let e = TlsSetup::load(&TlsFiles {
            cert: &d.join("a.crt"),
            key: &d.join("a.key"),
            own: b,
            peer: a,
        })
        .unwrap_err();
        assert!(matches!(e, TlsError::OwnPin { .. }), "{e}");
        // A key that does not belong to the certificate.
        let e = TlsSetup::load(&TlsFiles {
            cert: &d.join("a.crt"),
            key: &d.join("b.key"),
            own: a,
            peer: b,
        })
        .unwrap_err();
        assert!(e.to_string().contains("does not go with"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn fingerprints_parse_in_both_spellings() {
        let f = Fingerprint::of(b"x");
        assert_eq!(Fingerprint::parse(&f.to_string()).unwrap(), f);
        let openssl: Vec<String> = f.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(Fingerprint::parse(&openssl.join(":")).unwrap(), f);
        assert!(Fingerprint::parse("sha256:abcd").is_err());
        assert!(Fingerprint::parse(&"zz".repeat(32)).is_err());
    }
}
