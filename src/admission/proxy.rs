//! The PROXY protocol, version 2 (HAProxy's `send-proxy-v2`): the binary header an L4 balancer
//! sends before anything else, naming the client's own address. Parsed here, pure; the shell
//! reads it only from the configured balancer addresses (`server.proxy_protocol_from`).

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version and command, family and protocol, length.
pub const FIXED_LEN: usize = 16;
/// Longest address block accepted (addresses and TLVs); HAProxy's headers are far shorter.
pub const MAX_BLOCK: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY protocol v2 signature (the balancer must send `send-proxy-v2`)")]
    Signature,
    #[error("PROXY protocol version {0} (only 2 is spoken)")]
    Version(u8),
    #[error("PROXY protocol command {0:#x} is neither LOCAL nor PROXY")]
    Command(u8),
    #[error("PROXY header address block of {0} bytes is longer than {MAX_BLOCK}")]
    TooLong(usize),
    #[error("PROXY header address block too short for its family")]
    Short,
}

/// The fixed part: how many bytes follow, and what they carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixed {
    /// `false`: LOCAL (the balancer's own health check): keep the connection's address.
    pub proxied: bool,
    family: u8,
    pub block_len: usize,
}

/// Parses the first [`FIXED_LEN`] bytes.
pub fn parse_fixed(head: &[u8; FIXED_LEN]) -> Result<Fixed, ProxyError> {
    if head[..12] != SIGNATURE {
        return Err(ProxyError::Signature);
    }
    let version = head[12] >> 4;
    if version != 2 {
        return Err(ProxyError::Version(version));
    }
    let proxied = match head[12] & 0x0f {
        0 => false,
        1 => true,
        c => return Err(ProxyError::Command(c)),
    };
    let block_len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if block_len > MAX_BLOCK {
        return Err(ProxyError::TooLong(block_len));
    }
    Ok(Fixed {
        proxied,
        family: head[13] >> 4,
        block_len,
    })
}

/// The client's address from the address block; `None` for LOCAL, UNSPEC or UNIX (the
/// connection's own address stands).
pub fn source(fixed: &Fixed, block: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    if !fixed.proxied {
        return Ok(None);
    }
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    match fixed.family {
        1 => {
            if block.len() < 12 {
                return Err(ProxyError::Short);
            }
            let ip = Ipv4Addr::new(block[0], block[1], block[2], block[3]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port(&block[8..10]))))
        }
        2 => {
            if block.len() < 36 {
                return Err(ProxyError::Short);
            }
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&block[..16]);
            Ok(Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                port(&block[32..34]),
            )))
        }
        _ => Ok(None),
    }
}

/// A v2 header for `source` -> `destination` (for tests and the simulator).
pub fn encode(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    out.push(0x21);
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
        let mut head = [0u8; FIXED_LEN];
        head.copy_from_slice(&bytes[..FIXED_LEN]);
        let fixed = parse_fixed(&head)?;
        source(&fixed, &bytes[FIXED_LEN..FIXED_LEN + fixed.block_len])
    }

    #[test]
    fn v4_and_v6_round_trip() {
        let s: SocketAddr = "203.0.113.7:51234".parse().unwrap();
        let d: SocketAddr = "10.0.0.1:8443".parse().unwrap();
        assert_eq!(parse(&encode(s, d)).unwrap(), Some(s));
        let s6: SocketAddr = "[2001:db8::7]:4000".parse().unwrap();
        let d6: SocketAddr = "[2001:db8::1]:8443".parse().unwrap();
        assert_eq!(parse(&encode(s6, d6)).unwrap(), Some(s6));
    }

    #[test]
    fn local_keeps_the_connection_address_and_bad_headers_say_why() {
        let mut local = encode("1.2.3.4:5".parse().unwrap(), "5.6.7.8:9".parse().unwrap());
        local[12] = 0x20;
        assert_eq!(parse(&local).unwrap(), None);
        let mut tls = vec![0x16, 0x03, 0x01];
        tls.resize(FIXED_LEN + 12, 0);
        assert_eq!(parse(&tls), Err(ProxyError::Signature));
        let mut v1 = encode("1.2.3.4:5".parse().unwrap(), "5.6.7.8:9".parse().unwrap());
        v1[12] = 0x11;
        assert_eq!(parse(&v1), Err(ProxyError::Version(1)));
        let mut long = encode("1.2.3.4:5".parse().unwrap(), "5.6.7.8:9".parse().unwrap());
        long[14..16].copy_from_slice(&2000u16.to_be_bytes());
        let mut head = [0u8; FIXED_LEN];
        head.copy_from_slice(&long[..FIXED_LEN]);
        assert_eq!(parse_fixed(&head), Err(ProxyError::TooLong(2000)));
    }
}
