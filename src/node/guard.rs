//! Who may open a connection: the client's address (taken from `X-Forwarded-For` only when
//! the peer is a trusted proxy), per-address limits on open connections and on connection
//! attempts, and the optional signed-token authentication that fixes the user's name.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper::HeaderMap;
use hyper::header;
use ipnet::IpNet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::time::Instant;

use crate::config::AuthConfig;
use crate::protocol::valid_user_name;

/// The cookie that may carry the token, as an alternative to the `token` query parameter.
pub(crate) const TOKEN_COOKIE: &str = "scalechat_token";

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

/// Why a client address may not connect now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limited {
    /// It has `server.max_connections_per_ip` connections open.
    Connections,
    /// It tried to connect faster than `server.connects_per_ip_per_second`.
    Rate,
}

/// Open connections and recent connection attempts per client address bucket (see
/// [`bucket`]).
///
/// Bounded: one open-count entry per bucket with a connection open (so at most the open
/// connections), and at most `2 × MAX_TRACKED` attempt entries, about 50 bytes each. Every
/// operation under the lock is O(1) amortised: nothing is ever scanned.
#[derive(Debug)]
pub(crate) struct PerIp {
    state: Mutex<Table>,
    ipv6_prefix_len: u8,
    max_tracked: usize,
}

/// Attempt entries kept per generation; the table holds at most twice as many.
const MAX_TRACKED: usize = 50_000;

#[derive(Debug)]
struct Table {
    /// Connections open per bucket; an entry leaves when its count returns to 0.
    open: HashMap<IpAddr, u32>,
    /// Attempt token buckets touched since `rotated` ...
    current: HashMap<IpAddr, Tokens>,
    /// ... and those last touched in the generation before. A bucket touched again moves
    /// back to `current`; the older generation is dropped whole at each rotation.
    previous: HashMap<IpAddr, Tokens>,
    rotated: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Tokens {
    tokens: f64,
    last: Instant,
}

/// Limits for [`PerIp::admit`]; 0 turns one off.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IpLimits {
    /// Connections open at once per address.
    pub(crate) max_open: usize,
    /// Connection attempts per second per address, sustained.
    pub(crate) rate: f64,
    /// Connection attempts per address in a burst.
    pub(crate) burst: u32,
}

impl IpLimits {
    /// How long an idle token bucket takes to refill: one forgotten after at least this long
    /// is the same as a new one, so this is how long a generation of the table lasts.
    fn refill_time(&self) -> Duration {
        let secs = f64::from(self.burst) / self.rate;
        Duration::try_from_secs_f64(secs)
            .unwrap_or(Duration::MAX)
            .clamp(Duration::from_secs(1), Duration::from_secs(24 * 3600))
    }
}

/// The key an address is counted under: an IPv4 address (IPv4-mapped IPv6 included) alone,
/// an IPv6 address by its first `ipv6_prefix_len` bits, since one subscriber usually holds a
/// whole /64 (or more) and can use any address in it.
pub(crate) fn bucket(ip: IpAddr, ipv6_prefix_len: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let host_bits = 128 - u32::from(ipv6_prefix_len.min(128));
            let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

impl Default for PerIp {
    fn default() -> Self {
        Self::new(64)
    }
}

impl PerIp {
    /// An empty table that counts IPv6 addresses by their first `ipv6_prefix_len` bits.
    pub(crate) fn new(ipv6_prefix_len: u8) -> Self {
        Self::with_max_tracked(ipv6_prefix_len, MAX_TRACKED)
    }

    fn with_max_tracked(ipv6_prefix_len: u8, max_tracked: usize) -> Self {
        Self {
            state: Mutex::new(Table {
                open: HashMap::new(),
                current: HashMap::new(),
                previous: HashMap::new(),
                rotated: Instant::now(),
            }),
            ipv6_prefix_len,
            max_tracked: max_tracked.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts an attempt from `ip`; on success the returned guard holds one of its
    /// connection slots until dropped.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr, limits: IpLimits) -> Result<IpSlot, Limited> {
        let key = bucket(ip, self.ipv6_prefix_len);
        let mut table = self.lock();
        if limits.rate > 0.0 {
            table.take_token(key, limits, self.max_tracked)?;
        }
        let open = table.open.get(&key).copied().unwrap_or(0);
        if limits.max_open > 0 && open as usize >= limits.max_open {
            return Err(Limited::Connections);
        }
        *table.open.entry(key).or_insert(0) += 1;
        Ok(IpSlot {
            table: self.clone(),
            ip: key,
        })
    }

    /// Connections open from `ip`'s bucket now.
    #[cfg(test)]
    pub(crate) fn open(&self, ip: IpAddr) -> usize {
        let key = bucket(ip, self.ipv6_prefix_len);
        self.lock().open.get(&key).map_or(0, |n| *n as usize)
    }

    /// Attempt entries held now, both generations.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        let table = self.lock();
        table.current.len() + table.previous.len()
    }
}

impl Table {
    /// Takes one attempt token from `key`'s bucket, or refuses with [`Limited::Rate`].
    fn take_token(&mut self, key: IpAddr, limits: IpLimits, max: usize) -> Result<(), Limited> {
        let now = Instant::now();
        let burst = f64::from(limits.burst);
        if now.saturating_duration_since(self.rotated) >= limits.refill_time() {
            self.rotate(now);
        }
        if !self.current.contains_key(&key) {
            let carried = self.previous.remove(&key);
            // Full: start a generation early. Buckets then may be forgotten before they
            // refill (an address flood costs precision, never memory).
            if self.current.len() >= max {
                self.rotate(now);
            }
            let fresh = Tokens {
                tokens: burst,
                last: now,
            };
            self.current.insert(key, carried.unwrap_or(fresh));
        }
        // Inserted just above when absent.
        let entry = self.current.get_mut(&key).expect("bucket present");
        let elapsed = now.saturating_duration_since(entry.last).as_secs_f64();
        entry.tokens = (entry.tokens + elapsed * limits.rate).min(burst);
        entry.last = now;
        if entry.tokens < 1.0 {
            return Err(Limited::Rate);
        }
        entry.tokens -= 1.0;
        Ok(())
    }

    /// `current` becomes `previous`; the old `previous` is dropped. Its entries are plain
    /// values, so dropping frees the memory without visiting them.
    fn rotate(&mut self, now: Instant) {
        self.previous = std::mem::take(&mut self.current);
        self.rotated = now;
    }
}

/// One open connection of an address; released when dropped.
#[derive(Debug)]
pub(crate) struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut table = self.table.lock();
        if let Some(n) = table.open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                table.open.remove(&self.ip);
            }
        }
    }
}

/// Token checking, when `auth.jwt_secret` is set.
pub(crate) struct Auth {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Claims {
    name: Option<String>,
    sub: Option<String>,
}

impl Auth {
    /// `None` when authentication is off.
    pub(crate) fn new(config: &AuthConfig) -> Option<Self> {
        let secret = config.jwt_secret.expose();
        if secret.is_empty() {
            return None;
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = config.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        // Without an audience configured, a token that names one is for someone else
        // (RFC 7519 §4.1.3): the library refuses it, which is kept.
        if !config.jwt_audience.is_empty() {
            validation.set_audience(&[&config.jwt_audience]);
            required.push("aud");
        }
        if !config.jwt_issuer.is_empty() {
            validation.set_issuer(&[&config.jwt_issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Some(Self {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        })
    }

    /// The user name a valid token carries (`name`, else `sub`), or why it is refused.
    pub(crate) fn user(&self, token: &str) -> Result<String, String> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| format!("invalid token: {e}"))?;
        let name = data
            .claims
            .name
            .or(data.claims.sub)
            .ok_or("invalid token: it names no user (`name` or `sub`)")?;
        if !valid_user_name(&name) {
            return Err("invalid token: its user name is not a valid display name".into());
        }
        Ok(name)
    }
}

/// The token from the `token` query parameter, else the [`TOKEN_COOKIE`] cookie.
pub(crate) fn token<'a>(query_token: Option<&'a str>, headers: &'a HeaderMap) -> Option<&'a str> {
    query_token.or_else(|| {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == TOKEN_COOKIE)
            .map(|(_, value)| value)
    })
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

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
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

    #[test]
    fn ipv6_addresses_count_by_prefix_and_mapped_ipv4_as_ipv4() {
        let same_64 = (ip("2001:db8:1:2:aaaa::1"), ip("2001:db8:1:2:bbbb::9"));
        assert_eq!(bucket(same_64.0, 64), bucket(same_64.1, 64));
        assert_eq!(bucket(same_64.0, 64), ip("2001:db8:1:2::"));
        assert_ne!(bucket(same_64.0, 128), bucket(same_64.1, 128));
        assert_ne!(
            bucket(ip("2001:db8:1:2::1"), 64),
            bucket(ip("2001:db8:1:3::1"), 64)
        );
        assert_eq!(bucket(ip("2001:db8:1:2::1"), 48), ip("2001:db8:1::"));
        assert_eq!(bucket(ip("::ffff:1.2.3.4"), 64), ip("1.2.3.4"));
        assert_ne!(bucket(ip("1.2.3.4"), 32), bucket(ip("1.2.3.5"), 32));
    }

    #[test]
    fn one_ipv6_64_shares_its_limit_unless_128_is_configured() {
        let limits = IpLimits {
            max_open: 1,
            rate: 0.0,
            burst: 1,
        };
        let (a, b) = (ip("2001:db8:0:1::a"), ip("2001:db8:0:1:ffff::b"));
        let table = Arc::new(PerIp::new(64));
        let _held = table.admit(a, limits).unwrap();
        assert_eq!(table.admit(b, limits).unwrap_err(), Limited::Connections);
        assert!(table.admit(ip("2001:db8:0:2::a"), limits).is_ok());
        let table = Arc::new(PerIp::new(128));
        let _held = table.admit(a, limits).unwrap();
        assert!(table.admit(b, limits).is_ok());
        // An IPv4-mapped address is the IPv4 address.
        let table = Arc::new(PerIp::default());
        let _held = table.admit(ip("1.2.3.4"), limits).unwrap();
        let mapped = ip("::ffff:1.2.3.4");
        assert_eq!(
            table.admit(mapped, limits).unwrap_err(),
            Limited::Connections
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_stays_bounded_and_forgets_idle_addresses() {
        let table = Arc::new(PerIp::with_max_tracked(64, 100));
        // A full bucket refills in 2 s: a generation lasts that long.
        let limits = IpLimits {
            max_open: 0,
            rate: 1.0,
            burst: 2,
        };
        // A flood of distinct addresses never holds more than two generations.
        for n in 0..10_000u32 {
            drop(table.admit(IpAddr::from(n.to_be_bytes()), limits).unwrap());
            assert!(table.tracked() <= 200, "{} entries", table.tracked());
        }
        assert!(
            table.lock().open.is_empty(),
            "released slots leave no entry"
        );
        // An address that used its burst is remembered while it refills ...
        let a = ip("203.0.113.1");
        let _first = table.admit(a, limits).unwrap();
        let _second = table.admit(a, limits).unwrap();
        assert_eq!(table.admit(a, limits).unwrap_err(), Limited::Rate);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(table.admit(ip("203.0.113.2"), limits).is_ok());
        assert!(table.admit(a, limits).is_ok(), "1.5 tokens back");
        assert_eq!(table.admit(a, limits).unwrap_err(), Limited::Rate);
        // ... and is forgotten two generations after it went idle.
        for other in ["203.0.113.3", "203.0.113.4"] {
            tokio::time::advance(Duration::from_secs(2)).await;
            assert!(table.admit(ip(other), limits).is_ok());
        }
        assert_eq!(
            table.tracked(),
            2,
            "only the last two generations' addresses"
        );
        assert_eq!(
            table.open(a),
            2,
            "open connections are kept whatever their age"
        );
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef-unit";

    fn auth(audience: &str, issuer: &str) -> Auth {
        Auth::new(&AuthConfig {
            jwt_secret: SECRET.into(),
            leeway_secs: 30,
            jwt_audience: audience.into(),
            jwt_issuer: issuer.into(),
        })
        .unwrap()
    }

    /// A token for `ann` valid for an hour, with `extra` claims.
    fn sign(extra: serde_json::Value) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        let mut claims = serde_json::json!({"name": "ann", "exp": now + 3600});
        claims
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
    }

    #[test]
    fn tokens_not_yet_valid_or_for_another_audience_or_issuer_are_refused() {
        use serde_json::json;
        let now = jsonwebtoken::get_current_timestamp();
        let plain = auth("", "");
        assert_eq!(plain.user(&sign(json!({}))).unwrap(), "ann");
        assert_eq!(plain.user(&sign(json!({"nbf": now - 10}))).unwrap(), "ann");
        let early = plain.user(&sign(json!({"nbf": now + 3600}))).unwrap_err();
        assert!(early.contains("ImmatureSignature"), "{early}");
        // No audience configured: a token meant for some audience is not for us.
        let aimed = plain.user(&sign(json!({"aud": "chat"}))).unwrap_err();
        assert!(aimed.contains("InvalidAudience"), "{aimed}");
        assert_eq!(plain.user(&sign(json!({"iss": "anyone"}))).unwrap(), "ann");

        let strict = auth("chat", "https://id.example.com");
        let right = json!({"aud": "chat", "iss": "https://id.example.com"});
        assert_eq!(strict.user(&sign(right)).unwrap(), "ann");
        let many = json!({"aud": ["mail", "chat"], "iss": "https://id.example.com"});
        assert_eq!(strict.user(&sign(many)).unwrap(), "ann");
        for (claims, why) in [
            (
                json!({"aud": "mail", "iss": "https://id.example.com"}),
                "InvalidAudience",
            ),
            (
                json!({"aud": "chat", "iss": "https://evil.example"}),
                "InvalidIssuer",
            ),
            (json!({"iss": "https://id.example.com"}), "aud"),
            (json!({"aud": "chat"}), "iss"),
        ] {
            let refused = strict.user(&sign(claims.clone())).unwrap_err();
            assert!(refused.contains(why), "{claims}: {refused}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn per_ip_limits_cap_open_connections_and_attempt_rate() {
        let table = Arc::new(PerIp::default());
        let ip: IpAddr = "1.2.3.4".parse().unwrap();
        let limits = IpLimits {
            max_open: 2,
            rate: 1.0,
            burst: 3,
        };
        let a = table.admit(ip, limits).unwrap();
        let _b = table.admit(ip, limits).unwrap();
        assert_eq!(table.admit(ip, limits).unwrap_err(), Limited::Connections);
        drop(a);
        assert_eq!(table.open(ip), 1);
        // Three attempts used the burst.
        assert_eq!(table.admit(ip, limits).unwrap_err(), Limited::Rate);
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        assert!(table.admit(ip, limits).is_ok());
        // Other addresses are not affected.
        assert!(table.admit("5.6.7.8".parse().unwrap(), limits).is_ok());
    }

    #[test]
    fn tokens_come_from_the_query_or_the_cookie() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; scalechat_token=abc"),
        );
        assert_eq!(token(None, &h), Some("abc"));
        assert_eq!(token(Some("q"), &h), Some("q"));
        assert_eq!(token(None, &HeaderMap::new()), None);
    }
}
