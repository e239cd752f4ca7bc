//! STUN (RFC 5389) discovery of this host's public mapping, over our own UDP socket.
//!
//! A rank sends a Binding request from **one** UDP socket to each configured STUN server (coturn
//! in tests) and reads the `XOR-MAPPED-ADDRESS` of each answer: the address and port its NAT
//! gave that socket towards that server. If two servers (or two ports of one server) saw the
//! same mapping, the NAT maps endpoint-independently ("cone"), so hole punching can work; if
//! they saw different mappings, the NAT picks a new port per destination (symmetric, e.g. a
//! cloud NAT gateway or `MASQUERADE --random-fully`), so a punch towards the peer would go out
//! from a port the peer was never told about and the rank goes straight to the relay.
//!
//! The test uses UDP, the punch TCP: NATs that map one protocol per destination almost always
//! map the other the same way (Linux MASQUERADE does), which is what the NAT matrix checks.
//!
//! ```text
//!   one UDP socket ── Binding request (txid a) ─▶ STUN server 1 ─▶ XOR-MAPPED-ADDRESS m1
//!                 └── Binding request (txid b) ─▶ STUN server 2 ─▶ XOR-MAPPED-ADDRESS m2
//!   m1 == m2: endpoint-independent; m1 != m2: endpoint-dependent; one answer: unknown
//! ```
//! Requests are retransmitted (100 ms, doubling, at most 6 times each) until answered or the
//! overall timeout; answers are matched by transaction id and source address, anything else on
//! the socket is ignored.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytecodec::{DecodeExt, EncodeExt};
use stun_codec::rfc5389::attributes::{MappedAddress, XorMappedAddress};
use stun_codec::rfc5389::{methods::BINDING, Attribute};
use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder, TransactionId};
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// First retransmission interval of a Binding request; doubles after each.
const FIRST_RTO: Duration = Duration::from_millis(100);
/// Most transmissions of one request.
const MAX_SENDS: u32 = 6;

/// How a NAT maps one local socket towards different destinations (RFC 4787 terms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mapping {
    /// Every server saw the same public address and port ("cone", or no NAT): punching works.
    EndpointIndependent,
    /// Servers saw different public ports or addresses ("symmetric"): punching cannot work.
    EndpointDependent,
    /// Only one server answered, so the mapping type could not be compared.
    Unknown,
}

impl Mapping {
    /// Lowercase name, as printed in logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Mapping::EndpointIndependent => "endpoint-independent",
            Mapping::EndpointDependent => "endpoint-dependent",
            Mapping::Unknown => "unknown",
        }
    }

    /// Whether hole punching can work from behind this mapping (`Unknown` is given the chance).
    pub fn punchable(self) -> bool {
        !matches!(self, Mapping::EndpointDependent)
    }
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the STUN servers saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StunReport {
    /// The local address of the probing socket.
    pub local: SocketAddr,
    /// Each answering server and the public address it saw this socket come from, in the order
    /// the servers were given.
    pub observed: Vec<(SocketAddr, SocketAddr)>,
    /// The mapping type these observations show.
    pub mapping: Mapping,
}

impl StunReport {
    /// The public address the first answering server saw.
    pub fn public(&self) -> Option<SocketAddr> {
        self.observed.first().map(|&(_, m)| m)
    }
}

/// Why a probe found nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StunError {
    /// No server was given.
    #[error("no STUN server configured")]
    NoServers,
    /// The UDP socket could not be opened or used.
    #[error("STUN: UDP socket error: {0}")]
    Io(#[from] io::Error),
    /// No server answered in time.
    #[error("no STUN server answered within {waited:?} (asked {servers:?}); check the addresses and that UDP reaches them")]
    NoAnswer {
        /// The servers asked.
        servers: Vec<SocketAddr>,
        /// How long the probe waited.
        waited: Duration,
    },
}

/// Asks each of `servers` (at most 8 are used) for this host's mapping from one fresh UDP
/// socket, waiting at most `timeout` in all. Fails only if no server answered.
pub async fn probe(servers: &[SocketAddr], timeout: Duration) -> Result<StunReport, StunError> {
    let servers: Vec<SocketAddr> = servers.iter().copied().take(8).collect();
    let Some(first) = servers.first() else {
        return Err(StunError::NoServers);
    };
    let local: SocketAddr = match first {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    probe_from(&socket, &servers, timeout).await
}

/// Like [`probe`], from a socket the caller owns (for example the one a UDP transport will
/// punch from, so that the mapping learnt is that socket's).
pub async fn probe_from(
    socket: &UdpSocket,
    servers: &[SocketAddr],
    timeout: Duration,
) -> Result<StunReport, StunError> {
    if servers.is_empty() {
        return Err(StunError::NoServers);
    }
    let started = Instant::now();
    let end = started + timeout;
    let mut pending: Vec<Pending> = servers
        .iter()
        .map(|&server| Pending {
            server,
            txid: random_txid(),
            request: Vec::new(),
            sends: 0,
            next_send: started,
            rto: FIRST_RTO,
            mapped: None,
        })
        .collect();
    for p in &mut pending {
        p.request = encode_request(p.txid)?;
    }
    let mut buf = vec![0u8; 1500];
    // Each round either sends (bounded by MAX_SENDS per server), receives, or ends at `end`.
    loop {
        let now = Instant::now();
        if now >= end || pending.iter().all(|p| p.mapped.is_some()) {
            break;
        }
        for p in pending.iter_mut().filter(|p| p.mapped.is_none()) {
            if p.sends < MAX_SENDS && now >= p.next_send {
                if let Err(e) = socket.send_to(&p.request, p.server).await {
                    tracing::debug!(server = %p.server, error = %e, "stun: send failed");
                }
                p.sends += 1;
                p.next_send = now + p.rto;
                p.rto *= 2;
            }
        }
        let wake = pending
            .iter()
            .filter(|p| p.mapped.is_none() && p.sends < MAX_SENDS)
            .map(|p| p.next_send)
            .min()
            .unwrap_or(end)
            .min(end);
        match tokio::time::timeout_at(wake, socket.recv_from(&mut buf)).await {
            Err(_) => {}
            Ok(Err(e)) => {
                // E.g. an ICMP port unreachable reported on a later call: keep waiting for the
                // other servers.
                tracing::debug!(error = %e, "stun: receive failed");
                tokio::time::sleep_until(wake).await;
            }
            Ok(Ok((n, from))) => {
                if let Some((txid, mapped)) = decode_response(&buf[..n]) {
                    if let Some(p) = pending
                        .iter_mut()
                        .find(|p| p.txid == txid && p.server == from && p.mapped.is_none())
                    {
                        p.mapped = Some(mapped);
                    }
                }
            }
        }
    }
    let observed: Vec<(SocketAddr, SocketAddr)> = pending
        .iter()
        .filter_map(|p| p.mapped.map(|m| (p.server, m)))
        .collect();
    if observed.is_empty() {
        return Err(StunError::NoAnswer {
            servers: servers.to_vec(),
            waited: started.elapsed(),
        });
    }
    let mapping = classify(&observed);
    Ok(StunReport {
        local: socket.local_addr()?,
        observed,
        mapping,
    })
}

/// The mapping type shown by the addresses several servers saw.
pub fn classify(observed: &[(SocketAddr, SocketAddr)]) -> Mapping {
    let mut servers: Vec<SocketAddr> = observed.iter().map(|&(s, _)| s).collect();
    servers.sort();
    servers.dedup();
    if servers.len() < 2 {
        return Mapping::Unknown;
    }
    let first = observed[0].1;
    if observed.iter().all(|&(_, m)| m == first) {
        Mapping::EndpointIndependent
    } else {
        Mapping::EndpointDependent
    }
}

struct Pending {
    server: SocketAddr,
    txid: [u8; 12],
    request: Vec<u8>,
    sends: u32,
    next_send: Instant,
    rto: Duration,
    mapped: Option<SocketAddr>,
}

/// 96 random bits, from the standard library's randomly keyed hasher (no extra dependency;
/// transaction ids need to be unpredictable enough not to collide, not to be secret).
fn random_txid() -> [u8; 12] {
    let mut out = [0u8; 12];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let bytes = h.finish().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    out
}

fn encode_request(txid: [u8; 12]) -> io::Result<Vec<u8>> {
    let message: Message<Attribute> =
        Message::new(MessageClass::Request, BINDING, TransactionId::new(txid));
    MessageEncoder::new()
        .encode_into_bytes(message)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

/// The transaction id and mapped address of a Binding success response; `None` for anything
/// else (other classes or methods, undecodable datagrams).
fn decode_response(datagram: &[u8]) -> Option<([u8; 12], SocketAddr)> {
    let message = MessageDecoder::<Attribute>::new()
        .decode_from_bytes(datagram)
        .ok()?
        .ok()?;
    if message.class() != MessageClass::SuccessResponse || message.method() != BINDING {
        return None;
    }
    let mapped = message
        .get_attribute::<XorMappedAddress>()
        .map(XorMappedAddress::address)
        .or_else(|| {
            message
                .get_attribute::<MappedAddress>()
                .map(MappedAddress::address)
        })?;
    Some((*message.transaction_id().as_bytes(), mapped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classifies_by_comparing_servers() {
        let s1 = a("203.0.113.1:3478");
        let s2 = a("203.0.113.1:3479");
        let m = a("203.0.113.11:40000");
        let m2 = a("203.0.113.11:40001");
        assert_eq!(classify(&[(s1, m)]), Mapping::Unknown);
        assert_eq!(classify(&[(s1, m), (s1, m2)]), Mapping::Unknown);
        assert_eq!(classify(&[(s1, m), (s2, m)]), Mapping::EndpointIndependent);
        assert_eq!(classify(&[(s1, m), (s2, m2)]), Mapping::EndpointDependent);
        assert!(Mapping::Unknown.punchable() && !Mapping::EndpointDependent.punchable());
    }

    #[test]
    fn requests_decode_as_requests_and_garbage_is_ignored() {
        let txid = random_txid();
        assert_ne!(txid, random_txid());
        let req = encode_request(txid).unwrap();
        assert_eq!(req.len(), 20, "a bare Binding request is a header");
        assert_eq!(&req[4..8], &[0x21, 0x12, 0xa4, 0x42], "magic cookie");
        assert_eq!(decode_response(&req), None, "a request is not a response");
        assert_eq!(decode_response(b"garbage"), None);
        assert_eq!(decode_response(&[]), None);
    }

    #[test]
    fn decodes_a_success_response() {
        let txid = [7u8; 12];
        let mut msg: Message<Attribute> = Message::new(
            MessageClass::SuccessResponse,
            BINDING,
            TransactionId::new(txid),
        );
        msg.add_attribute(Attribute::XorMappedAddress(XorMappedAddress::new(a(
            "203.0.113.11:40000",
        ))));
        let bytes = MessageEncoder::new().encode_into_bytes(msg).unwrap();
        assert_eq!(
            decode_response(&bytes),
            Some((txid, a("203.0.113.11:40000")))
        );
    }
}
