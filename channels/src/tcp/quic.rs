//! The QUIC transport of the direct channel: the same hello/reply handshake, framing, reader and
//! connection rule as over TCP, carried by one bidirectional QUIC stream per pair (quinn over
//! one UDP socket per rank, TLS 1.3), with peers that authenticate each other by pinning.
//!
//! ```text
//!   rank A: cert_A (fresh, self-signed)        rendezvous (token-gated)        rank B: cert_B
//!     register  sha256(cert_A), udp_A ───────────▶ table ◀─────────── sha256(cert_B), udp_B
//!     connect(udp_B) ── TLS 1.3, mutual auth: A accepts only sha256(cert_B), B only a job
//!                       member's fingerprint, then (after the hello names A) only sha256(cert_A)
//!     open_bi ── hello / reply / frames, exactly as on a TCP connection ──▶
//! ```
//!
//! **Pinning.** Each rank makes a new key pair and self-signed certificate when it binds
//! ([`QuicBinding::bind`]) and publishes the certificate's SHA-256 [`Fingerprint`] with its
//! registration; the rendezvous hands the table only to ranks holding the job's token. A
//! client verifies the server's certificate by its fingerprint alone (the one published for the
//! rank it dials; names and chains mean nothing here), a server requires a client certificate
//! (mutual TLS) whose fingerprint is one of the job's, and the acceptor then checks that it is
//! the fingerprint of the very rank the hello claims. The TLS 1.3 handshake signatures are
//! still verified (RFC 8446 §4.4.3), so presenting somebody else's certificate without its key
//! fails. A process without the job's token cannot learn the table and so cannot be pinned.
//!
//! **Punching.** Both ranks of a pair first send a few one-byte datagrams from the endpoint's
//! socket to the peer's candidates (through a duplicate of the socket's descriptor, so they
//! leave from the port the NAT mapped for STUN and for the peer's packets): each NAT then has
//! an outbound mapping that lets the other's packets in. Then the lower rank connects (QUIC
//! client) and the higher rank accepts, so the lower rank sends the hello as on every other
//! path. quinn drops the one-byte datagrams as undecodable (a QUIC packet is never one byte,
//! RFC 9000 §17).
//!
//! **Closing.** Closing a QUIC connection discards what the peer has received but not yet
//! read (and what was not sent yet), unlike closing a TCP socket, whose FIN comes after the
//! data. So on shutdown the endpoint finishes each stream (a FIN after the data) and lingers,
//! bounded by [`LINGER`], per connection until either the peer has read to that FIN and closed
//! the connection itself (a peer's reader ends at the FIN, which drops its halves and so
//! closes the connection), or the peer is closing too: it has acknowledged our data and its
//! own FIN has arrived (then it reads no more anyway, and neither side waits for the other);
//! see [`Quic::linger`]. Only then does it close the endpoint.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::{Error, Result};

/// ALPN protocol id of the channel (RFC 7301), so that a QUIC endpoint of another protocol
/// is refused during the handshake.
const ALPN: &[u8] = b"fmi-direct/1";
/// The name a client asks for; certificates are pinned by fingerprint, so it is not checked.
const SERVER_NAME: &str = "fmi";
/// How long shutdown waits for peers to acknowledge the data written to them.
pub(super) const LINGER: Duration = Duration::from_secs(2);
/// The one-byte datagram that opens a NAT mapping (not a QUIC packet; see the module docs).
const PUNCH_DATAGRAM: [u8; 1] = [0];

/// SHA-256 of a rank's DER certificate, as published at the rendezvous.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// The text is not 64 hexadecimal digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a certificate fingerprint is 64 hexadecimal digits (SHA-256)")]
pub struct BadFingerprint;

impl FromStr for Fingerprint {
    type Err = BadFingerprint;

    fn from_str(s: &str) -> std::result::Result<Fingerprint, BadFingerprint> {
        let s = s.as_bytes();
        if s.len() != 64 {
            return Err(BadFingerprint);
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
            let hex = std::str::from_utf8(pair).map_err(|_| BadFingerprint)?;
            *o = u8::from_str_radix(hex, 16).map_err(|_| BadFingerprint)?;
        }
        Ok(Fingerprint(out))
    }
}

/// A rank's QUIC socket and fresh identity, bound before the peer table is known so that its
/// address and fingerprint can be published (see [`TcpChannel::start_quic`](super::TcpChannel::start_quic)).
pub struct QuicBinding {
    socket: std::net::UdpSocket,
    addr: SocketAddr,
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    fingerprint: Fingerprint,
}

impl QuicBinding {
    /// Binds a UDP socket at `addr` (port 0: any) and makes this rank's certificate.
    pub fn bind(addr: SocketAddr) -> Result<QuicBinding> {
        let socket = std::net::UdpSocket::bind(addr).map_err(|e| Error::Config {
            path: None,
            detail: format!("quic transport: cannot bind udp {addr}: {e}"),
        })?;
        QuicBinding::from_socket(socket)
    }

    /// Takes a bound UDP socket (for example the one STUN learnt the mapping of, so that the
    /// public address it reported is this transport's) and makes this rank's certificate.
    pub fn from_socket(socket: std::net::UdpSocket) -> Result<QuicBinding> {
        let failed = |detail: String| Error::Config { path: None, detail };
        let addr = socket
            .local_addr()
            .map_err(|e| failed(format!("quic transport: udp socket has no address: {e}")))?;
        let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])
            .map_err(|e| failed(format!("quic transport: cannot make a certificate: {e}")))?;
        let cert = certified.cert.der().clone();
        let key = PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der());
        let fingerprint = Fingerprint::of(&cert);
        Ok(QuicBinding {
            socket,
            addr,
            cert,
            key,
            fingerprint,
        })
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The fingerprint of this rank's certificate, to publish at the rendezvous.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}

impl fmt::Debug for QuicBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The private key stays out of logs.
        f.debug_struct("QuicBinding")
            .field("addr", &self.addr)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// What a rank published about its QUIC endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuicPeer {
    /// Where to reach it: first its announced (private) address, then further candidates
    /// (its STUN-learnt public mapping). Dialed directly: the first; punched: all.
    pub addrs: Vec<SocketAddr>,
    /// Its certificate's fingerprint: the only certificate accepted from it.
    pub fingerprint: Fingerprint,
}

/// The QUIC side of a started endpoint.
pub(super) struct Quic {
    pub(super) endpoint: quinn::Endpoint,
    /// A duplicate of the endpoint's socket descriptor, for punch datagrams.
    raw: std::net::UdpSocket,
    pub(super) peers: Vec<QuicPeer>,
    identity: (CertificateDer<'static>, PrivatePkcs8KeyDer<'static>),
    provider: Arc<CryptoProvider>,
    transport: Arc<quinn::TransportConfig>,
}

fn tls_error(e: impl fmt::Display) -> Error {
    Error::Config {
        path: None,
        detail: format!("quic transport: tls setup: {e}"),
    }
}

/// Transport settings: keep-alives hold NAT mappings open and a silent peer is lost after
/// the idle timeout (like a broken TCP connection); windows large enough for bulk messages.
fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        30_000,
    ))));
    // Punch Initials may be dropped until the peer's NAT has its mapping: retransmit soon.
    t.initial_rtt(Duration::from_millis(100));
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
    t.receive_window(quinn::VarInt::from_u32(32 << 20));
    t.send_window(32 << 20);
    // One bidirectional stream per connection; nothing else.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t
}

impl Quic {
    /// Wraps the bound socket in an endpoint that accepts (as a server requiring a job
    /// member's certificate) and connects (as a client pinning each peer's).
    pub(super) fn start(binding: QuicBinding, peers: Vec<QuicPeer>) -> Result<Quic> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let raw = binding
            .socket
            .try_clone()
            .map_err(|e| tls_error(format!("cannot duplicate the udp socket: {e}")))?;
        let transport = Arc::new(transport_config());
        let allowed: Vec<Fingerprint> = peers.iter().map(|p| p.fingerprint).collect();
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_error)?
            .with_client_cert_verifier(Arc::new(Pinned {
                allowed,
                provider: Arc::clone(&provider),
            }))
            .with_single_cert(
                vec![binding.cert.clone()],
                PrivateKeyDer::Pkcs8(binding.key.clone_key()),
            )
            .map_err(tls_error)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicServerConfig::try_from(tls).map_err(tls_error)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::clone(&transport));
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            binding.socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| tls_error(format!("cannot start the endpoint: {e}")))?;
        Ok(Quic {
            endpoint,
            raw,
            peers,
            identity: (binding.cert, binding.key),
            provider,
            transport,
        })
    }

    /// A client configuration that accepts only `peer`'s certificate.
    fn client_config(&self, peer: usize) -> io::Result<quinn::ClientConfig> {
        let other = |e: String| io::Error::other(e);
        let verifier = Pinned {
            allowed: vec![self.peers[peer].fingerprint],
            provider: Arc::clone(&self.provider),
        };
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| other(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(
                vec![self.identity.0.clone()],
                PrivateKeyDer::Pkcs8(self.identity.1.clone_key()),
            )
            .map_err(|e| other(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| other(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::clone(&self.transport));
        Ok(config)
    }

    /// Connects to `peer` at `addr` and opens the pair's stream (the caller bounds the time).
    pub(super) async fn connect(&self, peer: usize, addr: SocketAddr) -> io::Result<Stream> {
        let config = self.client_config(peer)?;
        let connecting = self
            .endpoint
            .connect_with(config, addr, SERVER_NAME)
            .map_err(io::Error::other)?;
        let conn = connecting.await.map_err(classify)?;
        let (send, recv) = conn.open_bi().await.map_err(classify)?;
        Ok(Stream::Quic { send, recv, conn })
    }

    /// Sends one punch datagram to each of `to` (errors ignored: a punch is best effort).
    pub(super) fn punch(&self, to: &[SocketAddr]) {
        for addr in to {
            let _ = self.raw.send_to(&PUNCH_DATAGRAM, addr);
        }
    }

    /// Waits until every connection in `closing` has settled (see [`Closing::settle`]) or
    /// [`LINGER`] has passed, then closes the endpoint.
    pub(super) async fn linger(endpoint: quinn::Endpoint, closing: Vec<Closing>) {
        let settled = futures::future::join_all(closing.into_iter().map(Closing::settle));
        let _ = tokio::time::timeout(LINGER, settled).await;
        endpoint.close(quinn::VarInt::from_u32(0), b"closed");
        let _ = tokio::time::timeout(Duration::from_millis(200), endpoint.wait_idle()).await;
    }
}

/// A TLS failure (either side rejected the other's certificate: not the one pinned) becomes
/// [`io::ErrorKind::PermissionDenied`], which retrying will not fix; anything else stays as
/// quinn reports it.
fn classify(e: quinn::ConnectionError) -> io::Error {
    // TLS alerts travel as QUIC CRYPTO_ERROR codes 0x0100..=0x01ff (RFC 9001 §4.8).
    let crypto = |code: quinn::TransportErrorCode| (0x100..=0x1ff).contains(&u64::from(code));
    let denied = match &e {
        quinn::ConnectionError::TransportError(t) => crypto(t.code),
        quinn::ConnectionError::ConnectionClosed(c) => crypto(c.error_code),
        _ => false,
    };
    if denied {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("quic handshake rejected (certificate not the pinned one): {e}"),
        )
    } else {
        e.into()
    }
}

/// A pair's QUIC connection at shutdown: our stream finished, the peer's still open.
pub(super) struct Closing {
    pub(super) send: quinn::SendStream,
    pub(super) recv: Option<quinn::RecvStream>,
    pub(super) conn: quinn::Connection,
}

impl Closing {
    /// Resolves once the peer has closed the connection (it read our FIN), or once it has
    /// acknowledged all our data and finished its own stream (it is closing as well).
    async fn settle(self) {
        let Closing { send, recv, conn } = self;
        let peer_closing = async move {
            let _ = send.stopped().await;
            if let Some(mut recv) = recv {
                // Up to the peer's FIN (or an error); what it still sent is for a closed rank.
                while let Ok(Some(_)) = recv.read_chunk(1 << 16, false).await {}
            }
        };
        let closed = conn.closed();
        futures::pin_mut!(peer_closing, closed);
        futures::future::select(peer_closing, closed).await;
    }
}

/// The fingerprint of the certificate the peer of `conn` presented.
pub(super) fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| Fingerprint::of(c))
}

/// Accepts exactly the certificates whose fingerprints are listed, as client or server
/// verifier. Handshake signatures are verified as usual, so the peer must hold the key.
#[derive(Debug)]
struct Pinned {
    allowed: Vec<Fingerprint>,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn check(&self, end_entity: &CertificateDer<'_>) -> std::result::Result<(), rustls::Error> {
        let seen = Fingerprint::of(end_entity);
        if self.allowed.contains(&seen) {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
}

/// The handshake-signature check both verifier roles share (pinning decides which certificate;
/// the signature must still be valid for it).
type SignatureCheck = fn(
    &[u8],
    &CertificateDer<'_>,
    &DigitallySignedStruct,
    &rustls::crypto::WebPkiSupportedAlgorithms,
) -> std::result::Result<HandshakeSignatureValid, rustls::Error>;

impl Pinned {
    fn signature(
        &self,
        check: SignatureCheck,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        check(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(verify_tls12_signature, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(verify_tls13_signature, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(verify_tls12_signature, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(verify_tls13_signature, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A pair's byte stream before it is split: a TCP connection (direct, punched or relayed) or
/// the one bidirectional stream of a QUIC connection.
pub(super) enum Stream {
    Tcp(TcpStream),
    Quic {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        conn: quinn::Connection,
    },
}

impl Stream {
    /// Sets `TCP_NODELAY` and, on a TCP connection whose peer is on this host, send and receive
    /// buffers of `local_buffer` bytes (0: leave the kernel's autotuning; see
    /// `TcpConfig::local_socket_buffer`). Nothing for QUIC.
    pub(super) fn tune(&self, local_buffer: usize) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_nodelay(true)?;
                if local_buffer > 0 && same_host(s) {
                    let socket = socket2::SockRef::from(s);
                    socket.set_send_buffer_size(local_buffer)?;
                    socket.set_recv_buffer_size(local_buffer)?;
                }
                Ok(())
            }
            Stream::Quic { .. } => Ok(()),
        }
    }

    /// The certificate fingerprint the peer presented (QUIC only).
    pub(super) fn peer_fingerprint(&self) -> Option<Fingerprint> {
        match self {
            Stream::Tcp(_) => None,
            Stream::Quic { conn, .. } => peer_fingerprint(conn),
        }
    }

    /// Whether this QUIC connection was closed because a side rejected the other's
    /// certificate (in TLS 1.3 the client finishes before the server has checked its
    /// certificate, so a client learns of its rejection only afterwards).
    pub(super) fn rejected(&self) -> bool {
        match self {
            Stream::Tcp(_) => false,
            Stream::Quic { conn, .. } => conn
                .close_reason()
                .is_some_and(|e| classify(e).kind() == io::ErrorKind::PermissionDenied),
        }
    }

    /// Ends our direction after a refusal so that the reply reaches the peer: a QUIC
    /// connection dropped at once would discard it (a TCP socket's kernel sends it anyway).
    /// Waits at most one second.
    pub(super) async fn finish(&mut self) {
        if let Stream::Quic { send, .. } = self {
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
        }
    }

    pub(super) fn is_quic(&self) -> bool {
        matches!(self, Stream::Quic { .. })
    }

    pub(super) fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            // Dropping both halves closes the connection.
            Stream::Quic { send, recv, conn } => {
                (ReadHalf::Quic(recv), WriteHalf::Quic(send, conn))
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Quic { recv, .. } => Pin::new(recv).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Quic { send, .. } => Pin::new(send).poll_write(cx, buf).map_err(Into::into),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Quic { send, .. } => Pin::new(send).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Quic { send, .. } => Pin::new(send).poll_shutdown(cx),
        }
    }
}

/// The receiving half of a pair's connection.
pub(super) enum ReadHalf {
    Tcp(OwnedReadHalf),
    Quic(quinn::RecvStream),
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Quic(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

/// The sending half of a pair's connection.
pub(super) enum WriteHalf {
    Tcp(OwnedWriteHalf),
    Quic(quinn::SendStream, quinn::Connection),
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Quic(s, _) => Pin::new(s).poll_write(cx, buf).map_err(Into::into),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            WriteHalf::Quic(s, _) => {
                // quinn copies into its send buffer: one slice at a time costs nothing extra.
                let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b);
                Pin::new(s).poll_write(cx, first).map_err(Into::into)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        matches!(self, WriteHalf::Tcp(_))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Tcp(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Quic(s, _) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Quic(s, _) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Whether `stream`'s peer is on this host: a loopback address, or the address this end has.
fn same_host(stream: &tokio::net::TcpStream) -> bool {
    match (stream.local_addr(), stream.peer_addr()) {
        (Ok(local), Ok(peer)) => peer.ip().is_loopback() || peer.ip() == local.ip(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_print_and_parse() {
        let f = Fingerprint::of(b"certificate");
        let text = f.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<Fingerprint>(), Ok(f));
        assert_eq!("zz".repeat(32).parse::<Fingerprint>(), Err(BadFingerprint));
        assert_eq!("ab".parse::<Fingerprint>(), Err(BadFingerprint));
    }

    /// A loopback connection gets the same-host buffers; 0 leaves the kernel's choice.
    #[tokio::test]
    async fn same_host_connections_get_the_small_buffers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let dialed = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert!(same_host(&dialed) && same_host(&accepted));
        let untouched = socket2::SockRef::from(&accepted)
            .recv_buffer_size()
            .expect("get");
        let accepted = Stream::Tcp(accepted);
        accepted.tune(0).expect("tune 0");
        let Stream::Tcp(accepted) = accepted else {
            unreachable!()
        };
        assert_eq!(
            socket2::SockRef::from(&accepted)
                .recv_buffer_size()
                .expect("get"),
            untouched
        );
        let dialed = Stream::Tcp(dialed);
        dialed.tune(64 * 1024).expect("tune");
        let Stream::Tcp(dialed) = dialed else {
            unreachable!()
        };
        let socket = socket2::SockRef::from(&dialed);
        // Linux doubles the value it is given (for its bookkeeping) and reports that.
        for got in [
            socket.recv_buffer_size().expect("rcv"),
            socket.send_buffer_size().expect("snd"),
        ] {
            assert!((64 * 1024..=128 * 1024).contains(&got), "buffer {got}");
        }
        assert!(dialed.nodelay().expect("nodelay"));
    }
}
