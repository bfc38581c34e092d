//! The address a connection counts against: the peer's own, or, when the peer is a trusted
//! proxy, the client it names in `X-Forwarded-For`, read from the right so that nothing the
//! client wrote itself can choose the address.

use std::net::{IpAddr, SocketAddr};

use hyper::HeaderMap;
use ipnet::IpNet;

/// The address a connection is counted against.
///
/// From a trusted proxy, `X-Forwarded-For` is read from the right: hops that are trusted
/// proxies are skipped and the first other one is the client. Whatever lies left of it was
/// written by the client itself and is ignored, garbage included. A hop that does not parse
/// at that position proves nothing, so the connection counts against the peer (the proxy);
/// when every hop is a trusted proxy, the leftmost counts. IPv4-mapped IPv6 addresses are
/// taken as IPv4.
pub(crate) fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    // Several header lines are one list in order (RFC 9110 §5.3): the last line's last hop
    // was written by the proxy nearest to us.
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .rev()
        .flat_map(|value| value.as_bytes().rsplit(|&b| b == b','));
    let mut leftmost_trusted = None;
    for hop in hops {
        match parse_hop(hop) {
            Some(ip) if is_trusted(&ip) => leftmost_trusted = Some(ip),
            Some(ip) => return ip,
            None => return peer,
        }
    }
    leftmost_trusted.unwrap_or(peer)
}

/// One `X-Forwarded-For` hop: an address, or an address with a port as some proxies write.
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(hop).ok()?.trim();
    let ip = text
        .parse::<IpAddr>()
        .or_else(|_| text.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_net;
    use hyper::header::HeaderValue;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn forwarded_addresses_count_only_behind_a_trusted_proxy() {
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        let trusted = vec![parse_net("10.0.0.0/24").unwrap()];
        let spoofed = headers(&["6.6.6.6, 1.2.3.4"]);
        // Not from a proxy: the header is the client's own claim.
        let direct: IpAddr = "9.9.9.9".parse().unwrap();
        assert_eq!(client_ip(direct, &spoofed, &trusted), direct);
        // From the proxy: the rightmost untrusted hop.
        assert_eq!(
            client_ip(proxy, &spoofed, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        let chain = headers(&["1.2.3.4", "10.0.0.7"]);
        assert_eq!(
            client_ip(proxy, &chain, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        // Garbage from the proxy: fall back to the proxy itself.
        assert_eq!(client_ip(proxy, &headers(&["nonsense"]), &trusted), proxy);
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy);
    }

    #[test]
    fn forwarded_for_is_read_from_the_right_and_garbage_left_of_the_client_is_ignored() {
        let proxy = ip("10.0.0.2");
        let trusted = vec![
            parse_net("10.0.0.0/24").unwrap(),
            parse_net("192.168.0.0/16").unwrap(),
        ];
        let at = |lines: &[&str]| client_ip(proxy, &headers(lines), &trusted);
        // Whatever the client wrote left of its own hop, on its line or an earlier one.
        assert_eq!(at(&["nonsense, <script>, 1.2.3.4"]), ip("1.2.3.4"));
        assert_eq!(at(&["not-an-ip", "1.2.3.4"]), ip("1.2.3.4"));
        let mut bytes = HeaderMap::new();
        let raw = HeaderValue::from_bytes(b"\xff\xfe, 1.2.3.4").unwrap();
        bytes.append("x-forwarded-for", raw);
        assert_eq!(client_ip(proxy, &bytes, &trusted), ip("1.2.3.4"));
        // A chain of trusted proxies is skipped.
        let chain = ["6.6.6.6, 1.2.3.4, 192.168.1.1", "10.0.0.7"];
        assert_eq!(at(&chain), ip("1.2.3.4"));
        // Every hop a trusted proxy: the leftmost (a client inside the network).
        assert_eq!(at(&["192.168.1.5, 10.0.0.7"]), ip("192.168.1.5"));
        // Garbage where the client's hop should be: the proxy itself.
        assert_eq!(at(&["1.2.3.4, unknown, 10.0.0.7"]), proxy);
        assert_eq!(at(&["1.2.3.4, "]), proxy);
        assert_eq!(at(&[""]), proxy);
        // Ports, and IPv4-mapped addresses as IPv4, in hops and peers.
        assert_eq!(at(&["1.2.3.4:5678"]), ip("1.2.3.4"));
        assert_eq!(at(&["[2001:db8::1]:443"]), ip("2001:db8::1"));
        assert_eq!(at(&["::ffff:1.2.3.4"]), ip("1.2.3.4"));
        let mapped = ip("::ffff:10.0.0.2");
        assert_eq!(
            client_ip(mapped, &headers(&["1.2.3.4"]), &trusted),
            ip("1.2.3.4")
        );
    }
}
