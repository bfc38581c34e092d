//! Who may open a connection: the client's address (taken from `X-Forwarded-For` only when
//! the peer is a trusted proxy), per-address limits on open connections and on connection
//! attempts, and the optional signed-token authentication that fixes the user's name.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use hyper::HeaderMap;
use hyper::header;
use ipnet::IpNet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::time::Instant;

use crate::config::{AuthConfig, ServerConfig};
use crate::protocol::valid_user_name;

/// The cookie that may carry the token, as an alternative to the `token` query parameter.
pub const TOKEN_COOKIE: &str = "scalechat_token";

/// The address a connection is counted against.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    // The rightmost address that is not one of our proxies is the client; anything left of
    // it was written by the client itself and proves nothing. A header that does not parse
    // counts for nothing.
    let mut hops = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(text) = value.to_str() else {
            return peer;
        };
        for hop in text.split(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => hops.push(ip),
                Err(_) => return peer,
            }
        }
    }
    hops.iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .or(hops.first())
        .copied()
        .unwrap_or(peer)
}

/// Parses `server.trusted_proxies` entries (addresses or networks). Checked by config
/// validation, so entries that do not parse are skipped here.
pub fn trusted_proxies(config: &ServerConfig) -> Vec<IpNet> {
    config
        .trusted_proxies
        .iter()
        .filter_map(|entry| parse_net(entry))
        .collect()
}

/// An address (`10.0.0.1`) or network (`10.0.0.0/8`).
pub fn parse_net(entry: &str) -> Option<IpNet> {
    entry
        .parse::<IpNet>()
        .ok()
        .or_else(|| entry.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Why a client address may not connect now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// It has `server.max_connections_per_ip` connections open.
    Connections,
    /// It tried to connect faster than `server.connects_per_ip_per_second`.
    Rate,
}

/// Open connections and recent connection attempts per client address.
#[derive(Debug, Default)]
pub struct PerIp {
    state: Mutex<HashMap<IpAddr, IpState>>,
}

#[derive(Debug)]
struct IpState {
    open: usize,
    tokens: f64,
    last: Instant,
}

/// Limits for [`PerIp::admit`]; 0 turns one off.
#[derive(Debug, Clone, Copy)]
pub struct IpLimits {
    /// Connections open at once per address.
    pub max_open: usize,
    /// Connection attempts per second per address, sustained.
    pub rate: f64,
    /// Connection attempts per address in a burst.
    pub burst: u32,
}

impl PerIp {
    /// Counts an attempt from `ip`; on success the returned guard holds one of its
    /// connection slots until dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, limits: IpLimits) -> Result<IpSlot, Limited> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.len() > 100_000 {
            // Forget idle addresses so the map stays bounded under a scan.
            state.retain(|_, s| s.open > 0 || now.saturating_duration_since(s.last).as_secs() < 60);
        }
        let entry = state.entry(ip).or_insert(IpState {
            open: 0,
            tokens: f64::from(limits.burst),
            last: now,
        });
        if limits.rate > 0.0 {
            let elapsed = now.saturating_duration_since(entry.last).as_secs_f64();
            entry.tokens = (entry.tokens + elapsed * limits.rate).min(f64::from(limits.burst));
            entry.last = now;
            if entry.tokens < 1.0 {
                return Err(Limited::Rate);
            }
            entry.tokens -= 1.0;
        } else {
            entry.last = now;
        }
        if limits.max_open > 0 && entry.open >= limits.max_open {
            return Err(Limited::Connections);
        }
        entry.open += 1;
        Ok(IpSlot {
            table: self.clone(),
            ip,
        })
    }

    /// Connections open from `ip` now.
    #[cfg(test)]
    pub fn open(&self, ip: IpAddr) -> usize {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.get(&ip).map_or(0, |s| s.open)
    }
}

/// One open connection of an address; released when dropped.
#[derive(Debug)]
pub struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut state = self
            .table
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = state.get_mut(&self.ip) {
            s.open = s.open.saturating_sub(1);
        }
    }
}

/// Token checking, when `auth.jwt_secret` is set.
pub struct Auth {
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
    pub fn new(config: &AuthConfig) -> Option<Self> {
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
    pub fn user(&self, token: &str) -> Result<String, String> {
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
pub fn token<'a>(query_token: Option<&'a str>, headers: &'a HeaderMap) -> Option<&'a str> {
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
