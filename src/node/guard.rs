//! Who may open a connection. [`client_addr`] finds the address a connection counts against
//! (from `X-Forwarded-For` only when the peer is a trusted proxy); [`per_ip`] keeps the
//! per-address limits on open connections and on connection attempts; this file holds the
//! optional signed-token authentication that fixes the user's name, and where the token is read.

use hyper::HeaderMap;
use hyper::header;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::access::Grant;
use crate::config::AuthConfig;
use crate::protocol::valid_user_name;

mod client_addr;
mod per_ip;

pub(crate) use client_addr::client_ip;
pub(crate) use per_ip::{IpLimits, IpSlot, Limited, PerIp};

/// The cookie that may carry the token, as an alternative to the `token` query parameter.
pub(crate) const TOKEN_COOKIE: &str = "scalechat_token";

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
    /// Rooms the user may join (patterns, see [`crate::protocol::RoomPattern`]).
    rooms: Option<Vec<String>>,
    /// Rooms the user may join to read only.
    read_only_rooms: Option<Vec<String>>,
}

/// Who a valid token says the user is, and the rooms it grants.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    /// The display name.
    pub(crate) name: String,
    /// The rooms its token lists.
    pub(crate) grant: Grant,
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

    /// The user a valid token names (`name`, else `sub`) and the rooms it grants, or why it
    /// is refused.
    pub(crate) fn user(&self, token: &str) -> Result<Identity, String> {
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
        let grant = Grant::from_claims(
            data.claims.rooms.as_deref(),
            data.claims.read_only_rooms.as_deref(),
        )?;
        Ok(Identity { name, grant })
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
    use hyper::header::HeaderValue;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-unit";

    fn auth(audience: &str, issuer: &str) -> Auth {
        Auth::new(&AuthConfig {
            jwt_secret: SECRET.into(),
            leeway_secs: 30,
            jwt_audience: audience.into(),
            jwt_issuer: issuer.into(),
            ..AuthConfig::default()
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
        assert_eq!(plain.user(&sign(json!({}))).unwrap().name, "ann");
        assert_eq!(
            plain.user(&sign(json!({"nbf": now - 10}))).unwrap().name,
            "ann"
        );
        let early = plain.user(&sign(json!({"nbf": now + 3600}))).unwrap_err();
        assert!(early.contains("ImmatureSignature"), "{early}");
        // No audience configured: a token meant for some audience is not for us.
        let aimed = plain.user(&sign(json!({"aud": "chat"}))).unwrap_err();
        assert!(aimed.contains("InvalidAudience"), "{aimed}");
        assert_eq!(
            plain.user(&sign(json!({"iss": "anyone"}))).unwrap().name,
            "ann"
        );

        let strict = auth("chat", "https://id.example.com");
        let right = json!({"aud": "chat", "iss": "https://id.example.com"});
        assert_eq!(strict.user(&sign(right)).unwrap().name, "ann");
        let many = json!({"aud": ["mail", "chat"], "iss": "https://id.example.com"});
        assert_eq!(strict.user(&sign(many)).unwrap().name, "ann");
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
