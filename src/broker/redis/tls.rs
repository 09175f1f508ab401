//! TLS to Redis (`rediss://`): the certificates, read and checked at
//! start; the TLS stream the subscription splits between its two threads;
//! and TLS failures in words that name the cause.
//!
//! The command connections and the cluster client are redis-rs's, which
//! speaks TLS itself (its `tls-rustls` feature): [`RedisTls::apply`] and
//! [`RedisTls::cluster`] give them the CA and client certificate. The
//! subscription speaks RESP on a socket of its own, read by the subscriber
//! thread while a writer thread writes to it (see `subscription.rs`). A
//! plain socket is split with `try_clone`; a TLS session cannot be, so
//! [`handshake`] shares one `rustls::ClientConnection` between the two
//! halves under a lock, and each half does its raw I/O on its own clone of
//! the socket:
//! - the reader waits for ciphertext *without* the lock (it may wait for
//!   ever), then under the lock feeds it to rustls, takes the plaintext,
//!   and sends what rustls wants to send back (an alert, a key update);
//! - the writer, under the lock, hands rustls the plaintext and writes the
//!   records it makes to the socket.
//!
//! So the lock is held for memory work and short writes, never across a
//! wait for Redis.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::warn;
use redis::cluster::ClusterClientBuilder;
use redis::{ClientTlsConfig, ConnectionAddr, ConnectionInfo, TlsCertificates};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::sync::{Mutex, lock};

/// The TLS options (`--redis-ca-file`, ...), as given.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub insecure: bool,
}

/// How this instance speaks TLS to Redis: for its own subscription
/// (`config`) and for redis-rs's connections (`certificates`, `params`).
#[derive(Clone)]
pub struct RedisTls {
    config: Arc<ClientConfig>,
    certificates: TlsCertificates,
    /// An address with redis-rs's form of `certificates`, made once at
    /// start: [`RedisTls::apply`] copies them from it.
    template: ConnectionAddr,
    insecure: bool,
}

impl fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTls")
            .field("insecure", &self.insecure)
            .finish_non_exhaustive()
    }
}

impl RedisTls {
    /// Reads and checks the files; an error names the option and the
    /// file. Warns when certificates are not checked, at every start.
    pub fn load(files: &TlsFiles) -> Result<RedisTls, String> {
        let root_cert = files
            .ca_file
            .as_deref()
            .map(|path| read(path, "--redis-ca-file"))
            .transpose()?;
        let mut roots = RootCertStore::empty();
        if let (Some(pem), Some(path)) = (&root_cert, &files.ca_file) {
            let shown = path.display();
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--redis-ca-file {shown}: not a PEM certificate file: {e}"))?;
            if certs.is_empty() {
                return Err(format!(
                    "--redis-ca-file {shown}: no certificate in it (a PEM file of \
                     -----BEGIN CERTIFICATE----- blocks is expected)"
                ));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    format!("--redis-ca-file {shown}: a certificate in it cannot be used: {e}")
                })?;
            }
        } else {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() && !files.insecure {
                return Err(
                    "rediss://: this machine has no system root certificates to check Redis's \
                     certificate with: install them (ca-certificates), or give Redis's CA with \
                     --redis-ca-file"
                        .into(),
                );
            }
        }
        let client_tls = match (&files.client_cert_file, &files.client_key_file) {
            (Some(cert), Some(key)) => Some(ClientTlsConfig {
                client_cert: read(cert, "--redis-client-cert-file")?,
                client_key: read(key, "--redis-client-key-file")?,
            }),
            (None, None) => None,
            _ => {
                return Err(
                    "--redis-client-cert-file and --redis-client-key-file go together: give both \
                     (mutual TLS), or neither"
                        .into(),
                );
            }
        };
        let builder = ClientConfig::builder().with_root_certificates(roots);
        let mut config = match &client_tls {
            None => builder.with_no_client_auth(),
            Some(client) => {
                let (cert, key) = (
                    files.client_cert_file.as_deref().unwrap_or(Path::new("")),
                    files.client_key_file.as_deref().unwrap_or(Path::new("")),
                );
                let chain = CertificateDer::pem_slice_iter(&client.client_cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        format!(
                            "--redis-client-cert-file {}: not a PEM certificate file: {e}",
                            cert.display()
                        )
                    })?;
                if chain.is_empty() {
                    return Err(format!(
                        "--redis-client-cert-file {}: no certificate in it",
                        cert.display()
                    ));
                }
                let private = PrivateKeyDer::from_pem_slice(&client.client_key).map_err(|e| {
                    format!(
                        "--redis-client-key-file {}: no private key in it: {e}",
                        key.display()
                    )
                })?;
                builder.with_client_auth_cert(chain, private).map_err(|e| {
                    format!(
                        "--redis-client-cert-file {} and --redis-client-key-file {}: {e} \
                             (is the key the certificate's?)",
                        cert.display(),
                        key.display()
                    )
                })?
            }
        };
        if files.insecure {
            warn!(
                "--redis-tls-insecure: Redis's certificate is NOT checked; anyone between this \
                 server and Redis can read and change the chat's traffic and its password. \
                 For a test only: give Redis's CA with --redis-ca-file instead"
            );
            let provider = config.crypto_provider().clone();
            config
                .dangerous()
                .set_certificate_verifier(Arc::new(NoVerification(provider)));
        }
        let certificates = TlsCertificates {
            client_tls,
            root_cert,
        };
        // redis-rs parses the same files its own way: once, here.
        let template = redis::Client::build_with_tls("rediss://localhost", certificates.clone())
            .map_err(|e| format!("the TLS options: {e}"))?
            .get_connection_info()
            .addr()
            .clone();
        Ok(RedisTls {
            config: Arc::new(config),
            certificates,
            template,
            insecure: files.insecure,
        })
    }

    /// `info` with the certificates, for redis-rs; a `redis://` one is
    /// left as it is.
    pub fn apply(&self, info: &ConnectionInfo) -> ConnectionInfo {
        match info.addr() {
            ConnectionAddr::TcpTls { host, port, .. } => {
                let tls_params = match &self.template {
                    ConnectionAddr::TcpTls { tls_params, .. } => tls_params.clone(),
                    _ => None,
                };
                info.clone().set_addr(ConnectionAddr::TcpTls {
                    host: host.clone(),
                    port: *port,
                    insecure: self.insecure,
                    tls_params,
                })
            }
            _ => info.clone(),
        }
    }

    /// A cluster client builder with the certificates.
    pub fn cluster(&self, builder: ClusterClientBuilder) -> ClusterClientBuilder {
        let builder = builder.certs(self.certificates.clone());
        if self.insecure {
            builder.tls(redis::TlsMode::Insecure)
        } else {
            builder
        }
    }
}

fn read(path: &Path, option: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{option} {}: cannot read it: {e}", path.display()))
}

/// `--redis-tls-insecure`: any certificate is taken. The handshake's
/// signatures are still checked (they prove nothing without a trusted
/// certificate, but cost nothing).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
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
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS session both halves share.
type Session = Arc<Mutex<ClientConnection>>;

/// Does the TLS handshake with `host` on `socket` (its timeouts bound it),
/// and splits the session into a read half and a write half.
pub fn handshake(
    tls: &RedisTls,
    host: &str,
    socket: TcpStream,
) -> io::Result<(TlsReader, TlsWriter)> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| io::Error::other(format!("{host} is not a host name for TLS: {e}")))?;
    let mut session = ClientConnection::new(tls.config.clone(), name).map_err(io::Error::other)?;
    let mut handshaking = &socket;
    while session.is_handshaking() {
        session.complete_io(&mut handshaking)?;
    }
    let session = Arc::new(Mutex::new(session));
    let reader = TlsReader {
        session: session.clone(),
        socket: socket.try_clone()?,
        incoming: vec![0; 16 * 1024],
        start: 0,
        end: 0,
    };
    Ok((reader, TlsWriter { session, socket }))
}

/// Sends what the session has to send (records, alerts).
fn send_out(session: &mut ClientConnection, mut socket: &TcpStream) -> io::Result<()> {
    while session.wants_write() {
        session.write_tls(&mut socket)?;
    }
    Ok(())
}

/// The read half: the subscriber thread's.
pub struct TlsReader {
    session: Session,
    socket: TcpStream,
    /// Ciphertext read from the socket and not yet taken by rustls
    /// (`incoming[start..end]`): rustls takes no more while its plaintext
    /// buffer is full.
    incoming: Vec<u8>,
    start: usize,
    end: usize,
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut session = lock(&self.session);
                while self.start < self.end && session.wants_read() {
                    let taken = session.read_tls(&mut &self.incoming[self.start..self.end])?;
                    self.start += taken;
                    if let Err(e) = session.process_new_packets() {
                        // rustls queued an alert that tells Redis why.
                        let _ = send_out(&mut session, &self.socket);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                }
                send_out(&mut session, &self.socket)?;
                match session.reader().read(out) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // Plaintext, or the end (Redis's close_notify).
                    done => return done,
                }
            }
            // Nothing to give: wait for Redis, without the lock.
            if self.start == self.end {
                self.start = 0;
                self.end = (&self.socket).read(&mut self.incoming)?;
                if self.end == 0 {
                    return Ok(0);
                }
            }
        }
    }
}

/// The write half: the connection's writer thread's (and, while the
/// connection is set up, the opening thread's).
pub struct TlsWriter {
    session: Session,
    socket: TcpStream,
}

impl Write for TlsWriter {
    fn write(&mut self, plaintext: &[u8]) -> io::Result<usize> {
        let mut session = lock(&self.session);
        let written = session.writer().write(plaintext)?;
        send_out(&mut session, &self.socket)?;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        send_out(&mut lock(&self.session), &self.socket)
    }
}

/// A TLS failure as rustls words it, in words that name the cause and
/// what to do: (the cause, the advice). `None` for an error that is not
/// about TLS.
///
/// It reads the error's text: redis-rs keeps rustls's error only as text
/// (its `source()` skips it), and the subscription's errors are worded the
/// same way. The unit tests below pin rustls's wording.
pub fn cause(error: &str) -> Option<(&'static str, &'static str)> {
    let has = |text: &str| error.contains(text);
    Some(if has("UnknownIssuer") {
        (
            "certificate not trusted",
            "Redis's certificate is not signed by a CA this server trusts: give the CA that \
             signed it with --redis-ca-file (PEM)",
        )
    } else if has("certificate expired") || has("Expired") {
        (
            "certificate expired",
            "Redis's certificate is past its end date: renew it on the Redis server",
        )
    } else if has("certificate not valid yet") || has("NotValidYet") {
        (
            "certificate not valid yet",
            "Redis's certificate starts in the future: check this machine's clock",
        )
    } else if has("not valid for name") || has("NotValidForName") {
        (
            "certificate for another host name",
            "Redis's certificate does not name the host in the URL: connect with a name it \
             lists (subjectAltName)",
        )
    } else if has("invalid peer certificate") {
        (
            "certificate refused",
            "Redis's certificate cannot be checked",
        )
    } else if has("CertificateRequired") {
        (
            "client certificate required",
            "this Redis wants a client certificate (tls-auth-clients): give \
             --redis-client-cert-file and --redis-client-key-file",
        )
    } else if has("received fatal alert: BadCertificate")
        || has("received fatal alert: UnknownCA")
        || has("received fatal alert: CertificateUnknown")
        || has("received fatal alert: DecryptError")
    {
        (
            "client certificate refused",
            "Redis did not accept --redis-client-cert-file: it must be signed by a CA in Redis's \
             tls-ca-cert-file",
        )
    } else if has("corrupt message") || has("InvalidContentType") {
        (
            "not a TLS port",
            "Redis answered without TLS: point rediss:// at its tls-port, or use redis:// for a \
             plain port",
        )
    } else if has("peer is incompatible") || has("received fatal alert: HandshakeFailure") {
        (
            "no TLS version or cipher in common",
            "Redis and this server share no TLS version or cipher (this server speaks TLS 1.2 \
             and 1.3)",
        )
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{AlertDescription, CertificateError, Error};

    fn text(e: Error) -> String {
        // As it reaches the logs: rustls's error inside an I/O error.
        redis::RedisError::from(io::Error::new(io::ErrorKind::InvalidData, e)).to_string()
    }

    fn cause_of(e: Error) -> &'static str {
        let shown = text(e);
        cause(&shown)
            .unwrap_or_else(|| panic!("no cause in {shown}"))
            .0
    }

    #[test]
    fn each_certificate_failure_is_named() {
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(2_000_000_000));
        let before = UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_000_000_000));
        for (error, named) in [
            (CertificateError::UnknownIssuer, "certificate not trusted"),
            (CertificateError::Expired, "certificate expired"),
            (
                CertificateError::ExpiredContext {
                    time: at,
                    not_after: before,
                },
                "certificate expired",
            ),
            (
                CertificateError::NotValidYetContext {
                    time: before,
                    not_before: at,
                },
                "certificate not valid yet",
            ),
            (
                CertificateError::NotValidForNameContext {
                    expected: ServerName::try_from("127.0.0.1").unwrap(),
                    presented: vec!["DnsName(\"other.example\")".into()],
                },
                "certificate for another host name",
            ),
            (CertificateError::BadSignature, "certificate refused"),
        ] {
            assert_eq!(cause_of(Error::InvalidCertificate(error)), named);
        }
    }

    #[test]
    fn what_redis_says_of_this_server_is_named() {
        assert_eq!(
            cause_of(Error::AlertReceived(AlertDescription::CertificateRequired)),
            "client certificate required"
        );
        assert_eq!(
            cause_of(Error::AlertReceived(AlertDescription::UnknownCA)),
            "client certificate refused"
        );
        assert_eq!(
            cause_of(Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            )),
            "not a TLS port"
        );
        assert_eq!(cause("Connection refused (os error 111)"), None);
    }

    #[test]
    fn a_redis_url_keeps_its_password_and_gets_the_certificates() {
        let tls = RedisTls::load(&TlsFiles::default()).unwrap();
        let url = crate::redis_url::RedisUrl::parse("rediss://:pw@redis.example.com:6380").unwrap();
        let info = tls.apply(url.connection_info());
        assert!(
            matches!(info.addr(), ConnectionAddr::TcpTls { host, port: 6380, insecure: false, .. } if host == "redis.example.com")
        );
        assert_eq!(info.redis_settings().password(), Some("pw"));
        let plain = crate::redis_url::RedisUrl::parse("redis://127.0.0.1").unwrap();
        assert!(matches!(
            tls.apply(plain.connection_info()).addr(),
            ConnectionAddr::Tcp(..)
        ));
    }

    #[test]
    fn unreadable_or_mismatched_files_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("pubsub-chat-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let files = |ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>| TlsFiles {
            ca_file: ca.map(Path::to_path_buf),
            client_cert_file: cert.map(Path::to_path_buf),
            client_key_file: key.map(Path::to_path_buf),
            insecure: false,
        };
        let e = RedisTls::load(&files(Some(&not_pem), None, None)).unwrap_err();
        assert!(
            e.contains("--redis-ca-file") && e.contains("no certificate in it"),
            "{e}"
        );
        let missing = dir.join("missing.pem");
        let e = RedisTls::load(&files(Some(&missing), None, None)).unwrap_err();
        assert!(e.contains("cannot read it"), "{e}");
        let e = RedisTls::load(&files(None, Some(&not_pem), None)).unwrap_err();
        assert!(e.contains("go together"), "{e}");
        let e = RedisTls::load(&files(None, Some(&not_pem), Some(&not_pem))).unwrap_err();
        assert!(e.contains("--redis-client-cert-file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
